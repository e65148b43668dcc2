//! PodTopologySpread scoring, as upstream's plugin scores: the pod's `ScheduleAnyway`
//! constraints, or — when the pod declares no constraints at all — the system defaults
//! (`kubernetes.io/hostname` maxSkew 3 and `topology.kubernetes.io/zone` maxSkew 5, both
//! ScheduleAnyway), whose selector is the union of the selectors of the Services, and of the
//! ReplicationController, ReplicaSet or StatefulSet controlling the pod, that select it. A pod
//! nothing selects gets no default constraints. (DoNotSchedule constraints filter in interpod.)
//!
//! Scores follow upstream: per constraint `count × ln(domains + 2) + (maxSkew − 1)`, where
//! `count` is the matching pods in the node's domain, then normalized so the emptiest domain
//! scores 100. Weight 2 in the default profile.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;

use crate::framework::{CycleState, PreScore, Score, Snapshot};
use crate::plugins::{NodeInfo, PodInfo, matches_node_affinity};

pub const HOSTNAME: &str = "kubernetes.io/hostname";
pub const ZONE: &str = "topology.kubernetes.io/zone";

/// The objects whose selectors make up the default spreading selector, keyed by namespace and
/// then name.
#[derive(Default, Debug)]
pub struct Owners {
    pub services: HashMap<String, HashMap<String, BTreeMap<String, String>>>,
    pub replication_controllers: HashMap<String, HashMap<String, BTreeMap<String, String>>>,
    pub replica_sets: HashMap<String, HashMap<String, LabelSelector>>,
    pub stateful_sets: HashMap<String, HashMap<String, LabelSelector>>,
}

/// A label selector made of equality requirements and label selectors, all of which must hold.
#[derive(Clone, Debug, Default)]
pub struct Selector {
    equal: BTreeMap<String, String>,
    selectors: Vec<LabelSelector>,
    nothing: bool,
}

fn label_selector_empty(s: &LabelSelector) -> bool {
    s.match_labels.as_ref().is_none_or(|m| m.is_empty())
        && s.match_expressions.as_ref().is_none_or(|m| m.is_empty())
}

impl Selector {
    /// A text naming this selector in namespace `ns`: equal texts match the same pods.
    fn key(&self, ns: &str) -> String {
        let sels: Vec<String> =
            self.selectors.iter().map(|s| serde_json::to_string(s).unwrap_or_default()).collect();
        format!("{ns}\n{:?}\n{sels:?}\n{}", self.equal, self.nothing)
    }

    fn is_empty(&self) -> bool {
        !self.nothing && self.equal.is_empty() && self.selectors.iter().all(label_selector_empty)
    }

    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        !self.nothing
            && self.equal.iter().all(|(k, v)| labels.get(k) == Some(v))
            && self
                .selectors
                .iter()
                .all(|s| label_selector_empty(s) || rkube_client::selector_matches(s, labels))
    }
}

#[derive(Clone, Debug)]
pub struct Constraint {
    pub topology_key: String,
    pub max_skew: i32,
    pub selector: Selector,
}

/// The scoring constraints of `pod`, and whether they are the system defaults.
pub fn constraints(pod: &Pod, owners: &Owners) -> (Vec<Constraint>, bool) {
    let explicit = pod.spec.as_ref().and_then(|s| s.topology_spread_constraints.as_ref());
    let empty = BTreeMap::new();
    let pod_labels = pod.metadata.labels.as_ref().unwrap_or(&empty);
    if let Some(list) = explicit.filter(|l| !l.is_empty()) {
        let out = list
            .iter()
            .filter(|c| c.when_unsatisfiable == "ScheduleAnyway")
            .map(|c| {
                let mut selector = match &c.label_selector {
                    // A constraint without a selector matches no pod.
                    None => Selector { nothing: true, ..Default::default() },
                    Some(s) => Selector { selectors: vec![s.clone()], ..Default::default() },
                };
                for k in c.match_label_keys.iter().flatten() {
                    if let Some(v) = pod_labels.get(k) {
                        selector.equal.insert(k.clone(), v.clone());
                    }
                }
                Constraint { topology_key: c.topology_key.clone(), max_skew: c.max_skew, selector }
            })
            .collect();
        return (out, false);
    }
    let selector = default_selector(pod, owners);
    if selector.is_empty() {
        return (Vec::new(), true);
    }
    let out = [(HOSTNAME, 3), (ZONE, 5)]
        .into_iter()
        .map(|(k, skew)| Constraint {
            topology_key: k.to_string(),
            max_skew: skew,
            selector: selector.clone(),
        })
        .collect();
    (out, true)
}

/// Upstream's DefaultSelector: the selectors of the Services selecting the pod, merged with the
/// selector of its controlling ReplicationController, ReplicaSet or StatefulSet.
fn default_selector(pod: &Pod, owners: &Owners) -> Selector {
    let ns = pod.metadata.namespace.as_deref().unwrap_or("");
    let empty = BTreeMap::new();
    let labels = pod.metadata.labels.as_ref().unwrap_or(&empty);
    let mut sel = Selector::default();
    for svc_sel in owners.services.get(ns).into_iter().flat_map(|m| m.values()) {
        if svc_sel.iter().all(|(k, v)| labels.get(k) == Some(v)) {
            sel.equal.extend(svc_sel.iter().map(|(k, v)| (k.clone(), v.clone())));
        }
    }
    let controller =
        pod.metadata.owner_references.iter().flatten().find(|o| o.controller == Some(true));
    if let Some(o) = controller {
        let group = o.api_version.rsplit_once('/').map(|(g, _)| g).unwrap_or("");
        match (group, o.kind.as_str()) {
            ("", "ReplicationController") => {
                if let Some(s) = owners.replication_controllers.get(ns).and_then(|m| m.get(&o.name))
                {
                    sel.equal.extend(s.iter().map(|(k, v)| (k.clone(), v.clone())));
                }
            }
            ("apps", "ReplicaSet") => {
                if let Some(s) = owners.replica_sets.get(ns).and_then(|m| m.get(&o.name)) {
                    sel.selectors.push(s.clone());
                }
            }
            ("apps", "StatefulSet") => {
                if let Some(s) = owners.stateful_sets.get(ns).and_then(|m| m.get(&o.name)) {
                    sel.selectors.push(s.clone());
                }
            }
            _ => {}
        }
    }
    sel
}

/// The pods on `ni` in namespace `ns` that `sel` matches, not being deleted. `key` names the
/// pair (ns, sel): the count is remembered on the node until its pods change.
fn count_matching(ni: &NodeInfo, key: &Arc<str>, sel: &Selector, ns: &str) -> i64 {
    let mut memo = ni.match_counts.lock().unwrap_or_else(|p| p.into_inner());
    if let Some((_, n)) = memo.iter().find(|(k, _)| k == key) {
        return *n;
    }
    let empty = BTreeMap::new();
    let n = ni
        .pods
        .values()
        .filter(|p| {
            let m = &p.pod.metadata;
            m.deletion_timestamp.is_none()
                && m.namespace.as_deref().unwrap_or("") == ns
                && sel.matches(m.labels.as_ref().unwrap_or(&empty))
        })
        .count() as i64;
    // A few selectors are remembered: one Deployment's burst, or several interleaved.
    if memo.len() >= 4 {
        memo.remove(0);
    }
    memo.push((key.clone(), n));
    n
}

/// The value of node label `key`, if the node carries it.
fn label<'a>(ni: &'a NodeInfo, key: &str) -> Option<&'a str> {
    ni.node.metadata.labels.as_ref().and_then(|l| l.get(key)).map(|v| v.as_str())
}

/// One domain's count of matching pods, and whether a score reads it.
#[derive(Clone, Debug, Default, PartialEq)]
struct Domain {
    count: i64,
    read: bool,
}

/// PreScore's result for one pod: per-domain counts over the whole cluster and per-constraint
/// weights, from which every feasible node is scored.
pub struct Scorer {
    constraints: Vec<Constraint>,
    ns: String,
    /// Per constraint: the key its (namespace, selector) pair is remembered under on nodes.
    keys: Vec<Arc<str>>,
    weights: Vec<f64>,
    /// Per constraint: its domains by topology value (hostname constraints keep none).
    domains: Vec<HashMap<String, Domain>>,
    ignored: HashSet<String>,
}

impl Scorer {
    /// `None` when the pod has nothing to spread (upstream's Skip).
    pub fn new(
        pod: &Pod,
        constraints: Vec<Constraint>,
        system_defaulted: bool,
        feasible: &[&NodeInfo],
        all: &[&NodeInfo],
    ) -> Option<Scorer> {
        if constraints.is_empty() || feasible.is_empty() {
            return None;
        }
        let require_all = !system_defaulted;
        let has_all = |ni: &NodeInfo| {
            let labels = ni.node.metadata.labels.as_ref();
            constraints.iter().all(|c| labels.is_some_and(|l| l.contains_key(&c.topology_key)))
        };
        let mut ignored = HashSet::new();
        // The domains of the feasible nodes. A node without the label still makes a domain
        // ("") for the weights, as upstream, but its count is read (and so counted) only when
        // some feasible node carries the label with an empty value.
        let mut domains: Vec<HashMap<String, Domain>> = vec![HashMap::new(); constraints.len()];
        let mut any_read = false;
        // Hostname constraints need no domains: each node is its own.
        let by_domain: Vec<usize> =
            (0..constraints.len()).filter(|&i| constraints[i].topology_key != HOSTNAME).collect();
        for ni in feasible {
            if require_all && !has_all(ni) {
                ignored.insert(ni.name().to_string());
                continue;
            }
            for &i in &by_domain {
                let value = label(ni, &constraints[i].topology_key);
                let d = &mut domains[i];
                let v = value.unwrap_or("");
                if !d.contains_key(v) {
                    d.insert(v.to_string(), Domain::default());
                }
                if value.is_some()
                    && let Some(d) = d.get_mut(v)
                {
                    d.read = true;
                    any_read = true;
                }
            }
        }
        let weights = constraints
            .iter()
            .zip(&domains)
            .map(|(c, d)| {
                let size = if c.topology_key == HOSTNAME {
                    feasible.len() - ignored.len()
                } else {
                    d.len()
                };
                ((size + 2) as f64).ln()
            })
            .collect();
        let ns = pod.metadata.namespace.clone().unwrap_or_default();
        let keys: Vec<Arc<str>> =
            constraints.iter().map(|c| Arc::from(c.selector.key(&ns).as_str())).collect();
        if any_read {
            for ni in all {
                if require_all && !has_all(ni) {
                    continue;
                }
                // nodeAffinityPolicy Honor: only nodes the pod could go to count.
                if !matches_node_affinity(pod, &ni.node) {
                    continue;
                }
                for &i in &by_domain {
                    let c = &constraints[i];
                    let v = label(ni, &c.topology_key).unwrap_or("");
                    if let Some(d) = domains[i].get_mut(v)
                        && d.read
                    {
                        d.count += count_matching(ni, &keys[i], &c.selector, &ns);
                    }
                }
            }
        }
        Some(Scorer { constraints, ns, keys, weights, domains, ignored })
    }

    /// The raw score of a feasible node (before [`Scorer::normalize`]).
    pub fn score(&self, ni: &NodeInfo) -> i64 {
        if self.ignored.contains(ni.name()) {
            return 0;
        }
        let labels = ni.node.metadata.labels.as_ref();
        let mut score = 0.0;
        for (i, c) in self.constraints.iter().enumerate() {
            let Some(v) = labels.and_then(|l| l.get(&c.topology_key)) else { continue };
            let count = if c.topology_key == HOSTNAME {
                count_matching(ni, &self.keys[i], &c.selector, &self.ns)
            } else {
                self.domains[i].get(v.as_str()).map_or(0, |d| d.count)
            };
            score += count as f64 * self.weights[i] + f64::from(c.max_skew - 1);
        }
        score.round() as i64
    }

    /// Fewer matching pods is better: the lowest raw score maps to 100; ignored nodes get 0.
    pub fn normalize(&self, names: &[&str], scores: &mut [i64]) {
        let valid = |i: usize| !self.ignored.contains(names[i]);
        let (mut min, mut max) = (i64::MAX, 0i64);
        for (i, s) in scores.iter().enumerate() {
            if valid(i) {
                min = min.min(*s);
                max = max.max(*s);
            }
        }
        for (i, s) in scores.iter_mut().enumerate() {
            *s = if !valid(i) {
                0
            } else if max == 0 {
                100
            } else {
                100 * (max + min - *s) / max
            };
        }
    }
}

impl PreScore for crate::interpod::PodTopologySpread {
    fn pre_score(
        &self,
        state: &mut CycleState,
        pod: &PodInfo,
        feasible: &[&NodeInfo],
        snap: &Snapshot,
    ) {
        let (constraints, system) = constraints(&pod.pod, snap.owners);
        state.spread = Scorer::new(&pod.pod, constraints, system, feasible, snap.nodes);
    }
}

impl Score for crate::interpod::PodTopologySpread {
    fn score(&self, state: &CycleState, _: &PodInfo, node: &NodeInfo) -> i64 {
        state.spread.as_ref().map_or(0, |s| s.score(node))
    }

    fn normalize(&self, state: &CycleState, feasible: &[&NodeInfo], scores: &mut [i64]) {
        if let Some(s) = &state.spread {
            let names: Vec<&str> = feasible.iter().map(|ni| ni.name()).collect();
            s.normalize(&names, scores);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn node(name: &str, zone: Option<&str>) -> NodeInfo {
        let mut labels = serde_json::json!({"kubernetes.io/hostname": name});
        if let Some(z) = zone {
            labels[ZONE] = serde_json::json!(z);
        }
        NodeInfo::new(Arc::new(
            serde_json::from_value(
                serde_json::json!({"metadata": {"name": name, "labels": labels}}),
            )
            .unwrap(),
        ))
    }

    fn pod(name: &str, owner: Option<&str>, extra: serde_json::Value) -> Pod {
        let mut v = serde_json::json!({"metadata": {"name": name, "namespace": "d", "labels": {"app": "web"}},
            "spec": {"containers": [{"name": "c"}]}});
        if let Some(o) = owner {
            v["metadata"]["ownerReferences"] = serde_json::json!([{"apiVersion": "apps/v1", "kind": "ReplicaSet",
                "name": o, "uid": "u", "controller": true}]);
        }
        v["spec"].as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        serde_json::from_value(v).unwrap()
    }

    fn owners() -> Owners {
        let mut o = Owners::default();
        o.replica_sets.entry("d".into()).or_default().insert(
            "web-rs".into(),
            serde_json::from_value(serde_json::json!({"matchLabels": {"app": "web"}})).unwrap(),
        );
        o
    }

    fn place(ni: &mut NodeInfo, p: Pod) {
        let key = format!("d/{}", p.metadata.name.clone().unwrap());
        ni.add(&key, Arc::new(PodInfo::new(Arc::new(p))));
    }

    fn scores(p: &Pod, owners: &Owners, nodes: &[&NodeInfo]) -> Option<Vec<i64>> {
        let (cs, sys) = constraints(p, owners);
        let s = Scorer::new(p, cs, sys, nodes, nodes)?;
        let mut raw: Vec<i64> = nodes.iter().map(|n| s.score(n)).collect();
        let names: Vec<&str> = nodes.iter().map(|n| n.name()).collect();
        s.normalize(&names, &mut raw);
        Some(raw)
    }

    #[test]
    fn replicas_of_a_replica_set_get_the_system_default_constraints() {
        let p = pod("web-3", Some("web-rs"), serde_json::json!({}));
        let (cs, sys) = constraints(&p, &owners());
        assert!(sys);
        let keys: Vec<(&str, i32)> =
            cs.iter().map(|c| (c.topology_key.as_str(), c.max_skew)).collect();
        assert_eq!(keys, vec![(HOSTNAME, 3), (ZONE, 5)]);
        // A pod nothing selects (no Service, no controller) spreads nothing.
        let lone = pod("lone", None, serde_json::json!({}));
        assert!(constraints(&lone, &owners()).0.is_empty());
        // A controller the scheduler has not seen gives no selector either.
        let orphan = pod("o", Some("gone"), serde_json::json!({}));
        assert!(constraints(&orphan, &owners()).0.is_empty());
        // Declared constraints replace the defaults; only ScheduleAnyway ones score.
        let declared = pod(
            "x",
            Some("web-rs"),
            serde_json::json!({"topologySpreadConstraints": [
            {"maxSkew": 1, "topologyKey": HOSTNAME, "whenUnsatisfiable": "DoNotSchedule",
             "labelSelector": {"matchLabels": {"app": "web"}}}]}),
        );
        let (cs, sys) = constraints(&declared, &owners());
        assert!(cs.is_empty() && !sys);
    }

    #[test]
    fn default_spreading_prefers_the_nodes_without_replicas() {
        let (mut n1, n2, n3) = (node("n1", None), node("n2", None), node("n3", None));
        place(&mut n1, pod("web-1", Some("web-rs"), serde_json::json!({})));
        place(&mut n1, pod("web-2", Some("web-rs"), serde_json::json!({})));
        let p = pod("web-3", Some("web-rs"), serde_json::json!({}));
        let s = scores(&p, &owners(), &[&n1, &n2, &n3]).unwrap();
        // Raw: n1 = 2·ln(5) + 2 ≈ 5, n2 = n3 = 2 (no zone labels: that constraint is ignored).
        // Normalized: 100·(max + min − s)/max.
        assert_eq!(s, vec![40, 100, 100]);
        // Without an owner the plugin skips: no spreading score at all.
        assert!(
            scores(&pod("lone", None, serde_json::json!({})), &owners(), &[&n1, &n2]).is_none()
        );
    }

    #[test]
    fn remembered_counts_follow_the_nodes_pods() {
        let (mut n1, mut n2) = (node("n1", None), node("n2", None));
        place(&mut n1, pod("web-1", Some("web-rs"), serde_json::json!({})));
        let p = pod("web-9", Some("web-rs"), serde_json::json!({}));
        assert_eq!(scores(&p, &owners(), &[&n1, &n2]).unwrap(), vec![66, 100]);
        // The counts are remembered per node; a pod placed (or removed) forgets them.
        place(&mut n2, pod("web-2", Some("web-rs"), serde_json::json!({})));
        place(&mut n2, pod("web-3", Some("web-rs"), serde_json::json!({})));
        assert_eq!(scores(&p, &owners(), &[&n1, &n2]).unwrap(), vec![100, 60]);
        n2.remove("d/web-3");
        n2.remove("d/web-2");
        assert_eq!(scores(&p, &owners(), &[&n1, &n2]).unwrap(), vec![66, 100]);
        // Another namespace's selector is remembered apart.
        let mut q = p.clone();
        q.metadata.namespace = Some("other".into());
        let mut o = owners();
        o.replica_sets.insert("other".into(), o.replica_sets["d"].clone());
        assert_eq!(scores(&q, &o, &[&n1, &n2]).unwrap(), vec![100, 100]);
    }

    #[test]
    fn default_spreading_counts_zones_across_all_nodes() {
        let (mut a1, a2, b1) =
            (node("a1", Some("a")), node("a2", Some("a")), node("b1", Some("b")));
        place(&mut a1, pod("web-1", Some("web-rs"), serde_json::json!({})));
        let p = pod("web-2", Some("web-rs"), serde_json::json!({}));
        let s = scores(&p, &owners(), &[&a1, &a2, &b1]).unwrap();
        // a2 holds no replica but its zone does: it scores below b1, above a1.
        assert!(s[2] > s[1] && s[1] > s[0], "{s:?}");
        assert_eq!(s[2], 100);
    }

    #[test]
    fn zone_counts_are_read_only_for_labelled_domains_but_stay_upstream_exact() {
        // No node carries the zone label: nothing is counted for it (a score never reads it).
        let (mut n1, n2) = (node("n1", None), node("n2", None));
        place(&mut n1, pod("web-1", Some("web-rs"), serde_json::json!({})));
        let p = pod("web-2", Some("web-rs"), serde_json::json!({}));
        let (cs, sys) = constraints(&p, &owners());
        let s = Scorer::new(&p, cs, sys, &[&n1, &n2], &[&n1, &n2]).unwrap();
        assert_eq!(s.domains[1].get(""), Some(&Domain { count: 0, read: false }));
        // A node labelled with an empty zone shares the "" domain with unlabelled nodes, as
        // upstream counts it: the replica on the unlabelled n1 counts for it.
        let e = node("e", Some(""));
        let (cs, sys) = constraints(&p, &owners());
        let s = Scorer::new(&p, cs, sys, &[&e, &n2], &[&n1, &e, &n2]).unwrap();
        assert_eq!(s.domains[1].get(""), Some(&Domain { count: 1, read: true }));
    }

    #[test]
    fn pods_in_other_namespaces_or_terminating_do_not_count() {
        let (mut n1, n2) = (node("n1", None), node("n2", None));
        let mut other = pod("web-x", Some("web-rs"), serde_json::json!({}));
        other.metadata.namespace = Some("elsewhere".into());
        place(&mut n1, other);
        let mut gone = pod("web-y", Some("web-rs"), serde_json::json!({}));
        gone.metadata.deletion_timestamp =
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(jiff::Timestamp::now()));
        place(&mut n1, gone);
        let p = pod("web-3", Some("web-rs"), serde_json::json!({}));
        assert_eq!(scores(&p, &owners(), &[&n1, &n2]).unwrap(), vec![100, 100]);
    }
}
