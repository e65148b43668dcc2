//! Containers through the OCI runtime CLI (runc): a pod sandbox of pinned namespaces, an OCI bundle
//! (overlay rootfs + runtime spec) per container, and a small shim that owns each container's life.
//!
//! Layout under the runtime's root (everything survives a kubelet restart):
//! ```text
//! <root>/runc-state/                      runc --root
//! <root>/sandboxes/<pod-uid>/             sandbox.json, hosts, hostname, resolv.conf, shm/, ns/{net,ipc,uts}
//! <root>/containers/<id>/                 container.json, config.json, rootfs/, upper/, work/,
//!                                         termination-log, shim.json, shim.pid, runc.log, exit
//! ```
//! The kubelet calls [`Runtime`]: `run_sandbox` → `create_container` → `start_container` →
//! `wait` / `kill` / `exec` → `remove` → `stop_sandbox` / `remove_sandbox`; `list` and
//! `list_sandboxes` recover what exists after a restart.

mod container;
mod rootfs;
mod sandbox;
pub mod shim;
mod spec;

use std::path::{Path, PathBuf};

pub use container::{Container, ContainerInfo, ContainerStatus, ExecProcess, Exit};
pub use rootfs::RootfsKind;
pub use sandbox::{Sandbox, SandboxConfig};
pub use spec::{
    BundlePaths, ContainerConfig, ImageConfig, Mount, ProcessUser, Resources, Security, build_spec,
    cpu_quota, cpu_shares, merge_args, merge_env,
};

/// What failed while running containers through runc.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{what}: {source}")]
    Sys {
        what: String,
        #[source]
        source: nix::Error,
    },
    #[error("runc {args}: {message}")]
    Runc { args: String, message: String },
    #[error("runc is not installed (no `runc` on PATH)")]
    RuncMissing,
    #[error("invalid container config: {0}")]
    Config(String),
    #[error("build runtime spec: {0}")]
    Spec(#[from] oci_spec::OciSpecError),
    #[error("{what}: {source}")]
    Json {
        what: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("shim for container {id}: {message}")]
    Shim { id: String, message: String },
    #[error("background {0} failed")]
    Task(String),
    #[error("container {0} not found")]
    NotFound(String),
    /// The shim died without recording the exit status (e.g. the node rebooted): the container's
    /// end is unknown, as Kubernetes' `ContainerStatusUnknown`.
    #[error("exit status of container {0} was lost (its shim is gone and wrote no exit file)")]
    ExitLost(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

pub(crate) fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
    let what = what.into();
    move |source| Error::Io { what, source }
}

pub(crate) fn sys_err(what: impl Into<String>) -> impl FnOnce(nix::Error) -> Error {
    let what = what.into();
    move |source| Error::Sys { what, source }
}

/// The version line of the `runc` on PATH (`runc version 1.1.5+ds1`), or `None` when runc is
/// missing or broken, so the kubelet can report a clear node condition instead of failing pods
/// one by one.
pub fn available() -> Option<String> {
    let runc = find_runc()?;
    let out = std::process::Command::new(runc).arg("--version").output().ok()?;
    if !out.status.success() {
        return None;
    }
    String::from_utf8_lossy(&out.stdout).lines().next().map(|l| l.trim().to_string())
}

/// `runc` from PATH.
pub fn find_runc() -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|d| d.join("runc")).find(|p| p.is_file())
}

/// The runc runtime of one node.
#[derive(Clone, Debug)]
pub struct Runtime {
    root: PathBuf,
    runc: PathBuf,
    /// The program (and leading arguments) that runs [`shim::main`]; the container directory is
    /// appended. The rkube binary passes itself with its hidden shim subcommand.
    shim: Vec<std::ffi::OsString>,
    /// Parent of every pod's cgroup (`/<cgroup_parent>/pod<uid>/<container id>`).
    cgroup_parent: String,
}

impl Runtime {
    /// A runtime keeping its state under `root`, running containers through `shim`.
    pub fn new(root: impl Into<PathBuf>, shim: Vec<std::ffi::OsString>) -> Result<Self> {
        let runc = find_runc().ok_or(Error::RuncMissing)?;
        Ok(Runtime { root: root.into(), runc, shim, cgroup_parent: "rkube".into() })
    }

    /// Uses another cgroup parent than `rkube` (tests use their own, to clean up after themselves).
    pub fn with_cgroup_parent(mut self, parent: impl Into<String>) -> Self {
        self.cgroup_parent = parent.into().trim_matches('/').to_string();
        self
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn cgroup_parent(&self) -> &str {
        &self.cgroup_parent
    }

    pub(crate) fn state_dir(&self) -> PathBuf {
        self.root.join("runc-state")
    }

    pub(crate) fn sandboxes_dir(&self) -> PathBuf {
        self.root.join("sandboxes")
    }

    pub(crate) fn containers_dir(&self) -> PathBuf {
        self.root.join("containers")
    }

    /// Runs `runc --root <state> <args>` and returns its stdout; a failure carries runc's stderr.
    pub(crate) async fn runc(&self, args: &[&str]) -> Result<Vec<u8>> {
        let out = tokio::process::Command::new(&self.runc)
            .arg("--root")
            .arg(self.state_dir())
            .args(args)
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true)
            .output()
            .await
            .map_err(io_err(format!("run {}", self.runc.display())))?;
        if !out.status.success() {
            return Err(Error::Runc {
                args: args.join(" "),
                message: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            });
        }
        Ok(out.stdout)
    }
}

/// Container ids and pod uids become file names and runc ids: keep them to runc's alphabet.
pub(crate) fn check_id(kind: &str, id: &str) -> Result<()> {
    let ok = !id.is_empty()
        && id.len() <= 128
        && id.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        && !id.starts_with('.');
    if ok {
        Ok(())
    } else {
        Err(Error::Config(format!("{kind} {id:?} must match [A-Za-z0-9_.-]+")))
    }
}

/// Writes a file through a temporary name and a rename, so a crash never leaves half of it.
/// (A file bind-mounted into running containers keeps its old content there: write those once.)
pub(crate) fn write_atomic(path: &Path, data: &[u8]) -> Result<()> {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".tmp");
    let tmp = path.with_file_name(name);
    std::fs::write(&tmp, data).map_err(io_err(format!("write {}", tmp.display())))?;
    std::fs::rename(&tmp, path).map_err(io_err(format!("rename to {}", path.display())))
}

/// Unmounts `path` if it is a mount point (lazily, so a busy mount still goes); a missing path or
/// a path that is not mounted is fine, which keeps every stop idempotent.
pub(crate) fn unmount_if_mounted(path: &Path) -> Result<()> {
    use nix::errno::Errno;
    use nix::mount::{MntFlags, umount2};
    loop {
        match umount2(path, MntFlags::MNT_DETACH) {
            Ok(()) => continue, // stacked mounts: unmount until nothing is left
            Err(Errno::EINVAL | Errno::ENOENT) => return Ok(()),
            Err(e) => return Err(sys_err(format!("unmount {}", path.display()))(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_with_slashes_or_dots_first_are_rejected() {
        assert!(check_id("container id", "web-1_a.b").is_ok());
        assert!(check_id("container id", "../etc").is_err());
        assert!(check_id("container id", "a/b").is_err());
        assert!(check_id("container id", "").is_err());
        assert!(check_id("container id", ".hidden").is_err());
    }
}
