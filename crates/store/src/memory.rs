//! An in-memory MVCC backend: the reference model of the `Store` semantics.
//! Not durable; used by unit tests and as the oracle the conformance suite is checked against.

use crate::{
    Error, KeyValue, ListOptions, ListPage, MAX_VALUE_BYTES, ReadAt, Result, Revision, Store,
    WatchEvent, WatchStream, continue_token,
};
use bytes::Bytes;
use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex, Weak};
use tokio::sync::broadcast;

/// Events the broadcast holds for its slowest receiver. A watcher that falls further behind is not
/// closed: it catches up from the history in the log (see [`live_stream`]).
pub const WATCH_BUFFER: usize = 4096;

/// One version of a key: the revision that wrote it and the value, or `None` for a delete.
struct Version {
    rev: Revision,
    val: Option<Val>,
}

struct Val {
    value: Bytes,
    create: Revision,
}

/// The memory layout is what bounds the store's footprint (every object and its history stay in
/// memory): each key's name is one shared allocation (`Arc<str>`) that the version map and the
/// event log both point to; versions carry no copy of it, and the log holds only (revision,
/// key) — the event itself (value, previous value) is rebuilt from the versions when a watch
/// replays it.
#[derive(Default)]
struct State {
    rev: Revision,
    compacted: Revision,
    /// key → versions, oldest first; a `None` value marks a delete (tombstone).
    versions: BTreeMap<Arc<str>, Vec<Version>>,
    /// The key each revision after `compacted` wrote, in revision order.
    log: Vec<(Revision, Arc<str>)>,
}

impl State {
    fn latest(&self, key: &str) -> Option<KeyValue> {
        self.latest_val(key).map(|(rev, v)| kv_of(key, rev, v))
    }

    fn latest_val(&self, key: &str) -> Option<(Revision, &Val)> {
        let v = self.versions.get(key)?.last()?;
        Some((v.rev, v.val.as_ref()?))
    }

    fn at(&self, key: &str, rev: Revision) -> Option<KeyValue> {
        let versions = self.versions.get(key)?;
        let v = versions.iter().rev().find(|v| v.rev <= rev)?;
        Some(kv_of(key, v.rev, v.val.as_ref()?))
    }

    fn at_exists(&self, key: &str, rev: Revision) -> bool {
        self.versions
            .get(key)
            .and_then(|vs| vs.iter().rev().find(|v| v.rev <= rev))
            .is_some_and(|v| v.val.is_some())
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

    /// Records the write of revision `self.rev` to `key`: a value, or a delete (`None`).
    fn record(&mut self, key: &str, val: Option<Val>) {
        let rev = self.rev;
        let key = match self.versions.get_key_value(key) {
            Some((k, _)) => k.clone(),
            None => {
                let k: Arc<str> = Arc::from(key);
                self.versions.insert(k.clone(), Vec::new());
                k
            }
        };
        if let Some(versions) = self.versions.get_mut(&*key) {
            // Most keys have one live version: grow by exactly one, not by doubling.
            versions.reserve_exact(1);
            versions.push(Version { rev, val });
        }
        self.log.push((rev, key));
    }

    /// Records a committed event (revision assigned by the backend that committed it).
    fn record_event(&mut self, e: &WatchEvent) {
        match e {
            WatchEvent::Put { kv, .. } => {
                self.rev = kv.mod_revision;
                let val = Val { value: kv.value.clone(), create: kv.create_revision };
                self.record(&kv.key, Some(val));
            }
            WatchEvent::Delete { revision, prev } => {
                self.rev = *revision;
                self.record(&prev.key, None);
            }
            WatchEvent::Progress { .. } => {}
        }
    }

    /// The event that wrote revision `rev` to `key`, with the value before it, rebuilt from the
    /// versions (`None` if history no longer holds it).
    fn event(&self, key: &str, rev: Revision) -> Option<WatchEvent> {
        let versions = self.versions.get(key)?;
        let i = versions.iter().rposition(|v| v.rev == rev)?;
        let prev = i
            .checked_sub(1)
            .and_then(|p| versions[p].val.as_ref().map(|val| kv_of(key, versions[p].rev, val)));
        match &versions[i].val {
            Some(val) => Some(WatchEvent::Put { kv: kv_of(key, rev, val), prev }),
            None => Some(WatchEvent::Delete { revision: rev, prev: prev? }),
        }
    }
}

/// The model and its broadcast, shared with the watch streams (which hold it weakly, so a dropped
/// store ends its streams).
struct Shared {
    state: Mutex<State>,
    events: broadcast::Sender<WatchEvent>,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The events under `prefix` after revision `after` still in the log, the revision they
    /// reach, and a subscription to everything written later: taken under one lock, so no event
    /// falls between the history and the subscription.
    fn follow(
        &self,
        prefix: &str,
        after: Revision,
    ) -> Result<(VecDeque<WatchEvent>, Revision, broadcast::Receiver<WatchEvent>)> {
        let st = self.lock();
        if after < st.compacted {
            return Err(Error::Compacted { requested: after, compacted: st.compacted });
        }
        let live = self.events.subscribe();
        let from = st.log.partition_point(|(rev, _)| *rev <= after);
        let backlog = st.log[from..]
            .iter()
            .filter(|(_, key)| key.starts_with(prefix))
            .filter_map(|(rev, key)| st.event(key, *rev))
            .collect();
        Ok((backlog, st.rev, live))
    }
}

pub struct MemoryStore {
    shared: Arc<Shared>,
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryStore {
    pub fn new() -> Self {
        let (events, _) = broadcast::channel(WATCH_BUFFER);
        MemoryStore { shared: Arc::new(Shared { state: Mutex::new(State::default()), events }) }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.shared.lock()
    }

    /// The latest value of `key`, if it exists.
    pub(crate) fn latest_kv(&self, key: &str) -> Option<KeyValue> {
        self.lock().latest(key)
    }

    /// Records events a durable backend has already committed (revisions assigned by it), in
    /// order, and broadcasts them to watchers.
    pub(crate) fn apply_committed(&self, events: &[WatchEvent]) {
        let mut st = self.lock();
        for e in events {
            st.record_event(e);
        }
        for e in events {
            let _ = self.shared.events.send(e.clone());
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
            let version = Version {
                rev: kv.mod_revision,
                val: Some(Val { value: kv.value, create: kv.create_revision }),
            };
            match st.versions.get_mut(kv.key.as_str()) {
                Some(versions) => versions.push(version),
                None => {
                    st.versions.insert(Arc::from(kv.key), vec![version]);
                }
            }
        }
        for e in &history {
            st.record_event(e);
        }
        st.rev = rev.max(st.rev);
    }
}

fn kv_of(key: &str, rev: Revision, val: &Val) -> KeyValue {
    KeyValue {
        key: key.to_string(),
        value: val.value.clone(),
        create_revision: val.create,
        mod_revision: rev,
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
        Ok(st.at(key, rev))
    }

    async fn list(&self, prefix: &str, opts: ListOptions) -> Result<ListPage> {
        use std::ops::Bound;
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
        let lower = match &start {
            Some(s) => Bound::Excluded(s.as_str()),
            None => Bound::Included(prefix),
        };
        for (key, _) in st.versions.range::<str, _>((lower, Bound::Unbounded)) {
            if !key.starts_with(prefix) {
                break;
            }
            if limit.is_some_and(|l| items.len() >= l) {
                // Past the page: only count what remains at `rev`.
                if st.at_exists(key, rev) {
                    remaining += 1;
                }
            } else if let Some(kv) = st.at(key, rev) {
                items.push(kv);
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
        if st.latest_val(key).is_some() {
            return Err(Error::AlreadyExists);
        }
        st.rev = st.rev.next();
        let rev = st.rev;
        let kv = KeyValue { key: key.to_string(), value, create_revision: rev, mod_revision: rev };
        st.record(key, Some(Val { value: kv.value.clone(), create: rev }));
        let _ = self.shared.events.send(WatchEvent::Put { kv, prev: None });
        Ok(rev)
    }

    async fn update(&self, key: &str, value: Bytes, expected: Revision) -> Result<Revision> {
        check_size(&value)?;
        let mut st = self.lock();
        let prev = st.latest(key).ok_or(Error::NotFound)?;
        if prev.mod_revision != expected {
            return Err(Error::Conflict { current: prev.mod_revision });
        }
        st.rev = st.rev.next();
        let rev = st.rev;
        let create = prev.create_revision;
        let kv =
            KeyValue { key: key.to_string(), value, create_revision: create, mod_revision: rev };
        st.record(key, Some(Val { value: kv.value.clone(), create }));
        let _ = self.shared.events.send(WatchEvent::Put { kv, prev: Some(prev) });
        Ok(rev)
    }

    async fn delete(&self, key: &str, expected: Option<Revision>) -> Result<(Revision, KeyValue)> {
        let mut st = self.lock();
        let prev = st.latest(key).ok_or(Error::NotFound)?;
        if let Some(expected) = expected
            && prev.mod_revision != expected
        {
            return Err(Error::Conflict { current: prev.mod_revision });
        }
        st.rev = st.rev.next();
        let rev = st.rev;
        st.record(key, None);
        let _ = self.shared.events.send(WatchEvent::Delete { revision: rev, prev: prev.clone() });
        Ok((rev, prev))
    }

    async fn watch(&self, prefix: &str, after: Revision) -> Result<WatchStream> {
        let (backlog, last, live) = self.shared.follow(prefix, after)?;
        Ok(live_stream(Arc::downgrade(&self.shared), backlog, last, prefix.to_string(), live))
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
        let from = st.log.partition_point(|(rev, _)| *rev <= up_to);
        st.log.drain(..from);
        let keep = st.log.len() * 2;
        st.log.shrink_to(keep);
        st.versions.retain(|_, versions| {
            // Keep the newest version at or before `up_to` (readable at up_to) and all later ones.
            let keep_from = versions.iter().rposition(|v| v.rev <= up_to).unwrap_or(0);
            if keep_from > 0 {
                versions.drain(..keep_from);
                versions.shrink_to_fit();
            }
            !(versions.len() == 1 && versions[0].val.is_none())
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
///
/// A watcher that falls more than [`WATCH_BUFFER`] events behind the broadcast (a slow client in
/// a burst of writes) is not closed: it replays what it missed from the log and subscribes again,
/// as upstream's watch cache serves a lagging watcher from its history. Only a watcher behind the
/// log's start (compacted away) ends, with `Compacted`, and its client re-lists.
fn live_stream(
    shared: Weak<Shared>,
    backlog: VecDeque<WatchEvent>,
    last: Revision,
    prefix: String,
    live: broadcast::Receiver<WatchEvent>,
) -> WatchStream {
    struct S {
        shared: Weak<Shared>,
        live: broadcast::Receiver<WatchEvent>,
        prefix: String,
        /// Events taken from the log, sent before the broadcast is read again.
        pending: VecDeque<WatchEvent>,
        /// Highest revision seen on the broadcast or in the log (any prefix).
        seen: Revision,
        /// Highest revision reported to the consumer.
        reported: Revision,
        done: bool,
    }
    let state = S {
        shared,
        live,
        prefix,
        pending: backlog,
        seen: last,
        reported: Revision::ZERO,
        done: false,
    };
    let stream = futures::stream::unfold(state, |mut s| async move {
        loop {
            if let Some(event) = s.pending.pop_front() {
                s.reported = event.revision();
                return Some((Ok(event), s));
            }
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
                    let shared = s.shared.upgrade()?;
                    match shared.follow(&s.prefix, s.seen) {
                        Ok((missed, last, live)) => {
                            (s.pending, s.seen, s.live) = (missed, last, live);
                        }
                        Err(e) => {
                            s.done = true;
                            return Some((Err(e), s));
                        }
                    }
                }
                Ok(Err(broadcast::error::RecvError::Closed)) => return None,
            }
        }
    });
    Box::pin(stream)
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt;

    fn b(s: &'static str) -> Bytes {
        Bytes::from_static(s.as_bytes())
    }

    #[tokio::test]
    async fn replay_after_compaction_rebuilds_events_with_their_previous_values() {
        let s = MemoryStore::new();
        let r1 = s.create("/a", b("1")).await.unwrap();
        let r2 = s.update("/a", b("2"), r1).await.unwrap();
        let r3 = s.create("/b", b("3")).await.unwrap();
        let (r4, _) = s.delete("/a", None).await.unwrap();
        s.compact(r2).await.unwrap();
        assert!(matches!(s.watch("/", r1).await, Err(Error::Compacted { .. })));
        let mut w = s.watch("/", r2).await.unwrap();
        match w.next().await.unwrap().unwrap() {
            WatchEvent::Put { kv, prev: None } => {
                assert_eq!((kv.key.as_str(), kv.value, kv.mod_revision), ("/b", b("3"), r3))
            }
            other => panic!("expected the create of /b, got {other:?}"),
        }
        match w.next().await.unwrap().unwrap() {
            WatchEvent::Delete { revision, prev } => {
                assert_eq!(revision, r4);
                assert_eq!((prev.key.as_str(), prev.value), ("/a", b("2")));
                assert_eq!((prev.create_revision, prev.mod_revision), (r1, r2));
            }
            other => panic!("expected the delete of /a, got {other:?}"),
        }
        // The value at the compaction point is still readable; the tombstone goes with the next
        // compaction past it, and the key with it.
        assert_eq!(s.get("/a", ReadAt::Exact(r2)).await.unwrap().unwrap().value, b("2"));
        s.compact(r4).await.unwrap();
        assert!(!s.lock().versions.contains_key("/a"));
        assert_eq!(s.list("/", ListOptions::default()).await.unwrap().items.len(), 1);
        // A re-created key starts a new life.
        let r5 = s.create("/a", b("5")).await.unwrap();
        let kv = s.get("/a", ReadAt::Latest).await.unwrap().unwrap();
        assert_eq!((kv.create_revision, kv.mod_revision), (r5, r5));
    }

    #[tokio::test]
    async fn a_watcher_that_falls_behind_catches_up_from_history() {
        let s = MemoryStore::new();
        let start = s.current_revision().await.unwrap();
        let mut w = s.watch("/a/", start).await.unwrap();
        // Three broadcast buffers' worth of writes while the watcher reads nothing; every other
        // one is under another prefix.
        let n = WATCH_BUFFER * 3;
        let mut mine = Vec::new();
        for i in 0..n {
            let key = if i % 2 == 0 { format!("/a/{i}") } else { format!("/b/{i}") };
            let rev = s.create(&key, b("x")).await.unwrap();
            if i % 2 == 0 {
                mine.push((key, rev));
            }
        }
        for (key, rev) in &mine {
            let e = tokio::time::timeout(std::time::Duration::from_secs(5), w.next())
                .await
                .expect("an event in time")
                .expect("the stream goes on")
                .expect("no error: the watcher catches up");
            assert_eq!((e.key(), e.revision()), (Some(key.as_str()), *rev));
        }
        // Live again after catching up.
        let rev = s.create("/a/late", b("y")).await.unwrap();
        let e = w.next().await.unwrap().unwrap();
        assert_eq!((e.key(), e.revision()), (Some("/a/late"), rev));

        // A watcher behind the start of the history ends with Compacted.
        let mut slow = s.watch("/a/", rev).await.unwrap();
        let mut last = rev;
        for i in 0..WATCH_BUFFER * 2 {
            last = s.create(&format!("/c/{i}"), b("z")).await.unwrap();
        }
        s.compact(last).await.unwrap();
        match slow.next().await {
            Some(Err(Error::Compacted { .. })) => {}
            other => panic!("expected Compacted, got {other:?}"),
        }
    }
}
