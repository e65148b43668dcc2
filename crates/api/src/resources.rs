//! The table of every resource the API server serves: the one place discovery, routing,
//! OpenAPI, kubectl's short names and the store's key layout agree on.

/// One served resource (a REST collection) and what can be done with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResourceInfo {
    /// API group; "" for the core group (`/api/v1`).
    pub group: &'static str,
    pub version: &'static str,
    pub kind: &'static str,
    /// The URL path segment and the store key segment: `/registry/<plural>/…`.
    pub plural: &'static str,
    pub singular: &'static str,
    pub namespaced: bool,
    pub short_names: &'static [&'static str],
    pub verbs: &'static [&'static str],
    /// Subresources such as "status", "scale", "binding", "eviction", "log", "exec".
    pub subresources: &'static [&'static str],
    /// Categories for `kubectl get all`.
    pub categories: &'static [&'static str],
}

impl ResourceInfo {
    /// `v1` or `apps/v1`.
    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.to_string()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    /// The store prefix for this resource: `/registry/<plural>/`, or for a namespace
    /// `/registry/<plural>/<ns>/`. Keys are `/registry/<plural>/<ns>/<name>` (or without `<ns>`).
    pub fn key_prefix(&self, namespace: Option<&str>) -> String {
        match (self.namespaced, namespace) {
            (true, Some(ns)) => format!("/registry/{}/{}/", self.store_segment(), ns),
            _ => format!("/registry/{}/", self.store_segment()),
        }
    }

    pub fn key(&self, namespace: Option<&str>, name: &str) -> String {
        format!("{}{}", self.key_prefix(namespace), name)
    }

    /// Upstream keeps a few resources under other segments; events.k8s.io Events share the
    /// core Events' keys (one object, two API versions), as on Kubernetes.
    fn store_segment(&self) -> &'static str {
        match (self.group, self.plural) {
            ("apps", "deployments") => "deployments",
            ("", "services") => "services/specs",
            ("", "endpoints") => "services/endpoints",
            ("", "nodes") => "minions",
            _ => self.plural,
        }
    }
}

const RW: &[&str] =
    &["create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"];
const RW_NO_COLLECTION_DELETE: &[&str] =
    &["create", "delete", "get", "list", "patch", "update", "watch"];

macro_rules! res {
    ($group:expr, $version:expr, $kind:expr, $plural:expr, $singular:expr, $ns:expr,
     short: [$($short:expr),*], verbs: $verbs:expr, sub: [$($sub:expr),*], cat: [$($cat:expr),*]) => {
        ResourceInfo {
            group: $group, version: $version, kind: $kind, plural: $plural, singular: $singular,
            namespaced: $ns, short_names: &[$($short),*], verbs: $verbs,
            subresources: &[$($sub),*], categories: &[$($cat),*],
        }
    };
}

/// Every served resource, grouped by API group in discovery order.
pub static RESOURCES: &[ResourceInfo] = &[
    res!("", "v1", "Namespace", "namespaces", "namespace", false, short: ["ns"], verbs: RW_NO_COLLECTION_DELETE, sub: ["status", "finalize"], cat: []),
    res!("", "v1", "Pod", "pods", "pod", true, short: ["po"], verbs: RW, sub: ["status", "binding", "eviction", "log", "exec", "attach", "portforward"], cat: ["all"]),
    res!("", "v1", "Node", "nodes", "node", false, short: ["no"], verbs: RW, sub: ["status", "proxy"], cat: []),
    res!("", "v1", "Service", "services", "service", true, short: ["svc"], verbs: RW, sub: ["status", "proxy"], cat: ["all"]),
    res!("", "v1", "Endpoints", "endpoints", "endpoints", true, short: ["ep"], verbs: RW, sub: [], cat: []),
    res!("", "v1", "Event", "events", "event", true, short: ["ev"], verbs: RW, sub: [], cat: []),
    res!("", "v1", "ConfigMap", "configmaps", "configmap", true, short: ["cm"], verbs: RW, sub: [], cat: []),
    res!("", "v1", "Secret", "secrets", "secret", true, short: [], verbs: RW, sub: [], cat: []),
    res!("", "v1", "ServiceAccount", "serviceaccounts", "serviceaccount", true, short: ["sa"], verbs: RW, sub: ["token"], cat: []),
    res!("", "v1", "ReplicationController", "replicationcontrollers", "replicationcontroller", true, short: ["rc"], verbs: RW, sub: ["status", "scale"], cat: ["all"]),
    res!("", "v1", "ComponentStatus", "componentstatuses", "componentstatus", false, short: ["cs"], verbs: &["get", "list"], sub: [], cat: []),
    res!("apps", "v1", "Deployment", "deployments", "deployment", true, short: ["deploy"], verbs: RW, sub: ["status", "scale"], cat: ["all"]),
    res!("apps", "v1", "DaemonSet", "daemonsets", "daemonset", true, short: ["ds"], verbs: RW, sub: ["status"], cat: ["all"]),
    res!("apps", "v1", "ReplicaSet", "replicasets", "replicaset", true, short: ["rs"], verbs: RW, sub: ["status", "scale"], cat: ["all"]),
    res!("coordination.k8s.io", "v1", "Lease", "leases", "lease", true, short: [], verbs: RW, sub: [], cat: []),
    res!("discovery.k8s.io", "v1", "EndpointSlice", "endpointslices", "endpointslice", true, short: [], verbs: RW, sub: [], cat: []),
    res!("events.k8s.io", "v1", "Event", "events", "event", true, short: ["ev"], verbs: RW, sub: [], cat: []),
    res!("scheduling.k8s.io", "v1", "PriorityClass", "priorityclasses", "priorityclass", false, short: ["pc"], verbs: RW, sub: [], cat: []),
    res!("policy", "v1", "PodDisruptionBudget", "poddisruptionbudgets", "poddisruptionbudget", true, short: ["pdb"], verbs: RW, sub: ["status"], cat: []),
];

/// The resource served at `group`/`version` under `plural`.
pub fn find(group: &str, version: &str, plural: &str) -> Option<&'static ResourceInfo> {
    RESOURCES.iter().find(|r| r.group == group && r.version == version && r.plural == plural)
}

/// The resource of a `kind` in `group` (any served version).
pub fn by_kind(group: &str, kind: &str) -> Option<&'static ResourceInfo> {
    RESOURCES.iter().find(|r| r.group == group && r.kind == kind)
}

/// API groups in discovery order, each with its served versions (preferred first).
pub fn groups() -> Vec<(&'static str, Vec<&'static str>)> {
    let mut out: Vec<(&'static str, Vec<&'static str>)> = Vec::new();
    for r in RESOURCES {
        match out.iter_mut().find(|(g, _)| *g == r.group) {
            Some((_, versions)) if !versions.contains(&r.version) => versions.push(r.version),
            Some(_) => {}
            None => out.push((r.group, vec![r.version])),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pod_keys_follow_the_upstream_layout() {
        let pods = find("", "v1", "pods").unwrap();
        assert_eq!(pods.key(Some("default"), "web"), "/registry/pods/default/web");
        let nodes = find("", "v1", "nodes").unwrap();
        assert_eq!(nodes.key(None, "n1"), "/registry/minions/n1");
    }

    #[test]
    fn every_short_name_kubectl_users_know_is_served() {
        for short in ["po", "no", "ns", "svc", "ep", "cm", "cs", "ev", "deploy", "rs", "sa", "pc"] {
            assert!(RESOURCES.iter().any(|r| r.short_names.contains(&short)), "{short}");
        }
    }
}
