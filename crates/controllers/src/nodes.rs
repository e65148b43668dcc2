//! Node lifecycle: a node whose Lease and status stop being renewed for the grace period is
//! marked Unknown and tainted unreachable (NotReady → not-ready); pods that do not tolerate the
//! taint long enough are evicted (TaintManagerEviction); taints go when heartbeats come back.
//! NoExecute taints are added at the zones' eviction rates and not at all in full disruption
//! (see `disruption.rs`). Timer-driven every `node_monitor_period`, so a node is declared lost
//! within grace + 1 s.

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Node, Pod, Taint};
use kube::api::{DeleteParams, Patch, PatchParams};
use kube::{Api, Client, ResourceExt};
use rkube_client::events::{Recorder, reference};
use serde_json::json;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

use crate::Config;
use crate::clock::Clock;
use crate::disruption::{Disruption, Transition, excluded, zone_key};
use crate::informer::Informers;

const UNREACHABLE: &str = "node.kubernetes.io/unreachable";
const NOT_READY: &str = "node.kubernetes.io/not-ready";

fn ts(s: &jiff::Timestamp) -> i64 {
    s.as_second()
}

/// Every node Lease's last renewal, by node name (borrowed from `leases`: this runs every
/// second over every node).
fn renewals(leases: &[Arc<Lease>]) -> HashMap<&str, i64> {
    leases
        .iter()
        .filter_map(|l| {
            let t = l.spec.as_ref().and_then(|s| s.renew_time.as_ref()).map(|t| ts(&t.0))?;
            Some((l.metadata.name.as_deref()?, t))
        })
        .collect()
}

/// When the node last proved it was alive: its Lease renewal or Ready heartbeat.
fn last_heartbeat(renewals: &HashMap<&str, i64>, node: &Node) -> Option<i64> {
    let lease = node.metadata.name.as_deref().and_then(|n| renewals.get(n)).copied();
    let ready = node
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .and_then(|c| c.iter().find(|c| c.type_ == "Ready"))
        .and_then(|c| c.last_heartbeat_time.as_ref().map(|t| ts(&t.0)));
    lease.max(ready).or(node.metadata.creation_timestamp.as_ref().map(|t| ts(&t.0)))
}

pub async fn run(
    client: Client,
    inf: Informers,
    recorder: Recorder,
    config: Config,
    shutdown: CancellationToken,
) {
    let nodes_api: Api<Node> = Api::all(client.clone());
    // Nodes this controller has already reported lost (so events fire once per transition).
    let mut lost: HashSet<String> = HashSet::new();
    let mut known: HashSet<String> = HashSet::new();
    let mut evicted: HashMap<String, ()> = HashMap::new();
    let mut disruption = Disruption::new(config.eviction_limits);
    let grace = config.node_monitor_grace_period.as_secs() as i64;
    let startup_grace = config.node_startup_grace_period.as_secs() as i64;
    loop {
        let now = config.clock.now().as_second();
        let nodes = inf.nodes.state();
        let leases = inf.leases.state();
        let renewals = renewals(&leases);
        // What each node's Ready condition is (or is about to be, once marked Unknown).
        let mut status: HashMap<String, String> = HashMap::new();
        for node in &nodes {
            let name = node.name_any();
            if known.insert(name.clone()) {
                recorder
                    .record(
                        &reference(node.as_ref()),
                        "Normal",
                        "RegisteredNode",
                        &format!("Node {name} event: Registered Node {name} in Controller"),
                    )
                    .await;
            }
            let hb = last_heartbeat(&renewals, node).unwrap_or(now);
            let ready = rkube_client::node_ready(node).to_string();
            // A node that registered but never posted its status gets the startup grace (as
            // upstream): until then it is neither Ready nor lost, and gets no taint.
            let never_posted = ready.is_empty();
            let silent = now - hb > if never_posted { startup_grace } else { grace };
            if silent && ready != "Unknown" {
                mark_unknown(&nodes_api, node, never_posted, &config.clock).await;
                recorder
                    .record(
                        &reference(node.as_ref()),
                        "Normal",
                        "NodeNotReady",
                        &format!("Node {name} status is now: NodeNotReady"),
                    )
                    .await;
                mark_pods_not_ready(&client, &inf, &recorder, &name, &config.clock).await;
                lost.insert(name.clone());
            }
            if !silent && ready == "True" && lost.remove(&name) {
                recorder
                    .record(
                        &reference(node.as_ref()),
                        "Normal",
                        "NodeReady",
                        &format!("Node {name} status is now: NodeReady"),
                    )
                    .await;
            }
            status.insert(name, if silent { "Unknown".into() } else { ready });
        }
        let names: HashSet<String> = nodes.iter().map(|n| n.name_any()).collect();
        known.retain(|n| names.contains(n));

        // Zone health decides how fast NoExecute taints may be added, or whether at all.
        let mut zones: BTreeMap<String, Vec<bool>> = BTreeMap::new();
        for node in nodes.iter().filter(|n| !excluded(n)) {
            let Some(ready) = status.get(&node.name_any()).filter(|s| !s.is_empty()) else {
                // Not counted before its first status: a burst of registrations is no outage.
                continue;
            };
            let ready = ready == "True";
            zones.entry(zone_key(node)).or_default().push(ready);
        }
        let clock = config.clock.instant();
        for t in disruption.observe(&zones, clock) {
            match t {
                Transition::EnteredFullDisruption => tracing::warn!(
                    "every node is NotReady: entering full disruption mode, no NoExecute taints \
                     are added and the ones of the node lifecycle come off until a node is back"
                ),
                Transition::ExitedFullDisruption => {
                    tracing::info!("some nodes are Ready: exiting full disruption mode")
                }
                Transition::Zone(z, state) => {
                    let zone =
                        if z.is_empty() { "<default>".to_string() } else { z.replace('\x00', "") };
                    tracing::info!("zone {zone} is now in state {state:?}")
                }
            }
        }
        let full = disruption.all_fully_disrupted();
        for node in &nodes {
            let name = node.name_any();
            let want = lifecycle_taint(status.get(&name).map(String::as_str).unwrap_or("Unknown"));
            match (want, no_execute_lifecycle_taint(node)) {
                (None, _) => disruption.dequeue(&name),
                // Already tainted: a change between not-ready and unreachable is immediate.
                (Some(_), Some(_)) => {}
                // Queued even in full disruption (the rate is 0 then), to go first after it.
                (Some(_), None) => disruption.enqueue(&zone_key(node), &name),
            }
        }
        disruption.retain_nodes(|n| names.contains(n));
        let allowed = disruption.take_allowed(clock);
        for node in &nodes {
            let name = node.name_any();
            let want = lifecycle_taint(status.get(&name).map(String::as_str).unwrap_or("Unknown"));
            let no_execute = match (want, no_execute_lifecycle_taint(node)) {
                _ if full => None,
                (Some(k), Some(_)) => Some(k),
                (Some(k), None) if allowed.contains(&name) => {
                    tracing::info!("node {name} is not ready: adding the NoExecute taint {k}");
                    Some(k)
                }
                _ => None,
            };
            set_taints(&nodes_api, node, want, no_execute, &config.clock).await;
        }

        // Taint-based eviction. In full disruption the lifecycle taints are on their way off
        // (this snapshot may still show them), so they evict nobody.
        for node in &nodes {
            let taints: Vec<Taint> = node
                .spec
                .as_ref()
                .and_then(|s| s.taints.clone())
                .unwrap_or_default()
                .into_iter()
                .filter(|t| t.effect == "NoExecute")
                .filter(|t| !(full && (t.key == UNREACHABLE || t.key == NOT_READY)))
                .collect();
            if taints.is_empty() {
                continue;
            }
            for pod in inf.pods.state().iter().filter(|p| {
                p.spec.as_ref().and_then(|s| s.node_name.as_deref())
                    == Some(node.name_any().as_str())
            }) {
                if pod.metadata.deletion_timestamp.is_some() {
                    continue;
                }
                let uid = pod.uid().unwrap_or_default();
                if evicted.contains_key(&uid) {
                    continue;
                }
                if let Some(due) = eviction_due(pod, &taints, now)
                    && due <= now
                {
                    evict(&client, &recorder, pod).await;
                    evicted.insert(uid, ());
                }
            }
        }
        if evicted.len() > 100_000 {
            evicted.clear();
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(config.node_monitor_period) => {}
        }
    }
}

/// The lifecycle taint key a node's Ready status calls for.
fn lifecycle_taint(ready: &str) -> Option<&'static str> {
    match ready {
        // Ready, or registered and still within its startup grace.
        "True" | "" => None,
        "False" => Some(NOT_READY),
        _ => Some(UNREACHABLE),
    }
}

fn no_execute_lifecycle_taint(node: &Node) -> Option<String> {
    node.spec.as_ref()?.taints.as_ref()?.iter().find_map(|t| {
        (t.effect == "NoExecute" && (t.key == UNREACHABLE || t.key == NOT_READY))
            .then(|| t.key.clone())
    })
}

/// When a pod must leave a node with these NoExecute taints: now if some taint is not tolerated,
/// else when the shortest tolerationSeconds runs out; `None` if it tolerates them forever.
fn eviction_due(pod: &Pod, taints: &[Taint], now: i64) -> Option<i64> {
    let tols = pod.spec.as_ref().and_then(|s| s.tolerations.clone()).unwrap_or_default();
    let mut due: Option<i64> = None;
    for t in taints {
        let added = t.time_added.as_ref().map(|x| ts(&x.0)).unwrap_or(now);
        let matching: Vec<_> = tols
            .iter()
            .filter(|tol| {
                let key_ok = match tol.key.as_deref() {
                    None | Some("") => tol.operator.as_deref() == Some("Exists"),
                    Some(k) => k == t.key,
                };
                let effect_ok =
                    tol.effect.as_deref().is_none_or(|e| e.is_empty() || e == "NoExecute");
                let value_ok = tol.operator.as_deref() == Some("Exists")
                    || tol.value.as_deref().unwrap_or("") == t.value.as_deref().unwrap_or("");
                key_ok && effect_ok && value_ok
            })
            .collect();
        if matching.is_empty() {
            return Some(now);
        }
        if let Some(secs) = matching.iter().filter_map(|tol| tol.toleration_seconds).min() {
            let d = added + secs.max(0);
            due = Some(due.map_or(d, |x: i64| x.min(d)));
        }
    }
    due
}

async fn evict(client: &Client, recorder: &Recorder, pod: &Pod) {
    let ns = pod.namespace().unwrap_or_default();
    recorder
        .record(
            &reference(pod),
            "Normal",
            "TaintManagerEviction",
            &format!("Marking for deletion Pod {ns}/{}", pod.name_any()),
        )
        .await;
    let api: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let _ = api.delete(&pod.name_any(), &DeleteParams::default()).await;
}

/// Sets the node's conditions Unknown: the kubelet stopped posting its status, or (for a node
/// that never posted one) never did, in which case the four kubelet conditions are created.
async fn mark_unknown(api: &Api<Node>, node: &Node, never_posted: bool, clock: &Clock) {
    let now = clock.time();
    let mut conds = Vec::new();
    if never_posted {
        for t in ["Ready", "MemoryPressure", "DiskPressure", "PIDPressure"] {
            conds.push(json!({"type": t, "status": "Unknown", "reason": "NodeStatusNeverUpdated",
                "message": "Kubelet never posted node status.", "lastHeartbeatTime": node.metadata.creation_timestamp,
                "lastTransitionTime": now}));
        }
    }
    for c in node.status.as_ref().and_then(|s| s.conditions.clone()).unwrap_or_default() {
        let mut c = serde_json::to_value(&c).unwrap_or_default();
        c["status"] = json!("Unknown");
        c["reason"] = json!("NodeStatusUnknown");
        c["message"] = json!("Kubelet stopped posting node status.");
        c["lastTransitionTime"] = json!(now);
        conds.push(c);
    }
    let patch = json!({"status": {"conditions": conds}});
    if let Err(e) =
        api.patch_status(&node.name_any(), &PatchParams::default(), &Patch::Strategic(&patch)).await
    {
        tracing::debug!("marking {} unknown: {e}", node.name_any());
    }
}

/// Keeps exactly the wanted lifecycle taints on the node: the NoSchedule one follows the Ready
/// status at once; the NoExecute one (which evicts) only as the zone's rate allows. The patch
/// carries the resourceVersion (it replaces the whole taint list); on a conflict — this pass may
/// just have written the node's status — it re-reads the node and tries again, so a granted
/// NoExecute taint is not lost with its token.
async fn set_taints(
    api: &Api<Node>,
    node: &Node,
    no_schedule: Option<&str>,
    no_execute: Option<&str>,
    clock: &Clock,
) {
    // Re-read only after a conflict: this runs for every node every second.
    let mut current: Option<Node> = None;
    for _ in 0..3 {
        let Some(patch) =
            taint_patch(current.as_ref().unwrap_or(node), no_schedule, no_execute, clock.time())
        else {
            return;
        };
        match api.patch(&node.name_any(), &PatchParams::default(), &Patch::Merge(&patch)).await {
            Ok(_) => return,
            Err(kube::Error::Api(e)) if e.code == 409 => match api.get(&node.name_any()).await {
                Ok(n) => current = Some(n),
                Err(e) => {
                    tracing::debug!("re-reading {}: {e}", node.name_any());
                    return;
                }
            },
            Err(e) => {
                tracing::debug!("tainting {}: {e}", node.name_any());
                return;
            }
        }
    }
}

/// The merge patch that leaves exactly the wanted lifecycle taints, or None if they are there.
fn taint_patch(
    node: &Node,
    no_schedule: Option<&str>,
    no_execute: Option<&str>,
    now: k8s_openapi::apimachinery::pkg::apis::meta::v1::Time,
) -> Option<serde_json::Value> {
    let taints = node.spec.as_ref().and_then(|s| s.taints.clone()).unwrap_or_default();
    let ours = |t: &Taint| t.key == UNREACHABLE || t.key == NOT_READY;
    let has = |key: Option<&str>, effect: &str| {
        let mine: Vec<&Taint> = taints.iter().filter(|t| ours(t) && t.effect == effect).collect();
        match key {
            None => mine.is_empty(),
            Some(k) => mine.len() == 1 && mine[0].key == k,
        }
    };
    if has(no_schedule, "NoSchedule") && has(no_execute, "NoExecute") {
        return None;
    }
    let keep = |key: Option<&str>, effect: &str| -> Option<serde_json::Value> {
        let k = key?;
        // An unchanged taint keeps its timeAdded: tolerationSeconds count from it.
        let existing = taints.iter().find(|t| t.key == k && t.effect == effect);
        Some(match existing {
            Some(t) => serde_json::to_value(t).unwrap_or_default(),
            None => json!({"key": k, "effect": effect, "timeAdded": now}),
        })
    };
    let mut next: Vec<serde_json::Value> = taints
        .iter()
        .filter(|t| !ours(t))
        .map(|t| serde_json::to_value(t).unwrap_or_default())
        .collect();
    next.extend(keep(no_schedule, "NoSchedule"));
    next.extend(keep(no_execute, "NoExecute"));
    let taints = if next.is_empty() { serde_json::Value::Null } else { json!(next) };
    Some(
        json!({"metadata": {"resourceVersion": node.resource_version()}, "spec": {"taints": taints}}),
    )
}

async fn mark_pods_not_ready(
    client: &Client,
    inf: &Informers,
    recorder: &Recorder,
    node: &str,
    clock: &Clock,
) {
    for pod in inf
        .pods
        .state()
        .iter()
        .filter(|p| p.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(node))
    {
        let api: Api<Pod> = Api::namespaced(client.clone(), &pod.namespace().unwrap_or_default());
        let patch = json!({"status": {"conditions": [{"type": "Ready", "status": "False", "lastTransitionTime": clock.time(), "lastProbeTime": null}]}});
        let _ = api
            .patch_status(&pod.name_any(), &PatchParams::default(), &Patch::Strategic(&patch))
            .await;
        recorder
            .record(&reference(pod.as_ref()), "Warning", "NodeNotReady", "Node is not ready")
            .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{PodSpec, Toleration};

    fn pod(tols: Vec<Toleration>) -> Pod {
        Pod {
            spec: Some(PodSpec { tolerations: Some(tols), ..Default::default() }),
            ..Default::default()
        }
    }

    #[test]
    fn eviction_waits_for_the_toleration_and_is_immediate_without_one() {
        let taint = Taint {
            key: UNREACHABLE.into(),
            effect: "NoExecute".into(),
            value: None,
            time_added: Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                jiff::Timestamp::from_second(1000).unwrap(),
            )),
        };
        assert_eq!(eviction_due(&pod(vec![]), std::slice::from_ref(&taint), 1005), Some(1005));
        let tol = Toleration {
            key: Some(UNREACHABLE.into()),
            operator: Some("Exists".into()),
            effect: Some("NoExecute".into()),
            toleration_seconds: Some(5),
            value: None,
        };
        assert_eq!(eviction_due(&pod(vec![tol]), std::slice::from_ref(&taint), 1001), Some(1005));
        let forever = Toleration {
            key: Some(UNREACHABLE.into()),
            operator: Some("Exists".into()),
            effect: None,
            toleration_seconds: None,
            value: None,
        };
        assert_eq!(eviction_due(&pod(vec![forever]), &[taint], 1001), None);
    }

    #[test]
    fn the_no_execute_taint_comes_later_without_resetting_the_no_schedule_one() {
        let node: Node = serde_json::from_value(json!({
            "metadata": {"name": "n", "resourceVersion": "7"},
            "spec": {"taints": [
                {"key": "example.com/dedicated", "effect": "NoSchedule"},
                {"key": UNREACHABLE, "effect": "NoSchedule", "timeAdded": "2026-01-01T00:00:00Z"},
            ]}
        }))
        .expect("node");
        assert_eq!(
            taint_patch(&node, Some(UNREACHABLE), None, crate::util::now()),
            None,
            "nothing to change"
        );
        let patch = taint_patch(&node, Some(UNREACHABLE), Some(UNREACHABLE), crate::util::now())
            .expect("a patch");
        let taints = patch["spec"]["taints"].as_array().expect("taints");
        assert_eq!(patch["metadata"]["resourceVersion"], "7");
        assert_eq!(taints.len(), 3);
        assert_eq!(taints[0]["key"], "example.com/dedicated");
        assert_eq!(taints[1]["timeAdded"], "2026-01-01T00:00:00Z");
        assert_eq!(
            (taints[2]["key"].clone(), taints[2]["effect"].clone()),
            (json!(UNREACHABLE), json!("NoExecute"))
        );
        // Ready again: only the foreign taint stays.
        let patch = taint_patch(&node, None, None, crate::util::now()).expect("a patch");
        assert_eq!(patch["spec"]["taints"].as_array().map(Vec::len), Some(1));
    }
}
