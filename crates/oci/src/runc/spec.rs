//! The OCI runtime spec (config.json) of one container, built the way containerd's CRI plugin
//! builds it for a Kubernetes container: pure, so it is unit-tested without root or runc.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use oci_spec::runtime::{
    Capability, LinuxBuilder, LinuxCapabilitiesBuilder, LinuxCpuBuilder, LinuxDeviceCgroupBuilder,
    LinuxMemoryBuilder, LinuxNamespaceBuilder, LinuxNamespaceType, LinuxPidsBuilder,
    LinuxResourcesBuilder, MountBuilder, ProcessBuilder, RootBuilder, Spec, SpecBuilder,
    UserBuilder,
};
use serde::{Deserialize, Serialize};

use super::sandbox::Sandbox;
use super::{Error, Result};

/// What the image says about running it (the `config` of an OCI image config).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageConfig {
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    /// `KEY=value` entries.
    pub env: Vec<String>,
    pub working_dir: String,
    /// `uid`, `uid:gid`, `name` or `name:group` (names resolved in the image's /etc/passwd, /etc/group).
    pub user: String,
}

/// A volume bind-mounted into the container.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mount {
    pub host: PathBuf,
    pub container: PathBuf,
    pub read_only: bool,
}

/// Resource requests and limits of the container, in Kubernetes units.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resources {
    pub cpu_request_milli: Option<u64>,
    pub cpu_limit_milli: Option<u64>,
    pub memory_limit_bytes: Option<u64>,
    pub pids_limit: Option<i64>,
}

/// The container's securityContext (merged with the pod's by the caller).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Security {
    pub run_as_user: Option<u32>,
    pub run_as_group: Option<u32>,
    pub read_only_root_fs: bool,
    pub privileged: bool,
    /// Capability names with or without `CAP_`; `ALL` means every capability.
    pub caps_add: Vec<String>,
    pub caps_drop: Vec<String>,
    /// `None` means Kubernetes' default: allowed (no `no_new_privs`).
    pub allow_privilege_escalation: Option<bool>,
}

/// One container of a pod, as the kubelet hands it to the runtime.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainerConfig {
    /// The runc container id; unique on the node.
    pub id: String,
    /// The Kubernetes container name (annotations only).
    pub name: String,
    /// The unpacked image, used read-only as the overlay's lower layer.
    pub rootfs_lower: PathBuf,
    pub image: ImageConfig,
    pub command: Vec<String>,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    pub working_dir: Option<String>,
    pub mounts: Vec<Mount>,
    pub resources: Resources,
    pub security: Security,
    /// Where the container's stdout/stderr go, in CRI log format.
    pub log_path: PathBuf,
    pub tty: bool,
    /// The container keeps a stdin open for `kubectl attach -i` (closed after the first attach
    /// session with `stdin_once`).
    pub stdin: bool,
    pub stdin_once: bool,
}

/// The process argv as Kubernetes defines it: `command` replaces the image's Entrypoint and `args`
/// replace its Cmd; a `command` without `args` drops the image's Cmd too.
pub fn merge_args(image: &ImageConfig, command: &[String], args: &[String]) -> Vec<String> {
    match (command.is_empty(), args.is_empty()) {
        (true, true) => image.entrypoint.iter().chain(&image.cmd).cloned().collect(),
        (true, false) => image.entrypoint.iter().chain(args).cloned().collect(),
        (false, true) => command.to_vec(),
        (false, false) => command.iter().chain(args).cloned().collect(),
    }
}

/// The environment: the image's first, then the container's, a later value of a name replacing an
/// earlier one in place (as containerd does); PATH defaults to the usual one when neither sets it.
pub fn merge_env(
    image_env: &[String],
    env: &[(String, String)],
    extra: &[(String, String)],
) -> Vec<String> {
    let mut out: Vec<(String, String)> = Vec::new();
    let mut put = |k: &str, v: &str| match out.iter_mut().find(|(n, _)| n == k) {
        Some(slot) => slot.1 = v.to_string(),
        None => out.push((k.to_string(), v.to_string())),
    };
    if !image_env.iter().any(|e| e.starts_with("PATH=")) {
        put("PATH", DEFAULT_PATH);
    }
    for e in image_env {
        let (k, v) = e.split_once('=').unwrap_or((e.as_str(), ""));
        put(k, v);
    }
    for (k, v) in extra.iter().chain(env) {
        put(k, v);
    }
    out.into_iter().map(|(k, v)| format!("{k}={v}")).collect()
}

const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// containerd's default capability set for containers (oci.defaultUnixCaps).
pub const DEFAULT_CAPS: &[&str] = &[
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FSETID",
    "CAP_FOWNER",
    "CAP_MKNOD",
    "CAP_NET_RAW",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETFCAP",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
    "CAP_KILL",
    "CAP_AUDIT_WRITE",
];

/// Every capability up to Linux 5.9, for `privileged` and `ALL`.
const ALL_CAPS: &[&str] = &[
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_DAC_READ_SEARCH",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_KILL",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETPCAP",
    "CAP_LINUX_IMMUTABLE",
    "CAP_NET_BIND_SERVICE",
    "CAP_NET_BROADCAST",
    "CAP_NET_ADMIN",
    "CAP_NET_RAW",
    "CAP_IPC_LOCK",
    "CAP_IPC_OWNER",
    "CAP_SYS_MODULE",
    "CAP_SYS_RAWIO",
    "CAP_SYS_CHROOT",
    "CAP_SYS_PTRACE",
    "CAP_SYS_PACCT",
    "CAP_SYS_ADMIN",
    "CAP_SYS_BOOT",
    "CAP_SYS_NICE",
    "CAP_SYS_RESOURCE",
    "CAP_SYS_TIME",
    "CAP_SYS_TTY_CONFIG",
    "CAP_MKNOD",
    "CAP_LEASE",
    "CAP_AUDIT_WRITE",
    "CAP_AUDIT_CONTROL",
    "CAP_SETFCAP",
    "CAP_MAC_OVERRIDE",
    "CAP_MAC_ADMIN",
    "CAP_SYSLOG",
    "CAP_WAKE_ALARM",
    "CAP_BLOCK_SUSPEND",
    "CAP_AUDIT_READ",
    "CAP_PERFMON",
    "CAP_BPF",
    "CAP_CHECKPOINT_RESTORE",
];

/// containerd's masked paths: kernel information a container has no business reading.
const MASKED_PATHS: &[&str] = &[
    "/proc/acpi",
    "/proc/asound",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/sys/firmware",
    "/sys/devices/virtual/powercap",
];

/// containerd's read-only paths: kernel knobs a container may read but not turn.
const READONLY_PATHS: &[&str] =
    &["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"];

fn parse_cap(name: &str) -> Result<Capability> {
    serde_json::from_value(serde_json::Value::String(name.to_string()))
        .map_err(|_| Error::Config(format!("unknown capability {name:?}")))
}

fn is_all(name: &str) -> bool {
    name.eq_ignore_ascii_case("ALL")
}

/// The capability set: containerd's defaults, then adds, then drops (as containerd applies them);
/// `ALL` in adds means every capability, in drops none.
pub(crate) fn capabilities(sec: &Security) -> Result<HashSet<Capability>> {
    let base: &[&str] = if sec.privileged { ALL_CAPS } else { DEFAULT_CAPS };
    let mut caps: HashSet<Capability> = base.iter().map(|c| parse_cap(c)).collect::<Result<_>>()?;
    if sec.privileged {
        return Ok(caps);
    }
    for add in &sec.caps_add {
        if is_all(add) {
            caps.extend(ALL_CAPS.iter().map(|c| parse_cap(c)).collect::<Result<Vec<_>>>()?);
        } else {
            caps.insert(parse_cap(add)?);
        }
    }
    for drop in &sec.caps_drop {
        if is_all(drop) {
            caps.clear();
        } else {
            caps.remove(&parse_cap(drop)?);
        }
    }
    // Adds named explicitly win over `drop: [ALL]`, as in containerd.
    if sec.caps_drop.iter().any(|d| is_all(d)) {
        for add in sec.caps_add.iter().filter(|a| !is_all(a)) {
            caps.insert(parse_cap(add)?);
        }
    }
    Ok(caps)
}

/// CPU shares from the request as Kubernetes computes them (milli * 1024 / 1000, at least 2; a
/// container without a request gets the minimum).
pub fn cpu_shares(request_milli: Option<u64>) -> u64 {
    (request_milli.unwrap_or(0) * 1024 / 1000).max(2)
}

const CPU_PERIOD_US: u64 = 100_000;

/// The CFS quota for a CPU limit over the 100 ms period, at least 1 ms as Kubernetes enforces.
pub fn cpu_quota(limit_milli: u64) -> i64 {
    ((limit_milli * CPU_PERIOD_US / 1000).max(1000)) as i64
}

/// The user the process runs as: `runAsUser`/`runAsGroup` win over the image's `USER`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ProcessUser {
    pub uid: u32,
    pub gid: u32,
    pub additional_gids: Vec<u32>,
}

/// Resolves the image's `USER` (names through the rootfs' /etc/passwd and /etc/group) and the
/// security context's overrides.
pub(crate) fn resolve_user(image_user: &str, sec: &Security, rootfs: &Path) -> Result<ProcessUser> {
    let passwd = std::fs::read_to_string(rootfs.join("etc/passwd")).unwrap_or_default();
    let group = std::fs::read_to_string(rootfs.join("etc/group")).unwrap_or_default();
    // (name, uid, gid) from passwd; (name, gid) from group.
    let users: Vec<(&str, u32, u32)> = passwd
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            Some((*f.first()?, f.get(2)?.parse().ok()?, f.get(3)?.parse().ok()?))
        })
        .collect();
    let groups: Vec<(&str, u32)> = group
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            Some((*f.first()?, f.get(2)?.parse().ok()?))
        })
        .collect();
    let (user_part, group_part) = match image_user.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (image_user, None),
    };
    let (mut uid, mut gid) = (0u32, 0u32);
    if !user_part.is_empty() {
        if let Ok(n) = user_part.parse::<u32>() {
            uid = n;
            gid = users.iter().find(|u| u.1 == n).map(|u| u.2).unwrap_or(0);
        } else {
            let u = users.iter().find(|u| u.0 == user_part).ok_or_else(|| {
                Error::Config(format!("user {user_part:?} not found in the image's /etc/passwd"))
            })?;
            (uid, gid) = (u.1, u.2);
        }
    }
    if let Some(g) = group_part.filter(|g| !g.is_empty()) {
        gid = match g.parse::<u32>() {
            Ok(n) => n,
            Err(_) => groups.iter().find(|x| x.0 == g).map(|x| x.1).ok_or_else(|| {
                Error::Config(format!("group {g:?} not found in the image's /etc/group"))
            })?,
        };
    }
    if let Some(u) = sec.run_as_user {
        uid = u;
        if sec.run_as_group.is_none() && group_part.is_none() {
            gid = users.iter().find(|x| x.1 == u).map(|x| x.2).unwrap_or(0);
        }
    }
    if let Some(g) = sec.run_as_group {
        gid = g;
    }
    Ok(ProcessUser { uid, gid, additional_gids: Vec::new() })
}

/// Where the bundle's pieces are on the host.
#[derive(Clone, Debug)]
pub struct BundlePaths {
    pub rootfs: PathBuf,
    pub termination_log: PathBuf,
}

fn bind(dest: &str, source: &Path, read_only: bool) -> Result<oci_spec::runtime::Mount> {
    let mode = if read_only { "ro" } else { "rw" };
    Ok(MountBuilder::default()
        .destination(dest)
        .typ("bind")
        .source(source)
        .options(vec!["rbind".to_string(), "rprivate".to_string(), mode.to_string()])
        .build()?)
}

fn fs_mount(
    dest: &str,
    typ: &str,
    source: &str,
    options: &[&str],
) -> Result<oci_spec::runtime::Mount> {
    Ok(MountBuilder::default()
        .destination(dest)
        .typ(typ)
        .source(source)
        .options(options.iter().map(|s| s.to_string()).collect::<Vec<_>>())
        .build()?)
}

/// The runtime spec of `cfg` in `sandbox`, its cgroup at `cgroups_path`.
pub fn build_spec(
    cfg: &ContainerConfig,
    sandbox: &Sandbox,
    paths: &BundlePaths,
    cgroups_path: &str,
    user: &ProcessUser,
) -> Result<Spec> {
    let sec = &cfg.security;
    let args = merge_args(&cfg.image, &cfg.command, &cfg.args);
    if args.is_empty() {
        return Err(Error::Config(format!(
            "container {}: no command specified (neither the pod nor the image sets one)",
            cfg.name
        )));
    }
    let mut extra = vec![("HOSTNAME".to_string(), sandbox.hostname.clone())];
    if cfg.tty {
        extra.push(("TERM".into(), "xterm".into()));
    }
    let env = merge_env(&cfg.image.env, &cfg.env, &extra);
    let cwd = cfg
        .working_dir
        .clone()
        .filter(|w| !w.is_empty())
        .or_else(|| Some(cfg.image.working_dir.clone()).filter(|w| !w.is_empty()))
        .unwrap_or_else(|| "/".into());
    if !cwd.starts_with('/') {
        return Err(Error::Config(format!("workingDir {cwd:?} must be an absolute path")));
    }

    let caps = capabilities(sec)?;
    let caps = LinuxCapabilitiesBuilder::default()
        .bounding(caps.clone())
        .effective(caps.clone())
        .permitted(caps)
        .inheritable(HashSet::new())
        .ambient(HashSet::new())
        .build()?;
    let mut user_b = UserBuilder::default().uid(user.uid).gid(user.gid);
    if !user.additional_gids.is_empty() {
        user_b = user_b.additional_gids(user.additional_gids.clone());
    }
    let no_new_privs = !sec.privileged && sec.allow_privilege_escalation == Some(false);
    let process = ProcessBuilder::default()
        .terminal(false) // a tty is the shim's pty, handed to runc as plain stdio
        .user(user_b.build()?)
        .args(args)
        .env(env)
        .cwd(cwd)
        .capabilities(caps)
        .no_new_privileges(no_new_privs)
        .build()?;
    // No rlimits of our own (the default spec caps open files at 1024): the container inherits
    // the node's, as under containerd.
    let mut process = process;
    process.set_rlimits(None);

    let sys_opts: &[&str] = if sec.privileged {
        &["nosuid", "noexec", "nodev", "rw"]
    } else {
        &["nosuid", "noexec", "nodev", "ro"]
    };
    let mut mounts = vec![
        fs_mount("/proc", "proc", "proc", &["nosuid", "noexec", "nodev"])?,
        fs_mount("/dev", "tmpfs", "tmpfs", &["nosuid", "strictatime", "mode=755", "size=65536k"])?,
        fs_mount(
            "/dev/pts",
            "devpts",
            "devpts",
            &["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"],
        )?,
        fs_mount("/dev/mqueue", "mqueue", "mqueue", &["nosuid", "noexec", "nodev"])?,
        fs_mount("/sys", "sysfs", "sysfs", sys_opts)?,
        fs_mount(
            "/sys/fs/cgroup",
            "cgroup",
            "cgroup",
            &["nosuid", "noexec", "nodev", "relatime", if sec.privileged { "rw" } else { "ro" }],
        )?,
        bind("/dev/shm", &sandbox.shm_path, false)?,
        bind("/etc/hosts", &sandbox.hosts_path, false)?,
        bind("/etc/hostname", &sandbox.hostname_path, false)?,
        bind("/etc/resolv.conf", &sandbox.resolv_conf_path, false)?,
        bind("/dev/termination-log", &paths.termination_log, false)?,
    ];
    for m in &cfg.mounts {
        if !m.container.is_absolute() {
            return Err(Error::Config(format!(
                "mount path {} must be absolute",
                m.container.display()
            )));
        }
        mounts.push(bind(&m.container.to_string_lossy(), &m.host, m.read_only)?);
    }

    let ns = |typ: LinuxNamespaceType, path: Option<&PathBuf>| {
        let b = LinuxNamespaceBuilder::default().typ(typ);
        match path {
            Some(p) => b.path(p.clone()).build(),
            None => b.build(),
        }
    };
    let mut namespaces =
        vec![ns(LinuxNamespaceType::Pid, None)?, ns(LinuxNamespaceType::Mount, None)?];
    // A sandbox without a namespace path shares the host's (hostNetwork, hostIPC): runc then
    // joins nothing, which is exactly leaving the type out.
    if let Some(p) = &sandbox.netns_path {
        namespaces.push(ns(LinuxNamespaceType::Network, Some(p))?);
    }
    if let Some(p) = &sandbox.ipc_path {
        namespaces.push(ns(LinuxNamespaceType::Ipc, Some(p))?);
    }
    if let Some(p) = &sandbox.uts_path {
        namespaces.push(ns(LinuxNamespaceType::Uts, Some(p))?);
    }

    let r = &cfg.resources;
    let mut cpu = LinuxCpuBuilder::default().shares(cpu_shares(r.cpu_request_milli));
    if let Some(limit) = r.cpu_limit_milli {
        cpu = cpu.quota(cpu_quota(limit)).period(CPU_PERIOD_US);
    }
    let devices = if sec.privileged {
        vec![LinuxDeviceCgroupBuilder::default().allow(true).access("rwm").build()?]
    } else {
        // Deny everything; runc adds its allow-list of the standard devices (null, zero, tty…).
        vec![LinuxDeviceCgroupBuilder::default().allow(false).access("rwm").build()?]
    };
    let mut resources = LinuxResourcesBuilder::default().cpu(cpu.build()?).devices(devices);
    if let Some(mem) = r.memory_limit_bytes {
        let mem = i64::try_from(mem)
            .map_err(|_| Error::Config(format!("memory limit {mem} too large")))?;
        // swap = limit: no swap on top of the limit, as the kubelet configures it on cgroup v1.
        resources = resources.memory(LinuxMemoryBuilder::default().limit(mem).swap(mem).build()?);
    }
    if let Some(pids) = r.pids_limit {
        resources = resources.pids(LinuxPidsBuilder::default().limit(pids).build()?);
    }

    let mut linux = LinuxBuilder::default()
        .namespaces(namespaces)
        .cgroups_path(PathBuf::from(cgroups_path))
        .resources(resources.build()?)
        .build()?;
    // The builders start from oci-spec's defaults (runc's example spec): replace, never inherit.
    if sec.privileged {
        linux.set_masked_paths(None).set_readonly_paths(None);
    } else {
        linux
            .set_masked_paths(Some(MASKED_PATHS.iter().map(|s| s.to_string()).collect()))
            .set_readonly_paths(Some(READONLY_PATHS.iter().map(|s| s.to_string()).collect()));
    }

    let annotations = [
        ("io.kubernetes.cri.container-type", "container"),
        ("io.kubernetes.cri.container-name", cfg.name.as_str()),
        ("io.kubernetes.cri.sandbox-id", sandbox.pod_uid.as_str()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect::<std::collections::HashMap<_, _>>();

    let mut spec = SpecBuilder::default()
        .version("1.0.2")
        .root(RootBuilder::default().path(&paths.rootfs).readonly(sec.read_only_root_fs).build()?)
        .mounts(mounts)
        .process(process)
        .linux(linux)
        .annotations(annotations)
        .build()?;
    // The default spec names a hostname ("youki"): runc refuses a hostname when the container
    // joins the sandbox's UTS namespace, which already has the pod's.
    spec.set_hostname(None);
    Ok(spec)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    fn image() -> ImageConfig {
        ImageConfig {
            entrypoint: s(&["/entry"]),
            cmd: s(&["serve", "--port=80"]),
            env: s(&["PATH=/image/bin", "A=image", "B=image"]),
            working_dir: "/srv".into(),
            user: String::new(),
        }
    }

    fn sandbox() -> Sandbox {
        Sandbox {
            pod_uid: "uid-1".into(),
            hostname: "web-0".into(),
            dir: "/r/sandboxes/uid-1".into(),
            netns_path: Some("/r/sandboxes/uid-1/ns/net".into()),
            ipc_path: Some("/r/sandboxes/uid-1/ns/ipc".into()),
            uts_path: Some("/r/sandboxes/uid-1/ns/uts".into()),
            hosts_path: "/r/sandboxes/uid-1/hosts".into(),
            hostname_path: "/r/sandboxes/uid-1/hostname".into(),
            resolv_conf_path: "/r/sandboxes/uid-1/resolv.conf".into(),
            shm_path: "/r/sandboxes/uid-1/shm".into(),
        }
    }

    fn spec_json(cfg: &ContainerConfig) -> Value {
        let paths = BundlePaths {
            rootfs: "/r/c/rootfs".into(),
            termination_log: "/r/c/termination-log".into(),
        };
        let spec =
            build_spec(cfg, &sandbox(), &paths, "/rkube/poduid-1/c1", &ProcessUser::default())
                .unwrap();
        serde_json::to_value(spec).unwrap()
    }

    #[test]
    fn no_command_and_no_args_runs_entrypoint_then_cmd() {
        assert_eq!(merge_args(&image(), &[], &[]), s(&["/entry", "serve", "--port=80"]));
    }

    #[test]
    fn args_alone_replace_cmd_and_keep_entrypoint() {
        assert_eq!(merge_args(&image(), &[], &s(&["x"])), s(&["/entry", "x"]));
    }

    #[test]
    fn command_alone_drops_entrypoint_and_cmd() {
        assert_eq!(merge_args(&image(), &s(&["/bin/sh"]), &[]), s(&["/bin/sh"]));
    }

    #[test]
    fn command_and_args_replace_both() {
        assert_eq!(
            merge_args(&image(), &s(&["/bin/sh", "-c"]), &s(&["echo"])),
            s(&["/bin/sh", "-c", "echo"])
        );
    }

    #[test]
    fn container_env_overrides_image_env_in_place() {
        let env =
            merge_env(&image().env, &[("B".into(), "pod".into()), ("C".into(), "pod".into())], &[]);
        assert_eq!(env, s(&["PATH=/image/bin", "A=image", "B=pod", "C=pod"]));
    }

    #[test]
    fn path_defaults_when_the_image_has_none() {
        let env = merge_env(&[], &[], &[]);
        assert_eq!(env, s(&[&format!("PATH={DEFAULT_PATH}")]));
    }

    #[test]
    fn spec_json_carries_the_merged_process_namespaces_and_limits() {
        let cfg = ContainerConfig {
            id: "c1".into(),
            name: "app".into(),
            image: image(),
            args: s(&["--verbose"]),
            env: vec![("A".into(), "pod".into())],
            resources: Resources {
                cpu_request_milli: Some(250),
                cpu_limit_milli: Some(500),
                memory_limit_bytes: Some(64 << 20),
                pids_limit: Some(100),
            },
            mounts: vec![Mount {
                host: "/data".into(),
                container: "/var/data".into(),
                read_only: true,
            }],
            ..Default::default()
        };
        let v = spec_json(&cfg);
        assert_eq!(v["process"]["args"], json!(["/entry", "--verbose"]));
        assert_eq!(
            v["process"]["env"],
            json!(["PATH=/image/bin", "A=pod", "B=image", "HOSTNAME=web-0"])
        );
        assert_eq!(v["process"]["cwd"], json!("/srv"));
        assert_eq!(v["root"], json!({"path": "/r/c/rootfs", "readonly": false}));
        let ns = v["linux"]["namespaces"].as_array().unwrap();
        assert!(ns.contains(&json!({"type": "pid"})));
        assert!(ns.contains(&json!({"type": "mount"})));
        assert!(ns.contains(&json!({"type": "network", "path": "/r/sandboxes/uid-1/ns/net"})));
        assert!(ns.contains(&json!({"type": "ipc", "path": "/r/sandboxes/uid-1/ns/ipc"})));
        assert!(ns.contains(&json!({"type": "uts", "path": "/r/sandboxes/uid-1/ns/uts"})));
        assert_eq!(v["linux"]["cgroupsPath"], json!("/rkube/poduid-1/c1"));
        let res = &v["linux"]["resources"];
        assert_eq!(res["cpu"]["shares"], json!(256));
        assert_eq!(res["cpu"]["quota"], json!(50_000));
        assert_eq!(res["cpu"]["period"], json!(100_000));
        assert_eq!(res["memory"]["limit"], json!(64 << 20));
        assert_eq!(res["pids"]["limit"], json!(100));
        let mounts = v["mounts"].as_array().unwrap();
        let dest = |d: &str| mounts.iter().find(|m| m["destination"] == json!(d)).cloned();
        for d in [
            "/proc",
            "/dev",
            "/dev/pts",
            "/dev/shm",
            "/sys",
            "/etc/hosts",
            "/etc/hostname",
            "/etc/resolv.conf",
            "/dev/termination-log",
        ] {
            assert!(dest(d).is_some(), "mount {d} missing");
        }
        assert_eq!(dest("/etc/hosts").unwrap()["source"], json!("/r/sandboxes/uid-1/hosts"));
        assert!(dest("/var/data").unwrap()["options"].as_array().unwrap().contains(&json!("ro")));
        assert!(v["linux"]["maskedPaths"].as_array().unwrap().contains(&json!("/proc/kcore")));
        assert!(v["linux"]["readonlyPaths"].as_array().unwrap().contains(&json!("/proc/sys")));
        let caps = v["process"]["capabilities"]["bounding"].as_array().unwrap();
        assert_eq!(caps.len(), DEFAULT_CAPS.len());
        assert!(caps.contains(&json!("CAP_NET_BIND_SERVICE")));
        assert!(!caps.contains(&json!("CAP_SYS_ADMIN")));
    }

    #[test]
    fn host_network_sandbox_leaves_network_and_uts_namespaces_to_the_host() {
        let mut sb = sandbox();
        sb.netns_path = None;
        sb.uts_path = None;
        let cfg = ContainerConfig { command: s(&["true"]), ..Default::default() };
        let paths = BundlePaths { rootfs: "/r".into(), termination_log: "/t".into() };
        let v = serde_json::to_value(
            build_spec(&cfg, &sb, &paths, "/x", &ProcessUser::default()).unwrap(),
        )
        .unwrap();
        let types: Vec<&str> = v["linux"]["namespaces"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| n["type"].as_str().unwrap())
            .collect();
        assert_eq!(types, vec!["pid", "mount", "ipc"]);
    }

    #[test]
    fn a_container_without_any_command_is_a_config_error() {
        let cfg = ContainerConfig::default();
        let paths = BundlePaths { rootfs: "/r".into(), termination_log: "/t".into() };
        assert!(matches!(
            build_spec(&cfg, &sandbox(), &paths, "/x", &ProcessUser::default()),
            Err(Error::Config(_))
        ));
    }

    #[test]
    fn cpu_shares_follow_the_request_with_a_minimum_of_two() {
        assert_eq!(cpu_shares(None), 2);
        assert_eq!(cpu_shares(Some(1)), 2);
        assert_eq!(cpu_shares(Some(1000)), 1024);
        assert_eq!(cpu_quota(1), 1000);
        assert_eq!(cpu_quota(1500), 150_000);
    }

    #[test]
    fn caps_add_and_drop_apply_over_the_defaults() {
        let sec = Security {
            caps_add: s(&["NET_ADMIN"]),
            caps_drop: s(&["CAP_KILL"]),
            ..Default::default()
        };
        let caps = capabilities(&sec).unwrap();
        assert!(caps.contains(&parse_cap("CAP_NET_ADMIN").unwrap()));
        assert!(!caps.contains(&parse_cap("CAP_KILL").unwrap()));
        let sec = Security {
            caps_add: s(&["NET_BIND_SERVICE"]),
            caps_drop: s(&["ALL"]),
            ..Default::default()
        };
        let caps = capabilities(&sec).unwrap();
        assert_eq!(caps.len(), 1);
        assert!(capabilities(&Security { caps_add: s(&["NOPE"]), ..Default::default() }).is_err());
    }

    #[test]
    fn privileged_gets_every_capability_and_no_masked_paths() {
        let cfg = ContainerConfig {
            command: s(&["true"]),
            security: Security { privileged: true, ..Default::default() },
            ..Default::default()
        };
        let v = spec_json(&cfg);
        assert_eq!(
            v["process"]["capabilities"]["bounding"].as_array().unwrap().len(),
            ALL_CAPS.len()
        );
        assert!(v["linux"].get("maskedPaths").is_none());
    }

    #[test]
    fn disallowed_privilege_escalation_sets_no_new_privileges_and_read_only_root_is_kept() {
        let cfg = ContainerConfig {
            command: s(&["true"]),
            security: Security {
                allow_privilege_escalation: Some(false),
                read_only_root_fs: true,
                ..Default::default()
            },
            ..Default::default()
        };
        let v = spec_json(&cfg);
        assert_eq!(v["process"]["noNewPrivileges"], json!(true));
        assert_eq!(v["root"]["readonly"], json!(true));
    }

    #[test]
    fn image_user_names_resolve_through_the_rootfs_and_run_as_user_wins() {
        let dir = std::env::temp_dir().join(format!("rkube-oci-user-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("etc")).unwrap();
        std::fs::write(
            dir.join("etc/passwd"),
            "root:x:0:0::/root:/bin/sh\nweb:x:33:34::/:/bin/false\n",
        )
        .unwrap();
        std::fs::write(dir.join("etc/group"), "root:x:0:\nstaff:x:50:\n").unwrap();
        let none = Security::default();
        assert_eq!(
            resolve_user("web", &none, &dir).unwrap(),
            ProcessUser { uid: 33, gid: 34, additional_gids: vec![] }
        );
        assert_eq!(resolve_user("web:staff", &none, &dir).unwrap().gid, 50);
        assert_eq!(
            resolve_user("1000:7", &none, &dir).unwrap(),
            ProcessUser { uid: 1000, gid: 7, additional_gids: vec![] }
        );
        let over = Security { run_as_user: Some(33), ..Default::default() };
        assert_eq!(resolve_user("", &over, &dir).unwrap().gid, 34);
        assert!(resolve_user("nobody", &none, &dir).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
