//! Fetching an image from an OCI / Docker v2 registry into the blob store, through `oci-client`
//! (which speaks the token and basic auth flows and checks `Docker-Content-Digest`); every blob
//! is hashed again here as it is written, and kept only if it matches its descriptor.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use futures::{StreamExt, TryStreamExt};
use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::errors::{OciDistributionError, OciErrorCode};
use oci_client::manifest::OciDescriptor;
use sha2::{Digest, Sha256};
use tokio::io::AsyncWrite;

use super::reference::{ImageRef, validate_digest};
use super::store::{
    Descriptor, Inner, MEDIA_DOCKER_LIST, MEDIA_DOCKER_MANIFEST, MEDIA_OCI_INDEX,
    MEDIA_OCI_MANIFEST, Manifest, sha256_digest,
};
use super::unpack::hex;
use super::{Auth, Error, Result};

const PARALLEL_DOWNLOADS: usize = 3;

const ACCEPTED_MANIFESTS: &[&str] =
    &[MEDIA_OCI_INDEX, MEDIA_DOCKER_LIST, MEDIA_OCI_MANIFEST, MEDIA_DOCKER_MANIFEST];

/// The digests a pull resolved; the blobs they name are in the store.
pub(crate) struct Fetched {
    pub top_digest: String,
    pub manifest_digest: String,
}

pub(crate) async fn fetch(inner: &Inner, image: &ImageRef, auth: &Auth) -> Result<Fetched> {
    let client = client(inner)?;
    let reference = image.to_oci();
    let registry_auth = auth.registry_auth(image);
    let shown = image.to_string();

    let (top_digest, top) =
        fetch_manifest(inner, &client, &reference, &registry_auth, image, image.digest()).await?;
    let (manifest_digest, manifest) = if top.is_index() {
        let platform = &inner.config.platform;
        let entry = top.pick_platform(platform).ok_or_else(|| Error::InvalidImage {
            reference: shown.clone(),
            reason: format!("no manifest for {platform} in the image index"),
        })?;
        validate_digest(&entry.digest)
            .map_err(|reason| Error::InvalidImage { reference: shown.clone(), reason })?;
        let by_digest = reference.clone_with_digest(entry.digest.clone());
        let (digest, manifest) =
            fetch_manifest(inner, &client, &by_digest, &registry_auth, image, Some(&entry.digest))
                .await?;
        if manifest.is_index() {
            return Err(Error::InvalidImage {
                reference: shown,
                reason: "an image index entry is itself an index".into(),
            });
        }
        (digest, manifest)
    } else {
        (top_digest.clone(), top)
    };
    let config = manifest.check_image(&shown)?.clone();
    // A few blobs at a time, as containerd does: layers are independent, and one slow blob
    // should not hold the others back. The first failure ends the pull.
    let blobs: Vec<Descriptor> = std::iter::once(config).chain(manifest.layers).collect();
    let (client, reference) = (&client, &reference);
    futures::stream::iter(blobs)
        .map(|descriptor| async move {
            fetch_blob(inner, client, reference, image, &descriptor).await
        })
        .buffer_unordered(PARALLEL_DOWNLOADS)
        .try_collect::<Vec<()>>()
        .await?;
    Ok(Fetched { top_digest, manifest_digest })
}

fn client(inner: &Inner) -> Result<oci_client::Client> {
    // reqwest is built without a bundled crypto provider: use ring, like the rest of rkube.
    // Installing fails only when a provider is already installed, which is as good.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let config = ClientConfig {
        protocol: ClientProtocol::HttpsExcept(inner.config.insecure_registries.clone()),
        // Indexes are resolved here, against the configured platform.
        platform_resolver: None,
        connect_timeout: Some(inner.config.timeout),
        read_timeout: Some(inner.config.timeout),
        ..ClientConfig::default()
    };
    oci_client::Client::try_from(config).map_err(|e| Error::Network {
        registry: String::new(),
        message: format!("building HTTP client: {e}"),
    })
}

async fn fetch_manifest(
    inner: &Inner,
    client: &oci_client::Client,
    reference: &oci_client::Reference,
    auth: &oci_client::secrets::RegistryAuth,
    image: &ImageRef,
    expected: Option<&str>,
) -> Result<(String, Manifest)> {
    let (bytes, _) = client
        .pull_manifest_raw(reference, auth, ACCEPTED_MANIFESTS)
        .await
        .map_err(|e| map_error(e, image))?;
    let digest = sha256_digest(&bytes);
    if let Some(expected) = expected
        && expected != digest
    {
        return Err(Error::DigestMismatch {
            what: format!("manifest of {image}"),
            expected: expected.to_string(),
            actual: digest,
        });
    }
    let manifest: Manifest = serde_json::from_slice(&bytes).map_err(|e| Error::InvalidImage {
        reference: image.to_string(),
        reason: format!("manifest is not valid JSON: {e}"),
    })?;
    inner.write_blob(Some(&digest), &bytes)?;
    Ok((digest, manifest))
}

async fn fetch_blob(
    inner: &Inner,
    client: &oci_client::Client,
    reference: &oci_client::Reference,
    image: &ImageRef,
    descriptor: &Descriptor,
) -> Result<()> {
    if inner.has_blob(&descriptor.digest)? {
        return Ok(());
    }
    let tmp = inner.temp_path();
    let result = async {
        let file =
            tokio::fs::File::create(&tmp).await.map_err(|e| Error::io("creating blob", e))?;
        let mut writer = HashingWriter {
            file,
            hasher: Sha256::new(),
            written: 0,
            limit: u64::try_from(descriptor.size).ok().filter(|s| *s > 0),
        };
        let oci_descriptor = OciDescriptor {
            media_type: descriptor.media_type.clone(),
            digest: descriptor.digest.clone(),
            size: descriptor.size,
            ..OciDescriptor::default()
        };
        client
            .pull_blob(reference, &oci_descriptor, &mut writer)
            .await
            .map_err(|e| map_error(e, image))?;
        writer.file.sync_all().await.map_err(|e| Error::io("writing blob", e))?;
        let actual = format!("sha256:{}", hex(&writer.hasher.finalize()));
        if actual != descriptor.digest {
            return Err(Error::DigestMismatch {
                what: format!("blob of {image}"),
                expected: descriptor.digest.clone(),
                actual,
            });
        }
        if let Some(size) = writer.limit
            && size != writer.written
        {
            return Err(Error::DigestMismatch {
                what: format!("size of blob {}", descriptor.digest),
                expected: size.to_string(),
                actual: writer.written.to_string(),
            });
        }
        tokio::fs::rename(&tmp, inner.blob_path(&descriptor.digest)?)
            .await
            .map_err(|e| Error::io("storing blob", e))
    }
    .await;
    if result.is_err() {
        let _ = tokio::fs::remove_file(&tmp).await;
    }
    result
}

/// Writes a blob to a file, hashing it and refusing to grow past the descriptor's size (a
/// registry cannot fill the disk by sending more than it announced).
struct HashingWriter {
    file: tokio::fs::File,
    hasher: Sha256,
    written: u64,
    limit: Option<u64>,
}

impl AsyncWrite for HashingWriter {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        if let Some(limit) = this.limit
            && this.written + buf.len() as u64 > limit
        {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("blob is larger than its descriptor's {limit} bytes"),
            )));
        }
        let n = ready!(Pin::new(&mut this.file).poll_write(cx, buf))?;
        this.hasher.update(&buf[..n]);
        this.written += n as u64;
        Poll::Ready(Ok(n))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.file).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.file).poll_shutdown(cx)
    }
}

/// Sorts the client's errors into what the kubelet distinguishes.
fn map_error(error: OciDistributionError, image: &ImageRef) -> Error {
    let registry = image.registry().to_string();
    let reference = image.to_string();
    let not_found = |message: String| Error::NotFound { reference: reference.clone(), message };
    let unauthorized =
        |message: String| Error::Unauthorized { registry: registry.clone(), message };
    match error {
        OciDistributionError::RegistryError { envelope, url } => {
            let message = format!("{envelope} ({url})");
            let code = envelope.errors.first().map(|e| &e.code);
            match code {
                Some(
                    OciErrorCode::ManifestUnknown
                    | OciErrorCode::NameUnknown
                    | OciErrorCode::NotFound
                    | OciErrorCode::BlobUnknown,
                ) => not_found(message),
                Some(OciErrorCode::Unauthorized | OciErrorCode::Denied) => unauthorized(message),
                _ => Error::Registry { registry, message },
            }
        }
        OciDistributionError::ServerError { code, url, message } => match code {
            404 => not_found(format!("{url}: {message}")),
            401 | 403 => unauthorized(format!("{url}: {message}")),
            _ => {
                Error::Registry { registry, message: format!("HTTP {code} from {url}: {message}") }
            }
        },
        OciDistributionError::UnauthorizedError { url } => unauthorized(url),
        OciDistributionError::AuthenticationFailure(message) => unauthorized(message),
        OciDistributionError::ImageManifestNotFoundError(message) => not_found(message),
        OciDistributionError::DigestError(e) => Error::DigestMismatch {
            what: format!("content of {reference}"),
            expected: String::new(),
            actual: e.to_string(),
        },
        OciDistributionError::RequestError(e) => {
            // Connection refused, DNS, TLS and timeouts: the registry is unreachable.
            let mut message = e.to_string();
            let mut source = std::error::Error::source(&e);
            while let Some(s) = source {
                message.push_str(": ");
                message.push_str(&s.to_string());
                source = s.source();
            }
            Error::Network { registry, message }
        }
        OciDistributionError::IoError(e) => {
            // Our writer refuses oversized blobs with InvalidData; other I/O is local.
            if e.kind() == io::ErrorKind::InvalidData {
                Error::DigestMismatch {
                    what: format!("blob of {reference}"),
                    expected: "the announced size".into(),
                    actual: e.to_string(),
                }
            } else {
                Error::io("writing blob", e)
            }
        }
        other => Error::Registry { registry, message: other.to_string() },
    }
}
