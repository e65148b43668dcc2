//! Container probes: readiness decides whether a running container counts as ready (and so
//! whether its pod is an endpoint); liveness restarts a container that stopped answering. Exec,
//! HTTP GET and TCP probes, with upstream's delays, periods, timeouts and thresholds.

use std::time::Duration;

use k8s_openapi::api::core::v1::{Container, Probe};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Readiness,
    Liveness,
}

/// A change worth telling the pod worker: readiness flipped, or liveness gave up.
#[derive(Debug)]
pub struct Outcome {
    pub container: String,
    pub generation: u64,
    pub kind: Kind,
    pub ok: bool,
    pub message: String,
}

pub struct Target {
    pub host: String,
    pub env: Vec<(String, String)>,
    pub workdir: std::path::PathBuf,
    /// Runs exec probes inside the container (`runc exec <id>`); empty: on the host.
    pub exec_prefix: Vec<String>,
}

fn resolve_port(c: &Container, p: &IntOrString) -> Option<u16> {
    match p {
        IntOrString::Int(n) => u16::try_from(*n).ok(),
        IntOrString::String(name) => c
            .ports
            .iter()
            .flatten()
            .find(|x| x.name.as_deref() == Some(name))
            .and_then(|x| u16::try_from(x.container_port).ok()),
    }
}

/// Runs one probe once: Ok on success, Err with the reason otherwise.
pub async fn check(c: &Container, probe: &Probe, t: &Target) -> Result<(), String> {
    let timeout = Duration::from_secs(probe.timeout_seconds.unwrap_or(1).max(1) as u64);
    if let Some(exec) = &probe.exec {
        let cmd = exec.command.clone().unwrap_or_default();
        if cmd.is_empty() {
            return Err("exec probe without a command".into());
        }
        let argv: Vec<String> = t.exec_prefix.iter().chain(&cmd).cloned().collect();
        let mut command = tokio::process::Command::new(&argv[0]);
        command.args(&argv[1..]).kill_on_drop(true);
        if t.exec_prefix.is_empty() {
            command
                .env_clear()
                .env("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
                .envs(t.env.clone())
                .current_dir(&t.workdir);
        }
        return match tokio::time::timeout(timeout, command.output()).await {
            Err(_) => Err(format!("command {cmd:?} timed out")),
            Ok(Err(e)) => Err(e.to_string()),
            Ok(Ok(out)) if out.status.success() => Ok(()),
            Ok(Ok(out)) => Err(String::from_utf8_lossy(&out.stdout).trim().to_string()
                + String::from_utf8_lossy(&out.stderr).trim()),
        };
    }
    if let Some(h) = &probe.http_get {
        let port = resolve_port(c, &h.port).ok_or("unknown probe port")?;
        let host = h.host.clone().unwrap_or_else(|| t.host.clone());
        let path = h.path.clone().unwrap_or_else(|| "/".into());
        let url = format!("http://{host}:{port}{path}");
        let client =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .build_http::<http_body_util::Empty<bytes::Bytes>>();
        let req = http::Request::get(&url)
            .header("user-agent", "kube-probe/1.33")
            .body(http_body_util::Empty::new())
            .map_err(|e| e.to_string())?;
        return match tokio::time::timeout(timeout, client.request(req)).await {
            Err(_) => Err(format!("Get \"{url}\": context deadline exceeded")),
            Ok(Err(e)) => Err(format!("Get \"{url}\": {e}")),
            Ok(Ok(r)) if (200..400).contains(&r.status().as_u16()) => Ok(()),
            Ok(Ok(r)) => Err(format!("HTTP probe failed with statuscode: {}", r.status().as_u16())),
        };
    }
    if let Some(tcp) = &probe.tcp_socket {
        let port = resolve_port(c, &tcp.port).ok_or("unknown probe port")?;
        let host = tcp.host.clone().unwrap_or_else(|| t.host.clone());
        return match tokio::time::timeout(
            timeout,
            tokio::net::TcpStream::connect((host.as_str(), port)),
        )
        .await
        {
            Err(_) => Err(format!("dial tcp {host}:{port}: i/o timeout")),
            Ok(Err(e)) => Err(format!("dial tcp {host}:{port}: {e}")),
            Ok(Ok(_)) => Ok(()),
        };
    }
    Err("probe has no handler".into())
}

/// Probes until `stop`, reporting readiness transitions and liveness failures.
pub fn spawn(
    c: Container,
    kind: Kind,
    probe: Probe,
    generation: u64,
    target: Target,
    out: mpsc::Sender<Outcome>,
    stop: CancellationToken,
) {
    tokio::spawn(async move {
        let initial = Duration::from_secs(probe.initial_delay_seconds.unwrap_or(0).max(0) as u64);
        let period = Duration::from_secs(probe.period_seconds.unwrap_or(10).max(1) as u64);
        let success_threshold = probe.success_threshold.unwrap_or(1).max(1);
        let failure_threshold = probe.failure_threshold.unwrap_or(3).max(1);
        tokio::select! { _ = stop.cancelled() => return, _ = tokio::time::sleep(initial) => {} }
        let (mut ok_run, mut fail_run) = (0, 0);
        let mut state: Option<bool> = None;
        loop {
            if out.is_closed() {
                return; // the pod worker is gone
            }
            let result = check(&c, &probe, &target).await;
            match &result {
                Ok(()) => {
                    ok_run += 1;
                    fail_run = 0;
                }
                Err(_) => {
                    fail_run += 1;
                    ok_run = 0;
                }
            }
            let next = if ok_run >= success_threshold {
                Some(true)
            } else if fail_run >= failure_threshold {
                Some(false)
            } else {
                state
            };
            let report = match kind {
                Kind::Readiness => next != state,
                Kind::Liveness => next == Some(false),
            };
            if report {
                let message = result.err().unwrap_or_default();
                let ok = next == Some(true);
                if out
                    .send(Outcome { container: c.name.clone(), generation, kind, ok, message })
                    .await
                    .is_err()
                {
                    return;
                }
                if kind == Kind::Liveness {
                    return; // the container is restarted; a new probe starts with it
                }
            }
            state = next;
            tokio::select! { _ = stop.cancelled() => return, _ = tokio::time::sleep(period) => {} }
        }
    });
}
