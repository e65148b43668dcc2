//! The controller manager against the real API server (in-process, no nodes): what users see
//! through the API once the loops have run.

use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use kube::api::PostParams;
use kube::{Api, Client};
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
