//! The scale scenario of `rkube bench heal`: a control plane (API server on the embedded store,
//! scheduler, controller manager) and 100 simulated kubelets in this process, a 300-replica
//! Deployment, then the node holding the most pods loses power — its link to the API server is
//! cut before its kubelet stops, so it makes no further write, exactly like a crash — and the
//! clock runs until every lost pod is Running on another node.

use std::collections::{BTreeMap, HashSet};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{ListParams, PostParams};
use kube::{Api, ResourceExt};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::up::cluster::{Timings, client_from, server_args, spawn_kubelet};
use crate::up::switch::Cable;

pub const NODES: usize = 100;
pub const REPLICAS: usize = 300;

struct Kubelet {
    cable: Cable,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

fn node_of(p: &Pod) -> String {
    p.spec.as_ref().and_then(|s| s.node_name.clone()).unwrap_or_default()
}

fn running(p: &Pod) -> bool {
    p.metadata.deletion_timestamp.is_none()
        && p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running")
}

/// Watches the nodes and records when each first carried a lifecycle taint.
fn watch_lifecycle_taints(
    client: kube::Client,
    stop: CancellationToken,
) -> std::sync::Arc<std::sync::Mutex<BTreeMap<String, Instant>>> {
    use futures::StreamExt;
    use kube::runtime::{WatchStreamExt, watcher};
    let seen = std::sync::Arc::new(std::sync::Mutex::new(BTreeMap::new()));
    let out = seen.clone();
    tokio::spawn(async move {
        let nodes: Api<Node> = Api::all(client);
        let mut s =
            watcher(nodes, watcher::Config::default()).default_backoff().applied_objects().boxed();
        loop {
            let n = tokio::select! { _ = stop.cancelled() => return, n = s.next() => n };
            let n = match n {
                Some(Ok(n)) => n,
                Some(Err(_)) => continue,
                None => return,
            };
            let taints = n.spec.as_ref().and_then(|s| s.taints.clone()).unwrap_or_default();
            if taints.iter().any(|t| {
                t.key == "node.kubernetes.io/unreachable" || t.key == "node.kubernetes.io/not-ready"
            }) {
                seen.lock().unwrap().entry(n.name_any()).or_insert_with(Instant::now);
            }
        }
    });
    out
}

/// Runs the scenario with `timings` in a fresh directory under `dir`.
pub async fn run(dir: &Path, profile: &str, timings: Timings) -> anyhow::Result<serde_json::Value> {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir)?;
    let stop = CancellationToken::new();
    let mut kubelets = BTreeMap::new();
    let result = scenario(dir, profile, timings, &stop, &mut kubelets).await;
    stop.cancel();
    for (_, k) in kubelets {
        let _ = tokio::time::timeout(Duration::from_secs(10), k.task).await;
    }
    // Let the control plane's tasks see the cancellation before the store's files go.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let _ = std::fs::remove_dir_all(dir);
    result
}

async fn scenario(
    dir: &Path,
    profile: &str,
    timings: Timings,
    stop: &CancellationToken,
    kubelets: &mut BTreeMap<String, Kubelet>,
) -> anyhow::Result<serde_json::Value> {
    let server_dir = dir.join("server");
    let args = server_args(server_dir.clone(), 0, timings.toleration_seconds);
    std::fs::create_dir_all(&server_dir)?;
    let store: std::sync::Arc<dyn rkube_store::Store> =
        std::sync::Arc::new(rkube_store::embedded::EmbeddedStore::open(
            rkube_store::embedded::Config::new(server_dir.join("store.redb")),
        )?);
    let (_server, kubeconfig, _task) = rkube_apiserver::cli::start(&args, store, stop.clone())
        .await
        .map_err(|e| anyhow::anyhow!(e))?;
    let client = client_from(&kubeconfig, None).await?;
    let identity = format!("bench-heal-{profile}-{}", std::process::id());
    tokio::spawn(rkube_scheduler::run_with_client(
        client.clone(),
        rkube_scheduler::Config { identity: identity.clone(), ..Default::default() },
        stop.clone(),
    ));
    tokio::spawn(rkube_controllers::run_with_client(
        client.clone(),
        rkube_controllers::Config {
            node_monitor_grace_period: timings.grace,
            identity,
            ..Default::default()
        },
        stop.clone(),
    ));

    // Every node that gets a lifecycle taint (unreachable / not-ready), and when: any but the
    // killed node after the kill is a false alarm (at registration or under load).
    let tainted = watch_lifecycle_taints(client.clone(), stop.clone());

    // 100 nodes, each a simulated kubelet behind its own cable.
    let t = Instant::now();
    for i in 1..=NODES {
        let name = format!("heal-node-{i:03}");
        let cable = Cable::plugged();
        let kc = client_from(&kubeconfig, Some(&cable)).await?;
        let mut labels = BTreeMap::new();
        labels.insert("node-role.kubernetes.io/worker".to_string(), String::new());
        let config = rkube_kubelet::Config {
            node_name: name.clone(),
            data_dir: dir.join("nodes").join(&name),
            runtime: rkube_kubelet::RuntimeKind::Simulated,
            labels,
            lease_duration: timings.lease,
            ..Default::default()
        };
        let node_stop = stop.child_token();
        let task = spawn_kubelet(kc, config, node_stop.clone());
        kubelets.insert(name, Kubelet { cable, stop: node_stop, task });
    }
    let nodes: Api<Node> = Api::all(client.clone());
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let ready = nodes
            .list(&ListParams::default())
            .await?
            .items
            .iter()
            .filter(|n| rkube_client::node_ready(n) == "True")
            .count();
        if ready == NODES {
            break;
        }
        if Instant::now() > deadline {
            bail!("only {ready} of {NODES} nodes became Ready within 120 s");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let nodes_ready_s = t.elapsed().as_secs_f64();

    let deploys: Api<Deployment> = Api::namespaced(client.clone(), "default");
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let d: Deployment = serde_json::from_value(json!({
        "metadata": {"name": "heal"},
        "spec": {"replicas": REPLICAS, "selector": {"matchLabels": {"app": "heal"}},
                 "template": {"metadata": {"labels": {"app": "heal"}},
                              "spec": {"containers": [{"name": "c", "image": "busybox", "command": ["sleep", "3600"]}]}}},
    }))?;
    let t = Instant::now();
    deploys.create(&PostParams::default(), &d).await?;
    let lp = ListParams::default().labels("app=heal");
    let deadline = Instant::now() + Duration::from_secs(300);
    let placed = loop {
        let list = pods.list(&lp).await?.items;
        let up: Vec<&Pod> = list.iter().filter(|p| running(p)).collect();
        if up.len() == REPLICAS {
            let mut per_node: BTreeMap<String, Vec<String>> = BTreeMap::new();
            for p in up {
                per_node.entry(node_of(p)).or_default().push(p.name_any());
            }
            break per_node;
        }
        if Instant::now() > deadline {
            bail!("only {} of {REPLICAS} pods were Running after 300 s", up.len());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let deployment_running_s = t.elapsed().as_secs_f64();
    let (victim, lost) = placed
        .iter()
        .max_by_key(|(_, p)| p.len())
        .map(|(n, p)| (n.clone(), p.iter().cloned().collect::<HashSet<String>>()))
        .context("no pods placed")?;

    // Power loss: the link goes first, so nothing more reaches the API server, then the kubelet.
    let leases: Api<Lease> = Api::namespaced(client.clone(), "kube-node-lease");
    let k = kubelets.get_mut(&victim).context("victim kubelet")?;
    let killed_wall = jiff::Timestamp::now();
    let t0 = Instant::now();
    k.cable.set(false);
    k.stop.cancel();
    let renewed = leases
        .get(&victim)
        .await?
        .spec
        .and_then(|s| s.renew_time)
        .map(|t| (killed_wall - t.0).total(jiff::Unit::Second).unwrap_or(0.0));

    let limit = timings.grace
        + Duration::from_secs(timings.toleration_seconds.max(0) as u64)
        + Duration::from_secs(120);
    let mut not_ready_s = None;
    let mut tainted_s = None;
    let mut first_eviction_s = None;
    let mut all_evicted_s = None;
    let mut all_bound_s = None;
    let mut healed_s = None;
    let mut max_on_dead_node_running = 0;
    while t0.elapsed() < limit {
        let now = t0.elapsed().as_secs_f64();
        if not_ready_s.is_none() || tainted_s.is_none() {
            let n = nodes.get(&victim).await?;
            if not_ready_s.is_none() && rkube_client::node_ready(&n) == "Unknown" {
                not_ready_s = Some(now);
            }
            let taints = n.spec.and_then(|s| s.taints).unwrap_or_default();
            if tainted_s.is_none()
                && taints
                    .iter()
                    .any(|t| t.effect == "NoExecute" && t.key == "node.kubernetes.io/unreachable")
            {
                tainted_s = Some(now);
            }
        }
        let list = pods.list(&lp).await?.items;
        let evicted = list
            .iter()
            .filter(|p| lost.contains(&p.name_any()) && p.metadata.deletion_timestamp.is_some())
            .count();
        let gone = lost.iter().filter(|name| !list.iter().any(|p| p.name_any() == **name)).count();
        if evicted + gone > 0 && first_eviction_s.is_none() {
            first_eviction_s = Some(now);
        }
        if evicted + gone == lost.len() && all_evicted_s.is_none() {
            all_evicted_s = Some(now);
        }
        let live: Vec<&Pod> =
            list.iter().filter(|p| p.metadata.deletion_timestamp.is_none()).collect();
        let on_dead = live.iter().filter(|p| node_of(p) == victim).count();
        max_on_dead_node_running = max_on_dead_node_running.max(on_dead);
        if all_bound_s.is_none()
            && on_dead == 0
            && live.len() == REPLICAS
            && live.iter().all(|p| !node_of(p).is_empty())
        {
            all_bound_s = Some(now);
        }
        let elsewhere = live.iter().filter(|p| running(p) && node_of(p) != victim).count();
        if on_dead == 0 && elsewhere == REPLICAS {
            healed_s = Some(now);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let false_alarms: BTreeMap<String, f64> = tainted
        .lock()
        .unwrap()
        .iter()
        .filter(|(name, at)| **name != victim || **at < t0)
        .map(|(name, at)| (name.clone(), at.saturating_duration_since(t0).as_secs_f64()))
        .collect();
    let goal_s = if profile == "fast" {
        20.0
    } else {
        timings.grace.as_secs_f64() + timings.toleration_seconds as f64 + 5.0
    };
    Ok(json!({
        "profile": profile,
        "node_monitor_grace_period_s": timings.grace.as_secs(),
        "toleration_s": timings.toleration_seconds,
        "lease_duration_s": timings.lease.as_secs(),
        "nodes": NODES,
        "replicas": REPLICAS,
        "nodes_ready_s": nodes_ready_s,
        "deployment_running_s": deployment_running_s,
        "killed_node": victim,
        "pods_on_killed_node": lost.len(),
        "last_lease_renewal_before_kill_s": renewed,
        "not_ready_s": not_ready_s,
        "no_execute_taint_s": tainted_s,
        "first_eviction_s": first_eviction_s,
        "all_lost_pods_evicted_s": all_evicted_s,
        "replacements_bound_s": all_bound_s,
        "healed_s": healed_s,
        "goal_healed_s": goal_s,
        "goal_met": healed_s.is_some_and(|h| h <= goal_s),
        "false_alarms": false_alarms.len(),
        "false_alarm_nodes": false_alarms,
        "bench_process_rss_mib": super::rss_mib(std::process::id()),
    }))
}
