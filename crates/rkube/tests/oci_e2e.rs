//! The oci runtime end to end, on a simulated machine: a network namespace this test creates
//! holds a real registry (Debian's `docker-registry`), `rkube server` and `rkube agent
//! --runtime oci`. An image built here from busybox is pushed with skopeo, then pods run it
//! through runc with their own IPs on the node's pod network, volumes, logs, exec, exit codes,
//! pull errors and clean deletion — all checked through the real kubectl.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{Server, versioned_kubectl};

/// These tests each run a whole cluster with real containers; one at a time keeps a 2-core CI
/// machine from turning their timings into noise.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner())
}

fn have_everything() -> bool {
    let root = nix::unistd::Uid::effective().is_root();
    let tools = ["kubectl", "runc", "docker-registry", "skopeo", "nsenter", "ip", "nft"];
    let missing: Vec<&str> = tools
        .iter()
        .copied()
        .filter(|t| {
            !std::env::var_os("PATH")
                .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(t).is_file()))
        })
        .collect();
    let busybox = Path::new("/bin/busybox").is_file();
    if root && missing.is_empty() && busybox {
        return true;
    }
    let why = format!("root={root}, missing={missing:?}, /bin/busybox={busybox}");
    assert!(std::env::var("CI").as_deref() != Ok("true"), "the oci e2e test needs: {why}");
    eprintln!(
        "SKIPPED: the oci e2e test needs root, runc, docker-registry, skopeo, busybox ({why})"
    );
    false
}

/// A network namespace standing in for one machine; deleted (with what runs in it) on drop.
struct Machine {
    name: String,
    registry: Option<Child>,
}

impl Machine {
    fn new() -> Machine {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let name = format!("rkoci-{:x}-{n}", std::process::id());
        let ok = Command::new("ip").args(["netns", "add", &name]).status().unwrap().success();
        assert!(ok, "ip netns add {name}");
        let m = Machine { name, registry: None };
        m.run(&["ip", "link", "set", "lo", "up"]);
        m
    }

    fn path(&self) -> PathBuf {
        Path::new("/run/netns").join(&self.name)
    }

    fn cmd(&self, argv: &[&str]) -> Command {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net={}", self.path().display())).args(argv);
        c
    }

    fn run(&self, argv: &[&str]) -> String {
        let out = self.cmd(argv).output().unwrap();
        assert!(out.status.success(), "{argv:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for Machine {
    fn drop(&mut self) {
        if let Some(mut r) = self.registry.take() {
            let _ = r.kill();
            let _ = r.wait();
        }
        let _ = Command::new("ip").args(["netns", "del", &self.name]).status();
    }
}

/// An OCI image layout of one layer: /bin/busybox with its applets, and /etc/passwd.
fn busybox_layout(dir: &Path) {
    let busybox = std::fs::read("/bin/busybox").unwrap();
    rkube_oci::image::layout::write_busybox_layout(dir, &busybox, "1").unwrap();
}

const PODS: &str = r#"apiVersion: v1
kind: ConfigMap
metadata: {name: cfg}
data: {greeting: "hi from a configmap\n"}
---
apiVersion: v1
kind: Pod
metadata: {name: box}
spec:
  terminationGracePeriodSeconds: 2
  containers:
  - name: main
    image: REGISTRY/test/busybox:1
    command: ["sh", "-c", "echo hello from $(hostname) image=$FROM_IMAGE; cat /etc/cfg/greeting; trap 'echo got TERM; exit 0' TERM; while true; do sleep 0.2; done"]
    volumeMounts:
    - {name: cfg, mountPath: /etc/cfg}
    - {name: scratch, mountPath: /scratch}
  volumes:
  - name: cfg
    configMap: {name: cfg}
  - name: scratch
    emptyDir: {}
---
apiVersion: v1
kind: Pod
metadata: {name: fails}
spec:
  restartPolicy: Never
  containers:
  - name: main
    image: REGISTRY/test/busybox:1
    command: ["sh", "-c", "exit 3"]
---
apiVersion: v1
kind: Pod
metadata: {name: missing}
spec:
  containers:
  - name: main
    image: REGISTRY/test/nothing:404
"#;

/// A simulated machine with a registry holding `test/busybox:1`; returns it, its work dir and
/// the registry's `host:port`.
fn machine_with_registry() -> (Machine, PathBuf, String) {
    let mut machine = Machine::new();
    let work = std::env::temp_dir().join(format!("{}-work", machine.name));
    std::fs::create_dir_all(&work).unwrap();
    let registry = start_registry(&mut machine, &work, "127.0.0.1");
    (machine, work, registry)
}

/// Runs a registry on `ip:5000` inside `machine` and pushes `test/busybox:1` to it.
fn start_registry(machine: &mut Machine, work: &Path, ip: &str) -> String {
    let port = 5000;
    let config = work.join("registry.yml");
    std::fs::write(
        &config,
        format!(
            "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: {ip}:{port}\n",
            work.join("registry").display()
        ),
    )
    .unwrap();
    machine.registry = Some(
        machine
            .cmd(&["docker-registry", "serve", config.to_str().unwrap()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let layout = work.join("layout");
    busybox_layout(&layout);
    let registry = format!("{ip}:{port}");
    let target = format!("docker://{registry}/test/busybox:1");
    let source = format!("oci:{}:1", layout.display());
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let out = machine
            .cmd(&[
                "skopeo",
                "--insecure-policy",
                "copy",
                &source,
                &target,
                "--dest-tls-verify=false",
            ])
            .output()
            .unwrap();
        if out.status.success() {
            break;
        }
        assert!(Instant::now() < deadline, "push: {}", String::from_utf8_lossy(&out.stderr));
        std::thread::sleep(Duration::from_millis(200));
    }
    registry
}

#[test]
fn pods_run_real_images_through_runc_on_their_own_network() {
    let _serial = serial();
    if !have_everything() {
        return;
    }
    let (machine, work, registry) = machine_with_registry();
    let mut s = Server::start_in_netns(&machine.path(), &[]);
    s.agent("node-1", &["--runtime", "oci", "--insecure-registry", &registry]);
    s.wait("node-1 Ready", Duration::from_secs(30), || {
        s.ok(&["get", "nodes", "--no-headers"]).contains(" Ready ").then_some(())
    });
    let wide = s.ok(&["get", "nodes", "-o", "wide", "--no-headers"]);
    assert!(wide.contains("runc://"), "{wide}");
    s.ok_stdin(&["apply", "-f", "-"], &PODS.replace("REGISTRY", &registry));

    let deadline = Instant::now() + Duration::from_secs(60);
    let line = loop {
        let out = s.ok(&["get", "pod", "box", "-o", "wide", "--no-headers"]);
        if out.contains("Running") {
            break out;
        }
        if Instant::now() > deadline {
            let agent = std::fs::read_to_string(s.dir.join("node-1.log")).unwrap_or_default();
            panic!(
                "box not Running: {out}\n{}\nagent log:\n{agent}",
                s.ok(&["describe", "pod", "box"])
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    // Its own address on the node's pod network (10.244.0.0/24 for the first node).
    let ip = line.split_whitespace().nth(5).unwrap().to_string();
    assert!(ip.starts_with("10.244.0."), "{line}");
    let logs = s.wait("box's output", Duration::from_secs(20), || {
        let out = s.kubectl(&["logs", "box"]);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        text.contains("configmap").then_some(text)
    });
    assert_eq!(logs, "hello from box image=yes\nhi from a configmap\n");
    // Its own PID namespace: only the pod's processes, the container's command as PID 1.
    let ps = s.ok(&["exec", "box", "--", "ps", "-o", "pid,args"]);
    let procs: Vec<&str> = ps.lines().skip(1).collect();
    assert!(procs.iter().any(|l| l.trim_start().starts_with("1 ") && l.contains("sh -c")), "{ps}");
    assert!(
        procs.iter().all(|l| l.contains("sh") || l.contains("sleep") || l.contains("ps")),
        "{ps}"
    );
    assert!(procs.len() <= 4, "{ps}");
    let addr = s.ok(&["exec", "box", "--", "ip", "-4", "-o", "addr", "show", "eth0"]);
    assert!(addr.contains(&format!("{ip}/24")), "{addr}");
    // The root filesystem is the image's, writable; volumes are where the pod put them.
    s.ok(&["exec", "box", "--", "touch", "/scratch/x", "/tmp/y"]);
    let ls = s.ok(&["exec", "box", "--", "ls", "/bin/busybox", "/scratch/x"]);
    assert_eq!(ls.lines().count(), 2, "{ls}");
    // One of the pods pulled the image (whichever came first); box started from it.
    let events = s.ok(&["get", "events"]);
    for event in [
        format!("Pulling image \"{registry}/test/busybox:1\""),
        format!("Successfully pulled image \"{registry}/test/busybox:1\""),
    ] {
        assert!(events.contains(&event), "{event} missing:\n{events}");
    }
    let described = s.ok(&["describe", "pod", "box"]);
    assert!(described.contains("Started container main"), "{described}");

    // A container's exit code is real.
    let code = s.wait("fails to fail", Duration::from_secs(60), || {
        let out = s.ok(&[
            "get",
            "pod",
            "fails",
            "-o",
            "jsonpath={.status.phase} {.status.containerStatuses[0].state.terminated.exitCode}",
        ]);
        out.starts_with("Failed").then_some(out)
    });
    assert_eq!(code, "Failed 3");

    // The image is on the node now: a new pod starts from it without pulling, and its memory
    // limit is the kernel's to enforce.
    let hog = format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: hog}}\nspec:\n  restartPolicy: Never\n  containers:\n  - name: main\n    image: {registry}/test/busybox:1\n    command: [\"sh\", \"-c\", \"x=a; while true; do x=$x$x; done\"]\n    resources:\n      limits: {{memory: 16Mi}}\n"
    );
    s.ok_stdin(&["apply", "-f", "-"], &hog);
    let killed = s.wait("hog OOMKilled", Duration::from_secs(60), || {
        let out = s.ok(&[
            "get",
            "pod",
            "hog",
            "-o",
            "jsonpath={.status.containerStatuses[0].state.terminated.reason} {.status.containerStatuses[0].state.terminated.exitCode}",
        ]);
        (!out.trim().is_empty()).then_some(out)
    });
    assert_eq!(killed, "OOMKilled 137");
    let described = s.ok(&["describe", "pod", "hog"]);
    assert!(
        described.contains(&format!(
            "Container image \"{registry}/test/busybox:1\" already present on machine"
        )) && !described.contains("Pulling image"),
        "{described}"
    );

    // An image that does not exist: ErrImagePull, then ImagePullBackOff.
    s.wait("missing in image pull back-off", Duration::from_secs(60), || {
        let out = s.ok(&["get", "pod", "missing", "--no-headers"]);
        out.contains("ImagePullBackOff").then_some(())
    });
    let described = s.ok(&["describe", "pod", "missing"]);
    assert!(described.contains("Failed to pull image"), "{described}");

    // Graceful deletion: SIGTERM reaches the container; everything it held goes.
    let started = Instant::now();
    s.ok(&["delete", "pod", "box", "fails", "missing", "hog"]);
    assert!(started.elapsed() < Duration::from_secs(15));
    let node_dir = s.dir.join("node-1");
    s.wait("the pod's runc containers and sandbox gone", Duration::from_secs(20), || {
        let empty =
            |d: &str| std::fs::read_dir(node_dir.join(d)).map(|r| r.count() == 0).unwrap_or(true);
        (empty("oci/containers") && empty("oci/sandboxes") && empty("ipam")).then_some(())
    });
    let links = machine.run(&["ip", "-o", "link"]);
    assert!(!links.contains("veth"), "{links}");
    drop(s);
    let _ = std::fs::remove_dir_all(&work);
}

const WEB: &str = r#"apiVersion: apps/v1
kind: Deployment
metadata: {name: web}
spec:
  replicas: 2
  selector: {matchLabels: {app: web}}
  template:
    metadata: {labels: {app: web}}
    spec:
      terminationGracePeriodSeconds: 1
      containers:
      - name: httpd
        image: REGISTRY/test/busybox:1
        command: ["sh", "-c", "mkdir -p /www && hostname > /www/index.html && exec httpd -f -p 8080 -h /www"]
        ports: [{containerPort: 8080}]
        readinessProbe:
          tcpSocket: {port: 8080}
          periodSeconds: 1
---
apiVersion: v1
kind: Service
metadata: {name: web}
spec:
  type: NodePort
  selector: {app: web}
  ports: [{port: 80, targetPort: 8080, nodePort: 30080}]
---
apiVersion: v1
kind: Pod
metadata: {name: client}
spec:
  terminationGracePeriodSeconds: 1
  containers:
  - name: sh
    image: REGISTRY/test/busybox:1
    command: ["sleep", "3600"]
"#;

/// One HTTP request from the `client` pod to `target` (`host port`): the body's last line.
fn fetch(s: &Server, target: &str) -> String {
    let script = format!("printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 2 {target} | tail -n 1");
    let out = s.kubectl(&["exec", "client", "--", "sh", "-c", &script]);
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Asks `web` by name until `want` distinct replicas answered; every answer must be a web pod.
fn replicas_reached_by_name(s: &Server, want: usize, limit: Duration) -> (usize, String) {
    let pods = s.ok(&["get", "pods", "-l", "app=web", "-o", "jsonpath={.items[*].metadata.name}"]);
    let mut seen = std::collections::BTreeSet::new();
    let deadline = Instant::now() + limit;
    while seen.len() < want && Instant::now() < deadline {
        let who = fetch(s, "web.default.svc.cluster.local 80");
        if !who.is_empty() {
            assert!(pods.contains(&who), "{who} is not one of {pods}");
            seen.insert(who);
        }
    }
    (seen.len(), pods)
}

/// Scales `web` to zero and waits until the client is refused at once.
fn refused_without_endpoints(s: &Server) {
    s.ok(&["scale", "deployment", "web", "--replicas=0"]);
    s.wait("the web replicas gone", Duration::from_secs(60), || {
        s.ok(&["get", "pods", "-l", "app=web", "--no-headers"]).trim().is_empty().then_some(())
    });
    s.wait("connection refused", Duration::from_secs(10), || {
        let script = "nc -w 2 web 80 </dev/null; echo rc=$?";
        let out = s.kubectl(&["exec", "client", "--", "sh", "-c", script]);
        let text = String::from_utf8_lossy(&out.stdout).to_string()
            + &String::from_utf8_lossy(&out.stderr);
        (text.contains("rc=1") && text.to_lowercase().contains("refused")).then_some(())
    });
}

/// Services through the cluster DNS and the proxy: a client pod reaches every replica by name,
/// the NodePort answers on the node's address, and a Service without endpoints refuses.
#[test]
fn services_route_to_every_replica_by_name_and_node_port() {
    let _serial = serial();
    if !have_everything() {
        return;
    }
    let (machine, work, registry) = machine_with_registry();
    // The machine's own address (a veth pair inside it: no way out): the node IP, where the
    // cluster DNS answers and NodePorts listen.
    machine.run(&["ip", "link", "add", "rkh0", "type", "veth", "peer", "name", "rkh1"]);
    machine.run(&["ip", "addr", "add", "192.168.77.1/24", "dev", "rkh0"]);
    machine.run(&["ip", "link", "set", "rkh0", "up"]);
    machine.run(&["ip", "link", "set", "rkh1", "up"]);
    // Like any machine it has a default route (into its own veth pair: nothing leaves), so a
    // Service without endpoints is refused by the proxy rather than unroutable.
    machine.run(&["ip", "route", "add", "default", "dev", "rkh0"]);
    let mut s = Server::start_in_netns(&machine.path(), &["--cluster-dns-address", "192.168.77.1"]);
    s.agent(
        "node-1",
        &["--runtime", "oci", "--insecure-registry", &registry, "--node-ip", "192.168.77.1"],
    );
    s.ok_stdin(&["apply", "-f", "-"], &WEB.replace("REGISTRY", &registry));
    s.wait("two web replicas and the client Running", Duration::from_secs(90), || {
        let out = s.ok(&["get", "pods", "--no-headers"]);
        (out.lines().filter(|l| l.contains("Running")).count() == 3).then_some(())
    });
    // By name: every replica answers over many requests.
    let (reached, pods) = replicas_reached_by_name(&s, 2, Duration::from_secs(60));
    assert_eq!(reached, 2, "replicas reached by name of {pods}");
    // The NodePort on the node's address.
    let who = fetch(&s, "192.168.77.1 30080");
    assert!(pods.contains(&who) && !who.is_empty(), "NodePort answered {who:?}");
    // A hostPort publishes a pod on the node's address.
    let hp = format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: hp}}\nspec:\n  terminationGracePeriodSeconds: 1\n  containers:\n  - name: httpd\n    image: {registry}/test/busybox:1\n    command: [\"sh\", \"-c\", \"mkdir -p /www && hostname > /www/index.html && exec httpd -f -p 80 -h /www\"]\n    ports: [{{containerPort: 80, hostPort: 31888}}]\n"
    );
    s.ok_stdin(&["apply", "-f", "-"], &hp);
    s.wait("hp Running", Duration::from_secs(60), || {
        s.ok(&["get", "pod", "hp", "--no-headers"]).contains("Running").then_some(())
    });
    let deadline = Instant::now() + Duration::from_secs(20);
    let who = loop {
        let who = fetch(&s, "192.168.77.1 31888");
        if !who.is_empty() {
            break who;
        }
        assert!(
            Instant::now() < deadline,
            "hostPort 31888 does not answer; agent:\n{}",
            std::fs::read_to_string(s.dir.join("node-1.log"))
                .unwrap_or_default()
                .lines()
                .filter(|l| l.contains("hostPort") || l.contains("WARN"))
                .collect::<Vec<_>>()
                .join("\n")
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(who, "hp");
    // kubectl port-forward reaches the pod inside its own network namespace: the kubelet dials
    // from in there. kubectl and the client both run on the machine.
    let mut pf = machine
        .cmd(&["kubectl", "--kubeconfig", s.kubeconfig.to_str().unwrap(), "port-forward"])
        .args(["pod/hp", "18080:80"])
        .env("HOME", &s.dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(s.dir.join("port-forward.err")).unwrap())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let through = loop {
        let who = machine.run(&[
            "sh",
            "-c",
            "printf 'GET / HTTP/1.0\\r\\n\\r\\n' | busybox nc -w 2 127.0.0.1 18080 | tail -n 1",
        ]);
        if !who.trim().is_empty() || Instant::now() > deadline {
            break who.trim().to_string();
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let _ = pf.kill();
    let _ = pf.wait();
    assert_eq!(
        through,
        "hp",
        "port-forward: {}",
        std::fs::read_to_string(s.dir.join("port-forward.err")).unwrap_or_default()
    );
    s.ok(&["delete", "pod", "hp"]);
    // A deleted pod leaves the Service's rotation as soon as its endpoint goes away (the pod
    // itself is still terminating).
    let victim = pods.split_whitespace().next().unwrap().to_string();
    s.ok(&["delete", "pod", &victim, "--wait=false"]);
    std::thread::sleep(Duration::from_millis(1500));
    for _ in 0..10 {
        let who = fetch(&s, "web.default.svc.cluster.local 80");
        assert!(
            !who.is_empty(),
            "a request was lost: the Service still pointed at the deleted pod\n{}\n{}\n{}",
            s.ok(&["get", "pods", "-o", "wide"]),
            s.ok(&["get", "endpointslices", "-o", "yaml"]),
            machine.run(&["nft", "list", "table", "ip", "rkube"])
        );
        assert_ne!(who, victim, "a deleted pod still got traffic");
    }
    // No endpoints: refused at once.
    refused_without_endpoints(&s);
    s.ok(&["delete", "pod", "client"]);
    drop(s);
    drop(machine);
    let _ = std::fs::remove_dir_all(&work);
}

/// Two machines (two network namespaces joined by a veth pair, nothing else) each running an
/// agent; pods on both are reached through one Service by name from either side, NodePorts
/// answer on both node addresses, and scaling to zero refuses.
#[test]
fn two_nodes_route_services_across_machines() {
    let _serial = serial();
    if !have_everything() {
        return;
    }
    let mut a = Machine::new();
    let b = Machine::new();
    let work = std::env::temp_dir().join(format!("{}-work", a.name));
    std::fs::create_dir_all(&work).unwrap();
    // The cable between the two machines.
    a.run(&[
        "ip",
        "link",
        "add",
        "rkl0",
        "type",
        "veth",
        "peer",
        "name",
        "rkl1",
        "netns",
        b.path().to_str().unwrap(),
    ]);
    a.run(&["ip", "addr", "add", "192.168.78.1/24", "dev", "rkl0"]);
    a.run(&["ip", "link", "set", "rkl0", "up"]);
    b.run(&["ip", "addr", "add", "192.168.78.2/24", "dev", "rkl1"]);
    b.run(&["ip", "link", "set", "rkl1", "up"]);
    // Default routes over the cable, as real machines have (traffic stays in these two).
    a.run(&["ip", "route", "add", "default", "via", "192.168.78.2"]);
    b.run(&["ip", "route", "add", "default", "via", "192.168.78.1"]);
    let registry = start_registry(&mut a, &work, "192.168.78.1");
    let mut s = Server::start_in_netns(
        &a.path(),
        &["--bind-address", "192.168.78.1", "--cluster-dns-address", "192.168.78.1"],
    );
    s.agent(
        "node-a",
        &["--runtime", "oci", "--insecure-registry", &registry, "--node-ip", "192.168.78.1"],
    );
    s.agent_in(
        &b.path(),
        "node-b",
        &["--runtime", "oci", "--insecure-registry", &registry, "--node-ip", "192.168.78.2"],
    );
    s.wait("two Ready nodes", Duration::from_secs(60), || {
        let out = s.ok(&["get", "nodes", "--no-headers"]);
        (out.lines().filter(|l| l.contains(" Ready ")).count() == 2).then_some(())
    });
    // Spread over both machines, as a user who wants that says so.
    let web = WEB.replace("REGISTRY", &registry).replace("replicas: 2", "replicas: 4").replace(
        "      terminationGracePeriodSeconds: 1\n      containers:\n      - name: httpd",
        "      terminationGracePeriodSeconds: 1\n      topologySpreadConstraints: [{maxSkew: 1, topologyKey: kubernetes.io/hostname, whenUnsatisfiable: DoNotSchedule, labelSelector: {matchLabels: {app: web}}}]\n      containers:\n      - name: httpd",
    );
    assert!(web.contains("topologySpreadConstraints"));
    s.ok_stdin(&["apply", "-f", "-"], &web);
    s.wait("four web replicas and the client Running", Duration::from_secs(120), || {
        let out = s.ok(&["get", "pods", "--no-headers"]);
        (out.lines().filter(|l| l.contains("Running")).count() == 5).then_some(())
    });
    let wide = s.ok(&["get", "pods", "-o", "wide", "--no-headers"]);
    assert!(wide.contains("node-a") && wide.contains("node-b"), "pods on both nodes:\n{wide}");
    let (reached, pods) = replicas_reached_by_name(&s, 4, Duration::from_secs(90));
    assert_eq!(reached, 4, "replicas reached by name across both nodes, of {pods}\n{wide}");
    for node_ip in ["192.168.78.1", "192.168.78.2"] {
        let who = fetch(&s, &format!("{node_ip} 30080"));
        assert!(!who.is_empty() && pods.contains(&who), "NodePort on {node_ip} answered {who:?}");
    }
    refused_without_endpoints(&s);
    s.ok(&["delete", "pod", "client"]);
    drop(s);
    drop(b);
    drop(a);
    let _ = std::fs::remove_dir_all(&work);
}

/// A kubelet that crashes and comes back adopts the containers it left running: the same
/// process keeps serving (same start time, no restart, its files intact) and exec still works.
#[test]
fn a_restarted_kubelet_adopts_running_containers() {
    let _serial = serial();
    if !have_everything() {
        return;
    }
    let (machine, work, registry) = machine_with_registry();
    let mut s = Server::start_in_netns(&machine.path(), &[]);
    let agent_args = ["--runtime", "oci", "--insecure-registry", registry.as_str()];
    s.agent("node-1", &agent_args);
    let pod = format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: keeper}}\nspec:\n  terminationGracePeriodSeconds: 1\n  containers:\n  - name: main\n    image: {registry}/test/busybox:1\n    command: [\"sleep\", \"3600\"]\n"
    );
    s.ok_stdin(&["apply", "-f", "-"], &pod);
    let status = "jsonpath={.status.phase} {.status.containerStatuses[0].restartCount} {.status.containerStatuses[0].state.running.startedAt} {.status.podIP}";
    let before = s.wait("keeper Running", Duration::from_secs(60), || {
        let out = s.ok(&["get", "pod", "keeper", "-o", status]);
        out.starts_with("Running").then_some(out)
    });
    s.ok(&["exec", "keeper", "--", "touch", "/tmp/still-here"]);
    s.kill_agents();
    std::thread::sleep(Duration::from_secs(2));
    s.agent("node-1", &agent_args);
    // The new kubelet reports again (its status write lands) without restarting anything.
    std::thread::sleep(Duration::from_secs(5));
    let after = s.ok(&["get", "pod", "keeper", "-o", status]);
    assert_eq!(after, before, "the pod was restarted or changed");
    s.ok(&["exec", "keeper", "--", "test", "-f", "/tmp/still-here"]);
    let events = s.ok(&["get", "events", "--field-selector", "involvedObject.name=keeper"]);
    assert_eq!(events.matches("Started container main").count(), 1, "{events}");
    s.ok(&["delete", "pod", "keeper"]);
    let node_dir = s.dir.join("node-1");
    s.wait("keeper's containers gone", Duration::from_secs(20), || {
        std::fs::read_dir(node_dir.join("oci/containers"))
            .map(|r| r.count() == 0)
            .unwrap_or(true)
            .then_some(())
    });
    drop(s);
    drop(machine);
    let _ = std::fs::remove_dir_all(&work);
}

/// `kubectl attach` to runc containers, whose stdio the shim owns: output from the moment of
/// attaching, stdin to a `cat` (closed after the session with stdinOnce), and a terminal.
#[test]
fn kubectl_attach_reaches_runc_containers() {
    let _serial = serial();
    if !have_everything() {
        return;
    }
    let (machine, work, registry) = machine_with_registry();
    let mut s = Server::start_in_netns(&machine.path(), &[]);
    s.agent("node-1", &["--runtime", "oci", "--insecure-registry", &registry]);
    let pods = format!(
        r#"apiVersion: v1
kind: Pod
metadata: {{name: ticker}}
spec:
  terminationGracePeriodSeconds: 1
  containers:
  - name: main
    image: {registry}/test/busybox:1
    command: ["sh", "-c", "i=0; while true; do echo tick-$i; i=$((i+1)); sleep 0.2; done"]
---
apiVersion: v1
kind: Pod
metadata: {{name: echo}}
spec:
  restartPolicy: Never
  terminationGracePeriodSeconds: 1
  containers:
  - name: main
    image: {registry}/test/busybox:1
    command: ["cat"]
    stdin: true
    stdinOnce: true
---
apiVersion: v1
kind: Pod
metadata: {{name: term}}
spec:
  restartPolicy: Never
  terminationGracePeriodSeconds: 1
  containers:
  - name: main
    image: {registry}/test/busybox:1
    # (runc's /dev has its own devpts: `tty` cannot name the shim's pty, `test -t` sees it)
    command: ["sh", "-c", "read x; if [ -t 0 ]; then t=terminal; else t=pipe; fi; echo \"got $x on a $t\""]
    stdin: true
    stdinOnce: true
    tty: true
"#
    );
    s.ok_stdin(&["apply", "-f", "-"], &pods);
    for pod in ["ticker", "echo", "term"] {
        s.wait(&format!("{pod} Running"), Duration::from_secs(90), || {
            let out = s.ok(&["get", "pod", pod, "-o", "jsonpath={.status.phase}"]);
            (out == "Running").then_some(())
        });
    }
    s.wait("ticker past tick-5", Duration::from_secs(30), || {
        s.ok(&["logs", "ticker"]).contains("tick-5").then_some(())
    });
    let before = s.ok(&["logs", "ticker"]).lines().count();
    // Attached for 3 seconds (`timeout` ends kubectl): only lines written meanwhile, in order.
    let out = Command::new("nsenter")
        .arg(format!("--net={}", machine.path().display()))
        .args(["timeout", "3", "kubectl", "--kubeconfig"])
        .arg(&s.kubeconfig)
        .args(["attach", "ticker"])
        .env("HOME", &s.dir)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let ticks: Vec<usize> =
        text.lines().filter_map(|l| l.strip_prefix("tick-")?.parse().ok()).collect();
    assert!(ticks.len() >= 3, "attach printed {text:?}: {}", String::from_utf8_lossy(&out.stderr));
    assert!(ticks[0] + 1 >= before, "attach replayed old output: {ticks:?}, log had {before}");
    assert!(ticks.windows(2).all(|w| w[1] == w[0] + 1), "{ticks:?}");

    let out = s.kubectl_with("kubectl", &["attach", "-i", "echo"], Some("hello runc\n"));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "hello runc\n");
    let out = s.kubectl_with("kubectl", &["attach", "-i", "term"], Some("hi\n"));
    let printed = String::from_utf8_lossy(&out.stdout);
    assert!(printed.contains("got hi on a terminal"), "{printed}");

    // kubectl 1.27 speaks SPDY/3.1 for exec and attach: `runc exec` with stdin and the exit
    // code, and attach to the shim's output.
    match versioned_kubectl(27) {
        Some(old) => {
            let old = old.to_str().unwrap();
            let out = s.kubectl_with(
                old,
                &["exec", "-i", "ticker", "--", "sh", "-c", "cat; echo in-runc >&2; exit 4"],
                Some("typed\n"),
            );
            assert_eq!(out.status.code(), Some(4), "{}", String::from_utf8_lossy(&out.stderr));
            assert_eq!(String::from_utf8_lossy(&out.stdout), "typed\n");
            assert!(String::from_utf8_lossy(&out.stderr).starts_with("in-runc\n"));
            let out = Command::new("nsenter")
                .arg(format!("--net={}", machine.path().display()))
                .args(["timeout", "3", old, "--kubeconfig"])
                .arg(&s.kubeconfig)
                .args(["attach", "ticker"])
                .env("HOME", &s.dir)
                .stdin(Stdio::null())
                .output()
                .unwrap();
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            let n = text.lines().filter(|l| l.starts_with("tick-")).count();
            assert!(n >= 3, "kubectl 1.27 attach printed {text:?}");
        }
        None => {
            assert!(std::env::var("CI").as_deref() != Ok("true"), "kubectl.1.27 is required");
            eprintln!("SKIPPED: kubectl.1.27 is not available");
        }
    }

    s.ok(&["delete", "pod", "ticker", "echo", "term"]);
    let node_dir = s.dir.join("node-1");
    s.wait("the containers gone", Duration::from_secs(30), || {
        std::fs::read_dir(node_dir.join("oci/containers"))
            .map(|r| r.count() == 0)
            .unwrap_or(true)
            .then_some(())
    });
    drop(s);
    drop(machine);
    let _ = std::fs::remove_dir_all(&work);
}
