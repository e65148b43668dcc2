//! `rkube bench store`: durable writes through the `Store` trait (1, 16 and 256 concurrent
//! writers of 1 KiB values) and watch delivery latency, on the embedded backend and, when built
//! with the `etcd` feature and `etcd` is on PATH, on a local real etcd in the same run.

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use futures::StreamExt;
use rkube_store::embedded::{Config, EmbeddedStore};
use rkube_store::{Revision, Store};
use serde_json::json;

async fn writes(
    store: Arc<dyn Store>,
    writers: usize,
    per_writer: usize,
    tag: &str,
) -> (f64, f64, f64) {
    let value = Bytes::from(vec![b'x'; 1024]);
    let start = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..writers {
        let (s, v, tag) = (store.clone(), value.clone(), tag.to_string());
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::with_capacity(per_writer);
            for i in 0..per_writer {
                let t = Instant::now();
                let _ = s.create(&format!("/bench/{tag}/{w}/{i}"), v.clone()).await;
                lat.push(t.elapsed().as_secs_f64() * 1000.0);
            }
            lat
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap_or_default());
    }
    let secs = start.elapsed().as_secs_f64();
    let (p50, p99) = super::percentiles(all);
    ((writers * per_writer) as f64 / secs, p50, p99)
}

async fn watch_latency(store: Arc<dyn Store>, watchers: usize, events: usize) -> (f64, f64) {
    let prefix = format!("/watch/{watchers}/");
    let rev = store.current_revision().await.unwrap_or(Revision::ZERO);
    let mut streams = Vec::new();
    for _ in 0..watchers {
        if let Ok(s) = store.watch(&prefix, rev).await {
            streams.push(s);
        }
    }
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(usize, Instant)>();
    for mut s in streams {
        let tx = tx.clone();
        tokio::spawn(async move {
            let mut n = 0;
            while let Some(Ok(ev)) = s.next().await {
                if ev.key().is_some() {
                    let _ = tx.send((n, Instant::now()));
                    n += 1;
                    if n == events {
                        return;
                    }
                }
            }
        });
    }
    drop(tx);
    let mut sent = Vec::new();
    for i in 0..events {
        let t = Instant::now();
        let _ = store.create(&format!("{prefix}{i}"), Bytes::from_static(b"v")).await;
        sent.push(t);
        tokio::time::sleep(std::time::Duration::from_millis(2)).await;
    }
    let mut lat = Vec::new();
    while let Ok(Some((i, at))) =
        tokio::time::timeout(std::time::Duration::from_secs(10), rx.recv()).await
    {
        if let Some(t) = sent.get(i) {
            lat.push(at.duration_since(*t).as_secs_f64() * 1000.0);
        }
    }
    super::percentiles(lat)
}

/// The same workload on one backend; figures are keyed `<backend>_<figure>`.
async fn measure(
    name: &str,
    store: Arc<dyn Store>,
    quick: bool,
    out: &mut serde_json::Map<String, serde_json::Value>,
) {
    let scale = if quick { 1 } else { 5 };
    let (w1, w1_p50, w1_p99) = writes(store.clone(), 1, 200 * scale, "a").await;
    let (w16, w16_p50, w16_p99) = writes(store.clone(), 16, 50 * scale, "b").await;
    let (w256, w256_p50, w256_p99) = writes(store.clone(), 256, 8 * scale, "c").await;
    let (wl1_p50, wl1_p99) = watch_latency(store.clone(), 1, 100).await;
    let (wl100_p50, wl100_p99) = watch_latency(store.clone(), 100, 100).await;
    let figures = json!({
        "writes_per_s_1_writer": w1, "write_p50_ms_1_writer": w1_p50, "write_p99_ms_1_writer": w1_p99,
        "writes_per_s_16_writers": w16, "write_p50_ms_16_writers": w16_p50, "write_p99_ms_16_writers": w16_p99,
        "writes_per_s_256_writers": w256, "write_p50_ms_256_writers": w256_p50, "write_p99_ms_256_writers": w256_p99,
        "watch_p50_ms_1_watcher": wl1_p50, "watch_p99_ms_1_watcher": wl1_p99,
        "watch_p50_ms_100_watchers": wl100_p50, "watch_p99_ms_100_watchers": wl100_p99,
    });
    if let serde_json::Value::Object(map) = figures {
        for (k, v) in map {
            out.insert(format!("{name}_{k}"), v);
        }
    }
}

pub async fn run(args: &super::BenchArgs) -> anyhow::Result<serde_json::Value> {
    let dir = std::env::temp_dir().join(format!("rkube-bench-store-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let mut out = serde_json::Map::new();
    out.insert("embedded_backend".into(), json!("redb, fsync per commit, group commit"));
    {
        let store: Arc<dyn Store> =
            Arc::new(EmbeddedStore::open(Config::new(dir.join("store.redb")))?);
        measure("embedded", store, args.quick, &mut out).await;
        out.insert("embedded_rss_mib".into(), json!(super::rss_mib(std::process::id())));
    }
    #[cfg(feature = "etcd")]
    match local_etcd::LocalEtcd::start(&dir.join("etcd")).await {
        Ok((etcd, store)) => {
            measure("etcd", store, args.quick, &mut out).await;
            out.insert("etcd_server_rss_mib".into(), json!(super::rss_mib(etcd.pid())));
            if let (Some(e), Some(d)) = (
                out.get("embedded_writes_per_s_256_writers").and_then(|v| v.as_f64()),
                out.get("etcd_writes_per_s_256_writers").and_then(|v| v.as_f64()),
            ) && d > 0.0
            {
                out.insert("embedded_vs_etcd_256_writers".into(), json!(e / d));
            }
        }
        Err(e) => {
            out.insert("etcd".into(), json!(format!("not measured: {e}")));
        }
    }
    #[cfg(not(feature = "etcd"))]
    out.insert("etcd".into(), json!("not measured: built without the `etcd` feature"));
    let _ = std::fs::remove_dir_all(&dir);
    Ok(serde_json::Value::Object(out))
}

/// A throwaway etcd on free loopback ports, killed on drop.
#[cfg(feature = "etcd")]
mod local_etcd {
    use rkube_store::Store;
    use rkube_store::etcd::{Config, EtcdStore};
    use std::path::Path;
    use std::process::{Child, Command, Stdio};
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    pub struct LocalEtcd(Child);

    impl Drop for LocalEtcd {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    impl LocalEtcd {
        pub fn pid(&self) -> u32 {
            self.0.id()
        }

        pub async fn start(dir: &Path) -> anyhow::Result<(LocalEtcd, Arc<dyn Store>)> {
            let port = || -> anyhow::Result<u16> {
                Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
            };
            let client = format!("http://127.0.0.1:{}", port()?);
            let peer = format!("http://127.0.0.1:{}", port()?);
            let child = Command::new("etcd")
                .arg("--name=bench")
                .arg(format!("--data-dir={}", dir.display()))
                .arg(format!("--listen-client-urls={client}"))
                .arg(format!("--advertise-client-urls={client}"))
                .arg(format!("--listen-peer-urls={peer}"))
                .arg(format!("--initial-advertise-peer-urls={peer}"))
                .arg(format!("--initial-cluster=bench={peer}"))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .map_err(|e| anyhow::anyhow!("cannot start etcd: {e}"))?;
            let etcd = LocalEtcd(child);
            let config = Config { endpoints: vec![client], ..Config::default() };
            let deadline = Instant::now() + Duration::from_secs(20);
            loop {
                if let Ok(s) = EtcdStore::connect(config.clone()).await
                    && s.current_revision().await.is_ok()
                {
                    return Ok((etcd, Arc::new(s)));
                }
                if Instant::now() > deadline {
                    anyhow::bail!("etcd did not answer within 20 s");
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

pub fn table(figures: &serde_json::Value) -> String {
    super::render("rkube bench store (1 KiB values, durable writes)", figures)
}
