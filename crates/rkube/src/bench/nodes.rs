//! `rkube bench nodes`: kwok's scale test on this machine. `rkube server` (API server, embedded
//! store, scheduler, controllers) and `rkube agent --simulate N` run as two child processes;
//! the figures are the seconds until N hollow nodes are registered and Ready, the seconds until
//! a Deployment of M replicas has M pods Running (through the ReplicaSet controller, the
//! scheduler and the hollow kubelets), both processes' memory, and the CPU they use over a
//! steady state of heartbeats with no pod churn.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::Api;
use kube::api::{ListParams, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use serde_json::json;
use tokio::process::{Child, Command};

const LIMIT: Duration = Duration::from_secs(600);

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Peak resident memory of a process in MiB, from /proc.
fn peak_rss_mib(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map(|kb| kb / 1024.0)
        .unwrap_or(0.0)
}

/// The two child processes, stopped (SIGTERM, then SIGKILL) whatever happens.
struct Children(Vec<Child>);

impl Children {
    async fn stop(&mut self) {
        // The agent first, then the server.
        for c in self.0.iter_mut().rev() {
            if let Some(pid) = c.id() {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid as i32),
                    nix::sys::signal::Signal::SIGTERM,
                );
            }
            if tokio::time::timeout(Duration::from_secs(5), c.wait()).await.is_err() {
                let _ = c.kill().await;
            }
        }
        self.0.clear();
    }
}

pub async fn run(args: &super::BenchArgs) -> anyhow::Result<serde_json::Value> {
    let (nodes, pods) = if args.quick { (500, 1000) } else { (5000, 10000) };
    let dir = std::env::temp_dir().join(format!("rkube-bench-nodes-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    // Children are spawned with kill_on_drop: an error or a panic still ends them.
    let mut children = Children(Vec::new());
    let result = measure(&dir, nodes, pods, args.quick, &mut children).await;
    children.stop().await;
    let result = result.map_err(|e| {
        let tail = |f: &str| {
            let t = std::fs::read_to_string(dir.join(f)).unwrap_or_default();
            t.lines()
                .rev()
                .take(15)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect::<Vec<_>>()
                .join("\n")
        };
        e.context(format!(
            "server log (last lines):\n{}\nagent log (last lines):\n{}",
            tail("server.log"),
            tail("agent.log")
        ))
    });
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn spawn(dir: &Path, log: &str, args: &[&str]) -> anyhow::Result<Child> {
    let log = std::fs::File::create(dir.join(log))?;
    Ok(Command::new(std::env::current_exe()?)
        .args(args)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .kill_on_drop(true)
        .spawn()?)
}

async fn measure(
    dir: &Path,
    nodes_n: usize,
    pods_n: usize,
    quick: bool,
    children: &mut Children,
) -> anyhow::Result<serde_json::Value> {
    let port = free_port()?;
    let data = dir.join("server");
    let kubeconfig = data.join("admin.kubeconfig");
    let server = spawn(
        dir,
        "server.log",
        &[
            "server",
            "--secure-port",
            &port.to_string(),
            "--data-dir",
            &data.to_string_lossy(),
            "--disable-dns",
        ],
    )?;
    let server_pid = server.id().context("server pid")?;
    children.0.push(server);
    let t = Instant::now();
    while !(kubeconfig.exists() && std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()) {
        if t.elapsed() > Duration::from_secs(60) {
            bail!("rkube server did not start");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let client = crate::up::cluster::client_from(&kubeconfig, None).await?;

    // Watch the hollow nodes before the agent starts, so no registration is missed.
    let node_api: Api<Node> = Api::all(client.clone());
    let wc =
        watcher::Config::default().labels(&format!("{}=true", rkube_kubelet::hollow::HOLLOW_LABEL));
    let mut node_events = watcher(node_api, wc).default_backoff().boxed();
    let started = Instant::now();
    let agent = spawn(
        dir,
        "agent.log",
        &[
            "agent",
            "--kubeconfig",
            &kubeconfig.to_string_lossy(),
            "--simulate",
            &nodes_n.to_string(),
        ],
    )?;
    let agent_pid = agent.id().context("agent pid")?;
    children.0.push(agent);
    let mut ready: HashMap<String, bool> = HashMap::new();
    let mut registered_s = None;
    let ready_s = loop {
        let ev = tokio::time::timeout_at((started + LIMIT).into(), node_events.next())
            .await
            .map_err(|_| {
                anyhow::anyhow!(
                    "{} of {nodes_n} nodes Ready after {LIMIT:?}",
                    ready.values().filter(|r| **r).count()
                )
            })?;
        let node = match ev {
            Some(Ok(watcher::Event::Apply(n) | watcher::Event::InitApply(n))) => n,
            Some(Ok(watcher::Event::Delete(n))) => {
                ready.remove(n.metadata.name.as_deref().unwrap_or(""));
                continue;
            }
            Some(Ok(_)) => continue,
            Some(Err(e)) => {
                tracing::debug!("node watch: {e}");
                continue;
            }
            None => bail!("the node watch ended"),
        };
        let is_ready = node
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
        ready.insert(node.metadata.name.unwrap_or_default(), is_ready);
        if registered_s.is_none() && ready.len() >= nodes_n {
            registered_s = Some(started.elapsed().as_secs_f64());
        }
        if ready.values().filter(|r| **r).count() >= nodes_n {
            break started.elapsed().as_secs_f64();
        }
    };
    drop(node_events);
    let rss_nodes = (super::rss_mib(server_pid), super::rss_mib(agent_pid));

    // The workload: one Deployment, so the Deployment and ReplicaSet controllers, the
    // scheduler and the hollow kubelets all take part.
    let pod_api: Api<Pod> = Api::namespaced(client.clone(), "default");
    let mut pod_events = watcher(pod_api, watcher::Config::default().labels("app=bench-nodes"))
        .default_backoff()
        .boxed();
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), "default");
    let d: Deployment = serde_json::from_value(json!({
        "metadata": {"name": "bench-nodes"},
        "spec": {"replicas": pods_n, "selector": {"matchLabels": {"app": "bench-nodes"}},
            "template": {"metadata": {"labels": {"app": "bench-nodes"}},
                "spec": {"containers": [{"name": "pause", "image": "registry.k8s.io/pause:3.10",
                    "resources": {"requests": {"cpu": "10m", "memory": "16Mi"}}}]}}},
    }))?;
    let t = Instant::now();
    let burst_cpu0 = (super::cpu_seconds(server_pid), super::cpu_seconds(agent_pid));
    deployments.create(&PostParams::default(), &d).await?;
    let (mut created_s, mut scheduled_s) = (None, None);
    let mut scheduled: HashSet<String> = HashSet::new();
    let mut running: HashSet<String> = HashSet::new();
    let mut all: HashSet<String> = HashSet::new();
    let running_s = loop {
        let ev =
            tokio::time::timeout_at((t + LIMIT).into(), pod_events.next()).await.map_err(|_| {
                anyhow::anyhow!(
                    "after {LIMIT:?}: {} pods created, {} scheduled, {} Running of {pods_n}",
                    all.len(),
                    scheduled.len(),
                    running.len()
                )
            })?;
        let pod = match ev {
            Some(Ok(watcher::Event::Apply(p) | watcher::Event::InitApply(p))) => p,
            Some(Ok(watcher::Event::Delete(p))) => {
                let name = p.metadata.name.unwrap_or_default();
                all.remove(&name);
                scheduled.remove(&name);
                running.remove(&name);
                continue;
            }
            Some(Ok(_)) => continue,
            Some(Err(e)) => {
                tracing::debug!("pod watch: {e}");
                continue;
            }
            None => bail!("the pod watch ended"),
        };
        let name = pod.metadata.name.clone().unwrap_or_default();
        all.insert(name.clone());
        if pod.spec.as_ref().and_then(|s| s.node_name.as_ref()).is_some() {
            scheduled.insert(name.clone());
        }
        if pod.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running")
            && pod.metadata.deletion_timestamp.is_none()
        {
            running.insert(name);
        }
        if created_s.is_none() && all.len() >= pods_n {
            created_s = Some(t.elapsed().as_secs_f64());
        }
        if scheduled_s.is_none() && scheduled.len() >= pods_n {
            scheduled_s = Some(t.elapsed().as_secs_f64());
        }
        if running.len() >= pods_n {
            break t.elapsed().as_secs_f64();
        }
    };
    let burst_cores = (
        (super::cpu_seconds(server_pid) - burst_cpu0.0) / running_s,
        (super::cpu_seconds(agent_pid) - burst_cpu0.1) / running_s,
    );
    drop(pod_events);
    let nodes_used = {
        let list = Api::<Pod>::namespaced(client.clone(), "default")
            .list(&ListParams::default().labels("app=bench-nodes"))
            .await?;
        list.items
            .iter()
            .filter_map(|p| p.spec.as_ref()?.node_name.clone())
            .collect::<HashSet<_>>()
            .len()
    };

    // Steady state: every node heartbeating, every pod running, nothing changing.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let window = if quick { 10.0 } else { 30.0 };
    let (s0, a0) = (super::cpu_seconds(server_pid), super::cpu_seconds(agent_pid));
    tokio::time::sleep(Duration::from_secs_f64(window)).await;
    let server_cores = (super::cpu_seconds(server_pid) - s0) / window;
    let agent_cores = (super::cpu_seconds(agent_pid) - a0) / window;
    // Every Lease was renewed within the last renewal interval (10 s) and a bit.
    let leases = Api::<Lease>::namespaced(client.clone(), "kube-node-lease")
        .list(&ListParams::default())
        .await?;
    let now = jiff::Timestamp::now();
    let fresh = leases
        .items
        .iter()
        .filter(|l| {
            l.spec
                .as_ref()
                .and_then(|s| s.renew_time.as_ref())
                .is_some_and(|r| now.duration_since(r.0).as_secs_f64() < 15.0)
        })
        .count();
    let not_ready = Api::<Node>::all(client.clone())
        .list(&ListParams::default())
        .await?
        .items
        .iter()
        .filter(|n| {
            !n.status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
        })
        .count();
    Ok(json!({
        "setup": "rkube server (embedded store, scheduler, controllers) and rkube agent --simulate, two processes",
        "nodes": nodes_n,
        "pods": pods_n,
        "workload": format!("one Deployment of {pods_n} replicas (10m CPU, 16Mi requests)"),
        "nodes_registered_s": registered_s,
        "nodes_ready_s": ready_s,
        "pods_created_s": created_s,
        "pods_scheduled_s": scheduled_s,
        "pods_running_s": running_s,
        "nodes_with_pods": nodes_used,
        "burst_server_cpu_cores": burst_cores.0,
        "burst_agent_cpu_cores": burst_cores.1,
        "server_rss_mib_nodes_ready": rss_nodes.0,
        "agent_rss_mib_nodes_ready": rss_nodes.1,
        "server_rss_mib": super::rss_mib(server_pid),
        "agent_rss_mib": super::rss_mib(agent_pid),
        "server_peak_rss_mib": peak_rss_mib(server_pid),
        "agent_peak_rss_mib": peak_rss_mib(agent_pid),
        "steady_window_s": window,
        "steady_server_cpu_cores": server_cores,
        "steady_agent_cpu_cores": agent_cores,
        "steady_total_cpu_cores": server_cores + agent_cores,
        "leases_renewed_in_last_15s": fresh,
        "nodes_not_ready_at_end": not_ready,
        "goals": "nodes Ready <= 20 s, pods Running <= 20 s (kwok CI budget: 60 s each), steady heartbeats <= 0.5 core",
    }))
}

pub fn table(figures: &serde_json::Value) -> String {
    super::render("rkube bench nodes (server and hollow-node agent as two processes)", figures)
}
