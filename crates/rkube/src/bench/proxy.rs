//! `rkube bench proxy`: the Service proxy against an in-process API server, with nft acting
//! inside a network namespace this bench creates (the host's ruleset is never touched).
//!
//! For N Services (each one port, one EndpointSlice of 5 endpoints): the time from starting the
//! proxy to the first full table being in the kernel, then EndpointSlice changes made one at a
//! time, each timed from the API server's acknowledgement of the write to the proxy reporting an
//! apply that includes it (`rkube_proxy::Applied::resource_version` reaching the version the
//! write returned: the proxy publishes it only after `nft` exited successfully). The last change
//! is then checked in the kernel itself (`nft list chain`), and a burst of changes at 100/s must
//! leave the table with exactly as many chains and map elements as before.
//!
//! Where the time goes (nft 1.0.6, kernel 6.18, 10,000 Services): an `nft` run lists every
//! chain of the table into its cache before applying even a one-element change (~0.5 s with
//! 60,000 chains), so changes go over netlink instead (`rkube_proxy::nl`); what is left is the
//! kernel checking the whole table for loops on every change that adds a jump, a goto or a
//! DNAT (~60 ms with a chain per endpoint, ~15 ms with endpoints DNATed from a map in the
//! Service's chain, as now), and rendering only the changed Service. Loading the table whole
//! (start, hourly) still goes through nft and takes the kernel tens of seconds.

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

/// Replaces the first endpoint of service `i`'s slice with address number `fresh`; returns the
/// version the API server acknowledged and the new address.
async fn change(
    slices: &Api<EndpointSlice>,
    i: usize,
    fresh: usize,
) -> anyhow::Result<(u64, String)> {
    let mut ips: Vec<String> =
        (1..ENDPOINTS_PER_SERVICE).map(|j| endpoint_ip(i * ENDPOINTS_PER_SERVICE + j)).collect();
    let new_ip = endpoint_ip(fresh);
    ips.insert(0, new_ip.clone());
    let patch = json!({"endpoints": slice_endpoints(&ips)});
    let done =
        slices.patch(&format!("svc-{i}-1"), &PatchParams::default(), &Patch::Merge(&patch)).await?;
    Ok((resource_version(&done.metadata)?, new_ip))
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

    // One change at a time, each waited for.
    let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), NAMESPACE);
    let mut latencies = Vec::with_capacity(changes);
    let mut nft_ms = Vec::with_capacity(changes);
    let mut via_netlink = 0;
    let mut change_render_ms = Vec::with_capacity(changes);
    let mut fresh = n * ENDPOINTS_PER_SERVICE;
    let mut last = (0, String::new());
    for k in 0..changes {
        let i = (k * 7919) % n;
        let (rv, ip) = change(&slices, i, fresh).await?;
        let acked = Instant::now();
        live(&mut status, rv).await?;
        latencies.push(acked.elapsed().as_secs_f64() * 1000.0);
        nft_ms.push(status.borrow().nft_time.as_secs_f64() * 1000.0);
        via_netlink += usize::from(status.borrow().netlink);
        change_render_ms.push(status.borrow().render_time.as_secs_f64() * 1000.0);
        fresh += 1;
        last = (i, ip);
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
    if !listed.contains(&format!("{ip} . 8080")) {
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
    let (nft_p50, nft_p99) = super::percentiles(nft_ms);
    let (render_p50, render_p99) = super::percentiles(change_render_ms);

    // Churn: 100 changes a second for 5 s without waiting; then the table must hold exactly
    // the same number of chains and elements (each change swaps one endpoint for another).
    let churn_start = Instant::now();
    let mut ticker = tokio::time::interval(Duration::from_millis(10));
    let mut newest = 0;
    let applies_before = status.borrow().applies;
    for k in 0..500 {
        ticker.tick().await;
        let (rv, _) = change(&slices, (k * 104_729 + 13) % n, fresh).await?;
        fresh += 1;
        newest = newest.max(rv);
    }
    let churn_rate = 500.0 / churn_start.elapsed().as_secs_f64();
    let settled = Instant::now();
    live(&mut status, newest).await?;
    let churn_settle_ms = settled.elapsed().as_secs_f64() * 1000.0;
    let churn_applies = status.borrow().applies - applies_before;
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
        "measured": "EndpointSlice write acknowledged by the API server -> the proxy's apply \
                     including it has succeeded (netlink transaction acknowledged, or nft exited; \
                     proxy coalesce 1 ms, no min sync period)",
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
