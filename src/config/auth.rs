//! What a route's `auth:` and a listener's `tls.client_auth` name, read
//! from disk with the config (start, every reload, `check`): the CA bundle
//! client certificates are verified against, a JWKS file's keys, an API key
//! file's hashes. A file that cannot be used is a config error at its key.
//!
//! The keys are parsed here, once; checking a request against them is
//! `auth`'s.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, KeyAlgorithm, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use serde::Serialize;

pub use super::raw::ClientAuthMode;

/// A listener's `tls.client_auth`.
#[derive(Clone, Serialize)]
pub struct ClientAuth {
    #[serde(serialize_with = "path_text")]
    pub ca: PathBuf,
    pub mode: ClientAuthMode,
    #[serde(skip)]
    pub roots: Arc<rustls::RootCertStore>,
    /// What the file held, so that a reload can tell a changed bundle.
    #[serde(skip)]
    ca_pem: Arc<[u8]>,
}

impl PartialEq for ClientAuth {
    fn eq(&self, other: &Self) -> bool {
        self.ca == other.ca && self.mode == other.mode && self.ca_pem == other.ca_pem
    }
}

impl Eq for ClientAuth {}

impl std::fmt::Debug for ClientAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientAuth").field("ca", &self.ca).field("mode", &self.mode).finish_non_exhaustive()
    }
}

impl ClientAuth {
    /// Reads the PEM bundle of CA certificates client certificates must chain to.
    pub fn load(ca: &Path, mode: ClientAuthMode) -> Result<ClientAuth, String> {
        let shown = ca.display();
        let pem = std::fs::read(ca).map_err(|error| format!("cannot read CA bundle {shown}: {error}"))?;
        let mut roots = rustls::RootCertStore::empty();
        for certificate in CertificateDer::pem_slice_iter(&pem) {
            let certificate = certificate.map_err(|error| format!("CA bundle {shown} is not valid PEM: {error}"))?;
            roots
                .add(certificate)
                .map_err(|error| format!("CA bundle {shown} holds an unusable certificate: {error}"))?;
        }
        if roots.is_empty() {
            return Err(format!("CA bundle {shown} holds no PEM certificate"));
        }
        Ok(ClientAuth { ca: ca.to_owned(), mode, roots: Arc::new(roots), ca_pem: pem.into() })
    }
}

/// A route's `auth:`: every method it lists must pass.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Default)]
pub struct AuthConfig {
    pub client_cert: Option<ClientCertRule>,
    pub jwt: Option<JwtConfig>,
    pub api_key: Option<ApiKeyConfig>,
}

impl AuthConfig {
    pub fn is_empty(&self) -> bool {
        self.client_cert.is_none() && self.jwt.is_none() && self.api_key.is_none()
    }

    /// The headers the route sets for the backend from what passed.
    pub fn forwarded_headers(&self) -> impl Iterator<Item = &http::HeaderName> {
        let certificate = self.client_cert.as_ref().and_then(|rule| rule.forward_header.as_ref());
        let claims = self.jwt.iter().flat_map(|jwt| jwt.forward_claims.iter().map(|(_, header)| header));
        let api_key = self.api_key.as_ref().and_then(|api_key| api_key.forward_header.as_ref());
        certificate.into_iter().chain(claims).chain(api_key)
    }
}

/// RSA's signature algorithms.
const RSA_ALGORITHMS: [Algorithm; 6] =
    [Algorithm::RS256, Algorithm::RS384, Algorithm::RS512, Algorithm::PS256, Algorithm::PS384, Algorithm::PS512];

/// Every algorithm a key of a [`KeySet`] may verify with.
pub const SIGNING_ALGORITHMS: [Algorithm; 9] = [
    Algorithm::RS256,
    Algorithm::RS384,
    Algorithm::RS512,
    Algorithm::PS256,
    Algorithm::PS384,
    Algorithm::PS512,
    Algorithm::ES256,
    Algorithm::ES384,
    Algorithm::EdDSA,
];

/// `auth.client_cert`: the client presented a certificate the listener's
/// CA verified and, with `sans` set, it carries one of those names.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ClientCertRule {
    /// Lower case; `*.example.com` matches one label under it.
    pub sans: Vec<String>,
    #[serde(serialize_with = "optional_header")]
    pub forward_header: Option<http::HeaderName>,
}

/// `auth.jwt`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct JwtConfig {
    #[serde(flatten)]
    pub keys: JwksSource,
    pub issuers: Vec<String>,
    pub audiences: Vec<String>,
    pub required_claims: Vec<String>,
    /// Claim, and the values of it the route accepts (any one of them).
    #[serde(serialize_with = "claim_values")]
    pub claims: Vec<(String, Vec<String>)>,
    /// Claim, and the header it goes to the backend in.
    #[serde(serialize_with = "claim_headers")]
    pub forward_claims: Vec<(String, http::HeaderName)>,
    pub keep_token: bool,
}

/// Where a route's token keys come from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum JwksSource {
    /// Read with the config: a reload reads it again.
    File {
        #[serde(rename = "jwks_file", serialize_with = "path_text")]
        path: PathBuf,
        #[serde(skip)]
        keys: Arc<KeySet>,
    },
    /// Fetched in the background every `refresh`, and early (at most every
    /// few seconds) for a token whose key id it does not know; a failed
    /// fetch keeps the last good set.
    Url {
        #[serde(rename = "jwks_url")]
        url: String,
        #[serde(serialize_with = "super::shown::duration")]
        refresh: Duration,
    },
}

/// `auth.api_key`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ApiKeyConfig {
    #[serde(serialize_with = "path_text")]
    pub file: PathBuf,
    #[serde(skip)]
    pub keys: Arc<ApiKeys>,
    #[serde(serialize_with = "header")]
    pub header: http::HeaderName,
    #[serde(serialize_with = "optional_header")]
    pub forward_header: Option<http::HeaderName>,
    pub keep_key: bool,
}

/// The keys a JWKS document holds that can verify a token's signature.
pub struct KeySet {
    pub keys: Vec<VerifyingKey>,
    /// The document as read, so that a reload can tell a changed file and a
    /// fetch a changed set.
    document: Vec<u8>,
}

impl PartialEq for KeySet {
    fn eq(&self, other: &Self) -> bool {
        self.document == other.document
    }
}

impl Eq for KeySet {}

impl std::fmt::Debug for KeySet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ids: Vec<_> = self.keys.iter().map(|key| key.kid.as_deref().unwrap_or("-")).collect();
        f.debug_struct("KeySet").field("kids", &ids).finish()
    }
}

/// One public key, with the algorithms a token signed by it may name.
pub struct VerifyingKey {
    pub kid: Option<String>,
    /// The key's `alg` if it states one, else its family's (RSA: RS* and PS*;
    /// EC: the curve's ES*; OKP: EdDSA). Never an HMAC algorithm: the
    /// algorithm comes from the key, not from the token, so a token cannot
    /// have a public key used as an HMAC secret.
    pub algorithms: Vec<Algorithm>,
    pub key: DecodingKey,
}

impl KeySet {
    /// The signing keys of a JWKS document (RFC 7517). Encryption keys,
    /// symmetric keys and keys of unknown types are passed over (an IdP's
    /// set often holds some); a document with no usable key is an error.
    pub fn parse(document: &[u8]) -> Result<KeySet, String> {
        #[derive(serde::Deserialize)]
        struct Document {
            keys: Vec<serde_json::Value>,
        }
        let parsed: Document =
            serde_json::from_slice(document).map_err(|error| format!("is not a JWKS document: {error}"))?;
        let mut keys = Vec::new();
        let mut passed_over = Vec::new();
        for (index, value) in parsed.keys.into_iter().enumerate() {
            match verifying_key(value) {
                Ok(key) => keys.push(key),
                Err(why) => passed_over.push(format!("key {index}: {why}")),
            }
        }
        if keys.is_empty() {
            let why = if passed_over.is_empty() { "it lists none".to_owned() } else { passed_over.join("; ") };
            return Err(format!("holds no key that can verify a token signature ({why})"));
        }
        Ok(KeySet { keys, document: document.to_vec() })
    }

    /// The keys that may have signed a token with this header: by `kid`
    /// when it has one, else every key; of those, the ones whose algorithms
    /// include the token's.
    pub fn candidates<'a>(
        &'a self,
        kid: Option<&'a str>,
        algorithm: Algorithm,
    ) -> impl Iterator<Item = &'a VerifyingKey> + 'a {
        self.keys
            .iter()
            .filter(move |key| kid.is_none_or(|kid| key.kid.as_deref() == Some(kid)))
            .filter(move |key| key.algorithms.contains(&algorithm))
    }

    pub fn knows(&self, kid: &str) -> bool {
        self.keys.iter().any(|key| key.kid.as_deref() == Some(kid))
    }
}

fn verifying_key(value: serde_json::Value) -> Result<VerifyingKey, String> {
    let jwk: Jwk = serde_json::from_value(value).map_err(|error| format!("not a JWK this proxy reads ({error})"))?;
    if jwk.common.public_key_use == Some(PublicKeyUse::Encryption) {
        return Err("an encryption key (`use: enc`)".to_owned());
    }
    if let AlgorithmParameters::RSA(params) = &jwk.algorithm {
        usable_rsa(&params.n, &params.e)?;
    }
    let family: &[Algorithm] = match &jwk.algorithm {
        AlgorithmParameters::RSA(_) => &RSA_ALGORITHMS,
        AlgorithmParameters::EllipticCurve(params) => match params.curve {
            EllipticCurve::P256 => &[Algorithm::ES256],
            EllipticCurve::P384 => &[Algorithm::ES384],
            _ => return Err(format!("curve {:?} is not supported", params.curve)),
        },
        AlgorithmParameters::OctetKeyPair(params) if params.curve == EllipticCurve::Ed25519 => &[Algorithm::EdDSA],
        AlgorithmParameters::OctetKeyPair(params) => return Err(format!("curve {:?} is not supported", params.curve)),
        AlgorithmParameters::OctetKey(_) => {
            return Err("a symmetric (`oct`) key: only public keys verify tokens here".to_owned())
        }
        _ => return Err("an unknown key type".to_owned()),
    };
    let algorithms = match jwk.common.key_algorithm {
        None => family.to_vec(),
        Some(stated) => {
            let algorithm = signing_algorithm(stated).ok_or_else(|| format!("`alg: {stated}` does not sign"))?;
            if !family.contains(&algorithm) {
                return Err(format!("`alg: {stated}` does not fit the key's type"));
            }
            vec![algorithm]
        }
    };
    let key = DecodingKey::from_jwk(&jwk).map_err(|error| format!("unusable ({error})"))?;
    Ok(VerifyingKey { kid: jwk.common.key_id, algorithms, key })
}

/// An RSA public key the verifiers take (ring's): a modulus of 2048 to
/// 8192 bits, an odd exponent from 3 below 2^33. Another one would be read
/// and then fail every token, so it is passed over here, with its reason.
fn usable_rsa(n: &str, e: &str) -> Result<(), String> {
    use base64::Engine;
    let decode = |text: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(text.trim_end_matches('='));
    let (n, e) = (decode(n).map_err(|_| "n is not base64url")?, decode(e).map_err(|_| "e is not base64url")?);
    let significant = |bytes: &[u8]| -> u64 {
        let Some(start) = bytes.iter().position(|byte| *byte != 0) else { return 0 };
        (bytes.len() - start - 1) as u64 * 8 + u64::from(8 - bytes[start].leading_zeros())
    };
    let bits = significant(&n);
    if !(2048..=8192).contains(&bits) {
        return Err(format!("an RSA key of {bits} bits (2048 to 8192 verify)"));
    }
    let exponent = e
        .iter()
        .skip_while(|byte| **byte == 0)
        .try_fold(0u64, |value, byte| value.checked_mul(256).map(|value| value + u64::from(*byte)));
    match exponent {
        Some(exponent) if exponent >= 3 && exponent % 2 == 1 && exponent < 1 << 33 => Ok(()),
        _ => Err("an RSA exponent that is not odd, from 3 and below 2^33".to_owned()),
    }
}

fn signing_algorithm(stated: KeyAlgorithm) -> Option<Algorithm> {
    Some(match stated {
        KeyAlgorithm::RS256 => Algorithm::RS256,
        KeyAlgorithm::RS384 => Algorithm::RS384,
        KeyAlgorithm::RS512 => Algorithm::RS512,
        KeyAlgorithm::PS256 => Algorithm::PS256,
        KeyAlgorithm::PS384 => Algorithm::PS384,
        KeyAlgorithm::PS512 => Algorithm::PS512,
        KeyAlgorithm::ES256 => Algorithm::ES256,
        KeyAlgorithm::ES384 => Algorithm::ES384,
        KeyAlgorithm::EdDSA => Algorithm::EdDSA,
        _ => return None,
    })
}

/// An API key file: `NAME:SHA256` lines (the key's SHA-256 in hex; `#`
/// starts a comment). Only hashes are held, so the file and the proxy's
/// memory give no key away; keys are random strings, for which one SHA-256
/// is enough (they are not passwords to stretch).
/// An API key's name, and the same as a header value (made once, for
/// `forward_header`).
#[derive(Debug)]
pub struct KeyName {
    pub name: Arc<str>,
    pub header: http::HeaderValue,
}

pub struct ApiKeys {
    by_hash: HashMap<[u8; 32], KeyName>,
    file: Vec<u8>,
}

impl PartialEq for ApiKeys {
    fn eq(&self, other: &Self) -> bool {
        self.file == other.file
    }
}

impl Eq for ApiKeys {}

impl std::fmt::Debug for ApiKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiKeys").field("keys", &self.by_hash.len()).finish()
    }
}

impl ApiKeys {
    pub fn load(path: &Path) -> Result<ApiKeys, String> {
        let shown = path.display();
        let file = std::fs::read(path).map_err(|error| format!("cannot read API key file {shown}: {error}"))?;
        let text = std::str::from_utf8(&file).map_err(|_| format!("API key file {shown} is not UTF-8 text"))?;
        let mut by_hash = HashMap::new();
        for (number, line) in text.lines().enumerate().map(|(index, line)| (index + 1, line.trim())) {
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let bad = |why: &str| format!("API key file {shown} line {number}: {why}");
            let (name, hash) = line.rsplit_once(':').ok_or_else(|| bad("expected NAME:SHA256-HEX"))?;
            let (name, hash) = (name.trim(), hash.trim());
            let header = http::HeaderValue::from_str(name)
                .ok()
                .filter(|_| !name.is_empty())
                .ok_or_else(|| bad("the name must be non-empty printable text"))?;
            let digest =
                hex_digest(hash).ok_or_else(|| bad("the hash must be 64 hex digits (sha256sum of the key)"))?;
            if by_hash.insert(digest, KeyName { name: Arc::from(name), header }).is_some() {
                return Err(bad("this key's hash is listed twice"));
            }
        }
        if by_hash.is_empty() {
            return Err(format!("API key file {shown} lists no key"));
        }
        Ok(ApiKeys { by_hash, file })
    }

    /// The name of the key whose SHA-256 is `digest`.
    pub fn name_of(&self, digest: &[u8; 32]) -> Option<&KeyName> {
        self.by_hash.get(digest)
    }

    pub fn len(&self) -> usize {
        self.by_hash.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_hash.is_empty()
    }
}

fn hex_digest(text: &str) -> Option<[u8; 32]> {
    let bytes = text.as_bytes();
    if bytes.len() != 64 {
        return None;
    }
    let mut digest = [0u8; 32];
    for (index, pair) in bytes.chunks(2).enumerate() {
        let pair = std::str::from_utf8(pair).ok()?;
        digest[index] = u8::from_str_radix(pair, 16).ok()?;
    }
    Some(digest)
}

fn path_text<S: serde::Serializer>(path: &Path, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_str(&path.display().to_string())
}

fn header<S: serde::Serializer>(name: &http::HeaderName, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_str(name.as_str())
}

fn optional_header<S: serde::Serializer>(name: &Option<http::HeaderName>, serializer: S) -> Result<S::Ok, S::Error> {
    match name {
        Some(name) => serializer.serialize_some(name.as_str()),
        None => serializer.serialize_none(),
    }
}

fn claim_values<S: serde::Serializer>(pairs: &[(String, Vec<String>)], serializer: S) -> Result<S::Ok, S::Error> {
    use serde::ser::SerializeMap;
    let mut map = serializer.serialize_map(Some(pairs.len()))?;
    for (claim, values) in pairs {
        map.serialize_entry(claim, values)?;
    }
    map.end()
}

fn claim_headers<S: serde::Serializer>(pairs: &[(String, http::HeaderName)], serializer: S) -> Result<S::Ok, S::Error> {
    use serde::ser::SerializeMap;
    let mut map = serializer.serialize_map(Some(pairs.len()))?;
    for (claim, header) in pairs {
        map.serialize_entry(claim, header.as_str())?;
    }
    map.end()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_set_keeps_signing_keys_and_passes_over_the_rest() {
        let document = br#"{"keys":[
            {"kty":"oct","k":"c2VjcmV0","kid":"hmac"},
            {"kty":"RSA","use":"enc","n":"sXchDaQebHnPiGvyDOAT4saGEUetSyo9MKLOoWFsueri23bOdgWp4Dy1WlUzewbgBHod5pcM9H95GQRV3JDXboIRROSBigeC5yjU1hGzHHyXss8UDprecbAYxknTcQkhslANGRUZmdTOQ5qTRsLAt6BTYuyvVRdhS8exSZEy_c4gs_7svlJJQ4H9_NxsiIoLwAEk7-Q3UXERGYw_75IDrGA84-lA_-Ct4eTlXHBIY2EaV7t7LjJaynVJCpkv4LKjTTAumiGUIuQhrNhZLuF_RJLqHpM2kgWFLU7-VTdL1VbC2tejvcI2BlMkEpk1BzBZI0KQB0GaDWFLN-aEAw3vRw","e":"AQAB"},
            {"kty":"RSA","kid":"rsa","n":"sXchDaQebHnPiGvyDOAT4saGEUetSyo9MKLOoWFsueri23bOdgWp4Dy1WlUzewbgBHod5pcM9H95GQRV3JDXboIRROSBigeC5yjU1hGzHHyXss8UDprecbAYxknTcQkhslANGRUZmdTOQ5qTRsLAt6BTYuyvVRdhS8exSZEy_c4gs_7svlJJQ4H9_NxsiIoLwAEk7-Q3UXERGYw_75IDrGA84-lA_-Ct4eTlXHBIY2EaV7t7LjJaynVJCpkv4LKjTTAumiGUIuQhrNhZLuF_RJLqHpM2kgWFLU7-VTdL1VbC2tejvcI2BlMkEpk1BzBZI0KQB0GaDWFLN-aEAw3vRw","e":"AQAB"}
        ]}"#;
        let set = KeySet::parse(document).unwrap();
        assert_eq!(set.keys.len(), 1);
        assert_eq!(set.keys[0].kid.as_deref(), Some("rsa"));
        assert!(set.candidates(Some("rsa"), Algorithm::RS256).next().is_some());
        // The token names HS256: no key of this set verifies it, whatever it holds.
        assert!(set.candidates(Some("rsa"), Algorithm::HS256).next().is_none());
        assert!(set.candidates(None, Algorithm::ES256).next().is_none());
        use base64::Engine;
        let short = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode([0xc5u8; 128]);
        let weak = format!(r#"{{"keys":[{{"kty":"RSA","n":"{short}","e":"AQAB"}}]}}"#);
        let weak = KeySet::parse(weak.as_bytes()).unwrap_err();
        assert!(weak.contains("1024 bits"), "a key ring would refuse every token of is passed over: {weak}");
        let only_hmac = KeySet::parse(br#"{"keys":[{"kty":"oct","k":"c2VjcmV0"}]}"#).unwrap_err();
        assert!(only_hmac.contains("symmetric"), "{only_hmac}");
        assert!(KeySet::parse(b"{}").is_err());
    }

    #[test]
    fn an_api_key_file_holds_names_by_hash() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys");
        let hash = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"; // sha256("test")
        std::fs::write(&path, format!("# ops\nrobot-1:{hash}\n\n")).unwrap();
        let keys = ApiKeys::load(&path).unwrap();
        assert_eq!(keys.name_of(&hex_digest(hash).unwrap()).map(|n| &*n.name), Some("robot-1"));
        std::fs::write(&path, "robot-1:abc\n").unwrap();
        assert!(ApiKeys::load(&path).unwrap_err().contains("line 1"));
        std::fs::write(&path, format!("a:{hash}\nb:{hash}\n")).unwrap();
        assert!(ApiKeys::load(&path).unwrap_err().contains("twice"));
    }
}
