//! Serde types that mirror the YAML file one to one.
//!
//! Every struct denies unknown keys, so a typo is an error rather than a silently
//! ignored setting. Values whose validity depends only on themselves (durations,
//! weights, key specs, bind addresses) are checked while deserializing, so their
//! errors carry the value's own line and column. Values that are checked against
//! other parts of the file are wrapped in [`Spanned`] so that validation can point at
//! them afterwards.

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_saphyr::Spanned;

use super::values::{BindAddr, ByteSize, DurationValue, HeaderName, HostPattern, KeySpec, Method, Weight};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    #[serde(default)]
    pub listeners: Vec<Spanned<RawListener>>,
    #[serde(default)]
    pub admin: RawAdmin,
    #[serde(default)]
    pub log: RawLog,
    #[serde(default)]
    pub limits: RawLimits,
    pub workers: Option<Spanned<u32>>,
    pub resolver: Option<Spanned<RawResolver>>,
    #[serde(default)]
    pub trusted_proxies: Vec<Spanned<String>>,
    #[serde(default)]
    pub paths: RawPaths,
    pub cluster: Option<Spanned<RawCluster>>,
    pub tracing: Option<Spanned<RawTracing>>,
    #[serde(default)]
    pub routes: Vec<Spanned<RawRoute>>,
    #[serde(default)]
    pub upstreams: BTreeMap<String, Spanned<RawUpstream>>,
}

/// `tracing:`: distributed tracing, exported over OTLP.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTracing {
    pub otlp_endpoint: Option<Spanned<String>>,
    pub sample_ratio: Option<Spanned<f64>>,
    pub service_name: Option<Spanned<String>>,
}

/// `cluster:`: the Redis through which replicas share backend slots.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCluster {
    pub redis: Option<Spanned<String>>,
    /// A file holding the Redis password, relative to the config file's directory.
    pub password_file: Option<Spanned<String>>,
    pub key_prefix: Option<Spanned<String>>,
    pub lease: Option<Spanned<DurationValue>>,
    pub on_unavailable: Option<OnUnavailable>,
}

/// What a cluster-scoped pick does while Redis cannot be reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum OnUnavailable {
    /// Each replica enforces `max_concurrency` on its own until Redis is back.
    Local,
    /// 503 `cluster_unavailable`.
    Refuse,
}

/// Where an upstream's `max_concurrency` holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ConcurrencyScope {
    /// In this process: each replica counts its own requests.
    #[default]
    Replica,
    /// Across every replica sharing `cluster:`, through Redis.
    Cluster,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPaths {
    pub merge_slashes: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawListener {
    pub name: Option<Spanned<String>>,
    pub bind: Spanned<BindAddr>,
    pub tls: Option<Spanned<RawListenerTls>>,
    pub proxy_protocol: Option<bool>,
    /// Client addresses (CIDR blocks or IPs) that may use the listener.
    #[serde(default)]
    pub allow: Vec<Spanned<String>>,
    /// Client addresses that may not.
    #[serde(default)]
    pub deny: Vec<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawListenerTls {
    #[serde(default)]
    pub certificates: Vec<Spanned<RawCertificate>>,
    pub alpn: Option<Vec<Spanned<String>>>,
    pub client_auth: Option<Spanned<RawClientAuth>>,
}

/// `tls.client_auth:` of a listener: client certificates, checked against `ca`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawClientAuth {
    pub ca: Option<Spanned<String>>,
    pub mode: Option<ClientAuthMode>,
}

/// Whether a listener's clients must present a certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ClientAuthMode {
    /// The handshake fails without a certificate the CA signed.
    #[default]
    Required,
    /// A client may present none; one it presents must verify. Routes
    /// decide with `auth.client_cert`.
    Optional,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCertificate {
    pub cert: Spanned<String>,
    pub key: Spanned<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAdmin {
    pub bind: Option<Spanned<BindAddr>>,
    pub token: Option<Spanned<String>>,
    /// A file holding the token (a mounted Kubernetes Secret), relative to
    /// the config file's directory.
    pub token_file: Option<Spanned<String>>,
    /// Serve `GET /metrics` without the token, for a scraper that holds none.
    pub metrics_without_token: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLog {
    pub level: Option<LogLevel>,
    pub format: Option<LogFormat>,
    pub access: Option<bool>,
    /// Events go to this file instead of standard error (relative to the
    /// config file's directory); SIGUSR1 reopens it.
    pub file: Option<Spanned<String>>,
    /// Access lines go to this file instead of where events go.
    pub access_file: Option<Spanned<String>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogLevel {
    Error,
    Warn,
    Info,
    Debug,
    Trace,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLimits {
    pub max_header_bytes: Option<Spanned<ByteSize>>,
    pub max_body_bytes: Option<ByteSize>,
    pub header_read_timeout: Option<Spanned<DurationValue>>,
    pub idle_timeout: Option<Spanned<DurationValue>>,
    pub max_connections: Option<Spanned<u32>>,
    pub shutdown_grace: Option<Spanned<DurationValue>>,
    pub connect_timeout: Option<Spanned<DurationValue>>,
    pub client_body_timeout: Option<Spanned<DurationValue>>,
    pub client_send_timeout: Option<Spanned<DurationValue>>,
    pub tunnel_idle_timeout: Option<Spanned<DurationValue>>,
    pub tls_handshake_timeout: Option<Spanned<DurationValue>>,
    pub backend_read_timeout: Option<Spanned<DurationValue>>,
    pub max_concurrent_streams: Option<Spanned<u32>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRoute {
    pub name: Option<Spanned<String>>,
    #[serde(rename = "match", default)]
    pub matcher: RawMatch,
    pub upstream: Spanned<String>,
    pub timeout: Option<Spanned<DurationValue>>,
    pub retry: Option<RawRetry>,
    pub rate_limit: Option<Spanned<RawRateLimit>>,
    pub auth: Option<Spanned<RawAuth>>,
    /// Client addresses (CIDR blocks or IPs) that may use the route.
    #[serde(default)]
    pub allow: Vec<Spanned<String>>,
    /// Client addresses that may not.
    #[serde(default)]
    pub deny: Vec<Spanned<String>>,
}

/// `auth:` of a route: what a request must present; every method listed must pass.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAuth {
    pub client_cert: Option<Spanned<RawClientCert>>,
    pub jwt: Option<Spanned<RawJwt>>,
    pub api_key: Option<Spanned<RawApiKey>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawClientCert {
    /// Names one of which the certificate must carry; none: any certificate
    /// the listener's CA verified.
    #[serde(default)]
    pub sans: Vec<Spanned<String>>,
    pub forward_header: Option<HeaderName>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawJwt {
    pub jwks_file: Option<Spanned<String>>,
    pub jwks_url: Option<Spanned<String>>,
    pub refresh: Option<Spanned<DurationValue>>,
    #[serde(default)]
    pub issuers: Vec<Spanned<String>>,
    #[serde(default)]
    pub audiences: Vec<Spanned<String>>,
    #[serde(default)]
    pub required_claims: Vec<Spanned<String>>,
    /// Claim to the values of it the route accepts (one, or a list).
    #[serde(default)]
    pub claims: BTreeMap<String, Spanned<ClaimValues>>,
    /// Claim name to the header it is forwarded in.
    #[serde(default)]
    pub forward_claims: BTreeMap<String, HeaderName>,
    pub keep_token: Option<bool>,
}

/// A claim's accepted values: `ops`, or `[ops, admin]`.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum ClaimValues {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawApiKey {
    pub file: Spanned<String>,
    pub header: Option<HeaderName>,
    pub forward_header: Option<HeaderName>,
    pub keep_key: Option<bool>,
}

/// `rate_limit:` of a route.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRateLimit {
    pub requests: Option<Spanned<u32>>,
    pub per: Option<Spanned<DurationValue>>,
    pub burst: Option<Spanned<u32>>,
    /// A hash key's syntax (`client_ip`, `header:NAME`, ...) or `claim:NAME`.
    pub key: Option<Spanned<String>>,
    /// Where the buckets are: in this replica, or shared through `cluster:`'s Redis.
    pub scope: Option<Spanned<ConcurrencyScope>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRetry {
    pub attempts: Option<Spanned<u32>>,
    pub per_try_timeout: Option<Spanned<DurationValue>>,
    pub on: Option<Vec<RetryOn>>,
    pub backoff: Option<RawBackoff>,
    pub budget: Option<RawBudget>,
    pub non_idempotent: Option<bool>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum RetryOn {
    ConnectFailure,
    Refused,
    Reset,
    GatewayError,
    Timeout,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawBackoff {
    pub base: Option<Spanned<DurationValue>>,
    pub max: Option<Spanned<DurationValue>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawBudget {
    pub ratio: Option<Spanned<f64>>,
    pub min_per_second: Option<Spanned<u32>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawMatch {
    pub host: Option<HostPattern>,
    pub path_prefix: Option<Spanned<String>>,
    pub methods: Option<Vec<Method>>,
    pub headers: Option<BTreeMap<HeaderName, String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawUpstream {
    #[serde(default)]
    pub balance: RawBalance,
    pub backends: Option<Spanned<Vec<Spanned<RawBackend>>>>,
    pub discovery: Option<Spanned<RawDiscovery>>,
    pub backend_defaults: Option<Spanned<RawBackendDefaults>>,
    #[serde(default)]
    pub protocol: Option<Spanned<UpstreamProtocol>>,
    pub tls: Option<Spanned<RawUpstreamTls>>,
    pub health: Option<RawHealth>,
    pub circuit_breaker: Option<Spanned<RawBreaker>>,
    pub queue: Option<RawQueue>,
    pub max_concurrency_scope: Option<Spanned<ConcurrencyScope>>,
}

/// `resolver:`: the DNS servers `discovery` asks.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawResolver {
    pub servers: Option<Spanned<Vec<Spanned<String>>>>,
}

/// `discovery:` of an upstream: exactly one of `dns` and `srv`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawDiscovery {
    pub dns: Option<Spanned<String>>,
    pub srv: Option<Spanned<String>>,
    pub refresh: Option<Spanned<DurationValue>>,
    pub max_backends: Option<Spanned<u32>>,
    pub allow_link_local: Option<bool>,
}

/// `backend_defaults:`: what each discovered backend gets.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawBackendDefaults {
    pub weight: Option<Weight>,
    pub max_concurrency: Option<Spanned<u32>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawUpstreamTls {
    pub ca: Option<Spanned<String>>,
    pub client_cert: Option<Spanned<String>>,
    pub client_key: Option<Spanned<String>>,
    pub server_name: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawBreaker {
    pub consecutive_failures: Option<Spanned<u32>>,
    pub failure_rate: Option<Spanned<f64>>,
    pub min_requests: Option<Spanned<u32>>,
    pub window: Option<Spanned<DurationValue>>,
    pub open_for: Option<Spanned<DurationValue>>,
    pub half_open_requests: Option<Spanned<u32>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawQueue {
    pub max_waiting: Option<Spanned<u32>>,
    pub timeout: Option<Spanned<DurationValue>>,
    pub priority_header: Option<Spanned<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawHealth {
    pub active: Option<Spanned<RawActiveCheck>>,
    pub passive: Option<RawPassive>,
    pub slow_start: Option<DurationValue>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CheckKind {
    Http,
    Tcp,
    Grpc,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawActiveCheck {
    pub kind: Option<CheckKind>,
    pub path: Option<Spanned<String>>,
    pub expect_status: Option<Spanned<Vec<Spanned<u16>>>>,
    pub host: Option<Spanned<String>>,
    pub expect_body: Option<Spanned<String>>,
    pub service: Option<Spanned<String>>,
    pub interval: Option<Spanned<DurationValue>>,
    pub timeout: Option<Spanned<DurationValue>>,
    pub healthy_after: Option<Spanned<u32>>,
    pub unhealthy_after: Option<Spanned<u32>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPassive {
    pub consecutive_failures: Option<Spanned<u32>>,
    pub ejection_time: Option<Spanned<DurationValue>>,
    pub max_ejection_percent: Option<Spanned<u32>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum UpstreamProtocol {
    Http1,
    H2c,
    H2,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawBalance {
    pub policy: Option<Spanned<PolicyKind>>,
    pub key: Option<Spanned<KeySpec>>,
    pub bounded_load: Option<Spanned<f64>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PolicyKind {
    RoundRobin,
    LeastLoaded,
    ConsistentHash,
    Random,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawBackend {
    pub address: Spanned<String>,
    pub weight: Option<Weight>,
    pub max_concurrency: Option<Spanned<u32>>,
}
