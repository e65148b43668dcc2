//! Registry credentials, from `kubernetes.io/dockerconfigjson` (and legacy `dockercfg`) pull
//! secrets, matched to an image the way the kubelet's credential keyring does: by host (with
//! `*.` wildcards per label) and by repository path prefix, the most specific entry first.

use std::collections::BTreeMap;
use std::fmt;

use base64::Engine;
use serde::Deserialize;

use super::reference::ImageRef;
use super::{Error, Result};

/// One credential for a registry.
#[derive(Clone, PartialEq, Eq)]
pub enum Credential {
    /// User name and password: sent as HTTP Basic or exchanged for a bearer token at the
    /// registry's token endpoint, whichever the registry's challenge asks for.
    Basic { username: String, password: String },
    /// A bearer token used as is (a dockerconfig `registrytoken`).
    Bearer(String),
}

impl fmt::Debug for Credential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Credential::Basic { username, .. } => write!(f, "Basic({username}, <redacted>)"),
            Credential::Bearer(_) => write!(f, "Bearer(<redacted>)"),
        }
    }
}

/// Credentials for any number of registries; empty means anonymous everywhere.
#[derive(Clone, Default, Debug)]
pub struct Auth {
    entries: Vec<Entry>,
}

#[derive(Clone, Debug)]
struct Entry {
    /// Host (with port) as written, possibly with `*` labels; lower-case.
    host: String,
    /// Repository path prefix the entry is limited to ("" for the whole registry).
    path: String,
    credential: Credential,
}

#[derive(Deserialize)]
struct DockerConfigJson {
    auths: BTreeMap<String, DockerConfigEntry>,
}

#[derive(Deserialize, Default)]
struct DockerConfigEntry {
    #[serde(default)]
    username: Option<String>,
    #[serde(default)]
    password: Option<String>,
    #[serde(default)]
    auth: Option<String>,
    #[serde(default)]
    registrytoken: Option<String>,
}

impl Auth {
    /// No credentials: every registry is accessed anonymously (tokens included).
    pub fn anonymous() -> Self {
        Auth::default()
    }

    /// Credentials from the bytes of a `.dockerconfigjson` (`{"auths": {...}}`) or a legacy
    /// `.dockercfg` (the same map at top level), as found in image pull secrets.
    pub fn from_docker_config_json(bytes: &[u8]) -> Result<Self> {
        let value: serde_json::Value = serde_json::from_slice(bytes)
            .map_err(|e| Error::InvalidCredentials(format!("not JSON: {e}")))?;
        let map: BTreeMap<String, DockerConfigEntry> = if value.get("auths").is_some() {
            serde_json::from_value::<DockerConfigJson>(value)
                .map_err(|e| Error::InvalidCredentials(e.to_string()))?
                .auths
        } else {
            serde_json::from_value(value).map_err(|e| Error::InvalidCredentials(e.to_string()))?
        };
        let mut auth = Auth::default();
        for (key, entry) in map {
            let credential = entry_credential(&key, entry)?;
            if let Some(credential) = credential {
                auth.insert(&key, credential);
            }
        }
        Ok(auth)
    }

    /// Adds a credential for `key`: a host (`registry.example.com:5000`, `*.example.com`),
    /// optionally with a scheme and a repository path prefix, as dockerconfig keys are written.
    pub fn insert(&mut self, key: &str, credential: Credential) {
        let (host, path) = split_key(key);
        self.entries.push(Entry { host, path, credential });
    }

    /// Every credential of `other` as well as ours (pull secrets of one pod are merged).
    pub fn merge(&mut self, other: &Auth) {
        self.entries.extend(other.entries.iter().cloned());
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The credential for `image`: the entry with the longest matching host and path wins,
    /// an exact host before a wildcard; `None` means anonymous.
    pub fn for_image(&self, image: &ImageRef) -> Option<&Credential> {
        let host = image.registry().to_ascii_lowercase();
        let repository = image.repository();
        self.entries
            .iter()
            .filter(|e| host_matches(&e.host, &host) && path_matches(&e.path, repository))
            .max_by_key(|e| (!e.host.contains('*'), e.host.len(), e.path.len()))
            .map(|e| &e.credential)
    }

    pub(crate) fn registry_auth(&self, image: &ImageRef) -> oci_client::secrets::RegistryAuth {
        use oci_client::secrets::RegistryAuth;
        match self.for_image(image) {
            None => RegistryAuth::Anonymous,
            Some(Credential::Basic { username, password }) => {
                RegistryAuth::Basic(username.clone(), password.clone())
            }
            Some(Credential::Bearer(token)) => RegistryAuth::Bearer(token.clone()),
        }
    }
}

fn entry_credential(key: &str, entry: DockerConfigEntry) -> Result<Option<Credential>> {
    if let Some(token) = entry.registrytoken.filter(|t| !t.is_empty()) {
        return Ok(Some(Credential::Bearer(token)));
    }
    if let Some(encoded) = entry.auth.filter(|a| !a.is_empty()) {
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(encoded.trim())
            .map_err(|e| Error::InvalidCredentials(format!("{key}: auth is not base64: {e}")))?;
        let decoded = String::from_utf8(decoded)
            .map_err(|_| Error::InvalidCredentials(format!("{key}: auth is not UTF-8")))?;
        let Some((username, password)) = decoded.split_once(':') else {
            return Err(Error::InvalidCredentials(format!("{key}: auth is not user:password")));
        };
        return Ok(Some(Credential::Basic {
            username: username.to_string(),
            password: password.to_string(),
        }));
    }
    match (entry.username, entry.password) {
        (Some(username), Some(password)) if !username.is_empty() => {
            Ok(Some(Credential::Basic { username, password }))
        }
        // An entry without anything usable (e.g. only an identity token, which needs an OAuth2
        // exchange this client does not do) gives no credential rather than failing the secret.
        _ => Ok(None),
    }
}

/// `https://index.docker.io/v1/` → (`docker.io`, ""); `reg.io/team` → (`reg.io`, `team`).
fn split_key(key: &str) -> (String, String) {
    let key = key.trim();
    let key = key.strip_prefix("https://").or_else(|| key.strip_prefix("http://")).unwrap_or(key);
    let (host, path) = key.split_once('/').unwrap_or((key, ""));
    let host = host.to_ascii_lowercase();
    let host = match host.as_str() {
        "index.docker.io" | "registry-1.docker.io" => "docker.io".to_string(),
        _ => host,
    };
    // Docker Hub keys carry the API version ("/v1/"), not a repository path.
    let path = if host == "docker.io" && (path == "v1/" || path == "v1" || path == "v2/") {
        ""
    } else {
        path.trim_end_matches('/')
    };
    (host, path.to_string())
}

/// Hosts match label by label, a `*` label matching any one label; ports must be equal.
fn host_matches(pattern: &str, host: &str) -> bool {
    let (pattern_name, pattern_port) = pattern.rsplit_once(':').unwrap_or((pattern, ""));
    let (host_name, host_port) = host.rsplit_once(':').unwrap_or((host, ""));
    if pattern_port != host_port {
        return false;
    }
    let p: Vec<&str> = pattern_name.split('.').collect();
    let h: Vec<&str> = host_name.split('.').collect();
    p.len() == h.len() && p.iter().zip(&h).all(|(p, h)| *p == "*" || p == h)
}

fn path_matches(prefix: &str, repository: &str) -> bool {
    prefix.is_empty()
        || repository == prefix
        || repository.strip_prefix(prefix).is_some_and(|rest| rest.starts_with('/'))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn basic(u: &str, p: &str) -> Credential {
        Credential::Basic { username: u.into(), password: p.into() }
    }

    fn img(s: &str) -> ImageRef {
        ImageRef::parse(s).unwrap()
    }

    #[test]
    fn dockerconfigjson_auth_field_decodes_to_basic_credentials_per_registry() {
        let json = br#"{"auths":{
            "https://index.docker.io/v1/":{"auth":"aHViOnNlY3JldA=="},
            "registry.example.com:5000":{"username":"bob","password":"pw"},
            "tok.example.com":{"registrytoken":"abc"}
        }}"#;
        let auth = Auth::from_docker_config_json(json).unwrap();
        assert_eq!(auth.for_image(&img("nginx")), Some(&basic("hub", "secret")));
        assert_eq!(
            auth.for_image(&img("registry.example.com:5000/x/y")),
            Some(&basic("bob", "pw"))
        );
        assert_eq!(
            auth.for_image(&img("tok.example.com/a")),
            Some(&Credential::Bearer("abc".into()))
        );
        assert_eq!(auth.for_image(&img("registry.example.com/x/y")), None);
        assert_eq!(auth.for_image(&img("quay.io/a/b")), None);
    }

    #[test]
    fn legacy_dockercfg_without_auths_wrapper_is_accepted() {
        let json = br#"{"quay.io":{"auth":"dTpw"}}"#;
        let auth = Auth::from_docker_config_json(json).unwrap();
        assert_eq!(auth.for_image(&img("quay.io/a/b")), Some(&basic("u", "p")));
    }

    #[test]
    fn the_most_specific_path_and_exact_host_win_over_wildcards() {
        let mut auth = Auth::anonymous();
        auth.insert("*.example.com", basic("wild", "1"));
        auth.insert("reg.example.com", basic("host", "2"));
        auth.insert("reg.example.com/team", basic("team", "3"));
        assert_eq!(auth.for_image(&img("reg.example.com/team/app")), Some(&basic("team", "3")));
        assert_eq!(auth.for_image(&img("reg.example.com/other/app")), Some(&basic("host", "2")));
        assert_eq!(auth.for_image(&img("x.example.com/app")), Some(&basic("wild", "1")));
        // "team" must not match "teamster": prefixes are whole path components.
        assert_eq!(auth.for_image(&img("reg.example.com/teamster/a")), Some(&basic("host", "2")));
        // A wildcard covers one label only.
        assert_eq!(auth.for_image(&img("a.b.example.com/app")), None);
    }

    #[test]
    fn malformed_pull_secrets_are_invalid_credentials_errors() {
        for bad in [
            &b"not json"[..],
            br#"{"auths":{"r.io":{"auth":"%%%"}}}"#,
            br#"{"auths":{"r.io":{"auth":"bm9jb2xvbg=="}}}"#,
            br#"{"auths":[1]}"#,
        ] {
            assert!(
                matches!(Auth::from_docker_config_json(bad), Err(Error::InvalidCredentials(_))),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn credentials_are_redacted_in_debug_output() {
        let s = format!("{:?}", basic("user", "hunter2"));
        assert!(s.contains("user") && !s.contains("hunter2"));
    }
}
