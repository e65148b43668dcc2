//! Container cgroups, shared by both runtimes: runc makes the oci runtime's cgroups from the
//! runtime spec and this module only reads and removes them; the process runtime makes its
//! containers' cgroups here (memory limit, CFS quota, shares/weight) and its init joins them.
//!
//! A cgroup is named by its path relative to each hierarchy's root (`/rkube/<node>/pod<uid>/c`),
//! as runc's `cgroupsPath`. On cgroup v1 (and the v1 side of a hybrid host, like this project's
//! CI machine) the memory and cpu hierarchies are used; on a pure v2 host the unified tree, with
//! the memory and cpu controllers enabled down the path.

use std::path::{Path, PathBuf};

/// One mounted cgroup hierarchy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hierarchy {
    pub mount_point: PathBuf,
    /// `None` for the v2 unified tree; the v1 controllers (`["cpu", "cpuacct"]`) otherwise.
    pub controllers: Option<Vec<String>>,
}

impl Hierarchy {
    fn has(&self, controller: &str) -> bool {
        self.controllers.as_ref().is_some_and(|c| c.iter().any(|x| x == controller))
    }
}

/// Every mounted hierarchy (v1 controllers and the v2 unified tree), from a mountinfo text.
pub fn parse_mountinfo(mountinfo: &str) -> Vec<Hierarchy> {
    let mut out: Vec<Hierarchy> = mountinfo
        .lines()
        .filter_map(|l| {
            let (pre, post) = l.split_once(" - ")?;
            let mut post = post.split_whitespace();
            let fstype = post.next()?;
            let super_opts = post.nth(1).unwrap_or("");
            let mount_point = PathBuf::from(pre.split_whitespace().nth(4)?);
            match fstype {
                "cgroup2" => Some(Hierarchy { mount_point, controllers: None }),
                "cgroup" => Some(Hierarchy {
                    mount_point,
                    controllers: Some(
                        super_opts
                            .split(',')
                            .filter(|o| !matches!(*o, "rw" | "ro"))
                            .map(String::from)
                            .collect(),
                    ),
                }),
                _ => None,
            }
        })
        .collect();
    out.sort_by(|a, b| a.mount_point.cmp(&b.mount_point));
    out.dedup_by(|a, b| a.mount_point == b.mount_point);
    out
}

/// The hierarchies mounted in this process's mount namespace.
pub fn hierarchies() -> Vec<Hierarchy> {
    parse_mountinfo(&std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default())
}

/// Mount points of every cgroup hierarchy.
pub fn roots() -> Vec<PathBuf> {
    hierarchies().into_iter().map(|h| h.mount_point).collect()
}

/// Which cgroup version enforces limits here: v1 when a v1 memory hierarchy is mounted (also on
/// hybrid hosts, whose v2 tree has no controllers), else v2 when the unified tree is mounted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Version {
    V1,
    V2,
}

pub fn version_of(hs: &[Hierarchy]) -> Option<Version> {
    if hs.iter().any(|h| h.has("memory")) {
        Some(Version::V1)
    } else if hs.iter().any(|h| h.controllers.is_none()) {
        Some(Version::V2)
    } else {
        None
    }
}

/// What a container's cgroup enforces.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Limits {
    /// `resources.limits.memory`; swap is not allowed on top of it.
    pub memory_bytes: Option<u64>,
    /// `resources.limits.cpu` in millicores: the CFS quota over a 100 ms period.
    pub cpu_limit_milli: Option<u64>,
    /// `resources.requests.cpu` in millicores: cpu.shares (v1) or cpu.weight (v2).
    pub cpu_request_milli: Option<u64>,
}

/// The v2 weight of v1 shares, as the kubelet converts them (2..262144 → 1..10000).
pub fn weight_of_shares(shares: u64) -> u64 {
    let shares = shares.clamp(2, 262_144);
    1 + ((shares - 2) * 9999) / 262_142
}

/// The files and values that set `limits` on `version`, in the order they must be written.
pub fn limit_files(version: Version, limits: &Limits) -> Vec<(&'static str, &'static str, String)> {
    let shares = crate::runc::cpu_shares(limits.cpu_request_milli);
    let mut out = Vec::new();
    match version {
        Version::V1 => {
            if let Some(m) = limits.memory_bytes {
                out.push(("memory", "memory.limit_in_bytes", m.to_string()));
                out.push(("memory", "memory.memsw.limit_in_bytes", m.to_string()));
            }
            out.push(("cpu", "cpu.shares", shares.to_string()));
            if let Some(l) = limits.cpu_limit_milli {
                out.push(("cpu", "cpu.cfs_period_us", "100000".into()));
                out.push(("cpu", "cpu.cfs_quota_us", crate::runc::cpu_quota(l).to_string()));
            }
        }
        Version::V2 => {
            if let Some(m) = limits.memory_bytes {
                out.push(("memory", "memory.max", m.to_string()));
                out.push(("memory", "memory.swap.max", "0".into()));
            }
            out.push(("cpu", "cpu.weight", weight_of_shares(shares).to_string()));
            if let Some(l) = limits.cpu_limit_milli {
                out.push(("cpu", "cpu.max", format!("{} 100000", crate::runc::cpu_quota(l))));
            }
        }
    }
    out
}

/// The directories of cgroup `rel` that this module manages: the v1 memory and cpu hierarchies,
/// or the unified tree on v2.
fn managed_dirs(hs: &[Hierarchy], rel: &str) -> Vec<(Hierarchy, PathBuf)> {
    let rel = rel.trim_start_matches('/');
    match version_of(hs) {
        Some(Version::V1) => hs
            .iter()
            .filter(|h| h.has("memory") || h.has("cpu"))
            .map(|h| (h.clone(), h.mount_point.join(rel)))
            .collect(),
        Some(Version::V2) => hs
            .iter()
            .filter(|h| h.controllers.is_none())
            .map(|h| (h.clone(), h.mount_point.join(rel)))
            .collect(),
        None => Vec::new(),
    }
}

/// Makes cgroup `rel` with `limits`. Errors name the file that could not be written; a file the
/// kernel does not offer (memsw without swap accounting, memory.swap.max without swap) is skipped.
pub fn create(rel: &str, limits: &Limits) -> std::io::Result<()> {
    let hs = hierarchies();
    let Some(version) = version_of(&hs) else {
        return Err(std::io::Error::other("no cgroup hierarchy is mounted"));
    };
    let dirs = managed_dirs(&hs, rel);
    for (h, dir) in &dirs {
        // Another node may remove a shared empty parent at the same moment: try again.
        let mut tries = 0;
        while let Err(e) = std::fs::create_dir_all(dir) {
            tries += 1;
            if tries > 3 {
                return Err(std::io::Error::new(
                    e.kind(),
                    format!("create cgroup {}: {e}", dir.display()),
                ));
            }
        }
        if version == Version::V2 {
            enable_v2_controllers(&h.mount_point, dir)?;
        }
    }
    for (controller, file, value) in limit_files(version, limits) {
        for (h, dir) in &dirs {
            if version == Version::V1 && !h.has(controller) {
                continue;
            }
            let path = dir.join(file);
            if !path.exists() && matches!(file, "memory.memsw.limit_in_bytes" | "memory.swap.max") {
                continue;
            }
            std::fs::write(&path, &value).map_err(|e| {
                std::io::Error::new(e.kind(), format!("write {value} to {}: {e}", path.display()))
            })?;
        }
    }
    Ok(())
}

/// On v2, a child gets the memory and cpu controllers only when every ancestor enables them in
/// its `cgroup.subtree_control`.
fn enable_v2_controllers(root: &Path, leaf: &Path) -> std::io::Result<()> {
    let mut ancestors: Vec<&Path> =
        leaf.ancestors().skip(1).take_while(|a| a.starts_with(root)).collect();
    ancestors.reverse();
    for dir in ancestors {
        let available = std::fs::read_to_string(dir.join("cgroup.controllers")).unwrap_or_default();
        for c in ["memory", "cpu"] {
            if available.split_whitespace().any(|x| x == c) {
                let f = dir.join("cgroup.subtree_control");
                std::fs::write(&f, format!("+{c}")).map_err(|e| {
                    std::io::Error::new(e.kind(), format!("enable {c} in {}: {e}", f.display()))
                })?;
            }
        }
    }
    Ok(())
}

/// The `cgroup.procs` files that put a process into cgroup `rel`; computed before entering a
/// container's mount namespace, whose /proc no longer describes the caller.
pub fn procs_files(rel: &str) -> Vec<PathBuf> {
    managed_dirs(&hierarchies(), rel).into_iter().map(|(_, d)| d.join("cgroup.procs")).collect()
}

/// Moves the calling process into cgroup `rel` (its children follow it), through `files` from
/// [`procs_files`]: writing 0 names the writer on v1 and v2 alike.
pub fn join_self(files: &[PathBuf]) -> std::io::Result<()> {
    for f in files {
        std::fs::write(f, "0").map_err(|e| {
            std::io::Error::new(e.kind(), format!("join cgroup {}: {e}", f.display()))
        })?;
    }
    Ok(())
}

/// OOM kills in the container's memory cgroup: `oom_kill` of memory.oom_control (v1) or
/// memory.events (v2); 0 when neither can be read.
pub fn oom_kills(rel: &str) -> u64 {
    let rel = rel.trim_start_matches('/');
    let mut files = Vec::new();
    for h in hierarchies() {
        let base = h.mount_point.join(rel);
        match &h.controllers {
            Some(_) if h.has("memory") => files.push(base.join("memory.oom_control")),
            None => files.push(base.join("memory.events")),
            _ => {}
        }
    }
    files
        .iter()
        .filter_map(|f| std::fs::read_to_string(f).ok())
        .flat_map(|text| {
            text.lines()
                .filter_map(|l| l.strip_prefix("oom_kill ")?.trim().parse::<u64>().ok())
                .collect::<Vec<_>>()
        })
        .max()
        .unwrap_or(0)
}

/// Removes cgroup `rel` and everything below it from every mounted hierarchy, deepest first
/// (cgroups go with rmdir only, once empty of processes).
pub fn remove(rel: &str) -> std::io::Result<()> {
    for root in roots() {
        let path = root.join(rel.trim_start_matches('/'));
        if !path.exists() {
            continue;
        }
        let mut dirs = vec![path.clone()];
        let mut i = 0;
        while i < dirs.len() {
            if let Ok(rd) = std::fs::read_dir(&dirs[i]) {
                dirs.extend(
                    rd.flatten()
                        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                        .map(|e| e.path()),
                );
            }
            i += 1;
        }
        for d in dirs.iter().rev() {
            match std::fs::remove_dir(d) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    return Err(std::io::Error::new(
                        e.kind(),
                        format!("remove cgroup {}: {e}", d.display()),
                    ));
                }
            }
        }
    }
    Ok(())
}

/// Removes cgroup `rel` once its last processes are gone: they may still be exiting right after
/// the container's init was reaped, so an EBUSY is retried for up to `within`.
pub fn remove_when_empty(rel: &str, within: std::time::Duration) -> std::io::Result<()> {
    let deadline = std::time::Instant::now() + within;
    loop {
        match remove(rel) {
            Ok(()) => return Ok(()),
            Err(_) if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            Err(e) => return Err(e),
        }
    }
}

/// Removes the empty directories `rel` and its parents up to (not including) the hierarchy root,
/// without touching any that still hold a cgroup: for a node's parent when its kubelet stops.
pub fn remove_empty_parents(rel: &str) {
    for root in roots() {
        let mut p = root.join(rel.trim_start_matches('/'));
        while p != root && p.starts_with(&root) {
            if std::fs::remove_dir(&p).is_err() {
                break;
            }
            if !p.pop() {
                break;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID: &str = "31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw,relatime - cgroup cgroup rw,cpu,cpuacct
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,xattr,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw,nsdelegate
";

    #[test]
    fn a_hybrid_host_enforces_through_its_v1_memory_and_cpu_hierarchies() {
        let hs = parse_mountinfo(HYBRID);
        assert_eq!(hs.len(), 4);
        assert_eq!(version_of(&hs), Some(Version::V1));
        let dirs: Vec<PathBuf> =
            managed_dirs(&hs, "/rkube/n1/podx/c").into_iter().map(|d| d.1).collect();
        assert_eq!(
            dirs,
            vec![
                PathBuf::from("/sys/fs/cgroup/cpu,cpuacct/rkube/n1/podx/c"),
                PathBuf::from("/sys/fs/cgroup/memory/rkube/n1/podx/c"),
            ]
        );
    }

    #[test]
    fn a_pure_v2_host_uses_the_unified_tree() {
        let hs = parse_mountinfo("30 23 0:27 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n");
        assert_eq!(version_of(&hs), Some(Version::V2));
        let dirs: Vec<PathBuf> = managed_dirs(&hs, "rkube/c").into_iter().map(|d| d.1).collect();
        assert_eq!(dirs, vec![PathBuf::from("/sys/fs/cgroup/rkube/c")]);
    }

    #[test]
    fn limits_become_v1_and_v2_files() {
        let l = Limits {
            memory_bytes: Some(32 << 20),
            cpu_limit_milli: Some(500),
            cpu_request_milli: Some(250),
        };
        let v1 = limit_files(Version::V1, &l);
        assert!(v1.contains(&("memory", "memory.limit_in_bytes", "33554432".into())));
        assert!(v1.contains(&("cpu", "cpu.shares", "256".into())));
        assert!(v1.contains(&("cpu", "cpu.cfs_quota_us", "50000".into())));
        // The period goes first: a quota is checked against the period in place.
        let period = v1.iter().position(|x| x.1 == "cpu.cfs_period_us").unwrap();
        let quota = v1.iter().position(|x| x.1 == "cpu.cfs_quota_us").unwrap();
        assert!(period < quota);
        let v2 = limit_files(Version::V2, &l);
        assert!(v2.contains(&("memory", "memory.max", "33554432".into())));
        assert!(v2.contains(&("cpu", "cpu.max", "50000 100000".into())));
        assert!(v2.contains(&("cpu", "cpu.weight", weight_of_shares(256).to_string())));
        // Without limits only the shares/weight are written.
        assert_eq!(limit_files(Version::V1, &Limits::default()).len(), 1);
    }

    #[test]
    fn shares_map_to_weights_as_the_kubelet_does() {
        assert_eq!(weight_of_shares(2), 1);
        assert_eq!(weight_of_shares(1024), 39);
        assert_eq!(weight_of_shares(262_144), 10_000);
    }
}
