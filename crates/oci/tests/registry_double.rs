//! Against a registry double on loopback (a real HTTP server that only serves bearer tokens it
//! issued): token authentication in the Docker registry v2 flow (a 401 with a Bearer
//! challenge, a token fetched from the realm with the user's credentials, requests retried
//! with it) with credentials from a dockerconfigjson as in an image pull secret, and
//! concurrent pulls of one image.

use std::collections::HashSet;
use std::io::Write;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use base64::Engine;
use rkube_oci::image::{Auth, ErrorKind, ImageStore, PullPolicy, StoreConfig};
use sha2::{Digest, Sha256};

const USER: &str = "alice";
const PASSWORD: &str = "wonderland";
const REPOSITORY: &str = "test/private";

#[derive(Default)]
struct Registry {
    realm: String,
    manifest: Vec<u8>,
    blobs: Vec<(String, Vec<u8>)>,
    issued: Mutex<HashSet<String>>,
    scopes: Mutex<Vec<String>>,
    served: Mutex<usize>,
}

type Shared = Arc<Registry>;

fn sha(bytes: &[u8]) -> String {
    format!("sha256:{:x}", Sha256::digest(bytes))
}

fn authorized(state: &Registry, headers: &HeaderMap) -> bool {
    let Some(value) = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()) else {
        return false;
    };
    value.strip_prefix("Bearer ").is_some_and(|t| state.issued.lock().unwrap().contains(t))
}

fn challenge(state: &Registry) -> Response {
    let value = format!(
        "Bearer realm=\"{}\",service=\"registry-double\",scope=\"repository:{REPOSITORY}:pull\"",
        state.realm
    );
    let mut response = (
        StatusCode::UNAUTHORIZED,
        r#"{"errors":[{"code":"UNAUTHORIZED","message":"authentication required"}]}"#,
    )
        .into_response();
    response.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_str(&value).unwrap());
    response
}

async fn version(State(state): State<Shared>, headers: HeaderMap) -> Response {
    if authorized(&state, &headers) { "{}".into_response() } else { challenge(&state) }
}

async fn token(
    State(state): State<Shared>,
    headers: HeaderMap,
    Query(query): Query<std::collections::HashMap<String, String>>,
) -> Response {
    let expected = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{USER}:{PASSWORD}"))
    );
    let given = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok());
    if given != Some(expected.as_str()) {
        return (StatusCode::UNAUTHORIZED, "bad credentials").into_response();
    }
    state.scopes.lock().unwrap().push(query.get("scope").cloned().unwrap_or_default());
    let token = format!("tok-{}", state.issued.lock().unwrap().len() + 1);
    state.issued.lock().unwrap().insert(token.clone());
    axum::Json(serde_json::json!({"token": token, "expires_in": 300})).into_response()
}

async fn manifest(
    State(state): State<Shared>,
    headers: HeaderMap,
    Path((namespace, name, reference)): Path<(String, String, String)>,
) -> Response {
    if !authorized(&state, &headers) {
        return challenge(&state);
    }
    if format!("{namespace}/{name}") != REPOSITORY || reference != "1" {
        return (
            StatusCode::NOT_FOUND,
            r#"{"errors":[{"code":"MANIFEST_UNKNOWN","message":"manifest unknown"}]}"#,
        )
            .into_response();
    }
    *state.served.lock().unwrap() += 1;
    let mut response = state.manifest.clone().into_response();
    let h = response.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/vnd.oci.image.manifest.v1+json"),
    );
    h.insert("Docker-Content-Digest", HeaderValue::from_str(&sha(&state.manifest)).unwrap());
    response
}

async fn blob(
    State(state): State<Shared>,
    headers: HeaderMap,
    Path((_namespace, _name, digest)): Path<(String, String, String)>,
) -> Response {
    if !authorized(&state, &headers) {
        return challenge(&state);
    }
    match state.blobs.iter().find(|(d, _)| *d == digest) {
        Some((_, bytes)) => bytes.clone().into_response(),
        None => (
            StatusCode::NOT_FOUND,
            r#"{"errors":[{"code":"BLOB_UNKNOWN","message":"blob unknown"}]}"#,
        )
            .into_response(),
    }
}

/// Serves one image at `test/private:1`; returns the registry host and its state.
async fn start() -> (String, Shared, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let host = listener.local_addr().unwrap().to_string();

    let mut tar = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_ustar();
    h.set_size(7);
    h.set_mode(0o644);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(0);
    tar.append_data(&mut h, "secret.txt", &b"private"[..]).unwrap();
    let tar = tar.into_inner().unwrap();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&tar).unwrap();
    let layer = gz.finish().unwrap();
    let config = serde_json::to_vec(&serde_json::json!({
        "architecture": "amd64", "os": "linux",
        "config": {"Cmd": ["cat", "/secret.txt"]},
        "rootfs": {"type": "layers", "diff_ids": [sha(&tar)]},
    }))
    .unwrap();
    let manifest_bytes = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": sha(&config), "size": config.len()},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                    "digest": sha(&layer), "size": layer.len()}],
    }))
    .unwrap();
    let state = Arc::new(Registry {
        realm: format!("http://{host}/token"),
        manifest: manifest_bytes,
        blobs: vec![(sha(&config), config), (sha(&layer), layer)],
        ..Registry::default()
    });
    let app = Router::new()
        .route("/v2/", get(version))
        .route("/token", get(token))
        .route("/v2/{namespace}/{name}/manifests/{reference}", get(manifest))
        .route("/v2/{namespace}/{name}/blobs/{digest}", get(blob))
        .with_state(state.clone());
    let server = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (host, state, server)
}

fn store(dir: &std::path::Path, host: &str) -> ImageStore {
    ImageStore::open_with(
        dir,
        StoreConfig {
            insecure_registries: vec![host.to_string()],
            timeout: std::time::Duration::from_secs(5),
            ..StoreConfig::default()
        },
    )
    .unwrap()
}

fn pull_secret(host: &str, password: &str) -> Auth {
    let auth = base64::engine::general_purpose::STANDARD.encode(format!("{USER}:{password}"));
    let json = serde_json::json!({"auths": {host: {"auth": auth}}});
    Auth::from_docker_config_json(&serde_json::to_vec(&json).unwrap()).unwrap()
}

#[tokio::test]
async fn a_pull_secret_gets_a_token_and_the_image_without_one_is_unauthorized() {
    let (host, state, server) = start().await;
    let dir = tempfile::tempdir().unwrap();
    let store = store(dir.path(), &host);
    let image_name = format!("{host}/{REPOSITORY}:1");

    let anonymous =
        store.ensure(&image_name, PullPolicy::IfNotPresent, &Auth::anonymous()).await.unwrap_err();
    assert_eq!(anonymous.kind(), ErrorKind::Unauthorized, "{anonymous}");

    let wrong = store
        .ensure(&image_name, PullPolicy::IfNotPresent, &pull_secret(&host, "nope"))
        .await
        .unwrap_err();
    assert_eq!(wrong.kind(), ErrorKind::Unauthorized, "{wrong}");
    assert_eq!(*state.served.lock().unwrap(), 0);

    let image = store
        .ensure(&image_name, PullPolicy::IfNotPresent, &pull_secret(&host, PASSWORD))
        .await
        .unwrap();
    assert_eq!(std::fs::read(image.rootfs.join("secret.txt")).unwrap(), b"private");
    assert_eq!(image.config.cmd, ["cat", "/secret.txt"]);
    assert_eq!(*state.served.lock().unwrap(), 1);
    assert!(
        state.scopes.lock().unwrap().contains(&format!("repository:{REPOSITORY}:pull")),
        "scopes asked for: {:?}",
        state.scopes.lock().unwrap()
    );

    // A credential for another registry does not leak to this one.
    let elsewhere = pull_secret("registry.example.com", PASSWORD);
    let err = store.pull(&image_name, &elsewhere).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Unauthorized, "{err}");
    server.abort();
}

#[tokio::test]
async fn concurrent_ensures_of_one_image_pull_it_once() {
    let (host, state, server) = start().await;
    let dir = tempfile::tempdir().unwrap();
    let store = store(dir.path(), &host);
    let image_name = format!("{host}/{REPOSITORY}:1");
    let auth = pull_secret(&host, PASSWORD);
    let pulls = (0..4).map(|_| {
        let store = store.clone();
        let image_name = image_name.clone();
        let auth = auth.clone();
        tokio::spawn(
            async move { store.ensure(&image_name, PullPolicy::IfNotPresent, &auth).await },
        )
    });
    let mut ids = HashSet::new();
    for pull in pulls.collect::<Vec<_>>() {
        ids.insert(pull.await.unwrap().unwrap().id);
    }
    assert_eq!(ids.len(), 1);
    assert_eq!(*state.served.lock().unwrap(), 1, "the manifest was fetched more than once");
    // Always asks the registry again (and reuses the stored blobs).
    store.ensure(&image_name, PullPolicy::Always, &auth).await.unwrap();
    assert_eq!(*state.served.lock().unwrap(), 2);
    server.abort();
}
