//! Route matching: which route, and so which upstream, serves a request.
//!
//! Routes are tried in config order and the first whose every condition holds wins.
//! Matching is pure and allocation-free: host comparison ignores case and port,
//! path matching is a byte prefix, headers are compared exactly.

use std::sync::Arc;
use std::time::Duration;

use crate::config::{HostPattern, RetryConfig};
use crate::metrics::series::RequestCounts;
use crate::retry::RetryBudget;
use crate::upstream::Upstream;

#[derive(Debug)]
pub struct Route {
    pub name: Arc<str>,
    pub host: Option<HostPattern>,
    pub path_prefix: String,
    pub methods: Vec<http::Method>,
    pub headers: Vec<(http::HeaderName, http::HeaderValue)>,
    pub upstream: Arc<Upstream>,
    /// `switchyard_request_duration_seconds` for this route, registered once.
    pub duration: metrics::Histogram,
    /// `switchyard_request_body_bytes_total` and
    /// `switchyard_response_body_bytes_total` for this route, registered once.
    pub body_bytes: crate::metrics::BodyBytes,
    /// `switchyard_requests_total` for each backend of the upstream, by
    /// index: held by the backend's state, which keeps them across reloads.
    pub requests: Vec<Arc<RequestCounts>>,
    /// The same for requests that never reached a backend, kept across
    /// reloads while the route keeps its name and upstream.
    pub requests_without_backend: Arc<RequestCounts>,
    /// Bound on the wait for the response head, queueing and retries included.
    pub timeout: Duration,
    pub retry: Option<RoutePolicy>,
    /// `allow` / `deny`: the clients that may use the route.
    pub access: crate::config::AddressRules,
    /// `rate_limit`, its buckets carried across reloads that keep it.
    pub rate_limit: Option<Arc<crate::ratelimit::RateLimit>>,
    /// `auth:`, with its key set (carried across reloads that keep its
    /// source) and its cache of verified tokens.
    pub auth: Option<crate::auth::RouteAuth>,
}

/// A route's retry settings and its budget (carried across reloads by name).
#[derive(Debug)]
pub struct RoutePolicy {
    pub config: RetryConfig,
    pub budget: Arc<RetryBudget>,
}

impl Route {
    fn matches<B>(&self, request: &http::Request<B>) -> bool {
        if let Some(pattern) = &self.host {
            match request_host(request) {
                Some(host) if host_matches(pattern, host) => {}
                _ => return false,
            }
        }
        request.uri().path().starts_with(&self.path_prefix)
            && (self.methods.is_empty() || self.methods.contains(request.method()))
            && self.headers.iter().all(|(name, value)| request.headers().get(name) == Some(value))
    }
}

#[derive(Debug, Default)]
pub struct Router {
    routes: Vec<Route>,
}

impl Router {
    pub fn new(routes: Vec<Route>) -> Self {
        Router { routes }
    }

    /// The index of the first route that matches `request`.
    pub fn find_index<B>(&self, request: &http::Request<B>) -> Option<usize> {
        self.routes.iter().position(|route| route.matches(request))
    }

    pub fn routes(&self) -> &[Route] {
        &self.routes
    }
}

/// The request's host without port: the Host header, else the URI authority
/// (HTTP/2 carries it in `:authority`).
pub fn request_host<B>(request: &http::Request<B>) -> Option<&str> {
    let raw = match request.headers().get(http::header::HOST) {
        Some(value) => value.to_str().ok()?,
        None => request.uri().authority()?.as_str(),
    };
    Some(strip_port(raw))
}

fn strip_port(host: &str) -> &str {
    if let Some(rest) = host.strip_prefix('[') {
        // An IPv6 literal keeps its brackets so it never looks like a name.
        return rest.find(']').map_or(host, |end| &host[..end + 2]);
    }
    host.rsplit_once(':').map_or(host, |(name, _)| name)
}

fn host_matches(pattern: &HostPattern, host: &str) -> bool {
    match pattern {
        HostPattern::Exact(exact) => host.eq_ignore_ascii_case(exact),
        HostPattern::Suffix(suffix) => {
            host.len() > suffix.len()
                && host.is_char_boundary(host.len() - suffix.len())
                && host[host.len() - suffix.len()..].eq_ignore_ascii_case(suffix)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_match_exactly_or_by_suffix_ignoring_case_and_port() {
        let exact: HostPattern = "bots.internal".parse().unwrap();
        let suffix: HostPattern = "*.internal".parse().unwrap();
        assert!(host_matches(&exact, strip_port("Bots.Internal:8080")));
        assert!(!host_matches(&exact, "x.bots.internal"));
        assert!(host_matches(&suffix, "a.b.internal"));
        assert!(!host_matches(&suffix, "internal"));
        assert!(!host_matches(&suffix, "xinternal"));
        assert_eq!(strip_port("[::1]:80"), "[::1]");
        assert_eq!(strip_port("[::1]"), "[::1]");
        assert_eq!(strip_port("host"), "host");
    }
}
