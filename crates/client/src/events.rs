//! Records core/v1 Events the way upstream's recorder does: one Event per (object, reason,
//! message), repeats fold into `count` and `lastTimestamp` so `describe` shows "(x12 over 15m)".

use std::collections::HashMap;
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Event, EventSource, ObjectReference};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Patch, PatchParams, PostParams};
use kube::{Api, Client};
use tokio::sync::Mutex;

/// Messages are cut at 1024 characters with " ...", as upstream.
pub fn truncate(msg: &str) -> String {
    if msg.chars().count() <= 1024 {
        return msg.to_string();
    }
    let cut: String = msg.chars().take(1020).collect();
    format!("{cut} ...")
}

/// (object uid, reason, message): what makes two events the same event.
type EventKey = (String, String, String);
/// (event name, namespace, count) of an event already written.
type Recorded = (String, String, i32);

#[derive(Clone)]
pub struct Recorder {
    client: Client,
    component: String,
    host: Option<String>,
    seen: Arc<Mutex<HashMap<EventKey, Recorded>>>,
}

impl Recorder {
    pub fn new(client: Client, component: &str, host: Option<&str>) -> Recorder {
        Recorder {
            client,
            component: component.to_string(),
            host: host.map(String::from),
            seen: Arc::new(Mutex::new(HashMap::new())),
        }
    }

    /// Records `reason`/`message` about `obj` (type "Normal" or "Warning"); failures are logged,
    /// never returned: an event is best effort, as upstream.
    pub async fn record(&self, obj: &ObjectReference, type_: &str, reason: &str, message: &str) {
        if let Err(e) = self.try_record(obj, type_, reason, message).await {
            tracing::debug!("event {reason} for {:?} not recorded: {e}", obj.name);
        }
    }

    async fn try_record(
        &self,
        obj: &ObjectReference,
        type_: &str,
        reason: &str,
        message: &str,
    ) -> Result<(), kube::Error> {
        let ns =
            obj.namespace.clone().filter(|n| !n.is_empty()).unwrap_or_else(|| "default".into());
        let api: Api<Event> = Api::namespaced(self.client.clone(), &ns);
        let message = truncate(message);
        let key = (obj.uid.clone().unwrap_or_default(), reason.to_string(), message.clone());
        let now = crate::now_time();
        // The lock covers only the bookkeeping, never an API call: events about different
        // objects are written concurrently (the scheduler records one per binding).
        let known = self.seen.lock().await.get(&key).cloned();
        if let Some((name, _ns, count)) = known {
            let patch = serde_json::json!({"count": count + 1, "lastTimestamp": now});
            match api.patch(&name, &PatchParams::default(), &Patch::Merge(&patch)).await {
                Ok(_) => {
                    self.seen.lock().await.insert(key, (name, ns, count + 1));
                    return Ok(());
                }
                Err(kube::Error::Api(e)) if e.code == 404 => {}
                Err(e) => return Err(e),
            }
        }
        let name = format!(
            "{}.{:x}",
            obj.name.clone().unwrap_or_default(),
            (jiff::Timestamp::now().as_nanosecond() as u64)
                ^ (uuid::Uuid::new_v4().as_u128() as u64 & 0xffff)
        );
        let ev = Event {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                namespace: Some(ns.clone()),
                ..Default::default()
            },
            involved_object: obj.clone(),
            reason: Some(reason.to_string()),
            message: Some(message),
            type_: Some(type_.to_string()),
            first_timestamp: Some(now.clone()),
            last_timestamp: Some(now),
            count: Some(1),
            source: Some(EventSource {
                component: Some(self.component.clone()),
                host: self.host.clone(),
            }),
            reporting_component: Some(self.component.clone()),
            reporting_instance: Some(self.host.clone().unwrap_or_else(|| self.component.clone())),
            ..Default::default()
        };
        api.create(&PostParams::default(), &ev).await?;
        let mut seen = self.seen.lock().await;
        if seen.len() > 4096 {
            seen.clear();
        }
        seen.insert(key, (name, ns, 1));
        Ok(())
    }
}

/// An ObjectReference to any typed object.
pub fn reference<K: kube::Resource<DynamicType = ()>>(obj: &K) -> ObjectReference {
    let meta = obj.meta();
    ObjectReference {
        api_version: Some(K::api_version(&()).to_string()),
        kind: Some(K::kind(&()).to_string()),
        name: meta.name.clone(),
        namespace: meta.namespace.clone(),
        uid: meta.uid.clone(),
        resource_version: meta.resource_version.clone(),
        field_path: None,
    }
}
