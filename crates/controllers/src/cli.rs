//! `rkube controller-manager --kubeconfig …`: the controllers as their own process.

use std::path::PathBuf;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

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
    let client = match &args.kubeconfig {
        Some(p) => {
            let kc = kube::config::Kubeconfig::read_from(p)?;
            kube::Client::try_from(
                kube::Config::from_custom_kubeconfig(kc, &Default::default()).await?,
            )?
        }
        None => kube::Client::try_default().await?,
    };
    let shutdown = CancellationToken::new();
    let stop = shutdown.clone();
    tokio::spawn(async move {
        let _ = tokio::signal::ctrl_c().await;
        stop.cancel();
    });
    let config = crate::Config {
        node_monitor_grace_period: Duration::from_secs(args.node_monitor_grace_period),
        ..Default::default()
    };
    crate::run_with_client(client, config, shutdown).await?;
    Ok(())
}
