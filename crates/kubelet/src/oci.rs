//! The kubelet's `oci` runtime: pulls the pod's images (`rkube_oci::image`), gives each pod a
//! sandbox with its own network namespace wired to the node's pod network, and runs every
//! container from its image through runc (`rkube_oci::runc`). Shared by all pod workers of one
//! node.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Container, Node, Pod, Secret};
use kube::{Api, Client};
use rkube_oci::image::{Auth, ImageStore, StoreConfig};
use rkube_oci::runc::{self, Runtime};

use crate::Config;
use crate::network::PodNetwork;

pub struct OciNode {
    pub runtime: Runtime,
    pub images: ImageStore,
    network: tokio::sync::Mutex<Option<Arc<PodNetwork>>>,
    shutdown: tokio_util::sync::CancellationToken,
}

impl OciNode {
    /// The runtime state under `<data dir>/oci`, images under the configured image store.
    pub fn open(
        config: &Config,
        shutdown: tokio_util::sync::CancellationToken,
    ) -> Result<OciNode, String> {
        let shim = if config.runc_shim.is_empty() {
            return Err(
                "the oci runtime needs the shim command (rkube's hidden `runc-shim`)".into()
            );
        } else {
            config.runc_shim.iter().map(std::ffi::OsString::from).collect()
        };
        let runtime = Runtime::new(config.data_dir.join("oci"), shim)
            .map_err(|e| e.to_string())?
            .with_cgroup_parent(format!("rkube/{}", config.node_name));
        let images_root =
            config.image_dir.clone().unwrap_or_else(|| config.data_dir.join("images"));
        let store_config = StoreConfig {
            insecure_registries: config.insecure_registries.clone(),
            ..StoreConfig::default()
        };
        let images = ImageStore::open_with(images_root, store_config).map_err(|e| e.to_string())?;
        Ok(OciNode { runtime, images, network: tokio::sync::Mutex::new(None), shutdown })
    }

    /// The node's pod network, once the node has a podCIDR; until then pods wait in
    /// ContainerCreating, as upstream's do while the network plugin is not ready.
    pub async fn network(
        &self,
        client: &Client,
        config: &Config,
    ) -> Result<Arc<PodNetwork>, String> {
        let mut slot = self.network.lock().await;
        if let Some(n) = slot.as_ref() {
            return Ok(n.clone());
        }
        let node = Api::<Node>::all(client.clone())
            .get(&config.node_name)
            .await
            .map_err(|e| format!("read node {}: {e}", config.node_name))?;
        let cidr = node.spec.and_then(|s| s.pod_cidr).ok_or_else(|| {
            "network is not ready: the node has no podCIDR yet (is the controller manager's node IPAM running?)".to_string()
        })?;
        let net = PodNetwork::new(
            &config.node_name,
            &cidr,
            &config.cluster_cidr,
            &config.data_dir.join("ipam"),
        )
        .map_err(|e| e.to_string())?;
        let n2 = net.clone();
        tokio::task::spawn_blocking(move || n2.ensure_bridge())
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| format!("network is not ready: {e}"))?;
        let net = Arc::new(net);
        *slot = Some(net.clone());
        tokio::spawn(routes(client.clone(), config.clone(), net.clone(), self.shutdown.clone()));
        Ok(net)
    }
}

/// Host-gw routing: the pod CIDR of every other node is reached through that node's
/// InternalIP, kept as nodes come, change and go. Nodes sharing this node's address (several
/// nodes of one machine) need no route: their bridges are local.
async fn routes(
    client: Client,
    config: Config,
    net: Arc<PodNetwork>,
    shutdown: tokio_util::sync::CancellationToken,
) {
    use futures::StreamExt;
    let api: Api<Node> = Api::all(client);
    let (reader, mut writer) = kube::runtime::reflector::store();
    let mut stream = rkube_client::watch::events(api, kube::runtime::watcher::Config::default())
        .map(move |ev| writer.apply_watcher_event(&ev))
        .boxed();
    let mut installed: BTreeMap<String, String> = BTreeMap::new();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            ev = stream.next() => if ev.is_none() { return },
        }
        let mut want: BTreeMap<String, String> = BTreeMap::new();
        for node in reader.state() {
            if node.metadata.name.as_deref() == Some(config.node_name.as_str()) {
                continue;
            }
            let cidr = node.spec.as_ref().and_then(|s| s.pod_cidr.clone());
            let ip = node.status.as_ref().and_then(|s| s.addresses.as_ref()).and_then(|a| {
                a.iter().find(|a| a.type_ == "InternalIP").map(|a| a.address.clone())
            });
            if let (Some(cidr), Some(ip)) = (cidr, ip)
                && ip != config.node_ip
                && !ip.starts_with("127.")
            {
                want.insert(cidr, ip);
            }
        }
        for (cidr, ip) in &want {
            if installed.get(cidr) != Some(ip) {
                let (n, c, i) = (net.clone(), cidr.clone(), ip.clone());
                match tokio::task::spawn_blocking(move || n.route_to(&c, &i)).await {
                    Ok(Ok(())) => {
                        installed.insert(cidr.clone(), ip.clone());
                    }
                    Ok(Err(e)) => tracing::warn!(%cidr, %ip, "route to another node's pods: {e}"),
                    Err(e) => tracing::warn!("route task: {e}"),
                }
            }
        }
        let gone: Vec<String> =
            installed.keys().filter(|c| !want.contains_key(*c)).cloned().collect();
        for cidr in gone {
            let (n, c) = (net.clone(), cidr.clone());
            let _ = tokio::task::spawn_blocking(move || n.remove_route(&c)).await;
            installed.remove(&cidr);
        }
    }
}

/// Credentials from the pod's `imagePullSecrets` (`kubernetes.io/dockerconfigjson` or
/// `kubernetes.io/dockercfg`); a missing secret is skipped, as upstream does.
pub async fn pull_auth(client: &Client, pod: &Pod) -> Auth {
    let ns = pod.metadata.namespace.clone().unwrap_or_else(|| "default".into());
    let api: Api<Secret> = Api::namespaced(client.clone(), &ns);
    let mut auth = Auth::anonymous();
    for r in pod.spec.as_ref().and_then(|s| s.image_pull_secrets.clone()).unwrap_or_default() {
        let Ok(Some(secret)) = api.get_opt(&r.name).await else { continue };
        let data = secret.data.unwrap_or_default();
        for key in [".dockerconfigjson", ".dockercfg"] {
            if let Some(bytes) = data.get(key)
                && let Ok(a) = Auth::from_docker_config_json(&bytes.0)
            {
                auth.merge(&a);
            }
        }
    }
    auth
}

/// The pod's /etc/hosts, as the kubelet writes it (managed, with hostAliases).
pub fn hosts_file(pod: &Pod, pod_ip: &str, hostname: &str) -> String {
    let mut s = String::from(
        "# Kubernetes-managed hosts file.\n127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\nfe00::0\tip6-localnet\nfe00::0\tip6-mcastprefix\nfe00::1\tip6-allnodes\nfe00::2\tip6-allrouters\n",
    );
    let subdomain = pod.spec.as_ref().and_then(|s| s.subdomain.clone());
    let ns = pod.metadata.namespace.clone().unwrap_or_default();
    match subdomain {
        Some(sd) => {
            s.push_str(&format!("{pod_ip}\t{hostname}.{sd}.{ns}.svc.cluster.local\t{hostname}\n"))
        }
        None => s.push_str(&format!("{pod_ip}\t{hostname}\n")),
    }
    for a in pod.spec.as_ref().and_then(|s| s.host_aliases.clone()).unwrap_or_default() {
        s.push_str(&format!(
            "\n# Entries added by HostAliases.\n{}\t{}\n",
            a.ip,
            a.hostnames.unwrap_or_default().join("\t")
        ));
    }
    s
}

/// Image garbage collection, as the kubelet's image manager does it: every `period`, when the
/// image filesystem is at least `high`% full, the least recently used images no pod of this
/// node names (and no mounted container uses) are removed until usage is down to `low`%.
/// Not freeing enough is a `FreeDiskSpaceFailed` warning on the Node.
pub async fn image_gc_loop(
    oci: Arc<OciNode>,
    client: Client,
    config: Config,
    recorder: rkube_client::events::Recorder,
    period: std::time::Duration,
) {
    let pods: Api<Pod> = Api::all(client);
    let node_ref = k8s_openapi::api::core::v1::ObjectReference {
        api_version: Some("v1".into()),
        kind: Some("Node".into()),
        name: Some(config.node_name.clone()),
        uid: Some(config.node_name.clone()),
        ..Default::default()
    };
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tokio::select! {
            _ = oci.shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let lp =
            kube::api::ListParams::default().fields(&format!("spec.nodeName={}", config.node_name));
        let Ok(list) = pods.list(&lp).await else { continue };
        let in_use = images_named_by(&list.items);
        match oci
            .images
            .gc(config.image_gc_high_threshold, config.image_gc_low_threshold, &in_use)
            .await
        {
            Ok(report) if report.freed_bytes < report.wanted_bytes => {
                let msg = format!(
                    "Failed to garbage collect required amount of images. Attempted to free {} bytes, but only found {} bytes eligible to free.",
                    report.wanted_bytes, report.freed_bytes
                );
                recorder.record(&node_ref, "Warning", "FreeDiskSpaceFailed", &msg).await;
            }
            Ok(report) if !report.removed.is_empty() => {
                tracing::info!(node = %config.node_name, removed = ?report.removed, freed = report.freed_bytes, "image garbage collection");
            }
            Ok(_) => {}
            Err(e) => recorder.record(&node_ref, "Warning", "ImageGCFailed", &e.to_string()).await,
        }
    }
}

/// Every image the pods name, by reference and by the image ID their statuses report.
fn images_named_by(pods: &[Pod]) -> Vec<String> {
    let mut out = Vec::new();
    for p in pods {
        let spec = p.spec.iter();
        let containers =
            spec.flat_map(|s| s.containers.iter().chain(s.init_containers.iter().flatten()));
        out.extend(containers.filter_map(|c| c.image.clone()));
        let statuses = p.status.iter().flat_map(|s| {
            s.container_statuses.iter().flatten().chain(s.init_container_statuses.iter().flatten())
        });
        for cs in statuses {
            out.push(cs.image.clone());
            out.push(cs.image_id.clone());
        }
    }
    out.retain(|i| !i.is_empty());
    out.sort();
    out.dedup();
    out
}

/// The pod's resolv.conf as the kubelet computes it for its DNS policy (see
/// [`rkube_dns::resolv::pod_resolv_conf`]), from the node's resolv.conf and the cluster DNS.
pub fn resolv_conf(pod: &Pod, config: &Config) -> String {
    let host = rkube_dns::resolv::ResolvConf::parse(
        &std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default(),
    );
    let dns: Vec<String> = config
        .cluster_dns
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(String::from)
        .collect();
    rkube_dns::resolv::pod_resolv_conf(pod, &config.cluster_domain, &dns, &host)
}

fn milli(q: Option<&k8s_openapi::apimachinery::pkg::api::resource::Quantity>) -> Option<u64> {
    rkube_client::quantity::parse_milli(&q?.0).and_then(|m| u64::try_from(m).ok())
}

/// What runc needs to run container `c` of `pod` from `image`.
#[allow(clippy::too_many_arguments)]
pub fn container_config(
    pod: &Pod,
    c: &Container,
    id: String,
    env: &[(String, String)],
    image: &rkube_oci::image::Image,
    mounts: &[crate::volumes::Mount],
    log_path: PathBuf,
) -> runc::ContainerConfig {
    let expand = |v: &Option<Vec<String>>| -> Vec<String> {
        v.clone().unwrap_or_default().iter().map(|a| crate::env::expand(a, env)).collect()
    };
    let res = c.resources.as_ref();
    let limits = res.and_then(|r| r.limits.as_ref());
    let requests = res.and_then(|r| r.requests.as_ref());
    let pod_sc = pod.spec.as_ref().and_then(|s| s.security_context.clone()).unwrap_or_default();
    let sc = c.security_context.clone().unwrap_or_default();
    let caps = sc.capabilities.clone().unwrap_or_default();
    runc::ContainerConfig {
        id,
        name: c.name.clone(),
        rootfs_lower: image.rootfs.clone(),
        image: runc::ImageConfig {
            entrypoint: image.config.entrypoint.clone(),
            cmd: image.config.cmd.clone(),
            env: image.config.env.clone(),
            working_dir: image.config.working_dir.clone().unwrap_or_default(),
            user: image.config.user.clone().unwrap_or_default(),
        },
        command: expand(&c.command),
        args: expand(&c.args),
        env: env.to_vec(),
        working_dir: c.working_dir.clone().filter(|w| !w.is_empty()),
        mounts: mounts
            .iter()
            .map(|m| runc::Mount {
                host: m.host.clone(),
                container: PathBuf::from(&m.container),
                read_only: m.read_only,
            })
            .collect(),
        resources: runc::Resources {
            cpu_request_milli: milli(requests.and_then(|r| r.get("cpu"))),
            cpu_limit_milli: milli(limits.and_then(|r| r.get("cpu"))),
            memory_limit_bytes: milli(limits.and_then(|r| r.get("memory"))).map(|m| m / 1000),
            pids_limit: None,
        },
        security: runc::Security {
            run_as_user: sc.run_as_user.or(pod_sc.run_as_user).and_then(|u| u32::try_from(u).ok()),
            run_as_group: sc
                .run_as_group
                .or(pod_sc.run_as_group)
                .and_then(|g| u32::try_from(g).ok()),
            read_only_root_fs: sc.read_only_root_filesystem.unwrap_or(false),
            privileged: sc.privileged.unwrap_or(false),
            caps_add: caps.add.unwrap_or_default(),
            caps_drop: caps.drop.unwrap_or_default(),
            allow_privilege_escalation: sc.allow_privilege_escalation,
        },
        log_path,
        tty: c.tty.unwrap_or(false),
        stdin: c.stdin.unwrap_or(false),
        stdin_once: c.stdin_once.unwrap_or(false),
    }
}

/// A runc container id for the `attempt`-th start of container `name` of pod `uid`.
pub fn container_id(uid: &str, name: &str, attempt: u64) -> String {
    let short: String = uid.chars().filter(|c| c.is_ascii_alphanumeric()).take(12).collect();
    format!("{short}-{name}-{attempt}")
}

/// The command prefix that runs a command inside container `c` (`runc --root … exec <id>`).
pub fn exec_argv(runtime: &Runtime, c: &runc::Container, tty: bool) -> Vec<String> {
    runtime.exec_prefix(c, tty).into_iter().map(|a| a.to_string_lossy().into_owned()).collect()
}

/// The running runc container of container `name` of pod `uid` on this node, for `exec`.
pub async fn running_container(
    config: &Config,
    uid: &str,
    name: &str,
) -> Option<(Runtime, runc::Container)> {
    let shim: Vec<std::ffi::OsString> = config.runc_shim.iter().map(Into::into).collect();
    let runtime = Runtime::new(config.data_dir.join("oci"), shim)
        .ok()?
        .with_cgroup_parent(format!("rkube/{}", config.node_name));
    let list = runtime.list().await.ok()?;
    let c = list
        .into_iter()
        .filter(|i| i.container.pod_uid == uid && i.container.name == name)
        .filter(|i| matches!(i.status, runc::ContainerStatus::Running { .. }))
        .map(|i| i.container)
        .next_back()?;
    Some((runtime, c))
}

/// The sandbox of pod `uid` on this node: `Some(netns)`, where `None` is the node's network
/// (hostNetwork); `None` when the pod has no sandbox here.
pub fn pod_netns(config: &Config, uid: &str) -> Option<Option<PathBuf>> {
    let shim: Vec<std::ffi::OsString> = config.runc_shim.iter().map(Into::into).collect();
    let runtime = Runtime::new(config.data_dir.join("oci"), shim).ok()?;
    runtime.sandbox(uid).ok()?.map(|sb| sb.netns_path)
}

/// Keeps the previous log for `kubectl logs --previous`, as the process runtime does.
pub fn rotate_log(path: &Path) {
    if let Some(dir) = path.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    if path.exists() {
        let _ = std::fs::rename(path, path.with_extension("log.1"));
    }
}

/// Image events' wording, as upstream's kubelet.
pub fn pulled_message(image: &str, took: std::time::Duration, size: u64) -> String {
    let secs = took.as_secs_f64();
    format!(
        "Successfully pulled image \"{image}\" in {secs:.3}s ({secs:.3}s including waiting). Image size: {size} bytes."
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(spec: serde_json::Value) -> Pod {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": "web", "namespace": "shop"},
            "spec": spec,
        }))
        .unwrap()
    }

    #[test]
    fn cluster_first_pods_search_their_namespace_through_the_cluster_dns() {
        let config = Config::default();
        let r = resolv_conf(&pod(serde_json::json!({"containers": []})), &config);
        assert!(
            r.starts_with("search shop.svc.cluster.local svc.cluster.local cluster.local"),
            "{r}"
        );
        assert!(r.contains("nameserver 10.96.0.10\n") && r.ends_with("options ndots:5\n"), "{r}");
        let host =
            resolv_conf(&pod(serde_json::json!({"containers": [], "hostNetwork": true})), &config);
        assert!(!host.contains("10.96.0.10"), "host network pods use the node's resolvers: {host}");
        let none = resolv_conf(
            &pod(serde_json::json!({"containers": [], "dnsPolicy": "None",
                "dnsConfig": {"nameservers": ["1.2.3.4"], "searches": ["a.b"], "options": [{"name": "ndots", "value": "2"}]}})),
            &config,
        );
        assert_eq!(none, "search a.b\nnameserver 1.2.3.4\noptions ndots:2\n");
    }

    #[test]
    fn hosts_files_name_the_pod_and_its_aliases() {
        let p = pod(
            serde_json::json!({"containers": [], "hostAliases": [{"ip": "10.1.2.3", "hostnames": ["db", "db.local"]}]}),
        );
        let h = hosts_file(&p, "10.244.0.5", "web");
        assert!(h.contains("127.0.0.1\tlocalhost\n") && h.contains("10.244.0.5\tweb\n"), "{h}");
        assert!(h.contains("10.1.2.3\tdb\tdb.local\n"), "{h}");
    }

    #[test]
    fn image_gc_keeps_what_pods_name_in_spec_and_status() {
        let mut p = pod(serde_json::json!({
            "containers": [{"name": "a", "image": "web:1"}],
            "initContainers": [{"name": "i", "image": "init:1"}],
        }));
        p.status = serde_json::from_value(serde_json::json!({"containerStatuses": [{
            "name": "a", "image": "docker.io/library/web:1", "imageID": "docker.io/library/web@sha256:ab",
            "ready": true, "restartCount": 0}]}))
        .unwrap();
        assert_eq!(
            images_named_by(&[p]),
            ["docker.io/library/web:1", "docker.io/library/web@sha256:ab", "init:1", "web:1"]
        );
    }

    #[test]
    fn container_ids_are_valid_runc_ids() {
        let id = container_id("0b6c3f57-7c0e-4d8e-9b9e-2f9d7f0b1a11", "web", 3);
        assert_eq!(id, "0b6c3f577c0e-web-3");
    }
}
