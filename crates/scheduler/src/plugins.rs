//! The scheduling plugins: filters that explain every refusal with upstream's reason text, and
//! scores (0..=100, weighted) that pick the best of the nodes that fit.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Node, Pod, Taint, Toleration};
use rkube_client::quantity::{parse_milli, parse_units};

use crate::framework::{CycleState, Filter, Plugin, Score, Status};

/// Requests of a pod per resource, in milli-units for cpu and units for everything else.
pub type Resources = BTreeMap<String, i128>;

pub fn pod_requests(pod: &Pod) -> Resources {
    let mut total = Resources::new();
    let Some(spec) = &pod.spec else { return total };
    let add = |acc: &mut Resources, c: &k8s_openapi::api::core::v1::Container| {
        let req = c.resources.as_ref().and_then(|r| r.requests.clone()).unwrap_or_default();
        let lim = c.resources.as_ref().and_then(|r| r.limits.clone()).unwrap_or_default();
        let mut merged = lim;
        merged.extend(req);
        let mut out = Resources::new();
        for (k, q) in merged {
            let v = if k == "cpu" { parse_milli(&q.0) } else { parse_units(&q.0) };
            if let Some(v) = v {
                *out.entry(k).or_default() += v;
            }
        }
        for (k, v) in out {
            *acc.entry(k).or_default() += v;
        }
    };
    for c in &spec.containers {
        add(&mut total, c);
    }
    // Init containers run one at a time: the pod needs the largest of them, if it is larger.
    for c in spec.init_containers.iter().flatten() {
        let mut one = Resources::new();
        add(&mut one, c);
        for (k, v) in one {
            let e = total.entry(k).or_default();
            if v > *e {
                *e = v;
            }
        }
    }
    if let Some(overhead) = &spec.overhead {
        for (k, q) in overhead {
            let v = if k == "cpu" { parse_milli(&q.0) } else { parse_units(&q.0) };
            *total.entry(k.clone()).or_default() += v.unwrap_or(0);
        }
    }
    total
}

pub fn node_allocatable(node: &Node) -> Resources {
    let mut out = Resources::new();
    let status = node.status.as_ref();
    let alloc =
        status.and_then(|s| s.allocatable.clone().or(s.capacity.clone())).unwrap_or_default();
    for (k, q) in alloc {
        let v = if k == "cpu" { parse_milli(&q.0) } else { parse_units(&q.0) };
        if let Some(v) = v {
            out.insert(k, v);
        }
    }
    out
}

/// A node's allocatable room: cpu, memory and pods as fields (every cycle reads them for every
/// node), everything else by name.
#[derive(Default, Clone, Debug)]
pub struct Alloc {
    pub cpu: i128,
    pub memory: i128,
    pub pods: i128,
    pub all: Resources,
}

impl Alloc {
    pub fn of(node: &Node) -> Alloc {
        let all = node_allocatable(node);
        Alloc {
            cpu: all.get("cpu").copied().unwrap_or(0),
            memory: all.get("memory").copied().unwrap_or(0),
            pods: all.get("pods").copied().unwrap_or(110),
            all,
        }
    }
}

/// What one node already carries: cpu and memory requests as fields, other resources by name.
#[derive(Default, Clone, Debug)]
pub struct NodeUsage {
    pub cpu: i128,
    pub memory: i128,
    /// Requests of resources other than cpu and memory.
    pub requested: Resources,
    pub pods: usize,
    pub host_ports: Vec<(String, i32)>,
}

impl NodeUsage {
    pub fn add(&mut self, pod: &Pod) {
        self.add_info(&PodInfo::new(Arc::new(pod.clone())));
    }

    pub fn add_info(&mut self, pi: &PodInfo) {
        self.cpu += pi.cpu;
        self.memory += pi.memory;
        for (k, v) in &pi.other {
            *self.requested.entry(k.clone()).or_default() += v;
        }
        self.pods += 1;
        self.host_ports.extend(pi.host_ports.iter().cloned());
    }

    pub fn remove_info(&mut self, pi: &PodInfo) {
        self.cpu -= pi.cpu;
        self.memory -= pi.memory;
        for (k, v) in &pi.other {
            if let Some(e) = self.requested.get_mut(k) {
                *e -= v;
            }
        }
        self.pods = self.pods.saturating_sub(1);
        for hp in &pi.host_ports {
            if let Some(i) = self.host_ports.iter().position(|x| x == hp) {
                self.host_ports.swap_remove(i);
            }
        }
    }
}

/// A pod with what the plugins need parsed once (upstream's PodInfo): requests, host ports,
/// priority.
#[derive(Debug)]
pub struct PodInfo {
    pub pod: Arc<Pod>,
    pub requests: Resources,
    pub cpu: i128,
    pub memory: i128,
    /// Requests other than cpu and memory.
    pub other: Vec<(String, i128)>,
    pub host_ports: Vec<(String, i32)>,
    pub priority: i32,
}

impl PodInfo {
    pub fn new(pod: Arc<Pod>) -> PodInfo {
        let requests = pod_requests(&pod);
        PodInfo {
            cpu: requests.get("cpu").copied().unwrap_or(0),
            memory: requests.get("memory").copied().unwrap_or(0),
            other: requests
                .iter()
                .filter(|(k, _)| *k != "cpu" && *k != "memory")
                .map(|(k, v)| (k.clone(), *v))
                .collect(),
            requests,
            host_ports: host_ports(&pod),
            priority: pod.spec.as_ref().and_then(|s| s.priority).unwrap_or(0),
            pod,
        }
    }
}

/// A node with its parsed allocatable room, what its pods use, and the pods themselves
/// (bound or assumed), keyed by namespace/name.
#[derive(Debug)]
pub struct NodeInfo {
    pub node: Arc<Node>,
    pub alloc: Alloc,
    pub usage: NodeUsage,
    pub pods: HashMap<String, Arc<PodInfo>>,
    /// How many of `pods` a few recent selectors matched (selector key, count), so that a
    /// burst of replicas of one Deployment does not match every node's pods again each cycle.
    /// Emptied whenever `pods` changes; see `spread::count_matching`.
    pub match_counts: std::sync::Mutex<Vec<(Arc<str>, i64)>>,
}

impl NodeInfo {
    pub fn new(node: Arc<Node>) -> NodeInfo {
        NodeInfo {
            alloc: Alloc::of(&node),
            node,
            usage: NodeUsage::default(),
            pods: HashMap::new(),
            match_counts: Default::default(),
        }
    }

    fn pods_changed(&mut self) {
        self.match_counts.get_mut().unwrap_or_else(|p| p.into_inner()).clear();
    }

    pub fn set_node(&mut self, node: Arc<Node>) {
        self.alloc = Alloc::of(&node);
        self.node = node;
    }

    pub fn add(&mut self, key: &str, pi: Arc<PodInfo>) {
        if let Some(old) = self.pods.insert(key.to_string(), pi.clone()) {
            self.usage.remove_info(&old);
        }
        self.usage.add_info(&pi);
        self.pods_changed();
    }

    pub fn remove(&mut self, key: &str) {
        if let Some(old) = self.pods.remove(key) {
            self.usage.remove_info(&old);
            self.pods_changed();
        }
    }

    pub fn name(&self) -> &str {
        self.node.metadata.name.as_deref().unwrap_or("")
    }
}

pub fn host_ports(pod: &Pod) -> Vec<(String, i32)> {
    let mut out = Vec::new();
    for c in pod.spec.iter().flat_map(|s| s.containers.iter()) {
        for p in c.ports.iter().flatten() {
            if let Some(hp) = p.host_port.filter(|h| *h > 0) {
                out.push((p.protocol.clone().unwrap_or_else(|| "TCP".into()), hp));
            }
        }
    }
    out
}

/// Why a node was refused, and whether preempting pods could ever change that.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    pub reasons: Vec<String>,
    pub resolvable: bool,
}

fn refuse(reason: impl Into<String>, resolvable: bool) -> Refusal {
    Refusal { reasons: vec![reason.into()], resolvable }
}

pub fn tolerates(tols: &[Toleration], taint: &Taint) -> bool {
    tols.iter().any(|t| {
        let effect_ok = t.effect.as_deref().is_none_or(|e| e.is_empty() || e == taint.effect);
        let key_ok = match t.key.as_deref() {
            None | Some("") => t.operator.as_deref() == Some("Exists"),
            Some(k) => k == taint.key,
        };
        let value_ok = match t.operator.as_deref() {
            Some("Exists") => true,
            _ => t.value.as_deref().unwrap_or("") == taint.value.as_deref().unwrap_or(""),
        };
        effect_ok && key_ok && value_ok
    })
}

fn match_expr(labels: &BTreeMap<String, String>, key: &str, op: &str, values: &[String]) -> bool {
    let v = labels.get(key);
    match op {
        "In" => v.is_some_and(|v| values.contains(v)),
        "NotIn" => v.is_none_or(|v| !values.contains(v)),
        "Exists" => v.is_some(),
        "DoesNotExist" => v.is_none(),
        "Gt" | "Lt" => {
            let (Some(have), Some(want)) = (
                v.and_then(|v| v.parse::<i64>().ok()),
                values.first().and_then(|w| w.parse::<i64>().ok()),
            ) else {
                return false;
            };
            if op == "Gt" { have > want } else { have < want }
        }
        _ => false,
    }
}

fn term_matches(node: &Node, term: &k8s_openapi::api::core::v1::NodeSelectorTerm) -> bool {
    let empty = BTreeMap::new();
    let labels = node.metadata.labels.as_ref().unwrap_or(&empty);
    let exprs_ok = term
        .match_expressions
        .iter()
        .flatten()
        .all(|e| match_expr(labels, &e.key, &e.operator, e.values.as_deref().unwrap_or(&[])));
    let fields_ok = term.match_fields.iter().flatten().all(|e| {
        let mut f = BTreeMap::new();
        if let Some(n) = &node.metadata.name {
            f.insert("metadata.name".to_string(), n.clone());
        }
        match_expr(&f, &e.key, &e.operator, e.values.as_deref().unwrap_or(&[]))
    });
    let empty = term.match_expressions.as_ref().is_none_or(|v| v.is_empty())
        && term.match_fields.as_ref().is_none_or(|v| v.is_empty());
    !empty && exprs_ok && fields_ok
}

/// Every filter plugin, in upstream's order; `Ok` when the pod fits the node.
pub fn filter(pod: &Pod, node: &Node, usage: &NodeUsage) -> Result<(), Refusal> {
    let pi = PodInfo::new(Arc::new(pod.clone()));
    filter_info(&pi, node, &Alloc::of(node), usage)
}

/// Whether the node satisfies the pod's nodeSelector and required node affinity.
pub fn matches_node_affinity(pod: &Pod, node: &Node) -> bool {
    let Some(spec) = pod.spec.as_ref() else { return true };
    let labels = node.metadata.labels.as_ref();
    let selector_ok =
        spec.node_selector.iter().flatten().all(|(k, v)| labels.and_then(|l| l.get(k)) == Some(v));
    selector_ok
        && spec
            .affinity
            .as_ref()
            .and_then(|a| a.node_affinity.as_ref())
            .and_then(|na| na.required_during_scheduling_ignored_during_execution.as_ref())
            .is_none_or(|req| req.node_selector_terms.iter().any(|t| term_matches(node, t)))
}

/// The node filters on parsed inputs (the pod's requests and ports parsed once per cycle, the
/// node's allocatable once per node update), in upstream's order: NodeUnschedulable, NodeName,
/// TaintToleration, NodeAffinity, NodePorts, NodeResourcesFit. The profile runs the same
/// plugins through the framework; preemption's dry runs call this directly.
pub fn filter_info(
    pi: &PodInfo,
    node: &Node,
    alloc: &Alloc,
    usage: &NodeUsage,
) -> Result<(), Refusal> {
    let ok = node_unschedulable(pi, node)
        .and_then(|()| node_name(pi, node))
        .and_then(|()| taints_tolerated(pi, node))
        .and_then(|()| node_affinity(pi, node))
        .and_then(|()| node_ports(pi, usage))
        .and_then(|()| resources_fit(pi, alloc, usage));
    ok.map_err(|st| st.into_refusal().unwrap_or_else(|e| refuse(e, false)))
}

fn tolerations(pi: &PodInfo) -> &[Toleration] {
    pi.pod.spec.as_ref().and_then(|s| s.tolerations.as_deref()).unwrap_or(&[])
}

fn node_taints(node: &Node) -> &[Taint] {
    node.spec.as_ref().and_then(|s| s.taints.as_deref()).unwrap_or(&[])
}

fn node_unschedulable(pi: &PodInfo, node: &Node) -> Result<(), Status> {
    if node.spec.as_ref().and_then(|s| s.unschedulable) == Some(true) {
        let t = Taint {
            key: "node.kubernetes.io/unschedulable".into(),
            effect: "NoSchedule".into(),
            ..Default::default()
        };
        if !tolerates(tolerations(pi), &t) {
            return Err(Status::unresolvable("node(s) were unschedulable"));
        }
    }
    Ok(())
}

fn node_name(pi: &PodInfo, node: &Node) -> Result<(), Status> {
    let want = pi.pod.spec.as_ref().and_then(|s| s.node_name.as_deref()).filter(|n| !n.is_empty());
    match want {
        Some(want) if want != node.metadata.name.as_deref().unwrap_or("") => {
            Err(Status::unresolvable("node(s) didn't match the requested node name"))
        }
        _ => Ok(()),
    }
}

fn taints_tolerated(pi: &PodInfo, node: &Node) -> Result<(), Status> {
    let tols = tolerations(pi);
    for taint in node_taints(node) {
        if (taint.effect == "NoSchedule" || taint.effect == "NoExecute") && !tolerates(tols, taint)
        {
            return Err(Status::unresolvable("node(s) had untolerated taint(s)"));
        }
    }
    Ok(())
}

fn node_affinity(pi: &PodInfo, node: &Node) -> Result<(), Status> {
    if !matches_node_affinity(&pi.pod, node) {
        return Err(Status::unresolvable("node(s) didn't match Pod's node affinity/selector"));
    }
    Ok(())
}

fn node_ports(pi: &PodInfo, usage: &NodeUsage) -> Result<(), Status> {
    if pi.host_ports.iter().any(|w| usage.host_ports.contains(w)) {
        return Err(Status::unschedulable(
            "node(s) didn't have free ports for the requested pod ports",
        ));
    }
    Ok(())
}

fn resources_fit(pi: &PodInfo, alloc: &Alloc, usage: &NodeUsage) -> Result<(), Status> {
    let mut reasons = Vec::new();
    if usage.pods as i128 + 1 > alloc.pods {
        reasons.push("Too many pods".to_string());
    }
    if pi.cpu > 0 && usage.cpu + pi.cpu > alloc.cpu {
        reasons.push("Insufficient cpu".to_string());
    }
    if pi.memory > 0 && usage.memory + pi.memory > alloc.memory {
        reasons.push("Insufficient memory".to_string());
    }
    for (res, want) in &pi.other {
        let want = *want;
        if want <= 0 {
            continue;
        }
        let have = alloc.all.get(res).copied().unwrap_or(0);
        let used = usage.requested.get(res).copied().unwrap_or(0);
        if used + want > have {
            reasons.push(format!("Insufficient {res}"));
        }
    }
    if !reasons.is_empty() {
        return Err(Status::Unschedulable(reasons));
    }
    Ok(())
}

/// Weighted score of a feasible node (higher is better): LeastAllocated, BalancedAllocation,
/// TaintToleration (PreferNoSchedule) and preferred NodeAffinity.
pub fn score(pod: &Pod, node: &Node, usage: &NodeUsage) -> i64 {
    let pi = PodInfo::new(Arc::new(pod.clone()));
    score_info(&pi, node, &Alloc::of(node), usage)
}

/// [`score`] on parsed inputs: the node plugins' scores with the default profile's weights.
pub fn score_info(pi: &PodInfo, node: &Node, alloc: &Alloc, usage: &NodeUsage) -> i64 {
    let (cpu, mem) = fractions(pi, alloc, usage);
    least_allocated(cpu, mem)
        + balanced(cpu, mem)
        + 3 * taint_score(pi, node)
        + 2 * preferred_node_affinity(pi, node)
}

/// The node's cpu and memory use with the pod, as fractions of allocatable (at most 1).
/// Upstream scores a pod without requests as if it asked for 100m CPU and 200Mi memory.
fn fractions(pi: &PodInfo, alloc: &Alloc, usage: &NodeUsage) -> (f64, f64) {
    let want = |v: i128, default: i128| if v != 0 { v } else { default };
    let frac = |cap: i128, used: i128, req: i128| {
        if cap <= 0 {
            return 1.0;
        }
        ((used + req) as f64 / cap as f64).min(1.0)
    };
    (
        frac(alloc.cpu, usage.cpu, want(pi.cpu, 100)),
        frac(alloc.memory, usage.memory, want(pi.memory, 200 << 20)),
    )
}

fn least_allocated(cpu: f64, mem: f64) -> i64 {
    (((1.0 - cpu) + (1.0 - mem)) / 2.0 * 100.0) as i64
}

fn most_allocated(cpu: f64, mem: f64) -> i64 {
    ((cpu + mem) / 2.0 * 100.0) as i64
}

fn balanced(cpu: f64, mem: f64) -> i64 {
    ((1.0 - (cpu - mem).abs()) * 100.0) as i64
}

/// 100 less 25 per PreferNoSchedule taint the pod does not tolerate.
fn taint_score(pi: &PodInfo, node: &Node) -> i64 {
    let tols = tolerations(pi);
    let prefer_no = node_taints(node)
        .iter()
        .filter(|t| t.effect == "PreferNoSchedule" && !tolerates(tols, t))
        .count() as i64;
    (100 - prefer_no * 25).max(0)
}

/// The weights of the preferred node affinity terms the node matches, at most 100.
fn preferred_node_affinity(pi: &PodInfo, node: &Node) -> i64 {
    let preferred: i64 = pi
        .pod
        .spec
        .as_ref()
        .and_then(|s| s.affinity.as_ref())
        .and_then(|a| a.node_affinity.as_ref())
        .and_then(|na| na.preferred_during_scheduling_ignored_during_execution.as_ref())
        .map(|terms| {
            terms
                .iter()
                .filter(|t| term_matches(node, &t.preference))
                .map(|t| t.weight as i64)
                .sum()
        })
        .unwrap_or(0);
    preferred.min(100)
}

macro_rules! plugin {
    ($ty:ident, $name:literal) => {
        #[doc = concat!("The ", $name, " plugin.")]
        pub struct $ty;
        impl Plugin for $ty {
            fn name(&self) -> &'static str {
                $name
            }
        }
    };
}

plugin!(NodeUnschedulable, "NodeUnschedulable");
plugin!(NodeName, "NodeName");
plugin!(TaintToleration, "TaintToleration");
plugin!(NodeAffinity, "NodeAffinity");
plugin!(NodePorts, "NodePorts");

/// How NodeResourcesFit scores a feasible node (upstream's `scoringStrategy`): spread pods over
/// the least used nodes (LeastAllocated, the default) or pack them onto the most used ones
/// (MostAllocated, which leaves whole nodes free).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum ScoringStrategy {
    #[default]
    #[value(name = "LeastAllocated")]
    LeastAllocated,
    #[value(name = "MostAllocated")]
    MostAllocated,
}

/// The NodeResourcesFit plugin: filters on requests, scores with its strategy.
#[derive(Default)]
pub struct NodeResourcesFit {
    pub strategy: ScoringStrategy,
}

impl Plugin for NodeResourcesFit {
    fn name(&self) -> &'static str {
        "NodeResourcesFit"
    }
}
plugin!(BalancedAllocation, "NodeResourcesBalancedAllocation");

impl Filter for NodeUnschedulable {
    fn filter(&self, _: &CycleState, pod: &PodInfo, node: &NodeInfo) -> Result<(), Status> {
        node_unschedulable(pod, &node.node)
    }
}

impl Filter for NodeName {
    fn filter(&self, _: &CycleState, pod: &PodInfo, node: &NodeInfo) -> Result<(), Status> {
        node_name(pod, &node.node)
    }
}

impl Filter for TaintToleration {
    fn filter(&self, _: &CycleState, pod: &PodInfo, node: &NodeInfo) -> Result<(), Status> {
        taints_tolerated(pod, &node.node)
    }
}

impl Score for TaintToleration {
    fn score(&self, _: &CycleState, pod: &PodInfo, node: &NodeInfo) -> i64 {
        taint_score(pod, &node.node)
    }
}

impl Filter for NodeAffinity {
    fn filter(&self, _: &CycleState, pod: &PodInfo, node: &NodeInfo) -> Result<(), Status> {
        node_affinity(pod, &node.node)
    }
}

impl Score for NodeAffinity {
    fn score(&self, _: &CycleState, pod: &PodInfo, node: &NodeInfo) -> i64 {
        preferred_node_affinity(pod, &node.node)
    }
}

impl Filter for NodePorts {
    fn filter(&self, _: &CycleState, pod: &PodInfo, node: &NodeInfo) -> Result<(), Status> {
        node_ports(pod, &node.usage)
    }
}

impl Filter for NodeResourcesFit {
    fn filter(&self, _: &CycleState, pod: &PodInfo, node: &NodeInfo) -> Result<(), Status> {
        resources_fit(pod, &node.alloc, &node.usage)
    }
}

/// NodeResourcesFit's score: cpu and memory weighted equally, as upstream's default resources.
impl Score for NodeResourcesFit {
    fn score(&self, _: &CycleState, pod: &PodInfo, node: &NodeInfo) -> i64 {
        let (cpu, mem) = fractions(pod, &node.alloc, &node.usage);
        match self.strategy {
            ScoringStrategy::LeastAllocated => least_allocated(cpu, mem),
            ScoringStrategy::MostAllocated => most_allocated(cpu, mem),
        }
    }
}

impl Score for BalancedAllocation {
    fn score(&self, _: &CycleState, pod: &PodInfo, node: &NodeInfo) -> i64 {
        let (cpu, mem) = fractions(pod, &node.alloc, &node.usage);
        balanced(cpu, mem)
    }
}

/// `0/3 nodes are available: 1 node(s) had untolerated taint(s), 2 Insufficient nvidia.com/gpu.`
/// followed by the preemption summary, as upstream prints FailedScheduling.
pub fn failure_message(
    total: usize,
    refusals: &[Refusal],
    preemption: &BTreeMap<String, usize>,
) -> String {
    if total == 0 {
        return fit_error(0, refusals);
    }
    let mut msg = fit_error(total, refusals);
    msg.push(' ');
    msg.push_str(&preemption_message(total, preemption));
    msg
}

/// Upstream's FitError text: `0/N nodes are available: <count> <reason>, ….` with the entries
/// sorted as strings.
pub fn fit_error(total: usize, refusals: &[Refusal]) -> String {
    if total == 0 {
        return "no nodes available to schedule pods".to_string();
    }
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    for r in refusals {
        for reason in &r.reasons {
            *counts.entry(reason.clone()).or_default() += 1;
        }
    }
    format!("0/{total} nodes are available: {}.", sorted_counts(&counts))
}

/// DefaultPreemption's message when no node has victims that would make room.
pub fn preemption_message(total: usize, statuses: &BTreeMap<String, usize>) -> String {
    format!("preemption: 0/{total} nodes are available: {}.", sorted_counts(statuses))
}

fn sorted_counts(counts: &BTreeMap<String, usize>) -> String {
    let mut parts: Vec<String> = counts.iter().map(|(r, n)| format!("{n} {r}")).collect();
    parts.sort();
    parts.join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{
        Container, NodeSpec, NodeStatus, PodSpec, ResourceRequirements,
    };
    use k8s_openapi::apimachinery::pkg::api::resource::Quantity;

    fn node(name: &str, cpu: &str, gpu: Option<&str>) -> Node {
        let mut alloc = BTreeMap::new();
        alloc.insert("cpu".to_string(), Quantity(cpu.into()));
        alloc.insert("memory".to_string(), Quantity("8Gi".into()));
        alloc.insert("pods".to_string(), Quantity("110".into()));
        if let Some(g) = gpu {
            alloc.insert("nvidia.com/gpu".to_string(), Quantity(g.into()));
        }
        Node {
            metadata: kube::api::ObjectMeta { name: Some(name.into()), ..Default::default() },
            spec: Some(NodeSpec::default()),
            status: Some(NodeStatus { allocatable: Some(alloc), ..Default::default() }),
        }
    }

    fn pod_with(res: &[(&str, &str)]) -> Pod {
        let req: BTreeMap<String, Quantity> =
            res.iter().map(|(k, v)| (k.to_string(), Quantity(v.to_string()))).collect();
        Pod {
            spec: Some(PodSpec {
                containers: vec![Container {
                    name: "c".into(),
                    resources: Some(ResourceRequirements {
                        limits: Some(req),
                        ..Default::default()
                    }),
                    ..Default::default()
                }],
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn a_gpu_pod_is_refused_by_nodes_without_gpus_with_upstreams_message() {
        let pod = pod_with(&[("nvidia.com/gpu", "1")]);
        let nodes: Vec<Node> = (0..10).map(|i| node(&format!("n{i}"), "4", None)).collect();
        let refusals: Vec<Refusal> =
            nodes.iter().map(|n| filter(&pod, n, &NodeUsage::default()).unwrap_err()).collect();
        let mut pre = BTreeMap::new();
        pre.insert("No preemption victims found for incoming pod".to_string(), 10);
        assert_eq!(
            failure_message(10, &refusals, &pre),
            "0/10 nodes are available: 10 Insufficient nvidia.com/gpu. preemption: 0/10 nodes are available: 10 No preemption victims found for incoming pod."
        );
        assert!(filter(&pod, &node("g", "4", Some("1")), &NodeUsage::default()).is_ok());
    }

    #[test]
    fn untolerated_no_schedule_taints_refuse_the_node() {
        let mut n = node("cp", "4", None);
        n.spec = Some(NodeSpec {
            taints: Some(vec![Taint {
                key: "node-role.kubernetes.io/control-plane".into(),
                effect: "NoSchedule".into(),
                ..Default::default()
            }]),
            ..Default::default()
        });
        let pod = pod_with(&[]);
        let r = filter(&pod, &n, &NodeUsage::default()).unwrap_err();
        assert_eq!(r.reasons, vec!["node(s) had untolerated taint(s)".to_string()]);
        assert!(!r.resolvable);
    }

    #[test]
    fn reasons_are_sorted_as_strings() {
        let r = vec![
            Refusal { reasons: vec!["node(s) had untolerated taint(s)".into()], resolvable: false },
            Refusal { reasons: vec!["Insufficient cpu".into()], resolvable: true },
            Refusal { reasons: vec!["Insufficient cpu".into()], resolvable: true },
        ];
        let m = failure_message(3, &r, &BTreeMap::new());
        assert!(
            m.starts_with(
                "0/3 nodes are available: 1 node(s) had untolerated taint(s), 2 Insufficient cpu."
            ),
            "{m}"
        );
    }

    fn info(pod: Pod) -> PodInfo {
        PodInfo::new(Arc::new(pod))
    }

    fn node_info(n: Node) -> NodeInfo {
        NodeInfo::new(Arc::new(n))
    }

    #[test]
    fn an_unschedulable_node_refuses_pods_unless_they_tolerate_it() {
        let mut n = node("cordoned", "4", None);
        n.spec.as_mut().unwrap().unschedulable = Some(true);
        let r = filter(&pod_with(&[]), &n, &NodeUsage::default()).unwrap_err();
        assert_eq!(r.reasons, ["node(s) were unschedulable"]);
        assert!(!r.resolvable);
        let mut pod = pod_with(&[]);
        pod.spec.as_mut().unwrap().tolerations = Some(vec![Toleration {
            key: Some("node.kubernetes.io/unschedulable".into()),
            operator: Some("Exists".into()),
            effect: Some("NoSchedule".into()),
            ..Default::default()
        }]);
        assert!(filter(&pod, &n, &NodeUsage::default()).is_ok());
    }

    #[test]
    fn a_pod_naming_a_node_fits_only_that_node() {
        let mut pod = pod_with(&[]);
        pod.spec.as_mut().unwrap().node_name = Some("n2".into());
        let r = filter(&pod, &node("n1", "4", None), &NodeUsage::default()).unwrap_err();
        assert_eq!(r.reasons, ["node(s) didn't match the requested node name"]);
        assert!(filter(&pod, &node("n2", "4", None), &NodeUsage::default()).is_ok());
    }

    #[test]
    fn node_selector_and_required_affinity_must_match_the_labels() {
        let mut ssd = node("ssd", "4", None);
        ssd.metadata.labels = Some([("disk".to_string(), "ssd".to_string())].into());
        let hdd = node("hdd", "4", None);
        let mut pod = pod_with(&[]);
        pod.spec.as_mut().unwrap().node_selector = Some([("disk".into(), "ssd".into())].into());
        assert!(filter(&pod, &ssd, &NodeUsage::default()).is_ok());
        let r = filter(&pod, &hdd, &NodeUsage::default()).unwrap_err();
        assert_eq!(r.reasons, ["node(s) didn't match Pod's node affinity/selector"]);
        let mut pod = pod_with(&[]);
        pod.spec.as_mut().unwrap().affinity = Some(serde_json::from_value(serde_json::json!({
            "nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
                {"matchExpressions": [{"key": "disk", "operator": "NotIn", "values": ["ssd"]}]}]}}
        })).unwrap());
        assert!(filter(&pod, &hdd, &NodeUsage::default()).is_ok());
        assert!(filter(&pod, &ssd, &NodeUsage::default()).is_err());
    }

    #[test]
    fn a_host_port_in_use_refuses_the_node_and_preemption_may_help() {
        let with_port = || -> Pod {
            serde_json::from_value(serde_json::json!({"spec": {"containers": [
                {"name": "c", "ports": [{"containerPort": 80, "hostPort": 8080}]}]}}))
            .unwrap()
        };
        let mut usage = NodeUsage::default();
        let n = node("n", "4", None);
        assert!(filter(&with_port(), &n, &usage).is_ok());
        usage.add(&with_port());
        let r = filter(&with_port(), &n, &usage).unwrap_err();
        assert_eq!(r.reasons, ["node(s) didn't have free ports for the requested pod ports"]);
        assert!(r.resolvable);
    }

    #[test]
    fn a_full_node_says_too_many_pods_and_every_short_resource() {
        let mut n = node("small", "1", None);
        n.status
            .as_mut()
            .unwrap()
            .allocatable
            .as_mut()
            .unwrap()
            .insert("pods".into(), Quantity("1".into()));
        let mut usage = NodeUsage::default();
        usage.add(&pod_with(&[("cpu", "500m")]));
        let r = filter(&pod_with(&[("cpu", "600m"), ("memory", "9Gi")]), &n, &usage).unwrap_err();
        assert_eq!(r.reasons, ["Too many pods", "Insufficient cpu", "Insufficient memory"]);
        assert!(r.resolvable);
    }

    #[test]
    fn least_allocated_prefers_the_emptier_node_and_most_allocated_the_fuller() {
        let pod = info(pod_with(&[("cpu", "1"), ("memory", "1Gi")]));
        let empty = node_info(node("empty", "4", None));
        let mut busy = node_info(node("busy", "4", None));
        busy.usage.add(&pod_with(&[("cpu", "2"), ("memory", "4Gi")]));
        let state = CycleState::new();
        let least = NodeResourcesFit { strategy: ScoringStrategy::LeastAllocated };
        let most = NodeResourcesFit { strategy: ScoringStrategy::MostAllocated };
        // empty: cpu 1/4, memory 1/8 → least (0.75 + 0.875) / 2; busy: 3/4 and 5/8.
        assert_eq!(least.score(&state, &pod, &empty), 81);
        assert_eq!(least.score(&state, &pod, &busy), 31);
        assert_eq!(most.score(&state, &pod, &empty), 18);
        assert_eq!(most.score(&state, &pod, &busy), 68);
    }

    #[test]
    fn balanced_allocation_prefers_equal_cpu_and_memory_fractions() {
        let pod = info(pod_with(&[("cpu", "2"), ("memory", "4Gi")]));
        let even = node_info(node("even", "4", None));
        let mut skewed = node_info(node("skewed", "4", None));
        skewed.usage.add(&pod_with(&[("cpu", "2")]));
        let state = CycleState::new();
        assert_eq!(BalancedAllocation.score(&state, &pod, &even), 100);
        assert_eq!(BalancedAllocation.score(&state, &pod, &skewed), 50);
    }

    #[test]
    fn prefer_no_schedule_taints_lower_the_score_without_refusing() {
        let mut n = node("n", "4", None);
        n.spec.as_mut().unwrap().taints = Some(vec![Taint {
            key: "spot".into(),
            effect: "PreferNoSchedule".into(),
            ..Default::default()
        }]);
        let pod = pod_with(&[]);
        assert!(filter(&pod, &n, &NodeUsage::default()).is_ok());
        let state = CycleState::new();
        assert_eq!(TaintToleration.score(&state, &info(pod.clone()), &node_info(n.clone())), 75);
        assert_eq!(
            TaintToleration.score(&state, &info(pod), &node_info(node("m", "4", None))),
            100
        );
    }
}
