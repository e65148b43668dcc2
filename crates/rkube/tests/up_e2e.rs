//! The seed's lab, for real: `rkube up --detach`, then the real kubectl drives the cluster through
//! nodes, componentstatuses, a Deployment, a node crash and its healing, and a GPU pod.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

fn kubectl_available() -> bool {
    let found = Command::new("kubectl").arg("version").arg("--client").output().is_ok();
    if !found {
        assert!(std::env::var("CI").as_deref() != Ok("true"), "kubectl is required when CI=true");
        eprintln!("SKIPPED: kubectl not found on PATH");
    }
    found
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

struct Cluster {
    home: PathBuf,
    data: PathBuf,
    kubeconfig: PathBuf,
    extra: Vec<std::process::Child>,
    /// The simulated machine every command runs in (oci), if any.
    netns: Option<Netns>,
}

/// A network namespace of its own: a machine with loopback only, so the oci cluster's bridge,
/// routes and nftables never touch the host's. Deleted on drop.
struct Netns {
    name: String,
}

impl Netns {
    fn create() -> Netns {
        let name = format!("rkube-up-{}", std::process::id());
        let _ = Command::new("ip").args(["netns", "del", &name]).stderr(Stdio::null()).status();
        assert!(Command::new("ip").args(["netns", "add", &name]).status().unwrap().success());
        let ns = Netns { name };
        let lo = ns.command("ip").args(["link", "set", "lo", "up"]).status().unwrap();
        assert!(lo.success());
        ns
    }

    /// `program` inside the namespace. nsenter (not `ip netns exec`, which remounts /sys)
    /// keeps the host's cgroup mounts that runc needs.
    fn command(&self, program: &str) -> Command {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net=/run/netns/{}", self.name)).arg(program);
        c
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.name]).status();
    }
}

impl Cluster {
    fn command(&self, program: &str) -> Command {
        match &self.netns {
            Some(ns) => ns.command(program),
            None => Command::new(program),
        }
    }

    fn rkube(&self, args: &[&str]) -> Output {
        self.command(env!("CARGO_BIN_EXE_rkube"))
            .args(args)
            .env("HOME", &self.home)
            .env_remove("KUBECONFIG")
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }

    fn kubectl(&self, args: &[&str]) -> Output {
        self.command("kubectl")
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .arg("--cache-dir")
            .arg(self.home.join("kcache"))
            .args(args)
            .env("HOME", &self.home)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }

    fn kubectl_ok(&self, args: &[&str]) -> String {
        let out = self.kubectl(args);
        assert!(
            out.status.success(),
            "kubectl {args:?} failed: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.log_tail()
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.data.join("rkube.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(60)..].join("\n")
    }

    /// Polls `f` until it returns Some, failing with `what` after `limit`.
    fn wait<T>(&self, what: &str, limit: Duration, mut f: impl FnMut() -> Option<T>) -> T {
        let start = Instant::now();
        loop {
            if let Some(v) = f() {
                return v;
            }
            assert!(
                start.elapsed() < limit,
                "timed out after {limit:?} waiting for {what}\n{}",
                self.log_tail()
            );
            std::thread::sleep(Duration::from_millis(250));
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for c in &mut self.extra {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = self.rkube(&["down", "--data-dir", self.data.to_str().unwrap()]);
        let _ = std::fs::remove_dir_all(&self.home);
    }
}

/// Pod name → node name for pods matching a label selector that are Running.
fn running_pods(c: &Cluster, selector: &str) -> Vec<(String, String)> {
    let out = c.kubectl(&[
        "get", "pods", "-l", selector, "--no-headers", "-o",
        "custom-columns=NAME:.metadata.name,PHASE:.status.phase,NODE:.spec.nodeName,DEL:.metadata.deletionTimestamp",
    ]);
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() == 4 && f[1] == "Running" && f[3] == "<none>")
                .then(|| (f[0].to_string(), f[2].to_string()))
        })
        .collect()
}

fn pid_alive(pid: &str) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .unwrap_or_default()
            .rsplit_once(')')
            .is_some_and(|(_, r)| r.trim_start().starts_with('Z'))
}

#[test]
fn the_seed_lab_runs_for_real_from_up_to_down() {
    if !kubectl_available() {
        return;
    }
    seed_lab(Runtime::Process);
}

/// The same lab on real images: as root with runc, `rkube up` runs containers through runc on
/// its pod network, here inside a network namespace of the test's own.
#[test]
fn the_seed_lab_runs_real_images_when_the_machine_allows() {
    if !kubectl_available() {
        return;
    }
    let root = nix::unistd::Uid::effective().is_root();
    let runc = Command::new("runc").arg("--version").output().is_ok();
    let busybox = Path::new("/bin/busybox").is_file();
    if !(root && runc && busybox) {
        let why = format!("root={root}, runc={runc}, /bin/busybox={busybox}");
        assert!(std::env::var("CI").as_deref() != Ok("true"), "CI=true needs them: {why}");
        eprintln!("SKIPPED: the oci lab needs root, runc and busybox-static ({why})");
        return;
    }
    seed_lab(Runtime::Oci);
}

#[derive(Clone, Copy, PartialEq)]
enum Runtime {
    Process,
    Oci,
}

fn seed_lab(runtime: Runtime) {
    let oci = runtime == Runtime::Oci;
    // The pods' command, told apart per lab: both labs run at once, and the leftover check
    // looks for this lab's processes only.
    let marker = if oci { "7208" } else { "7207" };
    let home = std::env::temp_dir().join(format!(
        "rkube-up-e2e-{}-{}",
        std::process::id(),
        if oci { "oci" } else { "process" }
    ));
    let _ = std::fs::remove_dir_all(&home);
    std::fs::create_dir_all(&home).unwrap();
    let port = free_port().to_string();
    let dns_port = free_port().to_string();
    let mut c = Cluster {
        data: home.join("data"),
        kubeconfig: home.join(".kube").join("config"),
        home,
        extra: Vec::new(),
        netns: oci.then(Netns::create),
    };
    let data = c.data.to_str().unwrap().to_string();

    // The oci lab's image, pre-pulled: built from the static busybox and imported into the
    // store `rkube up` gives its nodes.
    let image = if oci {
        let layout = c.home.join("busybox");
        let busybox = std::fs::read("/bin/busybox").unwrap();
        rkube_oci::image::layout::write_busybox_layout(&layout, &busybox, "1").unwrap();
        let archive = c.home.join("busybox.tar");
        rkube_oci::image::layout::archive_layout(&layout, &archive).unwrap();
        let out = c.rkube(&["image", "import", "--data-dir", &data, archive.to_str().unwrap()]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        "localhost/busybox:1\n        imagePullPolicy: Never"
    } else {
        "busybox"
    };

    let started = Instant::now();
    let up = c.rkube(&[
        "up",
        "--detach",
        "--data-dir",
        &data,
        "--secure-port",
        &port,
        "--runtime",
        if oci { "oci" } else { "process" },
        "--cluster-dns-address",
        "127.0.0.1",
        "--cluster-dns-port",
        &dns_port,
    ]);
    assert!(
        up.status.success(),
        "rkube up failed: {}\n{}",
        String::from_utf8_lossy(&up.stderr),
        c.log_tail()
    );
    let up_out = String::from_utf8_lossy(&up.stdout).into_owned();
    assert!(up_out.contains("cluster ready in"), "{up_out}");
    // `up` merged its context into $HOME/.kube/config and made it current.
    let contexts = c.kubectl_ok(&["config", "current-context"]);
    assert_eq!(contexts.trim(), "rkube");

    // Nodes: one control-plane and two workers, all Ready, with upstream's wide columns.
    let nodes = c.wait("3 Ready nodes", Duration::from_secs(60), || {
        let out = c.kubectl_ok(&["get", "nodes", "-o", "wide"]);
        (out.lines().filter(|l| l.split_whitespace().nth(1) == Some("Ready")).count() == 3)
            .then_some(out)
    });
    eprintln!("all nodes Ready {:?} after rkube up started\n{nodes}", started.elapsed());
    let header: Vec<&str> = nodes.lines().next().unwrap().split_whitespace().collect();
    assert_eq!(header, common::NODES_WIDE_HEADER);
    let cp_line =
        nodes.lines().find(|l| l.contains("control-plane")).expect("a control-plane node");
    let control_plane = cp_line.split_whitespace().next().unwrap().to_string();

    // Component health as the seed shows it.
    let cs = c.kubectl(&["get", "componentstatuses"]);
    let cs_out = String::from_utf8_lossy(&cs.stdout);
    for name in ["scheduler", "controller-manager", "etcd-0"] {
        let line = cs_out
            .lines()
            .find(|l| l.starts_with(name))
            .unwrap_or_else(|| panic!("{name} missing:\n{cs_out}"));
        assert!(line.contains("Healthy"), "{line}");
    }
    assert!(String::from_utf8_lossy(&cs.stderr).contains("ComponentStatus is deprecated"));
    // The DNS line appears once the cluster DNS has published kube-dns.
    let deadline = Instant::now() + Duration::from_secs(20);
    let info = loop {
        let info = c.kubectl_ok(&["cluster-info"]);
        if info.contains("KubeDNS is running at") || Instant::now() > deadline {
            break info;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(
        info.contains(&format!("Kubernetes control plane is running at https://127.0.0.1:{port}")),
        "{info}"
    );
    assert!(
        info.contains(&format!(
            "KubeDNS is running at https://127.0.0.1:{port}/api/v1/namespaces/kube-system/services/kube-dns:dns/proxy"
        )),
        "{info}"
    );

    let dump = c.kubectl_ok(&["cluster-info", "dump"]);
    assert!(dump.contains("\"name\": \"rkube-worker-1\""), "cluster-info dump lacks the nodes");

    // A 3-replica Deployment lands on the workers only.
    let manifest = c.home.join("web.yaml");
    std::fs::write(
        &manifest,
        format!("apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: web\nspec:\n  replicas: 3\n  selector:\n    matchLabels: {{app: web}}\n  template:\n    metadata:\n      labels: {{app: web}}\n    spec:\n      terminationGracePeriodSeconds: 1\n      containers:\n      - name: web\n        image: {image}\n        command: [\"sleep\", \"{marker}\"]\n"),
    )
    .unwrap();
    let applied = c.kubectl_ok(&["apply", "-f", manifest.to_str().unwrap()]);
    assert_eq!(applied.trim(), "deployment.apps/web created");
    let pods = c.wait("3 Running web pods", Duration::from_secs(60), || {
        let p = running_pods(&c, "app=web");
        (p.len() == 3).then_some(p)
    });
    assert!(pods.iter().all(|(_, n)| *n != control_plane), "control-plane taint ignored: {pods:?}");
    if oci {
        // Real containers on the pod network: each replica has its own address in the
        // cluster CIDR, and runs the image's busybox, not the host's.
        let ips = c.kubectl_ok(&[
            "get",
            "pods",
            "-l",
            "app=web",
            "-o",
            "jsonpath={.items[*].status.podIP}",
        ]);
        let ips: Vec<&str> = ips.split_whitespace().collect();
        assert_eq!(ips.len(), 3, "{ips:?}");
        assert!(ips.iter().all(|ip| ip.starts_with("10.244.")), "{ips:?}");
        let (first, _) = &pods[0];
        let ps = c.kubectl_ok(&["exec", first, "--", "ps"]);
        assert!(
            ps.contains(&format!("sleep {marker}")) && ps.lines().count() <= 4,
            "the pod sees only itself:\n{ps}"
        );
    }

    // Crash the worker holding most replicas; every replica must come back on the survivor.
    let mut counts = std::collections::BTreeMap::<String, usize>::new();
    for (_, n) in &pods {
        *counts.entry(n.clone()).or_default() += 1;
    }
    let victim = counts.iter().max_by_key(|(_, n)| **n).unwrap().0.clone();
    let crash_at = Instant::now();
    let out = c.rkube(&["node", "crash", &victim, "--data-dir", &data]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let healed = c.wait("replicas replaced off the crashed node", Duration::from_secs(40), || {
        let p = running_pods(&c, "app=web");
        (p.len() == 3 && p.iter().all(|(_, n)| *n != victim && *n != control_plane)).then_some(p)
    });
    let heal = crash_at.elapsed();
    eprintln!("healed in {heal:?}: {healed:?}");
    assert!(heal < Duration::from_secs(20), "heal took {heal:?}");
    let node = c.kubectl_ok(&["get", "node", &victim, "--no-headers"]);
    assert!(node.contains("NotReady"), "{node}");

    // The events tell the story in order (ordered by time, then by write order).
    let raw = c.kubectl_ok(&["get", "events", "-o", "json"]);
    let list: serde_json::Value = serde_json::from_str(&raw).unwrap();
    let mut evs: Vec<(String, u64, String)> = list["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["lastTimestamp"].as_str().unwrap_or("").to_string(),
                e["metadata"]["resourceVersion"].as_str().unwrap_or("0").parse().unwrap_or(0),
                e["reason"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect();
    evs.sort();
    let reasons: Vec<&str> = evs.iter().map(|(_, _, r)| r.as_str()).collect();
    let mut at = 0;
    for reason in
        ["NodeNotReady", "TaintManagerEviction", "SuccessfulCreate", "Scheduled", "Started"]
    {
        let Some(pos) = reasons[at..].iter().position(|r| *r == reason) else {
            panic!("{reason} missing after position {at}: {reasons:?}")
        };
        at += pos + 1;
    }

    // The crashed node comes back.
    let out = c.rkube(&["node", "restore", &victim, "--data-dir", &data]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    c.wait("the restored node Ready", Duration::from_secs(30), || {
        let out = c.kubectl_ok(&["get", "node", &victim, "--no-headers"]);
        (out.split_whitespace().nth(1) == Some("Ready")).then_some(())
    });

    // A GPU pod stays Pending with upstream's text, then runs once a GPU worker joins.
    let gpu = c.home.join("gpu.yaml");
    std::fs::write(
        &gpu,
        format!("apiVersion: v1\nkind: Pod\nmetadata:\n  name: production-gpu-pod\nspec:\n  terminationGracePeriodSeconds: 1\n  containers:\n  - name: trainer\n    image: {}\n    command: [\"sleep\", \"{marker}\"]\n    resources:\n      limits:\n        nvidia.com/gpu: 1\n", image.replace("\n        ", "\n    ")),
    )
    .unwrap();
    c.kubectl_ok(&["apply", "-f", gpu.to_str().unwrap()]);
    // Upstream's exact text, once the restored node's taints are gone.
    let expected = "0/3 nodes are available: 1 node(s) had untolerated taint(s), 2 Insufficient nvidia.com/gpu. preemption: 0/3 nodes are available: 1 Preemption is not helpful for scheduling, 2 No preemption victims found for incoming pod.";
    c.wait("FailedScheduling with upstream's text", Duration::from_secs(30), || {
        let d = c.kubectl_ok(&["describe", "pod", "production-gpu-pod"]);
        (d.contains("FailedScheduling") && d.contains(expected)).then_some(())
    });
    let pending = c.kubectl_ok(&["get", "pod", "production-gpu-pod", "--no-headers"]);
    assert!(pending.contains("Pending"), "{pending}");
    let out = c.rkube(&[
        "node",
        "add",
        "rkube-gpu-1",
        "--extended-resource",
        "nvidia.com/gpu=1",
        "--data-dir",
        &data,
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    c.wait("the GPU pod Running on the GPU worker", Duration::from_secs(60), || {
        let out = c.kubectl_ok(&["get", "pod", "production-gpu-pod", "-o", "wide", "--no-headers"]);
        (out.contains("Running") && out.contains("rkube-gpu-1")).then_some(())
    });

    // `rkube down` leaves no process behind.
    let pid = std::fs::read_to_string(c.data.join("rkube.pid")).unwrap();
    for mut child in c.extra.drain(..) {
        let _ = child.kill();
        let _ = child.wait();
    }
    let down = c.rkube(&["down", "--data-dir", &data]);
    assert!(down.status.success(), "{}", String::from_utf8_lossy(&down.stderr));
    assert!(!pid_alive(pid.trim()), "rkube process {pid} still alive after down");
    let leftover = Command::new("pgrep").args(["-f", &format!("sleep {marker}")]).output().unwrap();
    assert!(
        leftover.stdout.is_empty(),
        "pod processes left behind: {}",
        String::from_utf8_lossy(&leftover.stdout)
    );
}
