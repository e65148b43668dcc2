//! The `kube-system/kube-dns` Service and its EndpointSlice, pointing at this server: how pods
//! reach us at the well-known ClusterIP, and how `kubectl cluster-info` learns we exist.

use std::collections::BTreeMap;
use std::net::IpAddr;

use k8s_openapi::api::core::v1::{Service, ServicePort, ServiceSpec};
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::api::{DeleteParams, PostParams};
use kube::{Api, Client};

use crate::index::SERVICE_NAME_LABEL;
use crate::{Error, Result};

pub const NAMESPACE: &str = "kube-system";
pub const SERVICE_NAME: &str = "kube-dns";
pub const SLICE_NAME: &str = "kube-dns-rkube";
pub const MANAGED_BY: &str = "rkube-dns";
/// The ClusterIP kubeadm and kind give cluster DNS (the 10th address of 10.96.0.0/12).
pub const DEFAULT_CLUSTER_IP: &str = "10.96.0.10";

fn service_labels() -> BTreeMap<String, String> {
    [
        ("k8s-app", "kube-dns"),
        // `kubectl cluster-info` lists kube-system Services with this label, by `kubernetes.io/name`.
        ("kubernetes.io/cluster-service", "true"),
        ("kubernetes.io/name", "KubeDNS"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

fn desired_service(cluster_ip: &str, port: u16) -> Service {
    let port = |name: &str, protocol: &str| ServicePort {
        name: Some(name.into()),
        protocol: Some(protocol.into()),
        port: 53,
        target_port: Some(IntOrString::Int(i32::from(port))),
        ..Default::default()
    };
    Service {
        metadata: ObjectMeta {
            name: Some(SERVICE_NAME.into()),
            namespace: Some(NAMESPACE.into()),
            labels: Some(service_labels()),
            ..Default::default()
        },
        // No selector: the endpoints are ours to publish (we are not a pod).
        spec: Some(ServiceSpec {
            type_: Some("ClusterIP".into()),
            cluster_ip: Some(cluster_ip.into()),
            cluster_ips: Some(vec![cluster_ip.into()]),
            ports: Some(vec![port("dns", "UDP"), port("dns-tcp", "TCP")]),
            ..Default::default()
        }),
        status: None,
    }
}

fn desired_slice(ip: IpAddr, port: u16) -> EndpointSlice {
    let labels = [
        (SERVICE_NAME_LABEL, SERVICE_NAME),
        ("endpointslice.kubernetes.io/managed-by", MANAGED_BY),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    let port = |name: &str, protocol: &str| EndpointPort {
        name: Some(name.into()),
        protocol: Some(protocol.into()),
        port: Some(i32::from(port)),
        ..Default::default()
    };
    EndpointSlice {
        metadata: ObjectMeta {
            name: Some(SLICE_NAME.into()),
            namespace: Some(NAMESPACE.into()),
            labels: Some(labels),
            ..Default::default()
        },
        address_type: if ip.is_ipv4() { "IPv4" } else { "IPv6" }.into(),
        endpoints: vec![Endpoint {
            addresses: vec![ip.to_string()],
            conditions: Some(EndpointConditions {
                ready: Some(true),
                serving: Some(true),
                terminating: Some(false),
            }),
            ..Default::default()
        }],
        ports: Some(vec![port("dns", "UDP"), port("dns-tcp", "TCP")]),
    }
}

/// Creates or updates `kube-system/kube-dns` (ClusterIP `cluster_ip`, ports `dns` 53/UDP and
/// `dns-tcp` 53/TCP to `port`) and the EndpointSlice `kube-dns-rkube` pointing at
/// `endpoint_ip:port`. Idempotent: an up-to-date pair is left alone.
///
/// # Caveats
/// A ClusterIP cannot be changed in place: a `kube-dns` Service holding another address is
/// deleted and recreated (it is ours by name; clients use the new address once it exists).
pub async fn ensure_service(
    client: Client,
    cluster_ip: &str,
    endpoint_ip: &str,
    port: u16,
) -> Result<()> {
    let ip: IpAddr =
        endpoint_ip.parse().map_err(|_| Error::InvalidAddress(endpoint_ip.to_string()))?;
    cluster_ip.parse::<IpAddr>().map_err(|_| Error::InvalidAddress(cluster_ip.to_string()))?;
    let services: Api<Service> = Api::namespaced(client.clone(), NAMESPACE);
    let want = desired_service(cluster_ip, port);
    match services.get_opt(SERVICE_NAME).await.map_err(Error::Api)? {
        None => {
            services.create(&PostParams::default(), &want).await.map_err(Error::Api)?;
            tracing::info!(cluster_ip, "created service kube-system/kube-dns");
        }
        Some(have) => {
            let have_ip = have.spec.as_ref().and_then(|s| s.cluster_ip.as_deref());
            if have_ip != Some(cluster_ip) {
                services
                    .delete(SERVICE_NAME, &DeleteParams::default())
                    .await
                    .map_err(Error::Api)?;
                wait_gone(&services).await?;
                services.create(&PostParams::default(), &want).await.map_err(Error::Api)?;
                tracing::info!(
                    cluster_ip,
                    "recreated service kube-system/kube-dns with a new ClusterIP"
                );
            } else if needs_update(&have, &want) {
                let mut next = have.clone();
                let labels = next.metadata.labels.get_or_insert_with(Default::default);
                labels.extend(service_labels());
                if let (Some(spec), Some(want_spec)) = (next.spec.as_mut(), want.spec.as_ref()) {
                    spec.ports = want_spec.ports.clone();
                    spec.selector = None;
                    spec.type_ = want_spec.type_.clone();
                }
                services
                    .replace(SERVICE_NAME, &PostParams::default(), &next)
                    .await
                    .map_err(Error::Api)?;
                tracing::info!("updated service kube-system/kube-dns");
            }
        }
    }

    let slices: Api<EndpointSlice> = Api::namespaced(client, NAMESPACE);
    let want = desired_slice(ip, port);
    match slices.get_opt(SLICE_NAME).await.map_err(Error::Api)? {
        None => {
            slices.create(&PostParams::default(), &want).await.map_err(Error::Api)?;
            tracing::info!(%ip, port, "created endpointslice kube-system/kube-dns-rkube");
        }
        Some(have) => {
            let labels_ok = want
                .metadata
                .labels
                .iter()
                .flatten()
                .all(|(k, v)| have.metadata.labels.as_ref().and_then(|l| l.get(k)) == Some(v));
            if !labels_ok
                || have.address_type != want.address_type
                || have.endpoints != want.endpoints
                || have.ports != want.ports
            {
                let mut next = want;
                next.metadata.resource_version = have.metadata.resource_version.clone();
                let labels = next.metadata.labels.get_or_insert_with(Default::default);
                for (k, v) in have.metadata.labels.into_iter().flatten() {
                    labels.entry(k).or_insert(v);
                }
                slices
                    .replace(SLICE_NAME, &PostParams::default(), &next)
                    .await
                    .map_err(Error::Api)?;
                tracing::info!(%ip, port, "updated endpointslice kube-system/kube-dns-rkube");
            }
        }
    }
    Ok(())
}

fn needs_update(have: &Service, want: &Service) -> bool {
    let labels_ok = want
        .metadata
        .labels
        .iter()
        .flatten()
        .all(|(k, v)| have.metadata.labels.as_ref().and_then(|l| l.get(k)) == Some(v));
    let (Some(h), Some(w)) = (have.spec.as_ref(), want.spec.as_ref()) else { return true };
    let ports_ok = h.ports.iter().flatten().map(port_key).collect::<Vec<_>>()
        == w.ports.iter().flatten().map(port_key).collect::<Vec<_>>();
    !labels_ok
        || !ports_ok
        || h.selector.as_ref().is_some_and(|s| !s.is_empty())
        || h.type_ != w.type_
}

/// The fields of a port we set (the server fills in others, such as nodePort defaults).
fn port_key(p: &ServicePort) -> (Option<String>, Option<String>, i32, Option<IntOrString>) {
    (p.name.clone(), p.protocol.clone(), p.port, p.target_port.clone())
}

/// Waits (bounded) until a deleted `kube-dns` is really gone, so the create does not conflict
/// with it while finalization runs.
async fn wait_gone(services: &Api<Service>) -> Result<()> {
    for _ in 0..50 {
        if services.get_opt(SERVICE_NAME).await.map_err(Error::Api)?.is_none() {
            return Ok(());
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    Err(Error::DeleteTimedOut)
}
