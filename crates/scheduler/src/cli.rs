//! `rkube scheduler --kubeconfig …`: the scheduler as its own process.

use std::path::PathBuf;

use tokio_util::sync::CancellationToken;

#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    /// Kubeconfig of the API server to schedule for.
    #[arg(long)]
    pub kubeconfig: Option<PathBuf>,
    /// Only pods naming this scheduler are scheduled.
    #[arg(long, default_value = "default-scheduler")]
    pub scheduler_name: String,
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
    let config = crate::Config { scheduler_name: args.scheduler_name, ..Default::default() };
    crate::run_with_client(client, config, shutdown).await?;
    Ok(())
}
