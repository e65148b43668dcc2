//! The `process` runtime as root, through the real kubectl: each container in its own PID,
//! mount, UTS and IPC namespaces and cgroup (a memory limit exceeded → OOMKilled), lifecycle
//! hooks (postStart before Running, a failing one → FailedPostStartHook; preStop before
//! SIGTERM, within the grace period), and no cgroup left once the pods and the agent are gone.

mod common;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::{Server, available};

/// Root is needed for namespaces and cgroups: skip visibly, or fail when CI=true.
fn root() -> bool {
    let uid = std::process::Command::new("id").arg("-u").output().unwrap();
    let root = String::from_utf8_lossy(&uid.stdout).trim() == "0";
    if !root {
        assert!(std::env::var("CI").as_deref() != Ok("true"), "CI=true runs these tests as root");
        eprintln!("SKIPPED: isolated process containers need root");
    }
    root
}

/// Every directory of the node's cgroup parent still present in any hierarchy.
fn node_cgroups(node: &str) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/sys/fs/cgroup").into_iter().flatten().flatten() {
        let p = e.path().join("rkube").join(node);
        if p.exists() {
            out.push(p);
        }
    }
    let unified = PathBuf::from("/sys/fs/cgroup/rkube").join(node);
    if unified.exists() {
        out.push(unified);
    }
    out
}

fn app_pod(trace: &std::path::Path) -> String {
    format!(
        r#"apiVersion: v1
kind: Pod
metadata:
  name: iso
spec:
  terminationGracePeriodSeconds: 5
  containers:
  - name: app
    image: busybox
    env:
    - {{name: TRACE, value: "{trace}"}}
    command:
    - sh
    - -c
    - |
      trap 'echo term >> "$TRACE"; echo got TERM; exit 0' TERM
      while [ ! -f hook.txt ]; do sleep 0.1; done
      echo "hook said: $(cat hook.txt)"
      while true; do sleep 0.2; done
    resources:
      limits: {{memory: 64Mi, cpu: 500m}}
    lifecycle:
      postStart:
        exec: {{command: ["sh", "-c", "sleep 1; echo from-poststart > hook.txt"]}}
      preStop:
        exec: {{command: ["sh", "-c", "echo prestop >> \"$TRACE\""]}}
"#,
        trace = trace.display()
    )
}

const HOG: &str = r#"apiVersion: v1
kind: Pod
metadata:
  name: hog
spec:
  restartPolicy: Never
  containers:
  - name: hog
    image: busybox
    command: ["sh", "-c", "x=a; while true; do x=$x$x; done"]
    resources:
      limits: {memory: 32Mi}
"#;

const BAD_HOOK: &str = r#"apiVersion: v1
kind: Pod
metadata:
  name: badhook
spec:
  terminationGracePeriodSeconds: 1
  containers:
  - name: app
    image: busybox
    command: ["sleep", "3600"]
    lifecycle:
      postStart:
        exec: {command: ["sh", "-c", "echo cannot; exit 3"]}
"#;

const NO_COMMAND: &str = r#"apiVersion: v1
kind: Pod
metadata:
  name: nocmd
spec:
  containers:
  - name: app
    image: nginx
"#;

#[test]
fn isolated_process_containers_with_limits_and_hooks() {
    if !available("kubectl", &["version", "--client"]) || !root() {
        return;
    }
    let node = format!("proc-{}", std::process::id());
    let mut s = Server::start();
    s.agent(&node, &[]);
    let jp = |pod: &str, path: &str| {
        s.ok(&["get", "pod", pod, "-o", &format!("jsonpath={path}")]).trim().to_string()
    };
    let version = s.wait("the node", Duration::from_secs(30), || {
        let v = s.kubectl(&[
            "get",
            "node",
            &node,
            "-o",
            "jsonpath={.status.nodeInfo.containerRuntimeVersion}",
        ]);
        let v = String::from_utf8_lossy(&v.stdout).into_owned();
        (!v.is_empty()).then_some(v)
    });
    assert!(version.starts_with("process://") && version.contains("+ns.cgroupv"), "{version}");

    // postStart runs before the container counts as Running, and its effect is visible.
    let trace = s.path().join("trace");
    s.ok_stdin(&["apply", "-f", "-"], &app_pod(&trace));
    s.ok_stdin(&["apply", "-f", "-"], HOG);
    s.ok_stdin(&["apply", "-f", "-"], BAD_HOOK);
    s.ok_stdin(&["apply", "-f", "-"], NO_COMMAND);
    s.wait("iso Running", Duration::from_secs(30), || {
        (jp("iso", "{.status.phase}") == "Running").then_some(())
    });
    s.wait("the postStart hook's file printed", Duration::from_secs(20), || {
        s.ok(&["logs", "iso"]).contains("hook said: from-poststart").then_some(())
    });

    // Its own UTS, PID and mount namespaces: hostname is the pod's name, /proc shows only
    // the container (pid 1 is its init), and it sits in its own cgroup with the limits.
    assert_eq!(s.ok(&["exec", "iso", "--", "hostname"]).trim(), "iso");
    let pids = s.ok(&["exec", "iso", "--", "sh", "-c", "ls /proc | grep '^[0-9]'"]);
    let pids: Vec<&str> = pids.lines().collect();
    assert!(pids.contains(&"1") && pids.len() < 10, "processes seen in the container: {pids:?}");
    assert_eq!(s.ok(&["exec", "iso", "--", "cat", "/proc/1/comm"]).trim(), "rkube");
    let uid = jp("iso", "{.metadata.uid}");
    let cg = s.ok(&["exec", "iso", "--", "cat", "/proc/self/cgroup"]);
    let want = format!("/rkube/{node}/pod{uid}/app-1");
    assert!(cg.contains(&want), "cgroup of an exec'd process: {cg}");
    let v1 = PathBuf::from(format!("/sys/fs/cgroup/memory{want}/memory.limit_in_bytes"));
    let v2 = PathBuf::from(format!("/sys/fs/cgroup{want}/memory.max"));
    let limit = std::fs::read_to_string(&v1).or_else(|_| std::fs::read_to_string(&v2)).unwrap();
    assert_eq!(limit.trim(), (64u64 << 20).to_string());

    // A memory limit exceeded: the kernel kills the hog and the pod says OOMKilled.
    s.wait("the hog OOMKilled", Duration::from_secs(60), || {
        (jp("hog", "{.status.containerStatuses[0].state.terminated.reason}") == "OOMKilled")
            .then_some(())
    });
    assert_eq!(jp("hog", "{.status.containerStatuses[0].state.terminated.exitCode}"), "137");
    assert_eq!(jp("hog", "{.status.phase}"), "Failed");

    // A failing postStart: the event, and the container killed.
    s.wait("FailedPostStartHook", Duration::from_secs(30), || {
        let d = s.ok(&["describe", "pod", "badhook"]);
        d.contains("FailedPostStartHook").then_some(d)
    });
    let events = s.ok(&[
        "get",
        "events",
        "--field-selector",
        "involvedObject.name=badhook,reason=FailedPostStartHook",
        "-o",
        "jsonpath={.items[0].message}",
    ]);
    assert!(
        events.starts_with(
            "Exec lifecycle hook ([sh -c echo cannot; exit 3]) for Container \"app\" in Pod \"badhook_default("
        ),
        "{events}"
    );
    assert!(events.contains("exited with 3"), "{events}");
    s.wait("badhook's container killed", Duration::from_secs(30), || {
        let t = jp(
            "badhook",
            "{.status.containerStatuses[0].lastState.terminated.exitCode}{.status.containerStatuses[0].state.terminated.exitCode}",
        );
        (t == "137").then_some(())
    });

    // No command: a clear waiting reason, not a crash.
    s.wait("nocmd waiting with a reason", Duration::from_secs(20), || {
        let msg = jp("nocmd", "{.status.containerStatuses[0].state.waiting.message}");
        msg.contains("set `command`").then_some(())
    });

    // Delete with a 5 s grace: preStop first, then SIGTERM, gone well within the grace.
    let started = Instant::now();
    s.ok(&["delete", "pod", "iso", "--wait=true"]);
    let took = started.elapsed();
    eprintln!("kubectl delete pod iso (grace 5 s, preStop + SIGTERM): {took:?}");
    assert!(took < Duration::from_secs(5), "delete took {took:?}");
    let traced = std::fs::read_to_string(&trace).unwrap_or_default();
    assert_eq!(traced, "prestop\nterm\n", "preStop then SIGTERM");

    s.ok(&["delete", "pod", "hog", "badhook", "nocmd", "--grace-period=1", "--wait=true"]);
    s.wait("the pods' cgroups removed", Duration::from_secs(10), || {
        let left: Vec<PathBuf> = node_cgroups(&node)
            .into_iter()
            .flat_map(|p| std::fs::read_dir(p).into_iter().flatten().flatten().map(|e| e.path()))
            .filter(|p| p.is_dir())
            .collect();
        left.is_empty().then_some(())
    });
    s.stop_agents();
    assert_eq!(node_cgroups(&node), Vec::<PathBuf>::new(), "the node's cgroup parent is left");
}
