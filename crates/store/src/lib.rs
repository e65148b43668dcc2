//! The revisioned state store: the cluster's memory, with etcd semantics.
//! Every object and every resourceVersion comes from here, and every watch starts here.
//!
//! # Guarantees (every backend)
//! - One global revision; each write gets the next one; an object's resourceVersion is the
//!   revision of its last write (`mod_revision`).
//! - A watch from revision `r` yields every event with revision `> r` under its prefix, in order,
//!   without gaps, each carrying the previous value; or `Compacted` if `r` is too old.
//! - A write is acknowledged only once it is durable (for durable backends).

pub mod cache;
#[cfg(any(test, feature = "testing"))]
pub mod conformance;
pub mod embedded;
mod error;
#[cfg(feature = "etcd")]
pub mod etcd;
pub mod memory;

pub use error::{Error, Result};

use bytes::Bytes;
use futures::stream::BoxStream;
use std::fmt;

/// etcd's default request size limit: larger values are refused with [`Error::ValueTooLarge`].
pub const MAX_VALUE_BYTES: usize = 1536 * 1024;

/// A point in the store's history. Revision 0 means "before anything was written".
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Revision(pub u64);

impl Revision {
    pub const ZERO: Revision = Revision(0);
    pub fn next(self) -> Revision {
        Revision(self.0 + 1)
    }
}

impl fmt::Display for Revision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// One stored value with the revisions etcd reports for it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyValue {
    pub key: String,
    pub value: Bytes,
    /// Revision of the write that created this key (in its current life).
    pub create_revision: Revision,
    /// Revision of the last write to this key: the object's resourceVersion.
    pub mod_revision: Revision,
}

/// Which point in history a read sees.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum ReadAt {
    #[default]
    Latest,
    /// Exactly this revision: `FutureRevision` if not reached yet, `Compacted` if forgotten.
    Exact(Revision),
}

/// A list request: every key starting with `prefix`, in key order.
#[derive(Clone, Debug, Default)]
pub struct ListOptions {
    pub at: ReadAt,
    /// At most this many items; `None` or `Some(0)` means all.
    pub limit: Option<u32>,
    /// The opaque token from a previous page; it pins the read to that page's revision.
    pub continue_token: Option<String>,
}

#[derive(Clone, Debug, Default)]
pub struct ListPage {
    pub items: Vec<KeyValue>,
    /// The revision the whole list (every page of it) is consistent at.
    pub revision: Revision,
    /// Present when more items follow; pass it back to get the next page.
    pub continue_token: Option<String>,
    /// How many items remain after this page, when known.
    pub remaining: Option<u64>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WatchEvent {
    /// A create (`prev == None`) or an update.
    Put { kv: KeyValue, prev: Option<KeyValue> },
    /// A delete at `revision`; `prev` is the value just before it.
    Delete { revision: Revision, prev: KeyValue },
    /// Nothing under the prefix changed up to `revision` (sent when the stream is idle).
    Progress { revision: Revision },
}

impl WatchEvent {
    pub fn revision(&self) -> Revision {
        match self {
            WatchEvent::Put { kv, .. } => kv.mod_revision,
            WatchEvent::Delete { revision, .. } => *revision,
            WatchEvent::Progress { revision } => *revision,
        }
    }
    pub fn key(&self) -> Option<&str> {
        match self {
            WatchEvent::Put { kv, .. } => Some(&kv.key),
            WatchEvent::Delete { prev, .. } => Some(&prev.key),
            WatchEvent::Progress { .. } => None,
        }
    }
}

/// A stream of watch events. It ends with an `Err` when the watch cannot continue
/// (for example [`Error::Compacted`]: the history it needs is gone); the consumer re-lists.
pub type WatchStream = BoxStream<'static, Result<WatchEvent>>;

/// The storage interface every backend implements and the API server builds on.
/// Object-safe (`Arc<dyn Store>`), so backends can be chosen at run time and wrapped (watch cache).
#[async_trait::async_trait]
pub trait Store: Send + Sync + 'static {
    async fn get(&self, key: &str, at: ReadAt) -> Result<Option<KeyValue>>;
    /// Every key starting with `prefix`, in key order, paginated.
    async fn list(&self, prefix: &str, opts: ListOptions) -> Result<ListPage>;
    /// `AlreadyExists` if the key is present.
    async fn create(&self, key: &str, value: Bytes) -> Result<Revision>;
    /// Compare-and-swap on the key's `mod_revision`: `Conflict` carrying the current revision
    /// when it moved, `NotFound` when the key is gone.
    async fn update(&self, key: &str, value: Bytes, expected: Revision) -> Result<Revision>;
    /// Delete, optionally guarded by `expected` mod_revision. Returns the revision of the delete
    /// and the value that was deleted.
    async fn delete(&self, key: &str, expected: Option<Revision>) -> Result<(Revision, KeyValue)>;
    /// Every event under `prefix` with revision `> after`, in order, with no gaps.
    async fn watch(&self, prefix: &str, after: Revision) -> Result<WatchStream>;
    /// Forget history up to and including `up_to` (reads before it answer `Compacted`).
    async fn compact(&self, up_to: Revision) -> Result<()>;
    /// The latest revision written.
    async fn current_revision(&self) -> Result<Revision>;
    /// The revision history was compacted to (0 if never).
    async fn compacted_revision(&self) -> Result<Revision>;
}

/// The opaque continue token shared by every backend: the list's revision and the last key sent.
pub mod continue_token {
    use crate::{Error, Result, Revision};
    use base64::Engine;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;

    #[derive(serde::Serialize, serde::Deserialize)]
    struct Token {
        rev: u64,
        start: String,
    }

    pub fn encode(rev: Revision, last_key: &str) -> String {
        let json = serde_json::to_vec(&Token { rev: rev.0, start: last_key.to_string() })
            .unwrap_or_default();
        URL_SAFE_NO_PAD.encode(json)
    }

    /// The revision to read at and the key after which the next page starts.
    pub fn decode(token: &str) -> Result<(Revision, String)> {
        let bytes =
            URL_SAFE_NO_PAD.decode(token).map_err(|e| Error::InvalidContinue(e.to_string()))?;
        let t: Token =
            serde_json::from_slice(&bytes).map_err(|e| Error::InvalidContinue(e.to_string()))?;
        Ok((Revision(t.rev), t.start))
    }
}
