//! One container's life through runc: bundle on disk → shim started (runc create + start) →
//! wait/kill/exec → remove; and `list` to find them all again after a kubelet restart.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::AsyncBufReadExt;

use super::rootfs::{self, RootfsKind};
use super::sandbox::Sandbox;
use super::shim::ShimConfig;
use super::spec::{BundlePaths, ContainerConfig, build_spec, resolve_user};
use super::{Error, Result, Runtime, check_id, io_err, write_atomic};

/// How a container ended. `code` is what Kubernetes reports as exitCode (128 + signal when a
/// signal killed it).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Exit {
    pub code: i32,
    pub signal: Option<i32>,
    /// The container's memory cgroup OOM-killed a process: Kubernetes' reason `OOMKilled`.
    pub oom_killed: bool,
    /// RFC 3339.
    pub finished_at: String,
}

/// A container created by this runtime.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Container {
    pub id: String,
    pub pod_uid: String,
    pub name: String,
    pub dir: PathBuf,
    pub log_path: PathBuf,
    pub cgroups_path: String,
    pub tty: bool,
    #[serde(default)]
    pub stdin: bool,
    #[serde(default)]
    pub stdin_once: bool,
    pub rootfs: RootfsKind,
    /// RFC 3339.
    pub created_at: String,
}

impl Container {
    /// Where the shim serves `kubectl attach` (see [`crate::attach`]).
    pub fn attach_socket(&self) -> PathBuf {
        self.dir.join("attach.sock")
    }

    /// The file bind-mounted at /dev/termination-log: the kubelet reads the termination message
    /// here after the container ends (and before `remove`).
    pub fn termination_log_path(&self) -> PathBuf {
        self.dir.join("termination-log")
    }
}

/// A process started by [`Runtime::exec`].
#[derive(Debug)]
pub struct ExecProcess {
    pub child: tokio::process::Child,
    /// With a tty: the pty master, to read the output from and write the input to (resize it
    /// with TIOCSWINSZ, as the kubelet's tty module does).
    pub terminal: Option<std::fs::File>,
}

/// Where a container is in its life.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ContainerStatus {
    /// Bundle ready, not started.
    Created,
    Running {
        pid: i32,
    },
    Exited(Exit),
    /// Neither running nor recorded as exited (the shim died; see [`Error::ExitLost`]).
    Unknown,
}

/// One entry of [`Runtime::list`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ContainerInfo {
    pub container: Container,
    pub status: ContainerStatus,
    /// RFC 3339, once the shim started it.
    pub started_at: Option<String>,
}

#[derive(Deserialize)]
struct RuncState {
    id: String,
    pid: i32,
}

const START_TIMEOUT: Duration = Duration::from_secs(60);
const POLL: Duration = Duration::from_millis(100);

impl Runtime {
    /// Writes the bundle of `cfg` in `sandbox`: rootfs (overlay or copy) and config.json. Nothing
    /// runs until [`Runtime::start_container`].
    pub async fn create_container(
        &self,
        sandbox: &Sandbox,
        cfg: &ContainerConfig,
    ) -> Result<Container> {
        check_id("container id", &cfg.id)?;
        let dir = self.containers_dir().join(&cfg.id);
        if dir.exists() {
            return Err(Error::Config(format!("container {} already exists", cfg.id)));
        }
        let container = Container {
            id: cfg.id.clone(),
            pod_uid: sandbox.pod_uid.clone(),
            name: cfg.name.clone(),
            dir: dir.clone(),
            log_path: cfg.log_path.clone(),
            cgroups_path: format!("{}/{}", self.pod_cgroup(&sandbox.pod_uid), cfg.id),
            tty: cfg.tty,
            stdin: cfg.stdin,
            stdin_once: cfg.stdin_once,
            rootfs: RootfsKind::Overlay,
            created_at: jiff::Timestamp::now().to_string(),
        };
        let (sandbox, cfg) = (sandbox.clone(), cfg.clone());
        tokio::task::spawn_blocking(move || {
            let made = write_bundle(container, &sandbox, &cfg);
            if made.is_err() {
                let _ = rootfs::release(&dir);
                let _ = std::fs::remove_dir_all(&dir);
            }
            made
        })
        .await
        .map_err(|e| Error::Task(format!("bundle task: {e}")))?
    }

    /// The container recorded under `id`.
    pub fn container(&self, id: &str) -> Result<Container> {
        check_id("container id", id)?;
        let file = self.containers_dir().join(id).join("container.json");
        let bytes = std::fs::read(&file).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => Error::NotFound(id.to_string()),
            _ => io_err(format!("read {}", file.display()))(e),
        })?;
        serde_json::from_slice(&bytes)
            .map_err(|source| Error::Json { what: format!("parse {}", file.display()), source })
    }

    /// Starts the container through its shim and returns the container's init pid once it runs.
    pub async fn start_container(&self, c: &Container) -> Result<i32> {
        let shim_cfg = ShimConfig {
            runc: self.runc.clone(),
            state_root: self.state_dir(),
            id: c.id.clone(),
            log_path: c.log_path.clone(),
            tty: c.tty,
            stdin: c.stdin,
            stdin_once: c.stdin_once,
            cgroups_path: c.cgroups_path.clone(),
        };
        let json = serde_json::to_vec_pretty(&shim_cfg)
            .map_err(|source| Error::Json { what: "encode shim.json".into(), source })?;
        write_atomic(&c.dir.join("shim.json"), &json)?;
        let Some((program, lead)) = self.shim.split_first() else {
            return Err(Error::Config("no shim command configured".into()));
        };
        let shim_log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(c.dir.join("shim.log"))
            .map_err(io_err("open shim.log"))?;
        let mut child = tokio::process::Command::new(program)
            .args(lead)
            .arg(&c.dir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(shim_log)
            .spawn()
            .map_err(io_err(format!("spawn shim {}", program.to_string_lossy())))?;
        let Some(out) = child.stdout.take() else {
            return Err(Error::Shim { id: c.id.clone(), message: "no status pipe".into() });
        };
        // The shim lives on after this: dropping `child` leaves it running and tokio reaps it.
        let mut line = String::new();
        let read = tokio::time::timeout(
            START_TIMEOUT,
            tokio::io::BufReader::new(out).read_line(&mut line),
        )
        .await;
        let line = line.trim().to_string();
        match read {
            Err(_) => {
                Err(Error::Shim { id: c.id.clone(), message: "no answer within 60 s".into() })
            }
            Ok(Err(e)) => Err(io_err("read the shim's status")(e)),
            Ok(Ok(_)) => {
                if let Some(pid) = line.strip_prefix("ok ") {
                    pid.parse().map_err(|_| Error::Shim {
                        id: c.id.clone(),
                        message: format!("bad answer {line:?}"),
                    })
                } else if let Some(msg) = line.strip_prefix("error ") {
                    Err(Error::Shim { id: c.id.clone(), message: msg.to_string() })
                } else {
                    let log = std::fs::read_to_string(c.dir.join("shim.log")).unwrap_or_default();
                    Err(Error::Shim {
                        id: c.id.clone(),
                        message: format!("exited without an answer: {}", log.trim()),
                    })
                }
            }
        }
    }

    /// The container's status now.
    pub async fn status(&self, c: &Container) -> Result<ContainerStatus> {
        let states = self.runc_states().await?;
        Ok(status_of(c, states.iter().find(|s| s.id == c.id)))
    }

    /// Waits for the container to end and returns how it ended. Safe to call from several places
    /// and after a kubelet restart: the shim records the exit on disk.
    ///
    /// # Caveats
    /// Polls every 100 ms. Waiting for a container that was created but never started waits
    /// until someone starts it.
    pub async fn wait(&self, c: &Container) -> Result<Exit> {
        loop {
            if let Some(exit) = read_exit(c) {
                return Ok(exit);
            }
            if shim_started(c) && !shim_alive(c) {
                // The shim may have written the file between the two checks.
                return read_exit(c).ok_or_else(|| Error::ExitLost(c.id.clone()));
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Sends `signal` to the container's init process; a container that already ended is fine.
    pub async fn kill(&self, c: &Container, signal: nix::sys::signal::Signal) -> Result<()> {
        let sig = (signal as i32).to_string();
        match self.runc(&["kill", &c.id, &sig]).await {
            Ok(_) => Ok(()),
            Err(Error::Runc { message, .. })
                if message.contains("not running")
                    || message.contains("does not exist")
                    || message.contains("process already finished") =>
            {
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// Removes the container: kills it if it still runs, deletes runc's state and cgroup,
    /// unmounts the rootfs and deletes its directory (idempotent). The log file stays: the
    /// kubelet owns it.
    pub async fn remove(&self, c: &Container) -> Result<()> {
        if shim_alive(c) {
            self.kill(c, nix::sys::signal::Signal::SIGKILL).await?;
            let _ = tokio::time::timeout(Duration::from_secs(10), self.wait(c)).await;
        }
        match self.runc(&["delete", "--force", &c.id]).await {
            Ok(_) => {}
            Err(Error::Runc { message, .. }) if message.contains("does not exist") => {}
            Err(e) => return Err(e),
        }
        let (dir, cgroup) = (c.dir.clone(), c.cgroups_path.clone());
        tokio::task::spawn_blocking(move || {
            rootfs::release(&dir)?;
            super::sandbox::remove_cgroup(&cgroup)?;
            match std::fs::remove_dir_all(&dir) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    Err(io_err(format!("remove {}", dir.display()))(e))
                }
                _ => Ok(()),
            }
        })
        .await
        .map_err(|e| Error::Task(format!("remove task: {e}")))?
    }

    /// The `runc exec` command for `argv` in the running container, stdio left to the caller
    /// (the kubelet can hand it its own pty and make it the controlling terminal). With `tty`,
    /// runc gives the process a terminal of its own and relays it to runc's stdio, which must then
    /// be a terminal too.
    pub fn exec_command(
        &self,
        c: &Container,
        argv: &[String],
        tty: bool,
    ) -> Result<tokio::process::Command> {
        if argv.is_empty() {
            return Err(Error::Config("exec needs a command".into()));
        }
        let prefix = self.exec_prefix(c, tty);
        let mut cmd = tokio::process::Command::new(&prefix[0]);
        cmd.args(&prefix[1..]).args(argv).kill_on_drop(true);
        Ok(cmd)
    }

    /// The argv that runs a command inside `c` (the command's own argv follows it): for callers
    /// that spawn it themselves, such as exec probes or an exec on the caller's own pty.
    pub fn exec_prefix(&self, c: &Container, tty: bool) -> Vec<std::ffi::OsString> {
        let mut argv: Vec<std::ffi::OsString> =
            vec![self.runc.clone().into(), "--root".into(), self.state_dir().into(), "exec".into()];
        if tty {
            argv.push("--tty".into());
        }
        argv.push(c.id.clone().into());
        argv
    }

    /// Runs `argv` in the running container, for `kubectl exec`. Without `tty` its stdin, stdout
    /// and stderr are the child's pipes; with `tty` they are one pty whose master is
    /// [`ExecProcess::terminal`]. The process is killed when the child is dropped.
    pub fn exec(&self, c: &Container, argv: &[String], tty: bool) -> Result<ExecProcess> {
        let mut cmd = self.exec_command(c, argv, tty)?;
        if !tty {
            cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
            let child = cmd.spawn().map_err(io_err("spawn runc exec"))?;
            return Ok(ExecProcess { child, terminal: None });
        }
        let pty = nix::pty::openpty(None, None).map_err(super::sys_err("open a pty"))?;
        let slave =
            |fd: &std::os::fd::OwnedFd| fd.try_clone().map(Stdio::from).map_err(io_err("dup pty"));
        cmd.stdin(slave(&pty.slave)?).stdout(slave(&pty.slave)?).stderr(slave(&pty.slave)?);
        let child = cmd.spawn().map_err(io_err("spawn runc exec"))?;
        // Only runc may hold the slave: the master reads end of file (EIO) when runc is done.
        drop(cmd);
        drop(pty.slave);
        Ok(ExecProcess { child, terminal: Some(std::fs::File::from(pty.master)) })
    }

    /// Every container on disk with its status, sorted by id: what the kubelet relists, and what
    /// it finds again after a restart.
    pub async fn list(&self) -> Result<Vec<ContainerInfo>> {
        let states = self.runc_states().await?;
        let mut out = Vec::new();
        let rd = match std::fs::read_dir(self.containers_dir()) {
            Ok(rd) => rd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
            Err(e) => return Err(io_err("list containers")(e)),
        };
        for entry in rd.flatten() {
            let id = entry.file_name().to_string_lossy().to_string();
            // A directory without its record is a create that crashed half-way; skip it.
            let Ok(container) = self.container(&id) else { continue };
            let status = status_of(&container, states.iter().find(|s| s.id == id));
            let started_at = started_at(&container);
            out.push(ContainerInfo { container, status, started_at });
        }
        out.sort_by(|a, b| a.container.id.cmp(&b.container.id));
        Ok(out)
    }

    async fn runc_states(&self) -> Result<Vec<RuncState>> {
        let out = self.runc(&["list", "--format", "json"]).await?;
        // runc prints `null` when it has no containers.
        Ok(serde_json::from_slice::<Option<Vec<RuncState>>>(&out)
            .map_err(|source| Error::Json { what: "parse runc list".into(), source })?
            .unwrap_or_default())
    }
}

fn write_bundle(mut c: Container, sandbox: &Sandbox, cfg: &ContainerConfig) -> Result<Container> {
    std::fs::create_dir_all(&c.dir).map_err(io_err(format!("create {}", c.dir.display())))?;
    c.rootfs = rootfs::prepare(&cfg.rootfs_lower, &c.dir)?;
    let paths = BundlePaths {
        rootfs: c.dir.join("rootfs"),
        termination_log: c.dir.join("termination-log"),
    };
    std::fs::File::create(&paths.termination_log).map_err(io_err("create termination-log"))?;
    let user = resolve_user(&cfg.image.user, &cfg.security, &paths.rootfs)?;
    let spec = build_spec(cfg, sandbox, &paths, &c.cgroups_path, &user)?;
    let json = serde_json::to_vec_pretty(&spec)
        .map_err(|source| Error::Json { what: "encode config.json".into(), source })?;
    write_atomic(&c.dir.join("config.json"), &json)?;
    let record = serde_json::to_vec_pretty(&c)
        .map_err(|source| Error::Json { what: "encode container.json".into(), source })?;
    write_atomic(&c.dir.join("container.json"), &record)?;
    Ok(c)
}

fn read_exit(c: &Container) -> Option<Exit> {
    serde_json::from_slice(&std::fs::read(c.dir.join("exit")).ok()?).ok()
}

fn started_at(c: &Container) -> Option<String> {
    let v: serde_json::Value =
        serde_json::from_slice(&std::fs::read(c.dir.join("started")).ok()?).ok()?;
    v["started_at"].as_str().map(str::to_string)
}

fn shim_started(c: &Container) -> bool {
    c.dir.join("shim.pid").exists()
}

/// True when the shim recorded in `shim.pid` still runs (a zombie counts as gone). The pid must
/// also still be a shim of this container: after a reboot the number may belong to anything.
fn shim_alive(c: &Container) -> bool {
    let Some(pid) = std::fs::read_to_string(c.dir.join("shim.pid"))
        .ok()
        .and_then(|s| s.trim().parse::<i32>().ok())
    else {
        return false;
    };
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { return false };
    // The state follows the command name in parentheses: "pid (comm) S ...".
    let state = stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().next());
    if matches!(state, Some("Z" | "X") | None) {
        return false;
    }
    // The shim's last argument is this container's directory.
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let dir = c.dir.as_os_str().as_encoded_bytes();
    cmdline.split(|&b| b == 0).any(|arg| arg == dir)
}

fn status_of(c: &Container, state: Option<&RuncState>) -> ContainerStatus {
    if let Some(exit) = read_exit(c) {
        ContainerStatus::Exited(exit)
    } else if shim_alive(c) {
        ContainerStatus::Running { pid: state.map(|s| s.pid).unwrap_or(0) }
    } else if !shim_started(c) {
        ContainerStatus::Created
    } else {
        ContainerStatus::Unknown
    }
}
