//! Writing images without a registry or a build tool: an OCI image layout of one layer made
//! from files given here. The end-to-end tests push it to a local registry; `rkube bench pods`
//! imports it as a pre-pulled image; an air-gapped user can do the same with `rkube image import`.

use std::io::Write;
use std::path::Path;

use sha2::{Digest, Sha256};

/// One file of the layer.
pub enum Entry<'a> {
    Dir { path: &'a str, mode: u32 },
    File { path: &'a str, data: &'a [u8], mode: u32 },
    Symlink { path: &'a str, target: &'a str },
}

/// The busybox applets the tests' and benchmarks' containers use.
pub const BUSYBOX_APPLETS: &[&str] = &[
    "sh", "echo", "sleep", "cat", "ls", "hostname", "id", "env", "touch", "test", "ip", "nc",
    "httpd", "true", "false", "kill", "ps",
];

/// An image layout of `busybox` (the static binary's bytes) as /bin/busybox with
/// [`BUSYBOX_APPLETS`] linked to it, /etc/passwd with root, and an empty /tmp; the image's
/// command is `sh`, its PATH /bin. `tag` names it in the layout's index.
pub fn write_busybox_layout(dir: &Path, busybox: &[u8], tag: &str) -> std::io::Result<()> {
    let mut entries = vec![
        Entry::Dir { path: "bin/", mode: 0o755 },
        Entry::Dir { path: "etc/", mode: 0o755 },
        Entry::Dir { path: "tmp/", mode: 0o1777 },
        Entry::File { path: "bin/busybox", data: busybox, mode: 0o755 },
    ];
    let links: Vec<String> = BUSYBOX_APPLETS.iter().map(|a| format!("bin/{a}")).collect();
    entries.extend(links.iter().map(|p| Entry::Symlink { path: p, target: "busybox" }));
    entries.push(Entry::File {
        path: "etc/passwd",
        data: b"root:x:0:0:root:/root:/bin/sh\n",
        mode: 0o644,
    });
    let config = serde_json::json!({"Cmd": ["sh"], "Env": ["PATH=/bin", "FROM_IMAGE=yes"]});
    write_layout(dir, &entries, config, tag)
}

fn sha(bytes: &[u8]) -> String {
    format!("sha256:{:x}", Sha256::digest(bytes))
}

/// Writes an OCI image layout (oci-layout, index.json, blobs) holding one image of one gzip
/// layer made of `entries`, with the image config's `config` section and index tag `tag`.
pub fn write_layout(
    dir: &Path,
    entries: &[Entry],
    config: serde_json::Value,
    tag: &str,
) -> std::io::Result<()> {
    let mut tar = tar::Builder::new(Vec::new());
    for e in entries {
        let mut h = tar::Header::new_ustar();
        h.set_mtime(1_700_000_000);
        h.set_uid(0);
        h.set_gid(0);
        match e {
            Entry::Dir { path, mode } => {
                h.set_mode(*mode);
                h.set_entry_type(tar::EntryType::Directory);
                h.set_size(0);
                tar.append_data(&mut h, path, std::io::empty())?;
            }
            Entry::File { path, data, mode } => {
                h.set_mode(*mode);
                h.set_size(data.len() as u64);
                tar.append_data(&mut h, path, *data)?;
            }
            Entry::Symlink { path, target } => {
                h.set_mode(0o777);
                h.set_entry_type(tar::EntryType::Symlink);
                h.set_size(0);
                tar.append_link(&mut h, path, target)?;
            }
        }
    }
    let raw = tar.into_inner()?;
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&raw)?;
    let layer = gz.finish()?;
    std::fs::create_dir_all(dir.join("blobs/sha256"))?;
    std::fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#)?;
    let blob = |bytes: &[u8], media_type: &str| -> std::io::Result<serde_json::Value> {
        let d = sha(bytes);
        std::fs::write(dir.join("blobs/sha256").join(&d[7..]), bytes)?;
        Ok(serde_json::json!({"mediaType": media_type, "digest": d, "size": bytes.len()}))
    };
    let l = blob(&layer, "application/vnd.oci.image.layer.v1.tar+gzip")?;
    let arch = super::Platform::current().architecture;
    let image_config = serde_json::json!({
        "architecture": arch, "os": "linux", "config": config,
        "rootfs": {"type": "layers", "diff_ids": [sha(&raw)]},
    });
    let c = blob(&serde_json::to_vec(&image_config)?, "application/vnd.oci.image.config.v1+json")?;
    let manifest = serde_json::json!({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": c, "layers": [l],
    });
    let m = blob(&serde_json::to_vec(&manifest)?, "application/vnd.oci.image.manifest.v1+json")?;
    let index = serde_json::json!({"schemaVersion": 2, "manifests": [{
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "digest": m["digest"], "size": m["size"],
        "annotations": {"org.opencontainers.image.ref.name": tag},
    }]});
    std::fs::write(dir.join("index.json"), serde_json::to_vec(&index)?)
}

/// Packs a layout directory into an oci-archive tarball (what `skopeo copy … oci-archive:`
/// writes and `rkube image import` reads).
pub fn archive_layout(dir: &Path, archive: &Path) -> std::io::Result<()> {
    let mut tar = tar::Builder::new(std::fs::File::create(archive)?);
    tar.follow_symlinks(false);
    tar.append_dir_all(".", dir)?;
    tar.into_inner()?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_written_layout_imports_as_a_runnable_image() {
        let dir = tempfile::tempdir().unwrap();
        let layout = dir.path().join("busybox");
        write_busybox_layout(&layout, b"#!not really busybox", "1").unwrap();
        let archive = dir.path().join("busybox.tar");
        archive_layout(&layout, &archive).unwrap();
        let store = crate::image::ImageStore::open(dir.path().join("store")).unwrap();
        let images = store.import(&archive).await.unwrap();
        assert_eq!(images.len(), 1);
        assert_eq!(images[0].reference, "localhost/busybox:1");
        assert_eq!(images[0].config.cmd, ["sh"]);
        let sh = images[0].rootfs.join("bin/sh");
        assert_eq!(std::fs::read_link(&sh).unwrap(), Path::new("busybox"));
        assert!(images[0].rootfs.join("tmp").is_dir());
    }
}
