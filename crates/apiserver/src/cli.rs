//! Command-line entry of the API server: `rkube` parses these arguments and calls [`run`].

/// Arguments of the API server (filled by issue 3).
#[derive(Debug, Clone, clap::Args)]
pub struct Args {}

/// Runs the API server until it fails or is stopped.
pub async fn run(_args: Args) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    Err("the API server is not built yet (issue 3)".into())
}
