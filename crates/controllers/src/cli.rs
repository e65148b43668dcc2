//! Command-line entry of the controller manager: `rkube` parses these arguments and calls [`run`].

/// Arguments of the controller manager (filled by issue 5).
#[derive(Debug, Clone, clap::Args)]
pub struct Args {}

/// Runs the controller manager until it fails or is stopped.
pub async fn run(_args: Args) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    Err("the controller manager is not built yet (issue 5)".into())
}
