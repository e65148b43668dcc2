//! Outgrowing one machine: two `rkube server` processes on one real etcd serve the same cluster —
//! what one writes, the other reads and watches (feature `etcd`).
#![cfg(feature = "etcd")]

mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{available, free_port};

struct Proc(Child);
impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn wait_port(port: u16) {
    let start = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(start.elapsed() < Duration::from_secs(30), "nothing listens on {port}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn two_api_servers_on_one_etcd_serve_one_cluster() {
    if !available("etcd", &["--version"]) || !available("kubectl", &["version", "--client"]) {
        return;
    }
    let dir = std::env::temp_dir().join(format!("rkube-etcd-e2e-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let (client_port, peer_port) = (free_port(), free_port());
    let client_url = format!("http://127.0.0.1:{client_port}");
    let peer_url = format!("http://127.0.0.1:{peer_port}");
    let _etcd = Proc(
        Command::new("etcd")
            .args(["--name", "e2e", "--data-dir"])
            .arg(dir.join("etcd"))
            .args(["--listen-client-urls", &client_url, "--advertise-client-urls", &client_url])
            .args(["--listen-peer-urls", &peer_url, "--initial-advertise-peer-urls", &peer_url])
            .args(["--initial-cluster", &format!("e2e={peer_url}")])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_port(client_port);
    // Both servers share one data dir for the PKI, so one kubeconfig trusts both.
    let (a, b) = (free_port(), free_port());
    let mut servers = Vec::new();
    for port in [a, b] {
        servers.push(Proc(
            Command::new(env!("CARGO_BIN_EXE_rkube"))
                .args([
                    "server",
                    "--disable-controllers",
                    "--secure-port",
                    &port.to_string(),
                    "--etcd-servers",
                    &client_url,
                    "--data-dir",
                ])
                .arg(dir.join("pki-shared"))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
        ));
        wait_port(port);
    }
    let kubeconfig = dir.join("pki-shared").join("admin.kubeconfig");
    let kubectl = |port: u16, args: &[&str]| {
        let out = Command::new("kubectl")
            .arg("--kubeconfig")
            .arg(&kubeconfig)
            .arg("--server")
            .arg(format!("https://127.0.0.1:{port}"))
            .arg("--cache-dir")
            .arg(dir.join(format!("cache-{port}")))
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "kubectl {args:?} on {port}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let manifest = dir.join("cm.yaml");
    std::fs::write(
        &manifest,
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: shared\ndata:\n  k: v\n",
    )
    .unwrap();
    assert_eq!(
        kubectl(a, &["apply", "-f", manifest.to_str().unwrap()]).trim(),
        "configmap/shared created"
    );
    assert_eq!(kubectl(b, &["get", "configmap", "shared", "-o", "jsonpath={.data.k}"]), "v");
    // A watch on B sees a change made through A.
    let watch = std::thread::scope(|s| {
        let w = s.spawn(|| {
            kubectl(
                b,
                &[
                    "get",
                    "configmap",
                    "shared",
                    "--watch",
                    "-o",
                    "jsonpath={.data.k}{\"\\n\"}",
                    "--request-timeout=5s",
                ],
            )
        });
        std::thread::sleep(Duration::from_millis(1500));
        kubectl(a, &["patch", "configmap", "shared", "-p", "{\"data\":{\"k\":\"w\"}}"]);
        w.join().unwrap()
    });
    assert!(watch.lines().any(|l| l == "w"), "{watch}");
    let cs = kubectl(b, &["get", "componentstatuses", "etcd-0", "--no-headers"]);
    assert!(cs.contains("Healthy"), "{cs}");
    drop(servers);
    let _ = std::fs::remove_dir_all(&dir);
}
