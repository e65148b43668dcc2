//! The cluster `rkube up` runs in one process: store, API server, scheduler, controller manager
//! and one kubelet per node, each kubelet behind its own "cable" so a node can be crashed and
//! restored on demand. Also `rkube server`, the control plane without nodes.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use k8s_openapi::api::core::v1::{Node, Taint};
use kube::Api;
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;

use super::control::{self, Answer, ComponentStatus, Request, Status};
use super::switch::Cable;
use super::{Paths, RuntimeChoice, UpArgs, kubeconfig};

/// Failure detection: how fast a dead node is noticed and its pods replaced.
#[derive(Clone, Copy, Debug)]
pub struct Timings {
    pub grace: Duration,
    pub toleration_seconds: i64,
    pub lease: Duration,
}

impl Timings {
    pub fn fast() -> Timings {
        Timings {
            grace: Duration::from_secs(10),
            toleration_seconds: 5,
            lease: Duration::from_secs(8),
        }
    }
    pub fn upstream() -> Timings {
        Timings {
            grace: Duration::from_secs(50),
            toleration_seconds: 300,
            lease: Duration::from_secs(40),
        }
    }
}

/// A kube client from a kubeconfig file, optionally behind a node's cable.
pub async fn client_from(path: &Path, cable: Option<&Cable>) -> Result<kube::Client> {
    let kc = kube::config::Kubeconfig::read_from(path)
        .with_context(|| format!("reading {}", path.display()))?;
    let cfg = kube::Config::from_custom_kubeconfig(kc, &Default::default()).await?;
    let builder = kube::client::ClientBuilder::try_from(cfg)?;
    Ok(match cable {
        Some(c) => builder.with_layer(c).build(),
        None => builder.build(),
    })
}

/// Runs a control-plane component (scheduler, controller manager) on a thread of its own, with
/// a single-threaded runtime and its own API client, as upstream runs each in a process of its
/// own: the kernel then shares the cores between it and a busy API server, instead of the
/// component waiting behind every request task in the server's runtime queues (a 10,000-pod
/// burst showed the scheduler getting a third of a core that way). The handle ends with it.
fn spawn_component<F, Fut>(
    name: &str,
    kubeconfig: &Path,
    run: F,
) -> Result<tokio::task::JoinHandle<()>>
where
    F: FnOnce(kube::Client) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()>,
{
    let (done, finished) = tokio::sync::oneshot::channel::<()>();
    let (kubeconfig, what) = (kubeconfig.to_path_buf(), name.to_string());
    std::thread::Builder::new().name(format!("rkube-{name}")).spawn(move || {
        let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
            Ok(rt) => rt,
            Err(e) => return tracing::error!("{what}: no runtime: {e}"),
        };
        rt.block_on(async move {
            match client_from(&kubeconfig, None).await {
                Ok(client) => run(client).await,
                Err(e) => tracing::error!("{what}: {e:#}"),
            }
        });
        drop(done);
    })?;
    Ok(tokio::spawn(async move {
        let _ = finished.await;
    }))
}

/// The scheduler on a thread of its own (see [`spawn_component`]).
fn spawn_scheduler(
    kubeconfig: &Path,
    config: rkube_scheduler::Config,
    stop: CancellationToken,
) -> Result<tokio::task::JoinHandle<()>> {
    spawn_component("scheduler", kubeconfig, move |c| async move {
        let _ = rkube_scheduler::run_with_client(c, config, stop).await;
    })
}

/// The controller manager on a thread of its own (see [`spawn_component`]).
fn spawn_controller_manager(
    kubeconfig: &Path,
    config: rkube_controllers::Config,
    stop: CancellationToken,
) -> Result<tokio::task::JoinHandle<()>> {
    spawn_component("controller-manager", kubeconfig, move |c| async move {
        let _ = rkube_controllers::run_with_client(c, config, stop).await;
    })
}

struct NodeHandle {
    config: rkube_kubelet::Config,
    cable: Cable,
    stop: CancellationToken,
    task: Option<tokio::task::JoinHandle<()>>,
    crashed: bool,
}

struct Cluster {
    kubeconfig: PathBuf,
    server_url: String,
    data_dir: PathBuf,
    runtime: RuntimeChoice,
    insecure_registries: Vec<String>,
    nodes: Mutex<BTreeMap<String, NodeHandle>>,
    ready: std::sync::atomic::AtomicBool,
    stop: CancellationToken,
}

/// Runs an in-process kubelet until `stop`, retrying while the API server is unreachable.
pub(crate) fn spawn_kubelet(
    client: kube::Client,
    config: rkube_kubelet::Config,
    stop: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let name = config.node_name.clone();
        // A kubelet whose API server is briefly unreachable retries instead of dying.
        loop {
            match rkube_kubelet::run_with_client(client.clone(), config.clone(), stop.clone()).await
            {
                Ok(()) => return,
                Err(e) => {
                    if stop.is_cancelled() {
                        return;
                    }
                    tracing::warn!("kubelet {name}: {e}; retrying");
                    tokio::select! { _ = stop.cancelled() => return, _ = tokio::time::sleep(Duration::from_secs(1)) => {} }
                }
            }
        }
    })
}

impl Cluster {
    async fn start_node(&self, name: &str) -> Result<()> {
        let mut nodes = self.nodes.lock().await;
        let h = nodes.get_mut(name).with_context(|| format!("no node named {name}"))?;
        let client = client_from(&self.kubeconfig, Some(&h.cable)).await?;
        h.cable.set(true);
        h.stop = self.stop.child_token();
        h.task = Some(spawn_kubelet(client, h.config.clone(), h.stop.clone()));
        h.crashed = false;
        Ok(())
    }

    async fn crash(&self, name: &str) -> Answer {
        let mut nodes = self.nodes.lock().await;
        let Some(h) = nodes.get_mut(name) else {
            return Answer::err(format!(
                "no node named {name}; nodes: {}",
                nodes.keys().cloned().collect::<Vec<_>>().join(", ")
            ));
        };
        if h.crashed {
            return Answer::err(format!("node {name} is already crashed"));
        }
        // Power loss: the link goes first, so nothing more reaches the API server, then the
        // kubelet and every process it runs die.
        h.cable.set(false);
        h.stop.cancel();
        if let Some(t) = h.task.take() {
            let _ = tokio::time::timeout(Duration::from_secs(10), t).await;
        }
        h.crashed = true;
        Answer::ok(format!("node {name} crashed: heartbeats stopped and its pods were killed"))
    }

    async fn restore(&self, name: &str) -> Answer {
        {
            let nodes = self.nodes.lock().await;
            match nodes.get(name) {
                None => return Answer::err(format!("no node named {name}")),
                Some(h) if !h.crashed => return Answer::err(format!("node {name} is running")),
                _ => {}
            }
        }
        match self.start_node(name).await {
            Ok(()) => Answer::ok(format!("node {name} restored")),
            Err(e) => Answer::err(format!("restoring {name}: {e:#}")),
        }
    }

    async fn add(
        &self,
        name: &str,
        extended: &[String],
        kind: rkube_kubelet::RuntimeKind,
        lease: Duration,
    ) -> Answer {
        let mut resources = Vec::new();
        for e in extended {
            match e.split_once('=') {
                Some((k, v)) if !k.is_empty() && !v.is_empty() => {
                    resources.push((k.to_string(), v.to_string()))
                }
                _ => return Answer::err(format!("--extended-resource {e}: expected name=count")),
            }
        }
        {
            let mut nodes = self.nodes.lock().await;
            if nodes.contains_key(name) {
                return Answer::err(format!("node {name} already exists"));
            }
            let mut labels = BTreeMap::new();
            labels.insert("node-role.kubernetes.io/worker".to_string(), String::new());
            let mut config = rkube_kubelet::Config {
                node_name: name.to_string(),
                data_dir: self.data_dir.join("nodes").join(name),
                labels,
                extended_resources: resources,
                lease_duration: lease,
                ..Default::default()
            };
            node_runtime(&mut config, kind, &self.data_dir);
            config.insecure_registries = self.insecure_registries.clone();
            nodes.insert(
                name.to_string(),
                NodeHandle {
                    config,
                    cable: Cable::plugged(),
                    stop: self.stop.child_token(),
                    task: None,
                    crashed: false,
                },
            );
        }
        match self.start_node(name).await {
            Ok(()) => Answer::ok(format!("node {name} joined")),
            Err(e) => Answer::err(format!("starting {name}: {e:#}")),
        }
    }

    async fn status(&self) -> Status {
        let mut components = Vec::new();
        components.push(ComponentStatus {
            name: "apiserver".into(),
            healthy: true,
            detail: self.server_url.clone(),
        });
        if let Ok(client) = client_from(&self.kubeconfig, None).await {
            let cs: Api<k8s_openapi::api::core::v1::ComponentStatus> = Api::all(client.clone());
            match cs.list(&Default::default()).await {
                Ok(list) => {
                    for c in list.items {
                        let cond = c.conditions.unwrap_or_default().into_iter().next();
                        let healthy = cond.as_ref().is_some_and(|c| c.status == "True");
                        let detail = cond
                            .map(|c| c.message.or(c.error).unwrap_or_default())
                            .unwrap_or_default();
                        let name = match c.metadata.name.as_deref() {
                            Some("etcd-0") => "store (etcd-0)".to_string(),
                            Some(n) => n.to_string(),
                            None => String::new(),
                        };
                        components.push(ComponentStatus { name, healthy, detail });
                    }
                }
                Err(e) => components.push(ComponentStatus {
                    name: "componentstatuses".into(),
                    healthy: false,
                    detail: e.to_string(),
                }),
            }
            let nodes_api: Api<Node> = Api::all(client);
            let crashed: Vec<String> = self
                .nodes
                .lock()
                .await
                .iter()
                .filter(|(_, h)| h.crashed)
                .map(|(n, _)| n.clone())
                .collect();
            if let Ok(list) = nodes_api.list(&Default::default()).await {
                for n in list.items {
                    let name = n.metadata.name.clone().unwrap_or_default();
                    let ready = n
                        .status
                        .as_ref()
                        .and_then(|s| s.conditions.as_ref())
                        .and_then(|c| {
                            c.iter().find(|c| c.type_ == "Ready").map(|c| c.status.clone())
                        })
                        .unwrap_or_default();
                    let detail = if crashed.contains(&name) {
                        format!("Ready={ready} (crashed: rkube node restore {name})")
                    } else {
                        format!("Ready={ready}")
                    };
                    components.push(ComponentStatus {
                        name: format!("node/{name}"),
                        healthy: ready == "True",
                        detail,
                    });
                }
            }
        }
        Status {
            ready: self.ready.load(std::sync::atomic::Ordering::SeqCst),
            server: self.server_url.clone(),
            data_dir: self.data_dir.display().to_string(),
            runtime: self.runtime.as_str().into(),
            pid: std::process::id(),
            components,
        }
    }
}

fn spinner(mp: &MultiProgress, what: &str) -> ProgressBar {
    let pb = mp.add(ProgressBar::new_spinner());
    pb.set_style(
        ProgressStyle::with_template("  {spinner} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_spinner()),
    );
    pb.set_message(what.to_string());
    pb.enable_steady_tick(Duration::from_millis(80));
    pb
}

fn done(pb: &ProgressBar, what: &str, t: Instant) {
    pb.set_style(
        ProgressStyle::with_template("  ✓ {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_spinner()),
    );
    pb.finish_with_message(format!("{what} ({:.1} s)", t.elapsed().as_secs_f64()));
}

/// The runtime this machine allows, or the one asked for: `oci` (real images through runc,
/// pods on their own network) needs root and runc; otherwise `process`.
fn pick_runtime(asked: Option<RuntimeChoice>) -> Result<(RuntimeChoice, String)> {
    let root = nix::unistd::Uid::effective().is_root();
    let runc = rkube_oci::runc::available();
    match asked {
        Some(RuntimeChoice::Oci) if !root => {
            bail!("the oci runtime needs root (it creates namespaces, cgroups and a bridge)")
        }
        Some(RuntimeChoice::Oci) if runc.is_none() => {
            bail!("the oci runtime needs runc on PATH (Debian: apt-get install runc)")
        }
        Some(r) => Ok((r, "chosen with --runtime".into())),
        None => match (root, runc) {
            (true, Some(v)) => {
                Ok((RuntimeChoice::Oci, format!("root with {v}: real images, pod IPs")))
            }
            (false, _) => Ok((
                RuntimeChoice::Process,
                "not root: pods run their `command` as host processes on the host network".into(),
            )),
            (true, None) => Ok((
                RuntimeChoice::Process,
                "runc is not installed: pods run their `command` as host processes".into(),
            )),
        },
    }
}

/// The kubelet settings of one node of this cluster for `kind`.
fn node_runtime(
    config: &mut rkube_kubelet::Config,
    kind: rkube_kubelet::RuntimeKind,
    root: &std::path::Path,
) {
    config.runtime = kind;
    if let Ok(exe) = std::env::current_exe() {
        config.process_init =
            vec![exe.to_string_lossy().into_owned(), rkube_kubelet::procinit::SUBCOMMAND.into()];
    }
    if kind == rkube_kubelet::RuntimeKind::Oci {
        if let Ok(exe) = std::env::current_exe() {
            config.runc_shim = vec![exe.to_string_lossy().into_owned(), "runc-shim".into()];
        }
        // One image store for every node of the machine, the one `rkube image` manages.
        config.image_dir = Some(rkube_oci::cli::images_root(root));
    }
}

pub async fn up(args: UpArgs) -> Result<()> {
    let started = Instant::now();
    let paths = Paths::new(args.data_dir.as_deref())?;
    std::fs::create_dir_all(&paths.root)
        .with_context(|| format!("creating {}", paths.root.display()))?;
    if args.detach && !args.detached_child {
        return detach(&args, &paths).await;
    }
    let listener = control::bind(&paths.socket()).await?;
    std::fs::write(paths.pid_file(), std::process::id().to_string())?;
    let result = run_cluster(&args, &paths, listener, started).await;
    let _ = std::fs::remove_file(paths.socket());
    let _ = std::fs::remove_file(paths.pid_file());
    result
}

async fn run_cluster(
    args: &UpArgs,
    paths: &Paths,
    listener: tokio::net::UnixListener,
    started: Instant,
) -> Result<()> {
    let (runtime, why) = pick_runtime(args.runtime)?;
    let timings = if args.upstream_timings { Timings::upstream() } else { Timings::fast() };
    println!("Starting rkube cluster in {}", paths.root.display());
    println!("  runtime: {} ({why})", runtime.as_str());
    println!(
        "  failure detection: node-monitor-grace-period {}s, unreachable toleration {}s{}",
        timings.grace.as_secs(),
        timings.toleration_seconds,
        if args.upstream_timings {
            " (upstream timings)"
        } else {
            " (fast profile; --upstream-timings for 50s/300s)"
        }
    );
    let mp = MultiProgress::new();
    let stop = CancellationToken::new();

    let t = Instant::now();
    let pb = spinner(&mp, "store");
    let server_args = server_args(paths.server_dir(), args.secure_port, timings.toleration_seconds);
    std::fs::create_dir_all(paths.server_dir())?;
    let store = Arc::new(rkube_store::embedded::EmbeddedStore::open(
        rkube_store::embedded::Config::new(paths.server_dir().join("store.redb")),
    )?);
    let snapshot_store = store.clone();
    let store: Arc<dyn rkube_store::Store> = store;
    done(&pb, "store: embedded", t);

    let t = Instant::now();
    let pb = spinner(&mp, "API server");
    let (_server, admin_kubeconfig, server_task) =
        rkube_apiserver::cli::start(&server_args, store, stop.clone())
            .await
            .map_err(|e| anyhow::anyhow!(e))?;
    let server_url = format!("https://127.0.0.1:{}", args.secure_port);
    done(&pb, &format!("API server: {server_url}"), t);

    let user_kubeconfig = kubeconfig::default_path(args.kubeconfig.as_deref())?;
    kubeconfig::merge(&admin_kubeconfig, &user_kubeconfig)?;
    let client = client_from(&admin_kubeconfig, None).await?;

    let t = Instant::now();
    let pb = spinner(&mp, "scheduler");
    // A stable leader identity per cluster: a restarted `rkube up` takes its leases back at once
    // instead of waiting for its previous incarnation's leases to expire.
    let identity = format!("rkube-up-{}", paths.root.display());
    let sched_config = rkube_scheduler::Config { identity: identity.clone(), ..Default::default() };
    let sched = spawn_scheduler(&admin_kubeconfig, sched_config, stop.clone())?;
    done(&pb, "scheduler", t);
    let t = Instant::now();
    let pb = spinner(&mp, "controller manager");
    let cm_config = rkube_controllers::Config {
        node_monitor_grace_period: timings.grace,
        identity,
        ..Default::default()
    };
    let cm = spawn_controller_manager(&admin_kubeconfig, cm_config, stop.clone())?;
    done(&pb, "controller manager", t);
    let dns = super::dns::start(client.clone(), &args.dns, stop.clone()).await;
    // One Service proxy for the machine (its nodes share one network namespace) when pods have
    // their own addresses.
    let proxy = (runtime == RuntimeChoice::Oci).then(|| {
        let pc = super::dns::proxy_config("rkube-worker-1", "10.244.0.0/16");
        let (c, s) = (client.clone(), stop.clone());
        tokio::spawn(async move {
            if let Err(e) = rkube_proxy::run(c, pc, s).await {
                tracing::error!("service proxy stopped: {e}");
            }
        })
    });

    let cluster = Arc::new(Cluster {
        kubeconfig: admin_kubeconfig.clone(),
        server_url: server_url.clone(),
        data_dir: paths.root.clone(),
        runtime,
        insecure_registries: args.insecure_registries.clone(),
        nodes: Mutex::new(BTreeMap::new()),
        ready: std::sync::atomic::AtomicBool::new(false),
        stop: stop.clone(),
    });
    let kind = match runtime {
        RuntimeChoice::Simulated => rkube_kubelet::RuntimeKind::Simulated,
        RuntimeChoice::Oci => rkube_kubelet::RuntimeKind::Oci,
        RuntimeChoice::Process => rkube_kubelet::RuntimeKind::Process,
    };
    let mut names = vec!["rkube-control-plane".to_string()];
    names.extend((1..=args.workers).map(|i| format!("rkube-worker-{i}")));
    for name in &names {
        let mut labels = BTreeMap::new();
        let mut taints = Vec::new();
        if name == "rkube-control-plane" {
            labels.insert("node-role.kubernetes.io/control-plane".to_string(), String::new());
            taints.push(Taint {
                key: "node-role.kubernetes.io/control-plane".into(),
                effect: "NoSchedule".into(),
                value: None,
                time_added: None,
            });
        } else {
            labels.insert("node-role.kubernetes.io/worker".to_string(), String::new());
        }
        let mut config = rkube_kubelet::Config {
            node_name: name.clone(),
            data_dir: paths.node_dir(name),
            labels,
            taints,
            lease_duration: timings.lease,
            ..Default::default()
        };
        node_runtime(&mut config, kind, &paths.root);
        config.insecure_registries = args.insecure_registries.clone();
        cluster.nodes.lock().await.insert(
            name.clone(),
            NodeHandle {
                config,
                cable: Cable::plugged(),
                stop: stop.child_token(),
                task: None,
                crashed: false,
            },
        );
    }
    let t = Instant::now();
    let pb = spinner(&mp, &format!("{} nodes", names.len()));
    for name in &names {
        cluster.start_node(name).await?;
    }
    let nodes_api: Api<Node> = Api::all(client.clone());
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let ready = nodes_api
            .list(&Default::default())
            .await
            .map(|l| {
                l.items
                    .iter()
                    .filter(|n| names.contains(n.metadata.name.as_ref().unwrap_or(&String::new())))
                    .filter(|n| {
                        n.status.as_ref().and_then(|s| s.conditions.as_ref()).is_some_and(|c| {
                            c.iter().any(|c| c.type_ == "Ready" && c.status == "True")
                        })
                    })
                    .count()
            })
            .unwrap_or(0);
        pb.set_message(format!("nodes: {ready}/{} Ready", names.len()));
        if ready == names.len() {
            break;
        }
        if Instant::now() > deadline {
            bail!("nodes did not become Ready within 120 s");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    done(
        &pb,
        &format!("nodes: {} Ready (1 control-plane, {} workers)", names.len(), args.workers),
        t,
    );
    cluster.ready.store(true, std::sync::atomic::Ordering::SeqCst);
    println!("\ncluster ready in {:.1} s", started.elapsed().as_secs_f64());
    println!(
        "kubeconfig: context \"rkube\" merged into {} and made current",
        user_kubeconfig.display()
    );
    println!("\nTry:");
    println!("  kubectl get nodes -o wide");
    println!("  kubectl get componentstatuses");
    println!("  kubectl run hello --image=busybox -- sh -c 'echo hello; sleep 3600'");
    println!("  rkube node crash rkube-worker-1     # then watch: kubectl get pods -o wide -w");
    if !args.quiet {
        println!("\nReconciliation log (Ctrl-C stops the cluster):");
        tokio::spawn(super::events::stream(client.clone(), jiff::Timestamp::now(), stop.clone()));
    }

    // Serve the control socket until asked to stop.
    let serve = {
        let cluster = cluster.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            loop {
                let accepted =
                    tokio::select! { _ = stop.cancelled() => return, a = listener.accept() => a };
                let Ok((conn, _)) = accepted else { continue };
                let cluster = cluster.clone();
                let stop = stop.clone();
                let snapshot_store = snapshot_store.clone();
                tokio::spawn(async move {
                    let _ = control::serve_one(conn, |req| async move {
                        match req {
                            Request::Status => Answer {
                                ok: true,
                                message: String::new(),
                                status: Some(cluster.status().await),
                            },
                            Request::Crash { node } => cluster.crash(&node).await,
                            Request::Restore { node } => cluster.restore(&node).await,
                            Request::Add { node, extended_resources } => {
                                cluster.add(&node, &extended_resources, kind, timings.lease).await
                            }
                            Request::Snapshot { path } => {
                                match snapshot_store.snapshot(Path::new(&path)).await {
                                    Ok(rev) => Answer::ok(format!(
                                        "Snapshot saved at {path} (revision {rev})"
                                    )),
                                    Err(e) => Answer::err(format!("snapshot failed: {e}")),
                                }
                            }
                            Request::Stop => {
                                stop.cancel();
                                Answer::ok("stopping")
                            }
                        }
                    })
                    .await;
                });
            }
        })
    };
    tokio::select! {
        _ = rkube_apiserver::cli::wait_for_signal() => {}
        _ = stop.cancelled() => {}
    }
    println!("\nstopping the cluster…");
    stop.cancel();
    let tasks: Vec<tokio::task::JoinHandle<()>> =
        cluster.nodes.lock().await.values_mut().filter_map(|h| h.task.take()).collect();
    for t in tasks {
        let _ = tokio::time::timeout(Duration::from_secs(10), t).await;
    }
    let _ = tokio::time::timeout(Duration::from_secs(5), sched).await;
    let _ = tokio::time::timeout(Duration::from_secs(5), cm).await;
    for t in dns.into_iter().chain(proxy) {
        let _ = tokio::time::timeout(Duration::from_secs(5), t).await;
    }
    let _ = tokio::time::timeout(Duration::from_secs(5), server_task).await;
    serve.abort();
    println!("cluster stopped (data kept in {})", paths.root.display());
    Ok(())
}

/// The API server's settings for a local cluster: loopback, the embedded store in `data_dir`,
/// `toleration` seconds of default not-ready/unreachable tolerations.
pub(crate) fn server_args(
    data_dir: PathBuf,
    port: u16,
    toleration: i64,
) -> rkube_apiserver::cli::Args {
    rkube_apiserver::cli::Args {
        secure_port: port,
        bind_address: std::net::IpAddr::from([127, 0, 0, 1]),
        data_dir,
        tls_san: Vec::new(),
        token_auth_file: None,
        service_cluster_ip_range: "10.96.0.0/12".into(),
        service_node_port_range: "30000-32767".into(),
        default_not_ready_toleration_seconds: toleration,
        in_memory: false,
        etcd_servers: Vec::new(),
        etcd_cafile: None,
        etcd_certfile: None,
        etcd_keyfile: None,
    }
}

/// `--detach`: start the same command in the background and wait until the cluster is ready.
async fn detach(args: &UpArgs, paths: &Paths) -> Result<()> {
    if let Ok(a) = control::call(&paths.socket(), &Request::Status).await
        && a.status.is_some()
    {
        bail!(
            "an rkube cluster is already running from {} (rkube down stops it)",
            paths.root.display()
        );
    }
    let started = Instant::now();
    let exe = std::env::current_exe()?;
    let log = std::fs::OpenOptions::new().create(true).append(true).open(paths.log_file())?;
    let mut cmd = std::process::Command::new(exe);
    cmd.arg("up")
        .arg("--data-dir")
        .arg(&paths.root)
        .arg("--workers")
        .arg(args.workers.to_string())
        .arg("--secure-port")
        .arg(args.secure_port.to_string())
        .arg("--kubeconfig")
        .arg(kubeconfig::default_path(args.kubeconfig.as_deref())?)
        .arg("--detached-child");
    if let Some(r) = args.runtime {
        cmd.arg("--runtime").arg(r.as_str());
    }
    if let Some(ip) = args.dns.cluster_dns_address {
        cmd.arg("--cluster-dns-address").arg(ip.to_string());
    }
    if let Some(port) = args.dns.cluster_dns_port {
        cmd.arg("--cluster-dns-port").arg(port.to_string());
    }
    for r in &args.insecure_registries {
        cmd.arg("--insecure-registry").arg(r);
    }
    if args.dns.disable_dns {
        cmd.arg("--disable-dns");
    }
    if args.upstream_timings {
        cmd.arg("--upstream-timings");
    }
    if args.quiet {
        cmd.arg("--quiet");
    }
    use std::os::unix::process::CommandExt;
    cmd.stdin(std::process::Stdio::null()).stdout(log.try_clone()?).stderr(log).process_group(0);
    let mut child = cmd.spawn().context("starting the cluster process")?;
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        if let Some(status) = child.try_wait()? {
            let log = std::fs::read_to_string(paths.log_file()).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(20).collect();
            bail!(
                "the cluster process exited ({status}):\n{}",
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
        if let Ok(a) = control::call(&paths.socket(), &Request::Status).await
            && a.status.as_ref().is_some_and(|s| s.ready)
        {
            let st = a.status.unwrap_or_default();
            println!("cluster ready in {:.1} s", started.elapsed().as_secs_f64());
            println!("  API server {} (pid {}, runtime {})", st.server, st.pid, st.runtime);
            println!("  log: {}", paths.log_file().display());
            println!("  kubectl context \"rkube\" is current; `rkube down` stops the cluster");
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("the cluster was not ready within 180 s; see {}", paths.log_file().display());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `rkube server`: the API server plus, unless disabled (`None`), scheduler and controller
/// manager (with this configuration).
pub async fn server(
    args: rkube_apiserver::cli::Args,
    controllers: Option<rkube_controllers::Config>,
    dns: super::dns::DnsArgs,
) -> Result<()> {
    let store = rkube_apiserver::cli::open_store(&args).await.map_err(|e| anyhow::anyhow!(e))?;
    let stop = CancellationToken::new();
    let (_server, kubeconfig, task) = rkube_apiserver::cli::start(&args, store, stop.clone())
        .await
        .map_err(|e| anyhow::anyhow!(e))?;
    eprintln!(
        "rkube API server on https://{}:{}; admin kubeconfig: {}",
        args.bind_address,
        args.secure_port,
        kubeconfig.display()
    );
    let mut tasks = Vec::new();
    if let Some(cm_config) = controllers {
        let client = client_from(&kubeconfig, None).await?;
        tasks.push(spawn_scheduler(&kubeconfig, Default::default(), stop.clone())?);
        tasks.push(spawn_controller_manager(&kubeconfig, cm_config, stop.clone())?);
        if let Some(t) = super::dns::start(client, &dns, stop.clone()).await {
            tasks.push(t);
        }
    }
    rkube_apiserver::cli::wait_for_signal().await;
    stop.cancel();
    for t in tasks {
        let _ = tokio::time::timeout(Duration::from_secs(5), t).await;
    }
    let _ = task.await;
    Ok(())
}
