//! `kubectl port-forward` end to end: a process-runtime pod serves HTTP (busybox httpd), the real
//! kubectl forwards a local port to it through the API server and the kubelet, and plain TCP
//! clients fetch through it — one after another, at the same time, to a port where nothing
//! listens (kubectl prints the kubelet's error), with kubectl 1.27 (plain SPDY instead of SPDY
//! in a WebSocket), and with kube-rs's `Api::portforward` (WebSocket channels).

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{Server, available, free_port, versioned_kubectl};

fn pod(port: u16) -> String {
    format!(
        r#"apiVersion: v1
kind: Pod
metadata:
  name: web
spec:
  terminationGracePeriodSeconds: 1
  containers:
  - name: httpd
    image: busybox
    command: ["sh", "-c", "mkdir -p www && echo hello-from-pod > www/index.html && exec busybox httpd -f -p 127.0.0.1:{port} -h www"]
"#
    )
}

/// A background `kubectl port-forward`, killed on drop; its stderr goes to a file.
struct Forward {
    child: Child,
    stderr: std::path::PathBuf,
}

impl Forward {
    fn start(s: &Server, kubectl: &Path, name: &str, local: u16, remote: u16) -> Forward {
        let stderr = s.path().join(format!("{name}.stderr"));
        let mut child = Command::new(kubectl)
            .arg("--kubeconfig")
            .arg(&s.kubeconfig)
            .arg("--cache-dir")
            .arg(s.path().join(format!("kcache-{name}")))
            .args(["port-forward", "pod/web", &format!("{local}:{remote}")])
            .env("HOME", s.path())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&stderr).unwrap())
            .spawn()
            .unwrap();
        // kubectl says where it listens once the connection to the pod is up.
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        let ready = out.read_line(&mut line).is_ok() && line.contains("Forwarding from");
        let f = Forward { child, stderr };
        assert!(ready, "kubectl port-forward did not start: {line}{}", f.stderr());
        // Keep draining its stdout ("Handling connection for …") so it never blocks.
        std::thread::spawn(move || {
            let mut sink = String::new();
            while out.read_line(&mut sink).is_ok_and(|n| n > 0) {
                sink.clear();
            }
        });
        f
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }
}

impl Drop for Forward {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn connect(port: u16) -> TcpStream {
    let s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s
}

/// One HTTP/1.0 request on `s`; the whole response (httpd closes after it).
fn get(mut s: TcpStream) -> String {
    s.write_all(b"GET /index.html HTTP/1.0\r\nHost: pod\r\n\r\n").unwrap();
    let mut resp = String::new();
    let _ = s.read_to_string(&mut resp);
    resp
}

fn assert_served(resp: &str, what: &str) {
    assert!(
        resp.starts_with("HTTP/1.") && resp.contains(" 200 ") && resp.contains("hello-from-pod"),
        "{what}: {resp:?}"
    );
}

#[test]
fn kubectl_port_forward_reaches_a_pod() {
    if !available("kubectl", &["version", "--client"]) || !available("busybox", &["true"]) {
        return;
    }
    let mut s = Server::start();
    s.agent("node-1", &[]);
    let http_port = free_port();
    s.ok_stdin(&["apply", "-f", "-"], &pod(http_port));
    s.wait("the pod Running", Duration::from_secs(30), || {
        s.ok(&["get", "pod", "web", "-o", "jsonpath={.status.phase}"])
            .contains("Running")
            .then_some(())
    });
    s.wait("httpd listening", Duration::from_secs(15), || {
        TcpStream::connect(("127.0.0.1", http_port)).ok().map(|_| ())
    });

    let kubectl = Path::new("kubectl");
    let local = free_port();
    let fwd = Forward::start(&s, kubectl, "pf", local, http_port);
    // Two connections one after the other …
    for i in 0..2 {
        assert_served(&get(connect(local)), &format!("sequential request {i}"));
    }
    // … and two at the same time: both are open before either request is sent.
    let (a, b) = (connect(local), connect(local));
    let tb = std::thread::spawn(move || get(b));
    let ra = get(a);
    assert_served(&ra, "concurrent request a");
    assert_served(&tb.join().unwrap(), "concurrent request b");
    assert!(!fwd.stderr().contains("error"), "{}", fwd.stderr());

    // A port where nothing listens: the connection ends and kubectl reports the kubelet's error.
    let closed = free_port();
    let local2 = free_port();
    let mut bad = Forward::start(&s, kubectl, "pf-closed", local2, closed);
    let resp = get(connect(local2));
    assert!(resp.is_empty(), "{resp:?}");
    let deadline = Instant::now() + Duration::from_secs(20);
    let err = loop {
        let e = bad.stderr();
        if e.contains("connection refused") || Instant::now() > deadline {
            break e;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(err.contains(&format!("error forwarding port {closed} to pod web")), "{err}");
    assert!(err.contains("connection refused"), "{err}");
    // kubectl gives up on the connection after an error; the first forward is unaffected.
    let deadline = Instant::now() + Duration::from_secs(10);
    while bad.child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_served(&get(connect(local)), "after the failed forward");
    drop(fwd);

    // kubectl 1.27 has no WebSockets for port-forward: plain SPDY/3.1 over the upgraded request.
    match versioned_kubectl(27) {
        Some(old) => {
            let local3 = free_port();
            let _old = Forward::start(&s, &old, "pf-127", local3, http_port);
            for i in 0..2 {
                assert_served(&get(connect(local3)), &format!("kubectl 1.27 request {i}"));
            }
        }
        None => {
            assert!(std::env::var("CI").as_deref() != Ok("true"), "kubectl.1.27 is required");
            eprintln!("SKIPPED: kubectl.1.27 is not available");
        }
    }

    // kube-rs: WebSocket channels (v4.channel.k8s.io), one stream per port.
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build();
    let body = rt.unwrap().block_on(async {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let kc = kube::config::Kubeconfig::read_from(&s.kubeconfig).unwrap();
        let cfg = kube::Config::from_custom_kubeconfig(kc, &Default::default()).await.unwrap();
        let client = kube::Client::try_from(cfg).unwrap();
        let pods: kube::Api<k8s_openapi::api::core::v1::Pod> =
            kube::Api::default_namespaced(client);
        let mut pf = pods.portforward("web", &[http_port]).await.unwrap();
        let mut stream = pf.take_stream(http_port).unwrap();
        stream.write_all(b"GET /index.html HTTP/1.0\r\nHost: pod\r\n\r\n").await.unwrap();
        let mut resp = Vec::new();
        tokio::time::timeout(Duration::from_secs(20), stream.read_to_end(&mut resp))
            .await
            .expect("kube-rs read timed out")
            .unwrap();
        String::from_utf8_lossy(&resp).into_owned()
    });
    assert_served(&body, "kube-rs portforward");
    // Dropping the server stops the agent gracefully, which stops the pod's httpd with it.
}
