//! A container's environment as the kubelet builds it: `envFrom` ConfigMaps and Secrets first,
//! then `env` in order (values with `$(VAR)` expansion, the downward API, resource fields,
//! ConfigMap and Secret keys). A missing reference is a `CreateContainerConfigError` with
//! upstream's message, unless marked optional.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Container, Pod};
use kube::Client;

use crate::Config;

/// What the pod's environment may refer to besides the pod itself.
pub struct Sources<'a> {
    pub client: &'a Client,
    pub config: &'a Config,
    /// The pod's own address (the node's on the host network).
    pub pod_ip: &'a str,
}

/// Fetches ConfigMaps and Secrets at most once per environment.
#[derive(Default)]
struct Fetched {
    config_maps: BTreeMap<String, Option<BTreeMap<String, String>>>,
    secrets: BTreeMap<String, Option<BTreeMap<String, String>>>,
}

impl Fetched {
    async fn config_map(
        &mut self,
        s: &Sources<'_>,
        ns: &str,
        name: &str,
    ) -> Result<Option<&BTreeMap<String, String>>, String> {
        if !self.config_maps.contains_key(name) {
            let data = crate::volumes::config_map_data(s.client, ns, name).await?;
            self.config_maps.insert(name.to_string(), data.map(as_text));
        }
        Ok(self.config_maps.get(name).and_then(Option::as_ref))
    }

    async fn secret(
        &mut self,
        s: &Sources<'_>,
        ns: &str,
        name: &str,
    ) -> Result<Option<&BTreeMap<String, String>>, String> {
        if !self.secrets.contains_key(name) {
            let data = crate::volumes::secret_data(s.client, ns, name).await?;
            self.secrets.insert(name.to_string(), data.map(as_text));
        }
        Ok(self.secrets.get(name).and_then(Option::as_ref))
    }
}

/// Environment values are text; bytes that are not UTF-8 are replaced, as elsewhere in rkube.
fn as_text(data: BTreeMap<String, Vec<u8>>) -> BTreeMap<String, String> {
    data.into_iter().map(|(k, v)| (k, String::from_utf8_lossy(&v).into_owned())).collect()
}

/// Environment variable names upstream accepts from `envFrom` (C identifiers, plus `-` and `.`).
fn valid_env_name(name: &str) -> bool {
    !name.is_empty()
        && !name.starts_with(|c: char| c.is_ascii_digit())
        && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
}

/// `$(VAR)` references to variables defined before, as upstream expands them; `$$` escapes.
pub fn expand(s: &str, env: &[(String, String)]) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        if let Some(tail) = after.strip_prefix('$') {
            out.push('$');
            rest = tail;
        } else if let Some(inner) = after.strip_prefix('(')
            && let Some(end) = inner.find(')')
        {
            let name = &inner[..end];
            match env.iter().rev().find(|(k, _)| k == name) {
                Some((_, v)) => out.push_str(v),
                None => {
                    out.push_str("$(");
                    out.push_str(name);
                    out.push(')');
                }
            }
            rest = &inner[end + 1..];
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

/// A downward-API field of the pod.
pub fn field(pod: &Pod, path: &str, config: &Config, pod_ip: &str) -> Option<String> {
    let m = &pod.metadata;
    let quoted =
        |prefix: &str| path.strip_prefix(prefix)?.strip_suffix("']").map(|k| k.to_string());
    if let Some(k) = quoted("metadata.labels['") {
        return Some(m.labels.as_ref()?.get(&k).cloned().unwrap_or_default());
    }
    if let Some(k) = quoted("metadata.annotations['") {
        return Some(m.annotations.as_ref()?.get(&k).cloned().unwrap_or_default());
    }
    let map_text = |map: &Option<BTreeMap<String, String>>| {
        map.iter().flatten().map(|(k, v)| format!("{k}=\"{v}\"")).collect::<Vec<_>>().join("\n")
    };
    Some(match path {
        "metadata.name" => m.name.clone().unwrap_or_default(),
        "metadata.namespace" => m.namespace.clone().unwrap_or_default(),
        "metadata.uid" => m.uid.clone().unwrap_or_default(),
        "metadata.labels" => map_text(&m.labels),
        "metadata.annotations" => map_text(&m.annotations),
        "spec.nodeName" => config.node_name.clone(),
        "spec.serviceAccountName" => {
            pod.spec.as_ref().and_then(|s| s.service_account_name.clone()).unwrap_or_default()
        }
        "status.hostIP" | "status.hostIPs" => config.node_ip.clone(),
        "status.podIP" | "status.podIPs" => pod_ip.to_string(),
        _ => return None,
    })
}

/// `resourceFieldRef`: a container's request or limit divided by `divisor`, rounded up; a
/// missing CPU or memory limit is the node's allocatable, as upstream.
pub fn resource_field(
    c: &Container,
    resource: &str,
    divisor: Option<&str>,
    config: &Config,
) -> Result<String, String> {
    use rkube_client::quantity::parse_milli;
    let r = c.resources.as_ref();
    let (kind, name) =
        resource.split_once('.').ok_or(format!("unsupported container resource: {resource}"))?;
    let set = match kind {
        "limits" => r.and_then(|r| r.limits.as_ref()),
        "requests" => r.and_then(|r| r.requests.as_ref()),
        _ => return Err(format!("unsupported container resource: {resource}")),
    };
    let milli = match set.and_then(|m| m.get(name)).and_then(|q| parse_milli(&q.0)) {
        Some(v) => v,
        None => match (kind, name) {
            ("limits", "cpu") => {
                let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
                cores as i128 * 1000 - config.reserved_cpu_milli as i128
            }
            ("limits", "memory") => {
                crate::node::meminfo_total() as i128 * 1000
                    - config.reserved_memory_bytes as i128 * 1000
            }
            _ => 0,
        },
    };
    let div = parse_milli(divisor.filter(|d| !d.is_empty()).unwrap_or("1"))
        .filter(|d| *d > 0)
        .ok_or(format!("invalid divisor for {resource}"))?;
    Ok(((milli + div - 1) / div).to_string())
}

/// The environment of container `c` of `pod`, or the reason it cannot be built.
pub async fn resolve(
    pod: &Pod,
    c: &Container,
    s: &Sources<'_>,
) -> Result<Vec<(String, String)>, String> {
    let ns = pod.metadata.namespace.clone().unwrap_or_else(|| "default".into());
    let mut env: Vec<(String, String)> = vec![
        ("HOSTNAME".to_string(), pod.metadata.name.clone().unwrap_or_default()),
        ("KUBERNETES_SERVICE_HOST".to_string(), "10.96.0.1".to_string()),
        ("KUBERNETES_SERVICE_PORT".to_string(), "443".to_string()),
    ];
    let set = |env: &mut Vec<(String, String)>, k: String, v: String| {
        env.retain(|(x, _)| *x != k);
        env.push((k, v));
    };
    let mut fetched = Fetched::default();
    for from in c.env_from.iter().flatten() {
        let prefix = from.prefix.clone().unwrap_or_default();
        let data = if let Some(r) = &from.config_map_ref {
            match fetched.config_map(s, &ns, &r.name).await? {
                Some(d) => d.clone(),
                None if r.optional == Some(true) => continue,
                None => return Err(format!("configmap \"{}\" not found", r.name)),
            }
        } else if let Some(r) = &from.secret_ref {
            match fetched.secret(s, &ns, &r.name).await? {
                Some(d) => d.clone(),
                None if r.optional == Some(true) => continue,
                None => return Err(format!("secret \"{}\" not found", r.name)),
            }
        } else {
            continue;
        };
        for (k, v) in data {
            let name = format!("{prefix}{k}");
            if valid_env_name(&name) {
                set(&mut env, name, v);
            }
        }
    }
    for e in c.env.iter().flatten() {
        let value = match (&e.value, &e.value_from) {
            (Some(v), _) => expand(v, &env),
            (None, Some(from)) => {
                if let Some(f) = &from.field_ref {
                    field(pod, &f.field_path, s.config, s.pod_ip)
                        .ok_or(format!("unsupported fieldPath: {}", f.field_path))?
                } else if let Some(r) = &from.resource_field_ref {
                    resource_field(
                        c,
                        &r.resource,
                        r.divisor.as_ref().map(|d| d.0.as_str()),
                        s.config,
                    )?
                } else if let Some(r) = &from.config_map_key_ref {
                    match fetched.config_map(s, &ns, &r.name).await? {
                        Some(d) => match d.get(&r.key) {
                            Some(v) => v.clone(),
                            None if r.optional == Some(true) => continue,
                            None => {
                                return Err(format!(
                                    "couldn't find key {} in ConfigMap {ns}/{}",
                                    r.key, r.name
                                ));
                            }
                        },
                        None if r.optional == Some(true) => continue,
                        None => return Err(format!("configmap \"{}\" not found", r.name)),
                    }
                } else if let Some(r) = &from.secret_key_ref {
                    match fetched.secret(s, &ns, &r.name).await? {
                        Some(d) => match d.get(&r.key) {
                            Some(v) => v.clone(),
                            None if r.optional == Some(true) => continue,
                            None => {
                                return Err(format!(
                                    "couldn't find key {} in Secret {ns}/{}",
                                    r.key, r.name
                                ));
                            }
                        },
                        None if r.optional == Some(true) => continue,
                        None => return Err(format!("secret \"{}\" not found", r.name)),
                    }
                } else {
                    String::new()
                }
            }
            _ => String::new(),
        };
        set(&mut env, e.name.clone(), value);
    }
    Ok(env)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn references_expand_to_earlier_variables_and_double_dollar_escapes() {
        let e = env(&[("A", "x"), ("B", "y")]);
        assert_eq!(expand("$(A)-$(B)", &e), "x-y");
        assert_eq!(expand("$(MISSING)", &e), "$(MISSING)");
        assert_eq!(expand("$$(A)", &e), "$(A)");
        assert_eq!(expand("cost $5", &e), "cost $5");
        assert_eq!(expand("$(A", &e), "$(A");
    }

    #[test]
    fn downward_api_fields_read_the_pod() {
        let pod: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "p", "namespace": "ns", "uid": "u1", "labels": {"app": "web"},
                          "annotations": {"team": "pay"}},
            "spec": {"containers": [], "serviceAccountName": "sa"}
        }))
        .unwrap();
        let config =
            Config { node_name: "n1".into(), node_ip: "10.0.0.9".into(), ..Config::default() };
        let f = |p: &str| field(&pod, p, &config, "10.244.0.7");
        assert_eq!(f("metadata.labels['app']").as_deref(), Some("web"));
        assert_eq!(f("metadata.annotations['team']").as_deref(), Some("pay"));
        assert_eq!(f("metadata.labels").as_deref(), Some("app=\"web\""));
        assert_eq!(f("status.podIP").as_deref(), Some("10.244.0.7"));
        assert_eq!(f("status.hostIP").as_deref(), Some("10.0.0.9"));
        assert_eq!(f("spec.serviceAccountName").as_deref(), Some("sa"));
        assert_eq!(f("spec.nodeName").as_deref(), Some("n1"));
        assert_eq!(f("spec.bogus"), None);
    }

    #[test]
    fn resource_fields_divide_and_round_up() {
        let c: Container = serde_json::from_value(serde_json::json!({
            "name": "c",
            "resources": {"limits": {"memory": "64Mi", "cpu": "250m"}, "requests": {"cpu": "100m"}}
        }))
        .unwrap();
        let config = Config::default();
        assert_eq!(resource_field(&c, "limits.memory", Some("1Mi"), &config).unwrap(), "64");
        assert_eq!(resource_field(&c, "limits.cpu", None, &config).unwrap(), "1");
        assert_eq!(resource_field(&c, "limits.cpu", Some("1m"), &config).unwrap(), "250");
        assert_eq!(resource_field(&c, "requests.cpu", Some("1m"), &config).unwrap(), "100");
        assert!(resource_field(&c, "bogus", None, &config).is_err());
    }

    #[test]
    fn env_from_names_must_be_valid() {
        assert!(valid_env_name("DB_HOST") && valid_env_name("a.b-c"));
        assert!(!valid_env_name("1X") && !valid_env_name("") && !valid_env_name("a b"));
    }
}
