//! `kubectl attach` and `kubectl run -i` through the real kubectl against `rkube server` and an
//! agent with the process runtime: output from the moment of attaching (not the log replayed),
//! stdin to a container started with `stdin: true` (closed after the session with
//! `stdinOnce`), a terminal for a `tty: true` container, and kubectl's refusal for a completed
//! pod. (The oci runtime's attach is in oci_e2e.rs.)

mod common;

use std::time::Duration;

use common::{Server, available};

const PODS: &str = r#"apiVersion: v1
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
---
apiVersion: v1
kind: Pod
metadata: {name: term}
spec:
  restartPolicy: Never
  terminationGracePeriodSeconds: 1
  containers:
  - name: main
    image: busybox
    command: ["sh", "-c", "read x; echo \"got $x on $(tty)\""]
    stdin: true
    stdinOnce: true
    tty: true
"#;

fn running(s: &Server, pod: &str) {
    s.wait(&format!("{pod} Running"), Duration::from_secs(60), || {
        let out = s.kubectl(&["get", "pod", pod, "-o", "jsonpath={.status.phase}"]);
        (String::from_utf8_lossy(&out.stdout) == "Running").then_some(())
    });
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn kubectl_attach_streams_output_and_passes_stdin() {
    if !available("kubectl", &["version", "--client"]) {
        return;
    }
    let node = format!("attach-{}", std::process::id());
    let mut s = Server::start();
    s.agent(&node, &[]);
    s.ok_stdin(&["apply", "-f", "-"], PODS);
    for pod in ["ticker", "echo", "term"] {
        running(&s, pod);
    }

    // Output from the moment of attaching: let the ticker get ahead first, then the first line
    // attach prints must be one written after it attached, not the log from the start.
    s.wait("ticker past tick-5", Duration::from_secs(30), || {
        s.ok(&["logs", "ticker"]).contains("tick-5").then_some(())
    });
    let before = s.ok(&["logs", "ticker"]).lines().count();
    let (seen, status) =
        s.kubectl_first_lines("kubectl", &["attach", "ticker"], 3, Duration::from_secs(20));
    assert_eq!(seen.len(), 3, "attach printed {seen:?} (exit {status})");
    let first: usize = seen[0].strip_prefix("tick-").and_then(|n| n.parse().ok()).unwrap();
    assert!(first + 1 >= before, "attach replayed old output: first {first}, log had {before}");
    for (i, l) in seen.iter().enumerate() {
        assert_eq!(l, &format!("tick-{}", first + i), "{seen:?}");
    }

    // attach -i to a `cat` with stdin: what is sent comes back; at the end of the input the
    // container's stdin closes (stdinOnce), cat ends, and so does the session.
    let out = s.kubectl_with("kubectl", &["attach", "-i", "echo"], Some("hello attach\nline 2\n"));
    assert!(out.status.success(), "attach -i: {}{}", text(&out.stderr), text(&out.stdout));
    assert_eq!(text(&out.stdout), "hello attach\nline 2\n");
    assert!(
        text(&out.stderr).contains("If you don't see a command prompt, try pressing enter."),
        "{}",
        text(&out.stderr)
    );
    s.wait("echo Succeeded", Duration::from_secs(30), || {
        let out = s.kubectl(&["get", "pod", "echo", "-o", "jsonpath={.status.phase}"]);
        (text(&out.stdout) == "Succeeded").then_some(())
    });
    // A completed pod: kubectl refuses, as upstream.
    let done = s.kubectl(&["attach", "echo"]);
    assert!(!done.status.success());
    assert_eq!(
        text(&done.stderr).trim(),
        "error: cannot attach a container in a completed pod; current phase is Succeeded"
    );

    // A tty container: kubectl attaches with a terminal whatever it asked; input is typed on
    // the container's terminal.
    let out = s.kubectl_with("kubectl", &["attach", "-i", "term"], Some("hi\n"));
    let printed = text(&out.stdout);
    assert!(printed.contains("got hi on /dev/pts/"), "{printed}{}", text(&out.stderr));

    // kubectl run -i --rm: create, attach, pass stdin, delete.
    let out = s.kubectl_with(
        "kubectl",
        &[
            "run",
            "reader",
            "-i",
            "--rm",
            "--restart=Never",
            "--image=busybox",
            "--",
            "sh",
            "-c",
            "read x; echo got $x",
        ],
        Some("from run\n"),
    );
    assert!(out.status.success(), "run -i: {}{}", text(&out.stderr), text(&out.stdout));
    let printed = text(&out.stdout);
    assert!(printed.contains("got from run"), "{printed}");
    assert!(printed.contains("pod \"reader\" deleted"), "{printed}");
    let gone = s.kubectl(&["get", "pod", "reader"]);
    assert!(!gone.status.success());
}
