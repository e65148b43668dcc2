//! Container runtimes behind one small interface: `process` runs the container's command as a
//! host process in its own process group (logs to a file); `oci` runs the image's container
//! through runc (see `crate::oci`); `simulated` runs nothing.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use nix::sys::signal::Signal;
use nix::unistd::Pid;

/// How one container is started.
#[derive(Clone, Debug)]
pub struct ContainerSpec {
    pub name: String,
    pub argv: Vec<String>,
    pub env: Vec<(String, String)>,
    pub workdir: PathBuf,
    pub log_path: PathBuf,
}

/// A started container.
pub enum Handle {
    Process { child: tokio::process::Child, pid: i32 },
    Oci { runtime: rkube_oci::runc::Runtime, container: rkube_oci::runc::Container },
    Simulated { stop: tokio::sync::watch::Receiver<bool>, exit_after: Option<Duration> },
}

#[derive(Debug)]
pub struct Exit {
    pub code: i32,
    pub signal: Option<i32>,
    /// The container's memory cgroup killed it: reason `OOMKilled`.
    pub oom_killed: bool,
}

/// How to signal a started container, kept after its `Handle` went to the task that waits.
#[derive(Clone, Debug)]
pub enum Killer {
    Process(i32),
    Oci(Box<(rkube_oci::runc::Runtime, rkube_oci::runc::Container)>),
}

impl Killer {
    /// Signals the container: the whole process group of a process container; an OCI
    /// container through runc (asynchronously — the caller waits for the exit anyway).
    pub fn signal(&self, sig: Signal) {
        match self {
            Killer::Process(pid) => {
                let _ = nix::sys::signal::killpg(Pid::from_raw(*pid), sig);
            }
            Killer::Oci(both) => {
                let (rt, c) = (both.0.clone(), both.1.clone());
                tokio::spawn(async move {
                    if let Err(e) = rt.kill(&c, sig).await {
                        tracing::debug!(container = %c.id, "signal {sig}: {e}");
                    }
                });
            }
        }
    }
}

impl Handle {
    pub fn id(&self) -> String {
        match self {
            Handle::Process { pid, .. } => format!("process://{pid}"),
            Handle::Oci { container, .. } => format!("runc://{}", container.id),
            Handle::Simulated { .. } => "simulated://0".into(),
        }
    }

    /// Waits for the container to end.
    pub async fn wait(&mut self) -> Exit {
        match self {
            Handle::Process { child, .. } => match child.wait().await {
                Ok(status) => {
                    use std::os::unix::process::ExitStatusExt;
                    Exit {
                        code: status.code().unwrap_or(128 + status.signal().unwrap_or(9)),
                        signal: status.signal(),
                        oom_killed: false,
                    }
                }
                Err(_) => Exit { code: 128, signal: None, oom_killed: false },
            },
            Handle::Oci { runtime, container } => match runtime.wait(container).await {
                Ok(e) => Exit { code: e.code, signal: e.signal, oom_killed: e.oom_killed },
                Err(e) => {
                    tracing::warn!(container = %container.id, "lost the exit status: {e}");
                    Exit { code: 128, signal: None, oom_killed: false }
                }
            },
            Handle::Simulated { stop, exit_after } => {
                let after = *exit_after;
                tokio::select! {
                    _ = stop.wait_for(|s| *s) => Exit { code: 137, signal: Some(9), oom_killed: false },
                    _ = async move { match after { Some(d) => tokio::time::sleep(d).await, None => std::future::pending().await } } => Exit { code: 0, signal: None, oom_killed: false },
                }
            }
        }
    }

    /// What can signal this container once the handle is waited on.
    pub fn killer(&self) -> Option<Killer> {
        match self {
            Handle::Process { pid, .. } => Some(Killer::Process(*pid)),
            Handle::Oci { runtime, container } => {
                Some(Killer::Oci(Box::new((runtime.clone(), container.clone()))))
            }
            Handle::Simulated { .. } => None,
        }
    }
}

/// Starts a process container in its own process group; stdout and stderr are appended to
/// `log_path`, which `kubectl logs` reads through the kubelet.
pub fn start_process(spec: &ContainerSpec) -> std::io::Result<Handle> {
    let Some((program, args)) = spec.argv.split_first() else {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidInput, "no command"));
    };
    std::fs::create_dir_all(&spec.workdir)?;
    if let Some(dir) = spec.log_path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    // A restarted container keeps its previous log for `kubectl logs --previous`.
    if spec.log_path.exists() {
        let _ = std::fs::rename(&spec.log_path, spec.log_path.with_extension("log.1"));
    }
    let log = std::fs::OpenOptions::new().create(true).append(true).open(&spec.log_path)?;
    let log = std::sync::Arc::new(std::sync::Mutex::new(log));
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(args)
        .env_clear()
        .env("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
        .envs(spec.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .current_dir(&spec.workdir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    let mut child = cmd.spawn()?;
    if let Some(out) = child.stdout.take() {
        tokio::spawn(copy_lines(out, "stdout", log.clone()));
    }
    if let Some(err) = child.stderr.take() {
        tokio::spawn(copy_lines(err, "stderr", log));
    }
    let pid = child.id().map(|p| p as i32).unwrap_or(0);
    Ok(Handle::Process { child, pid })
}

/// Writes each line as CRI logs do: `<RFC 3339 nano time> <stream> F <line>`.
async fn copy_lines<R: tokio::io::AsyncRead + Unpin>(
    r: R,
    stream: &'static str,
    log: std::sync::Arc<std::sync::Mutex<std::fs::File>>,
) {
    use std::io::Write;
    use tokio::io::AsyncBufReadExt;
    let mut lines = tokio::io::BufReader::new(r).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        let ts = jiff::Timestamp::now().strftime("%Y-%m-%dT%H:%M:%S.%fZ").to_string();
        let mut f = log.lock().unwrap_or_else(|p| p.into_inner());
        let _ = writeln!(f, "{ts} {stream} F {line}");
    }
}
