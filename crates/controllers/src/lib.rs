//! The controller manager: level-triggered reconciliation loops that compare desired state with
//! what the cluster reports and act — ReplicaSets, Deployments and node lifecycle.

pub mod cli;
mod clock;
mod daemonset;
mod deployment;
mod disruption;
mod endpoints;
mod informer;
mod nodeipam;
mod nodes;
mod podgc;
mod replicaset;
mod serviceaccounts;
mod util;

use std::time::Duration;

use kube::Client;

pub use crate::clock::{Clock, ManualClock};
pub use crate::disruption::Limits as EvictionLimits;
use tokio_util::sync::CancellationToken;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("{0}")]
    Config(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Clone, Debug)]
pub struct Config {
    /// A node whose heartbeats stop for this long is marked NotReady/Unknown (upstream: 50 s).
    pub node_monitor_grace_period: Duration,
    /// A registered node that has never posted its status is left alone for this long (upstream:
    /// 1 minute), then marked Unknown with reason NodeStatusNeverUpdated.
    pub node_startup_grace_period: Duration,
    /// How often node health is checked (upstream: 5 s; rkube checks every second).
    pub node_monitor_period: Duration,
    pub identity: String,
    pub lease_duration: Duration,
    /// Pod CIDRs for nodes are cut from this network (`--cluster-cidr`); None: not allocated.
    pub cluster_cidr: Option<String>,
    /// The prefix length of each node's pod CIDR (`--node-cidr-mask-size`, upstream 24).
    pub node_cidr_mask_size: u8,
    /// Terminated pods kept before the oldest are deleted (`--terminated-pod-gc-threshold`,
    /// upstream 12500); 0 keeps them all.
    pub terminated_pod_gc_threshold: usize,
    /// How often the pod garbage collector runs (upstream: 20 s).
    pub pod_gc_period: Duration,
    /// How long a pod's node must be missing before the pod is collected (upstream: 40 s).
    pub pod_gc_quarantine: Duration,
    /// `--node-eviction-rate` and friends: how fast lost nodes get NoExecute taints per zone.
    pub eviction_limits: EvictionLimits,
    /// The node lifecycle controller's clock (heartbeat ages, taints' timeAdded, eviction times
    /// and rate limits): the system clock, or a manual one in tests.
    pub clock: Clock,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            node_monitor_grace_period: Duration::from_secs(50),
            node_startup_grace_period: Duration::from_secs(60),
            node_monitor_period: Duration::from_secs(1),
            identity: format!(
                "rkube-controller-manager_{:x}",
                jiff::Timestamp::now().as_nanosecond() as u64
            ),
            lease_duration: Duration::from_secs(15),
            cluster_cidr: Some("10.244.0.0/16".into()),
            node_cidr_mask_size: 24,
            terminated_pod_gc_threshold: 12500,
            pod_gc_period: Duration::from_secs(20),
            pod_gc_quarantine: Duration::from_secs(40),
            eviction_limits: EvictionLimits::default(),
            clock: Clock::system(),
        }
    }
}

/// Runs every controller until `shutdown`.
pub async fn run_with_client(
    client: Client,
    config: Config,
    shutdown: CancellationToken,
) -> Result<()> {
    let cluster_cidr = match &config.cluster_cidr {
        Some(c) => Some(nodeipam::Cidr::parse(c).ok_or_else(|| {
            Error::Config(format!("--cluster-cidr {c}: not an IPv4 network like 10.244.0.0/16"))
        })?),
        None => None,
    };
    rkube_client::lease::run_while_leading(
        client.clone(),
        "kube-controller-manager",
        &config.identity,
        config.lease_duration,
        shutdown,
        |leading| run_controllers(client.clone(), &config, cluster_cidr, leading),
    )
    .await;
    Ok(())
}

/// Every controller, until `shutdown` (the end of leadership or of the process).
async fn run_controllers(
    client: Client,
    config: &Config,
    cluster_cidr: Option<nodeipam::Cidr>,
    shutdown: CancellationToken,
) {
    let informers = informer::Informers::start(client.clone(), shutdown.clone());
    informers.wait_ready().await;
    let recorder =
        rkube_client::events::Recorder::new(client.clone(), "replicaset-controller", None);
    let rs = tokio::spawn(replicaset::run(
        client.clone(),
        informers.clone(),
        recorder,
        shutdown.clone(),
    ));
    let recorder =
        rkube_client::events::Recorder::new(client.clone(), "deployment-controller", None);
    let dep = tokio::spawn(deployment::run(
        client.clone(),
        informers.clone(),
        recorder,
        shutdown.clone(),
    ));
    let recorder =
        rkube_client::events::Recorder::new(client.clone(), "daemonset-controller", None);
    let ds =
        tokio::spawn(daemonset::run(client.clone(), informers.clone(), recorder, shutdown.clone()));
    let ep = tokio::spawn(endpoints::run(client.clone(), informers.clone(), shutdown.clone()));
    let recorder = rkube_client::events::Recorder::new(client.clone(), "node-controller", None);
    let nodes = tokio::spawn(nodes::run(
        client.clone(),
        informers.clone(),
        recorder,
        config.clone(),
        shutdown.clone(),
    ));
    let sa =
        tokio::spawn(serviceaccounts::run(client.clone(), informers.clone(), shutdown.clone()));
    let podgc = tokio::spawn(podgc::run(
        client.clone(),
        informers.clone(),
        config.terminated_pod_gc_threshold,
        config.pod_gc_period,
        config.pod_gc_quarantine,
        shutdown.clone(),
    ));
    let mut tasks = vec![rs, dep, ds, ep, nodes, sa, podgc];
    if let Some(cidr) = cluster_cidr {
        let recorder = rkube_client::events::Recorder::new(client.clone(), "node-ipam", None);
        tasks.push(tokio::spawn(nodeipam::run(
            client.clone(),
            informers.clone(),
            cidr,
            config.node_cidr_mask_size,
            recorder,
            shutdown.clone(),
        )));
    }
    shutdown.cancelled().await;
    for t in tasks {
        let _ = tokio::time::timeout(Duration::from_secs(2), t).await;
    }
}
