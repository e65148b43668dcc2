//! The HTTPS front door: TLS with client-certificate and token authentication, then one
//! dispatcher that routes discovery, OpenAPI, health and every resource verb to the registry.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{Extension, Request, State};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures::StreamExt;
use http::{HeaderMap, HeaderValue, Method, StatusCode};
use http_body_util::BodyExt;
use rkube_api::resources::{self, ResourceInfo};
use rkube_store::{ReadAt, Revision, Store};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::certs::{self, Pki};
use crate::discovery;
use crate::openapi;
use crate::patch::{self, PatchType};
use crate::registry::{self, DeleteParams, ListParams, Registry, qualified};
use crate::selector::{FieldSelector, LabelSelector};
use crate::table::{self, Include};
use crate::{Error, Result};

/// Bodies above this are refused with 413, as upstream's 3 MiB limit.
const MAX_BODY: usize = 3 * 1024 * 1024;

/// The API server's settings; field names follow kube-apiserver's flags.
#[derive(Clone, Debug)]
pub struct Config {
    pub bind_address: IpAddr,
    pub secure_port: u16,
    pub data_dir: PathBuf,
    pub tls_sans: Vec<String>,
    pub token_auth_file: Option<PathBuf>,
    pub service_cluster_ip_range: String,
    pub service_node_port_range: (u16, u16),
    /// DefaultTolerationSeconds admission: how long pods tolerate a not-ready/unreachable node.
    pub default_toleration_seconds: i64,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            bind_address: IpAddr::from([127, 0, 0, 1]),
            secure_port: 6443,
            data_dir: PathBuf::from("rkube-data"),
            tls_sans: Vec::new(),
            token_auth_file: None,
            service_cluster_ip_range: "10.96.0.0/12".into(),
            service_node_port_range: (30000, 32767),
            default_toleration_seconds: 300,
        }
    }
}

#[derive(Clone, Debug)]
pub struct User {
    pub name: String,
    pub uid: String,
    pub groups: Vec<String>,
}

#[derive(Clone, Debug, Default)]
struct ConnInfo {
    cert_user: Option<User>,
}

pub(crate) struct Inner {
    config: Config,
    registry: Registry,
    pki: Pki,
    tokens: HashMap<String, User>,
    started: Instant,
    metrics: Arc<crate::metrics::Metrics>,
    shutdown: CancellationToken,
    server_address: std::sync::Mutex<String>,
}

/// The API server: state shared by every request.
#[derive(Clone)]
pub struct ApiServer {
    inner: Arc<Inner>,
}

fn parse_cidr(s: &str) -> Result<(u32, u8)> {
    let (ip, bits) =
        s.split_once('/').ok_or_else(|| Error::bad_request(format!("invalid CIDR {s}")))?;
    let ip: std::net::Ipv4Addr =
        ip.parse().map_err(|_| Error::bad_request(format!("invalid CIDR {s}")))?;
    let bits: u8 = bits.parse().map_err(|_| Error::bad_request(format!("invalid CIDR {s}")))?;
    if !(8..=30).contains(&bits) {
        return Err(Error::bad_request(format!("service CIDR {s} must be between /8 and /30")));
    }
    Ok((u32::from(ip), bits))
}

fn load_tokens(path: &std::path::Path) -> Result<HashMap<String, User>> {
    let text = std::fs::read_to_string(path)?;
    let mut out = HashMap::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        // token,user,uid,"group1,group2"
        let mut fields = Vec::new();
        let mut cur = String::new();
        let mut quoted = false;
        for ch in line.chars() {
            match ch {
                '"' => quoted = !quoted,
                ',' if !quoted => fields.push(std::mem::take(&mut cur)),
                c => cur.push(c),
            }
        }
        fields.push(cur);
        if fields.len() < 3 {
            return Err(Error::Pki(format!(
                "{}:{}: want token,user,uid[,\"groups\"]",
                path.display(),
                i + 1
            )));
        }
        let groups = fields
            .get(3)
            .map(|g| g.split(',').map(|s| s.trim().to_string()).filter(|s| !s.is_empty()).collect())
            .unwrap_or_default();
        out.insert(
            fields[0].clone(),
            User { name: fields[1].clone(), uid: fields[2].clone(), groups },
        );
    }
    Ok(out)
}

impl ApiServer {
    /// Prepares certificates and the bootstrap objects (namespaces, the `kubernetes` Service,
    /// system priority classes) on `store`.
    pub async fn new(config: Config, store: Arc<dyn Store>) -> Result<ApiServer> {
        let mut sans: Vec<String> = vec![
            "127.0.0.1".into(),
            "localhost".into(),
            "kubernetes".into(),
            "kubernetes.default".into(),
            "kubernetes.default.svc".into(),
            "kubernetes.default.svc.cluster.local".into(),
        ];
        if let Ok(h) = nix::unistd::gethostname()
            && let Some(h) = h.to_str().filter(|h| !h.is_empty())
        {
            sans.push(h.to_string());
        }
        let (svc_base, svc_bits) = parse_cidr(&config.service_cluster_ip_range)?;
        sans.push(std::net::Ipv4Addr::from(svc_base + 1).to_string());
        if !config.bind_address.is_unspecified() {
            sans.push(config.bind_address.to_string());
        }
        for s in &config.tls_sans {
            if !sans.contains(s) {
                sans.push(s.clone());
            }
        }
        let pki = certs::ensure(&config.data_dir.join("pki"), &sans)?;
        let tokens = match &config.token_auth_file {
            Some(p) => load_tokens(p)?,
            None => HashMap::new(),
        };
        let metrics = Arc::new(crate::metrics::Metrics::default());
        let store: Arc<dyn Store> =
            Arc::new(crate::metrics::MeteredStore { inner: store, metrics: metrics.clone() });
        let mut registry = Registry::new(store, config.default_toleration_seconds);
        registry.service_cidr = (svc_base, svc_bits);
        registry.node_port_range = config.service_node_port_range;
        let inner = Arc::new(Inner {
            server_address: std::sync::Mutex::new(format!("127.0.0.1:{}", config.secure_port)),
            config,
            registry,
            pki,
            tokens,
            started: Instant::now(),
            metrics,
            shutdown: CancellationToken::new(),
        });
        let server = ApiServer { inner };
        server.bootstrap().await?;
        Ok(server)
    }

    pub fn store(&self) -> Arc<dyn Store> {
        self.inner.registry.store.clone()
    }

    pub fn pki(&self) -> &Pki {
        &self.inner.pki
    }

    /// Writes `admin.kubeconfig` into the data dir pointing at `server_url`; returns its path.
    pub fn write_admin_kubeconfig(&self, server_url: &str) -> Result<PathBuf> {
        certs::write_admin_kubeconfig(&self.inner.pki, server_url)
    }

    async fn bootstrap(&self) -> Result<()> {
        let reg = &self.inner.registry;
        // ClusterIP/NodePort reservations made whole before anything is allocated: created for
        // Services written before they existed (or by a crash), removed where no Service holds
        // the address.
        let repair = reg.repair_service_allocations().await?;
        if repair.created + repair.released + repair.duplicates > 0 {
            tracing::info!(
                "service allocations repaired: {} Services, {} reservations, {} created, {} released, {} held twice",
                repair.services,
                repair.reservations,
                repair.created,
                repair.released,
                repair.duplicates
            );
        }
        let ns = res("", "namespaces")?;
        for name in ["default", "kube-system", "kube-public", "kube-node-lease"] {
            ensure(reg.create(ns, None, json!({"metadata": {"name": name}}), false).await)?;
        }
        let pcs = res("scheduling.k8s.io", "priorityclasses")?;
        for (name, value, desc) in [
            (
                "system-cluster-critical",
                2_000_000_000i64,
                "Used for system critical pods that must run in the cluster, but can be moved to another node if necessary.",
            ),
            (
                "system-node-critical",
                2_000_001_000,
                "Used for system critical pods that must not be moved from their current node.",
            ),
        ] {
            ensure(
                reg.create(
                    pcs,
                    None,
                    json!({"metadata": {"name": name}, "value": value, "description": desc}),
                    false,
                )
                .await,
            )?;
        }
        let svc = res("", "services")?;
        let port = self.inner.config.secure_port;
        ensure(
            reg.create(
                svc,
                Some("default"),
                json!({"metadata": {"name": "kubernetes", "labels": {"component": "apiserver", "provider": "kubernetes"}},
                       "spec": {"ports": [{"name": "https", "port": 443, "protocol": "TCP", "targetPort": port}], "sessionAffinity": "None", "type": "ClusterIP"}}),
                false,
            )
            .await,
        )?;
        let eps = res("", "endpoints")?;
        let ep = json!({"metadata": {"name": "kubernetes", "labels": {"endpointslice.kubernetes.io/skip-mirror": "true"}},
                        "subsets": [{"addresses": [{"ip": "127.0.0.1"}], "ports": [{"name": "https", "port": port, "protocol": "TCP"}]}]});
        match reg.create(eps, Some("default"), ep.clone(), false).await {
            Ok(_) => {}
            Err(Error::Status { reason: "AlreadyExists", .. }) => {
                reg.update(eps, Some("default"), "kubernetes", ep, None, false).await?;
            }
            Err(e) => return Err(e),
        }
        // The `default` ServiceAccount of each namespace comes from the controller manager's
        // serviceaccount controller, as upstream, for these namespaces and every later one.
        Ok(())
    }

    /// The router, for in-process use (tests); identity comes from the `Authorization` header only.
    pub fn router(&self) -> axum::Router {
        axum::Router::new().fallback(dispatch).with_state(self.inner.clone())
    }

    /// Serves HTTPS on `listener` until `shutdown` is cancelled.
    pub async fn serve(self, listener: TcpListener, shutdown: CancellationToken) -> Result<()> {
        let local = listener.local_addr()?;
        {
            let host = if local.ip().is_unspecified() {
                "127.0.0.1".to_string()
            } else {
                local.ip().to_string()
            };
            *self.inner.server_address.lock().unwrap_or_else(|e| e.into_inner()) =
                format!("{host}:{}", local.port());
        }
        crate::heap::spawn_trimmer(shutdown.clone());
        let tls = crate::tls::server_config(&self.inner.pki)?;
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
        let router = self.router();
        let inner = self.inner.clone();
        let conns = tokio_util::task::TaskTracker::new();
        loop {
            let accepted = tokio::select! {
                _ = shutdown.cancelled() => break,
                a = listener.accept() => a,
            };
            let (tcp, peer) = match accepted {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let _ = tcp.set_nodelay(true);
            let acceptor = acceptor.clone();
            let router = router.clone();
            let stop = shutdown.clone();
            conns.spawn(async move {
                let Ok(Ok(stream)) =
                    tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await
                else {
                    return;
                };
                let conn = ConnInfo { cert_user: crate::tls::peer_user(stream.get_ref().1) };
                serve_conn(stream, router, conn, peer, stop).await;
            });
        }
        inner.shutdown.cancel();
        conns.close();
        let _ = tokio::time::timeout(Duration::from_secs(5), conns.wait()).await;
        Ok(())
    }
}

async fn serve_conn<S>(
    stream: S,
    router: axum::Router,
    conn: ConnInfo,
    _peer: SocketAddr,
    stop: CancellationToken,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    use hyper_util::rt::{TokioExecutor, TokioIo};
    let svc =
        tower::ServiceExt::map_request(router, move |mut req: Request<hyper::body::Incoming>| {
            req.extensions_mut().insert(conn.clone());
            req.map(Body::new)
        });
    let svc = hyper_util::service::TowerToHyperService::new(svc);
    let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    let fut = builder.serve_connection_with_upgrades(TokioIo::new(stream), svc);
    tokio::pin!(fut);
    tokio::select! {
        _ = &mut fut => {}
        _ = stop.cancelled() => {
            fut.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(Duration::from_secs(2), fut).await;
        }
    }
}

fn ensure<T>(r: Result<T>) -> Result<()> {
    match r {
        Ok(_) | Err(Error::Status { reason: "AlreadyExists", .. }) => Ok(()),
        Err(e) => Err(e),
    }
}

fn res(group: &str, plural: &str) -> Result<&'static ResourceInfo> {
    resources::RESOURCES
        .iter()
        .find(|r| r.group == group && r.plural == plural)
        .ok_or_else(|| Error::internal(format!("resource {plural} is not served")))
}

fn json_response(code: StatusCode, v: &Value) -> Response {
    let body = serde_json::to_vec(v).unwrap_or_default();
    let mut r = Response::new(Body::from(body));
    *r.status_mut() = code;
    r.headers_mut()
        .insert(http::header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

/// A response whose body is JSON already serialized.
fn raw_json_response(code: StatusCode, body: Vec<u8>) -> Response {
    let mut r = Response::new(Body::from(body));
    *r.status_mut() = code;
    r.headers_mut()
        .insert(http::header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

fn text_response(code: StatusCode, text: String) -> Response {
    let mut r = Response::new(Body::from(text));
    *r.status_mut() = code;
    r.headers_mut()
        .insert(http::header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    r
}

/// Decodes `a=b&c=d` with percent-escapes and `+` as space.
fn parse_query(q: Option<&str>) -> HashMap<String, String> {
    let mut out = HashMap::new();
    for pair in q.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        out.insert(unescape(k), unescape(v));
    }
    out
}

fn unescape(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                match u8::from_str_radix(
                    std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("zz"),
                    16,
                ) {
                    Ok(b) => {
                        out.push(b);
                        i += 2;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Query booleans as Go's strconv.ParseBool reads them (clients send "true", "True", "1").
fn parse_bool(s: &str) -> bool {
    matches!(s, "1" | "t" | "T" | "true" | "TRUE" | "True")
}

fn version_info() -> Value {
    json!({
        "major": "1", "minor": "33", "gitVersion": "v1.33.0-rkube",
        "gitCommit": env!("CARGO_PKG_VERSION"), "gitTreeState": "clean",
        "buildDate": "2026-01-01T00:00:00Z", "goVersion": "rust", "compiler": "rustc",
        "platform": format!("{}/{}", std::env::consts::OS, match std::env::consts::ARCH { "x86_64" => "amd64", "aarch64" => "arm64", a => a }),
    })
}

fn authenticate(st: &Inner, conn: Option<&ConnInfo>, headers: &HeaderMap) -> Option<User> {
    if let Some(auth) = headers.get(http::header::AUTHORIZATION).and_then(|v| v.to_str().ok()) {
        if let Some(token) = auth.strip_prefix("Bearer ").map(str::trim) {
            return st.tokens.get(token).cloned();
        }
        return None;
    }
    conn.and_then(|c| c.cert_user.clone())
}

async fn dispatch(
    State(st): State<Arc<Inner>>,
    conn: Option<Extension<ConnInfo>>,
    req: Request,
) -> Response {
    let started = Instant::now();
    let class =
        crate::metrics::classify(req.method(), req.uri().path(), req.uri().query().unwrap_or(""));
    let metrics = st.metrics.clone();
    let resp = dispatch_inner(st, conn, req).await;
    metrics.observe_request(class, resp.status().as_u16(), started.elapsed());
    resp
}

async fn dispatch_inner(
    st: Arc<Inner>,
    conn: Option<Extension<ConnInfo>>,
    req: Request,
) -> Response {
    let path = req.uri().path().to_string();
    match path.as_str() {
        "/version" | "/version/" => return json_response(StatusCode::OK, &version_info()),
        "/healthz" | "/livez" | "/readyz" => return health(&st, &path, req.uri().query()).await,
        _ => {}
    }
    if path.starts_with("/healthz/") || path.starts_with("/livez/") || path.starts_with("/readyz/")
    {
        return health(&st, &path, req.uri().query()).await;
    }
    let Some(user) = authenticate(&st, conn.as_ref().map(|c| &c.0), req.headers()) else {
        return Error::unauthorized().into_response();
    };
    let writer = crate::registry::Writer {
        manager: field_manager(&req),
        apply: req.method() == Method::PATCH
            && req
                .headers()
                .get(http::header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .is_some_and(|ct| ct.starts_with("application/apply-patch")),
    };
    match crate::registry::WRITER.scope(writer, handle(st, user, req)).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

/// The field manager of a write: `?fieldManager=`, else the client's User-Agent up to its first
/// `/` (`kubectl/v1.32.0 (linux/amd64)` → `kubectl`), as upstream.
fn field_manager(req: &Request) -> String {
    let q = parse_query(req.uri().query());
    if let Some(m) = q.get("fieldManager").filter(|m| !m.is_empty()) {
        return m.clone();
    }
    req.headers()
        .get(http::header::USER_AGENT)
        .and_then(|v| v.to_str().ok())
        .and_then(|ua| ua.split('/').next())
        .filter(|m| !m.is_empty())
        .unwrap_or("unknown")
        .chars()
        .take(128)
        .collect()
}

async fn health(st: &Inner, path: &str, query: Option<&str>) -> Response {
    let store_ok = st.registry.store.current_revision().await.is_ok();
    let verbose = parse_query(query).contains_key("verbose");
    let checks = [
        ("ping", true),
        ("log", true),
        ("etcd", store_ok),
        ("poststarthook/start-apiserver-admission-initializer", true),
        ("poststarthook/bootstrap-controller", true),
    ];
    let ok = checks.iter().all(|(_, ok)| *ok);
    let code = if ok { StatusCode::OK } else { StatusCode::INTERNAL_SERVER_ERROR };
    if verbose {
        let mut s = String::new();
        for (n, ok) in checks {
            s.push_str(&format!(
                "[{}]{n} {}\n",
                if ok { "+" } else { "-" },
                if ok { "ok" } else { "failed" }
            ));
        }
        let which = path.trim_start_matches('/').split('/').next().unwrap_or("healthz");
        s.push_str(&format!("{which} check {}\n", if ok { "passed" } else { "failed" }));
        return text_response(code, s);
    }
    text_response(code, if ok { "ok".into() } else { "etcd check failed".into() })
}

/// Parsed resource path: `/api/v1/namespaces/ns/pods/name/sub`.
struct Target {
    r: &'static ResourceInfo,
    ns: Option<String>,
    name: Option<String>,
    sub: Option<String>,
}

fn parse_target(path: &str) -> Result<Option<Target>> {
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (group, version, rest) = match segs.as_slice() {
        ["api", v, rest @ ..] => ("", *v, rest),
        ["apis", g, v, rest @ ..] => (*g, *v, rest),
        _ => return Ok(None),
    };
    if rest.is_empty() {
        return Ok(None);
    }
    let lookup = |plural: &str| {
        resources::find(group, version, plural).ok_or_else(|| Error::Status {
            code: 404,
            reason: "NotFound",
            message: "the server could not find the requested resource".into(),
            details: None,
        })
    };
    if rest[0] == "namespaces" && rest.len() >= 3 {
        let r = lookup(rest[2])?;
        if !r.namespaced {
            return Err(Error::Status {
                code: 404,
                reason: "NotFound",
                message: "the server could not find the requested resource".into(),
                details: None,
            });
        }
        return Ok(Some(Target {
            r,
            ns: Some(rest[1].to_string()),
            name: rest.get(3).map(|s| s.to_string()),
            sub: rest.get(4).map(|s| s.to_string()),
        }));
    }
    let r = lookup(rest[0])?;
    if rest.len() > 3 {
        return Err(Error::Status {
            code: 404,
            reason: "NotFound",
            message: "the server could not find the requested resource".into(),
            details: None,
        });
    }
    Ok(Some(Target {
        r,
        ns: None,
        name: rest.get(1).map(|s| s.to_string()),
        sub: rest.get(2).map(|s| s.to_string()),
    }))
}

async fn read_body(body: Body) -> Result<Bytes> {
    let limited = http_body_util::Limited::new(body, MAX_BODY);
    match limited.collect().await {
        Ok(c) => Ok(c.to_bytes()),
        Err(e) if e.downcast_ref::<http_body_util::LengthLimitError>().is_some() => {
            Err(Error::status(
                413,
                "RequestEntityTooLarge",
                "the request body is too large (limit 3 MiB)",
            ))
        }
        Err(e) => Err(Error::bad_request(format!("reading the request body: {e}"))),
    }
}

fn decode_body(ct: &str, body: &[u8]) -> Result<Value> {
    if ct.contains("cbor") {
        return Err(Error::status(
            415,
            "UnsupportedMediaType",
            format!(
                "the body of the request was in an unknown format - accepted media types include: application/json, application/yaml, application/vnd.kubernetes.protobuf (not {ct})"
            ),
        ));
    }
    if ct.contains("protobuf") {
        return crate::protobuf::decode_object(body, 0).map_err(|e| {
            Error::bad_request(format!(
                "the protobuf body of the request could not be decoded: {e}"
            ))
        });
    }
    if body.is_empty() {
        return Err(Error::bad_request("the request body is empty"));
    }
    let v: Value = if ct.contains("yaml") {
        serde_yaml::from_slice(body)
            .map_err(|e| Error::bad_request(format!("error decoding YAML: {e}")))?
    } else {
        serde_json::from_slice(body).map_err(|e| {
            Error::bad_request(format!(
                "the object provided is unrecognized or malformed JSON: {e}"
            ))
        })?
    };
    if !v.is_object() {
        return Err(Error::bad_request("the body of the request must be a JSON object"));
    }
    Ok(v)
}

/// Rejects a body whose apiVersion/kind names another resource than the URL.
fn check_type(r: &ResourceInfo, v: &Value, sub: Option<&str>) -> Result<()> {
    if sub.is_some_and(|s| s != "status") {
        return Ok(());
    }
    if let Some(av) = v["apiVersion"].as_str().filter(|s| !s.is_empty())
        && av != r.api_version()
    {
        return Err(Error::bad_request(format!(
            "the API version in the data ({av}) does not match the expected API version ({})",
            r.api_version()
        )));
    }
    if let Some(k) = v["kind"].as_str().filter(|s| !s.is_empty())
        && k != r.kind
    {
        return Err(Error::bad_request(format!(
            "the kind in the data ({k}) does not match the expected kind ({})",
            r.kind
        )));
    }
    Ok(())
}

fn wants_table(headers: &HeaderMap) -> bool {
    headers
        .get(http::header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.split(',').next().unwrap_or("").contains("as=Table"))
}

fn strict_unknown_fields(q: &HashMap<String, String>) -> bool {
    q.get("fieldValidation").map(String::as_str) == Some("Strict")
}

async fn handle(st: Arc<Inner>, user: User, req: Request) -> Result<Response> {
    // exec/attach/portforward need the whole request (the upgrade), so they go first.
    {
        let segs: Vec<&str> = req.uri().path().trim_matches('/').split('/').collect();
        if let [
            "api",
            "v1",
            "namespaces",
            ns,
            "pods",
            name,
            sub @ ("exec" | "attach" | "portforward"),
        ] = segs.as_slice()
        {
            let (ns, name, sub) = (ns.to_string(), name.to_string(), sub.to_string());
            let raw = req.uri().query().unwrap_or("").to_string();
            if sub == "portforward" {
                return crate::proxy::portforward(&st.registry, &ns, &name, req, &raw).await;
            }
            let q = parse_query(Some(&raw));
            return crate::proxy::exec(&st.registry, &ns, &name, &sub, req, &raw, &q).await;
        }
    }
    let (parts, body) = req.into_parts();
    let path = parts.uri.path().to_string();
    let q = parse_query(parts.uri.query());
    let accept = parts
        .headers
        .get(http::header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let server_address = st.server_address.lock().unwrap_or_else(|e| e.into_inner()).clone();
    // Discovery and OpenAPI.
    match path.trim_end_matches('/') {
        "/api" => {
            if let Some(v) = discovery::wants_aggregated(&accept) {
                return Ok(aggregated_response(discovery::aggregated(true, v), v));
            }
            return Ok(json_response(StatusCode::OK, &discovery::api_versions(&server_address)));
        }
        "/apis" => {
            if let Some(v) = discovery::wants_aggregated(&accept) {
                return Ok(aggregated_response(discovery::aggregated(false, v), v));
            }
            return Ok(json_response(StatusCode::OK, &discovery::api_group_list()));
        }
        "/openapi/v3" => return Ok(json_response(StatusCode::OK, &openapi::v3_root())),
        "/openapi/v2" => {
            // JSON, or gnostic's protobuf (what client-go asks for), each built once.
            type Doc = (Bytes, String);
            static V2: std::sync::OnceLock<(Doc, Doc)> = std::sync::OnceLock::new();
            let (json, proto) = V2.get_or_init(|| {
                let doc = openapi::v2_doc();
                let json = Bytes::from(serde_json::to_vec(&doc).unwrap_or_default());
                let proto = Bytes::from(openapi::v2_proto::encode(&doc));
                let etag = |b: &Bytes| format!("\"{}\"", openapi::hash_bytes(b));
                ((json.clone(), etag(&json)), (proto.clone(), etag(&proto)))
            });
            let accept = parts.headers.get(http::header::ACCEPT).and_then(|v| v.to_str().ok());
            let wants_proto = accept.is_some_and(|a| a.contains("protobuf"));
            let ((body, etag), content_type) = if wants_proto {
                (proto, "application/com.github.proto-openapi.spec.v2.v1.0+protobuf")
            } else {
                (json, "application/json")
            };
            if parts.headers.get(http::header::IF_NONE_MATCH).and_then(|v| v.to_str().ok())
                == Some(etag.as_str())
            {
                let mut r = Response::new(Body::empty());
                *r.status_mut() = StatusCode::NOT_MODIFIED;
                return Ok(r);
            }
            let mut r = Response::new(Body::from(body.clone()));
            let h = r.headers_mut();
            h.insert(http::header::CONTENT_TYPE, HeaderValue::from_static(content_type));
            h.insert(http::header::CACHE_CONTROL, HeaderValue::from_static("no-cache, private"));
            if let Ok(v) = HeaderValue::from_str(etag) {
                h.insert(http::header::ETAG, v);
            }
            return Ok(r);
        }
        "/metrics" => return Ok(metrics(&st).await),
        "/apis/authentication.k8s.io/v1/selfsubjectreviews" if parts.method == Method::POST => {
            let extra: Value = json!({});
            return Ok(json_response(
                StatusCode::CREATED,
                &json!({
                    "kind": "SelfSubjectReview", "apiVersion": "authentication.k8s.io/v1",
                    "metadata": {"creationTimestamp": null},
                    "status": {"userInfo": {"username": user.name, "uid": user.uid, "groups": user.groups, "extra": extra}},
                }),
            ));
        }
        _ => {}
    }
    if let Some(rest) = path.strip_prefix("/openapi/v3/") {
        let segs: Vec<&str> = rest.trim_matches('/').split('/').collect();
        let doc = match segs.as_slice() {
            ["api", v] => openapi::group_version_doc("", v),
            ["apis", g, v] => openapi::group_version_doc(g, v),
            _ => None,
        };
        return match doc {
            Some(d) => {
                let mut r = json_response(StatusCode::OK, &d);
                r.headers_mut().insert(
                    "etag",
                    HeaderValue::from_str(&format!("\"{}\"", openapi::hash(&d)))
                        .unwrap_or(HeaderValue::from_static("\"0\"")),
                );
                if q.contains_key("hash") {
                    r.headers_mut().insert(
                        http::header::CACHE_CONTROL,
                        HeaderValue::from_static("public, immutable"),
                    );
                }
                Ok(r)
            }
            None => Err(Error::Status {
                code: 404,
                reason: "NotFound",
                message: "the server could not find the requested resource".into(),
                details: None,
            }),
        };
    }
    {
        let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
        match segs.as_slice() {
            ["api", v] => {
                return discovery::resource_list("", v)
                    .map(|d| json_response(StatusCode::OK, &d))
                    .ok_or_else(|| {
                        Error::status(
                            404,
                            "NotFound",
                            "the server could not find the requested resource",
                        )
                    });
            }
            ["apis", g] => {
                return resources::groups()
                    .into_iter()
                    .find(|(name, _)| name == g)
                    .map(|(name, vs)| {
                        json_response(StatusCode::OK, &discovery::group_json(name, &vs))
                    })
                    .ok_or_else(|| {
                        Error::status(
                            404,
                            "NotFound",
                            "the server could not find the requested resource",
                        )
                    });
            }
            ["apis", g, v] => {
                return discovery::resource_list(g, v)
                    .map(|d| json_response(StatusCode::OK, &d))
                    .ok_or_else(|| {
                        Error::status(
                            404,
                            "NotFound",
                            "the server could not find the requested resource",
                        )
                    });
            }
            _ => {}
        }
    }
    let Some(t) = parse_target(&path)? else {
        return Err(Error::status(
            404,
            "NotFound",
            "the server could not find the requested resource",
        ));
    };
    let ct = parts
        .headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("application/json")
        .to_string();
    let dry_run = q.get("dryRun").is_some_and(|d| d == "All");
    let table = wants_table(&parts.headers);
    let reg = &st.registry;
    let r = t.r;
    let ns = t.ns.as_deref();
    if let (true, Some(n)) = (r.plural == "namespaces" && t.sub.is_none(), t.name.as_deref()) {
        let _ = n;
    }
    let verb_ok = |verb: &str| -> Result<()> {
        if r.verbs.contains(&verb) {
            Ok(())
        } else {
            Err(Error::method_not_supported(
                "the server does not allow this method on the requested resource".to_string(),
            ))
        }
    };
    if r.plural == "componentstatuses" {
        return component_statuses(&st, &t, table, &q).await;
    }
    match (&parts.method, t.name.as_deref(), t.sub.as_deref()) {
        (&Method::GET, None, None) => {
            let lp = list_params(&q, r)?;
            let watch = q.get("watch").is_some_and(|w| parse_bool(w));
            if watch {
                verb_ok("watch")?;
                return watch_response(st.clone(), r, t.ns.clone(), lp, &q, table).await;
            }
            verb_ok("list")?;
            if !table {
                // No Table: the stored JSON goes out as it is (selectors read only their fields).
                let (items, meta) = reg.list_raw(r, ns, &lp).await?;
                let head = json!({"kind": format!("{}List", r.kind), "apiVersion": r.api_version(), "metadata": meta});
                let mut body = serde_json::to_vec(&head).unwrap_or_default();
                body.pop(); // the closing brace
                body.extend_from_slice(b",\"items\":[");
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        body.push(b',');
                    }
                    body.extend_from_slice(item);
                }
                body.extend_from_slice(b"]}");
                let mut resp = Response::new(Body::from(body));
                resp.headers_mut().insert(
                    http::header::CONTENT_TYPE,
                    HeaderValue::from_static("application/json"),
                );
                return Ok(resp);
            }
            let (items, meta) = reg.list(r, ns, &lp).await?;
            if table {
                let include = Include::parse(q.get("includeObject").map(String::as_str));
                return Ok(json_response(
                    StatusCode::OK,
                    &table::table(r.plural, r.group, &items, meta, include, true),
                ));
            }
            Ok(json_response(
                StatusCode::OK,
                &json!({
                    "kind": format!("{}List", r.kind), "apiVersion": r.api_version(), "metadata": meta, "items": items,
                }),
            ))
        }
        (&Method::GET, Some(name), None) => {
            verb_ok("get")?;
            if !table {
                // The stored JSON goes out with its resourceVersion spliced in (no decode).
                return Ok(raw_json_response(StatusCode::OK, reg.get_json(r, ns, name).await?));
            }
            let obj = reg.get(r, ns, name).await?;
            Ok(object_response(StatusCode::OK, r, obj, table, &q))
        }
        (&Method::GET, Some(name), Some("status")) if r.subresources.contains(&"status") => {
            if !table {
                return Ok(raw_json_response(StatusCode::OK, reg.get_json(r, ns, name).await?));
            }
            let obj = reg.get(r, ns, name).await?;
            Ok(object_response(StatusCode::OK, r, obj, table, &q))
        }
        (&Method::GET, Some(name), Some("scale")) if r.subresources.contains(&"scale") => {
            let obj = reg.get(r, ns, name).await?;
            Ok(json_response(StatusCode::OK, &scale_of(&obj)))
        }
        (&Method::POST, None, None) => {
            verb_ok("create")?;
            let body = read_body(body).await?;
            let mut obj = decode_body(&ct, &body)?;
            check_type(r, &obj, None)?;
            let warnings = unknown_field_check(r, &mut obj, &q)?;
            let created = reg.create(r, ns, obj, dry_run).await?;
            let mut resp = object_response(StatusCode::CREATED, r, created, false, &q);
            add_warnings(&mut resp, &warnings);
            Ok(resp)
        }
        (&Method::POST, Some(name), Some("binding")) if r.plural == "pods" => {
            let body = read_body(body).await?;
            let b = decode_body(&ct, &body)?;
            bind_pod(reg, r, ns, name, &b, dry_run).await?;
            Ok(json_response(
                StatusCode::CREATED,
                &json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "code": 201}),
            ))
        }
        (&Method::POST, Some(name), Some("eviction")) if r.plural == "pods" => {
            let body = read_body(body).await?;
            let ev = if body.is_empty() { json!({}) } else { decode_body(&ct, &body)? };
            let grace = ev["deleteOptions"]["gracePeriodSeconds"].as_i64();
            reg.delete(
                r,
                ns,
                name,
                &DeleteParams {
                    grace_period: grace,
                    propagation: "Background".into(),
                    precondition_uid: None,
                    precondition_rv: None,
                    dry_run,
                },
            )
            .await?;
            Ok(json_response(
                StatusCode::CREATED,
                &json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "code": 201}),
            ))
        }
        (&Method::PUT, Some(name), sub) => {
            verb_ok("update")?;
            let sub = check_sub(r, sub)?;
            let body = read_body(body).await?;
            let mut obj = decode_body(&ct, &body)?;
            if sub == Some("scale") {
                let replicas = obj["spec"]["replicas"]
                    .as_i64()
                    .ok_or_else(|| Error::bad_request("spec.replicas is required"))?;
                let want_rv = obj["metadata"]["resourceVersion"].as_str().map(String::from);
                let updated = reg
                    .guaranteed_update(
                        r,
                        ns,
                        name,
                        dry_run,
                        |old| {
                            if let Some(rv) = &want_rv
                                && old["metadata"]["resourceVersion"].as_str() != Some(rv)
                            {
                                return Err(Error::conflict(&qualified(r), name));
                            }
                            let mut n = old.clone();
                            n["spec"]["replicas"] = json!(replicas);
                            Ok(n)
                        },
                        None,
                    )
                    .await?;
                return Ok(json_response(StatusCode::OK, &scale_of(&updated)));
            }
            check_type(r, &obj, sub)?;
            let warnings = unknown_field_check(r, &mut obj, &q)?;
            let updated = reg.update(r, ns, name, obj, sub, dry_run).await?;
            let mut resp = object_response(StatusCode::OK, r, updated, false, &q);
            add_warnings(&mut resp, &warnings);
            Ok(resp)
        }
        (&Method::PATCH, Some(name), sub) => {
            verb_ok("patch")?;
            let sub = check_sub(r, sub)?;
            let pt = PatchType::from_content_type(&ct).ok_or_else(|| Error::status(415, "UnsupportedMediaType", "the body of the request was in an unknown format - accepted media types include: application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml, application/strategic-merge-patch+json".to_string()))?;
            let body = read_body(body).await?;
            if body.is_empty() {
                return Err(Error::bad_request("the request body is empty"));
            }
            if pt == PatchType::Apply {
                return apply_patch(reg, r, ns, name, sub, &body, &q, dry_run).await;
            }
            let mut warnings = Vec::new();
            let updated = if sub == Some("scale") {
                reg.guaranteed_update(
                    r,
                    ns,
                    name,
                    dry_run,
                    |old| {
                        let scale = patch::apply_patch(&scale_of(old), pt, &body)?;
                        let mut n = old.clone();
                        n["spec"]["replicas"] = scale["spec"]["replicas"].clone();
                        Ok(n)
                    },
                    None,
                )
                .await?
            } else {
                reg.guaranteed_update(
                    r,
                    ns,
                    name,
                    dry_run,
                    |old| {
                        let mut patched = patch::apply_patch(old, pt, &body)?;
                        if !patched.is_object() {
                            return Err(Error::bad_request(
                                "the patch produced something that is not an object",
                            ));
                        }
                        // As upstream, the patched object is decoded under fieldValidation.
                        warnings = unknown_field_check(r, &mut patched, &q)?;
                        if patched["metadata"]["resourceVersion"]
                            != old["metadata"]["resourceVersion"]
                            && !patched["metadata"]["resourceVersion"].is_null()
                        {
                            return Err(Error::conflict(&qualified(r), name));
                        }
                        Ok(patched)
                    },
                    sub,
                )
                .await?
            };
            if sub == Some("scale") {
                return Ok(json_response(StatusCode::OK, &scale_of(&updated)));
            }
            let mut resp = object_response(StatusCode::OK, r, updated, false, &q);
            add_warnings(&mut resp, &warnings);
            Ok(resp)
        }
        (&Method::DELETE, Some(name), None) => {
            verb_ok("delete")?;
            let body = read_body(body).await?;
            let opts: Value = if body.is_empty() { json!({}) } else { decode_body(&ct, &body)? };
            let dp = delete_params(&q, &opts, dry_run);
            let (obj, gone) = reg.delete(r, ns, name, &dp).await?;
            if gone && !dry_run {
                after_delete(st.clone(), r, &obj, &dp.propagation);
            } else if r.plural == "namespaces" && !dry_run {
                spawn_namespace_cleanup(st.clone(), name.to_string());
            } else if !dry_run && waits_for_dependents(&obj) {
                // Also on a repeated DELETE, so an owner left waiting (say, by a restart of the
                // API server) can be finished by deleting it again.
                spawn_foreground_deletion(st.clone(), r, &obj);
            }
            Ok(object_response(StatusCode::OK, r, obj, false, &q))
        }
        (&Method::DELETE, None, None) => {
            verb_ok("deletecollection")?;
            let lp = list_params(&q, r)?;
            let body = read_body(body).await?;
            let opts: Value = if body.is_empty() { json!({}) } else { decode_body(&ct, &body)? };
            let dp = delete_params(&q, &opts, dry_run);
            let (items, meta) =
                reg.list(r, ns, &ListParams { limit: None, continue_token: None, ..lp }).await?;
            let mut out = Vec::new();
            for item in items {
                let name = item["metadata"]["name"].as_str().unwrap_or("").to_string();
                let ins = item["metadata"]["namespace"].as_str().map(String::from);
                match reg.delete(r, ins.as_deref(), &name, &dp).await {
                    Ok((obj, gone)) => {
                        if gone && !dry_run {
                            after_delete(st.clone(), r, &obj, &dp.propagation);
                        } else if !dry_run && waits_for_dependents(&obj) {
                            spawn_foreground_deletion(st.clone(), r, &obj);
                        }
                        out.push(obj);
                    }
                    Err(Error::Status { code: 404, .. }) => {}
                    Err(e) => return Err(e),
                }
            }
            Ok(json_response(
                StatusCode::OK,
                &json!({"kind": format!("{}List", r.kind), "apiVersion": r.api_version(), "metadata": meta, "items": out}),
            ))
        }
        (&Method::GET, Some(name), Some("log")) if r.plural == "pods" => {
            let raw = parts.uri.query().unwrap_or("");
            crate::proxy::logs(reg, ns.unwrap_or("default"), name, &q, raw).await
        }
        (_, Some(_), Some(sub)) if sub == "proxy" => Ok(crate::proxy::unsupported(sub)),
        _ => Err(Error::method_not_supported(
            "the server does not allow this method on the requested resource",
        )),
    }
}

fn check_sub<'a>(r: &ResourceInfo, sub: Option<&'a str>) -> Result<Option<&'a str>> {
    match sub {
        None => Ok(None),
        Some(s) if (s == "status" || s == "scale") && r.subresources.contains(&s) => Ok(Some(s)),
        Some(s) => Err(Error::status(
            404,
            "NotFound",
            format!("the server could not find the requested resource ({s})"),
        )),
    }
}

fn aggregated_response(doc: Value, version: &str) -> Response {
    let mut r = json_response(StatusCode::OK, &doc);
    let ct = format!("application/json;g=apidiscovery.k8s.io;v={version};as=APIGroupDiscoveryList");
    if let Ok(v) = HeaderValue::from_str(&ct) {
        r.headers_mut().insert(http::header::CONTENT_TYPE, v);
    }
    r.headers_mut().insert("vary", HeaderValue::from_static("Accept"));
    r
}

fn object_response(
    code: StatusCode,
    r: &ResourceInfo,
    obj: Value,
    table: bool,
    q: &HashMap<String, String>,
) -> Response {
    if table {
        let include = Include::parse(q.get("includeObject").map(String::as_str));
        let rv = obj["metadata"]["resourceVersion"].clone();
        return json_response(
            code,
            &table::table(r.plural, r.group, &[obj], json!({"resourceVersion": rv}), include, true),
        );
    }
    json_response(code, &obj)
}

fn add_warnings(resp: &mut Response, warnings: &[String]) {
    for w in warnings {
        // RFC 7234 warn-text is a quoted string: quotes and backslashes are escaped.
        let text = w.replace('\\', "\\\\").replace('"', "\\\"");
        if let Ok(v) = HeaderValue::from_str(&format!("299 - \"{text}\"")) {
            resp.headers_mut().append("warning", v);
        }
    }
}

/// fieldValidation: fields the resource's OpenAPI schema does not know are unknown
/// (Strict: 400 with every path; Warn, the default: `Warning` headers; Ignore: nothing).
/// Unless refused, they are dropped from `obj`, as upstream's decoding drops them.
fn unknown_field_check(
    r: &ResourceInfo,
    obj: &mut Value,
    q: &HashMap<String, String>,
) -> Result<Vec<String>> {
    let unknown: Vec<String> = crate::openapi::prune_unknown_fields(r, obj)
        .into_iter()
        .map(|f| format!("unknown field \"{f}\""))
        .collect();
    if unknown.is_empty() || q.get("fieldValidation").map(String::as_str) == Some("Ignore") {
        return Ok(Vec::new());
    }
    if strict_unknown_fields(q) {
        return Err(Error::bad_request(format!(
            "{kind} in version \"{v}\" cannot be handled as a {kind}: strict decoding error: {}",
            unknown.join(", "),
            kind = r.kind,
            v = r.version
        )));
    }
    Ok(unknown)
}

fn list_params(q: &HashMap<String, String>, r: &ResourceInfo) -> Result<ListParams> {
    let labels = LabelSelector::parse(q.get("labelSelector").map(String::as_str).unwrap_or(""))?;
    let fields = FieldSelector::parse(q.get("fieldSelector").map(String::as_str).unwrap_or(""))?;
    fields.check(&r.kind.to_lowercase(), r.group, r.plural)?;
    let limit = match q.get("limit").filter(|l| !l.is_empty()) {
        Some(l) => {
            Some(l.parse::<u32>().map_err(|_| Error::bad_request(format!("invalid limit {l}")))?)
        }
        None => None,
    };
    Ok(ListParams {
        labels,
        fields,
        limit: limit.filter(|l| *l > 0),
        continue_token: q.get("continue").filter(|c| !c.is_empty()).cloned(),
        resource_version: q.get("resourceVersion").cloned(),
    })
}

fn delete_params(q: &HashMap<String, String>, opts: &Value, dry_run: bool) -> DeleteParams {
    let grace = q
        .get("gracePeriodSeconds")
        .and_then(|g| g.parse::<i64>().ok())
        .or(opts["gracePeriodSeconds"].as_i64());
    let propagation = q
        .get("propagationPolicy")
        .cloned()
        .or(opts["propagationPolicy"].as_str().map(String::from))
        .or(match opts["orphanDependents"].as_bool() {
            Some(true) => Some("Orphan".into()),
            _ => None,
        })
        .unwrap_or_else(|| "Background".into());
    DeleteParams {
        grace_period: grace,
        propagation,
        precondition_uid: opts["preconditions"]["uid"].as_str().map(String::from),
        precondition_rv: opts["preconditions"]["resourceVersion"].as_str().map(String::from),
        dry_run: dry_run || opts["dryRun"].as_array().is_some_and(|d| d.iter().any(|x| x == "All")),
    }
}

fn scale_of(obj: &Value) -> Value {
    let sel = crate::table::selector_text(&obj["spec"]["selector"]);
    json!({
        "kind": "Scale", "apiVersion": "autoscaling/v1",
        "metadata": {
            "name": obj["metadata"]["name"], "namespace": obj["metadata"]["namespace"],
            "uid": obj["metadata"]["uid"], "resourceVersion": obj["metadata"]["resourceVersion"],
            "creationTimestamp": obj["metadata"]["creationTimestamp"],
        },
        "spec": {"replicas": obj["spec"]["replicas"].as_i64().unwrap_or(0)},
        "status": {"replicas": obj["status"]["replicas"].as_i64().unwrap_or(0), "selector": if sel == "<none>" { String::new() } else { sel.replace(' ', "") }},
    })
}

async fn bind_pod(
    reg: &Registry,
    r: &'static ResourceInfo,
    ns: Option<&str>,
    name: &str,
    b: &Value,
    dry_run: bool,
) -> Result<()> {
    let node = b["target"]["name"]
        .as_str()
        .filter(|n| !n.is_empty())
        .ok_or_else(|| {
            Error::invalid("Binding", name, vec![("target.name".into(), "Required value".into())])
        })?
        .to_string();
    let uid = b["metadata"]["uid"].as_str().map(String::from);
    let now = crate::strategy::now_rfc3339();
    let key = r.key(ns, name);
    for _ in 0..16 {
        let Some(kv) = reg.store.get(&key, ReadAt::Latest).await? else {
            return Err(Error::not_found("pods", name));
        };
        let mut pod = registry::decode(&kv.value, kv.mod_revision)?;
        if let Some(uid) = &uid
            && pod["metadata"]["uid"].as_str() != Some(uid)
        {
            return Err(Error::conflict_msg(
                "pods",
                name,
                "the UID in the binding does not match the pod",
            ));
        }
        if pod["metadata"]["deletionTimestamp"].is_string() {
            return Err(Error::conflict_msg(
                "pods",
                name,
                "pod is being deleted, cannot be assigned to a host",
            ));
        }
        if let Some(cur) = pod["spec"]["nodeName"].as_str().filter(|n| !n.is_empty()) {
            return Err(Error::conflict_msg(
                "pods",
                name,
                &format!("pod {name} is already assigned to node \"{cur}\""),
            ));
        }
        pod["spec"]["nodeName"] = json!(node);
        let mut conds: Vec<Value> =
            pod["status"]["conditions"].as_array().cloned().unwrap_or_default();
        conds.retain(|c| c["type"] != "PodScheduled");
        conds.push(json!({"type": "PodScheduled", "status": "True", "lastProbeTime": null, "lastTransitionTime": now}));
        pod["status"]["conditions"] = Value::Array(conds);
        if dry_run {
            return Ok(());
        }
        let bytes = crate::registry::encode(&pod)?;
        match reg.store.update(&key, bytes, kv.mod_revision).await {
            Ok(_) => return Ok(()),
            Err(rkube_store::Error::Conflict { .. }) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Err(Error::conflict("pods", name))
}

#[allow(clippy::too_many_arguments)]
async fn apply_patch(
    reg: &Registry,
    r: &'static ResourceInfo,
    ns: Option<&str>,
    name: &str,
    sub: Option<&str>,
    body: &[u8],
    q: &HashMap<String, String>,
    dry_run: bool,
) -> Result<Response> {
    if q.get("fieldManager").is_none_or(|m| m.is_empty()) {
        return Err(Error::bad_request(
            "PatchOptions.meta.k8s.io \"\" is invalid: fieldManager: Required value: is required for apply patch",
        ));
    }
    let mut applied: Value = serde_yaml::from_slice(body)
        .map_err(|e| Error::bad_request(format!("error decoding YAML: {e}")))?;
    check_type(r, &applied, sub)?;
    let unknown = crate::openapi::prune_unknown_fields(r, &mut applied);
    let warnings: Vec<String> = match q.get("fieldValidation").map(String::as_str) {
        _ if unknown.is_empty() => Vec::new(),
        Some("Ignore") => Vec::new(),
        Some("Strict") => {
            let fields: Vec<String> =
                unknown.iter().map(|f| format!(".{f}: field not declared in schema")).collect();
            return Err(Error::bad_request(format!(
                "failed to create typed patch object ({}{name}; {}/{}, Kind={}): {}",
                ns.map(|n| format!("{n}/")).unwrap_or_default(),
                r.group,
                r.version,
                r.kind,
                fields.join(", ")
            )));
        }
        _ => unknown.iter().map(|f| format!("unknown field \"{f}\"")).collect(),
    };
    let manager = q.get("fieldManager").cloned().unwrap_or_default();
    let force = q.get("force").is_some_and(|f| parse_bool(f));
    match reg.get(r, ns, name).await {
        Err(Error::Status { code: 404, .. }) if sub.is_none() => {
            let mut obj = crate::managed::apply(None, &applied, &manager, force, None)?;
            obj["metadata"]["name"] = json!(name);
            let created = reg.create(r, ns, obj, dry_run).await?;
            let mut resp = object_response(StatusCode::CREATED, r, created, false, q);
            add_warnings(&mut resp, &warnings);
            Ok(resp)
        }
        Err(e) => Err(e),
        Ok(_) => {
            let updated = reg
                .guaranteed_update(
                    r,
                    ns,
                    name,
                    dry_run,
                    |old| crate::managed::apply(Some(old), &applied, &manager, force, sub),
                    sub,
                )
                .await?;
            let mut resp = object_response(StatusCode::OK, r, updated, false, q);
            add_warnings(&mut resp, &warnings);
            Ok(resp)
        }
    }
}

/// Kinds that can be dependents of an owner: every namespaced kind that can be deleted, but
/// events (they name their object in `involvedObject`, never in ownerReferences).
fn dependent_kinds() -> impl Iterator<Item = &'static ResourceInfo> {
    resources::RESOURCES
        .iter()
        .filter(|d| d.namespaced && d.verbs.contains(&"delete") && d.plural != "events")
}

/// Objects whose ownerReferences name `uid`, in `ns` (all namespaces for a cluster-scoped owner).
async fn dependents_of(
    st: &Inner,
    uid: &str,
    ns: Option<&str>,
) -> Vec<(&'static ResourceInfo, Value)> {
    let mut out = Vec::new();
    for dep in dependent_kinds() {
        let Ok((items, _)) = st.registry.list(dep, ns, &ListParams::default()).await else {
            continue;
        };
        out.extend(
            items.into_iter().filter(|item| owner_ref(item, uid).is_some()).map(|item| (dep, item)),
        );
    }
    out
}

fn owner_ref<'a>(item: &'a Value, uid: &str) -> Option<&'a Value> {
    item["metadata"]["ownerReferences"].as_array()?.iter().find(|x| x["uid"].as_str() == Some(uid))
}

fn delete_with(propagation: &str) -> DeleteParams {
    DeleteParams {
        grace_period: None,
        propagation: propagation.into(),
        precondition_uid: None,
        precondition_rv: None,
        dry_run: false,
    }
}

/// Background garbage collection: dependents of a deleted owner are deleted (or orphaned).
fn after_delete(st: Arc<Inner>, r: &'static ResourceInfo, obj: &Value, propagation: &str) {
    let Some(uid) = obj["metadata"]["uid"].as_str().map(String::from) else { return };
    let ns = obj["metadata"]["namespace"].as_str().map(String::from);
    let orphan = propagation == "Orphan";
    let _ = r;
    tokio::spawn(async move {
        let mut queue = vec![(uid, ns)];
        while let Some((uid, ns)) = queue.pop() {
            for (dep, item) in dependents_of(&st, &uid, ns.as_deref()).await {
                let name = item["metadata"]["name"].as_str().unwrap_or("").to_string();
                let ins = item["metadata"]["namespace"].as_str().map(String::from);
                if orphan {
                    let owner = uid.clone();
                    let _ = st
                        .registry
                        .guaranteed_update(
                            dep,
                            ins.as_deref(),
                            &name,
                            false,
                            |old| {
                                let mut n = old.clone();
                                if let Some(refs) = n["metadata"]["ownerReferences"].as_array_mut()
                                {
                                    refs.retain(|x| x["uid"].as_str() != Some(&owner));
                                }
                                // An empty list is no list, as upstream encodes it.
                                if n["metadata"]["ownerReferences"]
                                    .as_array()
                                    .is_some_and(Vec::is_empty)
                                    && let Some(m) = n["metadata"].as_object_mut()
                                {
                                    m.remove("ownerReferences");
                                }
                                Ok(n)
                            },
                            None,
                        )
                        .await;
                    continue;
                }
                match st
                    .registry
                    .delete(dep, ins.as_deref(), &name, &delete_with("Background"))
                    .await
                {
                    Ok((gone_obj, true)) => {
                        if let Some(u) = gone_obj["metadata"]["uid"].as_str() {
                            queue.push((u.to_string(), ins.clone()));
                        }
                    }
                    // A dependent that waits for its own dependents (a foreground delete already
                    // under way) is finished by its own task.
                    Ok((left, false)) if waits_for_dependents(&left) => {
                        spawn_foreground_deletion(st.clone(), dep, &left);
                    }
                    _ => {}
                }
            }
        }
    });
}

/// Whether an object is being deleted in the foreground: it carries the finalizer.
fn waits_for_dependents(obj: &Value) -> bool {
    obj["metadata"]["deletionTimestamp"].is_string()
        && obj["metadata"]["finalizers"]
            .as_array()
            .is_some_and(|f| f.iter().any(|x| x == registry::FOREGROUND_DELETION))
}

/// Owners (by uid) whose foreground deletion has a task in this process: one task per owner,
/// however often it is deleted again or found as a dependent.
static FOREGROUND_IN_FLIGHT: std::sync::LazyLock<
    std::sync::Mutex<std::collections::HashSet<String>>,
> = std::sync::LazyLock::new(Default::default);

struct InFlight(String);

impl InFlight {
    fn claim(uid: &str) -> Option<InFlight> {
        let mut set = FOREGROUND_IN_FLIGHT.lock().unwrap_or_else(|p| p.into_inner());
        set.insert(uid.to_string()).then(|| InFlight(uid.to_string()))
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        FOREGROUND_IN_FLIGHT.lock().unwrap_or_else(|p| p.into_inner()).remove(&self.0);
    }
}

/// Foreground garbage collection of one owner, as upstream: every dependent is deleted (in the
/// foreground too, so a whole tree goes leaves first); the owner stays, readable and with its
/// deletionTimestamp, while a dependent with `blockOwnerDeletion: true` exists; then the
/// `foregroundDeletion` finalizer is removed, which removes the owner once it has no other.
fn spawn_foreground_deletion(st: Arc<Inner>, r: &'static ResourceInfo, obj: &Value) {
    let (Some(uid), Some(name)) =
        (obj["metadata"]["uid"].as_str(), obj["metadata"]["name"].as_str())
    else {
        return;
    };
    let (uid, name) = (uid.to_string(), name.to_string());
    let Some(guard) = InFlight::claim(&uid) else { return };
    let ns = obj["metadata"]["namespace"].as_str().map(String::from);
    tokio::spawn(async move {
        let _guard = guard;
        loop {
            if st.shutdown.is_cancelled() {
                return;
            }
            // The owner may be gone, recreated under the same name, or no longer waiting.
            match st.registry.get(r, ns.as_deref(), &name).await {
                Ok(cur) if cur["metadata"]["uid"].as_str() == Some(&uid) => {
                    if !waits_for_dependents(&cur) {
                        return;
                    }
                }
                _ => return,
            }
            let mut blocking = 0;
            for (dep, item) in dependents_of(&st, &uid, ns.as_deref()).await {
                if owner_ref(&item, &uid).is_some_and(|o| o["blockOwnerDeletion"] == true) {
                    blocking += 1;
                }
                if item["metadata"]["deletionTimestamp"].is_string() {
                    // Already going; one that waits for its own dependents needs its task
                    // (started unless one runs already).
                    if waits_for_dependents(&item) {
                        spawn_foreground_deletion(st.clone(), dep, &item);
                    }
                    continue;
                }
                let dname = item["metadata"]["name"].as_str().unwrap_or("").to_string();
                let dns = item["metadata"]["namespace"].as_str().map(String::from);
                match st
                    .registry
                    .delete(dep, dns.as_deref(), &dname, &delete_with("Foreground"))
                    .await
                {
                    Ok((gone_obj, true)) => {
                        if owner_ref(&item, &uid).is_some_and(|o| o["blockOwnerDeletion"] == true) {
                            blocking -= 1;
                        }
                        after_delete(st.clone(), dep, &gone_obj, "Background");
                    }
                    Ok((left, false)) if waits_for_dependents(&left) => {
                        spawn_foreground_deletion(st.clone(), dep, &left);
                    }
                    _ => {}
                }
            }
            if blocking == 0 {
                let removed = st
                    .registry
                    .guaranteed_update(
                        r,
                        ns.as_deref(),
                        &name,
                        false,
                        |old| {
                            if old["metadata"]["uid"].as_str() != Some(&uid) {
                                return Err(Error::conflict(&qualified(r), &name));
                            }
                            let mut n = old.clone();
                            if let Some(f) = n["metadata"]["finalizers"].as_array_mut() {
                                f.retain(|x| x != registry::FOREGROUND_DELETION);
                            }
                            Ok(n)
                        },
                        None,
                    )
                    .await;
                match removed {
                    Ok(_) => return,
                    Err(e) => tracing::debug!("finishing foreground deletion of {name}: {e}"),
                }
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    });
}

/// Namespace deletion: delete everything inside, then the namespace itself.
fn spawn_namespace_cleanup(st: Arc<Inner>, ns: String) {
    tokio::spawn(async move {
        let deadline = Instant::now() + Duration::from_secs(600);
        loop {
            let mut left = 0;
            for r in
                resources::RESOURCES.iter().filter(|r| r.namespaced && r.verbs.contains(&"delete"))
            {
                if r.group == "events.k8s.io" {
                    continue;
                }
                let Ok((items, _)) = st.registry.list(r, Some(&ns), &ListParams::default()).await
                else {
                    continue;
                };
                for item in items {
                    left += 1;
                    if item["metadata"]["deletionTimestamp"].is_string() {
                        continue;
                    }
                    let name = item["metadata"]["name"].as_str().unwrap_or("").to_string();
                    let dp = DeleteParams {
                        grace_period: None,
                        propagation: "Background".into(),
                        precondition_uid: None,
                        precondition_rv: None,
                        dry_run: false,
                    };
                    let _ = st.registry.delete(r, Some(&ns), &name, &dp).await;
                }
            }
            if left == 0 || Instant::now() > deadline || st.shutdown.is_cancelled() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        if let Ok(nsr) = res("", "namespaces") {
            let key = nsr.key(None, &ns);
            if let Ok(Some(kv)) = st.registry.store.get(&key, ReadAt::Latest).await {
                let _ = st.registry.store.delete(&key, Some(kv.mod_revision)).await;
            }
        }
    });
}

async fn component_statuses(
    st: &Inner,
    t: &Target,
    table: bool,
    q: &HashMap<String, String>,
) -> Result<Response> {
    let leases = res("coordination.k8s.io", "leases")?;
    let mut items = Vec::new();
    for (name, lease) in
        [("scheduler", "kube-scheduler"), ("controller-manager", "kube-controller-manager")]
    {
        let (healthy, msg, err) = match st.registry.get(leases, Some("kube-system"), lease).await {
            Ok(l) => {
                let dur = l["spec"]["leaseDurationSeconds"].as_i64().unwrap_or(15);
                let renew =
                    l["spec"]["renewTime"].as_str().and_then(|s| s.parse::<jiff::Timestamp>().ok());
                match renew {
                    Some(t) if jiff::Timestamp::now().as_second() - t.as_second() <= dur => {
                        (true, "ok".to_string(), String::new())
                    }
                    Some(t) => (
                        false,
                        String::new(),
                        format!(
                            "leader lease kube-system/{lease} last renewed {} ago (duration {dur}s)",
                            table::human_duration(
                                jiff::Timestamp::now().as_second() - t.as_second()
                            )
                        ),
                    ),
                    None => (
                        false,
                        String::new(),
                        format!("leader lease kube-system/{lease} has no renewTime"),
                    ),
                }
            }
            Err(_) => {
                (false, String::new(), format!("no leader: lease kube-system/{lease} not found"))
            }
        };
        items.push(cs_object(name, healthy, &msg, &err));
    }
    let store_ok = st.registry.store.current_revision().await;
    items.push(match store_ok {
        Ok(_) => cs_object("etcd-0", true, "{\"health\":\"true\"}", ""),
        Err(e) => cs_object("etcd-0", false, "", &e.to_string()),
    });
    let warning = HeaderValue::from_static("299 - \"v1 ComponentStatus is deprecated in v1.19+\"");
    let mut resp = match &t.name {
        Some(n) => {
            let obj = items
                .into_iter()
                .find(|i| i["metadata"]["name"] == n.as_str())
                .ok_or_else(|| Error::not_found("componentstatuses", n))?;
            object_response(StatusCode::OK, t.r, obj, table, q)
        }
        None if table => {
            let include = Include::parse(q.get("includeObject").map(String::as_str));
            json_response(
                StatusCode::OK,
                &table::table(t.r.plural, "", &items, json!({}), include, true),
            )
        }
        None => json_response(
            StatusCode::OK,
            &json!({"kind": "ComponentStatusList", "apiVersion": "v1", "metadata": {}, "items": items}),
        ),
    };
    resp.headers_mut().append("warning", warning);
    Ok(resp)
}

fn cs_object(name: &str, healthy: bool, msg: &str, err: &str) -> Value {
    let mut cond = json!({"type": "Healthy", "status": if healthy { "True" } else { "False" }});
    if !msg.is_empty() {
        cond["message"] = json!(msg);
    }
    if !err.is_empty() {
        cond["error"] = json!(err);
    }
    json!({"kind": "ComponentStatus", "apiVersion": "v1", "metadata": {"name": name, "creationTimestamp": null}, "conditions": [cond]})
}

async fn metrics(st: &Inner) -> Response {
    let rev = st.registry.store.current_revision().await.map(|r| r.0).unwrap_or(0);
    text_response(StatusCode::OK, st.metrics.render(rev, st.started.elapsed()))
}

async fn watch_response(
    st: Arc<Inner>,
    r: &'static ResourceInfo,
    ns: Option<String>,
    lp: ListParams,
    q: &HashMap<String, String>,
    table: bool,
) -> Result<Response> {
    let open = st.metrics.watch_opened();
    let include = Include::parse(q.get("includeObject").map(String::as_str));
    let bookmarks = q.get("allowWatchBookmarks").is_some_and(|b| parse_bool(b));
    let send_initial = q.get("sendInitialEvents").map(|s| parse_bool(s));
    let timeout =
        q.get("timeoutSeconds").and_then(|t| t.parse::<u64>().ok()).map(Duration::from_secs);
    let rv = lp.resource_version.clone().unwrap_or_default();
    // rv unset or "0": synthetic ADDED events for the current state, then changes.
    let (initial, from) = if rv.is_empty() || rv == "0" || send_initial == Some(true) {
        if send_initial == Some(false) {
            (Vec::new(), st.registry.store.current_revision().await?)
        } else {
            let (items, meta) = st
                .registry
                .list(
                    r,
                    ns.as_deref(),
                    &ListParams {
                        limit: None,
                        continue_token: None,
                        resource_version: None,
                        ..lp.clone()
                    },
                )
                .await?;
            let rev = Revision(
                meta["resourceVersion"].as_str().and_then(|s| s.parse().ok()).unwrap_or(0),
            );
            (items, rev)
        }
    } else {
        (Vec::new(), Revision(registry::parse_rv(&rv)?))
    };
    let initial_end = send_initial == Some(true);
    let events = match st.registry.watch(r, ns.clone(), lp, from).await {
        Ok(s) => s,
        Err(Error::Store(rkube_store::Error::Compacted { .. })) => futures::stream::iter(vec![(
            "ERROR",
            registry::SharedObject::new(registry::gone_status()),
        )])
        .boxed(),
        Err(e) => return Err(e),
    };
    let mut head: Vec<registry::WatchOut> =
        initial.into_iter().map(|o| ("ADDED", registry::SharedObject::new(o))).collect();
    if initial_end && bookmarks {
        head.push(("BOOKMARK", registry::SharedObject::new(json!({"kind": r.kind, "apiVersion": r.api_version(), "metadata": {"resourceVersion": from.0.to_string(), "annotations": {"k8s.io/initial-events-end": "true"}}}))));
    }
    let stop = st.shutdown.clone();
    let deadline = timeout.map(|t| tokio::time::Instant::now() + t);
    let mut first = true;
    let stream = futures::stream::iter(head)
        .chain(events)
        .filter(move |(ty, _)| futures::future::ready(*ty != "BOOKMARK" || bookmarks))
        .take_until(async move {
            match deadline {
                Some(d) => tokio::select! { _ = tokio::time::sleep_until(d) => {}, _ = stop.cancelled() => {} },
                None => stop.cancelled().await,
            }
        })
        .map(move |(ty, obj)| {
            let _counted_while_open = &open;
            let line = if table && ty != "ERROR" && ty != "BOOKMARK" {
                let rv = obj.value()["metadata"]["resourceVersion"].clone();
                let t = table::table(r.plural, r.group, std::slice::from_ref(obj.value()), json!({"resourceVersion": rv}), include, first);
                first = false;
                let mut line = serde_json::to_vec(&json!({"type": ty, "object": t})).unwrap_or_default();
                line.push(b'\n');
                line
            } else {
                // The object's JSON is shared by every watcher that delivers it.
                let body = obj.json();
                let mut line = Vec::with_capacity(body.len() + 40);
                line.extend_from_slice(b"{\"type\":\"");
                line.extend_from_slice(ty.as_bytes());
                line.extend_from_slice(b"\",\"object\":");
                line.extend_from_slice(body);
                line.extend_from_slice(b"}\n");
                line
            };
            Ok::<_, Infallible>(Bytes::from(line))
        });
    let mut resp = Response::new(Body::from_stream(stream));
    resp.headers_mut()
        .insert(http::header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp.headers_mut()
        .insert(http::header::CACHE_CONTROL, HeaderValue::from_static("no-cache, private"));
    Ok(resp)
}

#[cfg(test)]
mod tests {
    use super::decode_body;

    fn code(ct: &str, body: &[u8]) -> u16 {
        match decode_body(ct, body) {
            Ok(_) => 200,
            Err(crate::Error::Status { code, .. }) => code,
            Err(e) => panic!("unexpected error {e}"),
        }
    }

    #[test]
    fn absurd_bodies_are_400_not_a_crash() {
        let deep = format!("{{\"data\":{}{}}}", "[".repeat(100_000), "]".repeat(100_000));
        assert_eq!(code("application/json", deep.as_bytes()), 400);
        let deep_yaml = format!("data: {}{}", "[".repeat(10_000), "]".repeat(10_000));
        assert_eq!(code("application/yaml", deep_yaml.as_bytes()), 400);
        // "Billion laughs": aliases that expand exponentially.
        let mut bomb = String::from("a: &a [x, x, x, x, x, x, x, x, x]\n");
        let mut prev = 'a';
        for c in "bcdefghi".chars() {
            bomb.push_str(&format!("{c}: &{c} [{}]\n", vec![format!("*{prev}"); 9].join(",")));
            prev = c;
        }
        assert_eq!(code("application/yaml", bomb.as_bytes()), 400);
        assert_eq!(code("application/vnd.kubernetes.protobuf", b"k8s\0\x0a\xff\xff\xff"), 400);
        assert_eq!(code("application/cbor", b"\xa0"), 415);
        assert_eq!(code("application/json", b"[1,2]"), 400);
        assert_eq!(code("application/json", b"{\"kind\":\"Pod\"}"), 200);
    }
}
