//! Importing image tarballs: an OCI image layout in a tar (`skopeo copy … oci-archive:`, or
//! `docker save` since Docker 25, which writes both formats) or a classic `docker save`
//! tarball (`manifest.json` with `Config`, `RepoTags` and `Layers`).
//!
//! The archive is read once, as a stream; nothing is written to disk by its entry names.
//! Files under `blobs/sha256/` must hash to their name; every other file is stored under the
//! digest of its content and found again by its path.

use std::collections::HashMap;
use std::fs;
use std::io::{BufRead, BufReader, Read};
use std::path::{Component, Path};

use serde::Deserialize;

use super::reference::{ImageRef, validate_digest};
use super::store::{
    Descriptor, Inner, MEDIA_OCI_CONFIG, MEDIA_OCI_LAYER_TAR, MEDIA_OCI_MANIFEST, Manifest,
};
use super::{Error, Image, Result};

/// Metadata files are read into memory; anything claiming to be one and larger is refused.
const MAX_METADATA: u64 = 16 << 20;

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct DockerSaveEntry {
    config: String,
    #[serde(default)]
    repo_tags: Option<Vec<String>>,
    layers: Vec<String>,
}

pub(crate) fn import(inner: &Inner, archive: &Path) -> Result<Vec<Image>> {
    let file = fs::File::open(archive)
        .map_err(|e| Error::io(format!("opening {}", archive.display()), e))?;
    let mut reader = BufReader::new(file);
    let head = reader.fill_buf().map_err(|e| Error::io("reading archive", e))?;
    let reader: Box<dyn Read> = if head.starts_with(&[0x1f, 0x8b]) {
        Box::new(flate2::bufread::MultiGzDecoder::new(reader))
    } else {
        Box::new(reader)
    };
    let mut tar = tar::Archive::new(reader);
    // Archive path → digest of its content in the blob store.
    let mut files: HashMap<String, String> = HashMap::new();
    let mut metadata: HashMap<String, Vec<u8>> = HashMap::new();
    let mut links: Vec<(String, String)> = Vec::new();
    let bad = |e: std::io::Error| Error::InvalidArchive(e.to_string());

    for entry in tar.entries().map_err(bad)? {
        let mut entry = entry.map_err(bad)?;
        let Some(path) = normalise(&entry.path().map_err(bad)?) else {
            continue;
        };
        match entry.header().entry_type() {
            tar::EntryType::Regular | tar::EntryType::Continuous => {}
            tar::EntryType::Symlink | tar::EntryType::Link => {
                // Old `docker save` links repeated layers to their first copy.
                if let Some(target) = entry.link_name().map_err(bad)? {
                    let joined = if entry.header().entry_type() == tar::EntryType::Symlink {
                        Path::new(&path).parent().unwrap_or(Path::new("")).join(target)
                    } else {
                        target.into_owned()
                    };
                    if let Some(target) = normalise(&joined) {
                        links.push((path, target));
                    }
                }
                continue;
            }
            _ => continue,
        }
        let is_metadata = path == "index.json"
            || path == "manifest.json"
            || path == "oci-layout"
            || path == "repositories"
            || (path.ends_with(".json") && !path.contains('/'));
        if let Some(hex) = path.strip_prefix("blobs/sha256/") {
            let expected = format!("sha256:{hex}");
            validate_digest(&expected).map_err(Error::InvalidArchive)?;
            let (digest, _) = inner.ingest(&mut entry, Some(&expected))?;
            files.insert(path, digest);
        } else if is_metadata {
            if entry.size() > MAX_METADATA {
                return Err(Error::InvalidArchive(format!("{path} is too large")));
            }
            let mut bytes = Vec::new();
            entry.read_to_end(&mut bytes).map_err(bad)?;
            let digest = inner.write_blob(None, &bytes)?;
            files.insert(path.clone(), digest);
            metadata.insert(path, bytes);
        } else {
            let (digest, _) = inner.ingest(&mut entry, None)?;
            files.insert(path, digest);
        }
    }
    // Links may point at links; a few rounds settle any sane chain.
    for _ in 0..8 {
        for (link, target) in &links {
            if let Some(digest) = files.get(target).cloned() {
                files.insert(link.clone(), digest);
            }
        }
    }

    let stem = archive_stem(archive);
    if let Some(index) = metadata.get("index.json") {
        import_oci_layout(inner, index, &stem)
    } else if let Some(manifest) = metadata.get("manifest.json") {
        import_docker_save(inner, manifest, &files, &stem)
    } else {
        Err(Error::InvalidArchive(
            "neither an OCI layout (index.json) nor a docker save archive (manifest.json)".into(),
        ))
    }
}

fn import_oci_layout(inner: &Inner, index: &[u8], stem: &str) -> Result<Vec<Image>> {
    let index: Manifest = serde_json::from_slice(index)
        .map_err(|e| Error::InvalidArchive(format!("index.json: {e}")))?;
    if index.manifests.is_empty() {
        return Err(Error::InvalidArchive("index.json lists no images".into()));
    }
    let mut images = Vec::new();
    for entry in &index.manifests {
        let reference = layout_name(entry, stem)?;
        validate_digest(&entry.digest).map_err(Error::InvalidArchive)?;
        let top: Manifest = serde_json::from_slice(&inner.read_blob(&entry.digest)?)
            .map_err(|e| Error::InvalidArchive(format!("manifest {}: {e}", entry.digest)))?;
        let manifest_digest = if top.is_index() {
            let platform = &inner.config.platform;
            let chosen = top.pick_platform(platform).ok_or_else(|| Error::InvalidImage {
                reference: reference.clone(),
                reason: format!("no manifest for {platform} in the image index"),
            })?;
            chosen.digest.clone()
        } else {
            entry.digest.clone()
        };
        if !inner.has_blob(&manifest_digest)? {
            return Err(Error::InvalidArchive(format!(
                "manifest {manifest_digest} is not in the archive"
            )));
        }
        images.push(inner.commit(&reference, &entry.digest, &manifest_digest)?);
    }
    Ok(images)
}

fn import_docker_save(
    inner: &Inner,
    manifest: &[u8],
    files: &HashMap<String, String>,
    stem: &str,
) -> Result<Vec<Image>> {
    let entries: Vec<DockerSaveEntry> = serde_json::from_slice(manifest)
        .map_err(|e| Error::InvalidArchive(format!("manifest.json: {e}")))?;
    let find = |path: &str| {
        normalise(Path::new(path))
            .and_then(|p| files.get(&p).cloned())
            .ok_or_else(|| Error::InvalidArchive(format!("{path} is not in the archive")))
    };
    let mut images = Vec::new();
    for entry in entries {
        let config_digest = find(&entry.config)?;
        let mut layers = Vec::new();
        for layer in &entry.layers {
            let digest = find(layer)?;
            let path = inner.blob_path(&digest)?;
            let size = fs::metadata(&path).map_err(|e| Error::io("layer blob", e))?.len();
            layers.push(Descriptor {
                media_type: layer_media_type(&path)?.to_string(),
                digest,
                size: size as i64,
                ..Descriptor::default()
            });
        }
        let config_size = fs::metadata(inner.blob_path(&config_digest)?)
            .map_err(|e| Error::io("config blob", e))?
            .len();
        // The store keeps images as manifests; a docker save archive has none, so one is
        // written that names exactly its config and layers.
        let manifest = Manifest {
            schema_version: Some(2),
            media_type: Some(MEDIA_OCI_MANIFEST.to_string()),
            config: Some(Descriptor {
                media_type: MEDIA_OCI_CONFIG.to_string(),
                digest: config_digest.clone(),
                size: config_size as i64,
                ..Descriptor::default()
            }),
            layers,
            manifests: Vec::new(),
        };
        let bytes = serde_json::to_vec(&manifest)
            .map_err(|e| Error::InvalidArchive(format!("encoding manifest: {e}")))?;
        let manifest_digest = inner.write_blob(None, &bytes)?;
        let tags = entry.repo_tags.unwrap_or_default();
        let names: Vec<String> = if tags.is_empty() {
            let short = config_digest
                .strip_prefix("sha256:")
                .and_then(|h| h.get(..12))
                .unwrap_or("untagged");
            vec![format!("localhost/{stem}-{short}:latest")]
        } else {
            tags
        };
        for name in names {
            let reference = ImageRef::parse(&name)?.to_string();
            images.push(inner.commit(&reference, &manifest_digest, &manifest_digest)?);
        }
    }
    Ok(images)
}

/// The name an OCI layout gives an image: containerd's full-name annotation, else the
/// standard `ref.name` (a full reference, or just a tag for an image named after the archive).
fn layout_name(entry: &Descriptor, stem: &str) -> Result<String> {
    let annotations = entry.annotations.clone().unwrap_or_default();
    let name = match (
        annotations.get("io.containerd.image.name"),
        annotations.get("org.opencontainers.image.ref.name"),
    ) {
        (Some(full), _) => full.clone(),
        (None, Some(r)) if r.contains(['/', ':', '@']) => r.clone(),
        (None, Some(tag)) => format!("localhost/{stem}:{tag}"),
        (None, None) => format!("localhost/{stem}:latest"),
    };
    Ok(ImageRef::parse(&name)?.to_string())
}

fn layer_media_type(path: &Path) -> Result<&'static str> {
    let mut head = [0u8; 4];
    let n = fs::File::open(path)
        .and_then(|mut f| f.read(&mut head))
        .map_err(|e| Error::io("reading layer", e))?;
    Ok(match &head[..n] {
        [0x1f, 0x8b, ..] => "application/vnd.oci.image.layer.v1.tar+gzip",
        [0x28, 0xb5, 0x2f, 0xfd] => "application/vnd.oci.image.layer.v1.tar+zstd",
        _ => MEDIA_OCI_LAYER_TAR,
    })
}

/// A repository-name-safe form of the archive's file name.
fn archive_stem(archive: &Path) -> String {
    let stem =
        archive.file_name().map(|n| n.to_string_lossy().to_ascii_lowercase()).unwrap_or_default();
    let stem = stem.split('.').next().unwrap_or("");
    let cleaned: String =
        stem.chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '-' }).collect();
    let cleaned = cleaned.trim_matches('-').to_string();
    let mut collapsed = String::new();
    for c in cleaned.chars() {
        if !(c == '-' && collapsed.ends_with('-')) {
            collapsed.push(c);
        }
    }
    if collapsed.is_empty() { "import".to_string() } else { collapsed }
}

/// `./a/b` → `a/b`; `None` for paths with `..` (they cannot name anything we look up).
fn normalise(path: &Path) -> Option<String> {
    let mut parts = Vec::new();
    for component in path.components() {
        match component {
            Component::Normal(n) => parts.push(n.to_str()?.to_string()),
            Component::CurDir | Component::RootDir => {}
            Component::ParentDir => {
                parts.pop()?;
            }
            Component::Prefix(_) => return None,
        }
    }
    (!parts.is_empty()).then(|| parts.join("/"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn archive_names_become_valid_repository_names() {
        assert_eq!(archive_stem(Path::new("/x/Busy_Box.tar")), "busy-box");
        assert_eq!(archive_stem(Path::new("/x/__.tar")), "import");
    }

    #[test]
    fn layout_names_prefer_the_full_containerd_name() {
        let mut d = Descriptor::default();
        let mut a = std::collections::BTreeMap::new();
        a.insert("org.opencontainers.image.ref.name".to_string(), "1".to_string());
        d.annotations = Some(a.clone());
        assert_eq!(layout_name(&d, "bb").unwrap(), "localhost/bb:1");
        a.insert("io.containerd.image.name".to_string(), "docker.io/library/busybox:1".to_string());
        d.annotations = Some(a);
        assert_eq!(layout_name(&d, "bb").unwrap(), "docker.io/library/busybox:1");
    }

    #[test]
    fn archive_paths_are_normalised_and_dotdot_only_climbs_inside() {
        assert_eq!(normalise(Path::new("./blobs/sha256/ab")).as_deref(), Some("blobs/sha256/ab"));
        assert_eq!(normalise(Path::new("a/../b/layer.tar")).as_deref(), Some("b/layer.tar"));
        assert_eq!(normalise(Path::new("../x")), None);
    }
}
