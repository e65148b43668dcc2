//! Endpoints and EndpointSlice controllers: for every Service with a selector, the addresses of
//! its pods (ready and not ready) and the resolved target ports, as kube-proxy and DNS read them.

use std::time::Duration;

use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::api::{Patch, PatchParams};
use kube::{Api, Client, ResourceExt};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use crate::informer::{Informers, next_pass};
use crate::util::is_ready;

pub async fn run(client: Client, inf: Informers, shutdown: CancellationToken) {
    let mut changed = inf.changed.clone();
    let mut last: std::collections::HashMap<String, Value> = Default::default();
    loop {
        for svc in inf.services.state() {
            let key = format!("{}/{}", svc.namespace().unwrap_or_default(), svc.name_any());
            let Some(desired) = desired(&inf, &svc) else { continue };
            if last.get(&key) == Some(&desired) {
                continue;
            }
            match apply(&client, &svc, &desired).await {
                Ok(()) => {
                    last.insert(key, desired);
                }
                Err(e) => tracing::debug!("endpoints {key}: {e}"),
            }
        }
        if !next_pass(&mut changed, Duration::from_secs(10), &shutdown).await {
            return;
        }
    }
}

/// The target port of a service port on one pod: a number, or a named container port.
fn target_port(pod: &Pod, port: &IntOrString, fallback: i32) -> Option<i32> {
    match port {
        IntOrString::Int(n) => Some(*n),
        IntOrString::String(name) => name.parse::<i32>().ok().or_else(|| {
            pod.spec
                .as_ref()?
                .containers
                .iter()
                .flat_map(|c| c.ports.iter().flatten())
                .find(|p| p.name.as_deref() == Some(name.as_str()))
                .map(|p| p.container_port)
        }),
    }
    .or(Some(fallback))
}

/// (endpoints subsets, endpointslice endpoints, ports) for a Service, or None without selector.
fn desired(inf: &Informers, svc: &Service) -> Option<Value> {
    let spec = svc.spec.as_ref()?;
    let selector = spec.selector.as_ref().filter(|s| !s.is_empty())?;
    let ns = svc.namespace().unwrap_or_default();
    let ports = spec.ports.clone().unwrap_or_default();
    let mut ready = Vec::new();
    let mut not_ready = Vec::new();
    let mut slice_eps = Vec::new();
    let mut resolved_ports: Vec<Value> = Vec::new();
    let mut pods: Vec<_> = inf
        .pods
        .state()
        .into_iter()
        .filter(|p| p.namespace().as_deref() == Some(&ns))
        .filter(|p| {
            let l = p.labels();
            selector.iter().all(|(k, v)| l.get(k) == Some(v))
        })
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .filter(|p| {
            p.status.as_ref().and_then(|s| s.pod_ip.as_ref()).is_some_and(|ip| !ip.is_empty())
        })
        .collect();
    pods.sort_by_key(|p| p.name_any());
    for p in &pods {
        let ip = p.status.as_ref().and_then(|s| s.pod_ip.clone()).unwrap_or_default();
        let addr = json!({"ip": ip, "nodeName": p.spec.as_ref().and_then(|s| s.node_name.clone()),
                          "targetRef": {"kind": "Pod", "name": p.name_any(), "namespace": ns, "uid": p.uid()}});
        let ok = is_ready(p);
        if ok {
            ready.push(addr)
        } else {
            not_ready.push(addr)
        }
        slice_eps.push(json!({"addresses": [ip], "conditions": {"ready": ok, "serving": ok, "terminating": false},
                              "nodeName": p.spec.as_ref().and_then(|s| s.node_name.clone()),
                              "targetRef": {"kind": "Pod", "name": p.name_any(), "namespace": ns, "uid": p.uid()}}));
        if resolved_ports.is_empty() {
            for sp in &ports {
                let tp = sp.target_port.clone().unwrap_or(IntOrString::Int(sp.port));
                if let Some(port) = target_port(p, &tp, sp.port) {
                    resolved_ports.push(json!({"name": sp.name.clone().unwrap_or_default(), "port": port, "protocol": sp.protocol.clone().unwrap_or_else(|| "TCP".into())}));
                }
            }
        }
    }
    Some(
        json!({"ready": ready, "notReady": not_ready, "slice": slice_eps, "ports": resolved_ports}),
    )
}

async fn apply(client: &Client, svc: &Service, d: &Value) -> crate::Result<()> {
    let ns = svc.namespace().unwrap_or_default();
    let name = svc.name_any();
    let labels = svc.labels().clone();
    let owner = json!([{"apiVersion": "v1", "kind": "Service", "name": name, "uid": svc.uid(), "controller": true, "blockOwnerDeletion": true}]);
    let mut subset = json!({"ports": d["ports"]});
    if !d["ready"].as_array().is_none_or(|a| a.is_empty()) {
        subset["addresses"] = d["ready"].clone();
    }
    if !d["notReady"].as_array().is_none_or(|a| a.is_empty()) {
        subset["notReadyAddresses"] = d["notReady"].clone();
    }
    let has_any = subset.get("addresses").is_some() || subset.get("notReadyAddresses").is_some();
    let ep = json!({
        "apiVersion": "v1", "kind": "Endpoints",
        "metadata": {"name": name, "namespace": ns, "labels": labels},
        "subsets": if has_any { json!([subset]) } else { json!([]) },
    });
    let pp = PatchParams::apply("endpoint-controller").force();
    let eps: Api<k8s_openapi::api::core::v1::Endpoints> = Api::namespaced(client.clone(), &ns);
    eps.patch(&name, &pp, &Patch::Apply(&ep)).await?;
    let mut slice_labels = serde_json::to_value(&labels).unwrap_or(json!({}));
    slice_labels["kubernetes.io/service-name"] = json!(name);
    slice_labels["endpointslice.kubernetes.io/managed-by"] =
        json!("endpointslice-controller.k8s.io");
    let slice = json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": format!("{name}-rkube"), "namespace": ns, "labels": slice_labels, "ownerReferences": owner},
        "addressType": "IPv4",
        "endpoints": d["slice"],
        "ports": d["ports"],
    });
    let slices: Api<k8s_openapi::api::discovery::v1::EndpointSlice> =
        Api::namespaced(client.clone(), &ns);
    slices
        .patch(
            &format!("{name}-rkube"),
            &PatchParams::apply("endpointslice-controller.k8s.io").force(),
            &Patch::Apply(&slice),
        )
        .await?;
    Ok(())
}
