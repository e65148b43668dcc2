//! Pod workers: one task per pod bound to this node. Each runs init containers in order, then the
//! app containers, restarts them per restartPolicy with CrashLoopBackOff, stops them gracefully
//! on delete, and patches the pod's status whenever what it reports changes.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Container, Pod};
use kube::api::{DeleteParams, Patch, PatchParams, Preconditions};
use kube::runtime::watcher;
use kube::{Api, Client};
use nix::sys::signal::Signal;
use rkube_client::events::{Recorder, reference};
use serde_json::{Value, json};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::runtime::{self, ContainerSpec, Exit, Handle};
use crate::{Config, Result, RuntimeKind};

const BACKOFF_START: Duration = Duration::from_secs(10);
const BACKOFF_MAX: Duration = Duration::from_secs(300);
const BACKOFF_RESET_AFTER: Duration = Duration::from_secs(600);

fn now() -> String {
    jiff::Timestamp::now().strftime("%Y-%m-%dT%H:%M:%SZ").to_string()
}

/// How often the oci runtime's images are garbage collected (upstream's ImageGCPeriod).
const IMAGE_GC_PERIOD: Duration = Duration::from_secs(300);

pub async fn run(client: Client, config: Config, shutdown: CancellationToken) -> Result<()> {
    let api: Api<Pod> = Api::all(client.clone());
    let recorder = Recorder::new(client.clone(), "kubelet", Some(&config.node_name));
    // Without a usable runtime the node says so (Ready=False) and its pods say why they wait.
    let oci = match config.runtime {
        RuntimeKind::Oci => match crate::oci::OciNode::open(&config, shutdown.clone()) {
            Ok(o) => {
                let o = Arc::new(o);
                tokio::spawn(crate::oci::image_gc_loop(
                    o.clone(),
                    client.clone(),
                    config.clone(),
                    recorder.clone(),
                    IMAGE_GC_PERIOD,
                ));
                Some(o)
            }
            Err(e) => {
                tracing::error!("{}: the oci runtime cannot run: {e}", config.node_name);
                None
            }
        },
        _ => None,
    };
    let wc = watcher::Config::default().fields(&format!("spec.nodeName={}", config.node_name));
    let mut stream = rkube_client::watch::events(api, wc).boxed();
    let mut workers: HashMap<String, (watch::Sender<Option<Pod>>, tokio::task::JoinHandle<()>)> =
        HashMap::new();
    let mut seen_in_init: Vec<String> = Vec::new();
    loop {
        let ev = tokio::select! {
            _ = shutdown.cancelled() => break,
            e = stream.next() => e,
        };
        match ev {
            Some(watcher::Event::Apply(p) | watcher::Event::InitApply(p)) => {
                let uid = p.metadata.uid.clone().unwrap_or_default();
                if let Some(u) = seen_in_init.iter().position(|x| *x == uid) {
                    seen_in_init.remove(u);
                }
                match workers.get(&uid) {
                    Some((tx, _)) => {
                        let _ = tx.send(Some(p));
                    }
                    None => {
                        let (tx, rx) = watch::channel(Some(p));
                        let task = tokio::spawn(worker(
                            client.clone(),
                            config.clone(),
                            recorder.clone(),
                            oci.clone(),
                            rx,
                            shutdown.clone(),
                        ));
                        workers.insert(uid.clone(), (tx, task));
                    }
                }
            }
            Some(watcher::Event::Delete(p)) => {
                let uid = p.metadata.uid.clone().unwrap_or_default();
                if let Some((tx, _)) = workers.get(&uid) {
                    let _ = tx.send(None);
                }
            }
            Some(watcher::Event::Init) => {
                seen_in_init = workers.keys().cloned().collect();
            }
            Some(watcher::Event::InitDone) => {
                // Pods that vanished while the watch was re-listing are gone.
                for uid in seen_in_init.drain(..) {
                    if let Some((tx, _)) = workers.get(&uid) {
                        let _ = tx.send(None);
                    }
                }
            }
            None => break,
        }
        workers.retain(|_, (_, t)| !t.is_finished());
    }
    // Shutting down (or powered off): every worker stops its containers.
    for (_, (_, task)) in workers.drain() {
        let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
    }
    // The node's cgroup parent goes once nothing is left in it (runc containers of a crashed
    // kubelet, still running, keep theirs).
    rkube_oci::cgroup::remove_empty_parents(&format!("/rkube/{}", config.node_name));
    Ok(())
}

/// Why an OCI container did not start: wait (the reason is already set) or a failure.
enum OciStart {
    Wait,
    Failed(String),
}

/// What the kubelet knows about one container.
#[derive(Default)]
pub(crate) struct Ctr {
    running: bool,
    kill: Option<runtime::Killer>,
    sim_stop: Option<watch::Sender<bool>>,
    generation: u64,
    started_at: Option<String>,
    started_instant: Option<Instant>,
    restart_count: i32,
    terminated: Option<Value>,
    last_terminated: Option<Value>,
    waiting: Option<(String, String)>,
    backoff_until: Option<Instant>,
    backoff: Duration,
    id: String,
    /// Readiness from the probe; `None` without a readiness probe (running means ready).
    probe_ready: Option<bool>,
    probe_stop: Option<CancellationToken>,
    /// The environment it was started with (probes' exec commands run with it too).
    env: Vec<(String, String)>,
    /// When a container that could not be configured (a missing ConfigMap…) is tried again.
    retry_at: Option<Instant>,
    /// The runc container of the last start (oci runtime), removed before the next one.
    oci: Option<rkube_oci::runc::Container>,
    /// `repo@digest` of the image it runs (oci runtime).
    image_id: String,
    /// Image pull back-off (ErrImagePull → ImagePullBackOff).
    pull_backoff: Duration,
    pull_backoff_until: Option<Instant>,
    /// The command prefix that runs a command inside this isolated process container.
    enter: Vec<String>,
}

impl Ctr {
    /// A hollow container (the simulated nodes): running since `started_at`, nothing behind it.
    pub(crate) fn hollow_running(id: String, started_at: &str) -> Ctr {
        Ctr { running: true, started_at: Some(started_at.to_string()), id, ..Ctr::default() }
    }

    /// A hollow container that ran from `started_at` to `finished_at` and exited with `code`.
    pub(crate) fn hollow_exited(id: String, started_at: &str, finished_at: &str, code: i32) -> Ctr {
        let reason = if code == 0 { "Completed" } else { "Error" };
        Ctr {
            started_at: Some(started_at.to_string()),
            terminated: Some(json!({
                "exitCode": code, "reason": reason,
                "startedAt": started_at, "finishedAt": finished_at, "containerID": id,
            })),
            id,
            ..Ctr::default()
        }
    }
}

struct Worker {
    client: Client,
    config: Config,
    recorder: Recorder,
    ctrs: HashMap<String, Ctr>,
    exits: mpsc::Sender<(String, u64, Exit)>,
    probes: mpsc::Sender<crate::probes::Outcome>,
    last_status: Value,
    start_time: String,
    pod_dir: PathBuf,
    /// The pod's address: the node's on the host network.
    pod_ip: String,
    oci: Option<Arc<crate::oci::OciNode>>,
    /// The pod's sandbox and ready volumes (oci runtime).
    sandbox: Option<rkube_oci::runc::Sandbox>,
    volumes: Option<BTreeMap<String, crate::volumes::Ready>>,
    network: Option<Arc<crate::network::PodNetwork>>,
}

async fn worker(
    client: Client,
    config: Config,
    recorder: Recorder,
    oci: Option<Arc<crate::oci::OciNode>>,
    mut rx: watch::Receiver<Option<Pod>>,
    shutdown: CancellationToken,
) {
    let (exits_tx, mut exits_rx) = mpsc::channel(64);
    let (probes_tx, mut probes_rx) = mpsc::channel(64);
    let uid = rx.borrow().as_ref().and_then(|p| p.metadata.uid.clone()).unwrap_or_default();
    let mut w = Worker {
        pod_dir: config.data_dir.join("pods").join(&uid),
        client,
        config,
        recorder,
        ctrs: HashMap::new(),
        exits: exits_tx,
        probes: probes_tx,
        last_status: Value::Null,
        start_time: now(),
        pod_ip: String::new(),
        oci,
        sandbox: None,
        volumes: None,
        network: None,
    };
    w.pod_ip = w.config.node_ip.clone();
    loop {
        let pod = rx.borrow_and_update().clone();
        let Some(pod) = pod else {
            // The pod is gone from the API: stop everything at once.
            w.stop_all(None, Duration::from_secs(0), &mut exits_rx).await;
            w.release(&uid).await;
            return;
        };
        if shutdown.is_cancelled() {
            w.stop_all(None, Duration::from_secs(0), &mut exits_rx).await;
            w.release(&uid).await;
            return;
        }
        if pod.metadata.deletion_timestamp.is_some() {
            let grace = pod.metadata.deletion_grace_period_seconds.unwrap_or(30).max(0) as u64;
            for c in pod_containers(&pod) {
                if w.ctrs.get(&c.name).is_some_and(|x| x.running) {
                    w.recorder
                        .record(
                            &container_ref(&pod, &c.name),
                            "Normal",
                            "Killing",
                            &format!("Stopping container {}", c.name),
                        )
                        .await;
                }
            }
            w.stop_all(Some(&pod), Duration::from_secs(grace), &mut exits_rx).await;
            let _ = w.report(&pod).await;
            let api: Api<Pod> = Api::namespaced(
                w.client.clone(),
                pod.metadata.namespace.as_deref().unwrap_or("default"),
            );
            let dp = DeleteParams {
                grace_period_seconds: Some(0),
                preconditions: Some(Preconditions {
                    uid: pod.metadata.uid.clone(),
                    resource_version: None,
                }),
                ..Default::default()
            };
            let _ = api.delete(pod.metadata.name.as_deref().unwrap_or(""), &dp).await;
            w.release(&uid).await;
            let _ = std::fs::remove_dir_all(&w.pod_dir);
            return;
        }
        w.sync(&pod).await;
        let _ = w.report(&pod).await;
        // Sleep until something happens: a container exits, the pod changes, a back-off ends.
        let wake = w
            .ctrs
            .values()
            .flat_map(|c| [c.backoff_until, c.retry_at, c.pull_backoff_until])
            .flatten()
            .min();
        tokio::select! {
            _ = shutdown.cancelled() => {}
            changed = rx.changed() => { if changed.is_err() { w.stop_all(None, Duration::from_secs(0), &mut exits_rx).await; w.release(&uid).await; return; } }
            Some((name, generation, exit)) = exits_rx.recv() => w.on_exit(&pod, &name, generation, exit).await,
            Some(outcome) = probes_rx.recv() => w.on_probe(&pod, outcome).await,
            _ = async { match wake { Some(t) => tokio::time::sleep_until(t).await, None => std::future::pending().await } } => {}
        }
    }
}

/// The `hostPort`s the pod's containers ask for.
fn host_ports(pod: &Pod) -> Vec<crate::network::HostPort> {
    pod_containers(pod)
        .iter()
        .flat_map(|c| c.ports.iter().flatten())
        .filter_map(|p| {
            Some(crate::network::HostPort {
                protocol: p.protocol.as_deref().unwrap_or("TCP").to_lowercase(),
                host_port: u16::try_from(p.host_port?).ok().filter(|h| *h > 0)?,
                container_port: u16::try_from(p.container_port).ok()?,
            })
        })
        .collect()
}

pub(crate) fn pod_containers(pod: &Pod) -> Vec<Container> {
    pod.spec.as_ref().map(|s| s.containers.clone()).unwrap_or_default()
}

pub(crate) fn init_containers(pod: &Pod) -> Vec<Container> {
    pod.spec.as_ref().and_then(|s| s.init_containers.clone()).unwrap_or_default()
}

fn container_ref(pod: &Pod, name: &str) -> k8s_openapi::api::core::v1::ObjectReference {
    let mut r = reference(pod);
    r.field_path = Some(format!("spec.containers{{{name}}}"));
    r
}

/// The terminated state's reason.
fn exit_reason(exit: &Exit) -> &'static str {
    if exit.oom_killed {
        "OOMKilled"
    } else if exit.code == 0 {
        "Completed"
    } else {
        "Error"
    }
}

/// What remains of a grace period after the preStop hooks is never less than this (upstream's
/// minimumGracePeriodInSeconds).
const MIN_GRACE: Duration = Duration::from_secs(2);

/// The pod's terminationGracePeriodSeconds (default 30), or a probe's own.
fn grace_of(pod: &Pod, probe_override: Option<i64>) -> Duration {
    let s = probe_override
        .or(pod.spec.as_ref().and_then(|s| s.termination_grace_period_seconds))
        .unwrap_or(30);
    Duration::from_secs(s.max(0) as u64)
}

/// Runs a preStop hook bounded by `grace`; a failure is a FailedPreStopHook event.
async fn run_pre_stop(
    pod: &Pod,
    c: &Container,
    h: &k8s_openapi::api::core::v1::LifecycleHandler,
    target: &crate::probes::Target,
    grace: Duration,
    recorder: &Recorder,
) {
    if let Err(msg) = crate::hooks::run(pod, c, h, target, Some(grace)).await {
        recorder.record(&container_ref(pod, &c.name), "Warning", "FailedPreStopHook", &msg).await;
    }
}

/// Whether process containers get namespaces and cgroups: the kubelet runs as root and knows
/// how to run the container init.
pub fn isolated(config: &Config) -> bool {
    config.runtime == RuntimeKind::Process
        && !config.process_init.is_empty()
        && nix::unistd::Uid::effective().is_root()
}

/// The pod's hostname: spec.hostname, else its name (as upstream).
fn pod_hostname(pod: &Pod) -> String {
    pod.spec
        .as_ref()
        .and_then(|s| s.hostname.clone())
        .or(pod.metadata.name.clone())
        .unwrap_or_default()
}

/// `/rkube/<node>/pod<uid>`: the pod's cgroup, as the oci runtime names it.
fn pod_cgroup(config: &Config, pod: &Pod) -> String {
    format!("/rkube/{}/pod{}", config.node_name, pod.metadata.uid.as_deref().unwrap_or(""))
}

/// The cgroup limits of container `c`: memory and CPU limits, CPU request.
fn cgroup_limits(c: &Container) -> rkube_oci::cgroup::Limits {
    let milli = |q: Option<&k8s_openapi::apimachinery::pkg::api::resource::Quantity>| {
        rkube_client::quantity::parse_milli(&q?.0).and_then(|m| u64::try_from(m).ok())
    };
    let res = c.resources.as_ref();
    let limits = res.and_then(|r| r.limits.as_ref());
    let requests = res.and_then(|r| r.requests.as_ref());
    rkube_oci::cgroup::Limits {
        memory_bytes: milli(limits.and_then(|l| l.get("memory"))).map(|m| m / 1000),
        cpu_limit_milli: milli(limits.and_then(|l| l.get("cpu"))),
        // Without a request, a limit is the request (as the API server defaults it).
        cpu_request_milli: milli(requests.and_then(|r| r.get("cpu")))
            .or(milli(limits.and_then(|l| l.get("cpu")))),
    }
}

/// Records how to run a command inside container `name` for the kubelet's exec endpoint.
fn write_enter(pod_dir: &std::path::Path, name: &str, enter: &[String]) -> std::io::Result<()> {
    let dir = pod_dir.join("run");
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join(format!("{name}.enter")), serde_json::to_vec(enter)?)
}

/// The command prefix that runs a command inside isolated process container `name`, while it
/// runs (see `write_enter`).
pub fn read_enter(pod_dir: &std::path::Path, name: &str) -> Option<Vec<String>> {
    let text = std::fs::read(pod_dir.join("run").join(format!("{name}.enter"))).ok()?;
    serde_json::from_slice(&text).ok()
}

pub(crate) fn restart_policy(pod: &Pod) -> String {
    pod.spec.as_ref().and_then(|s| s.restart_policy.clone()).unwrap_or_else(|| "Always".into())
}

impl Worker {
    fn ctr(&mut self, name: &str) -> &mut Ctr {
        self.ctrs.entry(name.to_string()).or_default()
    }

    /// Starts what should run now: the next init container, or every app container.
    async fn sync(&mut self, pod: &Pod) {
        let policy = restart_policy(pod);
        for c in init_containers(pod) {
            let sidecar = c.restart_policy.as_deref() == Some("Always");
            let done = self
                .ctrs
                .get(&c.name)
                .and_then(|x| x.terminated.as_ref())
                .is_some_and(|t| t["exitCode"] == 0);
            if done && !sidecar {
                continue;
            }
            let state = self.ctrs.get(&c.name);
            let running = state.is_some_and(|x| x.running);
            if running && sidecar {
                continue;
            }
            if !running {
                let failed = state.and_then(|x| x.terminated.as_ref()).is_some();
                if failed && policy == "Never" && !sidecar {
                    return;
                }
                self.maybe_start(pod, &c, true).await;
            }
            return;
        }
        for c in pod_containers(pod) {
            let state = self.ctrs.get(&c.name);
            if state.is_some_and(|x| x.running) {
                continue;
            }
            if let Some(t) = state.and_then(|x| x.terminated.as_ref()) {
                let ok = t["exitCode"] == 0;
                let restart = match policy.as_str() {
                    "Never" => false,
                    "OnFailure" => !ok,
                    _ => true,
                };
                if !restart {
                    continue;
                }
            }
            self.maybe_start(pod, &c, false).await;
        }
    }

    async fn maybe_start(&mut self, pod: &Pod, c: &Container, _init: bool) {
        let now_i = Instant::now();
        if let Some(until) = self.ctrs.get(&c.name).and_then(|x| x.backoff_until)
            && until > now_i
        {
            let delay = self.ctrs.get(&c.name).map(|x| x.backoff).unwrap_or(BACKOFF_START);
            let who = crate::hooks::pod_label(pod);
            let msg = format!(
                "back-off {}s restarting failed container={} pod={who}",
                delay.as_secs(),
                c.name
            );
            let x = self.ctr(&c.name);
            let first = x.waiting.as_ref().is_none_or(|(r, _)| r != "CrashLoopBackOff");
            x.waiting = Some(("CrashLoopBackOff".into(), msg));
            if first {
                // Once per back-off period; the recorder folds them into a count.
                let msg = format!("Back-off restarting failed container {} in pod {who}", c.name);
                let cref = container_ref(pod, &c.name);
                self.recorder.record(&cref, "Warning", "BackOff", &msg).await;
            }
            return;
        }
        if let Some(x) = self.ctrs.get_mut(&c.name)
            && x.backoff_until.take().is_some()
        {
            // A wait is over: the next one is twice as long.
            x.backoff = (x.backoff * 2).min(BACKOFF_MAX);
        }
        if self.ctrs.get(&c.name).and_then(|x| x.retry_at).is_some_and(|t| t > now_i) {
            return;
        }
        let sources = crate::env::Sources {
            client: &self.client,
            config: &self.config,
            pod_ip: &self.pod_ip,
        };
        let env = match crate::env::resolve(pod, c, &sources).await {
            Ok(env) => env,
            Err(msg) => {
                let x = self.ctr(&c.name);
                let repeated = x.waiting.as_ref().is_some_and(|(_, m)| *m == msg);
                x.waiting = Some(("CreateContainerConfigError".into(), msg.clone()));
                x.retry_at = Some(now_i + Duration::from_secs(2));
                if !repeated {
                    let cref = container_ref(pod, &c.name);
                    self.recorder
                        .record(&cref, "Warning", "Failed", &format!("Error: {msg}"))
                        .await;
                }
                return;
            }
        };
        self.ctr(&c.name).retry_at = None;
        let mut argv: Vec<String> = c.command.clone().unwrap_or_default();
        argv.extend(c.args.clone().unwrap_or_default());
        let argv: Vec<String> = argv.iter().map(|a| crate::env::expand(a, &env)).collect();
        self.ctr(&c.name).env = env.clone();
        let handle = match self.config.runtime {
            RuntimeKind::Oci => match self.start_oci(pod, c, &env).await {
                Ok(h) => Ok(h),
                Err(OciStart::Wait) => return,
                Err(OciStart::Failed(e)) => Err(e),
            },
            RuntimeKind::Simulated => {
                let (tx, rx) = watch::channel(false);
                self.ctr(&c.name).sim_stop = Some(tx);
                Ok(Handle::Simulated { stop: rx, exit_after: None })
            }
            RuntimeKind::Process => {
                if argv.is_empty() {
                    let image = c.image.clone().unwrap_or_default();
                    self.ctr(&c.name).waiting = Some((
                        "CreateContainerConfigError".into(),
                        format!(
                            "container {} has no command: the process runtime runs a container's `command` (with `args`), not its image {image}: set `command`",
                            c.name
                        ),
                    ));
                    return;
                }
                let attempt = self.ctrs.get(&c.name).map(|x| x.generation + 1).unwrap_or(1);
                let isolation = isolated(&self.config).then(|| runtime::Isolation {
                    init: self.config.process_init.clone(),
                    hostname: pod_hostname(pod),
                    cgroup: format!("{}/{}-{attempt}", pod_cgroup(&self.config, pod), c.name),
                    limits: cgroup_limits(c),
                });
                let spec = ContainerSpec {
                    name: c.name.clone(),
                    argv,
                    env,
                    workdir: self.pod_dir.join("work"),
                    log_path: self.pod_dir.join("logs").join(format!("{}.log", c.name)),
                    isolation,
                    stdio: runtime::ContainerStdio {
                        stdin: c.stdin.unwrap_or(false),
                        stdin_once: c.stdin_once.unwrap_or(false),
                        tty: c.tty.unwrap_or(false),
                        socket: runtime::attach_socket(&self.pod_dir, &c.name),
                    },
                };
                let started = runtime::start_process(&spec).await.map_err(|e| e.to_string());
                if let (Ok(Handle::Process { pid, cgroup: Some(cg), .. }), Some(iso)) =
                    (&started, &spec.isolation)
                {
                    let mut enter = iso.init.clone();
                    enter.extend(["enter".into(), pid.to_string(), cg.clone(), "--".into()]);
                    let _ = write_enter(&self.pod_dir, &c.name, &enter);
                    self.ctr(&c.name).enter = enter;
                }
                started
            }
        };
        match handle {
            Ok(mut h) => {
                let id = h.id();
                let kill = h.killer();
                let first = self
                    .ctrs
                    .get(&c.name)
                    .is_none_or(|x| x.started_at.is_none() && x.terminated.is_none());
                let x = self.ctr(&c.name);
                x.generation += 1;
                let generation = x.generation;
                if x.terminated.is_some() {
                    x.restart_count += 1;
                    x.last_terminated = x.terminated.take();
                }
                x.running = true;
                x.kill = kill;
                x.id = id;
                x.waiting = None;
                x.started_at = Some(now());
                x.started_instant = Some(Instant::now());
                x.backoff_until = None;
                let tx = self.exits.clone();
                let name = c.name.clone();
                tokio::spawn(async move {
                    let exit = h.wait().await;
                    let _ = tx.send((name, generation, exit)).await;
                });
                let cref = container_ref(pod, &c.name);
                if first && self.config.runtime != RuntimeKind::Oci {
                    self.recorder
                        .record(
                            &cref,
                            "Normal",
                            "Pulled",
                            &format!(
                                "Container image \"{}\" already present on machine",
                                c.image.clone().unwrap_or_default()
                            ),
                        )
                        .await;
                }
                self.recorder
                    .record(&cref, "Normal", "Created", &format!("Created container: {}", c.name))
                    .await;
                self.recorder
                    .record(&cref, "Normal", "Started", &format!("Started container {}", c.name))
                    .await;
                // postStart: the pod's status is not written until the hook is done, so the
                // container is not Running before; a failure kills it, as upstream's kubelet.
                if let Some(h) = c.lifecycle.as_ref().and_then(|l| l.post_start.as_ref()) {
                    let target = self.target(c);
                    if let Err(msg) = crate::hooks::run(pod, c, h, &target, None).await {
                        self.recorder.record(&cref, "Warning", "FailedPostStartHook", &msg).await;
                        self.recorder
                            .record(&cref, "Normal", "Killing", "FailedPostStartHook")
                            .await;
                        if let Some(k) = self.ctrs.get(&c.name).and_then(|x| x.kill.clone()) {
                            k.signal(Signal::SIGKILL);
                        }
                        return;
                    }
                }
                self.start_probes(c, generation);
            }
            Err(e) => {
                self.ctr(&c.name).waiting = Some((
                    "RunContainerError".into(),
                    format!("failed to start container {}: {e}", c.name),
                ));
                let cref = container_ref(pod, &c.name);
                self.recorder
                    .record(
                        &cref,
                        "Warning",
                        "Failed",
                        &format!("Error: failed to start container {}: {e}", c.name),
                    )
                    .await;
                self.schedule_backoff(&c.name);
            }
        }
    }

    /// The pod cannot start `c` yet: it waits in ContainerCreating with `msg`, is tried again
    /// after `retry`, and an event (`reason`) says why — once, not on every retry.
    async fn not_yet(
        &mut self,
        pod: &Pod,
        c: &Container,
        reason: &str,
        msg: String,
        retry: Duration,
    ) {
        let x = self.ctr(&c.name);
        let repeated = x.waiting.as_ref().is_some_and(|(_, m)| *m == msg);
        x.waiting = Some(("ContainerCreating".into(), msg.clone()));
        x.retry_at = Some(Instant::now() + retry);
        if !repeated {
            self.recorder.record(&reference(pod), "Warning", reason, &msg).await;
        }
    }

    /// The pod's sandbox (network namespace on the pod network, hosts/resolv.conf) and its
    /// volumes, made once; `Err` means wait (the reason is set and an event recorded).
    async fn ensure_pod_ready(&mut self, pod: &Pod, c: &Container) -> Result<(), ()> {
        let Some(oci) = self.oci.clone() else {
            let why = crate::node::runtime_problem(&self.config)
                .unwrap_or_else(|| "container runtime is down".into());
            let msg = format!("Failed to create pod sandbox: {why}");
            self.not_yet(pod, c, "FailedCreatePodSandBox", msg, Duration::from_secs(10)).await;
            return Err(());
        };
        let cref = container_ref(pod, &c.name);
        let uid = pod.metadata.uid.clone().unwrap_or_default();
        let spec = pod.spec.clone().unwrap_or_default();
        let host_network = spec.host_network.unwrap_or(false);
        if self.sandbox.is_none() {
            let network = if host_network {
                None
            } else {
                match oci.network(&self.client, &self.config).await {
                    Ok(n) => Some(n),
                    Err(msg) => {
                        self.not_yet(pod, c, "NetworkNotReady", msg, Duration::from_secs(1)).await;
                        return Err(());
                    }
                }
            };
            let hostname = spec.hostname.clone().or(pod.metadata.name.clone()).unwrap_or_default();
            let cfg = rkube_oci::runc::SandboxConfig {
                pod_uid: uid.clone(),
                hostname: hostname.clone(),
                host_network,
                host_ipc: spec.host_ipc.unwrap_or(false),
                hosts: crate::oci::hosts_file(pod, &self.config.node_ip, &hostname),
                hostname_file: format!("{hostname}\n"),
                resolv_conf: crate::oci::resolv_conf(pod, &self.config),
                shm_size_bytes: None,
            };
            let made = oci.runtime.run_sandbox(&cfg).await;
            let sandbox = match made {
                Ok(sb) => sb,
                Err(e) => {
                    let msg = format!("Failed to create pod sandbox: {e}");
                    let retry = Duration::from_secs(2);
                    self.not_yet(pod, c, "FailedCreatePodSandBox", msg, retry).await;
                    return Err(());
                }
            };
            if let (Some(net), Some(netns)) = (&network, &sandbox.netns_path) {
                let (net2, uid2, netns2) = (net.clone(), uid.clone(), netns.clone());
                let attached =
                    tokio::task::spawn_blocking(move || net2.attach(&uid2, &netns2)).await;
                match attached {
                    Ok(Ok(ip)) => {
                        self.pod_ip = ip.to_string();
                        let ports = host_ports(pod);
                        if !ports.is_empty() {
                            let (n, u) = (net.clone(), uid.clone());
                            let published = tokio::task::spawn_blocking(move || {
                                n.set_host_ports(&u, ip, &ports)
                            })
                            .await;
                            if let Ok(Err(e)) = published {
                                tracing::warn!(pod = %uid, "hostPort: {e}");
                            }
                        }
                        let hosts = crate::oci::hosts_file(pod, &self.pod_ip, &hostname);
                        let _ = std::fs::write(&sandbox.hosts_path, hosts);
                    }
                    other => {
                        let e = match other {
                            Ok(Err(e)) => e.to_string(),
                            Err(e) => e.to_string(),
                            Ok(Ok(_)) => String::new(),
                        };
                        let msg = format!("Failed to create pod sandbox: plugin rkube-bridge: {e}");
                        let _ = oci.runtime.remove_sandbox(&uid).await;
                        let retry = Duration::from_secs(2);
                        self.not_yet(pod, c, "FailedCreatePodSandBox", msg, retry).await;
                        return Err(());
                    }
                }
            }
            self.network = network;
            self.sandbox = Some(sandbox);
            self.adopt(pod, &oci, &uid).await;
        }
        if self.volumes.is_none() {
            let mut ready = BTreeMap::new();
            for v in spec.volumes.iter().flatten() {
                match crate::volumes::prepare(
                    &self.client,
                    pod,
                    v,
                    &self.pod_dir,
                    &self.config,
                    &self.pod_ip,
                )
                .await
                {
                    Ok(r) => {
                        ready.insert(v.name.clone(), r);
                    }
                    Err(msg) => {
                        self.not_yet(pod, c, "FailedMount", msg, Duration::from_secs(2)).await;
                        return Err(());
                    }
                }
            }
            self.volumes = Some(ready);
        }
        let _ = cref;
        Ok(())
    }

    /// A kubelet that restarts finds the containers its predecessor left: running ones of
    /// this pod's spec are adopted as they are (same process, same restart count, waited on
    /// again through their shim's exit file); anything else of the pod is removed.
    async fn adopt(&mut self, pod: &Pod, oci: &Arc<crate::oci::OciNode>, uid: &str) {
        let spec_names: Vec<String> = init_containers(pod)
            .iter()
            .chain(pod_containers(pod).iter())
            .map(|c| c.name.clone())
            .collect();
        let mut found = oci.runtime.list().await.unwrap_or_default();
        found.retain(|i| i.container.pod_uid == uid);
        // Newest attempt last: ids end in the attempt number.
        found.sort_by_key(|i| i.container.created_at.clone());
        let statuses: Vec<k8s_openapi::api::core::v1::ContainerStatus> = pod
            .status
            .as_ref()
            .map(|s| {
                s.container_statuses
                    .iter()
                    .flatten()
                    .chain(s.init_container_statuses.iter().flatten())
                    .cloned()
                    .collect()
            })
            .unwrap_or_default();
        for info in found.into_iter().rev() {
            let name = info.container.name.clone();
            let running = matches!(info.status, rkube_oci::runc::ContainerStatus::Running { .. });
            let taken = self.ctrs.get(&name).is_some_and(|x| x.running);
            if !running || taken || !spec_names.contains(&name) {
                let _ = oci.runtime.kill(&info.container, Signal::SIGKILL).await;
                let _ = oci.runtime.remove(&info.container).await;
                continue;
            }
            let image = pod_containers(pod)
                .iter()
                .chain(init_containers(pod).iter())
                .find(|c| c.name == name)
                .and_then(|c| c.image.clone())
                .unwrap_or_default();
            let image_id = match oci.images.get(&image).await {
                Ok(Some(img)) => img.repo_digest(),
                _ => String::new(),
            };
            let restarts =
                statuses.iter().find(|s| s.name == name).map(|s| s.restart_count).unwrap_or(0);
            let started_at = statuses
                .iter()
                .find(|s| s.name == name)
                .and_then(|s| s.state.as_ref()?.running.as_ref()?.started_at.as_ref())
                .map(|t| t.0.strftime("%Y-%m-%dT%H:%M:%SZ").to_string())
                .or(info.started_at.clone())
                .unwrap_or_else(now);
            let handle =
                Handle::Oci { runtime: oci.runtime.clone(), container: info.container.clone() };
            let x = self.ctr(&name);
            x.generation += 1;
            let generation = x.generation;
            x.running = true;
            x.kill = handle.killer();
            x.id = handle.id();
            x.started_at = Some(started_at);
            x.started_instant = Some(Instant::now());
            x.restart_count = restarts;
            x.oci = Some(info.container.clone());
            x.image_id = image_id;
            let tx = self.exits.clone();
            let n = name.clone();
            tokio::spawn(async move {
                let mut h = handle;
                let exit = h.wait().await;
                let _ = tx.send((n, generation, exit)).await;
            });
            if let Some(c) = pod_containers(pod).iter().find(|c| c.name == name) {
                self.start_probes(c, generation);
            }
            tracing::info!(pod = uid, container = %name, "adopted a running container");
        }
    }

    /// Pulls the image as the pod's policy says and starts the container through runc.
    async fn start_oci(
        &mut self,
        pod: &Pod,
        c: &Container,
        env: &[(String, String)],
    ) -> Result<Handle, OciStart> {
        self.ensure_pod_ready(pod, c).await.map_err(|_| OciStart::Wait)?;
        if self.ctrs.get(&c.name).is_some_and(|x| x.running) {
            // Adopted from the kubelet that ran before this one.
            return Err(OciStart::Wait);
        }
        let oci = self.oci.clone().ok_or(OciStart::Wait)?;
        let cref = container_ref(pod, &c.name);
        let image_name = c.image.clone().unwrap_or_default();
        // Image: pull per policy, with upstream's events and back-off.
        let now_i = Instant::now();
        if let Some(until) = self.ctrs.get(&c.name).and_then(|x| x.pull_backoff_until)
            && until > now_i
        {
            let msg = format!("Back-off pulling image \"{image_name}\"");
            let x = self.ctr(&c.name);
            let first = x.waiting.as_ref().is_none_or(|(r, _)| r != "ImagePullBackOff");
            x.waiting = Some(("ImagePullBackOff".into(), msg.clone()));
            if first {
                self.recorder.record(&cref, "Normal", "BackOff", &msg).await;
            }
            return Err(OciStart::Wait);
        }
        let policy = match rkube_oci::image::PullPolicy::from_spec(
            c.image_pull_policy.as_deref(),
            &image_name,
        ) {
            Ok(p) => p,
            Err(e) => {
                self.ctr(&c.name).waiting = Some(("InvalidImageName".into(), e.to_string()));
                self.recorder.record(&cref, "Warning", "InspectFailed", &e.to_string()).await;
                return Err(OciStart::Wait);
            }
        };
        let present = oci.images.get(&image_name).await.ok().flatten();
        let image = match (&present, policy) {
            (
                Some(img),
                rkube_oci::image::PullPolicy::IfNotPresent | rkube_oci::image::PullPolicy::Never,
            ) => {
                self.recorder
                    .record(
                        &cref,
                        "Normal",
                        "Pulled",
                        &format!("Container image \"{image_name}\" already present on machine"),
                    )
                    .await;
                img.clone()
            }
            _ => {
                if policy != rkube_oci::image::PullPolicy::Never {
                    self.recorder
                        .record(
                            &cref,
                            "Normal",
                            "Pulling",
                            &format!("Pulling image \"{image_name}\""),
                        )
                        .await;
                }
                let auth = crate::oci::pull_auth(&self.client, pod).await;
                let started = std::time::Instant::now();
                match oci.images.ensure(&image_name, policy, &auth).await {
                    Ok(img) => {
                        if policy != rkube_oci::image::PullPolicy::Never {
                            let msg = crate::oci::pulled_message(
                                &image_name,
                                started.elapsed(),
                                img.size,
                            );
                            self.recorder.record(&cref, "Normal", "Pulled", &msg).await;
                        }
                        let x = self.ctr(&c.name);
                        x.pull_backoff = Duration::ZERO;
                        x.pull_backoff_until = None;
                        img
                    }
                    Err(e) => {
                        let reason = e.kubelet_reason();
                        let msg = if reason == "ErrImageNeverPull" {
                            format!(
                                "Container image \"{image_name}\" is not present with pull policy of Never"
                            )
                        } else {
                            format!("Failed to pull image \"{image_name}\": {e}")
                        };
                        self.recorder.record(&cref, "Warning", "Failed", &msg).await;
                        self.recorder
                            .record(&cref, "Warning", "Failed", &format!("Error: {reason}"))
                            .await;
                        let x = self.ctr(&c.name);
                        x.waiting = Some((reason.to_string(), msg));
                        x.pull_backoff = if x.pull_backoff.is_zero() {
                            BACKOFF_START
                        } else {
                            (x.pull_backoff * 2).min(BACKOFF_MAX)
                        };
                        x.pull_backoff_until = Some(Instant::now() + x.pull_backoff);
                        return Err(OciStart::Wait);
                    }
                }
            }
        };
        let sandbox = self.sandbox.clone().ok_or(OciStart::Wait)?;
        let mounts = crate::volumes::mounts_for(
            c.volume_mounts.as_deref().unwrap_or(&[]),
            self.volumes.as_ref().unwrap_or(&BTreeMap::new()),
        )
        .map_err(OciStart::Failed)?;
        // The previous run of this container goes before the next is made.
        if let Some(old) = self.ctr(&c.name).oci.take() {
            let _ = oci.runtime.remove(&old).await;
        }
        let uid = pod.metadata.uid.clone().unwrap_or_default();
        let attempt = self.ctrs.get(&c.name).map(|x| x.generation + 1).unwrap_or(1);
        let log_path = self.pod_dir.join("logs").join(format!("{}.log", c.name));
        crate::oci::rotate_log(&log_path);
        let cfg = crate::oci::container_config(
            pod,
            c,
            crate::oci::container_id(&uid, &c.name, attempt),
            env,
            &image,
            &mounts,
            log_path,
        );
        let created = oci
            .runtime
            .create_container(&sandbox, &cfg)
            .await
            .map_err(|e| OciStart::Failed(e.to_string()))?;
        self.ctr(&c.name).oci = Some(created.clone());
        self.ctr(&c.name).image_id = image.repo_digest();
        oci.runtime.start_container(&created).await.map_err(|e| OciStart::Failed(e.to_string()))?;
        Ok(Handle::Oci { runtime: oci.runtime.clone(), container: created })
    }

    /// Gives back what the pod held on the node: its containers, address, sandbox and mounts.
    async fn release(&mut self, uid: &str) {
        for x in self.ctrs.values_mut() {
            x.enter.clear();
        }
        let _ = std::fs::remove_dir_all(self.pod_dir.join("run"));
        if isolated(&self.config) {
            let cg = format!("/rkube/{}/pod{uid}", self.config.node_name);
            let removed = tokio::task::spawn_blocking(move || {
                rkube_oci::cgroup::remove_when_empty(&cg, Duration::from_secs(5))
            })
            .await;
            if let Ok(Err(e)) = removed {
                tracing::warn!(pod = uid, "pod cgroup left behind: {e}");
            }
        }
        let Some(oci) = self.oci.clone() else { return };
        for x in self.ctrs.values_mut() {
            if let Some(c) = x.oci.take() {
                let _ = oci.runtime.remove(&c).await;
            }
        }
        if let Some(net) = self.network.take() {
            let uid = uid.to_string();
            let _ = tokio::task::spawn_blocking(move || net.detach(&uid)).await;
        }
        if self.sandbox.take().is_some()
            && let Err(e) = oci.runtime.remove_sandbox(uid).await
        {
            tracing::warn!(pod = uid, "remove sandbox: {e}");
        }
        crate::volumes::teardown(&self.pod_dir);
        self.volumes = None;
    }

    /// Where exec probes and hooks of `c` run: inside its runc container, inside its
    /// namespaces (isolated process container), or on the host with its environment.
    fn target(&self, c: &Container) -> crate::probes::Target {
        let x = self.ctrs.get(&c.name);
        let exec_prefix = match (&self.oci, x.and_then(|x| x.oci.as_ref())) {
            (Some(oci), Some(ctr)) => crate::oci::exec_argv(&oci.runtime, ctr, false),
            _ => x.map(|x| x.enter.clone()).unwrap_or_default(),
        };
        crate::probes::Target {
            exec_prefix,
            host: self.pod_ip.clone(),
            env: x.map(|x| x.env.clone()).unwrap_or_default(),
            workdir: self.pod_dir.join("work"),
        }
    }

    fn start_probes(&mut self, c: &Container, generation: u64) {
        let stop = CancellationToken::new();
        let x = self.ctr(&c.name);
        if let Some(old) = x.probe_stop.replace(stop.clone()) {
            old.cancel();
        }
        x.probe_ready = c.readiness_probe.as_ref().map(|_| false);
        if self.config.runtime == RuntimeKind::Simulated {
            self.ctr(&c.name).probe_ready = None;
            return;
        }
        for (kind, probe) in [
            (crate::probes::Kind::Readiness, &c.readiness_probe),
            (crate::probes::Kind::Liveness, &c.liveness_probe),
        ] {
            if let Some(p) = probe {
                let target = self.target(c);
                crate::probes::spawn(
                    c.clone(),
                    kind,
                    p.clone(),
                    generation,
                    target,
                    self.probes.clone(),
                    stop.clone(),
                );
            }
        }
    }

    async fn on_probe(&mut self, pod: &Pod, o: crate::probes::Outcome) {
        let Some(x) = self.ctrs.get_mut(&o.container) else { return };
        if x.generation != o.generation || !x.running {
            return;
        }
        let cref = container_ref(pod, &o.container);
        match o.kind {
            crate::probes::Kind::Readiness => {
                x.probe_ready = Some(o.ok);
                if !o.ok {
                    self.recorder
                        .record(
                            &cref,
                            "Warning",
                            "Unhealthy",
                            &format!("Readiness probe failed: {}", o.message),
                        )
                        .await;
                }
            }
            crate::probes::Kind::Liveness => {
                let kill = x.kill.clone();
                self.recorder
                    .record(
                        &cref,
                        "Warning",
                        "Unhealthy",
                        &format!("Liveness probe failed: {}", o.message),
                    )
                    .await;
                self.recorder
                    .record(
                        &cref,
                        "Normal",
                        "Killing",
                        &format!(
                            "Container {} failed liveness probe, will be restarted",
                            o.container
                        ),
                    )
                    .await;
                // preStop, SIGTERM, the grace period, SIGKILL — without holding up the worker.
                let c = pod_containers(pod).into_iter().find(|c| c.name == o.container);
                if let (Some(kill), Some(c)) = (kill, c) {
                    let probe_grace =
                        c.liveness_probe.as_ref().and_then(|p| p.termination_grace_period_seconds);
                    let grace = grace_of(pod, probe_grace);
                    let pre_stop = c.lifecycle.as_ref().and_then(|l| l.pre_stop.clone());
                    let (pod, target, recorder) =
                        (pod.clone(), self.target(&c), self.recorder.clone());
                    tokio::spawn(async move {
                        let started = Instant::now();
                        if let (Some(h), false) = (pre_stop, grace.is_zero()) {
                            run_pre_stop(&pod, &c, &h, &target, grace, &recorder).await;
                        }
                        kill.signal(if grace.is_zero() {
                            Signal::SIGKILL
                        } else {
                            Signal::SIGTERM
                        });
                        let rest = grace.saturating_sub(started.elapsed()).max(MIN_GRACE);
                        if !grace.is_zero() {
                            tokio::time::sleep(rest).await;
                            kill.signal(Signal::SIGKILL);
                        }
                    });
                }
            }
        }
    }

    /// After a container ended and is to restart: upstream's back-off. The first restart (or
    /// the first after one that ran 10 minutes) is at once; each later one waits 10 s, then twice
    /// as long as the one before, up to 5 minutes (`backoff` is the next wait).
    fn schedule_backoff(&mut self, name: &str) {
        let x = self.ctr(name);
        let ran_long = x.started_instant.is_some_and(|t| t.elapsed() >= BACKOFF_RESET_AFTER);
        if ran_long || x.backoff.is_zero() {
            x.backoff = BACKOFF_START;
            x.backoff_until = None;
        } else {
            x.backoff_until = Some(Instant::now() + x.backoff);
        }
    }

    async fn on_exit(&mut self, pod: &Pod, name: &str, generation: u64, exit: Exit) {
        let policy = restart_policy(pod);
        let Some(x) = self.ctrs.get_mut(name) else { return };
        if x.generation != generation {
            return;
        }
        x.running = false;
        x.kill = None;
        x.enter.clear();
        let _ = std::fs::remove_file(self.pod_dir.join("run").join(format!("{name}.enter")));
        if let Some(stop) = x.probe_stop.take() {
            stop.cancel();
        }
        let reason = exit_reason(&exit);
        let mut t = json!({
            "exitCode": exit.code, "reason": reason,
            "startedAt": x.started_at.clone(), "finishedAt": now(), "containerID": x.id.clone(),
        });
        if let Some(sig) = exit.signal {
            t["signal"] = json!(sig);
        }
        x.terminated = Some(t);
        let is_init = init_containers(pod)
            .iter()
            .any(|c| c.name == name && c.restart_policy.as_deref() != Some("Always"));
        let restarts = match policy.as_str() {
            "Never" => false,
            "OnFailure" => exit.code != 0,
            _ => !is_init || exit.code != 0,
        };
        if restarts {
            self.schedule_backoff(name);
        }
    }

    /// preStop hooks (with a grace period and the pod), SIGTERM to every container, SIGKILL
    /// after `grace` (less what the hooks took, but at least 2 s, as upstream).
    async fn stop_all(
        &mut self,
        pod: Option<&Pod>,
        grace: Duration,
        exits: &mut mpsc::Receiver<(String, u64, Exit)>,
    ) {
        for x in self.ctrs.values_mut() {
            if let Some(stop) = x.probe_stop.take() {
                stop.cancel();
            }
        }
        let mut grace = grace;
        if let (Some(pod), false) = (pod, grace.is_zero()) {
            let started = Instant::now();
            let mut hooks = Vec::new();
            for c in init_containers(pod).iter().chain(pod_containers(pod).iter()) {
                if !self.ctrs.get(&c.name).is_some_and(|x| x.running) {
                    continue;
                }
                if let Some(h) = c.lifecycle.as_ref().and_then(|l| l.pre_stop.clone()) {
                    let (pod, c, t, rec) =
                        (pod.clone(), c.clone(), self.target(c), self.recorder.clone());
                    hooks.push(async move { run_pre_stop(&pod, &c, &h, &t, grace, &rec).await });
                }
            }
            if !hooks.is_empty() {
                futures::future::join_all(hooks).await;
                grace = grace.saturating_sub(started.elapsed()).max(MIN_GRACE);
            }
        }
        for x in self.ctrs.values() {
            if let Some(k) = &x.kill {
                k.signal(if grace.is_zero() { Signal::SIGKILL } else { Signal::SIGTERM });
            }
            if let Some(s) = &x.sim_stop {
                let _ = s.send(true);
            }
        }
        let deadline = Instant::now() + grace;
        while self.ctrs.values().any(|x| x.running) {
            tokio::select! {
                Some((name, generation, exit)) = exits.recv() => {
                    if let Some(x) = self.ctrs.get_mut(&name) && x.generation == generation {
                        x.running = false;
                        x.kill = None;
                        x.terminated = Some(json!({"exitCode": exit.code, "reason": exit_reason(&exit), "startedAt": x.started_at.clone(), "finishedAt": now(), "containerID": x.id.clone()}));
                    }
                }
                _ = tokio::time::sleep_until(deadline) => {
                    for x in self.ctrs.values() {
                        if let Some(k) = &x.kill {
                            k.signal(Signal::SIGKILL);
                        }
                    }
                    // Give the kill a moment to be reaped, then stop waiting.
                    let _ = tokio::time::timeout(Duration::from_secs(2), async {
                        while let Some((name, _, _)) = exits.recv().await {
                            if let Some(x) = self.ctrs.get_mut(&name) { x.running = false; x.kill = None; }
                            if !self.ctrs.values().any(|x| x.running) { break; }
                        }
                    }).await;
                    break;
                }
            }
        }
    }

    /// Computes the pod status and patches it when it changed.
    async fn report(&mut self, pod: &Pod) -> Result<()> {
        let status = pod_status(
            pod,
            &self.ctrs,
            &self.last_status,
            &self.config.node_ip,
            &self.pod_ip,
            &self.start_time,
        );
        if status == self.last_status {
            return Ok(());
        }
        let api: Api<Pod> = Api::namespaced(
            self.client.clone(),
            pod.metadata.namespace.as_deref().unwrap_or("default"),
        );
        let patch = json!({"status": status});
        api.patch_status(
            pod.metadata.name.as_deref().unwrap_or(""),
            &PatchParams::default(),
            &Patch::Merge(&patch),
        )
        .await?;
        self.last_status = status;
        Ok(())
    }
}

fn container_status(ctrs: &HashMap<String, Ctr>, c: &Container, init: bool) -> Value {
    let x = ctrs.get(&c.name);
    let state = match x {
        Some(x) if x.running => json!({"running": {"startedAt": x.started_at}}),
        Some(x) if x.waiting.is_some() => {
            let (r, m) = x.waiting.clone().unwrap_or_default();
            json!({"waiting": {"reason": r, "message": m}})
        }
        Some(x) if x.terminated.is_some() => json!({"terminated": x.terminated}),
        _ => {
            json!({"waiting": {"reason": if init { "PodInitializing" } else { "ContainerCreating" }}})
        }
    };
    let running = x.is_some_and(|x| x.running);
    let mut s = json!({
        "name": c.name, "image": c.image, "imageID": x.map(|x| x.image_id.clone()).unwrap_or_default(),
        "ready": running && x.and_then(|x| x.probe_ready).unwrap_or(true), "started": running,
        "restartCount": x.map(|x| x.restart_count).unwrap_or(0),
        "state": state,
        "lastState": x.and_then(|x| x.last_terminated.clone()).map(|t| json!({"terminated": t})).unwrap_or(json!({})),
    });
    if let Some(x) = x.filter(|x| !x.id.is_empty()) {
        s["containerID"] = json!(x.id);
    }
    if init && !running {
        s["ready"] =
            json!(x.and_then(|x| x.terminated.as_ref()).is_some_and(|t| t["exitCode"] == 0));
    }
    s
}

/// The status a kubelet reports for `pod` given what it knows of its containers (`prev`: the
/// status it reported last, whose conditions keep their transition times).
pub(crate) fn pod_status(
    pod: &Pod,
    ctrs: &HashMap<String, Ctr>,
    prev: &Value,
    host_ip: &str,
    pod_ip: &str,
    start_time: &str,
) -> Value {
    let inits = init_containers(pod);
    let apps = pod_containers(pod);
    let init_statuses: Vec<Value> = inits.iter().map(|c| container_status(ctrs, c, true)).collect();
    let statuses: Vec<Value> = apps.iter().map(|c| container_status(ctrs, c, false)).collect();
    let initialized = inits.iter().all(|c| {
        let x = ctrs.get(&c.name);
        c.restart_policy.as_deref() == Some("Always") && x.is_some_and(|x| x.running)
            || x.and_then(|x| x.terminated.as_ref()).is_some_and(|t| t["exitCode"] == 0)
    });
    let all_running = apps
        .iter()
        .all(|c| ctrs.get(&c.name).is_some_and(|x| x.running && x.probe_ready.unwrap_or(true)));
    let policy = restart_policy(pod);
    let all_done = apps
        .iter()
        .all(|c| ctrs.get(&c.name).is_some_and(|x| !x.running && x.terminated.is_some()));
    let all_ok = apps.iter().all(|c| {
        ctrs.get(&c.name).and_then(|x| x.terminated.as_ref()).is_some_and(|t| t["exitCode"] == 0)
    });
    let init_failed_never = policy == "Never"
        && inits.iter().any(|c| {
            ctrs.get(&c.name)
                .and_then(|x| x.terminated.as_ref())
                .is_some_and(|t| t["exitCode"] != 0)
        });
    let any_started =
        apps.iter().any(|c| ctrs.get(&c.name).is_some_and(|x| x.started_at.is_some()));
    let phase = if init_failed_never {
        "Failed"
    } else if all_done && (policy == "Never" || (policy == "OnFailure" && all_ok)) {
        if all_ok { "Succeeded" } else { "Failed" }
    } else if initialized && any_started {
        "Running"
    } else {
        "Pending"
    };
    let ready = all_running && initialized && phase == "Running";
    let t = now();
    let prev_conds: Vec<Value> = prev["conditions"].as_array().cloned().unwrap_or_default();
    let cond = |ty: &str, ok: bool, reason: Option<&str>| {
        let status = if ok { "True" } else { "False" };
        let since = prev_conds
            .iter()
            .find(|c| c["type"] == ty && c["status"] == status)
            .and_then(|c| c["lastTransitionTime"].as_str().map(String::from))
            .unwrap_or_else(|| t.clone());
        let mut c = json!({"type": ty, "status": status, "lastProbeTime": null, "lastTransitionTime": since});
        if let (false, Some(r)) = (ok, reason) {
            c["reason"] = json!(r);
        }
        c
    };
    let not_ready_reason = if phase == "Succeeded" || phase == "Failed" {
        "PodCompleted"
    } else {
        "ContainersNotReady"
    };
    let conditions = vec![
        cond("PodReadyToStartContainers", true, None),
        cond("Initialized", initialized, Some("ContainersNotInitialized")),
        cond("Ready", ready, Some(not_ready_reason)),
        cond("ContainersReady", ready, Some(not_ready_reason)),
        cond("PodScheduled", true, None),
    ];
    let mut status = json!({
        "phase": phase,
        "conditions": conditions,
        "hostIP": host_ip, "hostIPs": [{"ip": host_ip}],
        "podIP": pod_ip, "podIPs": [{"ip": pod_ip}],
        "startTime": start_time,
        "containerStatuses": statuses,
        "qosClass": pod.status.as_ref().and_then(|s| s.qos_class.clone()).unwrap_or_else(|| "BestEffort".into()),
    });
    if !init_statuses.is_empty() {
        status["initContainerStatuses"] = json!(init_statuses);
    }
    status
}
