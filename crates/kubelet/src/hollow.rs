//! Hollow nodes (`rkube agent --simulate N`): N simulated nodes in one process, cheap enough for
//! thousands. One client, one pod watch and one node watch serve them all.
//!
//! Each node registers with a realistic capacity, labels and nodeInfo (runtime `simulated://`),
//! renews its Lease in kube-node-lease every quarter of the lease duration — the renewals of all
//! nodes spread evenly over that interval — and re-posts its NodeStatus when due (upstream: every
//! 5 min) or as soon as the control plane marked it not ready. Pods bound to a hollow node go
//! Running with the status a kubelet writes (conditions, container statuses, an address of the
//! node's pod CIDR, startTime) without running anything; run-to-completion pods (restartPolicy
//! Never or OnFailure) succeed after `complete_after`; a pod being deleted is confirmed with a
//! grace-0 delete, as a kubelet does once its containers stopped. Hollow nodes serve no logs or
//! exec (their kubelet port is 0, which the API server answers with a clear error).
//!
//! Writes go through two small work queues (node heartbeats first, pods second) drained by a
//! bounded number of workers: 10,000 pods starting at once are at most `max_in_flight` requests
//! at a time, and a pod's newer write replaces its older one still waiting.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap, HashSet, VecDeque};
use std::hash::{Hash, Hasher};
use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Container, Node, Pod, PodSpec, PodStatus, Taint};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams, Preconditions};
use kube::runtime::watcher;
use kube::{Api, Client};
use serde_json::{Value, json};
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::pods::{Ctr, init_containers, pod_containers, pod_status, restart_policy};

/// The label every hollow node carries (and the node watch selects on).
pub const HOLLOW_LABEL: &str = "node.rkube.io/hollow";

/// The most hollow nodes one process numbers pods for: one /24 each in `pod_network`'s /10.
pub const MAX_NODES: usize = 1 << 14;

#[derive(Clone, Debug)]
pub struct HollowConfig {
    /// How many nodes: `<name_prefix>0` … `<name_prefix><count-1>`.
    pub count: usize,
    pub name_prefix: String,
    /// How long a run-to-completion pod runs before it succeeds.
    pub complete_after: Duration,
    /// The Lease's duration; it is renewed every quarter of it (upstream: 40 s, every 10 s).
    pub lease_duration: Duration,
    /// NodeStatus is re-posted at least this often (upstream: 5 min).
    pub status_report_frequency: Duration,
    /// Each node's capacity (kwok's defaults: 32 CPUs, 256 GiB, 110 pods).
    pub cpu: String,
    pub memory: String,
    pub max_pods: i64,
    pub extended_resources: Vec<(String, String)>,
    pub labels: BTreeMap<String, String>,
    pub taints: Vec<Taint>,
    /// Every hollow node's InternalIP (and so its pods' hostIP).
    pub node_ip: String,
    /// Pod addresses: node `i` gets the `i`-th /24 of this /10.
    pub pod_network: Ipv4Addr,
    /// Requests in flight at once for pods (node heartbeats have a quarter of it besides).
    pub max_in_flight: usize,
}

impl Default for HollowConfig {
    fn default() -> Self {
        HollowConfig {
            count: 1,
            name_prefix: "hollow-".into(),
            complete_after: Duration::from_secs(5),
            lease_duration: Duration::from_secs(40),
            status_report_frequency: Duration::from_secs(300),
            cpu: "32".into(),
            memory: "256Gi".into(),
            max_pods: 110,
            extended_resources: Vec::new(),
            labels: BTreeMap::new(),
            taints: Vec::new(),
            node_ip: "127.0.0.1".into(),
            pod_network: Ipv4Addr::new(100, 64, 0, 0),
            max_in_flight: 32,
        }
    }
}

impl HollowConfig {
    pub fn node_name(&self, i: usize) -> String {
        format!("{}{i}", self.name_prefix)
    }

    /// Node `i`'s pod CIDR.
    pub fn pod_cidr(&self, i: usize) -> String {
        format!("{}/24", Ipv4Addr::from(u32::from(self.pod_network) + ((i as u32) << 8)))
    }

    /// The address of host number `host` (2..=254) in node `i`'s pod CIDR.
    fn pod_ip(&self, i: usize, host: u8) -> String {
        Ipv4Addr::from(u32::from(self.pod_network) + ((i as u32) << 8) + host as u32).to_string()
    }
}

/// Runs `config.count` hollow nodes until `shutdown`. The nodes stay registered when it ends,
/// as a machine that lost power: the node lifecycle controller marks them unreachable.
pub async fn run(
    client: Client,
    config: HollowConfig,
    shutdown: CancellationToken,
) -> crate::Result<()> {
    if config.count == 0 || config.count > MAX_NODES {
        return Err(crate::Error::Config(format!(
            "--simulate takes 1 to {MAX_NODES} nodes, not {}",
            config.count
        )));
    }
    if u32::from(config.pod_network) & ((1 << 22) - 1) != 0 {
        return Err(crate::Error::Config(format!(
            "the hollow pod network {} must start a /10",
            config.pod_network
        )));
    }
    let h = Arc::new(Hollow::new(client, config));
    let mut tasks = Vec::new();
    let node_workers = (h.config.max_in_flight / 4).max(2);
    for _ in 0..node_workers {
        tasks.push(tokio::spawn(node_worker(h.clone(), shutdown.clone())));
    }
    for _ in 0..h.config.max_in_flight.max(1) {
        tasks.push(tokio::spawn(pod_worker(h.clone(), shutdown.clone())));
    }
    for i in 0..h.config.count {
        h.node_jobs.push(NodeJobKey(i, NodeJobKind::Register), NodeJob::Register);
    }
    tasks.push(tokio::spawn(heartbeats(h.clone(), shutdown.clone())));
    tasks.push(tokio::spawn(watch_nodes(h.clone(), shutdown.clone())));
    tasks.push(tokio::spawn(watch_pods(h.clone(), shutdown.clone())));
    tracing::info!(
        "{} hollow nodes {}0…{}{}",
        h.config.count,
        h.config.name_prefix,
        h.config.name_prefix,
        h.config.count - 1
    );
    shutdown.cancelled().await;
    h.node_jobs.close();
    h.pod_jobs.close();
    for t in tasks {
        let _ = tokio::time::timeout(Duration::from_secs(2), t).await;
    }
    Ok(())
}

struct NodeState {
    registered: bool,
    /// When it registered (a relisted node watch ignores nodes registered after it began).
    registered_at: Option<Instant>,
    uid: String,
    ready_since: String,
    next_status: Option<Instant>,
}

struct Hollow {
    client: Client,
    config: HollowConfig,
    index: HashMap<String, usize>,
    nodes: Vec<Mutex<NodeState>>,
    /// nodeInfo shared by every node (each gets its own machine and system IDs).
    node_info: Value,
    node_jobs: Queue<NodeJobKey, NodeJob>,
    pod_jobs: Queue<String, PodJob>,
    registered: std::sync::atomic::AtomicUsize,
    started: Instant,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum NodeJobKind {
    Register,
    Lease,
    Status,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct NodeJobKey(usize, NodeJobKind);

#[derive(Clone, Copy, Debug)]
enum NodeJob {
    Register,
    Lease,
    /// Re-post NodeStatus; `flipped`: the control plane had marked it not ready.
    Status {
        flipped: bool,
    },
}

#[derive(Debug)]
enum PodJob {
    Status { ns: String, name: String, uid: String, status: Value },
    Delete { ns: String, name: String, uid: String },
}

impl Hollow {
    fn new(client: Client, config: HollowConfig) -> Hollow {
        let index = (0..config.count).map(|i| (config.node_name(i), i)).collect();
        let now = crate::node::now();
        let nodes = (0..config.count)
            .map(|_| {
                Mutex::new(NodeState {
                    registered: false,
                    registered_at: None,
                    uid: String::new(),
                    ready_since: now.clone(),
                    next_status: None,
                })
            })
            .collect();
        let runtime = format!("simulated://{}", env!("CARGO_PKG_VERSION"));
        let boot_id = hex_id(&("boot", std::process::id(), &now));
        Hollow {
            node_info: crate::node::node_info_with(&runtime, "", &boot_id),
            client,
            config,
            index,
            nodes,
            node_jobs: Queue::new(),
            pod_jobs: Queue::new(),
            registered: Default::default(),
            started: Instant::now(),
        }
    }

    fn node(&self, i: usize) -> std::sync::MutexGuard<'_, NodeState> {
        self.nodes[i].lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The Node object node `i` registers as, status included.
    fn node_object(&self, i: usize) -> Value {
        let c = &self.config;
        let name = c.node_name(i);
        let mut labels = crate::node::node_labels(&name, &c.labels);
        labels.insert(HOLLOW_LABEL.into(), "true".into());
        let cidr = c.pod_cidr(i);
        let mut capacity = BTreeMap::new();
        capacity.insert("cpu".to_string(), c.cpu.clone());
        capacity.insert("memory".to_string(), c.memory.clone());
        capacity.insert("pods".to_string(), c.max_pods.to_string());
        capacity.insert("ephemeral-storage".to_string(), "100Gi".to_string());
        capacity.insert("hugepages-2Mi".to_string(), "0".to_string());
        for (k, v) in &c.extended_resources {
            capacity.insert(k.clone(), v.clone());
        }
        let mut info = self.node_info.clone();
        let machine = hex_id(&("machine", &name));
        info["machineID"] = json!(machine);
        info["systemUUID"] = json!(machine);
        let t = crate::node::now();
        let since = self.node(i).ready_since.clone();
        json!({
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": name, "labels": labels, "annotations": {"node.alpha.kubernetes.io/ttl": "0"}},
            "spec": {
                "podCIDR": cidr, "podCIDRs": [cidr],
                "taints": if c.taints.is_empty() { Value::Null } else { serde_json::to_value(&c.taints).unwrap_or(Value::Null) },
            },
            "status": {
                "capacity": capacity, "allocatable": capacity,
                "conditions": crate::node::conditions(&t, &since, None),
                "addresses": [{"type": "InternalIP", "address": c.node_ip}, {"type": "Hostname", "address": name}],
                "daemonEndpoints": {"kubeletEndpoint": {"Port": 0}},
                "nodeInfo": info,
            },
        })
    }

    async fn register(&self, i: usize) -> Result<(), kube::Error> {
        let api: Api<Node> = Api::all(self.client.clone());
        let obj = self.node_object(i);
        let node: Node = serde_json::from_value(obj.clone()).map_err(kube::Error::SerdeError)?;
        let name = self.config.node_name(i);
        let created = match api.create(&PostParams::default(), &node).await {
            Ok(n) => n,
            Err(kube::Error::Api(e)) if e.code == 409 => {
                // This agent restarted: the node is ours again, with our labels and status.
                let meta = json!({"metadata": {"labels": obj["metadata"]["labels"]}});
                api.patch(&name, &PatchParams::default(), &Patch::Merge(&meta)).await?;
                let status = json!({"status": obj["status"]});
                api.patch_status(&name, &PatchParams::default(), &Patch::Merge(&status)).await?
            }
            Err(e) => return Err(e),
        };
        let uid = created.metadata.uid.unwrap_or_default();
        self.create_lease(i, &uid).await?;
        let first = {
            let mut n = self.node(i);
            n.uid = uid;
            let first = n.registered_at.is_none();
            n.registered = true;
            n.registered_at = Some(Instant::now());
            // The first reposts spread over half the period, so they never come all at once.
            let freq = self.config.status_report_frequency;
            let spread = freq.mul_f64(0.5 + 0.5 * i as f64 / self.config.count as f64);
            n.next_status = Some(Instant::now() + spread);
            first
        };
        if first {
            let done = self.registered.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
            if done == self.config.count {
                tracing::info!(
                    "{done} hollow nodes registered in {:.1} s",
                    self.started.elapsed().as_secs_f64()
                );
            }
        } else {
            tracing::info!(node = %name, "hollow node registered again");
        }
        Ok(())
    }

    async fn create_lease(&self, i: usize, node_uid: &str) -> Result<(), kube::Error> {
        let name = self.config.node_name(i);
        let leases: Api<Lease> = Api::namespaced(self.client.clone(), "kube-node-lease");
        let lease: Lease = serde_json::from_value(json!({
            "metadata": {"name": name, "namespace": "kube-node-lease",
                "ownerReferences": [{"apiVersion": "v1", "kind": "Node", "name": name, "uid": node_uid}]},
            "spec": {"holderIdentity": name, "leaseDurationSeconds": self.config.lease_duration.as_secs(),
                "renewTime": rkube_client::now_micro()},
        }))
        .map_err(kube::Error::SerdeError)?;
        match leases.create(&PostParams::default(), &lease).await {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(e)) if e.code == 409 => self.renew(i).await,
            Err(e) => Err(e),
        }
    }

    async fn renew(&self, i: usize) -> Result<(), kube::Error> {
        let name = self.config.node_name(i);
        let leases: Api<Lease> = Api::namespaced(self.client.clone(), "kube-node-lease");
        let patch = json!({"spec": {"holderIdentity": name,
            "leaseDurationSeconds": self.config.lease_duration.as_secs(), "renewTime": rkube_client::now_micro()}});
        match leases.patch(&name, &PatchParams::default(), &Patch::Merge(&patch)).await {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(e)) if e.code == 404 => {
                let uid = self.node(i).uid.clone();
                let uid = if uid.is_empty() {
                    let nodes: Api<Node> = Api::all(self.client.clone());
                    nodes.get(&name).await?.metadata.uid.unwrap_or_default()
                } else {
                    uid
                };
                Box::pin(self.create_lease(i, &uid)).await
            }
            Err(e) => Err(e),
        }
    }

    async fn post_status(&self, i: usize, flipped: bool) -> Result<(), kube::Error> {
        let name = self.config.node_name(i);
        let t = crate::node::now();
        let since = {
            let mut n = self.node(i);
            if flipped {
                n.ready_since = t.clone();
            }
            n.ready_since.clone()
        };
        let api: Api<Node> = Api::all(self.client.clone());
        let patch = json!({"status": {"conditions": crate::node::conditions(&t, &since, None)}});
        match api.patch_status(&name, &PatchParams::default(), &Patch::Merge(&patch)).await {
            Ok(_) => {
                let mut n = self.node(i);
                n.next_status = Some(Instant::now() + self.config.status_report_frequency);
                Ok(())
            }
            Err(kube::Error::Api(e)) if e.code == 404 => {
                // Deleted while we run: register again, as upstream's kubelet does.
                self.node(i).registered = false;
                self.node_jobs.push(NodeJobKey(i, NodeJobKind::Register), NodeJob::Register);
                Ok(())
            }
            Err(e) => Err(e),
        }
    }
}

/// A stable 32-hex-digit id derived from `v` (machine IDs, container IDs).
fn hex_id<T: Hash>(v: &T) -> String {
    let mut a = std::collections::hash_map::DefaultHasher::new();
    v.hash(&mut a);
    let mut b = std::collections::hash_map::DefaultHasher::new();
    (a.finish(), v).hash(&mut b);
    format!("{:016x}{:016x}", a.finish(), b.finish())
}

async fn node_worker(h: Arc<Hollow>, shutdown: CancellationToken) {
    while let Some((key, job)) = h.node_jobs.pop(&shutdown).await {
        let i = key.0;
        let result = match job {
            NodeJob::Register => h.register(i).await,
            NodeJob::Lease => h.renew(i).await,
            NodeJob::Status { flipped } => h.post_status(i, flipped).await,
        };
        h.node_jobs.done(&key);
        if let Err(e) = result {
            tracing::debug!(node = %h.config.node_name(i), "{job:?}: {e}");
            if matches!(job, NodeJob::Register) {
                // Registration must happen: try again shortly (renewals just wait their turn).
                let h = h.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    h.node_jobs.push_if_absent(key, job);
                });
            }
        }
    }
}

async fn pod_worker(h: Arc<Hollow>, shutdown: CancellationToken) {
    while let Some((key, job)) = h.pod_jobs.pop(&shutdown).await {
        let result = match &job {
            PodJob::Status { ns, name, uid, status } => {
                let api: Api<Pod> = Api::namespaced(h.client.clone(), ns);
                // The uid makes the write a precondition: never another pod of the same name.
                let patch = json!({"metadata": {"uid": uid}, "status": status});
                api.patch_status(name, &PatchParams::default(), &Patch::Merge(&patch))
                    .await
                    .map(|_| ())
            }
            PodJob::Delete { ns, name, uid } => {
                let api: Api<Pod> = Api::namespaced(h.client.clone(), ns);
                let dp = DeleteParams {
                    grace_period_seconds: Some(0),
                    preconditions: Some(Preconditions {
                        uid: Some(uid.clone()),
                        resource_version: None,
                    }),
                    ..Default::default()
                };
                api.delete(name, &dp).await.map(|_| ())
            }
        };
        h.pod_jobs.done(&key);
        match result {
            Ok(()) => {}
            // Gone, or another pod by now: nothing to write.
            Err(kube::Error::Api(e)) if e.code == 404 || e.code == 409 => {}
            // Refused for good (invalid…): trying again would not help.
            Err(kube::Error::Api(e)) if e.code < 500 && e.code != 429 => {
                tracing::warn!(pod = %key, "{job:?} refused: {}", e.message);
            }
            Err(e) => {
                tracing::debug!(pod = %key, "{e}; trying again");
                let h = h.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    h.pod_jobs.push_if_absent(key, job);
                });
            }
        }
    }
}

/// Renews every registered node's Lease once per quarter of the lease duration: the nodes are
/// dealt into 100 ms slots, so 5,000 nodes renew 50 at a time, never all at once.
async fn heartbeats(h: Arc<Hollow>, shutdown: CancellationToken) {
    let tick = Duration::from_millis(100);
    let interval = h.config.lease_duration / 4;
    let slots = ((interval.as_millis() / tick.as_millis()) as usize).max(1);
    let mut ticker = tokio::time::interval(tick);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut n = 0usize;
    // The first renewal is one interval after registration (which created the Lease).
    tokio::select! {
        _ = shutdown.cancelled() => return,
        _ = tokio::time::sleep(interval) => {}
    }
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = ticker.tick() => {}
        }
        let slot = n % slots;
        n += 1;
        let now = Instant::now();
        for i in (slot..h.config.count).step_by(slots) {
            let (registered, due) = {
                let s = h.node(i);
                (s.registered, s.next_status.is_some_and(|t| t <= now))
            };
            if !registered {
                continue;
            }
            h.node_jobs.push_if_absent(NodeJobKey(i, NodeJobKind::Lease), NodeJob::Lease);
            if due {
                h.node_jobs.push_if_absent(
                    NodeJobKey(i, NodeJobKind::Status),
                    NodeJob::Status { flipped: false },
                );
            }
        }
    }
}

/// Watches the hollow nodes: one marked not ready re-posts its status at once; one deleted
/// registers again.
async fn watch_nodes(h: Arc<Hollow>, shutdown: CancellationToken) {
    let api: Api<Node> = Api::all(h.client.clone());
    let wc = watcher::Config::default().labels(&format!("{HOLLOW_LABEL}=true"));
    let mut seen: HashSet<usize> = HashSet::new();
    let mut init_began = Instant::now();
    rkube_client::watch::follow(api, wc, shutdown, move |ev| {
        match ev {
            watcher::Event::Init => {
                seen.clear();
                init_began = Instant::now();
            }
            watcher::Event::InitApply(n) => {
                if let Some(i) = h.index.get(n.metadata.name.as_deref().unwrap_or("")) {
                    seen.insert(*i);
                    on_node(&h, *i, &n);
                }
            }
            watcher::Event::InitDone => {
                // Registered before this listing began, yet not in it: deleted meanwhile.
                for i in 0..h.config.count {
                    let lost = {
                        let s = h.node(i);
                        s.registered && s.registered_at.is_some_and(|t| t < init_began)
                    };
                    if lost && !seen.contains(&i) {
                        h.node(i).registered = false;
                        h.node_jobs.push(NodeJobKey(i, NodeJobKind::Register), NodeJob::Register);
                    }
                }
                seen = HashSet::new();
            }
            watcher::Event::Apply(n) => {
                if let Some(i) = h.index.get(n.metadata.name.as_deref().unwrap_or("")) {
                    on_node(&h, *i, &n);
                }
            }
            watcher::Event::Delete(n) => {
                if let Some(&i) = h.index.get(n.metadata.name.as_deref().unwrap_or("")) {
                    let was = std::mem::replace(&mut h.node(i).registered, false);
                    if was {
                        tracing::info!(node = %h.config.node_name(i), "hollow node deleted");
                        h.node_jobs.push(NodeJobKey(i, NodeJobKind::Register), NodeJob::Register);
                    }
                }
            }
        }
    })
    .await
}

fn on_node(h: &Hollow, i: usize, n: &Node) {
    let not_ready = n
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status != "True"));
    if not_ready && h.node(i).registered {
        h.node_jobs.push(NodeJobKey(i, NodeJobKind::Status), NodeJob::Status { flipped: true });
    }
}

/// What the pod loop remembers of one pod bound to a hollow node.
struct PodEntry {
    node: usize,
    /// Host number of its address in the node's pod CIDR, while it holds one.
    host: Option<u8>,
    deleting: bool,
    /// What a run-to-completion pod needs to report its success later.
    completion: Option<Box<Completion>>,
}

struct Completion {
    pod: Pod,
    pod_ip: String,
    start_time: String,
    conditions: Value,
}

/// Pod addresses of one node: host numbers 2..=254 (.1 is the node's gateway by convention).
#[derive(Default, Clone)]
struct Hosts([u64; 4]);

impl Hosts {
    fn take(&mut self) -> Option<u8> {
        let h = (2..=254u8).find(|h| self.0[*h as usize / 64] & (1 << (*h % 64)) == 0)?;
        self.mark(h);
        Some(h)
    }

    fn mark(&mut self, h: u8) {
        self.0[h as usize / 64] |= 1 << (h % 64);
    }

    fn free(&mut self, h: u8) {
        self.0[h as usize / 64] &= !(1 << (h % 64));
    }
}

fn runs_to_completion(pod: &Pod) -> bool {
    restart_policy(pod) != "Always"
}

fn container_id(uid: &str, name: &str) -> String {
    format!("simulated://{}", hex_id(&(uid, name)))
}

/// The containers of a hollow pod that just started: init containers done (sidecars running),
/// app containers running.
fn started_ctrs(pod: &Pod, t: &str) -> HashMap<String, Ctr> {
    let uid = pod.metadata.uid.as_deref().unwrap_or("");
    let mut ctrs = HashMap::new();
    for c in init_containers(pod) {
        let id = container_id(uid, &c.name);
        let x = if c.restart_policy.as_deref() == Some("Always") {
            Ctr::hollow_running(id, t)
        } else {
            Ctr::hollow_exited(id, t, t, 0)
        };
        ctrs.insert(c.name, x);
    }
    for c in pod_containers(pod) {
        ctrs.insert(c.name.clone(), Ctr::hollow_running(container_id(uid, &c.name), t));
    }
    ctrs
}

/// The containers of a hollow run-to-completion pod once it finished: everything exited 0.
fn finished_ctrs(pod: &Pod, started: &str, t: &str) -> HashMap<String, Ctr> {
    let uid = pod.metadata.uid.as_deref().unwrap_or("");
    init_containers(pod)
        .into_iter()
        .chain(pod_containers(pod))
        .map(|c| {
            let id = container_id(uid, &c.name);
            (c.name, Ctr::hollow_exited(id, started, t, 0))
        })
        .collect()
}

/// Just what reporting a pod's completion needs: names, images, policies, QoS class.
fn trimmed(pod: &Pod) -> Pod {
    let slim = |cs: Vec<Container>| -> Vec<Container> {
        cs.into_iter()
            .map(|c| Container {
                name: c.name,
                image: c.image,
                restart_policy: c.restart_policy,
                ..Default::default()
            })
            .collect()
    };
    let inits = init_containers(pod);
    Pod {
        metadata: ObjectMeta {
            name: pod.metadata.name.clone(),
            namespace: pod.metadata.namespace.clone(),
            uid: pod.metadata.uid.clone(),
            ..Default::default()
        },
        spec: Some(PodSpec {
            containers: slim(pod_containers(pod)),
            init_containers: (!inits.is_empty()).then(|| slim(inits)),
            restart_policy: pod.spec.as_ref().and_then(|s| s.restart_policy.clone()),
            ..Default::default()
        }),
        status: Some(PodStatus {
            qos_class: pod.status.as_ref().and_then(|s| s.qos_class.clone()),
            ..Default::default()
        }),
    }
}

/// The pods of all hollow nodes: one watch, dispatched by `spec.nodeName`.
struct Pods {
    entries: HashMap<String, PodEntry>,
    hosts: Vec<Hosts>,
    completions: BinaryHeap<Reverse<(Instant, String)>>,
}

/// What the pod loop wants written.
type Writes = Vec<(String, PodJob)>;

impl Pods {
    fn new(count: usize) -> Pods {
        Pods {
            entries: HashMap::new(),
            hosts: vec![Hosts::default(); count],
            completions: BinaryHeap::new(),
        }
    }

    /// A pod was added or changed.
    fn apply(&mut self, config: &HollowConfig, node: usize, pod: &Pod, out: &mut Writes) {
        let uid = pod.metadata.uid.clone().unwrap_or_default();
        let ns = pod.metadata.namespace.clone().unwrap_or_else(|| "default".into());
        let name = pod.metadata.name.clone().unwrap_or_default();
        if pod.metadata.deletion_timestamp.is_some() {
            let e = self.entries.entry(uid.clone()).or_insert(PodEntry {
                node,
                host: None,
                deleting: false,
                completion: None,
            });
            if !e.deleting {
                // Its (hollow) containers stop at once: confirm the deletion as a kubelet does.
                e.deleting = true;
                e.completion = None;
                out.push((uid.clone(), PodJob::Delete { ns, name, uid }));
            }
            return;
        }
        if self.entries.contains_key(&uid) {
            return;
        }
        let status = pod.status.as_ref();
        let phase = status.and_then(|s| s.phase.as_deref()).unwrap_or("Pending");
        let mut entry = PodEntry { node, host: None, deleting: false, completion: None };
        match phase {
            "Succeeded" | "Failed" => {}
            "Running" => {
                // Started before this agent (re)started: keep its address and its clock.
                let ip = status.and_then(|s| s.pod_ip.clone()).unwrap_or_default();
                if let Some(h) = ip
                    .parse::<Ipv4Addr>()
                    .ok()
                    .map(|a| u32::from(a).wrapping_sub(u32::from(config.pod_network)))
                    .filter(|off| (*off >> 8) as usize == node)
                    .map(|off| (off & 0xff) as u8)
                {
                    self.hosts[node].mark(h);
                    entry.host = Some(h);
                }
                if runs_to_completion(pod) {
                    let start = status
                        .and_then(|s| s.start_time.as_ref())
                        .map(|t| t.0.strftime("%Y-%m-%dT%H:%M:%SZ").to_string())
                        .unwrap_or_else(crate::node::now);
                    let conds = serde_json::to_value(status.and_then(|s| s.conditions.clone()))
                        .unwrap_or(Value::Null);
                    entry.completion = Some(Box::new(Completion {
                        pod: trimmed(pod),
                        pod_ip: ip,
                        start_time: start,
                        conditions: conds,
                    }));
                    self.completions
                        .push(Reverse((Instant::now() + config.complete_after, uid.clone())));
                }
            }
            _ => {
                let host = self.hosts[node].take();
                if host.is_none() {
                    tracing::warn!(pod = %name, node = %config.node_name(node), "no pod address left on the node");
                }
                entry.host = host;
                let pod_ip = config.pod_ip(node, host.unwrap_or(0));
                let t = crate::node::now();
                let ctrs = started_ctrs(pod, &t);
                let status = pod_status(pod, &ctrs, &Value::Null, &config.node_ip, &pod_ip, &t);
                if runs_to_completion(pod) {
                    entry.completion = Some(Box::new(Completion {
                        pod: trimmed(pod),
                        pod_ip,
                        start_time: t,
                        conditions: status["conditions"].clone(),
                    }));
                    self.completions
                        .push(Reverse((Instant::now() + config.complete_after, uid.clone())));
                }
                out.push((uid.clone(), PodJob::Status { ns, name, uid: uid.clone(), status }));
            }
        }
        self.entries.insert(uid, entry);
    }

    /// A pod is gone from the API: its address is free again.
    fn delete(&mut self, uid: &str) {
        if let Some(e) = self.entries.remove(uid)
            && let Some(h) = e.host
        {
            self.hosts[e.node].free(h);
        }
    }

    /// Run-to-completion pods whose time came: they succeed and give back their address.
    fn complete_due(&mut self, config: &HollowConfig, now: Instant, out: &mut Writes) {
        while let Some(Reverse((at, _))) = self.completions.peek()
            && *at <= now
        {
            let Some(Reverse((_, uid))) = self.completions.pop() else { break };
            let Some(e) = self.entries.get_mut(&uid) else { continue };
            let Some(c) = e.completion.take() else { continue };
            if e.deleting {
                continue;
            }
            if let Some(h) = e.host.take() {
                self.hosts[e.node].free(h);
            }
            let t = crate::node::now();
            let ctrs = finished_ctrs(&c.pod, &c.start_time, &t);
            let prev = json!({"conditions": c.conditions});
            let status =
                pod_status(&c.pod, &ctrs, &prev, &config.node_ip, &c.pod_ip, &c.start_time);
            let ns = c.pod.metadata.namespace.clone().unwrap_or_else(|| "default".into());
            let name = c.pod.metadata.name.clone().unwrap_or_default();
            out.push((uid.clone(), PodJob::Status { ns, name, uid, status }));
        }
    }

    fn next_completion(&self) -> Option<Instant> {
        self.completions.peek().map(|Reverse((t, _))| *t)
    }
}

async fn watch_pods(h: Arc<Hollow>, shutdown: CancellationToken) {
    let api: Api<Pod> = Api::all(h.client.clone());
    let wc = watcher::Config::default().fields("spec.nodeName!=");
    let mut stream = rkube_client::watch::events(api, wc).boxed();
    let mut pods = Pods::new(h.config.count);
    let mut seen_in_init: HashSet<String> = HashSet::new();
    let mut out: Writes = Vec::new();
    loop {
        let wake = pods.next_completion();
        let ev = tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = async { match wake { Some(t) => tokio::time::sleep_until(t).await, None => std::future::pending().await } } => {
                pods.complete_due(&h.config, Instant::now(), &mut out);
                None
            }
            e = stream.next() => match e { Some(e) => Some(e), None => return },
        };
        let node_of = |p: &Pod| {
            p.spec.as_ref().and_then(|s| s.node_name.as_deref()).and_then(|n| h.index.get(n))
        };
        match ev {
            None => {}
            Some(watcher::Event::Init) => seen_in_init.clear(),
            Some(watcher::Event::InitApply(p) | watcher::Event::Apply(p)) => {
                if let Some(&i) = node_of(&p) {
                    seen_in_init.insert(p.metadata.uid.clone().unwrap_or_default());
                    pods.apply(&h.config, i, &p, &mut out);
                }
            }
            Some(watcher::Event::InitDone) => {
                let gone: Vec<String> =
                    pods.entries.keys().filter(|u| !seen_in_init.contains(*u)).cloned().collect();
                for uid in gone {
                    pods.delete(&uid);
                }
                seen_in_init = HashSet::new();
            }
            Some(watcher::Event::Delete(p)) => {
                pods.delete(p.metadata.uid.as_deref().unwrap_or(""));
            }
        }
        for (key, job) in out.drain(..) {
            h.pod_jobs.push(key, job);
        }
    }
}

/// A work queue with one pending job per key: a newer job replaces one still waiting, and a
/// key being worked on is not handed out again until `done` (client-go's workqueue semantics).
struct Queue<K, J> {
    inner: Mutex<QueueInner<K, J>>,
    notify: Notify,
}

struct QueueInner<K, J> {
    order: VecDeque<K>,
    pending: HashMap<K, J>,
    processing: HashSet<K>,
    closed: bool,
}

impl<K: Clone + Eq + Hash, J> Queue<K, J> {
    fn new() -> Self {
        Queue {
            inner: Mutex::new(QueueInner {
                order: VecDeque::new(),
                pending: HashMap::new(),
                processing: HashSet::new(),
                closed: false,
            }),
            notify: Notify::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, QueueInner<K, J>> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn push(&self, key: K, job: J) {
        let mut q = self.lock();
        let fresh = q.pending.insert(key.clone(), job).is_none();
        if fresh && !q.processing.contains(&key) {
            q.order.push_back(key);
            drop(q);
            self.notify.notify_one();
        }
    }

    /// Queues `job` unless a job for `key` is already waiting (a retry never overrides news).
    fn push_if_absent(&self, key: K, job: J) {
        if !self.lock().pending.contains_key(&key) {
            self.push(key, job);
        }
    }

    async fn pop(&self, shutdown: &CancellationToken) -> Option<(K, J)> {
        loop {
            let notified = self.notify.notified();
            {
                let mut q = self.lock();
                if q.closed {
                    return None;
                }
                while let Some(k) = q.order.pop_front() {
                    if let Some(j) = q.pending.remove(&k) {
                        q.processing.insert(k.clone());
                        let more = !q.order.is_empty();
                        drop(q);
                        if more {
                            // Others may be waiting for what is left.
                            self.notify.notify_one();
                        }
                        return Some((k, j));
                    }
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => return None,
                _ = notified => {}
            }
        }
    }

    fn done(&self, key: &K) {
        let mut q = self.lock();
        q.processing.remove(key);
        if q.pending.contains_key(key) {
            q.order.push_back(key.clone());
            drop(q);
            self.notify.notify_one();
        }
    }

    fn close(&self) {
        self.lock().closed = true;
        self.notify.notify_waiters();
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.lock().pending.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(policy: &str, init: bool) -> Pod {
        let mut spec = json!({
            "nodeName": "hollow-3", "restartPolicy": policy,
            "containers": [{"name": "app", "image": "busybox"}, {"name": "side", "image": "nginx"}],
        });
        if init {
            spec["initContainers"] = json!([{"name": "setup", "image": "busybox"}]);
        }
        serde_json::from_value(json!({
            "metadata": {"name": "p", "namespace": "ns", "uid": "u-1"},
            "spec": spec,
            "status": {"phase": "Pending", "qosClass": "Burstable"},
        }))
        .unwrap()
    }

    fn config() -> HollowConfig {
        HollowConfig { count: 10, complete_after: Duration::from_secs(5), ..Default::default() }
    }

    fn only_status(out: &mut Writes) -> Value {
        assert_eq!(out.len(), 1, "{out:?}");
        match out.pop().unwrap().1 {
            PodJob::Status { status, ns, name, uid } => {
                assert_eq!((ns.as_str(), name.as_str(), uid.as_str()), ("ns", "p", "u-1"));
                status
            }
            other => panic!("expected a status write, got {other:?}"),
        }
    }

    fn cond<'a>(status: &'a Value, ty: &str) -> &'a Value {
        status["conditions"].as_array().unwrap().iter().find(|c| c["type"] == ty).unwrap()
    }

    #[test]
    fn a_pod_bound_to_a_hollow_node_runs_with_a_kubelets_status() {
        let c = config();
        let mut pods = Pods::new(c.count);
        let mut out = Vec::new();
        pods.apply(&c, 3, &pod("Always", true), &mut out);
        let s = only_status(&mut out);
        assert_eq!(s["phase"], "Running");
        assert_eq!(s["podIP"], "100.64.3.2");
        assert_eq!(s["podIPs"][0]["ip"], "100.64.3.2");
        assert_eq!(s["hostIP"], "127.0.0.1");
        assert_eq!(s["qosClass"], "Burstable");
        assert!(s["startTime"].as_str().is_some_and(|t| t.ends_with('Z')));
        for ty in ["Ready", "ContainersReady", "Initialized", "PodScheduled"] {
            assert_eq!(cond(&s, ty)["status"], "True", "{ty}");
        }
        let cs = s["containerStatuses"].as_array().unwrap();
        assert_eq!(cs.len(), 2);
        for x in cs {
            assert_eq!(x["ready"], true);
            assert!(x["state"]["running"]["startedAt"].is_string());
            assert!(x["containerID"].as_str().unwrap().starts_with("simulated://"));
        }
        assert_eq!(s["initContainerStatuses"][0]["state"]["terminated"]["reason"], "Completed");
        // A long-running pod never completes.
        assert!(pods.next_completion().is_none());
        // Seen again (its own status update): nothing more to write.
        pods.apply(&c, 3, &pod("Always", true), &mut out);
        assert!(out.is_empty());
    }

    #[test]
    fn a_run_to_completion_pod_succeeds_after_the_configured_time() {
        let c = config();
        let mut pods = Pods::new(c.count);
        let mut out = Vec::new();
        let t0 = Instant::now();
        pods.apply(&c, 3, &pod("Never", false), &mut out);
        let running = only_status(&mut out);
        assert_eq!(running["phase"], "Running");
        let at = pods.next_completion().unwrap();
        assert!(at >= t0 + c.complete_after && at <= Instant::now() + c.complete_after);
        pods.complete_due(&c, at - Duration::from_millis(1), &mut out);
        assert!(out.is_empty(), "not yet");
        pods.complete_due(&c, at, &mut out);
        let done = only_status(&mut out);
        assert_eq!(done["phase"], "Succeeded");
        assert_eq!(done["podIP"], running["podIP"]);
        assert_eq!(done["startTime"], running["startTime"]);
        assert_eq!(cond(&done, "Ready")["status"], "False");
        assert_eq!(cond(&done, "Ready")["reason"], "PodCompleted");
        // Conditions that did not change keep their transition time.
        assert_eq!(
            cond(&done, "PodScheduled")["lastTransitionTime"],
            cond(&running, "PodScheduled")["lastTransitionTime"]
        );
        for x in done["containerStatuses"].as_array().unwrap() {
            assert_eq!(x["state"]["terminated"]["reason"], "Completed");
            assert_eq!(x["state"]["terminated"]["exitCode"], 0);
            assert_eq!(x["ready"], false);
        }
        // Its address is free again for the next pod of the node.
        let mut next = pod("Always", false);
        next.metadata.uid = Some("u-2".into());
        pods.apply(&c, 3, &next, &mut out);
        match out.pop().unwrap().1 {
            PodJob::Status { status, .. } => assert_eq!(status["podIP"], "100.64.3.2"),
            other => panic!("{other:?}"),
        }
        assert!(pods.next_completion().is_none());
    }

    #[test]
    fn on_failure_pods_complete_too_and_always_pods_do_not() {
        assert!(runs_to_completion(&pod("OnFailure", false)));
        assert!(runs_to_completion(&pod("Never", false)));
        assert!(!runs_to_completion(&pod("Always", false)));
    }

    #[test]
    fn a_deleted_pod_is_confirmed_once_with_grace_zero_and_never_completes() {
        let c = config();
        let mut pods = Pods::new(c.count);
        let mut out = Vec::new();
        pods.apply(&c, 3, &pod("Never", false), &mut out);
        out.clear();
        let mut p = pod("Never", false);
        p.metadata.deletion_timestamp = Some(rkube_client::now_time());
        pods.apply(&c, 3, &p, &mut out);
        assert!(
            matches!(out.as_slice(), [(k, PodJob::Delete { uid, .. })] if k == "u-1" && uid == "u-1")
        );
        out.clear();
        pods.apply(&c, 3, &p, &mut out);
        assert!(out.is_empty(), "deleted once");
        pods.complete_due(&c, Instant::now() + Duration::from_secs(60), &mut out);
        assert!(out.is_empty(), "a deleted pod does not succeed");
        pods.delete("u-1");
        assert!(pods.entries.is_empty());
        assert_eq!(pods.hosts[3].0, [0; 4], "its address is free");
    }

    #[test]
    fn a_pod_already_running_is_adopted_with_its_address() {
        let c = config();
        let mut pods = Pods::new(c.count);
        let mut out = Vec::new();
        let mut p = pod("Always", false);
        let status = p.status.as_mut().unwrap();
        status.phase = Some("Running".into());
        status.pod_ip = Some("100.64.3.7".into());
        pods.apply(&c, 3, &p, &mut out);
        assert!(out.is_empty(), "nothing to write");
        let mut q = pod("Always", false);
        q.metadata.uid = Some("u-2".into());
        for _ in 2..7 {
            let mut r = q.clone();
            r.metadata.uid = Some(format!("u-{}", pods.entries.len() + 10));
            pods.apply(&c, 3, &r, &mut out);
        }
        pods.apply(&c, 3, &q, &mut out);
        match out.pop().unwrap().1 {
            PodJob::Status { status, .. } => assert_eq!(status["podIP"], "100.64.3.8"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn node_addresses_and_pod_cidrs_do_not_overlap() {
        let c = HollowConfig { count: 5000, ..Default::default() };
        assert_eq!(c.pod_cidr(0), "100.64.0.0/24");
        assert_eq!(c.pod_cidr(4999), "100.83.135.0/24");
        assert_eq!(c.pod_cidr(MAX_NODES - 1), "100.127.255.0/24");
        let mut h = Hosts::default();
        let all: Vec<u8> = std::iter::from_fn(|| h.take()).collect();
        assert_eq!(all.len(), 253);
        assert_eq!((all[0], all[252]), (2, 254));
        h.free(100);
        assert_eq!(h.take(), Some(100));
        assert_eq!(h.take(), None);
    }

    #[test]
    fn the_node_object_is_a_ready_node_with_capacity_and_a_simulated_runtime() {
        let client_free = HollowConfig { count: 3, ..Default::default() };
        // A Hollow needs a client only to talk; building the object does not use it.
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let cfg = kube::Config::new("http://127.0.0.1:9".parse().unwrap());
            let client = Client::try_from(cfg).unwrap();
            let h = Hollow::new(client, client_free);
            let n = h.node_object(2);
            assert_eq!(n["metadata"]["name"], "hollow-2");
            assert_eq!(n["metadata"]["labels"]["kubernetes.io/hostname"], "hollow-2");
            assert_eq!(n["metadata"]["labels"][HOLLOW_LABEL], "true");
            assert_eq!(n["spec"]["podCIDR"], "100.64.2.0/24");
            assert_eq!(n["status"]["allocatable"]["pods"], "110");
            assert_eq!(n["status"]["capacity"]["cpu"], "32");
            let info = &n["status"]["nodeInfo"];
            assert!(info["containerRuntimeVersion"].as_str().unwrap().starts_with("simulated://"));
            assert_ne!(info["machineID"], h.node_object(1)["status"]["nodeInfo"]["machineID"]);
            let ready = n["status"]["conditions"]
                .as_array()
                .unwrap()
                .iter()
                .find(|c| c["type"] == "Ready")
                .unwrap();
            assert_eq!(ready["status"], "True");
            let node: Node = serde_json::from_value(n).unwrap();
            assert_eq!(
                node.status.unwrap().daemon_endpoints.unwrap().kubelet_endpoint.unwrap().port,
                0
            );
        });
    }

    #[tokio::test]
    async fn the_queue_keeps_one_job_per_key_and_never_hands_out_a_key_twice() {
        let q: Queue<String, u32> = Queue::new();
        let stop = CancellationToken::new();
        q.push("a".into(), 1);
        q.push("b".into(), 1);
        q.push("a".into(), 2);
        assert_eq!(q.len(), 2);
        let (k, j) = q.pop(&stop).await.unwrap();
        assert_eq!((k.as_str(), j), ("a", 2), "the newer job replaced the older");
        q.push("a".into(), 3);
        let (k, _) = q.pop(&stop).await.unwrap();
        assert_eq!(k, "b", "a is being worked on");
        q.push_if_absent("b".into(), 9);
        q.done(&"b".into());
        let (k, j) = q.pop(&stop).await.unwrap();
        assert_eq!((k.as_str(), j), ("b", 9));
        q.done(&"b".into());
        q.done(&"a".into());
        let (k, j) = q.pop(&stop).await.unwrap();
        assert_eq!((k.as_str(), j), ("a", 3), "a again once done");
        q.push_if_absent("c".into(), 1);
        q.push_if_absent("c".into(), 2);
        assert_eq!(q.pop(&stop).await.unwrap(), ("c".into(), 1));
        stop.cancel();
        assert!(q.pop(&stop).await.is_none());
    }
}
