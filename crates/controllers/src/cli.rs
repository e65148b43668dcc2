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
}

pub async fn run(args: Args) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let client = rkube_client::client_from(args.kubeconfig.as_deref()).await?;
    let shutdown = rkube_client::shutdown_on_signal();
    let config = crate::Config {
        node_monitor_grace_period: Duration::from_secs(args.node_monitor_grace_period),
        ..Default::default()
    };
    crate::run_with_client(client, config, shutdown).await?;
    Ok(())
}
