//! Checks that span more than one value (names that must exist or be unique,
//! settings that only make sense together) and turns the raw tree into [`Config`].
//! Every error is collected with its position; nothing stops at the first.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use serde_saphyr::{Location, Spanned};

use super::auth::{ApiKeyConfig, ApiKeys, ClientAuth, ClientCertRule, JwksSource, JwtConfig, KeySet};
use super::raw::{
    CheckKind, ConcurrencyScope, OnUnavailable, PolicyKind, RawAuth, RawBackend, RawBreaker, RawCluster, RawConfig,
    RawDiscovery, RawHealth, RawListenerTls, RawQueue, RawRateLimit, RawResolver, RawRetry, RawRoute, RawTracing,
    RawUpstream, RawUpstreamTls, UpstreamProtocol,
};
use super::tls::{Alpn, Certificate, CertificateError, ListenerTls, UpstreamTls, UpstreamTlsError, UpstreamTlsFiles};
use super::values::DurationValue;
use super::{
    ActiveCheck, AddressRules, AdminConfig, AuthConfig, BackendConfig, BackendDefaults, BreakerConfig, ClusterConfig,
    Config, ConfigError, ConfigErrors, DiscoveryConfig, DiscoverySource, HealthConfig, Limits, ListenerConfig,
    LogConfig, LogFormat, LogLevel, PassiveConfig, PathsConfig, PolicyConfig, Probe, QueueConfig, RateLimitConfig,
    RateLimitKey, ResolverConfig, RetryBackoff, RetryBudget, RetryConfig, RouteConfig, RouteMatch, Secret,
    TracingConfig, UpstreamConfig,
};

/// Shorter admin tokens are too easy to guess.
const MIN_TOKEN_LENGTH: usize = 16;

/// hyper refuses (by panicking) an HTTP/1 read buffer smaller than this, and a
/// request head never fits in less anyway.
const MIN_HEADER_BYTES: u64 = 8192;

struct Collector<'a> {
    file: &'a str,
    errors: Vec<ConfigError>,
}

impl Collector<'_> {
    fn at(&mut self, location: Location, message: impl Into<String>) {
        // Location::UNKNOWN is line 0; the file's start is the honest fallback.
        let line = (location.line() as usize).max(1);
        let column = (location.column() as usize).max(1);
        self.errors.push(ConfigError { file: self.file.to_owned(), line, column, message: message.into() });
    }
}

pub(super) fn validate(raw: RawConfig, file: &str) -> Result<Config, ConfigErrors> {
    let mut errors = Collector { file, errors: Vec::new() };
    let start = Location::UNKNOWN;

    let mut listeners = Vec::new();
    if raw.listeners.is_empty() {
        errors.at(start, "no listeners: add at least one entry under `listeners:` with a `bind` address");
    }
    let mut binds = HashSet::new();
    let mut listener_names = HashSet::new();
    for (index, listener) in raw.listeners.iter().enumerate() {
        let listener = &listener.value;
        let bind = listener.bind.value.0;
        if bind.port() != 0 && !binds.insert(bind) {
            errors.at(listener.bind.referenced, format!("bind `{bind}` is used by another listener"));
        }
        let name = match &listener.name {
            Some(name) => {
                if !listener_names.insert(name.value.clone()) {
                    errors.at(name.referenced, format!("listener name `{}` is used twice", name.value));
                }
                name.value.clone()
            }
            None => format!("listener-{index}"),
        };
        let tls = listener.tls.as_ref().and_then(|tls| validate_listener_tls(tls, file, &mut errors));
        let proxy_protocol = listener.proxy_protocol.unwrap_or(false);
        let access = validate_address_rules(&listener.allow, &listener.deny, &mut errors);
        listeners.push(ListenerConfig { name, bind, tls, proxy_protocol, access });
    }

    let token_text = match (&raw.admin.token, &raw.admin.token_file) {
        (Some(_), Some(path)) => {
            errors.at(path.referenced, "admin has both `token` and `token_file`: give one");
            None
        }
        (Some(token), None) => Some((token.value.clone(), token.referenced)),
        (None, Some(path)) => {
            let full = Path::new(file).parent().unwrap_or(Path::new("")).join(&path.value);
            match std::fs::read_to_string(&full) {
                // A file written by `echo` or a Secret ends in a newline that is not part of the token.
                Ok(text) => Some((text.trim_end_matches(['\n', '\r']).to_owned(), path.referenced)),
                Err(error) => {
                    errors.at(path.referenced, format!("cannot read admin token_file {}: {error}", full.display()));
                    None
                }
            }
        }
        (None, None) => None,
    };
    let token = token_text.and_then(|(token, at)| {
        // The message never repeats the token: error output may end up in logs.
        if token.len() < MIN_TOKEN_LENGTH || token.chars().any(|c| c.is_whitespace() || c.is_control()) {
            errors.at(at, format!("admin token must be at least {MIN_TOKEN_LENGTH} characters without spaces"));
            None
        } else {
            Some(Secret::new(token))
        }
    });
    let metrics_without_token = raw.admin.metrics_without_token.unwrap_or(false);
    let admin = match &raw.admin.bind {
        Some(bind) => {
            let addr = bind.value.0;
            // The admin API can reload the config: other hosts may reach it
            // only with a token.
            if !addr.ip().is_loopback() && raw.admin.token.is_none() && raw.admin.token_file.is_none() {
                errors.at(
                    bind.referenced,
                    format!("admin bind `{addr}` is not a loopback address, so `token` (or `token_file`) is required"),
                );
            }
            if binds.contains(&addr) {
                errors.at(bind.referenced, format!("admin bind `{addr}` is also a listener's bind"));
            }
            AdminConfig { bind: addr, token, metrics_without_token }
        }
        None => AdminConfig {
            bind: AdminConfig::DEFAULT_BIND.parse().expect("valid default"),
            token,
            metrics_without_token,
        },
    };

    let limits = validate_limits(&raw, &mut errors);
    let resolver = validate_resolver(&raw.resolver, &mut errors);
    let trusted_proxies = validate_trusted_proxies(&raw.trusted_proxies, &mut errors);
    let paths = PathsConfig { merge_slashes: raw.paths.merge_slashes.unwrap_or(false) };
    let cluster = raw.cluster.as_ref().and_then(|c| validate_cluster(c, file, &mut errors));
    let tracing = raw.tracing.as_ref().and_then(|t| validate_tracing(t, &mut errors));

    let mut upstreams = Vec::new();
    for (name, upstream) in &raw.upstreams {
        if let Some(upstream) = validate_upstream(name, upstream, file, raw.cluster.is_some(), &mut errors) {
            upstreams.push(upstream);
        }
    }

    if raw.routes.is_empty() {
        errors.at(start, "no routes: add at least one entry under `routes:`");
    }
    let mut routes = Vec::new();
    let mut route_names = HashSet::new();
    for (index, route) in raw.routes.iter().enumerate() {
        routes.push(validate_route(index, route, &raw, &mut route_names, file, &mut errors));
    }

    let log = LogConfig {
        level: raw.log.level.unwrap_or(LogLevel::Info),
        format: raw.log.format.unwrap_or(LogFormat::Text),
        access: raw.log.access.unwrap_or(false),
        file: raw.log.file.as_ref().and_then(|path| log_file(file, path, &mut errors)),
        access_file: raw.log.access_file.as_ref().and_then(|path| log_file(file, path, &mut errors)),
    };

    let workers = match &raw.workers {
        Some(count) if count.value == 0 || count.value > 1024 => {
            errors.at(count.referenced, "workers must be between 1 and 1024 (leave it out for one per core)");
            1
        }
        Some(count) => count.value as usize,
        None => std::thread::available_parallelism().map_or(1, |n| n.get()),
    };

    let warnings = grace_warnings(&raw, &limits, &routes, file);
    if errors.errors.is_empty() {
        Ok(Config {
            warnings,
            listeners,
            admin,
            log,
            limits,
            workers,
            resolver,
            trusted_proxies,
            paths,
            cluster,
            tracing,
            routes,
            upstreams,
        })
    } else {
        errors.errors.sort_by_key(|e| (e.line, e.column));
        Err(ConfigErrors(errors.errors))
    }
}

/// A log file's path, relative to the config file's directory. The file is
/// created when the proxy starts, not by `check`; its directory must exist
/// and be writable by whoever checks (run `check` as the service's user:
/// the systemd unit's `ExecStartPre` does, inside its sandbox).
fn log_file(file: &str, path: &Spanned<String>, errors: &mut Collector<'_>) -> Option<std::path::PathBuf> {
    let full = Path::new(file).parent().unwrap_or(Path::new("")).join(&path.value);
    let full = std::path::absolute(&full).unwrap_or(full);
    match full.parent() {
        _ if path.value.is_empty() || path.value.ends_with('/') => {
            errors.at(path.referenced, "a log file needs a file name");
            None
        }
        Some(directory) if !directory.is_dir() => {
            errors.at(path.referenced, format!("the log file's directory {} does not exist", directory.display()));
            None
        }
        Some(directory) if !writable(directory) => {
            let error = std::io::Error::last_os_error();
            errors.at(
                path.referenced,
                format!("cannot write in the log file's directory {}: {error}", directory.display()),
            );
            None
        }
        _ => Some(full),
    }
}

/// Whether this process may create files in `directory` (a read-only mount
/// counts: access(2) answers EROFS).
fn writable(directory: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let Ok(path) = std::ffi::CString::new(directory.as_os_str().as_bytes()) else { return false };
    // SAFETY: `path` is a NUL-terminated string that outlives the call.
    unsafe { libc::access(path.as_ptr(), libc::W_OK | libc::X_OK) == 0 }
}

/// Reads and checks a listener's certificates; paths are relative to the
/// config file's directory.
fn validate_listener_tls(raw: &Spanned<RawListenerTls>, file: &str, errors: &mut Collector<'_>) -> Option<ListenerTls> {
    let base = Path::new(file).parent().unwrap_or(Path::new(""));
    if raw.value.certificates.is_empty() {
        errors.at(raw.referenced, "tls needs at least one entry under `certificates` (cert and key)");
    }
    let mut certificates = Vec::new();
    let now = std::time::SystemTime::now();
    for entry in &raw.value.certificates {
        let (cert, key) = (&entry.value.cert, &entry.value.key);
        match Certificate::load(&base.join(&cert.value), &base.join(&key.value), now) {
            Ok(certificate) => certificates.push(certificate),
            Err(CertificateError::Cert(message)) => errors.at(cert.referenced, message),
            Err(CertificateError::Key(message)) => errors.at(key.referenced, message),
        }
    }
    let mut alpn = Vec::new();
    match &raw.value.alpn {
        None => alpn.extend([Alpn::H2, Alpn::Http11]),
        Some(list) => {
            if list.is_empty() {
                errors.at(raw.referenced, "alpn cannot be empty: list h2, http/1.1 or both");
            }
            for protocol in list {
                match Alpn::parse(&protocol.value) {
                    Some(parsed) if !alpn.contains(&parsed) => alpn.push(parsed),
                    Some(_) => errors.at(protocol.referenced, format!("alpn lists `{}` twice", protocol.value)),
                    None => errors.at(
                        protocol.referenced,
                        format!("unknown ALPN protocol `{}`: use h2 or http/1.1", protocol.value),
                    ),
                }
            }
        }
    }
    let client_auth = raw.value.client_auth.as_ref().and_then(|auth| {
        let Some(ca) = &auth.value.ca else {
            errors.at(auth.referenced, "client_auth needs `ca`: the CA bundle client certificates must chain to");
            return None;
        };
        let mode = auth.value.mode.unwrap_or_default();
        ClientAuth::load(&base.join(&ca.value), mode).map_err(|message| errors.at(ca.referenced, message)).ok()
    });
    let client_auth_ok = raw.value.client_auth.is_none() || client_auth.is_some();
    (certificates.len() == raw.value.certificates.len() && !certificates.is_empty() && client_auth_ok)
        .then_some(ListenerTls { certificates, alpn, client_auth })
}

/// A route whose `timeout` is longer than `shutdown_grace`: a shutdown, a
/// rollout or an upgrade cuts its longer jobs. Not an error (short jobs may
/// be all the route sees), but said, at the route's timeout, naming both.
fn grace_warnings(raw: &RawConfig, limits: &Limits, routes: &[RouteConfig], file: &str) -> Vec<ConfigError> {
    let mut warnings = Collector { file, errors: Vec::new() };
    let grace = crate::text::duration(limits.shutdown_grace);
    let grace_at = match &raw.limits.shutdown_grace {
        Some(spanned) => format!("limits.shutdown_grace {grace} (line {})", spanned.referenced.line()),
        None => format!("limits.shutdown_grace, {grace} by default,"),
    };
    for (raw_route, route) in raw.routes.iter().zip(routes) {
        let Some(timeout) = raw_route.value.timeout.as_ref().filter(|_| route.timeout > limits.shutdown_grace) else {
            continue;
        };
        warnings.at(
            timeout.referenced,
            format!(
                "warning: route `{}` waits up to {} for a job, but {grace_at} is shorter: a shutdown, rollout or \
                 upgrade cuts jobs longer than that (raise shutdown_grace, and a Kubernetes pod's \
                 terminationGracePeriodSeconds with it)",
                route.name,
                crate::text::duration(route.timeout)
            ),
        );
    }
    warnings.errors
}

fn validate_limits(raw: &RawConfig, errors: &mut Collector<'_>) -> Limits {
    let defaults = Limits::default();
    let raw = &raw.limits;
    let mut limits = Limits {
        max_body_bytes: raw.max_body_bytes.map_or(defaults.max_body_bytes, |b| b.0),
        header_read_timeout: duration(
            &raw.header_read_timeout,
            "header_read_timeout",
            defaults.header_read_timeout,
            errors,
        ),
        // Zero would spin the accept loop's idle tick.
        idle_timeout: duration(&raw.idle_timeout, "idle_timeout", defaults.idle_timeout, errors),
        shutdown_grace: raw.shutdown_grace.as_ref().map_or(defaults.shutdown_grace, |d| d.value.0),
        connect_timeout: duration(&raw.connect_timeout, "connect_timeout", defaults.connect_timeout, errors),
        client_body_timeout: duration(
            &raw.client_body_timeout,
            "client_body_timeout",
            defaults.client_body_timeout,
            errors,
        ),
        client_send_timeout: duration(
            &raw.client_send_timeout,
            "client_send_timeout",
            defaults.client_send_timeout,
            errors,
        ),
        tunnel_idle_timeout: duration(
            &raw.tunnel_idle_timeout,
            "tunnel_idle_timeout",
            defaults.tunnel_idle_timeout,
            errors,
        ),
        tls_handshake_timeout: duration(
            &raw.tls_handshake_timeout,
            "tls_handshake_timeout",
            defaults.tls_handshake_timeout,
            errors,
        ),
        backend_read_timeout: duration(
            &raw.backend_read_timeout,
            "backend_read_timeout",
            defaults.backend_read_timeout,
            errors,
        ),
        ..defaults
    };
    if let Some(bytes) = &raw.max_header_bytes {
        if bytes.value.0 < MIN_HEADER_BYTES {
            errors.at(bytes.referenced, format!("max_header_bytes must be at least {MIN_HEADER_BYTES}"));
        } else {
            limits.max_header_bytes = usize::try_from(bytes.value.0).unwrap_or(usize::MAX);
        }
    }
    if let Some(count) = &raw.max_connections {
        if count.value == 0 {
            errors.at(count.referenced, "max_connections must be at least 1");
        } else {
            limits.max_connections = count.value as usize;
        }
    }
    if let Some(count) = &raw.max_concurrent_streams {
        if count.value == 0 {
            errors.at(count.referenced, "max_concurrent_streams must be at least 1");
        } else {
            limits.max_concurrent_streams = count.value;
        }
    }
    limits
}

fn validate_route(
    index: usize,
    route: &Spanned<RawRoute>,
    raw: &RawConfig,
    names: &mut HashSet<String>,
    file: &str,
    errors: &mut Collector<'_>,
) -> RouteConfig {
    let location = route.referenced;
    let route = &route.value;
    let name = match &route.name {
        Some(name) if name.value.is_empty() => {
            errors.at(name.referenced, "route name cannot be empty");
            name.value.clone()
        }
        Some(name) => name.value.clone(),
        None => format!("route-{index}"),
    };
    if !names.insert(name.clone()) {
        let at = route.name.as_ref().map_or(location, |n| n.referenced);
        errors.at(at, format!("route name `{name}` is used twice"));
    }
    let upstream = &route.upstream;
    if !raw.upstreams.contains_key(&upstream.value) {
        let known: Vec<&str> = raw.upstreams.keys().map(String::as_str).collect();
        errors.at(
            upstream.referenced,
            format!("unknown upstream `{}` (defined: {})", upstream.value, list_or_none(&known)),
        );
    }
    let path_prefix = match &route.matcher.path_prefix {
        Some(prefix) if !prefix.value.starts_with('/') => {
            errors.at(prefix.referenced, format!("path_prefix `{}` must start with `/`", prefix.value));
            prefix.value.clone()
        }
        Some(prefix) => prefix.value.clone(),
        None => "/".to_owned(),
    };
    let mut headers = Vec::new();
    for (header, value) in route.matcher.headers.iter().flatten() {
        match http::HeaderValue::from_str(value) {
            Ok(value) => headers.push((http::HeaderName::from_bytes(header.0.as_bytes()).expect("validated"), value)),
            Err(_) => errors.at(location, format!("header `{header}`: `{value}` is not a valid header value")),
        }
    }
    RouteConfig {
        name,
        matcher: RouteMatch {
            host: route.matcher.host.clone(),
            path_prefix,
            methods: route.matcher.methods.iter().flatten().map(|m| m.0.clone()).collect(),
            headers,
        },
        upstream: upstream.value.clone(),
        timeout: duration(&route.timeout, "route timeout", RouteConfig::DEFAULT_TIMEOUT, errors),
        retry: route.retry.as_ref().map(|r| validate_retry(r, errors)),
        access: validate_address_rules(&route.allow, &route.deny, errors),
        auth: route.auth.as_ref().map(|a| validate_auth(a, file, raw, errors)).unwrap_or_default(),
        rate_limit: route
            .rate_limit
            .as_ref()
            .and_then(|r| validate_rate_limit(r, route.auth.as_ref(), raw.cluster.is_some(), errors)),
    }
}

/// How often a `jwks_url` is fetched when `refresh` is not set.
const DEFAULT_JWKS_REFRESH: Duration = Duration::from_secs(300);

/// `auth:` of a route; files are relative to the config file's directory.
fn validate_auth(raw: &Spanned<RawAuth>, file: &str, config: &RawConfig, errors: &mut Collector<'_>) -> AuthConfig {
    let base = Path::new(file).parent().unwrap_or(Path::new(""));
    let auth = &raw.value;
    if auth.client_cert.is_none() && auth.jwt.is_none() && auth.api_key.is_none() {
        errors.at(raw.referenced, "auth needs at least one of client_cert, jwt, api_key");
    }
    let client_cert = auth.client_cert.as_ref().map(|rule| {
        let verifying =
            config.listeners.iter().any(|l| l.value.tls.as_ref().is_some_and(|tls| tls.value.client_auth.is_some()));
        if !verifying {
            errors.at(
                rule.referenced,
                "auth.client_cert needs a listener with `tls.client_auth` (no listener asks clients for a certificate)",
            );
        }
        let mut sans = Vec::new();
        for name in &rule.value.sans {
            if name.value.is_empty() || name.value.strip_prefix("*.").unwrap_or(&name.value).contains('*') {
                errors.at(name.referenced, "a san is a name, or `*.` and a name");
            }
            sans.push(name.value.to_ascii_lowercase());
        }
        ClientCertRule { sans, forward_header: rule.value.forward_header.as_ref().map(header_name) }
    });
    let jwt = auth.jwt.as_ref().and_then(|jwt| {
        let at = jwt.referenced;
        let jwt = &jwt.value;
        let keys = match (&jwt.jwks_file, &jwt.jwks_url) {
            (Some(path), None) => {
                if jwt.refresh.is_some() {
                    errors.at(at, "refresh is for jwks_url: a jwks_file is read again on reload");
                }
                let full = base.join(&path.value);
                match std::fs::read(&full)
                    .map_err(|e| format!("cannot read {}: {e}", full.display()))
                    .and_then(|d| KeySet::parse(&d).map_err(|why| format!("jwks_file {} {why}", full.display())))
                {
                    Ok(keys) => JwksSource::File { path: full, keys: Arc::new(keys) },
                    Err(message) => {
                        errors.at(path.referenced, message);
                        return None;
                    }
                }
            }
            (None, Some(url)) => {
                match url.value.parse::<http::Uri>() {
                    Ok(uri) if uri.scheme_str() == Some("http") && !uri.host().is_some_and(is_loopback_host) => {
                        errors.at(
                            url.referenced,
                            "jwks_url must be https:// (http:// only to a loopback address): a key set fetched in the clear can be replaced on the way",
                        );
                        return None;
                    }
                    Ok(uri) if matches!(uri.scheme_str(), Some("http" | "https")) && uri.host().is_some() => {}
                    _ => {
                        errors
                            .at(url.referenced, format!("jwks_url `{}` is not an http:// or https:// URL", url.value));
                        return None;
                    }
                }
                let refresh = match &jwt.refresh {
                    Some(refresh) if refresh.value.0 < Duration::from_secs(1) => {
                        errors.at(refresh.referenced, "refresh must be at least 1s");
                        return None;
                    }
                    Some(refresh) => refresh.value.0,
                    None => DEFAULT_JWKS_REFRESH,
                };
                JwksSource::Url { url: url.value.clone(), refresh }
            }
            _ => {
                errors.at(at, "jwt needs exactly one of jwks_file, jwks_url");
                return None;
            }
        };
        let texts = |list: &[Spanned<String>]| list.iter().map(|item| item.value.clone()).collect::<Vec<_>>();
        let mut claims = Vec::new();
        for (claim, values) in &jwt.claims {
            let values = match &values.value {
                super::raw::ClaimValues::One(value) => vec![value.clone()],
                super::raw::ClaimValues::Many(list) if list.is_empty() => {
                    errors.at(values.referenced, format!("claims: `{claim}` lists no value it accepts"));
                    return None;
                }
                super::raw::ClaimValues::Many(list) => list.clone(),
            };
            claims.push((claim.clone(), values));
        }
        Some(JwtConfig {
            keys,
            issuers: texts(&jwt.issuers),
            audiences: texts(&jwt.audiences),
            required_claims: texts(&jwt.required_claims),
            claims,
            forward_claims: jwt.forward_claims.iter().map(|(claim, name)| (claim.clone(), header_name(name))).collect(),
            keep_token: jwt.keep_token.unwrap_or(false),
        })
    });
    let api_key = auth.api_key.as_ref().and_then(|api_key| {
        let api_key = &api_key.value;
        let path = base.join(&api_key.file.value);
        match ApiKeys::load(&path) {
            Ok(keys) => Some(ApiKeyConfig {
                file: path,
                keys: Arc::new(keys),
                header: api_key.header.as_ref().map_or(http::HeaderName::from_static("x-api-key"), header_name),
                forward_header: api_key.forward_header.as_ref().map(header_name),
                keep_key: api_key.keep_key.unwrap_or(false),
            }),
            Err(message) => {
                errors.at(api_key.file.referenced, message);
                None
            }
        }
    });
    let auth = AuthConfig { client_cert, jwt, api_key };
    check_forwarded_headers(&auth, raw.referenced, errors);
    auth
}

/// Headers a route may not set from a credential: framing, routing and
/// forwarding headers, and the credentials' own.
const RESERVED_HEADERS: &[&str] = &[
    "authorization",
    "connection",
    "content-length",
    "cookie",
    "forwarded",
    "host",
    "keep-alive",
    "proxy-authorization",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "x-forwarded-for",
    "x-forwarded-host",
    "x-forwarded-proto",
    "x-real-ip",
];

/// Each forwarded header is named once, and none is reserved or a credential's.
fn check_forwarded_headers(auth: &AuthConfig, at: Location, errors: &mut Collector<'_>) {
    let names: Vec<&http::HeaderName> = auth.forwarded_headers().collect();
    let credential = auth.api_key.as_ref().map(|api_key| &api_key.header);
    for (index, name) in names.iter().enumerate() {
        let text = name.as_str();
        if RESERVED_HEADERS.contains(&text) || Some(*name) == credential || text.starts_with(':') {
            errors
                .at(at, format!("auth cannot forward into `{text}`: it is a framing, forwarding or credential header"));
        } else if names[..index].contains(name) {
            errors.at(at, format!("auth forwards two things into `{text}`"));
        }
    }
}

fn is_loopback_host(host: &str) -> bool {
    host.eq_ignore_ascii_case("localhost")
        || host.trim_matches(['[', ']']).parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// A name `values::HeaderName` already checked.
fn header_name(name: &super::values::HeaderName) -> http::HeaderName {
    http::HeaderName::from_bytes(name.0.as_bytes()).expect("checked when read")
}

/// `rate_limit:` of a route: at least one request, per whole seconds (the
/// `RateLimit-Policy` header states the window in seconds), a burst of at
/// least one (one period's worth when not given).
fn validate_rate_limit(
    raw: &Spanned<RawRateLimit>,
    auth: Option<&Spanned<RawAuth>>,
    has_cluster: bool,
    errors: &mut Collector<'_>,
) -> Option<RateLimitConfig> {
    let limit = &raw.value;
    let Some(requests) = &limit.requests else {
        errors.at(raw.referenced, "rate_limit needs `requests`, e.g. { requests: 100, per: 1s }");
        return None;
    };
    if requests.value == 0 {
        errors.at(requests.referenced, "rate_limit requests must be at least 1");
        return None;
    }
    let per = match &limit.per {
        Some(per) if per.value.0 < Duration::from_secs(1) || per.value.0.subsec_nanos() != 0 => {
            errors.at(per.referenced, "rate_limit per must be whole seconds, at least 1s (1s, 1m, 1h)");
            return None;
        }
        Some(per) => per.value.0,
        None => Duration::from_secs(1),
    };
    let burst = match &limit.burst {
        Some(burst) if burst.value == 0 => {
            errors.at(burst.referenced, "rate_limit burst must be at least 1");
            return None;
        }
        Some(burst) => burst.value,
        None => requests.value,
    };
    // governor's arithmetic: a token at least every nanosecond, and the
    // bucket's size in nanoseconds within 64 bits.
    let interval = per.as_nanos() / u128::from(requests.value);
    if interval == 0 || interval.checked_mul(u128::from(burst)).is_none_or(|size| size > u128::from(u64::MAX)) {
        errors.at(
            raw.referenced,
            "rate_limit is out of range: at most one request a nanosecond, and burst x per/requests under 500 years",
        );
        return None;
    }
    let key = match &limit.key {
        None => RateLimitKey::Request(super::KeySpec::ClientIp),
        Some(key) => match key.value.strip_prefix("claim:") {
            Some(claim) => {
                if claim.is_empty() {
                    errors.at(key.referenced, "key `claim:` names no claim");
                    return None;
                }
                if auth.is_none_or(|auth| auth.value.jwt.is_none()) {
                    errors.at(key.referenced, format!("key `{}` needs the route's `auth.jwt`", key.value));
                    return None;
                }
                RateLimitKey::Claim(claim.to_owned())
            }
            None => match key.value.parse() {
                Ok(spec) => RateLimitKey::Request(spec),
                Err(message) => {
                    errors.at(key.referenced, format!("{message}, claim:NAME"));
                    return None;
                }
            },
        },
    };
    let scope = limit.scope.as_ref().map_or(ConcurrencyScope::Replica, |scope| scope.value);
    if let Some(scope) = limit.scope.as_ref().filter(|scope| scope.value == ConcurrencyScope::Cluster) {
        if !has_cluster {
            errors.at(scope.referenced, "rate_limit scope: cluster needs `cluster:` (the Redis the replicas share)");
            return None;
        }
        // Redis keeps the bucket in microseconds.
        if interval < 1000 {
            errors.at(scope.referenced, "a cluster rate_limit allows at most one request a microsecond");
            return None;
        }
        // Each key is a key in the Redis that also holds the slots: one the
        // client makes up (a header's value) would let it fill that Redis.
        if !matches!(key, RateLimitKey::Request(super::KeySpec::ClientIp) | RateLimitKey::Claim(_)) {
            errors.at(
                scope.referenced,
                format!(
                    "a cluster rate_limit is keyed by client_ip or claim:NAME, not `{key}`: a key the client makes up would let it fill the shared Redis"
                ),
            );
            return None;
        }
    }
    Some(RateLimitConfig { requests: requests.value, per, burst, key, scope })
}

fn validate_upstream(
    name: &str,
    upstream: &Spanned<RawUpstream>,
    file: &str,
    has_cluster: bool,
    errors: &mut Collector<'_>,
) -> Option<UpstreamConfig> {
    let location = upstream.referenced;
    let upstream = &upstream.value;
    let before = errors.errors.len();

    let mut seen: HashMap<&str, Location> = HashMap::new();
    let mut backends = Vec::new();
    match (&upstream.backends, &upstream.discovery) {
        (Some(_), Some(discovery)) => errors.at(
            discovery.referenced,
            format!("upstream `{name}` has both `backends` and `discovery`: its backends come from one of them"),
        ),
        (None, None) => {
            errors.at(location, format!("upstream `{name}` has no backends: list `backends` or set `discovery`"))
        }
        (Some(listed), None) if listed.value.is_empty() => {
            errors.at(listed.referenced, format!("upstream `{name}` has no backends"))
        }
        (Some(listed), None) => {
            for backend in &listed.value {
                if let Some(backend) = validate_backend(backend, &mut seen, errors) {
                    backends.push(backend);
                }
            }
        }
        (None, Some(_)) => {}
    }
    if let (Some(defaults), None) = (&upstream.backend_defaults, &upstream.discovery) {
        errors.at(
            defaults.referenced,
            "`backend_defaults` applies to discovered backends; set weight and max_concurrency on each listed backend",
        );
    }
    let discovery = upstream.discovery.as_ref().and_then(|d| validate_discovery(d, upstream, errors));

    let protocol = upstream.protocol.as_ref().map_or(UpstreamProtocol::Http1, |p| p.value);
    let protocol_location = upstream.protocol.as_ref().map_or(location, |p| p.referenced);
    let tls = match (&upstream.tls, protocol) {
        (None, UpstreamProtocol::H2) => {
            errors.at(protocol_location, "protocol `h2` is HTTP/2 over TLS: add `tls:` (or use `h2c` without TLS)");
            None
        }
        (Some(tls), UpstreamProtocol::H2c) => {
            errors.at(
                tls.referenced,
                "`tls` with protocol `h2c` (HTTP/2 without TLS): use protocol `h2` for HTTP/2 over TLS",
            );
            None
        }
        (Some(tls), _) => validate_upstream_tls(tls, protocol, file, errors),
        (None, _) => None,
    };

    let balance = &upstream.balance;
    let kind = balance.policy.as_ref().map_or(PolicyKind::RoundRobin, |p| p.value);
    let policy_location = balance.policy.as_ref().map_or(location, |p| p.referenced);
    if kind != PolicyKind::ConsistentHash {
        if let Some(key) = &balance.key {
            errors.at(key.referenced, "`key` only applies to policy `consistent_hash`");
        }
        if let Some(bound) = &balance.bounded_load {
            errors.at(bound.referenced, "`bounded_load` only applies to policy `consistent_hash`");
        }
    }
    if let Some(bound) = &balance.bounded_load {
        // At or below 1.0 no backend could ever take a request above the mean.
        if !(bound.value > 1.0 && bound.value.is_finite()) {
            errors.at(bound.referenced, format!("bounded_load must be greater than 1.0, got {}", bound.value));
        }
    }
    let policy = match kind {
        PolicyKind::RoundRobin => PolicyConfig::RoundRobin,
        PolicyKind::LeastLoaded => PolicyConfig::LeastLoaded,
        PolicyKind::Random => PolicyConfig::Random,
        PolicyKind::ConsistentHash => match &balance.key {
            Some(key) => PolicyConfig::ConsistentHash {
                key: key.value.clone(),
                bounded_load: balance.bounded_load.as_ref().map(|b| b.value),
            },
            None => {
                errors.at(policy_location, "policy `consistent_hash` needs a `key` (e.g. `header:x-job-id`)");
                PolicyConfig::RoundRobin
            }
        },
    };

    let health = upstream.health.as_ref().map(|h| validate_health(h, errors)).unwrap_or_default();
    let circuit_breaker = upstream.circuit_breaker.as_ref().map(|b| validate_breaker(b, errors));
    let queue = upstream.queue.as_ref().map(|q| validate_queue(q, errors));
    let max_concurrency_scope = upstream.max_concurrency_scope.as_ref().map_or(ConcurrencyScope::Replica, |s| s.value);
    if let Some(scope) = upstream.max_concurrency_scope.as_ref().filter(|s| s.value == ConcurrencyScope::Cluster) {
        let limited = backends.iter().any(|b| b.max_concurrency.is_some())
            || discovery.as_ref().is_some_and(|d| d.defaults.max_concurrency.is_some());
        if !has_cluster {
            errors
                .at(scope.referenced, "max_concurrency_scope `cluster` needs a top-level `cluster:` naming the Redis");
        } else if !limited {
            errors.at(
                scope.referenced,
                format!("max_concurrency_scope `cluster`, but no backend of `{name}` has max_concurrency to share"),
            );
        }
    }

    (errors.errors.len() == before).then(|| UpstreamConfig {
        name: name.to_owned(),
        policy,
        backends,
        discovery,
        protocol,
        tls,
        health,
        circuit_breaker,
        queue,
        max_concurrency_scope,
    })
}

/// `tracing:`: an http:// collector URL, a ratio in [0, 1], a service name.
fn validate_tracing(raw: &Spanned<RawTracing>, errors: &mut Collector<'_>) -> Option<TracingConfig> {
    let before = errors.errors.len();
    let tracing = &raw.value;
    let Some(endpoint) = &tracing.otlp_endpoint else {
        errors.at(
            raw.referenced,
            "tracing needs `otlp_endpoint`, the collector's OTLP/HTTP URL, e.g. \"http://127.0.0.1:4318\"",
        );
        return None;
    };
    let otlp_endpoint = match endpoint.value.parse::<http::Uri>() {
        Ok(uri) if uri.scheme_str() == Some("http") && uri.host().is_some() && uri.query().is_none() => {
            let path = uri.path().trim_end_matches('/');
            let signal = if path.ends_with("/v1/traces") { "" } else { "/v1/traces" };
            format!("http://{}{path}{signal}", uri.authority().expect("a host"))
        }
        _ => {
            errors.at(
                endpoint.referenced,
                "tracing otlp_endpoint must be an http:// URL with a host and no query, e.g. \"http://127.0.0.1:4318\"",
            );
            String::new()
        }
    };
    let sample_ratio = match &tracing.sample_ratio {
        Some(ratio) if !(0.0..=1.0).contains(&ratio.value) => {
            errors
                .at(ratio.referenced, "tracing sample_ratio must be between 0 and 1 (0.01 traces one request in 100)");
            0.0
        }
        Some(ratio) => ratio.value,
        None => TracingConfig::DEFAULT_SAMPLE_RATIO,
    };
    let service_name = match &tracing.service_name {
        Some(name) if name.value.trim().is_empty() => {
            errors.at(name.referenced, "tracing service_name must not be empty");
            String::new()
        }
        Some(name) => name.value.clone(),
        None => TracingConfig::DEFAULT_SERVICE_NAME.to_owned(),
    };
    (errors.errors.len() == before).then_some(TracingConfig { otlp_endpoint, sample_ratio, service_name })
}

/// `cluster:`: a Redis URL the client accepts, a password from a file when
/// the URL has none, a prefix and a lease in range.
fn validate_cluster(raw: &Spanned<RawCluster>, file: &str, errors: &mut Collector<'_>) -> Option<ClusterConfig> {
    let before = errors.errors.len();
    let cluster = &raw.value;
    let Some(redis) = &cluster.redis else {
        errors.at(raw.referenced, "cluster needs `redis`, e.g. \"redis://127.0.0.1:6379/0\"");
        return None;
    };
    // The message never repeats the URL: it may carry a password.
    let scheme_ok = ["redis://", "rediss://", "redis+unix://", "unix://"].iter().any(|s| redis.value.starts_with(s));
    if !scheme_ok {
        errors.at(redis.referenced, "cluster redis must be a redis://, rediss:// or unix:// URL");
    } else if redis::Client::open(redis.value.as_str()).is_err() {
        errors.at(redis.referenced, "cluster redis is not a usable URL (host, port, database number?)");
    }
    let password = cluster.password_file.as_ref().and_then(|path| {
        let full = Path::new(file).parent().unwrap_or(Path::new("")).join(&path.value);
        match std::fs::read_to_string(&full) {
            Ok(text) => Some(Secret::new(text.trim_end_matches(['\n', '\r']).to_owned())),
            Err(error) => {
                errors.at(path.referenced, format!("cannot read cluster password_file {}: {error}", full.display()));
                None
            }
        }
    });
    let key_prefix = cluster.key_prefix.as_ref().map_or(ClusterConfig::DEFAULT_KEY_PREFIX.to_owned(), |prefix| {
        // Braces would change which Redis Cluster slot the keys hash to.
        if prefix.value.is_empty() || prefix.value.contains(['{', '}', ' ', '*', '?', '[', ']']) {
            errors.at(prefix.referenced, "cluster key_prefix must be non-empty, without spaces, braces or * ? [ ]");
        }
        prefix.value.clone()
    });
    let lease = match &cluster.lease {
        Some(lease) if lease.value.0 < ClusterConfig::MIN_LEASE || lease.value.0 > ClusterConfig::MAX_LEASE => {
            errors.at(lease.referenced, "cluster lease must be between 1s and 10m");
            ClusterConfig::DEFAULT_LEASE
        }
        Some(lease) => lease.value.0,
        None => ClusterConfig::DEFAULT_LEASE,
    };
    (errors.errors.len() == before).then(|| ClusterConfig {
        redis: Secret::new(redis.value.clone()),
        password,
        key_prefix,
        lease,
        on_unavailable: cluster.on_unavailable.unwrap_or(OnUnavailable::Local),
    })
}

fn validate_discovery(
    raw: &Spanned<RawDiscovery>,
    upstream: &RawUpstream,
    errors: &mut Collector<'_>,
) -> Option<DiscoveryConfig> {
    let before = errors.errors.len();
    let source = match (&raw.value.dns, &raw.value.srv) {
        (Some(dns), None) => match dns.value.rsplit_once(':') {
            Some((name, port)) => {
                let port = port.parse::<u16>().ok().filter(|p| *p != 0);
                if port.is_none() {
                    errors
                        .at(dns.referenced, format!("dns `{}` needs a port from 1 to 65535 after the name", dns.value));
                }
                if let Err(message) = check_dns_name(name) {
                    errors.at(dns.referenced, message);
                }
                DiscoverySource::Dns { name: name.to_owned(), port: port.unwrap_or(1) }
            }
            None => {
                errors
                    .at(dns.referenced, format!("dns `{}` is not NAME:PORT (A/AAAA records carry no port)", dns.value));
                return None;
            }
        },
        (None, Some(srv)) => {
            if let Err(message) = check_dns_name(&srv.value) {
                errors.at(srv.referenced, message);
            }
            DiscoverySource::Srv { name: srv.value.clone() }
        }
        _ => {
            errors.at(raw.referenced, "discovery needs exactly one of `dns: NAME:PORT` and `srv: NAME`");
            return None;
        }
    };
    let refresh = duration(&raw.value.refresh, "refresh", DiscoveryConfig::DEFAULT_REFRESH, errors);
    if refresh < DiscoveryConfig::MIN_REFRESH {
        let at = raw.value.refresh.as_ref().map_or(raw.referenced, |r| r.referenced);
        errors.at(at, format!("refresh must be at least {:?}", DiscoveryConfig::MIN_REFRESH));
    }
    let defaults = match &upstream.backend_defaults {
        Some(defaults) => {
            let max_concurrency = defaults.value.max_concurrency.as_ref().map(|limit| {
                if limit.value == 0 {
                    errors.at(limit.referenced, "max_concurrency must be at least 1 (omit it for no limit)");
                }
                limit.value
            });
            BackendDefaults { weight: defaults.value.weight.map_or(1, |w| w.0), max_concurrency }
        }
        None => BackendDefaults::default(),
    };
    let max_backends = match &raw.value.max_backends {
        Some(count) if !(1..=DiscoveryConfig::MAX_BACKENDS).contains(&count.value) => {
            errors
                .at(count.referenced, format!("max_backends must be between 1 and {}", DiscoveryConfig::MAX_BACKENDS));
            DiscoveryConfig::DEFAULT_MAX_BACKENDS
        }
        Some(count) => count.value,
        None => DiscoveryConfig::DEFAULT_MAX_BACKENDS,
    };
    let allow_link_local = raw.value.allow_link_local.unwrap_or(false);
    (errors.errors.len() == before).then_some(DiscoveryConfig {
        source,
        refresh,
        defaults,
        max_backends,
        allow_link_local,
    })
}

/// A DNS name as discovery may ask for it: dot-separated labels of letters,
/// digits, `-` and `_` (SRV names start with `_service._proto`), a final dot
/// allowed.
fn check_dns_name(name: &str) -> Result<(), String> {
    let labels = name.strip_suffix('.').unwrap_or(name);
    let valid_label = |label: &str| {
        (1..=63).contains(&label.len()) && label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    };
    if labels.is_empty() || name.len() > 253 || !labels.split('.').all(valid_label) {
        return Err(format!("`{name}` is not a DNS name"));
    }
    Ok(())
}

/// `trusted_proxies`: each a CIDR block, or one address.
fn validate_trusted_proxies(raw: &[Spanned<String>], errors: &mut Collector<'_>) -> Vec<ipnet::IpNet> {
    address_blocks(raw, "trusted proxy", errors)
}

/// `allow` and `deny` of a listener or route.
fn validate_address_rules(
    allow: &[Spanned<String>],
    deny: &[Spanned<String>],
    errors: &mut Collector<'_>,
) -> AddressRules {
    AddressRules {
        allow: address_blocks(allow, "allow entry", errors),
        deny: address_blocks(deny, "deny entry", errors),
    }
}

/// CIDR blocks or single addresses, each error pointing at its entry.
fn address_blocks(raw: &[Spanned<String>], what: &str, errors: &mut Collector<'_>) -> Vec<ipnet::IpNet> {
    let mut parsed = Vec::new();
    for entry in raw {
        let text = entry.value.trim();
        match text.parse::<ipnet::IpNet>().or_else(|_| text.parse::<std::net::IpAddr>().map(ipnet::IpNet::from)) {
            // Stored without host bits, so `10.1.2.3/8` means 10.0.0.0/8 as
            // written, and an IPv4-mapped block (::ffff:10.0.0.0/104) as the
            // IPv4 block it is, which is how peers are compared.
            Ok(net) => parsed.push(canonical(net.trunc())),
            Err(_) => errors.at(
                entry.referenced,
                format!("{what} `{text}` is not a CIDR block (10.0.0.0/8, fd00::/8) or an IP address"),
            ),
        }
    }
    parsed
}

fn canonical(net: ipnet::IpNet) -> ipnet::IpNet {
    match net {
        ipnet::IpNet::V6(v6) if v6.prefix_len() >= 96 => match v6.addr().to_ipv4_mapped() {
            Some(v4) => ipnet::Ipv4Net::new(v4, v6.prefix_len() - 96).map_or(net, ipnet::IpNet::V4),
            None => net,
        },
        other => other,
    }
}

/// `resolver.servers`: each an IP address, with a port or on 53.
fn validate_resolver(raw: &Option<Spanned<RawResolver>>, errors: &mut Collector<'_>) -> ResolverConfig {
    let Some(servers) = raw.as_ref().and_then(|r| r.value.servers.as_ref()) else {
        return ResolverConfig::default();
    };
    if servers.value.is_empty() {
        errors.at(servers.referenced, "resolver.servers is empty: list servers, or remove it for /etc/resolv.conf");
    }
    let mut parsed = Vec::new();
    for server in &servers.value {
        let text = server.value.trim();
        let address = text
            .parse::<SocketAddr>()
            .ok()
            .or_else(|| text.parse::<std::net::IpAddr>().ok().map(|ip| SocketAddr::new(ip, 53)));
        match address {
            Some(address) => parsed.push(address),
            None => errors.at(server.referenced, format!("resolver server `{text}` is not IP or IP:PORT")),
        }
    }
    ResolverConfig { servers: parsed }
}

/// Reads an upstream's CA bundle and client certificate; paths are relative
/// to the config file's directory.
fn validate_upstream_tls(
    raw: &Spanned<RawUpstreamTls>,
    protocol: UpstreamProtocol,
    file: &str,
    errors: &mut Collector<'_>,
) -> Option<UpstreamTls> {
    let base = Path::new(file).parent().unwrap_or(Path::new(""));
    let raw_tls = &raw.value;
    let before = errors.errors.len();
    let server_name = raw_tls.server_name.as_ref().and_then(|name| {
        match rustls::pki_types::ServerName::try_from(name.value.clone()) {
            Ok(parsed) => Some(parsed),
            Err(_) => {
                errors.at(name.referenced, format!("server_name `{}` is not a DNS name or IP address", name.value));
                None
            }
        }
    });
    let client = match (&raw_tls.client_cert, &raw_tls.client_key) {
        (Some(cert), Some(key)) => Some((cert, key)),
        (Some(cert), None) => {
            errors.at(cert.referenced, "client_cert needs client_key");
            None
        }
        (None, Some(key)) => {
            errors.at(key.referenced, "client_key needs client_cert");
            None
        }
        (None, None) => None,
    };
    let settings = UpstreamTlsFiles {
        ca: raw_tls.ca.as_ref().map(|ca| base.join(&ca.value)),
        client: client.map(|(cert, key)| (base.join(&cert.value), base.join(&key.value))),
        server_name,
        protocol,
    };
    match UpstreamTls::load(settings, std::time::SystemTime::now()) {
        Ok(tls) => (errors.errors.len() == before).then_some(tls),
        Err(error) => {
            let at = match error {
                UpstreamTlsError::Ca(_) => raw_tls.ca.as_ref().map(|s| s.referenced),
                UpstreamTlsError::ClientCert(_) => raw_tls.client_cert.as_ref().map(|s| s.referenced),
                UpstreamTlsError::ClientKey(_) => raw_tls.client_key.as_ref().map(|s| s.referenced),
                UpstreamTlsError::Roots(_) => None,
            };
            errors.at(at.unwrap_or(raw.referenced), error.to_string());
            None
        }
    }
}

fn count(value: &Option<Spanned<u32>>, key: &str, default: u32, errors: &mut Collector<'_>) -> u32 {
    match value {
        Some(v) if v.value == 0 => {
            errors.at(v.referenced, format!("{key} must be at least 1"));
            default
        }
        Some(v) => v.value,
        None => default,
    }
}

fn duration(
    value: &Option<Spanned<DurationValue>>,
    key: &str,
    default: Duration,
    errors: &mut Collector<'_>,
) -> Duration {
    match value {
        Some(v) if v.value.0.is_zero() => {
            errors.at(v.referenced, format!("{key} must be greater than zero"));
            default
        }
        Some(v) => v.value.0,
        None => default,
    }
}

fn validate_retry(raw: &RawRetry, errors: &mut Collector<'_>) -> RetryConfig {
    let attempts = count(&raw.attempts, "attempts", RetryConfig::DEFAULT_ATTEMPTS, errors);
    if let Some(a) = &raw.attempts {
        if a.value > 10 {
            errors.at(a.referenced, "attempts above 10 only multiply load on a failing backend; use at most 10");
        }
    }
    let backoff = raw.backoff.as_ref();
    let backoff_base =
        duration(&backoff.and_then(|b| b.base.clone()), "backoff.base", RetryConfig::DEFAULT_BACKOFF_BASE, errors);
    let backoff_max =
        duration(&backoff.and_then(|b| b.max.clone()), "backoff.max", RetryConfig::DEFAULT_BACKOFF_MAX, errors);
    if backoff_max < backoff_base {
        if let Some(max) = backoff.and_then(|b| b.max.as_ref()) {
            errors.at(max.referenced, "backoff.max must not be below backoff.base");
        }
    }
    let budget = raw.budget.as_ref();
    let budget_ratio = match budget.and_then(|b| b.ratio.as_ref()) {
        Some(r) if !(0.0..=1.0).contains(&r.value) => {
            errors.at(r.referenced, format!("budget.ratio must be between 0 and 1, got {}", r.value));
            RetryConfig::DEFAULT_BUDGET_RATIO
        }
        Some(r) => r.value,
        None => RetryConfig::DEFAULT_BUDGET_RATIO,
    };
    RetryConfig {
        attempts,
        per_try_timeout: raw
            .per_try_timeout
            .as_ref()
            .map(|_| duration(&raw.per_try_timeout, "per_try_timeout", Duration::ZERO, errors)),
        on: raw.on.clone().unwrap_or_else(|| RetryConfig::DEFAULT_ON.to_vec()),
        backoff: RetryBackoff { base: backoff_base, max: backoff_max },
        budget: RetryBudget {
            ratio: budget_ratio,
            min_per_second: budget
                .and_then(|b| b.min_per_second.as_ref())
                .map_or(RetryConfig::DEFAULT_BUDGET_MIN_PER_SECOND, |m| m.value),
        },
        non_idempotent: raw.non_idempotent.unwrap_or(false),
    }
}

fn validate_breaker(raw: &Spanned<RawBreaker>, errors: &mut Collector<'_>) -> BreakerConfig {
    let defaults = BreakerConfig::default();
    let raw = &raw.value;
    let failure_rate = match &raw.failure_rate {
        Some(r) if !(r.value > 0.0 && r.value <= 1.0) => {
            errors.at(r.referenced, format!("failure_rate must be above 0 and at most 1, got {}", r.value));
            defaults.failure_rate
        }
        Some(r) => r.value,
        None => defaults.failure_rate,
    };
    BreakerConfig {
        consecutive_failures: count(
            &raw.consecutive_failures,
            "consecutive_failures",
            defaults.consecutive_failures,
            errors,
        ),
        failure_rate,
        min_requests: count(&raw.min_requests, "min_requests", defaults.min_requests, errors),
        window: duration(&raw.window, "window", defaults.window, errors),
        open_for: duration(&raw.open_for, "open_for", defaults.open_for, errors),
        half_open_requests: count(&raw.half_open_requests, "half_open_requests", defaults.half_open_requests, errors),
    }
}

fn validate_queue(raw: &RawQueue, errors: &mut Collector<'_>) -> QueueConfig {
    let priority_header =
        raw.priority_header.as_ref().and_then(|h| match http::HeaderName::from_bytes(h.value.as_bytes()) {
            Ok(name) => Some(name),
            Err(_) => {
                errors.at(h.referenced, format!("priority_header `{}` is not a valid header name", h.value));
                None
            }
        });
    QueueConfig {
        max_waiting: count(&raw.max_waiting, "max_waiting", 1000, errors),
        timeout: duration(&raw.timeout, "timeout", Duration::from_secs(30), errors),
        priority_header,
    }
}

fn validate_health(raw: &RawHealth, errors: &mut Collector<'_>) -> HealthConfig {
    let active = raw.active.as_ref().map(|spanned| {
        let check = &spanned.value;
        let kind = check.kind.unwrap_or(CheckKind::Http);
        let only_for = |value: Option<Location>, key: &str, wanted: &str, errors: &mut Collector<'_>| {
            if let Some(at) = value {
                errors.at(at, format!("`{key}` only applies to `kind: {wanted}` checks"));
            }
        };
        if kind != CheckKind::Http {
            only_for(check.path.as_ref().map(|v| v.referenced), "path", "http", errors);
            only_for(check.expect_status.as_ref().map(|v| v.referenced), "expect_status", "http", errors);
            only_for(check.host.as_ref().map(|v| v.referenced), "host", "http", errors);
            only_for(check.expect_body.as_ref().map(|v| v.referenced), "expect_body", "http", errors);
        }
        if kind != CheckKind::Grpc {
            only_for(check.service.as_ref().map(|v| v.referenced), "service", "grpc", errors);
        }
        let probe = match kind {
            CheckKind::Http => {
                let path = match &check.path {
                    Some(p) if !p.value.starts_with('/') || p.value.parse::<http::uri::PathAndQuery>().is_err() => {
                        errors.at(
                            p.referenced,
                            format!("check path `{}` must start with `/` and be a valid request path", p.value),
                        );
                        p.value.clone()
                    }
                    Some(p) => p.value.clone(),
                    None => ActiveCheck::DEFAULT_PATH.to_owned(),
                };
                let expect_status = match &check.expect_status {
                    Some(list) => {
                        if list.value.is_empty() {
                            errors.at(list.referenced, "expect_status cannot be empty");
                        }
                        for status in &list.value {
                            if !(100..=599).contains(&status.value) {
                                errors.at(status.referenced, format!("{} is not an HTTP status", status.value));
                            }
                        }
                        list.value.iter().map(|s| s.value).collect()
                    }
                    None => vec![200],
                };
                if let Some(host) = &check.host {
                    if http::HeaderValue::from_str(&host.value).is_err() || host.value.is_empty() {
                        errors.at(host.referenced, format!("check host `{}` is not a valid Host header", host.value));
                    }
                }
                Probe::Http {
                    path,
                    expect_status,
                    host: check.host.as_ref().map(|h| h.value.clone()),
                    expect_body: check.expect_body.as_ref().map(|b| b.value.clone()),
                }
            }
            CheckKind::Tcp => Probe::Tcp,
            CheckKind::Grpc => {
                Probe::Grpc { service: check.service.as_ref().map(|s| s.value.clone()).unwrap_or_default() }
            }
        };
        let interval = duration(&check.interval, "interval", ActiveCheck::DEFAULT_INTERVAL, errors);
        let timeout = duration(&check.timeout, "timeout", ActiveCheck::DEFAULT_TIMEOUT.min(interval), errors);
        if timeout > interval {
            let at = check.timeout.as_ref().map_or(spanned.referenced, |t| t.referenced);
            errors.at(at, "check timeout must not be longer than its interval");
        }
        ActiveCheck {
            probe,
            interval,
            timeout,
            healthy_after: count(&check.healthy_after, "healthy_after", ActiveCheck::DEFAULT_HEALTHY_AFTER, errors),
            unhealthy_after: count(
                &check.unhealthy_after,
                "unhealthy_after",
                ActiveCheck::DEFAULT_UNHEALTHY_AFTER,
                errors,
            ),
        }
    });

    let passive = raw.passive.as_ref().map(|passive| {
        let defaults = PassiveConfig::default();
        let max_ejection_percent = match &passive.max_ejection_percent {
            Some(p) if p.value > 100 => {
                errors.at(p.referenced, format!("max_ejection_percent must be between 0 and 100, got {}", p.value));
                defaults.max_ejection_percent
            }
            Some(p) => p.value,
            None => defaults.max_ejection_percent,
        };
        PassiveConfig {
            consecutive_failures: count(
                &passive.consecutive_failures,
                "consecutive_failures",
                defaults.consecutive_failures,
                errors,
            ),
            ejection_time: duration(&passive.ejection_time, "ejection_time", defaults.ejection_time, errors),
            max_ejection_percent,
        }
    });

    HealthConfig { active, passive, slow_start: raw.slow_start.map(|d| d.0).filter(|d| !d.is_zero()) }
}

fn validate_backend<'a>(
    backend: &'a Spanned<RawBackend>,
    seen: &mut HashMap<&'a str, Location>,
    errors: &mut Collector<'_>,
) -> Option<BackendConfig> {
    let backend = &backend.value;
    let address = &backend.address;
    let mut ok = true;
    if let Err(message) = check_backend_address(&address.value) {
        errors.at(address.referenced, message);
        ok = false;
    }
    if let Some(first) = seen.insert(address.value.as_str(), address.referenced) {
        errors.at(
            address.referenced,
            format!("backend `{}` is listed twice in this upstream (first at line {})", address.value, first.line()),
        );
        ok = false;
    }
    if let Some(limit) = &backend.max_concurrency {
        if limit.value == 0 {
            errors.at(limit.referenced, "max_concurrency must be at least 1 (omit it for no limit)");
            ok = false;
        }
    }
    ok.then(|| BackendConfig {
        address: address.value.clone(),
        weight: backend.weight.map_or(1, |w| w.0),
        max_concurrency: backend.max_concurrency.as_ref().map(|m| m.value),
    })
}

fn check_backend_address(address: &str) -> Result<(), String> {
    let authority: http::uri::Authority =
        address.parse().map_err(|_| format!("backend address `{address}` is not HOST:PORT"))?;
    if authority.port_u16().is_none() || authority.as_str().contains('@') {
        return Err(format!("backend address `{address}` is not HOST:PORT (a port is required)"));
    }
    if authority.host().is_empty() {
        return Err(format!("backend address `{address}` has no host"));
    }
    Ok(())
}

fn list_or_none(names: &[&str]) -> String {
    if names.is_empty() {
        "none".to_owned()
    } else {
        names.join(", ")
    }
}
