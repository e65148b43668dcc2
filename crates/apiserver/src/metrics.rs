//! `/metrics` in the Prometheus text format, with upstream's metric names where one exists:
//! requests by verb/resource/code and their latencies, open watches, and store latency by
//! operation and resource (measured by [`MeteredStore`], which wraps whatever backend is in use).

use bytes::Bytes;
use rkube_store::{KeyValue, ListOptions, ListPage, ReadAt, Revision, Store, WatchStream};
use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Upper bounds (seconds) of the latency buckets, as upstream's request duration histogram.
const BUCKETS: &[f64] =
    &[0.005, 0.025, 0.05, 0.1, 0.2, 0.4, 0.6, 0.8, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0];

#[derive(Default, Clone)]
struct Histogram {
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

impl Histogram {
    fn observe(&mut self, secs: f64) {
        if self.counts.is_empty() {
            self.counts = vec![0; BUCKETS.len()];
        }
        if let Some(i) = BUCKETS.iter().position(|b| secs <= *b) {
            self.counts[i] += 1;
        }
        self.sum += secs;
        self.count += 1;
    }

    fn render(&self, out: &mut String, name: &str, labels: &str) {
        let mut cumulative = 0;
        for (b, c) in BUCKETS.iter().zip(&self.counts) {
            cumulative += c;
            let _ = writeln!(out, "{name}_bucket{{{labels},le=\"{b}\"}} {cumulative}");
        }
        let _ = writeln!(out, "{name}_bucket{{{labels},le=\"+Inf\"}} {}", self.count);
        let _ = writeln!(out, "{name}_sum{{{labels}}} {}", self.sum);
        let _ = writeln!(out, "{name}_count{{{labels}}} {}", self.count);
    }
}

/// verb, resource, subresource: upstream's request labels.
pub type RequestClass = (&'static str, String, String);

#[derive(Default)]
pub struct Metrics {
    /// (verb, resource, subresource, code) → count.
    requests: Mutex<BTreeMap<(RequestClass, u16), u64>>,
    /// (verb, resource, subresource) → latency.
    latency: Mutex<BTreeMap<RequestClass, Histogram>>,
    /// (operation, type) → latency of store calls.
    store: Mutex<BTreeMap<(&'static str, String), Histogram>>,
    watches_open: AtomicI64,
    watches_total: AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The upstream verb and resource/subresource of a request path.
pub fn classify(method: &http::Method, path: &str, query: &str) -> RequestClass {
    let segs: Vec<&str> = path.trim_matches('/').split('/').filter(|s| !s.is_empty()).collect();
    let rest: &[&str] = match segs.as_slice() {
        ["api", _v, rest @ ..] => rest,
        ["apis", _g, _v, rest @ ..] => rest,
        _ => return (verb_of(method, true, ""), String::new(), String::new()),
    };
    let rest = match rest {
        ["namespaces", _ns, more @ ..] if !more.is_empty() => more,
        other => other,
    };
    let (resource, name, sub) = match rest {
        [r] => (*r, false, ""),
        [r, _name] => (*r, true, ""),
        [r, _name, sub, ..] => (*r, true, *sub),
        _ => ("", false, ""),
    };
    let verb = if resource.is_empty() {
        verb_of(method, true, "") // discovery: a non-resource GET
    } else if matches!(sub, "exec" | "attach" | "portforward" | "proxy") {
        "CONNECT"
    } else {
        verb_of(method, name, query)
    };
    (verb, resource.to_string(), sub.to_string())
}

fn verb_of(method: &http::Method, named: bool, query: &str) -> &'static str {
    let watch = query.split('&').any(|kv| kv == "watch=true" || kv == "watch=1");
    match *method {
        http::Method::GET if watch => "WATCH",
        http::Method::GET if named => "GET",
        http::Method::GET => "LIST",
        http::Method::POST => "POST",
        http::Method::PUT => "PUT",
        http::Method::PATCH => "PATCH",
        http::Method::DELETE if named => "DELETE",
        http::Method::DELETE => "DELETECOLLECTION",
        _ => "OTHER",
    }
}

impl Metrics {
    pub fn observe_request(&self, class: RequestClass, code: u16, took: Duration) {
        let long_running = matches!(class.0, "WATCH" | "CONNECT");
        *lock(&self.requests).entry((class.clone(), code)).or_default() += 1;
        if !long_running {
            lock(&self.latency).entry(class).or_default().observe(took.as_secs_f64());
        }
    }

    /// Counts a watch as open until the returned guard is dropped (when its stream ends).
    pub fn watch_opened(self: &Arc<Self>) -> WatchGuard {
        self.watches_total.fetch_add(1, Ordering::Relaxed);
        self.watches_open.fetch_add(1, Ordering::Relaxed);
        WatchGuard(self.clone())
    }

    fn observe_store(&self, op: &'static str, key: &str, took: Duration) {
        // `/registry/<resource>/…` → `<resource>`, as upstream's `type` label.
        let ty = key.strip_prefix("/registry/").and_then(|k| k.split('/').next()).unwrap_or("");
        lock(&self.store).entry((op, ty.to_string())).or_default().observe(took.as_secs_f64());
    }

    pub fn render(&self, store_revision: u64, uptime: Duration) -> String {
        let mut out = String::new();
        out.push_str("# HELP apiserver_request_total Counter of apiserver requests broken out for each verb, resource, subresource and HTTP response code.\n# TYPE apiserver_request_total counter\n");
        for (((verb, resource, sub), code), n) in lock(&self.requests).iter() {
            let _ = writeln!(
                out,
                "apiserver_request_total{{code=\"{code}\",resource=\"{resource}\",subresource=\"{sub}\",verb=\"{verb}\"}} {n}"
            );
        }
        out.push_str("# HELP apiserver_request_duration_seconds Response latency distribution in seconds for each verb, resource and subresource.\n# TYPE apiserver_request_duration_seconds histogram\n");
        for ((verb, resource, sub), h) in lock(&self.latency).iter() {
            let labels = format!("resource=\"{resource}\",subresource=\"{sub}\",verb=\"{verb}\"");
            h.render(&mut out, "apiserver_request_duration_seconds", &labels);
        }
        out.push_str("# HELP etcd_request_duration_seconds Store request latency in seconds for each operation and object type.\n# TYPE etcd_request_duration_seconds histogram\n");
        for ((op, ty), h) in lock(&self.store).iter() {
            h.render(
                &mut out,
                "etcd_request_duration_seconds",
                &format!("operation=\"{op}\",type=\"{ty}\""),
            );
        }
        let _ = write!(
            out,
            "# HELP apiserver_longrunning_requests Gauge of all active long-running apiserver requests.\n# TYPE apiserver_longrunning_requests gauge\napiserver_longrunning_requests{{verb=\"WATCH\"}} {}\n\
             # HELP apiserver_watch_total Watches opened since start.\n# TYPE apiserver_watch_total counter\napiserver_watch_total {}\n\
             # HELP rkube_store_revision Current store revision.\n# TYPE rkube_store_revision gauge\nrkube_store_revision {store_revision}\n\
             # HELP process_uptime_seconds Seconds since start.\n# TYPE process_uptime_seconds gauge\nprocess_uptime_seconds {}\n",
            self.watches_open.load(Ordering::Relaxed),
            self.watches_total.load(Ordering::Relaxed),
            uptime.as_secs(),
        );
        out
    }
}

pub struct WatchGuard(Arc<Metrics>);

impl Drop for WatchGuard {
    fn drop(&mut self) {
        self.0.watches_open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A [`Store`] that times every call of the store it wraps.
pub struct MeteredStore {
    pub inner: Arc<dyn Store>,
    pub metrics: Arc<Metrics>,
}

macro_rules! timed {
    ($self:ident, $op:literal, $key:expr, $call:expr) => {{
        let t0 = Instant::now();
        let out = $call.await;
        $self.metrics.observe_store($op, $key, t0.elapsed());
        out
    }};
}

#[async_trait::async_trait]
impl Store for MeteredStore {
    async fn get(&self, key: &str, at: ReadAt) -> rkube_store::Result<Option<KeyValue>> {
        timed!(self, "get", key, self.inner.get(key, at))
    }
    async fn list(&self, prefix: &str, opts: ListOptions) -> rkube_store::Result<ListPage> {
        timed!(self, "list", prefix, self.inner.list(prefix, opts))
    }
    async fn create(&self, key: &str, value: Bytes) -> rkube_store::Result<Revision> {
        timed!(self, "create", key, self.inner.create(key, value))
    }
    async fn update(
        &self,
        key: &str,
        value: Bytes,
        expected: Revision,
    ) -> rkube_store::Result<Revision> {
        timed!(self, "update", key, self.inner.update(key, value, expected))
    }
    async fn delete(
        &self,
        key: &str,
        expected: Option<Revision>,
    ) -> rkube_store::Result<(Revision, KeyValue)> {
        timed!(self, "delete", key, self.inner.delete(key, expected))
    }
    async fn watch(&self, prefix: &str, after: Revision) -> rkube_store::Result<WatchStream> {
        self.inner.watch(prefix, after).await
    }
    async fn compact(&self, up_to: Revision) -> rkube_store::Result<()> {
        self.inner.compact(up_to).await
    }
    async fn current_revision(&self) -> rkube_store::Result<Revision> {
        self.inner.current_revision().await
    }
    async fn compacted_revision(&self) -> rkube_store::Result<Revision> {
        self.inner.compacted_revision().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::Method;

    #[test]
    fn requests_are_classified_as_upstream_labels_them() {
        let c = |m: &Method, p: &str, q: &str| {
            let (v, r, s) = classify(m, p, q);
            format!("{v} {r} {s}").trim().to_string()
        };
        assert_eq!(c(&Method::GET, "/api/v1/namespaces/default/pods", ""), "LIST pods");
        assert_eq!(c(&Method::GET, "/api/v1/pods", "watch=true&rv=1"), "WATCH pods");
        assert_eq!(c(&Method::GET, "/api/v1/namespaces/d/pods/p", ""), "GET pods");
        assert_eq!(
            c(&Method::PATCH, "/api/v1/namespaces/d/pods/p/status", ""),
            "PATCH pods status"
        );
        assert_eq!(
            c(&Method::GET, "/api/v1/namespaces/d/pods/p/exec", "command=sh"),
            "CONNECT pods exec"
        );
        assert_eq!(
            c(&Method::DELETE, "/apis/apps/v1/namespaces/d/deployments", ""),
            "DELETECOLLECTION deployments"
        );
        assert_eq!(c(&Method::GET, "/api/v1/nodes/n1", ""), "GET nodes");
        assert_eq!(c(&Method::POST, "/api/v1/namespaces", ""), "POST namespaces");
        assert_eq!(c(&Method::GET, "/api/v1/namespaces/kube-system", ""), "GET namespaces");
        assert_eq!(c(&Method::GET, "/apis/apps/v1", ""), "GET");
        assert_eq!(c(&Method::GET, "/openapi/v3", ""), "GET");
    }

    #[test]
    fn histograms_render_cumulative_buckets() {
        let m = Metrics::default();
        m.observe_request(("GET", "pods".into(), String::new()), 200, Duration::from_millis(3));
        m.observe_request(("GET", "pods".into(), String::new()), 200, Duration::from_millis(30));
        let text = m.render(7, Duration::from_secs(1));
        assert!(text.contains("apiserver_request_total{code=\"200\",resource=\"pods\",subresource=\"\",verb=\"GET\"} 2"), "{text}");
        assert!(text.contains("apiserver_request_duration_seconds_bucket{resource=\"pods\",subresource=\"\",verb=\"GET\",le=\"0.005\"} 1"));
        assert!(text.contains("apiserver_request_duration_seconds_bucket{resource=\"pods\",subresource=\"\",verb=\"GET\",le=\"0.05\"} 2"));
        assert!(text.contains("apiserver_request_duration_seconds_count{resource=\"pods\",subresource=\"\",verb=\"GET\"} 2"));
    }
}
