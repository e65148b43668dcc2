//! ServiceAccount controller: every active namespace has a `default` ServiceAccount — the ones
//! bootstrapped with the cluster, every one created later, and again after a user deletes it.

use std::time::Duration;

use k8s_openapi::api::core::v1::{Namespace, ServiceAccount};
use kube::api::PostParams;
use kube::{Api, Client, ResourceExt};
use tokio_util::sync::CancellationToken;

use crate::informer::{Informers, next_pass};

const DEFAULT: &str = "default";

pub async fn run(client: Client, inf: Informers, shutdown: CancellationToken) {
    let mut changed = inf.changed.clone();
    loop {
        for ns in missing_default(&inf.namespaces.state(), &inf.serviceaccounts.state()) {
            let api: Api<ServiceAccount> = Api::namespaced(client.clone(), &ns);
            let sa = ServiceAccount {
                metadata: kube::api::ObjectMeta {
                    name: Some(DEFAULT.into()),
                    ..Default::default()
                },
                ..Default::default()
            };
            match api.create(&PostParams::default(), &sa).await {
                Ok(_) => tracing::debug!("created the default ServiceAccount of {ns}"),
                // Already there (the informer lags), or the namespace is terminating or gone.
                Err(kube::Error::Api(e)) if matches!(e.code, 403 | 404 | 409) => {}
                Err(e) => tracing::warn!("creating the default ServiceAccount of {ns}: {e}"),
            }
        }
        if !next_pass(&mut changed, Duration::from_secs(30), &shutdown).await {
            return;
        }
    }
}

/// Active namespaces without a `default` ServiceAccount (a terminating one gets none: its
/// content is being removed).
fn missing_default(
    namespaces: &[std::sync::Arc<Namespace>],
    accounts: &[std::sync::Arc<ServiceAccount>],
) -> Vec<String> {
    let mut out: Vec<String> = namespaces
        .iter()
        .filter(|ns| {
            ns.metadata.deletion_timestamp.is_none()
                && ns.status.as_ref().and_then(|s| s.phase.as_deref()) != Some("Terminating")
        })
        .map(|ns| ns.name_any())
        .filter(|ns| {
            !accounts
                .iter()
                .any(|sa| sa.name_any() == DEFAULT && sa.namespace().as_deref() == Some(ns))
        })
        .collect();
    out.sort();
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn ns(name: &str, phase: &str) -> Arc<Namespace> {
        Arc::new(
            serde_json::from_value(
                serde_json::json!({"metadata": {"name": name}, "status": {"phase": phase}}),
            )
            .expect("namespace"),
        )
    }

    fn sa(ns: &str, name: &str) -> Arc<ServiceAccount> {
        Arc::new(
            serde_json::from_value(
                serde_json::json!({"metadata": {"name": name, "namespace": ns}}),
            )
            .expect("serviceaccount"),
        )
    }

    #[test]
    fn only_active_namespaces_without_a_default_account_need_one() {
        let namespaces = [ns("a", "Active"), ns("b", "Active"), ns("c", "Terminating")];
        let accounts = [sa("a", "default"), sa("b", "robot"), sa("x", "default")];
        assert_eq!(missing_default(&namespaces, &accounts), ["b"]);
    }
}
