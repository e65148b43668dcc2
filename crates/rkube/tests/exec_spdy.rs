//! `kubectl exec` and `kubectl attach` over SPDY/3.1, the only protocol kubectl 1.27 speaks for
//! them (later kubectl uses WebSockets, covered in apiserver_kubectl.rs and attach.rs): output,
//! the command's exit code, stdin and its end, a terminal with its size, attach to a running
//! container's output and stdin, and the error for a container the pod does not have. Process
//! runtime; the request goes through the API server to the kubelet as the real kubectl sends it.

mod common;

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{Server, available, versioned_kubectl};

const PODS: &str = r#"apiVersion: v1
kind: Pod
metadata: {name: shell}
spec:
  terminationGracePeriodSeconds: 1
  containers:
  - name: main
    image: busybox
    command: ["sleep", "3600"]
---
apiVersion: v1
kind: Pod
metadata: {name: ticker}
spec:
  terminationGracePeriodSeconds: 1
  containers:
  - name: main
    image: busybox
    command: ["sh", "-c", "i=0; while true; do echo tick-$i; i=$((i+1)); sleep 0.2; done"]
---
apiVersion: v1
kind: Pod
metadata: {name: echo}
spec:
  restartPolicy: Never
  terminationGracePeriodSeconds: 1
  containers:
  - name: main
    image: busybox
    command: ["cat"]
    stdin: true
    stdinOnce: true
"#;

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn kubectl_127() -> Option<PathBuf> {
    let k = versioned_kubectl(27);
    if k.is_none() {
        assert!(std::env::var("CI").as_deref() != Ok("true"), "kubectl.1.27 is required");
        eprintln!("SKIPPED: kubectl.1.27 is not available");
    }
    k
}

#[test]
fn kubectl_127_exec_and_attach_over_spdy() {
    if !available("kubectl", &["version", "--client"]) || !available("busybox", &["true"]) {
        return;
    }
    let Some(old) = kubectl_127() else { return };
    let old_s = old.to_str().unwrap();
    let mut s = Server::start();
    s.agent(&format!("spdy-{}", std::process::id()), &[]);
    s.ok_stdin(&["apply", "-f", "-"], PODS);
    for pod in ["shell", "ticker", "echo"] {
        s.wait(&format!("{pod} Running"), Duration::from_secs(60), || {
            let out = s.kubectl(&["get", "pod", pod, "-o", "jsonpath={.status.phase}"]);
            (text(&out.stdout) == "Running").then_some(())
        });
    }
    let k = |args: &[&str], stdin: Option<&str>| s.kubectl_with(old_s, args, stdin);

    // Output, and the exit code of a command that fails (stdout and stderr apart).
    let out = k(&["exec", "shell", "--", "echo", "hi"], None);
    assert!(out.status.success(), "exec: {}{}", text(&out.stderr), text(&out.stdout));
    assert_eq!(text(&out.stdout), "hi\n");
    let out = k(&["exec", "shell", "--", "sh", "-c", "echo out; echo err >&2; exit 3"], None);
    assert_eq!(out.status.code(), Some(3), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "out\n");
    assert!(text(&out.stderr).starts_with("err\n"), "{}", text(&out.stderr));
    let out = k(&["exec", "shell", "--", "sh", "-c", "exit 0"], None);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));

    // Stdin: cat echoes it and ends when it ends. A bigger input crosses many frames.
    let out = k(&["exec", "-i", "shell", "--", "cat"], Some("line 1\nline 2\n"));
    assert!(out.status.success(), "exec -i: {}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "line 1\nline 2\n");
    let big: String = (0..20_000).map(|i| format!("{i}\n")).collect();
    let out = k(&["exec", "-i", "shell", "--", "wc", "-l"], Some(&big));
    assert!(out.status.success(), "exec -i wc: {}", text(&out.stderr));
    assert_eq!(text(&out.stdout).trim(), "20000");

    // -it under `script` (which gives kubectl a terminal of 45 rows and 123 columns): the
    // command runs on a terminal of that size (the resize stream) and its exit code comes back.
    if available("script", &["--version"]) {
        let cmdline = format!(
            "stty rows 45 cols 123; {old_s} --kubeconfig {} --cache-dir {} exec -it shell -- sh -c 'tty; stty size; exit 5'",
            s.kubeconfig.display(),
            s.path().join("kcache-tty").display()
        );
        let tty = Command::new("script")
            .args(["-qec", &cmdline, "/dev/null"])
            .env("HOME", s.path())
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let printed = text(&tty.stdout);
        assert!(printed.contains("/dev/pts/"), "{printed}{}", text(&tty.stderr));
        assert!(printed.contains("45 123"), "{printed}");
        assert_eq!(tty.status.code(), Some(5), "{printed}");
    } else {
        assert!(std::env::var("CI").as_deref() != Ok("true"), "script is required");
        eprintln!("SKIPPED: exec -it (no `script`)");
    }

    // attach: the running container's output.
    let (seen, _) = s.kubectl_first_lines(
        &old.to_string_lossy(),
        &["attach", "ticker"],
        3,
        Duration::from_secs(20),
    );
    assert_eq!(seen.len(), 3, "attach printed {seen:?}");
    let first: usize = seen[0].strip_prefix("tick-").and_then(|n| n.parse().ok()).unwrap();
    for (i, l) in seen.iter().enumerate() {
        assert_eq!(l, &format!("tick-{}", first + i), "{seen:?}");
    }
    // attach -i: stdin reaches the container, whose end (stdinOnce) ends cat and the session.
    let out = k(&["attach", "-i", "echo"], Some("hello attach\n"));
    assert!(out.status.success(), "attach -i: {}{}", text(&out.stderr), text(&out.stdout));
    assert_eq!(text(&out.stdout), "hello attach\n");

    // A container the pod does not have: the API server's error, as upstream words it, with
    // kubectl 1.27 (SPDY) and the current kubectl (WebSocket) alike.
    for binary in [old_s, "kubectl"] {
        let out = s.kubectl_with(binary, &["exec", "shell", "-c", "nope", "--", "true"], None);
        assert!(!out.status.success(), "{binary}");
        assert_eq!(
            text(&out.stderr).trim(),
            "Error from server (BadRequest): container nope is not valid for pod shell",
            "{binary}"
        );
    }
}
