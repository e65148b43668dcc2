//! `rkube up` and its companions (`down`, `status`, `node crash|restore`): a whole cluster in one
//! process for a newcomer's machine, driven through a control socket in its data directory.

pub mod cluster;
pub mod control;
pub mod dns;
pub mod events;
pub mod kubeconfig;
pub mod switch;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand, ValueEnum};

use control::{Answer, Request};

/// Which runtime the in-process kubelets use.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum RuntimeChoice {
    /// Real host processes (the container's command runs on the host, no image needed).
    Process,
    /// Real OCI images run with runc (needs root and runc).
    Oci,
    /// Hollow nodes: pods are reported Running without running anything (kwok-style).
    Simulated,
}

impl RuntimeChoice {
    pub fn as_str(self) -> &'static str {
        match self {
            RuntimeChoice::Process => "process",
            RuntimeChoice::Oci => "oci",
            RuntimeChoice::Simulated => "simulated",
        }
    }
}

#[derive(Args, Debug, Clone)]
pub struct UpArgs {
    /// Where the cluster keeps its store, certificates and node data (resumed if it exists).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Number of worker nodes besides the control-plane node.
    #[arg(long, default_value_t = 2)]
    pub workers: usize,
    /// Container runtime for the nodes; default: the best one this machine allows.
    #[arg(long, value_enum)]
    pub runtime: Option<RuntimeChoice>,
    /// Run in the background (pid and log file in the data directory); stop with `rkube down`.
    #[arg(long)]
    pub detach: bool,
    /// Kubeconfig to merge the `rkube` context into (default: $KUBECONFIG or ~/.kube/config).
    #[arg(long)]
    pub kubeconfig: Option<PathBuf>,
    /// Port of the API server on 127.0.0.1.
    #[arg(long, default_value_t = 6443)]
    pub secure_port: u16,
    /// Use upstream's slow failure detection (50 s grace, 300 s eviction) instead of the fast profile.
    #[arg(long)]
    pub upstream_timings: bool,
    /// Do not stream the cluster's events after start.
    #[arg(long)]
    pub quiet: bool,
    #[arg(long, hide = true)]
    pub detached_child: bool,
    #[command(flatten)]
    pub dns: dns::DnsArgs,
    /// oci runtime: a registry reached over plain HTTP, `host:port` (repeatable).
    #[arg(long = "insecure-registry")]
    pub insecure_registries: Vec<String>,
}

#[derive(Args, Debug, Clone)]
pub struct DataDirArg {
    /// Data directory of the cluster (default: the one `rkube up` uses by default).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
}

#[derive(Args, Debug, Clone)]
pub struct DownArgs {
    #[command(flatten)]
    pub dir: DataDirArg,
    /// Also remove the `rkube` context from the kubeconfig.
    #[arg(long)]
    pub forget: bool,
    #[arg(long)]
    pub kubeconfig: Option<PathBuf>,
}

#[derive(Subcommand, Debug, Clone)]
pub enum NodeCommand {
    /// Power off a node: its heartbeats stop and its pods die, as after a power loss.
    Crash {
        name: String,
        #[command(flatten)]
        dir: DataDirArg,
    },
    /// Join a new worker node to the running cluster.
    Add {
        name: String,
        /// An extended resource the node offers, e.g. `nvidia.com/gpu=1` (repeatable).
        #[arg(long = "extended-resource")]
        extended_resources: Vec<String>,
        #[command(flatten)]
        dir: DataDirArg,
    },
    /// Power a crashed node back on.
    Restore {
        name: String,
        #[command(flatten)]
        dir: DataDirArg,
    },
}

/// The files of one cluster inside its data directory.
#[derive(Clone, Debug)]
pub struct Paths {
    pub root: PathBuf,
}

impl Paths {
    pub fn new(explicit: Option<&Path>) -> Result<Paths> {
        let root = match explicit {
            Some(p) => p.to_path_buf(),
            None => default_data_dir()?,
        };
        let root = if root.is_absolute() { root } else { std::env::current_dir()?.join(root) };
        Ok(Paths { root })
    }
    pub fn socket(&self) -> PathBuf {
        self.root.join("rkube.sock")
    }
    pub fn pid_file(&self) -> PathBuf {
        self.root.join("rkube.pid")
    }
    pub fn log_file(&self) -> PathBuf {
        self.root.join("rkube.log")
    }
    pub fn server_dir(&self) -> PathBuf {
        self.root.join("server")
    }
    pub fn node_dir(&self, node: &str) -> PathBuf {
        self.root.join("nodes").join(node)
    }
}

/// `$XDG_DATA_HOME/rkube`, else `~/.local/share/rkube`.
fn default_data_dir() -> Result<PathBuf> {
    if let Some(x) = std::env::var_os("XDG_DATA_HOME").filter(|v| !v.is_empty()) {
        return Ok(PathBuf::from(x).join("rkube"));
    }
    let home = std::env::var_os("HOME").context("HOME is not set; pass --data-dir")?;
    Ok(PathBuf::from(home).join(".local").join("share").join("rkube"))
}

/// `rkube down`: asks the cluster to stop and waits until its process is gone.
pub async fn down(args: DownArgs) -> Result<()> {
    let paths = Paths::new(args.dir.data_dir.as_deref())?;
    let pid = read_pid(&paths);
    match control::call(&paths.socket(), &Request::Stop).await {
        Ok(_) => {}
        Err(e) => match pid {
            Some(pid) if alive(pid) => {
                // The socket is gone but the process lives: fall back to SIGTERM.
                signal(pid, nix::sys::signal::Signal::SIGTERM);
            }
            _ => {
                if args.forget {
                    kubeconfig::forget(&kubeconfig::default_path(args.kubeconfig.as_deref())?)?;
                }
                println!("no rkube cluster is running from {} ({e:#})", paths.root.display());
                return Ok(());
            }
        },
    }
    if let Some(pid) = pid {
        let start = Instant::now();
        while alive(pid) {
            if start.elapsed() > Duration::from_secs(30) {
                signal(pid, nix::sys::signal::Signal::SIGKILL);
                eprintln!("the cluster did not stop within 30 s; killed process {pid}");
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    if args.forget {
        kubeconfig::forget(&kubeconfig::default_path(args.kubeconfig.as_deref())?)?;
    }
    println!("rkube cluster stopped (data kept in {})", paths.root.display());
    Ok(())
}

/// `rkube status`: the cluster's components and their health, without kubectl.
pub async fn status(args: DataDirArg) -> Result<()> {
    let paths = Paths::new(args.data_dir.as_deref())?;
    let answer = control::call(&paths.socket(), &Request::Status).await?;
    let Some(st) = answer.status else { bail!("{}", answer.message) };
    println!(
        "rkube cluster {} — API server {} (pid {}, runtime {}, data {})",
        if st.ready { "ready" } else { "starting" },
        st.server,
        st.pid,
        st.runtime,
        st.data_dir
    );
    println!();
    println!("{:<28} {:<10} DETAIL", "COMPONENT", "STATUS");
    let mut unhealthy = 0;
    for c in &st.components {
        if !c.healthy {
            unhealthy += 1;
        }
        println!(
            "{:<28} {:<10} {}",
            c.name,
            if c.healthy { "Healthy" } else { "Unhealthy" },
            c.detail
        );
    }
    if unhealthy > 0 {
        std::process::exit(1);
    }
    Ok(())
}

/// `rkube node crash|restore NAME`.
pub async fn node(cmd: NodeCommand) -> Result<()> {
    let (request, dir) = match cmd {
        NodeCommand::Crash { name, dir } => (Request::Crash { node: name }, dir),
        NodeCommand::Restore { name, dir } => (Request::Restore { node: name }, dir),
        NodeCommand::Add { name, extended_resources, dir } => {
            (Request::Add { node: name, extended_resources }, dir)
        }
    };
    let paths = Paths::new(dir.data_dir.as_deref())?;
    let answer: Answer = control::call(&paths.socket(), &request).await?;
    if !answer.ok {
        bail!("{}", answer.message);
    }
    println!("{}", answer.message);
    Ok(())
}

fn read_pid(paths: &Paths) -> Option<i32> {
    std::fs::read_to_string(paths.pid_file()).ok()?.trim().parse().ok()
}

fn alive(pid: i32) -> bool {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok() && !is_zombie(pid)
}

/// A detached child whose parent has not reaped it yet still answers kill(0): check /proc.
fn is_zombie(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rsplit_once(')').map(|(_, rest)| rest.trim_start().starts_with('Z')))
        .unwrap_or(false)
}

fn signal(pid: i32, sig: nix::sys::signal::Signal) {
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig);
}
