//! The scheduler against a real API server in-process: refusals with upstream's text,
//! taints, anti-affinity, default spreading, scheduling gates, and preemption that respects
//! PodDisruptionBudgets.

use std::time::Duration;

use k8s_openapi::api::core::v1::{Event, Node, Pod};
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Api, Client};
use rkube_apiserver::testing::TestServer;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

struct Env {
    _server: TestServer,
    client: Client,
    stop: CancellationToken,
}

impl Drop for Env {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn start() -> Env {
    let server = TestServer::start().await;
    let client = server.client().await;
    let stop = CancellationToken::new();
    tokio::spawn(rkube_scheduler::run_with_client(
        client.clone(),
        rkube_scheduler::Config { lease_duration: Duration::from_secs(2), ..Default::default() },
        stop.clone(),
    ));
    Env { _server: server, client, stop }
}

async fn node(c: &Client, name: &str, alloc: Value, extra: Value) {
    let nodes: Api<Node> = Api::all(c.clone());
    let mut n = json!({"metadata": {"name": name, "labels": {"kubernetes.io/hostname": name}}});
    if let Some(o) = extra.as_object() {
        for (k, v) in o {
            n[k] = v.clone();
        }
    }
    if let Some(extra_labels) = extra["labels"].as_object() {
        for (k, v) in extra_labels {
            n["metadata"]["labels"][k] = v.clone();
        }
    }
    n.as_object_mut().unwrap().remove("labels");
    nodes.create(&PostParams::default(), &serde_json::from_value(n).unwrap()).await.unwrap();
    let status = json!({"status": {"allocatable": alloc, "capacity": alloc,
        "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady", "message": "test"}]}});
    nodes.patch_status(name, &PatchParams::default(), &Patch::Merge(&status)).await.unwrap();
}

fn cpu(n: &str) -> Value {
    json!({"cpu": n, "memory": "8Gi", "pods": "110"})
}

async fn pod(c: &Client, name: &str, spec: Value, meta: Value) -> Pod {
    let pods: Api<Pod> = Api::namespaced(c.clone(), "default");
    let mut p = json!({"metadata": {"name": name}, "spec": {"terminationGracePeriodSeconds": 0,
        "containers": [{"name": "c", "image": "busybox"}]}});
    for (k, v) in spec.as_object().unwrap() {
        p["spec"][k] = v.clone();
    }
    for (k, v) in meta.as_object().unwrap() {
        p["metadata"][k] = v.clone();
    }
    pods.create(&PostParams::default(), &serde_json::from_value(p).unwrap()).await.unwrap()
}

fn requests(cpu: &str) -> Value {
    json!([{"name": "c", "image": "busybox", "resources": {"requests": {"cpu": cpu}}}])
}

async fn wait<T, F, Fut>(what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    for _ in 0..300 {
        if let Some(v) = f().await {
            return v;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("timed out waiting for {what}");
}

async fn get(c: &Client, name: &str) -> Pod {
    Api::<Pod>::namespaced(c.clone(), "default").get(name).await.unwrap()
}

async fn node_of(c: &Client, name: &str) -> Option<String> {
    get(c, name).await.spec.and_then(|s| s.node_name)
}

fn condition(p: &Pod) -> Option<(String, String, String)> {
    p.status.as_ref()?.conditions.as_ref()?.iter().find(|c| c.type_ == "PodScheduled").map(|c| {
        (
            c.status.clone(),
            c.reason.clone().unwrap_or_default(),
            c.message.clone().unwrap_or_default(),
        )
    })
}

async fn events(c: &Client, reason: &str) -> Vec<Event> {
    let evs: Api<Event> = Api::namespaced(c.clone(), "default");
    evs.list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|e| e.reason.as_deref() == Some(reason))
        .collect()
}

#[tokio::test]
async fn a_gpu_pod_waits_with_upstreams_message_until_a_gpu_node_joins() {
    let env = start().await;
    for i in 0..10 {
        node(&env.client, &format!("cpu-{i}"), cpu("4"), json!({})).await;
    }
    pod(
        &env.client,
        "trainer",
        json!({"containers": [{"name": "c", "image": "busybox", "resources": {"limits": {"nvidia.com/gpu": 1}}}]}),
        json!({}),
    )
    .await;
    let want = "0/10 nodes are available: 10 Insufficient nvidia.com/gpu. preemption: 0/10 nodes are available: 10 No preemption victims found for incoming pod.";
    let (status, reason, message) = wait("the FailedScheduling condition", || async {
        condition(&get(&env.client, "trainer").await)
    })
    .await;
    assert_eq!(
        (status.as_str(), reason.as_str(), message.as_str()),
        ("False", "Unschedulable", want)
    );
    let ev = wait("the FailedScheduling event", || async {
        events(&env.client, "FailedScheduling").await.into_iter().next()
    })
    .await;
    assert_eq!(ev.type_.as_deref(), Some("Warning"));
    assert_eq!(ev.message.as_deref(), Some(want));
    assert_eq!(ev.source.and_then(|s| s.component).as_deref(), Some("default-scheduler"));
    node(
        &env.client,
        "gpu-1",
        json!({"cpu": "4", "memory": "8Gi", "pods": "110", "nvidia.com/gpu": "1"}),
        json!({}),
    )
    .await;
    let n =
        wait("the GPU pod to be bound", || async { node_of(&env.client, "trainer").await }).await;
    assert_eq!(n, "gpu-1");
}

#[tokio::test]
async fn untolerated_taints_keep_pods_off_and_tolerations_let_them_on() {
    let env = start().await;
    let taint =
        json!({"spec": {"taints": [{"key": "dedicated", "value": "db", "effect": "NoSchedule"}]}});
    node(&env.client, "tainted", cpu("4"), taint).await;
    node(&env.client, "plain", cpu("1"), json!({})).await;
    for i in 0..3 {
        pod(&env.client, &format!("app-{i}"), json!({}), json!({})).await;
    }
    for i in 0..3 {
        let n = wait("app pod bound", || async { node_of(&env.client, &format!("app-{i}")).await })
            .await;
        assert_eq!(n, "plain");
    }
    pod(
        &env.client,
        "db",
        json!({"tolerations": [{"key": "dedicated", "operator": "Equal", "value": "db", "effect": "NoSchedule"}],
               "nodeSelector": {"kubernetes.io/hostname": "tainted"}}),
        json!({}),
    )
    .await;
    assert_eq!(wait("db bound", || async { node_of(&env.client, "db").await }).await, "tainted");
    // Without the toleration and nowhere else to go: refused with upstream's reasons.
    pod(
        &env.client,
        "stray",
        json!({"nodeSelector": {"kubernetes.io/hostname": "tainted"}}),
        json!({}),
    )
    .await;
    let (_, _, msg) =
        wait("stray refused", || async { condition(&get(&env.client, "stray").await) }).await;
    assert_eq!(
        msg,
        "0/2 nodes are available: 1 node(s) didn't match Pod's node affinity/selector, 1 node(s) had untolerated taint(s). preemption: 0/2 nodes are available: 2 Preemption is not helpful for scheduling."
    );
}

#[tokio::test]
async fn required_anti_affinity_spreads_three_replicas_over_three_nodes() {
    let env = start().await;
    for i in 0..3 {
        node(&env.client, &format!("n{i}"), cpu("8"), json!({})).await;
    }
    let anti = json!({"affinity": {"podAntiAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [
        {"labelSelector": {"matchLabels": {"app": "web"}}, "topologyKey": "kubernetes.io/hostname"}]}}});
    for i in 0..4 {
        pod(&env.client, &format!("web-{i}"), anti.clone(), json!({"labels": {"app": "web"}}))
            .await;
    }
    let mut placed = Vec::new();
    let mut pending = Vec::new();
    for i in 0..4 {
        let name = format!("web-{i}");
        let got = wait("web pod bound or refused", || async {
            let p = get(&env.client, &name).await;
            if let Some(n) = p.spec.as_ref().and_then(|s| s.node_name.clone()) {
                return Some(Ok(n));
            }
            condition(&p).map(|(_, _, m)| Err(m))
        })
        .await;
        match got {
            Ok(n) => placed.push(n),
            Err(m) => pending.push(m),
        }
    }
    placed.sort();
    assert_eq!(placed, vec!["n0", "n1", "n2"]);
    assert_eq!(
        pending,
        vec!["0/3 nodes are available: 3 node(s) didn't match pod anti-affinity rules. preemption: 0/3 nodes are available: 3 Preemption is not helpful for scheduling.".to_string()]
    );
}

#[tokio::test]
async fn replicas_spread_over_nodes_by_default_even_when_one_node_is_roomier() {
    let env = start().await;
    // LeastAllocated alone puts every replica on the big node.
    node(&env.client, "big", json!({"cpu": "64", "memory": "256Gi", "pods": "110"}), json!({}))
        .await;
    node(&env.client, "small", json!({"cpu": "4", "memory": "4Gi", "pods": "110"}), json!({}))
        .await;
    let rs: Api<k8s_openapi::api::apps::v1::ReplicaSet> =
        Api::namespaced(env.client.clone(), "default");
    let created = rs
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": "web"}, "spec": {"replicas": 0,
                "selector": {"matchLabels": {"app": "web"}},
                "template": {"metadata": {"labels": {"app": "web"}}, "spec": {"containers": [{"name": "c", "image": "busybox"}]}}}}))
            .unwrap(),
        )
        .await
        .unwrap();
    let owner = json!([{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "web",
        "uid": created.metadata.uid, "controller": true}]);
    // Let the scheduler's ReplicaSet watch see it before the replicas arrive.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let res = json!([{"name": "c", "image": "busybox", "resources": {"requests": {"cpu": "100m", "memory": "100Mi"}}}]);
    let mut on_small = 0;
    for i in 0..6 {
        let name = format!("web-{i}");
        pod(
            &env.client,
            &name,
            json!({"containers": res}),
            json!({"labels": {"app": "web"}, "ownerReferences": owner}),
        )
        .await;
        // One at a time, so each decision sees the replicas before it.
        let n = wait("replica bound", || async { node_of(&env.client, &name).await }).await;
        on_small += usize::from(n == "small");
    }
    assert!((2..=4).contains(&on_small), "{on_small} of 6 replicas on the small node");
    // A lone pod (no controller, no Service) is not spread: it goes to the roomier node.
    pod(&env.client, "lone", json!({"containers": res}), json!({"labels": {"app": "web"}})).await;
    assert_eq!(wait("lone bound", || async { node_of(&env.client, "lone").await }).await, "big");
}

#[tokio::test]
async fn a_gated_pod_stays_pending_until_its_gates_are_removed() {
    let env = start().await;
    node(&env.client, "n1", cpu("4"), json!({})).await;
    pod(
        &env.client,
        "gated",
        json!({"schedulingGates": [{"name": "example.com/quota"}]}),
        json!({}),
    )
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let p = get(&env.client, "gated").await;
    assert!(p.spec.as_ref().unwrap().node_name.is_none());
    assert_eq!(
        condition(&p),
        Some((
            "False".into(),
            "SchedulingGated".into(),
            "Scheduling is blocked due to non-empty scheduling gates".into()
        ))
    );
    let pods: Api<Pod> = Api::namespaced(env.client.clone(), "default");
    pods.patch(
        "gated",
        &PatchParams::default(),
        &Patch::Merge(&json!({"spec": {"schedulingGates": null}})),
    )
    .await
    .unwrap();
    assert_eq!(
        wait("ungated pod bound", || async { node_of(&env.client, "gated").await }).await,
        "n1"
    );
}

#[tokio::test]
async fn preemption_takes_the_victim_no_disruption_budget_protects() {
    let env = start().await;
    let pcs: Api<k8s_openapi::api::scheduling::v1::PriorityClass> = Api::all(env.client.clone());
    for (name, value) in [("low", 10), ("high", 1000)] {
        pcs.create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": name}, "value": value})).unwrap(),
        )
        .await
        .unwrap();
    }
    node(&env.client, "n1", cpu("2"), json!({})).await;
    node(&env.client, "n2", cpu("2"), json!({})).await;
    // One low-priority pod fills each node; the one on n1 is protected by a PDB.
    pod(
        &env.client,
        "guarded",
        json!({"priorityClassName": "low", "containers": requests("1500m"),
        "nodeSelector": {"kubernetes.io/hostname": "n1"}}),
        json!({"labels": {"app": "db"}}),
    )
    .await;
    pod(
        &env.client,
        "spare",
        json!({"priorityClassName": "low", "containers": requests("1500m"),
        "nodeSelector": {"kubernetes.io/hostname": "n2"}}),
        json!({"labels": {"app": "batch"}}),
    )
    .await;
    wait("guarded bound", || async { node_of(&env.client, "guarded").await }).await;
    wait("spare bound", || async { node_of(&env.client, "spare").await }).await;
    let pdbs: Api<k8s_openapi::api::policy::v1::PodDisruptionBudget> =
        Api::namespaced(env.client.clone(), "default");
    pdbs.create(
        &PostParams::default(),
        &serde_json::from_value(json!({"metadata": {"name": "db"},
        "spec": {"minAvailable": 1, "selector": {"matchLabels": {"app": "db"}}}}))
        .unwrap(),
    )
    .await
    .unwrap();
    // What the disruption controller would report for one healthy pod and minAvailable 1.
    pdbs.patch_status("db", &PatchParams::default(), &Patch::Merge(&json!({"status": {
        "disruptionsAllowed": 0, "currentHealthy": 1, "desiredHealthy": 1, "expectedPods": 1, "observedGeneration": 1}})))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let urgent = pod(
        &env.client,
        "urgent",
        json!({"priorityClassName": "high", "containers": requests("1")}),
        json!({}),
    )
    .await;
    let n = wait("urgent bound", || async { node_of(&env.client, "urgent").await }).await;
    assert_eq!(n, "n2");
    // The victim is gone with upstream's event; the guarded pod is untouched.
    let pods: Api<Pod> = Api::namespaced(env.client.clone(), "default");
    assert!(pods.get_opt("spare").await.unwrap().is_none());
    assert!(
        pods.get_opt("guarded")
            .await
            .unwrap()
            .is_some_and(|p| p.metadata.deletion_timestamp.is_none())
    );
    let ev = wait("the Preempted event", || async {
        events(&env.client, "Preempted").await.into_iter().next()
    })
    .await;
    assert_eq!(ev.involved_object.name.as_deref(), Some("spare"));
    assert_eq!(
        ev.message.unwrap(),
        format!("Preempted by pod {} on node n2", urgent.metadata.uid.unwrap())
    );
    // The preemptor was nominated to the node before it was bound there.
    let failed = events(&env.client, "FailedScheduling").await;
    assert!(
        failed
            .iter()
            .any(|e| e.message.as_deref() == Some("0/2 nodes are available: 2 Insufficient cpu.")),
        "{:?}",
        failed.iter().map(|e| e.message.clone()).collect::<Vec<_>>()
    );
    let _ = pods.delete("urgent", &DeleteParams::default()).await;
}

#[tokio::test]
async fn only_the_lease_holder_schedules_and_a_lost_lease_stops_scheduling() {
    let env = start().await;
    node(&env.client, "n1", cpu("4"), json!({})).await;
    pod(&env.client, "first", json!({}), json!({})).await;
    wait("first bound", || async { node_of(&env.client, "first").await }).await;
    let leases: Api<k8s_openapi::api::coordination::v1::Lease> =
        Api::namespaced(env.client.clone(), "kube-system");
    let lease = leases.get("kube-scheduler").await.unwrap();
    let ours = lease.spec.as_ref().and_then(|s| s.holder_identity.clone()).unwrap();
    // Another scheduler takes the lease (as if ours had missed its renewals): ours must stop.
    let take = |who: &str| json!({"spec": {"holderIdentity": who, "renewTime": rkube_client::now_micro(), "leaseDurationSeconds": 3}});
    leases
        .patch("kube-scheduler", &PatchParams::default(), &Patch::Merge(&take("intruder")))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(800)).await;
    pod(&env.client, "second", json!({}), json!({})).await;
    // The intruder renews for a while; nothing binds the pod meanwhile.
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        leases
            .patch("kube-scheduler", &PatchParams::default(), &Patch::Merge(&take("intruder")))
            .await
            .unwrap();
        assert!(
            node_of(&env.client, "second").await.is_none(),
            "a scheduler without the lease bound a pod"
        );
    }
    // The intruder goes away; once its lease expires ours leads again and schedules.
    assert_eq!(wait("second bound", || async { node_of(&env.client, "second").await }).await, "n1");
    let holder = leases.get("kube-scheduler").await.unwrap().spec.and_then(|s| s.holder_identity);
    assert_eq!(holder.as_deref(), Some(ours.as_str()));
}

/// The scheduler watches StatefulSets (their selectors spread pods) but this API server does not
/// serve them: it looks again once a minute, not at the watch back-off's pace.
#[tokio::test]
async fn a_resource_the_server_does_not_serve_is_not_polled() {
    let env = start().await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let req = http::Request::get("/metrics").body(Vec::new()).unwrap();
    let metrics = env.client.request_text(req).await.expect("metrics");
    let lists: f64 = metrics
        .lines()
        .filter(|l| {
            l.starts_with("apiserver_request_total{")
                && l.contains(r#"resource="statefulsets""#)
                && l.contains(r#"verb="LIST""#)
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert!((1.0..=2.0).contains(&lists), "{lists} LISTs of statefulsets in 5 s");
}
