//! The API server as the real kubectl sees it: discovery, CRUD, Table columns, describe with
//! events, logs, exec, watch, optimistic concurrency, errors as Status, and older kubectls.

mod common;

use std::time::Duration;

use common::{Server, available};

const POD: &str = "apiVersion: v1
kind: Pod
metadata:
  name: production-payment-pod
  namespace: lab
  labels:
    app: payment-gateway
spec:
  terminationGracePeriodSeconds: 2
  containers:
  - name: payment-container
    image: nginx:1.26-alpine
    command: [\"sh\", \"-c\", \"echo payment service up; trap 'echo got SIGTERM; exit 0' TERM; while true; do sleep 0.2; done\"]
    ports:
    - containerPort: 80
";

#[test]
fn kubectl_drives_the_core_api_end_to_end() {
    if !available("kubectl", &["version", "--client"]) {
        return;
    }
    let mut s = Server::start();
    s.agent("node-1", &[]);
    assert_eq!(s.ok(&["get", "--raw", "/readyz"]).trim(), "ok");
    let verbose = s.ok(&["get", "--raw", "/readyz?verbose"]);
    assert!(verbose.contains("[+]etcd ok") && verbose.contains("readyz check passed"), "{verbose}");

    // cluster-info: the control plane, and the cluster DNS once it has published kube-dns.
    let info = s.wait("the DNS line of cluster-info", Duration::from_secs(20), || {
        let out = s.ok(&["cluster-info"]);
        out.contains("KubeDNS").then_some(out)
    });
    let url = format!("https://127.0.0.1:{}", s.port);
    let plain: String =
        info.replace("\u{1b}[0;32m", "").replace("\u{1b}[0;33m", "").replace("\u{1b}[0m", "");
    assert!(plain.contains(&format!("Kubernetes control plane is running at {url}")), "{plain}");
    assert!(
        plain.contains(&format!(
            "KubeDNS is running at {url}/api/v1/namespaces/kube-system/services/kube-dns:dns/proxy"
        )),
        "{plain}"
    );

    // The node-IPAM loop gives the node its pod CIDR, which describe shows.
    s.wait("a pod CIDR for node-1", Duration::from_secs(20), || {
        let cidr = s.ok(&["get", "node", "node-1", "-o", "jsonpath={.spec.podCIDR}"]);
        (cidr == "10.244.0.0/24").then_some(())
    });
    let described = s.ok(&["describe", "node", "node-1"]);
    assert!(
        described.lines().any(|l| l.split_whitespace().eq(["PodCIDR:", "10.244.0.0/24"])),
        "{described}"
    );

    let resources = s.ok(&["api-resources"]);
    for line in [
        ["deployments", "deploy", "apps/v1", "true", "Deployment"],
        ["pods", "po", "v1", "true", "Pod"],
        ["nodes", "no", "v1", "false", "Node"],
        ["componentstatuses", "cs", "v1", "false", "ComponentStatus"],
    ] {
        assert!(
            resources.lines().any(|l| l.split_whitespace().collect::<Vec<_>>() == line),
            "{line:?} missing:\n{resources}"
        );
    }

    assert_eq!(
        s.ok_stdin(
            &["apply", "-f", "-"],
            "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: lab\n"
        )
        .trim(),
        "namespace/lab created"
    );
    assert_eq!(s.ok_stdin(&["apply", "-f", "-"], POD).trim(), "pod/production-payment-pod created");
    assert_eq!(
        s.ok_stdin(&["apply", "-f", "-"], POD).trim(),
        "pod/production-payment-pod unchanged"
    );
    let wide = s.wait("the pod Running on node-1", Duration::from_secs(30), || {
        let out = s.ok(&["get", "pods", "-n", "lab", "-o", "wide"]);
        (out.contains("Running") && out.contains("node-1")).then_some(out)
    });
    let header: Vec<&str> = wide.lines().next().unwrap().split_whitespace().collect();
    assert_eq!(
        header,
        [
            "NAME",
            "READY",
            "STATUS",
            "RESTARTS",
            "AGE",
            "IP",
            "NODE",
            "NOMINATED",
            "NODE",
            "READINESS",
            "GATES"
        ]
    );
    assert!(
        wide.lines().nth(1).unwrap().starts_with("production-payment-pod   1/1     Running   0"),
        "{wide}"
    );

    let yaml = s.ok(&["get", "pod", "production-payment-pod", "-n", "lab", "-o", "yaml"]);
    assert!(
        yaml.contains("resourceVersion:")
            && yaml.contains("uid:")
            && yaml.contains("phase: Running"),
        "{yaml}"
    );

    let described = s.ok(&["describe", "pod", "production-payment-pod", "-n", "lab"]);
    for want in [
        "Node:         node-1/127.0.0.1",
        "Status:       Running",
        "Events:",
        "Scheduled",
        "Successfully assigned lab/production-payment-pod to node-1",
        "Started",
    ] {
        assert!(described.contains(want), "{want} missing:\n{described}");
    }

    assert_eq!(
        s.ok(&["label", "pod", "production-payment-pod", "-n", "lab", "tier=web"]).trim(),
        "pod/production-payment-pod labeled"
    );
    assert_eq!(
        s.ok(&["annotate", "pod", "production-payment-pod", "-n", "lab", "owner=payments"]).trim(),
        "pod/production-payment-pod annotated"
    );
    let by_label = s.ok(&["get", "pods", "-n", "lab", "-l", "tier=web", "-o", "name"]);
    assert_eq!(by_label.trim(), "pod/production-payment-pod");
    assert_eq!(s.ok(&["get", "pods", "-n", "lab", "-l", "tier=db", "-o", "name"]).trim(), "");

    let logs = s.ok(&["logs", "production-payment-pod", "-n", "lab"]);
    assert_eq!(logs.trim(), "payment service up");
    assert_eq!(
        s.ok(&["exec", "production-payment-pod", "-n", "lab", "--", "echo", "ok"]).trim(),
        "ok"
    );
    let failed =
        s.kubectl(&["exec", "production-payment-pod", "-n", "lab", "--", "sh", "-c", "exit 3"]);
    assert_eq!(failed.status.code(), Some(3));

    // exec -it: the command gets a terminal (run under `script`, which gives kubectl a TTY).
    let cmdline = format!(
        "kubectl --kubeconfig {} --cache-dir {} exec -it production-payment-pod -n lab -- sh -c 'tty'",
        s.kubeconfig.display(),
        s.path().join("kcache-tty").display()
    );
    let tty = std::process::Command::new("script")
        .args(["-qec", &cmdline, "/dev/null"])
        .output()
        .unwrap();
    let tty_out = String::from_utf8_lossy(&tty.stdout);
    assert!(tty_out.contains("/dev/pts/"), "{tty_out}");
    // The exit status of a TTY exec is not asserted: under heavy load kubectl sometimes ends
    // before reading it (a known open bug); the non-TTY exit code is asserted above.

    // Optimistic concurrency: replacing with a stale resourceVersion is a 409 Conflict.
    let stale = s.ok(&["get", "pod", "production-payment-pod", "-n", "lab", "-o", "json"]);
    s.ok(&["label", "pod", "production-payment-pod", "-n", "lab", "tier=api", "--overwrite"]);
    let conflict = s.kubectl_with("kubectl", &["replace", "-f", "-"], Some(&stale));
    assert!(!conflict.status.success());
    let err = String::from_utf8_lossy(&conflict.stderr);
    assert!(err.contains("the object has been modified; please apply your changes to the latest version and try again"), "{err}");

    // Errors are Kubernetes Status objects that kubectl prints as upstream does.
    let missing = s.kubectl(&["get", "pod", "nope", "-n", "lab"]);
    assert_eq!(
        String::from_utf8_lossy(&missing.stderr).trim(),
        "Error from server (NotFound): pods \"nope\" not found"
    );
    let bad = s.kubectl_with(
        "kubectl",
        &["create", "--raw", "/api/v1/namespaces/lab/configmaps", "-f", "-"],
        Some("{not json"),
    );
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("BadRequest"),
        "{}",
        String::from_utf8_lossy(&bad.stderr)
    );

    // kubectl explain reads the OpenAPI v3 schemas.
    let explained = s.ok(&["explain", "pod.spec.containers.image"]);
    assert!(
        explained.contains("FIELD: image <string>") && explained.contains("Container image name"),
        "{explained}"
    );

    // Unknown fields: kubectl's default --validate=strict is answered by the server, as upstream.
    let typo = POD
        .replace("production-payment-pod", "typo")
        .replace("    image:", "    imagee: x\n    image:");
    let rejected = s.kubectl_with("kubectl", &["apply", "-f", "-"], Some(&typo));
    assert!(!rejected.status.success());
    let err = String::from_utf8_lossy(&rejected.stderr);
    assert!(err.contains("Pod in version \"v1\" cannot be handled as a Pod: strict decoding error: unknown field \"spec.containers[0].imagee\""), "{err}");
    let warned = s.kubectl_with("kubectl", &["apply", "--validate=warn", "-f", "-"], Some(&typo));
    assert!(
        String::from_utf8_lossy(&warned.stderr)
            .contains("Warning: unknown field \"spec.containers[0].imagee\"")
    );
    s.ok(&["delete", "pod", "typo", "-n", "lab", "--wait=false"]);

    let cs = s.kubectl(&["get", "componentstatuses"]);
    assert!(
        String::from_utf8_lossy(&cs.stderr)
            .contains("Warning: v1 ComponentStatus is deprecated in v1.19+")
    );
    let cs_out = String::from_utf8_lossy(&cs.stdout);
    assert!(cs_out.lines().any(|l| l.starts_with("etcd-0") && l.contains("Healthy")), "{cs_out}");
    assert!(s.ok(&["auth", "whoami"]).contains("kubernetes-admin"));
    // Prometheus metrics: requests by verb/resource/code with latencies, store latency, watches.
    let metrics = s.ok(&["get", "--raw", "/metrics"]);
    for want in [
        "apiserver_request_total{code=\"201\",resource=\"pods\",subresource=\"\",verb=\"POST\"} 2",
        "apiserver_request_total{code=\"409\",resource=\"pods\",subresource=\"\",verb=\"PUT\"} 1",
        "apiserver_request_duration_seconds_count{resource=\"pods\",subresource=\"\",verb=\"LIST\"}",
        "etcd_request_duration_seconds_count{operation=\"create\",type=\"pods\"}",
        "apiserver_longrunning_requests{verb=\"WATCH\"}",
    ] {
        assert!(metrics.contains(want), "{want} missing from /metrics:\n{metrics}");
    }

    // A watch sees the graceful delete: the kubelet sends SIGTERM, then removes the pod.
    let watch = std::thread::scope(|scope| {
        let w = scope
            .spawn(|| s.kubectl(&["get", "pods", "-n", "lab", "--watch", "--request-timeout=6s"]));
        std::thread::sleep(Duration::from_millis(800));
        assert_eq!(
            s.ok(&["delete", "pod", "production-payment-pod", "-n", "lab"]).trim(),
            "pod \"production-payment-pod\" deleted"
        );
        w.join().unwrap()
    });
    let watched = String::from_utf8_lossy(&watch.stdout);
    assert!(watched.contains("Terminating"), "{watched}");
    assert!(s.ok(&["get", "pods", "-n", "lab", "-o", "name"]).trim().is_empty());

    // Events by field selector, as `describe` asks for them.
    let evs = s.ok(&[
        "get",
        "events",
        "-n",
        "lab",
        "--field-selector",
        "involvedObject.name=production-payment-pod",
        "-o",
        "custom-columns=REASON:.reason",
        "--no-headers",
    ]);
    assert!(evs.lines().any(|l| l.trim() == "Killing"), "{evs}");

    // An old kubectl negotiates aggregated discovery v2beta1 and works too.
    if let Some(k127) = common::versioned_kubectl(27) {
        let out = s.kubectl_with(k127.to_str().unwrap(), &["api-resources"], None);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        assert!(String::from_utf8_lossy(&out.stdout).contains("deployments"));
        let nodes = s.kubectl_with(k127.to_str().unwrap(), &["get", "nodes"], None);
        assert!(String::from_utf8_lossy(&nodes.stdout).contains("node-1"));
    }
}

#[test]
fn a_deployment_scales_and_rolls_out() {
    if !available("kubectl", &["version", "--client"]) {
        return;
    }
    let mut s = Server::start();
    s.agent("node-1", &[]);
    let dep = "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: web\nspec:\n  replicas: 2\n  selector:\n    matchLabels: {app: web}\n  template:\n    metadata:\n      labels: {app: web}\n    spec:\n      terminationGracePeriodSeconds: 1\n      containers:\n      - name: web\n        image: busybox\n        command: [\"sleep\", \"7301\"]\n";
    assert_eq!(s.ok_stdin(&["apply", "-f", "-"], dep).trim(), "deployment.apps/web created");
    let status = s.ok(&["rollout", "status", "deployment/web", "--timeout=60s"]);
    assert!(status.contains("successfully rolled out"), "{status}");
    assert_eq!(
        s.ok(&["scale", "deployment", "web", "--replicas=3"]).trim(),
        "deployment.apps/web scaled"
    );
    s.wait("3 ready replicas", Duration::from_secs(30), || {
        let out = s.ok(&["get", "deployment", "web", "--no-headers"]);
        out.split_whitespace().nth(1).is_some_and(|r| r == "3/3").then_some(())
    });
    // A new template rolls out a new ReplicaSet; undo goes back to the first one.
    let v2 = dep.replace("7301", "7302");
    assert_eq!(s.ok_stdin(&["apply", "-f", "-"], &v2).trim(), "deployment.apps/web configured");
    assert!(
        s.ok(&["rollout", "status", "deployment/web", "--timeout=60s"])
            .contains("successfully rolled out")
    );
    let rs = s.ok(&["get", "rs", "--no-headers"]);
    assert_eq!(rs.lines().count(), 2, "{rs}");
    assert!(s.ok(&["rollout", "undo", "deployment/web"]).contains("rolled back"));
    assert!(
        s.ok(&["rollout", "status", "deployment/web", "--timeout=60s"])
            .contains("successfully rolled out")
    );
    let cmd = s.ok(&[
        "get",
        "deployment",
        "web",
        "-o",
        "jsonpath={.spec.template.spec.containers[0].command[1]}",
    ]);
    assert_eq!(cmd, "7301");
    let rev = s.ok(&[
        "get",
        "deployment",
        "web",
        "-o",
        "jsonpath={.metadata.annotations.deployment\\.kubernetes\\.io/revision}",
    ]);
    assert_eq!(rev, "3");
    // A Service gets Endpoints and an EndpointSlice with its pods' addresses.
    assert_eq!(
        s.ok(&["expose", "deployment", "web", "--port", "80", "--target-port", "8080"]).trim(),
        "service/web exposed"
    );
    s.wait("2 ready endpoints for the Service", Duration::from_secs(30), || {
        let out = s.ok(&[
            "get",
            "endpointslices",
            "-l",
            "kubernetes.io/service-name=web",
            "-o",
            "jsonpath={.items[0].endpoints[*].conditions.ready}",
        ]);
        // The re-applied manifest says replicas: 2.
        (out.split_whitespace().filter(|r| *r == "true").count() == 2).then_some(())
    });
    let ep = s.ok(&["get", "endpoints", "web", "--no-headers"]);
    assert!(ep.contains(":8080"), "{ep}");

    // A DaemonSet puts one pod on every eligible node.
    let ds = "apiVersion: apps/v1\nkind: DaemonSet\nmetadata:\n  name: agent\nspec:\n  selector:\n    matchLabels: {app: agent}\n  template:\n    metadata:\n      labels: {app: agent}\n    spec:\n      terminationGracePeriodSeconds: 1\n      containers:\n      - name: a\n        image: busybox\n        command: [\"sleep\", \"7303\"]\n";
    assert_eq!(s.ok_stdin(&["apply", "-f", "-"], ds).trim(), "daemonset.apps/agent created");
    s.wait("the daemon pod Running on node-1", Duration::from_secs(30), || {
        let out = s.ok(&["get", "ds", "agent", "--no-headers"]);
        let f: Vec<&str> = out.split_whitespace().collect();
        (f.get(1) == Some(&"1") && f.get(3) == Some(&"1")).then_some(())
    });
    s.ok(&["delete", "ds", "agent"]);

    // Deleting the Deployment removes its ReplicaSets and pods (garbage collection).
    s.ok(&["delete", "deployment", "web"]);
    s.wait("ReplicaSets and pods gone", Duration::from_secs(30), || {
        let rs = s.ok(&["get", "rs", "-o", "name"]);
        let pods = s.ok(&["get", "pods", "-o", "name"]);
        (rs.trim().is_empty() && pods.trim().is_empty()).then_some(())
    });
}

/// kubectl's `create <kind>` subcommands send protobuf bodies (typed clients), unlike `apply`.
#[test]
fn kubectl_create_subcommands_send_protobuf() {
    if !available("kubectl", &["version", "--client"]) {
        return;
    }
    let mut s = Server::start();
    s.agent("node-1", &[]);
    assert_eq!(
        s.ok(&[
            "create",
            "deployment",
            "web",
            "--image=busybox",
            "--replicas=3",
            "--",
            "sleep",
            "7305"
        ])
        .trim(),
        "deployment.apps/web created"
    );
    s.wait("3 ready replicas", Duration::from_secs(30), || {
        let out = s.ok(&["get", "deployment", "web", "--no-headers"]);
        out.split_whitespace().nth(1).is_some_and(|r| r == "3/3").then_some(())
    });
    assert_eq!(
        s.ok(&["scale", "deployment", "web", "--replicas=1"]).trim(),
        "deployment.apps/web scaled"
    );
    s.wait("1 replica left", Duration::from_secs(30), || {
        let out = s.ok(&["get", "pods", "-l", "app=web", "-o", "name"]);
        (out.lines().count() == 1).then_some(())
    });
    let spec = s.ok(&[
        "get",
        "deployment",
        "web",
        "-o",
        "jsonpath={.spec.template.spec.containers[0].command}",
    ]);
    assert_eq!(spec, r#"["sleep","7305"]"#);

    for (args, want) in [
        (&["create", "namespace", "shop"][..], "namespace/shop created"),
        (
            &["create", "configmap", "conf", "--from-literal=a=b", "--from-literal=empty="],
            "configmap/conf created",
        ),
        (&["create", "secret", "generic", "pw", "--from-literal=p=hunter2"], "secret/pw created"),
        (&["create", "service", "nodeport", "web", "--tcp=80:8080"], "service/web created"),
        (&["create", "service", "clusterip", "plain", "--tcp=81"], "service/plain created"),
        (&["create", "serviceaccount", "robot"], "serviceaccount/robot created"),
        (
            &["create", "priorityclass", "high", "--value=1000"],
            "priorityclass.scheduling.k8s.io/high created",
        ),
    ] {
        assert_eq!(s.ok(args).trim(), want);
    }
    assert_eq!(
        s.ok(&["get", "configmap", "conf", "-o", "jsonpath={.data}"]),
        r#"{"a":"b","empty":""}"#
    );
    assert_eq!(s.ok(&["get", "secret", "pw", "-o", "jsonpath={.data.p}"]), "aHVudGVyMg==");
    let ports = s.ok(&["get", "service", "web", "plain", "-o", "jsonpath={.items[*].spec.ports}"]);
    assert!(ports.contains(r#""port":80,"protocol":"TCP","targetPort":8080"#), "{ports}");
    assert!(
        ports.contains(r#"{"name":"81","port":81,"protocol":"TCP","targetPort":81}"#),
        "{ports}"
    );
    let svc = s.ok(&["get", "service", "web", "--no-headers"]);
    assert!(svc.contains("NodePort") && svc.contains("80:3"), "{svc}");
}

/// Server-side apply: managedFields per manager, conflicts naming the owner, `--force-conflicts`,
/// fields a manager stops applying removed; `kubectl diff` shows a change before it is made.
#[test]
fn server_side_apply_tracks_who_owns_each_field() {
    if !available("kubectl", &["version", "--client"]) {
        return;
    }
    let s = Server::start();
    let dep = "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: ssa\n  labels: {app: ssa, tier: front}\nspec:\n  replicas: 2\n  selector:\n    matchLabels: {app: ssa}\n  template:\n    metadata:\n      labels: {app: ssa}\n    spec:\n      containers:\n      - name: c\n        image: busybox\n        command: [\"sleep\", \"7306\"]\n";
    assert_eq!(
        s.ok_stdin(&["apply", "--server-side", "-f", "-"], dep).trim(),
        "deployment.apps/ssa serverside-applied"
    );
    let owners = |s: &Server| {
        s.ok(&[
            "get",
            "deployment",
            "ssa",
            "-o",
            "jsonpath={range .metadata.managedFields[*]}{.manager}/{.operation};{end}",
        ])
    };
    assert!(owners(&s).contains("kubectl/Apply;"), "{}", owners(&s));
    // "ops" never applies the `tier` label, so kubectl alone owns it.
    let five = dep.replace("replicas: 2", "replicas: 5").replace(", tier: front", "");
    let out = s.kubectl_with(
        "kubectl",
        &["apply", "--server-side", "--field-manager=ops", "-f", "-"],
        Some(&five),
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(
            "Apply failed with 1 conflict: conflict with \"kubectl\" using apps/v1: .spec.replicas"
        ),
        "{err}"
    );
    // The same value is shared ownership, not a conflict.
    assert!(
        s.ok_stdin(
            &["apply", "--server-side", "--field-manager=ops", "-f", "-"],
            &dep.replace(", tier: front", "")
        )
        .contains("serverside-applied")
    );
    assert!(
        s.ok_stdin(
            &["apply", "--server-side", "--field-manager=ops", "--force-conflicts", "-f", "-"],
            &five
        )
        .contains("serverside-applied")
    );
    assert_eq!(s.ok(&["get", "deployment", "ssa", "-o", "jsonpath={.spec.replicas}"]), "5");
    // kubectl now conflicts on replicas (ops took it); without replicas in its file it does not,
    // and the `tier` label it stopped applying is removed.
    let mine = dep.replace("  replicas: 2\n", "").replace(", tier: front", "");
    let diff = s.kubectl_with("kubectl", &["diff", "-f", "-"], Some(&dep.replace("7306", "7307")));
    assert_eq!(diff.status.code(), Some(1), "kubectl diff exits 1 when something would change");
    let d = String::from_utf8_lossy(&diff.stdout);
    assert!(d.contains("-        - \"7306\"") && d.contains("+        - \"7307\""), "{d}");
    assert!(
        s.ok_stdin(&["apply", "--server-side", "-f", "-"], &mine).contains("serverside-applied")
    );
    let labels = s.ok(&["get", "deployment", "ssa", "-o", "jsonpath={.metadata.labels}"]);
    assert_eq!(labels, r#"{"app":"ssa"}"#);
    assert_eq!(s.ok(&["get", "deployment", "ssa", "-o", "jsonpath={.spec.replicas}"]), "5");
    // A non-apply write takes the fields it changes (operation Update).
    s.ok(&["scale", "deployment", "ssa", "--replicas=1"]);
    assert!(owners(&s).contains("/Update;"), "{}", owners(&s));
}

/// kubectl 1.27 reads `/openapi/v2` in gnostic's protobuf form for `apply` and for
/// `explain --output=plaintext-openapiv2`; kubectl 1.33 reads v3. Both apply the same manifests.
#[test]
fn old_and_new_kubectl_apply_the_same_manifests_through_openapi_v2_and_v3() {
    if !available("kubectl", &["version", "--client"]) {
        return;
    }
    let s = Server::start();
    let raw = s.ok(&["get", "--raw", "/openapi/v2"]);
    let doc: serde_json::Value = serde_json::from_str(&raw).unwrap();
    assert_eq!(doc["swagger"], "2.0");
    let dep = &doc["definitions"]["io.k8s.api.apps.v1.Deployment"];
    assert_eq!(dep["x-kubernetes-group-version-kind"][0]["kind"], "Deployment", "{dep}");
    assert_eq!(
        doc["definitions"]["io.k8s.api.core.v1.PodSpec"]["properties"]["containers"]["x-kubernetes-patch-merge-key"],
        "name"
    );
    for minor in [27, 33] {
        let Some(k) = common::versioned_kubectl(minor) else {
            assert!(std::env::var("CI").as_deref() != Ok("true"), "kubectl.1.{minor} missing");
            continue;
        };
        let k = k.to_str().unwrap();
        let run = |args: &[&str], stdin: Option<&str>| {
            let out = s.kubectl_with(k, args, stdin);
            let text = String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr);
            (out.status.success(), text)
        };
        let name = format!("web{minor}");
        let manifest = |replicas: u32, image: &str| {
            format!(
                "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: {name}\nspec:\n  replicas: {replicas}\n  selector:\n    matchLabels: {{app: {name}}}\n  template:\n    metadata:\n      labels: {{app: {name}}}\n    spec:\n      containers:\n      - name: web\n        image: {image}\n        env: [{{name: A, value: \"1\"}}]\n"
            )
        };
        let (ok, out) = run(&["apply", "-f", "-"], Some(&manifest(2, "nginx:1.26-alpine")));
        assert!(ok && out.trim() == format!("deployment.apps/{name} created"), "{minor}: {out}");
        let (ok, out) = run(&["apply", "-f", "-"], Some(&manifest(3, "nginx:1.27-alpine")));
        assert!(ok && out.trim() == format!("deployment.apps/{name} configured"), "{minor}: {out}");
        let stored = s.ok(&[
            "get",
            "deploy",
            &name,
            "-o",
            "jsonpath={.spec.replicas} {.spec.template.spec.containers[0].image} {.spec.template.spec.containers[0].env[0].value}",
        ]);
        assert_eq!(stored, "3 nginx:1.27-alpine 1", "kubectl 1.{minor}");
        // A misspelled field is refused under the default strict validation.
        let typo = manifest(3, "nginx:1.27-alpine").replace("containers:", "contianers:");
        let (ok, out) = run(&["apply", "-f", "-"], Some(&typo));
        assert!(!ok && out.contains("unknown field \"spec.template.spec.contianers\""), "{out}");
        // explain from the v2 document (protobuf) and from v3.
        let (ok, out) = run(
            &["explain", "pod.spec.containers.resources", "--output=plaintext-openapiv2"],
            None,
        );
        assert!(
            ok && out.contains("Compute Resources required by this container")
                && out.contains("limits\t<map[string]string>"),
            "kubectl 1.{minor}: {out}"
        );
        let (ok, out) = run(&["explain", "deployment.spec.strategy.rollingUpdate.maxSurge"], None);
        assert!(ok && out.contains("The maximum number of pods that can be scheduled"), "{out}");
    }
    // Server-side apply validates too; what is only warned about is dropped, never stored.
    let cm = "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: cm}\ndata: {a: \"1\"}\nbogus: 1\n";
    let out = s.kubectl_with("kubectl", &["apply", "--server-side", "-f", "-"], Some(cm));
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("failed to create typed patch object (default/cm; /v1, Kind=ConfigMap): .bogus: field not declared in schema"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = s.kubectl_with("kubectl", &["apply", "--validate=warn", "-f", "-"], Some(cm));
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("Warning: unknown field \"bogus\""));
    assert!(!s.ok(&["get", "cm", "cm", "-o", "json"]).contains("\"bogus\": 1"));
}
