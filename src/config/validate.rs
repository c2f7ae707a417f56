//! Checks that span more than one value (names that must exist or be unique,
//! settings that only make sense together) and turns the raw tree into [`Config`].
//! Every error is collected with its position; nothing stops at the first.

use std::collections::{HashMap, HashSet};

use serde_saphyr::{Location, Spanned};

use super::raw::{PolicyKind, RawBackend, RawConfig, RawRoute, RawUpstream, UpstreamProtocol};
use super::{
    AdminConfig, BackendConfig, Config, ConfigError, ConfigErrors, Limits, ListenerConfig, LogConfig, LogFormat,
    LogLevel, PolicyConfig, RouteConfig, UpstreamConfig,
};

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
        listeners.push(ListenerConfig { name, bind });
    }

    let admin = match &raw.admin.bind {
        Some(bind) => {
            let addr = bind.value.0;
            // Until admin tokens exist, the admin API (which can reload the
            // config) must not be reachable from other hosts.
            if !addr.ip().is_loopback() {
                errors.at(bind.referenced, format!("admin bind `{addr}` is not a loopback address; a non-loopback admin API needs `token`, which this version does not support yet"));
            }
            if binds.contains(&addr) {
                errors.at(bind.referenced, format!("admin bind `{addr}` is also a listener's bind"));
            }
            AdminConfig { bind: addr }
        }
        None => AdminConfig { bind: AdminConfig::DEFAULT_BIND.parse().expect("valid default") },
    };

    let limits = validate_limits(&raw, &mut errors);

    let mut upstreams = Vec::new();
    for (name, upstream) in &raw.upstreams {
        if let Some(upstream) = validate_upstream(name, upstream, &mut errors) {
            upstreams.push(upstream);
        }
    }

    if raw.routes.is_empty() {
        errors.at(start, "no routes: add at least one entry under `routes:`");
    }
    let mut routes = Vec::new();
    let mut route_names = HashSet::new();
    for (index, route) in raw.routes.iter().enumerate() {
        routes.push(validate_route(index, route, &raw, &mut route_names, &mut errors));
    }

    let log =
        LogConfig { level: raw.log.level.unwrap_or(LogLevel::Info), format: raw.log.format.unwrap_or(LogFormat::Text) };

    if errors.errors.is_empty() {
        Ok(Config { listeners, admin, log, limits, routes, upstreams })
    } else {
        errors.errors.sort_by_key(|e| (e.line, e.column));
        Err(ConfigErrors(errors.errors))
    }
}

fn validate_limits(raw: &RawConfig, errors: &mut Collector<'_>) -> Limits {
    let defaults = Limits::default();
    let raw = &raw.limits;
    let mut limits = Limits {
        max_body_bytes: raw.max_body_bytes.map_or(defaults.max_body_bytes, |b| b.0),
        header_read_timeout: raw.header_read_timeout.map_or(defaults.header_read_timeout, |d| d.0),
        idle_timeout: raw.idle_timeout.map_or(defaults.idle_timeout, |d| d.0),
        shutdown_grace: raw.shutdown_grace.map_or(defaults.shutdown_grace, |d| d.0),
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
    limits
}

fn validate_route(
    index: usize,
    route: &Spanned<RawRoute>,
    raw: &RawConfig,
    names: &mut HashSet<String>,
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
    if let Some(timeout) = route.timeout {
        if timeout.0.is_zero() {
            errors.at(location, "route timeout must be greater than zero");
        }
    }
    RouteConfig {
        name,
        host: route.matcher.host.clone(),
        path_prefix,
        methods: route.matcher.methods.iter().flatten().map(|m| m.0.clone()).collect(),
        headers,
        upstream: upstream.value.clone(),
        timeout: route.timeout.map(|t| t.0),
    }
}

fn validate_upstream(
    name: &str,
    upstream: &Spanned<RawUpstream>,
    errors: &mut Collector<'_>,
) -> Option<UpstreamConfig> {
    let location = upstream.referenced;
    let upstream = &upstream.value;
    let before = errors.errors.len();

    if upstream.backends.value.is_empty() {
        errors.at(upstream.backends.referenced, format!("upstream `{name}` has no backends"));
    }
    let mut seen: HashMap<&str, Location> = HashMap::new();
    let mut backends = Vec::new();
    for backend in &upstream.backends.value {
        if let Some(backend) = validate_backend(backend, &mut seen, errors) {
            backends.push(backend);
        }
    }

    let protocol = match &upstream.protocol {
        Some(protocol) if protocol.value == UpstreamProtocol::H2 => {
            errors.at(
                protocol.referenced,
                "protocol `h2` (HTTP/2 over TLS to backends) is not supported yet; use `http1` or `h2c`",
            );
            protocol.value
        }
        Some(protocol) => protocol.value,
        None => UpstreamProtocol::Http1,
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

    (errors.errors.len() == before).then(|| UpstreamConfig { name: name.to_owned(), policy, backends, protocol })
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
