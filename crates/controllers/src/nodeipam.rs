//! Node IPAM: gives every node a pod CIDR (`spec.podCIDR`, a /24 of `--cluster-cidr` by
//! default) once, so each kubelet can number its pods without asking anyone.

use std::collections::{BTreeSet, HashSet};
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Node;
use kube::api::{Patch, PatchParams};
use kube::{Api, Client, ResourceExt};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::informer::{Informers, next_pass};

/// An IPv4 network: base address and prefix length.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Cidr {
    pub base: Ipv4Addr,
    pub prefix: u8,
}

impl Cidr {
    /// Parses `10.244.0.0/16`; host bits must be zero, as upstream's flag validation wants.
    pub fn parse(s: &str) -> Option<Cidr> {
        let (ip, len) = s.trim().split_once('/')?;
        let base: Ipv4Addr = ip.parse().ok()?;
        let prefix: u8 = len.parse().ok().filter(|p| *p <= 32)?;
        let c = Cidr { base, prefix };
        (u32::from(base) & !c.mask() == 0).then_some(c)
    }

    fn mask(&self) -> u32 {
        if self.prefix == 0 { 0 } else { u32::MAX << (32 - self.prefix) }
    }

    /// The `index`-th subnet of length `prefix` inside this network.
    pub fn subnet(&self, prefix: u8, index: u32) -> Option<Cidr> {
        if prefix < self.prefix || prefix > 32 {
            return None;
        }
        let bits = prefix - self.prefix;
        if bits < 32 && index >= (1u32 << bits) {
            return None;
        }
        let step = if prefix == 32 { 1 } else { 1u32 << (32 - prefix) };
        let base = u32::from(self.base).checked_add(index.checked_mul(step)?)?;
        Some(Cidr { base: Ipv4Addr::from(base), prefix })
    }

    /// How many subnets of length `prefix` fit.
    pub fn count(&self, prefix: u8) -> u64 {
        if prefix < self.prefix { 0 } else { 1u64 << (prefix - self.prefix) }
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.base, self.prefix)
    }
}

/// The lowest free subnet, given the pod CIDRs nodes already hold.
pub fn next_free(cluster: Cidr, mask: u8, used: &BTreeSet<String>) -> Option<Cidr> {
    (0..cluster.count(mask).min(u32::MAX as u64) as u32)
        .filter_map(|i| cluster.subnet(mask, i))
        .find(|c| !used.contains(&c.to_string()))
}

pub async fn run(
    client: Client,
    inf: Informers,
    cluster: Cidr,
    mask: u8,
    recorder: rkube_client::events::Recorder,
    shutdown: CancellationToken,
) {
    let api: Api<Node> = Api::all(client);
    // Assigned in this process but perhaps not yet seen through the informer.
    let mut assigned: BTreeSet<String> = BTreeSet::new();
    let mut changed = inf.nodes_changed.clone();
    loop {
        let nodes = inf.nodes.state();
        let has_cidr = |n: &Node| n.spec.as_ref().and_then(|s| s.pod_cidr.as_ref()).is_some();
        // Nodes that need a CIDR, in name order. Usually none: a pass then costs one scan, not
        // a sort of every node (5,000 nodes sorted on every change took a third of a core).
        let mut needy: Vec<&Arc<Node>> = nodes.iter().filter(|n| !has_cidr(n)).collect();
        needy.sort_unstable_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
        let mut used: BTreeSet<String> = if needy.is_empty() {
            BTreeSet::new()
        } else {
            nodes
                .iter()
                .filter_map(|n| n.spec.as_ref()?.pod_cidr.clone())
                .chain(assigned.iter().cloned())
                .collect()
        };
        for node in needy {
            let name = node.name_any();
            let Some(cidr) = next_free(cluster, mask, &used) else {
                let msg = format!("Node {name} status is now: CIDRNotAvailable");
                let obj = rkube_client::events::reference(node.as_ref());
                recorder.record(&obj, "Normal", "CIDRNotAvailable", &msg).await;
                continue;
            };
            let patch =
                json!({"spec": {"podCIDR": cidr.to_string(), "podCIDRs": [cidr.to_string()]}});
            match api.patch(&name, &PatchParams::default(), &Patch::Merge(&patch)).await {
                Ok(_) => {
                    tracing::info!(node = %name, %cidr, "pod CIDR assigned");
                    used.insert(cidr.to_string());
                    assigned.insert(cidr.to_string());
                }
                Err(e) => tracing::warn!(node = %name, "assign pod CIDR: {e}"),
            }
        }
        // Forget what the informer now shows, so a deleted node's CIDR becomes free again.
        if !assigned.is_empty() {
            let shown: HashSet<&str> =
                nodes.iter().filter_map(|n| n.spec.as_ref()?.pod_cidr.as_deref()).collect();
            assigned.retain(|c| !shown.contains(c.as_str()));
        }
        if !next_pass(&mut changed, Duration::from_secs(30), &shutdown).await {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cluster_cidr_is_cut_into_node_subnets_in_order() {
        let c = Cidr::parse("10.244.0.0/16").unwrap();
        assert_eq!(c.subnet(24, 0).unwrap().to_string(), "10.244.0.0/24");
        assert_eq!(c.subnet(24, 255).unwrap().to_string(), "10.244.255.0/24");
        assert!(c.subnet(24, 256).is_none());
        assert_eq!(c.count(24), 256);
    }

    #[test]
    fn the_lowest_free_subnet_is_given_out() {
        let c = Cidr::parse("10.244.0.0/16").unwrap();
        let used: BTreeSet<String> =
            ["10.244.0.0/24", "10.244.2.0/24"].iter().map(|s| s.to_string()).collect();
        assert_eq!(next_free(c, 24, &used).unwrap().to_string(), "10.244.1.0/24");
        let small = Cidr::parse("10.0.0.0/23").unwrap();
        let full: BTreeSet<String> =
            ["10.0.0.0/24", "10.0.1.0/24"].iter().map(|s| s.to_string()).collect();
        assert!(next_free(small, 24, &full).is_none());
    }

    #[test]
    fn malformed_cidrs_are_refused() {
        assert!(Cidr::parse("10.244.0.1/16").is_none());
        assert!(Cidr::parse("10.244.0.0/33").is_none());
        assert!(Cidr::parse("10.244.0.0").is_none());
        assert!(Cidr::parse("banana/8").is_none());
    }
}
