//! The scheduling framework, shaped as upstream's: one small trait per extension point
//! (PreFilter, Filter, PostFilter, PreScore, Score with its normalization, Reserve/Unreserve),
//! a [`Profile`] that lists the plugins of each point in order and the weight of each score,
//! a typed [`CycleState`] that PreFilter and PreScore fill once per cycle and Filter and Score
//! read for every node, and a [`Status`] that tells an expected rejection (`Unschedulable`,
//! which preemption may resolve, or `UnschedulableAndUnresolvable`) from a failure (`Error`).
//!
//! The extension points are called synchronously under the cache lock; Filter and Score are
//! `Sync` so a cycle may run them across nodes on several threads. Binding is the scheduler's
//! asynchronous API call after the cycle (`spawn_bind`), upstream's DefaultBinder.
//!
//! Per node, the framework allocates nothing and looks nothing up by name: the state is a
//! struct with a field per plugin that keeps one, plugins are called through a vector in the
//! profile, and score buffers are made once per cycle.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use k8s_openapi::api::policy::v1::PodDisruptionBudget;

use crate::plugins::{NodeInfo, PodInfo, Refusal};
use crate::{interpod, preemption, spread};

/// The highest score a plugin gives a node (upstream's MaxNodeScore); scores are 0..=100.
pub const MAX_NODE_SCORE: i64 = 100;

/// What a plugin says about a pod (and a node).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Status {
    /// The node does not fit now; removing pods (preemption) may change that.
    Unschedulable(Vec<String>),
    /// The node does not fit, and no preemption can change that.
    UnschedulableAndUnresolvable(Vec<String>),
    /// The plugin could not decide: the cycle stops and the pod is retried.
    Error(String),
}

impl Status {
    pub fn unschedulable(reason: impl Into<String>) -> Status {
        Status::Unschedulable(vec![reason.into()])
    }

    pub fn unresolvable(reason: impl Into<String>) -> Status {
        Status::UnschedulableAndUnresolvable(vec![reason.into()])
    }

    /// The rejection as FailedScheduling and preemption see it, or the failure's message.
    pub fn into_refusal(self) -> Result<Refusal, String> {
        match self {
            Status::Unschedulable(reasons) => Ok(Refusal { reasons, resolvable: true }),
            Status::UnschedulableAndUnresolvable(reasons) => {
                Ok(Refusal { reasons, resolvable: false })
            }
            Status::Error(e) => Err(e),
        }
    }
}

impl From<Refusal> for Status {
    fn from(r: Refusal) -> Status {
        if r.resolvable {
            Status::Unschedulable(r.reasons)
        } else {
            Status::UnschedulableAndUnresolvable(r.reasons)
        }
    }
}

/// What the cluster looks like for this cycle.
pub struct Snapshot<'a> {
    pub nodes: &'a [&'a NodeInfo],
    /// Placed pods with required anti-affinity terms (they can refuse incoming pods).
    pub anti_affinity: &'a HashSet<String>,
    /// Services and controllers, for the default spreading selector.
    pub owners: &'a spread::Owners,
    pub pdbs: &'a HashMap<String, Arc<PodDisruptionBudget>>,
}

/// Per-cycle scratch space: each field belongs to the plugin(s) that fill and read it.
pub struct CycleState<'a> {
    /// The pods placed so far with their nodes' labels, for the filters that look at other
    /// pods (InterPodAffinity, PodTopologySpread); `None` when this pod needs none of them.
    pub placed: Option<interpod::Placed<'a>>,
    /// Whether the pod's own terms need every placed pod (not only the anti-affinity ones).
    pub own_terms: bool,
    /// Pods nominated to a node by an earlier preemption that are at least as important as this
    /// one: the filters count them as if they ran there (upstream's nominated pods pass).
    pub nominated: HashMap<&'a str, Vec<Arc<PodInfo>>>,
    /// PodTopologySpread's scoring for this pod (PreScore).
    pub spread: Option<spread::Scorer>,
}

impl<'a> CycleState<'a> {
    pub fn new() -> CycleState<'a> {
        CycleState { placed: None, own_terms: false, nominated: HashMap::new(), spread: None }
    }

    /// Whether the filters look at other pods this cycle (so they are worth threads).
    pub fn needs_others(&self) -> bool {
        self.placed.is_some()
    }
}

impl Default for CycleState<'_> {
    fn default() -> Self {
        CycleState::new()
    }
}

pub trait Plugin: Send + Sync {
    fn name(&self) -> &'static str;
}

/// Once per cycle before any Filter: computes what the filters read.
pub trait PreFilter: Plugin {
    fn pre_filter<'a>(
        &self,
        state: &mut CycleState<'a>,
        pod: &PodInfo,
        snap: &Snapshot<'a>,
    ) -> Result<(), Status>;
}

/// Whether `pod` may run on `node`.
pub trait Filter: Plugin {
    fn filter(&self, state: &CycleState, pod: &PodInfo, node: &NodeInfo) -> Result<(), Status>;
}

/// After every node refused: what could make room (preemption).
pub trait PostFilter: Plugin {
    fn post_filter(
        &self,
        state: &CycleState,
        pod: &PodInfo,
        snap: &Snapshot,
        refusals: &[(&NodeInfo, Refusal)],
    ) -> preemption::Outcome;
}

/// Once per cycle before any Score, over the feasible nodes.
pub trait PreScore: Plugin {
    fn pre_score(
        &self,
        state: &mut CycleState,
        pod: &PodInfo,
        feasible: &[&NodeInfo],
        snap: &Snapshot,
    );
}

/// How good a feasible node is for the pod: 0..=MAX_NODE_SCORE after `normalize`.
pub trait Score: Plugin {
    fn score(&self, state: &CycleState, pod: &PodInfo, node: &NodeInfo) -> i64;

    /// Maps this plugin's raw scores of the feasible nodes (in order) to 0..=MAX_NODE_SCORE.
    fn normalize(&self, _state: &CycleState, _feasible: &[&NodeInfo], _scores: &mut [i64]) {}
}

/// Claims what the chosen node gives the pod before binding; `unreserve` gives it back when a
/// later step fails.
pub trait Reserve: Plugin {
    fn reserve(&self, state: &CycleState, pod: &PodInfo, node: &str) -> Result<(), Status>;
    fn unreserve(&self, state: &CycleState, pod: &PodInfo, node: &str);
}

/// The binding cycle's last step: makes the placement real. `None` when this binder leaves the
/// pod to the next one (upstream's Skip); `Some(Err(why))` when binding failed, and the pod goes
/// back through back-off.
pub trait Bind: Plugin {
    fn bind<'a>(
        &'a self,
        pod: &'a k8s_openapi::api::core::v1::Pod,
        node: &'a str,
    ) -> futures::future::BoxFuture<'a, Option<Result<(), String>>>;
}

/// The plugins of each extension point, in the order they run, and each score's weight.
pub struct Profile {
    pub pre_filter: Vec<Arc<dyn PreFilter>>,
    pub filter: Vec<Arc<dyn Filter>>,
    pub post_filter: Vec<Arc<dyn PostFilter>>,
    pub pre_score: Vec<Arc<dyn PreScore>>,
    pub score: Vec<(Arc<dyn Score>, i64)>,
    pub reserve: Vec<Arc<dyn Reserve>>,
}

/// The default profile: upstream's default plugins that rkube has, in upstream's order (the
/// pod-to-pod filters last, InterPodAffinity before PodTopologySpread), with its score weights.
impl Default for Profile {
    fn default() -> Profile {
        Profile::with_strategy(crate::plugins::ScoringStrategy::default())
    }
}

impl Profile {
    /// The default profile with NodeResourcesFit scoring by `strategy`.
    pub fn with_strategy(strategy: crate::plugins::ScoringStrategy) -> Profile {
        use crate::interpod::{InterPodAffinity, PodTopologySpread};
        use crate::plugins::{
            BalancedAllocation, NodeAffinity, NodeName, NodePorts, NodeResourcesFit,
            NodeUnschedulable, TaintToleration,
        };
        let fit = Arc::new(NodeResourcesFit { strategy });
        let taints = Arc::new(TaintToleration);
        let node_affinity = Arc::new(NodeAffinity);
        let pod_affinity = Arc::new(InterPodAffinity);
        let spread = Arc::new(PodTopologySpread);
        Profile {
            pre_filter: vec![pod_affinity.clone(), spread.clone()],
            filter: vec![
                Arc::new(NodeUnschedulable),
                Arc::new(NodeName),
                taints.clone(),
                node_affinity.clone(),
                Arc::new(NodePorts),
                fit.clone(),
                pod_affinity.clone(),
                spread.clone(),
            ],
            post_filter: vec![Arc::new(preemption::DefaultPreemption)],
            pre_score: vec![spread.clone()],
            score: vec![
                (fit, 1),
                (Arc::new(BalancedAllocation), 1),
                (taints, 3),
                (node_affinity, 2),
                (pod_affinity, 2),
                (spread, 2),
            ],
            reserve: Vec::new(),
        }
    }
}

impl Profile {
    /// Runs every PreFilter; the first rejection or failure ends the cycle.
    pub fn run_pre_filter<'a>(
        &self,
        state: &mut CycleState<'a>,
        pod: &PodInfo,
        snap: &Snapshot<'a>,
    ) -> Result<(), Status> {
        for p in &self.pre_filter {
            p.pre_filter(state, pod, snap)?;
        }
        Ok(())
    }

    /// Runs the filters in order until one says no. Pods nominated to the node count as if
    /// they ran there (then the node's usage is copied: rare, only on such nodes).
    pub fn run_filter(
        &self,
        state: &CycleState,
        pod: &PodInfo,
        node: &NodeInfo,
    ) -> Result<(), Status> {
        match state.nominated.get(node.name()) {
            None => self.filters(state, pod, node),
            Some(extra) => {
                let mut usage = node.usage.clone();
                for p in extra {
                    usage.add_info(p);
                }
                let with = NodeInfo {
                    node: node.node.clone(),
                    alloc: node.alloc.clone(),
                    usage,
                    pods: HashMap::new(),
                    match_counts: Default::default(),
                };
                self.filters(state, pod, &with)
            }
        }
    }

    fn filters(&self, state: &CycleState, pod: &PodInfo, node: &NodeInfo) -> Result<(), Status> {
        for f in &self.filter {
            f.filter(state, pod, node)?;
        }
        Ok(())
    }

    /// Runs the PostFilters until one finds a way; the last refusal otherwise.
    pub fn run_post_filter(
        &self,
        state: &CycleState,
        pod: &PodInfo,
        snap: &Snapshot,
        refusals: &[(&NodeInfo, Refusal)],
    ) -> Option<preemption::Outcome> {
        let mut last = None;
        for p in &self.post_filter {
            match p.post_filter(state, pod, snap, refusals) {
                nominate @ preemption::Outcome::Nominate(_) => return Some(nominate),
                fail => last = Some(fail),
            }
        }
        last
    }

    /// PreScore, then every Score over the feasible nodes, normalized and weighted: the total
    /// of each node, in the order of `feasible`.
    pub fn run_score(
        &self,
        state: &mut CycleState,
        pod: &PodInfo,
        feasible: &[&NodeInfo],
        snap: &Snapshot,
    ) -> Vec<i64> {
        for p in &self.pre_score {
            p.pre_score(state, pod, feasible, snap);
        }
        let mut total = vec![0i64; feasible.len()];
        let mut scratch = vec![0i64; feasible.len()];
        for (plugin, weight) in &self.score {
            for (s, ni) in scratch.iter_mut().zip(feasible) {
                *s = plugin.score(state, pod, ni);
            }
            plugin.normalize(state, feasible, &mut scratch);
            for (t, s) in total.iter_mut().zip(&scratch) {
                *t += weight * s;
            }
        }
        total
    }

    /// Reserves the node with every Reserve plugin; on a refusal, the ones that reserved give
    /// it back (in reverse order).
    pub fn run_reserve(&self, state: &CycleState, pod: &PodInfo, node: &str) -> Result<(), Status> {
        for (i, p) in self.reserve.iter().enumerate() {
            if let Err(st) = p.reserve(state, pod, node) {
                for q in self.reserve[..i].iter().rev() {
                    q.unreserve(state, pod, node);
                }
                return Err(st);
            }
        }
        Ok(())
    }
}

/// Upstream's min-max normalization onto 0..=MAX_NODE_SCORE (InterPodAffinity's): all 0 when
/// every node scored the same.
pub fn min_max_normalize(scores: &mut [i64]) {
    let (Some(&min), Some(&max)) = (scores.iter().min(), scores.iter().max()) else { return };
    let diff = max - min;
    for s in scores.iter_mut() {
        *s = if diff > 0 { MAX_NODE_SCORE * (*s - min) / diff } else { 0 };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_map_to_refusals_and_failures_stay_failures() {
        let r = Status::unschedulable("Insufficient cpu").into_refusal().unwrap();
        assert!(r.resolvable);
        let r = Status::unresolvable("node(s) were unschedulable").into_refusal().unwrap();
        assert!(!r.resolvable);
        assert_eq!(Status::Error("boom".into()).into_refusal(), Err("boom".to_string()));
        assert_eq!(Status::from(r.clone()).into_refusal(), Ok(r));
    }

    #[test]
    fn min_max_normalization_spans_0_to_100() {
        let mut s = vec![-10, 0, 30];
        min_max_normalize(&mut s);
        assert_eq!(s, vec![0, 25, 100]);
        let mut same = vec![7, 7];
        min_max_normalize(&mut same);
        assert_eq!(same, vec![0, 0]);
    }
}
