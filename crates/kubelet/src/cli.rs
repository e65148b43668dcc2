//! `rkube agent --kubeconfig … --node-name …`: the node agent as its own process.

use std::path::PathBuf;

use k8s_openapi::api::core::v1::Taint;

use crate::{Config, RuntimeKind};

#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    /// Kubeconfig of the API server to join.
    #[arg(long)]
    pub kubeconfig: Option<PathBuf>,
    /// Name of the Node object (default: the host name).
    #[arg(long)]
    pub node_name: Option<String>,
    /// Where pod logs and working directories live.
    #[arg(long, default_value = "rkube-kubelet")]
    pub data_dir: PathBuf,
    #[arg(long, value_enum, default_value_t = RuntimeKind::Process)]
    pub runtime: RuntimeKind,
    /// An extended resource the node offers, e.g. `nvidia.com/gpu=2` (repeatable).
    #[arg(long = "extended-resource")]
    pub extended_resources: Vec<String>,
    /// Labels added to the node: `key=value,key2=value2`.
    #[arg(long, value_delimiter = ',')]
    pub node_labels: Vec<String>,
    /// Taints the node registers with: `key=value:Effect` (comma separated).
    #[arg(long, value_delimiter = ',')]
    pub register_with_taints: Vec<String>,
    /// Lease duration in seconds (renewed every quarter of it).
    #[arg(long, default_value_t = 40)]
    pub node_lease_duration_seconds: u64,
    /// The node's address (InternalIP), also the address of host-network pods.
    #[arg(long, default_value = "127.0.0.1")]
    pub node_ip: String,
    /// oci runtime: a registry reached over plain HTTP, `host:port` (repeatable).
    #[arg(long = "insecure-registry")]
    pub insecure_registries: Vec<String>,
    /// oci runtime: where images are stored (default: `<data-dir>/images`).
    #[arg(long)]
    pub image_dir: Option<PathBuf>,
    /// The cluster's pod network (pod traffic to it is not masqueraded).
    #[arg(long, default_value = "10.244.0.0/16")]
    pub cluster_cidr: String,
    /// The cluster DNS address written into pods' resolv.conf.
    #[arg(long, default_value = "10.96.0.10")]
    pub cluster_dns: String,
    #[arg(long, default_value = "cluster.local")]
    pub cluster_domain: String,
    /// oci runtime: the disk usage (percent) at which unused images are collected.
    #[arg(long, default_value_t = 85, value_parser = clap::value_parser!(u8).range(0..=100))]
    pub image_gc_high_threshold: u8,
    /// oci runtime: the disk usage (percent) image collection frees down to.
    #[arg(long, default_value_t = 80, value_parser = clap::value_parser!(u8).range(0..=100))]
    pub image_gc_low_threshold: u8,
    /// Run N hollow nodes in this process instead of one real node (kwok-style: pods go
    /// Running without running anything). `--node-name`, `--runtime` and `--data-dir` do not
    /// apply; labels, taints, extended resources and the lease duration do.
    #[arg(long, value_name = "N")]
    pub simulate: Option<usize>,
    /// Hollow nodes are named `<prefix>0` … `<prefix>N-1`.
    #[arg(long, default_value = "hollow-")]
    pub simulate_prefix: String,
    /// Seconds a run-to-completion pod (restartPolicy Never or OnFailure) runs on a hollow node
    /// before it succeeds.
    #[arg(long, default_value_t = 5.0)]
    pub simulate_complete_after: f64,
    /// Each hollow node's CPUs, memory and pod capacity.
    #[arg(long, default_value = "32")]
    pub simulate_cpu: String,
    #[arg(long, default_value = "256Gi")]
    pub simulate_memory: String,
    #[arg(long, default_value_t = 110)]
    pub simulate_max_pods: i64,
    /// Pod writes (status, deletions) the hollow nodes have in flight at once.
    #[arg(long, default_value_t = 32)]
    pub simulate_max_in_flight: usize,
}

fn kv(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .ok_or_else(|| format!("expected key=value, got {s}"))
}

pub fn parse_taint(s: &str) -> Result<Taint, String> {
    let (kv_part, effect) =
        s.rsplit_once(':').ok_or_else(|| format!("taint {s}: expected key[=value]:Effect"))?;
    if !matches!(effect, "NoSchedule" | "PreferNoSchedule" | "NoExecute") {
        return Err(format!("taint {s}: effect must be NoSchedule, PreferNoSchedule or NoExecute"));
    }
    let (key, value) = match kv_part.split_once('=') {
        Some((k, v)) => (k.to_string(), Some(v.to_string())),
        None => (kv_part.to_string(), None),
    };
    Ok(Taint { key, value, effect: effect.to_string(), time_added: None })
}

impl Args {
    pub fn config(&self) -> Result<Config, String> {
        let mut c =
            Config { data_dir: self.data_dir.clone(), runtime: self.runtime, ..Config::default() };
        if let Some(n) = &self.node_name {
            c.node_name = n.clone();
        }
        for e in &self.extended_resources {
            c.extended_resources.push(kv(e)?);
        }
        for l in self.node_labels.iter().filter(|l| !l.is_empty()) {
            let (k, v) = kv(l)?;
            c.labels.insert(k, v);
        }
        for t in self.register_with_taints.iter().filter(|t| !t.is_empty()) {
            c.taints.push(parse_taint(t)?);
        }
        c.lease_duration = std::time::Duration::from_secs(self.node_lease_duration_seconds.max(4));
        c.node_ip = self.node_ip.clone();
        c.insecure_registries = self.insecure_registries.clone();
        c.image_dir = self.image_dir.clone();
        c.cluster_cidr = self.cluster_cidr.clone();
        c.cluster_dns = self.cluster_dns.clone();
        c.cluster_domain = self.cluster_domain.clone();
        if self.image_gc_low_threshold > self.image_gc_high_threshold {
            return Err(format!(
                "--image-gc-low-threshold ({}) must not exceed --image-gc-high-threshold ({})",
                self.image_gc_low_threshold, self.image_gc_high_threshold
            ));
        }
        c.image_gc_high_threshold = self.image_gc_high_threshold;
        c.image_gc_low_threshold = self.image_gc_low_threshold;
        // The oci runtime's shim is this very binary's hidden subcommand.
        if let Ok(exe) = std::env::current_exe() {
            c.runc_shim = vec![exe.to_string_lossy().into_owned(), "runc-shim".into()];
            c.process_init =
                vec![exe.to_string_lossy().into_owned(), crate::procinit::SUBCOMMAND.into()];
        }
        Ok(c)
    }
}

impl Args {
    /// The hollow nodes' configuration, when `--simulate` asks for them.
    pub fn hollow_config(&self) -> Result<Option<crate::hollow::HollowConfig>, String> {
        let Some(count) = self.simulate else { return Ok(None) };
        let c = self.config()?;
        if !(self.simulate_complete_after.is_finite() && self.simulate_complete_after >= 0.0) {
            return Err("--simulate-complete-after must be a number of seconds".into());
        }
        Ok(Some(crate::hollow::HollowConfig {
            count,
            name_prefix: self.simulate_prefix.clone(),
            complete_after: std::time::Duration::from_secs_f64(self.simulate_complete_after),
            lease_duration: c.lease_duration,
            status_report_frequency: c.status_report_frequency,
            cpu: self.simulate_cpu.clone(),
            memory: self.simulate_memory.clone(),
            max_pods: self.simulate_max_pods,
            extended_resources: c.extended_resources,
            labels: c.labels,
            taints: c.taints,
            node_ip: c.node_ip,
            max_in_flight: self.simulate_max_in_flight.max(1),
            ..Default::default()
        }))
    }
}

pub async fn run(args: Args) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let config = args.config()?;
    let hollow = args.hollow_config()?;
    let client = rkube_client::client_from(args.kubeconfig.as_deref()).await?;
    let shutdown = rkube_client::shutdown_on_signal();
    match hollow {
        Some(h) => crate::hollow::run(client, h, shutdown).await?,
        None => crate::run_with_client(client, config, shutdown).await?,
    }
    Ok(())
}
