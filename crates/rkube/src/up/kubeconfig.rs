//! Merges the cluster's admin credentials into the user's kubeconfig, as kind does, so that
//! plain `kubectl` talks to the cluster `rkube up` started without any flag.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use serde_yaml::{Mapping, Value};

/// The name used for the cluster, the user and the context that `rkube up` adds.
pub const CONTEXT: &str = "rkube";

/// `--kubeconfig`, else the first path of `$KUBECONFIG`, else `~/.kube/config`.
pub fn default_path(explicit: Option<&Path>) -> Result<PathBuf> {
    if let Some(p) = explicit {
        return Ok(p.to_path_buf());
    }
    if let Some(first) = std::env::var_os("KUBECONFIG")
        .and_then(|v| std::env::split_paths(&v).find(|p| !p.as_os_str().is_empty()))
    {
        return Ok(first);
    }
    let home = std::env::var_os("HOME").context("HOME is not set; pass --kubeconfig")?;
    Ok(PathBuf::from(home).join(".kube").join("config"))
}

/// Copies the single cluster/user of `admin` into `target` under the name `rkube`, replacing an
/// older `rkube` entry, keeping everything else, and makes `rkube` the current context.
pub fn merge(admin: &Path, target: &Path) -> Result<()> {
    let admin_doc: Value =
        read_yaml(admin)?.with_context(|| format!("{} does not exist", admin.display()))?;
    let cluster = first_entry(&admin_doc, "clusters", "cluster")?;
    let user = first_entry(&admin_doc, "users", "user")?;

    let mut doc = read_yaml(target)?.unwrap_or(Value::Null);
    if !doc.is_mapping() {
        doc = Value::Mapping(Mapping::new());
    }
    let map = doc.as_mapping_mut().context("kubeconfig is not a mapping")?;
    map.entry("apiVersion".into()).or_insert_with(|| "v1".into());
    map.entry("kind".into()).or_insert_with(|| "Config".into());
    map.entry("preferences".into()).or_insert_with(|| Value::Mapping(Mapping::new()));
    upsert_named(map, "clusters", "cluster", cluster)?;
    upsert_named(map, "users", "user", user)?;
    let mut context = Mapping::new();
    context.insert("cluster".into(), CONTEXT.into());
    context.insert("user".into(), CONTEXT.into());
    upsert_named(map, "contexts", "context", Value::Mapping(context))?;
    map.insert("current-context".into(), CONTEXT.into());
    write_private(target, &serde_yaml::to_string(&doc)?)
}

/// Removes the `rkube` entries again (used by `rkube down --forget`); a missing file is fine.
pub fn forget(target: &Path) -> Result<()> {
    let Some(mut doc) = read_yaml(target)? else { return Ok(()) };
    let Some(map) = doc.as_mapping_mut() else { return Ok(()) };
    for list in ["clusters", "users", "contexts"] {
        if let Some(Value::Sequence(seq)) = map.get_mut(list) {
            seq.retain(|e| e.get("name").and_then(Value::as_str) != Some(CONTEXT));
        }
    }
    if map.get("current-context").and_then(Value::as_str) == Some(CONTEXT) {
        map.insert("current-context".into(), "".into());
    }
    write_private(target, &serde_yaml::to_string(&doc)?)
}

fn read_yaml(path: &Path) -> Result<Option<Value>> {
    match std::fs::read_to_string(path) {
        Ok(text) if text.trim().is_empty() => Ok(None),
        Ok(text) => Ok(Some(
            serde_yaml::from_str(&text).with_context(|| format!("parsing {}", path.display()))?,
        )),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

fn first_entry(doc: &Value, list: &str, field: &str) -> Result<Value> {
    match doc.get(list).and_then(Value::as_sequence).and_then(|s| s.first()) {
        Some(entry) => {
            entry.get(field).cloned().with_context(|| format!("{list}[0] has no {field}"))
        }
        None => bail!("admin kubeconfig has no {list}"),
    }
}

fn upsert_named(map: &mut Mapping, list: &str, field: &str, body: Value) -> Result<()> {
    let seq = map.entry(list.into()).or_insert_with(|| Value::Sequence(Vec::new()));
    if seq.is_null() {
        *seq = Value::Sequence(Vec::new());
    }
    let Value::Sequence(seq) = seq else { bail!("kubeconfig field {list} is not a list") };
    seq.retain(|e| e.get("name").and_then(Value::as_str) != Some(CONTEXT));
    let mut entry = Mapping::new();
    entry.insert("name".into(), CONTEXT.into());
    entry.insert(field.into(), body);
    seq.push(Value::Mapping(entry));
    Ok(())
}

/// Kubeconfigs hold private keys: written 0600 via a temp file and rename, so a reader never
/// sees half a file.
fn write_private(path: &Path, text: &str) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension("rkube-tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("writing {}", tmp.display()))?;
    f.write_all(text.as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const ADMIN: &str = "apiVersion: v1\nkind: Config\nclusters:\n- name: x\n  cluster:\n    server: https://127.0.0.1:6443\n    certificate-authority-data: Q0E=\nusers:\n- name: admin\n  user:\n    token: t0k\ncontexts:\n- name: x\n  context: {cluster: x, user: admin}\ncurrent-context: x\n";

    fn dir() -> PathBuf {
        let d = std::env::temp_dir().join(format!("rkube-kc-{}", uuid_like()));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn uuid_like() -> String {
        use std::time::{SystemTime, UNIX_EPOCH};
        let n = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_nanos();
        format!("{n}-{}", std::process::id())
    }

    #[test]
    fn merge_into_missing_file_creates_a_current_rkube_context() {
        let d = dir();
        std::fs::write(d.join("admin"), ADMIN).unwrap();
        merge(&d.join("admin"), &d.join("config")).unwrap();
        let v: Value =
            serde_yaml::from_str(&std::fs::read_to_string(d.join("config")).unwrap()).unwrap();
        assert_eq!(v["current-context"], Value::from("rkube"));
        assert_eq!(v["clusters"][0]["cluster"]["server"], Value::from("https://127.0.0.1:6443"));
        assert_eq!(v["users"][0]["user"]["token"], Value::from("t0k"));
        std::fs::remove_dir_all(d).unwrap();
    }

    #[test]
    fn merge_keeps_other_contexts_and_replaces_an_old_rkube_entry() {
        let d = dir();
        std::fs::write(d.join("admin"), ADMIN).unwrap();
        std::fs::write(
            d.join("config"),
            "apiVersion: v1\nkind: Config\nclusters:\n- name: prod\n  cluster: {server: https://prod}\n- name: rkube\n  cluster: {server: https://old}\nusers: []\ncontexts:\n- name: prod\n  context: {cluster: prod, user: p}\ncurrent-context: prod\n",
        )
        .unwrap();
        merge(&d.join("admin"), &d.join("config")).unwrap();
        let v: Value =
            serde_yaml::from_str(&std::fs::read_to_string(d.join("config")).unwrap()).unwrap();
        let clusters = v["clusters"].as_sequence().unwrap();
        assert_eq!(clusters.len(), 2);
        assert_eq!(clusters[0]["name"], Value::from("prod"));
        assert_eq!(clusters[1]["cluster"]["server"], Value::from("https://127.0.0.1:6443"));
        assert_eq!(v["contexts"].as_sequence().unwrap().len(), 2);
        forget(&d.join("config")).unwrap();
        let v: Value =
            serde_yaml::from_str(&std::fs::read_to_string(d.join("config")).unwrap()).unwrap();
        assert_eq!(v["clusters"].as_sequence().unwrap().len(), 1);
        assert_eq!(v["current-context"], Value::from(""));
        std::fs::remove_dir_all(d).unwrap();
    }
}
