//! Records core/v1 Events the way upstream's recorder does: one Event per (object, reason,
//! message), repeats fold into `count` and `lastTimestamp` so `describe` shows "(x12 over 15m)";
//! and, as upstream's event correlator, many distinct messages of one reason about one object
//! fold into one "(combined from similar events)" Event, and an object's events beyond a burst
//! are dropped (its spam filter).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

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

/// (object uid, reason, message): what makes two events the same event. A combined event has
/// `"\0combined\0" + type` for its message part, so every message it stands for folds into it.
type EventKey = (String, String, String);
/// (event name, namespace, count) of an event already written.
type Recorded = (String, String, i32);

/// Writers per recorder: events go to a writer by their key, so one event's repeats are
/// written in order by one writer while different events are written concurrently.
const WRITERS: usize = 8;
/// Events queued per writer before `record` waits (backpressure, never a silent drop).
const QUEUE: usize = 1024;

/// Events an object may have in a burst before the spam filter drops them (upstream's default).
const SPAM_BURST: f64 = 25.0;
/// Events an object's allowance grows by a second once spent: one every five minutes.
const SPAM_REFILL_PER_SECOND: f64 = 1.0 / 300.0;
/// Distinct messages of one (object, type, reason) within [`AGGREGATE_WINDOW`] from which on
/// they are combined into one event.
const AGGREGATE_AFTER: usize = 10;
const AGGREGATE_WINDOW: Duration = Duration::from_secs(600);
/// Entries the correlator keeps before it forgets the half used least recently (upstream's LRU
/// holds 4096).
const REMEMBERED: usize = 4096;

/// What the correlator made of a recorded event.
#[derive(Debug, PartialEq)]
struct Correlated {
    key: EventKey,
    message: String,
    /// Dropped by the spam filter: counted into an event already written, never written itself.
    skip: bool,
}

/// Upstream's event correlator, per recorder: aggregation of similar events, then a token bucket
/// per object (burst 25, one more every 5 minutes).
#[derive(Default)]
struct Correlator {
    /// (object, type, reason) → the distinct messages seen and when the last one was.
    similar: HashMap<(String, String, String), (HashSet<String>, Instant)>,
    /// object → (tokens, when they were counted).
    spam: HashMap<String, (f64, Instant)>,
}

impl Correlator {
    fn correlate(
        &mut self,
        obj: &ObjectReference,
        type_: &str,
        reason: &str,
        message: String,
        now: Instant,
    ) -> Correlated {
        let object = format!(
            "{}\0{}\0{}\0{}\0{}",
            obj.kind.as_deref().unwrap_or_default(),
            obj.namespace.as_deref().unwrap_or_default(),
            obj.name.as_deref().unwrap_or_default(),
            obj.uid.as_deref().unwrap_or_default(),
            obj.api_version.as_deref().unwrap_or_default(),
        );
        let uid = obj.uid.clone().unwrap_or_default();
        forget_least_recent(&mut self.similar, |(_, last)| *last);
        let similar = self
            .similar
            .entry((object.clone(), type_.to_string(), reason.to_string()))
            .or_insert_with(|| (HashSet::new(), now));
        if now.duration_since(similar.1) > AGGREGATE_WINDOW {
            similar.0.clear();
        }
        similar.1 = now;
        similar.0.insert(message.clone());
        let (key, message) = if similar.0.len() < AGGREGATE_AFTER {
            ((uid, reason.to_string(), message.clone()), message)
        } else {
            // Keep the set below the threshold, as upstream, so it stays combined.
            if let Some(any) = similar.0.iter().next().cloned() {
                similar.0.remove(&any);
            }
            let key = (uid, reason.to_string(), format!("\0combined\0{type_}"));
            (key, format!("(combined from similar events): {message}"))
        };
        forget_least_recent(&mut self.spam, |(_, at)| *at);
        let bucket = self.spam.entry(object).or_insert((SPAM_BURST, now));
        let refill = now.duration_since(bucket.1).as_secs_f64() * SPAM_REFILL_PER_SECOND;
        bucket.0 = (bucket.0 + refill).min(SPAM_BURST);
        bucket.1 = now;
        let skip = bucket.0 < 1.0;
        if !skip {
            bucket.0 -= 1.0;
        }
        Correlated { key, message: truncate(&message), skip }
    }
}

/// When `map` is full, forgets the half used least recently (as an LRU would; entries quiet
/// for longer than they matter go first).
fn forget_least_recent<K, V>(map: &mut HashMap<K, V>, used: impl Fn(&V) -> Instant) {
    if map.len() < REMEMBERED {
        return;
    }
    let mut times: Vec<Instant> = map.values().map(&used).collect();
    let mid = times.len() / 2;
    let cut = *times.select_nth_unstable(mid).1;
    map.retain(|_, v| used(v) > cut);
}

/// An event to write, stamped when it was recorded.
struct Pending {
    key: EventKey,
    /// Only counted into the event of its key if that was written (the spam filter dropped it).
    skip: bool,
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
    correlator: Arc<Mutex<Correlator>>,
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
            correlator: Arc::default(),
        }
    }

    /// Records `reason`/`message` about `obj` (type "Normal" or "Warning"). The event is
    /// written in the background; failures are logged, never returned: an event is best
    /// effort, as upstream.
    pub async fn record(&self, obj: &ObjectReference, type_: &str, reason: &str, message: &str) {
        let Correlated { key, message, skip } = self
            .correlator
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .correlate(obj, type_, reason, message.to_string(), Instant::now());
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
            key,
            skip,
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
        let key = p.key.clone();
        let now = p.at.clone();
        if p.skip {
            // Upstream counts a dropped event into the event its next repeat patches.
            if let Some(seen) = seen.get_mut(&key) {
                seen.2 += 1;
            }
            return Ok(());
        }
        if let Some((name, _ns, count)) = seen.get(&key).cloned() {
            let patch =
                serde_json::json!({"count": count + 1, "lastTimestamp": now, "message": p.message});
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

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(name: &str) -> ObjectReference {
        ObjectReference {
            kind: Some("Pod".into()),
            namespace: Some("default".into()),
            name: Some(name.into()),
            uid: Some(format!("uid-{name}")),
            api_version: Some("v1".into()),
            ..Default::default()
        }
    }

    #[test]
    fn similar_messages_combine_from_the_tenth_and_an_object_gets_a_burst_of_25() {
        let mut c = Correlator::default();
        let t0 = Instant::now();
        let rs = pod("web");
        let out: Vec<Correlated> = (0..30)
            .map(|i| {
                c.correlate(&rs, "Normal", "SuccessfulCreate", format!("Created pod: web-{i}"), t0)
            })
            .collect();
        // Nine distinct events, then every later message folds into one combined event.
        for (i, o) in out.iter().enumerate().take(9) {
            assert_eq!(o.message, format!("Created pod: web-{i}"));
            assert!(!o.skip);
        }
        let combined = &out[9].key;
        assert_eq!(combined.2, "\0combined\0Normal");
        for (i, o) in out.iter().enumerate().skip(9) {
            assert_eq!(&o.key, combined);
            assert_eq!(o.message, format!("(combined from similar events): Created pod: web-{i}"));
        }
        // 25 pass the spam filter, the rest are dropped ...
        assert_eq!(out.iter().filter(|o| !o.skip).count(), 25);
        assert!(out[25..].iter().all(|o| o.skip));
        // ... other objects are not affected ...
        assert!(!c.correlate(&pod("other"), "Normal", "Scheduled", "x".into(), t0).skip);
        // ... and one more may pass every five minutes.
        let later = t0 + Duration::from_secs(301);
        assert!(!c.correlate(&rs, "Normal", "SuccessfulCreate", "m".into(), later).skip);
        assert!(c.correlate(&rs, "Normal", "SuccessfulCreate", "m".into(), later).skip);
        // After ten quiet minutes messages are distinct again.
        let much_later = later + Duration::from_secs(601);
        let o = c.correlate(&rs, "Warning", "FailedCreate", "e1".into(), much_later);
        assert_eq!((o.key.2.as_str(), o.message.as_str()), ("e1", "e1"));
        let o =
            c.correlate(&rs, "Normal", "SuccessfulCreate", "Created pod: web-0".into(), much_later);
        assert_eq!(o.message, "Created pod: web-0");
    }

    #[test]
    fn a_full_correlator_forgets_the_objects_used_least_recently() {
        let mut c = Correlator::default();
        let t0 = Instant::now();
        let hot = pod("hot");
        for _ in 0..25 {
            c.correlate(&hot, "Normal", "Pulled", "same".into(), t0);
        }
        assert!(c.correlate(&hot, "Normal", "Pulled", "same".into(), t0).skip);
        for i in 0..REMEMBERED {
            let at = t0 + Duration::from_millis(i as u64);
            c.correlate(&pod(&format!("p{i}")), "Normal", "Scheduled", "x".into(), at);
            if i % 100 == 0 {
                // Still spent: the hot object's bucket is remembered while it is in use.
                assert!(c.correlate(&hot, "Normal", "Pulled", "same".into(), at).skip);
            }
        }
        assert!(c.spam.len() < REMEMBERED && c.similar.len() < REMEMBERED);
        let end = t0 + Duration::from_millis(REMEMBERED as u64);
        assert!(c.correlate(&hot, "Normal", "Pulled", "same".into(), end).skip);
    }
}
