//! The kubelet: registers its Node, renews its Lease, runs the pods bound to it through a
//! runtime (`process`: real host processes; `simulated`: hollow pods) and reports their lives.

pub mod cli;
mod env;
pub mod hollow;
mod hooks;
pub mod network;
mod node;
mod oci;
mod pods;
mod portforward;
mod probes;
pub mod procinit;
mod remotecommand;
pub mod runtime;
mod server;
mod spdy;
mod tty;
pub mod volumes;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use k8s_openapi::api::core::v1::Taint;
use kube::Client;
use tokio_util::sync::CancellationToken;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Config(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum RuntimeKind {
    /// Containers are host processes running the container's command.
    Process,
    /// Hollow pods: reported Running without running anything (kwok-style).
    Simulated,
    /// Real images run through runc, each pod in its own sandbox on the node's pod network.
    Oci,
}

#[derive(Clone, Debug)]
pub struct Config {
    pub node_name: String,
    pub data_dir: PathBuf,
    pub runtime: RuntimeKind,
    /// Extended resources advertised by the node, e.g. ("nvidia.com/gpu", "2").
    pub extended_resources: Vec<(String, String)>,
    pub labels: BTreeMap<String, String>,
    pub taints: Vec<Taint>,
    pub node_ip: String,
    /// The Lease's duration; it is renewed every quarter of it (upstream: 40 s, renewed every 10 s).
    pub lease_duration: Duration,
    /// NodeStatus is re-posted at least this often even without a change (upstream: 5 min).
    pub status_report_frequency: Duration,
    pub reserved_cpu_milli: i64,
    pub reserved_memory_bytes: i64,
    pub max_pods: i64,
    /// The command that runs rkube's runc shim (the rkube binary and its hidden subcommand).
    pub runc_shim: Vec<String>,
    /// The command that runs the process runtime's container init (the rkube binary and its
    /// hidden `process-init`); empty: process containers run as plain host processes.
    pub process_init: Vec<String>,
    /// Where images are stored; nodes of one machine may share it (default: `<data dir>/images`).
    pub image_dir: Option<PathBuf>,
    /// Registries reached over plain HTTP (`host:port`).
    pub insecure_registries: Vec<String>,
    /// The cluster's pod network: pod traffic to it is not masqueraded.
    pub cluster_cidr: String,
    /// The cluster DNS Service's address and domain, written into pods' resolv.conf.
    pub cluster_dns: String,
    pub cluster_domain: String,
    /// oci runtime: image garbage collection starts at this disk usage (percent) and frees
    /// down to the low threshold (upstream: 85 / 80).
    pub image_gc_high_threshold: u8,
    pub image_gc_low_threshold: u8,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            node_name: std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|s| s.trim().to_string())
                .unwrap_or_else(|_| "rkube-node".into()),
            data_dir: PathBuf::from("rkube-kubelet"),
            runtime: RuntimeKind::Process,
            extended_resources: Vec::new(),
            labels: BTreeMap::new(),
            taints: Vec::new(),
            node_ip: "127.0.0.1".into(),
            lease_duration: Duration::from_secs(40),
            status_report_frequency: Duration::from_secs(300),
            reserved_cpu_milli: 0,
            reserved_memory_bytes: 0,
            max_pods: 110,
            runc_shim: Vec::new(),
            process_init: Vec::new(),
            image_dir: None,
            insecure_registries: Vec::new(),
            cluster_cidr: "10.244.0.0/16".into(),
            cluster_dns: "10.96.0.10".into(),
            cluster_domain: "cluster.local".into(),
            image_gc_high_threshold: 85,
            image_gc_low_threshold: 80,
        }
    }
}

/// Runs the node agent until `shutdown`; on the way out every pod process is stopped.
pub async fn run_with_client(
    client: Client,
    config: Config,
    shutdown: CancellationToken,
) -> Result<()> {
    std::fs::create_dir_all(&config.data_dir)?;
    let port = server::start(client.clone(), config.clone(), shutdown.clone()).await?;
    node::register(&client, &config, port).await?;
    let heartbeat =
        tokio::spawn(node::heartbeat(client.clone(), config.clone(), port, shutdown.clone()));
    let result = pods::run(client, config, shutdown.clone()).await;
    shutdown.cancel();
    let _ = heartbeat.await;
    result
}
