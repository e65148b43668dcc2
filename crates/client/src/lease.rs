//! Leader leases in kube-system: whoever renews `kube-scheduler` / `kube-controller-manager`
//! leads, and `kubectl get componentstatuses` reads those leases to report health.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Patch, PatchParams, PostParams};
use kube::{Api, Client};
use tokio_util::sync::CancellationToken;

/// Acquires (waiting while another live holder owns it) and then renews the lease every
/// `duration / 5` until `shutdown`. Returns once leadership is held; renewal runs in the
/// background. The returned token is cancelled when leadership is lost: another holder took
/// the lease, or renewals kept failing for two thirds of `duration` (upstream's renew deadline
/// is 10 s of a 15 s lease) — the leader must stop acting then.
pub async fn lead(
    client: Client,
    name: &str,
    identity: &str,
    duration: Duration,
    shutdown: CancellationToken,
) -> CancellationToken {
    let lost = CancellationToken::new();
    let api: Api<Lease> = Api::namespaced(client, "kube-system");
    let secs = duration.as_secs().max(1) as i32;
    loop {
        if shutdown.is_cancelled() {
            return lost;
        }
        match try_acquire(&api, name, identity, secs).await {
            Ok(true) => break,
            Ok(false) => {}
            Err(e) => tracing::debug!("lease {name}: {e}"),
        }
        tokio::select! {
            _ = shutdown.cancelled() => return lost,
            _ = tokio::time::sleep(duration / 5) => {}
        }
    }
    let name = name.to_string();
    let identity = identity.to_string();
    let signal = lost.clone();
    tokio::spawn(async move {
        let mut renewed = tokio::time::Instant::now();
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(duration / 5) => {}
            }
            match try_acquire(&api, &name, &identity, secs).await {
                Ok(true) => renewed = tokio::time::Instant::now(),
                Ok(false) => {
                    tracing::warn!("lease {name}: another holder took it; leadership lost");
                    signal.cancel();
                    return;
                }
                Err(e) => {
                    tracing::debug!("renewing lease {name}: {e}");
                    if renewed.elapsed() >= duration * 2 / 3 {
                        tracing::warn!("lease {name}: not renewed in time; leadership lost");
                        signal.cancel();
                        return;
                    }
                }
            }
        }
    });
    lost
}

/// Leads and works, for a component that must act only while it holds the lease `name`:
/// waits to acquire it, runs `work` with a token that is cancelled when leadership is lost (or
/// on `shutdown`), and after a loss waits to lead again. Returns on `shutdown`.
pub async fn run_while_leading<F, Fut>(
    client: Client,
    name: &str,
    identity: &str,
    duration: Duration,
    shutdown: CancellationToken,
    mut work: F,
) where
    F: FnMut(CancellationToken) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    loop {
        let lost = lead(client.clone(), name, identity, duration, shutdown.clone()).await;
        if shutdown.is_cancelled() {
            return;
        }
        let leading = shutdown.child_token();
        let guard = {
            let leading = leading.clone();
            tokio::spawn(async move {
                lost.cancelled().await;
                leading.cancel();
            })
        };
        work(leading).await;
        guard.abort();
        if shutdown.is_cancelled() {
            return;
        }
        tracing::warn!(
            "lease {name}: stopped working after losing leadership; waiting to lead again"
        );
    }
}

async fn try_acquire(
    api: &Api<Lease>,
    name: &str,
    identity: &str,
    secs: i32,
) -> Result<bool, kube::Error> {
    let now = crate::now_micro();
    match api.get_opt(name).await? {
        None => {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(name.into()),
                    namespace: Some("kube-system".into()),
                    ..Default::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(identity.into()),
                    lease_duration_seconds: Some(secs),
                    acquire_time: Some(now.clone()),
                    renew_time: Some(now),
                    lease_transitions: Some(0),
                    ..Default::default()
                }),
            };
            match api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(true),
                Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
                Err(e) => Err(e),
            }
        }
        Some(l) => {
            let spec = l.spec.clone().unwrap_or_default();
            let holder = spec.holder_identity.clone().unwrap_or_default();
            let expired = spec.renew_time.as_ref().is_none_or(|t| {
                jiff::Timestamp::now().as_second() - t.0.as_second()
                    > spec.lease_duration_seconds.unwrap_or(secs) as i64
            });
            if holder != identity && !expired {
                return Ok(false);
            }
            let transitions = spec.lease_transitions.unwrap_or(0) + i32::from(holder != identity);
            let mut patch = serde_json::json!({
                "metadata": {"resourceVersion": l.metadata.resource_version},
                "spec": {"holderIdentity": identity, "leaseDurationSeconds": secs, "renewTime": now, "leaseTransitions": transitions},
            });
            if holder != identity {
                patch["spec"]["acquireTime"] = serde_json::json!(now);
            }
            match api.patch(name, &PatchParams::default(), &Patch::Merge(&patch)).await {
                Ok(_) => Ok(true),
                Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
                Err(e) => Err(e),
            }
        }
    }
}
