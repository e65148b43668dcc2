//! The scheduler: watches pods without a node, filters and scores every node, binds each pod to
//! the best one — or leaves it Pending with the FailedScheduling text Kubernetes users know.

pub mod cli;
pub mod framework;
mod interpod;
pub mod plugins;
mod preemption;
mod queue;
mod spread;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering as AtomicOrdering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::apps::v1::{ReplicaSet, StatefulSet};
use k8s_openapi::api::core::v1::{Node, Pod, ReplicationController, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::api::{Patch, PatchParams, PostParams};
use kube::runtime::watcher;
use kube::{Api, Client};
use rkube_client::events::{Recorder, reference};
use tokio_util::sync::CancellationToken;

use framework::{CycleState, Status};
use plugins::{NodeInfo, PodInfo, Refusal};
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
    /// How NodeResourcesFit scores nodes (upstream's scoringStrategy; LeastAllocated).
    pub scoring_strategy: plugins::ScoringStrategy,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            scheduler_name: "default-scheduler".into(),
            identity: format!("{}_{}", hostname(), uuid_like()),
            lease_duration: Duration::from_secs(15),
            scoring_strategy: plugins::ScoringStrategy::default(),
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

/// The cluster as the scheduler sees it, kept up to date by watches: every node with the pods
/// counted on it — bound ones, and ones this scheduler assumed onto it while their binding is in
/// flight, so two pods never take the same free room and nothing waits for a list.
#[derive(Default)]
struct Cache {
    /// The nodes the watch shows, in a vector every cycle walks without rebuilding it.
    nodes: Vec<NodeInfo>,
    node_index: HashMap<String, usize>,
    /// Pods bound to nodes the watch does not show (yet, or any more), by node.
    ghosts: HashMap<String, NodeInfo>,
    pods: HashMap<String, Arc<PodInfo>>,
    /// Pods assumed onto a node (key → node) until the watch shows them bound.
    assumed: HashMap<String, (String, Arc<PodInfo>)>,
    /// Where each pod is counted now.
    placed_on: HashMap<String, String>,
    /// Counted pods with required anti-affinity terms (they can refuse incoming pods).
    anti_affinity: HashSet<String>,
    /// Unbound pods nominated to a node by preemption (key → node).
    nominated: HashMap<String, (String, Arc<PodInfo>)>,
    pdbs: HashMap<String, Arc<PodDisruptionBudget>>,
    owners: spread::Owners,
    /// Where the next cycle starts looking (upstream's nextStartNodeIndex).
    next_start: usize,
    /// The plugins each cycle runs.
    profile: framework::Profile,
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

fn bound_node(p: &Pod) -> Option<&str> {
    p.spec.as_ref().and_then(|s| s.node_name.as_deref()).filter(|n| !n.is_empty())
}

fn has_required_anti_affinity(p: &Pod) -> bool {
    p.spec
        .as_ref()
        .and_then(|s| s.affinity.as_ref())
        .and_then(|a| a.pod_anti_affinity.as_ref())
        .and_then(|a| a.required_during_scheduling_ignored_during_execution.as_ref())
        .is_some_and(|t| !t.is_empty())
}

/// Whether a node change could make an unschedulable pod fit (upstream ignores heartbeats).
fn node_change_matters(old: &Node, new: &Node) -> bool {
    old.metadata.labels != new.metadata.labels
        || old.spec != new.spec
        || old.status.as_ref().map(|s| (&s.allocatable, &s.capacity))
            != new.status.as_ref().map(|s| (&s.allocatable, &s.capacity))
}

impl Cache {
    /// Re-counts pod `k` on the node it belongs to now.
    fn place(&mut self, k: &str) {
        if let Some(n) = self.placed_on.remove(k) {
            if let Some(&i) = self.node_index.get(&n) {
                self.nodes[i].remove(k);
            } else if let Some(g) = self.ghosts.get_mut(&n) {
                g.remove(k);
                if g.pods.is_empty() {
                    self.ghosts.remove(&n);
                }
            }
        }
        self.anti_affinity.remove(k);
        let target = match self.pods.get(k) {
            Some(pi) if bound_node(&pi.pod).is_some() => (!is_terminal(&pi.pod))
                .then(|| (bound_node(&pi.pod).unwrap_or("").to_string(), pi.clone())),
            _ => self.assumed.get(k).map(|(n, pi)| (n.clone(), pi.clone())),
        };
        if let Some((n, pi)) = target {
            if has_required_anti_affinity(&pi.pod) {
                self.anti_affinity.insert(k.to_string());
            }
            match self.node_index.get(&n) {
                Some(&i) => self.nodes[i].add(k, pi),
                None => self
                    .ghosts
                    .entry(n.clone())
                    .or_insert_with(|| {
                        NodeInfo::new(Arc::new(Node {
                            metadata: kube::api::ObjectMeta {
                                name: Some(n.clone()),
                                ..Default::default()
                            },
                            ..Default::default()
                        }))
                    })
                    .add(k, pi),
            }
            self.placed_on.insert(k.to_string(), n);
        }
    }

    fn apply_pod(&mut self, p: Pod) -> (String, Arc<PodInfo>, Option<Arc<PodInfo>>) {
        let k = key(&p);
        let pi = Arc::new(PodInfo::new(Arc::new(p)));
        let bound = bound_node(&pi.pod).is_some();
        if bound {
            self.assumed.remove(&k);
            self.nominated.remove(&k);
        } else {
            match pi
                .pod
                .status
                .as_ref()
                .and_then(|s| s.nominated_node_name.clone())
                .filter(|n| !n.is_empty())
            {
                Some(n) => {
                    self.nominated.insert(k.clone(), (n, pi.clone()));
                }
                None => {
                    self.nominated.remove(&k);
                }
            }
        }
        let old = self.pods.insert(k.clone(), pi.clone());
        self.place(&k);
        (k, pi, old)
    }

    fn delete_pod(&mut self, k: &str) {
        self.pods.remove(k);
        self.assumed.remove(k);
        self.nominated.remove(k);
        self.place(k);
    }

    /// Returns whether the change could help unschedulable pods.
    fn apply_node(&mut self, n: Node) -> bool {
        let name = n.metadata.name.clone().unwrap_or_default();
        let n = Arc::new(n);
        if let Some(&i) = self.node_index.get(&name) {
            let matters = node_change_matters(&self.nodes[i].node, &n);
            self.nodes[i].set_node(n);
            return matters;
        }
        let info = match self.ghosts.remove(&name) {
            Some(mut g) => {
                g.set_node(n);
                g
            }
            None => NodeInfo::new(n),
        };
        self.node_index.insert(name, self.nodes.len());
        self.nodes.push(info);
        true
    }

    fn delete_node(&mut self, name: &str) {
        let Some(i) = self.node_index.remove(name) else { return };
        let info = self.nodes.swap_remove(i);
        if let Some(moved) = self.nodes.get(i) {
            self.node_index.insert(moved.name().to_string(), i);
        }
        if !info.pods.is_empty() {
            self.ghosts.insert(name.to_string(), info);
        }
    }
}

/// Upstream's adaptive percentageOfNodesToScore: every node below 100; above, 50% less 1% per
/// 125 nodes, at least 5% and at least 100 nodes.
pub fn num_feasible_nodes_to_find(all: usize) -> usize {
    if all < 100 {
        return all;
    }
    let pct = 50usize.saturating_sub(all / 125).max(5);
    (all * pct / 100).max(100)
}

/// What one scheduling cycle decided.
enum Decision {
    /// Gone, bound or being deleted meanwhile: nothing to do.
    Skip,
    /// Assumed onto `node`; bind it.
    Bind { pod: Arc<Pod>, node: String },
    /// No node fits. `preempt`: victims to evict and the node to nominate.
    Unschedulable {
        pod: Arc<Pod>,
        message: String,
        preempt: Option<preemption::Candidate>,
        clear_nomination: bool,
    },
}

/// Filter results of one pass: feasible nodes (in the order looked at), the refusals and
/// failures of the others, and how many nodes were looked at.
type Filtered<'a> = (Vec<&'a NodeInfo>, Vec<(&'a NodeInfo, Status)>, usize);

/// Runs `check` on nodes from `start` round the list until `want` fit or all were looked at,
/// on up to `workers` threads (upstream's parallel findNodesThatPassFilters).
fn find_feasible<'a, F>(
    nodes: &[&'a NodeInfo],
    start: usize,
    want: usize,
    workers: usize,
    check: F,
) -> Filtered<'a>
where
    F: Fn(&NodeInfo) -> Result<(), Status> + Sync,
{
    let n = nodes.len();
    let found = AtomicUsize::new(0);
    let next = AtomicUsize::new(0);
    const CHUNK: usize = 32;
    let work = || {
        let mut ok: Vec<(usize, &'a NodeInfo)> = Vec::new();
        let mut refused: Vec<(usize, &'a NodeInfo, Status)> = Vec::new();
        loop {
            if found.load(AtomicOrdering::Relaxed) >= want {
                break;
            }
            let from = next.fetch_add(CHUNK, AtomicOrdering::Relaxed);
            if from >= n {
                break;
            }
            for i in from..(from + CHUNK).min(n) {
                let ni = nodes[(start + i) % n];
                match check(ni) {
                    Ok(()) => {
                        ok.push((i, ni));
                        found.fetch_add(1, AtomicOrdering::Relaxed);
                    }
                    Err(r) => refused.push((i, ni, r)),
                }
            }
        }
        (ok, refused)
    };
    let parts: Vec<_> = if workers > 1 && n >= 4 * CHUNK {
        std::thread::scope(|s| {
            let handles: Vec<_> = (1..workers).map(|_| s.spawn(work)).collect();
            let mut parts = vec![work()];
            parts.extend(handles.into_iter().filter_map(|h| h.join().ok()));
            parts
        })
    } else {
        vec![work()]
    };
    let mut ok = Vec::new();
    let mut refused = Vec::new();
    for (o, r) in parts {
        ok.extend(o);
        refused.extend(r);
    }
    ok.sort_by_key(|(i, _)| *i);
    ok.truncate(want);
    // Nodes looked at: up to the last feasible one kept, or all of them.
    let processed = if ok.len() >= want && want > 0 { ok[ok.len() - 1].0 + 1 } else { n };
    refused.sort_by_key(|(i, _, _)| *i);
    let refusals = refused.into_iter().filter(|(i, _, _)| *i < processed).map(|(_, ni, r)| (ni, r));
    (ok.into_iter().map(|(_, ni)| ni).collect(), refusals.collect(), processed)
}

/// Threads for one cycle's filters. Resource and taint filters cost well under a microsecond
/// a node: spawning threads costs more than it saves (5,000 nodes: 108 µs a cycle serial, 274
/// µs on two threads), so only the pods whose filters look at other pods (affinity,
/// anti-affinity, spread constraints) — or every node, when existing pods carry anti-affinity —
/// are filtered in parallel.
fn workers(expensive: bool) -> usize {
    if !expensive {
        return 1;
    }
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1).min(16)
}

/// A cycle that stopped on a plugin's failure (not a rejection): reported, retried.
fn failed(pod: &Arc<Pod>, message: String) -> Decision {
    Decision::Unschedulable { pod: pod.clone(), message, preempt: None, clear_nomination: false }
}

/// One scheduling cycle on the cache (synchronous, under the cache lock), through the
/// profile's extension points: PreFilter, Filter on the nodes, then PreScore and Score on the
/// feasible ones and assume (Reserve) the best — or explain the refusals and run PostFilter
/// (preemption).
fn decide(c: &mut Cache, k: &str) -> Decision {
    let Some(pi) = c.pods.get(k).cloned() else { return Decision::Skip };
    if bound_node(&pi.pod).is_some()
        || pi.pod.metadata.deletion_timestamp.is_some()
        || c.assumed.contains_key(k)
    {
        return Decision::Skip;
    }
    let nodes: Vec<&NodeInfo> = c.nodes.iter().collect();
    let snap = framework::Snapshot {
        nodes: &nodes,
        anti_affinity: &c.anti_affinity,
        owners: &c.owners,
        pdbs: &c.pdbs,
    };
    let profile = &c.profile;
    let mut state = CycleState::new();
    for (pk, (n, p)) in &c.nominated {
        if p.priority >= pi.priority && pk != k {
            state.nominated.entry(n.as_str()).or_default().push(p.clone());
        }
    }
    if let Err(st) = profile.run_pre_filter(&mut state, &pi, &snap) {
        let message = match st.into_refusal() {
            Ok(r) => plugins::fit_error(nodes.len(), &vec![r; nodes.len()]),
            Err(e) => e,
        };
        return failed(&pi.pod, message);
    }
    let needs_others = state.needs_others();
    // A pod nominated by an earlier preemption tries its nominated node first.
    let nominated_node = pi
        .pod
        .status
        .as_ref()
        .and_then(|s| s.nominated_node_name.as_deref())
        .filter(|n| !n.is_empty());
    let mut chosen: Option<String> = nominated_node
        .and_then(|n| nodes.iter().find(|ni| ni.name() == n))
        .filter(|ni| profile.run_filter(&state, &pi, ni).is_ok())
        .map(|ni| ni.name().to_string());
    let mut refusals: Vec<(&NodeInfo, Refusal)> = Vec::new();
    if chosen.is_none() && !nodes.is_empty() {
        let want = num_feasible_nodes_to_find(nodes.len());
        let start = c.next_start % nodes.len();
        let (feasible, refused, processed) =
            find_feasible(&nodes, start, want, workers(needs_others), |ni| {
                profile.run_filter(&state, &pi, ni)
            });
        c.next_start = (start + processed) % nodes.len();
        for (ni, st) in refused {
            match st.into_refusal() {
                Ok(r) => refusals.push((ni, r)),
                Err(e) => return failed(&pi.pod, e),
            }
        }
        chosen = pick_best(profile, &mut state, &pi, &feasible, &snap);
    }
    if let Some(node) = chosen {
        if let Err(st) = profile.run_reserve(&state, &pi, &node) {
            let message = match st.into_refusal() {
                Ok(r) => r.reasons.join(", "),
                Err(e) => e,
            };
            return failed(&pi.pod, message);
        }
        drop(state);
        c.assumed.insert(k.to_string(), (node.clone(), pi.clone()));
        c.place(k);
        return Decision::Bind { pod: pi.pod.clone(), node };
    }
    let all_refusals: Vec<Refusal> = refusals.iter().map(|(_, r)| r.clone()).collect();
    let fit = plugins::fit_error(nodes.len(), &all_refusals);
    if nodes.is_empty() {
        return Decision::Unschedulable {
            pod: pi.pod.clone(),
            message: fit,
            preempt: None,
            clear_nomination: false,
        };
    }
    let outcome = profile.run_post_filter(&state, &pi, &snap, &refusals);
    drop(state);
    match outcome {
        Some(preemption::Outcome::Nominate(cand)) => {
            c.nominated.insert(k.to_string(), (cand.node.clone(), pi.clone()));
            Decision::Unschedulable {
                pod: pi.pod.clone(),
                message: fit,
                preempt: Some(cand),
                clear_nomination: false,
            }
        }
        Some(preemption::Outcome::Fail(msg)) => Decision::Unschedulable {
            pod: pi.pod.clone(),
            message: format!("{fit} {msg}"),
            preempt: None,
            clear_nomination: nominated_node.is_some(),
        },
        None => Decision::Unschedulable {
            pod: pi.pod.clone(),
            message: fit,
            preempt: None,
            clear_nomination: nominated_node.is_some(),
        },
    }
}

/// Scores the feasible nodes and picks one of the best at random (upstream's selectHost).
fn pick_best(
    profile: &framework::Profile,
    state: &mut CycleState,
    pi: &PodInfo,
    feasible: &[&NodeInfo],
    snap: &framework::Snapshot,
) -> Option<String> {
    match feasible {
        [] => return None,
        [one] => return Some(one.name().to_string()),
        _ => {}
    }
    let scores = profile.run_score(state, pi, feasible, snap);
    let mut best = i64::MIN;
    let mut top: Vec<&NodeInfo> = Vec::new();
    for (ni, &score) in feasible.iter().zip(&scores) {
        match score.cmp(&best) {
            std::cmp::Ordering::Greater => {
                best = score;
                top.clear();
                top.push(ni);
            }
            std::cmp::Ordering::Equal => top.push(ni),
            std::cmp::Ordering::Less => {}
        }
    }
    Some(top[rand::random_range(0..top.len())].name().to_string())
}

/// Runs a watch on `api` into the cache with `apply` (object, present?) and `reset` on re-list.
fn watch_into<K: rkube_client::watch::Watched>(
    api: Api<K>,
    cache: Arc<Mutex<Cache>>,
    stop: CancellationToken,
    apply: fn(&mut Cache, K, bool),
    reset: fn(&mut Cache),
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(rkube_client::watch::follow(api, watcher::Config::default(), stop, move |ev| {
        match ev {
            watcher::Event::Apply(o) | watcher::Event::InitApply(o) => {
                apply(&mut lock(&cache), o, true)
            }
            watcher::Event::Delete(o) => apply(&mut lock(&cache), o, false),
            watcher::Event::Init => reset(&mut lock(&cache)),
            watcher::Event::InitDone => {}
        }
    }))
}

fn lock(c: &Mutex<Cache>) -> std::sync::MutexGuard<'_, Cache> {
    c.lock().unwrap_or_else(|e| e.into_inner())
}

fn ns_name<K: kube::Resource>(o: &K) -> (String, String) {
    (o.meta().namespace.clone().unwrap_or_default(), o.meta().name.clone().unwrap_or_default())
}

/// Runs the scheduler until `shutdown`: it waits to hold the `kube-system/kube-scheduler`
/// lease, schedules while it holds it, and when leadership is lost stops scheduling (its cache
/// is dropped) and waits to lead again.
pub async fn run_with_client(
    client: Client,
    config: Config,
    shutdown: CancellationToken,
) -> Result<()> {
    rkube_client::lease::run_while_leading(
        client.clone(),
        "kube-scheduler",
        &config.identity,
        config.lease_duration,
        shutdown,
        |leading| schedule_while(client.clone(), &config, leading),
    )
    .await;
    Ok(())
}

/// Informers and the scheduling loop, until `shutdown`.
async fn schedule_while(client: Client, config: &Config, shutdown: CancellationToken) {
    let cache = Arc::new(Mutex::new(Cache {
        profile: framework::Profile::with_strategy(config.scoring_strategy),
        ..Cache::default()
    }));
    let queue = Arc::new(Queue::new());
    let binds = Arc::new(tokio::sync::Semaphore::new(BINDS_IN_FLIGHT));
    // The Bind extension point: upstream's DefaultBinder is the only binder.
    let binders: Arc<[Arc<dyn framework::Bind>]> =
        Arc::new([Arc::new(DefaultBinder { client: client.clone() }) as Arc<dyn framework::Bind>]);
    let recorder = Recorder::new(client.clone(), "default-scheduler", None);

    let nodes: Api<Node> = Api::all(client.clone());
    let pods: Api<Pod> = Api::all(client.clone());
    let mut tasks = Vec::new();
    tasks.push({
        let (cache, queue, stop) = (cache.clone(), queue.clone(), shutdown.clone());
        tokio::spawn(async move {
            let mut s = rkube_client::watch::events(nodes, watcher::Config::default()).boxed();
            let mut listed: Option<HashSet<String>> = None;
            loop {
                let ev = tokio::select! { _ = stop.cancelled() => return, e = s.next() => e };
                match ev {
                    Some(watcher::Event::Apply(n)) => {
                        if lock(&cache).apply_node(n) {
                            queue.move_all_to_active().await;
                        }
                    }
                    Some(watcher::Event::InitApply(n)) => {
                        if let Some(l) = listed.as_mut() {
                            l.insert(n.metadata.name.clone().unwrap_or_default());
                        }
                        lock(&cache).apply_node(n);
                    }
                    Some(watcher::Event::Delete(n)) => {
                        lock(&cache).delete_node(n.metadata.name.as_deref().unwrap_or(""));
                    }
                    Some(watcher::Event::Init) => listed = Some(HashSet::new()),
                    Some(watcher::Event::InitDone) => {
                        if let Some(l) = listed.take() {
                            let mut c = lock(&cache);
                            let gone: Vec<String> = c
                                .nodes
                                .iter()
                                .map(|ni| ni.name().to_string())
                                .filter(|n| !l.contains(n))
                                .collect();
                            for n in gone {
                                c.delete_node(&n);
                            }
                        }
                        queue.move_all_to_active().await;
                    }
                    None => return,
                }
            }
        })
    });
    tasks.push({
        let (cache, queue, stop, name) =
            (cache.clone(), queue.clone(), shutdown.clone(), config.scheduler_name.clone());
        tokio::spawn(async move {
            let mut s = rkube_client::watch::events(pods, watcher::Config::default()).boxed();
            let mut listed: Option<HashSet<String>> = None;
            loop {
                let ev = tokio::select! { _ = stop.cancelled() => return, e = s.next() => e };
                match ev {
                    Some(watcher::Event::Apply(p) | watcher::Event::InitApply(p)) => {
                        let (k, pi, old) = lock(&cache).apply_pod(p);
                        if let Some(l) = listed.as_mut() {
                            l.insert(k.clone());
                        }
                        let p = &pi.pod;
                        let unbound = bound_node(p).is_none();
                        let ours = p
                            .spec
                            .as_ref()
                            .and_then(|s| s.scheduler_name.as_deref())
                            .unwrap_or("default-scheduler")
                            == name;
                        // SchedulingGates (PreEnqueue): a gated pod waits outside the queue.
                        let gated = p
                            .spec
                            .as_ref()
                            .and_then(|s| s.scheduling_gates.as_ref())
                            .is_some_and(|g| !g.is_empty());
                        if unbound
                            && ours
                            && !gated
                            && p.metadata.deletion_timestamp.is_none()
                            && !is_terminal(p)
                        {
                            queue.add(p).await;
                        } else if !unbound || gated {
                            queue.forget(&k).await;
                        }
                        let was_terminal = old.as_ref().is_some_and(|o| is_terminal(&o.pod));
                        if is_terminal(p) && !was_terminal && !unbound {
                            queue.move_all_to_active().await;
                        }
                    }
                    Some(watcher::Event::Delete(p)) => {
                        let k = key(&p);
                        let was_placed = {
                            let mut c = lock(&cache);
                            let placed = c.placed_on.contains_key(&k);
                            c.delete_pod(&k);
                            placed
                        };
                        queue.forget(&k).await;
                        // A pod that leaves a node frees room: unschedulable pods get a chance.
                        if was_placed {
                            queue.move_all_to_active().await;
                        }
                    }
                    Some(watcher::Event::Init) => listed = Some(HashSet::new()),
                    Some(watcher::Event::InitDone) => {
                        if let Some(l) = listed.take() {
                            let gone: Vec<String> = {
                                let mut c = lock(&cache);
                                let gone: Vec<String> =
                                    c.pods.keys().filter(|k| !l.contains(*k)).cloned().collect();
                                for k in &gone {
                                    c.delete_pod(k);
                                }
                                gone
                            };
                            for k in gone {
                                queue.forget(&k).await;
                            }
                        }
                    }
                    None => return,
                }
            }
        })
    });
    tasks.push(watch_into(
        Api::<PodDisruptionBudget>::all(client.clone()),
        cache.clone(),
        shutdown.clone(),
        |c, o, present| {
            let (ns, n) = ns_name(&o);
            let k = format!("{ns}/{n}");
            if present {
                c.pdbs.insert(k, Arc::new(o));
            } else {
                c.pdbs.remove(&k);
            }
        },
        |c| c.pdbs.clear(),
    ));
    tasks.push(watch_into(
        Api::<Service>::all(client.clone()),
        cache.clone(),
        shutdown.clone(),
        |c, o, present| {
            let (ns, n) = ns_name(&o);
            let m = c.owners.services.entry(ns).or_default();
            // A Service without a selector selects no pod for spreading.
            match o.spec.and_then(|s| s.selector).filter(|s| !s.is_empty()) {
                Some(sel) if present => m.insert(n, sel),
                _ => m.remove(&n),
            };
        },
        |c| c.owners.services.clear(),
    ));
    tasks.push(watch_into(
        Api::<ReplicationController>::all(client.clone()),
        cache.clone(),
        shutdown.clone(),
        |c, o, present| {
            let (ns, n) = ns_name(&o);
            let m = c.owners.replication_controllers.entry(ns).or_default();
            match o.spec.and_then(|s| s.selector) {
                Some(sel) if present => m.insert(n, sel),
                _ => m.remove(&n),
            };
        },
        |c| c.owners.replication_controllers.clear(),
    ));
    tasks.push(watch_into(
        Api::<ReplicaSet>::all(client.clone()),
        cache.clone(),
        shutdown.clone(),
        |c, o, present| {
            let (ns, n) = ns_name(&o);
            let m = c.owners.replica_sets.entry(ns).or_default();
            match o.spec.map(|s| s.selector) {
                Some(sel) if present => m.insert(n, sel),
                _ => m.remove(&n),
            };
        },
        |c| c.owners.replica_sets.clear(),
    ));
    tasks.push(watch_into(
        Api::<StatefulSet>::all(client.clone()),
        cache.clone(),
        shutdown.clone(),
        |c, o, present| {
            let (ns, n) = ns_name(&o);
            let m = c.owners.stateful_sets.entry(ns).or_default();
            match o.spec.map(|s| s.selector) {
                Some(sel) if present => m.insert(n, sel),
                _ => m.remove(&n),
            };
        },
        |c| c.owners.stateful_sets.clear(),
    ));

    loop {
        let next = tokio::select! {
            _ = shutdown.cancelled() => break,
            k = queue.pop() => k,
        };
        let Some(k) = next else { continue };
        let seq = queue.move_seq().await;
        let decision = decide(&mut lock(&cache), &k);
        match decision {
            Decision::Skip => queue.forget(&k).await,
            Decision::Bind { pod, node } => {
                queue.forget(&k).await;
                spawn_bind(&binders, &cache, &recorder, &queue, &binds, pod, node);
            }
            Decision::Unschedulable { pod, message, preempt, clear_nomination } => {
                queue.unschedulable(&k, seq).await;
                let (client, recorder) = (client.clone(), recorder.clone());
                // Status updates and evictions run beside the next cycles, as upstream's.
                tokio::spawn(async move {
                    report_failure(&client, &recorder, &pod, &message, preempt, clear_nomination)
                        .await
                });
            }
        }
    }
    for t in tasks {
        t.abort();
    }
}

/// Bindings (with their Scheduled events) in flight at once. Without a bound a burst of
/// thousands of pods opened as many HTTPS connections (kube-rs speaks HTTP/1.1 here, one request
/// per connection at a time), each with its own TLS handshake in the API server.
const BINDS_IN_FLIGHT: usize = 64;

/// The binding cycle, asynchronous as upstream's: the pod is assumed on the node, so the next
/// cycles already count it; a failed bind forgets it and sends the pod back through back-off.
fn spawn_bind(
    binders: &Arc<[Arc<dyn framework::Bind>]>,
    cache: &Arc<Mutex<Cache>>,
    recorder: &Recorder,
    queue: &Arc<Queue>,
    binds: &Arc<tokio::sync::Semaphore>,
    pod: Arc<Pod>,
    node: String,
) {
    let (binders, cache, recorder, queue, binds) =
        (binders.clone(), cache.clone(), recorder.clone(), queue.clone(), binds.clone());
    tokio::spawn(async move {
        let _permit = binds.acquire_owned().await;
        let ns = pod.metadata.namespace.clone().unwrap_or_default();
        let name = pod.metadata.name.clone().unwrap_or_default();
        let mut outcome = Err("no bind plugin bound the pod".to_string());
        for b in binders.iter() {
            if let Some(r) = b.bind(&pod, &node).await {
                outcome = r;
                break;
            }
        }
        match outcome {
            Ok(()) => {
                recorder
                    .record(
                        &reference(&*pod),
                        "Normal",
                        "Scheduled",
                        &format!("Successfully assigned {ns}/{name} to {node}"),
                    )
                    .await;
            }
            Err(e) => {
                tracing::debug!("binding {ns}/{name} to {node}: {e}");
                let k = key(&pod);
                {
                    let mut c = lock(&cache);
                    c.assumed.remove(&k);
                    c.place(&k);
                }
                queue.add(&pod).await;
                queue.backoff(&k).await;
            }
        }
    });
}

/// Upstream's DefaultBinder: the pods/binding subresource, carrying the pod's uid so a pod
/// deleted and created again under the same name is never bound by mistake.
struct DefaultBinder {
    client: Client,
}

impl framework::Plugin for DefaultBinder {
    fn name(&self) -> &'static str {
        "DefaultBinder"
    }
}

impl framework::Bind for DefaultBinder {
    fn bind<'a>(
        &'a self,
        pod: &'a Pod,
        node: &'a str,
    ) -> futures::future::BoxFuture<'a, Option<Result<(), String>>> {
        Box::pin(async move {
            let ns = pod.metadata.namespace.clone().unwrap_or_default();
            let name = pod.metadata.name.clone().unwrap_or_default();
            let api: Api<Pod> = Api::namespaced(self.client.clone(), &ns);
            let binding = serde_json::json!({
                "apiVersion": "v1", "kind": "Binding",
                "metadata": {"name": name, "namespace": ns, "uid": pod.metadata.uid},
                "target": {"apiVersion": "v1", "kind": "Node", "name": node},
            });
            let r = api
                .create_subresource::<serde_json::Value, serde_json::Value>(
                    "binding",
                    &name,
                    &PostParams::default(),
                    &binding,
                )
                .await;
            Some(r.map(|_| ()).map_err(|e| e.to_string()))
        })
    }
}

/// FailedScheduling: the event, the PodScheduled condition (and nominatedNodeName); with a
/// preemption candidate, the victims are marked DisruptionTarget and deleted.
async fn report_failure(
    client: &Client,
    recorder: &Recorder,
    pod: &Pod,
    message: &str,
    preempt: Option<preemption::Candidate>,
    clear_nomination: bool,
) {
    let ns = pod.metadata.namespace.clone().unwrap_or_default();
    let name = pod.metadata.name.clone().unwrap_or_default();
    let api: Api<Pod> = Api::namespaced(client.clone(), &ns);
    if let Some(c) = &preempt {
        let uid = pod.metadata.uid.clone().unwrap_or_default();
        let deletions = c.victims.iter().map(|v| {
            let v = v.pod.clone();
            let (client, recorder, uid, node) =
                (client.clone(), recorder.clone(), uid.clone(), c.node.clone());
            async move {
                let vns = v.metadata.namespace.clone().unwrap_or_default();
                let vname = v.metadata.name.clone().unwrap_or_default();
                let vapi: Api<Pod> = Api::namespaced(client, &vns);
                let cond = serde_json::json!({"status": {"conditions": [{
                    "type": "DisruptionTarget", "status": "True", "reason": "PreemptionByScheduler",
                    "message": "default-scheduler: preempting to accommodate a higher priority pod",
                    "lastTransitionTime": rkube_client::now_time(),
                }]}});
                if let Err(e) = vapi
                    .patch_status(&vname, &PatchParams::default(), &Patch::Strategic(&cond))
                    .await
                {
                    tracing::debug!("victim {vns}/{vname} condition: {e}");
                }
                match vapi.delete(&vname, &Default::default()).await {
                    Ok(_) => {}
                    Err(kube::Error::Api(e)) if e.code == 404 => {}
                    Err(e) => {
                        tracing::debug!("preempting {vns}/{vname}: {e}");
                        return;
                    }
                }
                recorder
                    .record(
                        &reference(&*v),
                        "Normal",
                        "Preempted",
                        &format!("Preempted by pod {uid} on node {node}"),
                    )
                    .await;
            }
        });
        futures::future::join_all(deletions).await;
    }
    recorder.record(&reference(pod), "Warning", "FailedScheduling", message).await;
    let mut status = serde_json::json!({"conditions": [{
        "type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": message,
        "lastProbeTime": null, "lastTransitionTime": rkube_client::now_time(),
    }]});
    if let Some(c) = &preempt {
        status["nominatedNodeName"] = serde_json::json!(c.node);
    } else if clear_nomination {
        status["nominatedNodeName"] = serde_json::Value::Null;
    }
    let patch = serde_json::json!({ "status": status });
    if let Err(e) =
        api.patch_status(&name, &PatchParams::default(), &Patch::Strategic(&patch)).await
    {
        tracing::debug!("pod {ns}/{name} condition: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn node(name: &str) -> Node {
        serde_json::from_value(
            json!({"metadata": {"name": name, "labels": {"kubernetes.io/hostname": name}},
            "status": {"allocatable": {"cpu": "4", "memory": "8Gi", "pods": "110"}}}),
        )
        .unwrap()
    }

    fn pod(name: &str, node: Option<&str>, extra: serde_json::Value) -> Pod {
        let mut v = json!({"metadata": {"name": name, "namespace": "default", "labels": {"app": "web"}},
            "spec": {"containers": [{"name": "c"}]}});
        if let Some(n) = node {
            v["spec"]["nodeName"] = json!(n);
        }
        for (k, x) in extra.as_object().unwrap() {
            v["spec"][k] = x.clone();
        }
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn the_incoming_pods_anti_affinity_is_reported_before_existing_pods() {
        let anti = json!({"affinity": {"podAntiAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [
            {"labelSelector": {"matchLabels": {"app": "web"}}, "topologyKey": "kubernetes.io/hostname"}]}}});
        let mut c = Cache::default();
        for i in 0..3 {
            c.apply_node(node(&format!("n{i}")));
            c.apply_pod(pod(&format!("web-{i}"), Some(&format!("n{i}")), anti.clone()));
        }
        c.apply_pod(pod("web-3", None, anti));
        let Decision::Unschedulable { message, .. } = decide(&mut c, "default/web-3") else {
            panic!("scheduled")
        };
        assert!(
            message.starts_with(
                "0/3 nodes are available: 3 node(s) didn't match pod anti-affinity rules."
            ),
            "{message}"
        );
    }

    /// Scheduler-side cost of one cycle in the bench's shape (no API server): run with
    /// `cargo test --release -p rkube-scheduler --lib -- --ignored --nocapture cycle_cost`.
    #[test]
    #[ignore]
    fn cycle_cost_at_5000_nodes() {
        let mut c = Cache::default();
        for i in 0..5000 {
            let mut n = node(&format!("node-{i}"));
            n.status = serde_json::from_value(
                json!({"allocatable": {"cpu": "4", "memory": "32Gi", "pods": "110"}}),
            )
            .unwrap();
            c.apply_node(n);
        }
        // Owned by a ReplicaSet, as the bench's Deployment pods are: default spreading applies.
        let sel: k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector =
            serde_json::from_value(json!({"matchLabels": {"app": "web"}})).unwrap();
        c.owners.replica_sets.entry("default".into()).or_default().insert("web-1".into(), sel);
        let res =
            json!([{"name": "c", "resources": {"requests": {"cpu": "100m", "memory": "500Mi"}}}]);
        let n = 20_000;
        for i in 0..n {
            let mut p = pod(&format!("p-{i}"), None, json!({"containers": res}));
            p.metadata.owner_references = Some(vec![
                serde_json::from_value(json!({
                "apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "web-1", "uid": "u",
                "controller": true}))
                .unwrap(),
            ]);
            c.apply_pod(p);
        }
        let t = std::time::Instant::now();
        for i in 0..n {
            let Decision::Bind { .. } = decide(&mut c, &format!("default/p-{i}")) else { panic!() };
        }
        let per = t.elapsed() / n as u32;
        eprintln!(
            "decide: {per:?} per pod ({:.0} pods/s) with {} nodes",
            1.0 / per.as_secs_f64(),
            c.nodes.len()
        );
    }
}
