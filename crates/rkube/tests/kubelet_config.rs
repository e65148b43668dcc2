//! Configuration into containers through the real kubectl: env from ConfigMaps and Secrets
//! (`envFrom` and key references), the downward API and resource fields; a missing ConfigMap is
//! `CreateContainerConfigError` until it appears.

mod common;

use std::time::Duration;

use common::{Server, available};

const OBJECTS: &str = r#"apiVersion: v1
kind: ConfigMap
metadata: {name: settings}
data: {MODE: fast, LEVEL: "3"}
---
apiVersion: v1
kind: Secret
metadata: {name: creds}
stringData: {password: s3cret}
---
apiVersion: v1
kind: Pod
metadata:
  name: configured
  labels: {app: shop}
spec:
  terminationGracePeriodSeconds: 1
  containers:
  - name: app
    image: busybox
    command: ["sh", "-c", "echo mode=$CFG_MODE level=$CFG_LEVEL pw=$PW app=$APP mem=$MEM_MI pod=$POD; sleep 3600"]
    envFrom:
    - prefix: CFG_
      configMapRef: {name: settings}
    env:
    - name: PW
      valueFrom: {secretKeyRef: {name: creds, key: password}}
    - name: APP
      valueFrom: {fieldRef: {fieldPath: "metadata.labels['app']"}}
    - name: MEM_MI
      valueFrom: {resourceFieldRef: {resource: limits.memory, divisor: 1Mi}}
    - name: POD
      value: "$(APP)-pod"
    resources:
      limits: {memory: 64Mi}
"#;

const WAITING: &str = r#"apiVersion: v1
kind: Pod
metadata: {name: waiting}
spec:
  terminationGracePeriodSeconds: 1
  containers:
  - name: app
    image: busybox
    command: ["sh", "-c", "echo late=$LATE; sleep 3600"]
    env:
    - name: LATE
      valueFrom: {configMapKeyRef: {name: later, key: value}}
"#;

#[test]
fn config_maps_secrets_and_the_downward_api_reach_the_environment() {
    if !available("kubectl", &["version", "--client"]) {
        return;
    }
    let mut s = Server::start();
    s.agent("node-1", &[]);
    s.ok_stdin(&["apply", "-f", "-"], OBJECTS);
    let logs = s.wait("the configured pod's output", Duration::from_secs(30), || {
        let out = s.kubectl(&["logs", "configured"]);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        text.contains("mode=").then_some(text)
    });
    assert_eq!(logs.trim(), "mode=fast level=3 pw=s3cret app=shop mem=64 pod=shop-pod");

    s.ok_stdin(&["apply", "-f", "-"], WAITING);
    let reason = s.wait("CreateContainerConfigError", Duration::from_secs(30), || {
        let out = s.ok(&["get", "pod", "waiting", "--no-headers"]);
        out.contains("CreateContainerConfigError").then_some(out)
    });
    assert!(reason.contains("0/1"), "{reason}");
    let described = s.ok(&["describe", "pod", "waiting"]);
    assert!(described.contains("Error: configmap \"later\" not found"), "{described}");
    s.ok(&["create", "configmap", "later", "--from-literal=value=arrived"]);
    let logs = s.wait("the waiting pod to start", Duration::from_secs(30), || {
        let out = s.kubectl(&["logs", "waiting"]);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        text.contains("late=").then_some(text)
    });
    assert_eq!(logs.trim(), "late=arrived");
}
