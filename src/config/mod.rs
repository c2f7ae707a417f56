//! Configuration: the YAML file, parsed and validated into plain domain types.
//!
//! Three tiers, each in its own place: [`raw`] mirrors the YAML (serde, spans kept),
//! this module's [`Config`] is the validated domain form (no spans, no unchecked
//! values), and `state` compiles a `Config` into the runtime objects that serve
//! traffic. Every problem found is reported as `file:line:col: message`, and all of
//! them are reported at once rather than the first alone.

pub mod auth;
pub mod raw;
pub mod tls;
mod validate;
pub mod values;
pub mod watch;

use std::fmt;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use serde::Serialize;

pub use auth::AuthConfig;
pub use raw::{CheckKind, ConcurrencyScope, LogFormat, LogLevel, OnUnavailable, RetryOn, UpstreamProtocol};
pub use values::{HostPattern, KeySpec};

/// A config file larger than this is refused before parsing: real configs are far
/// smaller, and the cap bounds the memory a mistaken path (a log file, say) can take.
const MAX_CONFIG_BYTES: u64 = 16 * 1024 * 1024;

/// How `/config` writes values that the domain types hold in other forms
/// (the effective config is these types serialized).
mod shown {
    use serde::Serializer;

    /// `5s`, `250ms`: as the config file writes them.
    pub fn duration<S: Serializer>(duration: &std::time::Duration, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&crate::text::duration(*duration))
    }

    pub fn optional_header<S: Serializer>(name: &Option<http::HeaderName>, serializer: S) -> Result<S::Ok, S::Error> {
        match name {
            Some(name) => serializer.serialize_some(name.as_str()),
            None => serializer.serialize_none(),
        }
    }

    pub fn optional_duration<S: Serializer>(
        duration: &Option<std::time::Duration>,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        match duration {
            Some(duration) => serializer.serialize_some(&crate::text::duration(*duration)),
            None => serializer.serialize_none(),
        }
    }

    /// A value as it writes itself (`Display`).
    pub fn display<S: Serializer, T: std::fmt::Display>(value: &T, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(value)
    }

    /// The Redis URL without its password.
    pub fn redis<S: Serializer>(redis: &super::Secret, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&super::redis_shown(redis))
    }

    /// `bots.internal`, `*.internal`: as the file writes the pattern.
    pub fn optional_host<S: Serializer>(host: &Option<super::HostPattern>, serializer: S) -> Result<S::Ok, S::Error> {
        match host {
            Some(super::HostPattern::Exact(host)) => serializer.serialize_some(host),
            Some(super::HostPattern::Suffix(suffix)) => serializer.serialize_some(&format!("*{suffix}")),
            None => serializer.serialize_none(),
        }
    }

    pub fn methods<S: Serializer>(methods: &[http::Method], serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_seq(methods.iter().map(http::Method::as_str))
    }

    /// Header names to values, as a map (a value that is not text is empty).
    pub fn headers<S: Serializer>(
        headers: &[(http::HeaderName, http::HeaderValue)],
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        serializer.collect_map(headers.iter().map(|(name, value)| (name.as_str(), value.to_str().unwrap_or(""))))
    }

    /// Each value as it writes itself.
    pub fn displayed<S: Serializer, T: std::fmt::Display>(values: &[T], serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_seq(values.iter().map(ToString::to_string))
    }

    /// `null` without servers (the system's resolver), else the servers.
    pub fn resolver<S: Serializer>(resolver: &super::ResolverConfig, serializer: S) -> Result<S::Ok, S::Error> {
        #[derive(serde::Serialize)]
        struct Servers<'a> {
            #[serde(serialize_with = "displayed")]
            servers: &'a [std::net::SocketAddr],
        }
        match resolver.servers.as_slice() {
            [] => serializer.serialize_none(),
            servers => serializer.serialize_some(&Servers { servers }),
        }
    }

    /// Upstreams as a map by name.
    pub fn by_name<S: Serializer>(upstreams: &[super::UpstreamConfig], serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_map(upstreams.iter().map(|upstream| (&upstream.name, upstream)))
    }

    /// A path as text (lossy where it is not UTF-8, rather than an error).
    pub fn optional_path<S: Serializer>(path: &Option<std::path::PathBuf>, serializer: S) -> Result<S::Ok, S::Error> {
        match path {
            Some(path) => serializer.serialize_some(&path.display().to_string()),
            None => serializer.serialize_none(),
        }
    }
}

/// The validated configuration. Serialized, it is `/config`: the effective
/// config, defaults filled in, secrets left out.
#[derive(Debug, Clone, Serialize)]
pub struct Config {
    /// What `check` and the log point out without refusing the config.
    #[serde(skip)]
    pub warnings: Vec<ConfigError>,
    pub listeners: Vec<ListenerConfig>,
    pub admin: AdminConfig,
    pub log: LogConfig,
    pub limits: Limits,
    /// Request worker threads (each with its own runtime, sockets and pools);
    /// read at start, a reload does not change it.
    pub workers: usize,
    /// The DNS servers `discovery` asks.
    #[serde(serialize_with = "shown::resolver")]
    pub resolver: ResolverConfig,
    /// Peers whose `X-Forwarded-For`, `Forwarded` and `X-Real-IP` are kept
    /// (see `proxy::rewrite`); from anyone else they are replaced.
    #[serde(serialize_with = "shown::displayed")]
    pub trusted_proxies: Vec<ipnet::IpNet>,
    pub paths: PathsConfig,
    /// `cluster:`; `None` when replicas share nothing.
    pub cluster: Option<ClusterConfig>,
    /// `tracing:`; `None` when requests are not traced.
    pub tracing: Option<TracingConfig>,
    pub routes: Vec<RouteConfig>,
    /// Shown as a map by name, as the file writes them.
    #[serde(serialize_with = "shown::by_name")]
    pub upstreams: Vec<UpstreamConfig>,
}

/// `tracing:`: W3C trace context on requests, and spans exported over
/// OTLP/HTTP (protobuf) to a collector (see `trace`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TracingConfig {
    /// Where spans are posted: the collector's base URL with `/v1/traces`
    /// added, or a URL that already ends in it.
    pub otlp_endpoint: String,
    /// The share of requests that start a trace here (those whose client sent
    /// a `traceparent` follow its sampled flag instead).
    pub sample_ratio: f64,
    /// `service.name` of the proxy's spans.
    pub service_name: String,
}

impl Config {
    /// The files the config names beside itself, read with it (certificates
    /// and keys, client CA bundles, JWKS files, API key files): a change to
    /// one is a change to the config.
    pub fn referenced_files(&self) -> Vec<std::path::PathBuf> {
        let mut files = Vec::new();
        for tls in self.listeners.iter().filter_map(|listener| listener.tls.as_ref()) {
            for certificate in &tls.certificates {
                files.extend([certificate.cert_path.clone(), certificate.key_path.clone()]);
            }
            files.extend(tls.client_auth.as_ref().map(|auth| auth.ca.clone()));
        }
        for auth in self.routes.iter().map(|route| &route.auth) {
            if let Some(auth::JwksSource::File { path, .. }) = auth.jwt.as_ref().map(|jwt| &jwt.keys) {
                files.push(path.clone());
            }
            files.extend(auth.api_key.as_ref().map(|api_key| api_key.file.clone()));
        }
        files
    }
}

impl TracingConfig {
    pub const DEFAULT_SAMPLE_RATIO: f64 = 1.0;
    pub const DEFAULT_SERVICE_NAME: &'static str = "switchyard";
}

/// `cluster:`: the Redis (or Valkey) through which replicas share backend
/// slots (see `cluster`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ClusterConfig {
    /// `redis://` or `rediss://` URL; may carry a password, so shown without
    /// it (`redis_shown`).
    #[serde(serialize_with = "shown::redis")]
    pub redis: Secret,
    /// From `password_file`, when the URL carries none.
    #[serde(rename = "password_file")]
    pub password: Option<Secret>,
    pub key_prefix: String,
    #[serde(serialize_with = "shown::duration")]
    pub lease: Duration,
    pub on_unavailable: OnUnavailable,
}

impl ClusterConfig {
    pub const DEFAULT_LEASE: Duration = Duration::from_secs(10);
    pub const MIN_LEASE: Duration = Duration::from_secs(1);
    pub const MAX_LEASE: Duration = Duration::from_secs(600);
    pub const DEFAULT_KEY_PREFIX: &'static str = "switchyard:";

    /// The URL without what may hold a password (the user part, and the
    /// query, where `unix://` URLs carry `pass=`), for `/status` and logs.
    pub fn redis_shown(&self) -> String {
        redis_shown(&self.redis)
    }
}

/// A Redis URL without what may hold a password (see `ClusterConfig::redis_shown`).
fn redis_shown(redis: &Secret) -> String {
    let url = redis.reveal();
    let url = url.split_once('?').map_or(url, |(before, _)| before);
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => format!("{}://<redacted>@{}", &url[..scheme], &url[at + 1..]),
        _ => url.to_owned(),
    }
}

/// `paths:`: how request paths are normalised before routing (dot segments
/// are always removed; see `path`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct PathsConfig {
    /// Runs of slashes become one (`//a///b` is `/a/b`).
    pub merge_slashes: bool,
}

/// `resolver:`. No servers: the system's `/etc/resolv.conf`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ResolverConfig {
    pub servers: Vec<SocketAddr>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ListenerConfig {
    pub name: String,
    pub bind: SocketAddr,
    /// Certificates (read from disk with the config) and ALPN; `None` for
    /// plain HTTP/1.1 and h2c.
    pub tls: Option<tls::ListenerTls>,
    /// Every connection starts with a PROXY protocol header (v1 or v2) from
    /// an L4 balancer, which names the client.
    pub proxy_protocol: bool,
    /// `allow` / `deny`: which clients may use the listener at all.
    #[serde(flatten)]
    pub access: AddressRules,
}

/// `rate_limit:` of a route: `requests` per `per` for each key, with bursts
/// of up to `burst` (see `ratelimit`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RateLimitConfig {
    pub requests: u32,
    #[serde(serialize_with = "shown::duration")]
    pub per: Duration,
    pub burst: u32,
    #[serde(serialize_with = "shown::display")]
    pub key: RateLimitKey,
    /// `replica`: each replica's own buckets; `cluster`: buckets shared in Redis.
    pub scope: ConcurrencyScope,
}

/// What a route's rate-limit buckets belong to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RateLimitKey {
    /// Something of the request, as a hash key names it (`client_ip`, `header:NAME`, ...).
    Request(KeySpec),
    /// A claim of the route's verified JWT (`claim:NAME`): limited after the
    /// token is checked, where the others are limited before.
    Claim(String),
}

impl std::fmt::Display for RateLimitKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RateLimitKey::Request(spec) => spec.fmt(f),
            RateLimitKey::Claim(name) => write!(f, "claim:{name}"),
        }
    }
}

/// `allow` and `deny` of a listener or a route: CIDR blocks checked against
/// the client's address (the one `trusted_proxies` and the PROXY protocol
/// establish). A client in `deny` is refused; with `allow` set, so is one in
/// none of its blocks.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct AddressRules {
    #[serde(serialize_with = "shown::displayed")]
    pub allow: Vec<ipnet::IpNet>,
    #[serde(serialize_with = "shown::displayed")]
    pub deny: Vec<ipnet::IpNet>,
}

/// Why [`AddressRules`] refused a client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AddressRefusal {
    /// It is in this `deny` block.
    Denied(ipnet::IpNet),
    /// `allow` is set and it is in none of its blocks.
    NotAllowed,
    /// The client is behind a trusted proxy whose forwarding header could not
    /// be read.
    Unknown,
}

impl std::fmt::Display for AddressRefusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AddressRefusal::Denied(block) => write!(f, "in deny {block}"),
            AddressRefusal::NotAllowed => f.write_str("in no block of allow"),
            AddressRefusal::Unknown => f.write_str("the trusted proxy's X-Forwarded-For could not be read"),
        }
    }
}

impl AddressRules {
    pub fn is_empty(&self) -> bool {
        self.allow.is_empty() && self.deny.is_empty()
    }

    /// Whether `client` may pass; `deny` is read first. A client the proxy
    /// could not establish (`None`: a trusted proxy's forwarding header it
    /// cannot read) is refused by any rule: it might be in `deny`.
    pub fn admit(&self, client: Option<std::net::IpAddr>) -> Result<(), AddressRefusal> {
        let Some(client) = client else {
            return if self.is_empty() { Ok(()) } else { Err(AddressRefusal::Unknown) };
        };
        // An IPv4 client on a dual-stack socket arrives as ::ffff:a.b.c.d;
        // the blocks are stored as IPv4 (see `validate`).
        let client = client.to_canonical();
        if let Some(block) = self.deny.iter().find(|block| block.contains(&client)) {
            return Err(AddressRefusal::Denied(*block));
        }
        if !self.allow.is_empty() && !self.allow.iter().any(|block| block.contains(&client)) {
            return Err(AddressRefusal::NotAllowed);
        }
        Ok(())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AdminConfig {
    pub bind: SocketAddr,
    /// When set, every admin call needs `Authorization: Bearer <token>`.
    pub token: Option<Secret>,
    /// `GET /metrics` answers without the token (Prometheus with no secret).
    pub metrics_without_token: bool,
}

/// A secret string: never printed, never logged, compared in constant time.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

/// Never written out: `/config` says only that there is one.
impl Serialize for Secret {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str("<redacted>")
    }
}

impl Secret {
    pub fn new(value: String) -> Self {
        Secret(value)
    }

    /// Compares without an early exit, so the time taken does not reveal how
    /// many leading bytes of a guess were right.
    /// The value itself, for the one place that must send it (a Redis
    /// connection); never for output.
    pub fn reveal(&self) -> &str {
        &self.0
    }

    pub fn matches(&self, candidate: &[u8]) -> bool {
        let expected = self.0.as_bytes();
        let mut difference = expected.len() ^ candidate.len();
        for (index, byte) in expected.iter().enumerate() {
            difference |= usize::from(byte ^ candidate.get(index).copied().unwrap_or(!byte));
        }
        std::hint::black_box(difference) == 0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

impl AdminConfig {
    pub const DEFAULT_BIND: &'static str = "127.0.0.1:9901";
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LogConfig {
    pub level: LogLevel,
    pub format: LogFormat,
    /// One line per request (target `access`, level info).
    pub access: bool,
    /// Where events go; standard error when `None`.
    #[serde(serialize_with = "shown::optional_path")]
    pub file: Option<std::path::PathBuf>,
    /// Where access lines go; where events go when `None`.
    #[serde(serialize_with = "shown::optional_path")]
    pub access_file: Option<std::path::PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Limits {
    pub max_header_bytes: usize,
    pub max_body_bytes: u64,
    #[serde(serialize_with = "shown::duration")]
    pub header_read_timeout: Duration,
    #[serde(serialize_with = "shown::duration")]
    pub idle_timeout: Duration,
    pub max_connections: usize,
    #[serde(serialize_with = "shown::duration")]
    pub shutdown_grace: Duration,
    /// Bound on a TCP connect to a backend (HAProxy's `timeout connect`).
    #[serde(serialize_with = "shown::duration")]
    pub connect_timeout: Duration,
    /// Bound on each wait for the next piece of a request body the client is
    /// uploading (nginx's `client_body_timeout`).
    #[serde(serialize_with = "shown::duration")]
    pub client_body_timeout: Duration,
    /// Bound on each wait for a client to take response bytes it has not read
    /// (nginx's `send_timeout`).
    #[serde(serialize_with = "shown::duration")]
    pub client_send_timeout: Duration,
    /// An upgraded connection (WebSocket) with no byte either way for this long
    /// is closed (HAProxy's `timeout tunnel`).
    #[serde(serialize_with = "shown::duration")]
    pub tunnel_idle_timeout: Duration,
    /// Bound on a client's TLS handshake (nginx's `ssl_handshake_timeout`).
    #[serde(serialize_with = "shown::duration")]
    pub tls_handshake_timeout: Duration,
    /// Bound on each wait for a backend's next bytes of a response body
    /// (nginx's `proxy_read_timeout`; the head is the route's `timeout`).
    #[serde(serialize_with = "shown::duration")]
    pub backend_read_timeout: Duration,
    /// Streams one HTTP/2 client connection may have open at once.
    pub max_concurrent_streams: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_header_bytes: 64 * 1024,
            max_body_bytes: 100 * 1024 * 1024,
            header_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            max_connections: 10_000,
            shutdown_grace: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(5),
            client_body_timeout: Duration::from_secs(60),
            client_send_timeout: Duration::from_secs(60),
            tunnel_idle_timeout: Duration::from_secs(3600),
            tls_handshake_timeout: Duration::from_secs(10),
            backend_read_timeout: Duration::from_secs(60),
            max_concurrent_streams: 100,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct RouteConfig {
    pub name: String,
    #[serde(rename = "match")]
    pub matcher: RouteMatch,
    pub upstream: String,
    /// Bound on the wait for the response head, queueing and retries included.
    #[serde(serialize_with = "shown::duration")]
    pub timeout: Duration,
    pub retry: Option<RetryConfig>,
    pub rate_limit: Option<RateLimitConfig>,
    /// `auth:`: what a request must present.
    #[serde(skip_serializing_if = "AuthConfig::is_empty")]
    pub auth: AuthConfig,
    /// `allow` / `deny`: which clients may use the route.
    #[serde(flatten)]
    pub access: AddressRules,
}

/// `match:` of a route: what a request must have to take it.
#[derive(Debug, Clone, Serialize)]
pub struct RouteMatch {
    #[serde(serialize_with = "shown::optional_host")]
    pub host: Option<HostPattern>,
    pub path_prefix: String,
    #[serde(serialize_with = "shown::methods")]
    pub methods: Vec<http::Method>,
    #[serde(serialize_with = "shown::headers")]
    pub headers: Vec<(http::HeaderName, http::HeaderValue)>,
}

impl RouteConfig {
    /// Long enough for an RPA job that runs for minutes before it answers.
    pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(300);
}

/// `retry:` of a route. Without it a request is tried once.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RetryConfig {
    /// Total tries, the first included.
    pub attempts: u32,
    #[serde(serialize_with = "shown::optional_duration")]
    pub per_try_timeout: Option<Duration>,
    pub on: Vec<RetryOn>,
    pub backoff: RetryBackoff,
    pub budget: RetryBudget,
    pub non_idempotent: bool,
}

/// The wait before retry n: random in `[0, min(max, base x 2^n))`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct RetryBackoff {
    #[serde(serialize_with = "shown::duration")]
    pub base: Duration,
    #[serde(serialize_with = "shown::duration")]
    pub max: Duration,
}

/// Retries in a window may not exceed `ratio x requests + min_per_second x window`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct RetryBudget {
    pub ratio: f64,
    pub min_per_second: u32,
}

impl RetryConfig {
    pub const DEFAULT_ATTEMPTS: u32 = 3;
    pub const DEFAULT_ON: [RetryOn; 5] =
        [RetryOn::ConnectFailure, RetryOn::Refused, RetryOn::Reset, RetryOn::GatewayError, RetryOn::Timeout];
    pub const DEFAULT_BACKOFF_BASE: Duration = Duration::from_millis(25);
    pub const DEFAULT_BACKOFF_MAX: Duration = Duration::from_secs(1);
    pub const DEFAULT_BUDGET_RATIO: f64 = 0.2;
    pub const DEFAULT_BUDGET_MIN_PER_SECOND: u32 = 10;
}

/// `circuit_breaker:` of an upstream; applies to each backend separately.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct BreakerConfig {
    pub consecutive_failures: u32,
    pub failure_rate: f64,
    pub min_requests: u32,
    #[serde(serialize_with = "shown::duration")]
    pub window: Duration,
    #[serde(serialize_with = "shown::duration")]
    pub open_for: Duration,
    pub half_open_requests: u32,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        BreakerConfig {
            consecutive_failures: 5,
            failure_rate: 0.5,
            min_requests: 20,
            window: Duration::from_secs(10),
            open_for: Duration::from_secs(10),
            half_open_requests: 3,
        }
    }
}

/// `queue:` of an upstream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct QueueConfig {
    pub max_waiting: u32,
    #[serde(serialize_with = "shown::duration")]
    pub timeout: Duration,
    #[serde(serialize_with = "shown::optional_header")]
    pub priority_header: Option<http::HeaderName>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct UpstreamConfig {
    #[serde(skip)]
    pub name: String,
    #[serde(rename = "balance")]
    pub policy: PolicyConfig,
    /// As listed, or (with `discovery`) the set found last: empty in the
    /// config as parsed, filled in when a snapshot is compiled. `/config`
    /// shows the config as parsed: a discovered set changes without the
    /// file changing (`/status` lists it), so the config shows where it
    /// comes from instead.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub backends: Vec<BackendConfig>,
    /// Shown as `discovery` and `backend_defaults`, as the file writes them.
    #[serde(flatten)]
    pub discovery: Option<DiscoveryConfig>,
    pub protocol: UpstreamProtocol,
    /// TLS towards the backends (HTTPS/1.1, or HTTP/2 over TLS for `h2`).
    pub tls: Option<tls::UpstreamTls>,
    pub health: HealthConfig,
    pub circuit_breaker: Option<BreakerConfig>,
    pub queue: Option<QueueConfig>,
    /// Whether `max_concurrency` holds per replica or across the cluster.
    pub max_concurrency_scope: ConcurrencyScope,
}

/// `discovery:` of an upstream: its backends come from DNS, looked up again
/// every `refresh` (or when the answer's TTL runs out, if later).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct DiscoveryConfig {
    pub source: DiscoverySource,
    pub refresh: Duration,
    /// `backend_defaults:`: the weight (for `dns`; SRV records carry their
    /// own) and `max_concurrency` each discovered backend gets.
    pub defaults: BackendDefaults,
    /// A larger answer keeps a deterministic subset of this many.
    pub max_backends: u32,
    /// Link-local addresses (169.254.0.0/16, fe80::/10) are used, not dropped.
    pub allow_link_local: bool,
}

impl Serialize for DiscoveryConfig {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        #[derive(Serialize)]
        struct Discovery<'a> {
            #[serde(skip_serializing_if = "Option::is_none")]
            dns: Option<String>,
            #[serde(skip_serializing_if = "Option::is_none")]
            srv: Option<&'a str>,
            #[serde(serialize_with = "shown::duration")]
            refresh: Duration,
            max_backends: u32,
            allow_link_local: bool,
        }
        let (dns, srv) = match &self.source {
            DiscoverySource::Dns { name, port } => (Some(format!("{name}:{port}")), None),
            DiscoverySource::Srv { name } => (None, Some(name.as_str())),
        };
        let discovery = Discovery {
            dns,
            srv,
            refresh: self.refresh,
            max_backends: self.max_backends,
            allow_link_local: self.allow_link_local,
        };
        let mut map = serializer.serialize_map(Some(2))?;
        map.serialize_entry("discovery", &discovery)?;
        map.serialize_entry("backend_defaults", &self.defaults)?;
        map.end()
    }
}

impl DiscoveryConfig {
    pub const DEFAULT_MAX_BACKENDS: u32 = 512;
    /// The most `max_backends` may be.
    pub const MAX_BACKENDS: u32 = 10_000;
    pub const DEFAULT_REFRESH: Duration = Duration::from_secs(10);
    /// Lookups more often than this would load the DNS server for nothing.
    pub const MIN_REFRESH: Duration = Duration::from_millis(100);
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum DiscoverySource {
    /// A and AAAA records of `name`; every address serves on `port`.
    Dns { name: String, port: u16 },
    /// SRV records of `name`: targets, ports and weights.
    Srv { name: String },
}

impl fmt::Display for DiscoverySource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DiscoverySource::Dns { name, port } => write!(f, "dns {name}:{port}"),
            DiscoverySource::Srv { name } => write!(f, "srv {name}"),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub struct BackendDefaults {
    pub weight: u32,
    pub max_concurrency: Option<u32>,
}

impl Default for BackendDefaults {
    fn default() -> Self {
        BackendDefaults { weight: 1, max_concurrency: None }
    }
}

/// `health:` of an upstream. Everything is off unless configured.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct HealthConfig {
    pub active: Option<ActiveCheck>,
    pub passive: Option<PassiveConfig>,
    #[serde(serialize_with = "shown::optional_duration")]
    pub slow_start: Option<Duration>,
}

/// An active health check. Equal checks of the same backend address share one
/// checker, whichever upstreams list it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
pub struct ActiveCheck {
    /// Shown as `kind` and the kind's own keys, as the file has them.
    #[serde(flatten)]
    pub probe: Probe,
    #[serde(serialize_with = "shown::duration")]
    pub interval: Duration,
    #[serde(serialize_with = "shown::duration")]
    pub timeout: Duration,
    pub healthy_after: u32,
    pub unhealthy_after: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Probe {
    /// `GET path`; passes on a status in `expect_status` and, if set, a body
    /// containing `expect_body`.
    Http { path: String, expect_status: Vec<u16>, host: Option<String>, expect_body: Option<String> },
    /// Passes when a TCP connection is accepted.
    Tcp,
    /// `grpc.health.v1.Health/Check` for `service` (empty: the whole server);
    /// passes on `SERVING`.
    Grpc { service: String },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct PassiveConfig {
    pub consecutive_failures: u32,
    #[serde(serialize_with = "shown::duration")]
    pub ejection_time: Duration,
    pub max_ejection_percent: u32,
}

impl ActiveCheck {
    pub const DEFAULT_PATH: &'static str = "/healthz";
    pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(2);
    pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(1);
    pub const DEFAULT_HEALTHY_AFTER: u32 = 2;
    pub const DEFAULT_UNHEALTHY_AFTER: u32 = 3;
}

impl Default for PassiveConfig {
    fn default() -> Self {
        PassiveConfig { consecutive_failures: 5, ejection_time: Duration::from_secs(30), max_ejection_percent: 50 }
    }
}

/// `balance:` of an upstream, shown as the file has it (`policy` and the
/// policy's own keys).
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "policy", rename_all = "snake_case")]
pub enum PolicyConfig {
    RoundRobin,
    LeastLoaded,
    Random,
    ConsistentHash {
        #[serde(serialize_with = "shown::display")]
        key: KeySpec,
        bounded_load: Option<f64>,
    },
}

impl PolicyConfig {
    /// The policy's name as written in the config.
    pub fn name(&self) -> &'static str {
        match self {
            PolicyConfig::RoundRobin => "round_robin",
            PolicyConfig::LeastLoaded => "least_loaded",
            PolicyConfig::Random => "random",
            PolicyConfig::ConsistentHash { .. } => "consistent_hash",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BackendConfig {
    /// `host:port` as written in the config; also the backend's identity in metrics.
    pub address: String,
    pub weight: u32,
    pub max_concurrency: Option<u32>,
}

/// One problem in a config file, with its position.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub file: String,
    pub line: usize,
    pub column: usize,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}: {}", self.file, self.line, self.column, self.message)
    }
}

/// Every problem found in a config file, in file order. Never empty.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, error) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{error}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

/// Reads and validates the config file at `path`.
pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
    parse(&read(path)?, &path.display().to_string())
}

/// Reads the config file's text (following symlinks), refusing oversized files.
pub fn read(path: &Path) -> Result<String, ConfigErrors> {
    let file = path.display().to_string();
    let io_error =
        |message: String| ConfigErrors(vec![ConfigError { file: file.clone(), line: 1, column: 1, message }]);
    let size = std::fs::metadata(path).map_err(|e| io_error(format!("cannot read config: {e}")))?.len();
    if size > MAX_CONFIG_BYTES {
        return Err(io_error(format!("config is {size} bytes; the limit is {MAX_CONFIG_BYTES}")));
    }
    std::fs::read_to_string(path).map_err(|e| io_error(format!("cannot read config: {e}")))
}

/// Parses and validates config text; `file` names it in error messages.
pub fn parse(text: &str, file: &str) -> Result<Config, ConfigErrors> {
    let raw: raw::RawConfig = serde_saphyr::from_str_with_options(text, parser_options()).map_err(|e| {
        let (line, column) = e.location().map_or((1, 1), |l| (l.line() as usize, l.column() as usize));
        ConfigErrors(vec![ConfigError { file: file.to_owned(), line, column, message: parser_message(&e) }])
    })?;
    validate::validate(raw, file)
}

fn parser_options() -> serde_saphyr::Options {
    let mut options = serde_saphyr::Options::default();
    options.with_snippet = false;
    // Budgets bound the work a hostile file can cause (alias bombs, deep nesting);
    // the defaults are generous, so only the ones a config never needs are tightened.
    let mut budget = serde_saphyr::Budget::default();
    budget.max_documents = 1;
    budget.max_depth = 32;
    options.budget = Some(budget);
    options.alias_limits.max_total_replayed_events = 200_000;
    options
}

/// serde-saphyr appends " at line L, column C" to its messages; the location is
/// printed in front instead, so the suffix is dropped.
fn parser_message(error: &serde_saphyr::Error) -> String {
    let text = error.to_string();
    match text.rfind(" at line ") {
        Some(cut) => text[..cut].to_owned(),
        None => text,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
listeners:
  - bind: "127.0.0.1:0"
routes:
  - match: { path_prefix: /robot/, methods: [POST], host: "*.bots", headers: { X-Tenant: acme } }
    upstream: robots
    timeout: 2s
  - upstream: api
upstreams:
  robots:
    balance: { policy: consistent_hash, key: "header:x-job-id", bounded_load: 1.25 }
    backends:
      - { address: "127.0.0.1:1", weight: 2, max_concurrency: 1 }
      - { address: "127.0.0.1:2" }
  api:
    backends: [{ address: "localhost:3" }]
    protocol: h2c
"#;

    #[test]
    fn good_config_validates() {
        let config = parse(GOOD, "t.yaml").unwrap();
        assert_eq!(config.routes.len(), 2);
        assert_eq!(config.routes[0].name, "route-0");
        assert_eq!(config.routes[0].matcher.headers[0].0, "x-tenant");
        assert_eq!(config.routes[1].matcher.path_prefix, "/");
        let robots = config.upstreams.iter().find(|u| u.name == "robots").unwrap();
        assert_eq!(robots.backends[0].weight, 2);
        assert_eq!(robots.backends[1].weight, 1);
        assert!(matches!(robots.policy, PolicyConfig::ConsistentHash { bounded_load: Some(b), .. } if b == 1.25));
        assert_eq!(config.limits, Limits::default());
    }

    fn first_error(text: &str) -> ConfigError {
        parse(text, "bad.yaml").unwrap_err().0.remove(0)
    }

    #[test]
    fn parser_errors_carry_position_without_suffix() {
        let error = first_error("listeners: []\nbogus: 1\n");
        assert_eq!((error.line, error.column), (2, 1));
        assert!(error.message.starts_with("unknown field `bogus`"), "{}", error.message);
        assert!(!error.message.contains(" at line "));
    }

    #[test]
    fn all_semantic_errors_are_collected() {
        let text = "listeners: [{bind: \"127.0.0.1:0\"}]\nroutes:\n  - upstream: nope\n  - upstream: other\nupstreams:\n  a:\n    backends: [{address: \"x:1\"}]\n";
        let errors = parse(text, "bad.yaml").unwrap_err();
        assert_eq!(errors.0.len(), 2, "{errors}");
        assert_eq!((errors.0[0].line, errors.0[0].column), (3, 15));
        assert_eq!((errors.0[1].line, errors.0[1].column), (4, 15));
    }

    #[test]
    fn a_cluster_scope_needs_a_cluster_and_limits_to_share() {
        let config = |cluster: &str, limit: &str| {
            format!(
                "listeners: [{{bind: \"127.0.0.1:0\"}}]\n{cluster}routes: [{{upstream: bots}}]\nupstreams:\n  bots:\n    max_concurrency_scope: cluster\n    backends: [{{address: \"x:1\"{limit}}}]\n"
            )
        };
        let error = first_error(&config("", ", max_concurrency: 1"));
        assert_eq!((error.line, error.column), (5, 28), "{}", error.message);
        assert!(error.message.contains("needs a top-level `cluster:`"), "{}", error.message);
        let cluster = "cluster: { redis: \"redis://127.0.0.1:6379/0\" }\n";
        let error = first_error(&config(cluster, ""));
        assert!(error.message.contains("no backend of `bots` has max_concurrency"), "{}", error.message);
        let parsed = parse(&config(cluster, ", max_concurrency: 1"), "t.yaml").unwrap();
        let shared = parsed.cluster.unwrap();
        assert_eq!((shared.lease, shared.key_prefix.as_str()), (ClusterConfig::DEFAULT_LEASE, "switchyard:"));
        assert_eq!(shared.on_unavailable, OnUnavailable::Local);
        assert_eq!(parsed.upstreams[0].max_concurrency_scope, ConcurrencyScope::Cluster);
    }

    #[test]
    fn tracing_takes_a_collector_base_url_a_ratio_in_range_and_a_name() {
        let config = |tracing: &str| {
            format!("listeners: [{{bind: \"127.0.0.1:0\"}}]\ntracing: {tracing}\nroutes: [{{upstream: a}}]\nupstreams:\n  a: {{ backends: [{{address: \"x:1\"}}] }}\n")
        };
        let parsed = parse(&config("{ otlp_endpoint: \"http://collector:4318\" }"), "t.yaml").unwrap();
        let tracing = parsed.tracing.unwrap();
        assert_eq!(tracing.otlp_endpoint, "http://collector:4318/v1/traces");
        assert_eq!((tracing.sample_ratio, tracing.service_name.as_str()), (1.0, "switchyard"));
        let given = parse(&config("{ otlp_endpoint: \"http://c:4318/otlp/v1/traces\" }"), "t.yaml").unwrap();
        assert_eq!(given.tracing.unwrap().otlp_endpoint, "http://c:4318/otlp/v1/traces", "a full URL is kept");
        let slash = parse(&config("{ otlp_endpoint: \"http://c:4318/v1/traces/\" }"), "t.yaml").unwrap();
        assert_eq!(slash.tracing.unwrap().otlp_endpoint, "http://c:4318/v1/traces", "without its final slash");
        for (bad, column, says) in [
            ("{ otlp_endpoint: \"https://c:4318\" }", 27, "http:// URL"),
            ("{ otlp_endpoint: \"c:4318\" }", 27, "http:// URL"),
            ("{ otlp_endpoint: \"http://c:4318\", sample_ratio: 1.5 }", 58, "between 0 and 1"),
            ("{ sample_ratio: 0.5 }", 10, "needs `otlp_endpoint`"),
            ("{ otlp_endpoint: \"http://c:4318\", service_name: \" \" }", 58, "must not be empty"),
        ] {
            let error = first_error(&config(bad));
            assert_eq!((error.line, error.column), (2, column), "{bad}: {}", error.message);
            assert!(error.message.contains(says), "{bad}: {}", error.message);
        }
    }

    #[test]
    fn a_rate_limit_needs_requests_whole_seconds_and_a_burst() {
        let config = |limit: &str| {
            format!("listeners: [{{bind: \"127.0.0.1:0\"}}]\nroutes:\n  - {{ upstream: a, rate_limit: {limit} }}\nupstreams:\n  a: {{ backends: [{{address: \"x:1\"}}] }}\n")
        };
        let parsed = parse(&config("{ requests: 50 }"), "t.yaml").unwrap();
        let limit = parsed.routes[0].rate_limit.clone().unwrap();
        assert_eq!(
            (limit.requests, limit.per, limit.burst, limit.key),
            (50, Duration::from_secs(1), 50, RateLimitKey::Request(KeySpec::ClientIp))
        );
        for (bad, says) in [
            ("{ per: 1s }", "needs `requests`"),
            ("{ requests: 0 }", "at least 1"),
            ("{ requests: 5, per: 500ms }", "whole seconds"),
            ("{ requests: 5, per: 1500ms }", "whole seconds"),
            ("{ requests: 5, burst: 0 }", "burst must be at least 1"),
            ("{ requests: 2000000000 }", "out of range"),
            ("{ requests: 1, per: 1h, burst: 6000000 }", "out of range"),
        ] {
            let error = first_error(&config(bad));
            assert_eq!(error.line, 3, "{bad}: {}", error.message);
            assert!(error.message.contains(says), "{bad}: {}", error.message);
        }
    }

    #[test]
    fn a_cluster_url_is_checked_and_never_repeated() {
        let text = |url: &str, extra: &str| {
            format!("listeners: [{{bind: \"127.0.0.1:0\"}}]\ncluster: {{ redis: \"{url}\"{extra} }}\nroutes: [{{upstream: a}}]\nupstreams:\n  a:\n    backends: [{{address: \"x:1\"}}]\n")
        };
        let error = first_error(&text("http://user:hunter2@cache:6379", ""));
        assert_eq!((error.line, error.column), (2, 19));
        assert!(!error.message.contains("hunter2"), "{}", error.message);
        let error = first_error(&text("redis://cache:6379/0", ", lease: 100ms"));
        assert!(error.message.contains("lease must be between"), "{}", error.message);
        let error = first_error(&text("redis://cache:6379/0", ", key_prefix: \"a{b}\""));
        assert!(error.message.contains("key_prefix"), "{}", error.message);
        let shown = |url: &str| parse(&text(url, ""), "t.yaml").unwrap().cluster.unwrap().redis_shown();
        assert_eq!(shown("redis://user:hunter2@cache:6379/0"), "redis://<redacted>@cache:6379/0");
        assert_eq!(shown("unix:///run/redis.sock?db=1&pass=hunter2"), "unix:///run/redis.sock");
    }
}
