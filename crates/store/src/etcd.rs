//! The etcd backend (cargo feature `etcd`): the same `Store` contract on a real etcd v3 cluster.
//! CAS is a txn on `mod_revision`, watches carry `prev_kv` and report progress when idle.

use crate::{
    Error, KeyValue, ListOptions, ListPage, MAX_VALUE_BYTES, ReadAt, Result, Revision, Store,
    WatchEvent, WatchStream, continue_token,
};
use bytes::Bytes;
use etcd_client::{
    Certificate, Client, CompactionOptions, Compare, CompareOp, ConnectOptions, DeleteOptions,
    EventType, GetOptions, Identity, TlsOptions, Txn, TxnOp, TxnOpResponse, WatchOptions,
};
use std::path::PathBuf;
use std::time::Duration;

/// How to reach etcd.
#[derive(Clone, Debug)]
pub struct Config {
    /// Client URLs, e.g. `http://127.0.0.1:2379` (`https://` with TLS).
    pub endpoints: Vec<String>,
    /// PEM CA bundle that signed the etcd server certificate.
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate and key, for etcd with `--client-cert-auth`.
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    pub dial_timeout: Duration,
    /// Each request fails with `Unavailable` after this long.
    pub request_timeout: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            endpoints: vec!["http://127.0.0.1:2379".into()],
            ca_file: None,
            cert_file: None,
            key_file: None,
            dial_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(10),
        }
    }
}

pub struct EtcdStore {
    client: Client,
}

/// gRPC codes (tonic::Code as i32) that mean "etcd cannot be reached right now".
const CODE_CANCELLED: i32 = 1;
const CODE_UNKNOWN: i32 = 2;
const CODE_DEADLINE_EXCEEDED: i32 = 4;
const CODE_UNAVAILABLE: i32 = 14;

const MSG_COMPACTED: &str = "required revision has been compacted";
const MSG_FUTURE: &str = "required revision is a future revision";

/// A mapped client error; compaction/future errors still need their revisions filled in.
enum Mapped {
    Compacted,
    Future,
    Other(Error),
}

fn classify(e: etcd_client::Error) -> Mapped {
    match e {
        etcd_client::Error::GRpcStatus(s) => {
            let code = i32::from(s.code());
            if s.message().contains(MSG_COMPACTED) {
                Mapped::Compacted
            } else if s.message().contains(MSG_FUTURE) {
                Mapped::Future
            } else if s.message().contains("request is too large") {
                // etcd counts the whole request (key, framing) against --max-request-bytes.
                Mapped::Other(Error::ValueTooLarge {
                    size: MAX_VALUE_BYTES,
                    limit: MAX_VALUE_BYTES,
                })
            } else if matches!(
                code,
                CODE_CANCELLED | CODE_UNKNOWN | CODE_DEADLINE_EXCEEDED | CODE_UNAVAILABLE
            ) {
                Mapped::Other(Error::Unavailable(format!("etcd: {}", s.message())))
            } else {
                Mapped::Other(Error::Backend(format!("etcd: {}", s.message())))
            }
        }
        etcd_client::Error::TransportError(e) => {
            Mapped::Other(Error::Unavailable(format!("etcd transport: {e}")))
        }
        etcd_client::Error::IoError(e) => Mapped::Other(Error::Unavailable(format!("etcd: {e}"))),
        etcd_client::Error::WatchError(e) => {
            Mapped::Other(Error::Unavailable(format!("etcd watch: {e}")))
        }
        other => Mapped::Other(Error::Backend(format!("etcd: {other}"))),
    }
}

/// The first key after every key starting with `prefix` (etcd's range end for a prefix).
fn prefix_end(prefix: &str) -> Vec<u8> {
    let mut end = prefix.as_bytes().to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    // Empty prefix (or all 0xff): "\0" means "to the end of the keyspace".
    vec![0]
}

fn rev(r: i64) -> Revision {
    Revision(u64::try_from(r).unwrap_or(0))
}

fn to_i64(r: Revision) -> i64 {
    i64::try_from(r.0).unwrap_or(i64::MAX)
}

fn convert(kv: &etcd_client::KeyValue) -> KeyValue {
    KeyValue {
        key: String::from_utf8_lossy(kv.key()).into_owned(),
        value: Bytes::copy_from_slice(kv.value()),
        create_revision: rev(kv.create_revision()),
        mod_revision: rev(kv.mod_revision()),
    }
}

fn check_size(value: &Bytes) -> Result<()> {
    if value.len() > MAX_VALUE_BYTES {
        return Err(Error::ValueTooLarge { size: value.len(), limit: MAX_VALUE_BYTES });
    }
    Ok(())
}

fn header_rev(h: Option<&etcd_client::ResponseHeader>) -> Revision {
    h.map(|h| rev(h.revision())).unwrap_or_default()
}

impl EtcdStore {
    /// Connects to `config.endpoints`, with TLS when a CA or client certificate is given.
    pub async fn connect(config: Config) -> Result<EtcdStore> {
        let mut opts = ConnectOptions::new()
            .with_connect_timeout(config.dial_timeout)
            .with_timeout(config.request_timeout)
            .with_keep_alive(Duration::from_secs(10), config.request_timeout);
        if config.ca_file.is_some() || config.cert_file.is_some() {
            let mut tls = TlsOptions::new();
            if let Some(ca) = &config.ca_file {
                tls = tls.ca_certificate(Certificate::from_pem(std::fs::read(ca)?));
            }
            match (&config.cert_file, &config.key_file) {
                (Some(cert), Some(key)) => {
                    tls =
                        tls.identity(Identity::from_pem(std::fs::read(cert)?, std::fs::read(key)?));
                }
                (None, None) => {}
                _ => {
                    return Err(Error::Backend(
                        "etcd client TLS needs both a certificate and a key file".into(),
                    ));
                }
            }
            opts = opts.with_tls(tls);
        }
        let client = Client::connect(&config.endpoints, Some(opts)).await.map_err(|e| {
            match classify(e) {
                Mapped::Other(e) => e,
                _ => Error::Unavailable("etcd: connect failed".into()),
            }
        })?;
        Ok(EtcdStore { client })
    }

    /// Turns a client error into the store's typed error, asking etcd for the revisions a
    /// `Compacted`/`FutureRevision` answer carries.
    async fn map_err(&self, e: etcd_client::Error, requested: Revision) -> Error {
        match classify(e) {
            Mapped::Other(e) => e,
            Mapped::Compacted => match self.compacted_revision().await {
                Ok(compacted) => Error::Compacted { requested, compacted },
                Err(e) => e,
            },
            Mapped::Future => match self.current_revision().await {
                Ok(current) => Error::FutureRevision { requested, current },
                Err(e) => e,
            },
        }
    }

    /// Runs a txn whose failure branch reads the key; returns the txn response or the
    /// NotFound/Conflict/AlreadyExists it implies.
    async fn guarded(
        &self,
        key: &str,
        compare: Compare,
        op: TxnOp,
    ) -> Result<Result<etcd_client::TxnResponse, Option<KeyValue>>> {
        let txn = Txn::new().when([compare]).and_then([op]).or_else([TxnOp::get(key, None)]);
        let resp = match self.client.clone().txn(txn).await {
            Ok(r) => r,
            Err(e) => return Err(self.map_err(e, Revision::ZERO).await),
        };
        if resp.succeeded() {
            return Ok(Ok(resp));
        }
        let current = resp.op_responses().into_iter().find_map(|r| match r {
            TxnOpResponse::Get(g) => g.kvs().first().map(convert),
            _ => None,
        });
        Ok(Err(current))
    }
}

#[async_trait::async_trait]
impl Store for EtcdStore {
    async fn get(&self, key: &str, at: ReadAt) -> Result<Option<KeyValue>> {
        let requested = match at {
            ReadAt::Latest => Revision::ZERO,
            ReadAt::Exact(r) => r,
        };
        let opts = GetOptions::new().with_revision(to_i64(requested));
        match self.client.clone().get(key, Some(opts)).await {
            Ok(resp) => Ok(resp.kvs().first().map(convert)),
            Err(e) => Err(self.map_err(e, requested).await),
        }
    }

    async fn list(&self, prefix: &str, opts: ListOptions) -> Result<ListPage> {
        let (requested, start) = match &opts.continue_token {
            Some(token) => {
                let (rev, last) = continue_token::decode(token)?;
                // The first key strictly after the last one sent.
                let mut start = last.into_bytes();
                start.push(0);
                (rev, start)
            }
            None => (
                match opts.at {
                    ReadAt::Latest => Revision::ZERO,
                    ReadAt::Exact(r) => r,
                },
                prefix.as_bytes().to_vec(),
            ),
        };
        let limit = opts.limit.filter(|l| *l > 0);
        let mut get =
            GetOptions::new().with_range(prefix_end(prefix)).with_revision(to_i64(requested));
        if let Some(l) = limit {
            get = get.with_limit(i64::from(l));
        }
        let resp = match self.client.clone().get(start, Some(get)).await {
            Ok(r) => r,
            Err(e) => return Err(self.map_err(e, requested).await),
        };
        let revision =
            if requested == Revision::ZERO { header_rev(resp.header()) } else { requested };
        let items: Vec<KeyValue> = resp.kvs().iter().map(convert).collect();
        let remaining = u64::try_from(resp.count()).unwrap_or(0).saturating_sub(items.len() as u64);
        let continue_token = (resp.more() && remaining > 0)
            .then(|| items.last().map(|kv| continue_token::encode(revision, &kv.key)))
            .flatten();
        Ok(ListPage { items, revision, continue_token, remaining: limit.map(|_| remaining) })
    }

    async fn create(&self, key: &str, value: Bytes) -> Result<Revision> {
        check_size(&value)?;
        let cmp = Compare::create_revision(key, CompareOp::Equal, 0);
        match self.guarded(key, cmp, TxnOp::put(key, value.to_vec(), None)).await? {
            Ok(resp) => Ok(header_rev(resp.header())),
            Err(_) => Err(Error::AlreadyExists),
        }
    }

    async fn update(&self, key: &str, value: Bytes, expected: Revision) -> Result<Revision> {
        check_size(&value)?;
        let cmp = Compare::mod_revision(key, CompareOp::Equal, to_i64(expected));
        match self.guarded(key, cmp, TxnOp::put(key, value.to_vec(), None)).await? {
            Ok(resp) => Ok(header_rev(resp.header())),
            Err(None) => Err(Error::NotFound),
            Err(Some(current)) => Err(Error::Conflict { current: current.mod_revision }),
        }
    }

    async fn delete(&self, key: &str, expected: Option<Revision>) -> Result<(Revision, KeyValue)> {
        let cmp = match expected {
            Some(e) => Compare::mod_revision(key, CompareOp::Equal, to_i64(e)),
            None => Compare::create_revision(key, CompareOp::Greater, 0),
        };
        let op = TxnOp::delete(key, Some(DeleteOptions::new().with_prev_key()));
        match self.guarded(key, cmp, op).await? {
            Ok(resp) => {
                let revision = header_rev(resp.header());
                let prev = resp.op_responses().into_iter().find_map(|r| match r {
                    TxnOpResponse::Delete(d) => d.prev_kvs().first().map(convert),
                    _ => None,
                });
                // The compare proved the key existed, so etcd returns its previous value.
                let prev =
                    prev.ok_or_else(|| Error::Backend("etcd: delete without prev_kv".into()))?;
                Ok((revision, prev))
            }
            Err(None) => Err(Error::NotFound),
            Err(Some(current)) => Err(Error::Conflict { current: current.mod_revision }),
        }
    }

    async fn watch(&self, prefix: &str, after: Revision) -> Result<WatchStream> {
        // etcd refuses start < compacted, exactly our "after < compacted" rule; so start at
        // `after` itself and drop the events at `after`. Start 0 would mean "now", hence max(1).
        let start = to_i64(after).max(1);
        // etcd first confirms a watch and only then cancels it for compaction, so check first
        // (one cheap read when `after` is still readable).
        let probe = GetOptions::new().with_count_only().with_revision(start);
        if let Err(e) = self.client.clone().get("\0", Some(probe)).await {
            match classify(e) {
                Mapped::Compacted => {
                    let compacted = self.compacted_revision().await?;
                    return Err(Error::Compacted { requested: after, compacted });
                }
                // Watching from a revision not written yet is fine: events arrive when it is.
                Mapped::Future => {}
                Mapped::Other(e) => return Err(e),
            }
        }
        let opts = WatchOptions::new()
            .with_range(prefix_end(prefix))
            .with_start_revision(start)
            .with_prev_key()
            .with_progress_notify();
        let stream = match self.client.clone().watch(prefix, Some(opts)).await {
            Ok(s) => s,
            Err(e) => return Err(self.map_err(e, after).await),
        };
        let (sender, mut responses) = stream.split();
        // Wait for the creation answer, so a compacted start is an error, not a stream.
        loop {
            let msg = match responses.message().await {
                Ok(Some(m)) => m,
                Ok(None) => return Err(Error::Unavailable("etcd closed the watch".into())),
                Err(e) => return Err(self.map_err(e, after).await),
            };
            if msg.canceled() {
                if msg.compact_revision() > 0 {
                    return Err(Error::Compacted {
                        requested: after,
                        compacted: rev(msg.compact_revision()),
                    });
                }
                return Err(Error::Backend(format!("etcd watch refused: {}", msg.cancel_reason())));
            }
            if msg.created() {
                break;
            }
        }
        Ok(follow(after, responses, sender))
    }

    async fn compact(&self, up_to: Revision) -> Result<()> {
        let current = self.current_revision().await?;
        if up_to > current {
            return Err(Error::FutureRevision { requested: up_to, current });
        }
        let compacted = self.compacted_revision().await?;
        if up_to <= compacted {
            return Err(Error::Compacted { requested: up_to, compacted });
        }
        let opts = CompactionOptions::new().with_physical();
        match self.client.clone().compact(to_i64(up_to), Some(opts)).await {
            Ok(_) => Ok(()),
            Err(e) => Err(self.map_err(e, up_to).await),
        }
    }

    async fn current_revision(&self) -> Result<Revision> {
        let opts = GetOptions::new().with_count_only();
        match self.client.clone().get("\0", Some(opts)).await {
            Ok(resp) => Ok(header_rev(resp.header())),
            Err(e) => match classify(e) {
                Mapped::Other(e) => Err(e),
                _ => Err(Error::Backend("etcd: unexpected error reading the revision".into())),
            },
        }
    }

    async fn compacted_revision(&self) -> Result<Revision> {
        // etcd does not report its compaction point, but a read at a revision below it fails:
        // binary-search the oldest readable revision (a few cheap count-only reads).
        let current = self.current_revision().await?.0;
        let (mut lo, mut hi) = (1u64, current.max(1));
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            let opts = GetOptions::new().with_count_only().with_revision(to_i64(Revision(mid)));
            match self.client.clone().get("\0", Some(opts)).await {
                Ok(_) => hi = mid,
                Err(e) => match classify(e) {
                    Mapped::Compacted => lo = mid + 1,
                    Mapped::Future => hi = mid,
                    Mapped::Other(e) => return Err(e),
                },
            }
        }
        Ok(if lo <= 1 { Revision::ZERO } else { Revision(lo) })
    }
}

/// How long a watch stays silent before it asks etcd for a progress notification.
const PROGRESS_INTERVAL: Duration = Duration::from_secs(1);

/// Follows etcd's watch responses as `WatchEvent`s. The request sender lives in the stream:
/// dropping it would end the watch, and it is how idle progress is requested.
fn follow(
    after: Revision,
    responses: etcd_client::WatchResponseStream,
    sender: etcd_client::WatchRequestSender,
) -> WatchStream {
    use futures::StreamExt;
    struct S {
        /// Events at or below this were asked for only to get etcd's compaction check.
        after: Revision,
        /// Highest revision reported (event or progress).
        reported: Revision,
        responses: etcd_client::WatchResponseStream,
        sender: etcd_client::WatchRequestSender,
        pending: std::collections::VecDeque<WatchEvent>,
        done: bool,
    }
    let state =
        S { after, reported: after, responses, sender, pending: Default::default(), done: false };
    futures::stream::unfold(state, |mut s| async move {
        loop {
            if let Some(ev) = s.pending.pop_front() {
                return Some((Ok(ev), s));
            }
            if s.done {
                return None;
            }
            let msg = match tokio::time::timeout(PROGRESS_INTERVAL, s.responses.message()).await {
                Err(_idle) => {
                    if s.sender.request_progress().await.is_err() {
                        s.done = true;
                        return Some((Err(Error::Unavailable("etcd watch lost".into())), s));
                    }
                    continue;
                }
                Ok(Ok(Some(m))) => m,
                Ok(Ok(None)) => {
                    s.done = true;
                    return Some((Err(Error::Unavailable("etcd closed the watch".into())), s));
                }
                Ok(Err(e)) => {
                    s.done = true;
                    let e = match classify(e) {
                        Mapped::Other(e) => e,
                        _ => Error::Unavailable("etcd watch failed".into()),
                    };
                    return Some((Err(e), s));
                }
            };
            if msg.canceled() {
                s.done = true;
                let e = if msg.compact_revision() > 0 {
                    Error::Compacted { requested: s.after, compacted: rev(msg.compact_revision()) }
                } else {
                    Error::Unavailable(format!("etcd cancelled the watch: {}", msg.cancel_reason()))
                };
                return Some((Err(e), s));
            }
            let header = header_rev(msg.header());
            if msg.events().is_empty() {
                if header > s.reported {
                    s.reported = header;
                    return Some((Ok(WatchEvent::Progress { revision: header }), s));
                }
                continue;
            }
            for ev in msg.events() {
                let Some(kv) = ev.kv() else { continue };
                let kv = convert(kv);
                if kv.mod_revision <= s.after {
                    continue; // replayed from `after` itself; the caller already has it
                }
                let prev = ev.prev_kv().map(convert);
                let event = match ev.event_type() {
                    EventType::Put => WatchEvent::Put { kv, prev },
                    EventType::Delete => {
                        let revision = kv.mod_revision;
                        // etcd omits prev_kv only if it was compacted away: keep the key.
                        let prev = prev.unwrap_or(KeyValue {
                            key: kv.key,
                            value: Bytes::new(),
                            create_revision: Revision::ZERO,
                            mod_revision: Revision::ZERO,
                        });
                        WatchEvent::Delete { revision, prev }
                    }
                };
                s.pending.push_back(event);
            }
            if let Some(last) = s.pending.back() {
                s.reported = s.reported.max(last.revision());
            }
        }
    })
    .boxed()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::{Child, Command, Stdio};
    use std::sync::{Arc, Mutex};

    /// A real etcd on free loopback ports in a temp dir, killed on drop (even on failure).
    struct TestEtcd {
        child: Option<Child>,
        dir: tempfile::TempDir,
        client_port: u16,
        peer_port: u16,
    }

    fn free_port() -> u16 {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").port()
    }

    fn etcd_available() -> bool {
        let found = Command::new("etcd")
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !found {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "etcd is not installed and CI=true: the etcd backend tests must run"
            );
            eprintln!("SKIPPED: `etcd` is not on PATH; the etcd backend tests did not run");
        }
        found
    }

    impl TestEtcd {
        async fn start() -> TestEtcd {
            let mut etcd = TestEtcd {
                child: None,
                dir: tempfile::tempdir().expect("tempdir"),
                client_port: free_port(),
                peer_port: free_port(),
            };
            etcd.spawn().await;
            etcd
        }

        fn url(&self) -> String {
            format!("http://127.0.0.1:{}", self.client_port)
        }

        async fn spawn(&mut self) {
            let peer = format!("http://127.0.0.1:{}", self.peer_port);
            let child = Command::new("etcd")
                .arg("--name=test")
                .arg(format!("--data-dir={}", self.dir.path().join("data").display()))
                .arg(format!("--listen-client-urls={}", self.url()))
                .arg(format!("--advertise-client-urls={}", self.url()))
                .arg(format!("--listen-peer-urls={peer}"))
                .arg(format!("--initial-advertise-peer-urls={peer}"))
                .arg(format!("--initial-cluster=test={peer}"))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("spawn etcd");
            self.child = Some(child);
            let deadline = std::time::Instant::now() + Duration::from_secs(20);
            loop {
                let cfg = self.config();
                if let Ok(s) = EtcdStore::connect(cfg).await
                    && s.current_revision().await.is_ok()
                {
                    return;
                }
                assert!(std::time::Instant::now() < deadline, "etcd did not start");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }

        fn config(&self) -> Config {
            Config {
                endpoints: vec![self.url()],
                dial_timeout: Duration::from_secs(1),
                request_timeout: Duration::from_secs(2),
                ..Config::default()
            }
        }

        fn kill(&mut self) {
            if let Some(mut c) = self.child.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }

    impl Drop for TestEtcd {
        fn drop(&mut self) {
            self.kill();
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn etcd_backend_conforms() {
        if !etcd_available() {
            return;
        }
        let servers = Arc::new(Mutex::new(Vec::new()));
        crate::conformance::run_all(|| {
            let servers = servers.clone();
            async move {
                let etcd = TestEtcd::start().await;
                let store = EtcdStore::connect(etcd.config()).await.expect("connect");
                servers.lock().unwrap_or_else(|p| p.into_inner()).push(etcd);
                Arc::new(store) as Arc<dyn Store>
            }
        })
        .await;
    }

    /// The watch cache in front of etcd, as `rkube server --etcd-servers` runs it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_watch_cache_over_etcd_conforms() {
        if !etcd_available() {
            return;
        }
        let servers = Arc::new(Mutex::new(Vec::new()));
        crate::conformance::run_all(|| {
            let servers = servers.clone();
            async move {
                let etcd = TestEtcd::start().await;
                let store = EtcdStore::connect(etcd.config()).await.expect("connect");
                servers.lock().unwrap_or_else(|p| p.into_inner()).push(etcd);
                crate::cache::CachedStore::new(Arc::new(store)).await.expect("cache")
                    as Arc<dyn Store>
            }
        })
        .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn lost_etcd_is_unavailable_and_the_store_recovers_when_it_returns() {
        if !etcd_available() {
            return;
        }
        let mut etcd = TestEtcd::start().await;
        let store = EtcdStore::connect(etcd.config()).await.expect("connect");
        let r = store.create("/x", Bytes::from_static(b"1")).await.expect("create");
        etcd.kill();
        match store.get("/x", ReadAt::Latest).await {
            Err(Error::Unavailable(_)) => {}
            other => panic!("expected Unavailable while etcd is down, got {other:?}"),
        }
        etcd.spawn().await;
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            match store.get("/x", ReadAt::Latest).await {
                Ok(Some(kv)) => {
                    assert_eq!(kv.mod_revision, r);
                    break;
                }
                Ok(None) => panic!("the key vanished across an etcd restart"),
                Err(Error::Unavailable(_)) => {
                    assert!(std::time::Instant::now() < deadline, "no recovery after restart");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => panic!("unexpected error during recovery: {e}"),
            }
        }
    }

    #[test]
    fn prefix_end_increments_the_last_byte() {
        assert_eq!(prefix_end("/a/"), b"/a0".to_vec());
        assert_eq!(prefix_end(""), vec![0]);
    }
}
