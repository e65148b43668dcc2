//! Command-line entry of the node agent: `rkube` parses these arguments and calls [`run`].

/// Arguments of the node agent (filled by issue 6).
#[derive(Debug, Clone, clap::Args)]
pub struct Args {}

/// Runs the node agent until it fails or is stopped.
pub async fn run(_args: Args) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    Err("the node agent is not built yet (issue 6)".into())
}
