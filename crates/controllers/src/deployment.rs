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
    let complete = updated == want
        && cur_replicas == want
        && avail >= want
        && d.status.as_ref().and_then(|s| s.observed_generation).is_some();
    let progressing = if paused {
        cond("Progressing", "Unknown", "DeploymentPaused", "Deployment is paused".into())
    } else if complete {
        cond(
            "Progressing",
            "True",
            "NewReplicaSetAvailable",
            format!("ReplicaSet \"{rs_name}\" has successfully progressed."),
        )
    } else {
        let deadline = spec.progress_deadline_seconds.unwrap_or(600) as i64;
        let last_progress = prev_conds
            .iter()
            .find(|c| c["type"] == "Progressing")
            .and_then(|c| c["lastUpdateTime"].as_str())
            .and_then(|t| t.parse::<jiff::Timestamp>().ok());
        let stalled = last_progress
            .is_some_and(|t| jiff::Timestamp::now().as_second() - t.as_second() > deadline)
            && prev_conds
                .iter()
                .any(|c| c["type"] == "Progressing" && c["reason"] != "NewReplicaSetAvailable");
        if stalled {
            cond(
                "Progressing",
                "False",
                "ProgressDeadlineExceeded",
                format!("ReplicaSet \"{rs_name}\" has timed out progressing."),
            )
        } else {
            let mut c = cond(
                "Progressing",
                "True",
                "ReplicaSetUpdated",
                format!("ReplicaSet \"{rs_name}\" is progressing."),
            );
            // Only real progress (a count moving) refreshes lastUpdateTime.
            let before = d
                .status
                .as_ref()
                .map(|s| {
                    (
                        s.updated_replicas.unwrap_or(0),
                        s.available_replicas.unwrap_or(0),
                        s.ready_replicas.unwrap_or(0),
                    )
                })
                .unwrap_or_default();
            if before == (updated, avail, ready)
                && let Some(p) = prev_conds
                    .iter()
                    .find(|c| c["type"] == "Progressing" && c["reason"] == "ReplicaSetUpdated")
            {
                c["lastUpdateTime"] = p["lastUpdateTime"].clone();
            }
            c
        }
    };
    let conditions = vec![
        if available_ok {
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
        },
        progressing,
    ];
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
