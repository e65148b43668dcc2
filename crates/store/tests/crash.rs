//! Crash safety of the embedded store: a child process writes in a loop and is SIGKILLed at
//! random moments; after each reopen every acknowledged write is there and history has no gap.
//!
//! The child is this same test binary, re-run with `RKUBE_STORE_CRASH_WRITER=<file>`: it then
//! becomes the writer and prints `ACK <revision>` for each acknowledged write.

use bytes::Bytes;
use futures::StreamExt;
use rkube_store::embedded::{Config, EmbeddedStore};
use rkube_store::{ReadAt, Revision, Store, WatchEvent};
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::mpsc;
use std::time::{Duration, Instant};

const WRITER_ENV: &str = "RKUBE_STORE_CRASH_WRITER";
const ROUNDS: usize = 20;

/// Kills the child even when an assertion fails halfway.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The writer side: only active inside the re-executed child.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_writer_child() {
    let Ok(path) = std::env::var(WRITER_ENV) else { return };
    let store = Arc::new(EmbeddedStore::open(Config::new(path)).expect("open"));
    // Several concurrent writers, so kills also land in the middle of group commits.
    let mut tasks = Vec::new();
    for w in 0..4 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            let pid = std::process::id();
            for i in 0u64.. {
                let key = format!("/crash/{pid}-{w}-{i}");
                let value = Bytes::from(format!("{key}:{}", "x".repeat(200)));
                let rev = store.create(&key, value).await.expect("create");
                println!("ACK {} {key}", rev.0);
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
}

/// A small xorshift generator seeded from the clock: random kill moments without a dependency.
fn next_random(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

#[tokio::test]
async fn sigkilled_writer_loses_no_acknowledged_write() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("store.redb");
    let exe = std::env::current_exe().expect("current exe");
    let mut seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0x9e37_79b9)
        | 1;
    let mut acked: Vec<(u64, String)> = Vec::new();
    let started = Instant::now();
    for round in 0..ROUNDS {
        let child = Command::new(&exe)
            .args(["--exact", "crash_writer_child", "--nocapture", "--test-threads", "1"])
            .env(WRITER_ENV, &path)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn writer");
        let mut child = KillOnDrop(child);
        let stdout = child.0.stdout.take().expect("stdout");
        let (tx, rx) = mpsc::channel();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Some(rest) = line.strip_prefix("ACK ") {
                    let mut parts = rest.splitn(2, ' ');
                    if let (Some(rev), Some(key)) = (parts.next(), parts.next())
                        && let Ok(rev) = rev.parse::<u64>()
                    {
                        let _ = tx.send((rev, key.to_string()));
                    }
                }
            }
        });
        // Wait for the first ack of this round, then let it run a random while and kill it.
        let first = rx.recv_timeout(Duration::from_secs(20)).expect("writer acknowledged nothing");
        acked.push(first);
        let pause = Duration::from_millis(next_random(&mut seed) % 200);
        std::thread::sleep(pause);
        // SIGKILL: no destructor, no flush, exactly like a crash.
        child.0.kill().expect("kill");
        let _ = child.0.wait();
        let _ = reader.join();
        acked.extend(rx.try_iter());

        let store = EmbeddedStore::open(Config::new(&path)).expect("reopen after kill");
        let current = store.current_revision().await.expect("rev");
        for (rev, key) in &acked {
            let kv =
                store.get(key, ReadAt::Latest).await.expect("get").unwrap_or_else(|| {
                    panic!("round {round}: acknowledged {key} at {rev} is lost")
                });
            assert_eq!(
                kv.mod_revision,
                Revision(*rev),
                "round {round}: {key} has a wrong revision"
            );
            assert!(kv.value.starts_with(key.as_bytes()), "round {round}: {key} value is partial");
        }
        // A watch from 0 replays the whole history: strictly increasing, no gap, up to current.
        let mut w = store.watch("/", Revision::ZERO).await.expect("watch");
        let mut expected = 1u64;
        while expected <= current.0 {
            let ev = tokio::time::timeout(Duration::from_secs(5), w.next())
                .await
                .expect("replay stalled")
                .expect("replay ended")
                .expect("replay error");
            if matches!(ev, WatchEvent::Progress { .. }) {
                continue;
            }
            assert_eq!(ev.revision().0, expected, "round {round}: gap in replayed history");
            if let WatchEvent::Put { kv, .. } = &ev {
                assert!(kv.value.starts_with(kv.key.as_bytes()), "partial value in history");
            }
            expected += 1;
        }
        drop(w);
        drop(store);
    }
    assert!(acked.len() >= ROUNDS, "too few acknowledged writes: {}", acked.len());
    eprintln!(
        "crash test: {ROUNDS} SIGKILLs, {} acknowledged writes verified in {:?}",
        acked.len(),
        started.elapsed()
    );
}
