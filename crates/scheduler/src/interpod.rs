//! Plugins that look at other pods: InterPodAffinity (required and preferred affinity and
//! anti-affinity by topology domain, including existing pods' anti-affinity) and
//! PodTopologySpread's DoNotSchedule filter (its scoring is in `spread`).

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Node, Pod, PodAffinityTerm};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;

use crate::framework::{
    CycleState, Filter, Plugin, PreFilter, Score, Snapshot, Status, min_max_normalize,
};
use crate::plugins::{NodeInfo, PodInfo, Refusal};

/// The pods already placed, with the labels of the node each runs on.
pub struct Placed<'a> {
    pub pods: Vec<(&'a Pod, &'a BTreeMap<String, String>)>,
    /// Every node's labels: a topology domain with no matching pod still counts, at 0.
    pub nodes: Vec<&'a BTreeMap<String, String>>,
}

fn selector_matches(sel: Option<&LabelSelector>, labels: &BTreeMap<String, String>) -> bool {
    sel.is_some_and(|s| rkube_client::selector_matches(s, labels))
}

fn labels(p: &Pod) -> BTreeMap<String, String> {
    p.metadata.labels.clone().unwrap_or_default()
}

fn ns(p: &Pod) -> String {
    p.metadata.namespace.clone().unwrap_or_default()
}

fn term_matches_pod(term: &PodAffinityTerm, owner: &Pod, other: &Pod) -> bool {
    let namespaces =
        term.namespaces.clone().filter(|n| !n.is_empty()).unwrap_or_else(|| vec![ns(owner)]);
    namespaces.contains(&ns(other))
        && selector_matches(term.label_selector.as_ref(), &labels(other))
}

fn same_domain(key: &str, a: &BTreeMap<String, String>, b: &BTreeMap<String, String>) -> bool {
    matches!((a.get(key), b.get(key)), (Some(x), Some(y)) if x == y)
}

/// InterPodAffinity's filter then PodTopologySpread's (DoNotSchedule).
#[cfg(test)]
pub fn filter(pod: &Pod, node: &Node, placed: &Placed) -> Result<(), Refusal> {
    filter_affinity(pod, node, placed).and_then(|()| filter_spread(pod, node, placed))
}

fn refuse(r: &str) -> Result<(), Refusal> {
    Err(Refusal { reasons: vec![r.to_string()], resolvable: false })
}

/// Required pod affinity and anti-affinity, the incoming pod's and the placed pods'.
pub fn filter_affinity(pod: &Pod, node: &Node, placed: &Placed) -> Result<(), Refusal> {
    let node_labels = node.metadata.labels.clone().unwrap_or_default();
    let affinity = pod.spec.as_ref().and_then(|s| s.affinity.as_ref());
    if let Some(terms) = affinity
        .and_then(|a| a.pod_affinity.as_ref())
        .and_then(|a| a.required_during_scheduling_ignored_during_execution.as_ref())
    {
        for t in terms {
            let anywhere = placed.pods.iter().any(|(p, _)| term_matches_pod(t, pod, p));
            let here = placed.pods.iter().any(|(p, nl)| {
                term_matches_pod(t, pod, p) && same_domain(&t.topology_key, nl, &node_labels)
            });
            // The first pod of a group may land anywhere if it matches its own affinity.
            let self_match = term_matches_pod(t, pod, pod);
            if !(here || (!anywhere && self_match)) {
                return refuse("node(s) didn't match pod affinity rules");
            }
        }
    }
    if let Some(terms) = affinity
        .and_then(|a| a.pod_anti_affinity.as_ref())
        .and_then(|a| a.required_during_scheduling_ignored_during_execution.as_ref())
    {
        for t in terms {
            if placed.pods.iter().any(|(p, nl)| {
                term_matches_pod(t, pod, p) && same_domain(&t.topology_key, nl, &node_labels)
            }) {
                return refuse("node(s) didn't match pod anti-affinity rules");
            }
        }
    }
    for (other, nl) in &placed.pods {
        let terms = other
            .spec
            .as_ref()
            .and_then(|s| s.affinity.as_ref())
            .and_then(|a| a.pod_anti_affinity.as_ref())
            .and_then(|a| a.required_during_scheduling_ignored_during_execution.as_ref());
        for t in terms.into_iter().flatten() {
            if term_matches_pod(t, other, pod) && same_domain(&t.topology_key, nl, &node_labels) {
                return refuse("node(s) didn't satisfy existing pods anti-affinity rules");
            }
        }
    }
    Ok(())
}

/// PodTopologySpread's DoNotSchedule constraints.
pub fn filter_spread(pod: &Pod, node: &Node, placed: &Placed) -> Result<(), Refusal> {
    let Some(constraints) = pod.spec.as_ref().and_then(|s| s.topology_spread_constraints.as_ref())
    else {
        return Ok(());
    };
    let node_labels = node.metadata.labels.clone().unwrap_or_default();
    for c in constraints {
        if c.when_unsatisfiable != "DoNotSchedule" {
            continue;
        }
        let Some(domain) = node_labels.get(&c.topology_key) else {
            return refuse(
                "node(s) didn't match pod topology spread constraints (missing required label)",
            );
        };
        let counts = domain_counts(pod, &c.topology_key, c.label_selector.as_ref(), placed);
        let here = counts.get(domain).copied().unwrap_or(0);
        // This node's domain counts too, even when no matching pod is in it yet (then the
        // minimum is 0); signed, so a domain below the others can never underflow.
        let min = counts.values().copied().chain([here]).min().unwrap_or(0);
        if here as i64 + 1 - min as i64 > i64::from(c.max_skew) {
            return refuse("node(s) didn't match pod topology spread constraints");
        }
    }
    Ok(())
}

/// Matching pods per topology domain (every domain a placed pod's node has appears, even at 0).
fn domain_counts(
    pod: &Pod,
    key: &str,
    sel: Option<&LabelSelector>,
    placed: &Placed,
) -> BTreeMap<String, usize> {
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    for nl in &placed.nodes {
        if let Some(d) = nl.get(key) {
            counts.entry(d.clone()).or_default();
        }
    }
    for (p, nl) in &placed.pods {
        if let Some(d) = nl.get(key) {
            let e = counts.entry(d.clone()).or_default();
            if ns(p) == ns(pod) && selector_matches(sel, &labels(p)) {
                *e += 1;
            }
        }
    }
    counts
}

/// Extra score: preferred (anti-)affinity weights.
pub fn score(pod: &Pod, node: &Node, placed: &Placed) -> i64 {
    let node_labels = node.metadata.labels.clone().unwrap_or_default();
    let affinity = pod.spec.as_ref().and_then(|s| s.affinity.as_ref());
    let mut score = 0i64;
    for w in affinity
        .and_then(|a| a.pod_affinity.as_ref())
        .and_then(|a| a.preferred_during_scheduling_ignored_during_execution.clone())
        .unwrap_or_default()
    {
        if placed.pods.iter().any(|(p, nl)| {
            term_matches_pod(&w.pod_affinity_term, pod, p)
                && same_domain(&w.pod_affinity_term.topology_key, nl, &node_labels)
        }) {
            score += w.weight as i64;
        }
    }
    for w in affinity
        .and_then(|a| a.pod_anti_affinity.as_ref())
        .and_then(|a| a.preferred_during_scheduling_ignored_during_execution.clone())
        .unwrap_or_default()
    {
        if placed.pods.iter().any(|(p, nl)| {
            term_matches_pod(&w.pod_affinity_term, pod, p)
                && same_domain(&w.pod_affinity_term.topology_key, nl, &node_labels)
        }) {
            score -= w.weight as i64;
        }
    }
    score
}

/// Fills the placed pods the filters that look at other pods read, once per cycle (both
/// InterPodAffinity's and PodTopologySpread's PreFilter call it; the first one does the work).
/// Every placed pod when the incoming pod has terms of its own; otherwise only the placed pods
/// with required anti-affinity, and nothing at all when there are none.
pub fn fill_placed<'a>(state: &mut CycleState<'a>, pod: &PodInfo, snap: &Snapshot<'a>) {
    if state.placed.is_some() {
        return;
    }
    let spec = pod.pod.spec.as_ref();
    let own_terms = spec
        .and_then(|s| s.affinity.as_ref())
        .is_some_and(|a| a.pod_affinity.is_some() || a.pod_anti_affinity.is_some())
        || spec
            .and_then(|s| s.topology_spread_constraints.as_ref())
            .is_some_and(|t| t.iter().any(|c| c.when_unsatisfiable == "DoNotSchedule"));
    if !own_terms && snap.anti_affinity.is_empty() {
        return;
    }
    let mut pods = Vec::new();
    for ni in snap.nodes {
        let nl = labels_of(ni);
        for (pk, p) in &ni.pods {
            if own_terms || snap.anti_affinity.contains(pk) {
                pods.push((&*p.pod, nl));
            }
        }
    }
    state.own_terms = own_terms;
    state.placed =
        Some(Placed { pods, nodes: snap.nodes.iter().map(|ni| labels_of(ni)).collect() });
}

static NO_LABELS: BTreeMap<String, String> = BTreeMap::new();

fn labels_of(ni: &NodeInfo) -> &BTreeMap<String, String> {
    ni.node.metadata.labels.as_ref().unwrap_or(&NO_LABELS)
}

/// The InterPodAffinity plugin.
pub struct InterPodAffinity;

impl Plugin for InterPodAffinity {
    fn name(&self) -> &'static str {
        "InterPodAffinity"
    }
}

impl PreFilter for InterPodAffinity {
    fn pre_filter<'a>(
        &self,
        state: &mut CycleState<'a>,
        pod: &PodInfo,
        snap: &Snapshot<'a>,
    ) -> Result<(), Status> {
        fill_placed(state, pod, snap);
        Ok(())
    }
}

impl Filter for InterPodAffinity {
    fn filter(&self, state: &CycleState, pod: &PodInfo, node: &NodeInfo) -> Result<(), Status> {
        match &state.placed {
            Some(placed) => filter_affinity(&pod.pod, &node.node, placed).map_err(Status::from),
            None => Ok(()),
        }
    }
}

impl Score for InterPodAffinity {
    fn score(&self, state: &CycleState, pod: &PodInfo, node: &NodeInfo) -> i64 {
        match &state.placed {
            Some(placed) => score(&pod.pod, &node.node, placed),
            None => 0,
        }
    }

    fn normalize(&self, state: &CycleState, _: &[&NodeInfo], scores: &mut [i64]) {
        if state.placed.is_some() {
            min_max_normalize(scores);
        }
    }
}

/// The PodTopologySpread plugin: its DoNotSchedule filter here, its scoring in `spread`.
pub struct PodTopologySpread;

impl Plugin for PodTopologySpread {
    fn name(&self) -> &'static str {
        "PodTopologySpread"
    }
}

impl PreFilter for PodTopologySpread {
    fn pre_filter<'a>(
        &self,
        state: &mut CycleState<'a>,
        pod: &PodInfo,
        snap: &Snapshot<'a>,
    ) -> Result<(), Status> {
        fill_placed(state, pod, snap);
        Ok(())
    }
}

impl Filter for PodTopologySpread {
    fn filter(&self, state: &CycleState, pod: &PodInfo, node: &NodeInfo) -> Result<(), Status> {
        match &state.placed {
            Some(placed) => filter_spread(&pod.pod, &node.node, placed).map_err(Status::from),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str) -> Node {
        serde_json::from_value(serde_json::json!({"metadata": {"name": name, "labels": {"kubernetes.io/hostname": name}}})).unwrap()
    }

    fn pod(name: &str, app: &str, extra: serde_json::Value) -> Pod {
        let mut v = serde_json::json!({"metadata": {"name": name, "namespace": "d", "labels": {"app": app}}, "spec": {"containers": [{"name": "c"}]}});
        v["spec"].as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn required_anti_affinity_keeps_replicas_on_different_nodes() {
        let anti = serde_json::json!({"affinity": {"podAntiAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [
            {"labelSelector": {"matchLabels": {"app": "web"}}, "topologyKey": "kubernetes.io/hostname"}]}}});
        let existing = pod("web-1", "web", anti.clone());
        let n1 = node("n1");
        let placed = Placed {
            pods: vec![(&existing, n1.metadata.labels.as_ref().unwrap())],
            nodes: vec![n1.metadata.labels.as_ref().unwrap()],
        };
        let new = pod("web-2", "web", anti);
        assert_eq!(
            filter(&new, &n1, &placed).unwrap_err().reasons,
            vec!["node(s) didn't match pod anti-affinity rules".to_string()]
        );
        assert!(filter(&new, &node("n2"), &placed).is_ok());
    }

    #[test]
    fn topology_spread_refuses_a_node_that_would_exceed_the_skew() {
        let spread = serde_json::json!({"topologySpreadConstraints": [{"maxSkew": 1, "topologyKey": "kubernetes.io/hostname", "whenUnsatisfiable": "DoNotSchedule", "labelSelector": {"matchLabels": {"app": "web"}}}]});
        let a = pod("a", "web", serde_json::json!({}));
        let (n1, n2) = (node("n1"), node("n2"));
        let other = pod("x", "other", serde_json::json!({}));
        let placed = Placed {
            pods: vec![
                (&a, n1.metadata.labels.as_ref().unwrap()),
                (&other, n2.metadata.labels.as_ref().unwrap()),
            ],
            nodes: vec![n1.metadata.labels.as_ref().unwrap(), n2.metadata.labels.as_ref().unwrap()],
        };
        let new = pod("b", "web", spread);
        assert!(filter(&new, &n1, &placed).is_err());
        assert!(filter(&new, &n2, &placed).is_ok());
    }

    #[test]
    fn topology_spread_on_a_node_no_pod_has_reached_yet_is_allowed_and_never_underflows() {
        // n1 holds two matching pods; n2 has none and no placed pod of any kind, so its
        // domain is absent from the counts: placing there is a skew of 1, not an overflow.
        let spread = serde_json::json!({"topologySpreadConstraints": [{"maxSkew": 1, "topologyKey": "kubernetes.io/hostname", "whenUnsatisfiable": "DoNotSchedule", "labelSelector": {"matchLabels": {"app": "web"}}}]});
        let (a, b) =
            (pod("a", "web", serde_json::json!({})), pod("b", "web", serde_json::json!({})));
        let (n1, n2) = (node("n1"), node("n2"));
        let placed = Placed {
            pods: vec![
                (&a, n1.metadata.labels.as_ref().unwrap()),
                (&b, n1.metadata.labels.as_ref().unwrap()),
            ],
            nodes: vec![n1.metadata.labels.as_ref().unwrap(), n2.metadata.labels.as_ref().unwrap()],
        };
        let new = pod("c", "web", spread);
        assert!(filter(&new, &n2, &placed).is_ok());
        assert!(filter(&new, &n1, &placed).is_err());
    }
}
