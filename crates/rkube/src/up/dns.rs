//! The cluster add-ons the control plane runs beside itself: the cluster DNS (answering on the
//! node's address and published as `kube-system/kube-dns` at 10.96.0.10, so `kubectl
//! cluster-info` lists it and the proxy routes pods' queries to it) and the Service proxy's
//! settings.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use kube::Client;
use tokio_util::sync::CancellationToken;

#[derive(clap::Args, Debug, Clone, Default)]
pub struct DnsArgs {
    /// The address the cluster DNS answers on (port 53 as root, 10053 otherwise) and which
    /// `kube-system/kube-dns` points at; pods must be able to reach it. Default: this
    /// machine's first global IPv4 address, else 127.0.0.1.
    #[arg(long)]
    pub cluster_dns_address: Option<IpAddr>,
    /// The port it answers on (default 53 as root, 10053 otherwise).
    #[arg(long)]
    pub cluster_dns_port: Option<u16>,
    /// Do not run the cluster DNS.
    #[arg(long)]
    pub disable_dns: bool,
}

/// This machine's first global IPv4 address that is not a pod bridge or veth, from iproute2.
pub fn first_global_ipv4() -> Option<IpAddr> {
    let out = std::process::Command::new("ip")
        .args(["-4", "-o", "addr", "show", "scope", "global"])
        .output()
        .ok()?;
    String::from_utf8_lossy(&out.stdout).lines().find_map(|l| {
        let mut w = l.split_whitespace();
        let ifname = w.nth(1)?;
        if ifname.starts_with("rkb") || ifname.starts_with("veth") {
            return None;
        }
        let addr = w.skip_while(|x| *x != "inet").nth(1)?;
        addr.split('/').next()?.parse().ok()
    })
}

/// Starts the cluster DNS in the background and publishes kube-dns; `None` when disabled or
/// when its port is taken (a warning says so — the cluster works without names).
pub async fn start(
    client: Client,
    args: &DnsArgs,
    stop: CancellationToken,
) -> Option<tokio::task::JoinHandle<()>> {
    if args.disable_dns {
        return None;
    }
    let root = nix::unistd::Uid::effective().is_root();
    let ip =
        args.cluster_dns_address.or_else(first_global_ipv4).unwrap_or(IpAddr::from([127, 0, 0, 1]));
    let port = args.cluster_dns_port.unwrap_or(if root { 53 } else { 10053 });
    let config =
        rkube_dns::Config { listen: SocketAddr::new(ip, port), ..rkube_dns::Config::default() };
    let server = match rkube_dns::Server::bind(config).await {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!("cluster DNS not started on {ip}:{port}: {e}");
            return None;
        }
    };
    tracing::info!("cluster DNS on {ip}:{port}, published as kube-system/kube-dns 10.96.0.10");
    let publish = {
        let (client, stop) = (client.clone(), stop.clone());
        async move {
            let mut delay = Duration::from_millis(200);
            loop {
                let ip_text = ip.to_string();
                match rkube_dns::ensure_service(
                    client.clone(),
                    rkube_dns::DEFAULT_CLUSTER_IP,
                    &ip_text,
                    port,
                )
                .await
                {
                    Ok(()) => return,
                    Err(e) => tracing::debug!("publish kube-dns (retrying): {e}"),
                }
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(delay) => {}
                }
                delay = (delay * 2).min(Duration::from_secs(10));
            }
        }
    };
    Some(tokio::spawn(async move {
        tokio::spawn(publish);
        if let Err(e) = server.serve(client, stop).await {
            tracing::error!("cluster DNS stopped: {e}");
        }
    }))
}

/// The Service proxy of node `node_name` on a machine whose pods live in `cluster_cidr`.
pub fn proxy_config(node_name: &str, cluster_cidr: &str) -> rkube_proxy::Config {
    let mut c = rkube_proxy::Config::default();
    c.rules.node_name = node_name.to_lowercase();
    c.rules.cluster_cidr = cluster_cidr.parse().ok();
    // In-place changes go straight to nf_tables (nft lists the whole table before each one).
    c.netlink = Some(rkube_proxy::Netlink::Current);
    c
}
