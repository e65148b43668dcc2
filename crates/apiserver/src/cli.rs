//! `rkube server`: flags named after kube-apiserver's, the store chosen from them, and the
//! server run until Ctrl-C or SIGTERM.

use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use crate::{ApiServer, Config};

#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    /// The port on which to serve HTTPS.
    #[arg(long, default_value_t = 6443)]
    pub secure_port: u16,
    /// The IP address on which to listen.
    #[arg(long, default_value = "127.0.0.1")]
    pub bind_address: IpAddr,
    /// Directory for certificates, the admin kubeconfig and the embedded store.
    #[arg(long, default_value = "rkube-data")]
    pub data_dir: PathBuf,
    /// Extra subject alternative names (IPs or DNS names) for the serving certificate.
    #[arg(long = "tls-san", value_delimiter = ',')]
    pub tls_san: Vec<String>,
    /// Static bearer tokens: a CSV file `token,user,uid,"group1,group2"`.
    #[arg(long)]
    pub token_auth_file: Option<PathBuf>,
    /// CIDR from which Service cluster IPs are allocated.
    #[arg(long, default_value = "10.96.0.0/12")]
    pub service_cluster_ip_range: String,
    /// Port range for NodePort Services.
    #[arg(long, default_value = "30000-32767")]
    pub service_node_port_range: String,
    /// Seconds pods tolerate a not-ready or unreachable node (DefaultTolerationSeconds admission).
    #[arg(long, default_value_t = 300)]
    pub default_not_ready_toleration_seconds: i64,
    /// Use an in-memory store (nothing survives a restart): for tests and benchmarks.
    #[arg(long)]
    pub in_memory: bool,
    /// etcd client URLs (comma separated); without it the embedded store in --data-dir is used.
    #[arg(long, value_delimiter = ',')]
    pub etcd_servers: Vec<String>,
    /// CA bundle that signed etcd's serving certificate.
    #[arg(long)]
    pub etcd_cafile: Option<PathBuf>,
    /// Client certificate for etcd.
    #[arg(long)]
    pub etcd_certfile: Option<PathBuf>,
    /// Client key for etcd.
    #[arg(long)]
    pub etcd_keyfile: Option<PathBuf>,
}

impl Args {
    pub fn config(&self) -> Result<Config, Box<dyn std::error::Error + Send + Sync>> {
        let (lo, hi) = self
            .service_node_port_range
            .split_once('-')
            .ok_or("--service-node-port-range must look like 30000-32767")?;
        Ok(Config {
            bind_address: self.bind_address,
            secure_port: self.secure_port,
            data_dir: self.data_dir.clone(),
            tls_sans: self.tls_san.clone(),
            token_auth_file: self.token_auth_file.clone(),
            service_cluster_ip_range: self.service_cluster_ip_range.clone(),
            service_node_port_range: (lo.trim().parse()?, hi.trim().parse()?),
            default_toleration_seconds: self.default_not_ready_toleration_seconds,
        })
    }
}

/// Builds the server on the store, binds, writes the admin kubeconfig and serves until `shutdown`.
pub async fn start(
    args: &Args,
    store: Arc<dyn rkube_store::Store>,
    shutdown: CancellationToken,
) -> Result<
    (ApiServer, PathBuf, tokio::task::JoinHandle<crate::Result<()>>),
    Box<dyn std::error::Error + Send + Sync>,
> {
    let config = args.config()?;
    std::fs::create_dir_all(&config.data_dir)?;
    let server = ApiServer::new(config.clone(), store).await?;
    let listener =
        tokio::net::TcpListener::bind((config.bind_address, config.secure_port)).await.map_err(
            |e| format!("cannot listen on {}:{}: {e}", config.bind_address, config.secure_port),
        )?;
    let addr = listener.local_addr()?;
    let host =
        if addr.ip().is_unspecified() { "127.0.0.1".to_string() } else { addr.ip().to_string() };
    let url = format!("https://{host}:{}", addr.port());
    let kubeconfig = server.write_admin_kubeconfig(&url)?;
    let task = tokio::spawn(server.clone().serve(listener, shutdown));
    Ok((server, kubeconfig, task))
}

/// `rkube server`: the API server alone on its store, until Ctrl-C or SIGTERM.
pub async fn run(args: Args) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let store = open_store(&args).await?;
    let shutdown = CancellationToken::new();
    let (_server, kubeconfig, task) = start(&args, store, shutdown.clone()).await?;
    tracing::info!(
        "API server listening on https://{}:{}; admin kubeconfig: {}",
        args.bind_address,
        args.secure_port,
        kubeconfig.display()
    );
    eprintln!("admin kubeconfig: {}", kubeconfig.display());
    wait_for_signal().await;
    shutdown.cancel();
    task.await??;
    Ok(())
}

/// The store `args` ask for: etcd (`--etcd-servers`), in-memory, or the embedded store in the
/// data dir.
pub async fn open_store(
    args: &Args,
) -> Result<Arc<dyn rkube_store::Store>, Box<dyn std::error::Error + Send + Sync>> {
    if !args.etcd_servers.is_empty() {
        return open_etcd(args).await;
    }
    if args.in_memory {
        return Ok(Arc::new(rkube_store::memory::MemoryStore::new()));
    }
    std::fs::create_dir_all(&args.data_dir)?;
    let path = args.data_dir.join("store.redb");
    Ok(Arc::new(rkube_store::embedded::EmbeddedStore::open(rkube_store::embedded::Config::new(
        path,
    ))?))
}

/// Ctrl-C or SIGTERM.
pub async fn wait_for_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

#[cfg(feature = "etcd")]
async fn open_etcd(
    args: &Args,
) -> Result<Arc<dyn rkube_store::Store>, Box<dyn std::error::Error + Send + Sync>> {
    let config = rkube_store::etcd::Config {
        endpoints: args.etcd_servers.clone(),
        ca_file: args.etcd_cafile.clone(),
        cert_file: args.etcd_certfile.clone(),
        key_file: args.etcd_keyfile.clone(),
        ..Default::default()
    };
    let etcd: Arc<dyn rkube_store::Store> =
        Arc::new(rkube_store::etcd::EtcdStore::connect(config).await?);
    // LIST and WATCH from memory, one watch on etcd per API server.
    Ok(rkube_store::cache::CachedStore::new(etcd).await?)
}

#[cfg(not(feature = "etcd"))]
async fn open_etcd(
    _args: &Args,
) -> Result<Arc<dyn rkube_store::Store>, Box<dyn std::error::Error + Send + Sync>> {
    Err("--etcd-servers needs an rkube built with the etcd backend: cargo build --release --features etcd".into())
}
