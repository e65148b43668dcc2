//! End to end inside a throwaway network namespace: Services and EndpointSlices written to a
//! real (in-process) API server, `rkube_proxy::run` programming nft in the namespace, and TCP
//! clients there reaching tiny servers through ClusterIPs and a NodePort.
//!
//! Layout of the namespace (no route leaves it): a veth pair rk0/rk1, both ends inside; rk0
//! holds the two "pod" addresses 10.244.1.5 and 10.244.1.6 and the "node" address
//! 192.168.77.1; Service addresses (10.96.0.0/12) are routed to rk0 with source 192.168.77.1,
//! so clients come from outside the cluster CIDR, as the node itself does.

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::Api;
use kube::api::{Patch, PatchParams, PostParams};
use rkube_proxy::{Config, RulesConfig};
use serde_json::json;
use tokio_util::sync::CancellationToken;

const POD_A: &str = "10.244.1.5";
const POD_B: &str = "10.244.1.6";
const NODE_IP: &str = "192.168.77.1";
const LB_IP: &str = "10.100.0.1";

/// Answers every connection on ADDR:8080 with "ADDR PEER", then closes.
const SERVER: &str = r#"
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], 8080))
s.listen(64)
while True:
    c, peer = s.accept()
    c.sendall((sys.argv[1] + " " + peer[0]).encode())
    c.close()
"#;

/// Connects N times to HOST:PORT (from SOURCE if given); one line per try: the reply,
/// `refused`, `timeout` or `error:…`.
const CLIENT: &str = r#"
import socket, sys
host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
source = (sys.argv[4], 0) if len(sys.argv) > 4 else None
for _ in range(n):
    try:
        s = socket.create_connection((host, port), timeout=2, source_address=source)
        s.settimeout(2)
        print(s.recv(64).decode() or "empty", flush=True)
        s.close()
    except ConnectionRefusedError:
        print("refused", flush=True)
    except socket.timeout:
        print("timeout", flush=True)
    except OSError as e:
        print("error:" + str(e), flush=True)
"#;

/// The answering endpoint (or the failure) for each of `n` connections.
fn connect(ns: &common::Netns, host: &str, port: u16, n: u32) -> Vec<String> {
    connect_from(ns, None, host, port, n)
        .into_iter()
        .map(|l| l.split(' ').next().unwrap_or_default().to_string())
        .collect()
}

/// The whole answer ("ENDPOINT PEER", or the failure) for each of `n` connections from `source`.
fn connect_from(
    ns: &common::Netns,
    source: Option<&str>,
    host: &str,
    port: u16,
    n: u32,
) -> Vec<String> {
    let (port, n) = (port.to_string(), n.to_string());
    let mut args = vec![common::python(), "-c", CLIENT, host, &port, &n];
    args.extend(source);
    let out = ns.exec(&args);
    assert!(out.status.success(), "client: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).lines().map(str::to_string).collect()
}

/// Retries `connect` until `ok` holds for its answers, for at most `limit`.
async fn eventually(
    ns: &common::Netns,
    host: &str,
    port: u16,
    n: u32,
    limit: Duration,
    ok: impl Fn(&[String]) -> bool,
) -> Vec<String> {
    let start = Instant::now();
    loop {
        let got = connect(ns, host, port, n);
        if ok(&got) {
            return got;
        }
        assert!(start.elapsed() < limit, "{host}:{port} never as expected; last answers {got:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The namespace's interfaces, addresses and routes (see the module comment).
fn pod_network(ns: &common::Netns) {
    ns.ip(&["link", "add", "rk0", "type", "veth", "peer", "name", "rk1"]);
    for a in [POD_A, POD_B] {
        ns.ip(&["addr", "add", &format!("{a}/32"), "dev", "rk0"]);
    }
    ns.ip(&["addr", "add", &format!("{NODE_IP}/24"), "dev", "rk0"]);
    ns.ip(&["link", "set", "rk0", "up"]);
    ns.ip(&["link", "set", "rk1", "up"]);
    ns.ip(&["route", "add", "10.96.0.0/12", "dev", "rk0", "src", NODE_IP]);
    // Where the "load balancer" addresses live.
    ns.ip(&["route", "add", "10.100.0.0/24", "dev", "rk0", "src", NODE_IP]);
}

/// Answers every datagram on ADDR:5353 with ADDR.
const UDP_SERVER: &str = r#"
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((sys.argv[1], 5353))
while True:
    _, peer = s.recvfrom(64)
    s.sendto(sys.argv[1].encode(), peer)
"#;

/// Sends N datagrams to HOST:PORT, always from source port SPORT (one flow); one line per
/// datagram: the answer or `timeout`.
const UDP_CLIENT: &str = r#"
import socket, sys
host, port, sport, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("", sport))
s.settimeout(1)
for _ in range(n):
    s.sendto(b"?", (host, port))
    try:
        print(s.recvfrom(64)[0].decode(), flush=True)
    except socket.timeout:
        print("timeout", flush=True)
"#;

fn udp_flow(ns: &common::Netns, host: &str, port: u16, n: u32) -> Vec<String> {
    let (port, n) = (port.to_string(), n.to_string());
    let out = ns.exec(&[common::python(), "-c", UDP_CLIENT, host, &port, "40000", &n]);
    assert!(out.status.success(), "udp client: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).lines().map(str::to_string).collect()
}

fn service(name: &str, ip: &str, extra: serde_json::Value) -> Service {
    let mut v = json!({
        "metadata": {"namespace": "default", "name": name},
        "spec": {"clusterIP": ip, "ports": [{"name": "http", "port": 80, "targetPort": 8080}]}
    });
    for (k, x) in extra.as_object().expect("object") {
        v["spec"][k] = x.clone();
    }
    serde_json::from_value(v).expect("service")
}

fn slice(service: &str, ips: &[&str]) -> EndpointSlice {
    slice_on(service, ips, 8080, "TCP")
}

fn slice_on(service: &str, ips: &[&str], port: u16, protocol: &str) -> EndpointSlice {
    let eps: Vec<_> = ips
        .iter()
        .map(|ip| json!({"addresses": [ip], "nodeName": "node-a", "conditions": {"ready": true}}))
        .collect();
    serde_json::from_value(json!({
        "metadata": {"namespace": "default", "name": format!("{service}-1"),
                     "labels": {"kubernetes.io/service-name": service}},
        "addressType": "IPv4",
        "endpoints": eps,
        "ports": [{"name": "http", "port": port, "protocol": protocol}]
    }))
    .expect("slice")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn services_route_tcp_to_endpoints_inside_a_network_namespace() {
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_env_filter(tracing_subscriber::EnvFilter::new("rkube_proxy=debug"))
        .try_init();
    let Some(mut ns) = common::Netns::create("services_route_tcp_to_endpoints") else {
        return;
    };
    pod_network(&ns);
    for a in [POD_A, POD_B] {
        ns.spawn(&[common::python(), "-c", SERVER, a]);
    }
    let body = async {
        // The servers are up once they answer directly.
        for a in [POD_A, POD_B] {
            eventually(&ns, a, 8080, 1, Duration::from_secs(10), |g| g == [a]).await;
        }

        let api = rkube_apiserver::testing::TestServer::start().await;
        let client = api.client().await;
        let services: Api<Service> = Api::namespaced(client.clone(), "default");
        let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), "default");
        let pp = PostParams::default();
        let web = service(
            "web",
            "10.96.0.50",
            json!({"type": "NodePort",
                   "ports": [{"name": "http", "port": 80, "targetPort": 8080, "nodePort": 30080}]}),
        );
        services.create(&pp, &web).await.expect("create web");
        slices.create(&pp, &slice("web", &[POD_A, POD_B])).await.expect("create web slice");
        services.create(&pp, &service("empty", "10.96.0.51", json!({}))).await.expect("empty");
        let lb = service(
            "lb",
            "10.96.0.53",
            json!({"type": "LoadBalancer", "loadBalancerSourceRanges": [format!("{POD_A}/32")],
                   "ports": [{"name": "http", "port": 80, "targetPort": 8080, "nodePort": 30081}]}),
        );
        services.create(&pp, &lb).await.expect("create lb");
        let ingress = json!({"status": {"loadBalancer": {"ingress": [{"ip": LB_IP}]}}});
        services
            .patch_status("lb", &PatchParams::default(), &Patch::Merge(&ingress))
            .await
            .expect("lb status");
        slices.create(&pp, &slice("lb", &[POD_A, POD_B])).await.expect("lb slice");
        let sticky = service("sticky", "10.96.0.52", json!({"sessionAffinity": "ClientIP"}));
        services.create(&pp, &sticky).await.expect("create sticky");
        slices.create(&pp, &slice("sticky", &[POD_A, POD_B])).await.expect("sticky slice");

        let config = Config {
            rules: RulesConfig {
                node_name: "node-a".into(),
                cluster_cidr: Some("10.244.0.0/16".parse().expect("cidr")),
                ..RulesConfig::default()
            },
            nft: ns.nft_command(),
            // Changes go over netlink, as in production; full replaces through nft.
            netlink: Some(ns.netlink()),
            coalesce: Duration::from_millis(50),
            min_sync_period: Duration::from_millis(100),
            check_period: Duration::from_millis(300),
            ..Config::default()
        };
        let shutdown = CancellationToken::new();
        let proxy = tokio::spawn(rkube_proxy::run(client, config.clone(), shutdown.clone()));
        // Cancel the proxy even if an assertion below fails.
        let _stop = shutdown.clone().drop_guard();

        // ClusterIP: both endpoints serve, and nothing else answers.
        eventually(&ns, "10.96.0.50", 80, 1, Duration::from_secs(15), |g| {
            g.len() == 1 && (g[0] == POD_A || g[0] == POD_B)
        })
        .await;
        let answers = connect(&ns, "10.96.0.50", 80, 20);
        let seen: BTreeSet<&str> = answers.iter().map(String::as_str).collect();
        assert_eq!(seen, BTreeSet::from([POD_A, POD_B]), "{answers:?}");

        // NodePort on the node's own address.
        let answers = connect(&ns, NODE_IP, 30080, 10);
        assert!(answers.iter().all(|a| a == POD_A || a == POD_B), "{answers:?}");

        // Masquerading. Replies must come back through the proxy, so: traffic from outside the
        // cluster CIDR (the node's address) and NodePort traffic lose their source; a pod
        // reaching another pod keeps it; a pod reaching itself (hairpin) loses it.
        let split = |l: &String| -> (String, String) {
            let (ep, peer) = l.split_once(' ').unwrap_or_else(|| panic!("bad answer {l:?}"));
            (ep.to_string(), peer.to_string())
        };
        let from_node: Vec<_> =
            connect_from(&ns, None, "10.96.0.50", 80, 5).iter().map(split).collect();
        assert!(from_node.iter().all(|(_, peer)| peer != NODE_IP), "{from_node:?}");
        let from_pod: Vec<_> =
            connect_from(&ns, Some(POD_B), "10.96.0.50", 80, 20).iter().map(split).collect();
        assert!(from_pod.iter().any(|(ep, _)| ep == POD_A), "{from_pod:?}");
        assert!(from_pod.iter().any(|(ep, _)| ep == POD_B), "{from_pod:?}");
        for (ep, peer) in &from_pod {
            assert_eq!(ep == POD_B, peer != POD_B, "hairpin only is masqueraded: {from_pod:?}");
        }
        let node_port: Vec<_> =
            connect_from(&ns, Some(POD_B), NODE_IP, 30080, 5).iter().map(split).collect();
        assert!(node_port.iter().all(|(_, peer)| peer != POD_B), "{node_port:?}");

        // No endpoints: refused at once, not a timeout.
        let start = Instant::now();
        assert_eq!(connect(&ns, "10.96.0.51", 80, 1), ["refused"]);
        assert!(start.elapsed() < Duration::from_secs(1), "took {:?}", start.elapsed());

        // A port the Service does not have is refused too.
        assert_eq!(connect(&ns, "10.96.0.50", 81, 1), ["refused"]);

        // ClientIP affinity: one client, one backend.
        let sticky_answers = connect(&ns, "10.96.0.52", 80, 10);
        let first = &sticky_answers[0];
        assert!(sticky_answers.iter().all(|a| a == first), "{sticky_answers:?}");
        assert!(first == POD_A || first == POD_B, "{sticky_answers:?}");

        // Removing an endpoint stops new connections to it. (20 tries, so the old rules cannot
        // pass by chance.)
        let mut s = slices.get("web-1").await.expect("get slice");
        s.endpoints.retain(|e| e.addresses.first().map(String::as_str) == Some(POD_A));
        slices.replace("web-1", &pp, &s).await.expect("replace slice");
        eventually(&ns, "10.96.0.50", 80, 20, Duration::from_secs(10), |g| {
            g.iter().all(|a| a == POD_A)
        })
        .await;
        let answers = connect(&ns, "10.96.0.50", 80, 20);
        assert!(answers.iter().all(|a| a == POD_A), "{answers:?}");

        // That change replaced the whole table; the sticky client's entry came along.
        let sticky_to = sticky_answers[0].clone();
        let set = format!("affinity-default/sticky/tcp/http__{sticky_to}/8080");
        let listed = ns.exec(&["nft", "list", "set", "ip", "rkube", &set]);
        let listed = String::from_utf8_lossy(&listed.stdout);
        assert!(listed.contains(NODE_IP), "affinity entry lost in the re-apply:\n{listed}");
        assert_eq!(connect(&ns, "10.96.0.52", 80, 5), vec![sticky_to; 5]);

        // loadBalancerSourceRanges: only POD_A may use the load balancer's address; others are
        // dropped (a timeout); the NodePort stays open to all, as upstream.
        assert!(
            [POD_A, POD_B].contains(
                &connect_from(&ns, Some(POD_A), LB_IP, 80, 1)[0].split(' ').next().unwrap_or("")
            ),
            "allowed source"
        );
        assert_eq!(connect_from(&ns, Some(POD_B), LB_IP, 80, 1), ["timeout"]);
        assert_eq!(connect_from(&ns, None, LB_IP, 80, 1), ["timeout"]);
        let via_node_port = connect_from(&ns, Some(POD_B), NODE_IP, 30081, 1);
        assert!(!via_node_port[0].starts_with("timeout"), "{via_node_port:?}");

        // Endpoints appearing for the empty Service make it answer.
        slices.create(&pp, &slice("empty", &[POD_B])).await.expect("empty slice");
        eventually(&ns, "10.96.0.51", 80, 1, Duration::from_secs(10), |g| g == [POD_B]).await;

        // Someone deletes the table (say, `nft flush ruleset`): the proxy notices and restores it.
        let deleted = ns.exec(&["nft", "delete", "table", "ip", "rkube"]);
        assert!(deleted.status.success(), "{}", String::from_utf8_lossy(&deleted.stderr));
        eventually(&ns, "10.96.0.50", 80, 1, Duration::from_secs(10), |g| g == [POD_A]).await;

        shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(10), proxy)
            .await
            .expect("proxy stops on shutdown")
            .expect("join")
            .expect("proxy run");
        // The rules stay after shutdown, as upstream's do; cleanup removes them.
        assert_eq!(connect(&ns, "10.96.0.50", 80, 1), [POD_A]);
        rkube_proxy::cleanup(&config).await.expect("cleanup");
        let tables = ns.exec(&["nft", "list", "tables"]);
        assert!(!String::from_utf8_lossy(&tables.stdout).contains("rkube"));
        api.stop();
    };
    tokio::time::timeout(Duration::from_secs(120), body).await.expect("test within 2 minutes");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_udp_flow_moves_off_a_removed_endpoint() {
    const TEST: &str = "a_udp_flow_moves_off_a_removed_endpoint";
    let Some(mut ns) = common::Netns::create(TEST) else {
        return;
    };
    if !common::have("conntrack") {
        common::skip(TEST, "`conntrack` is not installed");
        return;
    }
    pod_network(&ns);
    for a in [POD_A, POD_B] {
        ns.spawn(&[common::python(), "-c", UDP_SERVER, a]);
    }
    let body = async {
        let api = rkube_apiserver::testing::TestServer::start().await;
        let client = api.client().await;
        let services: Api<Service> = Api::namespaced(client.clone(), "default");
        let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), "default");
        let pp = PostParams::default();
        let dns = service(
            "dns",
            "10.96.0.60",
            json!({"ports": [{"name": "http", "port": 53, "targetPort": 5353, "protocol": "UDP"}]}),
        );
        services.create(&pp, &dns).await.expect("create dns");
        slices.create(&pp, &slice_on("dns", &[POD_A, POD_B], 5353, "UDP")).await.expect("slice");

        let mut conntrack = ns.nft_command();
        conntrack.pop();
        conntrack.push("conntrack".into());
        let config = Config {
            rules: RulesConfig { node_name: "node-a".into(), ..RulesConfig::default() },
            nft: ns.nft_command(),
            // Changes go over netlink, as in production; full replaces through nft.
            netlink: Some(ns.netlink()),
            conntrack,
            coalesce: Duration::from_millis(50),
            min_sync_period: Duration::from_millis(100),
            ..Config::default()
        };
        let shutdown = CancellationToken::new();
        let _stop = shutdown.clone().drop_guard();
        let proxy = tokio::spawn(rkube_proxy::run(client, config, shutdown.clone()));

        // One flow (fixed source port) sticks to one endpoint: its conntrack entry says where.
        let start = Instant::now();
        let first = loop {
            let got = udp_flow(&ns, "10.96.0.60", 53, 1);
            if got[0] == POD_A || got[0] == POD_B {
                break got[0].clone();
            }
            assert!(start.elapsed() < Duration::from_secs(15), "no UDP answer: {got:?}");
        };
        assert_eq!(udp_flow(&ns, "10.96.0.60", 53, 5), vec![first.clone(); 5]);

        // Take that endpoint out (its server keeps running, so a stale entry would show).
        let other = if first == POD_A { POD_B } else { POD_A };
        let mut s = slices.get("dns-1").await.expect("get slice");
        s.endpoints.retain(|e| e.addresses.first().map(String::as_str) == Some(other));
        slices.replace("dns-1", &pp, &s).await.expect("replace slice");
        let start = Instant::now();
        loop {
            let got = udp_flow(&ns, "10.96.0.60", 53, 1);
            if got == [other] {
                break;
            }
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "the flow still goes to {first}: {got:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(udp_flow(&ns, "10.96.0.60", 53, 5), vec![other.to_string(); 5]);

        shutdown.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(10), proxy).await;
        api.stop();
    };
    tokio::time::timeout(Duration::from_secs(120), body).await.expect("test within 2 minutes");
}
