use crate::Revision;

/// What went wrong in a store call. Callers branch on the variant (409, 410, 503, …).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("key not found")]
    NotFound,
    #[error("key already exists")]
    AlreadyExists,
    #[error("revision mismatch: the key is now at revision {current}")]
    Conflict { current: Revision },
    #[error("revision {requested} has been compacted; the oldest available is {compacted}")]
    Compacted { requested: Revision, compacted: Revision },
    #[error("revision {requested} is in the future; the current revision is {current}")]
    FutureRevision { requested: Revision, current: Revision },
    #[error("value of {size} bytes exceeds the limit of {limit} bytes")]
    ValueTooLarge { size: usize, limit: usize },
    #[error("invalid continue token: {0}")]
    InvalidContinue(String),
    #[error("store unavailable: {0}")]
    Unavailable(String),
    #[error("store file {path}: {reason}")]
    Corrupt { path: String, reason: String },
    #[error("store I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("store backend: {0}")]
    Backend(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
