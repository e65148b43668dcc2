//! The on-disk image store: content-addressed blobs, one unpacked snapshot per image, and a
//! record per reference.
//!
//! # Guarantees
//! - A blob file exists only once its content has been verified against its digest (it is
//!   written to `tmp/` and renamed into place).
//! - A snapshot directory exists only once every layer has been unpacked into it and checked
//!   against the config's diff IDs (it is unpacked under a staging name and renamed).
//! - A record is written (atomically) only after its blobs and snapshot exist, so `list()`
//!   after a crash shows only usable images.
//! - Removal and garbage collection exclude pulls and imports (an in-process lock plus an
//!   `flock` on `<root>/lock` for other processes on the same store, such as `rkube image rm`
//!   next to the kubelet), so a blob a pull is about to use is never deleted under it.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::reference::{ImageRef, validate_digest};
use super::unpack::{self, HashingReader, UnpackOptions, hex};
use super::{Auth, Error, Image, ImageConfig, Platform, PullPolicy, Result};

/// How the store reaches registries and unpacks layers.
#[derive(Debug, Clone)]
pub struct StoreConfig {
    /// Registries (`host[:port]`, as in image references) spoken to over plain HTTP.
    pub insecure_registries: Vec<String>,
    /// Create device nodes found in layers (otherwise they are skipped).
    pub allow_device_nodes: bool,
    /// Which manifest of a multi-arch index to use.
    pub platform: Platform,
    /// Connect timeout, and the longest a registry response may stall between reads.
    pub timeout: Duration,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            insecure_registries: Vec::new(),
            allow_device_nodes: false,
            platform: Platform::current(),
            timeout: Duration::from_secs(30),
        }
    }
}

/// What a garbage collection did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GcReport {
    /// Disk usage of the store's filesystem when the collection started, in percent.
    pub usage_percent: u8,
    /// Bytes the collection aimed to free (0 when usage was below the high threshold).
    pub wanted_bytes: u64,
    /// Estimated bytes freed (blobs and unpacked files no other image shares).
    pub freed_bytes: u64,
    /// References removed.
    pub removed: Vec<String>,
}

/// The image store. Cheap to clone; clones share state.
#[derive(Clone)]
pub struct ImageStore {
    pub(crate) inner: Arc<Inner>,
}

pub(crate) struct Inner {
    pub(crate) root: PathBuf,
    pub(crate) config: StoreConfig,
    /// Pulls and imports share it; removals and GC take it exclusively.
    lock: tokio::sync::RwLock<()>,
    /// One pull per reference at a time, so concurrent pods do not download twice.
    pulling: std::sync::Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    temp_counter: AtomicU64,
}

/// What the store remembers about one reference.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Record {
    pub reference: String,
    /// What the reference resolved to (an index for multi-arch images).
    pub digest: String,
    /// The platform manifest actually used.
    pub manifest_digest: String,
    pub id: String,
    pub config: ImageConfig,
    /// Every blob the image needs: index (if any), manifest, config, layers.
    pub blobs: Vec<String>,
    pub size: u64,
    pub unpacked_bytes: u64,
    pub created_ns: u64,
    pub last_used_ns: u64,
}

/// The parts of a manifest or index we use; unknown fields are ignored.
#[derive(Debug, Clone, Deserialize, Serialize, Default)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Manifest {
    #[serde(default)]
    pub schema_version: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub media_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config: Option<Descriptor>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub layers: Vec<Descriptor>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub manifests: Vec<Descriptor>,
}

#[derive(Debug, Clone, Deserialize, Serialize, Default)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Descriptor {
    #[serde(default)]
    pub media_type: String,
    pub digest: String,
    #[serde(default)]
    pub size: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<PlatformSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub annotations: Option<BTreeMap<String, String>>,
}

#[derive(Debug, Clone, Deserialize, Serialize, Default)]
pub(crate) struct PlatformSpec {
    #[serde(default)]
    pub os: String,
    #[serde(default)]
    pub architecture: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
}

/// How stale a record's last use may get before a use is written down.
const LAST_USED_RESOLUTION: Duration = Duration::from_secs(60);

pub(crate) const MEDIA_OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub(crate) const MEDIA_DOCKER_LIST: &str =
    "application/vnd.docker.distribution.manifest.list.v2+json";
pub(crate) const MEDIA_OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub(crate) const MEDIA_DOCKER_MANIFEST: &str =
    "application/vnd.docker.distribution.manifest.v2+json";
pub(crate) const MEDIA_OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
const MEDIA_DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
pub(crate) const MEDIA_OCI_LAYER_TAR: &str = "application/vnd.oci.image.layer.v1.tar";
const LAYER_MEDIA_TYPES: &[&str] = &[
    "application/vnd.oci.image.layer.v1.tar",
    "application/vnd.oci.image.layer.v1.tar+gzip",
    "application/vnd.oci.image.layer.v1.tar+zstd",
    "application/vnd.oci.image.layer.nondistributable.v1.tar",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd",
    "application/vnd.docker.image.rootfs.diff.tar.gzip",
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
];

impl Manifest {
    pub(crate) fn is_index(&self) -> bool {
        matches!(self.media_type.as_deref(), Some(MEDIA_OCI_INDEX) | Some(MEDIA_DOCKER_LIST))
            || (self.config.is_none() && !self.manifests.is_empty())
    }

    /// The entry of an index for `platform`: an exact variant match first, then one without
    /// a variant, then any of that OS and architecture.
    pub(crate) fn pick_platform(&self, platform: &Platform) -> Option<&Descriptor> {
        let candidates: Vec<&Descriptor> = self
            .manifests
            .iter()
            .filter(|d| {
                d.platform
                    .as_ref()
                    .is_some_and(|p| p.os == platform.os && p.architecture == platform.architecture)
            })
            .collect();
        let variant = |d: &&Descriptor| d.platform.as_ref().and_then(|p| p.variant.clone());
        candidates
            .iter()
            .find(|d| variant(d) == platform.variant)
            .or_else(|| candidates.iter().find(|d| variant(d).is_none()))
            .or_else(|| candidates.first())
            .copied()
    }

    /// Checks this is a container image manifest we can unpack (not a chart, not schema 1).
    pub(crate) fn check_image(&self, reference: &str) -> Result<&Descriptor> {
        let invalid =
            |reason: String| Error::InvalidImage { reference: reference.to_string(), reason };
        if self.schema_version != Some(2) {
            return Err(invalid(format!(
                "unsupported manifest schema version {:?}",
                self.schema_version
            )));
        }
        let config =
            self.config.as_ref().ok_or_else(|| invalid("manifest has no config".into()))?;
        if !matches!(config.media_type.as_str(), MEDIA_OCI_CONFIG | MEDIA_DOCKER_CONFIG) {
            return Err(invalid(format!(
                "config media type {:?} is not a container image",
                config.media_type
            )));
        }
        validate_digest(&config.digest).map_err(invalid)?;
        for layer in &self.layers {
            if !LAYER_MEDIA_TYPES.contains(&layer.media_type.as_str()) {
                return Err(invalid(format!(
                    "unsupported layer media type {:?}",
                    layer.media_type
                )));
            }
            validate_digest(&layer.digest).map_err(invalid)?;
        }
        Ok(config)
    }
}

/// The config blob's fields we use (Docker's capitalised names).
#[derive(Deserialize, Default)]
struct ConfigFile {
    #[serde(default)]
    config: Option<ContainerConfig>,
    #[serde(default)]
    rootfs: Option<RootFs>,
}

#[derive(Deserialize, Default)]
struct RootFs {
    #[serde(default)]
    diff_ids: Vec<String>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "PascalCase")]
struct ContainerConfig {
    entrypoint: Option<Vec<String>>,
    cmd: Option<Vec<String>>,
    env: Option<Vec<String>>,
    working_dir: Option<String>,
    user: Option<String>,
    exposed_ports: Option<BTreeMap<String, serde_json::Value>>,
    stop_signal: Option<String>,
    labels: Option<BTreeMap<String, String>>,
}

fn now_ns() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0)
}

pub(crate) fn sha256_digest(bytes: &[u8]) -> String {
    format!("sha256:{}", hex(&Sha256::digest(bytes)))
}

fn digest_hex(digest: &str) -> Result<&str> {
    validate_digest(digest).map_err(Error::InvalidArchive)?;
    Ok(&digest["sha256:".len()..])
}

impl ImageStore {
    /// Opens (creating if needed) a store rooted at `root`, with default configuration.
    pub fn open(root: impl Into<PathBuf>) -> Result<ImageStore> {
        ImageStore::open_with(root, StoreConfig::default())
    }

    pub fn open_with(root: impl Into<PathBuf>, config: StoreConfig) -> Result<ImageStore> {
        let root = root.into();
        for dir in ["blobs/sha256", "snapshots", "images", "tmp"] {
            fs::create_dir_all(root.join(dir))
                .map_err(|e| Error::io(format!("creating {}", root.join(dir).display()), e))?;
        }
        let inner = Inner {
            root,
            config,
            lock: tokio::sync::RwLock::new(()),
            pulling: std::sync::Mutex::new(HashMap::new()),
            temp_counter: AtomicU64::new(0),
        };
        inner.clean_leftovers();
        Ok(ImageStore { inner: Arc::new(inner) })
    }

    pub fn root(&self) -> &Path {
        &self.inner.root
    }

    pub fn config(&self) -> &StoreConfig {
        &self.inner.config
    }

    /// Makes `reference` available as `policy` says: `Always` pulls (reusing blobs already
    /// here), `IfNotPresent` pulls only when the image is not stored, `Never` fails with
    /// [`Error::NeverPull`] when it is not stored.
    pub async fn ensure(&self, reference: &str, policy: PullPolicy, auth: &Auth) -> Result<Image> {
        let image = ImageRef::parse(reference)?;
        match policy {
            PullPolicy::Always => self.pull_ref(&image, auth, false).await,
            PullPolicy::IfNotPresent => match self.present(&image).await? {
                Some(found) => Ok(found),
                None => self.pull_ref(&image, auth, true).await,
            },
            PullPolicy::Never => self
                .present(&image)
                .await?
                .ok_or_else(|| Error::NeverPull { reference: reference.to_string() }),
        }
    }

    /// Pulls `reference` from its registry, verifying every blob, and unpacks it.
    pub async fn pull(&self, reference: &str, auth: &Auth) -> Result<Image> {
        let image = ImageRef::parse(reference)?;
        self.pull_ref(&image, auth, false).await
    }

    /// The stored image for `reference`, if any (does not count as a use).
    pub async fn get(&self, reference: &str) -> Result<Option<Image>> {
        let image = ImageRef::parse(reference)?;
        let _shared = self.inner.lock.read().await;
        Ok(self.inner.find(&image)?.map(|r| self.inner.image(&r)))
    }

    /// Every stored image reference, sorted by reference.
    pub async fn list(&self) -> Result<Vec<Image>> {
        let _shared = self.inner.lock.read().await;
        let mut images: Vec<Image> =
            self.inner.records()?.iter().map(|r| self.inner.image(r)).collect();
        images.sort_by(|a, b| a.reference.cmp(&b.reference));
        Ok(images)
    }

    /// Removes a reference, or every reference of an image ID (`sha256:<hex>` or a unique hex
    /// prefix of at least 4 characters), deleting the snapshot and blobs nothing else uses.
    /// Returns the references removed.
    pub async fn remove(&self, reference: &str) -> Result<Vec<String>> {
        let _exclusive = self.inner.lock.write().await;
        let _exclusive_file = self.inner.file_lock(true).await?;
        let inner = self.inner.clone();
        let reference = reference.to_string();
        tokio::task::spawn_blocking(move || {
            let records = inner.records()?;
            let by_name = ImageRef::parse(&reference)
                .ok()
                .map(|r| r.to_string())
                .and_then(|name| records.iter().find(|r| r.reference == name).cloned());
            let victims: Vec<Record> = match by_name {
                Some(record) => vec![record],
                None => {
                    let id = inner.match_id(&records, &reference)?;
                    records.iter().filter(|r| r.id == id).cloned().collect()
                }
            };
            inner.remove_records(&records, &victims)?;
            Ok(victims.into_iter().map(|r| r.reference).collect())
        })
        .await
        .map_err(|e| Error::io("remove task", std::io::Error::other(e)))?
    }

    /// Imports every image of an OCI image-layout tarball (`skopeo copy … oci-archive:`) or a
    /// `docker save` tarball.
    pub async fn import(&self, archive: impl AsRef<Path>) -> Result<Vec<Image>> {
        let _shared = self.inner.lock.read().await;
        let _shared_file = self.inner.file_lock(false).await?;
        let inner = self.inner.clone();
        let archive = archive.as_ref().to_path_buf();
        tokio::task::spawn_blocking(move || super::import::import(&inner, &archive))
            .await
            .map_err(|e| Error::io("import task", std::io::Error::other(e)))?
    }

    /// Removes the least recently used images not in `in_use` (references, repo digests or
    /// IDs) while the filesystem holding the store is at least `high_threshold_pct` full,
    /// until the estimate says it is below `low_threshold_pct` (the kubelet's policy).
    pub async fn gc(
        &self,
        high_threshold_pct: u8,
        low_threshold_pct: u8,
        in_use: &[String],
    ) -> Result<GcReport> {
        let _exclusive = self.inner.lock.write().await;
        let _exclusive_file = self.inner.file_lock(true).await?;
        let inner = self.inner.clone();
        let in_use = in_use.to_vec();
        tokio::task::spawn_blocking(move || {
            inner.gc(high_threshold_pct, low_threshold_pct, &in_use)
        })
        .await
        .map_err(|e| Error::io("gc task", std::io::Error::other(e)))?
    }

    async fn present(&self, image: &ImageRef) -> Result<Option<Image>> {
        let _shared = self.inner.lock.read().await;
        let Some(mut record) = self.inner.find(image)? else {
            return Ok(None);
        };
        if !self.inner.snapshot_dir(&record.id)?.is_dir() {
            return Ok(None);
        }
        // The kubelet ensures images on every pod sync; a minute is fine resolution for LRU
        // and spares a disk write per sync.
        let now = now_ns();
        if now.saturating_sub(record.last_used_ns) > LAST_USED_RESOLUTION.as_nanos() as u64 {
            record.last_used_ns = now;
            self.inner.write_record(&record)?;
        }
        Ok(Some(self.inner.image(&record)))
    }

    /// Pulls `image`; with `if_absent`, a pull that finds the image stored once it holds the
    /// reference's lock (another caller just pulled it) returns that instead of pulling again.
    async fn pull_ref(&self, image: &ImageRef, auth: &Auth, if_absent: bool) -> Result<Image> {
        let name = image.to_string();
        let per_ref = {
            let mut pulling =
                self.inner.pulling.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            pulling.entry(name.clone()).or_default().clone()
        };
        let result = async {
            let _one_pull = per_ref.lock().await;
            if if_absent && let Some(found) = self.present(image).await? {
                return Ok(found);
            }
            let _shared = self.inner.lock.read().await;
            let _shared_file = self.inner.file_lock(false).await?;
            let fetched = super::registry::fetch(&self.inner, image, auth).await?;
            let inner = self.inner.clone();
            let name = name.clone();
            tokio::task::spawn_blocking(move || {
                inner.commit(&name, &fetched.top_digest, &fetched.manifest_digest)
            })
            .await
            .map_err(|e| Error::io("unpack task", std::io::Error::other(e)))?
        }
        .await;
        // Forget the reference's lock once nobody else holds or waits on it.
        let mut pulling =
            self.inner.pulling.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if Arc::strong_count(&per_ref) == 2 {
            pulling.remove(&name);
        }
        result
    }
}

impl Inner {
    /// Takes the store's lock file, shared or exclusive: the in-process `lock` does not cover
    /// another process on the same store (`rkube image rm` while the kubelet pulls).
    async fn file_lock(&self, exclusive: bool) -> Result<Flock<fs::File>> {
        let path = self.root.join("lock");
        tokio::task::spawn_blocking(move || {
            let file = fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(&path)
                .map_err(|e| Error::io("opening the store lock", e))?;
            let arg = if exclusive { FlockArg::LockExclusive } else { FlockArg::LockShared };
            Flock::lock(file, arg).map_err(|(_, e)| Error::io("locking the store", e.into()))
        })
        .await
        .map_err(|e| Error::io("lock task", std::io::Error::other(e)))?
    }

    fn clean_leftovers(&self) {
        // Staging snapshots and partial downloads of a process that died are never reused;
        // they are only removed when no other process has the store open for a pull.
        let Ok(file) = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(self.root.join("lock"))
        else {
            return;
        };
        let Ok(_exclusive) = Flock::lock(file, FlockArg::LockExclusiveNonblock) else {
            return;
        };
        for dir in [self.root.join("tmp"), self.root.join("snapshots")] {
            let Ok(entries) = fs::read_dir(&dir) else { continue };
            for entry in entries.flatten() {
                let name = entry.file_name();
                if dir.ends_with("tmp") || name.to_string_lossy().starts_with(".staging-") {
                    let _ = unpack::remove_any(&entry.path());
                }
            }
        }
    }

    pub(crate) fn blob_path(&self, digest: &str) -> Result<PathBuf> {
        Ok(self.root.join("blobs/sha256").join(digest_hex(digest)?))
    }

    pub(crate) fn has_blob(&self, digest: &str) -> Result<bool> {
        Ok(self.blob_path(digest)?.is_file())
    }

    fn snapshot_dir(&self, id: &str) -> Result<PathBuf> {
        Ok(self.root.join("snapshots").join(digest_hex(id)?))
    }

    pub(crate) fn temp_path(&self) -> PathBuf {
        let n = self.temp_counter.fetch_add(1, Ordering::Relaxed);
        self.root.join("tmp").join(format!("{}-{}-{n}", std::process::id(), now_ns()))
    }

    /// Stores `bytes` as a blob; when `expected` is given the content must hash to it.
    pub(crate) fn write_blob(&self, expected: Option<&str>, bytes: &[u8]) -> Result<String> {
        let digest = sha256_digest(bytes);
        if let Some(expected) = expected
            && expected != digest
        {
            return Err(Error::DigestMismatch {
                what: "blob".into(),
                expected: expected.to_string(),
                actual: digest,
            });
        }
        let path = self.blob_path(&digest)?;
        if !path.is_file() {
            let tmp = self.temp_path();
            fs::write(&tmp, bytes).map_err(|e| Error::io("writing blob", e))?;
            fs::rename(&tmp, &path).map_err(|e| Error::io("storing blob", e))?;
        }
        Ok(digest)
    }

    /// Streams `reader` into the blob store, hashing as it goes; with `expected`, the content
    /// must hash to it. Returns the digest and size.
    pub(crate) fn ingest(
        &self,
        reader: impl Read,
        expected: Option<&str>,
    ) -> Result<(String, u64)> {
        let tmp = self.temp_path();
        let result = (|| {
            let mut file = fs::File::create(&tmp).map_err(|e| Error::io("creating blob", e))?;
            let mut hashing = HashingReader::new(reader);
            std::io::copy(&mut hashing, &mut file).map_err(|e| Error::io("writing blob", e))?;
            file.flush().map_err(|e| Error::io("writing blob", e))?;
            let digest = hashing.digest();
            if let Some(expected) = expected
                && expected != digest
            {
                return Err(Error::DigestMismatch {
                    what: "blob".into(),
                    expected: expected.to_string(),
                    actual: digest,
                });
            }
            fs::rename(&tmp, self.blob_path(&digest)?).map_err(|e| Error::io("storing blob", e))?;
            Ok((digest, hashing.count))
        })();
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        result
    }

    pub(crate) fn read_blob(&self, digest: &str) -> Result<Vec<u8>> {
        let path = self.blob_path(digest)?;
        let bytes = fs::read(&path).map_err(|e| Error::io(format!("reading blob {digest}"), e))?;
        // Cheap for manifests and configs, and it catches a blob changed on disk.
        let actual = sha256_digest(&bytes);
        if actual != digest {
            return Err(Error::DigestMismatch {
                what: "stored blob".into(),
                expected: digest.to_string(),
                actual,
            });
        }
        Ok(bytes)
    }

    /// Turns stored blobs into a usable image: checks the manifest, parses the config, unpacks
    /// the layers (once per image ID) and records `reference`.
    pub(crate) fn commit(
        &self,
        reference: &str,
        top_digest: &str,
        manifest_digest: &str,
    ) -> Result<Image> {
        let manifest: Manifest = serde_json::from_slice(&self.read_blob(manifest_digest)?)
            .map_err(|e| Error::InvalidImage {
                reference: reference.to_string(),
                reason: format!("manifest is not valid JSON: {e}"),
            })?;
        let config_desc = manifest.check_image(reference)?;
        let config_bytes = self.read_blob(&config_desc.digest)?;
        let config_file: ConfigFile =
            serde_json::from_slice(&config_bytes).map_err(|e| Error::InvalidImage {
                reference: reference.to_string(),
                reason: format!("config is not valid JSON: {e}"),
            })?;
        let id = config_desc.digest.clone();
        let snapshot = self.snapshot_dir(&id)?;
        let unpacked_bytes = if snapshot.is_dir() {
            read_unpacked_bytes(&snapshot)
        } else {
            let diff_ids =
                config_file.rootfs.as_ref().map(|r| r.diff_ids.clone()).unwrap_or_default();
            self.unpack_snapshot(reference, &manifest, &diff_ids, &snapshot)?
        };

        let c = config_file.config.unwrap_or_default();
        let config = ImageConfig {
            entrypoint: c.entrypoint.unwrap_or_default(),
            cmd: c.cmd.unwrap_or_default(),
            env: c.env.unwrap_or_default(),
            working_dir: c.working_dir.filter(|w| !w.is_empty()),
            user: c.user.filter(|u| !u.is_empty()),
            exposed_ports: c.exposed_ports.unwrap_or_default().into_keys().collect(),
            stop_signal: c.stop_signal.filter(|s| !s.is_empty()),
            labels: c.labels.unwrap_or_default(),
        };
        let mut blobs = Vec::new();
        if top_digest != manifest_digest {
            blobs.push(top_digest.to_string());
        }
        blobs.push(manifest_digest.to_string());
        blobs.push(id.clone());
        blobs.extend(manifest.layers.iter().map(|l| l.digest.clone()));
        let mut size = 0;
        for blob in &blobs {
            size += fs::metadata(self.blob_path(blob)?)
                .map_err(|e| Error::io(format!("blob {blob}"), e))?
                .len();
        }
        let now = now_ns();
        let previous = self.read_record(reference)?;
        let created_ns = previous.as_ref().map(|r| r.created_ns).unwrap_or(now);
        if let Some(old) = previous.filter(|old| old.id != id) {
            self.keep_by_digest(old)?;
        }
        let record = Record {
            reference: reference.to_string(),
            digest: top_digest.to_string(),
            manifest_digest: manifest_digest.to_string(),
            id,
            config,
            blobs,
            size,
            unpacked_bytes,
            created_ns,
            last_used_ns: now,
        };
        self.write_record(&record)?;
        Ok(self.image(&record))
    }

    /// A tag that moved to another image leaves the old one behind as `name@digest` (Docker's
    /// dangling image), so a container still running on it keeps its rootfs and GC can still
    /// see, age and remove it.
    fn keep_by_digest(&self, mut old: Record) -> Result<()> {
        let Ok(name) = ImageRef::parse(&old.reference) else {
            return Ok(());
        };
        let by_digest = name.with_digest(&old.digest).to_string();
        if by_digest == old.reference {
            return Ok(());
        }
        old.reference = by_digest;
        self.write_record(&old)
    }

    fn unpack_snapshot(
        &self,
        reference: &str,
        manifest: &Manifest,
        diff_ids: &[String],
        snapshot: &Path,
    ) -> Result<u64> {
        // The snapshot is shared by every manifest naming this config, so the config's diff
        // IDs must pin exactly what gets unpacked.
        if diff_ids.len() != manifest.layers.len() {
            return Err(Error::InvalidImage {
                reference: reference.to_string(),
                reason: format!(
                    "config lists {} diff IDs for {} layers",
                    diff_ids.len(),
                    manifest.layers.len()
                ),
            });
        }
        let name =
            snapshot.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let n = self.temp_counter.fetch_add(1, Ordering::Relaxed);
        let staging =
            self.root.join("snapshots").join(format!(".staging-{name}-{}-{n}", std::process::id()));
        let rootfs = staging.join("rootfs");
        let result = (|| {
            fs::create_dir_all(&rootfs).map_err(|e| Error::io("creating snapshot", e))?;
            let options = UnpackOptions {
                allow_devices: self.config.allow_device_nodes,
                preserve_owners: nix::unistd::geteuid().is_root(),
            };
            let mut total = 0;
            for (i, layer) in manifest.layers.iter().enumerate() {
                let path = self.blob_path(&layer.digest)?;
                let file = fs::File::open(&path)
                    .map_err(|e| Error::io(format!("opening layer {}", layer.digest), e))?;
                // The compressed blob is re-hashed while it is read: the copy on disk is what
                // gets unpacked, so that is what must match the manifest.
                let mut hashing = HashingReader::new(std::io::BufReader::new(file));
                let unpacked = unpack::unpack_layer(&rootfs, &mut hashing, &options)?;
                std::io::copy(&mut hashing, &mut std::io::sink())
                    .map_err(|e| Error::io("reading layer", e))?;
                if hashing.digest() != layer.digest {
                    return Err(Error::DigestMismatch {
                        what: format!("layer {i}"),
                        expected: layer.digest.clone(),
                        actual: hashing.digest(),
                    });
                }
                if let Some(expected) = diff_ids.get(i)
                    && *expected != unpacked.diff_id
                {
                    return Err(Error::DigestMismatch {
                        what: format!("uncompressed layer {i} (diff ID)"),
                        expected: expected.clone(),
                        actual: unpacked.diff_id,
                    });
                }
                total += unpacked.bytes;
            }
            fs::write(staging.join("unpacked-bytes"), total.to_string())
                .map_err(|e| Error::io("writing snapshot size", e))?;
            match fs::rename(&staging, snapshot) {
                Ok(()) => {}
                // Another pull of the same image finished first: its snapshot is as good.
                Err(_) if snapshot.is_dir() => {
                    let _ = fs::remove_dir_all(&staging);
                }
                Err(e) => return Err(Error::io("storing snapshot", e)),
            }
            Ok(total)
        })();
        if result.is_err() {
            let _ = fs::remove_dir_all(&staging);
        }
        result
    }

    pub(crate) fn image(&self, record: &Record) -> Image {
        let rootfs = self.snapshot_dir(&record.id).map(|d| d.join("rootfs")).unwrap_or_default();
        Image {
            id: record.id.clone(),
            reference: record.reference.clone(),
            digest: record.digest.clone(),
            rootfs,
            config: record.config.clone(),
            size: record.size,
        }
    }

    fn record_path(&self, reference: &str) -> PathBuf {
        let name = hex(&Sha256::digest(reference.as_bytes()));
        self.root.join("images").join(format!("{name}.json"))
    }

    fn read_record(&self, reference: &str) -> Result<Option<Record>> {
        match fs::read(self.record_path(reference)) {
            Ok(bytes) => Ok(serde_json::from_slice::<Record>(&bytes)
                .ok()
                .filter(|r| r.reference == reference)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::io("reading image record", e)),
        }
    }

    fn write_record(&self, record: &Record) -> Result<()> {
        let bytes = serde_json::to_vec_pretty(record)
            .map_err(|e| Error::io("encoding image record", std::io::Error::other(e)))?;
        let tmp = self.temp_path();
        fs::write(&tmp, bytes).map_err(|e| Error::io("writing image record", e))?;
        fs::rename(&tmp, self.record_path(&record.reference))
            .map_err(|e| Error::io("writing image record", e))
    }

    pub(crate) fn records(&self) -> Result<Vec<Record>> {
        let dir = self.root.join("images");
        let entries = fs::read_dir(&dir).map_err(|e| Error::io("reading image records", e))?;
        let mut records = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|e| Error::io("reading image records", e))?;
            let Ok(bytes) = fs::read(entry.path()) else { continue };
            match serde_json::from_slice::<Record>(&bytes) {
                Ok(record) => records.push(record),
                Err(e) => {
                    tracing::warn!(path = %entry.path().display(), error = %e, "unreadable image record")
                }
            }
        }
        Ok(records)
    }

    /// The record for `image`; a digest-pinned reference also matches an image of the same
    /// repository pulled by tag that resolved to that digest.
    fn find(&self, image: &ImageRef) -> Result<Option<Record>> {
        if let Some(record) = self.read_record(&image.to_string())? {
            return Ok(Some(record));
        }
        let Some(digest) = image.digest() else {
            return Ok(None);
        };
        let name = image.name();
        Ok(self.records()?.into_iter().find(|r| {
            (r.digest == digest || r.manifest_digest == digest)
                && ImageRef::parse(&r.reference).is_ok_and(|rr| rr.name() == name)
        }))
    }

    fn match_id(&self, records: &[Record], wanted: &str) -> Result<String> {
        let hex_part = wanted.strip_prefix("sha256:").unwrap_or(wanted);
        let not_present = || Error::NotPresent { reference: wanted.to_string() };
        if hex_part.len() < 4 || !hex_part.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(not_present());
        }
        let ids: HashSet<&str> = records
            .iter()
            .map(|r| r.id.as_str())
            .filter(|id| id["sha256:".len().min(id.len())..].starts_with(hex_part))
            .collect();
        match ids.len() {
            0 => Err(not_present()),
            1 => Ok(ids.into_iter().next().unwrap_or_default().to_string()),
            _ => Err(Error::InvalidReference {
                reference: wanted.to_string(),
                reason: "image ID prefix is ambiguous".into(),
            }),
        }
    }

    /// Deletes `victims`' records, then every snapshot and blob no remaining record uses
    /// (which also collects what failed pulls left behind). Runs under the exclusive lock, so
    /// no pull or import is between storing a blob and recording it.
    /// Returns the bytes freed (blob sizes and unpacked bytes).
    fn remove_records(&self, all: &[Record], victims: &[Record]) -> Result<u64> {
        let gone: HashSet<&str> = victims.iter().map(|r| r.reference.as_str()).collect();
        let remaining: Vec<&Record> =
            all.iter().filter(|r| !gone.contains(r.reference.as_str())).collect();
        for victim in victims {
            match fs::remove_file(self.record_path(&victim.reference)) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(Error::io("removing image record", e)),
            }
        }
        let kept_snapshots: HashSet<String> =
            remaining.iter().filter_map(|r| digest_hex(&r.id).ok().map(str::to_string)).collect();
        let kept_blobs: HashSet<String> = remaining
            .iter()
            .flat_map(|r| r.blobs.iter())
            .filter_map(|b| digest_hex(b).ok().map(str::to_string))
            .collect();
        let mut freed = 0;
        let snapshots = self.root.join("snapshots");
        let entries = fs::read_dir(&snapshots).map_err(|e| Error::io("reading snapshots", e))?;
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if !kept_snapshots.contains(&name) {
                freed += read_unpacked_bytes(&entry.path());
                unpack::remove_any(&entry.path())?;
            }
        }
        let blobs = self.root.join("blobs/sha256");
        let entries = fs::read_dir(&blobs).map_err(|e| Error::io("reading blobs", e))?;
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if !kept_blobs.contains(&name) {
                freed += entry.metadata().map(|m| m.len()).unwrap_or(0);
                fs::remove_file(entry.path()).map_err(|e| Error::io("removing blob", e))?;
            }
        }
        Ok(freed)
    }

    fn gc(&self, high: u8, low: u8, in_use: &[String]) -> Result<GcReport> {
        let stat = nix::sys::statvfs::statvfs(&self.root)
            .map_err(|e| Error::io("statvfs", std::io::Error::from(e)))?;
        let fragment = stat.fragment_size() as u64;
        let capacity = stat.blocks() as u64 * fragment;
        let available = stat.blocks_available() as u64 * fragment;
        self.collect(capacity, available, high, low, in_use)
    }

    /// The GC policy for a filesystem of `capacity` bytes with `available` free.
    fn collect(
        &self,
        capacity: u64,
        available: u64,
        high: u8,
        low: u8,
        in_use: &[String],
    ) -> Result<GcReport> {
        if capacity == 0 {
            return Ok(GcReport::default());
        }
        let usage = 100 - (available as u128 * 100 / capacity as u128) as u64;
        let mut report = GcReport { usage_percent: usage.min(100) as u8, ..GcReport::default() };
        if usage < u64::from(high) {
            return Ok(report);
        }
        // The kubelet's target: free enough to bring usage down to the low threshold.
        report.wanted_bytes = (capacity as u128 * u128::from(100 - low.min(100)) / 100)
            .saturating_sub(available as u128) as u64;

        let mut records = self.records()?;
        let protected: HashSet<String> = in_use
            .iter()
            .flat_map(|u| {
                let mut names = vec![u.clone()];
                if let Ok(r) = ImageRef::parse(u) {
                    names.push(r.to_string());
                }
                names
            })
            .collect();
        // A snapshot some container's overlay still has as its lower layer is in use whoever
        // runs it (nodes of one machine may share the store), whatever `in_use` says.
        let lowers = mounted_lower_dirs();
        // Images, not references: an ID is in use if any of its references or digests is.
        let mut images: BTreeMap<String, (u64, bool)> = BTreeMap::new();
        for r in &records {
            let snapshot = self.snapshot_dir(&r.id)?;
            let used = protected.contains(&r.reference)
                || protected.contains(&r.id)
                || protected.contains(&self.image(r).repo_digest())
                || lowers.iter().any(|l| l.starts_with(&snapshot));
            let entry = images.entry(r.id.clone()).or_insert((0, false));
            entry.0 = entry.0.max(r.last_used_ns);
            entry.1 |= used;
        }
        let mut order: Vec<(u64, String)> = images
            .into_iter()
            .filter(|(_, (_, used))| !used)
            .map(|(id, (last, _))| (last, id))
            .collect();
        order.sort();
        for (_, id) in order {
            if report.freed_bytes >= report.wanted_bytes {
                break;
            }
            let victims: Vec<Record> = records.iter().filter(|r| r.id == id).cloned().collect();
            report.freed_bytes += self.remove_records(&records, &victims)?;
            report.removed.extend(victims.iter().map(|r| r.reference.clone()));
            records.retain(|r| r.id != id);
        }
        Ok(report)
    }
}

/// The lower directories of every overlay mounted in this mount namespace.
fn mounted_lower_dirs() -> Vec<PathBuf> {
    let text = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    lower_dirs(&text)
}

/// The `lowerdir=` paths of the overlay mounts in a mountinfo text (octal escapes undone).
fn lower_dirs(mountinfo: &str) -> Vec<PathBuf> {
    let unescape = |s: &str| {
        let b = s.as_bytes();
        let mut out = Vec::with_capacity(b.len());
        let mut i = 0;
        while i < b.len() {
            let octal = b.get(i + 1..i + 4).and_then(|d| {
                std::str::from_utf8(d).ok().and_then(|d| u8::from_str_radix(d, 8).ok())
            });
            match (b[i], octal) {
                (b'\\', Some(c)) => {
                    out.push(c);
                    i += 4;
                }
                (c, _) => {
                    out.push(c);
                    i += 1;
                }
            }
        }
        PathBuf::from(<std::ffi::OsString as std::os::unix::ffi::OsStringExt>::from_vec(out))
    };
    mountinfo
        .lines()
        .filter_map(|line| {
            let (_, after) = line.split_once(" - ")?;
            let mut fields = after.split(' ');
            (fields.next()? == "overlay").then_some(())?;
            let options = fields.nth(1)?;
            let lower = options.split(',').find_map(|o| o.strip_prefix("lowerdir="))?;
            Some(lower.split(':').map(unescape).collect::<Vec<_>>())
        })
        .flatten()
        .collect()
}

fn read_unpacked_bytes(snapshot: &Path) -> u64 {
    fs::read_to_string(snapshot.join("unpacked-bytes"))
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layer(content: &[u8]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_ustar();
        h.set_size(content.len() as u64);
        h.set_mode(0o644);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        b.append_data(&mut h, "data", content).unwrap();
        b.into_inner().unwrap()
    }

    /// Writes an image's blobs straight into the store and commits it, as a pull would.
    fn put(store: &ImageStore, reference: &str, content: &[u8]) -> Image {
        put_with(store, reference, content, None)
    }

    fn put_with(
        store: &ImageStore,
        reference: &str,
        content: &[u8],
        diff_id: Option<&str>,
    ) -> Image {
        try_put(store, reference, content, diff_id, MEDIA_OCI_CONFIG).unwrap()
    }

    fn try_put(
        store: &ImageStore,
        reference: &str,
        content: &[u8],
        diff_id: Option<&str>,
        config_media: &str,
    ) -> Result<Image> {
        let inner = &store.inner;
        let layer = layer(content);
        let layer_digest = inner.write_blob(None, &layer).unwrap();
        let config = serde_json::json!({
            "architecture": "amd64", "os": "linux",
            "config": {"Cmd": ["run"]},
            "rootfs": {"type": "layers", "diff_ids": [diff_id.unwrap_or(&layer_digest)]},
        });
        let config_bytes = serde_json::to_vec(&config).unwrap();
        let config_digest = inner.write_blob(None, &config_bytes).unwrap();
        let manifest = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": MEDIA_OCI_MANIFEST,
            "config": {"mediaType": config_media, "digest": config_digest, "size": config_bytes.len()},
            "layers": [{"mediaType": MEDIA_OCI_LAYER_TAR, "digest": layer_digest, "size": layer.len()}],
        });
        let manifest_digest =
            inner.write_blob(None, &serde_json::to_vec(&manifest).unwrap()).unwrap();
        let name = ImageRef::parse(reference).unwrap().to_string();
        inner.commit(&name, &manifest_digest, &manifest_digest)
    }

    fn touch(store: &ImageStore, reference: &str, at: u64) {
        let name = ImageRef::parse(reference).unwrap().to_string();
        let mut record = store.inner.read_record(&name).unwrap().unwrap();
        record.last_used_ns = at;
        store.inner.write_record(&record).unwrap();
    }

    async fn names(store: &ImageStore) -> Vec<String> {
        store.list().await.unwrap().into_iter().map(|i| i.reference).collect()
    }

    #[tokio::test]
    async fn a_committed_image_has_its_rootfs_config_and_survives_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let store = ImageStore::open(dir.path()).unwrap();
        let image = put(&store, "example.com/a:1", b"aaa");
        assert_eq!(std::fs::read(image.rootfs.join("data")).unwrap(), b"aaa");
        assert_eq!(image.config.cmd, ["run"]);
        assert_eq!(image.repo_digest(), format!("example.com/a@{}", image.digest));
        drop(store);
        let store = ImageStore::open(dir.path()).unwrap();
        assert_eq!(names(&store).await, ["example.com/a:1"]);
        let got = store.get("example.com/a:1").await.unwrap().unwrap();
        assert_eq!(got, image);
    }

    #[tokio::test]
    async fn a_tag_that_moves_keeps_the_old_image_by_digest_with_its_rootfs() {
        let dir = tempfile::tempdir().unwrap();
        let store = ImageStore::open(dir.path()).unwrap();
        let old = put(&store, "example.com/a:1", b"old");
        let new = put(&store, "example.com/a:1", b"new");
        assert_ne!(old.id, new.id);
        let dangling = format!("example.com/a@{}", old.digest);
        assert_eq!(names(&store).await, ["example.com/a:1", dangling.as_str()]);
        assert_eq!(std::fs::read(old.rootfs.join("data")).unwrap(), b"old");
        let kept = store.get(&dangling).await.unwrap().unwrap();
        assert_eq!(kept.id, old.id);
        // Re-pulling the same image does not duplicate it.
        put(&store, "example.com/a:1", b"new");
        assert_eq!(names(&store).await.len(), 2);
    }

    #[tokio::test]
    async fn never_returns_a_present_image_and_fails_for_an_absent_one() {
        let dir = tempfile::tempdir().unwrap();
        let store = ImageStore::open(dir.path()).unwrap();
        put(&store, "example.com/a:1", b"aaa");
        let auth = Auth::anonymous();
        let found = store.ensure("example.com/a:1", PullPolicy::Never, &auth).await.unwrap();
        assert_eq!(found.reference, "example.com/a:1");
        let err = store.ensure("example.com/b:1", PullPolicy::Never, &auth).await.unwrap_err();
        assert!(matches!(err, Error::NeverPull { .. }), "{err:?}");
        let err = store.ensure("Example", PullPolicy::Never, &auth).await.unwrap_err();
        assert_eq!(err.kubelet_reason(), "InvalidImageName");
    }

    #[test]
    fn a_layer_that_does_not_match_its_diff_id_is_rejected_and_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = ImageStore::open(dir.path()).unwrap();
        let wrong = format!("sha256:{}", "0".repeat(64));
        let err =
            try_put(&store, "example.com/a:1", b"x", Some(&wrong), MEDIA_OCI_CONFIG).unwrap_err();
        assert!(matches!(err, Error::DigestMismatch { .. }), "{err:?}");
        assert_eq!(std::fs::read_dir(dir.path().join("snapshots")).unwrap().count(), 0);
        assert!(store.inner.records().unwrap().is_empty());
    }

    #[test]
    fn a_layer_blob_changed_on_disk_is_caught_before_use() {
        let dir = tempfile::tempdir().unwrap();
        let store = ImageStore::open(dir.path()).unwrap();
        let content = layer(b"original");
        let digest = store.inner.write_blob(None, &content).unwrap();
        let mut tampered = layer(b"tampered");
        tampered.truncate(content.len());
        std::fs::write(store.inner.blob_path(&digest).unwrap(), &tampered).unwrap();
        let err =
            try_put(&store, "example.com/a:1", b"original", None, MEDIA_OCI_CONFIG).unwrap_err();
        assert!(matches!(err, Error::DigestMismatch { .. }), "{err:?}");
    }

    #[test]
    fn an_artifact_that_is_not_a_container_image_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let store = ImageStore::open(dir.path()).unwrap();
        let err = try_put(
            &store,
            "example.com/chart:1",
            b"x",
            None,
            "application/vnd.cncf.helm.config.v1+json",
        )
        .unwrap_err();
        assert!(matches!(err, Error::InvalidImage { .. }), "{err:?}");
    }

    #[tokio::test]
    async fn removing_by_id_prefix_removes_every_tag_and_unshared_content() {
        let dir = tempfile::tempdir().unwrap();
        let store = ImageStore::open(dir.path()).unwrap();
        let a = put(&store, "example.com/a:1", b"aaa");
        put(&store, "example.com/a:also", b"aaa");
        let b = put(&store, "example.com/b:1", b"bbb");
        let prefix = &a.id["sha256:".len().."sha256:".len() + 12];
        let mut removed = store.remove(prefix).await.unwrap();
        removed.sort();
        assert_eq!(removed, ["example.com/a:1", "example.com/a:also"]);
        assert!(!a.rootfs.exists());
        assert!(b.rootfs.exists());
        assert_eq!(names(&store).await, ["example.com/b:1"]);
        let blobs = std::fs::read_dir(dir.path().join("blobs/sha256")).unwrap().count();
        assert_eq!(blobs, 3, "only b's manifest, config and layer remain");
        let err = store.remove("example.com/a:1").await.unwrap_err();
        assert_eq!(err.kind(), crate::image::ErrorKind::NotPresent);
    }

    #[tokio::test]
    async fn gc_removes_the_least_recently_used_unused_image_and_stops_at_the_low_threshold() {
        let dir = tempfile::tempdir().unwrap();
        let store = ImageStore::open(dir.path()).unwrap();
        put(&store, "example.com/old-in-use:1", b"1");
        put(&store, "example.com/older:1", b"2");
        put(&store, "example.com/newer:1", b"3");
        touch(&store, "example.com/old-in-use:1", 1);
        touch(&store, "example.com/older:1", 2);
        touch(&store, "example.com/newer:1", 3);
        let in_use = vec!["example.com/old-in-use:1".to_string()];
        // 95% used, high 90, low 95: one byte must go, so exactly one image is removed.
        let report = store.inner.collect(10_000_000, 499_999, 90, 95, &in_use).unwrap();
        assert_eq!(report.usage_percent, 96);
        assert_eq!(report.wanted_bytes, 1);
        assert_eq!(report.removed, ["example.com/older:1"]);
        assert!(report.freed_bytes > 0);
        assert_eq!(names(&store).await, ["example.com/newer:1", "example.com/old-in-use:1"]);
        // Below the high threshold nothing happens.
        let report = store.inner.collect(10_000_000, 5_000_000, 90, 80, &[]).unwrap();
        assert!(report.removed.is_empty());
        assert_eq!(names(&store).await.len(), 2);
    }

    #[test]
    fn overlay_lower_dirs_are_read_from_mountinfo() {
        let info = "36 35 98:0 / /mnt1 rw,noatime master:1 - ext3 /dev/root rw,errors=continue\n\
            120 29 0:52 / /data/c/rootfs rw,relatime - overlay overlay rw,lowerdir=/img/snapshots/ab/rootfs,upperdir=/data/c/upper,workdir=/data/c/work\n\
            121 29 0:53 / /x rw - overlay overlay rw,lowerdir=/a\\040b:/c,upperdir=/u,workdir=/w\n";
        assert_eq!(
            lower_dirs(info),
            [PathBuf::from("/img/snapshots/ab/rootfs"), PathBuf::from("/a b"), PathBuf::from("/c")]
        );
    }

    #[tokio::test]
    async fn gc_on_the_real_filesystem_with_zero_thresholds_keeps_only_images_in_use() {
        let dir = tempfile::tempdir().unwrap();
        let store = ImageStore::open(dir.path()).unwrap();
        let kept = put(&store, "example.com/kept:1", b"k");
        put(&store, "example.com/gone:1", b"g");
        // In use by repo digest, as a container status names its image.
        let report = store.gc(0, 0, &[kept.repo_digest()]).await.unwrap();
        assert_eq!(report.removed, ["example.com/gone:1"]);
        assert_eq!(names(&store).await, ["example.com/kept:1"]);
        let report = store.gc(100, 90, &[]).await.unwrap();
        assert!(report.removed.is_empty() || report.usage_percent == 100);
    }
}
