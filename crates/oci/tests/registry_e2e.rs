//! End to end against a real registry (Debian's `docker-registry`, the CNCF distribution
//! server) on loopback: images this test builds are pushed with `skopeo`, then pulled, listed,
//! reused, rejected when corrupted and imported through `ImageStore`.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rkube_oci::image::{Auth, Error, ErrorKind, ImageStore, Platform, PullPolicy, StoreConfig};
use sha2::{Digest, Sha256};

const TEST_TIMEOUT: Duration = Duration::from_secs(180);

#[derive(clap::Parser)]
struct Cli {
    #[command(flatten)]
    args: rkube_oci::cli::Args,
}

/// Runs `rkube image ARGV…` and returns what it printed.
async fn rkube_image(argv: &[&str]) -> Result<String, Error> {
    use clap::Parser;
    let cli = Cli::try_parse_from(std::iter::once("image").chain(argv.iter().copied())).unwrap();
    let mut out = Vec::new();
    rkube_oci::cli::run_to(cli.args, &mut out).await?;
    Ok(String::from_utf8(out).unwrap())
}

/// `true` when every program is installed; otherwise says so (or fails under CI).
fn have(programs: &[&str]) -> bool {
    let missing: Vec<&&str> = programs
        .iter()
        .filter(|p| {
            !Command::new("sh")
                .args(["-c", &format!("command -v {p}")])
                .stdout(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        })
        .collect();
    if missing.is_empty() {
        return true;
    }
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "CI=true but {missing:?} is not installed"
    );
    eprintln!("SKIPPED: {missing:?} not installed");
    false
}

/// A `docker-registry` on 127.0.0.1:<free port>, killed on drop.
struct Registry {
    child: Option<Child>,
    port: u16,
    data: PathBuf,
    _dir: tempfile::TempDir,
}

impl Registry {
    fn start() -> Registry {
        let dir = tempfile::tempdir().unwrap();
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let data = dir.path().join("data");
        let config = dir.path().join("config.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: 127.0.0.1:{port}\n",
                data.display()
            ),
        )
        .unwrap();
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start docker-registry");
        let registry = Registry { child: Some(child), port, data, _dir: dir };
        let deadline = Instant::now() + Duration::from_secs(20);
        while !registry.answers() {
            assert!(Instant::now() < deadline, "registry did not come up");
            std::thread::sleep(Duration::from_millis(100));
        }
        registry
    }

    fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    fn answers(&self) -> bool {
        let Ok(mut stream) = TcpStream::connect(("127.0.0.1", self.port)) else {
            return false;
        };
        let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
        if stream.write_all(b"GET /v2/ HTTP/1.0\r\n\r\n").is_err() {
            return false;
        }
        let mut response = String::new();
        let _ = stream.read_to_string(&mut response);
        response.starts_with("HTTP/1.0 200") || response.starts_with("HTTP/1.1 200")
    }

    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Where the registry keeps a blob's bytes.
    fn blob_file(&self, digest: &str) -> PathBuf {
        let hex = digest.strip_prefix("sha256:").unwrap();
        self.data.join("docker/registry/v2/blobs/sha256").join(&hex[..2]).join(hex).join("data")
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        self.stop();
    }
}

fn sha(bytes: &[u8]) -> String {
    format!("sha256:{:x}", Sha256::digest(bytes))
}

enum Item<'a> {
    Dir(&'a str),
    File(&'a str, &'a [u8], u32),
    Symlink(&'a str, &'a str),
    Hardlink(&'a str, &'a str),
}

fn tar_of(items: &[Item]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for item in items {
        let mut h = tar::Header::new_ustar();
        h.set_mtime(1_700_000_000);
        h.set_uid(0);
        h.set_gid(0);
        match item {
            Item::Dir(path) => {
                h.set_entry_type(tar::EntryType::Directory);
                h.set_mode(0o755);
                h.set_size(0);
                b.append_data(&mut h, path, std::io::empty()).unwrap();
            }
            Item::File(path, data, mode) => {
                h.set_entry_type(tar::EntryType::Regular);
                h.set_mode(*mode);
                h.set_size(data.len() as u64);
                b.append_data(&mut h, path, *data).unwrap();
            }
            Item::Symlink(path, target) => {
                h.set_entry_type(tar::EntryType::Symlink);
                h.set_mode(0o777);
                h.set_size(0);
                b.append_link(&mut h, path, target).unwrap();
            }
            Item::Hardlink(path, target) => {
                h.set_entry_type(tar::EntryType::Link);
                h.set_mode(0o644);
                h.set_size(0);
                b.append_link(&mut h, path, target).unwrap();
            }
        }
    }
    b.into_inner().unwrap()
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(bytes).unwrap();
    e.finish().unwrap()
}

/// An OCI image layout directory, written blob by blob.
struct Layout {
    dir: PathBuf,
    refs: Vec<serde_json::Value>,
}

struct Built {
    manifest: String,
    config: String,
    layers: Vec<String>,
}

impl Layout {
    fn new(dir: PathBuf) -> Layout {
        std::fs::create_dir_all(dir.join("blobs/sha256")).unwrap();
        std::fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
        Layout { dir, refs: Vec::new() }
    }

    fn blob(&self, bytes: &[u8]) -> serde_json::Value {
        let digest = sha(bytes);
        let path = self.dir.join("blobs/sha256").join(&digest["sha256:".len()..]);
        std::fs::write(path, bytes).unwrap();
        serde_json::json!({"digest": digest, "size": bytes.len()})
    }

    /// An image of `layers` (uncompressed tars, each stored gzip- or zstd-compressed in turn)
    /// for `arch`, with a config that exercises every field the store reads.
    fn image(&self, arch: &str, layers: &[Vec<u8>]) -> Built {
        let mut descriptors = Vec::new();
        let mut diff_ids = Vec::new();
        for (i, layer) in layers.iter().enumerate() {
            diff_ids.push(sha(layer));
            let (bytes, media) = if i % 2 == 0 {
                (gzip(layer), "application/vnd.oci.image.layer.v1.tar+gzip")
            } else {
                (
                    zstd::encode_all(&layer[..], 3).unwrap(),
                    "application/vnd.oci.image.layer.v1.tar+zstd",
                )
            };
            let mut d = self.blob(&bytes);
            d["mediaType"] = media.into();
            descriptors.push(d);
        }
        let config = serde_json::json!({
            "architecture": arch,
            "os": "linux",
            "config": {
                "Entrypoint": ["/bin/tool"],
                "Cmd": ["--serve", arch],
                "Env": ["PATH=/usr/bin:/bin", "GREETING=hello"],
                "WorkingDir": "/srv",
                "User": "1000:1000",
                "ExposedPorts": {"8080/tcp": {}},
            },
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
        });
        let config_bytes = serde_json::to_vec(&config).unwrap();
        let mut config_desc = self.blob(&config_bytes);
        config_desc["mediaType"] = "application/vnd.oci.image.config.v1+json".into();
        let manifest = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": config_desc,
            "layers": descriptors,
        });
        let manifest_bytes = serde_json::to_vec(&manifest).unwrap();
        self.blob(&manifest_bytes);
        Built {
            manifest: sha(&manifest_bytes),
            config: sha(&config_bytes),
            layers: descriptors.iter().map(|d| d["digest"].as_str().unwrap().to_string()).collect(),
        }
    }

    fn tag_manifest(&mut self, name: &str, digest: &str, media: &str) {
        let size =
            std::fs::metadata(self.dir.join("blobs/sha256").join(&digest["sha256:".len()..]))
                .unwrap()
                .len();
        self.refs.push(serde_json::json!({
            "mediaType": media,
            "digest": digest,
            "size": size,
            "annotations": {"org.opencontainers.image.ref.name": name},
        }));
        let index = serde_json::json!({"schemaVersion": 2, "manifests": self.refs});
        std::fs::write(self.dir.join("index.json"), serde_json::to_vec(&index).unwrap()).unwrap();
    }

    /// An index of `(manifest digest, arch)` entries; returns its digest.
    fn index(&self, entries: &[(&str, &str)]) -> String {
        let manifests: Vec<serde_json::Value> = entries
            .iter()
            .map(|(digest, arch)| {
                let size = std::fs::metadata(
                    self.dir.join("blobs/sha256").join(&digest["sha256:".len()..]),
                )
                .unwrap()
                .len();
                serde_json::json!({
                    "mediaType": "application/vnd.oci.image.manifest.v1+json",
                    "digest": digest,
                    "size": size,
                    "platform": {"os": "linux", "architecture": arch},
                })
            })
            .collect();
        let index = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": manifests,
        });
        let bytes = serde_json::to_vec(&index).unwrap();
        self.blob(&bytes);
        sha(&bytes)
    }
}

fn skopeo(args: &[&str]) {
    let output =
        Command::new("skopeo").arg("--insecure-policy").args(args).output().expect("run skopeo");
    assert!(
        output.status.success(),
        "skopeo {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

fn app_layers(tag: &str) -> Vec<Vec<u8>> {
    vec![
        tar_of(&[
            Item::Dir("bin"),
            Item::File("bin/tool", b"#!/bin/sh\necho tool\n", 0o755),
            Item::Dir("etc"),
            Item::File("etc/hello.txt", format!("hello {tag}\n").as_bytes(), 0o644),
            Item::Dir("usr/share"),
            Item::File("usr/share/old.txt", b"old", 0o644),
            Item::Dir("srv"),
        ]),
        tar_of(&[
            Item::File("usr/share/.wh.old.txt", b"", 0o644),
            Item::Symlink("bin/link", "tool"),
            Item::Hardlink("bin/hard", "bin/tool"),
            Item::File("etc/second.txt", b"second layer", 0o600),
        ]),
    ]
}

fn other_arch() -> &'static str {
    if Platform::current().architecture == "amd64" { "arm64" } else { "amd64" }
}

fn store_for(root: &Path, registry: &Registry) -> ImageStore {
    ImageStore::open_with(
        root,
        StoreConfig {
            insecure_registries: vec![registry.host()],
            timeout: Duration::from_secs(5),
            ..StoreConfig::default()
        },
    )
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pull_from_a_real_registry_reuse_offline_reject_corruption_and_import() {
    if !have(&["docker-registry", "skopeo"]) {
        return;
    }
    tokio::time::timeout(TEST_TIMEOUT, scenario()).await.expect("end-to-end scenario timed out");
}

async fn scenario() {
    let mut registry = Registry::start();
    let host = registry.host();
    let work = tempfile::tempdir().unwrap();
    let arch = Platform::current().architecture;

    // One single-platform image, one multi-arch index, one image to corrupt.
    let mut layout = Layout::new(work.path().join("layout"));
    let app = layout.image(&arch, &app_layers("app"));
    layout.tag_manifest("app", &app.manifest, "application/vnd.oci.image.manifest.v1+json");
    let native = layout.image(&arch, &app_layers(&arch));
    let foreign = layout.image(other_arch(), &app_layers(other_arch()));
    let index = layout.index(&[(&foreign.manifest, other_arch()), (&native.manifest, &arch)]);
    layout.tag_manifest("multi", &index, "application/vnd.oci.image.index.v1+json");
    let corrupt = layout.image(&arch, &app_layers("corrupt"));
    layout.tag_manifest("corrupt", &corrupt.manifest, "application/vnd.oci.image.manifest.v1+json");
    let legacy = layout.image(&arch, &app_layers("legacy")[..1]);
    layout.tag_manifest("legacy", &legacy.manifest, "application/vnd.oci.image.manifest.v1+json");
    let dir = layout.dir.display().to_string();
    // Docker's own manifest format (schema 2), as `docker push` writes it.
    skopeo(&[
        "copy",
        "--format",
        "v2s2",
        "--dest-tls-verify=false",
        &format!("oci:{dir}:legacy"),
        &format!("docker://{host}/test/legacy:1"),
    ]);
    skopeo(&[
        "copy",
        "--dest-tls-verify=false",
        &format!("oci:{dir}:app"),
        &format!("docker://{host}/test/app:1"),
    ]);
    skopeo(&[
        "copy",
        "--all",
        "--dest-tls-verify=false",
        &format!("oci:{dir}:multi"),
        &format!("docker://{host}/test/multi:1"),
    ]);
    skopeo(&[
        "copy",
        "--dest-tls-verify=false",
        &format!("oci:{dir}:corrupt"),
        &format!("docker://{host}/test/corrupt:1"),
    ]);

    let root = work.path().join("store");
    let store = store_for(&root, &registry);
    let anonymous = Auth::anonymous();

    // Pull: files of both layers, whiteout applied, links made, config read.
    let image = store
        .ensure(&format!("{host}/test/app:1"), PullPolicy::IfNotPresent, &anonymous)
        .await
        .unwrap();
    assert_eq!(image.reference, format!("{host}/test/app:1"));
    assert_eq!(image.id, app.config);
    assert_eq!(image.rootfs, root.join("snapshots").join(&app.config[7..]).join("rootfs"));
    let rootfs = &image.rootfs;
    assert_eq!(std::fs::read_to_string(rootfs.join("etc/hello.txt")).unwrap(), "hello app\n");
    assert_eq!(std::fs::read_to_string(rootfs.join("etc/second.txt")).unwrap(), "second layer");
    assert!(!rootfs.join("usr/share/old.txt").exists(), "whiteout not applied");
    assert!(rootfs.join("usr/share").is_dir());
    assert_eq!(std::fs::read_link(rootfs.join("bin/link")).unwrap(), Path::new("tool"));
    {
        use std::os::unix::fs::MetadataExt;
        let tool = std::fs::metadata(rootfs.join("bin/tool")).unwrap();
        let hard = std::fs::metadata(rootfs.join("bin/hard")).unwrap();
        assert_eq!(tool.ino(), hard.ino());
        assert_eq!(tool.mode() & 0o777, 0o755);
    }
    assert_eq!(image.config.entrypoint, ["/bin/tool"]);
    assert_eq!(image.config.cmd, ["--serve", arch.as_str()]);
    assert_eq!(image.config.env, ["PATH=/usr/bin:/bin", "GREETING=hello"]);
    assert_eq!(image.config.working_dir.as_deref(), Some("/srv"));
    assert_eq!(image.config.user.as_deref(), Some("1000:1000"));
    assert_eq!(image.config.exposed_ports, ["8080/tcp"]);
    for blob in std::iter::once(&app.config).chain(&app.layers) {
        let path = root.join("blobs/sha256").join(&blob[7..]);
        assert_eq!(sha(&std::fs::read(&path).unwrap()), *blob, "stored blob {blob}");
    }
    assert!(image.size > 0);

    // Multi-arch: this platform's manifest, recorded under the index digest.
    let multi = store.pull(&format!("{host}/test/multi:1"), &anonymous).await.unwrap();
    assert_eq!(multi.id, native.config);
    assert_eq!(multi.digest, index);
    assert_eq!(
        std::fs::read_to_string(multi.rootfs.join("etc/hello.txt")).unwrap(),
        format!("hello {arch}\n")
    );
    assert_eq!(multi.config.cmd, ["--serve", arch.as_str()]);
    // The same image by digest is already present.
    let by_digest = store
        .ensure(&format!("{host}/test/multi@{index}"), PullPolicy::Never, &anonymous)
        .await
        .unwrap();
    assert_eq!(by_digest.id, native.config);

    // Docker schema 2 manifest and config media types.
    let docker = store.pull(&format!("{host}/test/legacy:1"), &anonymous).await.unwrap();
    let stored: serde_json::Value = serde_json::from_slice(
        &std::fs::read(root.join("blobs/sha256").join(&docker.digest[7..])).unwrap(),
    )
    .unwrap();
    assert_eq!(stored["mediaType"], "application/vnd.docker.distribution.manifest.v2+json");
    assert_eq!(
        std::fs::read_to_string(docker.rootfs.join("etc/hello.txt")).unwrap(),
        "hello legacy\n"
    );
    assert_eq!(docker.config.entrypoint, ["/bin/tool"]);
    store.remove(&format!("{host}/test/legacy:1")).await.unwrap();

    // The CLI, in its own data directory: pull over plain HTTP, then list like crictl.
    let data_dir = work.path().join("cli-data");
    let data = data_dir.to_str().unwrap();
    let printed = rkube_image(&[
        "pull",
        "--data-dir",
        data,
        "--insecure-registry",
        &host,
        &format!("{host}/test/app:1"),
    ])
    .await
    .unwrap();
    assert_eq!(printed, format!("Image is up to date for {}\n", app.config));
    let table = rkube_image(&["ls", "--data-dir", data]).await.unwrap();
    let rows: Vec<Vec<&str>> = table.lines().map(|l| l.split_whitespace().collect()).collect();
    assert_eq!(rows[0], ["IMAGE", "TAG", "IMAGE", "ID", "SIZE"]);
    assert_eq!(rows[1][..3], [format!("{host}/test/app").as_str(), "1", &app.config[7..20]]);
    assert_eq!(rows.len(), 2);
    // Without --insecure-registry the CLI speaks HTTPS to the plain-HTTP registry and fails.
    let refused = rkube_image(&["pull", "--data-dir", data, &format!("{host}/test/multi:1")])
        .await
        .unwrap_err();
    assert_eq!(refused.kind(), ErrorKind::Network, "{refused}");
    let removed = rkube_image(&["rm", "--data-dir", data, &app.config[7..19]]).await.unwrap();
    assert_eq!(removed, format!("Deleted: {host}/test/app:1\n"));

    // An unknown tag is NotFound, not a network error.
    let missing = store.pull(&format!("{host}/test/app:nope"), &anonymous).await.unwrap_err();
    assert_eq!(missing.kind(), ErrorKind::NotFound, "{missing}");

    // A blob whose bytes the registry serves corrupted is rejected and not stored.
    let victim = &corrupt.layers[0]; // layer 1 is shared with app, already stored
    let file = registry.blob_file(victim);
    let mut bytes = std::fs::read(&file).unwrap();
    for b in bytes.iter_mut().skip(8).take(16) {
        *b ^= 0xff;
    }
    std::fs::write(&file, &bytes).unwrap();
    let err = store.pull(&format!("{host}/test/corrupt:1"), &anonymous).await.unwrap_err();
    assert!(matches!(err, Error::DigestMismatch { .. }), "{err:?}");
    assert!(!root.join("blobs/sha256").join(&victim[7..]).exists());
    assert!(store.get(&format!("{host}/test/corrupt:1")).await.unwrap().is_none());

    // Records survive a restart.
    drop(store);
    let store = store_for(&root, &registry);
    let listed: Vec<String> =
        store.list().await.unwrap().into_iter().map(|i| i.reference).collect();
    assert_eq!(listed, [format!("{host}/test/app:1"), format!("{host}/test/multi:1")]);

    // With the registry gone, IfNotPresent and Never still succeed from the store, while
    // Always (which must ask the registry) fails as a network error: proof nothing was asked.
    registry.stop();
    assert!(!registry.answers());
    let again = store
        .ensure(&format!("{host}/test/app:1"), PullPolicy::IfNotPresent, &anonymous)
        .await
        .unwrap();
    assert_eq!(again.id, app.config);
    store.ensure(&format!("{host}/test/app:1"), PullPolicy::Never, &anonymous).await.unwrap();
    let offline = store
        .ensure(&format!("{host}/test/app:1"), PullPolicy::Always, &anonymous)
        .await
        .unwrap_err();
    assert_eq!(offline.kind(), ErrorKind::Network, "{offline}");
    let never = store
        .ensure(&format!("{host}/test/other:1"), PullPolicy::Never, &anonymous)
        .await
        .unwrap_err();
    assert_eq!(never.kubelet_reason(), "ErrImageNeverPull");

    // Import of an oci-archive written by skopeo.
    let archive = work.path().join("app-archive.tar");
    skopeo(&[
        "copy",
        &format!("oci:{dir}:app"),
        &format!("oci-archive:{}:example.com/imported/app:2", archive.display()),
    ]);
    let import_root = work.path().join("imported");
    let importer = ImageStore::open(&import_root).unwrap();
    let imported = importer.import(&archive).await.unwrap();
    assert_eq!(imported.len(), 1);
    assert_eq!(imported[0].reference, "example.com/imported/app:2");
    assert_eq!(imported[0].id, app.config);
    assert_eq!(
        std::fs::read_to_string(imported[0].rootfs.join("etc/hello.txt")).unwrap(),
        "hello app\n"
    );
    assert_eq!(imported[0].config.entrypoint, ["/bin/tool"]);

    // Removing an image frees its snapshot and blobs.
    let removed = store.remove(&format!("{host}/test/app:1")).await.unwrap();
    assert_eq!(removed, [format!("{host}/test/app:1")]);
    assert!(!image.rootfs.exists());
    assert!(!root.join("blobs/sha256").join(&app.config[7..]).exists());
    assert!(multi.rootfs.exists());
    // What the failed pull of the corrupted image left behind is collected too, while the
    // layer the multi-arch image shares with the removed one stays.
    assert!(!root.join("blobs/sha256").join(&corrupt.config[7..]).exists());
    for blob in std::iter::once(&native.config).chain(&native.layers) {
        assert!(root.join("blobs/sha256").join(&blob[7..]).exists(), "{blob}");
    }
    assert_eq!(native.layers[1], app.layers[1]);
    let left: Vec<String> = store.list().await.unwrap().into_iter().map(|i| i.reference).collect();
    assert_eq!(left, [format!("{host}/test/multi:1")]);
}
