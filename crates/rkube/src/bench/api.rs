//! `rkube bench api`: the API server through a real client (kube-rs over HTTPS) on the embedded
//! store — create/get/list throughput and latency, watch delivery — and the idle memory of a
//! `rkube server` process.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::Api;
use kube::api::{ListParams, PostParams};
use kube::runtime::watcher;
use serde_json::json;

fn cm(name: &str) -> ConfigMap {
    serde_json::from_value(
        json!({"metadata": {"name": name}, "data": {"payload": "x".repeat(512)}}),
    )
    .unwrap_or_default()
}

pub async fn run(args: &super::BenchArgs) -> anyhow::Result<serde_json::Value> {
    let dir = std::env::temp_dir().join(format!("rkube-bench-api-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let store: Arc<dyn rkube_store::Store> = Arc::new(rkube_store::embedded::EmbeddedStore::open(
        rkube_store::embedded::Config::new(dir.join("store.redb")),
    )?);
    let server = rkube_apiserver::testing::TestServer::start_with(store, &dir, 300).await;
    let client = server.client().await;
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
    let n = if args.quick { 500 } else { 3000 };
    let conc = 32;

    // Watch delivery: a watcher started before the creates records when each arrives.
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(String, Instant)>();
    let wapi = api.clone();
    let w = tokio::spawn(async move {
        let mut s = watcher(wapi, watcher::Config::default()).boxed();
        while let Some(ev) = s.next().await {
            if let Ok(watcher::Event::Apply(c)) = ev {
                let _ = tx.send((c.metadata.name.unwrap_or_default(), Instant::now()));
            }
        }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;

    let start = Instant::now();
    let mut tasks = Vec::new();
    for t in 0..conc {
        let api = api.clone();
        tasks.push(tokio::spawn(async move {
            let mut out = Vec::new();
            for i in (t..n).step_by(conc) {
                let name = format!("cm-{i}");
                let t0 = Instant::now();
                let ok = api.create(&PostParams::default(), &cm(&name)).await.is_ok();
                out.push((name, t0, t0.elapsed(), ok));
            }
            out
        }));
    }
    let mut created = Vec::new();
    for t in tasks {
        created.extend(t.await.unwrap_or_default());
    }
    let create_s = start.elapsed().as_secs_f64();
    let failures = created.iter().filter(|c| !c.3).count();
    let (c50, c99) =
        super::percentiles(created.iter().map(|c| c.2.as_secs_f64() * 1000.0).collect());
    let acked: std::collections::HashMap<String, Instant> =
        created.iter().map(|c| (c.0.clone(), c.1 + c.2)).collect();
    let mut watch_lat = Vec::new();
    while watch_lat.len() < n {
        match tokio::time::timeout(Duration::from_secs(5), rx.recv()).await {
            Ok(Some((name, at))) => {
                if let Some(ack) = acked.get(&name) {
                    watch_lat.push(at.saturating_duration_since(*ack).as_secs_f64() * 1000.0);
                }
            }
            _ => break,
        }
    }
    w.abort();
    let (w50, w99) = super::percentiles(watch_lat);

    let start = Instant::now();
    let mut tasks = Vec::new();
    for t in 0..16 {
        let api = api.clone();
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            for i in (t..n).step_by(16) {
                let t0 = Instant::now();
                let _ = api.get(&format!("cm-{i}")).await;
                lat.push(t0.elapsed().as_secs_f64() * 1000.0);
            }
            lat
        }));
    }
    let mut gets = Vec::new();
    for t in tasks {
        gets.extend(t.await.unwrap_or_default());
    }
    let get_s = start.elapsed().as_secs_f64();
    let (g50, g99) = super::percentiles(gets);
    let t0 = Instant::now();
    let listed = api.list(&ListParams::default()).await.map(|l| l.items.len()).unwrap_or(0);
    let list_ms = t0.elapsed().as_secs_f64() * 1000.0;
    let rss_in_process = super::rss_mib(std::process::id());
    server.stop();
    drop(server);
    let idle = idle_server_rss().await.unwrap_or(0.0);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(json!({
        "objects": n, "create_concurrency": conc, "create_failures": failures,
        "creates_per_s": n as f64 / create_s, "create_p50_ms": c50, "create_p99_ms": c99,
        "gets_per_s_16_clients": n as f64 / get_s, "get_p50_ms": g50, "get_p99_ms": g99,
        "list_all_ms": list_ms, "listed": listed,
        "watch_delivery_p50_ms": w50, "watch_delivery_p99_ms": w99,
        "bench_process_rss_mib": rss_in_process,
        "idle_rkube_server_rss_mib": idle,
    }))
}

/// RSS of a fresh `rkube server --disable-controllers` after it settles.
async fn idle_server_rss() -> anyhow::Result<f64> {
    let dir = std::env::temp_dir().join(format!("rkube-bench-idle-{}", std::process::id()));
    let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let mut child = tokio::process::Command::new(std::env::current_exe()?)
        .args(["server", "--disable-controllers", "--secure-port", &port.to_string(), "--data-dir"])
        .arg(&dir)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let rss = child.id().map(super::rss_mib).unwrap_or(0.0);
    let _ = child.kill().await;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(rss)
}

pub fn table(figures: &serde_json::Value) -> String {
    super::render("rkube bench api (kube-rs over HTTPS, embedded store)", figures)
}
