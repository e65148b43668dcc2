//! A pod's life on the `process` runtime, through the real kubectl against `rkube server` and
//! `rkube agent`: output and exec, a container killed from outside restarted within 2 s, exit
//! codes as Completed/Error, a crash loop in CrashLoopBackOff with its BackOff event, the node's
//! `-o wide` columns, and a stopped agent's node going NotReady.

mod common;

use common::{Server, available};
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn pods(marker: &str) -> String {
    format!(
        r#"apiVersion: v1
kind: Pod
metadata: {{name: hello}}
spec:
  containers:
  - name: main
    image: busybox
    command: ["sh", "-c", "echo hello; exec sleep {marker}"]
---
apiVersion: v1
kind: Pod
metadata: {{name: done}}
spec:
  restartPolicy: Never
  containers:
  - {{name: main, image: busybox, command: ["sh", "-c", "exit 0"]}}
---
apiVersion: v1
kind: Pod
metadata: {{name: failed}}
spec:
  restartPolicy: Never
  containers:
  - {{name: main, image: busybox, command: ["sh", "-c", "echo failing; exit 3"]}}
---
apiVersion: v1
kind: Pod
metadata: {{name: crasher}}
spec:
  containers:
  - {{name: main, image: busybox, command: ["sh", "-c", "exit 1"]}}
"#
    )
}

/// The columns of `kubectl get pod NAME --no-headers`: NAME READY STATUS RESTARTS AGE.
fn row(s: &Server, pod: &str) -> Vec<String> {
    s.ok(&["get", "pod", pod, "--no-headers"]).split_whitespace().map(String::from).collect()
}

fn jp(s: &Server, pod: &str, path: &str) -> String {
    s.ok(&["get", "pod", pod, "-o", &format!("jsonpath={path}")])
}

#[test]
fn a_pods_life_on_the_process_runtime() {
    if !available("kubectl", &["version", "--client"]) {
        assert!(std::env::var("CI").as_deref() != Ok("true"), "kubectl is required when CI=true");
        return;
    }
    let mut s = Server::start_with(&["--node-monitor-grace-period", "8"]);
    s.agent("node-1", &["--node-lease-duration-seconds", "8"]);
    // A sleep no other test runs: its length names this cluster.
    let marker = format!("9{}", s.port);
    s.ok_stdin(&["apply", "-f", "-"], &pods(&marker));

    // Output and exec.
    s.wait("hello Running", Duration::from_secs(30), || {
        (row(&s, "hello")[2] == "Running").then_some(())
    });
    s.wait("hello's output", Duration::from_secs(10), || {
        (s.ok(&["logs", "hello"]) == "hello\n").then_some(())
    });
    assert_eq!(s.ok(&["exec", "hello", "--", "echo", "ok"]), "ok\n");

    // Killed from outside: restarted, and the status says so within 2 s (timed by a watch).
    let mut watch = Command::new("kubectl")
        .arg("--kubeconfig")
        .arg(&s.kubeconfig)
        .args(["get", "pod", "hello", "--watch", "-o"])
        .arg(r#"jsonpath={.status.containerStatuses[0].restartCount} {.status.phase}{"\n"}"#)
        .env("HOME", &s.dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("kubectl get --watch");
    let (tx, rx) = std::sync::mpsc::channel();
    let out = watch.stdout.take().expect("stdout");
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    assert_eq!(
        rx.recv_timeout(Duration::from_secs(10)).expect("the watch's first line"),
        "0 Running"
    );
    let killed = Instant::now();
    let kill = Command::new("pkill").args(["-KILL", "-f", &format!("sleep {marker}")]).status();
    assert!(kill.expect("pkill").success(), "no process ran sleep {marker}");
    let restarted = loop {
        let left = Duration::from_secs(10).saturating_sub(killed.elapsed());
        let line = rx.recv_timeout(left).expect("restartCount 1 in the pod's status");
        if line.starts_with("1 ") {
            break killed.elapsed();
        }
    };
    let _ = watch.kill();
    let _ = watch.wait();
    eprintln!("container killed -> restartCount 1 in {restarted:?}");
    assert!(restarted <= Duration::from_secs(2), "restartCount 1 after {restarted:?}");
    s.wait("hello Running again", Duration::from_secs(10), || {
        let r = row(&s, "hello");
        (r[1] == "1/1" && r[2] == "Running" && r[3] == "1").then_some(())
    });
    s.wait("the restarted container's output", Duration::from_secs(10), || {
        (s.ok(&["logs", "hello"]) == "hello\n").then_some(())
    });
    assert_eq!(s.ok(&["logs", "hello", "--previous"]), "hello\n");

    // Exit codes.
    s.wait("done Completed", Duration::from_secs(20), || {
        (row(&s, "done")[2] == "Completed").then_some(())
    });
    assert_eq!(jp(&s, "done", "{.status.phase}"), "Succeeded");
    s.wait("failed Error", Duration::from_secs(20), || {
        (row(&s, "failed")[2] == "Error").then_some(())
    });
    assert_eq!(
        jp(
            &s,
            "failed",
            "{.status.phase} {.status.containerStatuses[0].state.terminated.exitCode}"
        ),
        "Failed 3"
    );
    assert_eq!(s.ok(&["logs", "failed"]), "failing\n");

    // A crash loop.
    s.wait("crasher in CrashLoopBackOff", Duration::from_secs(40), || {
        (row(&s, "crasher")[2] == "CrashLoopBackOff").then_some(())
    });
    let waiting = jp(&s, "crasher", "{.status.containerStatuses[0].state.waiting.message}");
    assert!(
        waiting.starts_with("back-off 10s restarting failed container=main pod=crasher_default("),
        "{waiting}"
    );
    let described = s.ok(&["describe", "pod", "crasher"]);
    assert!(
        described.contains("Back-off restarting failed container main in pod crasher_default("),
        "{described}"
    );

    // The node, as `-o wide` shows it.
    let wide = s.ok(&["get", "nodes", "-o", "wide"]);
    let mut lines = wide.lines();
    let header: Vec<&str> = lines.next().expect("header").split_whitespace().collect();
    assert_eq!(header, common::NODES_WIDE_HEADER);
    let node = lines.next().expect("the node's row");
    let cells: Vec<&str> = node.split_whitespace().collect();
    assert_eq!((cells[0], cells[1]), ("node-1", "Ready"), "{wide}");
    let os_release = std::fs::read_to_string("/etc/os-release").unwrap_or_default();
    let pretty = os_release
        .lines()
        .find_map(|l| l.strip_prefix("PRETTY_NAME="))
        .map(|v| v.trim_matches('"').to_string())
        .expect("PRETTY_NAME in /etc/os-release");
    assert!(node.contains(&pretty), "OS image {pretty:?} in {node:?}");
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").expect("kernel release");
    assert!(node.contains(kernel.trim()), "kernel {kernel:?} in {node:?}");
    assert!(cells.last().is_some_and(|r| r.starts_with("process://")), "{node}");

    // The agent stops: its node goes NotReady.
    s.stop_agents();
    s.wait("node-1 NotReady", Duration::from_secs(40), || {
        s.ok(&["get", "node", "node-1", "--no-headers"]).contains("NotReady").then_some(())
    });
}
