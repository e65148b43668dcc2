//! Importing `docker save` tarballs (built here the way Docker writes them) and refusing
//! archives that lie about their content.

use std::path::Path;

use rkube_oci::image::{Error, ImageStore};
use sha2::{Digest, Sha256};

fn sha(bytes: &[u8]) -> String {
    format!("sha256:{:x}", Sha256::digest(bytes))
}

fn hex(digest: &str) -> &str {
    &digest["sha256:".len()..]
}

fn layer(files: &[(&str, &[u8])]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (path, data) in files {
        let mut h = tar::Header::new_ustar();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        b.append_data(&mut h, path, *data).unwrap();
    }
    b.into_inner().unwrap()
}

enum Entry<'a> {
    File(&'a str, Vec<u8>),
    Symlink(&'a str, &'a str),
}

fn archive(path: &Path, entries: Vec<Entry>) {
    let mut b = tar::Builder::new(std::fs::File::create(path).unwrap());
    for entry in entries {
        let mut h = tar::Header::new_ustar();
        h.set_mode(0o644);
        h.set_mtime(0);
        match entry {
            Entry::File(name, data) => {
                h.set_size(data.len() as u64);
                b.append_data(&mut h, name, &data[..]).unwrap();
            }
            Entry::Symlink(name, target) => {
                h.set_entry_type(tar::EntryType::Symlink);
                h.set_size(0);
                b.append_link(&mut h, name, target).unwrap();
            }
        }
    }
    b.finish().unwrap();
}

fn config(diff_ids: &[String], cmd: &str) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {"Cmd": [cmd], "Env": ["A=b"], "ExposedPorts": {"53/udp": {}}},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    }))
    .unwrap()
}

#[tokio::test]
async fn a_docker_save_tarball_imports_every_tag_with_shared_and_symlinked_layers() {
    let dir = tempfile::tempdir().unwrap();
    let l1 = layer(&[("etc/base", b"base"), ("etc/gone", b"x")]);
    let l2 = layer(&[("etc/.wh.gone", b""), ("etc/top", b"top")]);
    let (d1, d2) = (sha(&l1), sha(&l2));
    let c1 = config(&[d1.clone(), d2.clone()], "one");
    let c2 = config(std::slice::from_ref(&d1), "two");
    let (c1_hex, c2_hex) = (hex(&sha(&c1)).to_string(), hex(&sha(&c2)).to_string());
    let manifest = serde_json::json!([
        {"Config": format!("{c1_hex}.json"), "RepoTags": ["saved:1", "localhost:5000/x/saved:2"],
         "Layers": ["l1/layer.tar", "l2/layer.tar"]},
        {"Config": format!("{c2_hex}.json"), "RepoTags": ["dup:1"], "Layers": ["dup/layer.tar"]},
    ]);
    let path = dir.path().join("saved.tar");
    archive(
        &path,
        vec![
            Entry::File("l1/VERSION", b"1.0".to_vec()),
            Entry::File("l1/layer.tar", l1.clone()),
            Entry::File("l2/layer.tar", l2),
            // Older Docker links a repeated layer to its first copy.
            Entry::Symlink("dup/layer.tar", "../l1/layer.tar"),
            Entry::File(&format!("{c1_hex}.json"), c1.clone()),
            Entry::File(&format!("{c2_hex}.json"), c2.clone()),
            Entry::File("manifest.json", serde_json::to_vec(&manifest).unwrap()),
            Entry::File("repositories", b"{}".to_vec()),
        ],
    );
    let store = ImageStore::open(dir.path().join("store")).unwrap();
    let imported = store.import(&path).await.unwrap();
    let refs: Vec<&str> = imported.iter().map(|i| i.reference.as_str()).collect();
    assert_eq!(
        refs,
        ["docker.io/library/saved:1", "localhost:5000/x/saved:2", "docker.io/library/dup:1"]
    );
    assert_eq!(imported[0].id, sha(&c1));
    assert_eq!(imported[1].id, sha(&c1));
    assert_eq!(imported[2].id, sha(&c2));
    let one = &imported[0].rootfs;
    assert_eq!(std::fs::read(one.join("etc/base")).unwrap(), b"base");
    assert_eq!(std::fs::read(one.join("etc/top")).unwrap(), b"top");
    assert!(!one.join("etc/gone").exists());
    let two = &imported[2].rootfs;
    assert_eq!(std::fs::read(two.join("etc/gone")).unwrap(), b"x");
    assert_eq!(imported[0].config.cmd, ["one"]);
    assert_eq!(imported[0].config.exposed_ports, ["53/udp"]);
    assert_eq!(store.list().await.unwrap().len(), 3);
}

#[tokio::test]
async fn an_oci_archive_whose_blob_does_not_match_its_name_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.tar");
    let claimed = sha(b"what the name promises");
    archive(
        &path,
        vec![
            Entry::File("oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#.to_vec()),
            Entry::File(&format!("blobs/sha256/{}", hex(&claimed)), b"something else".to_vec()),
            Entry::File("index.json", br#"{"schemaVersion":2,"manifests":[]}"#.to_vec()),
        ],
    );
    let store = ImageStore::open(dir.path().join("store")).unwrap();
    let err = store.import(&path).await.unwrap_err();
    assert!(matches!(err, Error::DigestMismatch { .. }), "{err:?}");
    assert!(!dir.path().join("store/blobs/sha256").join(hex(&claimed)).exists());
}

#[tokio::test]
async fn a_docker_save_manifest_pointing_outside_the_archive_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("evil.tar");
    let c = config(&[], "x");
    let manifest = serde_json::json!([
        {"Config": "c.json", "RepoTags": ["evil:1"], "Layers": ["../../../../etc/passwd"]},
    ]);
    archive(
        &path,
        vec![
            Entry::File("c.json", c),
            Entry::File("manifest.json", serde_json::to_vec(&manifest).unwrap()),
        ],
    );
    let store = ImageStore::open(dir.path().join("store")).unwrap();
    let err = store.import(&path).await.unwrap_err();
    assert!(matches!(err, Error::InvalidArchive(_)), "{err:?}");
    assert!(store.list().await.unwrap().is_empty());
}
