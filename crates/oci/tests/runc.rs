//! Containers through the real runc: a busybox rootfs, a pinned sandbox, the shim, logs, exit
//! codes, OOM, shared namespaces and clean-up. Needs root, runc and busybox (Debian
//! `busybox-static`); skipped visibly without them, except under CI=true where that fails.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use nix::sys::signal::Signal;
use rkube_oci::runc::{
    ContainerConfig, ContainerStatus, Exit, ImageConfig, Resources, Runtime, Sandbox,
    SandboxConfig, Security,
};

const BUSYBOX: &str = "/bin/busybox";
const TEST_TIMEOUT: Duration = Duration::from_secs(90);

/// A runtime under a fresh directory with its own cgroup parent; everything it made is undone
/// on drop, panics included.
struct Fixture {
    dir: PathBuf,
    image: PathBuf,
    rt: Runtime,
}

fn fixture() -> Option<Fixture> {
    let missing = if !nix::unistd::geteuid().is_root() {
        Some("not root")
    } else if rkube_oci::runc::available().is_none() {
        Some("runc is not installed")
    } else if !Path::new(BUSYBOX).is_file() {
        Some("busybox is not installed (Debian busybox-static)")
    } else if std::fs::read(BUSYBOX).is_ok_and(|b| has_interpreter(&b)) {
        Some("/bin/busybox is linked dynamically: install Debian busybox-static")
    } else {
        None
    };
    if let Some(why) = missing {
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!("runc tests cannot run under CI: {why}");
        }
        eprintln!("SKIPPED: runc tests: {why}");
        return None;
    }
    static N: AtomicUsize = AtomicUsize::new(0);
    let tag = format!("rkube-oci-{}-{}", std::process::id(), N.fetch_add(1, Ordering::SeqCst));
    let dir = std::env::temp_dir().join(&tag);
    let image = dir.join("image");
    make_busybox_rootfs(&image);
    let shim = vec![env!("CARGO_BIN_EXE_rkube-runc-shim").into()];
    let rt = Runtime::new(dir.join("root"), shim).unwrap().with_cgroup_parent(tag);
    Some(Fixture { dir, image, rt })
}

/// True when an ELF64 file names a program interpreter (PT_INTERP): it is linked dynamically and
/// would not run alone in a rootfs.
fn has_interpreter(elf: &[u8]) -> bool {
    const PT_INTERP: u32 = 3;
    let num = |at: usize, len: usize| -> Option<u64> {
        let b = elf.get(at..at + len)?;
        Some(b.iter().rev().fold(0u64, |acc, &x| (acc << 8) | u64::from(x))) // little-endian
    };
    let (Some(phoff), Some(phentsize), Some(phnum)) = (num(0x20, 8), num(0x36, 2), num(0x38, 2))
    else {
        return false;
    };
    (0..phnum).any(|i| num((phoff + i * phentsize) as usize, 4) == Some(u64::from(PT_INTERP)))
}

/// An image directory with busybox and one symlink per applet.
fn make_busybox_rootfs(image: &Path) {
    for d in ["bin", "etc", "tmp", "proc", "sys", "dev"] {
        std::fs::create_dir_all(image.join(d)).unwrap();
    }
    std::fs::copy(BUSYBOX, image.join("bin/busybox")).unwrap();
    let list = std::process::Command::new(BUSYBOX).arg("--list").output().unwrap();
    for applet in String::from_utf8(list.stdout).unwrap().lines() {
        if applet != "busybox" {
            std::os::unix::fs::symlink("busybox", image.join("bin").join(applet)).unwrap();
        }
    }
    std::fs::write(
        image.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534::/:/bin/false\n",
    )
    .unwrap();
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let root = self.rt.root().to_path_buf();
        let state = root.join("runc-state");
        if let Ok(rd) = std::fs::read_dir(root.join("containers")) {
            for e in rd.flatten() {
                let _ = std::process::Command::new("runc")
                    .arg("--root")
                    .arg(&state)
                    .args(["delete", "--force"])
                    .arg(e.file_name())
                    .output();
                let _ =
                    nix::mount::umount2(&e.path().join("rootfs"), nix::mount::MntFlags::MNT_DETACH);
            }
        }
        if let Ok(rd) = std::fs::read_dir(root.join("sandboxes")) {
            for e in rd.flatten() {
                for p in ["ns/net", "ns/ipc", "ns/uts", "shm"] {
                    let _ =
                        nix::mount::umount2(&e.path().join(p), nix::mount::MntFlags::MNT_DETACH);
                }
            }
        }
        let parent = self.rt.cgroup_parent().to_string();
        for line in std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default().lines() {
            let Some((pre, post)) = line.split_once(" - ") else { continue };
            if post.starts_with("cgroup") {
                let mp = pre.split_whitespace().nth(4).unwrap_or("/nonexistent");
                rmdir_tree(&Path::new(mp).join(&parent));
            }
        }
        // A shim killed by the delete above may still be writing its exit file: retry briefly.
        for _ in 0..5 {
            if std::fs::remove_dir_all(&self.dir).is_ok() || !self.dir.exists() {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

fn rmdir_tree(p: &Path) {
    if let Ok(rd) = std::fs::read_dir(p) {
        for e in rd.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                rmdir_tree(&e.path());
            }
        }
    }
    let _ = std::fs::remove_dir(p);
}

impl Fixture {
    async fn sandbox(&self, uid: &str, hostname: &str) -> Sandbox {
        self.rt
            .run_sandbox(&SandboxConfig {
                pod_uid: uid.into(),
                hostname: hostname.into(),
                hosts: format!("127.0.0.1\tlocalhost\n10.0.0.5\t{hostname}\n"),
                hostname_file: format!("{hostname}\n"),
                resolv_conf: "nameserver 10.96.0.10\nsearch default.svc.cluster.local\n".into(),
                ..Default::default()
            })
            .await
            .unwrap()
    }

    fn config(&self, id: &str, command: &[&str]) -> ContainerConfig {
        ContainerConfig {
            id: id.into(),
            name: id.into(),
            rootfs_lower: self.image.clone(),
            command: command.iter().map(|s| s.to_string()).collect(),
            log_path: self.dir.join("logs").join(format!("{id}.log")),
            ..Default::default()
        }
    }

    /// Creates, starts and waits for a container; returns its exit and its log.
    async fn run_to_end(&self, sb: &Sandbox, cfg: &ContainerConfig) -> (Exit, String) {
        let c = self.rt.create_container(sb, cfg).await.unwrap();
        self.rt.start_container(&c).await.unwrap();
        let exit = self.rt.wait(&c).await.unwrap();
        let log = std::fs::read_to_string(&cfg.log_path).unwrap_or_default();
        self.rt.remove(&c).await.unwrap();
        (exit, log)
    }
}

fn messages(log: &str, stream: &str) -> Vec<String> {
    log.lines()
        .filter_map(|l| {
            let mut parts = l.splitn(4, ' ');
            let (_ts, s, tag, msg) =
                (parts.next()?, parts.next()?, parts.next()?, parts.next().unwrap_or(""));
            (s == stream && tag == "F").then(|| msg.to_string())
        })
        .collect()
}

async fn bounded<F: std::future::Future>(f: F) -> F::Output {
    tokio::time::timeout(TEST_TIMEOUT, f).await.expect("test took too long")
}

#[tokio::test]
async fn echo_lands_in_the_log_in_cri_format_and_exit_code_3_is_reported() {
    let Some(fx) = fixture() else { return };
    bounded(async {
        let sb = fx.sandbox("pod-echo", "echo-pod").await;
        let cfg = fx.config("echo", &["/bin/sh", "-c", "echo hello; echo oops >&2; exit 3"]);
        let (exit, log) = fx.run_to_end(&sb, &cfg).await;
        assert_eq!(exit.code, 3, "log: {log}");
        assert_eq!(exit.signal, None);
        assert!(!exit.oom_killed);
        assert_eq!(messages(&log, "stdout"), vec!["hello"]);
        assert_eq!(messages(&log, "stderr"), vec!["oops"]);
        let ts = log.split(' ').next().unwrap();
        assert!(ts.parse::<jiff::Timestamp>().is_ok() && ts.ends_with('Z'), "timestamp {ts}");
        fx.rt.remove_sandbox(&sb.pod_uid).await.unwrap();
    })
    .await;
}

#[tokio::test]
async fn image_entrypoint_args_and_env_merge_as_kubernetes_does() {
    let Some(fx) = fixture() else { return };
    bounded(async {
        let sb = fx.sandbox("pod-merge", "merge").await;
        let mut cfg = fx.config("merge", &[]);
        cfg.image = ImageConfig {
            entrypoint: vec!["/bin/sh".into(), "-c".into()],
            cmd: vec!["echo from-image-cmd".into()],
            env: vec!["A=image".into(), "B=image".into()],
            working_dir: "/tmp".into(),
            user: String::new(),
        };
        cfg.args = vec!["echo $A $B $C $HOSTNAME $(pwd) $(id -u)".into()];
        cfg.env = vec![("B".into(), "pod".into()), ("C".into(), "c".into())];
        let (exit, log) = fx.run_to_end(&sb, &cfg).await;
        assert_eq!(exit.code, 0, "log: {log}");
        assert_eq!(messages(&log, "stdout"), vec!["image pod c merge /tmp 0"]);

        // The image's Cmd runs when the pod gives neither command nor args.
        let mut cfg2 = fx.config("merge-cmd", &[]);
        cfg2.image = cfg.image.clone();
        cfg2.security = Security { run_as_user: Some(65534), ..Default::default() };
        cfg2.image.cmd = vec!["echo from-image-cmd; id -u".into()];
        let (exit, log) = fx.run_to_end(&sb, &cfg2).await;
        assert_eq!(exit.code, 0, "log: {log}");
        assert_eq!(messages(&log, "stdout"), vec!["from-image-cmd", "65534"]);
        fx.rt.remove_sandbox(&sb.pod_uid).await.unwrap();
    })
    .await;
}

#[tokio::test]
async fn a_memory_hog_over_its_limit_is_reported_oom_killed() {
    let Some(fx) = fixture() else { return };
    bounded(async {
        let sb = fx.sandbox("pod-oom", "oom").await;
        let mut cfg = fx.config("hog", &["/bin/sh", "-c", "tail /dev/zero"]);
        cfg.resources = Resources { memory_limit_bytes: Some(8 << 20), ..Default::default() };
        let (exit, log) = fx.run_to_end(&sb, &cfg).await;
        assert!(exit.oom_killed, "exit {exit:?}, log: {log}");
        assert_eq!(exit.code, 137, "exit {exit:?}");
        fx.rt.remove_sandbox(&sb.pod_uid).await.unwrap();
    })
    .await;
}

#[tokio::test]
async fn sigterm_ends_a_container_with_143_and_sigkill_with_137() {
    let Some(fx) = fixture() else { return };
    bounded(async {
        let sb = fx.sandbox("pod-kill", "kill").await;
        // PID 1 ignores signals it has no handler for, as in any container: the trap is the handler.
        let cfg = fx.config(
            "term",
            &[
                "/bin/sh",
                "-c",
                "trap 'echo got-term; exit 143' TERM; echo ready; while :; do sleep 0.1; done",
            ],
        );
        let c = fx.rt.create_container(&sb, &cfg).await.unwrap();
        assert_eq!(fx.rt.status(&c).await.unwrap(), ContainerStatus::Created);
        let pid = fx.rt.start_container(&c).await.unwrap();
        assert!(pid > 0);
        assert!(matches!(fx.rt.status(&c).await.unwrap(), ContainerStatus::Running { .. }));
        wait_for_log(&cfg.log_path, "ready").await;
        fx.rt.kill(&c, Signal::SIGTERM).await.unwrap();
        let exit = fx.rt.wait(&c).await.unwrap();
        assert_eq!(exit.code, 143);
        assert!(std::fs::read_to_string(&cfg.log_path).unwrap().contains("got-term"));
        // Killing an ended container is not an error (stops are idempotent).
        fx.rt.kill(&c, Signal::SIGTERM).await.unwrap();
        fx.rt.remove(&c).await.unwrap();
        fx.rt.remove(&c).await.unwrap();

        let cfg = fx.config("kill9", &["/bin/sleep", "300"]);
        let c = fx.rt.create_container(&sb, &cfg).await.unwrap();
        fx.rt.start_container(&c).await.unwrap();
        fx.rt.kill(&c, Signal::SIGKILL).await.unwrap();
        let exit = fx.rt.wait(&c).await.unwrap();
        assert_eq!((exit.code, exit.signal, exit.oom_killed), (137, Some(9), false));
        fx.rt.remove(&c).await.unwrap();
        fx.rt.remove_sandbox(&sb.pod_uid).await.unwrap();
    })
    .await;
}

async fn wait_for_log(path: &Path, needle: &str) {
    for _ in 0..100 {
        if std::fs::read_to_string(path).unwrap_or_default().contains(needle) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{needle:?} never appeared in {}", path.display());
}

#[tokio::test]
async fn two_containers_of_a_pod_share_loopback_and_the_pod_hostname() {
    let Some(fx) = fixture() else { return };
    bounded(async {
        let sb = fx.sandbox("pod-net", "web-0").await;
        assert!(sb.netns_path.is_some());
        let server = fx.config("server", &["/bin/sh", "-c", "hostname; cat /etc/hostname; sleep 4 | nc -l -p 7000"]);
        let client = fx.config(
            "client",
            &["/bin/sh", "-c", "for i in $(seq 1 30); do echo ping-over-lo | nc 127.0.0.1 7000 && exit 0; sleep 0.2; done; exit 1"],
        );
        let s = fx.rt.create_container(&sb, &server).await.unwrap();
        let c = fx.rt.create_container(&sb, &client).await.unwrap();
        fx.rt.start_container(&s).await.unwrap();
        fx.rt.start_container(&c).await.unwrap();
        let client_exit = fx.rt.wait(&c).await.unwrap();
        let server_exit = fx.rt.wait(&s).await.unwrap();
        let log = std::fs::read_to_string(&server.log_path).unwrap();
        assert_eq!(client_exit.code, 0, "client log: {}", std::fs::read_to_string(&client.log_path).unwrap());
        assert_eq!(server_exit.code, 0, "server log: {log}");
        assert_eq!(messages(&log, "stdout"), vec!["web-0", "web-0", "ping-over-lo"]);
        fx.rt.remove(&s).await.unwrap();
        fx.rt.remove(&c).await.unwrap();
        fx.rt.stop_sandbox(&sb.pod_uid).await.unwrap();
        fx.rt.stop_sandbox(&sb.pod_uid).await.unwrap();
        fx.rt.remove_sandbox(&sb.pod_uid).await.unwrap();
        fx.rt.remove_sandbox(&sb.pod_uid).await.unwrap();
        fx.rt.stop_sandbox(&sb.pod_uid).await.unwrap();
    })
    .await;
}

#[tokio::test]
async fn a_read_only_root_filesystem_refuses_writes_but_volumes_stay_writable() {
    let Some(fx) = fixture() else { return };
    bounded(async {
        let sb = fx.sandbox("pod-ro", "ro").await;
        let vol = fx.dir.join("volume");
        std::fs::create_dir_all(&vol).unwrap();
        let mut cfg = fx.config(
            "ro",
            &["/bin/sh", "-c", "if touch /probe; then exit 0; fi; echo vol-ok > /data/file && echo bye > /dev/termination-log && exit 42"],
        );
        cfg.security.read_only_root_fs = true;
        cfg.mounts = vec![rkube_oci::runc::Mount { host: vol.clone(), container: "/data".into(), read_only: false }];
        let c = fx.rt.create_container(&sb, &cfg).await.unwrap();
        fx.rt.start_container(&c).await.unwrap();
        let exit = fx.rt.wait(&c).await.unwrap();
        let log = std::fs::read_to_string(&cfg.log_path).unwrap();
        assert_eq!(exit.code, 42, "log: {log}");
        assert!(log.contains("Read-only file system"), "log: {log}");
        assert_eq!(std::fs::read_to_string(vol.join("file")).unwrap(), "vol-ok\n");
        assert_eq!(std::fs::read_to_string(c.termination_log_path()).unwrap(), "bye\n");
        fx.rt.remove(&c).await.unwrap();
        fx.rt.remove_sandbox(&sb.pod_uid).await.unwrap();
    })
    .await;
}

#[tokio::test]
async fn exec_runs_inside_and_a_new_runtime_finds_the_running_container_again() {
    let Some(fx) = fixture() else { return };
    bounded(async {
        let sb = fx.sandbox("pod-exec", "exec-pod").await;
        let cfg = fx.config("sleeper", &["/bin/sleep", "300"]);
        let c = fx.rt.create_container(&sb, &cfg).await.unwrap();
        fx.rt.start_container(&c).await.unwrap();

        let exec = fx
            .rt
            .exec(
                &c,
                &["/bin/sh".into(), "-c".into(), "cat /etc/hostname; echo $HOSTNAME".into()],
                false,
            )
            .unwrap();
        assert!(exec.terminal.is_none());
        let out = exec.child.wait_with_output().await.unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        assert_eq!(String::from_utf8_lossy(&out.stdout), "exec-pod\nexec-pod\n");

        let mut exec = fx
            .rt
            .exec(
                &c,
                &[
                    "/bin/sh".into(),
                    "-c".into(),
                    "test -t 0 && test -t 1 && echo tty-inside; exit 5".into(),
                ],
                true,
            )
            .unwrap();
        let mut master = exec.terminal.take().expect("a tty exec has a terminal");
        let output = tokio::task::spawn_blocking(move || {
            use std::io::Read;
            let mut out = Vec::new();
            let mut buf = [0u8; 4096];
            // The master reads EIO once runc, the last holder of the slave, has exited.
            while let Ok(n @ 1..) = master.read(&mut buf) {
                out.extend_from_slice(&buf[..n]);
            }
            String::from_utf8_lossy(&out).to_string()
        })
        .await
        .unwrap();
        let status = exec.child.wait().await.unwrap();
        assert_eq!(status.code(), Some(5), "output: {output}");
        assert!(output.contains("tty-inside"), "output: {output:?}");

        // As after a kubelet restart: a fresh runtime over the same root.
        let again = Runtime::new(fx.rt.root(), vec![env!("CARGO_BIN_EXE_rkube-runc-shim").into()])
            .unwrap()
            .with_cgroup_parent(fx.rt.cgroup_parent());
        let listed = again.list().await.unwrap();
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].container, c);
        assert!(matches!(listed[0].status, ContainerStatus::Running { pid } if pid > 0));
        let started: jiff::Timestamp =
            listed[0].started_at.as_deref().expect("startedAt recorded").parse().unwrap();
        assert!(started <= jiff::Timestamp::now());
        assert_eq!(again.list_sandboxes().unwrap(), vec![sb.clone()]);
        // Creating the same sandbox again is a no-op that returns it.
        assert_eq!(fx.sandbox("pod-exec", "exec-pod").await, sb);

        again.kill(&c, Signal::SIGKILL).await.unwrap();
        let exit = again.wait(&c).await.unwrap();
        assert_eq!(exit.code, 137);
        assert!(matches!(again.list().await.unwrap()[0].status, ContainerStatus::Exited(_)));
        again.remove(&c).await.unwrap();
        again.remove_sandbox(&sb.pod_uid).await.unwrap();
    })
    .await;
}

#[tokio::test]
async fn removing_everything_leaves_no_mounts_runc_state_or_cgroups() {
    let Some(fx) = fixture() else { return };
    bounded(async {
        let sb = fx.sandbox("pod-clean", "clean").await;
        let cfg = fx.config("c1", &["/bin/sh", "-c", "exit 0"]);
        let c = fx.rt.create_container(&sb, &cfg).await.unwrap();
        let root = fx.rt.root().to_string_lossy().to_string();
        let mounts = || {
            std::fs::read_to_string("/proc/self/mountinfo")
                .unwrap()
                .lines()
                .filter(|l| l.contains(&root))
                .count()
        };
        // ns/net, ns/ipc, ns/uts, shm and the rootfs overlay.
        assert_eq!(mounts(), 5);
        fx.rt.start_container(&c).await.unwrap();
        fx.rt.wait(&c).await.unwrap();
        fx.rt.remove(&c).await.unwrap();
        fx.rt.remove_sandbox(&sb.pod_uid).await.unwrap();
        assert_eq!(mounts(), 0);
        let state = std::process::Command::new("runc")
            .arg("--root")
            .arg(fx.rt.root().join("runc-state"))
            .args(["list", "-q"])
            .output()
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&state.stdout).trim(), "");
        assert!(fx.rt.list().await.unwrap().is_empty());
        assert!(fx.rt.list_sandboxes().unwrap().is_empty());
        assert!(
            !Path::new("/sys/fs/cgroup/memory")
                .join(fx.rt.cgroup_parent())
                .join("podpod-clean")
                .exists()
        );
    })
    .await;
}

#[tokio::test]
async fn a_tty_container_sees_a_terminal_and_its_output_lands_on_stdout() {
    let Some(fx) = fixture() else { return };
    bounded(async {
        let sb = fx.sandbox("pod-tty", "tty").await;
        let mut cfg = fx.config(
            "tty",
            &["/bin/sh", "-c", "test -t 1 && echo is-a-tty; echo to-stderr >&2; echo TERM=$TERM"],
        );
        cfg.tty = true;
        let (exit, log) = fx.run_to_end(&sb, &cfg).await;
        assert_eq!(exit.code, 0, "log: {log}");
        assert_eq!(messages(&log, "stdout"), vec!["is-a-tty", "to-stderr", "TERM=xterm"]);
        fx.rt.remove_sandbox(&sb.pod_uid).await.unwrap();
    })
    .await;
}

#[tokio::test]
async fn a_host_network_pod_keeps_the_node_network_and_hostname() {
    let Some(fx) = fixture() else { return };
    bounded(async {
        let sb = fx
            .rt
            .run_sandbox(&SandboxConfig {
                pod_uid: "pod-hostnet".into(),
                hostname: "ignored".into(),
                host_network: true,
                ..Default::default()
            })
            .await
            .unwrap();
        assert_eq!(sb.netns_path, None);
        assert_eq!(sb.uts_path, None);
        assert!(sb.ipc_path.is_some());
        let cfg = fx.config("hostnet", &["/bin/sh", "-c", "hostname; readlink /proc/self/ns/net"]);
        let (exit, log) = fx.run_to_end(&sb, &cfg).await;
        assert_eq!(exit.code, 0, "log: {log}");
        let host = nix::unistd::gethostname().unwrap().to_string_lossy().to_string();
        let host_net =
            std::fs::read_link("/proc/self/ns/net").unwrap().to_string_lossy().to_string();
        assert_eq!(messages(&log, "stdout"), vec![host, host_net]);
        fx.rt.remove_sandbox(&sb.pod_uid).await.unwrap();
    })
    .await;
}

#[tokio::test]
async fn a_shim_that_dies_loses_the_exit_and_wait_says_so() {
    let Some(fx) = fixture() else { return };
    bounded(async {
        let sb = fx.sandbox("pod-lost", "lost").await;
        let cfg = fx.config("lost", &["/bin/sleep", "300"]);
        let c = fx.rt.create_container(&sb, &cfg).await.unwrap();
        fx.rt.start_container(&c).await.unwrap();
        let shim: i32 =
            std::fs::read_to_string(c.dir.join("shim.pid")).unwrap().trim().parse().unwrap();
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(shim), Signal::SIGKILL).unwrap();
        let err = fx.rt.wait(&c).await.unwrap_err();
        assert!(matches!(err, rkube_oci::runc::Error::ExitLost(_)), "{err}");
        assert_eq!(fx.rt.status(&c).await.unwrap(), ContainerStatus::Unknown);
        // The container itself still runs: remove must still kill and delete it.
        fx.rt.remove(&c).await.unwrap();
        fx.rt.remove_sandbox(&sb.pod_uid).await.unwrap();
        assert!(fx.rt.list().await.unwrap().is_empty());
    })
    .await;
}

#[tokio::test]
async fn cpu_memory_and_pids_limits_reach_the_container_cgroup() {
    let Some(fx) = fixture() else { return };
    bounded(async {
        let sb = fx.sandbox("pod-res", "res").await;
        let mut cfg = fx.config("res", &["/bin/sleep", "300"]);
        cfg.resources = Resources {
            cpu_request_milli: Some(250),
            cpu_limit_milli: Some(500),
            memory_limit_bytes: Some(64 << 20),
            pids_limit: Some(50),
        };
        let c = fx.rt.create_container(&sb, &cfg).await.unwrap();
        fx.rt.start_container(&c).await.unwrap();
        let rel = c.cgroups_path.trim_start_matches('/');
        let read = |file: String| {
            std::fs::read_to_string(&file)
                .unwrap_or_else(|e| panic!("{file}: {e}"))
                .trim()
                .to_string()
        };
        if Path::new("/sys/fs/cgroup/cpu/cpu.shares").exists() {
            assert_eq!(read(format!("/sys/fs/cgroup/cpu/{rel}/cpu.shares")), "256");
            assert_eq!(read(format!("/sys/fs/cgroup/cpu/{rel}/cpu.cfs_quota_us")), "50000");
            assert_eq!(read(format!("/sys/fs/cgroup/cpu/{rel}/cpu.cfs_period_us")), "100000");
            assert_eq!(
                read(format!("/sys/fs/cgroup/memory/{rel}/memory.limit_in_bytes")),
                (64u64 << 20).to_string()
            );
            assert_eq!(read(format!("/sys/fs/cgroup/pids/{rel}/pids.max")), "50");
        } else {
            assert_eq!(read(format!("/sys/fs/cgroup/{rel}/cpu.max")), "50000 100000");
            assert_eq!(read(format!("/sys/fs/cgroup/{rel}/memory.max")), (64u64 << 20).to_string());
            assert_eq!(read(format!("/sys/fs/cgroup/{rel}/pids.max")), "50");
        }
        fx.rt.remove(&c).await.unwrap();
        fx.rt.remove_sandbox(&sb.pod_uid).await.unwrap();
    })
    .await;
}

#[tokio::test]
async fn an_image_path_overlay_cannot_take_is_copied_and_still_runs() {
    let Some(fx) = fixture() else { return };
    bounded(async {
        // Overlay options are comma-separated: a lower dir with a comma must fall back to a copy.
        let odd = fx.dir.join("image,v1");
        std::fs::rename(&fx.image, &odd).unwrap();
        let sb = fx.sandbox("pod-copy", "copy").await;
        let mut cfg = fx
            .config("copy", &["/bin/sh", "-c", "echo copied > /new && cat /new && ls -l /bin/sh"]);
        cfg.rootfs_lower = odd.clone();
        let c = fx.rt.create_container(&sb, &cfg).await.unwrap();
        assert_eq!(c.rootfs, rkube_oci::runc::RootfsKind::Copy);
        fx.rt.start_container(&c).await.unwrap();
        let exit = fx.rt.wait(&c).await.unwrap();
        let log = std::fs::read_to_string(&cfg.log_path).unwrap();
        assert_eq!(exit.code, 0, "log: {log}");
        let out = messages(&log, "stdout");
        assert_eq!(out[0], "copied");
        assert!(out[1].ends_with("/bin/sh -> busybox"), "symlinks survive the copy: {out:?}");
        // The image itself is untouched.
        assert!(!odd.join("new").exists());
        fx.rt.remove(&c).await.unwrap();
        fx.rt.remove_sandbox(&sb.pod_uid).await.unwrap();
    })
    .await;
}

#[test]
fn a_test_that_panics_mid_way_still_leaves_nothing_behind() {
    if fixture().is_none() {
        return;
    }
    let (tx, rx) = std::sync::mpsc::channel();
    let panicked = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let fx = fixture().unwrap();
            tx.send((fx.dir.clone(), fx.rt.cgroup_parent().to_string())).unwrap();
            let sb = fx.sandbox("pod-panic", "panic").await;
            let c = fx
                .rt
                .create_container(&sb, &fx.config("left", &["/bin/sleep", "300"]))
                .await
                .unwrap();
            fx.rt.start_container(&c).await.unwrap();
            panic!("on purpose, with a running container, a sandbox and a rootfs mounted");
        })
    })
    .join();
    assert!(panicked.is_err());
    let (dir, cgroup_parent) = rx.recv().unwrap();
    let dir_text = dir.to_string_lossy().to_string();
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(!mountinfo.contains(&dir_text), "mounts left: {mountinfo}");
    assert!(!dir.exists(), "{} left", dir.display());
    assert!(!Path::new("/sys/fs/cgroup/memory").join(&cgroup_parent).exists());
    // No shim (whose argument is the container directory) survives; it may take a moment to
    // notice its container died.
    let shims = || {
        std::fs::read_dir("/proc")
            .unwrap()
            .flatten()
            .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
            .filter(|cmdline| String::from_utf8_lossy(cmdline).contains(&dir_text))
            .count()
    };
    for _ in 0..50 {
        if shims() == 0 {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(shims(), 0, "processes left");
}
