//! DaemonSet controller: one pod per eligible node (nodeSelector, required node affinity and
//! NoSchedule taints), pinned there with node affinity so the scheduler binds it, replaced one
//! at a time when the template changes, and removed from nodes that are no longer eligible.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{Node, Pod, Toleration};
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use kube::{Api, Client, ResourceExt};
use rkube_client::events::{Recorder, reference};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::informer::{Informers, next_pass};
use crate::util::{controller_uid, is_active, is_available, is_ready};

const GENERATION_LABEL: &str = "pod-template-generation";

pub async fn run(client: Client, inf: Informers, recorder: Recorder, shutdown: CancellationToken) {
    // Reads nodes too: a new node (or a node's labels or taints) may want a daemon pod.
    let mut changed = inf.any_changed.clone();
    loop {
        for ds in inf.daemonsets.state() {
            if let Err(e) = reconcile(&client, &inf, &recorder, &ds).await {
                tracing::debug!("daemonset {}: {e}", ds.name_any());
            }
        }
        if !next_pass(&mut changed, Duration::from_secs(5), &shutdown).await {
            return;
        }
    }
}

/// The tolerations upstream adds to every daemon pod, so node problems never evict them.
fn daemon_tolerations() -> Vec<Toleration> {
    let t = |key: &str, effect: &str| Toleration {
        key: Some(key.into()),
        operator: Some("Exists".into()),
        effect: Some(effect.into()),
        ..Default::default()
    };
    vec![
        t("node.kubernetes.io/not-ready", "NoExecute"),
        t("node.kubernetes.io/unreachable", "NoExecute"),
        t("node.kubernetes.io/disk-pressure", "NoSchedule"),
        t("node.kubernetes.io/memory-pressure", "NoSchedule"),
        t("node.kubernetes.io/pid-pressure", "NoSchedule"),
        t("node.kubernetes.io/unschedulable", "NoSchedule"),
    ]
}

fn eligible(ds: &DaemonSet, node: &Node) -> bool {
    let spec = ds.spec.as_ref().and_then(|s| s.template.spec.clone()).unwrap_or_default();
    let labels = node.metadata.labels.clone().unwrap_or_default();
    if !spec.node_selector.iter().flatten().all(|(k, v)| labels.get(k) == Some(v)) {
        return false;
    }
    let mut tols = spec.tolerations.clone().unwrap_or_default();
    tols.extend(daemon_tolerations());
    node.spec.as_ref().and_then(|s| s.taints.clone()).unwrap_or_default().iter().all(|taint| {
        taint.effect == "PreferNoSchedule"
            || tols.iter().any(|t| {
                let key_ok = match t.key.as_deref() {
                    None | Some("") => t.operator.as_deref() == Some("Exists"),
                    Some(k) => k == taint.key,
                };
                let effect_ok =
                    t.effect.as_deref().is_none_or(|e| e.is_empty() || e == taint.effect);
                let value_ok = t.operator.as_deref() == Some("Exists")
                    || t.value.as_deref().unwrap_or("") == taint.value.as_deref().unwrap_or("");
                key_ok && effect_ok && value_ok
            })
    })
}

fn pod_node(p: &Pod) -> Option<String> {
    if let Some(n) = p.spec.as_ref().and_then(|s| s.node_name.clone()).filter(|n| !n.is_empty()) {
        return Some(n);
    }
    // Not bound yet: the node it is pinned to by affinity.
    let v = serde_json::to_value(p.spec.as_ref()?.affinity.as_ref()?).ok()?;
    v["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"][0]["matchFields"][0]["values"][0].as_str().map(String::from)
}

async fn reconcile(
    client: &Client,
    inf: &Informers,
    recorder: &Recorder,
    ds: &DaemonSet,
) -> crate::Result<()> {
    if ds.metadata.deletion_timestamp.is_some() {
        return Ok(());
    }
    let ns = ds.namespace().unwrap_or_default();
    let uid = ds.uid().unwrap_or_default();
    let generation = ds.metadata.generation.unwrap_or(1).to_string();
    let pods_api: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let owned: Vec<Arc<Pod>> = inf
        .pods
        .state()
        .into_iter()
        .filter(|p| {
            p.namespace().as_deref() == Some(&ns)
                && controller_uid(p.metadata.owner_references.as_ref()).as_deref() == Some(&uid)
                && is_active(p)
        })
        .collect();
    let mut by_node: HashMap<String, Vec<Arc<Pod>>> = HashMap::new();
    for p in &owned {
        if let Some(n) = pod_node(p) {
            by_node.entry(n).or_default().push(p.clone());
        }
    }
    let nodes = inf.nodes.state();
    let mut desired = 0;
    let mut misscheduled = 0;
    let mut replaced_one = false;
    for node in &nodes {
        let name = node.name_any();
        let want = eligible(ds, node);
        let have = by_node.remove(&name).unwrap_or_default();
        if want {
            desired += 1;
            if have.is_empty() {
                create_pod(&pods_api, recorder, ds, &name, &generation).await;
            } else if !replaced_one {
                // Rolling update, one node at a time: replace a pod of an older template.
                if let Some(old) =
                    have.iter().find(|p| p.labels().get(GENERATION_LABEL) != Some(&generation))
                {
                    let _ = pods_api.delete(&old.name_any(), &DeleteParams::default()).await;
                    recorder
                        .record(
                            &reference(ds),
                            "Normal",
                            "SuccessfulDelete",
                            &format!("Deleted pod: {}", old.name_any()),
                        )
                        .await;
                    replaced_one = true;
                }
            }
        } else if !have.is_empty() {
            misscheduled += have.len();
            for p in have {
                let _ = pods_api.delete(&p.name_any(), &DeleteParams::default()).await;
                recorder
                    .record(
                        &reference(ds),
                        "Normal",
                        "SuccessfulDelete",
                        &format!("Deleted pod: {}", p.name_any()),
                    )
                    .await;
            }
        }
    }
    // Pods for nodes that no longer exist.
    for (_, pods) in by_node {
        for p in pods {
            let _ = pods_api.delete(&p.name_any(), &DeleteParams::default()).await;
        }
    }
    let min_ready = ds.spec.as_ref().and_then(|s| s.min_ready_seconds).unwrap_or(0);
    let scheduled = owned
        .iter()
        .filter(|p| p.spec.as_ref().and_then(|s| s.node_name.as_ref()).is_some())
        .count();
    let status = json!({
        "desiredNumberScheduled": desired,
        "currentNumberScheduled": scheduled,
        "numberMisscheduled": misscheduled,
        "numberReady": owned.iter().filter(|p| is_ready(p)).count(),
        "numberAvailable": owned.iter().filter(|p| is_available(p, min_ready)).count(),
        "updatedNumberScheduled": owned.iter().filter(|p| p.labels().get(GENERATION_LABEL) == Some(&generation)).count(),
        "observedGeneration": ds.metadata.generation.unwrap_or(0),
    });
    let cur = serde_json::to_value(ds.status.clone().unwrap_or_default()).unwrap_or_default();
    let differs =
        status.as_object().into_iter().flatten().any(|(k, v)| {
            cur.get(k).and_then(|x| x.as_i64()).unwrap_or(0) != v.as_i64().unwrap_or(0)
        });
    if differs {
        let api: Api<DaemonSet> = Api::namespaced(client.clone(), &ns);
        api.patch_status(
            &ds.name_any(),
            &PatchParams::default(),
            &Patch::Merge(&json!({"status": status})),
        )
        .await?;
    }
    Ok(())
}

async fn create_pod(
    api: &Api<Pod>,
    recorder: &Recorder,
    ds: &DaemonSet,
    node: &str,
    generation: &str,
) {
    let template = ds.spec.as_ref().map(|s| s.template.clone()).unwrap_or_default();
    let mut meta = template.metadata.clone().unwrap_or_default();
    meta.name = None;
    meta.generate_name = Some(format!("{}-", ds.name_any()));
    meta.namespace = ds.namespace();
    meta.labels
        .get_or_insert_with(BTreeMap::new)
        .insert(GENERATION_LABEL.into(), generation.into());
    meta.owner_references =
        Some(vec![k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference {
            api_version: "apps/v1".into(),
            kind: "DaemonSet".into(),
            name: ds.name_any(),
            uid: ds.uid().unwrap_or_default(),
            controller: Some(true),
            block_owner_deletion: Some(true),
        }]);
    let mut spec =
        serde_json::to_value(template.spec.clone().unwrap_or_default()).unwrap_or_default();
    spec["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"] = json!({
        "nodeSelectorTerms": [{"matchFields": [{"key": "metadata.name", "operator": "In", "values": [node]}]}]
    });
    let mut tols: Vec<serde_json::Value> =
        spec["tolerations"].as_array().cloned().unwrap_or_default();
    for t in daemon_tolerations() {
        tols.push(serde_json::to_value(t).unwrap_or_default());
    }
    spec["tolerations"] = json!(tols);
    let pod = Pod { metadata: meta, spec: serde_json::from_value(spec).ok(), status: None };
    match api.create(&PostParams::default(), &pod).await {
        Ok(p) => {
            recorder
                .record(
                    &reference(ds),
                    "Normal",
                    "SuccessfulCreate",
                    &format!("Created pod: {}", p.name_any()),
                )
                .await
        }
        Err(e) => {
            recorder
                .record(&reference(ds), "Warning", "FailedCreate", &format!("Error creating: {e}"))
                .await
        }
    }
}
