//! Client libraries nobody here wrote: the Python `kubernetes` client and kube-rs, including a
//! kube-runtime watcher that survives an API server restart on the same data.

mod common;

use std::time::Duration;

use common::{Server, available};

const PYTHON: &str = r#"
import sys, threading, time
from kubernetes import client, config, watch
config.load_kube_config(config_file=sys.argv[1])
v1 = client.CoreV1Api()
names = sorted(ns.metadata.name for ns in v1.list_namespace().items)
print("namespaces", ",".join(names))
pod = client.V1Pod(metadata=client.V1ObjectMeta(name="py-pod", labels={"from": "python"}),
                   spec=client.V1PodSpec(containers=[client.V1Container(name="c", image="busybox", command=["sleep", "3600"])]))
seen = []
def watcher():
    w = watch.Watch()
    for ev in w.stream(v1.list_namespaced_pod, "default", label_selector="from=python", timeout_seconds=10):
        seen.append(ev["type"])
        if ev["type"] == "DELETED":
            w.stop()
t = threading.Thread(target=watcher); t.start()
time.sleep(1)
v1.create_namespaced_pod("default", pod)
got = v1.read_namespaced_pod("py-pod", "default")
print("read", got.metadata.name, got.spec.containers[0].image, got.status.phase)
v1.patch_namespaced_pod("py-pod", "default", {"metadata": {"labels": {"patched": "yes"}}})
v1.delete_namespaced_pod("py-pod", "default")
t.join(15)
print("events", ",".join(seen))
try:
    v1.read_namespaced_pod("py-pod", "default")
except client.exceptions.ApiException as e:
    print("after delete", e.status, e.reason)
"#;

#[test]
fn the_python_client_lists_creates_watches_and_deletes() {
    if !available("/usr/bin/python3", &["-c", "import kubernetes"]) {
        return;
    }
    let s = Server::start();
    let script = s.path().join("client.py");
    std::fs::write(&script, PYTHON).unwrap();
    let out = std::process::Command::new("/usr/bin/python3")
        .arg(&script)
        .arg(&s.kubeconfig)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "python failed: {}\n{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("namespaces default,kube-node-lease,kube-public,kube-system"),
        "{stdout}"
    );
    assert!(stdout.contains("read py-pod busybox Pending"), "{stdout}");
    // ADDED, then MODIFIED (our patch, and the scheduler's PodScheduled condition), then DELETED.
    let events = stdout.lines().find_map(|l| l.strip_prefix("events ")).unwrap_or_default();
    assert!(events.starts_with("ADDED,MODIFIED") && events.ends_with(",DELETED"), "{stdout}");
    assert!(stdout.contains("after delete 404 Not Found"), "{stdout}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kube_rs_crud_and_a_watcher_that_survives_a_server_restart() {
    use futures::StreamExt;
    use k8s_openapi::api::core::v1::ConfigMap;
    use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
    use kube::runtime::watcher;

    let mut s = Server::start();
    let kc = kube::config::Kubeconfig::read_from(&s.kubeconfig).unwrap();
    let cfg = kube::Config::from_custom_kubeconfig(kc, &Default::default()).await.unwrap();
    let client = kube::Client::try_from(cfg).unwrap();
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
    let cm: ConfigMap = serde_json::from_value(
        serde_json::json!({"metadata": {"name": "one"}, "data": {"k": "v"}}),
    )
    .unwrap();
    let created = api.create(&PostParams::default(), &cm).await.unwrap();
    assert!(created.metadata.resource_version.is_some());
    let listed = api.list(&Default::default()).await.unwrap();
    assert_eq!(listed.items.len(), 1);
    let patched = api
        .patch(
            "one",
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"data": {"k": "w"}})),
        )
        .await
        .unwrap();
    assert_eq!(patched.data.unwrap()["k"], "w");
    // A stale update is refused with 409.
    let mut stale = created.clone();
    stale.data = Some([("k".to_string(), "x".to_string())].into());
    match api.replace("one", &PostParams::default(), &stale).await {
        Err(kube::Error::Api(e)) => assert_eq!((e.code, e.reason.as_str()), (409, "Conflict")),
        other => panic!("expected a conflict, got {other:?}"),
    }

    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let w = tokio::spawn(async move {
        let mut stream = watcher(api.clone(), watcher::Config::default()).boxed();
        while let Some(ev) = stream.next().await {
            if let Ok(watcher::Event::Apply(cm) | watcher::Event::InitApply(cm)) = ev {
                let _ = tx.send(cm.metadata.name.unwrap_or_default());
            }
        }
    });
    assert_eq!(
        tokio::time::timeout(Duration::from_secs(10), rx.recv()).await.unwrap().unwrap(),
        "one"
    );
    // SIGKILL the server, start it again on the same data and port: every acknowledged write is
    // there and the watcher carries on.
    tokio::task::block_in_place(|| {
        s.kill_server();
        s.spawn_server();
    });
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
    let mut created_two = false;
    for _ in 0..50 {
        if api
            .create(
                &PostParams::default(),
                &serde_json::from_value(serde_json::json!({"metadata": {"name": "two"}})).unwrap(),
            )
            .await
            .is_ok()
        {
            created_two = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(created_two);
    assert_eq!(api.get("one").await.unwrap().data.unwrap()["k"], "w");
    let mut names = Vec::new();
    while let Ok(Some(n)) = tokio::time::timeout(Duration::from_secs(15), rx.recv()).await {
        names.push(n.clone());
        if n == "two" {
            break;
        }
    }
    assert!(names.contains(&"two".to_string()), "watcher saw {names:?}");
    api.delete("two", &DeleteParams::default()).await.unwrap();
    w.abort();
}
