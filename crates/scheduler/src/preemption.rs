//! DefaultPreemption (PostFilter), as upstream's: on every node where only resources or ports
//! stood in the way, remove all lower-priority pods, check the pod then fits, and reprieve as
//! many of them as possible — higher priority first, pods whose eviction would violate a
//! PodDisruptionBudget before the others. Among the nodes with victims, pick the one with the
//! fewest PDB violations, then the lowest highest-victim priority, the smallest sum of victim
//! priorities, the fewest victims, the latest start of the highest-priority victims, then the
//! first.

use std::cmp::Ordering;
use std::collections::BTreeMap;
use std::sync::Arc;

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;

use crate::framework::{CycleState, Plugin, PostFilter, Snapshot};
use crate::plugins::{self, NodeInfo, PodInfo, Refusal};

#[derive(Debug)]
pub struct Candidate {
    pub node: String,
    /// Most important first.
    pub victims: Vec<Arc<PodInfo>>,
    pub pdb_violations: usize,
}

#[derive(Debug)]
pub enum Outcome {
    /// Evict these victims and nominate the node.
    Nominate(Candidate),
    /// No node can be made to fit: the "preemption: …" part of FailedScheduling.
    Fail(String),
}

pub const NOT_HELPFUL: &str = "Preemption is not helpful for scheduling";
pub const NO_VICTIMS: &str = "No preemption victims found for incoming pod";

fn start_nanos(p: &Pod) -> i128 {
    p.status
        .as_ref()
        .and_then(|s| s.start_time.as_ref())
        .map(|t| t.0.as_nanosecond())
        .unwrap_or_else(|| jiff::Timestamp::now().as_nanosecond())
}

/// Upstream's MoreImportantPod: higher priority, then the one that started earlier.
fn more_important(a: &PodInfo, b: &PodInfo) -> Ordering {
    b.priority.cmp(&a.priority).then_with(|| start_nanos(&a.pod).cmp(&start_nanos(&b.pod)))
}

/// Whether `p` is a lower-priority pod already being deleted because of a preemption.
fn terminating_by_preemption(p: &Pod) -> bool {
    p.metadata.deletion_timestamp.is_some()
        && p.status.iter().flat_map(|s| s.conditions.iter().flatten()).any(|c| {
            c.type_ == "DisruptionTarget" && c.reason.as_deref() == Some("PreemptionByScheduler")
        })
}

/// Splits victims (most important first) into those whose eviction would exceed a matching
/// PDB's `disruptionsAllowed` and the rest, spending each budget in that order.
fn split_by_pdb(
    victims: Vec<Arc<PodInfo>>,
    pdbs: &[Arc<PodDisruptionBudget>],
) -> (Vec<Arc<PodInfo>>, Vec<Arc<PodInfo>>) {
    let mut allowed: Vec<i32> =
        pdbs.iter().map(|p| p.status.as_ref().map_or(0, |s| s.disruptions_allowed)).collect();
    let (mut violating, mut other) = (Vec::new(), Vec::new());
    for v in victims {
        let meta = &v.pod.metadata;
        let mut violated = false;
        if let Some(labels) = meta.labels.as_ref().filter(|l| !l.is_empty()) {
            for (i, pdb) in pdbs.iter().enumerate() {
                if pdb.metadata.namespace != meta.namespace {
                    continue;
                }
                // A PDB with no or an empty selector matches nothing here.
                let Some(sel) = pdb.spec.as_ref().and_then(|s| s.selector.as_ref()) else {
                    continue;
                };
                if !rkube_client::selector_matches(sel, labels) {
                    continue;
                }
                // Already counted by the disruption controller: not a new disruption.
                let name = meta.name.clone().unwrap_or_default();
                if pdb
                    .status
                    .as_ref()
                    .and_then(|s| s.disrupted_pods.as_ref())
                    .is_some_and(|d| d.contains_key(&name))
                {
                    continue;
                }
                allowed[i] -= 1;
                if allowed[i] < 0 {
                    violated = true;
                }
            }
        }
        if violated { violating.push(v) } else { other.push(v) }
    }
    (violating, other)
}

/// SelectVictimsOnNode: the fewest, least important victims that make room, or why none do.
pub fn select_victims(
    pod: &PodInfo,
    ni: &NodeInfo,
    nominated: &[Arc<PodInfo>],
    pdbs: &[Arc<PodDisruptionBudget>],
) -> Result<(Vec<Arc<PodInfo>>, usize), Vec<String>> {
    let mut usage = ni.usage.clone();
    let mut potential: Vec<Arc<PodInfo>> = Vec::new();
    for p in ni.pods.values() {
        if p.priority < pod.priority {
            usage.remove_info(p);
            potential.push(p.clone());
        }
    }
    if potential.is_empty() {
        return Err(vec![NO_VICTIMS.to_string()]);
    }
    for n in nominated {
        usage.add_info(n);
    }
    let fits = |u: &plugins::NodeUsage| plugins::filter_info(pod, &ni.node, &ni.alloc, u);
    if let Err(r) = fits(&usage) {
        return Err(r.reasons);
    }
    potential.sort_by(|a, b| more_important(a, b));
    let (violating, other) = split_by_pdb(potential, pdbs);
    let mixed = !violating.is_empty() && !other.is_empty();
    let mut victims = Vec::new();
    let mut violations = 0;
    for (list, counts) in [(violating, true), (other, false)] {
        for p in list {
            usage.add_info(&p);
            if fits(&usage).is_err() {
                usage.remove_info(&p);
                victims.push(p);
                if counts {
                    violations += 1;
                }
            }
        }
    }
    if mixed {
        victims.sort_by(|a, b| more_important(a, b));
    }
    Ok((victims, violations))
}

/// pickOneNodeForPreemption's order of criteria.
fn pick(mut candidates: Vec<Candidate>) -> Option<Candidate> {
    type Score = fn(&Candidate) -> i128;
    let criteria: [Score; 5] = [
        |c| -(c.pdb_violations as i128),
        |c| -i128::from(c.victims.first().map_or(0, |v| v.priority)),
        |c| -c.victims.iter().map(|v| i128::from(v.priority) + (1i128 << 31)).sum::<i128>(),
        |c| -(c.victims.len() as i128),
        |c| {
            // The earliest start among the highest-priority victims; later is better.
            let top = c.victims.first().map_or(0, |v| v.priority);
            c.victims
                .iter()
                .filter(|v| v.priority == top)
                .map(|v| start_nanos(&v.pod))
                .min()
                .unwrap_or(i128::MIN)
        },
    ];
    for f in criteria {
        if candidates.len() <= 1 {
            break;
        }
        let best = candidates.iter().map(f).max()?;
        candidates.retain(|c| f(c) == best);
    }
    candidates.into_iter().next()
}

/// Runs DefaultPreemption for a pod every node refused. `refusals` holds every node's refusal
/// in node order; `nominated(node)` the pods of at least this pod's priority nominated there.
pub fn preempt<'a>(
    pod: &PodInfo,
    nodes: &[&'a NodeInfo],
    refusals: &[(&'a NodeInfo, Refusal)],
    pdbs: &[Arc<PodDisruptionBudget>],
    nominated: &dyn Fn(&str) -> Vec<Arc<PodInfo>>,
) -> Outcome {
    let spec = pod.pod.spec.as_ref();
    if spec.and_then(|s| s.preemption_policy.as_deref()) == Some("Never") {
        return Outcome::Fail("preemption: not eligible due to preemptionPolicy=Never.".into());
    }
    if let Some(nom) = pod
        .pod
        .status
        .as_ref()
        .and_then(|s| s.nominated_node_name.as_deref())
        .filter(|n| !n.is_empty())
    {
        let unresolvable = refusals.iter().any(|(n, r)| n.name() == nom && !r.resolvable);
        let waiting = nodes.iter().find(|n| n.name() == nom).is_some_and(|n| {
            n.pods.values().any(|p| p.priority < pod.priority && terminating_by_preemption(&p.pod))
        });
        if !unresolvable && waiting {
            return Outcome::Fail(
                "preemption: not eligible due to a terminating pod on the nominated node.".into(),
            );
        }
    }
    // Upstream stops the dry run once it holds this many candidates that violate no PDB.
    let wanted = (nodes.len() / 10).max(100);
    let mut statuses: BTreeMap<String, usize> = BTreeMap::new();
    let (mut clean, mut violating) = (Vec::new(), Vec::new());
    for (ni, r) in refusals {
        if !r.resolvable {
            *statuses.entry(NOT_HELPFUL.into()).or_default() += 1;
            continue;
        }
        if clean.len() >= wanted {
            continue;
        }
        match select_victims(pod, ni, &nominated(ni.name()), pdbs) {
            Ok((victims, n)) if !victims.is_empty() => {
                let c = Candidate { node: ni.name().to_string(), victims, pdb_violations: n };
                if n == 0 { clean.push(c) } else { violating.push(c) }
            }
            Ok(_) => {}
            Err(reasons) => {
                for reason in reasons {
                    *statuses.entry(reason).or_default() += 1;
                }
            }
        }
    }
    clean.extend(violating);
    match pick(clean) {
        Some(c) => Outcome::Nominate(c),
        None => Outcome::Fail(plugins::preemption_message(nodes.len(), &statuses)),
    }
}

/// The DefaultPreemption plugin (PostFilter).
pub struct DefaultPreemption;

impl Plugin for DefaultPreemption {
    fn name(&self) -> &'static str {
        "DefaultPreemption"
    }
}

impl PostFilter for DefaultPreemption {
    fn post_filter(
        &self,
        state: &CycleState,
        pod: &PodInfo,
        snap: &Snapshot,
        refusals: &[(&NodeInfo, Refusal)],
    ) -> Outcome {
        let pdbs: Vec<Arc<PodDisruptionBudget>> = snap.pdbs.values().cloned().collect();
        preempt(pod, snap.nodes, refusals, &pdbs, &|n| {
            state.nominated.get(n).cloned().unwrap_or_default()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn node(name: &str, cpu: &str) -> NodeInfo {
        NodeInfo::new(Arc::new(
            serde_json::from_value(json!({"metadata": {"name": name},
                "status": {"allocatable": {"cpu": cpu, "memory": "8Gi", "pods": "110"}}}))
            .unwrap(),
        ))
    }

    fn pod(name: &str, prio: i32, cpu: &str, app: &str, started: &str) -> Arc<PodInfo> {
        Arc::new(PodInfo::new(Arc::new(
            serde_json::from_value(json!({
                "metadata": {"name": name, "namespace": "d", "labels": {"app": app}},
                "spec": {"priority": prio, "containers": [{"name": "c",
                    "resources": {"requests": {"cpu": cpu}}}]},
                "status": {"startTime": started}}))
            .unwrap(),
        )))
    }

    fn put(ni: &mut NodeInfo, p: Arc<PodInfo>) {
        let k = format!("d/{}", p.pod.metadata.name.clone().unwrap());
        ni.add(&k, p);
    }

    fn pdb(app: &str, allowed: i32) -> Arc<PodDisruptionBudget> {
        Arc::new(
            serde_json::from_value(
                json!({"metadata": {"name": format!("{app}-pdb"), "namespace": "d"},
                "spec": {"selector": {"matchLabels": {"app": app}}},
                "status": {"disruptionsAllowed": allowed, "currentHealthy": 1, "desiredHealthy": 1,
                    "expectedPods": 1, "observedGeneration": 1}}),
            )
            .unwrap(),
        )
    }

    fn names(c: &Candidate) -> Vec<String> {
        c.victims.iter().map(|v| v.pod.metadata.name.clone().unwrap()).collect()
    }

    const T0: &str = "2026-01-01T00:00:00Z";
    const T1: &str = "2026-01-01T01:00:00Z";

    fn run(nodes: &[&NodeInfo], p: &PodInfo, pdbs: &[Arc<PodDisruptionBudget>]) -> Outcome {
        let refusals: Vec<(&NodeInfo, Refusal)> = nodes
            .iter()
            .map(|n| {
                (*n, plugins::filter_info(p, &n.node, &n.alloc, &n.usage).expect_err("refused"))
            })
            .collect();
        preempt(p, nodes, &refusals, pdbs, &|_| Vec::new())
    }

    #[test]
    fn only_as_many_victims_as_needed_and_the_least_important_go() {
        let mut n = node("n1", "4");
        put(&mut n, pod("low-a", 1, "1", "a", T0));
        put(&mut n, pod("low-b", 2, "1", "b", T0));
        put(&mut n, pod("high", 100, "2", "c", T0));
        let p = pod("new", 50, "1", "x", T0);
        let Outcome::Nominate(c) = run(&[&n], &p, &[]) else { panic!("no candidate") };
        assert_eq!(names(&c), vec!["low-a"]);
        assert_eq!(c.pdb_violations, 0);
    }

    #[test]
    fn a_pdb_protected_victim_is_reprieved_first_and_nodes_without_violations_win() {
        // Each node holds one low-priority 2-CPU pod; the new pod needs 2 of 3 CPUs.
        let (mut n1, mut n2) = (node("n1", "3"), node("n2", "3"));
        put(&mut n1, pod("guarded", 0, "2", "db", T0));
        put(&mut n2, pod("free", 0, "2", "web", T0));
        let p = pod("new", 100, "2", "x", T0);
        let pdbs = [pdb("db", 0)];
        let Outcome::Nominate(c) = run(&[&n1, &n2], &p, &pdbs) else { panic!() };
        assert_eq!((c.node.as_str(), names(&c)), ("n2", vec!["free".to_string()]));
        // With budget left, the PDB is no obstacle: the tie goes to the first node.
        let Outcome::Nominate(c) = run(&[&n1, &n2], &p, &[pdb("db", 1)]) else { panic!() };
        assert_eq!(c.node, "n1");
        // Where every node violates, the violation is counted.
        let Outcome::Nominate(c) = run(&[&n1], &p, &pdbs) else { panic!() };
        assert_eq!(c.pdb_violations, 1);
    }

    #[test]
    fn nodes_are_ranked_by_highest_victim_priority_then_sum_then_count_then_start() {
        let p = pod("new", 100, "2", "x", T0);
        let (mut a, mut b) = (node("a", "2"), node("b", "2"));
        put(&mut a, pod("a1", 10, "2", "a", T0));
        put(&mut b, pod("b1", 5, "1", "b", T0));
        put(&mut b, pod("b2", 5, "1", "b", T0));
        // Highest victim priority: b (5) beats a (10) even with two victims.
        let Outcome::Nominate(c) = run(&[&a, &b], &p, &[]) else { panic!() };
        assert_eq!(c.node, "b");
        let (mut c1, mut c2) = (node("c1", "2"), node("c2", "2"));
        put(&mut c1, pod("c1a", 5, "2", "a", T0));
        put(&mut c2, pod("c2a", 5, "2", "a", T1));
        // Same priorities, sums and counts: the later-started victim's node.
        let Outcome::Nominate(c) = run(&[&c1, &c2], &p, &[]) else { panic!() };
        assert_eq!(c.node, "c2");
    }

    #[test]
    fn refusals_explain_why_preemption_cannot_help() {
        let mut n = node("n1", "1");
        put(&mut n, pod("peer", 100, "1", "a", T0));
        let p = pod("new", 100, "1", "x", T0);
        let Outcome::Fail(m) = run(&[&n], &p, &[]) else { panic!() };
        assert_eq!(
            m,
            "preemption: 0/1 nodes are available: 1 No preemption victims found for incoming pod."
        );
        // Even with every lower-priority pod gone the pod does not fit: the filter says why.
        let mut small = node("s", "1");
        put(&mut small, pod("low", 0, "500m", "a", T0));
        let big = pod("big", 100, "2", "x", T0);
        let Outcome::Fail(m) = run(&[&small], &big, &[]) else { panic!() };
        assert_eq!(m, "preemption: 0/1 nodes are available: 1 Insufficient cpu.");
        let mut np = (*pod("never", 100, "1", "x", T0).pod).clone();
        np.spec.as_mut().unwrap().preemption_policy = Some("Never".into());
        let np = PodInfo::new(Arc::new(np));
        let Outcome::Fail(m) = run(&[&n], &np, &[]) else { panic!() };
        assert_eq!(m, "preemption: not eligible due to preemptionPolicy=Never.");
    }
}
