//! A route's `auth:`: who the request comes from, checked before it is
//! forwarded. Every method the route lists must pass, in the order client
//! certificate, JWT, API key; the first that fails decides the answer
//! (403 `forbidden` for a certificate, or a valid token whose claims the
//! route does not accept, which no retry of the request can change; 401
//! `unauthenticated` with a `WWW-Authenticate` challenge for a token or key). What passed may be forwarded to the backend in headers
//! the route names, which the client's own headers of those names never
//! reach; the credential itself is taken off the request unless the route
//! keeps it.

pub mod client_cert;
pub mod crypto;
pub mod jwt;

use std::sync::Arc;

use bytes::Bytes;
use http::HeaderValue;

use crate::config::auth::AuthConfig;
pub use client_cert::ClientIdentity;
pub use jwt::{Jwks, TokenRefusal, Verifier};

/// A route's compiled `auth:`.
#[derive(Debug)]
pub struct RouteAuth {
    pub config: AuthConfig,
    pub jwt: Option<Verifier>,
    /// The headers it sets for the backend (see [`shield`]), listed once.
    forwarded: Vec<http::HeaderName>,
}

/// Why a request did not pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The connection has no verified client certificate.
    NoCertificate,
    /// Its certificate carries none of the route's `sans`.
    CertificateNotListed,
    Token(TokenRefusal),
    /// A valid token whose claims are not among those the route's `claims` accepts.
    ClaimNotAccepted,
    NoApiKey,
    UnknownApiKey,
}

impl Refusal {
    /// `switchyard_access_denied_total`'s `reason`.
    pub fn metric_reason(self) -> &'static str {
        match self {
            Refusal::NoCertificate | Refusal::CertificateNotListed => "client_certificate",
            Refusal::Token(_) | Refusal::ClaimNotAccepted => "jwt",
            Refusal::NoApiKey | Refusal::UnknownApiKey => "api_key",
        }
    }

    /// A credential an HTTP retry can bring (401); not a certificate, nor
    /// other claims in a valid token (403).
    pub fn is_unauthenticated(self) -> bool {
        !matches!(self, Refusal::NoCertificate | Refusal::CertificateNotListed | Refusal::ClaimNotAccepted)
    }

    /// The `WWW-Authenticate` challenge of a 401 (RFC 6750 for tokens:
    /// `error="invalid_token"` once one was presented).
    pub fn challenge(self) -> Option<&'static str> {
        Some(match self {
            Refusal::Token(TokenRefusal::Missing) => "Bearer realm=\"switchyard\"",
            Refusal::Token(_) => "Bearer realm=\"switchyard\", error=\"invalid_token\"",
            Refusal::NoApiKey | Refusal::UnknownApiKey => "ApiKey realm=\"switchyard\"",
            Refusal::NoCertificate | Refusal::CertificateNotListed | Refusal::ClaimNotAccepted => return None,
        })
    }

    /// In words, for the log and `/explain`.
    pub fn why(self) -> &'static str {
        match self {
            Refusal::NoCertificate => "no client certificate",
            Refusal::CertificateNotListed => "the client certificate has none of the route's sans",
            Refusal::Token(why) => why.as_str(),
            Refusal::ClaimNotAccepted => "the token's claims are not ones the route accepts",
            Refusal::NoApiKey => "no API key",
            Refusal::UnknownApiKey => "unknown API key",
        }
    }

    /// The answer: 401 with a challenge, or 403 for a certificate.
    pub fn into_error(self) -> crate::error::ProxyError {
        match self.challenge() {
            Some(challenge) => crate::error::ProxyError::Unauthenticated { why: self.why(), challenge },
            None => crate::error::ProxyError::NotAuthorized { why: self.why() },
        }
    }
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refusal::Token(why) => write!(f, "JWT refused: {}", why.as_str()),
            other => f.write_str(other.why()),
        }
    }
}

/// What passed: whom the access log names, and a rate limit's claim.
#[derive(Debug, Default)]
pub struct Passed {
    /// The token's `sub`, else the API key's name, else the certificate's name.
    pub principal: Option<Arc<str>>,
    pub claim_key: Option<Bytes>,
}

impl RouteAuth {
    /// `keys`: the key set of a JWT's source (see [`Jwks::for_source`]);
    /// `rate_claim`: the claim the route's rate limit is keyed by.
    pub fn new(
        config: &AuthConfig,
        keys: impl FnOnce(&crate::config::auth::JwksSource) -> Arc<Jwks>,
        rate_claim: Option<&str>,
    ) -> RouteAuth {
        let jwt = config.jwt.as_ref().map(|jwt| Verifier::new(jwt, keys(&jwt.keys), rate_claim));
        let forwarded = config.forwarded_headers().cloned().collect();
        RouteAuth { config: config.clone(), jwt, forwarded }
    }

    /// Checks the request, and on success rewrites its headers for the
    /// backend: forwarded identities in, credentials out.
    pub fn check<B>(
        &self,
        request: &mut http::Request<B>,
        certificate: Option<&ClientIdentity>,
    ) -> Result<Passed, Refusal> {
        self.check_with(request, Some(certificate))
    }

    /// [`check`](Self::check) of what the request itself presents, the
    /// client certificate left out (`/explain`, which has no connection).
    pub fn check_presented<B>(&self, request: &mut http::Request<B>) -> Result<Passed, Refusal> {
        self.check_with(request, None)
    }

    /// The methods the route lists, as the config names them.
    pub fn methods(&self) -> Vec<&'static str> {
        let config = &self.config;
        [
            ("client_cert", config.client_cert.is_some()),
            ("jwt", config.jwt.is_some()),
            ("api_key", config.api_key.is_some()),
        ]
        .into_iter()
        .filter_map(|(name, listed)| listed.then_some(name))
        .collect()
    }

    /// `certificate`: `None` to leave the certificate unchecked.
    fn check_with<B>(
        &self,
        request: &mut http::Request<B>,
        certificate: Option<Option<&ClientIdentity>>,
    ) -> Result<Passed, Refusal> {
        let mut passed = Passed::default();
        let mut certificate_name = None;
        if let (Some(rule), Some(certificate)) = (&self.config.client_cert, certificate) {
            let identity = certificate.ok_or(Refusal::NoCertificate)?;
            let name = if rule.sans.is_empty() {
                identity.name()
            } else {
                identity.matching(&rule.sans).ok_or(Refusal::CertificateNotListed)?
            };
            certificate_name = Some(name);
        }
        let verified = match &self.jwt {
            Some(verifier) => {
                let verified = verifier.verify(bearer_token(request.headers())?).map_err(Refusal::Token)?;
                if !verified.authorized {
                    return Err(Refusal::ClaimNotAccepted);
                }
                Some(verified)
            }
            None => None,
        };
        let key_name = match &self.config.api_key {
            Some(api_key) => {
                let presented = single(request.headers(), &api_key.header).ok_or(Refusal::NoApiKey)?;
                let digest = ring::digest::digest(&ring::digest::SHA256, presented.as_bytes());
                let digest: &[u8; 32] = digest.as_ref().try_into().expect("SHA-256 is 32 bytes");
                Some(api_key.keys.name_of(digest).ok_or(Refusal::UnknownApiKey)?)
            }
            None => None,
        };

        // Passed: the request is rewritten for the backend.
        let headers = request.headers_mut();
        if !self.forwarded.is_empty() {
            shield(headers, &self.forwarded);
        }
        if let (Some(rule), Some(name)) = (&self.config.client_cert, certificate_name) {
            if let Some(header) = &rule.forward_header {
                forward(headers, header, HeaderValue::from_str(name).ok());
            }
        }
        if let (Some(verifier), Some(verified)) = (&self.jwt, &verified) {
            let config = verifier.config();
            for ((_, header), value) in config.forward_claims.iter().zip(&verified.forwarded) {
                forward(headers, header, value.clone());
            }
            if !config.keep_token {
                headers.remove(http::header::AUTHORIZATION);
            }
            passed.principal = verified.subject.clone();
            passed.claim_key = verified.rate_key.clone();
        }
        if let (Some(api_key), Some(key)) = (&self.config.api_key, key_name) {
            if let Some(header) = &api_key.forward_header {
                forward(headers, header, Some(key.header.clone()));
            }
            if !api_key.keep_key {
                headers.remove(&api_key.header);
            }
            passed.principal.get_or_insert_with(|| Arc::clone(&key.name));
        }
        if passed.principal.is_none() {
            passed.principal = certificate_name.map(Arc::from);
        }
        Ok(passed)
    }
}

/// Keeps the client from touching the headers the route sets: a
/// `Connection` header naming one would have hop-by-hop stripping delete
/// it after it is set (so the token is taken out of `Connection`), and a
/// spelling with `_` for `-` (`x_user`) reads as the same header to
/// backends that see headers CGI-style (PHP, WSGI, Rack), so it is removed.
fn shield(headers: &mut http::HeaderMap, forwarded: &[http::HeaderName]) {
    let named = |token: &str| forwarded.iter().any(|name| name.as_str().eq_ignore_ascii_case(token.trim()));
    let listed = headers
        .get_all(http::header::CONNECTION)
        .iter()
        .any(|value| value.to_str().map_or(true, |text| text.split(',').any(named)));
    if listed {
        let kept: Vec<HeaderValue> = headers
            .get_all(http::header::CONNECTION)
            .iter()
            .filter_map(|value| {
                let tokens: Vec<&str> = value.to_str().ok()?.split(',').filter(|token| !named(token)).collect();
                HeaderValue::from_str(&tokens.join(",")).ok()
            })
            .collect();
        headers.remove(http::header::CONNECTION);
        for value in kept {
            headers.append(http::header::CONNECTION, value);
        }
    }
    let lookalikes: Vec<http::HeaderName> = headers
        .keys()
        .filter(|name| name.as_str().contains('_'))
        .filter(|name| forwarded.iter().any(|f| same_but_underscores(f.as_str(), name.as_str())))
        .cloned()
        .collect();
    for name in lookalikes {
        headers.remove(name);
    }
}

/// `lookalike` is `name` with some `-` written `_` (both lower case, as
/// header names are).
fn same_but_underscores(name: &str, lookalike: &str) -> bool {
    name.len() == lookalike.len()
        && name.bytes().zip(lookalike.bytes()).all(|(a, b)| a == b || (a == b'-' && b == b'_'))
}

/// The header set to `value` alone: whatever the client sent under that
/// name is gone, even when there is nothing to forward.
fn forward(headers: &mut http::HeaderMap, name: &http::HeaderName, value: Option<HeaderValue>) {
    match value {
        Some(value) => {
            headers.insert(name, value);
        }
        None => {
            headers.remove(name);
        }
    }
}

/// The header's one value; `None` when it is missing or sent more than
/// once (which of two credentials to believe is not a question to answer).
fn single<'a>(headers: &'a http::HeaderMap, name: &http::HeaderName) -> Option<&'a HeaderValue> {
    let mut values = headers.get_all(name).iter();
    let value = values.next()?;
    values.next().is_none().then_some(value)
}

/// The token of `Authorization: Bearer <token>` (the scheme's case aside).
fn bearer_token(headers: &http::HeaderMap) -> Result<&[u8], Refusal> {
    let value = single(headers, &http::header::AUTHORIZATION).ok_or(Refusal::Token(TokenRefusal::Missing))?;
    let bytes = value.as_bytes();
    match bytes.get(..7) {
        Some(scheme) if scheme.eq_ignore_ascii_case(b"bearer ") => {
            let token = bytes[7..].trim_ascii();
            if token.is_empty() {
                Err(Refusal::Token(TokenRefusal::Missing))
            } else {
                Ok(token)
            }
        }
        _ => Err(Refusal::Token(TokenRefusal::Missing)),
    }
}
