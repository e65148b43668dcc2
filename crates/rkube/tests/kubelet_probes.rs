//! Probes through the real kubectl: a pod is Ready only once its readiness probe passes, and a
//! container whose liveness probe fails is killed and restarted with the upstream events.

mod common;

use std::time::Duration;

use common::{Server, available};

const POD: &str = r#"apiVersion: v1
kind: Pod
metadata:
  name: probed
spec:
  terminationGracePeriodSeconds: 1
  containers:
  - name: app
    image: busybox
    command: ["sh", "-c", "sleep 3600"]
    readinessProbe:
      exec: {command: ["test", "-f", "ready"]}
      periodSeconds: 1
    livenessProbe:
      exec: {command: ["test", "!", "-f", "broken"]}
      periodSeconds: 1
      failureThreshold: 2
"#;

#[test]
fn readiness_gates_ready_and_liveness_restarts() {
    if !available("kubectl", &["version", "--client"]) {
        return;
    }
    let mut s = Server::start();
    s.agent("node-1", &[]);
    s.ok_stdin(&["apply", "-f", "-"], POD);
    s.wait("the pod Running but not Ready", Duration::from_secs(30), || {
        let out = s.ok(&["get", "pod", "probed", "--no-headers"]);
        (out.contains("Running") && out.contains("0/1")).then_some(())
    });
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        s.ok(&["get", "pod", "probed", "--no-headers"]).contains("0/1"),
        "Ready without passing its probe"
    );
    s.ok(&["exec", "probed", "--", "touch", "ready"]);
    s.wait("the pod Ready", Duration::from_secs(15), || {
        s.ok(&["get", "pod", "probed", "--no-headers"]).contains("1/1").then_some(())
    });
    s.ok(&["exec", "probed", "--", "touch", "broken"]);
    s.wait("a liveness restart", Duration::from_secs(20), || {
        let n = s.ok(&[
            "get",
            "pod",
            "probed",
            "-o",
            "jsonpath={.status.containerStatuses[0].restartCount}",
        ]);
        (n.trim() != "0").then_some(())
    });
    let described = s.ok(&["describe", "pod", "probed"]);
    assert!(described.contains("Liveness probe failed"), "{described}");
    assert!(described.contains("failed liveness probe, will be restarted"), "{described}");
}
