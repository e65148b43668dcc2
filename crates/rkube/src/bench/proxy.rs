//! `rkube bench proxy`: the Service proxy against an in-process API server, with nft acting
//! inside a network namespace this bench creates (the host's ruleset is never touched).
//!
//! For N Services (each one port, one EndpointSlice of 5 endpoints): the time from starting the
//! proxy to the first full table being in the kernel, then EndpointSlice changes made one at a
//! time, each replacing all five endpoints of one Service, timed from the API server's
//! acknowledgement of the write to the kernel sending new connections to the new endpoints.
//! That is seen in traffic, not taken from the proxy: a thread inside the namespace connects to
//! the Service's ClusterIP again and again (every ~0.5 ms) and reads which endpoint address its
//! listener accepted the connection on (the namespace routes all endpoint addresses to itself),
//! until it is one of the new ones. The proxy's own report (`rkube_proxy::Applied`, published
//! after the netlink transaction was acknowledged) is timed too, for comparison. A burst of
//! changes at 100/s must then leave the table with exactly as many chains and map elements as
//! before, as listed from the kernel.
//!
//! Where the time goes (nft 1.0.6, kernel 6.18): an `nft` run lists every chain of the table
//! into its cache before applying even a one-element change (~0.5 s with 60,000 chains), so
//! changes go over netlink instead (`rkube_proxy::nl`). The proxy renders only the changed
//! Service and adjusts the merged maps and sets by its entries (~0.1 ms at 1,000 Services, and a
//! unit test holds one change among 10,000 to its own five steps). What is left is the watch
//! delivering the write and the kernel's commit: a change that replaces a rule holding a DNAT
//! makes nf_tables check the whole table for loops (~1 ms at 1,000 Services; ~15 ms at 10,000
//! when last measured). Loading the table whole (start, hourly) still goes through nft.

use std::net::{Ipv4Addr, SocketAddrV4, TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::Api;
use kube::api::{Patch, PatchParams, PostParams};
use serde_json::{Value, json};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

const ENDPOINTS_PER_SERVICE: usize = 5;
const NAMESPACE: &str = "default";
/// The port endpoints listen on (the prober's listener).
const TARGET_PORT: u16 = 8080;

/// A network namespace `rkube-pb-<random>`, deleted (with its nftables) on drop.
struct Netns {
    name: String,
}

impl Netns {
    fn create() -> anyhow::Result<Netns> {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let name = format!("rkube-pb-{:08x}", nanos ^ std::process::id().rotate_left(16));
        let status = Command::new("ip")
            .args(["netns", "add", &name])
            .status()
            .context("run `ip netns add` (is iproute2 installed?)")?;
        if !status.success() {
            bail!("`ip netns add {name}` failed");
        }
        let ns = Netns { name };
        ns.exec(&["ip", "link", "set", "lo", "up"])?;
        // For the prober: the ClusterIPs and every endpoint address are local, so a connection
        // to a ClusterIP passes the NAT output hook (which DNATs it) and is then accepted by the
        // prober's listener on the endpoint address it was sent to.
        ns.exec(&["ip", "route", "add", "local", "10.100.0.0/16", "dev", "lo"])?;
        ns.exec(&["ip", "route", "add", "local", "10.244.0.0/14", "dev", "lo"])?;
        Ok(ns)
    }

    /// Runs `args` inside the namespace; its stdout, or an error with its stderr.
    fn exec(&self, args: &[&str]) -> anyhow::Result<String> {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.name])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("run {} in {}", args.join(" "), self.name))?;
        if !out.status.success() {
            bail!("{}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn prefix(&self, program: &str) -> Vec<String> {
        ["ip", "netns", "exec", &self.name, program].map(String::from).to_vec()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Deleting the namespace takes the proxy's table with it.
        let _ = Command::new("ip").args(["netns", "del", &self.name]).status();
    }
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status").is_ok_and(|s| {
        s.lines().find(|l| l.starts_with("Uid:")).and_then(|l| l.split_whitespace().nth(2))
            == Some("0")
    })
}

/// A thread inside the namespace that asks the kernel, by connecting, where a Service address
/// sends new connections.
struct Prober {
    requests: Option<std::sync::mpsc::Sender<Probe>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// Connect to `target` until the connection lands on one of `want`; reply with the moment the
/// first such connection was started, or an error after `limit`.
struct Probe {
    target: SocketAddrV4,
    want: Vec<Ipv4Addr>,
    limit: Duration,
    reply: tokio::sync::oneshot::Sender<anyhow::Result<Instant>>,
}

impl Prober {
    fn start(ns: &Netns) -> anyhow::Result<Prober> {
        let path = format!("/run/netns/{}", ns.name);
        let (tx, rx) = std::sync::mpsc::channel::<Probe>();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<anyhow::Result<()>>();
        let thread = std::thread::spawn(move || {
            let setup = || -> anyhow::Result<TcpListener> {
                let file = std::fs::File::open(&path).with_context(|| format!("open {path}"))?;
                nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)
                    .with_context(|| format!("enter {path}"))?;
                let listener = TcpListener::bind((Ipv4Addr::UNSPECIFIED, TARGET_PORT))?;
                listener.set_nonblocking(true)?;
                Ok(listener)
            };
            let listener = match setup() {
                Ok(l) => {
                    let _ = ready_tx.send(Ok(()));
                    l
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                    return;
                }
            };
            for p in rx {
                let _ = p.reply.send(probe_until(&listener, p.target, &p.want, p.limit));
            }
        });
        ready_rx.recv().context("the prober thread ended")??;
        Ok(Prober { requests: Some(tx), thread: Some(thread) })
    }

    /// Starts probing `target` for `want`; the answer comes on the returned receiver.
    fn until(
        &self,
        target: SocketAddrV4,
        want: Vec<Ipv4Addr>,
        limit: Duration,
    ) -> tokio::sync::oneshot::Receiver<anyhow::Result<Instant>> {
        let (reply, rx) = tokio::sync::oneshot::channel();
        if let Some(tx) = &self.requests {
            let _ = tx.send(Probe { target, want, limit, reply });
        }
        rx
    }
}

impl Drop for Prober {
    fn drop(&mut self) {
        // Closing the channel ends the thread, which holds the namespace open.
        self.requests = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Where one new connection to `target` lands: the local address the listener accepted it on.
fn landing(listener: &TcpListener, target: SocketAddrV4) -> anyhow::Result<Ipv4Addr> {
    let stream = TcpStream::connect_timeout(&target.into(), Duration::from_millis(500))?;
    let me = stream.local_addr()?;
    let until = Instant::now() + Duration::from_secs(1);
    loop {
        match listener.accept() {
            // Only this connection's own accept counts (no SNAT here, so its peer is `me`).
            Ok((accepted, peer)) if peer == me => match accepted.local_addr()?.ip() {
                std::net::IpAddr::V4(ip) => return Ok(ip),
                other => bail!("accepted on {other}"),
            },
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if Instant::now() > until {
                    bail!("a connection to {target} was not accepted here");
                }
                std::thread::sleep(Duration::from_micros(50));
            }
            Err(e) => return Err(e.into()),
        }
    }
}

fn probe_until(
    listener: &TcpListener,
    target: SocketAddrV4,
    want: &[Ipv4Addr],
    limit: Duration,
) -> anyhow::Result<Instant> {
    let started = Instant::now();
    loop {
        let attempt = Instant::now();
        let last = match landing(listener, target) {
            Ok(ip) if want.contains(&ip) => return Ok(attempt),
            Ok(ip) => ip.to_string(),
            Err(e) => format!("{e:#}"),
        };
        if started.elapsed() > limit {
            bail!("connections to {target} still land on {last} after {limit:?}");
        }
        std::thread::sleep(Duration::from_micros(500));
    }
}

/// Service `i`'s ClusterIP: 10.100.0.0/16 lies inside the default Service range (10.96.0.0/12).
fn cluster_ip(i: usize) -> String {
    format!("10.100.{}.{}", i / 250, i % 250 + 1)
}

/// Endpoint address number `n` (distinct for every n below 250 × 250 × 4).
fn endpoint_ip(n: usize) -> String {
    format!("10.{}.{}.{}", 244 + n / 62_500, (n / 250) % 250, n % 250 + 1)
}

fn slice_endpoints(ips: &[String]) -> Value {
    Value::Array(
        ips.iter()
            .map(|ip| json!({"addresses": [ip], "nodeName": "bench-node", "conditions": {"ready": true}}))
            .collect(),
    )
}

fn resource_version(meta: &kube::api::ObjectMeta) -> anyhow::Result<u64> {
    meta.resource_version
        .as_deref()
        .and_then(|v| v.parse().ok())
        .context("the API server returned no numeric resourceVersion")
}

/// Creates Services `svc-0..n` and their slices with 64 writers; returns the highest version.
async fn populate(client: &kube::Client, n: usize) -> anyhow::Result<u64> {
    let mut tasks = Vec::new();
    for t in 0..64 {
        let services: Api<Service> = Api::namespaced(client.clone(), NAMESPACE);
        let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), NAMESPACE);
        tasks.push(tokio::spawn(async move {
            let mut newest = 0;
            for i in (t..n).step_by(64) {
                let name = format!("svc-{i}");
                let svc: Service = serde_json::from_value(json!({
                    "metadata": {"name": name},
                    "spec": {"clusterIP": cluster_ip(i),
                             "ports": [{"name": "http", "port": 80, "targetPort": 8080}]}
                }))?;
                services.create(&PostParams::default(), &svc).await?;
                let ips: Vec<String> = (0..ENDPOINTS_PER_SERVICE)
                    .map(|j| endpoint_ip(i * ENDPOINTS_PER_SERVICE + j))
                    .collect();
                let slice: EndpointSlice = serde_json::from_value(json!({
                    "metadata": {"name": format!("{name}-1"),
                                 "labels": {"kubernetes.io/service-name": name}},
                    "addressType": "IPv4",
                    "endpoints": slice_endpoints(&ips),
                    "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}]
                }))?;
                let made = slices.create(&PostParams::default(), &slice).await?;
                newest = newest.max(resource_version(&made.metadata)?);
            }
            anyhow::Ok(newest)
        }));
    }
    let mut newest = 0;
    for t in tasks {
        newest = newest.max(t.await??);
    }
    Ok(newest)
}

/// Waits until the proxy reports an apply including version `rv`. Generous: a whole table of
/// 10,000 Services takes the kernel minutes to load (see the module comment).
async fn live(status: &mut watch::Receiver<rkube_proxy::Applied>, rv: u64) -> anyhow::Result<()> {
    let limit = Duration::from_secs(900);
    tokio::time::timeout(limit, status.wait_for(|a| a.resource_version >= rv))
        .await
        .with_context(|| format!("the proxy did not apply version {rv} within {limit:?}"))?
        .context("the proxy stopped")?;
    Ok(())
}

/// Replaces every endpoint of service `i`'s slice with address numbers `fresh..fresh + 5`;
/// returns the version the API server acknowledged and the new addresses.
async fn change(
    slices: &Api<EndpointSlice>,
    i: usize,
    fresh: usize,
) -> anyhow::Result<(u64, Vec<Ipv4Addr>)> {
    let ips: Vec<String> = (fresh..fresh + ENDPOINTS_PER_SERVICE).map(endpoint_ip).collect();
    let patch = json!({"endpoints": slice_endpoints(&ips)});
    let done =
        slices.patch(&format!("svc-{i}-1"), &PatchParams::default(), &Patch::Merge(&patch)).await?;
    let ips = ips.iter().map(|ip| ip.parse()).collect::<Result<_, _>>()?;
    Ok((resource_version(&done.metadata)?, ips))
}

/// Service `i`'s ClusterIP and port.
fn front(i: usize) -> anyhow::Result<SocketAddrV4> {
    Ok(SocketAddrV4::new(cluster_ip(i).parse()?, 80))
}

/// Chains, map elements and hairpin pairs in the namespace's `ip rkube` table.
fn table_size(ns: &Netns) -> anyhow::Result<(usize, usize, usize)> {
    let text = ns.exec(&["nft", "list", "table", "ip", "rkube"])?;
    let (mut chains, mut elements, mut pairs, mut in_map, mut in_hairpin) = (0, 0, 0, false, false);
    for line in text.lines().map(str::trim_start) {
        if line.starts_with("chain ") || line.starts_with("set ") || line.starts_with("map ") {
            chains += usize::from(line.starts_with("chain "));
            in_map = line.starts_with("map ");
            in_hairpin = line.starts_with("set hairpin ");
        } else if in_map {
            // Every element of the verdict maps carries one verdict (rules' anonymous maps
            // are inside chains, so not counted).
            elements += line.matches(" : goto ").count() + line.matches(" : drop").count();
        } else if in_hairpin && !line.starts_with("type ") {
            // One `a . a` per endpoint address in use.
            pairs += line.matches(" . ").count();
        }
    }
    Ok((chains, elements, pairs))
}

async fn one_size(n: usize, changes: usize) -> anyhow::Result<Value> {
    let ns = Netns::create()?;
    // Dropped before `ns` (declared after it): its thread holds the namespace open.
    let prober = Prober::start(&ns)?;
    let server = rkube_apiserver::testing::TestServer::start().await;
    let client = server.client().await;
    let populated = Instant::now();
    let newest = populate(&client, n).await?;
    let populate_s = populated.elapsed().as_secs_f64();

    let rules = rkube_proxy::RulesConfig { node_name: "bench-node".into(), ..Default::default() };
    let config = rkube_proxy::Config {
        rules: rules.clone(),
        nft: ns.prefix("nft"),
        conntrack: ns.prefix("conntrack"),
        // In-place changes over netlink into the namespace, as the proxy runs in production.
        netlink: Some(rkube_proxy::Netlink::Netns(format!("/run/netns/{}", ns.name).into())),
        // Apply as soon as a change arrives: the figure is the proxy's own latency, not a
        // configured pause.
        coalesce: Duration::from_millis(1),
        min_sync_period: Duration::ZERO,
        nft_timeout: Duration::from_secs(900),
        ..Default::default()
    };
    let (tx, mut status) = watch::channel(rkube_proxy::Applied::default());
    let stop = CancellationToken::new();
    let _stop_guard = stop.clone().drop_guard();
    let started = Instant::now();
    let proxy =
        tokio::spawn(rkube_proxy::run_reporting(client.clone(), config.clone(), stop.clone(), tx));
    live(&mut status, newest).await?;
    let first_live_s = started.elapsed().as_secs_f64();
    let first = *status.borrow();
    let (chains, elements, pairs) = table_size(&ns)?;
    if elements != n + 1 {
        // Every bench Service plus the API server's own `kubernetes` Service.
        bail!("after the first apply the table holds {elements} map elements, expected {}", n + 1);
    }
    if pairs < n * ENDPOINTS_PER_SERVICE {
        bail!(
            "after the first apply the table holds {pairs} hairpin pairs, expected every endpoint"
        );
    }

    // Traffic follows the rules: Service 0 lands on one of its endpoints.
    let first_eps: Vec<Ipv4Addr> =
        (0..ENDPOINTS_PER_SERVICE).map(|j| endpoint_ip(j).parse()).collect::<Result<_, _>>()?;
    prober
        .until(front(0)?, first_eps, Duration::from_secs(10))
        .await
        .context("the prober stopped")?
        .context("after the first apply")?;

    // One change at a time, each waited for.
    let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), NAMESPACE);
    let mut latencies = Vec::with_capacity(changes);
    let mut reported = Vec::with_capacity(changes);
    let mut nft_ms = Vec::with_capacity(changes);
    let mut via_netlink = 0;
    let mut change_render_ms = Vec::with_capacity(changes);
    let mut fresh = n * ENDPOINTS_PER_SERVICE;
    let mut last = (0, Ipv4Addr::UNSPECIFIED);
    for k in 0..changes {
        let i = (k * 7919) % n;
        let (rv, ips) = change(&slices, i, fresh).await?;
        let acked = Instant::now();
        let probe = prober.until(front(i)?, ips.clone(), Duration::from_secs(60));
        live(&mut status, rv).await?;
        reported.push(acked.elapsed().as_secs_f64() * 1000.0);
        let landed = probe
            .await
            .context("the prober stopped")?
            .with_context(|| format!("change {k} (Service svc-{i})"))?;
        latencies.push(landed.saturating_duration_since(acked).as_secs_f64() * 1000.0);
        nft_ms.push(status.borrow().nft_time.as_secs_f64() * 1000.0);
        via_netlink += usize::from(status.borrow().netlink);
        change_render_ms.push(status.borrow().render_time.as_secs_f64() * 1000.0);
        fresh += ENDPOINTS_PER_SERVICE;
        last = (i, ips[0]);
    }
    // What the proxy reported must be what the kernel holds.
    let (i, ip) = &last;
    let listed = ns.exec(&[
        "nft",
        "list",
        "chain",
        "ip",
        "rkube",
        &format!("service-{NAMESPACE}/svc-{i}/tcp/http"),
    ])?;
    if !listed.contains(&format!("{ip} . {TARGET_PORT}")) {
        bail!(
            "the last change ({ip}) is not in the kernel although the proxy reported it applied:\n{listed}"
        );
    }
    // What every change cost before incremental updates: the whole table replaced over itself
    // (rendered from the same objects the proxy sees).
    let all_services: Api<Service> = Api::all(client.clone());
    let all_slices: Api<EndpointSlice> = Api::all(client.clone());
    let svc_list = all_services.list(&Default::default()).await?.items;
    let slice_list = all_slices.list(&Default::default()).await?.items;
    let rendering = Instant::now();
    let full = rkube_proxy::render(&svc_list, &slice_list, &rules);
    let render_ms = rendering.elapsed().as_secs_f64() * 1000.0;
    let replacing = Instant::now();
    rkube_proxy::apply(&config, &full.text).await.context("replace the table whole")?;
    let full_replace_ms = replacing.elapsed().as_secs_f64() * 1000.0;
    let (p50, p99) = super::percentiles(latencies);
    let (reported_p50, reported_p99) = super::percentiles(reported);
    let (nft_p50, nft_p99) = super::percentiles(nft_ms);
    let (render_p50, render_p99) = super::percentiles(change_render_ms);

    // Churn: 100 changes a second for 5 s without waiting; then the table must hold exactly
    // the same number of chains and elements (each change swaps one endpoint for another).
    let churn_start = Instant::now();
    let mut ticker = tokio::time::interval(Duration::from_millis(10));
    let mut newest = 0;
    let mut last = (0, Vec::new());
    let applies_before = status.borrow().applies;
    for k in 0..500 {
        ticker.tick().await;
        let i = (k * 104_729 + 13) % n;
        let (rv, ips) = change(&slices, i, fresh).await?;
        fresh += ENDPOINTS_PER_SERVICE;
        newest = newest.max(rv);
        last = (i, ips);
    }
    let churn_rate = 500.0 / churn_start.elapsed().as_secs_f64();
    let settled = Instant::now();
    live(&mut status, newest).await?;
    let churn_settle_ms = settled.elapsed().as_secs_f64() * 1000.0;
    let churn_applies = status.borrow().applies - applies_before;
    // The last write of the burst is in force.
    prober
        .until(front(last.0)?, last.1, Duration::from_secs(10))
        .await
        .context("the prober stopped")?
        .context("after the churn")?;
    let (chains_after, elements_after, pairs_after) = table_size(&ns)?;
    if (chains_after, elements_after, pairs_after) != (chains, elements, pairs) {
        bail!(
            "after churn the table holds {chains_after} chains, {elements_after} map elements \
             and {pairs_after} hairpin pairs, before it {chains}, {elements} and {pairs}"
        );
    }

    stop.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(30), proxy).await;
    server.stop();
    Ok(json!({
        "services": n,
        "endpoints": n * ENDPOINTS_PER_SERVICE,
        "populate_s": populate_s,
        "first_apply_live_s": first_live_s,
        "first_apply_nft_ms": first.nft_time.as_secs_f64() * 1000.0,
        "first_apply_bytes": first.bytes,
        "table_chains": chains,
        "table_map_elements": elements,
        "table_hairpin_pairs": pairs,
        "changes": changes,
        "change_to_live_p50_ms": p50,
        "change_to_live_p99_ms": p99,
        "change_to_proxy_report_p50_ms": reported_p50,
        "change_to_proxy_report_p99_ms": reported_p99,
        "changes_via_netlink": via_netlink,
        "change_apply_p50_ms": nft_p50,
        "change_apply_p99_ms": nft_p99,
        "change_render_p50_ms": render_p50,
        "change_render_p99_ms": render_p99,
        "full_render_ms": render_ms,
        "full_replace_nft_ms": full_replace_ms,
        "churn_changes_per_s": churn_rate,
        "churn_applies": churn_applies,
        "churn_settle_ms": churn_settle_ms,
        "churn_table_unchanged": true,
    }))
}

pub async fn run(args: &super::BenchArgs) -> anyhow::Result<Value> {
    if !is_root() {
        bail!(
            "rkube bench proxy needs root: it creates a network namespace and runs nft inside it"
        );
    }
    let (sizes, changes): (&[usize], usize) =
        if args.quick { (&[100, 1000], 50) } else { (&[1000, 10_000], 100) };
    let mut runs = Vec::new();
    for &n in sizes {
        // On Ctrl-C the run is dropped, so its namespace guard still deletes the namespace.
        let run = tokio::select! {
            r = one_size(n, changes) => r.with_context(|| format!("{n} Services"))?,
            _ = tokio::signal::ctrl_c() => bail!("interrupted"),
        };
        runs.push(run);
    }
    Ok(json!({
        "measured": "EndpointSlice write (all 5 endpoints of a Service replaced) acknowledged by \
                     the API server -> a new connection to the ClusterIP, made inside the namespace, \
                     lands on a new endpoint (probed every ~0.5 ms; proxy coalesce 1 ms, no min \
                     sync period). change_to_proxy_report: -> the proxy reports the apply done",
        "runs": runs,
    }))
}

pub fn table(figures: &Value) -> String {
    let mut out = String::from(
        "rkube bench proxy (in-process API server, proxy with nft in a private network namespace)\n",
    );
    if let Some(m) = figures["measured"].as_str() {
        out.push_str(&format!("change to live: {m}\n"));
    }
    let runs: Vec<&Value> = figures["runs"].as_array().into_iter().flatten().collect();
    let Some(first) = runs.first().and_then(|r| r.as_object()) else { return out };
    let width = first.keys().map(String::len).max().unwrap_or(0);
    for key in first.keys() {
        out.push_str(&format!("  {key:<width$}"));
        for r in &runs {
            let v = match &r[key] {
                Value::Number(x) if x.is_f64() => format!("{:.2}", x.as_f64().unwrap_or(0.0)),
                other => other.to_string(),
            };
            out.push_str(&format!("  {v:>12}"));
        }
        out.push('\n');
    }
    out
}
