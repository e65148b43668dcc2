//! `rkube bench heal`: first a whole `rkube up` cluster in the background — time to all nodes
//! Ready, idle memory and CPU of the cluster process, then a 3-replica Deployment, a crashed
//! worker, and the time until every replica runs again elsewhere. Then the scale scenario
//! (`heal_scale.rs`): 100 simulated nodes, a 300-replica Deployment and one node lost, with the
//! fast failure profile and (unless `--quick`) with upstream's defaults.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use kube::api::PostParams;
use serde_json::json;

use crate::up::cluster::Timings;
use crate::up::control::{self, Request};

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

async fn running(pods: &Api<Pod>) -> Vec<(String, String)> {
    let Ok(list) = pods.list(&kube::api::ListParams::default().labels("app=bench")).await else {
        return Vec::new();
    };
    list.items
        .into_iter()
        .filter(|p| {
            p.metadata.deletion_timestamp.is_none()
                && p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running")
        })
        .map(|p| {
            (
                p.metadata.name.unwrap_or_default(),
                p.spec.and_then(|s| s.node_name).unwrap_or_default(),
            )
        })
        .collect()
}

pub async fn run(args: &super::BenchArgs) -> anyhow::Result<serde_json::Value> {
    let up = whole_cluster(args.quick).await?;
    let root = std::env::temp_dir().join(format!("rkube-bench-heal-scale-{}", std::process::id()));
    let scale = async |profile: &str, timings: Timings| {
        super::heal_scale::run(&root.join(profile), profile, timings)
            .await
            .unwrap_or_else(|e| json!({"profile": profile, "error": format!("{e:#}")}))
    };
    let fast = scale("fast", Timings::fast()).await;
    let upstream = if args.quick {
        json!({"profile": "upstream", "skipped": "--quick (the upstream profile takes over 355 s)"})
    } else {
        scale("upstream", Timings::upstream()).await
    };
    let _ = std::fs::remove_dir_all(&root);
    Ok(json!({"rkube_up": up, "scale_fast": fast, "scale_upstream": upstream}))
}

async fn whole_cluster(quick: bool) -> anyhow::Result<serde_json::Value> {
    let dir = std::env::temp_dir().join(format!("rkube-bench-heal-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let result = measure(&dir, quick).await;
    let _ = tokio::process::Command::new(std::env::current_exe()?)
        .arg("down")
        .arg("--data-dir")
        .arg(dir.join("data"))
        .output()
        .await;
    let _ = std::fs::remove_dir_all(&dir);
    result
}

async fn measure(dir: &Path, quick: bool) -> anyhow::Result<serde_json::Value> {
    let port = free_port()?;
    let data = dir.join("data");
    let kubeconfig = dir.join("kubeconfig");
    let started = Instant::now();
    let out = tokio::process::Command::new(std::env::current_exe()?)
        .args([
            "up",
            "--detach",
            "--quiet",
            "--runtime",
            "process",
            "--secure-port",
            &port.to_string(),
        ])
        .arg("--data-dir")
        .arg(&data)
        .arg("--kubeconfig")
        .arg(&kubeconfig)
        .output()
        .await?;
    if !out.status.success() {
        bail!("rkube up failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let ready_s = started.elapsed().as_secs_f64();
    let status = control::call(&data.join("rkube.sock"), &Request::Status)
        .await?
        .status
        .context("no status")?;
    let pid = status.pid;
    // Idle: no workload, just heartbeats and controllers.
    let window = if quick { 10.0 } else { 60.0 };
    let cpu0 = super::cpu_seconds(pid);
    tokio::time::sleep(Duration::from_secs_f64(window)).await;
    let idle_cpu_pct = (super::cpu_seconds(pid) - cpu0) / window * 100.0;
    let idle_rss = super::rss_mib(pid);

    let client = crate::up::cluster::client_from(&kubeconfig, None).await?;
    let deploys: Api<Deployment> = Api::namespaced(client.clone(), "default");
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let d: Deployment = serde_json::from_value(json!({
        "metadata": {"name": "bench"},
        "spec": {"replicas": 3, "selector": {"matchLabels": {"app": "bench"}},
                 "template": {"metadata": {"labels": {"app": "bench"}},
                              "spec": {"terminationGracePeriodSeconds": 1, "containers": [{"name": "c", "image": "busybox", "command": ["sleep", "3600"]}]}}},
    }))?;
    let t = Instant::now();
    deploys.create(&PostParams::default(), &d).await?;
    let mut placed = Vec::new();
    while t.elapsed() < Duration::from_secs(60) {
        placed = running(&pods).await;
        if placed.len() == 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let deploy_s = t.elapsed().as_secs_f64();
    if placed.len() != 3 {
        bail!("the Deployment did not reach 3 Running pods");
    }
    let mut per_node: BTreeMap<String, usize> = BTreeMap::new();
    for (_, n) in &placed {
        *per_node.entry(n.clone()).or_default() += 1;
    }
    let victim =
        per_node.iter().max_by_key(|(_, c)| **c).map(|(n, _)| n.clone()).unwrap_or_default();
    let t = Instant::now();
    let answer =
        control::call(&data.join("rkube.sock"), &Request::Crash { node: victim.clone() }).await?;
    if !answer.ok {
        bail!("crash failed: {}", answer.message);
    }
    let mut healed = None;
    while t.elapsed() < Duration::from_secs(120) {
        let p = running(&pods).await;
        if p.len() == 3 && p.iter().all(|(_, n)| *n != victim) {
            healed = Some(t.elapsed().as_secs_f64());
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let busy_rss = super::rss_mib(pid);
    Ok(json!({
        "cluster": "rkube up: API server + embedded store + scheduler + controller manager + 3 kubelets, one process",
        "up_to_all_nodes_ready_s": ready_s,
        "idle_window_s": window,
        "idle_rss_mib": idle_rss,
        "idle_cpu_percent_of_one_core": idle_cpu_pct,
        "deployment_3_replicas_running_s": deploy_s,
        "crashed_node": victim,
        "heal_s": healed,
        "rss_after_heal_mib": busy_rss,
        "failure_profile": "fast: node-monitor-grace-period 10 s, unreachable toleration 5 s",
    }))
}

pub fn table(figures: &serde_json::Value) -> String {
    let mut out = super::render(
        "rkube bench heal — rkube up (whole cluster in one process, 3 workers, process runtime)",
        &figures["rkube_up"],
    );
    for (key, what) in [("scale_fast", "fast profile"), ("scale_upstream", "upstream defaults")] {
        out.push('\n');
        out.push_str(&super::render(
            &format!(
                "rkube bench heal — {} simulated nodes, {}-replica Deployment, one node lost ({what}); times from the kill",
                super::heal_scale::NODES,
                super::heal_scale::REPLICAS
            ),
            &figures[key],
        ));
    }
    out
}
