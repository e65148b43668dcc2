//! Deployment controller: one ReplicaSet per pod template (named by its hash), rolling updates
//! within maxSurge/maxUnavailable or Recreate, revision annotations and history limits, and the
//! Progressing/Available conditions `kubectl rollout status` reads.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet};
use k8s_openapi::api::core::v1::PodTemplateSpec;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use kube::{Api, Client, ResourceExt};
use rkube_client::events::{Recorder, reference};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;

use crate::informer::{Informers, next_pass};
use crate::util::{controller_uid, scaled};

const REVISION: &str = "deployment.kubernetes.io/revision";

pub async fn run(client: Client, inf: Informers, recorder: Recorder, shutdown: CancellationToken) {
    let mut changed = inf.changed.clone();
    loop {
        for d in inf.deployments.state() {
            if let Err(e) = reconcile(&client, &inf, &recorder, &d).await {
                tracing::debug!("deployment {}: {e}", d.name_any());
            }
        }
        if !next_pass(&mut changed, Duration::from_secs(5), &shutdown).await {
            return;
        }
    }
}

/// The pod-template-hash: a short, stable, DNS-safe hash of the template.
pub fn template_hash(t: &PodTemplateSpec) -> String {
    let mut t = t.clone();
    if let Some(l) = t.metadata.as_mut().and_then(|m| m.labels.as_mut()) {
        l.remove("pod-template-hash");
    }
    let bytes = serde_json::to_vec(&t).unwrap_or_default();
    let digest = Sha256::digest(&bytes);
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    digest.iter().take(10).map(|b| ALPHABET[*b as usize % ALPHABET.len()] as char).collect()
}

fn without_hash(t: Option<&PodTemplateSpec>) -> Value {
    let mut v = serde_json::to_value(t.cloned().unwrap_or_default()).unwrap_or_default();
    if let Some(l) = v["metadata"]["labels"].as_object_mut() {
        l.remove("pod-template-hash");
    }
    v
}

fn revision_of(rs: &ReplicaSet) -> i64 {
    rs.annotations().get(REVISION).and_then(|r| r.parse().ok()).unwrap_or(0)
}

fn replicas(rs: &ReplicaSet) -> i32 {
    rs.spec.as_ref().and_then(|s| s.replicas).unwrap_or(0)
}

fn available(rs: &ReplicaSet) -> i32 {
    rs.status.as_ref().and_then(|s| s.available_replicas).unwrap_or(0)
}

async fn scale_rs(
    client: &Client,
    recorder: &Recorder,
    d: &Deployment,
    rs: &ReplicaSet,
    to: i32,
) -> crate::Result<()> {
    let from = replicas(rs);
    if from == to {
        return Ok(());
    }
    let api: Api<ReplicaSet> = Api::namespaced(client.clone(), &rs.namespace().unwrap_or_default());
    let want = d.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
    let patch = json!({
        "metadata": {"annotations": {"deployment.kubernetes.io/desired-replicas": want.to_string()}},
        "spec": {"replicas": to},
    });
    api.patch(&rs.name_any(), &PatchParams::default(), &Patch::Merge(&patch)).await?;
    let dir = if to > from { "up" } else { "down" };
    recorder
        .record(
            &reference(d),
            "Normal",
            "ScalingReplicaSet",
            &format!("Scaled {dir} replica set {} from {from} to {to}", rs.name_any()),
        )
        .await;
    Ok(())
}

async fn reconcile(
    client: &Client,
    inf: &Informers,
    recorder: &Recorder,
    d: &Deployment,
) -> crate::Result<()> {
    if d.metadata.deletion_timestamp.is_some() {
        return Ok(());
    }
    let ns = d.namespace().unwrap_or_default();
    let uid = d.uid().unwrap_or_default();
    let spec = d.spec.clone().unwrap_or_default();
    let want = spec.replicas.unwrap_or(1).max(0);
    let mut owned: Vec<Arc<ReplicaSet>> = inf
        .replicasets
        .state()
        .into_iter()
        .filter(|rs| {
            rs.namespace().as_deref() == Some(&ns)
                && controller_uid(rs.metadata.owner_references.as_ref()).as_deref() == Some(&uid)
                && rs.metadata.deletion_timestamp.is_none()
        })
        .collect();
    owned.sort_by_key(|rs| revision_of(rs));
    let template = without_hash(Some(&spec.template));
    let new_rs = owned
        .iter()
        .find(|rs| without_hash(rs.spec.as_ref().and_then(|s| s.template.as_ref())) == template)
        .cloned();
    let old: Vec<Arc<ReplicaSet>> = owned
        .iter()
        .filter(|rs| new_rs.as_ref().is_none_or(|n| n.uid() != rs.uid()))
        .cloned()
        .collect();
    let max_rev = owned.iter().map(|rs| revision_of(rs)).max().unwrap_or(0);
    let rs_api: Api<ReplicaSet> = Api::namespaced(client.clone(), &ns);
    let d_api: Api<Deployment> = Api::namespaced(client.clone(), &ns);
    let paused = spec.paused == Some(true);
    let recreate = spec.strategy.as_ref().and_then(|s| s.type_.as_deref()) == Some("Recreate");
    let mut new_rs = new_rs;
    let mut created_new = false;
    if new_rs.is_none() && !paused {
        let hash = template_hash(&spec.template);
        let mut tpl = spec.template.clone();
        let meta = tpl.metadata.get_or_insert_with(Default::default);
        meta.labels
            .get_or_insert_with(BTreeMap::new)
            .insert("pod-template-hash".into(), hash.clone());
        let mut selector = spec.selector.clone();
        selector
            .match_labels
            .get_or_insert_with(BTreeMap::new)
            .insert("pod-template-hash".into(), hash.clone());
        let mut labels = tpl.metadata.as_ref().and_then(|m| m.labels.clone()).unwrap_or_default();
        labels.insert("pod-template-hash".into(), hash.clone());
        // Surge from the start on a fresh Deployment: with no old pods, all replicas at once.
        let initial = if old.iter().map(|rs| replicas(rs)).sum::<i32>() == 0 { want } else { 0 };
        let mut annotations = BTreeMap::new();
        annotations.insert(REVISION.to_string(), (max_rev + 1).to_string());
        annotations
            .insert("deployment.kubernetes.io/desired-replicas".to_string(), want.to_string());
        let rs = ReplicaSet {
            metadata: kube::api::ObjectMeta {
                name: Some(format!("{}-{hash}", d.name_any())),
                namespace: Some(ns.clone()),
                labels: Some(labels),
                annotations: Some(annotations),
                owner_references: Some(vec![OwnerReference {
                    api_version: "apps/v1".into(),
                    kind: "Deployment".into(),
                    name: d.name_any(),
                    uid: uid.clone(),
                    controller: Some(true),
                    block_owner_deletion: Some(true),
                }]),
                ..Default::default()
            },
            spec: Some(k8s_openapi::api::apps::v1::ReplicaSetSpec {
                replicas: Some(initial),
                min_ready_seconds: spec.min_ready_seconds,
                selector,
                template: Some(tpl),
            }),
            status: None,
        };
        match rs_api.create(&PostParams::default(), &rs).await {
            Ok(created) => {
                if initial > 0 {
                    recorder
                        .record(
                            &reference(d),
                            "Normal",
                            "ScalingReplicaSet",
                            &format!(
                                "Scaled up replica set {} from 0 to {initial}",
                                created.name_any()
                            ),
                        )
                        .await;
                }
                new_rs = Some(Arc::new(created));
                created_new = true;
            }
            Err(kube::Error::Api(e)) if e.code == 409 => return Ok(()),
            Err(e) => return Err(e.into()),
        }
    } else if let Some(n) = &new_rs
        && revision_of(n) < max_rev
        && !paused
    {
        // Rolling back to an old template: it becomes the newest revision again.
        let patch = json!({"metadata": {"annotations": {REVISION: (max_rev + 1).to_string()}}});
        rs_api.patch(&n.name_any(), &PatchParams::default(), &Patch::Merge(&patch)).await?;
    }
    if !paused && let Some(n) = &new_rs {
        if recreate {
            let old_running: i32 =
                old.iter().map(|rs| rs.status.as_ref().map(|s| s.replicas).unwrap_or(0)).sum();
            for rs in &old {
                scale_rs(client, recorder, d, rs, 0).await?;
            }
            if old_running == 0 {
                scale_rs(client, recorder, d, n, want).await?;
            }
        } else {
            let ru =
                spec.strategy.as_ref().and_then(|s| s.rolling_update.clone()).unwrap_or_default();
            let surge = scaled(ru.max_surge.as_ref(), want, true, 25);
            let mut unavailable = scaled(ru.max_unavailable.as_ref(), want, false, 25);
            if surge == 0 && unavailable == 0 {
                unavailable = 1;
            }
            let total: i32 = owned.iter().map(|rs| replicas(rs)).sum::<i32>()
                + if owned.iter().any(|r| r.uid() == n.uid()) { 0 } else { replicas(n) };
            let new_replicas = replicas(n);
            if old.is_empty() || old.iter().all(|rs| replicas(rs) == 0) {
                // Nothing to roll away from: the new set simply follows `replicas` (scale).
                scale_rs(client, recorder, d, n, want).await?;
            } else {
                if new_replicas < want {
                    let room = (want + surge - total).max(0);
                    let to = (new_replicas + room).min(want);
                    scale_rs(client, recorder, d, n, to).await?;
                } else if new_replicas > want {
                    scale_rs(client, recorder, d, n, want).await?;
                }
                let min_available = want - unavailable;
                let all_available: i32 = owned.iter().map(|rs| available(rs)).sum();
                let mut can_remove = (all_available - min_available).max(0);
                // Old replicas that are not available can always go.
                for rs in &old {
                    let unhealthy = replicas(rs) - available(rs);
                    if unhealthy > 0 {
                        scale_rs(client, recorder, d, rs, replicas(rs) - unhealthy).await?;
                    }
                }
                for rs in &old {
                    if can_remove == 0 {
                        break;
                    }
                    let cur = available(rs).min(replicas(rs));
                    if cur == 0 {
                        continue;
                    }
                    let take = cur.min(can_remove);
                    scale_rs(client, recorder, d, rs, replicas(rs) - take).await?;
                    can_remove -= take;
                }
            }
        }
        // History: keep at most revisionHistoryLimit old, empty ReplicaSets.
        let limit = spec.revision_history_limit.unwrap_or(10).max(0) as usize;
        let empty_old: Vec<&Arc<ReplicaSet>> = old
            .iter()
            .filter(|rs| {
                replicas(rs) == 0 && rs.status.as_ref().map(|s| s.replicas).unwrap_or(0) == 0
            })
            .collect();
        if empty_old.len() > limit {
            for rs in empty_old.iter().take(empty_old.len() - limit) {
                let _ = rs_api.delete(&rs.name_any(), &DeleteParams::background()).await;
            }
        }
    }
    // Status and conditions.
    let new_uid = new_rs.as_ref().and_then(|n| n.uid());
    let sum = |f: &dyn Fn(&ReplicaSet) -> i32| owned.iter().map(|rs| f(rs)).sum::<i32>();
    let cur_replicas = sum(&|rs| rs.status.as_ref().map(|s| s.replicas).unwrap_or(0));
    let updated = new_rs
        .as_ref()
        .and_then(|n| owned.iter().find(|r| r.uid() == n.uid()).cloned().or(Some(n.clone())))
        .map(|n| n.status.as_ref().map(|s| s.replicas).unwrap_or(0))
        .unwrap_or(0);
    let ready = sum(&|rs| rs.status.as_ref().and_then(|s| s.ready_replicas).unwrap_or(0));
    let avail = sum(&|rs| available(rs));
    let ru = spec.strategy.as_ref().and_then(|s| s.rolling_update.clone()).unwrap_or_default();
    let max_unavail =
        if recreate { 0 } else { scaled(ru.max_unavailable.as_ref(), want, false, 25) };
    let now = crate::util::now();
    let prev_conds: Vec<Value> = d
        .status
        .as_ref()
        .and_then(|s| s.conditions.clone())
        .map(|c| serde_json::to_value(c).unwrap_or_default())
        .and_then(|v| v.as_array().cloned())
        .unwrap_or_default();
    let cond = |ty: &str, status: &str, reason: &str, message: String| {
        let prev = prev_conds.iter().find(|c| c["type"] == ty);
        let since = prev
            .filter(|c| c["status"] == status)
            .and_then(|c| c["lastTransitionTime"].as_str().map(String::from));
        json!({"type": ty, "status": status, "reason": reason, "message": message,
               "lastUpdateTime": now, "lastTransitionTime": since.map(Value::from).unwrap_or(json!(now))})
    };
    let available_ok = avail >= want - max_unavail;
    let rs_name = new_rs.as_ref().map(|n| n.name_any()).unwrap_or_default();
    let prev_progressing = prev_conds.iter().find(|c| c["type"] == "Progressing");
    let before = d
        .status
        .as_ref()
        .map(|s| Counts {
            replicas: s.replicas.unwrap_or(0),
            updated: s.updated_replicas.unwrap_or(0),
            ready: s.ready_replicas.unwrap_or(0),
            available: s.available_replicas.unwrap_or(0),
        })
        .unwrap_or_default();
    let after = Counts { replicas: cur_replicas, updated, ready, available: avail };
    let deadline = spec.progress_deadline_seconds.filter(|s| *s != i32::MAX).map(i64::from);
    let state = if paused {
        Progress::Paused
    } else if created_new {
        Progress::NewReplicaSet
    } else {
        progress(prev_progressing, before, after, want, deadline, jiff::Timestamp::now())
    };
    let progressing = match state {
        Progress::Paused => {
            Some(cond("Progressing", "Unknown", "DeploymentPaused", "Deployment is paused".into()))
        }
        Progress::NewReplicaSet => Some(cond(
            "Progressing",
            "True",
            "NewReplicaSetCreated",
            format!("Created new replica set \"{rs_name}\""),
        )),
        Progress::Complete => Some(cond(
            "Progressing",
            "True",
            "NewReplicaSetAvailable",
            format!("ReplicaSet \"{rs_name}\" has successfully progressed."),
        )),
        // Progress refreshes lastUpdateTime, the clock the deadline runs on.
        Progress::Progressed => Some(cond(
            "Progressing",
            "True",
            "ReplicaSetUpdated",
            format!("ReplicaSet \"{rs_name}\" is progressing."),
        )),
        Progress::TimedOut => Some(cond(
            "Progressing",
            "False",
            "ProgressDeadlineExceeded",
            format!("ReplicaSet \"{rs_name}\" has timed out progressing."),
        )),
        Progress::Unchanged => prev_progressing.cloned(),
    };
    let conditions = vec![if available_ok {
        cond(
            "Available",
            "True",
            "MinimumReplicasAvailable",
            "Deployment has minimum availability.".into(),
        )
    } else {
        cond(
            "Available",
            "False",
            "MinimumReplicasUnavailable",
            "Deployment does not have minimum availability.".into(),
        )
    }];
    let conditions: Vec<Value> = conditions.into_iter().chain(progressing).collect();
    let status = json!({
        "observedGeneration": d.metadata.generation.unwrap_or(0),
        "replicas": cur_replicas, "updatedReplicas": updated, "readyReplicas": ready,
        "availableReplicas": avail, "unavailableReplicas": (cur_replicas - avail).max(0),
        "conditions": conditions,
    });
    let cur = serde_json::to_value(d.status.clone().unwrap_or_default()).unwrap_or_default();
    let counts_differ = [
        "observedGeneration",
        "replicas",
        "updatedReplicas",
        "readyReplicas",
        "availableReplicas",
        "unavailableReplicas",
    ]
    .iter()
    .any(|k| cur.get(*k).and_then(|v| v.as_i64()).unwrap_or(0) != status[*k].as_i64().unwrap_or(0));
    let conds_differ = {
        let strip = |v: &Value| {
            v.as_array()
                .map(|a| {
                    a.iter()
                        .map(|c| (c["type"].clone(), c["status"].clone(), c["reason"].clone()))
                        .collect::<Vec<_>>()
                })
                .unwrap_or_default()
        };
        strip(&cur["conditions"]) != strip(&status["conditions"])
    };
    let _ = new_uid;
    if counts_differ || conds_differ {
        d_api
            .patch_status(
                &d.name_any(),
                &PatchParams::default(),
                &Patch::Merge(&json!({"status": status})),
            )
            .await?;
    }
    if let Some(n) = &new_rs {
        let rev = revision_of(n).max(max_rev);
        if d.annotations().get(REVISION).map(String::as_str) != Some(&rev.to_string()) && rev > 0 {
            let patch = json!({"metadata": {"annotations": {REVISION: rev.to_string()}}});
            d_api.patch(&d.name_any(), &PatchParams::default(), &Patch::Merge(&patch)).await?;
        }
    }
    Ok(())
}

/// The replica counts the Progressing condition compares between passes.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
struct Counts {
    replicas: i32,
    updated: i32,
    ready: i32,
    available: i32,
}

/// What the Progressing condition should say after a pass.
#[derive(Debug, PartialEq)]
enum Progress {
    Paused,
    NewReplicaSet,
    /// Every replica updated and available (NewReplicaSetAvailable).
    Complete,
    /// Some count moved the right way since the last pass (ReplicaSetUpdated, new lastUpdateTime).
    Progressed,
    /// No progress for progressDeadlineSeconds since lastUpdateTime (ProgressDeadlineExceeded).
    TimedOut,
    /// Keep the condition as it is, lastUpdateTime included, so the deadline keeps running.
    Unchanged,
}

/// Upstream's rollout status: a complete rollout stays complete while its replicas are all
/// updated; otherwise completion, then progress, then the deadline decide. A timed-out rollout
/// stays timed out until something moves again.
fn progress(
    prev: Option<&Value>,
    before: Counts,
    after: Counts,
    want: i32,
    deadline: Option<i64>,
    now: jiff::Timestamp,
) -> Progress {
    let reason = prev.and_then(|c| c["reason"].as_str());
    if after.replicas == after.updated && reason == Some("NewReplicaSetAvailable") {
        return Progress::Complete;
    }
    if after.updated == want && after.replicas == want && after.available == want {
        return Progress::Complete;
    }
    let old_before = before.replicas - before.updated;
    let old_after = after.replicas - after.updated;
    if after.updated > before.updated
        || old_after < old_before
        || after.ready > before.ready
        || after.available > before.available
    {
        return Progress::Progressed;
    }
    let Some(deadline) = deadline else { return Progress::Unchanged };
    match reason {
        None | Some("NewReplicaSetAvailable") => Progress::Unchanged,
        Some("ProgressDeadlineExceeded") => Progress::TimedOut,
        Some(_) => {
            let since = prev
                .and_then(|c| c["lastUpdateTime"].as_str())
                .and_then(|t| t.parse::<jiff::Timestamp>().ok());
            match since {
                Some(t) if now.as_second() > t.as_second() + deadline => Progress::TimedOut,
                _ => Progress::Unchanged,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counts(replicas: i32, updated: i32, ready: i32, available: i32) -> Counts {
        Counts { replicas, updated, ready, available }
    }

    fn at(s: i64) -> jiff::Timestamp {
        jiff::Timestamp::from_second(s).expect("valid time")
    }

    fn updating_since(s: i64) -> Value {
        json!({"type": "Progressing", "status": "True", "reason": "ReplicaSetUpdated",
               "lastUpdateTime": at(s).to_string()})
    }

    #[test]
    fn a_rollout_without_progress_times_out_after_the_deadline_and_not_before() {
        let c = updating_since(1000);
        let stuck = counts(2, 2, 0, 0);
        assert_eq!(progress(Some(&c), stuck, stuck, 2, Some(10), at(1010)), Progress::Unchanged);
        assert_eq!(progress(Some(&c), stuck, stuck, 2, Some(10), at(1011)), Progress::TimedOut);
        assert_eq!(progress(Some(&c), stuck, stuck, 2, None, at(99_999)), Progress::Unchanged);
    }

    #[test]
    fn a_timed_out_rollout_stays_timed_out_until_a_count_moves() {
        let c = json!({"type": "Progressing", "status": "False", "reason": "ProgressDeadlineExceeded",
                       "lastUpdateTime": at(5000).to_string()});
        let stuck = counts(2, 2, 0, 0);
        assert_eq!(progress(Some(&c), stuck, stuck, 2, Some(10), at(5001)), Progress::TimedOut);
        assert_eq!(
            progress(Some(&c), stuck, counts(2, 2, 1, 1), 2, Some(10), at(5001)),
            Progress::Progressed
        );
    }

    #[test]
    fn progress_is_a_count_moving_towards_the_goal() {
        let c = updating_since(1000);
        let before = counts(4, 2, 2, 2);
        // An old replica gone counts as progress; fewer ready pods does not.
        assert_eq!(
            progress(Some(&c), before, counts(3, 2, 2, 2), 3, Some(10), at(2000)),
            Progress::Progressed
        );
        assert_eq!(
            progress(Some(&c), before, counts(4, 2, 1, 1), 3, Some(10), at(2000)),
            Progress::TimedOut
        );
    }

    #[test]
    fn a_complete_rollout_stays_complete_while_every_replica_is_updated() {
        let done = json!({"type": "Progressing", "status": "True", "reason": "NewReplicaSetAvailable",
                          "lastUpdateTime": at(0).to_string()});
        // A pod dying later is not a stalled rollout.
        assert_eq!(
            progress(Some(&done), counts(3, 3, 3, 3), counts(3, 3, 2, 2), 3, Some(1), at(9999)),
            Progress::Complete
        );
        assert_eq!(
            progress(None, counts(0, 0, 0, 0), counts(3, 3, 3, 3), 3, Some(1), at(0)),
            Progress::Complete
        );
    }
}
