//! Hollow nodes as kubectl users meet them: `rkube agent --simulate 20` registers 20 Ready
//! nodes with their Leases; a Deployment's 40 replicas run across them with addresses of each
//! node's pod CIDR; a run-to-completion pod completes; deleting the Deployment removes its pods.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::{Server, available};

fn lines(s: &str) -> Vec<String> {
    s.lines().map(str::trim).filter(|l| !l.is_empty()).map(str::to_string).collect()
}

#[test]
fn twenty_hollow_nodes_run_a_deployment_and_a_pod_that_completes() {
    if !available("kubectl", &["version", "--client"]) {
        return;
    }
    let mut s = Server::start();
    s.agent("hollow", &["--simulate", "20", "--simulate-complete-after", "2"]);

    let nodes = s.wait("20 Ready hollow nodes", Duration::from_secs(60), || {
        let out = s.ok(&["get", "nodes", "--no-headers"]);
        let ready: Vec<String> = lines(&out)
            .into_iter()
            .filter(|l| l.starts_with("hollow-") && l.split_whitespace().nth(1) == Some("Ready"))
            .collect();
        (ready.len() == 20).then_some(ready)
    });
    let names: HashSet<&str> = nodes.iter().filter_map(|l| l.split_whitespace().next()).collect();
    let want: HashSet<String> = (0..20).map(|i| format!("hollow-{i}")).collect();
    assert_eq!(names, want.iter().map(String::as_str).collect());
    let runtimes = s.ok(&[
        "get",
        "nodes",
        "-l",
        "node.rkube.io/hollow=true",
        "-o",
        "jsonpath={range .items[*]}{.status.nodeInfo.containerRuntimeVersion}{\"\\n\"}{end}",
    ]);
    let runtimes = lines(&runtimes);
    assert_eq!(runtimes.len(), 20);
    assert!(runtimes.iter().all(|r| r.starts_with("simulated://")), "{runtimes:?}");
    let leases = s.ok(&["get", "leases", "-n", "kube-node-lease", "--no-headers"]);
    assert_eq!(lines(&leases).iter().filter(|l| l.starts_with("hollow-")).count(), 20, "{leases}");

    s.ok(&["create", "deployment", "web", "--image=nginx", "--replicas=40"]);
    s.wait("40/40 replicas", Duration::from_secs(60), || {
        let out = s.ok(&["get", "deployment", "web", "--no-headers"]);
        (out.split_whitespace().nth(1) == Some("40/40")).then_some(())
    });
    let pods = s.ok(&[
        "get",
        "pods",
        "-l",
        "app=web",
        "-o",
        "jsonpath={range .items[*]}{.status.phase} {.spec.nodeName} {.status.podIP}{\"\\n\"}{end}",
    ]);
    let pods = lines(&pods);
    assert_eq!(pods.len(), 40, "{pods:?}");
    let mut on_nodes = HashSet::new();
    let mut ips = HashSet::new();
    for p in &pods {
        let f: Vec<&str> = p.split_whitespace().collect();
        assert_eq!(f.len(), 3, "{p}");
        assert_eq!(f[0], "Running", "{p}");
        assert!(f[1].starts_with("hollow-"), "{p}");
        // The address lies in the node's own pod CIDR (hollow-i: 100.64.i.0/24).
        let i: u32 = f[1]["hollow-".len()..].parse().unwrap();
        assert!(f[2].starts_with(&format!("100.64.{i}.")), "{p}");
        on_nodes.insert(f[1].to_string());
        ips.insert(f[2].to_string());
    }
    assert_eq!(ips.len(), 40, "every pod has its own address: {pods:?}");
    assert!(on_nodes.len() >= 10, "the replicas spread across the nodes: {on_nodes:?}");
    let ready = s.ok(&["get", "pods", "-l", "app=web", "--no-headers"]);
    assert!(lines(&ready).iter().all(|l| l.split_whitespace().nth(1) == Some("1/1")), "{ready}");
    // Nothing runs behind a hollow pod: logs are refused with a reason, not a hang.
    let first = s.ok(&["get", "pods", "-l", "app=web", "-o", "jsonpath={.items[0].metadata.name}"]);
    let logs = s.kubectl(&["logs", first.trim()]);
    assert!(!logs.status.success());
    assert!(
        String::from_utf8_lossy(&logs.stderr).contains("does not serve logs"),
        "{}",
        String::from_utf8_lossy(&logs.stderr)
    );

    s.ok(&["run", "once", "--image=busybox", "--restart=Never", "--", "true"]);
    s.wait("the pod to complete", Duration::from_secs(30), || {
        let out = s.ok(&["get", "pod", "once", "--no-headers"]);
        (out.split_whitespace().nth(2) == Some("Completed")).then_some(())
    });
    let phase = s.ok(&["get", "pod", "once", "-o", "jsonpath={.status.phase}"]);
    assert_eq!(phase, "Succeeded");
    let state = s.ok(&[
        "get",
        "pod",
        "once",
        "-o",
        "jsonpath={.status.containerStatuses[0].state.terminated.reason}",
    ]);
    assert_eq!(state, "Completed");

    s.ok(&["delete", "deployment", "web"]);
    s.wait("the web pods to go", Duration::from_secs(60), || {
        let out = s.kubectl(&["get", "pods", "-l", "app=web", "--no-headers"]);
        (out.status.success() && lines(&String::from_utf8_lossy(&out.stdout)).is_empty())
            .then_some(())
    });
    // The nodes are still there and Ready.
    let out = s.ok(&["get", "nodes", "-l", "node.rkube.io/hollow=true", "--no-headers"]);
    assert_eq!(lines(&out).iter().filter(|l| l.contains(" Ready ")).count(), 20, "{out}");
}
