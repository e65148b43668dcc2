//! Garbage collection through the real API server: foreground deletion removes dependents
//! before their owner (leaves first), orphaning strips ownerReferences instead.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet};
use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams, WatchEvent, WatchParams};
use kube::{Api, Client, Resource, ResourceExt};
use rkube_apiserver::testing::TestServer;
use serde::de::DeserializeOwned;
use serde_json::json;

fn owner<K: Resource<DynamicType = ()>>(o: &K, block: bool) -> OwnerReference {
    OwnerReference {
        api_version: K::api_version(&()).into(),
        kind: K::kind(&()).into(),
        name: o.meta().name.clone().unwrap_or_default(),
        uid: o.meta().uid.clone().unwrap_or_default(),
        controller: Some(true),
        block_owner_deletion: Some(block),
    }
}

async fn create<K>(client: &Client, v: serde_json::Value) -> K
where
    K: Resource<DynamicType = (), Scope = kube::core::NamespaceResourceScope>
        + Clone
        + DeserializeOwned
        + serde::Serialize
        + std::fmt::Debug,
{
    let api: Api<K> = Api::namespaced(client.clone(), "default");
    let obj: K = serde_json::from_value(v).expect("valid object");
    api.create(&PostParams::default(), &obj).await.expect("create")
}

/// Records the name of every object of kind K deleted from now on, into `log` in order.
async fn record_deletes<K>(client: &Client, log: Arc<Mutex<Vec<String>>>)
where
    K: Resource<DynamicType = (), Scope = kube::core::NamespaceResourceScope>
        + Clone
        + DeserializeOwned
        + std::fmt::Debug
        + Send
        + 'static,
{
    let api: Api<K> = Api::namespaced(client.clone(), "default");
    let rv = api.list_metadata(&Default::default()).await.expect("list").metadata.resource_version;
    let mut stream =
        api.watch(&WatchParams::default(), &rv.unwrap_or_default()).await.expect("watch").boxed();
    tokio::spawn(async move {
        while let Ok(Some(ev)) = stream.try_next().await {
            if let WatchEvent::Deleted(o) = ev {
                log.lock().expect("log").push(format!("{}/{}", K::kind(&()), o.name_any()));
            }
        }
    });
}

async fn wait_for(what: &str, mut f: impl AsyncFnMut() -> bool) {
    for _ in 0..200 {
        if f().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out waiting for {what}");
}

#[tokio::test]
async fn foreground_deletion_removes_blocking_dependents_before_the_owner() {
    let ts = TestServer::start().await;
    let client = ts.client().await;
    let deps: Api<Deployment> = Api::namespaced(client.clone(), "default");
    let rss: Api<ReplicaSet> = Api::namespaced(client.clone(), "default");
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
    let labels = json!({"app": "web"});
    let template = json!({"metadata": {"labels": labels}, "spec": {"containers": [{"name": "c", "image": "nginx"}]}});
    let d: Deployment = create(
        &client,
        json!({"metadata": {"name": "web"}, "spec": {"selector": {"matchLabels": labels}, "template": template}}),
    )
    .await;
    let rs: ReplicaSet = create(
        &client,
        json!({"metadata": {"name": "web-1", "ownerReferences": [owner(&d, true)]},
               "spec": {"replicas": 1, "selector": {"matchLabels": labels}, "template": template}}),
    )
    .await;
    // The pod holds on with a finalizer of its own, so the test decides when it is gone.
    let _pod: Pod = create(
        &client,
        json!({"metadata": {"name": "web-1-a", "labels": labels, "finalizers": ["example.com/hold"],
                            "ownerReferences": [owner(&rs, true)]},
               "spec": {"containers": [{"name": "c", "image": "nginx"}]}}),
    )
    .await;
    // A dependent that does not block its owner: deleted, but not waited for.
    let _cm: ConfigMap = create(
        &client,
        json!({"metadata": {"name": "web-note", "finalizers": ["example.com/hold"],
                            "ownerReferences": [owner(&d, false)]}}),
    )
    .await;
    let log = Arc::new(Mutex::new(Vec::new()));
    record_deletes::<Deployment>(&client, log.clone()).await;
    record_deletes::<ReplicaSet>(&client, log.clone()).await;
    record_deletes::<Pod>(&client, log.clone()).await;

    let answer = deps.delete("web", &DeleteParams::foreground()).await.expect("delete");
    let left = answer.left().expect("the owner is returned, not yet gone");
    assert!(left.metadata.deletion_timestamp.is_some());
    assert!(left.finalizers().iter().any(|f| f == "foregroundDeletion"));

    wait_for("the dependents to be deleted", async || {
        let pod = pods.get("web-1-a").await.expect("pod");
        let cm = cms.get("web-note").await.expect("configmap");
        pod.metadata.deletion_timestamp.is_some() && cm.metadata.deletion_timestamp.is_some()
    })
    .await;
    // The pod blocks the ReplicaSet, which blocks the Deployment: both stay readable.
    tokio::time::sleep(Duration::from_millis(800)).await;
    let d = deps.get("web").await.expect("owner still readable");
    assert!(d.metadata.deletion_timestamp.is_some());
    let rs = rss.get("web-1").await.expect("replicaset still readable");
    assert!(rs.finalizers().iter().any(|f| f == "foregroundDeletion"), "{:?}", rs.metadata);
    assert!(log.lock().expect("log").is_empty());

    pods.patch(
        "web-1-a",
        &PatchParams::default(),
        &Patch::Merge(&json!({"metadata": {"finalizers": null}})),
    )
    .await
    .expect("release the pod");
    wait_for("the owner to be gone", async || deps.get_opt("web").await.expect("get").is_none())
        .await;
    wait_for("three deletions", async || log.lock().expect("log").len() == 3).await;
    assert_eq!(
        *log.lock().expect("log"),
        ["Pod/web-1-a", "ReplicaSet/web-1", "Deployment/web"],
        "dependents go before their owners"
    );
    // The non-blocking dependent is still finalizing, and did not hold the owner back.
    assert!(cms.get("web-note").await.expect("configmap").metadata.deletion_timestamp.is_some());
}

#[tokio::test]
async fn foreground_deletion_of_an_owner_without_dependents_finishes_at_once() {
    let ts = TestServer::start().await;
    let client = ts.client().await;
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
    let _: ConfigMap = create(&client, json!({"metadata": {"name": "lonely"}})).await;
    cms.delete("lonely", &DeleteParams::foreground()).await.expect("delete");
    wait_for("the object to be gone", async || cms.get_opt("lonely").await.expect("get").is_none())
        .await;
}

#[tokio::test]
async fn orphan_deletion_keeps_dependents_and_strips_their_owner_references() {
    let ts = TestServer::start().await;
    let client = ts.client().await;
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
    let parent: ConfigMap = create(&client, json!({"metadata": {"name": "parent"}})).await;
    let _: ConfigMap = create(
        &client,
        json!({"metadata": {"name": "child", "ownerReferences": [owner(&parent, true)]}}),
    )
    .await;
    cms.delete("parent", &DeleteParams::orphan()).await.expect("delete");
    wait_for("the owner reference to go", async || {
        cms.get("child").await.expect("child stays").metadata.owner_references.is_none()
    })
    .await;
    assert!(cms.get_opt("parent").await.expect("get").is_none());
}

#[tokio::test]
async fn background_deletion_removes_dependents_after_the_owner() {
    let ts = TestServer::start().await;
    let client = ts.client().await;
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
    let parent: ConfigMap = create(&client, json!({"metadata": {"name": "parent"}})).await;
    let _: ConfigMap = create(
        &client,
        json!({"metadata": {"name": "child", "ownerReferences": [owner(&parent, true)]}}),
    )
    .await;
    let answer = cms.delete("parent", &DeleteParams::background()).await.expect("delete");
    assert!(answer.is_right() || cms.get_opt("parent").await.expect("get").is_none());
    wait_for("the dependent to go", async || cms.get_opt("child").await.expect("get").is_none())
        .await;
}
