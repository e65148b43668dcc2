//! Records core/v1 Events the way upstream's recorder does: one Event per (object, reason,
//! message), repeats fold into `count` and `lastTimestamp` so `describe` shows "(x12 over 15m)".

use std::collections::HashMap;
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Event, EventSource, ObjectReference};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Patch, PatchParams, PostParams};
use kube::{Api, Client};
use tokio::sync::mpsc;

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

/// Writers per recorder: events go to a writer by their key, so one event's repeats are
/// written in order by one writer while different events are written concurrently.
const WRITERS: usize = 8;
/// Events queued per writer before `record` waits (backpressure, never a silent drop).
const QUEUE: usize = 1024;

/// An event to write, stamped when it was recorded.
struct Pending {
    obj: ObjectReference,
    type_: String,
    reason: String,
    message: String,
    at: k8s_openapi::apimachinery::pkg::apis::meta::v1::Time,
}

/// Records events without waiting for them to be written, as upstream's broadcaster: `record`
/// queues the event (stamped with the time of the call) and returns; writers started on first
/// use write it, and finish their queues when the last clone of the recorder is dropped.
#[derive(Clone)]
pub struct Recorder {
    writer: Arc<Writer>,
    queues: Arc<std::sync::OnceLock<Vec<mpsc::Sender<Pending>>>>,
}

struct Writer {
    client: Client,
    component: String,
    host: Option<String>,
}

impl Recorder {
    pub fn new(client: Client, component: &str, host: Option<&str>) -> Recorder {
        Recorder {
            writer: Arc::new(Writer {
                client,
                component: component.to_string(),
                host: host.map(String::from),
            }),
            queues: Arc::default(),
        }
    }

    /// Records `reason`/`message` about `obj` (type "Normal" or "Warning"). The event is
    /// written in the background; failures are logged, never returned: an event is best
    /// effort, as upstream.
    pub async fn record(&self, obj: &ObjectReference, type_: &str, reason: &str, message: &str) {
        let message = truncate(message);
        let key = (obj.uid.clone().unwrap_or_default(), reason.to_string(), message.clone());
        let queues = self.queues.get_or_init(|| {
            (0..WRITERS)
                .map(|_| {
                    let (tx, rx) = mpsc::channel(QUEUE);
                    tokio::spawn(write_all(self.writer.clone(), rx));
                    tx
                })
                .collect()
        });
        let shard = {
            use std::hash::{BuildHasher, BuildHasherDefault, DefaultHasher};
            BuildHasherDefault::<DefaultHasher>::default().hash_one(&key) as usize % WRITERS
        };
        let pending = Pending {
            obj: obj.clone(),
            type_: type_.to_string(),
            reason: reason.to_string(),
            message,
            at: crate::now_time(),
        };
        if queues[shard].send(pending).await.is_err() {
            tracing::debug!("event {reason} for {:?} not recorded: writer gone", obj.name);
        }
    }
}

/// One writer: its events in the order recorded, with the repeats it has written folded.
async fn write_all(w: Arc<Writer>, mut rx: mpsc::Receiver<Pending>) {
    let mut seen: HashMap<EventKey, Recorded> = HashMap::new();
    while let Some(p) = rx.recv().await {
        if let Err(e) = w.write(&mut seen, &p).await {
            tracing::debug!("event {} for {:?} not recorded: {e}", p.reason, p.obj.name);
        }
    }
}

impl Writer {
    async fn write(
        &self,
        seen: &mut HashMap<EventKey, Recorded>,
        p: &Pending,
    ) -> Result<(), kube::Error> {
        let obj = &p.obj;
        let ns =
            obj.namespace.clone().filter(|n| !n.is_empty()).unwrap_or_else(|| "default".into());
        let api: Api<Event> = Api::namespaced(self.client.clone(), &ns);
        let key = (obj.uid.clone().unwrap_or_default(), p.reason.clone(), p.message.clone());
        let now = p.at.clone();
        if let Some((name, _ns, count)) = seen.get(&key).cloned() {
            let patch = serde_json::json!({"count": count + 1, "lastTimestamp": now});
            match api.patch(&name, &PatchParams::default(), &Patch::Merge(&patch)).await {
                Ok(_) => {
                    seen.insert(key, (name, ns, count + 1));
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
            reason: Some(p.reason.clone()),
            message: Some(p.message.clone()),
            type_: Some(p.type_.clone()),
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
