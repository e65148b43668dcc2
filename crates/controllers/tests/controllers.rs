//! The controller manager against the real API server (in-process, no nodes): what users see
//! through the API once the loops have run.

use std::time::Duration;

use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Node, Pod, Service, ServiceAccount};
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use kube::{Api, Client, ResourceExt};
use rkube_apiserver::testing::TestServer;
use serde_json::json;
use tokio_util::sync::CancellationToken;

struct Cluster {
    _server: TestServer,
    client: Client,
    stop: CancellationToken,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn cluster(config: rkube_controllers::Config) -> Cluster {
    let server = TestServer::start().await;
    let client = server.client().await;
    let stop = CancellationToken::new();
    tokio::spawn(rkube_controllers::run_with_client(client.clone(), config, stop.clone()));
    Cluster { _server: server, client, stop }
}

async fn eventually<T>(what: &str, limit: Duration, mut f: impl AsyncFnMut() -> Option<T>) -> T {
    let start = tokio::time::Instant::now();
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(start.elapsed() < limit, "timed out after {limit:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn a_deployment_whose_pods_never_become_ready_exceeds_its_progress_deadline() {
    let c = cluster(Default::default()).await;
    let deps: Api<Deployment> = Api::namespaced(c.client.clone(), "default");
    let d: Deployment = serde_json::from_value(json!({
        "metadata": {"name": "stuck"},
        "spec": {"replicas": 2, "progressDeadlineSeconds": 2,
                 "selector": {"matchLabels": {"app": "stuck"}},
                 "template": {"metadata": {"labels": {"app": "stuck"}},
                              "spec": {"containers": [{"name": "c", "image": "nginx"}]}}}
    }))
    .expect("deployment");
    deps.create(&PostParams::default(), &d).await.expect("create");
    // No node exists, so the pods stay Pending and nothing ever becomes ready.
    let cond = eventually("ProgressDeadlineExceeded", Duration::from_secs(20), async || {
        let d = deps.get("stuck").await.ok()?;
        d.status?.conditions?.into_iter().find(|c| {
            c.type_ == "Progressing" && c.reason.as_deref() == Some("ProgressDeadlineExceeded")
        })
    })
    .await;
    assert_eq!(cond.status, "False");
    assert_eq!(
        cond.message.as_deref(),
        Some(
            format!("ReplicaSet \"stuck-{}\" has timed out progressing.", hash_of(&deps).await)
                .as_str()
        )
    );
}

async fn hash_of(deps: &Api<Deployment>) -> String {
    let d = deps.get("stuck").await.expect("get");
    let rs: Api<k8s_openapi::api::apps::v1::ReplicaSet> =
        Api::namespaced(deps.clone().into_client(), "default");
    let list = rs.list(&Default::default()).await.expect("list");
    let owned = list
        .items
        .into_iter()
        .find(|r| {
            r.metadata
                .owner_references
                .iter()
                .flatten()
                .any(|o| Some(&o.uid) == d.metadata.uid.as_ref())
        })
        .expect("a ReplicaSet of the deployment");
    owned.metadata.labels.unwrap_or_default().get("pod-template-hash").cloned().unwrap_or_default()
}

#[tokio::test]
async fn every_namespace_gets_a_default_service_account_and_gets_it_back() {
    let c = cluster(Default::default()).await;
    let nss: Api<Namespace> = Api::all(c.client.clone());
    nss.create(&PostParams::default(), &named("later")).await.expect("namespace");
    for ns in ["default", "kube-system", "kube-public", "kube-node-lease", "later"] {
        let sas: Api<ServiceAccount> = Api::namespaced(c.client.clone(), ns);
        eventually(
            &format!("the default ServiceAccount of {ns}"),
            Duration::from_secs(10),
            async || sas.get_opt("default").await.ok().flatten(),
        )
        .await;
    }
    let sas: Api<ServiceAccount> = Api::namespaced(c.client.clone(), "later");
    sas.delete("default", &DeleteParams::default()).await.expect("delete");
    eventually("the default ServiceAccount to come back", Duration::from_secs(10), async || {
        sas.get_opt("default").await.ok().flatten()
    })
    .await;
}

fn named<K: serde::de::DeserializeOwned>(name: &str) -> K {
    serde_json::from_value(json!({"metadata": {"name": name}})).expect("object")
}

#[tokio::test]
async fn deleting_a_namespace_terminates_it_and_everything_in_it() {
    let c = cluster(Default::default()).await;
    let nss: Api<Namespace> = Api::all(c.client.clone());
    nss.create(&PostParams::default(), &named("shop")).await.expect("namespace");
    let deps: Api<Deployment> = Api::namespaced(c.client.clone(), "shop");
    let pods: Api<Pod> = Api::namespaced(c.client.clone(), "shop");
    let svcs: Api<Service> = Api::namespaced(c.client.clone(), "shop");
    let cms: Api<ConfigMap> = Api::namespaced(c.client.clone(), "shop");
    let rss: Api<ReplicaSet> = Api::namespaced(c.client.clone(), "shop");
    let sas: Api<ServiceAccount> = Api::namespaced(c.client.clone(), "shop");
    let d: Deployment = serde_json::from_value(json!({
        "metadata": {"name": "web"},
        "spec": {"replicas": 2, "selector": {"matchLabels": {"app": "web"}},
                 "template": {"metadata": {"labels": {"app": "web"}},
                              "spec": {"containers": [{"name": "c", "image": "nginx"}]}}}
    }))
    .expect("deployment");
    deps.create(&PostParams::default(), &d).await.expect("deployment");
    let svc: Service = serde_json::from_value(json!({
        "metadata": {"name": "web"},
        "spec": {"selector": {"app": "web"}, "ports": [{"port": 80}]}
    }))
    .expect("service");
    svcs.create(&PostParams::default(), &svc).await.expect("service");
    // A finalizer of someone else's holds the namespace in Terminating until it is released.
    let cm: ConfigMap = serde_json::from_value(
        json!({"metadata": {"name": "settings", "finalizers": ["example.com/hold"]}}),
    )
    .expect("configmap");
    cms.create(&PostParams::default(), &cm).await.expect("configmap");
    eventually("two pods", Duration::from_secs(10), async || {
        (pods.list(&Default::default()).await.ok()?.items.len() == 2).then_some(())
    })
    .await;
    eventually("the default ServiceAccount", Duration::from_secs(10), async || {
        sas.get_opt("default").await.ok().flatten()
    })
    .await;

    nss.delete("shop", &DeleteParams::default()).await.expect("delete namespace");
    let phase = |ns: &Namespace| ns.status.as_ref().and_then(|s| s.phase.clone());
    let ns = nss.get("shop").await.expect("still there while terminating");
    assert_eq!(phase(&ns).as_deref(), Some("Terminating"));
    eventually("the content to go", Duration::from_secs(15), async || {
        let empty = deps.list(&Default::default()).await.ok()?.items.is_empty()
            && rss.list(&Default::default()).await.ok()?.items.is_empty()
            && pods.list(&Default::default()).await.ok()?.items.is_empty()
            && svcs.list(&Default::default()).await.ok()?.items.is_empty()
            && sas.list(&Default::default()).await.ok()?.items.is_empty();
        empty.then_some(())
    })
    .await;
    let held = cms.get("settings").await.expect("the held configmap");
    assert!(held.metadata.deletion_timestamp.is_some());
    let ns = nss.get("shop").await.expect("held by the configmap's finalizer");
    assert_eq!(phase(&ns).as_deref(), Some("Terminating"));

    cms.patch(
        "settings",
        &PatchParams::default(),
        &Patch::Merge(&json!({"metadata": {"finalizers": null}})),
    )
    .await
    .expect("release");
    eventually("the namespace to be gone", Duration::from_secs(15), async || {
        nss.get_opt("shop").await.ok()?.is_none().then_some(())
    })
    .await;
    assert!(cms.list(&Default::default()).await.expect("list").items.is_empty());
}

fn pod_on(name: &str, node: &str) -> Pod {
    serde_json::from_value(json!({
        "metadata": {"name": name},
        "spec": {"nodeName": node, "containers": [{"name": "c", "image": "nginx"}]}
    }))
    .expect("pod")
}

fn fast_pod_gc(threshold: usize) -> rkube_controllers::Config {
    rkube_controllers::Config {
        terminated_pod_gc_threshold: threshold,
        pod_gc_period: Duration::from_millis(200),
        pod_gc_quarantine: Duration::from_secs(1),
        ..Default::default()
    }
}

#[tokio::test]
async fn pods_bound_to_a_node_that_is_gone_are_force_deleted() {
    let c = cluster(fast_pod_gc(100)).await;
    let nodes: Api<Node> = Api::all(c.client.clone());
    let pods: Api<Pod> = Api::namespaced(c.client.clone(), "default");
    nodes.create(&PostParams::default(), &named("doomed")).await.expect("node");
    nodes.create(&PostParams::default(), &named("alive")).await.expect("node");
    pods.create(&PostParams::default(), &pod_on("on-doomed", "doomed")).await.expect("pod");
    pods.create(&PostParams::default(), &pod_on("on-alive", "alive")).await.expect("pod");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(pods.get_opt("on-doomed").await.expect("get").is_some(), "the node still exists");

    nodes.delete("doomed", &DeleteParams::default()).await.expect("delete node");
    eventually("the orphaned pod to go", Duration::from_secs(10), async || {
        pods.get_opt("on-doomed").await.ok()?.is_none().then_some(())
    })
    .await;
    assert!(pods.get_opt("on-alive").await.expect("get").is_some());
}

#[tokio::test]
async fn terminated_pods_beyond_the_threshold_are_deleted_oldest_first() {
    let c = cluster(fast_pod_gc(2)).await;
    let nodes: Api<Node> = Api::all(c.client.clone());
    let pods: Api<Pod> = Api::namespaced(c.client.clone(), "default");
    nodes.create(&PostParams::default(), &named("n1")).await.expect("node");
    for name in ["done-1", "done-2", "done-3", "done-4"] {
        pods.create(&PostParams::default(), &pod_on(name, "n1")).await.expect("pod");
        // Creation timestamps have a resolution of a second; names break ties as upstream.
        pods.patch_status(
            name,
            &PatchParams::default(),
            &Patch::Merge(&json!({"status": {"phase": "Succeeded"}})),
        )
        .await
        .expect("finish the pod");
    }
    pods.create(&PostParams::default(), &pod_on("busy", "n1")).await.expect("pod");
    let left =
        eventually("two terminated pods to be collected", Duration::from_secs(10), async || {
            let mut names: Vec<String> = pods
                .list(&Default::default())
                .await
                .ok()?
                .items
                .iter()
                .map(|p| p.name_any())
                .collect();
            names.sort();
            (names.len() == 3).then_some(names)
        })
        .await;
    assert_eq!(left, ["busy", "done-3", "done-4"]);
}

/// A kubelet's heartbeat: Lease renewed and the Ready condition posted as True.
async fn heartbeat(client: &Client, node: &str) {
    let leases: Api<Lease> = Api::namespaced(client.clone(), "kube-node-lease");
    let now = k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime(jiff::Timestamp::now());
    let lease = json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                       "metadata": {"name": node},
                       "spec": {"holderIdentity": node, "leaseDurationSeconds": 40, "renewTime": now}});
    let _ = leases
        .patch(node, &PatchParams::apply("test-kubelet").force(), &Patch::Apply(&lease))
        .await;
    let nodes: Api<Node> = Api::all(client.clone());
    let status = json!({"status": {"conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady",
        "message": "kubelet is posting ready status", "lastHeartbeatTime": jiff::Timestamp::now().to_string(),
        "lastTransitionTime": jiff::Timestamp::now().to_string()}]}});
    let _ = nodes.patch_status(node, &PatchParams::default(), &Patch::Strategic(&status)).await;
}

fn lifecycle_taints(n: &Node) -> Vec<String> {
    let mut t: Vec<String> = n
        .spec
        .as_ref()
        .and_then(|s| s.taints.clone())
        .unwrap_or_default()
        .into_iter()
        .filter(|t| t.key.starts_with("node.kubernetes.io/"))
        .map(|t| format!("{}:{}", t.key, t.effect))
        .collect();
    t.sort();
    t
}

#[tokio::test]
async fn when_every_node_is_lost_no_node_gets_a_no_execute_taint_until_one_is_back() {
    let c = cluster(rkube_controllers::Config {
        node_monitor_grace_period: Duration::from_secs(2),
        ..Default::default()
    })
    .await;
    let nodes: Api<Node> = Api::all(c.client.clone());
    for n in ["a", "b"] {
        nodes.create(&PostParams::default(), &named(n)).await.expect("node");
        heartbeat(&c.client, n).await;
    }
    // Both kubelets fall silent: full disruption.
    eventually("both nodes unreachable", Duration::from_secs(15), async || {
        let a = nodes.get("a").await.ok()?;
        let b = nodes.get("b").await.ok()?;
        let want = ["node.kubernetes.io/unreachable:NoSchedule".to_string()];
        (lifecycle_taints(&a) == want && lifecycle_taints(&b) == want).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    for n in ["a", "b"] {
        let node = nodes.get(n).await.expect("node");
        assert_eq!(
            lifecycle_taints(&node),
            ["node.kubernetes.io/unreachable:NoSchedule"],
            "no NoExecute taint while every node is lost"
        );
    }
    // Node a comes back: the zone is out of full disruption and b is tainted NoExecute.
    let stop = CancellationToken::new();
    let beat = {
        let (client, stop) = (c.client.clone(), stop.clone());
        tokio::spawn(async move {
            while !stop.is_cancelled() {
                heartbeat(&client, "a").await;
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        })
    };
    eventually("b to get the NoExecute taint", Duration::from_secs(15), async || {
        let b = nodes.get("b").await.ok()?;
        let a = nodes.get("a").await.ok()?;
        (lifecycle_taints(&b)
            == [
                "node.kubernetes.io/unreachable:NoExecute",
                "node.kubernetes.io/unreachable:NoSchedule",
            ]
            && lifecycle_taints(&a).is_empty())
        .then_some(())
    })
    .await;
    stop.cancel();
    let _ = beat.await;
}

/// A kubelet's heartbeat at `at` on the controllers' clock: Lease renewed, Ready=True posted
/// with the node's capacity.
async fn heartbeat_at(client: &Client, node: &str, at: jiff::Timestamp) {
    let leases: Api<Lease> = Api::namespaced(client.clone(), "kube-node-lease");
    let lease = json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                       "metadata": {"name": node},
                       "spec": {"holderIdentity": node, "leaseDurationSeconds": 40,
                                "renewTime": k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime(at)}});
    leases
        .patch(node, &PatchParams::apply("test-kubelet").force(), &Patch::Apply(&lease))
        .await
        .expect("renew the lease");
    let nodes: Api<Node> = Api::all(client.clone());
    let res = json!({"cpu": "4", "memory": "8Gi", "pods": "110"});
    let status = json!({"status": {"capacity": res, "allocatable": res,
        "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady",
        "message": "kubelet is posting ready status", "lastHeartbeatTime": at.to_string(),
        "lastTransitionTime": at.to_string()}]}});
    nodes
        .patch_status(node, &PatchParams::default(), &Patch::Strategic(&status))
        .await
        .expect("post the node status");
}

/// (name, node, being deleted) of every pod of the namespace.
async fn placement(pods: &Api<Pod>) -> Vec<(String, String, bool)> {
    pods.list(&Default::default())
        .await
        .expect("list pods")
        .items
        .into_iter()
        .map(|p| {
            (
                p.name_any(),
                p.spec.and_then(|s| s.node_name).unwrap_or_default(),
                p.metadata.deletion_timestamp.is_some(),
            )
        })
        .collect()
}

/// Upstream's default failure timings (node-monitor-grace-period 50 s, the API server's default
/// not-ready/unreachable tolerations of 300 s) on a manual clock: the node is Unknown one second
/// after the grace period and not before, its pods are evicted when their toleration runs out and
/// not a second earlier, and the real scheduler puts their replacements on the surviving nodes.
#[tokio::test]
async fn with_upstream_timings_a_silent_node_is_lost_after_50_s_and_its_pods_move_after_300_s() {
    let start = jiff::Timestamp::from_second(jiff::Timestamp::now().as_second()).expect("now");
    let (clock, hand) = rkube_controllers::Clock::manual(start);
    let defaults = rkube_controllers::Config::default();
    assert_eq!(defaults.node_monitor_grace_period, Duration::from_secs(50));
    let c = cluster(rkube_controllers::Config {
        node_monitor_period: Duration::from_millis(20),
        clock,
        ..defaults
    })
    .await;
    tokio::spawn(rkube_scheduler::run_with_client(
        c.client.clone(),
        Default::default(),
        c.stop.clone(),
    ));
    let nodes: Api<Node> = Api::all(c.client.clone());
    let all = ["n1", "n2", "n3"];
    for n in all {
        nodes.create(&PostParams::default(), &named(n)).await.expect("node");
        heartbeat_at(&c.client, n, hand.now()).await;
    }
    let deps: Api<Deployment> = Api::namespaced(c.client.clone(), "default");
    let pods: Api<Pod> = Api::namespaced(c.client.clone(), "default");
    let d: Deployment = serde_json::from_value(json!({
        "metadata": {"name": "web"},
        "spec": {"replicas": 6, "selector": {"matchLabels": {"app": "web"}},
                 "template": {"metadata": {"labels": {"app": "web"}},
                              "spec": {"containers": [{"name": "c", "image": "nginx"}]}}}
    }))
    .expect("deployment");
    deps.create(&PostParams::default(), &d).await.expect("deployment");
    let placed = eventually("6 pods bound", Duration::from_secs(20), async || {
        let p = placement(&pods).await;
        (p.len() == 6 && p.iter().all(|(_, n, _)| !n.is_empty())).then_some(p)
    })
    .await;
    let on = |node: &str, p: &[(String, String, bool)]| p.iter().filter(|x| x.1 == node).count();
    let victim = *all.iter().max_by_key(|n| on(n, &placed)).expect("a node");
    let survivors: Vec<&str> = all.iter().copied().filter(|n| *n != victim).collect();
    let lost: Vec<String> = placed.iter().filter(|x| x.1 == victim).map(|x| x.0.clone()).collect();
    assert!(!lost.is_empty(), "{victim} holds pods: {placed:?}");
    let pod = pods.get(&lost[0]).await.expect("pod");
    let tolerations = pod.spec.and_then(|s| s.tolerations).unwrap_or_default();
    assert!(
        tolerations.iter().any(|t| t.key.as_deref() == Some("node.kubernetes.io/unreachable")
            && t.toleration_seconds == Some(300)),
        "the API server's default tolerations: {tolerations:?}"
    );

    // The victim's heartbeats stop at `start`; the others keep beating on the manual clock,
    // always before the clock moves so they never look silent.
    let step = async |by: u64| {
        let at = hand.now() + Duration::from_secs(by);
        for n in &survivors {
            heartbeat_at(&c.client, n, at).await;
        }
        hand.advance(Duration::from_secs(by));
        // Many controller passes (every 20 ms) see the new time.
        tokio::time::sleep(Duration::from_millis(400)).await;
    };
    step(50).await;
    assert_eq!(
        rkube_client::node_ready(&nodes.get(victim).await.expect("node")),
        "True",
        "at grace: not yet lost"
    );
    step(1).await;
    let lost_at = hand.now();
    let node =
        eventually("the victim Unknown at grace + 1 s", Duration::from_secs(10), async || {
            let n = nodes.get(victim).await.ok()?;
            (rkube_client::node_ready(&n) == "Unknown" && lifecycle_taints(&n).len() == 2)
                .then_some(n)
        })
        .await;
    assert_eq!(
        lifecycle_taints(&node),
        ["node.kubernetes.io/unreachable:NoExecute", "node.kubernetes.io/unreachable:NoSchedule"]
    );
    let added = node
        .spec
        .and_then(|s| s.taints)
        .unwrap_or_default()
        .into_iter()
        .find(|t| t.effect == "NoExecute")
        .and_then(|t| t.time_added)
        .expect("timeAdded");
    assert_eq!(added.0.as_second(), lost_at.as_second(), "tainted when found lost");
    for n in &survivors {
        assert_eq!(
            rkube_client::node_ready(&nodes.get(n).await.expect("node")),
            "True",
            "{n} keeps beating"
        );
    }

    step(299).await;
    let p = placement(&pods).await;
    assert_eq!(p.len(), 6, "nothing evicted 299 s after the taint: {p:?}");
    assert!(p.iter().all(|x| !x.2), "nothing evicted 299 s after the taint: {p:?}");
    step(1).await;
    let p = eventually("replacements on the survivors", Duration::from_secs(20), async || {
        let p = placement(&pods).await;
        let live: Vec<_> = p.iter().filter(|x| !x.2).collect();
        (live.len() == 6 && live.iter().all(|x| survivors.contains(&x.1.as_str()))).then_some(p)
    })
    .await;
    for name in &lost {
        let gone = p.iter().find(|x| x.0 == *name);
        assert!(gone.is_none_or(|x| x.2), "{name} was evicted: {p:?}");
    }
}

#[tokio::test]
async fn a_controller_manager_that_lost_its_lease_stops_until_it_leads_again() {
    let config =
        rkube_controllers::Config { lease_duration: Duration::from_secs(3), ..Default::default() };
    let c = cluster(config).await;
    let nss: Api<Namespace> = Api::all(c.client.clone());
    let sa_of = |ns: &str| {
        let sas: Api<ServiceAccount> = Api::namespaced(c.client.clone(), ns);
        async move { sas.get_opt("default").await.ok().flatten() }
    };
    nss.create(&PostParams::default(), &named("before")).await.expect("namespace");
    eventually("the controllers working", Duration::from_secs(10), async || sa_of("before").await)
        .await;
    // Another controller manager takes the lease (as if ours had missed its renewals).
    let leases: Api<Lease> = Api::namespaced(c.client.clone(), "kube-system");
    let ours = leases.get("kube-controller-manager").await.unwrap().spec.unwrap().holder_identity;
    let steal = async || {
        let take = json!({"spec": {"holderIdentity": "intruder", "renewTime": rkube_client::now_micro(), "leaseDurationSeconds": 3}});
        leases
            .patch("kube-controller-manager", &PatchParams::default(), &Patch::Merge(&take))
            .await
            .unwrap();
    };
    steal().await;
    // Ours notices at its next renewal (every 0.6 s).
    tokio::time::sleep(Duration::from_millis(1500)).await;
    nss.create(&PostParams::default(), &named("during")).await.expect("namespace");
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        steal().await;
        assert!(sa_of("during").await.is_none(), "a controller manager without the lease acted");
    }
    // The intruder goes away; once its lease expires, ours leads and works again.
    eventually("the controllers working again", Duration::from_secs(15), async || {
        sa_of("during").await
    })
    .await;
    let holder = leases.get("kube-controller-manager").await.unwrap().spec.unwrap().holder_identity;
    assert_eq!(holder, ours);
}

/// A node that registered but has not posted its status yet (a kubelet between its create and
/// its first status patch) is left alone for the startup grace, as upstream does; only then is
/// it marked Unknown (NodeStatusNeverUpdated) and tainted.
#[tokio::test]
async fn a_node_that_never_posted_its_status_gets_the_startup_grace_then_is_unknown() {
    let c = cluster(rkube_controllers::Config {
        node_monitor_grace_period: Duration::from_secs(1),
        node_startup_grace_period: Duration::from_secs(4),
        ..Default::default()
    })
    .await;
    let nodes: Api<Node> = Api::all(c.client.clone());
    // A healthy neighbour, so the zone is not fully disrupted.
    nodes.create(&PostParams::default(), &named("alive")).await.expect("node");
    let stop = CancellationToken::new();
    let beat = {
        let (client, stop) = (c.client.clone(), stop.clone());
        tokio::spawn(async move {
            while !stop.is_cancelled() {
                heartbeat(&client, "alive").await;
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        })
    };
    let created = tokio::time::Instant::now();
    nodes.create(&PostParams::default(), &named("fresh")).await.expect("node");
    while created.elapsed() < Duration::from_millis(2500) {
        let fresh = nodes.get("fresh").await.expect("node");
        assert!(lifecycle_taints(&fresh).is_empty(), "tainted within the startup grace");
        assert_eq!(rkube_client::node_ready(&fresh), "", "marked within the startup grace");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let fresh = eventually("the silent new node Unknown", Duration::from_secs(10), async || {
        let n = nodes.get("fresh").await.ok()?;
        (rkube_client::node_ready(&n) == "Unknown"
            && lifecycle_taints(&n)
                == [
                    "node.kubernetes.io/unreachable:NoExecute",
                    "node.kubernetes.io/unreachable:NoSchedule",
                ])
        .then_some(n)
    })
    .await;
    assert!(created.elapsed() >= Duration::from_secs(4), "before the startup grace ended");
    let ready = fresh.status.unwrap().conditions.unwrap().into_iter().find(|c| c.type_ == "Ready");
    let ready = ready.unwrap();
    assert_eq!(ready.reason.as_deref(), Some("NodeStatusNeverUpdated"));
    assert_eq!(ready.message.as_deref(), Some("Kubelet never posted node status."));
    let alive = nodes.get("alive").await.expect("node");
    assert!(lifecycle_taints(&alive).is_empty(), "{:?}", lifecycle_taints(&alive));
    stop.cancel();
    let _ = beat.await;
}

/// Pods of the ReplicaSet `rs` that are not being deleted.
async fn live_pods(pods: &Api<Pod>, rs: &str) -> usize {
    let list = pods.list(&Default::default()).await.expect("pods");
    list.items
        .iter()
        .filter(|p| {
            p.metadata.deletion_timestamp.is_none()
                && p.owner_references().iter().any(|o| o.name == rs && o.controller == Some(true))
        })
        .count()
}

#[tokio::test]
async fn a_replicaset_creates_exactly_its_replicas_in_batches_and_scales_down_exactly() {
    let c = cluster(Default::default()).await;
    let rss: Api<ReplicaSet> = Api::namespaced(c.client.clone(), "default");
    let pods: Api<Pod> = Api::namespaced(c.client.clone(), "default");
    let rs: ReplicaSet = serde_json::from_value(json!({
        "metadata": {"name": "many"},
        "spec": {"replicas": 300, "selector": {"matchLabels": {"app": "many"}},
                 "template": {"metadata": {"labels": {"app": "many"}},
                              "spec": {"containers": [{"name": "c", "image": "nginx"}]}}}
    }))
    .expect("replicaset");
    rss.create(&PostParams::default(), &rs).await.expect("replicaset");
    eventually("300 pods", Duration::from_secs(60), async || {
        (live_pods(&pods, "many").await >= 300).then_some(())
    })
    .await;
    // Later passes (the informer catching up, resyncs) never add to them.
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert_eq!(live_pods(&pods, "many").await, 300, "never more pods than replicas");
    eventually("status.replicas 300", Duration::from_secs(30), async || {
        let rs = rss.get("many").await.ok()?;
        (rs.status?.replicas == 300).then_some(())
    })
    .await;
    // The creates' events as upstream's correlator leaves them: nine of their own, the rest
    // combined into one, and 25 in all (the spam filter's burst per object) however many pods.
    let events: Api<k8s_openapi::api::core::v1::Event> =
        Api::namespaced(c.client.clone(), "default");
    let mut created: Vec<(String, i32)> = Vec::new();
    eventually("25 SuccessfulCreate counted", Duration::from_secs(10), async || {
        created = events
            .list(&Default::default())
            .await
            .ok()?
            .items
            .into_iter()
            .filter(|e| {
                e.reason.as_deref() == Some("SuccessfulCreate")
                    && e.involved_object.name.as_deref() == Some("many")
            })
            .map(|e| (e.message.unwrap_or_default(), e.count.unwrap_or(0)))
            .collect();
        (created.iter().map(|(_, n)| n).sum::<i32>() == 25).then_some(())
    })
    .await;
    assert_eq!(created.len(), 10, "{created:?}");
    let combined: Vec<_> = created
        .iter()
        .filter(|(m, _)| m.starts_with("(combined from similar events): Created pod: many-"))
        .collect();
    assert_eq!(combined.len(), 1, "{created:?}");
    assert_eq!(combined[0].1, 16, "{created:?}");

    rss.patch("many", &PatchParams::default(), &Patch::Merge(json!({"spec": {"replicas": 20}})))
        .await
        .expect("scale down");
    eventually("20 pods", Duration::from_secs(60), async || {
        (live_pods(&pods, "many").await == 20).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert_eq!(live_pods(&pods, "many").await, 20, "never fewer pods than replicas");
}
