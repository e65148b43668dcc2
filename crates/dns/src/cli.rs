//! `rkube dns --kubeconfig …`: the cluster DNS as its own process.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::{Config, Error, Result};

#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    /// Kubeconfig of the API server to watch.
    #[arg(long)]
    pub kubeconfig: Option<PathBuf>,
    /// Address to serve DNS on, UDP and TCP.
    #[arg(long, default_value = "0.0.0.0:53")]
    pub listen: SocketAddr,
    /// The cluster domain.
    #[arg(long, default_value = "cluster.local")]
    pub domain: String,
    /// Resolver for names outside the cluster (`ip` or `ip:port`; repeat for more). Default:
    /// the host's /etc/resolv.conf, without loopback stubs.
    #[arg(long = "upstream", value_parser = parse_upstream)]
    pub upstreams: Vec<SocketAddr>,
    /// TTL of cluster records, in seconds.
    #[arg(long, default_value_t = 5)]
    pub ttl: u64,
    /// Also publish the `kube-system/kube-dns` Service and an EndpointSlice pointing at this
    /// address (the node's address pods can reach), so pods find us at `--cluster-ip`.
    #[arg(long)]
    pub advertise_address: Option<String>,
    /// The kube-dns Service's ClusterIP (the nameserver the kubelet gives pods).
    #[arg(long, default_value = crate::DEFAULT_CLUSTER_IP)]
    pub cluster_ip: String,
}

fn parse_upstream(s: &str) -> Result<SocketAddr, String> {
    if let Ok(addr) = s.parse::<SocketAddr>() {
        return Ok(addr);
    }
    s.trim_start_matches('[')
        .trim_end_matches(']')
        .parse::<std::net::IpAddr>()
        .map(|ip| SocketAddr::new(ip, 53))
        .map_err(|_| format!("{s:?} is not an address (ip or ip:port)"))
}

impl Args {
    pub fn config(&self) -> Config {
        Config {
            listen: self.listen,
            domain: self.domain.clone(),
            upstreams: self.upstreams.clone(),
            ttl: Duration::from_secs(self.ttl),
            ..Config::default()
        }
    }
}

pub async fn run_cli(args: Args) -> Result<()> {
    let client =
        rkube_client::client_from(args.kubeconfig.as_deref()).await.map_err(Error::Client)?;
    let shutdown = rkube_client::shutdown_on_signal();
    let server = crate::Server::bind(args.config()).await?;
    if let Some(ip) = args.advertise_address.clone() {
        ip.parse::<std::net::IpAddr>().map_err(|_| Error::InvalidAddress(ip.clone()))?;
        let port = server.local_addr()?.port();
        let (client, cluster_ip, stop) =
            (client.clone(), args.cluster_ip.clone(), shutdown.clone());
        // In the background and retried: the API server may still be starting, and serving
        // DNS (forwarding, at least) need not wait for it.
        tokio::spawn(async move {
            let mut delay = Duration::from_millis(500);
            loop {
                match crate::ensure_service(client.clone(), &cluster_ip, &ip, port).await {
                    Ok(()) => return,
                    Err(e) => tracing::warn!("publish kube-system/kube-dns (retrying): {e}"),
                }
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(delay) => {}
                }
                delay = (delay * 2).min(Duration::from_secs(30));
            }
        });
    }
    server.serve(client, shutdown).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(clap::Parser)]
    struct Cmd {
        #[command(flatten)]
        args: Args,
    }

    #[test]
    fn upstreams_take_a_bare_address_or_one_with_a_port() {
        let cmd = Cmd::parse_from([
            "dns",
            "--upstream",
            "192.0.2.1",
            "--upstream",
            "192.0.2.2:5353",
            "--upstream",
            "[2001:db8::1]",
        ]);
        let want: Vec<SocketAddr> = vec![
            "192.0.2.1:53".parse().unwrap(),
            "192.0.2.2:5353".parse().unwrap(),
            "[2001:db8::1]:53".parse().unwrap(),
        ];
        assert_eq!(cmd.args.upstreams, want);
        assert_eq!(cmd.args.config().listen, "0.0.0.0:53".parse().unwrap());
        assert_eq!(cmd.args.config().ttl, Duration::from_secs(5));
    }
}
