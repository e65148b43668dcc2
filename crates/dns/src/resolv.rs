//! resolv.conf both ways: the host's, read for the resolvers we forward to, and the pod's, as the
//! kubelet writes it for each DNS policy so pods find the cluster DNS.

use std::net::{IpAddr, SocketAddr};

use k8s_openapi::api::core::v1::Pod;

/// The kubelet's limits (Kubernetes 1.28+): glibc reads 3 nameservers; search is capped at 32
/// domains and 2048 characters.
const NAMESERVERS_MAX: usize = 3;
const SEARCH_DOMAINS_MAX: usize = 32;
const SEARCH_CHARS_MAX: usize = 2048;

/// The parts of a resolv.conf that matter here.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ResolvConf {
    pub nameservers: Vec<String>,
    pub searches: Vec<String>,
    pub options: Vec<String>,
}

impl ResolvConf {
    /// Parses resolv.conf text; unknown lines and comments are skipped, and as in glibc the
    /// last `search` (or `domain`) line wins.
    pub fn parse(text: &str) -> ResolvConf {
        let mut conf = ResolvConf::default();
        for line in text.lines() {
            let line = line.split(['#', ';']).next().unwrap_or_default();
            let mut words = line.split_whitespace();
            match words.next() {
                Some("nameserver") => conf.nameservers.extend(words.next().map(String::from)),
                Some("search" | "domain") => conf.searches = words.map(String::from).collect(),
                Some("options") => conf.options.extend(words.map(String::from)),
                _ => {}
            }
        }
        conf
    }

    /// The text of this resolv.conf, in the kubelet's order.
    pub fn render(&self) -> String {
        let mut out = String::new();
        if !self.searches.is_empty() {
            out += &format!("search {}\n", self.searches.join(" "));
        }
        for ns in &self.nameservers {
            out += &format!("nameserver {ns}\n");
        }
        if !self.options.is_empty() {
            out += &format!("options {}\n", self.options.join(" "));
        }
        out
    }
}

/// The resolvers to forward to from a host resolv.conf: its nameservers on port 53, without
/// loopback ones, which are local stubs (systemd-resolved's 127.0.0.53) that would either be
/// unreachable from pods or send queries back to us in a loop.
pub fn upstreams_from(conf: &ResolvConf) -> Vec<SocketAddr> {
    conf.nameservers
        .iter()
        .filter_map(|ns| ns.parse::<IpAddr>().ok())
        .filter(|ip| !ip.is_loopback() && !ip.is_unspecified())
        .map(|ip| SocketAddr::new(ip, 53))
        .collect()
}

/// The host's resolvers: /etc/resolv.conf, or, when that names only a local stub,
/// systemd-resolved's list of the real ones (what the kubelet does too).
pub fn host_upstreams() -> Vec<SocketAddr> {
    ["/etc/resolv.conf", "/run/systemd/resolve/resolv.conf"]
        .iter()
        .filter_map(|p| std::fs::read_to_string(p).ok())
        .map(|text| upstreams_from(&ResolvConf::parse(&text)))
        .find(|u| !u.is_empty())
        .unwrap_or_default()
}

/// A pod's resolv.conf under `dnsPolicy: ClusterFirst`: the pod's namespace first in search,
/// then the cluster domain, then the host's search domains; the cluster DNS as nameserver;
/// `ndots:5` so that `svc` and `svc.ns` are tried inside the cluster before as absolute names.
pub fn resolv_conf(
    namespace: &str,
    domain: &str,
    nameserver: &str,
    host_search: &[String],
) -> String {
    cluster_first(namespace, domain, &[nameserver.to_string()], host_search).render()
}

fn cluster_first(
    namespace: &str,
    domain: &str,
    nameservers: &[String],
    host_search: &[String],
) -> ResolvConf {
    let mut searches =
        vec![format!("{namespace}.svc.{domain}"), format!("svc.{domain}"), domain.to_string()];
    searches.extend(host_search.iter().cloned());
    ResolvConf {
        nameservers: nameservers.to_vec(),
        searches: limit_searches(dedup(searches)),
        options: vec!["ndots:5".into()],
    }
}

/// A pod's resolv.conf for any DNS policy, as the kubelet computes it:
/// - `ClusterFirst` (the default): as [`resolv_conf`]; a hostNetwork pod falls back to `Default`.
/// - `ClusterFirstWithHostNet`: `ClusterFirst`, host network or not.
/// - `Default`: the host's resolv.conf (the node's, not the cluster's DNS).
/// - `None`: only what `dnsConfig` says.
///
/// `dnsConfig` is then merged in for every policy: nameservers and searches appended, options
/// replacing same-named ones. `cluster_dns` empty (no cluster DNS configured) also falls back to
/// `Default`, as the kubelet does.
pub fn pod_resolv_conf(
    pod: &Pod,
    domain: &str,
    cluster_dns: &[String],
    host: &ResolvConf,
) -> String {
    let spec = pod.spec.clone().unwrap_or_default();
    let namespace = pod.metadata.namespace.as_deref().unwrap_or("default");
    let host_network = spec.host_network == Some(true);
    let mut conf = match spec.dns_policy.as_deref().unwrap_or("ClusterFirst") {
        "None" => ResolvConf::default(),
        "Default" => host.clone(),
        "ClusterFirstWithHostNet" if !cluster_dns.is_empty() => {
            cluster_first(namespace, domain, cluster_dns, &host.searches)
        }
        "ClusterFirst" if !host_network && !cluster_dns.is_empty() => {
            cluster_first(namespace, domain, cluster_dns, &host.searches)
        }
        _ => host.clone(),
    };
    if let Some(extra) = spec.dns_config {
        conf.nameservers.extend(extra.nameservers.into_iter().flatten());
        conf.searches.extend(extra.searches.into_iter().flatten());
        for opt in extra.options.into_iter().flatten() {
            let Some(name) = opt.name else { continue };
            conf.options.retain(|o| o.split(':').next() != Some(name.as_str()));
            conf.options.push(match opt.value {
                Some(v) => format!("{name}:{v}"),
                None => name,
            });
        }
    }
    conf.nameservers = dedup(conf.nameservers);
    conf.nameservers.truncate(NAMESERVERS_MAX);
    conf.searches = limit_searches(dedup(conf.searches));
    conf.render()
}

fn dedup(items: Vec<String>) -> Vec<String> {
    let mut out: Vec<String> = Vec::with_capacity(items.len());
    for i in items {
        if !out.contains(&i) {
            out.push(i);
        }
    }
    out
}

/// Keeps the leading search domains that fit the kubelet's limits.
fn limit_searches(searches: Vec<String>) -> Vec<String> {
    let mut chars = 0;
    let mut out = Vec::new();
    for s in searches.into_iter().take(SEARCH_DOMAINS_MAX) {
        chars += s.len() + usize::from(!out.is_empty());
        if chars > SEARCH_CHARS_MAX {
            break;
        }
        out.push(s);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{PodDNSConfig, PodDNSConfigOption, PodSpec};

    fn pod(policy: Option<&str>, host_network: bool, dns_config: Option<PodDNSConfig>) -> Pod {
        let mut p = Pod::default();
        p.metadata.namespace = Some("shop".into());
        p.spec = Some(PodSpec {
            dns_policy: policy.map(String::from),
            host_network: Some(host_network),
            dns_config,
            ..Default::default()
        });
        p
    }

    fn host() -> ResolvConf {
        ResolvConf::parse(
            "# generated\nnameserver 192.0.2.53\nnameserver 127.0.0.53\nsearch corp.example lab.example\noptions edns0 trust-ad\n",
        )
    }

    #[test]
    fn cluster_first_searches_the_namespace_then_the_cluster_then_the_host() {
        let text = resolv_conf("shop", "cluster.local", "10.96.0.10", &["corp.example".into()]);
        assert_eq!(
            text,
            "search shop.svc.cluster.local svc.cluster.local cluster.local corp.example\n\
             nameserver 10.96.0.10\noptions ndots:5\n"
        );
    }

    #[test]
    fn the_default_policy_copies_the_host_resolv_conf() {
        let text = pod_resolv_conf(
            &pod(Some("Default"), false, None),
            "cluster.local",
            &["10.96.0.10".into()],
            &host(),
        );
        assert_eq!(
            text,
            "search corp.example lab.example\nnameserver 192.0.2.53\nnameserver 127.0.0.53\n\
             options edns0 trust-ad\n"
        );
    }

    #[test]
    fn a_host_network_pod_under_cluster_first_uses_the_host_dns() {
        let dns = ["10.96.0.10".to_string()];
        let text = pod_resolv_conf(&pod(None, true, None), "cluster.local", &dns, &host());
        assert!(text.contains("nameserver 192.0.2.53"), "{text}");
        let text = pod_resolv_conf(
            &pod(Some("ClusterFirstWithHostNet"), true, None),
            "cluster.local",
            &dns,
            &host(),
        );
        assert!(text.starts_with("search shop.svc.cluster.local "), "{text}");
        assert!(text.contains("nameserver 10.96.0.10\n"), "{text}");
    }

    #[test]
    fn policy_none_takes_only_the_dns_config_and_options_override_by_name() {
        let cfg = PodDNSConfig {
            nameservers: Some(vec!["1.1.1.1".into(), "1.1.1.1".into()]),
            searches: Some(vec!["a.example".into()]),
            options: Some(vec![
                PodDNSConfigOption { name: Some("ndots".into()), value: Some("2".into()) },
                PodDNSConfigOption { name: Some("edns0".into()), value: None },
            ]),
        };
        let text = pod_resolv_conf(
            &pod(Some("None"), false, Some(cfg.clone())),
            "cluster.local",
            &[],
            &host(),
        );
        assert_eq!(text, "search a.example\nnameserver 1.1.1.1\noptions ndots:2 edns0\n");
        let text = pod_resolv_conf(
            &pod(None, false, Some(cfg)),
            "cluster.local",
            &["10.96.0.10".into()],
            &host(),
        );
        assert!(text.ends_with("options ndots:2 edns0\n"), "{text}");
        assert!(text.contains("nameserver 10.96.0.10\nnameserver 1.1.1.1\n"), "{text}");
    }

    #[test]
    fn search_domains_are_capped_as_the_kubelet_caps_them() {
        let many: Vec<String> = (0..40).map(|i| format!("d{i}.example")).collect();
        let text = resolv_conf("ns", "cluster.local", "10.96.0.10", &many);
        let search = text.lines().next().unwrap_or_default();
        assert_eq!(search.split_whitespace().count() - 1, SEARCH_DOMAINS_MAX);
    }

    #[test]
    fn loopback_stub_resolvers_are_not_upstreams() {
        assert_eq!(upstreams_from(&host()), vec!["192.0.2.53:53".parse().unwrap()]);
        let stub_only = ResolvConf::parse("nameserver 127.0.0.53\nnameserver ::1\n");
        assert!(upstreams_from(&stub_only).is_empty());
    }
}
