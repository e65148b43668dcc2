//! `rkube bench scheduler`: N Ready nodes and M pending pods in a real API server; the time the
//! scheduler needs to bind them all (filters, scores and the binding call for every pod).

use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Node, Pod};
use kube::Api;
use kube::api::{ListParams, PatchParams, PostParams};
use serde_json::json;
use tokio_util::sync::CancellationToken;

pub async fn run(args: &super::BenchArgs) -> anyhow::Result<serde_json::Value> {
    let (nodes_n, pods_n) = if args.quick { (100, 1000) } else { (1000, 5000) };
    let server = rkube_apiserver::testing::TestServer::start().await;
    let client = server.client().await;
    let nodes: Api<Node> = Api::all(client.clone());
    for i in 0..nodes_n {
        let n: Node = serde_json::from_value(
            json!({"metadata": {"name": format!("node-{i}"), "labels": {"kubernetes.io/hostname": format!("node-{i}")}}}),
        )?;
        nodes.create(&PostParams::default(), &n).await?;
        let status = json!({"status": {"allocatable": {"cpu": "8", "memory": "32Gi", "pods": "110"}, "capacity": {"cpu": "8", "memory": "32Gi", "pods": "110"},
            "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady", "message": "bench"}]}});
        nodes
            .patch_status(
                &format!("node-{i}"),
                &PatchParams::default(),
                &kube::api::Patch::Merge(&status),
            )
            .await?;
    }
    let stop = CancellationToken::new();
    let sched = tokio::spawn(rkube_scheduler::run_with_client(
        client.clone(),
        Default::default(),
        stop.clone(),
    ));
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let start = Instant::now();
    let mut tasks = Vec::new();
    for t in 0..16 {
        let pods = pods.clone();
        tasks.push(tokio::spawn(async move {
            for i in (t..pods_n).step_by(16) {
                let p: Pod = serde_json::from_value(json!({"metadata": {"name": format!("p-{i}")},
                    "spec": {"containers": [{"name": "c", "image": "busybox", "resources": {"requests": {"cpu": "10m", "memory": "16Mi"}}}]}}))
                    .unwrap_or_default();
                let _ = pods.create(&PostParams::default(), &p).await;
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    let created_s = start.elapsed().as_secs_f64();
    let mut bound = 0;
    while start.elapsed() < Duration::from_secs(600) {
        let list = pods.list(&ListParams::default()).await?;
        bound = list
            .items
            .iter()
            .filter(|p| p.spec.as_ref().and_then(|s| s.node_name.as_ref()).is_some())
            .count();
        if bound >= pods_n {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let all_s = start.elapsed().as_secs_f64();
    let list = pods.list(&ListParams::default()).await?;
    let mut per_node = std::collections::HashMap::<String, usize>::new();
    for p in &list.items {
        if let Some(n) = p.spec.as_ref().and_then(|s| s.node_name.clone()) {
            *per_node.entry(n).or_default() += 1;
        }
    }
    stop.cancel();
    let _ = sched.await;
    Ok(json!({
        "nodes": nodes_n, "pods": pods_n, "bound": bound,
        "pods_created_in_s": created_s,
        "all_bound_after_s": all_s,
        "pods_per_s": bound as f64 / all_s,
        "max_pods_on_one_node": per_node.values().max().copied().unwrap_or(0),
        "min_pods_on_one_node": per_node.values().min().copied().unwrap_or(0),
    }))
}

pub fn table(figures: &serde_json::Value) -> String {
    super::render(
        "rkube bench scheduler (in-process API server and scheduler, no kubelets)",
        figures,
    )
}
