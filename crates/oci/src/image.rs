//! Image service: references, pulls from OCI/Docker v2 registries, a content-addressed store and
//! layer unpacking.
//!
//! [`ImageStore`] is what the kubelet calls: [`ImageStore::ensure`] applies a pod's
//! `imagePullPolicy`, pulling (with credentials from pull secrets, see [`Auth`]) when needed,
//! and returns an [`Image`] whose `rootfs` is ready to be used as a container's root.
//!
//! For the kubelet:
//! - open one store per node: `ImageStore::open_with(cli::images_root(data_dir), StoreConfig {
//!   insecure_registries, .. })` (clones share it);
//! - per container: `Auth::from_docker_config_json` for each of the pod's pull secrets, merged
//!   with [`Auth::merge`]; [`PullPolicy::from_spec`] for the container's policy; then
//!   [`ImageStore::ensure`]. On error, [`Error::kubelet_reason`] is the waiting reason
//!   (`ErrImagePull`, `ErrImageNeverPull`, `InvalidImageName`) and the message is the error;
//! - the container's root is `image.rootfs` (shared by every container of that image: give
//!   runc an overlay or a copy, never write to it); `image.config` fills in command, args,
//!   env, working dir and user the way the pod spec does not; the status's `imageID` is
//!   [`Image::repo_digest`];
//! - image GC: [`ImageStore::gc`] with the kubelet's thresholds and the image IDs (or
//!   references) of every container that exists.
//!
//! On disk, under the store's root:
//! - `blobs/sha256/<hex>`: manifests, configs and layers, each verified against its digest;
//! - `snapshots/<image-id>/rootfs`: the image's layers unpacked into one directory;
//! - `images/<hash of reference>.json`: what each reference points to, so `list()` survives
//!   restarts.

mod auth;
mod import;
pub mod layout;
mod reference;
mod registry;
mod store;
pub mod unpack;

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

pub use auth::{Auth, Credential};
pub use reference::{DEFAULT_REGISTRY, ImageRef};
pub use store::{GcReport, ImageStore, StoreConfig};

/// What went wrong, told apart so the kubelet can set a container's waiting reason.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid image reference {reference:?}: {reason}")]
    InvalidReference { reference: String, reason: String },
    #[error("image {reference} not found: {message}")]
    NotFound { reference: String, message: String },
    #[error("unauthorized to pull from {registry}: {message}")]
    Unauthorized { registry: String, message: String },
    #[error("cannot reach registry {registry}: {message}")]
    Network { registry: String, message: String },
    #[error("registry {registry} failed: {message}")]
    Registry { registry: String, message: String },
    #[error("Container image {reference:?} is not present with pull policy of Never")]
    NeverPull { reference: String },
    #[error("image {reference:?} is not in the local store")]
    NotPresent { reference: String },
    #[error("digest mismatch for {what}: expected {expected}, got {actual}")]
    DigestMismatch { what: String, expected: String, actual: String },
    #[error("{reference} is not a usable image: {reason}")]
    InvalidImage { reference: String, reason: String },
    #[error("unsafe layer entry {path:?}: {reason}")]
    UnsafeLayer { path: String, reason: String },
    #[error("invalid registry credentials: {0}")]
    InvalidCredentials(String),
    #[error("invalid image archive: {0}")]
    InvalidArchive(String),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The broad class of an [`Error`], for decisions (retry, back off, report).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    InvalidName,
    NotFound,
    Unauthorized,
    Network,
    NeverPull,
    NotPresent,
    /// The registry or the content is wrong (bad digest, not an image, hostile layer).
    InvalidContent,
    /// Local failure (disk).
    Local,
}

impl Error {
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::InvalidReference { .. } => ErrorKind::InvalidName,
            Error::NotFound { .. } => ErrorKind::NotFound,
            Error::Unauthorized { .. } | Error::InvalidCredentials(_) => ErrorKind::Unauthorized,
            Error::Network { .. } | Error::Registry { .. } => ErrorKind::Network,
            Error::NeverPull { .. } => ErrorKind::NeverPull,
            Error::NotPresent { .. } => ErrorKind::NotPresent,
            Error::DigestMismatch { .. }
            | Error::InvalidImage { .. }
            | Error::UnsafeLayer { .. }
            | Error::InvalidArchive(_) => ErrorKind::InvalidContent,
            Error::Io { .. } => ErrorKind::Local,
        }
    }

    /// The container waiting reason the kubelet reports for this failure, as upstream does.
    pub fn kubelet_reason(&self) -> &'static str {
        match self.kind() {
            ErrorKind::InvalidName => "InvalidImageName",
            ErrorKind::NeverPull => "ErrImageNeverPull",
            _ => "ErrImagePull",
        }
    }

    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Error {
        Error::Io { context: context.into(), source }
    }
}

/// A container's `imagePullPolicy`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum PullPolicy {
    Always,
    IfNotPresent,
    Never,
}

impl PullPolicy {
    /// The policy as the API server would default it: the pod's value when set, otherwise
    /// `Always` for `:latest` or untagged images and `IfNotPresent` for the rest.
    pub fn from_spec(policy: Option<&str>, image: &str) -> Result<PullPolicy> {
        match policy {
            Some("Always") => Ok(PullPolicy::Always),
            Some("IfNotPresent") => Ok(PullPolicy::IfNotPresent),
            Some("Never") => Ok(PullPolicy::Never),
            Some(other) => Err(Error::InvalidReference {
                reference: image.to_string(),
                reason: format!("unknown imagePullPolicy {other:?}"),
            }),
            // Upstream: a "latest" tag (explicit or implied by having neither tag nor digest).
            None => Ok(match ImageRef::parse(image)?.tag() {
                Some("latest") => PullPolicy::Always,
                _ => PullPolicy::IfNotPresent,
            }),
        }
    }
}

/// The runtime defaults an image carries (the `config` object of its config blob).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageConfig {
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    /// `NAME=value` entries.
    pub env: Vec<String>,
    pub working_dir: Option<String>,
    pub user: Option<String>,
    /// `port/proto`, e.g. `80/tcp`.
    pub exposed_ports: Vec<String>,
    pub stop_signal: Option<String>,
    pub labels: std::collections::BTreeMap<String, String>,
}

/// A locally available image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Image {
    /// `sha256:<hex>` of the image config (Docker's and containerd's image ID).
    pub id: String,
    /// The normalised reference it was pulled or imported as.
    pub reference: String,
    /// The digest the reference resolved to (the index for multi-arch images): pulling
    /// `name@digest` gets the same image.
    pub digest: String,
    /// The unpacked root filesystem.
    pub rootfs: PathBuf,
    pub config: ImageConfig,
    /// Bytes of the image's blobs as stored (compressed layers, config, manifests).
    pub size: u64,
}

impl Image {
    /// `registry/repository@digest`, what container statuses show as the image ID.
    pub fn repo_digest(&self) -> String {
        match ImageRef::parse(&self.reference) {
            Ok(r) => r.with_digest(&self.digest).to_string(),
            Err(_) => self.digest.clone(),
        }
    }
}

/// The platform whose manifest is chosen from a multi-arch index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Platform {
    pub os: String,
    pub architecture: String,
    pub variant: Option<String>,
}

impl Platform {
    /// The running platform in OCI (Go) names: `linux/amd64`, `linux/arm64/v8`, ….
    pub fn current() -> Platform {
        let (architecture, variant) = match std::env::consts::ARCH {
            "x86_64" => ("amd64", None),
            "x86" => ("386", None),
            "aarch64" => ("arm64", Some("v8")),
            "arm" => ("arm", Some("v7")),
            "powerpc64" => ("ppc64le", None),
            "s390x" => ("s390x", None),
            "riscv64" => ("riscv64", None),
            "loongarch64" => ("loong64", None),
            other => (other, None),
        };
        Platform {
            os: "linux".to_string(),
            architecture: architecture.to_string(),
            variant: variant.map(str::to_string),
        }
    }
}

impl std::fmt::Display for Platform {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        if let Some(v) = &self.variant {
            write!(f, "/{v}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pull_policy_defaults_like_the_api_server() {
        let d = |img| PullPolicy::from_spec(None, img).unwrap();
        assert_eq!(d("nginx"), PullPolicy::Always);
        assert_eq!(d("nginx:latest"), PullPolicy::Always);
        assert_eq!(d("nginx:1.27"), PullPolicy::IfNotPresent);
        let pinned =
            "nginx@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
        assert_eq!(d(pinned), PullPolicy::IfNotPresent);
        assert_eq!(PullPolicy::from_spec(Some("Never"), "nginx").unwrap(), PullPolicy::Never);
        assert!(PullPolicy::from_spec(Some("Sometimes"), "nginx").is_err());
    }

    #[test]
    fn errors_map_to_the_kubelets_waiting_reasons() {
        let never = Error::NeverPull { reference: "x".into() };
        assert_eq!(never.kubelet_reason(), "ErrImageNeverPull");
        let invalid = ImageRef::parse("Bad").unwrap_err();
        assert_eq!(invalid.kubelet_reason(), "InvalidImageName");
        let unauthorized = Error::Unauthorized { registry: "r".into(), message: "m".into() };
        assert_eq!(unauthorized.kind(), ErrorKind::Unauthorized);
        assert_eq!(unauthorized.kubelet_reason(), "ErrImagePull");
    }

    #[test]
    fn the_current_platform_uses_oci_architecture_names() {
        let p = Platform::current();
        assert_eq!(p.os, "linux");
        assert!(!p.architecture.contains('_'), "{p}");
    }
}
