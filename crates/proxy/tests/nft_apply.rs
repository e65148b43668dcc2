//! The rendered text is accepted by the real nft, applies again over itself, and `cleanup`
//! removes it: inside a throwaway network namespace.

mod common;

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use rkube_proxy::{Config, RulesConfig, cleanup, render};
use serde_json::json;

/// Services exercising every feature the renderer has, with their slices.
fn everything() -> (Vec<Service>, Vec<EndpointSlice>) {
    let svc = |name: &str, ip: &str, extra: serde_json::Value| -> Service {
        let mut v = json!({"metadata": {"namespace": "default", "name": name},
            "spec": {"clusterIP": ip, "ports": [{"name": "p", "port": 80}]}});
        for (k, x) in extra.as_object().expect("object") {
            v["spec"][k] = x.clone();
        }
        serde_json::from_value(v).expect("service")
    };
    let slice = |svc: &str, ips: &[(&str, &str)], proto: &str| -> EndpointSlice {
        let eps: Vec<_> =
            ips.iter().map(|(ip, node)| json!({"addresses": [ip], "nodeName": node})).collect();
        serde_json::from_value(json!({
            "metadata": {"namespace": "default", "name": format!("{svc}-1"),
                         "labels": {"kubernetes.io/service-name": svc}},
            "addressType": "IPv4", "endpoints": eps,
            "ports": [{"name": "p", "port": 8080, "protocol": proto}]
        }))
        .expect("slice")
    };
    let np =
        |n: i32, proto: &str| json!([{"name": "p", "port": 80, "nodePort": n, "protocol": proto}]);
    let mut services = vec![
        svc("plain", "10.96.0.50", json!({})),
        svc("empty", "10.96.0.51", json!({"type": "NodePort", "ports": np(30051, "TCP")})),
        svc("sticky", "10.96.0.52", json!({"sessionAffinity": "ClientIP"})),
        svc(
            "etp",
            "10.96.0.53",
            json!({"type": "LoadBalancer", "externalTrafficPolicy": "Local",
            "externalIPs": ["192.0.2.1"], "ports": np(30053, "TCP"),
            "loadBalancerSourceRanges": ["203.0.113.0/24", "198.51.100.9/32"]}),
        ),
        svc(
            "etp-none",
            "10.96.0.54",
            json!({"type": "NodePort", "externalTrafficPolicy": "Local",
            "ports": np(30054, "UDP")}),
        ),
        svc("itp", "10.96.0.55", json!({"internalTrafficPolicy": "Local"})),
        svc("sctp", "10.96.0.56", json!({"type": "NodePort", "ports": np(30056, "SCTP")})),
    ];
    // The load balancer's address, as a cloud controller would report it.
    services[3].status = Some(
        serde_json::from_value(json!({"loadBalancer": {"ingress": [{"ip": "198.51.100.7"}]}}))
            .expect("status"),
    );
    let slices = vec![
        slice("plain", &[("10.244.1.5", "node-a"), ("10.244.2.5", "node-b")], "TCP"),
        slice("sticky", &[("10.244.1.5", "node-a"), ("10.244.2.5", "node-b")], "TCP"),
        slice("etp", &[("10.244.1.5", "node-a"), ("10.244.2.5", "node-b")], "TCP"),
        slice("etp-none", &[("10.244.2.5", "node-b")], "UDP"),
        slice("itp", &[("10.244.2.5", "node-b")], "TCP"),
        slice("sctp", &[("10.244.1.5", "node-a")], "SCTP"),
    ];
    (services, slices)
}

#[tokio::test]
async fn every_feature_renders_text_that_nft_applies_repeatedly_and_cleanup_removes() {
    let Some(ns) = common::Netns::create("every_feature_renders_text_that_nft_applies") else {
        return;
    };
    let rules = RulesConfig {
        node_name: "node-a".into(),
        cluster_cidr: Some("10.244.0.0/16".parse().expect("cidr")),
        ..RulesConfig::default()
    };
    let config = Config { rules: rules.clone(), nft: ns.nft_command(), ..Config::default() };
    let (services, slices) = everything();
    let set = render(&services, &slices, &rules);
    assert!(set.skipped.is_empty(), "{:?}", set.skipped);

    rkube_proxy::apply(&config, &set.text).await.unwrap_or_else(|e| panic!("{e}\n{}", set.text));
    // Over an existing table (what a restart after a crash does).
    rkube_proxy::apply(&config, &set.text).await.expect("apply again");
    let listed = ns.exec(&["nft", "list", "table", "ip", "rkube"]);
    let listed = String::from_utf8_lossy(&listed.stdout);
    for want in [
        "chain service-default/plain/tcp/p",
        "chain local-default/etp/tcp/p",
        "set affinity-default/sticky/tcp/p__10.244.1.5/8080",
        "10.96.0.51 . tcp . 80 : goto reject-chain",
        "udp . 30054 : drop",
        "sctp . 30056 : goto external-default/sctp/sctp/p",
        "198.51.100.7 . tcp . 80 : goto firewall-default/etp/tcp/p",
    ] {
        assert!(listed.contains(want), "missing {want:?} in\n{listed}");
    }

    cleanup(&config).await.expect("cleanup");
    let after = ns.exec(&["nft", "list", "tables"]);
    assert!(!String::from_utf8_lossy(&after.stdout).contains("rkube"));
    cleanup(&config).await.expect("cleanup is idempotent");
}
