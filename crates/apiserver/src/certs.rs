//! The cluster's PKI, made on first start and reused afterwards: a CA, the API server's serving
//! certificate, an admin client certificate, and the admin kubeconfig that bundles them.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use base64::Engine;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};

use crate::{Error, Result};

/// PEM material the server needs in memory.
#[derive(Clone)]
pub struct Pki {
    pub dir: PathBuf,
    pub ca_pem: String,
    pub serving_cert_pem: String,
    pub serving_key_pem: String,
    pub admin_cert_pem: String,
    pub admin_key_pem: String,
}

fn io(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::Pki(format!("{}: {e}", path.display()))
}

fn read(path: &Path) -> Result<Option<String>> {
    match std::fs::read_to_string(path) {
        Ok(s) => Ok(Some(s)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io(path, e)),
    }
}

fn write_private(path: &Path, text: &str) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(|e| io(&tmp, e))?;
    f.write_all(text.as_bytes()).map_err(|e| io(&tmp, e))?;
    f.sync_all().map_err(|e| io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| io(path, e))
}

fn rc(e: rcgen::Error) -> Error {
    Error::Pki(e.to_string())
}

/// Loads the PKI from `dir`, creating whatever is missing. The serving certificate is re-issued
/// when the requested names change (a new `--tls-san`), the CA never is.
pub fn ensure(dir: &Path, sans: &[String]) -> Result<Pki> {
    std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
    let ca_cert_path = dir.join("ca.crt");
    let ca_key_path = dir.join("ca.key");
    let (ca_pem, ca_key) = match (read(&ca_cert_path)?, read(&ca_key_path)?) {
        (Some(cert), Some(key)) => (cert, KeyPair::from_pem(&key).map_err(rc)?),
        _ => {
            let key = KeyPair::generate().map_err(rc)?;
            let mut params = CertificateParams::new(Vec::<String>::new()).map_err(rc)?;
            params.distinguished_name = dn("rkube-ca", None);
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            params.key_usages = vec![
                KeyUsagePurpose::KeyCertSign,
                KeyUsagePurpose::CrlSign,
                KeyUsagePurpose::DigitalSignature,
            ];
            params.not_before = rcgen::date_time_ymd(2024, 1, 1);
            params.not_after = rcgen::date_time_ymd(2124, 1, 1);
            let cert = params.self_signed(&key).map_err(rc)?;
            write_private(&ca_key_path, &key.serialize_pem())?;
            write_private(&ca_cert_path, &cert.pem())?;
            (cert.pem(), key)
        }
    };
    let issuer = Issuer::from_ca_cert_pem(&ca_pem, &ca_key).map_err(rc)?;

    let sans_path = dir.join("apiserver.sans");
    let wanted = sans.join(",");
    let serving_cert_path = dir.join("apiserver.crt");
    let serving_key_path = dir.join("apiserver.key");
    let (serving_cert_pem, serving_key_pem) =
        match (read(&serving_cert_path)?, read(&serving_key_path)?, read(&sans_path)?) {
            (Some(c), Some(k), Some(s)) if s == wanted => (c, k),
            _ => {
                let key = KeyPair::generate().map_err(rc)?;
                let mut params = CertificateParams::new(Vec::<String>::new()).map_err(rc)?;
                params.distinguished_name = dn("kube-apiserver", None);
                for san in sans {
                    params.subject_alt_names.push(match san.parse::<IpAddr>() {
                        Ok(ip) => SanType::IpAddress(ip),
                        Err(_) => SanType::DnsName(san.clone().try_into().map_err(rc)?),
                    });
                }
                params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
                params.not_before = rcgen::date_time_ymd(2024, 1, 1);
                params.not_after = rcgen::date_time_ymd(2124, 1, 1);
                let cert = params.signed_by(&key, &issuer).map_err(rc)?;
                write_private(&serving_key_path, &key.serialize_pem())?;
                write_private(&serving_cert_path, &cert.pem())?;
                write_private(&sans_path, &wanted)?;
                (cert.pem(), key.serialize_pem())
            }
        };

    let admin_cert_path = dir.join("admin.crt");
    let admin_key_path = dir.join("admin.key");
    let (admin_cert_pem, admin_key_pem) = match (read(&admin_cert_path)?, read(&admin_key_path)?) {
        (Some(c), Some(k)) => (c, k),
        _ => {
            let (c, k) = client_cert(&issuer, "kubernetes-admin", Some("system:masters"))?;
            write_private(&admin_key_path, &k)?;
            write_private(&admin_cert_path, &c)?;
            (c, k)
        }
    };
    Ok(Pki {
        dir: dir.to_path_buf(),
        ca_pem,
        serving_cert_pem,
        serving_key_pem,
        admin_cert_pem,
        admin_key_pem,
    })
}

fn dn(cn: &str, org: Option<&str>) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    if let Some(o) = org {
        dn.push(DnType::OrganizationName, o);
    }
    dn.push(DnType::CommonName, cn);
    dn
}

/// Issues a client certificate (CN = user, O = group) signed by the CA: PEM (cert, key).
pub fn client_cert(
    issuer: &Issuer<'_, &KeyPair>,
    user: &str,
    group: Option<&str>,
) -> Result<(String, String)> {
    let key = KeyPair::generate().map_err(rc)?;
    let mut params = CertificateParams::new(Vec::<String>::new()).map_err(rc)?;
    params.distinguished_name = dn(user, group);
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    params.not_before = rcgen::date_time_ymd(2024, 1, 1);
    params.not_after = rcgen::date_time_ymd(2124, 1, 1);
    let cert = params.signed_by(&key, issuer).map_err(rc)?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// An admin kubeconfig for `server` with the certificates embedded (portable as one file).
pub fn admin_kubeconfig(pki: &Pki, server: &str, name: &str) -> String {
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s.as_bytes());
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: {name}\n  cluster:\n    server: {server}\n    certificate-authority-data: {}\nusers:\n- name: {name}-admin\n  user:\n    client-certificate-data: {}\n    client-key-data: {}\ncontexts:\n- name: {name}\n  context:\n    cluster: {name}\n    user: {name}-admin\ncurrent-context: {name}\npreferences: {{}}\n",
        b64(&pki.ca_pem),
        b64(&pki.admin_cert_pem),
        b64(&pki.admin_key_pem),
    )
}

/// Writes the admin kubeconfig into the PKI directory and returns its path.
pub fn write_admin_kubeconfig(pki: &Pki, server: &str) -> Result<PathBuf> {
    let path = pki.dir.parent().unwrap_or(&pki.dir).join("admin.kubeconfig");
    write_private(&path, &admin_kubeconfig(pki, server, "rkube"))?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pki_is_created_once_and_reused_on_the_next_start() {
        let dir = std::env::temp_dir().join(format!("rkube-pki-{}", uuid::Uuid::new_v4()));
        let a = ensure(&dir, &["127.0.0.1".into(), "localhost".into()]).unwrap();
        let b = ensure(&dir, &["127.0.0.1".into(), "localhost".into()]).unwrap();
        assert_eq!(a.ca_pem, b.ca_pem);
        assert_eq!(a.serving_cert_pem, b.serving_cert_pem);
        let c = ensure(&dir, &["127.0.0.1".into(), "example.test".into()]).unwrap();
        assert_eq!(a.ca_pem, c.ca_pem);
        assert_ne!(a.serving_cert_pem, c.serving_cert_pem);
        std::fs::remove_dir_all(dir).unwrap();
    }
}
