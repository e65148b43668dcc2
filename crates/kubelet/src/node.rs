//! The Node object and its heartbeats: registration with the machine's capacity, the Lease in
//! kube-node-lease renewed every quarter of its duration, and NodeStatus conditions.

use std::collections::BTreeMap;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Patch, PatchParams, PostParams};
use kube::{Api, Client};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use crate::{Config, Result, RuntimeKind};

pub const KUBELET_VERSION: &str = "v1.33.0-rkube";

pub(crate) fn meminfo_total() -> i64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<i64>().ok())
        })
        .map(|kb| kb * 1024)
        .unwrap_or(1 << 30)
}

fn disk_total(path: &std::path::Path) -> i64 {
    nix::sys::statvfs::statvfs(path)
        .map(|s| (s.blocks() as i64) * (s.fragment_size() as i64))
        .unwrap_or(10 << 30)
}

fn os_image() -> String {
    std::fs::read_to_string("/etc/os-release")
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| {
                l.strip_prefix("PRETTY_NAME=").map(|v| v.trim_matches('"').to_string())
            })
        })
        .unwrap_or_else(|| "Linux".into())
}

pub(crate) fn arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        a => a,
    }
}

pub fn capacity(config: &Config) -> (BTreeMap<String, String>, BTreeMap<String, String>) {
    let cpus = std::thread::available_parallelism().map(|n| n.get() as i64).unwrap_or(1);
    let mem = meminfo_total();
    let disk = disk_total(&config.data_dir);
    let mut cap = BTreeMap::new();
    cap.insert("cpu".to_string(), cpus.to_string());
    cap.insert("memory".to_string(), format!("{}Ki", mem / 1024));
    cap.insert("ephemeral-storage".to_string(), format!("{}Ki", disk / 1024));
    cap.insert("pods".to_string(), config.max_pods.to_string());
    cap.insert("hugepages-2Mi".to_string(), "0".to_string());
    for (k, v) in &config.extended_resources {
        cap.insert(k.clone(), v.clone());
    }
    let mut alloc = cap.clone();
    alloc.insert(
        "cpu".to_string(),
        format!("{}m", (cpus * 1000 - config.reserved_cpu_milli).max(0)),
    );
    alloc.insert(
        "memory".to_string(),
        format!("{}Ki", ((mem - config.reserved_memory_bytes).max(0)) / 1024),
    );
    (cap, alloc)
}

fn node_info(config: &Config) -> Value {
    let machine_id = std::fs::read_to_string("/etc/machine-id")
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    let boot_id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    let runtime = match config.runtime {
        // The build metadata says what a container is: host processes (not root), or
        // processes in their own namespaces and cgroup (`ns.cgroupv1` / `ns.cgroupv2`).
        RuntimeKind::Process => {
            format!("process://{}+{}", env!("CARGO_PKG_VERSION"), process_isolation(config))
        }
        RuntimeKind::Simulated => format!("simulated://{}", env!("CARGO_PKG_VERSION")),
        RuntimeKind::Oci => match rkube_oci::runc::available() {
            Some(v) => format!("runc://{}", v.rsplit(' ').next().unwrap_or(&v)),
            None => "runc://missing".into(),
        },
    };
    node_info_with(&runtime, &machine_id, &boot_id)
}

/// `status.nodeInfo` of a node on this machine with the given runtime and identities.
pub(crate) fn node_info_with(runtime: &str, machine_id: &str, boot_id: &str) -> Value {
    let uts = nix::sys::utsname::uname().ok();
    let kernel =
        uts.as_ref().map(|u| u.release().to_string_lossy().into_owned()).unwrap_or_default();
    json!({
        "machineID": machine_id, "systemUUID": machine_id, "bootID": boot_id,
        "kernelVersion": kernel, "osImage": os_image(), "containerRuntimeVersion": runtime,
        "kubeletVersion": KUBELET_VERSION, "kubeProxyVersion": "", "operatingSystem": "linux", "architecture": arch(),
    })
}

/// What isolates a process container on this node.
fn process_isolation(config: &Config) -> &'static str {
    if !crate::pods::isolated(config) {
        return "host";
    }
    match rkube_oci::cgroup::version_of(&rkube_oci::cgroup::hierarchies()) {
        Some(rkube_oci::cgroup::Version::V1) => "ns.cgroupv1",
        Some(rkube_oci::cgroup::Version::V2) => "ns.cgroupv2",
        None => "ns",
    }
}

/// The labels every node registers with (upstream's well-known ones), then the configured ones.
pub(crate) fn node_labels(
    name: &str,
    extra: &BTreeMap<String, String>,
) -> BTreeMap<String, String> {
    let mut labels: BTreeMap<String, String> = BTreeMap::new();
    labels.insert("kubernetes.io/hostname".into(), name.to_string());
    labels.insert("kubernetes.io/os".into(), "linux".into());
    labels.insert("kubernetes.io/arch".into(), arch().into());
    labels.insert("beta.kubernetes.io/os".into(), "linux".into());
    labels.insert("beta.kubernetes.io/arch".into(), arch().into());
    labels.extend(extra.clone());
    labels
}

pub(crate) fn conditions(now: &str, ready_since: &str, problem: Option<&str>) -> Value {
    let ready = match problem {
        None => {
            json!({"type": "Ready", "status": "True", "lastHeartbeatTime": now, "lastTransitionTime": ready_since, "reason": "KubeletReady", "message": "kubelet is posting ready status"})
        }
        Some(p) => {
            json!({"type": "Ready", "status": "False", "lastHeartbeatTime": now, "lastTransitionTime": ready_since, "reason": "KubeletNotReady", "message": p})
        }
    };
    json!([
        {"type": "MemoryPressure", "status": "False", "lastHeartbeatTime": now, "lastTransitionTime": ready_since, "reason": "KubeletHasSufficientMemory", "message": "kubelet has sufficient memory available"},
        {"type": "DiskPressure", "status": "False", "lastHeartbeatTime": now, "lastTransitionTime": ready_since, "reason": "KubeletHasNoDiskPressure", "message": "kubelet has no disk pressure"},
        {"type": "PIDPressure", "status": "False", "lastHeartbeatTime": now, "lastTransitionTime": ready_since, "reason": "KubeletHasSufficientPID", "message": "kubelet has sufficient PID available"},
        ready,
    ])
}

/// Why this node cannot run pods, as its Ready condition says it: the oci runtime without
/// runc (or without root) is a node that is up but cannot start a container.
pub fn runtime_problem(config: &Config) -> Option<String> {
    if config.runtime != RuntimeKind::Oci {
        return None;
    }
    if !nix::unistd::Uid::effective().is_root() {
        return Some("container runtime is down: the oci runtime needs root".into());
    }
    if rkube_oci::runc::available().is_none() {
        return Some(
            "container runtime is down: runc was not found on PATH (Debian: apt-get install runc)"
                .into(),
        );
    }
    None
}

pub(crate) fn now() -> String {
    jiff::Timestamp::now().strftime("%Y-%m-%dT%H:%M:%SZ").to_string()
}

/// Creates the Node, or brings an existing one (a restart) up to date.
pub async fn register(client: &Client, config: &Config, port: u16) -> Result<()> {
    let api: Api<Node> = Api::all(client.clone());
    let labels = node_labels(&config.node_name, &config.labels);
    let (cap, alloc) = capacity(config);
    let node: Node = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": config.node_name, "labels": labels, "annotations": {"node.alpha.kubernetes.io/ttl": "0"}},
        "spec": {"taints": if config.taints.is_empty() { Value::Null } else { serde_json::to_value(&config.taints).unwrap_or(Value::Null) }},
    }))
    .map_err(|e| crate::Error::Config(e.to_string()))?;
    match api.create(&PostParams::default(), &node).await {
        Ok(_) => {}
        Err(kube::Error::Api(e)) if e.code == 409 => {
            let patch = json!({"metadata": {"labels": labels}});
            api.patch(&config.node_name, &PatchParams::default(), &Patch::Strategic(&patch))
                .await?;
        }
        Err(e) => return Err(e.into()),
    }
    let t = now();
    let status = json!({"status": {
        "capacity": cap, "allocatable": alloc,
        "conditions": conditions(&t, &t, runtime_problem(config).as_deref()),
        "addresses": [{"type": "InternalIP", "address": config.node_ip}, {"type": "Hostname", "address": config.node_name}],
        "daemonEndpoints": {"kubeletEndpoint": {"Port": port}},
        "nodeInfo": node_info(config),
    }});
    api.patch_status(&config.node_name, &PatchParams::default(), &Patch::Merge(&status)).await?;
    Ok(())
}

/// Renews the Lease every quarter of its duration and re-posts NodeStatus when it is due or the
/// node had been marked not ready by the control plane.
pub async fn heartbeat(client: Client, config: Config, port: u16, shutdown: CancellationToken) {
    let leases: Api<Lease> = Api::namespaced(client.clone(), "kube-node-lease");
    let nodes: Api<Node> = Api::all(client.clone());
    let interval = config.lease_duration / 4;
    let mut last_status = tokio::time::Instant::now();
    let mut ready_since = now();
    let problem = runtime_problem(&config);
    let want_ready = if problem.is_some() { "False" } else { "True" };
    loop {
        if let Err(e) = renew(&leases, &nodes, &config).await {
            tracing::debug!("node {}: lease renewal failed: {e}", config.node_name);
        }
        // Report status when due, or at once if the node lifecycle controller flipped Ready.
        let flipped = match nodes.get_opt(&config.node_name).await {
            Ok(Some(n)) => n
                .status
                .and_then(|s| s.conditions)
                .unwrap_or_default()
                .iter()
                .any(|c| c.type_ == "Ready" && c.status != want_ready),
            Ok(None) => {
                // Deleted while we run: register again, as upstream's kubelet does.
                let _ = register(&client, &config, port).await;
                false
            }
            Err(_) => false,
        };
        if flipped || last_status.elapsed() >= config.status_report_frequency {
            let t = now();
            if flipped {
                ready_since = t.clone();
            }
            let (cap, alloc) = capacity(&config);
            let conds = conditions(&t, &ready_since, problem.as_deref());
            let patch =
                json!({"status": {"conditions": conds, "capacity": cap, "allocatable": alloc}});
            if nodes
                .patch_status(&config.node_name, &PatchParams::default(), &Patch::Strategic(&patch))
                .await
                .is_ok()
            {
                last_status = tokio::time::Instant::now();
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(interval) => {}
        }
    }
}

async fn renew(leases: &Api<Lease>, nodes: &Api<Node>, config: &Config) -> Result<()> {
    let t = rkube_client::now_micro();
    let secs = config.lease_duration.as_secs() as i32;
    match leases.get_opt(&config.node_name).await? {
        Some(_) => {
            let patch = json!({"spec": {"holderIdentity": config.node_name, "leaseDurationSeconds": secs, "renewTime": t}});
            leases.patch(&config.node_name, &PatchParams::default(), &Patch::Merge(&patch)).await?;
        }
        None => {
            let owner = nodes.get(&config.node_name).await?;
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(config.node_name.clone()),
                    namespace: Some("kube-node-lease".into()),
                    owner_references: Some(vec![
                        k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference {
                            api_version: "v1".into(),
                            kind: "Node".into(),
                            name: config.node_name.clone(),
                            uid: owner.metadata.uid.unwrap_or_default(),
                            ..Default::default()
                        },
                    ]),
                    ..Default::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(config.node_name.clone()),
                    lease_duration_seconds: Some(secs),
                    renew_time: Some(t),
                    ..Default::default()
                }),
            };
            leases.create(&PostParams::default(), &lease).await?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_node_whose_runtime_cannot_run_reports_not_ready_with_the_reason() {
        let c = conditions("t", "s", Some("container runtime is down: runc was not found"));
        let ready = c.as_array().unwrap().iter().find(|c| c["type"] == "Ready").unwrap();
        assert_eq!(ready["status"], "False");
        assert_eq!(ready["reason"], "KubeletNotReady");
        assert_eq!(ready["message"], "container runtime is down: runc was not found");
        let ok = conditions("t", "s", None);
        let ready = ok.as_array().unwrap().iter().find(|c| c["type"] == "Ready").unwrap();
        assert_eq!(
            (ready["status"].as_str(), ready["reason"].as_str()),
            (Some("True"), Some("KubeletReady"))
        );
    }

    #[test]
    fn only_the_oci_runtime_can_lack_its_runtime() {
        let process = Config { runtime: RuntimeKind::Process, ..Config::default() };
        assert!(runtime_problem(&process).is_none());
    }
}
