//! Isolated process containers through `runtime::start_process` and the real container init
//! (`rkube-process-init`): namespaces, the exit status or signal, signal forwarding, entering a
//! running container, the memory limit's OOM kill, and cgroups removed afterwards. Needs root:
//! skips visibly otherwise, and fails when CI=true.

use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::sys::signal::Signal;
use rkube_kubelet::runtime::{ContainerSpec, Handle, Isolation, start_process};
use rkube_oci::cgroup::Limits;

fn root() -> bool {
    let root = nix::unistd::Uid::effective().is_root();
    if !root {
        assert!(std::env::var("CI").as_deref() != Ok("true"), "CI=true runs these tests as root");
        eprintln!("SKIPPED: isolated process containers need root");
    }
    root
}

/// Each container's cgroup parent, as a node's: `/rkube/<test node>`.
fn parent(name: &str) -> String {
    format!("/rkube/kubelet-test-{}-{name}", std::process::id())
}

fn cgroup(name: &str) -> String {
    format!("{}/c", parent(name))
}

/// The container's cgroup is gone; its parent goes as a stopping kubelet removes it.
fn no_cgroups_left(name: &str) {
    assert!(cgroup_dirs(&cgroup(name)).is_empty(), "cgroup left behind");
    rkube_oci::cgroup::remove_empty_parents(&parent(name));
    assert!(cgroup_dirs(&parent(name)).is_empty(), "cgroup parent left behind");
}

fn init() -> String {
    env!("CARGO_BIN_EXE_rkube-process-init").to_string()
}

fn spec(dir: &Path, name: &str, script: &str, limits: Limits) -> ContainerSpec {
    ContainerSpec {
        name: name.into(),
        argv: vec!["sh".into(), "-c".into(), script.into()],
        env: vec![("GREETING".into(), "hello".into())],
        workdir: dir.join("work"),
        log_path: dir.join("logs").join(format!("{name}.log")),
        isolation: Some(Isolation {
            init: vec![init()],
            hostname: "box".into(),
            cgroup: cgroup(name),
            limits,
        }),
        stdio: rkube_kubelet::runtime::ContainerStdio {
            socket: dir.join("attach").join(format!("{name}.sock")),
            ..Default::default()
        },
    }
}

/// The log's lines without CRI's timestamps.
fn log(spec: &ContainerSpec) -> String {
    std::fs::read_to_string(&spec.log_path)
        .unwrap_or_default()
        .lines()
        .map(|l| l.split_once(' ').map(|x| x.1).unwrap_or(l).to_string() + "\n")
        .collect()
}

async fn wait_for_log(spec: &ContainerSpec, text: &str) {
    for _ in 0..100 {
        if log(spec).contains(text) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{text:?} never logged: {}", log(spec));
}

fn cgroup_dirs(rel: &str) -> Vec<PathBuf> {
    rkube_oci::cgroup::roots()
        .into_iter()
        .map(|r| r.join(rel.trim_start_matches('/')))
        .filter(|p| p.exists())
        .collect()
}

#[tokio::test]
async fn a_container_has_its_own_namespaces_and_ends_with_its_commands_status() {
    if !root() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let s = spec(
        dir.path(),
        "ns",
        "hostname; echo pid=$$; echo procs=$(ls /proc | grep -c '^[0-9]'); echo $GREETING; pwd; exit 7",
        Limits::default(),
    );
    let mut h = start_process(&s).await.unwrap();
    let exit = h.wait().await;
    assert_eq!((exit.code, exit.signal, exit.oom_killed), (7, None, false));
    let out = log(&s);
    assert!(out.contains("stdout F box\n"), "{out}");
    // pid 1 is the init, the command pid 2; /proc holds only the namespace's processes.
    assert!(out.contains("stdout F pid=2\n"), "{out}");
    let procs: u32 = out.split("procs=").nth(1).unwrap().lines().next().unwrap().parse().unwrap();
    assert!(procs <= 5, "{out}"); // init, sh, the subshell, ls, grep
    assert!(out.contains("stdout F hello\n"), "{out}");
    assert!(out.contains(&format!("stdout F {}\n", s.workdir.display())), "{out}");
    no_cgroups_left("ns");
    // The host's hostname is untouched.
    assert_ne!(nix::unistd::gethostname().unwrap().to_string_lossy(), "box");
}

#[tokio::test]
async fn sigterm_reaches_the_command_and_a_signal_death_is_reported_as_such() {
    if !root() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // A command that handles SIGTERM ends as it chooses.
    let s = spec(
        dir.path(),
        "term",
        "trap 'echo got TERM; exit 0' TERM; echo up; while true; do sleep 0.1; done",
        Limits::default(),
    );
    let mut h = start_process(&s).await.unwrap();
    wait_for_log(&s, "stdout F up").await;
    h.killer().unwrap().signal(Signal::SIGTERM);
    let exit = h.wait().await;
    assert_eq!((exit.code, exit.signal), (0, None));
    assert!(log(&s).contains("stdout F got TERM"), "{}", log(&s));
    // One that does not dies of it, and the kubelet sees that signal.
    let s = spec(dir.path(), "plain", "echo up; exec sleep 100", Limits::default());
    let mut h = start_process(&s).await.unwrap();
    wait_for_log(&s, "stdout F up").await;
    h.killer().unwrap().signal(Signal::SIGTERM);
    let exit = h.wait().await;
    assert_eq!((exit.code, exit.signal), (143, Some(15)));
    // SIGKILL takes the whole namespace down, children included.
    let s = spec(dir.path(), "kill", "sleep 100 & echo up; wait", Limits::default());
    let mut h = start_process(&s).await.unwrap();
    wait_for_log(&s, "stdout F up").await;
    h.killer().unwrap().signal(Signal::SIGKILL);
    let exit = tokio::time::timeout(Duration::from_secs(10), h.wait()).await.unwrap();
    assert_eq!((exit.code, exit.signal), (137, Some(9)));
    no_cgroups_left("term");
    no_cgroups_left("plain");
    no_cgroups_left("kill");
}

#[tokio::test]
async fn a_command_entered_into_a_running_container_shares_its_namespaces_and_cgroup() {
    if !root() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let s = spec(dir.path(), "enter", "echo up; exec sleep 100", Limits::default());
    let mut h = start_process(&s).await.unwrap();
    // Right away: once started, the namespaces are complete (as postStart hooks need them).
    let Handle::Process { pid, .. } = &h else { panic!("not a process") };
    let cg = cgroup("enter");
    let out = tokio::process::Command::new(init())
        .args(["enter", &pid.to_string(), &cg, "--", "sh", "-c"])
        .arg("hostname; cat /proc/1/comm; echo $GREETING; pwd; grep memory /proc/self/cgroup; exit 3")
        .output()
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(3), "{text} {}", String::from_utf8_lossy(&out.stderr));
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines[0], "box");
    assert_eq!(lines[1], "rkube-process-i"); // the container's init (comm is cut at 15 bytes)
    assert_eq!(lines[2], "hello");
    assert_eq!(lines[3], s.workdir.display().to_string());
    if rkube_oci::cgroup::version_of(&rkube_oci::cgroup::hierarchies())
        == Some(rkube_oci::cgroup::Version::V1)
    {
        assert!(lines[4].ends_with(&format!(":memory:{cg}")), "{text}");
    }
    h.killer().unwrap().signal(Signal::SIGKILL);
    h.wait().await;
    no_cgroups_left("enter");
}

#[tokio::test]
async fn exceeding_the_memory_limit_is_an_oom_kill_and_the_cgroup_goes_afterwards() {
    if !root() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let limits = Limits {
        memory_bytes: Some(32 << 20),
        cpu_limit_milli: Some(500),
        cpu_request_milli: Some(100),
    };
    let s = spec(dir.path(), "hog", "x=a; while true; do x=$x$x; done", limits);
    let mut h = start_process(&s).await.unwrap();
    let rel = cgroup("hog");
    // The limits are in place while it runs.
    let memory = rkube_oci::cgroup::hierarchies()
        .into_iter()
        .find(|h| h.controllers.as_ref().is_some_and(|c| c.iter().any(|x| x == "memory")));
    if let Some(m) = memory {
        let dir = m.mount_point.join(rel.trim_start_matches('/'));
        let limit = std::fs::read_to_string(dir.join("memory.limit_in_bytes")).unwrap_or_default();
        assert_eq!(limit.trim(), (32u64 << 20).to_string());
    }
    let exit = tokio::time::timeout(Duration::from_secs(60), h.wait()).await.unwrap();
    assert!(exit.oom_killed, "{exit:?}");
    assert_eq!(exit.code, 137);
    no_cgroups_left("hog");
}
