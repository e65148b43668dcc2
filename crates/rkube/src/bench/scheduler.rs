//! `rkube bench scheduler`: the scheduler_perf "SchedulingBasic" shape against an in-process API
//! server. 5,000 Ready nodes (4 CPU, 32Gi, 110 pods, as upstream's node template) and 5,000
//! existing pods, all bound before anything is measured; then a phase of 10,000 new pods and a
//! second phase of 50,000 more (the second runs on top of the first, so it starts from 15,000
//! bound pods), each pod asking for 100m CPU and 500Mi as upstream's pod template.
//!
//! Per pod, latency runs from the client-side instant just before its create call to the instant
//! a watch on pods first shows it with `spec.nodeName` (creationTimestamp has 1 s resolution).
//! Throughput is measured pods divided by the time from the first create to the last binding
//! seen. RSS is the whole bench process: API server, in-memory store and scheduler together.
//! `--quick`: 100 nodes, 100 existing pods, phases of 1,000 and 2,000.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::Api;
use kube::api::{ListParams, PatchParams, PostParams};
use kube::runtime::watcher;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

/// Creates in flight at once (upstream's scheduler_perf client is QPS-limited, not serial).
const CREATORS: usize = 32;

#[derive(Default)]
struct Seen {
    created: HashMap<String, Instant>,
    bound: HashMap<String, Instant>,
    /// Bound pods per name prefix (`init`, `m0`, …), so waiting costs nothing per stored pod.
    bound_per_prefix: HashMap<String, usize>,
}

impl Seen {
    fn saw_bound(&mut self, name: String, at: Instant) {
        if let std::collections::hash_map::Entry::Vacant(e) = self.bound.entry(name) {
            let prefix = e.key().rsplit_once('-').map_or("", |(p, _)| p).to_string();
            e.insert(at);
            *self.bound_per_prefix.entry(prefix).or_default() += 1;
        }
    }
}

pub async fn run(args: &super::BenchArgs) -> anyhow::Result<Value> {
    let (nodes_n, init_n, phases) =
        if args.quick { (100, 100, [1_000, 2_000]) } else { (5_000, 5_000, [10_000, 50_000]) };
    let server = rkube_apiserver::testing::TestServer::start().await;
    let client = server.client().await;
    let setup = Instant::now();
    let nodes: Api<Node> = Api::all(client.clone());
    run_parallel(nodes_n, |i| {
        let nodes = nodes.clone();
        async move {
            let name = format!("node-{i}");
            let n: Node = serde_json::from_value(json!({"metadata": {"name": name,
                "labels": {"kubernetes.io/hostname": name}}}))?;
            nodes.create(&PostParams::default(), &n).await?;
            let cap = json!({"cpu": "4", "memory": "32Gi", "pods": "110"});
            let status = json!({"status": {"allocatable": cap, "capacity": cap,
                "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady", "message": "bench"}]}});
            nodes
                .patch_status(&name, &PatchParams::default(), &kube::api::Patch::Merge(&status))
                .await?;
            Ok(())
        }
    })
    .await?;

    let seen = Arc::new(Mutex::new(Seen::default()));
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let stop = CancellationToken::new();
    let watch = {
        let (seen, pods, stop) = (seen.clone(), pods.clone(), stop.clone());
        tokio::spawn(async move {
            let mut s = watcher(pods, watcher::Config::default()).boxed();
            loop {
                let ev = tokio::select! { _ = stop.cancelled() => return, e = s.next() => e };
                match ev {
                    Some(Ok(watcher::Event::Apply(p) | watcher::Event::InitApply(p))) => {
                        if p.spec.as_ref().and_then(|s| s.node_name.as_ref()).is_some() {
                            let now = Instant::now();
                            let name = p.metadata.name.unwrap_or_default();
                            seen.lock().expect("seen").saw_bound(name, now);
                        }
                    }
                    Some(_) => {}
                    None => return,
                }
            }
        })
    };
    let sched = tokio::spawn(rkube_scheduler::run_with_client(
        client.clone(),
        Default::default(),
        stop.clone(),
    ));
    let mut out = serde_json::Map::new();
    out.insert("nodes".into(), json!(nodes_n));
    out.insert("existing_pods".into(), json!(init_n));
    // Existing pods: created and bound before anything is measured.
    create_pods(&pods, &seen, "init", init_n).await?;
    wait_bound(&seen, "init", init_n).await?;
    out.insert("setup_s".into(), json!(setup.elapsed().as_secs_f64()));
    eprintln!("setup done in {:.1} s", setup.elapsed().as_secs_f64());
    for (phase, n) in phases.iter().enumerate() {
        let prefix = format!("m{phase}");
        let cpu = super::cpu_seconds(std::process::id());
        let t0 = Instant::now();
        create_pods(&pods, &seen, &prefix, *n).await?;
        let created_s = t0.elapsed().as_secs_f64();
        wait_bound(&seen, &prefix, *n).await?;
        let s = seen.lock().expect("seen");
        let mut lat = Vec::with_capacity(*n);
        let (mut first, mut last) = (None::<Instant>, None::<Instant>);
        for (name, c) in s.created.iter().filter(|(k, _)| k.starts_with(&format!("{prefix}-"))) {
            if let Some(b) = s.bound.get(name) {
                lat.push(b.saturating_duration_since(*c).as_secs_f64() * 1000.0);
                last = Some(last.map_or(*b, |l: Instant| l.max(*b)));
            }
            first = Some(first.map_or(*c, |f: Instant| f.min(*c)));
        }
        drop(s);
        let span = match (first, last) {
            (Some(f), Some(l)) => l.saturating_duration_since(f).as_secs_f64(),
            _ => 0.0,
        };
        let (p50, p99) = super::percentiles(lat);
        let tag = format!("{n}_pods");
        out.insert(format!("{tag}_created_in_s"), json!(created_s));
        out.insert(format!("{tag}_all_bound_in_s"), json!(span));
        out.insert(format!("{tag}_pods_per_s"), json!(*n as f64 / span.max(1e-9)));
        out.insert(format!("{tag}_p50_ms"), json!(p50));
        out.insert(format!("{tag}_p99_ms"), json!(p99));
        out.insert(format!("{tag}_cpu_s"), json!(super::cpu_seconds(std::process::id()) - cpu));
        out.insert(format!("{tag}_rss_mib"), json!(super::rss_mib(std::process::id())));
        eprintln!(
            "phase {n} pods: {:.0} pods/s, p50 {p50:.0} ms, p99 {p99:.0} ms",
            *n as f64 / span.max(1e-9)
        );
    }
    // Spread: with every node alike, LeastAllocated keeps the pods even across nodes.
    let list = pods.list(&ListParams::default()).await?;
    let mut per_node = HashMap::<String, usize>::new();
    for p in &list.items {
        if let Some(n) = p.spec.as_ref().and_then(|s| s.node_name.clone()) {
            *per_node.entry(n).or_default() += 1;
        }
    }
    out.insert("bound_total".into(), json!(per_node.values().sum::<usize>()));
    out.insert("max_pods_on_one_node".into(), json!(per_node.values().max().copied()));
    out.insert("min_pods_on_one_node".into(), json!(per_node.values().min().copied()));
    stop.cancel();
    let _ = sched.await;
    let _ = watch.await;
    Ok(Value::Object(out))
}

/// Runs `f(0..n)` with `CREATORS` calls in flight.
async fn run_parallel<F, Fut>(n: usize, f: F) -> anyhow::Result<()>
where
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    let mut s = futures::stream::iter(0..n).map(f).buffer_unordered(CREATORS);
    while let Some(r) = s.next().await {
        r?;
    }
    Ok(())
}

async fn create_pods(
    pods: &Api<Pod>,
    seen: &Arc<Mutex<Seen>>,
    prefix: &str,
    n: usize,
) -> anyhow::Result<()> {
    run_parallel(n, |i| {
        let (pods, seen) = (pods.clone(), seen.clone());
        let name = format!("{prefix}-{i}");
        async move {
            let res = json!({"cpu": "100m", "memory": "500Mi"});
            let p: Pod = serde_json::from_value(json!({"metadata": {"name": name},
                "spec": {"containers": [{"name": "pause", "image": "registry.k8s.io/pause:3.10",
                    "ports": [{"containerPort": 80}],
                    "resources": {"requests": res, "limits": res}}]}}))?;
            seen.lock().expect("seen").created.insert(name, Instant::now());
            pods.create(&PostParams::default(), &p).await?;
            Ok(())
        }
    })
    .await
}

async fn wait_bound(seen: &Arc<Mutex<Seen>>, prefix: &str, n: usize) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(900);
    loop {
        let bound =
            seen.lock().expect("seen").bound_per_prefix.get(prefix).copied().unwrap_or_default();
        if bound >= n {
            return Ok(());
        }
        if Instant::now() > deadline {
            anyhow::bail!("only {bound} of {n} {prefix} pods bound after 900 s");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub fn table(figures: &Value) -> String {
    super::render(
        "rkube bench scheduler (scheduler_perf SchedulingBasic shape; in-process API server, no kubelets)",
        figures,
    )
}
