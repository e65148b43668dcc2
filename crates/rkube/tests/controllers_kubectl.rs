//! The controller manager as kubectl users meet it: cascading deletes (foreground, orphan),
//! a rollout that misses its progress deadline, default ServiceAccounts and namespace deletion.
//! No agent runs, so pods stay Pending, are never ready, and are deleted at once.

mod common;

use std::time::Duration;

use common::{Server, available};

fn names(s: &Server, args: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = s.ok(args).lines().map(str::to_string).collect();
    v.sort();
    v
}

#[test]
fn kubectl_delete_cascade_foreground_returns_once_the_dependents_are_gone() {
    if !available("kubectl", &["version", "--client"]) {
        return;
    }
    let s = Server::start();
    s.ok(&["create", "deployment", "web", "--image=nginx", "--replicas=2"]);
    s.wait("two pods", Duration::from_secs(20), || {
        (names(&s, &["get", "pods", "-l", "app=web", "-o", "name"]).len() == 2).then_some(())
    });
    let out = s.ok(&["delete", "deployment", "web", "--cascade=foreground"]);
    assert_eq!(out.trim(), "deployment.apps \"web\" deleted");
    // kubectl waited for the owner, and the owner waited for its dependents.
    assert!(names(&s, &["get", "replicasets,pods", "-l", "app=web", "-o", "name"]).is_empty());
    assert!(names(&s, &["get", "deployments", "-o", "name"]).is_empty());
}

#[test]
fn kubectl_delete_cascade_orphan_leaves_the_dependents_without_owner() {
    if !available("kubectl", &["version", "--client"]) {
        return;
    }
    let s = Server::start();
    s.ok(&["create", "deployment", "web", "--image=nginx", "--replicas=2"]);
    s.wait("two pods", Duration::from_secs(20), || {
        (names(&s, &["get", "pods", "-l", "app=web", "-o", "name"]).len() == 2).then_some(())
    });
    s.ok(&["delete", "deployment", "web", "--cascade=orphan"]);
    s.wait("the ReplicaSet to lose its owner", Duration::from_secs(10), || {
        let owners = s.ok(&[
            "get",
            "replicasets",
            "-l",
            "app=web",
            "-o",
            "jsonpath={.items[*].metadata.ownerReferences}",
        ]);
        owners.trim().is_empty().then_some(())
    });
    assert_eq!(names(&s, &["get", "replicasets", "-l", "app=web", "-o", "name"]).len(), 1);
    assert_eq!(names(&s, &["get", "pods", "-l", "app=web", "-o", "name"]).len(), 2);
    // And background, the default, still takes everything.
    let rs = names(&s, &["get", "replicasets", "-l", "app=web", "-o", "name"]);
    s.ok(&["delete", &rs[0]]);
    s.wait("the pods to go", Duration::from_secs(10), || {
        names(&s, &["get", "pods", "-l", "app=web", "-o", "name"]).is_empty().then_some(())
    });
}

#[test]
fn kubectl_rollout_status_fails_when_the_progress_deadline_is_exceeded() {
    if !available("kubectl", &["version", "--client"]) {
        return;
    }
    let s = Server::start();
    s.ok_stdin(
        &["apply", "-f", "-"],
        "apiVersion: apps/v1
kind: Deployment
metadata:
  name: stuck
spec:
  replicas: 2
  progressDeadlineSeconds: 2
  selector:
    matchLabels: {app: stuck}
  template:
    metadata:
      labels: {app: stuck}
    spec:
      containers:
      - name: c
        image: nginx
",
    );
    let out = s.kubectl(&["rollout", "status", "deployment/stuck", "--timeout=60s"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("error: deployment \"stuck\" exceeded its progress deadline"),
        "{stderr}"
    );
    let reason = s.ok(&[
        "get",
        "deployment",
        "stuck",
        "-o",
        "jsonpath={.status.conditions[?(@.type==\"Progressing\")].reason}",
    ]);
    assert_eq!(reason.trim(), "ProgressDeadlineExceeded");
}

#[test]
fn kubectl_delete_namespace_takes_everything_in_it() {
    if !available("kubectl", &["version", "--client"]) {
        return;
    }
    let s = Server::start();
    for ns in ["default", "kube-system"] {
        s.wait(&format!("the default ServiceAccount of {ns}"), Duration::from_secs(20), || {
            s.kubectl(&["get", "serviceaccount", "default", "-n", ns])
                .status
                .success()
                .then_some(())
        });
    }
    s.ok(&["create", "namespace", "shop"]);
    s.wait("the default ServiceAccount of shop", Duration::from_secs(20), || {
        s.kubectl(&["get", "serviceaccount", "default", "-n", "shop"])
            .status
            .success()
            .then_some(())
    });
    s.ok(&["create", "deployment", "web", "--image=nginx", "--replicas=2", "-n", "shop"]);
    s.ok(&["create", "service", "clusterip", "web", "--tcp=80:80", "-n", "shop"]);
    // Someone else's finalizer keeps the namespace Terminating until it is released.
    s.ok_stdin(
        &["apply", "-f", "-"],
        "apiVersion: v1
kind: ConfigMap
metadata:
  name: settings
  namespace: shop
  finalizers: [example.com/hold]
data:
  color: blue
",
    );
    s.wait("two pods", Duration::from_secs(20), || {
        (names(&s, &["get", "pods", "-n", "shop", "-o", "name"]).len() == 2).then_some(())
    });
    s.ok(&["delete", "namespace", "shop", "--wait=false"]);
    assert_eq!(
        s.ok(&["get", "namespace", "shop", "-o", "jsonpath={.status.phase}"]),
        "Terminating"
    );
    s.wait("the content to go", Duration::from_secs(20), || {
        let left = names(
            &s,
            &[
                "get",
                "deployments,replicasets,pods,services,serviceaccounts",
                "-n",
                "shop",
                "-o",
                "name",
            ],
        );
        left.is_empty().then_some(())
    });
    assert_eq!(
        s.ok(&["get", "namespace", "shop", "-o", "jsonpath={.status.phase}"]),
        "Terminating"
    );
    s.ok(&[
        "patch",
        "configmap",
        "settings",
        "-n",
        "shop",
        "--type=merge",
        "-p",
        r#"{"metadata":{"finalizers":null}}"#,
    ]);
    s.wait("the namespace to be gone", Duration::from_secs(20), || {
        let out = s.kubectl(&["get", "namespace", "shop"]);
        String::from_utf8_lossy(&out.stderr).contains("NotFound").then_some(())
    });
}
