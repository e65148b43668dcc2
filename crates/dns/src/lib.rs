//! Cluster DNS (`rkube dns`): `<svc>.<ns>.svc.cluster.local`, endpoint, SRV and pod records
//! from a watch of Services and EndpointSlices; other names forwarded to the host's resolvers.
//!
//! Records follow the Kubernetes DNS specification and CoreDNS's `kubernetes` plugin (with
//! `pods insecure` and reverse lookups falling through to the upstreams):
//! - `<svc>.<ns>.svc.<zone>` A/AAAA: the ClusterIPs; for a headless Service, its ready
//!   endpoints (all of them with `publishNotReadyAddresses`); an ExternalName is a CNAME.
//! - `<host>.<svc>.<ns>.svc.<zone>`: an endpoint by its hostname (or dashed address).
//! - `_<port>._<proto>.<svc>.<ns>.svc.<zone>` SRV for named ports.
//! - `1-2-3-4.<ns>.pod.<zone>` A for any well-formed address.
//! - PTR for ClusterIPs and named headless endpoints; `dns-version.<zone>` TXT.
//! - Names that do not exist are NXDOMAIN with the SOA; existing names without the asked
//!   type are NOERROR with no answers and the SOA.

pub mod cli;
mod forward;
pub mod index;
pub mod resolv;
mod server;
pub mod service;
mod watch;

use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use hickory_proto::rr::Name;
use tokio_util::sync::CancellationToken;

pub use resolv::{ResolvConf, host_upstreams, pod_resolv_conf, resolv_conf};
pub use service::{DEFAULT_CLUSTER_IP, ensure_service};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("bind DNS listener on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid cluster domain {0:?}")]
    InvalidDomain(String),
    #[error("invalid IP address {0:?}")]
    InvalidAddress(String),
    #[error("kubernetes API: {0}")]
    Api(#[source] kube::Error),
    #[error("upstream DNS: {0}")]
    Upstream(String),
    #[error("kube-system/kube-dns was deleted but did not go away")]
    DeleteTimedOut,
    #[error("connect to the API server: {0}")]
    Client(#[source] Box<dyn std::error::Error + Send + Sync>),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, Clone)]
pub struct Config {
    /// Where to serve UDP and TCP.
    pub listen: SocketAddr,
    /// The cluster domain: the zone we answer for.
    pub domain: String,
    /// Resolvers for every other name; empty: the host's (see [`host_upstreams`]).
    pub upstreams: Vec<SocketAddr>,
    /// TTL of every record, and the negative-caching TTL in the SOA.
    pub ttl: Duration,
    /// How long to wait for each upstream before trying the next (then SERVFAIL).
    pub forward_timeout: Duration,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            listen: SocketAddr::from(([0, 0, 0, 0], 53)),
            domain: "cluster.local".into(),
            upstreams: Vec::new(),
            // CoreDNS's default TTL: short, since Services and endpoints change under clients.
            ttl: Duration::from_secs(5),
            forward_timeout: Duration::from_secs(2),
        }
    }
}

/// A bound, not yet serving DNS server: bind first to learn the address (port 0 in tests) and
/// to fail early when the port is taken.
pub struct Server {
    config: Config,
    zone: Name,
    udp: tokio::net::UdpSocket,
    tcp: tokio::net::TcpListener,
}

impl Server {
    pub async fn bind(config: Config) -> Result<Server> {
        let zone = Name::from_ascii(config.domain.trim_end_matches('.'))
            .ok()
            .filter(|n| !n.is_root() && !config.domain.is_empty())
            .ok_or_else(|| Error::InvalidDomain(config.domain.clone()))?;
        let (udp, tcp) = server::bind(config.listen)
            .await
            .map_err(|source| Error::Bind { addr: config.listen, source })?;
        Ok(Server { config, zone, udp, tcp })
    }

    /// The address serving UDP; TCP is on the same.
    pub fn local_addr(&self) -> Result<SocketAddr> {
        self.udp.local_addr().map_err(|source| Error::Bind { addr: self.config.listen, source })
    }

    /// Watches the cluster and answers queries until `shutdown`.
    pub async fn serve(self, client: kube::Client, shutdown: CancellationToken) -> Result<()> {
        let Server { config, zone, udp, tcp } = self;
        let upstreams = match config.upstreams.is_empty() {
            true => host_upstreams(),
            false => config.upstreams.clone(),
        };
        if upstreams.is_empty() {
            tracing::warn!("no upstream resolvers: names outside {zone} will get SERVFAIL");
        }
        let index = Arc::new(RwLock::new(index::Index::new(&zone, config.ttl)));
        watch::start(client, index.clone(), shutdown.clone());
        let handler = Arc::new(server::Handler {
            index,
            forwarder: forward::Forwarder::new(upstreams.clone(), config.forward_timeout),
        });
        tracing::info!(listen = %config.listen, %zone, ?upstreams, "cluster DNS serving");
        tokio::join!(
            server::serve_udp(udp, handler.clone(), shutdown.clone()),
            server::serve_tcp(tcp, handler, shutdown),
        );
        Ok(())
    }
}

/// Serves cluster DNS on `config.listen` (UDP and TCP) until `shutdown`.
pub async fn run(client: kube::Client, config: Config, shutdown: CancellationToken) -> Result<()> {
    Server::bind(config).await?.serve(client, shutdown).await
}
