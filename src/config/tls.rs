//! Listener certificates as the config names them: read from disk whenever a
//! config is loaded (start, every reload, `check`), so a replaced file is
//! served after the next reload, and checked there, so a certificate that
//! cannot be served is a config error with the position of its key.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::sign::CertifiedKey;

/// A listener's TLS settings.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ListenerTls {
    /// Chosen by SNI; the first is served to clients without SNI or with a
    /// name no certificate has.
    pub certificates: Vec<Certificate>,
    /// In the server's order of preference.
    pub alpn: Vec<Alpn>,
    /// Client certificates, verified against a CA.
    pub client_auth: Option<super::auth::ClientAuth>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum Alpn {
    #[serde(rename = "h2")]
    H2,
    #[serde(rename = "http/1.1")]
    Http11,
}

impl Alpn {
    pub fn parse(text: &str) -> Option<Alpn> {
        match text {
            "h2" => Some(Alpn::H2),
            "http/1.1" => Some(Alpn::Http11),
            _ => None,
        }
    }

    pub fn id(self) -> &'static [u8] {
        match self {
            Alpn::H2 => b"h2",
            Alpn::Http11 => b"http/1.1",
        }
    }
}

/// A certificate chain with its key, ready to serve.
#[derive(Clone, serde::Serialize)]
pub struct Certificate {
    #[serde(rename = "cert", serialize_with = "path_text")]
    pub cert_path: PathBuf,
    #[serde(rename = "key", serialize_with = "path_text")]
    pub key_path: PathBuf,
    /// DNS names it is valid for (subjectAltName, else the subject's CN),
    /// lower case; `*.example.com` for a wildcard.
    #[serde(skip)]
    pub names: Vec<String>,
    #[serde(skip)]
    pub not_after: SystemTime,
    #[serde(skip)]
    pub certified: Arc<CertifiedKey>,
    /// What the files held, so that a reload can tell a changed certificate.
    #[serde(skip)]
    files: Arc<(Vec<u8>, Vec<u8>)>,
}

impl PartialEq for Certificate {
    fn eq(&self, other: &Self) -> bool {
        self.cert_path == other.cert_path && self.key_path == other.key_path && self.files == other.files
    }
}

impl Eq for Certificate {}

impl std::fmt::Debug for Certificate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key.
        f.debug_struct("Certificate")
            .field("cert_path", &self.cert_path)
            .field("names", &self.names)
            .field("not_after", &self.not_after)
            .finish()
    }
}

impl Certificate {
    /// Seconds from `now` until the certificate expires; negative after.
    pub fn expires_in_seconds(&self, now: SystemTime) -> i64 {
        match self.not_after.duration_since(now) {
            Ok(left) => i64::try_from(left.as_secs()).unwrap_or(i64::MAX),
            Err(past) => -i64::try_from(past.duration().as_secs()).unwrap_or(i64::MAX),
        }
    }

    /// When it expires, in seconds since the Unix epoch.
    pub fn expires_at_unix_seconds(&self) -> i64 {
        self.expires_in_seconds(SystemTime::UNIX_EPOCH)
    }

    /// The name it is known by in metrics: its first DNS name, else its file.
    pub fn label(&self) -> String {
        self.names.first().cloned().unwrap_or_else(|| self.cert_path.display().to_string())
    }
}

/// Why a certificate cannot be served, told against the `cert` or the `key`.
#[derive(Debug)]
pub enum CertificateError {
    Cert(String),
    Key(String),
}

impl Certificate {
    /// Reads and checks a PEM certificate chain and its PEM private key
    /// (PKCS#8, PKCS#1 or SEC1): the chain parses, the leaf is valid at `now`,
    /// and the key is the leaf's.
    pub fn load(cert_path: &Path, key_path: &Path, now: SystemTime) -> Result<Certificate, CertificateError> {
        let shown = cert_path.display();
        let cert_pem = std::fs::read(cert_path)
            .map_err(|error| CertificateError::Cert(format!("cannot read certificate {shown}: {error}")))?;
        let key_pem = std::fs::read(key_path).map_err(|error| {
            CertificateError::Key(format!("cannot read private key {}: {error}", key_path.display()))
        })?;
        let chain: Vec<CertificateDer<'static>> =
            CertificateDer::pem_slice_iter(&cert_pem)
                .collect::<Result<_, _>>()
                .map_err(|error| CertificateError::Cert(format!("certificate {shown} is not valid PEM: {error}")))?;
        let Some(leaf) = chain.first() else {
            return Err(CertificateError::Cert(format!("{shown} holds no PEM certificate")));
        };
        let (_, parsed) = x509_parser::parse_x509_certificate(leaf)
            .map_err(|error| CertificateError::Cert(format!("certificate {shown} does not parse as X.509: {error}")))?;
        let validity = parsed.validity();
        let not_after = unix_time(validity.not_after.timestamp());
        let not_before = unix_time(validity.not_before.timestamp());
        if now > not_after {
            return Err(CertificateError::Cert(format!("certificate {shown} expired on {}", date(not_after))));
        }
        if now < not_before {
            return Err(CertificateError::Cert(format!(
                "certificate {shown} is not valid before {}",
                date(not_before)
            )));
        }
        let names = names(&parsed);
        let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|error| {
            CertificateError::Key(format!("private key {} is not a PEM private key: {error}", key_path.display()))
        })?;
        let provider = rustls::crypto::ring::default_provider();
        let signing_key = provider.key_provider.load_private_key(key).map_err(|error| {
            CertificateError::Key(format!("private key {} cannot be used: {error}", key_path.display()))
        })?;
        let certified = CertifiedKey::new(chain, signing_key);
        if certified.keys_match().is_err() {
            return Err(CertificateError::Key(format!(
                "private key {} does not match certificate {shown}",
                key_path.display()
            )));
        }
        Ok(Certificate {
            cert_path: cert_path.to_owned(),
            key_path: key_path.to_owned(),
            names,
            not_after,
            certified: Arc::new(certified),
            files: Arc::new((cert_pem, key_pem)),
        })
    }
}

/// `2021-01-01T00:00:00Z`.
pub fn date(time: SystemTime) -> String {
    let seconds = time.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default().as_secs();
    format!("{}Z", String::from_utf8_lossy(&crate::clock::utc_date_time(seconds)))
}

fn unix_time(seconds: i64) -> SystemTime {
    match u64::try_from(seconds) {
        Ok(after) => SystemTime::UNIX_EPOCH + Duration::from_secs(after),
        Err(_) => SystemTime::UNIX_EPOCH,
    }
}

fn names(certificate: &x509_parser::certificate::X509Certificate<'_>) -> Vec<String> {
    use x509_parser::extensions::GeneralName;
    let mut names: Vec<String> = match certificate.subject_alternative_name() {
        Ok(Some(san)) => san
            .value
            .general_names
            .iter()
            .filter_map(|name| match name {
                GeneralName::DNSName(dns) => Some(dns.to_ascii_lowercase()),
                _ => None,
            })
            .collect(),
        _ => Vec::new(),
    };
    if names.is_empty() {
        names.extend(
            certificate.subject().iter_common_name().filter_map(|cn| cn.as_str().ok()).map(str::to_ascii_lowercase),
        );
    }
    names
}

/// What an upstream's `tls:` names, resolved against the config's directory.
pub struct UpstreamTlsFiles {
    pub ca: Option<PathBuf>,
    pub client: Option<(PathBuf, PathBuf)>,
    pub server_name: Option<ServerName<'static>>,
    pub protocol: crate::config::UpstreamProtocol,
}

/// A path as `/config` shows it: text (lossy where it is not UTF-8).
fn path_text<S: serde::Serializer>(path: &Path, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_str(&path.display().to_string())
}

/// TLS towards an upstream's backends, ready to connect with.
#[derive(Clone)]
pub struct UpstreamTls {
    pub client_config: Arc<rustls::ClientConfig>,
    /// Checked against the backend's certificate and sent as SNI instead of
    /// the backend's host.
    pub server_name: Option<ServerName<'static>>,
    /// Equal for equal settings and file contents: connections made with one
    /// are pooled apart from those made with another.
    pub fingerprint: u64,
    /// The files it was made from, for `/config`.
    pub ca: Option<PathBuf>,
    pub client: Option<(PathBuf, PathBuf)>,
}

impl PartialEq for UpstreamTls {
    fn eq(&self, other: &Self) -> bool {
        self.fingerprint == other.fingerprint
    }
}

/// As `/config` shows it: the files, and the name checked.
impl serde::Serialize for UpstreamTls {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let text = |path: &Path| path.display().to_string();
        let mut tls = serializer.serialize_struct("UpstreamTls", 4)?;
        tls.serialize_field("ca", &self.ca.as_deref().map(text))?;
        tls.serialize_field("client_cert", &self.client.as_ref().map(|(cert, _)| text(cert)))?;
        tls.serialize_field("client_key", &self.client.as_ref().map(|(_, key)| text(key)))?;
        tls.serialize_field("server_name", &self.server_name.as_ref().map(|name| name.to_str()))?;
        tls.end()
    }
}

impl std::fmt::Debug for UpstreamTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamTls")
            .field("server_name", &self.server_name)
            .field("fingerprint", &format_args!("{:016x}", self.fingerprint))
            .finish_non_exhaustive()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum UpstreamTlsError {
    #[error("{0}")]
    Ca(String),
    #[error("{0}")]
    ClientCert(String),
    #[error("{0}")]
    ClientKey(String),
    #[error("{0}")]
    Roots(String),
}

impl UpstreamTls {
    /// The name checked against the certificate of a backend at `host` (its
    /// address's host, IPv6 in brackets or not), also sent as SNI:
    /// `server_name` when set.
    pub fn name_for(&self, host: &str) -> Result<ServerName<'static>, rustls::pki_types::InvalidDnsNameError> {
        match &self.server_name {
            Some(name) => Ok(name.clone()),
            None => ServerName::try_from(host.trim_matches(['[', ']']).to_owned()),
        }
    }

    pub fn load(files: UpstreamTlsFiles, now: SystemTime) -> Result<UpstreamTls, UpstreamTlsError> {
        let mut fingerprint = xxhash_rust::xxh3::Xxh3::new();
        let mut roots = rustls::RootCertStore::empty();
        match &files.ca {
            Some(path) => {
                let shown = path.display();
                let pem = std::fs::read(path)
                    .map_err(|error| UpstreamTlsError::Ca(format!("cannot read CA bundle {shown}: {error}")))?;
                fingerprint.update(&pem);
                for certificate in CertificateDer::pem_slice_iter(&pem) {
                    let certificate = certificate.map_err(|error| {
                        UpstreamTlsError::Ca(format!("CA bundle {shown} is not valid PEM: {error}"))
                    })?;
                    roots.add(certificate).map_err(|error| {
                        UpstreamTlsError::Ca(format!("CA bundle {shown} holds an unusable certificate: {error}"))
                    })?;
                }
                if roots.is_empty() {
                    return Err(UpstreamTlsError::Ca(format!("CA bundle {shown} holds no PEM certificate")));
                }
            }
            None => {
                let found = rustls_native_certs::load_native_certs();
                roots.add_parsable_certificates(found.certs);
                if roots.is_empty() {
                    return Err(UpstreamTlsError::Roots(
                        "no system CA certificates found (install ca-certificates, or set `ca`)".to_owned(),
                    ));
                }
            }
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .expect("the ring provider supports TLS 1.2 and 1.3")
            .with_root_certificates(roots);
        let mut config = match &files.client {
            Some((cert_path, key_path)) => {
                let certificate = Certificate::load(cert_path, key_path, now).map_err(|error| match error {
                    CertificateError::Cert(message) => UpstreamTlsError::ClientCert(message),
                    CertificateError::Key(message) => UpstreamTlsError::ClientKey(message),
                })?;
                fingerprint.update(&certificate.files.0);
                fingerprint.update(&certificate.files.1);
                builder.with_client_cert_resolver(Arc::new(AlwaysResolves(Arc::clone(&certificate.certified))))
            }
            None => builder.with_no_client_auth(),
        };
        config.alpn_protocols = match files.protocol {
            crate::config::UpstreamProtocol::H2 | crate::config::UpstreamProtocol::H2c => vec![b"h2".to_vec()],
            crate::config::UpstreamProtocol::Http1 => vec![b"http/1.1".to_vec()],
        };
        if let Some(name) = &files.server_name {
            fingerprint.update(name.to_str().as_bytes());
        }
        fingerprint.update(&config.alpn_protocols.concat());
        Ok(UpstreamTls {
            client_config: Arc::new(config),
            server_name: files.server_name,
            fingerprint: fingerprint.digest(),
            ca: files.ca,
            client: files.client,
        })
    }
}

/// The upstream's one client certificate, whatever the server asks.
#[derive(Debug)]
struct AlwaysResolves(Arc<CertifiedKey>);

impl rustls::client::ResolvesClientCert for AlwaysResolves {
    fn resolve(&self, _: &[&[u8]], _: &[rustls::SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(Arc::clone(&self.0))
    }

    fn has_certs(&self) -> bool {
        true
    }
}
