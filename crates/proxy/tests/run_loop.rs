//! The watch/apply loop against a real (in-process) API server, with a stand-in for nft that
//! records each transaction in a directory: needs neither root nor nft.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Service;
use kube::Api;
use kube::api::{Patch, PatchParams, PostParams};
use rkube_proxy::{Config, RulesConfig};
use serde_json::json;
use tokio_util::sync::CancellationToken;

/// A fake nft: `-f -` saves stdin as `apply-<n>` in DIR; with a file `fail-next` present, the
/// next apply fails (removing the file) as a broken rule set would; `list …` succeeds.
fn fake_nft(dir: &Path) -> Vec<String> {
    let script = r#"
dir="$1"; shift
if [ "$1" = "-f" ]; then
  if [ -e "$dir/fail-next" ]; then rm -f "$dir/fail-next"; cat >/dev/null; echo "Error: fake failure" >&2; exit 1; fi
  n=$(ls "$dir" | grep -c '^apply-')
  # Written aside and renamed, so a reader never sees a half-written transaction.
  cat > "$dir/tmp.$$" && mv "$dir/tmp.$$" "$dir/apply-$n"
fi
exit 0
"#;
    vec!["sh".into(), "-c".into(), script.into(), "sh".into(), dir.display().to_string()]
}

fn applies(dir: &Path) -> Vec<String> {
    let mut names: Vec<PathBuf> = std::fs::read_dir(dir)
        .expect("read dir")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("apply-")))
        .collect();
    names.sort_by_key(|p| {
        p.file_name()
            .and_then(|n| n.to_string_lossy().trim_start_matches("apply-").parse::<u32>().ok())
    });
    names.iter().map(|p| std::fs::read_to_string(p).expect("read apply")).collect()
}

async fn wait_for(what: &str, limit: Duration, ok: impl Fn() -> bool) {
    let start = Instant::now();
    while !ok() {
        assert!(start.elapsed() < limit, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn service(name: &str, ip: &str) -> Service {
    serde_json::from_value(json!({
        "metadata": {"namespace": "default", "name": name},
        "spec": {"clusterIP": ip, "ports": [{"port": 80}]}
    }))
    .expect("service")
}

struct TempDir(PathBuf);
impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn temp_dir() -> TempDir {
    let d = std::env::temp_dir().join(format!("rkube-proxy-test-{:08x}", rand::random::<u32>()));
    std::fs::create_dir_all(&d).expect("temp dir");
    TempDir(d)
}

fn config(dir: &Path) -> Config {
    Config {
        rules: RulesConfig { node_name: "node-a".into(), ..RulesConfig::default() },
        nft: fake_nft(dir),
        coalesce: Duration::from_millis(100),
        min_sync_period: Duration::from_millis(300),
        check_period: Duration::from_millis(100),
        ..Config::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bursts_are_coalesced_and_unchanged_rules_are_not_reapplied() {
    let tmp = temp_dir();
    let dir = tmp.0.clone();
    let api = rkube_apiserver::testing::TestServer::start().await;
    let client = api.client().await;
    let services: Api<Service> = Api::namespaced(client.clone(), "default");
    let shutdown = CancellationToken::new();
    let _stop = shutdown.clone().drop_guard();
    let proxy = tokio::spawn(rkube_proxy::run(client, config(&dir), shutdown.clone()));

    // The first apply replaces the table with the state as listed.
    wait_for("first apply", Duration::from_secs(10), || applies(&dir).len() == 1).await;
    let first = &applies(&dir)[0];
    assert!(first.starts_with("add table ip rkube\ndelete table ip rkube\n"), "{first}");
    assert!(first.contains("10.96.0.1 . tcp . 443"), "the default kubernetes Service: {first}");

    // A burst of 10 Services lands in few applies; after the first, each apply only adds what
    // is new, so together they hold every Service once.
    for i in 0..10 {
        services
            .create(&PostParams::default(), &service(&format!("s{i}"), &format!("10.96.1.{i}")))
            .await
            .expect("create");
    }
    let since_first = |dir: &Path| applies(dir)[1..].concat();
    wait_for("the burst applied", Duration::from_secs(10), || {
        since_first(&dir).contains("10.96.1.9 . tcp . 80")
    })
    .await;
    let after_burst = applies(&dir).len();
    assert!(after_burst <= 4, "10 creations took {} applies", after_burst - 1);
    let updates = since_first(&dir);
    assert!(!updates.contains("delete table"), "updates leave the table in place: {updates}");
    for i in 0..10 {
        let elem = format!("10.96.1.{i} . tcp . 80 : goto reject-chain");
        assert_eq!(updates.matches(&elem).count(), 1, "s{i} added once: {updates}");
    }

    // A change that does not alter the rules (a label), and the periodic checks, apply nothing.
    let label = json!({"metadata": {"labels": {"touched": "yes"}}});
    services.patch("s0", &PatchParams::default(), &Patch::Merge(&label)).await.expect("patch");
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(applies(&dir).len(), after_burst);

    // A deletion is applied as the removal of its elements, and only that.
    services.delete("s3", &Default::default()).await.expect("delete");
    wait_for("deletion applied", Duration::from_secs(10), || applies(&dir).len() > after_burst)
        .await;
    let deletion = applies(&dir).pop().expect("last");
    assert_eq!(
        deletion,
        "delete element ip rkube no-endpoint-services { 10.96.1.3 . tcp . 80 }\n\
         delete element ip rkube cluster-ips { 10.96.1.3 }\n"
    );

    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(10), proxy)
        .await
        .expect("stops")
        .expect("join")
        .expect("run");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_apply_is_retried_until_it_succeeds() {
    let tmp = temp_dir();
    let dir = tmp.0.clone();
    std::fs::write(dir.join("fail-next"), "").expect("arm failure");
    let api = rkube_apiserver::testing::TestServer::start().await;
    let client = api.client().await;
    let shutdown = CancellationToken::new();
    let _stop = shutdown.clone().drop_guard();
    let proxy = tokio::spawn(rkube_proxy::run(client, config(&dir), shutdown.clone()));

    // The first attempt fails (and consumes the marker); the retry, with no change to
    // trigger it, succeeds.
    wait_for("retry after failure", Duration::from_secs(10), || applies(&dir).len() == 1).await;
    assert!(!dir.join("fail-next").exists());

    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(10), proxy)
        .await
        .expect("stops")
        .expect("join")
        .expect("run");
}
