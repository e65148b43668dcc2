//! `rkube bench pods`: pod startup latency on the `oci` runtime — 100 pods of a pre-pulled image
//! on one node, each timed from its creation until a watch sees it Running, split into the
//! control plane's part (created → bound → delivered to a watch filtered on the node, as the
//! kubelet's is) and the node's part (delivered → Running: sandbox, network, runc, the status
//! write and its watch delivery).
//!
//! Needs root, runc and a static busybox (the image is built from /bin/busybox and imported, so
//! nothing is pulled). Everything runs in a network namespace of its own: `rkube bench pods`
//! creates it and runs itself again inside it (`nsenter --net`, keeping the host's mounts and
//! cgroups), with a `rkube server` and a `rkube agent --runtime oci` as child processes.

use std::collections::HashMap;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures::StreamExt;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::Api;
use kube::api::{DeleteParams, ListParams, PostParams, WatchEvent, WatchParams};
use serde_json::json;

/// Set in the re-executed bench: the work directory the outer one prepared.
const INNER: &str = "RKUBE_BENCH_PODS_DIR";
const NODE: &str = "bench-node";
const IMAGE: &str = "localhost/busybox:1";

pub async fn run(args: &super::BenchArgs) -> anyhow::Result<serde_json::Value> {
    match std::env::var_os(INNER) {
        Some(dir) => measure(Path::new(&dir), args.quick).await,
        None => outer(args),
    }
}

/// Prepares the image and the network namespace, runs the measurement inside, cleans up.
fn outer(args: &super::BenchArgs) -> anyhow::Result<serde_json::Value> {
    if !nix::unistd::Uid::effective().is_root() {
        bail!("`rkube bench pods` runs real containers: it needs root");
    }
    for program in ["runc", "nsenter", "ip"] {
        if Command::new(program).arg("--version").output().is_err() {
            bail!("`rkube bench pods` needs {program} on PATH");
        }
    }
    let busybox = std::fs::read("/bin/busybox")
        .context("`rkube bench pods` builds its image from /bin/busybox (Debian busybox-static)")?;
    let id = format!("{:x}", std::process::id());
    let dir = std::env::temp_dir().join(format!("rkube-bench-pods-{id}"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let netns = format!("rkube-bp-{id}");
    let result = (|| {
        let layout = dir.join("layout");
        rkube_oci::image::layout::write_busybox_layout(&layout, &busybox, "1")?;
        rkube_oci::image::layout::archive_layout(&layout, &dir.join("busybox.tar"))?;
        let ok = Command::new("ip").args(["netns", "add", &netns]).status()?.success();
        if !ok {
            bail!("`ip netns add {netns}` failed");
        }
        Command::new("ip")
            .args(["netns", "exec", &netns, "ip", "link", "set", "lo", "up"])
            .status()?;
        let mut inner = Command::new("nsenter");
        inner
            .arg(format!("--net=/run/netns/{netns}"))
            .arg(std::env::current_exe()?)
            .args(["bench", "pods", "--json"])
            .env(INNER, &dir)
            .stderr(Stdio::inherit());
        if args.quick {
            inner.arg("--quick");
        }
        let out = inner.output().context("running the measurement in its network namespace")?;
        if !out.status.success() {
            bail!("the measurement failed (its work directory: {})", dir.display());
        }
        Ok(serde_json::from_slice(&out.stdout)?)
    })();
    let _ = Command::new("ip").args(["netns", "del", &netns]).status();
    if result.is_ok() {
        let _ = std::fs::remove_dir_all(&dir);
    }
    result
}

/// A child process killed (and reaped) when dropped.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.0.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn(dir: &Path, name: &str, args: &[&str]) -> anyhow::Result<Proc> {
    let log = std::fs::File::create(dir.join(format!("{name}.log")))?;
    let child = Command::new(std::env::current_exe()?)
        .args(args)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .env("RUST_LOG", "warn")
        .spawn()?;
    Ok(Proc(child))
}

/// Milliseconds since `t0`.
fn ms(t0: Instant) -> f64 {
    t0.elapsed().as_secs_f64() * 1000.0
}

#[derive(Default, Clone, Copy)]
struct Times {
    created: Option<f64>,
    bound: Option<f64>,
    at_node: Option<f64>,
    running: Option<f64>,
}

async fn measure(dir: &Path, quick: bool) -> anyhow::Result<serde_json::Value> {
    let pods_n: usize = if quick { 20 } else { 100 };
    // Pods are created one after another at this rate (a steady arrival, not a burst).
    let interval = Duration::from_millis(100);
    let images = dir.join("images");
    let store = rkube_oci::image::ImageStore::open(&images)?;
    let imported = store.import(dir.join("busybox.tar")).await?;
    if !imported.iter().any(|i| i.reference == IMAGE) {
        bail!("the imported image is not named {IMAGE}");
    }
    let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let dns_port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let server_dir = dir.join("server");
    let server = spawn(
        dir,
        "server",
        &[
            "server",
            "--secure-port",
            &port.to_string(),
            "--data-dir",
            path(&server_dir)?,
            "--cluster-dns-address",
            "127.0.0.1",
            "--cluster-dns-port",
            &dns_port.to_string(),
        ],
    )?;
    let kubeconfig = server_dir.join("admin.kubeconfig");
    let started = Instant::now();
    let client = loop {
        if kubeconfig.exists()
            && let Ok(c) = crate::up::cluster::client_from(&kubeconfig, None).await
            && c.apiserver_version().await.is_ok()
        {
            break c;
        }
        if started.elapsed() > Duration::from_secs(30) {
            bail!("the server did not start (see {})", dir.join("server.log").display());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let agent = spawn(
        dir,
        "agent",
        &[
            "agent",
            "--kubeconfig",
            path(&kubeconfig)?,
            "--node-name",
            NODE,
            "--data-dir",
            path(&dir.join("node"))?,
            "--runtime",
            "oci",
            "--image-dir",
            path(&images)?,
        ],
    )?;
    let nodes: Api<Node> = Api::all(client.clone());
    let ready = || async {
        let n = nodes.get_opt(NODE).await.ok().flatten()?;
        let cidr = n.spec.as_ref()?.pod_cidr.clone()?;
        let ready = n.status?.conditions?.iter().any(|c| c.type_ == "Ready" && c.status == "True");
        ready.then_some(cidr)
    };
    while ready().await.is_none() {
        if started.elapsed() > Duration::from_secs(60) {
            bail!("the node did not become Ready (see {})", dir.join("agent.log").display());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let pod = |name: &str| -> anyhow::Result<Pod> {
        Ok(serde_json::from_value(json!({
            "metadata": {"name": name, "labels": {"bench": "pods"}},
            "spec": {
                "containers": [{"name": "c", "image": IMAGE, "imagePullPolicy": "Never",
                    "command": ["sleep", "3600"]}],
                "terminationGracePeriodSeconds": 0,
            },
        }))?)
    };
    // One pod first: the node's first sandbox also creates its bridge.
    pods.create(&PostParams::default(), &pod("warmup")?).await?;
    wait_running(&pods, "warmup", Duration::from_secs(60)).await?;

    let t0 = Instant::now();
    let times: std::sync::Arc<std::sync::Mutex<HashMap<String, Times>>> = Default::default();
    // Every change as any client sees it, and as the node's kubelet sees it (its field selector).
    let all = watch_into(
        pods.clone(),
        WatchParams::default().labels("bench=pods"),
        t0,
        times.clone(),
        false,
    )
    .await?;
    let at_node = watch_into(
        Api::all(client.clone()),
        WatchParams::default().fields(&format!("spec.nodeName={NODE}")).labels("bench=pods"),
        t0,
        times.clone(),
        true,
    )
    .await?;
    for i in 0..pods_n {
        let name = format!("p-{i:03}");
        let created = ms(t0);
        pods.create(&PostParams::default(), &pod(&name)?).await?;
        times.lock().unwrap_or_else(|p| p.into_inner()).entry(name).or_default().created =
            Some(created);
        tokio::time::sleep(interval).await;
    }
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let done = {
            let t = times.lock().unwrap_or_else(|p| p.into_inner());
            t.values().filter(|x| x.created.is_some() && x.running.is_some()).count()
        };
        if done >= pods_n {
            break;
        }
        if Instant::now() > deadline {
            bail!("only {done} of {pods_n} pods Running after 180 s (see {})", dir.display());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    all.abort();
    at_node.abort();
    let t: Vec<Times> = times.lock().unwrap_or_else(|p| p.into_inner()).values().copied().collect();
    let span = |f: fn(&Times) -> Option<(f64, f64)>| -> Vec<f64> {
        t.iter().filter_map(f).map(|(a, b)| (b - a).max(0.0)).collect()
    };
    let total = span(|x| Some((x.created?, x.running?)));
    let to_bound = span(|x| Some((x.created?, x.bound?)));
    let control = span(|x| Some((x.created?, x.at_node?)));
    let node_part = span(|x| Some((x.at_node?, x.running?)));
    let (t50, t99) = super::percentiles(total);
    let (b50, b99) = super::percentiles(to_bound);
    let (c50, c99) = super::percentiles(control);
    let (n50, n99) = super::percentiles(node_part);
    let agent_rss = super::rss_mib(agent.0.id());
    let server_rss = super::rss_mib(server.0.id());

    // Leave nothing running: delete the pods through the API and wait until the kubelet
    // has confirmed every deletion (it releases sandboxes, mounts, cgroups and addresses).
    let dp = DeleteParams { grace_period_seconds: Some(0), ..Default::default() };
    let _ = pods.delete_collection(&dp, &ListParams::default()).await;
    let gone_by = Instant::now() + Duration::from_secs(120);
    while Instant::now() < gone_by {
        if pods.list(&ListParams::default()).await.is_ok_and(|l| l.items.is_empty()) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    drop(agent);
    drop(server);
    Ok(json!({
        "pods": pods_n,
        "created_per_s": 1.0 / interval.as_secs_f64(),
        "image": "pre-pulled (imported), imagePullPolicy Never",
        "startup_p50_ms": t50,
        "startup_p99_ms": t99,
        "scheduled_p50_ms": b50,
        "scheduled_p99_ms": b99,
        "control_plane_p50_ms": c50,
        "control_plane_p99_ms": c99,
        "node_p50_ms": n50,
        "node_p99_ms": n99,
        "agent_rss_mib": agent_rss,
        "server_rss_mib": server_rss,
    }))
}

fn path(p: &Path) -> anyhow::Result<&str> {
    p.to_str().context("a non-UTF-8 path")
}

async fn wait_running(pods: &Api<Pod>, name: &str, limit: Duration) -> anyhow::Result<()> {
    let start = Instant::now();
    loop {
        let phase = pods.get(name).await.ok().and_then(|p| p.status?.phase);
        if phase.as_deref() == Some("Running") {
            return Ok(());
        }
        if start.elapsed() > limit {
            bail!("pod {name} not Running after {limit:?} (phase {phase:?})");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Records, per pod, when a watch first saw it bound and Running — or, with `node`, when
/// it first reached this node's filtered watch.
async fn watch_into(
    api: Api<Pod>,
    wp: WatchParams,
    t0: Instant,
    times: std::sync::Arc<std::sync::Mutex<HashMap<String, Times>>>,
    node: bool,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let mut stream = api.watch(&wp, "0").await?.boxed();
    Ok(tokio::spawn(async move {
        while let Some(Ok(ev)) = stream.next().await {
            let (WatchEvent::Added(p) | WatchEvent::Modified(p)) = ev else { continue };
            let now = ms(t0);
            let name = p.metadata.name.clone().unwrap_or_default();
            let mut t = times.lock().unwrap_or_else(|p| p.into_inner());
            let x = t.entry(name).or_default();
            if node {
                x.at_node.get_or_insert(now);
                continue;
            }
            if p.spec.as_ref().and_then(|s| s.node_name.as_ref()).is_some() {
                x.bound.get_or_insert(now);
            }
            if p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running") {
                x.running.get_or_insert(now);
            }
        }
    }))
}

pub fn table(figures: &serde_json::Value) -> String {
    super::render(
        "rkube bench pods (oci runtime, one node, pre-pulled image; goals: p99 startup ≤ 1,500 ms, control plane ≤ 100 ms)",
        figures,
    )
}
