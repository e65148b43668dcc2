//! The small toolkit every rkube component that talks to the API server shares: resource
//! quantities, an event recorder that aggregates repeats, and leader leases.

pub mod events;
pub mod lease;
pub mod quantity;
pub mod watch;

pub use watch::WatchBackoff;

use std::collections::BTreeMap;
use std::path::Path;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use tokio_util::sync::CancellationToken;

/// `now` as Kubernetes writes timestamps (RFC 3339, seconds).
/// A Node's Ready condition status ("True", "False", "Unknown"); empty when it has none yet.
pub fn node_ready(node: &k8s_openapi::api::core::v1::Node) -> &str {
    node.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .and_then(|c| c.iter().find(|c| c.type_ == "Ready"))
        .map_or("", |c| c.status.as_str())
}

pub fn now_time() -> k8s_openapi::apimachinery::pkg::apis::meta::v1::Time {
    k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(jiff::Timestamp::now())
}

pub fn now_micro() -> k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime {
    k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime(jiff::Timestamp::now())
}

/// A client from `--kubeconfig`, or the usual discovery (in-cluster, `$KUBECONFIG`, ~/.kube).
pub async fn client_from(
    kubeconfig: Option<&Path>,
) -> Result<kube::Client, Box<dyn std::error::Error + Send + Sync>> {
    Ok(match kubeconfig {
        Some(p) => {
            let kc = kube::config::Kubeconfig::read_from(p)?;
            kube::Client::try_from(
                kube::Config::from_custom_kubeconfig(kc, &Default::default()).await?,
            )?
        }
        None => kube::Client::try_default().await?,
    })
}

/// A token cancelled on Ctrl-C or SIGTERM: how a standalone component learns to stop.
pub fn shutdown_on_signal() -> CancellationToken {
    let token = CancellationToken::new();
    let stop = token.clone();
    tokio::spawn(async move {
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending::<()>().await } } => {}
        }
        stop.cancel();
    });
    token
}

/// Whether `labels` satisfy a `metav1.LabelSelector`; an empty selector matches nothing here,
/// as for controllers (a workload never adopts every pod).
pub fn selector_matches(sel: &LabelSelector, labels: &BTreeMap<String, String>) -> bool {
    let non_empty = sel.match_labels.as_ref().is_some_and(|m| !m.is_empty())
        || sel.match_expressions.as_ref().is_some_and(|m| !m.is_empty());
    let ml = sel.match_labels.iter().flatten().all(|(k, v)| labels.get(k) == Some(v));
    let me = sel.match_expressions.iter().flatten().all(|e| {
        let v = labels.get(&e.key);
        let vals = e.values.as_deref().unwrap_or_default();
        match e.operator.as_str() {
            "In" => v.is_some_and(|v| vals.contains(v)),
            "NotIn" => v.is_none_or(|v| !vals.contains(v)),
            "Exists" => v.is_some(),
            "DoesNotExist" => v.is_none(),
            _ => false,
        }
    });
    non_empty && ml && me
}
