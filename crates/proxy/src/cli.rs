//! `rkube proxy --kubeconfig … --cluster-cidr …`: the Service proxy as its own process, with
//! upstream kube-proxy's flag names where the meaning is the same.

use std::path::PathBuf;
use std::time::Duration;

use crate::{Config, Error, Ipv4Cidr, Result, RulesConfig};

#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    /// Kubeconfig of the API server to watch (default: in-cluster, $KUBECONFIG, ~/.kube/config).
    #[arg(long)]
    pub kubeconfig: Option<PathBuf>,
    /// This node's name, as the kubelet registered it (default: the hostname).
    #[arg(long)]
    pub hostname_override: Option<String>,
    /// The pod network; traffic to a ClusterIP from outside it is masqueraded.
    #[arg(long)]
    pub cluster_cidr: Option<String>,
    /// Comma-separated prefixes; NodePorts answer only on local addresses inside them
    /// (default: every local address but 127.0.0.0/8).
    #[arg(long, value_delimiter = ',')]
    pub nodeport_addresses: Vec<String>,
    /// Masquerade all traffic sent to ClusterIPs.
    #[arg(long)]
    pub masquerade_all: bool,
    /// The nftables table (family ip) the proxy owns and replaces.
    #[arg(long, default_value = "rkube")]
    pub nftables_table: String,
    /// The nft program.
    #[arg(long, default_value = "nft")]
    pub nft_path: String,
    /// Apply in-place changes over netlink (`false`: always through the nft program, which
    /// lists the whole table before each change).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub netlink: bool,
    /// The conntrack program, used to end UDP flows to removed endpoints.
    #[arg(long, default_value = "conntrack")]
    pub conntrack_path: String,
    /// Least time between two rule applies, e.g. 1s or 500ms.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    pub min_sync_period: Duration,
    /// How often to check that the table is still installed, e.g. 30s.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub sync_period: Duration,
    /// How often the table is replaced whole instead of changed in place, clearing anything
    /// else that altered it, e.g. 1h.
    #[arg(long, default_value = "1h", value_parser = parse_duration)]
    pub full_sync_period: Duration,
    /// Delete the proxy's table and exit.
    #[arg(long)]
    pub cleanup: bool,
}

/// `100ms`, `1s`, `5m`, `1h`; a bare number is seconds.
pub fn parse_duration(s: &str) -> Result<Duration> {
    let bad = || Error::InvalidDuration(s.to_string());
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num.parse().map_err(|_| bad())?;
    let ms = match unit {
        "ms" => Some(n),
        "" | "s" => n.checked_mul(1000),
        "m" => n.checked_mul(60_000),
        "h" => n.checked_mul(3_600_000),
        _ => None,
    };
    ms.map(Duration::from_millis).ok_or_else(bad)
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_lowercase())
        .unwrap_or_default()
}

impl Args {
    pub fn config(&self) -> Result<Config> {
        let node_name = match &self.hostname_override {
            Some(n) => n.trim().to_lowercase(),
            None => hostname(),
        };
        let cluster_cidr = self.cluster_cidr.as_deref().map(str::parse).transpose()?;
        let nodeport_cidrs = self
            .nodeport_addresses
            .iter()
            .filter(|s| !s.trim().is_empty())
            .map(|s| s.parse::<Ipv4Cidr>())
            .collect::<Result<Vec<_>>>()?;
        Ok(Config {
            rules: RulesConfig {
                table: self.nftables_table.clone(),
                node_name,
                cluster_cidr,
                nodeport_cidrs,
                masquerade_all: self.masquerade_all,
            },
            nft: vec![self.nft_path.clone()],
            conntrack: vec![self.conntrack_path.clone()],
            min_sync_period: self.min_sync_period,
            check_period: self.sync_period,
            full_sync_period: self.full_sync_period,
            netlink: self.netlink.then_some(crate::Netlink::Current),
            ..Config::default()
        })
    }
}

pub async fn run_cli(args: Args) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let config = args.config()?;
    if args.cleanup {
        crate::cleanup(&config).await?;
        tracing::info!(table = %config.rules.table, "proxy: table removed");
        return Ok(());
    }
    if config.rules.cluster_cidr.is_none() && !config.rules.masquerade_all {
        tracing::warn!(
            "proxy: no --cluster-cidr: ClusterIP traffic from outside the pod network is not masqueraded"
        );
    }
    let client = rkube_client::client_from(args.kubeconfig.as_deref()).await?;
    let shutdown = rkube_client::shutdown_on_signal();
    crate::run(client, config, shutdown).await?;
    Ok(())
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
    fn durations_take_the_usual_units() {
        assert_eq!(parse_duration("100ms").ok(), Some(Duration::from_millis(100)));
        assert_eq!(parse_duration("2s").ok(), Some(Duration::from_secs(2)));
        assert_eq!(parse_duration("3").ok(), Some(Duration::from_secs(3)));
        assert_eq!(parse_duration("5m").ok(), Some(Duration::from_secs(300)));
        assert!(parse_duration("1.5s").is_err());
        assert!(parse_duration("s").is_err());
    }

    #[test]
    fn flags_become_the_proxy_config() {
        let cmd = Cmd::try_parse_from([
            "proxy",
            "--hostname-override",
            "Node-A",
            "--cluster-cidr",
            "10.244.0.0/16",
            "--nodeport-addresses",
            "192.168.0.0/16,10.0.0.1/32",
            "--min-sync-period",
            "250ms",
            "--full-sync-period",
            "10m",
        ])
        .expect("parse");
        let c = cmd.args.config().expect("config");
        assert_eq!(c.rules.node_name, "node-a");
        assert_eq!(c.rules.cluster_cidr.map(|c| c.to_string()).as_deref(), Some("10.244.0.0/16"));
        assert_eq!(c.rules.nodeport_cidrs.len(), 2);
        assert_eq!(c.rules.table, "rkube");
        assert_eq!(c.nft, vec!["nft".to_string()]);
        assert_eq!(c.min_sync_period, Duration::from_millis(250));
        assert_eq!(c.full_sync_period, Duration::from_secs(600));
        assert_eq!(c.netlink, Some(crate::Netlink::Current));
        let nft_only = Cmd::try_parse_from(["proxy", "--netlink", "false"]).expect("parse");
        assert_eq!(nft_only.args.config().expect("config").netlink, None);
    }

    #[test]
    fn a_bad_cluster_cidr_is_refused() {
        let cmd = Cmd::try_parse_from(["proxy", "--cluster-cidr", "10.244.0.0/40"]).expect("parse");
        assert!(matches!(cmd.args.config(), Err(Error::InvalidCidr(_))));
    }
}
