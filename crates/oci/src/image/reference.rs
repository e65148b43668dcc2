//! Image references, normalised the way Docker and containerd do (`nginx` is
//! `docker.io/library/nginx:latest`), so the same image has one name in the store whatever
//! spelling a pod used.

use std::fmt;
use std::str::FromStr;

use super::{Error, Result};

/// The registry a reference without a domain belongs to.
pub const DEFAULT_REGISTRY: &str = "docker.io";
/// Docker Hub's single-name repositories ("official images") live under this namespace.
const OFFICIAL_NAMESPACE: &str = "library";
const DEFAULT_TAG: &str = "latest";
/// Docker's limit on the length of a repository name (domain included).
const MAX_NAME_LEN: usize = 255;

/// A fully qualified image reference: registry, repository, and a tag, a digest or both.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ImageRef {
    registry: String,
    repository: String,
    tag: Option<String>,
    digest: Option<String>,
}

impl ImageRef {
    /// Parses and normalises a reference as a pod spec or `docker pull` would take it.
    pub fn parse(input: &str) -> Result<Self> {
        let invalid = |reason: &str| Error::InvalidReference {
            reference: input.to_string(),
            reason: reason.to_string(),
        };
        if input.is_empty() {
            return Err(invalid("reference is empty"));
        }
        if input.trim() != input {
            return Err(invalid("reference has surrounding whitespace"));
        }
        let (name_and_tag, digest) = match input.split_once('@') {
            Some((rest, digest)) => {
                validate_digest(digest).map_err(|reason| invalid(&reason))?;
                (rest, Some(digest.to_string()))
            }
            None => (input, None),
        };
        // A tag is after the last ':' that follows the last '/': "host:5000/app" has no tag.
        let last_slash = name_and_tag.rfind('/');
        let (name, tag) = match name_and_tag.rfind(':') {
            Some(colon) if last_slash.is_none_or(|slash| colon > slash) => {
                let tag = &name_and_tag[colon + 1..];
                if !valid_tag(tag) {
                    return Err(invalid(&format!("invalid tag {tag:?}")));
                }
                (&name_and_tag[..colon], Some(tag.to_string()))
            }
            _ => (name_and_tag, None),
        };
        if name.is_empty() {
            return Err(invalid("repository name is empty"));
        }
        // The first component is a registry host when it looks like one: it has a dot or a
        // port, is "localhost", or has upper-case letters (repositories never do).
        let (registry, repository) = match name.split_once('/') {
            Some((first, rest))
                if first.contains(['.', ':'])
                    || first == "localhost"
                    || first.chars().any(|c| c.is_ascii_uppercase()) =>
            {
                (first.to_string(), rest.to_string())
            }
            _ => (DEFAULT_REGISTRY.to_string(), name.to_string()),
        };
        if !valid_registry(&registry) {
            return Err(invalid(&format!("invalid registry host {registry:?}")));
        }
        let registry = match registry.as_str() {
            // Docker Hub's other names are the same registry.
            "index.docker.io" | "registry-1.docker.io" => DEFAULT_REGISTRY.to_string(),
            _ => registry,
        };
        if repository.chars().any(|c| c.is_ascii_uppercase()) {
            return Err(invalid("repository name must be lowercase"));
        }
        let repository = if registry == DEFAULT_REGISTRY && !repository.contains('/') {
            format!("{OFFICIAL_NAMESPACE}/{repository}")
        } else {
            repository
        };
        for component in repository.split('/') {
            if !valid_path_component(component) {
                return Err(invalid(&format!("invalid repository path component {component:?}")));
            }
        }
        if registry.len() + 1 + repository.len() > MAX_NAME_LEN {
            return Err(invalid("repository name is longer than 255 characters"));
        }
        let tag = match (&tag, &digest) {
            (None, None) => Some(DEFAULT_TAG.to_string()),
            _ => tag,
        };
        Ok(ImageRef { registry, repository, tag, digest })
    }

    /// The registry host (with port), `docker.io` for Docker Hub.
    pub fn registry(&self) -> &str {
        &self.registry
    }

    /// The repository path within the registry, `library/nginx` for `nginx`.
    pub fn repository(&self) -> &str {
        &self.repository
    }

    pub fn tag(&self) -> Option<&str> {
        self.tag.as_deref()
    }

    /// `sha256:<hex>` when the reference pins a digest.
    pub fn digest(&self) -> Option<&str> {
        self.digest.as_deref()
    }

    /// `registry/repository`, without tag or digest.
    pub fn name(&self) -> String {
        format!("{}/{}", self.registry, self.repository)
    }

    /// The same repository pinned to `digest` (the tag dropped), what a repo digest names.
    pub fn with_digest(&self, digest: &str) -> ImageRef {
        ImageRef {
            registry: self.registry.clone(),
            repository: self.repository.clone(),
            tag: None,
            digest: Some(digest.to_string()),
        }
    }

    pub(crate) fn to_oci(&self) -> oci_client::Reference {
        match (&self.tag, &self.digest) {
            (Some(tag), Some(digest)) => oci_client::Reference::with_tag_and_digest(
                self.registry.clone(),
                self.repository.clone(),
                tag.clone(),
                digest.clone(),
            ),
            (_, Some(digest)) => oci_client::Reference::with_digest(
                self.registry.clone(),
                self.repository.clone(),
                digest.clone(),
            ),
            (tag, None) => oci_client::Reference::with_tag(
                self.registry.clone(),
                self.repository.clone(),
                tag.clone().unwrap_or_else(|| DEFAULT_TAG.to_string()),
            ),
        }
    }
}

impl fmt::Display for ImageRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.registry, self.repository)?;
        if let Some(tag) = &self.tag {
            write!(f, ":{tag}")?;
        }
        if let Some(digest) = &self.digest {
            write!(f, "@{digest}")?;
        }
        Ok(())
    }
}

impl FromStr for ImageRef {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        ImageRef::parse(s)
    }
}

/// A digest as `sha256:<64 lower-case hex>`, the only algorithm registries use for images;
/// checked strictly because the hex becomes a file name in the blob store.
pub(crate) fn validate_digest(digest: &str) -> std::result::Result<(), String> {
    let Some((algorithm, hex)) = digest.split_once(':') else {
        return Err(format!("digest {digest:?} has no algorithm"));
    };
    if algorithm != "sha256" {
        return Err(format!("unsupported digest algorithm {algorithm:?}"));
    }
    if hex.len() != 64 || !hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        return Err(format!("invalid sha256 digest {digest:?}"));
    }
    Ok(())
}

fn valid_tag(tag: &str) -> bool {
    let mut bytes = tag.bytes();
    match bytes.next() {
        Some(b) if b.is_ascii_alphanumeric() || b == b'_' => {}
        _ => return false,
    }
    tag.len() <= 128 && bytes.all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

/// `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*`, Docker's grammar for one path component.
fn valid_path_component(component: &str) -> bool {
    let bytes = component.as_bytes();
    if bytes.is_empty() {
        return false;
    }
    let alnum = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    if !alnum(bytes[0]) || !alnum(bytes[bytes.len() - 1]) {
        return false;
    }
    let mut i = 0;
    while i < bytes.len() {
        if alnum(bytes[i]) {
            i += 1;
            continue;
        }
        let start = i;
        while i < bytes.len() && !alnum(bytes[i]) {
            i += 1;
        }
        let separator = &component[start..i];
        let ok = separator == "."
            || separator == "_"
            || separator == "__"
            || separator.bytes().all(|b| b == b'-');
        if !ok {
            return false;
        }
    }
    true
}

/// A host name or IPv4 address (or a bracketed IPv6 one) with an optional numeric port.
fn valid_registry(registry: &str) -> bool {
    let (host, port) = if let Some(rest) = registry.strip_prefix('[') {
        match rest.split_once(']') {
            Some((v6, after)) => {
                if v6.parse::<std::net::Ipv6Addr>().is_err() {
                    return false;
                }
                match after {
                    "" => return true,
                    _ => match after.strip_prefix(':') {
                        Some(port) => ("", Some(port)),
                        None => return false,
                    },
                }
            }
            None => return false,
        }
    } else {
        match registry.rsplit_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (registry, None),
        }
    };
    if let Some(port) = port
        && (port.is_empty() || port.len() > 5 || !port.bytes().all(|b| b.is_ascii_digit()))
    {
        return false;
    }
    if host.is_empty() && !registry.starts_with('[') {
        return false;
    }
    host.split('.').all(|label| {
        let b = label.as_bytes();
        !b.is_empty()
            && b.iter().all(|c| c.is_ascii_alphanumeric() || *c == b'-')
            && b[0] != b'-'
            && b[b.len() - 1] != b'-'
    }) || host.is_empty()
}

#[cfg(test)]
mod tests {
    use super::*;

    const DIGEST: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    fn norm(s: &str) -> String {
        ImageRef::parse(s).map(|r| r.to_string()).unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    #[test]
    fn an_official_image_with_a_tag_lives_under_docker_io_library() {
        assert_eq!(norm("nginx:1.26-alpine"), "docker.io/library/nginx:1.26-alpine");
        assert_eq!(norm("nginx"), "docker.io/library/nginx:latest");
    }

    #[test]
    fn a_user_image_without_a_tag_gets_latest() {
        assert_eq!(norm("user/app"), "docker.io/user/app:latest");
        let r = ImageRef::parse("user/app").unwrap();
        assert_eq!(r.registry(), "docker.io");
        assert_eq!(r.repository(), "user/app");
        assert_eq!(r.tag(), Some("latest"));
    }

    #[test]
    fn docker_hub_aliases_normalise_to_docker_io() {
        assert_eq!(norm("index.docker.io/nginx"), "docker.io/library/nginx:latest");
        assert_eq!(norm("docker.io/library/busybox:1"), "docker.io/library/busybox:1");
    }

    #[test]
    fn a_registry_with_a_port_and_a_digest_keeps_both_and_no_tag() {
        let r = ImageRef::parse(&format!("host:5000/x/y@{DIGEST}")).unwrap();
        assert_eq!(r.registry(), "host:5000");
        assert_eq!(r.repository(), "x/y");
        assert_eq!(r.tag(), None);
        assert_eq!(r.digest(), Some(DIGEST));
        assert_eq!(r.to_string(), format!("host:5000/x/y@{DIGEST}"));
    }

    #[test]
    fn a_tag_and_a_digest_together_are_both_kept() {
        assert_eq!(
            norm(&format!("nginx:1.27@{DIGEST}")),
            format!("docker.io/library/nginx:1.27@{DIGEST}")
        );
    }

    #[test]
    fn localhost_and_dotted_first_components_are_registries() {
        assert_eq!(norm("localhost/app"), "localhost/app:latest");
        assert_eq!(norm("localhost:5000/app:v1"), "localhost:5000/app:v1");
        assert_eq!(norm("quay.io/coreos/etcd:v3"), "quay.io/coreos/etcd:v3");
        assert_eq!(norm("127.0.0.1:5000/test/busybox:1"), "127.0.0.1:5000/test/busybox:1");
        assert_eq!(norm("[::1]:5000/app"), "[::1]:5000/app:latest");
    }

    #[test]
    fn invalid_references_are_errors_that_say_why() {
        for bad in [
            "",
            "Nginx",
            "nginx:",
            "nginx:-bad",
            "nginx@sha256:abc",
            "nginx@md5:0123",
            "a//b",
            "a/b/",
            "nginx:1:2",
            "ho$t:5000/app",
            "host:port/app",
            " nginx",
            "library/-x",
            "a..b/c",
        ] {
            match ImageRef::parse(bad) {
                Err(Error::InvalidReference { reference, reason }) => {
                    assert_eq!(reference, bad);
                    assert!(!reason.is_empty());
                }
                other => panic!("{bad:?} parsed as {other:?}"),
            }
        }
    }

    #[test]
    fn path_components_follow_dockers_separator_grammar() {
        assert!(valid_path_component("a_b"));
        assert!(valid_path_component("a__b"));
        assert!(valid_path_component("a---b"));
        assert!(valid_path_component("a.b"));
        assert!(!valid_path_component("a___b"));
        assert!(!valid_path_component("a..b"));
        assert!(!valid_path_component("_a"));
    }

    #[test]
    fn an_overlong_name_is_rejected() {
        let long = format!("example.com/{}", "a".repeat(250));
        assert!(ImageRef::parse(&long).is_err());
    }
}
