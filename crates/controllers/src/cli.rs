//! `rkube controller-manager --kubeconfig …`: the controllers as their own process.

use std::path::PathBuf;
use std::time::Duration;

#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    /// Kubeconfig of the API server to reconcile against.
    #[arg(long)]
    pub kubeconfig: Option<PathBuf>,
    /// Seconds without node heartbeats before a node is marked NotReady/Unknown.
    #[arg(long, default_value_t = 50)]
    pub node_monitor_grace_period: u64,
    /// Seconds a newly registered node may go without posting its status before it is marked
    /// Unknown (upstream's --node-startup-grace-period, 1 minute).
    #[arg(long, default_value_t = 60)]
    pub node_startup_grace_period: u64,
    /// The pods' network; each node gets a subnet of it as its podCIDR.
    #[arg(long, default_value = "10.244.0.0/16")]
    pub cluster_cidr: String,
    /// Whether to give nodes pod CIDRs from --cluster-cidr.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub allocate_node_cidrs: bool,
    /// Prefix length of each node's pod CIDR.
    #[arg(long, default_value_t = 24)]
    pub node_cidr_mask_size: u8,
    /// Terminated pods to keep before the oldest are deleted; 0 disables this collection.
    #[arg(long, default_value_t = 12500)]
    pub terminated_pod_gc_threshold: usize,
    /// Nodes per second whose pods may be evicted (NoExecute-tainted) in a healthy zone.
    #[arg(long, default_value_t = 0.1)]
    pub node_eviction_rate: f64,
    /// Nodes per second in a partially disrupted zone of a cluster above
    /// --large-cluster-size-threshold nodes (in smaller ones, eviction stops instead).
    #[arg(long, default_value_t = 0.01)]
    pub secondary_node_eviction_rate: f64,
    /// Share of NotReady nodes (at least three) that makes a zone unhealthy.
    #[arg(long, default_value_t = 0.55)]
    pub unhealthy_zone_threshold: f64,
    /// Nodes in a zone above which it counts as large for eviction.
    #[arg(long, default_value_t = 50)]
    pub large_cluster_size_threshold: usize,
}

pub async fn run(args: Args) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    for (flag, v) in [
        ("--node-eviction-rate", args.node_eviction_rate),
        ("--secondary-node-eviction-rate", args.secondary_node_eviction_rate),
    ] {
        if !(v.is_finite() && v >= 0.0) {
            return Err(
                format!("{flag} {v}: must be a number of nodes per second, 0 or more").into()
            );
        }
    }
    if !(0.0..=1.0).contains(&args.unhealthy_zone_threshold) {
        return Err(format!(
            "--unhealthy-zone-threshold {}: must be a share between 0 and 1",
            args.unhealthy_zone_threshold
        )
        .into());
    }
    let client = rkube_client::client_from(args.kubeconfig.as_deref()).await?;
    let shutdown = rkube_client::shutdown_on_signal();
    let config = crate::Config {
        node_monitor_grace_period: Duration::from_secs(args.node_monitor_grace_period),
        node_startup_grace_period: Duration::from_secs(args.node_startup_grace_period),
        cluster_cidr: args.allocate_node_cidrs.then_some(args.cluster_cidr),
        node_cidr_mask_size: args.node_cidr_mask_size,
        terminated_pod_gc_threshold: args.terminated_pod_gc_threshold,
        eviction_limits: crate::EvictionLimits {
            eviction_rate: args.node_eviction_rate,
            secondary_eviction_rate: args.secondary_node_eviction_rate,
            unhealthy_zone_threshold: args.unhealthy_zone_threshold,
            large_cluster_size_threshold: args.large_cluster_size_threshold,
        },
        ..Default::default()
    };
    crate::run_with_client(client, config, shutdown).await?;
    Ok(())
}
