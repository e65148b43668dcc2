//! Container runtimes behind one small interface: `process` runs the container's command as a
//! host process in its own process group (logs to a rotated file) — as root inside its own PID,
//! mount, UTS and IPC namespaces and cgroup, through `crate::procinit`; `oci` runs the image's
//! container through runc (see `crate::oci`); `simulated` runs nothing.

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
    /// Namespaces and a cgroup (the kubelet runs as root); `None`: a plain host process.
    pub isolation: Option<Isolation>,
    /// The container's stdio as its spec asks (`stdin`, `stdinOnce`, `tty`), and where
    /// `kubectl attach` reaches it.
    pub stdio: ContainerStdio,
}

/// A process container's stdin and terminal, served to `kubectl attach` on `socket`.
#[derive(Clone, Debug, Default)]
pub struct ContainerStdio {
    pub stdin: bool,
    pub stdin_once: bool,
    pub tty: bool,
    pub socket: PathBuf,
}

/// Where a process container's attach socket (and stdin FIFO beside it) live.
pub fn attach_socket(pod_dir: &std::path::Path, container: &str) -> PathBuf {
    pod_dir.join("attach").join(format!("{container}.sock"))
}

/// How a process container is isolated when the kubelet runs as root.
#[derive(Clone, Debug)]
pub struct Isolation {
    /// The command that runs `crate::procinit` (the rkube binary and its hidden subcommand).
    pub init: Vec<String>,
    pub hostname: String,
    /// The container's cgroup, relative to the hierarchies' roots.
    pub cgroup: String,
    pub limits: rkube_oci::cgroup::Limits,
}

/// A started container.
pub enum Handle {
    Process { child: tokio::process::Child, pid: i32, cgroup: Option<String> },
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
    /// A host process container: its process group gets every signal.
    Process(i32),
    /// An isolated process container: its outer init passes polite signals on to the command;
    /// SIGKILL goes to the whole process group (the namespace dies with its init).
    Isolated(i32),
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
            Killer::Isolated(pid) if sig == Signal::SIGKILL => {
                let _ = nix::sys::signal::killpg(Pid::from_raw(*pid), sig);
            }
            Killer::Isolated(pid) => {
                let _ = nix::sys::signal::kill(Pid::from_raw(*pid), sig);
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
            Handle::Process { child, cgroup, .. } => {
                let mut exit = match child.wait().await {
                    Ok(status) => {
                        use std::os::unix::process::ExitStatusExt;
                        Exit {
                            code: status.code().unwrap_or(128 + status.signal().unwrap_or(9)),
                            signal: status.signal(),
                            oom_killed: false,
                        }
                    }
                    Err(_) => Exit { code: 128, signal: None, oom_killed: false },
                };
                if let Some(cg) = cgroup.take() {
                    // Read the OOM counter while the cgroup exists, then remove it (its last
                    // processes may still be on their way out).
                    exit.oom_killed = rkube_oci::cgroup::oom_kills(&cg) > 0;
                    let removed = tokio::task::spawn_blocking(move || {
                        rkube_oci::cgroup::remove_when_empty(&cg, Duration::from_secs(5))
                    })
                    .await;
                    if let Ok(Err(e)) = removed {
                        tracing::warn!("container cgroup left behind: {e}");
                    }
                }
                exit
            }
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
            Handle::Process { pid, cgroup: None, .. } => Some(Killer::Process(*pid)),
            Handle::Process { pid, cgroup: Some(_), .. } => Some(Killer::Isolated(*pid)),
            Handle::Oci { runtime, container } => {
                Some(Killer::Oci(Box::new((runtime.clone(), container.clone()))))
            }
            Handle::Simulated { .. } => None,
        }
    }
}

/// Starts a process container in its own process group; stdout and stderr go to `log_path`
/// (rotated by size), which `kubectl logs` reads through the kubelet. With `isolation`, the
/// container's cgroup is made with its limits first and the command runs under
/// `crate::procinit` in its own namespaces.
pub async fn start_process(spec: &ContainerSpec) -> std::io::Result<Handle> {
    if spec.argv.is_empty() {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidInput, "no command"));
    }
    std::fs::create_dir_all(&spec.workdir)?;
    if let Some(dir) = spec.log_path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    // A restarted container keeps its previous log for `kubectl logs --previous`.
    if spec.log_path.exists() {
        let _ = std::fs::rename(&spec.log_path, spec.log_path.with_extension("log.1"));
    }
    let log = rkube_oci::log::RotatingLog::open(
        &spec.log_path,
        rkube_oci::log::DEFAULT_MAX_SIZE,
        rkube_oci::log::DEFAULT_MAX_FILES,
    )?;
    let log = std::sync::Arc::new(std::sync::Mutex::new(log));
    // stdin and the terminal for `kubectl attach`: with a tty, the command's stdio is a pty
    // whose master the kubelet reads (and types on); with stdin, it reads a FIFO that the hub
    // holds open for writing (a path, so the isolated init can open it in its namespaces).
    let io = &spec.stdio;
    let mut pty: Option<(std::fs::File, std::os::fd::OwnedFd, PathBuf)> = None;
    let mut stdin_fifo: Option<PathBuf> = None;
    let mut input = rkube_oci::attach::Input::None;
    if io.tty {
        let (master, slave) = crate::tty::open()?;
        use std::os::fd::AsRawFd;
        let path = std::fs::read_link(format!("/proc/self/fd/{}", slave.as_raw_fd()))?;
        let master = std::fs::File::from(master);
        if io.stdin {
            input = rkube_oci::attach::Input::Terminal(master.try_clone()?);
        }
        pty = Some((master, slave, path));
    } else if io.stdin {
        let fifo = io.socket.with_extension("stdin");
        if let Some(dir) = fifo.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let _ = std::fs::remove_file(&fifo);
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600))
            .map_err(std::io::Error::from)?;
        // Read and write: opening never blocks, and the command's reads block (rather than
        // end) while no attach session is writing.
        let w = std::fs::OpenOptions::new().read(true).write(true).open(&fifo)?;
        input = rkube_oci::attach::Input::Pipe(w);
        stdin_fifo = Some(fifo);
    }
    let hub = rkube_oci::attach::Hub::listen(
        &io.socket,
        input,
        io.stdin_once,
        if io.tty { 1 } else { 2 },
    )?;
    let slave_stdio =
        |pty: &Option<(std::fs::File, std::os::fd::OwnedFd, PathBuf)>| -> std::io::Result<Stdio> {
            match pty {
                Some((_, slave, _)) => Ok(Stdio::from(slave.try_clone()?)),
                None => Ok(Stdio::piped()),
            }
        };
    // The init's stdin is a socket: the spec goes in, `ready` comes back.
    let mut init_socket = None;
    let mut cmd = match &spec.isolation {
        None => {
            let mut cmd = tokio::process::Command::new(&spec.argv[0]);
            cmd.args(&spec.argv[1..]);
            match (&pty, &stdin_fifo) {
                (Some(_), _) => {
                    cmd.stdin(slave_stdio(&pty)?);
                    crate::tty::make_controlling(&mut cmd);
                }
                (None, Some(fifo)) => {
                    cmd.stdin(Stdio::from(std::fs::File::open(fifo)?));
                }
                (None, None) => {
                    cmd.stdin(Stdio::null());
                }
            }
            cmd
        }
        Some(iso) => {
            rkube_oci::cgroup::create(&iso.cgroup, &iso.limits)?;
            let (ours, theirs) = std::os::unix::net::UnixStream::pair()?;
            init_socket = Some(ours);
            let mut cmd = tokio::process::Command::new(&iso.init[0]);
            cmd.args(&iso.init[1..])
                .arg("run")
                .stdin(Stdio::from(std::os::fd::OwnedFd::from(theirs)));
            cmd
        }
    };
    cmd.env_clear()
        .env("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
        .envs(spec.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .current_dir(&spec.workdir)
        .stdout(slave_stdio(&pty)?)
        .stderr(slave_stdio(&pty)?)
        .kill_on_drop(true);
    if pty.is_none() || spec.isolation.is_some() {
        // A terminal's session leader leads its own process group already.
        cmd.process_group(0);
    }
    if pty.is_some() {
        cmd.env("TERM", "xterm");
    }
    let spawned = cmd.spawn();
    // Our copies of the init's end of the socket and of the terminal must go, or their
    // closing would not be seen.
    drop(cmd);
    let (master, tty_path) = match pty {
        Some((master, slave, path)) => {
            drop(slave);
            (Some(master), Some(path))
        }
        None => (None, None),
    };
    let mut child = match spawned {
        Ok(c) => c,
        Err(e) => {
            hub.close();
            if let Some(iso) = &spec.isolation {
                let _ = rkube_oci::cgroup::remove(&iso.cgroup);
            }
            return Err(e);
        }
    };
    match master {
        Some(m) => copy_to_log(m.into(), "stdout", log.clone(), &hub, rkube_oci::attach::STDOUT),
        None => {
            match child.stdout.take() {
                Some(out) => copy_to_log(
                    out.into_owned_fd()?,
                    "stdout",
                    log.clone(),
                    &hub,
                    rkube_oci::attach::STDOUT,
                ),
                None => hub.reader_done(),
            }
            match child.stderr.take() {
                Some(err) => copy_to_log(
                    err.into_owned_fd()?,
                    "stderr",
                    log,
                    &hub,
                    rkube_oci::attach::STDERR,
                ),
                None => hub.reader_done(),
            }
        }
    }
    if let (Some(iso), Some(socket)) = (&spec.isolation, init_socket) {
        let init = crate::procinit::InitSpec {
            argv: spec.argv.clone(),
            hostname: iso.hostname.clone(),
            cgroup: Some(iso.cgroup.clone()),
            stdin: stdin_fifo.clone(),
            tty: tty_path,
        };
        let ready = handshake(socket, serde_json::to_vec(&init).unwrap_or_default()).await;
        if let Err(e) = ready {
            let _ = child.kill().await;
            let cg = iso.cgroup.clone();
            let _ = tokio::task::spawn_blocking(move || {
                rkube_oci::cgroup::remove_when_empty(&cg, Duration::from_secs(2))
            })
            .await;
            return Err(e);
        }
    }
    let pid = child.id().map(|p| p as i32).unwrap_or(0);
    let cgroup = spec.isolation.as_ref().map(|i| i.cgroup.clone());
    Ok(Handle::Process { child, pid, cgroup })
}

/// Sends the init its spec and waits until the container's namespaces are set up.
async fn handshake(socket: std::os::unix::net::UnixStream, spec: Vec<u8>) -> std::io::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    socket.set_nonblocking(true)?;
    let mut socket = tokio::net::UnixStream::from_std(socket)?;
    socket.write_all(&spec).await?;
    socket.shutdown().await?;
    let mut answer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(30), socket.read_to_end(&mut answer));
    match read.await {
        Ok(Ok(_)) if answer == b"ready\n" => Ok(()),
        Ok(Ok(_)) => Err(std::io::Error::other(
            "the container init failed before the command started (see the container's log)",
        )),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(std::io::Error::other("the container init did not get ready within 30s")),
    }
}

/// Copies one output stream into the CRI log on a thread of its own, as the runc shim does.
fn copy_to_log(
    fd: std::os::fd::OwnedFd,
    stream: &'static str,
    log: std::sync::Arc<std::sync::Mutex<rkube_oci::log::RotatingLog>>,
    hub: &rkube_oci::attach::Hub,
    hub_stream: u8,
) {
    let hub = hub.clone();
    use nix::fcntl::{FcntlArg, OFlag, fcntl};
    if let Ok(flags) = fcntl(&fd, FcntlArg::F_GETFL) {
        let blocking = OFlag::from_bits_truncate(flags) & !OFlag::O_NONBLOCK;
        let _ = fcntl(&fd, FcntlArg::F_SETFL(blocking));
    }
    std::thread::spawn(move || {
        let tee = rkube_oci::attach::Tee::new(std::fs::File::from(fd), hub_stream, hub);
        rkube_oci::runc::shim::copy_cri(tee, stream, &log);
    });
}
