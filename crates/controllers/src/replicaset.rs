//! ReplicaSet controller: creates or deletes pods until the count matches `replicas`, adopts
//! matching orphans, and keeps status true. Expectations remember its own creates and deletes
//! until the informer sees them, so a burst of events never over- or under-creates.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use futures::StreamExt;

use k8s_openapi::api::apps::v1::ReplicaSet;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use kube::{Api, Client, ResourceExt};
use rkube_client::events::{Recorder, reference};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::informer::{Informers, next_pass};
use crate::util::{controller_uid_ref, is_active, is_available, is_ready};

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
    // Borrowed comparisons only: a pass runs on every pod change, over every pod.
    let all: Vec<std::sync::Arc<Pod>> = inf
        .pods
        .state()
        .into_iter()
        .filter(|p| p.metadata.namespace.as_deref() == Some(ns.as_str()))
        .collect();
    // Adopt orphans that match the selector; owned pods that no longer match are released.
    for p in &all {
        let owner = controller_uid_ref(p.metadata.owner_references.as_ref());
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
            controller_uid_ref(p.metadata.owner_references.as_ref()) == Some(uid.as_str())
                && is_active(p)
        })
        .cloned()
        .collect();
    // Expectations: count our own recent creates the informer has not seen, and skip pods we
    // already deleted.
    let now = Instant::now();
    // Looked up by name once per pass (up to 500 expectations against 10,000 pods), and only
    // while there are expectations: most passes have none.
    let creates = exp.creates.entry(uid.clone()).or_default();
    if !creates.is_empty() {
        let seen: HashSet<&str> = all.iter().filter_map(|p| p.metadata.name.as_deref()).collect();
        creates.retain(|(name, t)| {
            now.duration_since(*t) < EXPECTATION_TTL && !seen.contains(name.as_str())
        });
    }
    let deletes = exp.deletes.entry(uid.clone()).or_default();
    if !deletes.is_empty() {
        let owned_names: HashSet<&str> =
            owned.iter().filter_map(|p| p.metadata.name.as_deref()).collect();
        deletes.retain(|(name, t)| {
            now.duration_since(*t) < EXPECTATION_TTL && owned_names.contains(name.as_str())
        });
        let gone: HashSet<&str> = deletes.iter().map(|(n, _)| n.as_str()).collect();
        owned.retain(|p| !gone.contains(p.metadata.name.as_deref().unwrap_or("")));
    }
    let in_flight = creates.len();
    let want = rs.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1).max(0) as usize;
    let have = owned.len() + in_flight;
    if have < want {
        let template = rs.spec.as_ref().and_then(|s| s.template.clone()).unwrap_or_default();
        let pod = |_: usize| {
            let mut meta = template.metadata.clone().unwrap_or_default();
            meta.name = None;
            meta.generate_name = Some(format!("{}-", rs.name_any()));
            meta.namespace = Some(ns.clone());
            meta.owner_references = Some(vec![owner_ref(rs)]);
            Pod { metadata: meta, spec: template.spec.clone(), status: None }
        };
        let rs_ref = reference(rs);
        let created = slow_start((want - have).min(BURST_REPLICAS), |i| {
            let (pods_api, rs_ref, pod) = (&pods_api, &rs_ref, pod(i));
            async move {
                match pods_api.create(&PostParams::default(), &pod).await {
                    Ok(created) => {
                        let name = created.name_any();
                        recorder
                            .record(
                                rs_ref,
                                "Normal",
                                "SuccessfulCreate",
                                &format!("Created pod: {name}"),
                            )
                            .await;
                        Some(name)
                    }
                    Err(e) => {
                        recorder
                            .record(
                                rs_ref,
                                "Warning",
                                "FailedCreate",
                                &format!("Error creating: {e}"),
                            )
                            .await;
                        None
                    }
                }
            }
        })
        .await;
        // Every acknowledged create is expected before the next pass looks at the pods: the
        // passes run one at a time, so none counts the pods while creates are in flight.
        let now = Instant::now();
        exp.creates.entry(uid.clone()).or_default().extend(created.into_iter().map(|n| (n, now)));
    } else if owned.len() > want && in_flight == 0 {
        let mut victims = owned.clone();
        victims.sort_by_key(|p| deletion_rank(p));
        // All deletions at once (upstream issues them concurrently too), bounded in flight.
        let rs_ref = reference(rs);
        let names: Vec<String> = victims
            .iter()
            .take((owned.len() - want).min(BURST_REPLICAS))
            .map(|p| p.name_any())
            .collect();
        let deletes: Vec<_> = names
            .into_iter()
            .map(|name| {
                let (pods_api, rs_ref) = (&pods_api, &rs_ref);
                async move {
                    match pods_api.delete(&name, &DeleteParams::default()).await {
                        Ok(_) => {
                            recorder
                                .record(
                                    rs_ref,
                                    "Normal",
                                    "SuccessfulDelete",
                                    &format!("Deleted pod: {name}"),
                                )
                                .await;
                            Some(name)
                        }
                        Err(kube::Error::Api(e)) if e.code == 404 => None,
                        Err(e) => {
                            tracing::debug!("deleting {name}: {e}");
                            None
                        }
                    }
                }
            })
            .collect();
        let deleted: Vec<String> = futures::stream::iter(deletes)
            .buffer_unordered(CREATES_IN_FLIGHT)
            .filter_map(futures::future::ready)
            .collect()
            .await;
        let now = Instant::now();
        exp.deletes.entry(uid.clone()).or_default().extend(deleted.into_iter().map(|n| (n, now)));
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

/// Creates at most this many pods per pass (upstream's burstReplicas).
const BURST_REPLICAS: usize = 500;

/// Requests in flight at once (within a create batch, or deleting): the client speaks HTTP/1.1, one connection (and
/// TLS handshake) per concurrent request.
const CREATES_IN_FLIGHT: usize = 64;

/// Upstream's slow start: calls `f` for `0..count` in batches of 1, 2, 4, … issued concurrently,
/// and stops after a batch in which any call failed, so a failing create (quota, admission)
/// costs a few calls instead of `count`. Returns the results of the successful calls.
async fn slow_start<T, F, Fut>(count: usize, mut f: F) -> Vec<T>
where
    F: FnMut(usize) -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let mut done = Vec::with_capacity(count);
    let (mut start, mut batch) = (0, 1);
    while start < count {
        let n = batch.min(count - start);
        let calls: Vec<Fut> = (start..start + n).map(&mut f).collect();
        let results: Vec<Option<T>> =
            futures::stream::iter(calls).buffer_unordered(CREATES_IN_FLIGHT).collect().await;
        let failed = results.iter().any(Option::is_none);
        done.extend(results.into_iter().flatten());
        if failed {
            break;
        }
        start += n;
        batch *= 2;
    }
    done
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[tokio::test]
    async fn slow_start_issues_doubling_batches_one_after_another() {
        // Each call notes how many calls had finished when it started: within a batch all
        // calls start together, after every earlier batch finished.
        let finished = Mutex::new(0usize);
        let seen = Mutex::new(Vec::new());
        let ok = slow_start(20, |i| {
            seen.lock().unwrap().push(*finished.lock().unwrap());
            let finished = &finished;
            async move {
                tokio::task::yield_now().await;
                *finished.lock().unwrap() += 1;
                Some(i)
            }
        })
        .await;
        let mut ok = ok;
        ok.sort();
        assert_eq!(ok, (0..20).collect::<Vec<_>>());
        let want: Vec<usize> = [(0, 1), (1, 2), (3, 4), (7, 8), (15, 5)]
            .iter()
            .flat_map(|&(done, n)| std::iter::repeat_n(done, n))
            .collect();
        assert_eq!(seen.into_inner().unwrap(), want, "batches of 1, 2, 4, 8, then the last 5");
    }

    #[tokio::test]
    async fn slow_start_stops_after_the_batch_in_which_a_call_failed() {
        // Call 5 (in the third batch, 3..7) fails: that batch finishes, no later one starts.
        let started = Mutex::new(Vec::new());
        let ok = slow_start(100, |i| {
            started.lock().unwrap().push(i);
            async move { (i != 5).then_some(i) }
        })
        .await;
        let mut started = started.into_inner().unwrap();
        started.sort();
        assert_eq!(started, (0..7).collect::<Vec<_>>(), "batches of 1, 2 and 4, nothing after");
        let mut ok = ok;
        ok.sort();
        assert_eq!(ok, vec![0, 1, 2, 3, 4, 6], "every successful call is returned");
    }
}
