//! The rendered text is accepted by the real nft, applies again over itself, and `cleanup`
//! removes it: inside a throwaway network namespace.

mod common;

use std::time::Duration;

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

/// The proxy's check that its table is still there asks the kernel for one chain by name over
/// netlink, and tells a present chain from a missing chain or table.
#[test]
fn netlink_finds_a_chain_by_name_and_reports_missing_ones() {
    let Some(ns) = common::Netns::create("netlink_finds_a_chain_by_name") else {
        return;
    };
    let path = std::path::PathBuf::from(format!("/run/netns/{}", ns.name));
    let mut sock = rkube_proxy::nl::Socket::open(Some(&path)).expect("netlink socket");
    let limit = Duration::from_secs(10);
    assert!(!sock.chain_exists("rkube", "reject-chain", limit).expect("no table"));
    let out = ns.exec(&["nft", "add table ip rkube; add chain ip rkube reject-chain"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(sock.chain_exists("rkube", "reject-chain", limit).expect("present"));
    assert!(!sock.chain_exists("rkube", "other-chain", limit).expect("missing chain"));
    // The same socket answers again (each request waits for its own reply).
    assert!(sock.chain_exists("rkube", "reject-chain", limit).expect("present again"));
    let out = ns.exec(&["nft", "delete table ip rkube"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(!sock.chain_exists("rkube", "reject-chain", limit).expect("table gone"));
}

/// `nft -j list table ip rkube` in `ns`, made comparable between two tables built by different
/// transactions: handles (allocation order) are dropped, set and map elements sorted (the
/// kernel lists hash sets in no fixed order), sets and chains sorted by name; rules keep their
/// order within their chain, which is what matters to packets.
fn canonical_table(ns: &common::Netns) -> Vec<String> {
    fn strip(v: &mut serde_json::Value) {
        match v {
            serde_json::Value::Object(m) => {
                m.remove("handle");
                m.values_mut().for_each(strip);
            }
            serde_json::Value::Array(a) => a.iter_mut().for_each(strip),
            _ => {}
        }
    }
    let out = ns.exec(&["nft", "-j", "list", "table", "ip", "rkube"]);
    assert!(out.status.success(), "list: {}", String::from_utf8_lossy(&out.stderr));
    let mut doc: serde_json::Value = serde_json::from_slice(&out.stdout).expect("nft json");
    strip(&mut doc);
    let mut items: Vec<String> = Vec::new();
    let mut rules: Vec<(String, usize, String)> = Vec::new();
    for item in doc["nftables"].as_array().into_iter().flatten() {
        if let Some(set) = item.get("set").or_else(|| item.get("map")) {
            let mut set = set.clone();
            if let Some(elems) = set.get_mut("elem").and_then(|e| e.as_array_mut()) {
                elems.sort_by_key(|e| e.to_string());
            }
            items.push(set.to_string());
        } else if let Some(rule) = item.get("rule") {
            let chain = rule["chain"].as_str().unwrap_or_default().to_string();
            rules.push((chain, rules.len(), rule.to_string()));
        } else if item.get("metainfo").is_none() {
            items.push(item.to_string());
        }
    }
    items.sort();
    rules.sort();
    items.extend(rules.into_iter().map(|(chain, _, rule)| format!("{chain}: {rule}")));
    items
}

/// The differences between two canonical listings, for a readable failure.
fn differences(a: &[String], b: &[String]) -> String {
    let only_a: Vec<&String> = a.iter().filter(|x| !b.contains(x)).collect();
    let only_b: Vec<&String> = b.iter().filter(|x| !a.contains(x)).collect();
    format!("only incremental: {only_a:#?}\nonly full: {only_b:#?}")
}

#[tokio::test]
async fn changes_applied_incrementally_leave_the_same_table_as_a_full_render() {
    incremental_equals_full("changes_applied_incrementally_leave_the_same_table", false).await;
}

#[tokio::test]
async fn changes_sent_over_netlink_leave_the_same_table_as_a_full_render() {
    incremental_equals_full("changes_sent_over_netlink_leave_the_same_table", true).await;
}

/// Applies a series of edits in place (as nft text, or over netlink with nft for what netlink
/// leaves to it) in one namespace and whole in another; after each, both tables must list
/// the same.
async fn incremental_equals_full(test: &str, netlink: bool) {
    let Some(inc) = common::Netns::create(test) else { return };
    let Some(full) = common::Netns::create(test) else { return };
    let rules = RulesConfig {
        node_name: "node-a".into(),
        cluster_cidr: Some("10.244.0.0/16".parse().expect("cidr")),
        ..RulesConfig::default()
    };
    let inc_config = Config { rules: rules.clone(), nft: inc.nft_command(), ..Config::default() };
    let full_config = Config { rules: rules.clone(), nft: full.nft_command(), ..Config::default() };
    let (services, slices) = everything();

    // Each step edits the previous state; together they add, change and remove Services,
    // endpoints, node ports, affinity sets, firewall chains and map verdicts.
    type Step = Box<dyn Fn(&mut Vec<Service>, &mut Vec<EndpointSlice>)>;
    let by_name = |name: &'static str| move |s: &Service| s.metadata.name.as_deref() == Some(name);
    let steps: Vec<(&str, Step)> = vec![
        ("nothing", Box::new(|_, _| {})),
        (
            "plain loses an endpoint",
            Box::new(|_, sl| {
                sl[0].endpoints.truncate(1);
            }),
        ),
        (
            "sticky loses every endpoint (its affinity sets go, it is rejected)",
            Box::new(|_, sl| {
                sl[1].endpoints.clear();
            }),
        ),
        (
            "empty gets an endpoint (reject becomes a service chain)",
            Box::new(|_, sl| {
                let mut s = sl[0].clone();
                s.metadata.name = Some("empty-1".into());
                s.metadata.labels =
                    Some([("kubernetes.io/service-name".into(), "empty".into())].into());
                sl.push(s);
            }),
        ),
        (
            "etp is deleted (external, local, firewall chains and their elements go)",
            Box::new(move |sv, _| sv.retain(|s| !by_name("etp")(s))),
        ),
        (
            "plain becomes a NodePort and sticky gets its endpoints back",
            Box::new(move |sv, sl| {
                if let Some(s) = sv.iter_mut().find(|s| by_name("plain")(s)) {
                    let spec = s.spec.as_mut().expect("spec");
                    spec.type_ = Some("NodePort".into());
                    spec.ports.as_mut().expect("ports")[0].node_port = Some(30099);
                }
                sl[1] = everything().1[1].clone();
            }),
        ),
        (
            "a new Service with the address of a deleted one",
            Box::new(|sv, _| {
                let (svcs, _) = everything();
                let mut s = svcs[3].clone();
                s.metadata.name = Some("etp2".into());
                sv.push(s);
            }),
        ),
        (
            "everything goes",
            Box::new(|sv, sl| {
                sv.clear();
                sl.clear();
            }),
        ),
        (
            "everything comes back",
            Box::new(|sv, sl| {
                (*sv, *sl) = everything();
            }),
        ),
    ];

    let (mut svcs, mut slcs) = (services, slices);
    let mut model = rkube_proxy::render_model(&svcs, &slcs, &rules);
    rkube_proxy::apply(&inc_config, &model.ruleset(&rules).text).await.expect("first apply");
    let mut socket = netlink.then(|| {
        let path = std::path::PathBuf::from(format!("/run/netns/{}", inc.name));
        rkube_proxy::nl::Socket::open(Some(&path)).expect("netlink socket in the namespace")
    });
    let mut sent_over_netlink = 0;
    for (what, step) in &steps {
        step(&mut svcs, &mut slcs);
        let next = rkube_proxy::render_model(&svcs, &slcs, &rules);
        let text = rkube_proxy::changes(&model, &next, &rules).expect("an incremental change");
        assert_eq!(text.is_empty(), next == model, "{what}: empty exactly when nothing changed");
        assert!(!text.contains("table"), "{what}: the table itself is left alone:\n{text}");
        let change = rkube_proxy::change(&model, &next).expect("an incremental change");
        let sent = match socket.as_mut().filter(|_| !text.is_empty()) {
            Some(sock) => match sock.commit(&change, &rules.table, Duration::from_secs(10)) {
                Ok(_) => true,
                Err(rkube_proxy::nl::Error::Unsupported(_)) => false,
                Err(e) => panic!("{what}: netlink: {e}\n{text}"),
            },
            None => false,
        };
        sent_over_netlink += usize::from(sent);
        if !text.is_empty() && !sent {
            rkube_proxy::apply(&inc_config, &text)
                .await
                .unwrap_or_else(|e| panic!("{what}: {e}\n{text}"));
        }
        rkube_proxy::apply(&full_config, &next.ruleset(&rules).text).await.expect("full apply");
        let (a, b) = (canonical_table(&inc), canonical_table(&full));
        assert!(a == b, "{what}: the tables differ\n{}", differences(&a, &b));
        model = next;
    }
    if netlink {
        // Only changes touching a firewall chain (anonymous interval sets) are left to nft.
        assert!(sent_over_netlink >= 5, "only {sent_over_netlink} changes went over netlink");
    }
}
