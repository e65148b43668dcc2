//! The cluster DNS against a real API server (in-process, loopback) and a real client (`dig`,
//! from Debian's dnsutils), with a fake upstream resolver on 127.0.0.1 for forwarded names.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use hickory_proto::op::{Message, OpCode};
use hickory_proto::rr::rdata::A;
use hickory_proto::rr::{RData, Record};
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{DeleteParams, PostParams};
use kube::{Api, Client};
use rkube_apiserver::testing::TestServer;
use serde_json::json;
use tokio::net::UdpSocket;
use tokio_util::sync::CancellationToken;

/// A resolver on 127.0.0.1 (UDP only) answering every question with 192.0.2.99.
async fn fake_upstream() -> SocketAddr {
    let udp = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = udp.local_addr().unwrap();
    tokio::spawn(async move {
        let mut buf = vec![0u8; 65535];
        while let Ok((n, peer)) = udp.recv_from(&mut buf).await {
            let Ok(q) = Message::from_vec(&buf[..n]) else { continue };
            let mut r = Message::response(q.metadata.id, OpCode::Query);
            r.metadata.recursion_desired = q.metadata.recursion_desired;
            r.metadata.recursion_available = true;
            r.queries = q.queries.clone();
            if let Some(question) = q.queries.first() {
                let a = RData::A(A(Ipv4Addr::new(192, 0, 2, 99)));
                r.answers.push(Record::from_rdata(question.name().clone(), 42, a));
            }
            let _ = udp.send_to(&r.to_vec().unwrap(), peer).await;
        }
    });
    addr
}

struct Dns {
    addr: SocketAddr,
    upstream: SocketAddr,
    stop: CancellationToken,
}

impl Drop for Dns {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Starts the DNS server on 127.0.0.1:<free port>, forwarding to a fake upstream, and waits
/// until its caches have synced (the apex SOA answers NOERROR).
async fn start_dns(client: Client) -> Dns {
    let upstream = fake_upstream().await;
    let config = rkube_dns::Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        upstreams: vec![upstream],
        ..Default::default()
    };
    let server = rkube_dns::Server::bind(config).await.expect("bind");
    let addr = server.local_addr().unwrap();
    let stop = CancellationToken::new();
    tokio::spawn(server.serve(client, stop.clone()));
    let dns = Dns { addr, upstream, stop };
    wait_until(|| async { status(&dns, &["cluster.local", "SOA"]).await == "NOERROR" }).await;
    dns
}

async fn wait_until<F, Fut>(mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(10);
    while !f().await {
        assert!(Instant::now() < deadline, "condition not met within 10 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Runs `dig @127.0.0.1 -p <port> <args>`; its whole output.
async fn dig(dns: &Dns, args: &[&str]) -> String {
    let out = tokio::process::Command::new("dig")
        .arg("@127.0.0.1")
        .args(["-p", &dns.addr.port().to_string(), "+tries=1", "+time=3"])
        .args(args)
        .output()
        .await
        .expect("dig (Debian package dnsutils) must be installed: .ci/run installs it");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `text` with runs of whitespace as single spaces (dig aligns columns with tabs or spaces).
fn words(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// `dig +short`: the answers' data, sorted.
async fn short(dns: &Dns, args: &[&str]) -> Vec<String> {
    let mut all = vec!["+short"];
    all.extend_from_slice(args);
    let mut lines: Vec<String> = dig(dns, &all).await.lines().map(String::from).collect();
    lines.sort();
    lines
}

/// The response code dig reports (`NOERROR`, `NXDOMAIN`, …).
async fn status(dns: &Dns, args: &[&str]) -> String {
    let out = dig(dns, args).await;
    out.split("status: ")
        .nth(1)
        .and_then(|s| s.split(',').next())
        .unwrap_or("no response")
        .to_string()
}

async fn create<K>(client: &Client, ns: &str, obj: serde_json::Value) -> K
where
    K: kube::Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + serde::de::DeserializeOwned
        + serde::Serialize
        + std::fmt::Debug,
{
    let api: Api<K> = Api::namespaced(client.clone(), ns);
    let obj: K = serde_json::from_value(obj).expect("object");
    api.create(&PostParams::default(), &obj).await.expect("create")
}

async fn shop(client: &Client) {
    let ns: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(client.clone());
    let _ = ns
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": "shop"}})).unwrap(),
        )
        .await;
    create::<Service>(
        client,
        "shop",
        json!({
            "metadata": {"name": "web"},
            "spec": {"clusterIP": "10.96.1.20", "ports": [
                {"name": "http", "protocol": "TCP", "port": 80},
                {"name": "metrics", "protocol": "TCP", "port": 9090}
            ]}
        }),
    )
    .await;
    create::<Service>(
        client,
        "shop",
        json!({
            "metadata": {"name": "db"},
            "spec": {"clusterIP": "None", "ports": [{"name": "pg", "protocol": "TCP", "port": 5432}]}
        }),
    )
    .await;
    create::<EndpointSlice>(
        client,
        "shop",
        json!({
            "metadata": {"name": "db-1", "labels": {"kubernetes.io/service-name": "db"}},
            "addressType": "IPv4",
            "endpoints": [
                {"addresses": ["10.244.0.5"], "hostname": "db-0", "conditions": {"ready": true}},
                {"addresses": ["10.244.0.6"], "hostname": "db-1", "conditions": {"ready": true}},
                {"addresses": ["10.244.0.7"], "hostname": "db-2", "conditions": {"ready": false}}
            ],
            "ports": [{"name": "pg", "protocol": "TCP", "port": 5432}]
        }),
    )
    .await;
    create::<Service>(
        client,
        "shop",
        json!({
            "metadata": {"name": "ext"},
            "spec": {"type": "ExternalName", "externalName": "db.example.com"}
        }),
    )
    .await;
}

#[tokio::test]
async fn services_endpoints_and_pods_are_answered_from_the_watch() {
    let api = TestServer::start().await;
    let client = api.client().await;
    shop(&client).await;
    let dns = start_dns(client).await;
    let web = "web.shop.svc.cluster.local";
    wait_until(|| async { short(&dns, &[web, "A"]).await == ["10.96.1.20"] }).await;

    // Headless: the ready endpoints only; each hostname under the service.
    assert_eq!(
        short(&dns, &["db.shop.svc.cluster.local", "A"]).await,
        ["10.244.0.5", "10.244.0.6"]
    );
    assert_eq!(short(&dns, &["db-1.db.shop.svc.cluster.local", "A"]).await, ["10.244.0.6"]);
    assert_eq!(status(&dns, &["db-2.db.shop.svc.cluster.local", "A"]).await, "NXDOMAIN");

    // SRV: the service name for ClusterIP, each endpoint for headless.
    assert_eq!(
        short(&dns, &["_http._tcp.web.shop.svc.cluster.local", "SRV"]).await,
        ["0 100 80 web.shop.svc.cluster.local."]
    );
    assert_eq!(
        short(&dns, &["_pg._tcp.db.shop.svc.cluster.local", "SRV"]).await,
        ["0 50 5432 db-0.db.shop.svc.cluster.local.", "0 50 5432 db-1.db.shop.svc.cluster.local."]
    );

    // ExternalName is a CNAME, followed (through the upstream here) to addresses.
    assert_eq!(short(&dns, &["ext.shop.svc.cluster.local", "CNAME"]).await, ["db.example.com."]);
    assert_eq!(
        short(&dns, &["ext.shop.svc.cluster.local", "A"]).await,
        ["192.0.2.99", "db.example.com."]
    );

    // Pods by dashed address, in any namespace.
    assert_eq!(short(&dns, &["10-244-3-9.default.pod.cluster.local", "A"]).await, ["10.244.3.9"]);

    // Case does not matter; AAAA of an IPv4-only name is empty, not an error.
    assert_eq!(short(&dns, &["WEB.Shop.SVC.cluster.local", "A"]).await, ["10.96.1.20"]);
    assert_eq!(status(&dns, &[web, "AAAA"]).await, "NOERROR");
    assert!(short(&dns, &[web, "AAAA"]).await.is_empty());

    // Unknown names in the zone: NXDOMAIN, with the zone's SOA in authority.
    let out = dig(&dns, &["nope.shop.svc.cluster.local", "A"]).await;
    assert!(out.contains("status: NXDOMAIN"), "{out}");
    assert!(out.contains("AUTHORITY: 1"), "{out}");
    assert!(words(&out).contains("SOA ns.dns.cluster.local. hostmaster.cluster.local."), "{out}");

    // TTL 5 s, as CoreDNS.
    let out = words(&dig(&dns, &["+noall", "+answer", web, "A"]).await);
    assert_eq!(out, "web.shop.svc.cluster.local. 5 IN A 10.96.1.20");

    // TCP answers the same.
    assert_eq!(
        short(&dns, &["+tcp", "db.shop.svc.cluster.local", "A"]).await,
        ["10.244.0.5", "10.244.0.6"]
    );

    // PTR for a ClusterIP.
    assert_eq!(short(&dns, &["-x", "10.96.1.20"]).await, ["web.shop.svc.cluster.local."]);
}

#[tokio::test]
async fn services_created_and_deleted_after_start_are_seen_at_once() {
    let api = TestServer::start().await;
    let client = api.client().await;
    let dns = start_dns(client.clone()).await;
    let name = "late.default.svc.cluster.local";
    assert_eq!(status(&dns, &[name, "A"]).await, "NXDOMAIN");

    create::<Service>(
        &client,
        "default",
        json!({"metadata": {"name": "late"}, "spec": {"clusterIP": "10.96.2.2", "ports": [{"port": 80}]}}),
    )
    .await;
    let created = Instant::now();
    wait_until(|| async { short(&dns, &[name, "A"]).await == ["10.96.2.2"] }).await;
    // Typically tens of milliseconds; the bound leaves room for a loaded CI machine.
    eprintln!("created → answered in {:?}", created.elapsed());
    assert!(created.elapsed() < Duration::from_secs(2), "took {:?}", created.elapsed());

    let services: Api<Service> = Api::namespaced(client, "default");
    services.delete("late", &DeleteParams::default()).await.expect("delete");
    let deleted = Instant::now();
    wait_until(|| async { status(&dns, &[name, "A"]).await == "NXDOMAIN" }).await;
    eprintln!("deleted → NXDOMAIN in {:?}", deleted.elapsed());
    assert!(deleted.elapsed() < Duration::from_secs(2), "took {:?}", deleted.elapsed());
}

#[tokio::test]
async fn a_malformed_packet_gets_formerr_and_the_server_keeps_serving() {
    let api = TestServer::start().await;
    let dns = start_dns(api.client().await).await;
    let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    // A header announcing a question, then a label longer than the packet.
    let packet = [0x13, 0x37, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0, 0x3f, b'x'];
    sock.send_to(&packet, dns.addr).await.unwrap();
    let mut buf = [0u8; 512];
    let (n, _) = tokio::time::timeout(Duration::from_secs(3), sock.recv_from(&mut buf))
        .await
        .expect("a response to a malformed query")
        .unwrap();
    let r = Message::from_vec(&buf[..n]).expect("the FORMERR parses");
    assert_eq!(r.metadata.id, 0x1337);
    assert_eq!(r.metadata.response_code, hickory_proto::op::ResponseCode::FormErr);
    // Garbage that is not even a header gets nothing, and breaks nothing.
    sock.send_to(&[0xff; 5], dns.addr).await.unwrap();
    assert_eq!(status(&dns, &["cluster.local", "SOA"]).await, "NOERROR");
    assert_eq!(status(&dns, &["+tcp", "cluster.local", "SOA"]).await, "NOERROR");
}

#[tokio::test]
async fn names_outside_the_zone_are_forwarded_and_the_answer_relayed() {
    let api = TestServer::start().await;
    let dns = start_dns(api.client().await).await;
    assert!(dns.upstream.ip().is_loopback());
    assert_eq!(short(&dns, &["www.example.org", "A"]).await, ["192.0.2.99"]);
    let out = words(&dig(&dns, &["+noall", "+answer", "www.example.org", "A"]).await);
    assert_eq!(out, "www.example.org. 42 IN A 192.0.2.99", "the upstream's TTL is kept");
}

#[tokio::test]
async fn ensure_service_publishes_kube_dns_and_is_idempotent() {
    let api = TestServer::start().await;
    let client = api.client().await;
    let dns = start_dns(client.clone()).await;
    let ensure =
        || rkube_dns::ensure_service(client.clone(), "10.96.0.10", "127.0.0.1", dns.addr.port());
    ensure().await.expect("ensure_service");
    let versions = || async {
        let svc = Api::<Service>::namespaced(client.clone(), "kube-system").get("kube-dns").await;
        let slice = Api::<EndpointSlice>::namespaced(client.clone(), "kube-system")
            .get("kube-dns-rkube")
            .await;
        (svc.unwrap().metadata.resource_version, slice.unwrap().metadata.resource_version)
    };
    let before = versions().await;
    ensure().await.expect("ensure_service again");
    assert_eq!(versions().await, before, "a second ensure_service changes nothing");
    let svc = Api::<Service>::namespaced(client.clone(), "kube-system")
        .get("kube-dns")
        .await
        .expect("kube-dns service");
    let labels = svc.metadata.labels.clone().unwrap_or_default();
    assert_eq!(labels.get("k8s-app").map(String::as_str), Some("kube-dns"));
    assert_eq!(labels.get("kubernetes.io/cluster-service").map(String::as_str), Some("true"));
    assert_eq!(labels.get("kubernetes.io/name").map(String::as_str), Some("KubeDNS"));
    let spec = svc.spec.clone().unwrap_or_default();
    assert_eq!(spec.cluster_ip.as_deref(), Some("10.96.0.10"));
    assert!(spec.selector.unwrap_or_default().is_empty());
    let ports: Vec<_> = spec
        .ports
        .unwrap_or_default()
        .into_iter()
        .map(|p| (p.name.unwrap_or_default(), p.protocol.unwrap_or_default(), p.port))
        .collect();
    assert_eq!(ports, [("dns".into(), "UDP".into(), 53), ("dns-tcp".into(), "TCP".into(), 53)]);

    let slice = Api::<EndpointSlice>::namespaced(client.clone(), "kube-system")
        .get("kube-dns-rkube")
        .await
        .expect("kube-dns-rkube slice");
    let labels = slice.metadata.labels.clone().unwrap_or_default();
    assert_eq!(labels.get("kubernetes.io/service-name").map(String::as_str), Some("kube-dns"));
    assert_eq!(
        labels.get("endpointslice.kubernetes.io/managed-by").map(String::as_str),
        Some("rkube-dns")
    );
    assert_eq!(slice.endpoints[0].addresses, ["127.0.0.1"]);
    let port = slice.ports.unwrap_or_default()[0].port;
    assert_eq!(port, Some(i32::from(dns.addr.port())));

    // And the DNS answers for itself.
    let name = "kube-dns.kube-system.svc.cluster.local";
    wait_until(|| async { short(&dns, &[name, "A"]).await == ["10.96.0.10"] }).await;
    wait_until(|| async { short(&dns, &["ns.dns.cluster.local", "A"]).await == ["10.96.0.10"] })
        .await;
}

#[tokio::test]
async fn ensure_service_takes_over_a_stale_kube_dns() {
    let api = TestServer::start().await;
    let client = api.client().await;
    // Left over from another setup: another address, a selector, one port.
    create::<Service>(
        &client,
        "kube-system",
        json!({
            "metadata": {"name": "kube-dns", "labels": {"k8s-app": "kube-dns"}},
            "spec": {"clusterIP": "10.96.0.11", "selector": {"k8s-app": "kube-dns"},
                     "ports": [{"name": "dns", "protocol": "UDP", "port": 53}]}
        }),
    )
    .await;
    create::<EndpointSlice>(
        &client,
        "kube-system",
        json!({
            "metadata": {"name": "kube-dns-rkube", "labels": {"kubernetes.io/service-name": "kube-dns"}},
            "addressType": "IPv4",
            "endpoints": [{"addresses": ["10.244.9.9"]}],
            "ports": [{"name": "dns", "protocol": "UDP", "port": 53}]
        }),
    )
    .await;
    rkube_dns::ensure_service(client.clone(), "10.96.0.10", "127.0.0.1", 5353)
        .await
        .expect("ensure_service");
    let svc =
        Api::<Service>::namespaced(client.clone(), "kube-system").get("kube-dns").await.unwrap();
    let spec = svc.spec.unwrap_or_default();
    assert_eq!(spec.cluster_ip.as_deref(), Some("10.96.0.10"));
    assert!(spec.selector.unwrap_or_default().is_empty());
    assert_eq!(spec.ports.unwrap_or_default().len(), 2);
    let slice = Api::<EndpointSlice>::namespaced(client, "kube-system")
        .get("kube-dns-rkube")
        .await
        .unwrap();
    assert_eq!(slice.endpoints[0].addresses, ["127.0.0.1"]);
    assert_eq!(slice.ports.unwrap_or_default()[0].port, Some(5353));
    assert_eq!(
        slice
            .metadata
            .labels
            .unwrap_or_default()
            .get("endpointslice.kubernetes.io/managed-by")
            .map(String::as_str),
        Some("rkube-dns")
    );
}
