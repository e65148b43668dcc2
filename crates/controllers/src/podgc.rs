//! Pod garbage collector, as upstream's podgc: terminated pods beyond
//! `--terminated-pod-gc-threshold` (evicted first, then oldest), pods bound to a node that has
//! been gone for the quarantine period, and terminating pods that were never scheduled (or sit
//! on a NotReady node tainted out-of-service) are marked Failed and force-deleted (grace 0).
//! Upstream records no events here, only logs; so does rkube.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{DeleteParams, Patch, PatchParams};
use kube::{Api, Client, ResourceExt};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::informer::Informers;

const OUT_OF_SERVICE: &str = "node.kubernetes.io/out-of-service";

/// Why a pod is collected; orphans also get upstream's DisruptionTarget condition.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    Terminated,
    Orphaned,
    TerminatingUnscheduled,
    TerminatingOutOfService,
}

/// Node names seen missing, and since when: a pod's node must stay missing for the quarantine
/// period (the informer may simply not have seen a new node yet) before its pods go.
#[derive(Default)]
pub struct Quarantine {
    missing_since: HashMap<String, Instant>,
}

fn phase(p: &Pod) -> &str {
    p.status.as_ref().and_then(|s| s.phase.as_deref()).unwrap_or("")
}

fn node_name(p: &Pod) -> &str {
    p.spec.as_ref().and_then(|s| s.node_name.as_deref()).unwrap_or("")
}

fn is_terminated(p: &Pod) -> bool {
    !matches!(phase(p), "Pending" | "Running" | "Unknown" | "")
}

fn is_evicted(p: &Pod) -> bool {
    phase(p) == "Failed" && p.status.as_ref().and_then(|s| s.reason.as_deref()) == Some("Evicted")
}

fn node_ready(n: &Node) -> bool {
    n.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// One collection pass over the informers' view: which pods to delete, and why. `confirmed_gone`
/// says whether a node that has been missing past quarantine is really gone (upstream asks the
/// API server rather than trusting the cache).
pub fn plan(
    pods: &[Arc<Pod>],
    nodes: &[Arc<Node>],
    threshold: usize,
    quarantine: &mut Quarantine,
    quarantine_time: Duration,
    now: Instant,
    confirmed_gone: &dyn Fn(&str) -> bool,
) -> Vec<(Arc<Pod>, Reason)> {
    let mut out: Vec<(Arc<Pod>, Reason)> = Vec::new();
    let mut taken: HashSet<(String, String)> = HashSet::new();
    let mut take = |p: &Arc<Pod>, r: Reason, out: &mut Vec<(Arc<Pod>, Reason)>| {
        if taken.insert((p.namespace().unwrap_or_default(), p.name_any())) {
            out.push((p.clone(), r));
        }
    };
    if threshold > 0 {
        let mut terminated: Vec<&Arc<Pod>> = pods.iter().filter(|p| is_terminated(p)).collect();
        if terminated.len() > threshold {
            terminated.sort_by_key(|p| {
                (!is_evicted(p), p.metadata.creation_timestamp.as_ref().map(|t| t.0), p.name_any())
            });
            let excess = terminated.len() - threshold;
            for p in terminated.into_iter().take(excess) {
                take(p, Reason::Terminated, &mut out);
            }
        }
    }
    let by_name: HashMap<String, &Arc<Node>> = nodes.iter().map(|n| (n.name_any(), n)).collect();
    for p in pods.iter().filter(|p| p.metadata.deletion_timestamp.is_some()) {
        if let Some(n) = by_name.get(node_name(p))
            && !node_ready(n)
            && n.spec
                .as_ref()
                .and_then(|s| s.taints.as_ref())
                .is_some_and(|t| t.iter().any(|t| t.key == OUT_OF_SERVICE))
        {
            take(p, Reason::TerminatingOutOfService, &mut out);
        }
    }
    quarantine.missing_since.retain(|n, _| !by_name.contains_key(n));
    let mut gone: HashSet<&str> = HashSet::new();
    for p in pods {
        let n = node_name(p);
        if n.is_empty() || by_name.contains_key(n) {
            continue;
        }
        let since = *quarantine.missing_since.entry(n.to_string()).or_insert(now);
        if now.duration_since(since) >= quarantine_time && (gone.contains(n) || confirmed_gone(n)) {
            gone.insert(n);
            take(p, Reason::Orphaned, &mut out);
        }
    }
    for p in pods {
        if p.metadata.deletion_timestamp.is_some() && node_name(p).is_empty() {
            take(p, Reason::TerminatingUnscheduled, &mut out);
        }
    }
    out
}

pub async fn run(
    client: Client,
    inf: Informers,
    threshold: usize,
    period: Duration,
    quarantine_time: Duration,
    shutdown: CancellationToken,
) {
    let nodes_api: Api<Node> = Api::all(client.clone());
    let mut quarantine = Quarantine::default();
    loop {
        let pods = inf.pods.state();
        let nodes = inf.nodes.state();
        // Nodes past quarantine are confirmed with a GET before their pods go. A set of the
        // node names, not a scan of every node per pod (10,000 pods on 5,000 nodes).
        let known: HashSet<&str> =
            nodes.iter().filter_map(|n| n.metadata.name.as_deref()).collect();
        let mut suspects: Vec<String> = pods
            .iter()
            .map(|p| node_name(p))
            .filter(|n| !n.is_empty() && !known.contains(n))
            .map(String::from)
            .collect();
        suspects.sort();
        suspects.dedup();
        let mut really_gone = HashSet::new();
        for n in suspects {
            if let Ok(None) = nodes_api.get_opt(&n).await {
                really_gone.insert(n);
            }
        }
        let victims = plan(
            &pods,
            &nodes,
            threshold,
            &mut quarantine,
            quarantine_time,
            Instant::now(),
            &|n| really_gone.contains(n),
        );
        if victims.iter().any(|(_, r)| *r == Reason::Terminated) {
            let n = victims.iter().filter(|(_, r)| *r == Reason::Terminated).count();
            tracing::info!("garbage collecting {n} terminated pods");
        }
        for (pod, reason) in victims {
            if let Err(e) = mark_failed_and_delete(&client, &pod, reason).await {
                tracing::warn!(
                    "force deleting pod {}/{}: {e}",
                    pod.namespace().unwrap_or_default(),
                    pod.name_any()
                );
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(period) => {}
        }
    }
}

/// Marks a pod Failed (a pod whose node is gone would otherwise stay Running forever, no
/// kubelet being left to say otherwise), then deletes it with grace 0.
async fn mark_failed_and_delete(client: &Client, pod: &Pod, reason: Reason) -> crate::Result<()> {
    let ns = pod.namespace().unwrap_or_default();
    let name = pod.name_any();
    let api: Api<Pod> = Api::namespaced(client.clone(), &ns);
    tracing::info!("PodGC is force deleting pod {ns}/{name} ({reason:?})");
    if !matches!(phase(pod), "Succeeded" | "Failed") {
        let mut status = json!({"phase": "Failed"});
        if reason == Reason::Orphaned {
            status["conditions"] = json!([{
                "type": "DisruptionTarget", "status": "True", "reason": "DeletionByPodGC",
                "message": "PodGC: node no longer exists", "lastTransitionTime": crate::util::now(),
            }]);
        }
        let patch = json!({"metadata": {"uid": pod.uid()}, "status": status});
        match api.patch_status(&name, &PatchParams::default(), &Patch::Strategic(&patch)).await {
            Ok(_) => {}
            Err(kube::Error::Api(e)) if e.code == 404 => return Ok(()),
            Err(e) => return Err(e.into()),
        }
    }
    let dp = DeleteParams {
        grace_period_seconds: Some(0),
        preconditions: pod
            .uid()
            .map(|uid| kube::api::Preconditions { uid: Some(uid), resource_version: None }),
        ..Default::default()
    };
    match api.delete(&name, &dp).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 404 || e.code == 409 => Ok(()),
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(name: &str, node: &str, phase: &str, created: i64) -> Arc<Pod> {
        Arc::new(
            serde_json::from_value(json!({
                "metadata": {"name": name, "namespace": "default",
                             "creationTimestamp": jiff::Timestamp::from_second(created).expect("time").to_string()},
                "spec": {"nodeName": node, "containers": []},
                "status": {"phase": phase},
            }))
            .expect("pod"),
        )
    }

    fn node(name: &str) -> Arc<Node> {
        Arc::new(serde_json::from_value(json!({"metadata": {"name": name}})).expect("node"))
    }

    fn names(v: &[(Arc<Pod>, Reason)]) -> Vec<(String, Reason)> {
        v.iter().map(|(p, r)| (p.name_any(), *r)).collect()
    }

    #[test]
    fn terminated_pods_beyond_the_threshold_go_evicted_first_then_oldest() {
        let mut evicted = (*pod("evicted", "n1", "Failed", 50)).clone();
        evicted.status.as_mut().expect("status").reason = Some("Evicted".into());
        let pods = vec![
            pod("new", "n1", "Succeeded", 40),
            pod("old", "n1", "Failed", 10),
            pod("mid", "n1", "Succeeded", 20),
            Arc::new(evicted),
            pod("running", "n1", "Running", 1),
        ];
        let plan = plan(
            &pods,
            &[node("n1")],
            2,
            &mut Quarantine::default(),
            Duration::from_secs(40),
            Instant::now(),
            &|_| true,
        );
        assert_eq!(
            names(&plan),
            [("evicted".into(), Reason::Terminated), ("old".into(), Reason::Terminated)]
        );
    }

    #[test]
    fn a_threshold_of_zero_keeps_every_terminated_pod() {
        let pods = vec![pod("a", "n1", "Succeeded", 1), pod("b", "n1", "Failed", 2)];
        let plan = plan(
            &pods,
            &[node("n1")],
            0,
            &mut Quarantine::default(),
            Duration::from_secs(40),
            Instant::now(),
            &|_| true,
        );
        assert!(plan.is_empty());
    }

    #[test]
    fn pods_of_a_missing_node_go_only_after_quarantine_and_confirmation() {
        let pods = vec![pod("orphan", "ghost", "Running", 1), pod("fine", "n1", "Running", 1)];
        let nodes = [node("n1")];
        let mut q = Quarantine::default();
        let t0 = Instant::now();
        let q40 = Duration::from_secs(40);
        assert!(plan(&pods, &nodes, 10, &mut q, q40, t0, &|_| true).is_empty());
        let t39 = t0 + Duration::from_secs(39);
        assert!(plan(&pods, &nodes, 10, &mut q, q40, t39, &|_| true).is_empty());
        let t40 = t0 + q40;
        // The API server still knows the node: the cache was behind, nothing goes.
        assert!(plan(&pods, &nodes, 10, &mut q, q40, t40, &|_| false).is_empty());
        assert_eq!(
            names(&plan(&pods, &nodes, 10, &mut q, q40, t40, &|_| true)),
            [("orphan".into(), Reason::Orphaned)]
        );
    }

    #[test]
    fn a_node_that_comes_back_restarts_its_quarantine() {
        let pods = vec![pod("p", "flaky", "Running", 1)];
        let mut q = Quarantine::default();
        let t0 = Instant::now();
        let q40 = Duration::from_secs(40);
        assert!(plan(&pods, &[], 10, &mut q, q40, t0, &|_| true).is_empty());
        let back = t0 + Duration::from_secs(30);
        assert!(plan(&pods, &[node("flaky")], 10, &mut q, q40, back, &|_| true).is_empty());
        let later = t0 + Duration::from_secs(50);
        assert!(plan(&pods, &[], 10, &mut q, q40, later, &|_| true).is_empty());
    }

    #[test]
    fn unscheduled_and_out_of_service_terminating_pods_are_force_deleted() {
        let mut unscheduled = (*pod("unscheduled", "", "Pending", 1)).clone();
        unscheduled.metadata.deletion_timestamp = Some(crate::util::now());
        let mut stuck = (*pod("stuck", "n1", "Running", 1)).clone();
        stuck.metadata.deletion_timestamp = Some(crate::util::now());
        let mut n1 = (*node("n1")).clone();
        n1.spec = Some(
            serde_json::from_value(
                json!({"taints": [{"key": OUT_OF_SERVICE, "effect": "NoExecute"}]}),
            )
            .expect("spec"),
        );
        let pods = vec![Arc::new(unscheduled), Arc::new(stuck)];
        let plan = plan(
            &pods,
            &[Arc::new(n1)],
            10,
            &mut Quarantine::default(),
            Duration::from_secs(40),
            Instant::now(),
            &|_| true,
        );
        assert_eq!(
            names(&plan),
            [
                ("stuck".into(), Reason::TerminatingOutOfService),
                ("unscheduled".into(), Reason::TerminatingUnscheduled)
            ]
        );
    }
}
