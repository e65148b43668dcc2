//! `rkube scheduler --kubeconfig …`: the scheduler as its own process.

use std::path::PathBuf;

#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    /// Kubeconfig of the API server to schedule for.
    #[arg(long)]
    pub kubeconfig: Option<PathBuf>,
    /// Only pods naming this scheduler are scheduled.
    #[arg(long, default_value = "default-scheduler")]
    pub scheduler_name: String,
    /// How nodes are scored on resources: spread pods (LeastAllocated) or pack them
    /// (MostAllocated), as the NodeResourcesFit plugin's scoringStrategy upstream.
    #[arg(long, value_enum, default_value_t = crate::plugins::ScoringStrategy::LeastAllocated)]
    pub scoring_strategy: crate::plugins::ScoringStrategy,
}

pub async fn run(args: Args) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let client = rkube_client::client_from(args.kubeconfig.as_deref()).await?;
    let shutdown = rkube_client::shutdown_on_signal();
    let config = crate::Config {
        scheduler_name: args.scheduler_name,
        scoring_strategy: args.scoring_strategy,
        ..Default::default()
    };
    crate::run_with_client(client, config, shutdown).await?;
    Ok(())
}
