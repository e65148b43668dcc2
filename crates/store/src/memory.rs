//! An in-memory MVCC backend: the reference model of the `Store` semantics.
//! Not durable; used by unit tests and as the oracle the conformance suite is checked against.

use crate::{
    Error, KeyValue, ListOptions, ListPage, MAX_VALUE_BYTES, ReadAt, Result, Revision, Store,
    WatchEvent, WatchStream, continue_token,
};
use bytes::Bytes;
use std::collections::BTreeMap;
use std::sync::Mutex;
use tokio::sync::broadcast;

/// Events buffered per watcher before it is closed as too slow.
pub const WATCH_BUFFER: usize = 4096;

#[derive(Default)]
struct State {
    rev: Revision,
    compacted: Revision,
    /// key → versions, oldest first; `None` marks a delete (tombstone).
    versions: BTreeMap<String, Vec<(Revision, Option<KeyValue>)>>,
    /// Every event after `compacted`, in revision order.
    log: Vec<WatchEvent>,
}

pub struct MemoryStore {
    state: Mutex<State>,
    events: broadcast::Sender<WatchEvent>,
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryStore {
    pub fn new() -> Self {
        let (events, _) = broadcast::channel(WATCH_BUFFER);
        MemoryStore { state: Mutex::new(State::default()), events }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The latest value of `key`, if it exists.
    pub(crate) fn latest_kv(&self, key: &str) -> Option<KeyValue> {
        self.lock().latest(key).cloned()
    }

    /// Records events a durable backend has already committed (revisions assigned by it), in
    /// order, and broadcasts them to watchers.
    pub(crate) fn apply_committed(&self, events: &[WatchEvent]) {
        let mut st = self.lock();
        for e in events {
            st.rev = e.revision();
            match e {
                WatchEvent::Put { kv, .. } => {
                    st.record(&kv.key.clone(), Some(kv.clone()), e.clone())
                }
                WatchEvent::Delete { prev, .. } => st.record(&prev.key.clone(), None, e.clone()),
                WatchEvent::Progress { .. } => {}
            }
        }
        for e in events {
            let _ = self.events.send(e.clone());
        }
    }

    /// Rebuilds the model from a durable backend at open: `base` holds the values that were
    /// current at the compaction point, `history` every later event in revision order.
    pub(crate) fn restore(
        &self,
        rev: Revision,
        compacted: Revision,
        base: Vec<KeyValue>,
        history: Vec<WatchEvent>,
    ) {
        let mut st = self.lock();
        st.compacted = compacted;
        for kv in base {
            st.versions.entry(kv.key.clone()).or_default().push((kv.mod_revision, Some(kv)));
        }
        for e in history {
            st.rev = e.revision();
            match &e {
                WatchEvent::Put { kv, .. } => {
                    st.record(&kv.key.clone(), Some(kv.clone()), e.clone())
                }
                WatchEvent::Delete { prev, .. } => st.record(&prev.key.clone(), None, e.clone()),
                WatchEvent::Progress { .. } => {}
            }
        }
        st.rev = rev.max(st.rev);
    }
}

impl State {
    fn latest(&self, key: &str) -> Option<&KeyValue> {
        self.versions.get(key)?.last()?.1.as_ref()
    }

    fn at(&self, key: &str, rev: Revision) -> Option<&KeyValue> {
        let versions = self.versions.get(key)?;
        versions.iter().rev().find(|(r, _)| *r <= rev)?.1.as_ref()
    }

    fn resolve(&self, at: ReadAt) -> Result<Revision> {
        match at {
            ReadAt::Latest => Ok(self.rev),
            ReadAt::Exact(r) if r > self.rev => {
                Err(Error::FutureRevision { requested: r, current: self.rev })
            }
            ReadAt::Exact(r) if r < self.compacted => {
                Err(Error::Compacted { requested: r, compacted: self.compacted })
            }
            ReadAt::Exact(r) => Ok(r),
        }
    }

    fn record(&mut self, key: &str, kv: Option<KeyValue>, event: WatchEvent) {
        self.versions.entry(key.to_string()).or_default().push((self.rev, kv));
        self.log.push(event);
    }
}

fn check_size(value: &Bytes) -> Result<()> {
    if value.len() > MAX_VALUE_BYTES {
        return Err(Error::ValueTooLarge { size: value.len(), limit: MAX_VALUE_BYTES });
    }
    Ok(())
}

#[async_trait::async_trait]
impl Store for MemoryStore {
    async fn get(&self, key: &str, at: ReadAt) -> Result<Option<KeyValue>> {
        let st = self.lock();
        let rev = st.resolve(at)?;
        Ok(st.at(key, rev).cloned())
    }

    async fn list(&self, prefix: &str, opts: ListOptions) -> Result<ListPage> {
        let st = self.lock();
        let (at, start) = match &opts.continue_token {
            Some(token) => {
                let (rev, start) = continue_token::decode(token)?;
                (ReadAt::Exact(rev), Some(start))
            }
            None => (opts.at, None),
        };
        let rev = st.resolve(at)?;
        let limit = opts.limit.filter(|l| *l > 0).map(|l| l as usize);
        let mut items = Vec::new();
        let mut remaining = 0u64;
        let lower = start.clone().unwrap_or_else(|| prefix.to_string());
        for (key, _) in st.versions.range(lower..) {
            if !key.starts_with(prefix) {
                break;
            }
            if start.as_deref() == Some(key.as_str()) {
                continue;
            }
            if let Some(kv) = st.at(key, rev) {
                if limit.is_some_and(|l| items.len() >= l) {
                    remaining += 1;
                } else {
                    items.push(kv.clone());
                }
            }
        }
        let continue_token = (remaining > 0)
            .then(|| items.last().map(|kv| continue_token::encode(rev, &kv.key)))
            .flatten();
        Ok(ListPage { items, revision: rev, continue_token, remaining: limit.map(|_| remaining) })
    }

    async fn create(&self, key: &str, value: Bytes) -> Result<Revision> {
        check_size(&value)?;
        let mut st = self.lock();
        if st.latest(key).is_some() {
            return Err(Error::AlreadyExists);
        }
        st.rev = st.rev.next();
        let kv =
            KeyValue { key: key.to_string(), value, create_revision: st.rev, mod_revision: st.rev };
        let event = WatchEvent::Put { kv: kv.clone(), prev: None };
        st.record(key, Some(kv), event.clone());
        let _ = self.events.send(event);
        Ok(st.rev)
    }

    async fn update(&self, key: &str, value: Bytes, expected: Revision) -> Result<Revision> {
        check_size(&value)?;
        let mut st = self.lock();
        let prev = st.latest(key).cloned().ok_or(Error::NotFound)?;
        if prev.mod_revision != expected {
            return Err(Error::Conflict { current: prev.mod_revision });
        }
        st.rev = st.rev.next();
        let kv = KeyValue {
            key: key.to_string(),
            value,
            create_revision: prev.create_revision,
            mod_revision: st.rev,
        };
        let event = WatchEvent::Put { kv: kv.clone(), prev: Some(prev) };
        st.record(key, Some(kv), event.clone());
        let _ = self.events.send(event);
        Ok(st.rev)
    }

    async fn delete(&self, key: &str, expected: Option<Revision>) -> Result<(Revision, KeyValue)> {
        let mut st = self.lock();
        let prev = st.latest(key).cloned().ok_or(Error::NotFound)?;
        if let Some(expected) = expected
            && prev.mod_revision != expected
        {
            return Err(Error::Conflict { current: prev.mod_revision });
        }
        st.rev = st.rev.next();
        let event = WatchEvent::Delete { revision: st.rev, prev: prev.clone() };
        st.record(key, None, event.clone());
        let _ = self.events.send(event);
        Ok((st.rev, prev))
    }

    async fn watch(&self, prefix: &str, after: Revision) -> Result<WatchStream> {
        // Subscribe and replay under one lock, so no event falls between the two.
        let st = self.lock();
        if after < st.compacted {
            return Err(Error::Compacted { requested: after, compacted: st.compacted });
        }
        let live = self.events.subscribe();
        let backlog: Vec<WatchEvent> = st
            .log
            .iter()
            .filter(|e| e.revision() > after && e.key().is_some_and(|k| k.starts_with(prefix)))
            .cloned()
            .collect();
        let last = st.rev;
        drop(st);
        Ok(live_stream(backlog, last, prefix.to_string(), live))
    }

    async fn compact(&self, up_to: Revision) -> Result<()> {
        let mut st = self.lock();
        if up_to > st.rev {
            return Err(Error::FutureRevision { requested: up_to, current: st.rev });
        }
        if up_to <= st.compacted {
            return Err(Error::Compacted { requested: up_to, compacted: st.compacted });
        }
        st.compacted = up_to;
        st.log.retain(|e| e.revision() > up_to);
        st.versions.retain(|_, versions| {
            // Keep the newest version at or before `up_to` (readable at up_to) and all later ones.
            let keep_from = versions.iter().rposition(|(r, _)| *r <= up_to).unwrap_or(0);
            versions.drain(..keep_from);
            !(versions.len() == 1 && versions[0].1.is_none())
        });
        Ok(())
    }

    async fn current_revision(&self) -> Result<Revision> {
        Ok(self.lock().rev)
    }

    async fn compacted_revision(&self) -> Result<Revision> {
        Ok(self.lock().compacted)
    }
}

/// How long a watch stays silent before it reports progress.
pub const PROGRESS_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);

/// Replays `backlog`, then follows the broadcast from revision `last`, filtered by prefix.
/// Closes with `WatcherTooSlow` when the receiver lagged (its buffer overflowed).
pub(crate) fn live_stream(
    backlog: Vec<WatchEvent>,
    last: Revision,
    prefix: String,
    live: broadcast::Receiver<WatchEvent>,
) -> WatchStream {
    use futures::StreamExt;
    struct S {
        live: broadcast::Receiver<WatchEvent>,
        prefix: String,
        /// Highest revision seen on the broadcast (any prefix).
        seen: Revision,
        /// Highest revision reported to the consumer.
        reported: Revision,
        done: bool,
    }
    let reported = backlog.last().map(|e| e.revision()).unwrap_or(Revision::ZERO);
    let replay = futures::stream::iter(backlog.into_iter().map(Ok));
    let state = S { live, prefix, seen: last, reported, done: false };
    let follow = futures::stream::unfold(state, |mut s| async move {
        loop {
            if s.done {
                return None;
            }
            match tokio::time::timeout(PROGRESS_INTERVAL, s.live.recv()).await {
                Err(_elapsed) => {
                    if s.seen > s.reported {
                        s.reported = s.seen;
                        let revision = s.seen;
                        return Some((Ok(WatchEvent::Progress { revision }), s));
                    }
                }
                Ok(Ok(event)) => {
                    let rev = event.revision();
                    if rev <= s.seen {
                        continue; // already replayed from the log
                    }
                    s.seen = rev;
                    if event.key().is_some_and(|k| k.starts_with(&s.prefix)) {
                        s.reported = rev;
                        return Some((Ok(event), s));
                    }
                }
                Ok(Err(broadcast::error::RecvError::Lagged(_))) => {
                    s.done = true;
                    return Some((Err(Error::WatcherTooSlow), s));
                }
                Ok(Err(broadcast::error::RecvError::Closed)) => return None,
            }
        }
    });
    replay.chain(follow).boxed()
}
