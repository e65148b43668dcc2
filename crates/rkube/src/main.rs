//! The `rkube` binary: one executable for every Kubernetes component.
//! `main` stays thin: parse the command line, set up tracing, run the chosen component.

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "rkube", version, about = "A Kubernetes control plane and node agent in one binary")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the API server (HTTPS, default 127.0.0.1:6443) on the embedded store or etcd.
    Server,
    /// Run the scheduler against an API server.
    Scheduler,
    /// Run the controller manager against an API server.
    ControllerManager,
    /// Run the node agent (kubelet) against an API server.
    Agent,
    /// Run the service proxy on this node.
    Proxy,
    /// Start a whole local cluster in one process.
    Up,
    /// Stop a cluster started with `rkube up --detach`.
    Down,
    /// Save or restore a snapshot of the embedded store.
    Snapshot,
    /// Measure an area and print its figures (`--json` for one JSON object).
    Bench,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let name = match cli.command {
        Command::Server => "server",
        Command::Scheduler => "scheduler",
        Command::ControllerManager => "controller-manager",
        Command::Agent => "agent",
        Command::Proxy => "proxy",
        Command::Up => "up",
        Command::Down => "down",
        Command::Snapshot => "snapshot",
        Command::Bench => "bench",
    };
    anyhow::bail!("`rkube {name}` is not built yet: see the open issues")
}
