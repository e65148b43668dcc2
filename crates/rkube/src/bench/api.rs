//! `rkube bench api`: the API server on the embedded store through a real client (kube-rs over
//! HTTPS), hosted in this process, with Pods as the workload:
//!
//! 1. RSS of this process before loading (baseline), with 10,000 and with 100,000 stored Pods, the
//!    serialized size of those Pods (the stored JSON) and the ratio of the RSS increase to it;
//! 2. with 10,000 Pods stored and 100 watchers of the namespace's Pods open the whole time: LISTs
//!    of the 10,000 Pods, then pod create / get / status patch (merge patch) mixed one third each
//!    at a paced ~1,000 requests/s, and how long the watchers took to see each create;
//! 3. the idle RSS of a separate `rkube server --disable-controllers` process.
//!
//! `--quick` scales it down (1,000 / 5,000 Pods, 10 watchers, 5 s of paced load). Nothing
//! schedules the Pods here (the test server runs no scheduler or controllers, and their
//! `spec.schedulerName` is served by nobody anyway), so only the bench touches them.
//!
//! The watchers read the watch stream of kube-rs (`Client::request_stream`) and parse only each
//! event's type, name and resourceVersion rather than whole typed Pods: they run on the same two
//! cores as the server, and decoding 100 full copies of every event would measure the client.
//! For the same reason the repeated LISTs time the full response body; one typed `Api::list`
//! (decoding every Pod in the client) is timed on its own.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures::AsyncBufReadExt;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{ListParams, Patch, PatchParams, PostParams, WatchParams};
use kube::{Api, Client, Resource};
use serde_json::json;
use tokio_util::sync::CancellationToken;

const NS: &str = "default";

/// The workload's size; `--quick` scales it down.
struct Scale {
    /// Pods stored while the latency figures are taken.
    small: usize,
    /// Pods stored for the second memory figure.
    large: usize,
    watchers: usize,
    /// Paced requests per second (create, get and status patch in turn).
    rate: u64,
    paced_secs: u64,
    /// How many times the full list is taken.
    lists: usize,
    /// Concurrent tasks for the bulk loads.
    load_tasks: usize,
    /// Requests of each closed loop that measures CPU time per request.
    cpu_requests: usize,
}

/// A small, realistic Pod: one container with image, port and resources, three labels.
fn pod(name: &str, set: &str) -> Pod {
    serde_json::from_value(json!({
        "metadata": {
            "name": name,
            "labels": {"app": "bench-web", "tier": "frontend", "set": set},
        },
        "spec": {
            // Served by no scheduler: nothing but the bench touches these Pods.
            "schedulerName": "none",
            "containers": [{
                "name": "web",
                "image": "registry.k8s.io/nginx-slim:0.27",
                "ports": [{"name": "http", "containerPort": 8080, "protocol": "TCP"}],
                "resources": {
                    "requests": {"cpu": "100m", "memory": "64Mi"},
                    "limits": {"memory": "128Mi"},
                },
            }],
        },
    }))
    .unwrap_or_default()
}

/// A status merge patch as a kubelet would send: phase, a condition and a message.
fn status_patch(seq: usize) -> serde_json::Value {
    json!({"status": {
        "phase": "Running",
        "message": format!("bench status patch {seq}"),
        "conditions": [{"type": "Ready", "status": if seq.is_multiple_of(2) { "True" } else { "False" }}],
    }})
}

/// "10k", "1k", "100k", "2500".
fn count_label(n: usize) -> String {
    if n >= 1000 && n.is_multiple_of(1000) { format!("{}k", n / 1000) } else { n.to_string() }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Rounded to 2 decimals, for a readable JSON object.
fn r2(v: f64) -> f64 {
    (v * 100.0).round() / 100.0
}

/// Creates Pods `{prefix}-{i}` for i in `range` from `tasks` concurrent tasks, as fast as it goes.
/// Returns (created, failures, seconds, first error).
async fn bulk_create(
    api: &Api<Pod>,
    prefix: &str,
    set: &str,
    range: std::ops::Range<usize>,
    tasks: usize,
) -> (usize, usize, f64, Option<String>) {
    let start = Instant::now();
    let next = Arc::new(AtomicU64::new(range.start as u64));
    let mut handles = Vec::new();
    for _ in 0..tasks {
        let (api, next, prefix, set) =
            (api.clone(), next.clone(), prefix.to_string(), set.to_string());
        let end = range.end as u64;
        handles.push(tokio::spawn(async move {
            let (mut ok, mut failed, mut first_err) = (0, 0, None);
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= end {
                    break;
                }
                match api.create(&PostParams::default(), &pod(&format!("{prefix}-{i}"), &set)).await
                {
                    Ok(_) => ok += 1,
                    Err(e) => {
                        failed += 1;
                        first_err.get_or_insert_with(|| e.to_string());
                    }
                }
            }
            (ok, failed, first_err)
        }));
    }
    let (mut ok, mut failed, mut first_err) = (0, 0, None);
    for h in handles {
        if let Ok((o, f, e)) = h.await {
            ok += o;
            failed += f;
            if first_err.is_none() {
                first_err = e;
            }
        }
    }
    (ok, failed, start.elapsed().as_secs_f64(), first_err)
}

/// Number and total serialized size (bytes) of the Pods in the store, read from the store itself.
async fn stored_pods(store: &Arc<dyn rkube_store::Store>) -> (usize, usize) {
    match store.list(&format!("/registry/pods/{NS}/"), Default::default()).await {
        Ok(page) => (page.items.len(), page.items.iter().map(|kv| kv.value.len()).sum()),
        Err(_) => (0, 0),
    }
}

/// RSS after letting the process settle: long enough for the server's periodic return of freed
/// heap pages to the system to have run once.
async fn settled_rss() -> f64 {
    tokio::time::sleep(rkube_apiserver::heap::TRIM_EVERY + Duration::from_millis(1500)).await;
    super::rss_mib(std::process::id())
}

#[derive(serde::Deserialize)]
struct WatchLine {
    #[serde(rename = "type")]
    kind: String,
    object: WatchObject,
}

#[derive(serde::Deserialize)]
struct WatchObject {
    #[serde(default)]
    metadata: WatchMeta,
}

#[derive(serde::Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct WatchMeta {
    #[serde(default)]
    name: String,
    #[serde(default)]
    resource_version: String,
}

/// What one watcher saw: its object events (not bookmarks or errors) counted, the arrival of each
/// paced create's ADDED event.
#[derive(Default)]
struct Watched {
    events: u64,
    paced_added: Vec<(usize, Instant)>,
    reconnects: u64,
    errors: u64,
    first_error: Option<String>,
}

/// Watches the namespace's Pods from `rv` until `stop`, re-watching from the last seen
/// resourceVersion if the server ends the stream. Signals `ready` once the first watch is open.
async fn watcher(
    client: Client,
    mut rv: String,
    ready: tokio::sync::mpsc::Sender<()>,
    changes_seen: Arc<AtomicU64>,
    stop: CancellationToken,
) -> Watched {
    let mut out = Watched::default();
    let path = Pod::url_path(&(), Some(NS));
    let mut ready = Some(ready);
    let mut buf = Vec::with_capacity(8192);
    while !stop.is_cancelled() {
        let req = match kube::core::Request::new(&path).watch(&WatchParams::default(), &rv) {
            Ok(r) => r,
            Err(_) => break,
        };
        let stream = tokio::select! {
            s = client.request_stream(req) => s,
            _ = stop.cancelled() => break,
        };
        let Ok(stream) = stream else {
            out.errors += 1;
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        if let Some(r) = ready.take() {
            let _ = r.send(()).await;
        } else {
            out.reconnects += 1;
        }
        let mut stream = std::pin::pin!(stream);
        loop {
            buf.clear();
            let n = tokio::select! {
                n = stream.read_until(b'\n', &mut buf) => n,
                _ = stop.cancelled() => return out,
            };
            match n {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
            let at = Instant::now();
            let Ok(line) = serde_json::from_slice::<WatchLine>(&buf) else {
                out.errors += 1;
                let text = String::from_utf8_lossy(&buf).chars().take(200).collect();
                out.first_error.get_or_insert(text);
                continue;
            };
            if line.kind == "ERROR" {
                out.errors += 1;
                let status: serde_json::Value = serde_json::from_slice(&buf).unwrap_or_default();
                let text = format!(
                    "{} ({})",
                    status["object"]["message"].as_str().unwrap_or("?"),
                    status["object"]["code"]
                );
                out.first_error.get_or_insert(text);
                continue;
            }
            if !line.object.metadata.resource_version.is_empty() {
                rv = line.object.metadata.resource_version;
            }
            if line.kind != "BOOKMARK" {
                out.events += 1;
            }
            if line.kind == "ADDED" || line.kind == "MODIFIED" {
                changes_seen.fetch_add(1, Ordering::Relaxed);
            }
            if line.kind == "ADDED"
                && let Some(i) = line.object.metadata.name.strip_prefix("paced-")
                && let Ok(i) = i.parse::<usize>()
            {
                out.paced_added.push((i, at));
            }
        }
    }
    out
}

/// One paced request's outcome: op (0 create, 1 get, 2 patch), latency, ok, and for a create its
/// index and when it was acknowledged.
type Outcome = (u8, f64, bool, Option<(usize, Instant)>);

pub async fn run(args: &super::BenchArgs) -> anyhow::Result<serde_json::Value> {
    let s = if args.quick {
        Scale {
            small: 1_000,
            large: 5_000,
            watchers: 10,
            rate: 1000,
            paced_secs: 5,
            lists: 20,
            load_tasks: 64,
            cpu_requests: 2_000,
        }
    } else {
        Scale {
            small: 10_000,
            large: 100_000,
            watchers: 100,
            rate: 1000,
            paced_secs: 20,
            lists: 20,
            load_tasks: 64,
            cpu_requests: 20_000,
        }
    };
    let (small_l, large_l) = (count_label(s.small), count_label(s.large));
    let pid = std::process::id();
    let dir = std::env::temp_dir().join(format!("rkube-bench-api-{pid}"));
    let _ = std::fs::remove_dir_all(&dir);
    let store: Arc<dyn rkube_store::Store> = Arc::new(rkube_store::embedded::EmbeddedStore::open(
        rkube_store::embedded::Config::new(dir.join("store.redb")),
    )?);
    let server = rkube_apiserver::testing::TestServer::start_with(store.clone(), &dir, 300).await;
    let client = server.client().await;
    let watch_client = server.client().await;
    let api: Api<Pod> = Api::namespaced(client.clone(), NS);
    // Warm up (TLS, discovery-free paths) before the baseline.
    let _ = api.list(&ListParams::default().limit(1)).await;
    let rss_baseline = settled_rss().await;

    // 1. Load the small set as fast as it goes; memory with it stored.
    let (loaded, load_failures, load_s, load_err) =
        bulk_create(&api, "pod", "preload", 0..s.small, s.load_tasks).await;
    let rss_small = settled_rss().await;
    let (stored_small, bytes_small) = stored_pods(&store).await;

    // 2. Watchers from the current resourceVersion (no initial list), open the whole time.
    let rv = api
        .list(&ListParams::default().limit(1))
        .await
        .ok()
        .and_then(|l| l.metadata.resource_version)
        .unwrap_or_default();
    let stop = CancellationToken::new();
    let changes_seen = Arc::new(AtomicU64::new(0));
    let (ready_tx, mut ready_rx) = tokio::sync::mpsc::channel(s.watchers.max(1));
    let mut watchers = Vec::new();
    for _ in 0..s.watchers {
        watchers.push(tokio::spawn(watcher(
            watch_client.clone(),
            rv.clone(),
            ready_tx.clone(),
            changes_seen.clone(),
            stop.clone(),
        )));
    }
    drop(ready_tx);
    let mut open = 0;
    while open < s.watchers {
        match tokio::time::timeout(Duration::from_secs(30), ready_rx.recv()).await {
            Ok(Some(())) => open += 1,
            _ => break,
        }
    }

    // 2a. The full list of the small set, repeated (watchers open, no other load): time to the
    // last byte of the response; then one typed list decoded by kube-rs.
    let list_req = kube::core::Request::new(Pod::url_path(&(), Some(NS)));
    let mut list_lat = Vec::new();
    let mut list_bytes = 0usize;
    for _ in 0..s.lists {
        let Ok(req) = list_req.list(&ListParams::default()) else { break };
        let t0 = Instant::now();
        if let Ok(body) = client.request_text(req).await {
            list_lat.push(ms(t0.elapsed()));
            list_bytes = body.len();
        }
    }
    let (l50, l99) = super::percentiles(list_lat);
    let t0 = Instant::now();
    let listed = api.list(&ListParams::default()).await.map(|l| l.items.len()).unwrap_or(0);
    let list_typed_ms = ms(t0.elapsed());

    // 2b. Paced mixed load: create, get, status patch in turn, open loop at `rate` per second
    // (each request is its own task, started on schedule; at most 256 in flight).
    let total = (s.rate * s.paced_secs) as usize;
    let period = Duration::from_secs_f64(1.0 / s.rate as f64);
    let inflight = Arc::new(tokio::sync::Semaphore::new(256));
    let cpu0 = super::cpu_seconds(pid);
    let start = tokio::time::Instant::now();
    let mut handles = Vec::with_capacity(total);
    for i in 0..total {
        tokio::time::sleep_until(start + period * i as u32).await;
        let Ok(permit) = inflight.clone().acquire_owned().await else { break };
        let api = api.clone();
        let small = s.small;
        handles.push(tokio::spawn(async move {
            let _permit = permit;
            let k = i / 3;
            let t0 = Instant::now();
            let (op, ok, created) = match i % 3 {
                0 => {
                    let ok = api
                        .create(&PostParams::default(), &pod(&format!("paced-{k}"), "paced"))
                        .await
                        .is_ok();
                    (0u8, ok, Some(k))
                }
                1 => (1, api.get(&format!("pod-{}", (k * 7919) % small)).await.is_ok(), None),
                _ => {
                    let name = format!("pod-{}", k % small);
                    let patch = Patch::Merge(status_patch(k));
                    (
                        2,
                        api.patch_status(&name, &PatchParams::default(), &patch).await.is_ok(),
                        None,
                    )
                }
            };
            let lat = t0.elapsed();
            (op, ms(lat), ok, created.filter(|_| ok).map(|k| (k, t0 + lat)))
        }));
    }
    let issue_s = start.elapsed().as_secs_f64();
    let mut outcomes: Vec<Outcome> = Vec::with_capacity(total);
    for h in handles {
        if let Ok(o) = h.await {
            outcomes.push(o);
        }
    }
    let paced_s = start.elapsed().as_secs_f64();
    let paced_cpu = (super::cpu_seconds(pid) - cpu0) / paced_s;
    let lat_of = |op: u8| -> Vec<f64> {
        outcomes.iter().filter(|o| o.0 == op && o.2).map(|o| o.1).collect()
    };
    let fails_of = |op: u8| outcomes.iter().filter(|o| o.0 == op && !o.2).count();
    let (c50, c99) = super::percentiles(lat_of(0));
    let (g50, g99) = super::percentiles(lat_of(1));
    let (p50, p99) = super::percentiles(lat_of(2));
    let ok_requests = outcomes.iter().filter(|o| o.2).count();
    let acked: Vec<(usize, Instant)> = outcomes.iter().filter_map(|o| o.3).collect();
    let mut ack_at = vec![None; total / 3 + 1];
    for (k, at) in &acked {
        if let Some(slot) = ack_at.get_mut(*k) {
            *slot = Some(*at);
        }
    }

    // 2c. Let the watchers catch up with every paced create and patch, then close them.
    let ok_patches = outcomes.iter().filter(|o| o.0 == 2 && o.2).count();
    let want = (acked.len() * open) as u64;
    let want_changes = ((acked.len() + ok_patches) * open) as u64;
    let drain = Instant::now();
    while changes_seen.load(Ordering::Relaxed) < want_changes
        && drain.elapsed() < Duration::from_secs(30)
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let catch_up_ms = ms(drain.elapsed());
    stop.cancel();
    let (mut events, mut reconnects, mut watch_errors, mut delivery) = (0, 0, 0, Vec::new());
    let mut first_watch_error = None;
    for w in watchers {
        if let Ok(w) = w.await {
            events += w.events;
            reconnects += w.reconnects;
            watch_errors += w.errors;
            if first_watch_error.is_none() {
                first_watch_error = w.first_error;
            }
            for (k, at) in w.paced_added {
                if let Some(Some(ack)) = ack_at.get(k) {
                    delivery.push(ms(at.saturating_duration_since(*ack)));
                }
            }
        }
    }
    let missed = want.saturating_sub(delivery.len() as u64);
    let (w50, w99) = super::percentiles(delivery);

    // 2d. CPU time per request, which load on the machine does not distort: closed loops of
    // GETs of stored Pods (body read as text, not decoded) and, as the floor that TLS, HTTP and
    // the client cost, of `/version`; the difference is the server's work for a GET.
    let get_paths: Vec<String> =
        (0..s.small).map(|i| format!("{}/pod-{i}", Pod::url_path(&(), Some(NS)))).collect();
    let cpu_get_us = cpu_per_request(&client, &get_paths, s.cpu_requests).await;
    let cpu_floor_us = cpu_per_request(&client, &["/version".to_string()], s.cpu_requests).await;

    // 3. Fill up to the large set (watchers closed); memory with it stored.
    let (have, _) = stored_pods(&store).await;
    let (filled, fill_failures, fill_s, fill_err) =
        bulk_create(&api, "bulk", "bulk", 0..s.large.saturating_sub(have), s.load_tasks).await;
    let rss_large = settled_rss().await;
    let (stored_large, bytes_large) = stored_pods(&store).await;
    let mib = |b: usize| b as f64 / (1024.0 * 1024.0);
    let ratio = |rss: f64, bytes: usize| {
        if bytes == 0 { 0.0 } else { (rss - rss_baseline) / mib(bytes) }
    };

    server.stop();
    drop(api);
    drop(client);
    drop(watch_client);
    drop(server);
    drop(store);
    let idle = idle_server_rss().await.unwrap_or(0.0);
    let _ = std::fs::remove_dir_all(&dir);

    let mut f = serde_json::Map::new();
    let mut put = |k: String, v: serde_json::Value| {
        f.insert(k, v);
    };
    put("watchers".into(), json!(open));
    put("paced_target_rps".into(), json!(s.rate));
    put("sustained_rate_rps".into(), json!(r2(ok_requests as f64 / paced_s)));
    put("paced_issue_rate_rps".into(), json!(r2(outcomes.len() as f64 / issue_s)));
    put("paced_requests".into(), json!(outcomes.len()));
    put("paced_cpu_cores_used".into(), json!(r2(paced_cpu)));
    put("pod_create_p50_ms".into(), json!(r2(c50)));
    put("pod_create_p99_ms".into(), json!(r2(c99)));
    put("pod_create_failures".into(), json!(fails_of(0)));
    put("pod_get_p50_ms".into(), json!(r2(g50)));
    put("pod_get_p99_ms".into(), json!(r2(g99)));
    put("pod_get_failures".into(), json!(fails_of(1)));
    put("pod_status_patch_p50_ms".into(), json!(r2(p50)));
    put("pod_status_patch_p99_ms".into(), json!(r2(p99)));
    put("pod_status_patch_failures".into(), json!(fails_of(2)));
    put(format!("list_{small_l}_pods_p50_ms"), json!(r2(l50)));
    put(format!("list_{small_l}_pods_p99_ms"), json!(r2(l99)));
    put(format!("list_{small_l}_pods_response_mib"), json!(r2(mib(list_bytes))));
    put(format!("list_{small_l}_pods_typed_kube_rs_ms"), json!(r2(list_typed_ms)));
    put("listed_typed".into(), json!(listed));
    put("watch_delivery_p50_ms".into(), json!(r2(w50)));
    put("watch_delivery_p99_ms".into(), json!(r2(w99)));
    put("watch_events_delivered".into(), json!(events));
    put("watch_events_per_s".into(), json!(r2(events as f64 / (paced_s + catch_up_ms / 1000.0))));
    put("watch_creates_missed".into(), json!(missed));
    put(
        "watch_changes_missed".into(),
        json!(want_changes.saturating_sub(changes_seen.load(Ordering::Relaxed))),
    );
    put("watch_reconnects".into(), json!(reconnects));
    put("watch_errors".into(), json!(watch_errors));
    if let Some(e) = first_watch_error {
        put("watch_first_error".into(), json!(e));
    }
    put("watch_catch_up_ms".into(), json!(r2(catch_up_ms)));
    put("bulk_load_tasks".into(), json!(s.load_tasks));
    put("bulk_creates_per_s".into(), json!(r2((loaded + filled) as f64 / (load_s + fill_s))));
    put("bulk_create_failures".into(), json!(load_failures + fill_failures));
    if let Some(e) = load_err.or(fill_err) {
        put("bulk_create_first_error".into(), json!(e));
    }
    put("rss_mib_baseline".into(), json!(r2(rss_baseline)));
    put(format!("rss_mib_{small_l}_pods"), json!(r2(rss_small)));
    put(format!("stored_pods_at_{small_l}"), json!(stored_small));
    put(format!("serialized_mib_{small_l}_pods"), json!(r2(mib(bytes_small))));
    put(format!("rss_per_serialized_byte_{small_l}"), json!(r2(ratio(rss_small, bytes_small))));
    put(format!("rss_mib_{large_l}_pods"), json!(r2(rss_large)));
    put(format!("stored_pods_at_{large_l}"), json!(stored_large));
    put(format!("serialized_mib_{large_l}_pods"), json!(r2(mib(bytes_large))));
    put(format!("rss_per_serialized_byte_{large_l}"), json!(r2(ratio(rss_large, bytes_large))));
    put(
        "serialized_bytes_per_pod".into(),
        json!(bytes_large.checked_div(stored_large).unwrap_or(0)),
    );
    put("idle_rkube_server_rss_mib".into(), json!(r2(idle)));
    put("get_cpu_us_per_request".into(), json!(r2(cpu_get_us)));
    put("version_cpu_us_per_request".into(), json!(r2(cpu_floor_us)));
    put("get_server_cpu_us_over_floor".into(), json!(r2(cpu_get_us - cpu_floor_us)));
    put("goal_write_p99_ms".into(), json!(50));
    put("goal_get_p99_ms".into(), json!(10));
    put("goal_list_10k_pods_p99_ms".into(), json!(300));
    put("goal_rss_per_serialized_byte".into(), json!(3));
    Ok(serde_json::Value::Object(f))
}

/// CPU time of this process (server and client) per request, in microseconds, over `n` GETs of
/// `paths` in turn from 4 concurrent tasks; each response is read whole, not decoded.
async fn cpu_per_request(client: &Client, paths: &[String], n: usize) -> f64 {
    const TASKS: usize = 4;
    if paths.is_empty() || n == 0 {
        return 0.0;
    }
    let next = Arc::new(AtomicU64::new(0));
    let cpu0 = super::cpu_seconds(std::process::id());
    let mut handles = Vec::new();
    for _ in 0..TASKS {
        let (client, next, paths) = (client.clone(), next.clone(), paths.to_vec());
        handles.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed) as usize;
                if i >= n {
                    break;
                }
                let Ok(req) = http::Request::get(&paths[i % paths.len()]).body(Vec::new()) else {
                    break;
                };
                let _ = client.request_text(req).await;
            }
        }));
    }
    for h in handles {
        let _ = h.await;
    }
    (super::cpu_seconds(std::process::id()) - cpu0) * 1e6 / n as f64
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
    super::render("rkube bench api (kube-rs over HTTPS, embedded store, Pods)", figures)
}
