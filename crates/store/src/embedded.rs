//! The embedded backend (the default): every write is committed to a redb file (fsync) before it
//! is acknowledged or seen by anyone; concurrent writers share one commit (group commit). Reads
//! and watches are served from an in-memory MVCC model rebuilt from the file at open.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use tokio::sync::{mpsc, oneshot};

use crate::memory::MemoryStore;
use crate::{
    Error, KeyValue, ListOptions, ListPage, MAX_VALUE_BYTES, ReadAt, Result, Revision, Store,
    WatchEvent, WatchStream,
};

/// Latest value of every live key: key → encoded (create, mod, value).
const STATE: TableDefinition<&str, &[u8]> = TableDefinition::new("state");
/// Every event since the compaction point: revision → encoded event.
const LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("log");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const FORMAT: u64 = 1;

/// redb's page cache. Reads are served from memory, so it serves only the write path: the
/// b-tree pages an insert walks (at 100,000 pods a few MiB of branch pages).
const REDB_CACHE_BYTES: usize = 4 << 20;

#[derive(Clone, Debug)]
pub struct Config {
    pub path: PathBuf,
    /// Keep at least this much history (upstream kube-apiserver compacts every 5 minutes)…
    pub keep_for: Duration,
    /// …and at least this many revisions.
    pub keep_revisions: u64,
    /// Writes batched into one commit at most.
    pub max_batch: usize,
}

impl Config {
    pub fn new(path: impl Into<PathBuf>) -> Config {
        Config {
            path: path.into(),
            keep_for: Duration::from_secs(300),
            keep_revisions: 10_000,
            max_batch: 1024,
        }
    }
}

enum Op {
    Create {
        key: String,
        value: Bytes,
    },
    Update {
        key: String,
        value: Bytes,
        expected: Revision,
    },
    Delete {
        key: String,
        expected: Option<Revision>,
    },
    Compact {
        up_to: Revision,
    },
    /// Ends the writer (the store is being dropped); the database file is closed.
    Shutdown,
}

enum Done {
    Rev(Revision),
    Deleted(Revision, KeyValue),
}

struct Req {
    op: Op,
    reply: oneshot::Sender<Result<Done>>,
}

pub struct EmbeddedStore {
    mem: Arc<MemoryStore>,
    tx: mpsc::Sender<Req>,
    path: PathBuf,
    writer: std::sync::Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl Drop for EmbeddedStore {
    /// Closes the file before returning, so the same data dir can be reopened at once.
    fn drop(&mut self) {
        let (reply, _rx) = oneshot::channel();
        if self.tx.try_send(Req { op: Op::Shutdown, reply }).is_ok()
            && let Some(h) = self.writer.lock().unwrap_or_else(|p| p.into_inner()).take()
        {
            let _ = h.join();
        }
    }
}

fn corrupt(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::Corrupt { path: path.display().to_string(), reason: e.to_string() }
}

fn encode_kv(kv: &KeyValue) -> Vec<u8> {
    let mut out = Vec::with_capacity(16 + kv.value.len());
    out.extend_from_slice(&kv.create_revision.0.to_le_bytes());
    out.extend_from_slice(&kv.mod_revision.0.to_le_bytes());
    out.extend_from_slice(&kv.value);
    out
}

fn decode_kv(key: &str, b: &[u8]) -> Option<KeyValue> {
    if b.len() < 16 {
        return None;
    }
    Some(KeyValue {
        key: key.to_string(),
        create_revision: Revision(u64::from_le_bytes(b[0..8].try_into().ok()?)),
        mod_revision: Revision(u64::from_le_bytes(b[8..16].try_into().ok()?)),
        value: Bytes::copy_from_slice(&b[16..]),
    })
}

/// Log entry: [kind][key len u32][key][create u64][value] — kind 1 = put, 2 = delete.
fn encode_event(kind: u8, key: &str, create: Revision, value: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(13 + key.len() + value.len());
    out.push(kind);
    out.extend_from_slice(&(key.len() as u32).to_le_bytes());
    out.extend_from_slice(key.as_bytes());
    out.extend_from_slice(&create.0.to_le_bytes());
    out.extend_from_slice(value);
    out
}

fn decode_event(b: &[u8]) -> Option<(u8, String, Revision, Bytes)> {
    let kind = *b.first()?;
    let klen = u32::from_le_bytes(b.get(1..5)?.try_into().ok()?) as usize;
    let key = std::str::from_utf8(b.get(5..5 + klen)?).ok()?.to_string();
    let create = u64::from_le_bytes(b.get(5 + klen..13 + klen)?.try_into().ok()?);
    let value = Bytes::copy_from_slice(b.get(13 + klen..)?);
    Some((kind, key, Revision(create), value))
}

impl EmbeddedStore {
    /// Opens (or creates) the store file. A file that is not an rkube store, or is damaged,
    /// gives `Error::Corrupt` naming it.
    pub fn open(config: Config) -> Result<EmbeddedStore> {
        if let Some(dir) = config.path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let path = config.path.clone();
        // Reads are served from the in-memory model, so redb's page cache (1 GiB by default)
        // would only duplicate it: a small cache for the write path is enough.
        let db = Database::builder()
            .set_cache_size(REDB_CACHE_BYTES)
            .create(&path)
            .map_err(|e| corrupt(&path, e))?;
        let mem = Arc::new(MemoryStore::new());
        {
            let w = db.begin_write().map_err(|e| corrupt(&path, e))?;
            {
                let mut meta = w.open_table(META).map_err(|e| corrupt(&path, e))?;
                let format = meta.get("format").map_err(|e| corrupt(&path, e))?.map(|v| v.value());
                match format {
                    None => {
                        meta.insert("format", FORMAT).map_err(|e| corrupt(&path, e))?;
                    }
                    Some(FORMAT) => {}
                    Some(other) => {
                        return Err(corrupt(
                            &path,
                            format!(
                                "store format {other} is newer than this rkube understands ({FORMAT})"
                            ),
                        ));
                    }
                }
                w.open_table(STATE).map_err(|e| corrupt(&path, e))?;
                w.open_table(LOG).map_err(|e| corrupt(&path, e))?;
            }
            w.commit().map_err(|e| corrupt(&path, e))?;
        }
        {
            let r = db.begin_read().map_err(|e| corrupt(&path, e))?;
            let meta = r.open_table(META).map_err(|e| corrupt(&path, e))?;
            let rev =
                meta.get("rev").map_err(|e| corrupt(&path, e))?.map(|v| v.value()).unwrap_or(0);
            let compacted = meta
                .get("compacted")
                .map_err(|e| corrupt(&path, e))?
                .map(|v| v.value())
                .unwrap_or(0);
            let state = r.open_table(STATE).map_err(|e| corrupt(&path, e))?;
            let log = r.open_table(LOG).map_err(|e| corrupt(&path, e))?;
            // Values last written at or before the compaction point are the base; later ones
            // are rebuilt from the log so reads at past revisions and watch replay still work.
            let mut base = Vec::new();
            for entry in state.iter().map_err(|e| corrupt(&path, e))? {
                let (k, v) = entry.map_err(|e| corrupt(&path, e))?;
                let kv = decode_kv(k.value(), v.value())
                    .ok_or_else(|| corrupt(&path, "bad state entry"))?;
                if kv.mod_revision.0 <= compacted {
                    base.push(kv);
                }
            }
            // Keys deleted after compaction need their pre-compaction value in the base too: the
            // log's delete events carry no value, so the previous put must precede them in the log.
            let mut history = Vec::new();
            let mut latest: std::collections::HashMap<String, KeyValue> =
                base.iter().map(|kv| (kv.key.clone(), kv.clone())).collect();
            for entry in log.range((compacted + 1)..).map_err(|e| corrupt(&path, e))? {
                let (r, v) = entry.map_err(|e| corrupt(&path, e))?;
                let rev_n = Revision(r.value());
                let (kind, key, create, value) = decode_event(v.value()).ok_or_else(|| {
                    corrupt(&path, format!("bad log entry at revision {}", r.value()))
                })?;
                let prev = latest.get(&key).cloned();
                match kind {
                    1 => {
                        let kv = KeyValue {
                            key: key.clone(),
                            value,
                            create_revision: create,
                            mod_revision: rev_n,
                        };
                        latest.insert(key, kv.clone());
                        history.push(WatchEvent::Put { kv, prev });
                    }
                    2 => {
                        latest.remove(&key);
                        if let Some(prev) = prev {
                            history.push(WatchEvent::Delete { revision: rev_n, prev });
                        }
                    }
                    _ => return Err(corrupt(&path, format!("unknown log entry kind {kind}"))),
                }
            }
            mem.restore(Revision(rev), Revision(compacted), base, history);
        }
        let (tx, rx) = mpsc::channel(4096);
        let writer_mem = mem.clone();
        let writer_path = path.clone();
        let max_batch = config.max_batch;
        let handle = std::thread::Builder::new()
            .name("rkube-store-writer".into())
            .spawn(move || writer(db, writer_mem, writer_path, rx, max_batch))
            .map_err(Error::Io)?;
        let store = EmbeddedStore { mem, tx, path, writer: std::sync::Mutex::new(Some(handle)) };
        store.spawn_auto_compaction(config.keep_for, config.keep_revisions);
        Ok(store)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes a consistent copy of the store at its current revision to `dest` (a new redb
    /// file): every live key with its revisions, history up to that point folded in. Returns the
    /// revision of the snapshot. Writers keep going meanwhile; the copy is of one revision.
    pub async fn snapshot(&self, dest: &Path) -> Result<Revision> {
        let rev = self.mem.current_revision().await?;
        let mut items = Vec::new();
        let mut token = None;
        loop {
            let page = self
                .mem
                .list(
                    "",
                    ListOptions {
                        at: ReadAt::Exact(rev),
                        limit: Some(1000),
                        continue_token: token,
                    },
                )
                .await?;
            items.extend(page.items);
            token = page.continue_token;
            if token.is_none() {
                break;
            }
        }
        let dest = dest.to_path_buf();
        tokio::task::spawn_blocking(move || write_snapshot(&dest, rev, &items))
            .await
            .map_err(|e| Error::Backend(e.to_string()))??;
        Ok(rev)
    }
}

fn write_snapshot(dest: &Path, rev: Revision, items: &[KeyValue]) -> Result<()> {
    if dest.exists() {
        return Err(Error::Backend(format!("{} already exists", dest.display())));
    }
    let tmp = dest.with_extension("partial");
    let _ = std::fs::remove_file(&tmp);
    {
        let db = Database::create(&tmp).map_err(|e| corrupt(&tmp, e))?;
        let w = db.begin_write().map_err(|e| corrupt(&tmp, e))?;
        {
            let mut meta = w.open_table(META).map_err(|e| corrupt(&tmp, e))?;
            meta.insert("format", FORMAT).map_err(|e| corrupt(&tmp, e))?;
            meta.insert("rev", rev.0).map_err(|e| corrupt(&tmp, e))?;
            meta.insert("compacted", rev.0).map_err(|e| corrupt(&tmp, e))?;
            let mut state = w.open_table(STATE).map_err(|e| corrupt(&tmp, e))?;
            for kv in items {
                state
                    .insert(kv.key.as_str(), encode_kv(kv).as_slice())
                    .map_err(|e| corrupt(&tmp, e))?;
            }
            w.open_table(LOG).map_err(|e| corrupt(&tmp, e))?;
        }
        w.commit().map_err(|e| corrupt(&tmp, e))?;
    }
    std::fs::rename(&tmp, dest)?;
    Ok(())
}

impl EmbeddedStore {
    /// Compacts in the background, keeping `keep_for` of history and at least `keep` revisions.
    fn spawn_auto_compaction(&self, keep_for: Duration, keep: u64) {
        let tx = self.tx.downgrade();
        let mem = self.mem.clone();
        let Ok(handle) = tokio::runtime::Handle::try_current() else { return };
        handle.spawn(async move {
            let mut samples: std::collections::VecDeque<(Instant, Revision)> = Default::default();
            loop {
                tokio::time::sleep(Duration::from_secs(10)).await;
                let Some(tx) = tx.upgrade() else { return };
                let Ok(now_rev) = mem.current_revision().await else { return };
                samples.push_back((Instant::now(), now_rev));
                // The newest sample older than the window is safe to compact to.
                let mut target = None;
                while let Some((t, r)) = samples.front().copied() {
                    if t.elapsed() >= keep_for {
                        target = Some(r);
                        samples.pop_front();
                    } else {
                        break;
                    }
                }
                let Some(old) = target else { continue };
                let up_to = Revision(old.0.min(now_rev.0.saturating_sub(keep)));
                let compacted = mem.compacted_revision().await.unwrap_or_default();
                if up_to > compacted {
                    let (reply, rx) = oneshot::channel();
                    if tx.send(Req { op: Op::Compact { up_to }, reply }).await.is_err() {
                        return;
                    }
                    let _ = rx.await;
                }
            }
        });
    }

    async fn submit(&self, op: Op) -> Result<Done> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Req { op, reply })
            .await
            .map_err(|_| Error::Unavailable("store writer stopped".into()))?;
        rx.await.map_err(|_| Error::Unavailable("store writer stopped".into()))?
    }
}

/// The single writer: drains queued requests into one redb transaction (group commit), commits
/// with fsync, then applies the events to memory and answers every request.
fn writer(
    db: Database,
    mem: Arc<MemoryStore>,
    path: PathBuf,
    mut rx: mpsc::Receiver<Req>,
    max_batch: usize,
) {
    while let Some(first) = rx.blocking_recv() {
        if matches!(first.op, Op::Shutdown) {
            return;
        }
        let mut batch = vec![first];
        while batch.len() < max_batch {
            match rx.try_recv() {
                Ok(r) if matches!(r.op, Op::Shutdown) => {
                    finish(&db, &mem, &path, &mut batch);
                    return;
                }
                Ok(r) => batch.push(r),
                Err(_) => break,
            }
        }
        finish(&db, &mem, &path, &mut batch);
    }
}

fn finish(db: &Database, mem: &MemoryStore, path: &Path, batch: &mut Vec<Req>) {
    let batch = std::mem::take(batch);
    let mut batch = batch;
    {
        let result = commit_batch(db, mem, path, &mut batch);
        match result {
            Ok((events, answers)) => {
                mem.apply_committed(&events);
                for (req, ans) in batch.into_iter().zip(answers) {
                    let _ = req.reply.send(ans);
                }
            }
            Err(e) => {
                let msg = e.to_string();
                for req in batch {
                    let _ = req.reply.send(Err(Error::Backend(msg.clone())));
                }
            }
        }
    }
}

type BatchResult = (Vec<WatchEvent>, Vec<Result<Done>>);

fn commit_batch(
    db: &Database,
    mem: &MemoryStore,
    path: &Path,
    batch: &mut [Req],
) -> Result<BatchResult> {
    let be = |e: &dyn std::fmt::Display| Error::Backend(format!("{}: {e}", path.display()));
    let w = db.begin_write().map_err(|e| be(&e))?;
    let mut events = Vec::new();
    let mut answers = Vec::new();
    {
        let mut state = w.open_table(STATE).map_err(|e| be(&e))?;
        let mut log = w.open_table(LOG).map_err(|e| be(&e))?;
        let mut meta = w.open_table(META).map_err(|e| be(&e))?;
        let mut rev =
            Revision(meta.get("rev").map_err(|e| be(&e))?.map(|v| v.value()).unwrap_or(0));
        // Later requests in the batch see earlier ones: an overlay of this batch's writes.
        let mut overlay: std::collections::HashMap<String, Option<KeyValue>> = Default::default();
        let current = |overlay: &std::collections::HashMap<String, Option<KeyValue>>, key: &str| {
            match overlay.get(key) {
                Some(v) => v.clone(),
                None => mem.latest_kv(key),
            }
        };
        for req in batch.iter() {
            let ans = match &req.op {
                Op::Create { key, value } => {
                    if current(&overlay, key).is_some() {
                        Err(Error::AlreadyExists)
                    } else {
                        rev = rev.next();
                        let kv = KeyValue {
                            key: key.clone(),
                            value: value.clone(),
                            create_revision: rev,
                            mod_revision: rev,
                        };
                        state
                            .insert(key.as_str(), encode_kv(&kv).as_slice())
                            .map_err(|e| be(&e))?;
                        log.insert(rev.0, encode_event(1, key, rev, value).as_slice())
                            .map_err(|e| be(&e))?;
                        overlay.insert(key.clone(), Some(kv.clone()));
                        events.push(WatchEvent::Put { kv, prev: None });
                        Ok(Done::Rev(rev))
                    }
                }
                Op::Update { key, value, expected } => match current(&overlay, key) {
                    None => Err(Error::NotFound),
                    Some(prev) if prev.mod_revision != *expected => {
                        Err(Error::Conflict { current: prev.mod_revision })
                    }
                    Some(prev) => {
                        rev = rev.next();
                        let kv = KeyValue {
                            key: key.clone(),
                            value: value.clone(),
                            create_revision: prev.create_revision,
                            mod_revision: rev,
                        };
                        state
                            .insert(key.as_str(), encode_kv(&kv).as_slice())
                            .map_err(|e| be(&e))?;
                        log.insert(
                            rev.0,
                            encode_event(1, key, prev.create_revision, value).as_slice(),
                        )
                        .map_err(|e| be(&e))?;
                        overlay.insert(key.clone(), Some(kv.clone()));
                        events.push(WatchEvent::Put { kv, prev: Some(prev) });
                        Ok(Done::Rev(rev))
                    }
                },
                Op::Delete { key, expected } => match current(&overlay, key) {
                    None => Err(Error::NotFound),
                    Some(prev) if expected.is_some_and(|e| e != prev.mod_revision) => {
                        Err(Error::Conflict { current: prev.mod_revision })
                    }
                    Some(prev) => {
                        rev = rev.next();
                        state.remove(key.as_str()).map_err(|e| be(&e))?;
                        log.insert(
                            rev.0,
                            encode_event(2, key, prev.create_revision, &[]).as_slice(),
                        )
                        .map_err(|e| be(&e))?;
                        overlay.insert(key.clone(), None);
                        events.push(WatchEvent::Delete { revision: rev, prev: prev.clone() });
                        Ok(Done::Deleted(rev, prev))
                    }
                },
                Op::Shutdown => Err(Error::Unavailable("store closing".into())),
                Op::Compact { up_to } => {
                    // Memory first decides whether the compaction is valid.
                    let compacted = Revision(
                        meta.get("compacted").map_err(|e| be(&e))?.map(|v| v.value()).unwrap_or(0),
                    );
                    if *up_to > rev {
                        Err(Error::FutureRevision { requested: *up_to, current: rev })
                    } else if *up_to <= compacted {
                        Err(Error::Compacted { requested: *up_to, compacted })
                    } else {
                        let old: Vec<u64> = log
                            .range(..=up_to.0)
                            .map_err(|e| be(&e))?
                            .filter_map(|e| e.ok().map(|(k, _)| k.value()))
                            .collect();
                        for k in old {
                            log.remove(k).map_err(|e| be(&e))?;
                        }
                        meta.insert("compacted", up_to.0).map_err(|e| be(&e))?;
                        Ok(Done::Rev(*up_to))
                    }
                }
            };
            answers.push(ans);
        }
        meta.insert("rev", rev.0).map_err(|e| be(&e))?;
    }
    w.commit().map_err(|e| be(&e))?;
    // Compactions are mirrored into memory after the commit.
    for (req, ans) in batch.iter().zip(answers.iter()) {
        if let (Op::Compact { up_to }, Ok(_)) = (&req.op, ans) {
            let mem_compact = futures::executor::block_on(mem.compact(*up_to));
            if let Err(e) = mem_compact {
                tracing::warn!("memory compaction to {up_to}: {e}");
            }
        }
    }
    Ok((events, answers))
}

fn check_size(value: &Bytes) -> Result<()> {
    if value.len() > MAX_VALUE_BYTES {
        return Err(Error::ValueTooLarge { size: value.len(), limit: MAX_VALUE_BYTES });
    }
    Ok(())
}

#[async_trait::async_trait]
impl Store for EmbeddedStore {
    async fn get(&self, key: &str, at: ReadAt) -> Result<Option<KeyValue>> {
        self.mem.get(key, at).await
    }
    async fn list(&self, prefix: &str, opts: ListOptions) -> Result<ListPage> {
        self.mem.list(prefix, opts).await
    }
    async fn create(&self, key: &str, value: Bytes) -> Result<Revision> {
        check_size(&value)?;
        match self.submit(Op::Create { key: key.to_string(), value }).await? {
            Done::Rev(r) => Ok(r),
            Done::Deleted(r, _) => Ok(r),
        }
    }
    async fn update(&self, key: &str, value: Bytes, expected: Revision) -> Result<Revision> {
        check_size(&value)?;
        match self.submit(Op::Update { key: key.to_string(), value, expected }).await? {
            Done::Rev(r) => Ok(r),
            Done::Deleted(r, _) => Ok(r),
        }
    }
    async fn delete(&self, key: &str, expected: Option<Revision>) -> Result<(Revision, KeyValue)> {
        match self.submit(Op::Delete { key: key.to_string(), expected }).await? {
            Done::Deleted(r, kv) => Ok((r, kv)),
            Done::Rev(_) => Err(Error::Backend("unexpected answer to delete".into())),
        }
    }
    async fn watch(&self, prefix: &str, after: Revision) -> Result<WatchStream> {
        self.mem.watch(prefix, after).await
    }
    async fn compact(&self, up_to: Revision) -> Result<()> {
        self.submit(Op::Compact { up_to }).await.map(|_| ())
    }
    async fn current_revision(&self) -> Result<Revision> {
        self.mem.current_revision().await
    }
    async fn compacted_revision(&self) -> Result<Revision> {
        self.mem.compacted_revision().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt;

    fn dir() -> tempfile::TempDir {
        tempfile::tempdir().unwrap()
    }

    #[tokio::test]
    async fn acknowledged_writes_survive_a_reopen_with_their_revisions() {
        let d = dir();
        let path = d.path().join("store.redb");
        {
            let s = EmbeddedStore::open(Config::new(&path)).unwrap();
            let r1 = s.create("/a", Bytes::from_static(b"1")).await.unwrap();
            let r2 = s.update("/a", Bytes::from_static(b"2"), r1).await.unwrap();
            s.create("/b", Bytes::from_static(b"x")).await.unwrap();
            s.delete("/b", None).await.unwrap();
            assert_eq!(r2, Revision(2));
        }
        let s = EmbeddedStore::open(Config::new(&path)).unwrap();
        let a = s.get("/a", ReadAt::Latest).await.unwrap().unwrap();
        assert_eq!(a.value, Bytes::from_static(b"2"));
        assert_eq!(a.mod_revision, Revision(2));
        assert_eq!(a.create_revision, Revision(1));
        assert!(s.get("/b", ReadAt::Latest).await.unwrap().is_none());
        assert_eq!(
            s.get("/a", ReadAt::Exact(Revision(1))).await.unwrap().unwrap().value,
            Bytes::from_static(b"1")
        );
        assert_eq!(s.current_revision().await.unwrap(), Revision(4));
        // A watch from revision 0 replays the history without gaps after the reopen.
        let mut w = s.watch("/", Revision(0)).await.unwrap();
        let mut revs = Vec::new();
        for _ in 0..4 {
            revs.push(w.next().await.unwrap().unwrap().revision().0);
        }
        assert_eq!(revs, vec![1, 2, 3, 4]);
        assert!(matches!(
            s.update("/a", Bytes::new(), Revision(1)).await,
            Err(Error::Conflict { current: Revision(2) })
        ));
    }

    #[tokio::test]
    async fn concurrent_writers_share_commits_and_get_distinct_revisions() {
        let d = dir();
        let s = Arc::new(EmbeddedStore::open(Config::new(d.path().join("s.redb"))).unwrap());
        let mut tasks = Vec::new();
        for i in 0..64 {
            let s = s.clone();
            tasks.push(tokio::spawn(async move {
                s.create(&format!("/k/{i}"), Bytes::from_static(b"v")).await.unwrap()
            }));
        }
        let mut revs: Vec<u64> = Vec::new();
        for t in tasks {
            revs.push(t.await.unwrap().0);
        }
        revs.sort();
        assert_eq!(revs, (1..=64).collect::<Vec<_>>());
    }

    #[tokio::test]
    async fn compaction_is_durable_and_old_reads_are_refused() {
        let d = dir();
        let path = d.path().join("c.redb");
        {
            let s = EmbeddedStore::open(Config::new(&path)).unwrap();
            let r = s.create("/a", Bytes::from_static(b"1")).await.unwrap();
            s.update("/a", Bytes::from_static(b"2"), r).await.unwrap();
            s.create("/b", Bytes::from_static(b"3")).await.unwrap();
            s.compact(Revision(2)).await.unwrap();
            assert!(matches!(
                s.get("/a", ReadAt::Exact(Revision(1))).await,
                Err(Error::Compacted { .. })
            ));
        }
        let s = EmbeddedStore::open(Config::new(&path)).unwrap();
        assert_eq!(s.compacted_revision().await.unwrap(), Revision(2));
        assert_eq!(
            s.get("/a", ReadAt::Latest).await.unwrap().unwrap().value,
            Bytes::from_static(b"2")
        );
        assert!(matches!(s.watch("/", Revision(1)).await, Err(Error::Compacted { .. })));
        assert_eq!(s.list("/", ListOptions::default()).await.unwrap().items.len(), 2);
    }

    #[tokio::test]
    async fn a_foreign_file_is_reported_as_corrupt_not_a_panic() {
        let d = dir();
        let path = d.path().join("junk.redb");
        std::fs::write(&path, b"this is not a database at all, just some text that is long enough")
            .unwrap();
        match EmbeddedStore::open(Config::new(&path)) {
            Err(Error::Corrupt { path: p, .. }) => assert!(p.ends_with("junk.redb")),
            Err(e) => panic!("wrong error {e}"),
            Ok(_) => panic!("opened a foreign file"),
        }
    }
}

#[cfg(test)]
mod watch_tests {
    use super::*;
    use futures::StreamExt;

    #[tokio::test]
    async fn a_watch_sees_every_later_write() {
        let d = tempfile::tempdir().unwrap();
        let s = EmbeddedStore::open(Config::new(d.path().join("w.redb"))).unwrap();
        s.create("/x/0", Bytes::from_static(b"v")).await.unwrap();
        let rev = s.current_revision().await.unwrap();
        let mut w = s.watch("/watch/", rev).await.unwrap();
        for i in 0..5 {
            s.create(&format!("/watch/{i}"), Bytes::from_static(b"v")).await.unwrap();
        }
        for i in 0..5 {
            let ev = tokio::time::timeout(std::time::Duration::from_secs(2), w.next())
                .await
                .expect("event in time")
                .unwrap()
                .unwrap();
            assert_eq!(ev.key(), Some(format!("/watch/{i}").as_str()));
        }
    }
}

#[cfg(test)]
mod snapshot_tests {
    use super::*;

    #[tokio::test]
    async fn a_snapshot_restores_every_key_at_its_revision() {
        let d = tempfile::tempdir().unwrap();
        let s = EmbeddedStore::open(Config::new(d.path().join("a.redb"))).unwrap();
        let r = s.create("/k/1", Bytes::from_static(b"one")).await.unwrap();
        s.update("/k/1", Bytes::from_static(b"uno"), r).await.unwrap();
        s.create("/k/2", Bytes::from_static(b"two")).await.unwrap();
        s.delete("/k/2", None).await.unwrap();
        s.create("/k/3", Bytes::from_static(b"three")).await.unwrap();
        let snap = d.path().join("snap.redb");
        let rev = s.snapshot(&snap).await.unwrap();
        assert_eq!(rev, Revision(5));
        assert!(s.snapshot(&snap).await.is_err(), "an existing file is never overwritten");
        let restored = EmbeddedStore::open(Config::new(&snap)).unwrap();
        assert_eq!(restored.current_revision().await.unwrap(), Revision(5));
        let one = restored.get("/k/1", ReadAt::Latest).await.unwrap().unwrap();
        assert_eq!(
            (one.value, one.create_revision, one.mod_revision),
            (Bytes::from_static(b"uno"), Revision(1), Revision(2))
        );
        assert!(restored.get("/k/2", ReadAt::Latest).await.unwrap().is_none());
        assert_eq!(restored.list("/k/", ListOptions::default()).await.unwrap().items.len(), 2);
        // New writes continue from the snapshot's revision.
        assert_eq!(restored.create("/k/4", Bytes::new()).await.unwrap(), Revision(6));
    }
}
