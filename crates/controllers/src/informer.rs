//! Shared informers: one watch per resource kind feeding an in-memory store, and a change
//! counter each controller waits on, so loops react to events instead of polling.

use std::time::Duration;

use k8s_openapi::api::apps::v1::{DaemonSet, Deployment, ReplicaSet};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Namespace, Node, Pod, Service, ServiceAccount};
use kube::runtime::reflector::{self, Store};
use kube::runtime::watcher;
use kube::{Api, Client};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

#[derive(Clone)]
pub struct Informers {
    pub pods: Store<Pod>,
    pub replicasets: Store<ReplicaSet>,
    pub deployments: Store<Deployment>,
    pub daemonsets: Store<DaemonSet>,
    pub nodes: Store<Node>,
    pub services: Store<Service>,
    pub leases: Store<Lease>,
    pub namespaces: Store<Namespace>,
    pub serviceaccounts: Store<ServiceAccount>,
    /// Bumped on any change of any kind above but nodes and leases: the controllers that read
    /// no node wait on it, so node status heartbeats (5,000 nodes post one every 5 minutes each:
    /// 17 a second) do not wake them for a full pass over every pod.
    pub changed: watch::Receiver<u64>,
    /// Bumped on any change of any kind above but leases, nodes included: for a controller that
    /// reads nodes and other kinds.
    pub any_changed: watch::Receiver<u64>,
    /// Bumped on node changes only: for a controller that reads nothing else, so pod churn does
    /// not wake it.
    pub nodes_changed: watch::Receiver<u64>,
}

/// An informer that bumps every counter of `txs` on each event.
fn start_with<K>(api: Api<K>, txs: Vec<watch::Sender<u64>>, shutdown: CancellationToken) -> Store<K>
where
    K: rkube_client::watch::Watched + Sync,
{
    let (reader, mut writer) = reflector::store();
    tokio::spawn(rkube_client::watch::follow(
        api,
        watcher::Config::default(),
        shutdown,
        move |ev| {
            writer.apply_watcher_event(&ev);
            for tx in &txs {
                tx.send_modify(|n| *n += 1);
            }
        },
    ));
    reader
}

impl Informers {
    pub fn start(client: Client, shutdown: CancellationToken) -> Informers {
        let (tx, rx) = watch::channel(0u64);
        let (any_tx, any_rx) = watch::channel(0u64);
        let (nodes_tx, nodes_rx) = watch::channel(0u64);
        let both = || vec![tx.clone(), any_tx.clone()];
        Informers {
            pods: start_with(Api::<Pod>::all(client.clone()), both(), shutdown.clone()),
            replicasets: start_with(
                Api::<ReplicaSet>::all(client.clone()),
                both(),
                shutdown.clone(),
            ),
            deployments: start_with(
                Api::<Deployment>::all(client.clone()),
                both(),
                shutdown.clone(),
            ),
            daemonsets: start_with(Api::<DaemonSet>::all(client.clone()), both(), shutdown.clone()),
            nodes: start_with(
                Api::<Node>::all(client.clone()),
                vec![any_tx.clone(), nodes_tx],
                shutdown.clone(),
            ),
            services: start_with(Api::<Service>::all(client.clone()), both(), shutdown.clone()),
            // Node leases are renewed every 10 s by every node (500 a second for 5,000 nodes)
            // and only the node lifecycle controller reads them, on its own timer: a renewal
            // wakes no controller.
            leases: start_with(
                Api::<Lease>::namespaced(client.clone(), "kube-node-lease"),
                Vec::new(),
                shutdown.clone(),
            ),
            namespaces: start_with(Api::<Namespace>::all(client.clone()), both(), shutdown.clone()),
            serviceaccounts: start_with(Api::<ServiceAccount>::all(client), both(), shutdown),
            changed: rx,
            any_changed: any_rx,
            nodes_changed: nodes_rx,
        }
    }

    pub async fn wait_ready(&self) {
        let _ = self.pods.wait_until_ready().await;
        let _ = self.replicasets.wait_until_ready().await;
        let _ = self.deployments.wait_until_ready().await;
        let _ = self.daemonsets.wait_until_ready().await;
        let _ = self.nodes.wait_until_ready().await;
        let _ = self.services.wait_until_ready().await;
        let _ = self.leases.wait_until_ready().await;
        let _ = self.namespaces.wait_until_ready().await;
        let _ = self.serviceaccounts.wait_until_ready().await;
    }
}

/// Waits for the next change (debounced a little, so a burst of events means one pass) or
/// `resync`, whichever comes first; `false` on shutdown.
pub async fn next_pass(
    changed: &mut watch::Receiver<u64>,
    resync: Duration,
    shutdown: &CancellationToken,
) -> bool {
    tokio::select! {
        _ = shutdown.cancelled() => return false,
        r = changed.changed() => { if r.is_err() { return false; } }
        _ = tokio::time::sleep(resync) => {}
    }
    tokio::time::sleep(Duration::from_millis(20)).await;
    changed.borrow_and_update();
    !shutdown.is_cancelled()
}
