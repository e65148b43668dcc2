//! `rkube bench store`: durable writes through the `Store` trait on the embedded backend
//! (1, 16 and 256 concurrent writers of 1 KiB values) and watch delivery latency.

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use futures::StreamExt;
use rkube_store::embedded::{Config, EmbeddedStore};
use rkube_store::{Revision, Store};
use serde_json::json;

async fn writes(
    store: Arc<EmbeddedStore>,
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

async fn watch_latency(store: Arc<EmbeddedStore>, watchers: usize, events: usize) -> (f64, f64) {
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

pub async fn run(args: &super::BenchArgs) -> anyhow::Result<serde_json::Value> {
    let dir = std::env::temp_dir().join(format!("rkube-bench-store-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let store = Arc::new(EmbeddedStore::open(Config::new(dir.join("store.redb")))?);
    let scale = if args.quick { 1 } else { 5 };
    let (w1, w1_p50, w1_p99) = writes(store.clone(), 1, 200 * scale, "a").await;
    let (w16, w16_p50, w16_p99) = writes(store.clone(), 16, 50 * scale, "b").await;
    let (w256, w256_p50, w256_p99) = writes(store.clone(), 256, 8 * scale, "c").await;
    let (wl1_p50, wl1_p99) = watch_latency(store.clone(), 1, 100).await;
    let (wl100_p50, wl100_p99) = watch_latency(store.clone(), 100, 100).await;
    let rss = super::rss_mib(std::process::id());
    drop(store);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(json!({
        "backend": "embedded (redb, fsync per commit, group commit)",
        "writes_per_s_1_writer": w1, "write_p50_ms_1_writer": w1_p50, "write_p99_ms_1_writer": w1_p99,
        "writes_per_s_16_writers": w16, "write_p50_ms_16_writers": w16_p50, "write_p99_ms_16_writers": w16_p99,
        "writes_per_s_256_writers": w256, "write_p50_ms_256_writers": w256_p50, "write_p99_ms_256_writers": w256_p99,
        "watch_p50_ms_1_watcher": wl1_p50, "watch_p99_ms_1_watcher": wl1_p99,
        "watch_p50_ms_100_watchers": wl100_p50, "watch_p99_ms_100_watchers": wl100_p99,
        "rss_mib": rss,
    }))
}

pub fn table(figures: &serde_json::Value) -> String {
    super::render("rkube bench store (1 KiB values, durable writes)", figures)
}
