//! ReplicaSet controller: creates or deletes pods until the count matches `replicas`, adopts
//! matching orphans, and keeps status true. Expectations remember its own creates and deletes
//! until the informer sees them, so a burst of events never over- or under-creates.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::ReplicaSet;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use kube::{Api, Client, ResourceExt};
use rkube_client::events::{Recorder, reference};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::informer::{Informers, next_pass};
use crate::util::{controller_uid, is_active, is_available, is_ready};

/// Pods this controller created or deleted that the informer has not reflected yet.
#[derive(Default)]
struct Expectations {
    creates: HashMap<String, Vec<(String, Instant)>>,
    deletes: HashMap<String, Vec<(String, Instant)>>,
}

const EXPECTATION_TTL: Duration = Duration::from_secs(30);

pub async fn run(client: Client, inf: Informers, recorder: Recorder, shutdown: CancellationToken) {
    let mut changed = inf.changed.clone();
    let mut exp = Expectations::default();
    loop {
        for rs in inf.replicasets.state() {
            if let Err(e) = reconcile(&client, &inf, &recorder, &mut exp, &rs).await {
                tracing::debug!("replicaset {}: {e}", rs.name_any());
            }
        }
        if !next_pass(&mut changed, Duration::from_secs(5), &shutdown).await {
            return;
        }
    }
}

fn selector_matches(rs: &ReplicaSet, pod: &Pod) -> bool {
    let Some(sel) = rs.spec.as_ref().map(|s| &s.selector) else { return false };
    rkube_client::selector_matches(sel, &pod.metadata.labels.clone().unwrap_or_default())
}

/// Deletion order as upstream: unscheduled, pending, not ready, then newest first.
fn deletion_rank(p: &Pod) -> (i32, i32, i32, i64) {
    let unscheduled =
        p.spec.as_ref().and_then(|s| s.node_name.as_ref()).is_none_or(|n| n.is_empty());
    let pending = p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Pending");
    let created = p.metadata.creation_timestamp.as_ref().map(|t| t.0.as_second()).unwrap_or(0);
    (i32::from(!unscheduled), i32::from(!pending), i32::from(is_ready(p)), -created)
}

async fn reconcile(
    client: &Client,
    inf: &Informers,
    recorder: &Recorder,
    exp: &mut Expectations,
    rs: &ReplicaSet,
) -> crate::Result<()> {
    if rs.metadata.deletion_timestamp.is_some() {
        return Ok(());
    }
    let ns = rs.namespace().unwrap_or_default();
    let uid = rs.uid().unwrap_or_default();
    let pods_api: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let all: Vec<std::sync::Arc<Pod>> =
        inf.pods.state().into_iter().filter(|p| p.namespace().as_deref() == Some(&ns)).collect();
    // Adopt orphans that match the selector; owned pods that no longer match are released.
    for p in &all {
        let owner = controller_uid(p.metadata.owner_references.as_ref());
        if owner.is_none() && is_active(p) && selector_matches(rs, p) {
            let patch = json!({"metadata": {"ownerReferences": [owner_ref(rs)], "uid": p.uid()}});
            let _ = pods_api
                .patch(&p.name_any(), &PatchParams::default(), &Patch::Strategic(&patch))
                .await;
        }
    }
    let mut owned: Vec<std::sync::Arc<Pod>> = all
        .iter()
        .filter(|p| {
            controller_uid(p.metadata.owner_references.as_ref()).as_deref() == Some(&uid)
                && is_active(p)
        })
        .cloned()
        .collect();
    // Expectations: count our own recent creates the informer has not seen, and skip pods we
    // already deleted.
    let now = Instant::now();
    // Looked up by name once per pass: up to 500 expectations against 10,000 pods.
    let seen: HashSet<&str> = all.iter().filter_map(|p| p.metadata.name.as_deref()).collect();
    let creates = exp.creates.entry(uid.clone()).or_default();
    creates.retain(|(name, t)| {
        now.duration_since(*t) < EXPECTATION_TTL && !seen.contains(name.as_str())
    });
    let owned_names: HashSet<&str> =
        owned.iter().filter_map(|p| p.metadata.name.as_deref()).collect();
    let deletes = exp.deletes.entry(uid.clone()).or_default();
    deletes.retain(|(name, t)| {
        now.duration_since(*t) < EXPECTATION_TTL && owned_names.contains(name.as_str())
    });
    owned.retain(|p| !deletes.iter().any(|(n, _)| *n == p.name_any()));
    let in_flight = creates.len();
    let want = rs.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1).max(0) as usize;
    let have = owned.len() + in_flight;
    if have < want {
        let template = rs.spec.as_ref().and_then(|s| s.template.clone()).unwrap_or_default();
        for _ in 0..(want - have).min(500) {
            let mut meta = template.metadata.clone().unwrap_or_default();
            meta.name = None;
            meta.generate_name = Some(format!("{}-", rs.name_any()));
            meta.namespace = Some(ns.clone());
            meta.owner_references = Some(vec![owner_ref(rs)]);
            let pod = Pod { metadata: meta, spec: template.spec.clone(), status: None };
            match pods_api.create(&PostParams::default(), &pod).await {
                Ok(created) => {
                    let name = created.name_any();
                    exp.creates
                        .entry(uid.clone())
                        .or_default()
                        .push((name.clone(), Instant::now()));
                    recorder
                        .record(
                            &reference(rs),
                            "Normal",
                            "SuccessfulCreate",
                            &format!("Created pod: {name}"),
                        )
                        .await;
                }
                Err(e) => {
                    recorder
                        .record(
                            &reference(rs),
                            "Warning",
                            "FailedCreate",
                            &format!("Error creating: {e}"),
                        )
                        .await;
                    break;
                }
            }
        }
    } else if owned.len() > want && in_flight == 0 {
        let mut victims = owned.clone();
        victims.sort_by_key(|p| deletion_rank(p));
        for p in victims.iter().take(owned.len() - want) {
            let name = p.name_any();
            match pods_api.delete(&name, &DeleteParams::default()).await {
                Ok(_) => {
                    exp.deletes
                        .entry(uid.clone())
                        .or_default()
                        .push((name.clone(), Instant::now()));
                    recorder
                        .record(
                            &reference(rs),
                            "Normal",
                            "SuccessfulDelete",
                            &format!("Deleted pod: {name}"),
                        )
                        .await;
                }
                Err(kube::Error::Api(e)) if e.code == 404 => {}
                Err(e) => tracing::debug!("deleting {name}: {e}"),
            }
        }
    }
    // Status.
    let min_ready = rs.spec.as_ref().and_then(|s| s.min_ready_seconds).unwrap_or(0);
    let template_labels = rs
        .spec
        .as_ref()
        .and_then(|s| s.template.as_ref())
        .and_then(|t| t.metadata.as_ref())
        .and_then(|m| m.labels.clone())
        .unwrap_or_default();
    let fully = owned
        .iter()
        .filter(|p| {
            let l = p.labels();
            template_labels.iter().all(|(k, v)| l.get(k) == Some(v))
        })
        .count();
    let status = json!({
        "replicas": owned.len(),
        "fullyLabeledReplicas": fully,
        "readyReplicas": owned.iter().filter(|p| is_ready(p)).count(),
        "availableReplicas": owned.iter().filter(|p| is_available(p, min_ready)).count(),
        "observedGeneration": rs.metadata.generation.unwrap_or(0),
    });
    let cur = serde_json::to_value(rs.status.clone().unwrap_or_default()).unwrap_or_default();
    let differs = [
        "replicas",
        "fullyLabeledReplicas",
        "readyReplicas",
        "availableReplicas",
        "observedGeneration",
    ]
    .iter()
    .any(|k| cur.get(*k).and_then(|v| v.as_i64()).unwrap_or(0) != status[*k].as_i64().unwrap_or(0));
    if differs {
        let api: Api<ReplicaSet> = Api::namespaced(client.clone(), &ns);
        api.patch_status(
            &rs.name_any(),
            &PatchParams::default(),
            &Patch::Merge(&json!({"status": status})),
        )
        .await?;
    }
    Ok(())
}

fn owner_ref(rs: &ReplicaSet) -> OwnerReference {
    OwnerReference {
        api_version: "apps/v1".into(),
        kind: "ReplicaSet".into(),
        name: rs.name_any(),
        uid: rs.uid().unwrap_or_default(),
        controller: Some(true),
        block_owner_deletion: Some(true),
    }
}
