//! The one conformance suite every `Store` backend must pass (memory, embedded, etcd).
//! A backend's tests call [`run_all`] with a factory that yields a fresh, empty store per check.

use crate::{Error, ListOptions, ReadAt, Revision, Store, WatchEvent, WatchStream};
use bytes::Bytes;
use futures::StreamExt;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

/// Runs every check, each against a fresh store from `make`. Panics (with the check's name) on
/// the first violation, so it is meant to be called from a test.
pub async fn run_all<F, Fut>(make: F)
where
    F: Fn() -> Fut,
    Fut: Future<Output = Arc<dyn Store>>,
{
    create_twice_is_already_exists(make().await).await;
    update_with_stale_revision_is_a_conflict_carrying_the_current_revision(make().await).await;
    missing_keys_are_not_found(make().await).await;
    guarded_delete_checks_the_revision_and_returns_the_deleted_value(make().await).await;
    reads_at_past_revisions_see_history_and_refuse_future_or_compacted(make().await).await;
    pagination_stays_at_the_first_page_revision_while_writes_happen(make().await).await;
    watch_is_ordered_gapless_filtered_and_carries_prev_values(make().await).await;
    watch_replays_history_and_refuses_compacted_revisions(make().await).await;
    compaction_validates_its_target(make().await).await;
    oversized_values_are_refused(make().await).await;
}

fn b(s: &str) -> Bytes {
    Bytes::copy_from_slice(s.as_bytes())
}

/// The next non-progress event, failing after a generous timeout instead of hanging.
async fn next_event(w: &mut WatchStream) -> WatchEvent {
    loop {
        let item = tokio::time::timeout(Duration::from_secs(10), w.next())
            .await
            .expect("watch delivered nothing for 10 s")
            .expect("watch ended early")
            .expect("watch returned an error");
        if !matches!(item, WatchEvent::Progress { .. }) {
            return item;
        }
    }
}

pub async fn create_twice_is_already_exists(s: Arc<dyn Store>) {
    let r = s.create("/c/a", b("1")).await.expect("create");
    assert!(r > Revision::ZERO);
    assert!(matches!(s.create("/c/a", b("2")).await, Err(Error::AlreadyExists)));
    let kv = s.get("/c/a", ReadAt::Latest).await.expect("get").expect("present");
    assert_eq!(kv.value, b("1"), "a refused create must not change the value");
    assert_eq!((kv.create_revision, kv.mod_revision), (r, r));
    // A deleted key can be created again, with a new create_revision.
    let (d, _) = s.delete("/c/a", None).await.expect("delete");
    let r2 = s.create("/c/a", b("3")).await.expect("re-create");
    assert!(r2 > d);
    let kv = s.get("/c/a", ReadAt::Latest).await.expect("get").expect("present");
    assert_eq!(kv.create_revision, r2);
}

pub async fn update_with_stale_revision_is_a_conflict_carrying_the_current_revision(
    s: Arc<dyn Store>,
) {
    let r1 = s.create("/u/a", b("1")).await.expect("create");
    let r2 = s.update("/u/a", b("2"), r1).await.expect("update");
    assert!(r2 > r1);
    match s.update("/u/a", b("3"), r1).await {
        Err(Error::Conflict { current }) => assert_eq!(current, r2),
        other => panic!("stale update: expected Conflict, got {other:?}"),
    }
    let kv = s.get("/u/a", ReadAt::Latest).await.expect("get").expect("present");
    assert_eq!((kv.value, kv.create_revision, kv.mod_revision), (b("2"), r1, r2));
    assert_eq!(s.current_revision().await.expect("rev"), r2, "a conflict must not write");
}

pub async fn missing_keys_are_not_found(s: Arc<dyn Store>) {
    assert!(s.get("/m/none", ReadAt::Latest).await.expect("get").is_none());
    assert!(matches!(s.update("/m/none", b("x"), Revision(1)).await, Err(Error::NotFound)));
    assert!(matches!(s.delete("/m/none", None).await, Err(Error::NotFound)));
}

pub async fn guarded_delete_checks_the_revision_and_returns_the_deleted_value(s: Arc<dyn Store>) {
    let r1 = s.create("/d/a", b("v")).await.expect("create");
    let r2 = s.update("/d/a", b("w"), r1).await.expect("update");
    match s.delete("/d/a", Some(r1)).await {
        Err(Error::Conflict { current }) => assert_eq!(current, r2),
        other => panic!("guarded delete: expected Conflict, got {other:?}"),
    }
    let (rd, prev) = s.delete("/d/a", Some(r2)).await.expect("delete");
    assert!(rd > r2);
    assert_eq!((prev.value, prev.mod_revision), (b("w"), r2));
    assert!(s.get("/d/a", ReadAt::Latest).await.expect("get").is_none());
}

pub async fn reads_at_past_revisions_see_history_and_refuse_future_or_compacted(s: Arc<dyn Store>) {
    let r1 = s.create("/h/a", b("1")).await.expect("create");
    let r2 = s.update("/h/a", b("2"), r1).await.expect("update");
    let r3 = s.create("/h/b", b("b")).await.expect("create b");
    let (r4, _) = s.delete("/h/a", None).await.expect("delete");
    let at = |r| ReadAt::Exact(r);
    assert_eq!(s.get("/h/a", at(r1)).await.expect("get").expect("at r1").value, b("1"));
    assert_eq!(s.get("/h/a", at(r3)).await.expect("get").expect("at r3").value, b("2"));
    assert!(s.get("/h/a", at(r4)).await.expect("get").is_none());
    let page = s.list("/h/", ListOptions { at: at(r2), ..Default::default() }).await.expect("list");
    assert_eq!(page.revision, r2);
    assert_eq!(page.items.iter().map(|kv| kv.key.as_str()).collect::<Vec<_>>(), ["/h/a"]);
    let page = s.list("/h/", ListOptions::default()).await.expect("list latest");
    assert_eq!(page.revision, r4);
    assert_eq!(page.items.iter().map(|kv| kv.key.as_str()).collect::<Vec<_>>(), ["/h/b"]);
    let future = Revision(r4.0 + 10);
    match s.get("/h/a", at(future)).await {
        Err(Error::FutureRevision { requested, current }) => {
            assert_eq!((requested, current), (future, r4))
        }
        other => panic!("future read: expected FutureRevision, got {other:?}"),
    }
    assert!(matches!(
        s.list("/h/", ListOptions { at: at(future), ..Default::default() }).await,
        Err(Error::FutureRevision { .. })
    ));
    s.compact(r2).await.expect("compact");
    match s.get("/h/a", at(r1)).await {
        Err(Error::Compacted { requested, compacted }) => {
            assert_eq!((requested, compacted), (r1, r2))
        }
        other => panic!("compacted read: expected Compacted, got {other:?}"),
    }
    assert!(matches!(
        s.list("/h/", ListOptions { at: at(r1), ..Default::default() }).await,
        Err(Error::Compacted { .. })
    ));
    // The compaction point itself stays readable.
    assert_eq!(s.get("/h/a", at(r2)).await.expect("get").expect("at r2").value, b("2"));
}

pub async fn pagination_stays_at_the_first_page_revision_while_writes_happen(s: Arc<dyn Store>) {
    let mut revs = Vec::new();
    for i in 0..10 {
        revs.push(s.create(&format!("/p/{i:02}"), b(&format!("v{i}"))).await.expect("create"));
    }
    s.create("/q/outside", b("x")).await.expect("create outside");
    let opts = |token| ListOptions { limit: Some(4), continue_token: token, ..Default::default() };
    let first = s.list("/p/", opts(None)).await.expect("first page");
    assert_eq!(first.items.len(), 4);
    assert_eq!(first.remaining, Some(6));
    let list_rev = first.revision;
    // Writes between pages must not show up in later pages.
    s.update("/p/05", b("changed"), revs[5]).await.expect("update");
    s.delete("/p/06", None).await.expect("delete");
    s.create("/p/99", b("new")).await.expect("create");
    let mut items = first.items.clone();
    let mut token = first.continue_token.clone();
    let mut pages = 1;
    while let Some(t) = token {
        let page = s.list("/p/", opts(Some(t))).await.expect("next page");
        assert_eq!(page.revision, list_rev, "every page is read at the first page's revision");
        items.extend(page.items);
        token = page.continue_token;
        pages += 1;
        assert!(pages < 10, "pagination does not end");
    }
    assert_eq!(pages, 3);
    let keys: Vec<String> = items.iter().map(|kv| kv.key.clone()).collect();
    assert_eq!(keys, (0..10).map(|i| format!("/p/{i:02}")).collect::<Vec<_>>());
    assert_eq!(items[5].value, b("v5"));
    assert!(matches!(
        s.list("/p/", opts(Some("not a token!".into()))).await,
        Err(Error::InvalidContinue(_))
    ));
}

pub async fn watch_is_ordered_gapless_filtered_and_carries_prev_values(s: Arc<dyn Store>) {
    let start = s.create("/w/seed", b("0")).await.expect("seed");
    let mut w = s.watch("/w/", start).await.expect("watch");
    let r1 = s.create("/w/a", b("1")).await.expect("create");
    s.create("/x/other", b("no")).await.expect("other prefix");
    let r2 = s.update("/w/a", b("2"), r1).await.expect("update");
    let (r3, _) = s.delete("/w/seed", None).await.expect("delete");
    match next_event(&mut w).await {
        WatchEvent::Put { kv, prev: None } => {
            assert_eq!((kv.key.as_str(), kv.mod_revision), ("/w/a", r1))
        }
        other => panic!("expected the create, got {other:?}"),
    }
    match next_event(&mut w).await {
        WatchEvent::Put { kv, prev: Some(prev) } => {
            assert_eq!((kv.mod_revision, kv.value, kv.create_revision), (r2, b("2"), r1));
            assert_eq!((prev.mod_revision, prev.value), (r1, b("1")));
        }
        other => panic!("expected the update with its prev value, got {other:?}"),
    }
    match next_event(&mut w).await {
        WatchEvent::Delete { revision, prev } => {
            assert_eq!((revision, prev.key.as_str(), prev.value), (r3, "/w/seed", b("0")))
        }
        other => panic!("expected the delete with its prev value, got {other:?}"),
    }
    // Many concurrent writers: the watcher sees every one, strictly increasing.
    let mut tasks = Vec::new();
    for i in 0..50 {
        let s = s.clone();
        tasks.push(tokio::spawn(async move { s.create(&format!("/w/n{i}"), b("n")).await }));
    }
    let mut acked = Vec::new();
    for t in tasks {
        acked.push(t.await.expect("join").expect("create"));
    }
    acked.sort();
    let mut seen = Vec::new();
    for _ in 0..50 {
        seen.push(next_event(&mut w).await.revision());
    }
    assert_eq!(seen, acked, "events are in revision order with no gap");
}

pub async fn watch_replays_history_and_refuses_compacted_revisions(s: Arc<dyn Store>) {
    let r1 = s.create("/r/a", b("1")).await.expect("create");
    let r2 = s.update("/r/a", b("2"), r1).await.expect("update");
    let r3 = s.create("/r/b", b("b")).await.expect("create b");
    let mut w = s.watch("/r/", Revision::ZERO).await.expect("watch from 0");
    let mut revs = Vec::new();
    for _ in 0..3 {
        revs.push(next_event(&mut w).await.revision());
    }
    assert_eq!(revs, [r1, r2, r3]);
    let r4 = s.create("/r/c", b("c")).await.expect("create c");
    assert_eq!(next_event(&mut w).await.revision(), r4, "replay continues live without a gap");
    let mut w = s.watch("/r/", r2).await.expect("watch from r2");
    assert_eq!(next_event(&mut w).await.revision(), r3);
    s.compact(r2).await.expect("compact");
    match s.watch("/r/", r1).await {
        Err(Error::Compacted { .. }) => {}
        Err(e) => panic!("watch from a compacted revision: expected Compacted, got {e}"),
        Ok(_) => panic!("watch from a compacted revision: expected Compacted, got a stream"),
    }
    let mut w = s.watch("/r/", r2).await.expect("watch from the compaction point");
    assert_eq!(next_event(&mut w).await.revision(), r3);
}

pub async fn compaction_validates_its_target(s: Arc<dyn Store>) {
    assert_eq!(s.compacted_revision().await.expect("compacted"), Revision::ZERO);
    let r1 = s.create("/k/a", b("1")).await.expect("create");
    let r2 = s.update("/k/a", b("2"), r1).await.expect("update");
    assert!(matches!(s.compact(Revision(r2.0 + 5)).await, Err(Error::FutureRevision { .. })));
    s.compact(r1).await.expect("compact r1");
    assert_eq!(s.compacted_revision().await.expect("compacted"), r1);
    assert!(matches!(s.compact(r1).await, Err(Error::Compacted { .. })));
    s.compact(r2).await.expect("compact r2");
    assert_eq!(s.compacted_revision().await.expect("compacted"), r2);
    // Compaction forgets history, never the current value.
    let kv = s.get("/k/a", ReadAt::Latest).await.expect("get").expect("present");
    assert_eq!((kv.value, kv.create_revision), (b("2"), r1));
    let r3 = s.update("/k/a", b("3"), r2).await.expect("update after compaction");
    assert!(r3 > r2);
}

pub async fn oversized_values_are_refused(s: Arc<dyn Store>) {
    let big = Bytes::from(vec![b'x'; crate::MAX_VALUE_BYTES + 1]);
    assert!(matches!(s.create("/big", big.clone()).await, Err(Error::ValueTooLarge { .. })));
    let r = s.create("/big", b("small")).await.expect("create");
    assert!(matches!(s.update("/big", big, r).await, Err(Error::ValueTooLarge { .. })));
    // etcd counts the whole request against its 1.5 MiB limit, so leave room for the framing.
    let fits = Bytes::from(vec![b'x'; crate::MAX_VALUE_BYTES - 16 * 1024]);
    s.update("/big", fits, r).await.expect("a value just under the limit fits");
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[tokio::test]
    async fn memory_backend_conforms() {
        run_all(|| async { Arc::new(crate::memory::MemoryStore::new()) as Arc<dyn Store> }).await;
    }

    #[tokio::test]
    async fn embedded_backend_conforms() {
        let dirs = Mutex::new(Vec::new());
        run_all(|| {
            let dir = tempfile::tempdir().expect("tempdir");
            let path = dir.path().join("store.redb");
            dirs.lock().unwrap_or_else(|p| p.into_inner()).push(dir);
            async move {
                Arc::new(
                    crate::embedded::EmbeddedStore::open(crate::embedded::Config::new(path))
                        .expect("open"),
                ) as Arc<dyn Store>
            }
        })
        .await;
    }
}
