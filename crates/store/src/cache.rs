//! The watch cache: a [`Store`] that wraps a [`Store`] and serves LIST and WATCH from memory.
//!
//! It lists everything once, then follows one watch on the inner store and replays it into an
//! in-memory MVCC model ([`MemoryStore`]), which fans events out to any number of watchers through
//! one bounded broadcast: a watcher that falls behind never stalls writes or other watchers; it
//! catches up from the model's history, and only one behind the cache's [`WINDOW`] of revisions
//! is ended with `Compacted` (the API server's 410; the client re-lists).
//!
//! Consistency is the inner store's: a LIST at the latest revision first asks the inner store for
//! its current revision and waits until the cache has applied it (upstream's "consistent list from
//! cache"); a write returns once the cache has applied it, so a client reads its own writes. Reads
//! and watches older than the cache's window go to the inner store.

use crate::memory::MemoryStore;
use crate::{Error, KeyValue, ListOptions, ListPage, ReadAt, Result, Revision, Store, WatchStream};
use bytes::Bytes;
use futures::StreamExt;
use std::sync::{Arc, RwLock};
use std::time::Duration;
use tokio::sync::watch;

/// The part of the keyspace the cache holds (every rkube key; etcd refuses an empty key).
pub const PREFIX: &str = "/";
/// Revisions of history the cache keeps for watches that start in the past.
pub const WINDOW: u64 = 10_000;
/// How long a read waits for the cache to catch up before it goes to the inner store.
const CATCH_UP: Duration = Duration::from_secs(3);

pub struct CachedStore {
    inner: Arc<dyn Store>,
    /// Replaced wholesale when the cache has to re-list (its watch was compacted away); watch
    /// streams of the old model end, and their clients re-watch or re-list.
    mem: RwLock<Arc<MemoryStore>>,
    applied: watch::Receiver<Revision>,
    follower: std::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl Drop for CachedStore {
    fn drop(&mut self) {
        if let Some(f) = self.follower.lock().unwrap_or_else(|p| p.into_inner()).take() {
            f.abort();
        }
    }
}

/// Everything under [`PREFIX`] at one revision, page by page.
async fn list_all(inner: &dyn Store) -> Result<(Revision, Vec<KeyValue>)> {
    let mut items = Vec::new();
    let mut opts = ListOptions { at: ReadAt::Latest, limit: Some(10_000), continue_token: None };
    loop {
        let page = inner.list(PREFIX, opts.clone()).await?;
        items.extend(page.items);
        match page.continue_token {
            Some(t) => opts.continue_token = Some(t),
            None => return Ok((page.revision, items)),
        }
    }
}

fn model(rev: Revision, items: Vec<KeyValue>) -> Arc<MemoryStore> {
    let mem = MemoryStore::new();
    mem.restore(rev, rev, items, Vec::new());
    Arc::new(mem)
}

impl CachedStore {
    pub async fn new(inner: Arc<dyn Store>) -> Result<Arc<CachedStore>> {
        let (rev, items) = list_all(inner.as_ref()).await?;
        let mem = model(rev, items);
        let (tx, applied) = watch::channel(rev);
        let cache = Arc::new(CachedStore {
            inner: inner.clone(),
            mem: RwLock::new(mem),
            applied,
            follower: std::sync::Mutex::new(None),
        });
        let weak = Arc::downgrade(&cache);
        let follower = tokio::spawn(async move { follow(weak, inner, rev, tx).await });
        *cache.follower.lock().unwrap_or_else(|p| p.into_inner()) = Some(follower);
        Ok(cache)
    }

    fn mem(&self) -> Arc<MemoryStore> {
        self.mem.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Whether the inner store has reached `rev` (a future revision is the inner store's to answer).
    async fn reachable(&self, rev: Revision) -> Result<bool> {
        Ok(rev <= *self.applied.borrow() || rev <= self.inner.current_revision().await?)
    }

    /// Waits until the cache has applied `rev`; false if it did not in time.
    async fn caught_up(&self, rev: Revision) -> bool {
        let mut rx = self.applied.clone();
        matches!(tokio::time::timeout(CATCH_UP, rx.wait_for(|r| *r >= rev)).await, Ok(Ok(_)))
    }
}

/// Follows the inner store from `rev`, applying every event to the model; re-lists when the
/// inner store no longer has the history to resume from.
async fn follow(
    cache: std::sync::Weak<CachedStore>,
    inner: Arc<dyn Store>,
    mut rev: Revision,
    tx: watch::Sender<Revision>,
) {
    let mut since_compaction = 0u64;
    loop {
        let stream = match inner.watch(PREFIX, rev).await {
            Ok(s) => s,
            Err(Error::Compacted { .. }) => {
                let Ok((new_rev, items)) = list_all(inner.as_ref()).await else {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                };
                let Some(c) = cache.upgrade() else { return };
                *c.mem.write().unwrap_or_else(|p| p.into_inner()) = model(new_rev, items);
                rev = new_rev;
                let _ = tx.send(rev);
                continue;
            }
            Err(e) => {
                tracing::warn!(error = %e, "watch cache: the inner watch failed; retrying");
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        let mut chunks = stream.ready_chunks(512);
        while let Some(batch) = chunks.next().await {
            let Some(c) = cache.upgrade() else { return };
            let mut events = Vec::with_capacity(batch.len());
            let mut failed = false;
            for e in batch {
                match e {
                    Ok(e) if e.revision() > rev => events.push(e),
                    Ok(_) => {}
                    Err(_) => failed = true,
                }
            }
            if let Some(last) = events.last() {
                rev = last.revision();
                since_compaction += events.len() as u64;
                let mem = c.mem();
                mem.apply_committed(&events);
                if since_compaction >= 1024 && rev.0 > WINDOW {
                    since_compaction = 0;
                    let _ = mem.compact(Revision(rev.0 - WINDOW)).await;
                }
                let _ = tx.send(rev);
            }
            if failed {
                break; // resume (or re-list) from the last applied revision
            }
        }
    }
}

#[async_trait::async_trait]
impl Store for CachedStore {
    async fn get(&self, key: &str, at: ReadAt) -> Result<Option<KeyValue>> {
        self.inner.get(key, at).await
    }

    async fn list(&self, prefix: &str, opts: ListOptions) -> Result<ListPage> {
        if !prefix.starts_with(PREFIX) {
            return self.inner.list(prefix, opts).await;
        }
        let target = match (&opts.continue_token, opts.at) {
            (Some(t), _) => crate::continue_token::decode(t)?.0,
            (None, ReadAt::Exact(r)) => r,
            (None, ReadAt::Latest) => self.inner.current_revision().await?,
        };
        if self.reachable(target).await? && self.caught_up(target).await {
            let mem = self.mem();
            let mut opts2 = opts.clone();
            if opts2.continue_token.is_none() && opts2.at == ReadAt::Latest {
                opts2.at = ReadAt::Exact(target.max(mem.compacted_revision().await?));
            }
            match mem.list(prefix, opts2).await {
                Err(Error::Compacted { .. }) => {}
                other => return other,
            }
        }
        self.inner.list(prefix, opts).await
    }

    async fn create(&self, key: &str, value: Bytes) -> Result<Revision> {
        let rev = self.inner.create(key, value).await?;
        self.caught_up(rev).await;
        Ok(rev)
    }

    async fn update(&self, key: &str, value: Bytes, expected: Revision) -> Result<Revision> {
        let rev = self.inner.update(key, value, expected).await?;
        self.caught_up(rev).await;
        Ok(rev)
    }

    async fn delete(&self, key: &str, expected: Option<Revision>) -> Result<(Revision, KeyValue)> {
        let out = self.inner.delete(key, expected).await?;
        self.caught_up(out.0).await;
        Ok(out)
    }

    async fn watch(&self, prefix: &str, after: Revision) -> Result<WatchStream> {
        if prefix.starts_with(PREFIX) && self.reachable(after).await? && self.caught_up(after).await
        {
            match self.mem().watch(prefix, after).await {
                Err(Error::Compacted { .. }) => {}
                other => return other,
            }
        }
        self.inner.watch(prefix, after).await
    }

    async fn compact(&self, up_to: Revision) -> Result<()> {
        self.inner.compact(up_to).await?;
        let mem = self.mem();
        if up_to > mem.compacted_revision().await? && up_to <= *self.applied.borrow() {
            let _ = mem.compact(up_to).await;
        }
        Ok(())
    }

    async fn current_revision(&self) -> Result<Revision> {
        self.inner.current_revision().await
    }

    async fn compacted_revision(&self) -> Result<Revision> {
        self.inner.compacted_revision().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conformance;

    #[tokio::test]
    async fn conformance_over_a_memory_store() {
        conformance::run_all(|| async {
            let inner: Arc<dyn Store> = Arc::new(MemoryStore::new());
            let s: Arc<dyn Store> = CachedStore::new(inner).await.unwrap();
            s
        })
        .await;
    }

    #[tokio::test]
    async fn lists_and_watches_come_from_memory_and_see_every_write() {
        let inner: Arc<dyn Store> = Arc::new(MemoryStore::new());
        inner.create("/a/1", Bytes::from_static(b"one")).await.unwrap();
        let cache = CachedStore::new(inner.clone()).await.unwrap();
        // A write straight to the inner store (another API server) shows in the next list.
        inner.create("/a/2", Bytes::from_static(b"two")).await.unwrap();
        let page = cache.list("/a/", ListOptions::default()).await.unwrap();
        assert_eq!(page.items.len(), 2);
        let mut w = cache.watch("/a/", page.revision).await.unwrap();
        let rev = cache.create("/a/3", Bytes::from_static(b"three")).await.unwrap();
        let ev =
            tokio::time::timeout(Duration::from_secs(2), w.next()).await.unwrap().unwrap().unwrap();
        assert_eq!(ev.revision(), rev);
        assert_eq!(ev.key(), Some("/a/3"));
    }
}
