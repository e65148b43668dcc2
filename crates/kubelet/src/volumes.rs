//! Pod volumes made real on the node before containers start: emptyDir, configMap, secret,
//! downwardAPI, projected and hostPath, each a directory (or file) under the pod's directory
//! that a runtime mounts at every `volumeMount`.
//!
//! Files of configMap/secret/downwardAPI/projected volumes are written as upstream's atomic
//! writer does: a fresh timestamped directory, a `..data` symlink switched to it in one rename,
//! and one symlink per key into `..data`, so a reader never sees half an update.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path, PathBuf};

use k8s_openapi::api::core::v1::{
    ConfigMap, DownwardAPIVolumeFile, KeyToPath, Pod, Secret, Volume, VolumeMount,
};
use kube::{Api, Client};

use crate::Config;

/// A volume ready on the node.
#[derive(Clone, Debug, PartialEq)]
pub struct Ready {
    pub host_path: PathBuf,
    /// Content the kubelet writes (configMap, secret…) is mounted read-only, as upstream.
    pub read_only: bool,
}

/// One bind mount of a container: host path → path in the container.
#[derive(Clone, Debug, PartialEq)]
pub struct Mount {
    pub host: PathBuf,
    pub container: String,
    pub read_only: bool,
}

/// Relative paths inside a volume must stay inside it (`items[].path`, `subPath`).
fn safe_relative(p: &str) -> Result<PathBuf, String> {
    let path = Path::new(p);
    if p.is_empty() || path.is_absolute() {
        return Err(format!("invalid path {p:?}: must be relative"));
    }
    if path.components().any(|c| !matches!(c, Component::Normal(_))) {
        return Err(format!("invalid path {p:?}: must not contain '..'"));
    }
    Ok(path.to_path_buf())
}

/// Writes `files` (relative path → bytes, mode) into `dir` atomically, replacing what an earlier
/// write left there.
pub fn write_atomic(dir: &Path, files: &BTreeMap<PathBuf, (Vec<u8>, u32)>) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let stamp = format!("..{}", jiff::Timestamp::now().strftime("%Y_%m_%d_%H_%M_%S.%f"));
    let fresh = dir.join(&stamp);
    std::fs::create_dir_all(&fresh)?;
    for (rel, (bytes, mode)) in files {
        let path = fresh.join(rel);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::write(&path, bytes)?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(*mode))?;
    }
    let previous = std::fs::read_link(dir.join("..data")).ok();
    let tmp_link = dir.join("..data_tmp");
    let _ = std::fs::remove_file(&tmp_link);
    std::os::unix::fs::symlink(&stamp, &tmp_link)?;
    std::fs::rename(&tmp_link, dir.join("..data"))?;
    // One symlink per top-level entry, pointing through `..data`.
    let mut tops: Vec<String> = files
        .keys()
        .filter_map(|p| p.components().next())
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    tops.dedup();
    for top in &tops {
        let link = dir.join(top);
        if std::fs::symlink_metadata(&link).is_err() {
            std::os::unix::fs::symlink(Path::new("..data").join(top), &link)?;
        }
    }
    // Entries that are no longer part of the volume go away.
    for e in std::fs::read_dir(dir)?.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if !name.starts_with("..") && !tops.contains(&name) {
            let _ = std::fs::remove_file(e.path());
        }
    }
    if let Some(old) = previous.filter(|o| *o != Path::new(&stamp)) {
        let _ = std::fs::remove_dir_all(dir.join(old));
    }
    Ok(())
}

/// The files of a configMap or secret volume: every key, or only `items`, with modes.
fn key_files(
    data: &BTreeMap<String, Vec<u8>>,
    items: Option<&Vec<KeyToPath>>,
    default_mode: i32,
    kind: &str,
    ns: &str,
    name: &str,
) -> Result<BTreeMap<PathBuf, (Vec<u8>, u32)>, String> {
    let mut out = BTreeMap::new();
    match items {
        Some(items) if !items.is_empty() => {
            for it in items {
                let Some(bytes) = data.get(&it.key) else {
                    let what = if kind == "Secret" { "secret" } else { "configmap" };
                    return Err(format!("{what} references non-existent config key: {}", it.key));
                };
                let mode = it.mode.unwrap_or(default_mode) as u32 & 0o7777;
                out.insert(safe_relative(&it.path)?, (bytes.clone(), mode));
            }
        }
        _ => {
            for (k, v) in data {
                out.insert(safe_relative(k)?, (v.clone(), default_mode as u32 & 0o7777));
            }
        }
    }
    let _ = (ns, name);
    Ok(out)
}

/// A ConfigMap's `data` and `binaryData` as bytes; `None` when it does not exist.
pub(crate) async fn config_map_data(
    client: &Client,
    ns: &str,
    name: &str,
) -> Result<Option<BTreeMap<String, Vec<u8>>>, String> {
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), ns);
    let cm = api.get_opt(name).await.map_err(|e| e.to_string())?;
    Ok(cm.map(|cm| {
        let mut d: BTreeMap<String, Vec<u8>> =
            cm.data.unwrap_or_default().into_iter().map(|(k, v)| (k, v.into_bytes())).collect();
        for (k, v) in cm.binary_data.unwrap_or_default() {
            d.insert(k, v.0);
        }
        d
    }))
}

/// A Secret's `data` and `stringData` as bytes; `None` when it does not exist.
pub(crate) async fn secret_data(
    client: &Client,
    ns: &str,
    name: &str,
) -> Result<Option<BTreeMap<String, Vec<u8>>>, String> {
    let api: Api<Secret> = Api::namespaced(client.clone(), ns);
    let s = api.get_opt(name).await.map_err(|e| e.to_string())?;
    Ok(s.map(|s| {
        let mut d: BTreeMap<String, Vec<u8>> =
            s.data.unwrap_or_default().into_iter().map(|(k, v)| (k, v.0)).collect();
        for (k, v) in s.string_data.unwrap_or_default() {
            d.insert(k, v.into_bytes());
        }
        d
    }))
}

fn downward_files(
    pod: &Pod,
    items: &[DownwardAPIVolumeFile],
    default_mode: i32,
    config: &Config,
    pod_ip: &str,
) -> Result<BTreeMap<PathBuf, (Vec<u8>, u32)>, String> {
    let mut out = BTreeMap::new();
    for it in items {
        let value = if let Some(f) = &it.field_ref {
            crate::env::field(pod, &f.field_path, config, pod_ip)
                .ok_or(format!("unsupported fieldPath: {}", f.field_path))?
        } else if let Some(r) = &it.resource_field_ref {
            let c = pod
                .spec
                .as_ref()
                .and_then(|s| {
                    s.containers.iter().find(|c| Some(&c.name) == r.container_name.as_ref())
                })
                .ok_or(format!("container {:?} not found", r.container_name))?;
            crate::env::resource_field(
                c,
                &r.resource,
                r.divisor.as_ref().map(|d| d.0.as_str()),
                config,
            )?
        } else {
            continue;
        };
        let mode = it.mode.unwrap_or(default_mode) as u32 & 0o7777;
        out.insert(safe_relative(&it.path)?, (value.into_bytes(), mode));
    }
    Ok(out)
}

/// hostPath `type` checks, with upstream's wording.
fn host_path(path: &str, kind: &str) -> Result<PathBuf, String> {
    let p = PathBuf::from(path);
    let meta = std::fs::metadata(&p);
    use std::os::unix::fs::FileTypeExt;
    let fail = |what: &str| Err(format!("hostPath type check failed: {path} is not a {what}"));
    match kind {
        "" => {}
        "DirectoryOrCreate" => {
            if meta.is_err() {
                std::fs::create_dir_all(&p).map_err(|e| format!("create {path}: {e}"))?;
                let _ = std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755));
            } else if !meta.as_ref().is_ok_and(|m| m.is_dir()) {
                return fail("directory");
            }
        }
        "Directory" if !meta.as_ref().is_ok_and(|m| m.is_dir()) => return fail("directory"),
        "FileOrCreate" => {
            if meta.is_err() {
                if let Some(parent) = p.parent() {
                    std::fs::create_dir_all(parent).map_err(|e| format!("create {path}: {e}"))?;
                }
                std::fs::write(&p, b"").map_err(|e| format!("create {path}: {e}"))?;
                let _ = std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644));
            } else if !meta.as_ref().is_ok_and(|m| m.is_file()) {
                return fail("file");
            }
        }
        "File" if !meta.as_ref().is_ok_and(|m| m.is_file()) => return fail("file"),
        "Socket" if !meta.as_ref().is_ok_and(|m| m.file_type().is_socket()) => {
            return fail("socket file");
        }
        "CharDevice" if !meta.as_ref().is_ok_and(|m| m.file_type().is_char_device()) => {
            return fail("character device");
        }
        "BlockDevice" if !meta.as_ref().is_ok_and(|m| m.file_type().is_block_device()) => {
            return fail("block device");
        }
        "Directory" | "File" | "Socket" | "CharDevice" | "BlockDevice" => {}
        other => return Err(format!("hostPath type {other:?} is not supported")),
    }
    Ok(p)
}

/// Makes volume `v` of `pod` ready under `pod_dir`; the error is upstream's `MountVolume.SetUp`
/// message.
pub async fn prepare(
    client: &Client,
    pod: &Pod,
    v: &Volume,
    pod_dir: &Path,
    config: &Config,
    pod_ip: &str,
) -> Result<Ready, String> {
    let ns = pod.metadata.namespace.clone().unwrap_or_else(|| "default".into());
    let dir_for = |plugin: &str| pod_dir.join("volumes").join(plugin).join(&v.name);
    let write = |dir: &Path, files: &BTreeMap<PathBuf, (Vec<u8>, u32)>| {
        write_atomic(dir, files).map_err(|e| format!("write volume {}: {e}", v.name))
    };
    let setup_failed =
        |msg: String| format!("MountVolume.SetUp failed for volume \"{}\" : {msg}", v.name);
    if let Some(e) = &v.empty_dir {
        let dir = dir_for("kubernetes.io~empty-dir");
        std::fs::create_dir_all(&dir).map_err(|err| setup_failed(err.to_string()))?;
        let _ = std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777));
        if e.medium.as_deref() == Some("Memory") && nix::unistd::Uid::effective().is_root() {
            let mounted = std::fs::read_to_string("/proc/self/mountinfo")
                .unwrap_or_default()
                .lines()
                .any(|l| l.split_whitespace().nth(4) == Some(dir.to_string_lossy().as_ref()));
            if !mounted {
                let size = e
                    .size_limit
                    .as_ref()
                    .map(|q| format!(",size={}", q.0.replace("i", "")))
                    .unwrap_or_default();
                let opts = format!("mode=0777{size}");
                let status = std::process::Command::new("mount")
                    .args(["-t", "tmpfs", "-o", &opts, "tmpfs"])
                    .arg(&dir)
                    .status()
                    .map_err(|err| setup_failed(err.to_string()))?;
                if !status.success() {
                    return Err(setup_failed("mount tmpfs failed".into()));
                }
            }
        }
        return Ok(Ready { host_path: dir, read_only: false });
    }
    if let Some(c) = &v.config_map {
        let dir = dir_for("kubernetes.io~configmap");
        let files = match config_map_data(client, &ns, &c.name).await.map_err(setup_failed)? {
            Some(d) => key_files(
                &d,
                c.items.as_ref(),
                c.default_mode.unwrap_or(0o644),
                "ConfigMap",
                &ns,
                &c.name,
            )
            .map_err(setup_failed)?,
            None if c.optional == Some(true) => BTreeMap::new(),
            None => return Err(setup_failed(format!("configmap \"{}\" not found", c.name))),
        };
        write(&dir, &files)?;
        return Ok(Ready { host_path: dir, read_only: true });
    }
    if let Some(s) = &v.secret {
        let dir = dir_for("kubernetes.io~secret");
        let name = s.secret_name.clone().unwrap_or_default();
        let files = match secret_data(client, &ns, &name).await.map_err(setup_failed)? {
            Some(d) => key_files(
                &d,
                s.items.as_ref(),
                s.default_mode.unwrap_or(0o644),
                "Secret",
                &ns,
                &name,
            )
            .map_err(setup_failed)?,
            None if s.optional == Some(true) => BTreeMap::new(),
            None => return Err(setup_failed(format!("secret \"{name}\" not found"))),
        };
        write(&dir, &files)?;
        return Ok(Ready { host_path: dir, read_only: true });
    }
    if let Some(d) = &v.downward_api {
        let dir = dir_for("kubernetes.io~downward-api");
        let files = downward_files(
            pod,
            d.items.as_deref().unwrap_or(&[]),
            d.default_mode.unwrap_or(0o644),
            config,
            pod_ip,
        )
        .map_err(setup_failed)?;
        write(&dir, &files)?;
        return Ok(Ready { host_path: dir, read_only: true });
    }
    if let Some(p) = &v.projected {
        let dir = dir_for("kubernetes.io~projected");
        let mode = p.default_mode.unwrap_or(0o644);
        let mut files = BTreeMap::new();
        for src in p.sources.iter().flatten() {
            if let Some(c) = &src.config_map {
                match config_map_data(client, &ns, &c.name).await.map_err(setup_failed)? {
                    Some(d) => files.extend(
                        key_files(&d, c.items.as_ref(), mode, "ConfigMap", &ns, &c.name)
                            .map_err(setup_failed)?,
                    ),
                    None if c.optional == Some(true) => {}
                    None => {
                        return Err(setup_failed(format!("configmap \"{}\" not found", c.name)));
                    }
                }
            }
            if let Some(s) = &src.secret {
                match secret_data(client, &ns, &s.name).await.map_err(setup_failed)? {
                    Some(d) => files.extend(
                        key_files(&d, s.items.as_ref(), mode, "Secret", &ns, &s.name)
                            .map_err(setup_failed)?,
                    ),
                    None if s.optional == Some(true) => {}
                    None => return Err(setup_failed(format!("secret \"{}\" not found", s.name))),
                }
            }
            if let Some(d) = &src.downward_api {
                files.extend(
                    downward_files(pod, d.items.as_deref().unwrap_or(&[]), mode, config, pod_ip)
                        .map_err(setup_failed)?,
                );
            }
            if src.service_account_token.is_some() {
                // rkube's API server issues no bound tokens yet: the file is absent rather than
                // filled with something that would not authenticate.
                tracing::debug!(volume = %v.name, "serviceAccountToken projection skipped");
            }
        }
        write(&dir, &files)?;
        return Ok(Ready { host_path: dir, read_only: true });
    }
    if let Some(h) = &v.host_path {
        let p = host_path(&h.path, h.type_.as_deref().unwrap_or("")).map_err(setup_failed)?;
        return Ok(Ready { host_path: p, read_only: false });
    }
    Err(setup_failed("this volume type is not supported by rkube's kubelet".into()))
}

/// The bind mounts of one container from its `volumeMounts` (with `subPath`).
pub fn mounts_for(
    mounts: &[VolumeMount],
    ready: &BTreeMap<String, Ready>,
) -> Result<Vec<Mount>, String> {
    let mut out = Vec::new();
    for m in mounts {
        let r = ready
            .get(&m.name)
            .ok_or(format!("volume {:?} of a volumeMount is not in the pod's volumes", m.name))?;
        let mut host = r.host_path.clone();
        if let Some(sub) = m.sub_path.as_deref().filter(|s| !s.is_empty()) {
            host = host.join(safe_relative(sub)?);
            if !host.exists() {
                std::fs::create_dir_all(&host).map_err(|e| format!("subPath {sub}: {e}"))?;
            }
        }
        out.push(Mount {
            host,
            container: m.mount_path.clone(),
            read_only: m.read_only.unwrap_or(false) || r.read_only,
        });
    }
    Ok(out)
}

/// Undoes what `prepare` mounted (tmpfs emptyDirs) before the pod directory is removed.
pub fn teardown(pod_dir: &Path) {
    let root = pod_dir.join("volumes");
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    for line in mountinfo.lines() {
        if let Some(point) = line.split_whitespace().nth(4)
            && Path::new(point).starts_with(&root)
        {
            let _ = std::process::Command::new("umount").arg(point).status();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir() -> PathBuf {
        let d = std::env::temp_dir().join(format!(
            "rkube-vol-{}-{}",
            std::process::id(),
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos()
        ));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn files(pairs: &[(&str, &str, u32)]) -> BTreeMap<PathBuf, (Vec<u8>, u32)> {
        pairs.iter().map(|(p, v, m)| (PathBuf::from(p), (v.as_bytes().to_vec(), *m))).collect()
    }

    #[test]
    fn atomic_writes_switch_data_in_one_step_and_drop_removed_keys() {
        let d = temp_dir();
        write_atomic(&d, &files(&[("a", "1", 0o644), ("b", "2", 0o600)])).unwrap();
        assert_eq!(std::fs::read_to_string(d.join("a")).unwrap(), "1");
        assert_eq!(std::fs::metadata(d.join("b")).unwrap().permissions().mode() & 0o777, 0o600);
        assert!(std::fs::symlink_metadata(d.join("a")).unwrap().file_type().is_symlink());
        let first = std::fs::read_link(d.join("..data")).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(2));
        write_atomic(&d, &files(&[("a", "one", 0o644)])).unwrap();
        assert_eq!(std::fs::read_to_string(d.join("a")).unwrap(), "one");
        assert!(!d.join("b").exists(), "a removed key disappears");
        assert!(!d.join(first).exists(), "the old generation is removed");
        let _ = std::fs::remove_dir_all(d);
    }

    #[test]
    fn items_select_keys_with_their_own_paths_and_modes() {
        let data: BTreeMap<String, Vec<u8>> =
            [("k1".to_string(), b"v1".to_vec()), ("k2".to_string(), b"v2".to_vec())].into();
        let items = vec![KeyToPath { key: "k2".into(), path: "sub/two".into(), mode: Some(0o400) }];
        let f = key_files(&data, Some(&items), 0o644, "ConfigMap", "ns", "cm").unwrap();
        assert_eq!(f.len(), 1);
        assert_eq!(f[&PathBuf::from("sub/two")], (b"v2".to_vec(), 0o400));
        let missing = vec![KeyToPath { key: "nope".into(), path: "x".into(), mode: None }];
        let err = key_files(&data, Some(&missing), 0o644, "ConfigMap", "ns", "cm").unwrap_err();
        assert_eq!(err, "configmap references non-existent config key: nope");
    }

    #[test]
    fn paths_that_escape_the_volume_are_refused() {
        assert!(safe_relative("../etc/passwd").is_err());
        assert!(safe_relative("/etc/passwd").is_err());
        assert!(safe_relative("a/../../b").is_err());
        assert!(safe_relative("a/b").is_ok());
        let data: BTreeMap<String, Vec<u8>> = [("k".to_string(), b"v".to_vec())].into();
        let evil = vec![KeyToPath { key: "k".into(), path: "../../x".into(), mode: None }];
        assert!(key_files(&data, Some(&evil), 0o644, "Secret", "ns", "s").is_err());
    }

    #[test]
    fn host_path_types_are_checked_as_upstream_words_them() {
        let d = temp_dir();
        let file = d.join("f");
        std::fs::write(&file, "x").unwrap();
        let f = file.to_string_lossy().to_string();
        assert_eq!(
            host_path(&f, "Directory").unwrap_err(),
            format!("hostPath type check failed: {f} is not a directory")
        );
        assert!(host_path(&f, "File").is_ok());
        let created = d.join("new/dir").to_string_lossy().to_string();
        assert!(host_path(&created, "DirectoryOrCreate").unwrap().is_dir());
        let newfile = d.join("nf").to_string_lossy().to_string();
        assert!(host_path(&newfile, "FileOrCreate").unwrap().is_file());
        assert!(host_path(&f, "Bogus").is_err());
        let _ = std::fs::remove_dir_all(d);
    }

    #[test]
    fn volume_mounts_resolve_sub_paths_and_read_only() {
        let d = temp_dir();
        let ready: BTreeMap<String, Ready> = [
            ("cfg".to_string(), Ready { host_path: d.join("cfg"), read_only: true }),
            ("data".to_string(), Ready { host_path: d.join("data"), read_only: false }),
        ]
        .into();
        let vm = |name: &str, path: &str, sub: Option<&str>| VolumeMount {
            name: name.into(),
            mount_path: path.into(),
            sub_path: sub.map(String::from),
            ..Default::default()
        };
        let m =
            mounts_for(&[vm("cfg", "/etc/app", None), vm("data", "/var/lib/x", Some("x"))], &ready)
                .unwrap();
        assert_eq!(
            m[0],
            Mount { host: d.join("cfg"), container: "/etc/app".into(), read_only: true }
        );
        assert_eq!(m[1].host, d.join("data/x"));
        assert!(!m[1].read_only && m[1].host.is_dir());
        assert!(mounts_for(&[vm("nope", "/x", None)], &ready).is_err());
        assert!(mounts_for(&[vm("data", "/x", Some("../../etc"))], &ready).is_err());
        let _ = std::fs::remove_dir_all(d);
    }
}
