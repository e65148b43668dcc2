//! Command-line entry of the scheduler: `rkube` parses these arguments and calls [`run`].

/// Arguments of the scheduler (filled by issue 4).
#[derive(Debug, Clone, clap::Args)]
pub struct Args {}

/// Runs the scheduler until it fails or is stopped.
pub async fn run(_args: Args) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    Err("the scheduler is not built yet (issue 4)".into())
}
