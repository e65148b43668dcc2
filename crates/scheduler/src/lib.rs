//! The scheduler: watches pods without a node, filters and scores every node, binds each pod to
//! the best one — or leaves it Pending with the FailedScheduling text Kubernetes users know.

pub mod cli;
mod interpod;
pub mod plugins;
mod queue;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Patch, PatchParams, PostParams};
use kube::runtime::watcher;
use kube::{Api, Client};
use rkube_client::events::{Recorder, reference};
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;

use plugins::{NodeUsage, Refusal};
use queue::Queue;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("kubernetes API: {0}")]
    Kube(#[from] kube::Error),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Clone, Debug)]
pub struct Config {
    /// Pods with this `spec.schedulerName` are ours.
    pub scheduler_name: String,
    /// Identity in the leader lease.
    pub identity: String,
    pub lease_duration: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            scheduler_name: "default-scheduler".into(),
            identity: format!("{}_{}", hostname(), uuid_like()),
            lease_duration: Duration::from_secs(15),
        }
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "rkube".into())
}

fn uuid_like() -> String {
    format!("{:x}", jiff::Timestamp::now().as_nanosecond() as u64)
}

/// The cluster as the scheduler sees it: nodes, pods, and pods it bound but has not yet seen
/// come back through the watch ("assumed"), so two pods never take the same free room.
#[derive(Default)]
struct Cache {
    nodes: BTreeMap<String, Node>,
    pods: HashMap<String, Pod>,
    assumed: HashMap<String, (String, Pod)>,
}

fn key(p: &Pod) -> String {
    format!(
        "{}/{}",
        p.metadata.namespace.as_deref().unwrap_or(""),
        p.metadata.name.as_deref().unwrap_or("")
    )
}

fn is_terminal(p: &Pod) -> bool {
    matches!(p.status.as_ref().and_then(|s| s.phase.as_deref()), Some("Succeeded" | "Failed"))
}

impl Cache {
    fn usage(&self) -> HashMap<String, NodeUsage> {
        let mut out: HashMap<String, NodeUsage> = HashMap::new();
        for p in self.pods.values() {
            if is_terminal(p) {
                continue;
            }
            if let Some(n) =
                p.spec.as_ref().and_then(|s| s.node_name.clone()).filter(|n| !n.is_empty())
            {
                out.entry(n).or_default().add(p);
            }
        }
        for (k, (node, p)) in &self.assumed {
            let seen_bound = self
                .pods
                .get(k)
                .is_some_and(|x| x.spec.as_ref().and_then(|s| s.node_name.as_ref()).is_some());
            if !seen_bound {
                out.entry(node.clone()).or_default().add(p);
            }
        }
        out
    }
}

/// Runs the scheduler until `shutdown`: leader lease, informers, and the scheduling loop.
pub async fn run_with_client(
    client: Client,
    config: Config,
    shutdown: CancellationToken,
) -> Result<()> {
    rkube_client::lease::lead(
        client.clone(),
        "kube-scheduler",
        &config.identity,
        config.lease_duration,
        shutdown.clone(),
    )
    .await;
    if shutdown.is_cancelled() {
        return Ok(());
    }
    let cache = Arc::new(Mutex::new(Cache::default()));
    let queue = Arc::new(Queue::new());
    let recorder = Recorder::new(client.clone(), "default-scheduler", None);

    let nodes: Api<Node> = Api::all(client.clone());
    let pods: Api<Pod> = Api::all(client.clone());
    let node_task = {
        let (cache, queue, stop) = (cache.clone(), queue.clone(), shutdown.clone());
        tokio::spawn(async move {
            let mut s = watcher(nodes, watcher::Config::default()).boxed();
            loop {
                let ev = tokio::select! { _ = stop.cancelled() => return, e = s.next() => e };
                match ev {
                    Some(Ok(watcher::Event::Apply(n) | watcher::Event::InitApply(n))) => {
                        cache
                            .lock()
                            .await
                            .nodes
                            .insert(n.metadata.name.clone().unwrap_or_default(), n);
                        queue.move_all_to_active().await;
                    }
                    Some(Ok(watcher::Event::Delete(n))) => {
                        cache.lock().await.nodes.remove(n.metadata.name.as_deref().unwrap_or(""));
                    }
                    Some(Ok(watcher::Event::Init)) => cache.lock().await.nodes.clear(),
                    Some(Ok(watcher::Event::InitDone)) => queue.move_all_to_active().await,
                    Some(Err(e)) => {
                        tracing::debug!("node watch: {e}");
                        tokio::time::sleep(Duration::from_millis(500)).await;
                    }
                    None => return,
                }
            }
        })
    };
    let pod_task = {
        let (cache, queue, stop, name) =
            (cache.clone(), queue.clone(), shutdown.clone(), config.scheduler_name.clone());
        tokio::spawn(async move {
            let mut s = watcher(pods, watcher::Config::default()).boxed();
            loop {
                let ev = tokio::select! { _ = stop.cancelled() => return, e = s.next() => e };
                match ev {
                    Some(Ok(watcher::Event::Apply(p) | watcher::Event::InitApply(p))) => {
                        let k = key(&p);
                        let unbound = p
                            .spec
                            .as_ref()
                            .is_some_and(|s| s.node_name.as_deref().is_none_or(str::is_empty));
                        let ours = p
                            .spec
                            .as_ref()
                            .and_then(|s| s.scheduler_name.as_deref())
                            .unwrap_or("default-scheduler")
                            == name;
                        let gated = p
                            .spec
                            .as_ref()
                            .and_then(|s| s.scheduling_gates.as_ref())
                            .is_some_and(|g| !g.is_empty());
                        let deleting = p.metadata.deletion_timestamp.is_some();
                        let was_terminal =
                            { cache.lock().await.pods.get(&k).is_some_and(is_terminal) };
                        {
                            let mut c = cache.lock().await;
                            if !unbound {
                                c.assumed.remove(&k);
                            }
                            c.pods.insert(k.clone(), p.clone());
                        }
                        if unbound && ours && !gated && !deleting && !is_terminal(&p) {
                            queue.add(&p).await;
                        }
                        if is_terminal(&p) && !was_terminal {
                            queue.move_all_to_active().await;
                        }
                    }
                    Some(Ok(watcher::Event::Delete(p))) => {
                        let k = key(&p);
                        {
                            let mut c = cache.lock().await;
                            c.pods.remove(&k);
                            c.assumed.remove(&k);
                        }
                        queue.forget(&k).await;
                        // A pod that leaves frees room: unschedulable pods get another chance.
                        queue.move_all_to_active().await;
                    }
                    Some(Ok(watcher::Event::Init)) => cache.lock().await.pods.clear(),
                    Some(Ok(watcher::Event::InitDone)) => {}
                    Some(Err(e)) => {
                        tracing::debug!("pod watch: {e}");
                        tokio::time::sleep(Duration::from_millis(500)).await;
                    }
                    None => return,
                }
            }
        })
    };

    loop {
        let next = tokio::select! {
            _ = shutdown.cancelled() => break,
            k = queue.pop() => k,
        };
        let Some(k) = next else { continue };
        let pod = { cache.lock().await.pods.get(&k).cloned() };
        let Some(pod) = pod else { continue };
        let still_pending =
            pod.spec.as_ref().is_some_and(|s| s.node_name.as_deref().is_none_or(str::is_empty))
                && pod.metadata.deletion_timestamp.is_none();
        if !still_pending {
            queue.forget(&k).await;
            continue;
        }
        let seq = queue.move_seq().await;
        match schedule_one(&client, &cache, &recorder, &pod, &queue).await {
            Ok(true) => queue.forget(&k).await,
            Ok(false) => queue.unschedulable(&k, seq).await,
            Err(e) => {
                tracing::debug!("scheduling {k}: {e}");
                queue.backoff(&k).await;
            }
        }
    }
    node_task.abort();
    pod_task.abort();
    Ok(())
}

/// One scheduling cycle; `Ok(true)` when bound, `Ok(false)` when no node fits.
async fn schedule_one(
    client: &Client,
    cache: &Arc<Mutex<Cache>>,
    recorder: &Recorder,
    pod: &Pod,
    queue: &Arc<Queue>,
) -> Result<bool> {
    let ns = pod.metadata.namespace.clone().unwrap_or_default();
    let name = pod.metadata.name.clone().unwrap_or_default();
    let (nodes, usage) = {
        let c = cache.lock().await;
        (c.nodes.values().cloned().collect::<Vec<_>>(), c.usage())
    };
    // Pods that other pods' placement depends on are only gathered when someone asks.
    let needs_others = {
        let c = cache.lock().await;
        let spec = pod.spec.as_ref();
        spec.and_then(|s| s.affinity.as_ref())
            .is_some_and(|a| a.pod_affinity.is_some() || a.pod_anti_affinity.is_some())
            || spec
                .and_then(|s| s.topology_spread_constraints.as_ref())
                .is_some_and(|t| !t.is_empty())
            || c.pods.values().any(|p| {
                p.spec
                    .as_ref()
                    .and_then(|s| s.affinity.as_ref())
                    .is_some_and(|a| a.pod_anti_affinity.is_some())
            })
    };
    let others: Vec<Pod> = if needs_others {
        let c = cache.lock().await;
        let mut v: Vec<Pod> = c
            .pods
            .values()
            .filter(|p| {
                !is_terminal(p) && p.spec.as_ref().and_then(|s| s.node_name.as_ref()).is_some()
            })
            .cloned()
            .collect();
        // Pods bound in this burst but not yet seen back through the watch count too.
        for (k, (node, p)) in &c.assumed {
            if c.pods
                .get(k)
                .is_none_or(|x| x.spec.as_ref().and_then(|s| s.node_name.as_ref()).is_none())
            {
                let mut p = p.clone();
                if let Some(s) = p.spec.as_mut() {
                    s.node_name = Some(node.clone());
                }
                v.push(p);
            }
        }
        v
    } else {
        Vec::new()
    };
    let node_labels: HashMap<String, std::collections::BTreeMap<String, String>> = nodes
        .iter()
        .map(|n| {
            (
                n.metadata.name.clone().unwrap_or_default(),
                n.metadata.labels.clone().unwrap_or_default(),
            )
        })
        .collect();
    let placed = interpod::Placed {
        pods: others
            .iter()
            .filter_map(|p| {
                let n = p.spec.as_ref()?.node_name.as_ref()?;
                Some((p, node_labels.get(n).cloned().unwrap_or_default()))
            })
            .collect(),
        nodes: node_labels.values().cloned().collect(),
    };
    let empty = NodeUsage::default();
    let mut feasible: Vec<(i64, &Node)> = Vec::new();
    let mut refusals: Vec<(String, Refusal)> = Vec::new();
    for n in &nodes {
        let nn = n.metadata.name.clone().unwrap_or_default();
        let u = usage.get(&nn).unwrap_or(&empty);
        match plugins::filter(pod, n, u)
            .and_then(|()| if needs_others { interpod::filter(pod, n, &placed) } else { Ok(()) })
        {
            Ok(()) => {
                let extra = if needs_others { interpod::score(pod, n, &placed) } else { 0 };
                feasible.push((plugins::score(pod, n, u) + extra, n))
            }
            Err(r) => refusals.push((nn, r)),
        }
    }
    if !feasible.is_empty() {
        let best = feasible.iter().map(|(s, _)| *s).max().unwrap_or(0);
        let top: Vec<&Node> =
            feasible.iter().filter(|(s, _)| *s == best).map(|(_, n)| *n).collect();
        let chosen = top[rand::random_range(0..top.len())];
        let node_name = chosen.metadata.name.clone().unwrap_or_default();
        cache.lock().await.assumed.insert(key(pod), (node_name.clone(), pod.clone()));
        // Binding runs asynchronously, as upstream's binding cycle: the pod is "assumed" on the
        // node in the cache, so the next cycle already counts it, and a failed bind un-assumes it
        // and sends the pod back to the queue.
        let (client, cache, recorder, queue, pod) =
            (client.clone(), cache.clone(), recorder.clone(), queue.clone(), pod.clone());
        tokio::spawn(async move {
            let api: Api<Pod> = Api::namespaced(client, &ns);
            let binding = serde_json::json!({
                "apiVersion": "v1", "kind": "Binding",
                "metadata": {"name": name, "namespace": ns, "uid": pod.metadata.uid},
                "target": {"apiVersion": "v1", "kind": "Node", "name": node_name},
            });
            match api
                .create_subresource::<serde_json::Value, serde_json::Value>(
                    "binding",
                    &name,
                    &PostParams::default(),
                    &binding,
                )
                .await
            {
                Ok(_) => {
                    recorder
                        .record(
                            &reference(&pod),
                            "Normal",
                            "Scheduled",
                            &format!("Successfully assigned {ns}/{name} to {node_name}"),
                        )
                        .await;
                }
                Err(e) => {
                    tracing::debug!("binding {ns}/{name} to {node_name}: {e}");
                    cache.lock().await.assumed.remove(&key(&pod));
                    queue.add(&pod).await;
                    queue.backoff(&key(&pod)).await;
                }
            }
        });
        return Ok(true);
    }
    // Nothing fits: try preemption on nodes where removing lower-priority pods would help.
    let pods_by_node: HashMap<String, Vec<Pod>> = {
        let c = cache.lock().await;
        let mut by_node: HashMap<String, Vec<Pod>> = HashMap::new();
        for p in c.pods.values() {
            if let Some(n) =
                p.spec.as_ref().and_then(|s| s.node_name.clone()).filter(|n| !n.is_empty())
                && !is_terminal(p)
            {
                by_node.entry(n).or_default().push(p.clone());
            }
        }
        by_node
    };
    let prio = pod.spec.as_ref().and_then(|s| s.priority).unwrap_or(0);
    let may_preempt =
        pod.spec.as_ref().and_then(|s| s.preemption_policy.as_deref()) != Some("Never");
    let mut preemption: BTreeMap<String, usize> = BTreeMap::new();
    let mut best_victims: Option<(String, Vec<Pod>)> = None;
    for (nn, r) in &refusals {
        if !r.resolvable {
            *preemption.entry("Preemption is not helpful for scheduling".into()).or_default() += 1;
            continue;
        }
        let node = nodes.iter().find(|n| n.metadata.name.as_deref() == Some(nn.as_str()));
        let mut lower: Vec<Pod> = pods_by_node
            .get(nn)
            .cloned()
            .unwrap_or_default()
            .into_iter()
            .filter(|p| {
                p.spec.as_ref().and_then(|s| s.priority).unwrap_or(0) < prio
                    && p.metadata.deletion_timestamp.is_none()
            })
            .collect();
        let fits_after = node.filter(|_| may_preempt && !lower.is_empty()).and_then(|node| {
            // Remove the lowest-priority pods first until the pod fits.
            lower.sort_by_key(|p| p.spec.as_ref().and_then(|s| s.priority).unwrap_or(0));
            let all: Vec<Pod> = pods_by_node.get(nn).cloned().unwrap_or_default();
            let mut victims: Vec<Pod> = Vec::new();
            for v in &lower {
                victims.push(v.clone());
                let mut u = NodeUsage::default();
                for p in &all {
                    if !victims.iter().any(|x| x.metadata.uid == p.metadata.uid) {
                        u.add(p);
                    }
                }
                if plugins::filter(pod, node, &u).is_ok() {
                    return Some(victims);
                }
            }
            None
        });
        match fits_after {
            Some(v) => {
                if best_victims.as_ref().is_none_or(|(_, b)| v.len() < b.len()) {
                    best_victims = Some((nn.clone(), v));
                }
            }
            None => {
                *preemption
                    .entry("No preemption victims found for incoming pod".into())
                    .or_default() += 1
            }
        }
    }
    let all_refusals: Vec<Refusal> = refusals.iter().map(|(_, r)| r.clone()).collect();
    let message = plugins::failure_message(nodes.len(), &all_refusals, &preemption);
    let api: Api<Pod> = Api::namespaced(client.clone(), &ns);
    if let Some((node, victims)) = best_victims {
        for v in &victims {
            let vapi: Api<Pod> = Api::namespaced(
                client.clone(),
                v.metadata.namespace.as_deref().unwrap_or("default"),
            );
            recorder
                .record(
                    &reference(v),
                    "Normal",
                    "Preempted",
                    &format!(
                        "Preempted by pod {} on node {node}",
                        pod.metadata.uid.clone().unwrap_or_default()
                    ),
                )
                .await;
            let _ =
                vapi.delete(v.metadata.name.as_deref().unwrap_or(""), &Default::default()).await;
        }
        let patch = serde_json::json!({"status": {"nominatedNodeName": node}});
        let _ = api.patch_status(&name, &PatchParams::default(), &Patch::Strategic(&patch)).await;
    }
    recorder.record(&reference(pod), "Warning", "FailedScheduling", &message).await;
    let patch = serde_json::json!({"status": {"conditions": [{
        "type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": message,
        "lastProbeTime": null, "lastTransitionTime": rkube_client::now_time(),
    }]}});
    if let Err(e) =
        api.patch_status(&name, &PatchParams::default(), &Patch::Strategic(&patch)).await
    {
        tracing::debug!("pod {ns}/{name} condition: {e}");
    }
    Ok(false)
}
