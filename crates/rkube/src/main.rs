//! The `rkube` binary: one executable for every Kubernetes component.
//! `main` stays thin: parse the command line, set up tracing, run the chosen component.

mod bench;
mod snapshot;
mod up;

use anyhow::Result;
use clap::{Parser, Subcommand};

/// mimalloc instead of glibc's malloc: the API server, scheduler and watch fan-out allocate and
/// free many small JSON values per request; under glibc that was a third of the CPU and grew
/// with the heap (fragmented bins), under mimalloc it is per-thread free lists.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The API server's periodic heap release (crates/apiserver/src/heap.rs) for mimalloc: a forced
/// collect purges the freed pages of every arena, not only the calling thread's.
fn release_heap() {
    // SAFETY: mi_collect takes no pointers; it only walks mimalloc's own structures under its
    // own synchronisation and may be called from any thread at any time.
    #[allow(unsafe_code)]
    unsafe {
        libmimalloc_sys::mi_collect(true)
    }
}

#[derive(Parser)]
#[command(
    name = "rkube",
    version,
    about = "A Kubernetes control plane and node agent in one binary"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Args)]
struct ServerArgs {
    #[command(flatten)]
    server: rkube_apiserver::cli::Args,
    /// Run only the API server (no in-process scheduler, controller manager and DNS).
    #[arg(long)]
    disable_controllers: bool,
    /// Seconds without node heartbeats before the node lifecycle controller marks a node
    /// NotReady/Unknown (upstream's kube-controller-manager flag).
    #[arg(long, default_value_t = 50)]
    node_monitor_grace_period: u64,
    #[command(flatten)]
    dns: up::dns::DnsArgs,
}

#[derive(clap::Args)]
struct AgentArgs {
    #[command(flatten)]
    kubelet: rkube_kubelet::cli::Args,
    /// Run the Service proxy (nftables) in the agent too; default: with the oci runtime,
    /// whose pods have their own addresses.
    #[arg(long)]
    proxy: Option<bool>,
}

#[derive(Subcommand)]
enum Command {
    /// Start a whole cluster in one process: control plane, a control-plane node and workers.
    Up(up::UpArgs),
    /// Run the control plane: API server (HTTPS, default 127.0.0.1:6443), scheduler and
    /// controller manager.
    Server(ServerArgs),
    /// Run the scheduler against an API server.
    Scheduler(rkube_scheduler::cli::Args),
    /// Run the controller manager against an API server.
    ControllerManager(rkube_controllers::cli::Args),
    /// Run the node agent (kubelet, and the Service proxy with the oci runtime), or with
    /// `--simulate N` N hollow nodes.
    Agent(AgentArgs),
    /// Run the Service proxy (nftables) against an API server.
    Proxy(rkube_proxy::cli::Args),
    /// Run the cluster DNS against an API server.
    Dns(rkube_dns::cli::Args),
    /// Save or restore a snapshot of the embedded store.
    #[command(subcommand)]
    Snapshot(snapshot::SnapshotCommand),
    /// Stop the cluster that `rkube up --detach` started.
    Down(up::DownArgs),
    /// Show the components of a running `rkube up` cluster and their health.
    Status(up::DataDirArg),
    /// Crash or restore a node of a running `rkube up` cluster.
    #[command(subcommand)]
    Node(up::NodeCommand),
    /// Measure an area and print its figures (`--json` for one JSON object).
    Bench(bench::BenchArgs),
    /// List, pull, import or remove the images of the oci runtime.
    Image(rkube_oci::cli::Args),
}

fn main() -> Result<()> {
    // The oci runtime's per-container shim is this binary too (hidden, not a user command): it
    // must start before any runtime or thread exists, as it forks and reaps children.
    if std::env::args_os().nth(1).is_some_and(|a| a == "runc-shim") {
        std::process::exit(rkube_oci::runc::shim::main(std::env::args_os().skip(2)));
    }
    // So is the process runtime's container init, which forks and changes namespaces.
    if std::env::args_os().nth(1).is_some_and(|a| a == rkube_kubelet::procinit::SUBCOMMAND) {
        std::process::exit(rkube_kubelet::procinit::main(std::env::args_os().skip(2)));
    }
    let cli = Cli::parse();
    rkube_apiserver::heap::set_release(release_heap);
    // `rkube up` prints its own reconciliation log; component chatter would drown it.
    let default_level = if matches!(cli.command, Command::Up(_)) { "warn" } else { "info" };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level)),
        )
        .with_writer(std::io::stderr)
        .init();
    let runtime = tokio::runtime::Runtime::new()?;
    if let Err(e) = runtime.block_on(run(cli.command)) {
        // One readable line (with its causes), never a backtrace dump.
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
    Ok(())
}

async fn run(command: Command) -> Result<()> {
    match command {
        Command::Up(args) => up::cluster::up(args).await,
        Command::Server(args) => {
            let controllers = (!args.disable_controllers).then(|| rkube_controllers::Config {
                node_monitor_grace_period: std::time::Duration::from_secs(
                    args.node_monitor_grace_period,
                ),
                ..Default::default()
            });
            up::cluster::server(args.server, controllers, args.dns).await
        }
        Command::Scheduler(args) => {
            rkube_scheduler::cli::run(args).await.map_err(|e| anyhow::anyhow!(e))
        }
        Command::ControllerManager(args) => {
            rkube_controllers::cli::run(args).await.map_err(|e| anyhow::anyhow!(e))
        }
        Command::Agent(args) => agent(args).await,
        Command::Proxy(args) => {
            rkube_proxy::cli::run_cli(args).await.map_err(|e| anyhow::anyhow!(e))
        }
        Command::Dns(args) => rkube_dns::cli::run_cli(args).await.map_err(|e| anyhow::anyhow!(e)),
        Command::Snapshot(cmd) => snapshot::run(cmd).await,
        Command::Bench(args) => bench::run(args).await,
        Command::Down(args) => up::down(args).await,
        Command::Status(args) => up::status(args).await,
        Command::Node(cmd) => up::node(cmd).await,
        Command::Image(args) => rkube_oci::cli::run(args).await.map_err(|e| anyhow::anyhow!(e)),
    }
}

/// The node agent: the kubelet, and beside it the Service proxy when pods have their own
/// addresses (the oci runtime), as kube-proxy runs on every node.
async fn agent(args: AgentArgs) -> Result<()> {
    let config = args.kubelet.config().map_err(|e| anyhow::anyhow!(e))?;
    let hollow = args.kubelet.hollow_config().map_err(|e| anyhow::anyhow!(e))?;
    let client = rkube_client::client_from(args.kubelet.kubeconfig.as_deref())
        .await
        .map_err(|e| anyhow::anyhow!(e))?;
    let shutdown = rkube_client::shutdown_on_signal();
    if let Some(h) = hollow {
        // Hollow nodes: no pods really run, so there is nothing for a Service proxy to do.
        return rkube_kubelet::hollow::run(client, h, shutdown)
            .await
            .map_err(|e| anyhow::anyhow!(e));
    }
    let with_proxy = args.proxy.unwrap_or(config.runtime == rkube_kubelet::RuntimeKind::Oci);
    let proxy = with_proxy.then(|| {
        let pc = up::dns::proxy_config(&config.node_name, &config.cluster_cidr);
        let (c, s) = (client.clone(), shutdown.clone());
        tokio::spawn(async move {
            if let Err(e) = rkube_proxy::run(c, pc, s).await {
                tracing::error!("service proxy stopped: {e}");
            }
        })
    });
    let result = rkube_kubelet::run_with_client(client, config, shutdown.clone()).await;
    shutdown.cancel();
    if let Some(p) = proxy {
        let _ = tokio::time::timeout(std::time::Duration::from_secs(5), p).await;
    }
    result.map_err(|e| anyhow::anyhow!(e))
}
