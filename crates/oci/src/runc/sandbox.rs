//! A pod sandbox without a pause process: network, IPC and UTS namespaces are created by a
//! short-lived thread and pinned by bind mounts (CRI-O's "pinns"), so containers join them by path.
//!
//! Why a thread and not a child process: unshare(2) of net/ipc/uts is per task, allowed in a
//! multi-threaded process, and needs no fork (which safe Rust cannot do); the thread's namespaces
//! outlive it through the bind mounts of /proc/thread-self/ns/*.

use std::path::{Path, PathBuf};

use nix::mount::{MsFlags, mount};
use nix::sched::{CloneFlags, unshare};
use serde::{Deserialize, Serialize};

use super::{Error, Result, Runtime, check_id, io_err, sys_err, unmount_if_mounted, write_atomic};

/// What the kubelet decides about a pod's sandbox.
#[derive(Clone, Debug, Default)]
pub struct SandboxConfig {
    pub pod_uid: String,
    /// The pod's hostname (its name, or `spec.hostname`); ignored with `host_network`.
    pub hostname: String,
    pub host_network: bool,
    pub host_ipc: bool,
    /// Contents of the pod's /etc/hosts, /etc/hostname and /etc/resolv.conf.
    pub hosts: String,
    pub hostname_file: String,
    pub resolv_conf: String,
    /// Size of the pod's /dev/shm in bytes (64 MiB when `None`, as Docker and containerd).
    pub shm_size_bytes: Option<u64>,
}

/// A pod sandbox on disk. `None` namespace paths mean the host's namespace.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sandbox {
    pub pod_uid: String,
    pub hostname: String,
    pub dir: PathBuf,
    /// The pinned network namespace: the pod network plugs its veth in here.
    pub netns_path: Option<PathBuf>,
    pub ipc_path: Option<PathBuf>,
    pub uts_path: Option<PathBuf>,
    pub hosts_path: PathBuf,
    pub hostname_path: PathBuf,
    pub resolv_conf_path: PathBuf,
    /// The pod's /dev/shm (a tmpfs shared by its containers, like its IPC namespace).
    pub shm_path: PathBuf,
}

const SHM_DEFAULT: u64 = 64 << 20;

impl Runtime {
    /// Creates the pod's sandbox, or returns the one that exists (idempotent, so a kubelet that
    /// restarts mid-way can call it again).
    pub async fn run_sandbox(&self, cfg: &SandboxConfig) -> Result<Sandbox> {
        check_id("pod uid", &cfg.pod_uid)?;
        if let Some(sb) = self.sandbox(&cfg.pod_uid)?
            && sandbox_pinned(&sb)
        {
            return Ok(sb);
        }
        let dir = self.sandboxes_dir().join(&cfg.pod_uid);
        let cfg = cfg.clone();
        tokio::task::spawn_blocking(move || {
            let sb = create(&dir, &cfg);
            if sb.is_err() {
                // Leave nothing half-made behind: the next attempt starts clean.
                let _ = teardown(&dir);
            }
            sb
        })
        .await
        .map_err(|e| Error::Task(format!("sandbox task: {e}")))?
    }

    /// The sandbox recorded for `pod_uid`, if any.
    pub fn sandbox(&self, pod_uid: &str) -> Result<Option<Sandbox>> {
        check_id("pod uid", pod_uid)?;
        let file = self.sandboxes_dir().join(pod_uid).join("sandbox.json");
        match std::fs::read(&file) {
            Ok(b) => serde_json::from_slice(&b)
                .map(Some)
                .map_err(|source| Error::Json { what: format!("read {}", file.display()), source }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_err(format!("read {}", file.display()))(e)),
        }
    }

    /// Every sandbox on disk, sorted by pod uid (for recovery after a restart).
    pub fn list_sandboxes(&self) -> Result<Vec<Sandbox>> {
        let mut out = Vec::new();
        let rd = match std::fs::read_dir(self.sandboxes_dir()) {
            Ok(rd) => rd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
            Err(e) => return Err(io_err("list sandboxes")(e)),
        };
        for entry in rd.flatten() {
            let name = entry.file_name().to_string_lossy().to_string();
            if check_id("pod uid", &name).is_ok()
                && let Some(sb) = self.sandbox(&name)?
            {
                out.push(sb);
            }
        }
        out.sort_by(|a, b| a.pod_uid.cmp(&b.pod_uid));
        Ok(out)
    }

    /// Releases the pod's namespaces and /dev/shm (idempotent). Files stay until `remove_sandbox`.
    pub async fn stop_sandbox(&self, pod_uid: &str) -> Result<()> {
        check_id("pod uid", pod_uid)?;
        let dir = self.sandboxes_dir().join(pod_uid);
        tokio::task::spawn_blocking(move || unmount_all(&dir))
            .await
            .map_err(|e| Error::Task(format!("sandbox task: {e}")))?
    }

    /// Stops the sandbox and deletes its directory and the pod's cgroup (idempotent). The pod's
    /// containers must have been removed first.
    pub async fn remove_sandbox(&self, pod_uid: &str) -> Result<()> {
        check_id("pod uid", pod_uid)?;
        let dir = self.sandboxes_dir().join(pod_uid);
        let cgroup = self.pod_cgroup(pod_uid);
        tokio::task::spawn_blocking(move || {
            teardown(&dir)?;
            remove_cgroup(&cgroup)
        })
        .await
        .map_err(|e| Error::Task(format!("sandbox task: {e}")))?
    }

    /// `/<parent>/pod<uid>`: the pod's cgroup, relative to each hierarchy's root.
    pub(crate) fn pod_cgroup(&self, pod_uid: &str) -> String {
        format!("/{}/pod{}", self.cgroup_parent, pod_uid)
    }
}

fn sandbox_pinned(sb: &Sandbox) -> bool {
    [&sb.netns_path, &sb.ipc_path, &sb.uts_path].into_iter().flatten().all(|p| is_nsfs(p))
        && is_mount_point(&sb.shm_path)
}

/// True when `path` is a bind mount of a namespace (nsfs) rather than the empty file under it.
fn is_nsfs(path: &Path) -> bool {
    use nix::sys::statfs::{NSFS_MAGIC, statfs};
    statfs(path).is_ok_and(|s| s.filesystem_type() == NSFS_MAGIC)
}

fn is_mount_point(path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    let (Ok(m), Some(parent)) = (std::fs::metadata(path), path.parent()) else { return false };
    std::fs::metadata(parent).map(|p| p.dev() != m.dev()).unwrap_or(false)
}

fn create(dir: &Path, cfg: &SandboxConfig) -> Result<Sandbox> {
    let ns_dir = dir.join("ns");
    std::fs::create_dir_all(&ns_dir).map_err(io_err(format!("create {}", ns_dir.display())))?;
    let sb = Sandbox {
        pod_uid: cfg.pod_uid.clone(),
        hostname: if cfg.host_network { host_name() } else { cfg.hostname.clone() },
        dir: dir.to_path_buf(),
        netns_path: (!cfg.host_network).then(|| ns_dir.join("net")),
        ipc_path: (!cfg.host_ipc).then(|| ns_dir.join("ipc")),
        // Kubernetes gives a hostNetwork pod the node's UTS namespace (hostname) too.
        uts_path: (!cfg.host_network).then(|| ns_dir.join("uts")),
        hosts_path: dir.join("hosts"),
        hostname_path: dir.join("hostname"),
        resolv_conf_path: dir.join("resolv.conf"),
        shm_path: dir.join("shm"),
    };
    write_atomic(&sb.hosts_path, cfg.hosts.as_bytes())?;
    write_atomic(&sb.hostname_path, cfg.hostname_file.as_bytes())?;
    write_atomic(&sb.resolv_conf_path, cfg.resolv_conf.as_bytes())?;

    // A partial earlier attempt may have left mounts: start from none.
    unmount_all(dir)?;
    std::fs::create_dir_all(&sb.shm_path).map_err(io_err("create shm dir"))?;
    if cfg.host_ipc {
        mount(
            Some("/dev/shm"),
            &sb.shm_path,
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REC,
            None::<&str>,
        )
        .map_err(sys_err("bind the host's /dev/shm"))?;
    } else {
        let opts = format!("mode=1777,size={}", cfg.shm_size_bytes.unwrap_or(SHM_DEFAULT));
        mount(
            Some("shm"),
            &sb.shm_path,
            Some("tmpfs"),
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
            Some(opts.as_str()),
        )
        .map_err(sys_err("mount the pod's /dev/shm"))?;
    }

    let mut flags = CloneFlags::empty();
    let mut pins: Vec<(&'static str, PathBuf)> = Vec::new();
    if let Some(p) = &sb.netns_path {
        flags |= CloneFlags::CLONE_NEWNET;
        pins.push(("net", p.clone()));
    }
    if let Some(p) = &sb.ipc_path {
        flags |= CloneFlags::CLONE_NEWIPC;
        pins.push(("ipc", p.clone()));
    }
    if let Some(p) = &sb.uts_path {
        flags |= CloneFlags::CLONE_NEWUTS;
        pins.push(("uts", p.clone()));
    }
    for (_, p) in &pins {
        std::fs::File::create(p).map_err(io_err(format!("create {}", p.display())))?;
    }
    if !pins.is_empty() {
        let hostname = sb.hostname.clone();
        let set_host = sb.uts_path.is_some();
        let lo_up = sb.netns_path.is_some();
        std::thread::scope(|s| {
            s.spawn(move || {
                pin_namespaces(flags, &pins, set_host.then_some(hostname.as_str()), lo_up)
            })
            .join()
            .map_err(|_| Error::Task("the namespace thread panicked".into()))?
        })?;
    }
    let json = serde_json::to_vec_pretty(&sb)
        .map_err(|source| Error::Json { what: "encode sandbox.json".into(), source })?;
    write_atomic(&dir.join("sandbox.json"), &json)?;
    Ok(sb)
}

/// Runs in its own thread: moves it into new namespaces, sets them up and pins them. The thread
/// ends right after, leaving the process's other threads where they were.
fn pin_namespaces(
    flags: CloneFlags,
    pins: &[(&'static str, PathBuf)],
    hostname: Option<&str>,
    lo_up: bool,
) -> Result<()> {
    unshare(flags).map_err(sys_err("unshare the pod's namespaces"))?;
    if let Some(h) = hostname {
        nix::unistd::sethostname(h).map_err(sys_err(format!("set hostname {h:?}")))?;
    }
    if lo_up {
        loopback_up()?;
    }
    for (kind, target) in pins {
        let source = PathBuf::from(format!("/proc/thread-self/ns/{kind}"));
        mount(Some(&source), target, None::<&str>, MsFlags::MS_BIND, None::<&str>)
            .map_err(sys_err(format!("pin {kind} namespace at {}", target.display())))?;
    }
    Ok(())
}

/// Sets `lo` up in the calling thread's network namespace with one rtnetlink RTM_NEWLINK request
/// (what `ip link set lo up` sends). In a new namespace `lo` always has ifindex 1.
fn loopback_up() -> Result<()> {
    use nix::sys::socket::{
        AddressFamily, MsgFlags, SockFlag, SockProtocol, SockType, recv, send, socket,
    };
    use std::os::fd::AsRawFd;
    const RTM_NEWLINK: u16 = 16;
    const NLM_F_REQUEST: u16 = 1;
    const NLM_F_ACK: u16 = 4;
    const NLMSG_ERROR: u16 = 2;
    const IFF_UP: u32 = 1;
    let fd = socket(
        AddressFamily::Netlink,
        SockType::Raw,
        SockFlag::SOCK_CLOEXEC,
        SockProtocol::NetlinkRoute,
    )
    .map_err(sys_err("open rtnetlink socket"))?;
    let mut msg = Vec::with_capacity(32);
    msg.extend_from_slice(&32u32.to_ne_bytes()); // nlmsg_len: header + ifinfomsg
    msg.extend_from_slice(&RTM_NEWLINK.to_ne_bytes());
    msg.extend_from_slice(&(NLM_F_REQUEST | NLM_F_ACK).to_ne_bytes());
    msg.extend_from_slice(&1u32.to_ne_bytes()); // seq
    msg.extend_from_slice(&0u32.to_ne_bytes()); // pid: the kernel
    msg.extend_from_slice(&[0u8, 0u8]); // ifi_family AF_UNSPEC, padding
    msg.extend_from_slice(&0u16.to_ne_bytes()); // ifi_type
    msg.extend_from_slice(&1i32.to_ne_bytes()); // ifi_index: lo
    msg.extend_from_slice(&IFF_UP.to_ne_bytes()); // ifi_flags
    msg.extend_from_slice(&IFF_UP.to_ne_bytes()); // ifi_change
    send(fd.as_raw_fd(), &msg, MsgFlags::empty()).map_err(sys_err("send RTM_NEWLINK"))?;
    let mut buf = [0u8; 1024];
    let n =
        recv(fd.as_raw_fd(), &mut buf, MsgFlags::empty()).map_err(sys_err("read netlink ack"))?;
    // The ack is an NLMSG_ERROR whose error field (after the 16-byte header) is 0 on success.
    if n < 20 || u16::from_ne_bytes([buf[4], buf[5]]) != NLMSG_ERROR {
        return Err(io_err("set lo up")(std::io::Error::other(
            "unexpected netlink answer to RTM_NEWLINK",
        )));
    }
    let errno = i32::from_ne_bytes([buf[16], buf[17], buf[18], buf[19]]);
    if errno != 0 {
        return Err(sys_err("set lo up")(nix::errno::Errno::from_raw(-errno)));
    }
    Ok(())
}

fn host_name() -> String {
    nix::unistd::gethostname().map(|h| h.to_string_lossy().to_string()).unwrap_or_default()
}

fn unmount_all(dir: &Path) -> Result<()> {
    for kind in ["net", "ipc", "uts"] {
        unmount_if_mounted(&dir.join("ns").join(kind))?;
    }
    unmount_if_mounted(&dir.join("shm"))
}

fn teardown(dir: &Path) -> Result<()> {
    if dir.as_os_str().is_empty() || !dir.exists() {
        return Ok(());
    }
    unmount_all(dir)?;
    std::fs::remove_dir_all(dir).map_err(io_err(format!("remove {}", dir.display())))
}

/// Removes a cgroup directory (relative to each hierarchy root) from every mounted hierarchy.
pub(crate) fn remove_cgroup(rel: &str) -> Result<()> {
    crate::cgroup::remove(rel).map_err(io_err("remove cgroup"))
}
