//! The kubelet's own HTTP endpoint, which the API server proxies `kubectl logs`, `kubectl exec`,
//! `kubectl attach` and `kubectl port-forward` to: container logs (follow, tail, since,
//! timestamps, previous), exec and attach over the Kubernetes WebSocket channel protocol
//! (v4/v5.channel.k8s.io) or SPDY/3.1 streams (kubectl before 1.30; one session, two transports:
//! see `remotecommand`) and port forwarding (SPDY/3.1, plain or in a WebSocket, and WebSocket
//! channels; see `portforward`).

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::ws::WebSocketUpgrade;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use bytes::Bytes;
use k8s_openapi::api::core::v1::Pod;
use kube::{Api, Client};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

use crate::Config;
use crate::remotecommand::{Input, Output, Transport, Upgrade, Wanted, Ws};

#[derive(Clone)]
struct Ctx {
    client: Client,
    config: Config,
}

/// Binds 127.0.0.1:0 and serves until `shutdown`; returns the port.
pub async fn start(
    client: Client,
    config: Config,
    shutdown: CancellationToken,
) -> std::io::Result<u16> {
    let listener = tokio::net::TcpListener::bind((config.node_ip.as_str(), 0)).await?;
    let port = listener.local_addr()?.port();
    let app = Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/containerLogs/{ns}/{pod}/{container}", get(logs))
        .route("/exec/{ns}/{pod}/{container}", get(exec).post(exec))
        .route("/attach/{ns}/{pod}/{container}", get(attach).post(attach))
        .route("/portForward/{ns}/{pod}", get(port_forward).post(port_forward))
        .with_state(Ctx { client, config });
    tokio::spawn(async move {
        let _ = axum::serve(listener, app)
            .with_graceful_shutdown(async move { shutdown.cancelled().await })
            .await;
    });
    Ok(port)
}

fn status(code: StatusCode, reason: &str, message: String) -> Response {
    let body = serde_json::json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": message, "reason": reason, "code": code.as_u16()});
    (code, axum::Json(body)).into_response()
}

async fn pod_dir(ctx: &Ctx, ns: &str, pod: &str) -> Result<(Pod, PathBuf), Response> {
    let api: Api<Pod> = Api::namespaced(ctx.client.clone(), ns);
    let p = api.get(pod).await.map_err(|e| {
        status(StatusCode::NOT_FOUND, "NotFound", format!("pods \"{pod}\" not found: {e}"))
    })?;
    let uid = p.metadata.uid.clone().unwrap_or_default();
    Ok((p, ctx.config.data_dir.join("pods").join(uid)))
}

/// The pod, its directory and its app container `container` (exec and attach), or the
/// error response when either is missing.
async fn app_container(
    ctx: &Ctx,
    ns: &str,
    pod: &str,
    container: &str,
) -> Result<(Pod, PathBuf, k8s_openapi::api::core::v1::Container), Response> {
    let (p, dir) = pod_dir(ctx, ns, pod).await?;
    let c =
        p.spec.as_ref().and_then(|s| s.containers.iter().find(|c| c.name == container).cloned());
    match c {
        Some(c) => Ok((p, dir, c)),
        None => Err(status(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            format!("container {container} is not valid for pod {pod}"),
        )),
    }
}

/// One CRI log line split into (timestamp, message).
fn parse_line(line: &str) -> (&str, &str) {
    let mut parts = line.splitn(4, ' ');
    match (parts.next(), parts.next(), parts.next(), parts.next()) {
        (Some(ts), Some(_stream), Some(_tag), Some(msg)) => (ts, msg),
        (Some(ts), Some(_), Some(_), None) => (ts, ""),
        _ => ("", line),
    }
}

fn render(line: &str, timestamps: bool, since: Option<jiff::Timestamp>) -> Option<String> {
    let (ts, msg) = parse_line(line);
    if let Some(since) = since
        && ts.parse::<jiff::Timestamp>().is_ok_and(|t| t < since)
    {
        return None;
    }
    Some(if timestamps { format!("{ts} {msg}\n") } else { format!("{msg}\n") })
}

async fn logs(
    State(ctx): State<Ctx>,
    Path((ns, pod, container)): Path<(String, String, String)>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let (p, dir) = match pod_dir(&ctx, &ns, &pod).await {
        Ok(x) => x,
        Err(r) => return r,
    };
    let known = p.spec.as_ref().is_some_and(|s| {
        s.containers.iter().chain(s.init_containers.iter().flatten()).any(|c| c.name == container)
    });
    if !known {
        return status(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            format!("container {container} is not valid for pod {pod}"),
        );
    }
    let truthy = |k: &str| q.get(k).is_some_and(|v| v == "true" || v == "1");
    let previous = truthy("previous");
    let path = dir.join("logs").join(if previous {
        format!("{container}.log.1")
    } else {
        format!("{container}.log")
    });
    let text = match tokio::fs::read_to_string(&path).await {
        Ok(t) => t,
        Err(_) if previous => {
            return status(
                StatusCode::BAD_REQUEST,
                "BadRequest",
                format!("previous terminated container \"{container}\" in pod \"{pod}\" not found"),
            );
        }
        Err(_) => {
            return status(
                StatusCode::BAD_REQUEST,
                "BadRequest",
                format!(
                    "container \"{container}\" in pod \"{pod}\" is waiting to start: ContainerCreating"
                ),
            );
        }
    };
    let timestamps = truthy("timestamps");
    let since = q
        .get("sinceSeconds")
        .and_then(|s| s.parse::<i64>().ok())
        .map(|s| jiff::Timestamp::now() - jiff::SignedDuration::from_secs(s))
        .or_else(|| q.get("sinceTime").and_then(|t| t.parse().ok()));
    let mut lines: Vec<&str> = text.lines().collect();
    if let Some(n) = q.get("tailLines").and_then(|t| t.parse::<usize>().ok()) {
        lines = lines.split_off(lines.len().saturating_sub(n));
    }
    let mut out = String::new();
    for l in lines {
        if let Some(r) = render(l, timestamps, since) {
            out.push_str(&r);
        }
    }
    if let Some(limit) = q.get("limitBytes").and_then(|l| l.parse::<usize>().ok()) {
        out.truncate(limit);
    }
    if !truthy("follow") || previous {
        return (StatusCode::OK, out).into_response();
    }
    // Follow: stream what is there, then new lines as the file grows.
    let start = text.len() as u64;
    let stream = futures::stream::unfold(
        (Some(out), start, path, String::new()),
        move |(first, mut pos, path, mut partial)| async move {
            if let Some(f) = first {
                return Some((
                    Ok::<Bytes, std::io::Error>(Bytes::from(f)),
                    (None, pos, path, partial),
                ));
            }
            loop {
                tokio::time::sleep(Duration::from_millis(200)).await;
                let Ok(mut f) = tokio::fs::File::open(&path).await else { return None };
                let len = f.metadata().await.map(|m| m.len()).unwrap_or(0);
                if len < pos {
                    return None; // rotated: the container restarted
                }
                if len == pos {
                    continue;
                }
                use tokio::io::AsyncSeekExt;
                if f.seek(std::io::SeekFrom::Start(pos)).await.is_err() {
                    return None;
                }
                let mut buf = String::new();
                if f.read_to_string(&mut buf).await.is_err() {
                    return None;
                }
                pos = len;
                partial.push_str(&buf);
                let mut out = String::new();
                while let Some(i) = partial.find('\n') {
                    let line: String = partial.drain(..=i).collect();
                    if let Some(r) = render(line.trim_end_matches('\n'), timestamps, None) {
                        out.push_str(&r);
                    }
                }
                if !out.is_empty() {
                    return Some((Ok(Bytes::from(out)), (None, pos, path, partial)));
                }
            }
        },
    );
    Response::new(Body::from_stream(stream))
}

async fn exec(
    State(ctx): State<Ctx>,
    Path((ns, pod, container)): Path<(String, String, String)>,
    axum::extract::RawQuery(raw): axum::extract::RawQuery,
    req: axum::extract::Request,
) -> Response {
    let (p, dir, c) = match app_container(&ctx, &ns, &pod, &container).await {
        Ok(x) => x,
        Err(r) => return r,
    };
    let q = StreamQuery::parse(raw.as_deref());
    let (command, stdin, tty) = (q.command.clone(), q.stdin, q.tty);
    if command.is_empty() {
        return status(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            "you must specify at least 1 command".into(),
        );
    }
    let sources = crate::env::Sources {
        client: &ctx.client,
        config: &ctx.config,
        pod_ip: &ctx.config.node_ip,
    };
    let env = match crate::env::resolve(&p, &c, &sources).await {
        Ok(env) => env,
        Err(msg) => return status(StatusCode::INTERNAL_SERVER_ERROR, "InternalError", msg),
    };
    let workdir = dir.join("work");
    // An OCI container runs the command inside itself through `runc exec`.
    let mut prefix: Vec<String> = Vec::new();
    if ctx.config.runtime == crate::RuntimeKind::Oci {
        let uid = p.metadata.uid.clone().unwrap_or_default();
        match crate::oci::running_container(&ctx.config, &uid, &container).await {
            Some((runtime, ctr)) => prefix = crate::oci::exec_argv(&runtime, &ctr, tty),
            None => {
                return status(
                    StatusCode::BAD_REQUEST,
                    "BadRequest",
                    format!("container {container} is not running in pod {pod}"),
                );
            }
        }
    }
    // An isolated process container runs it inside its namespaces and cgroup.
    if crate::pods::isolated(&ctx.config) {
        match crate::pods::read_enter(&dir, &container) {
            Some(enter) => prefix = enter,
            None => {
                return status(
                    StatusCode::BAD_REQUEST,
                    "BadRequest",
                    format!("container {container} is not running in pod {pod}"),
                );
            }
        }
    }
    let job = ExecJob { command, prefix, env, workdir, stdin, tty };
    match Upgrade::from_request(req).await {
        Ok(Upgrade::Ws(ws)) => ws.on_upgrade(move |socket| job.run(Ws(socket))),
        Ok(Upgrade::Spdy(up)) => up.serve(q.wanted(), move |t| job.run(t)),
        Err(r) => r,
    }
}

/// One `kubectl exec` command, run once the client's connection is upgraded.
struct ExecJob {
    command: Vec<String>,
    prefix: Vec<String>,
    env: Vec<(String, String)>,
    workdir: PathBuf,
    stdin: bool,
    tty: bool,
}

impl ExecJob {
    async fn run<T: Transport>(self, t: T) {
        let ExecJob { command, prefix, env, workdir, stdin, tty } = self;
        if tty {
            run_tty(t, command, prefix, env, workdir).await
        } else {
            run_exec(t, command, prefix, env, workdir, stdin).await
        }
    }
}

/// The query of exec and attach: `command` repeats (command=sh&command=-c&command=echo ok).
struct StreamQuery {
    command: Vec<String>,
    stdin: bool,
    stdout: bool,
    stderr: bool,
    tty: bool,
}

impl StreamQuery {
    fn parse(raw: Option<&str>) -> StreamQuery {
        let mut q = StreamQuery {
            command: Vec::new(),
            stdin: false,
            stdout: false,
            stderr: false,
            tty: false,
        };
        for pair in raw.unwrap_or_default().split('&') {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let v = percent_decode(v);
            let on = v == "true" || v == "1";
            match k {
                "command" => q.command.push(v),
                "stdin" | "input" => q.stdin = on,
                "stdout" | "output" => q.stdout = on,
                "stderr" | "error" => q.stderr = on,
                "tty" => q.tty = on,
                _ => {}
            }
        }
        q
    }

    /// The SPDY streams the client opens for this query.
    fn wanted(&self) -> Wanted {
        Wanted { stdin: self.stdin, stdout: self.stdout, stderr: self.stderr, tty: self.tty }
    }
}

/// `kubectl attach`: the running container's output from now on, and its stdin when the
/// container has one (`stdin: true`; otherwise what the client types is dropped, as
/// containerd does). Whether the session is a terminal is the container's `tty`, not the
/// client's: it cannot change once the container runs.
async fn attach(
    State(ctx): State<Ctx>,
    Path((ns, pod, container)): Path<(String, String, String)>,
    axum::extract::RawQuery(raw): axum::extract::RawQuery,
    req: axum::extract::Request,
) -> Response {
    let (p, dir, c) = match app_container(&ctx, &ns, &pod, &container).await {
        Ok(x) => x,
        Err(r) => return r,
    };
    let q = StreamQuery::parse(raw.as_deref());
    if !q.stdin && !q.stdout && !q.stderr {
        return status(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            "you must specify at least 1 of stdin, stdout, stderr".into(),
        );
    }
    // The container's state as CRI names it, for the refusal when it does not run.
    let state = p
        .status
        .as_ref()
        .and_then(|s| s.container_statuses.as_ref())
        .and_then(|cs| cs.iter().find(|s| s.name == container))
        .and_then(|s| s.state.as_ref())
        .map(|st| {
            if st.running.is_some() {
                "CONTAINER_RUNNING"
            } else if st.terminated.is_some() {
                "CONTAINER_EXITED"
            } else {
                "CONTAINER_CREATED"
            }
        })
        .unwrap_or("CONTAINER_UNKNOWN");
    let not_running = || {
        let state = if state == "CONTAINER_RUNNING" { "CONTAINER_EXITED" } else { state };
        status(
            StatusCode::INTERNAL_SERVER_ERROR,
            "InternalError",
            format!("container {container} is in {state} state"),
        )
    };
    let uid = p.metadata.uid.clone().unwrap_or_default();
    let socket = match ctx.config.runtime {
        crate::RuntimeKind::Process => crate::runtime::attach_socket(&dir, &container),
        crate::RuntimeKind::Oci => {
            match crate::oci::running_container(&ctx.config, &uid, &container).await {
                Some((_, ctr)) => ctr.attach_socket(),
                None => return not_running(),
            }
        }
        crate::RuntimeKind::Simulated => {
            return status(
                StatusCode::BAD_REQUEST,
                "BadRequest",
                format!("pod {pod} is simulated: it has no container process to attach to"),
            );
        }
    };
    let tty = c.tty.unwrap_or(false);
    let pass_stdin = q.stdin && c.stdin.unwrap_or(false);
    let conn = match rkube_oci::attach::connect(&socket, pass_stdin).await {
        Ok(conn) => conn,
        Err(_) => return not_running(),
    };
    let (stdout, stderr) = (q.stdout, q.stderr);
    match Upgrade::from_request(req).await {
        Ok(Upgrade::Ws(ws)) => {
            ws.on_upgrade(move |socket| relay_attach(Ws(socket), conn, tty, stdout, stderr))
        }
        Ok(Upgrade::Spdy(up)) => {
            up.serve(q.wanted(), move |t| relay_attach(t, conn, tty, stdout, stderr))
        }
        Err(r) => r,
    }
}

/// Relays one attach session: the container's output to channels 1 and 2 (1 only for a
/// terminal), channel 0 to its stdin, channel 4 (terminal size) to its terminal; a close of
/// channel 0 ends this session's stdin. When the container ends, a Success status on channel 3.
async fn relay_attach<T: Transport>(
    mut t: T,
    conn: tokio::net::UnixStream,
    tty: bool,
    stdout: bool,
    stderr: bool,
) {
    use rkube_oci::attach;
    let (mut from_hub, mut to_hub) = conn.into_split();
    let ended = loop {
        tokio::select! {
            out = attach::read_output(&mut from_hub) => match out {
                Some((stream, data)) => {
                    let to = if tty || stream == attach::STDOUT { Output::Stdout } else { Output::Stderr };
                    if (to == Output::Stdout && !stdout) || (to == Output::Stderr && !stderr) {
                        continue;
                    }
                    if !t.send(to, &data).await {
                        break false;
                    }
                }
                None => break true,
            },
            input = t.recv() => match input {
                Input::Stdin(b) => {
                    for chunk in b.chunks(u16::MAX as usize) {
                        if to_hub.write_all(&attach::client_frame(attach::STDIN, chunk)).await.is_err() {
                            break;
                        }
                    }
                }
                Input::Resize { width, height } => {
                    let _ = to_hub.write_all(&attach::resize_frame(width, height)).await;
                }
                Input::StdinEnd => {
                    let _ = to_hub.shutdown().await;
                }
                Input::Gone => break false,
            },
        }
    };
    if ended {
        t.finish(serde_json::json!({"metadata": {}, "status": "Success"})).await;
    }
}

async fn port_forward(
    State(ctx): State<Ctx>,
    Path((ns, pod)): Path<(String, String)>,
    axum::extract::RawQuery(raw): axum::extract::RawQuery,
    req: axum::extract::Request,
) -> Response {
    use crate::portforward::{self, Target};
    let (p, _) = match pod_dir(&ctx, &ns, &pod).await {
        Ok(x) => x,
        Err(r) => return r,
    };
    let uid = p.metadata.uid.clone().unwrap_or_default();
    let running = p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running");
    let netns = match ctx.config.runtime {
        crate::RuntimeKind::Process => None,
        crate::RuntimeKind::Oci => match crate::oci::pod_netns(&ctx.config, &uid) {
            Some(ns) => ns,
            None => {
                return status(
                    StatusCode::BAD_REQUEST,
                    "BadRequest",
                    format!("pod {pod} has no sandbox on this node"),
                );
            }
        },
        crate::RuntimeKind::Simulated => {
            return status(
                StatusCode::BAD_REQUEST,
                "BadRequest",
                format!("pod {pod} is simulated: it has no ports to forward"),
            );
        }
    };
    if !running {
        return status(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            format!(
                "unable to forward port because pod is not running. Current status={}",
                p.status.as_ref().and_then(|s| s.phase.clone()).unwrap_or_default()
            ),
        );
    }
    let target = std::sync::Arc::new(Target { pod: pod.clone(), uid, netns });
    let (mut parts, _body) = req.into_parts();
    let header = |name: &str| {
        parts
            .headers
            .get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(|v| v.trim().to_ascii_lowercase())
            .collect::<Vec<_>>()
    };
    if header("upgrade").iter().any(|u| u == "websocket") {
        use axum::extract::FromRequestParts;
        let ws = match WebSocketUpgrade::from_request_parts(&mut parts, &()).await {
            Ok(ws) => ws,
            Err(e) => return e.into_response(),
        };
        let ws =
            ws.protocols([portforward::WS_SPDY_PROTOCOL, "v4.channel.k8s.io", "channel.k8s.io"]);
        let spdy = ws.selected_protocol().is_some_and(|p| p == portforward::WS_SPDY_PROTOCOL);
        if spdy {
            return ws.on_upgrade(move |s| portforward::serve_spdy_over_websocket(s, target));
        }
        let ports = match portforward::ports_from_query(raw.as_deref().unwrap_or("")) {
            Ok(p) => p,
            Err(msg) => return status(StatusCode::BAD_REQUEST, "BadRequest", msg),
        };
        return ws.on_upgrade(move |s| portforward::serve_channels(s, ports, target));
    }
    if !header("upgrade").iter().any(|u| u == "spdy/3.1")
        || !header("connection").iter().any(|c| c == "upgrade")
    {
        return status(StatusCode::BAD_REQUEST, "BadRequest", "Upgrade request required".into());
    }
    // The SPDY handshake: a client that names protocols must name ours.
    let offered: Vec<String> = parts
        .headers
        .get_all("x-stream-protocol-version")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|v| v.trim().to_string())
        .filter(|v| !v.is_empty())
        .collect();
    if !offered.is_empty() && !offered.iter().any(|p| p == portforward::PROTOCOL) {
        let mut r = (
            StatusCode::FORBIDDEN,
            format!(
                "unable to upgrade: unable to negotiate protocol: client supports {offered:?}, server supports [\"{}\"]",
                portforward::PROTOCOL
            ),
        )
            .into_response();
        r.headers_mut().insert(
            "x-accepted-stream-protocol-versions",
            axum::http::HeaderValue::from_static(portforward::PROTOCOL),
        );
        return r;
    }
    let Some(on_upgrade) = parts.extensions.remove::<hyper::upgrade::OnUpgrade>() else {
        return status(
            StatusCode::INTERNAL_SERVER_ERROR,
            "InternalError",
            "unable to upgrade: the connection cannot be taken over".into(),
        );
    };
    tokio::spawn(async move {
        match on_upgrade.await {
            Ok(up) => portforward::serve_spdy(hyper_util::rt::TokioIo::new(up), target).await,
            Err(e) => tracing::debug!("port-forward upgrade: {e}"),
        }
    });
    let mut r = Response::new(Body::empty());
    *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = r.headers_mut();
    h.insert("connection", axum::http::HeaderValue::from_static("Upgrade"));
    h.insert("upgrade", axum::http::HeaderValue::from_static("SPDY/3.1"));
    if !offered.is_empty() {
        h.insert(
            "x-stream-protocol-version",
            axum::http::HeaderValue::from_static(portforward::PROTOCOL),
        );
    }
    r
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && i + 2 < b.len()
            && let Ok(x) =
                u8::from_str_radix(std::str::from_utf8(&b[i + 1..i + 3]).unwrap_or("zz"), 16)
        {
            out.push(x);
            i += 3;
            continue;
        }
        out.push(if b[i] == b'+' { b' ' } else { b[i] });
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The process that runs `command`: on the host with the container's environment, or
/// through `prefix` (`runc exec <id>`) inside the container.
fn exec_command(
    command: &[String],
    prefix: &[String],
    env: &[(String, String)],
    workdir: &std::path::Path,
) -> tokio::process::Command {
    if prefix.is_empty() {
        let _ = std::fs::create_dir_all(workdir);
        let mut cmd = tokio::process::Command::new(&command[0]);
        cmd.args(&command[1..])
            .env_clear()
            .env("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
            .envs(env.iter().cloned())
            .current_dir(workdir);
        cmd
    } else {
        let mut cmd = tokio::process::Command::new(&prefix[0]);
        cmd.args(&prefix[1..]).args(command);
        cmd
    }
}

async fn run_exec<T: Transport>(
    mut t: T,
    command: Vec<String>,
    prefix: Vec<String>,
    env: Vec<(String, String)>,
    workdir: PathBuf,
    want_stdin: bool,
) {
    let mut cmd = exec_command(&command, &prefix, &env, &workdir);
    cmd.stdin(if want_stdin { std::process::Stdio::piped() } else { std::process::Stdio::null() })
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => return t.finish(start_failure(&command[0], e)).await,
    };
    let mut stdin = child.stdin.take();
    let mut stdout = child.stdout.take();
    let mut stderr = child.stderr.take();
    let mut out_buf = vec![0u8; 8192];
    let mut err_buf = vec![0u8; 8192];
    let mut out_open = stdout.is_some();
    let mut err_open = stderr.is_some();
    let exit = loop {
        tokio::select! {
            n = async { match stdout.as_mut() { Some(s) => s.read(&mut out_buf).await, None => std::future::pending().await } }, if out_open => {
                match n {
                    Ok(0) | Err(_) => { out_open = false; }
                    Ok(n) => if !t.send(Output::Stdout, &out_buf[..n]).await { break None; },
                }
            }
            n = async { match stderr.as_mut() { Some(s) => s.read(&mut err_buf).await, None => std::future::pending().await } }, if err_open => {
                match n {
                    Ok(0) | Err(_) => { err_open = false; }
                    Ok(n) => if !t.send(Output::Stderr, &err_buf[..n]).await { break None; },
                }
            }
            input = t.recv() => match input {
                Input::Stdin(b) => { if let Some(s) = stdin.as_mut() && s.write_all(&b).await.is_err() { stdin = None; } }
                Input::StdinEnd => { stdin = None; }
                Input::Resize { .. } => {}
                Input::Gone => break None,
            },
            st = child.wait(), if !out_open && !err_open => break st.ok(),
        }
    };
    if exit.is_none() {
        let _ = child.kill().await;
        return;
    }
    t.finish(exit_status(exit, &command)).await;
}

/// The status of a command that could not start.
fn start_failure(program: &str, e: std::io::Error) -> serde_json::Value {
    serde_json::json!({"metadata": {}, "status": "Failure", "message": format!("failed to exec in container: exec: \"{program}\": {e}"), "reason": "InternalError"})
}

/// The final status of a command: Success, or the exit code as upstream's NonZeroExitCode
/// (which kubectl turns into its own exit code).
fn exit_status(exit: Option<std::process::ExitStatus>, command: &[String]) -> serde_json::Value {
    match exit {
        Some(s) if s.success() => serde_json::json!({"metadata": {}, "status": "Success"}),
        Some(s) => {
            let code = s.code().unwrap_or(137);
            serde_json::json!({"metadata": {}, "status": "Failure", "message": format!("command terminated with non-zero exit code: error executing command {command:?}, exit code {code}"), "reason": "NonZeroExitCode", "details": {"causes": [{"reason": "ExitCode", "message": code.to_string()}]}})
        }
        None => {
            serde_json::json!({"metadata": {}, "status": "Failure", "message": "command was killed", "reason": "InternalError"})
        }
    }
}

/// How long `exec -t` waits for the client's terminal size before it starts the command anyway.
const FIRST_SIZE_WAIT: Duration = Duration::from_millis(500);

/// `exec -t`: the command runs on a pseudo-terminal; its output goes to stdout, stdin is typed
/// on it, and resizes set its size.
async fn run_tty<T: Transport>(
    mut t: T,
    command: Vec<String>,
    prefix: Vec<String>,
    env: Vec<(String, String)>,
    workdir: PathBuf,
) {
    // kubectl sends the terminal's size as soon as the session is open: wait a moment for it,
    // so the command starts on a terminal of that size (a first `stty size` must not read 0 0).
    let (size, mut first) = match tokio::time::timeout(FIRST_SIZE_WAIT, t.recv()).await {
        Ok(Input::Resize { width, height }) => (Some((width, height)), None),
        // Anything else that came first is handled in order once the command runs.
        Ok(other) => (None, Some(other)),
        Err(_) => (None, None),
    };
    let spawn = || -> std::io::Result<(tokio::process::Child, std::fs::File)> {
        let (master, slave) = crate::tty::open()?;
        if let Some((width, height)) = size {
            crate::tty::resize(&master, width, height);
        }
        let mut cmd = exec_command(&command, &prefix, &env, &workdir);
        cmd.env("TERM", "xterm")
            .stdin(std::process::Stdio::from(slave.try_clone()?))
            .stdout(std::process::Stdio::from(slave.try_clone()?))
            .stderr(std::process::Stdio::from(slave))
            .kill_on_drop(true);
        crate::tty::make_controlling(&mut cmd);
        let child = cmd.spawn()?;
        Ok((child, std::fs::File::from(master)))
    };
    let (mut child, master) = match spawn() {
        Ok(x) => x,
        Err(e) => return t.finish(start_failure(&command[0], e)).await,
    };
    let resize_fd = match master.try_clone() {
        Ok(f) => f,
        Err(_) => return,
    };
    let mut reader = match master.try_clone() {
        Ok(f) => tokio::fs::File::from_std(f),
        Err(_) => return,
    };
    let mut writer = tokio::fs::File::from_std(master);
    let mut buf = vec![0u8; 8192];
    let mut out_open = true;
    let exit = loop {
        tokio::select! {
            n = reader.read(&mut buf), if out_open => match n {
                // EIO on the master: the terminal's last user closed it (the command exited).
                Ok(0) | Err(_) => out_open = false,
                Ok(n) => {
                    if !t.send(Output::Stdout, &buf[..n]).await {
                        break None;
                    }
                }
            },
            input = async { match first.take() { Some(i) => i, None => t.recv().await } } => match input {
                Input::Stdin(b) => { let _ = writer.write_all(&b).await; let _ = writer.flush().await; }
                Input::Resize { width, height } => crate::tty::resize(&resize_fd, width, height),
                Input::StdinEnd => {}
                Input::Gone => break None,
            },
            st = child.wait() => {
                // Drain what the terminal still holds, then report.
                let _ = tokio::time::timeout(Duration::from_millis(200), async {
                    while let Ok(n) = reader.read(&mut buf).await {
                        if n == 0 || !t.send(Output::Stdout, &buf[..n]).await { break; }
                    }
                }).await;
                break st.ok();
            }
        }
    };
    if exit.is_none() {
        let _ = child.kill().await;
        return;
    }
    t.finish(exit_status(exit, &command)).await;
}
