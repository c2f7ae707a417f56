//! A route's `auth.jwt`: bearer tokens checked against a key set (a JWKS
//! file read with the config, or a JWKS URL fetched in the background), and
//! a cache of the tokens already verified.
//!
//! The algorithm a token is checked with comes from the key that verifies
//! it, never from the token alone: `alg: none` names no algorithm at all,
//! and an HS256 token cannot make a public key its HMAC secret (the key set
//! holds no symmetric key). `exp` is required, `nbf` honoured, both with a
//! minute's leeway for clock skew.
//!
//! A signature check costs tens of microseconds, a proxied request about
//! ten: a client sends the same token with request after request, so a
//! verified token is remembered (by its exact bytes, for the key set it was
//! verified with) until it expires. Tokens that fail are not remembered.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwapOption;
use bytes::Bytes;
use http::HeaderValue;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, Validation};

use crate::config::auth::{JwksSource, JwtConfig, KeySet};

/// Verified tokens a route remembers.
const CACHE_ENTRIES: usize = 4096;
/// Seconds a token is accepted past `exp` / before `nbf`.
const LEEWAY_SECONDS: u64 = 60;
/// A fetch of the key set, connection to body, is abandoned after this.
const FETCH_TIMEOUT: Duration = Duration::from_secs(10);
/// A key set larger than this is not a key set.
const MAX_JWKS_BYTES: usize = 1 << 20;
/// A token naming a key the set does not have fetches the set early, at most this often.
const EARLY_FETCH_INTERVAL: Duration = Duration::from_secs(5);

/// Why a token was refused (the reason in the log and in `/explain`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenRefusal {
    Missing,
    Malformed,
    /// No key of the set has the token's `kid` and algorithm.
    UnknownKey,
    /// A `jwks_url` route before its first successful fetch.
    NoKeys,
    Signature,
    Expired,
    NotYetValid,
    Issuer,
    Audience,
    MissingClaim,
}

impl TokenRefusal {
    pub fn as_str(self) -> &'static str {
        match self {
            TokenRefusal::Missing => "no bearer token",
            TokenRefusal::Malformed => "malformed token",
            TokenRefusal::UnknownKey => "no key for the token's kid and alg",
            TokenRefusal::NoKeys => "the key set has not been fetched yet",
            TokenRefusal::Signature => "bad signature",
            TokenRefusal::Expired => "expired",
            TokenRefusal::NotYetValid => "not valid yet (nbf)",
            TokenRefusal::Issuer => "issuer not accepted",
            TokenRefusal::Audience => "audience not accepted",
            TokenRefusal::MissingClaim => "a required claim is missing",
        }
    }
}

/// What a verified token gives the request.
pub struct Verified {
    /// The key set it was verified with: a new set checks it again.
    generation: u64,
    expires: u64,
    pub subject: Option<Arc<str>>,
    /// Each forwarded claim's value, in `forward_claims`' order (`None`: the
    /// token lacks it, or it cannot be a header value).
    pub forwarded: Vec<Option<HeaderValue>>,
    /// The value of the claim the route's rate limit is keyed by.
    pub rate_key: Option<Bytes>,
    /// Its claims are ones the route's `claims` accepts (a valid token that
    /// fails this is remembered too: it is refused with 403 each time).
    pub authorized: bool,
}

pub struct Verifier {
    config: JwtConfig,
    keys: Arc<Jwks>,
    /// One per algorithm a key of the set may use, made once.
    validations: Vec<(Algorithm, Validation)>,
    rate_claim: Option<String>,
    cache: quick_cache::sync::Cache<Box<[u8]>, Arc<Verified>>,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifier").field("config", &self.config).field("cached", &self.cache.len()).finish()
    }
}

impl Verifier {
    /// `keys`: the route's key set, carried from the previous snapshot when
    /// its source is the same (see [`Jwks::for_source`]).
    pub fn new(config: &JwtConfig, keys: Arc<Jwks>, rate_claim: Option<&str>) -> Verifier {
        super::crypto::install();

        let validations = crate::config::auth::SIGNING_ALGORITHMS
            .into_iter()
            .map(|algorithm| {
                let mut validation = Validation::new(algorithm);
                validation.leeway = LEEWAY_SECONDS;
                validation.validate_nbf = true;
                let mut required = vec!["exp"];
                if !config.issuers.is_empty() {
                    validation.set_issuer(&config.issuers);
                    required.push("iss");
                }
                if config.audiences.is_empty() {
                    validation.validate_aud = false;
                } else {
                    validation.set_audience(&config.audiences);
                    required.push("aud");
                }
                validation.set_required_spec_claims(&required);
                (algorithm, validation)
            })
            .collect();
        Verifier {
            config: config.clone(),
            keys,
            validations,
            rate_claim: rate_claim.map(str::to_owned),
            cache: quick_cache::sync::Cache::new(CACHE_ENTRIES),
        }
    }

    pub fn config(&self) -> &JwtConfig {
        &self.config
    }

    pub fn keys(&self) -> &Arc<Jwks> {
        &self.keys
    }

    /// Checks `token` (the bytes after `Bearer `).
    pub fn verify(&self, token: &[u8]) -> Result<Arc<Verified>, TokenRefusal> {
        let now = unix_now();
        let generation = self.keys.generation.load(Ordering::Acquire);
        if let Some(verified) = self.cache.get(token) {
            if verified.generation == generation && now <= verified.expires.saturating_add(LEEWAY_SECONDS) {
                return Ok(verified);
            }
        }
        let verified = Arc::new(self.check(token, generation)?);
        self.cache.insert(token.into(), Arc::clone(&verified));
        Ok(verified)
    }

    fn check(&self, token: &[u8], generation: u64) -> Result<Verified, TokenRefusal> {
        let header = jsonwebtoken::decode_header(token).map_err(|_| TokenRefusal::Malformed)?;
        let Some(set) = self.keys.current.load_full() else {
            self.keys.fetch_early();
            return Err(TokenRefusal::NoKeys);
        };
        if let Some(kid) = header.kid.as_deref().filter(|kid| !set.knows(kid)) {
            tracing::debug!(kid, "a token names a key the set does not have");
            self.keys.fetch_early();
            return Err(TokenRefusal::UnknownKey);
        }
        let validation = self
            .validations
            .iter()
            .find(|(algorithm, _)| *algorithm == header.alg)
            .map(|(_, validation)| validation)
            .ok_or(TokenRefusal::UnknownKey)?;
        let mut refusal = TokenRefusal::UnknownKey;
        for key in set.candidates(header.kid.as_deref(), header.alg) {
            let token = std::str::from_utf8(token).map_err(|_| TokenRefusal::Malformed)?;
            match jsonwebtoken::decode::<serde_json::Map<String, serde_json::Value>>(token, &key.key, validation) {
                Ok(data) => return self.accepted(data.claims, generation),
                Err(error) => {
                    refusal = match error.kind() {
                        ErrorKind::InvalidSignature => TokenRefusal::Signature,
                        ErrorKind::ExpiredSignature => TokenRefusal::Expired,
                        ErrorKind::ImmatureSignature => TokenRefusal::NotYetValid,
                        ErrorKind::InvalidIssuer => TokenRefusal::Issuer,
                        ErrorKind::InvalidAudience => TokenRefusal::Audience,
                        ErrorKind::MissingRequiredClaim(_) => TokenRefusal::MissingClaim,
                        _ => TokenRefusal::Malformed,
                    };
                    // Another key without a kid may still verify it; a
                    // verified token with bad claims is refused for them.
                    if refusal != TokenRefusal::Signature {
                        return Err(refusal);
                    }
                }
            }
        }
        Err(refusal)
    }

    fn accepted(
        &self,
        claims: serde_json::Map<String, serde_json::Value>,
        generation: u64,
    ) -> Result<Verified, TokenRefusal> {
        let present = |name: &str| claims.get(name).is_some_and(|value| !value.is_null());
        if !self.config.required_claims.iter().all(|name| present(name)) {
            return Err(TokenRefusal::MissingClaim);
        }
        let text = |name: &str| match claims.get(name)? {
            serde_json::Value::Null => None,
            serde_json::Value::String(text) => Some(text.clone()),
            other => Some(other.to_string()),
        };
        let authorized =
            self.config.claims.iter().all(|(name, accepted)| claim_accepted(claims.get(name), name, accepted));
        Ok(Verified {
            authorized,
            generation,
            // A number, as the check read it (jsonwebtoken takes a float too).
            expires: claims
                .get("exp")
                .and_then(|exp| exp.as_u64().or_else(|| exp.as_f64().map(|f| f as u64)))
                .unwrap_or(0),
            subject: text("sub").map(Arc::from),
            forwarded: self
                .config
                .forward_claims
                .iter()
                .map(|(claim, _)| text(claim).and_then(|value| HeaderValue::try_from(value).ok()))
                .collect(),
            rate_key: self.rate_claim.as_deref().and_then(text).map(Bytes::from),
        })
    }
}

/// Whether a claim holds one of the `accepted` values: a string equal to
/// one (for `scope` and `scp`, one of its space-separated scopes, as OAuth
/// writes them), or an array with such a string in it.
fn claim_accepted(value: Option<&serde_json::Value>, name: &str, accepted: &[String]) -> bool {
    let scopes = name == "scope" || name == "scp";
    let text_accepted = |text: &str| {
        accepted.iter().any(|value| value == text)
            || (scopes && text.split_ascii_whitespace().any(|scope| accepted.iter().any(|value| value == scope)))
    };
    match value {
        Some(serde_json::Value::String(text)) => text_accepted(text),
        Some(serde_json::Value::Array(items)) => items.iter().any(|item| item.as_str().is_some_and(text_accepted)),
        _ => false,
    }
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |since| since.as_secs())
}

/// A route's key set: the file's, or the last good one fetched from the URL.
pub struct Jwks {
    source: JwksSource,
    current: ArcSwapOption<KeySet>,
    /// Moves on with each new set: tokens verified with an older one are checked again.
    generation: AtomicU64,
    wake: Arc<tokio::sync::Notify>,
    /// When a token last asked for an early fetch (`clock` nanoseconds; 0: never).
    last_early_fetch: AtomicU64,
}

impl std::fmt::Debug for Jwks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Jwks").field("source", &self.source).field("current", &self.current.load()).finish()
    }
}

impl Jwks {
    /// The key set of `source`: `previous` if it has the same URL (its
    /// fetched keys and fetch task go on), else a new one (a URL's fetch task
    /// starts, where there is a runtime: not for a config only being checked).
    pub fn for_source(source: &JwksSource, previous: Option<&Arc<Jwks>>) -> Arc<Jwks> {
        if let (JwksSource::Url { .. }, Some(previous)) = (source, previous) {
            if previous.source == *source {
                return Arc::clone(previous);
            }
        }
        let current = match source {
            JwksSource::File { keys, .. } => Some(Arc::clone(keys)),
            // The same URL with another `refresh`: its keys until the next fetch.
            JwksSource::Url { .. } => previous.and_then(|previous| previous.current.load_full()),
        };
        let jwks = Arc::new(Jwks {
            source: source.clone(),
            current: ArcSwapOption::new(current),
            generation: AtomicU64::new(0),
            wake: Arc::new(tokio::sync::Notify::new()),
            last_early_fetch: AtomicU64::new(0),
        });
        if let JwksSource::Url { url, refresh } = source {
            if tokio::runtime::Handle::try_current().is_ok() {
                tokio::spawn(keep_fetching(Arc::downgrade(&jwks), Arc::clone(&jwks.wake), url.clone(), *refresh));
            }
        }
        jwks
    }

    pub fn source(&self) -> &JwksSource {
        &self.source
    }

    /// The key ids of the set in use (`/explain`).
    pub fn key_ids(&self) -> Option<Vec<String>> {
        let set = self.current.load_full()?;
        Some(set.keys.iter().map(|key| key.kid.clone().unwrap_or_else(|| "-".to_owned())).collect())
    }

    /// A URL's set is fetched now, unless it was fetched early a moment ago:
    /// a client sending tokens with an unknown `kid` cannot make the proxy
    /// hammer its identity provider.
    fn fetch_early(&self) {
        if !matches!(self.source, JwksSource::Url { .. }) {
            return;
        }
        let now = crate::clock::nanos_since_epoch();
        let last = self.last_early_fetch.load(Ordering::Relaxed);
        let interval = EARLY_FETCH_INTERVAL.as_nanos() as u64;
        // One caller wins the exchange; the others see the fetch as just asked for.
        if (last != 0 && now.saturating_sub(last) < interval)
            || self.last_early_fetch.compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed).is_err()
        {
            return;
        }
        self.wake.notify_one();
    }

    /// A fetched document: a new set if it parses and differs, else the
    /// last good one stays.
    /// `false` when the fetch failed.
    fn fetched(&self, url: &str, document: Result<Vec<u8>, String>) -> bool {
        let parsed = document.and_then(|document| KeySet::parse(&document));
        match parsed {
            Ok(set) => {
                if self.current.load().as_deref() != Some(&set) {
                    tracing::info!(url, keys = set.keys.len(), "JWKS key set fetched");
                    self.current.store(Some(Arc::new(set)));
                    self.generation.fetch_add(1, Ordering::AcqRel);
                }
                true
            }
            Err(error) => {
                let kept =
                    if self.current.load().is_some() { "keeping the last good key set" } else { "no key set yet" };
                tracing::warn!(url, %error, "JWKS fetch failed; {kept}");
                false
            }
        }
    }
}

/// Fetches `url` every `refresh` (and when a token asks early) while the
/// key set is in use; ends with the last snapshot that uses it.
async fn keep_fetching(jwks: Weak<Jwks>, wake: Arc<tokio::sync::Notify>, url: String, refresh: Duration) {
    let tls = https_config();
    // After a failed fetch the next comes sooner than `refresh`: 1s, doubling.
    let mut retry = Duration::from_secs(1);
    loop {
        let document = fetch(&url, tls.as_ref()).await;
        let Some(keys) = jwks.upgrade() else { return };
        let wait = if keys.fetched(&url, document) {
            retry = Duration::from_secs(1);
            refresh
        } else {
            let wait = retry.min(refresh);
            retry = (retry * 2).min(refresh);
            wait
        };
        drop(keys);
        tokio::select! {
            () = wake.notified() => {}
            () = tokio::time::sleep(wait) => {}
        }
        if jwks.strong_count() == 0 {
            return;
        }
    }
}

/// The system's CA certificates, for an `https://` key set; `None` where the
/// system has none (an `https` fetch then fails, and says why).
fn https_config() -> Option<Arc<rustls::ClientConfig>> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add_parsable_certificates(rustls_native_certs::load_native_certs().certs);
    if roots.is_empty() {
        return None;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .expect("the ring provider supports TLS 1.2 and 1.3")
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Some(Arc::new(config))
}

/// One `GET` of the key set, bounded in time and size.
async fn fetch(url: &str, tls: Option<&Arc<rustls::ClientConfig>>) -> Result<Vec<u8>, String> {
    match tokio::time::timeout(FETCH_TIMEOUT, fetch_unbounded(url, tls)).await {
        Ok(result) => result,
        Err(_) => Err(format!("no answer within {}", crate::text::duration(FETCH_TIMEOUT))),
    }
}

async fn fetch_unbounded(url: &str, tls: Option<&Arc<rustls::ClientConfig>>) -> Result<Vec<u8>, String> {
    let uri: http::Uri = url.parse().map_err(|error| format!("{error}"))?;
    let https = uri.scheme_str() == Some("https");
    let host = uri.host().ok_or("no host")?.trim_matches(['[', ']']).to_owned();
    let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
    let tcp = tokio::net::TcpStream::connect((host.as_str(), port)).await.map_err(|e| format!("connect: {e}"))?;
    let request = http::Request::get(uri.path_and_query().map_or("/", |p| p.as_str()))
        .header(http::header::HOST, uri.authority().map_or(host.as_str(), |a| a.as_str()))
        .header(http::header::ACCEPT, "application/json")
        .header(http::header::USER_AGENT, concat!("switchyard/", env!("CARGO_PKG_VERSION")))
        .body(http_body_util::Empty::<Bytes>::new())
        .map_err(|error| error.to_string())?;
    if https {
        let config = tls.ok_or("no system CA certificates to check the server with")?;
        let name = rustls::pki_types::ServerName::try_from(host).map_err(|e| format!("server name: {e}"))?;
        let stream = tokio_rustls::TlsConnector::from(Arc::clone(config))
            .connect(name, tcp)
            .await
            .map_err(|e| format!("TLS: {e}"))?;
        get(hyper_util::rt::TokioIo::new(stream), request).await
    } else {
        get(hyper_util::rt::TokioIo::new(tcp), request).await
    }
}

async fn get<I>(io: I, request: http::Request<http_body_util::Empty<Bytes>>) -> Result<Vec<u8>, String>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    use http_body_util::BodyExt;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(io).await.map_err(|e| format!("HTTP: {e}"))?;
    let connection = tokio::spawn(connection);
    let result = async {
        let response = sender.send_request(request).await.map_err(|e| format!("HTTP: {e}"))?;
        if !response.status().is_success() {
            return Err(format!("status {}", response.status()));
        }
        let body = http_body_util::Limited::new(response.into_body(), MAX_JWKS_BYTES)
            .collect()
            .await
            .map_err(|e| format!("body: {e}"))?;
        Ok(body.to_bytes().to_vec())
    }
    .await;
    connection.abort();
    result
}
