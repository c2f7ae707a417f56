//! Everything that can go wrong for a client's request, and the ONE mapping from
//! those failures to the status, `x-switchyard-error` and one-line body the client
//! sees (the table in docs/errors.md).

use http::{HeaderValue, Response, StatusCode};

use crate::body::{full, BoxError, ClientBodyError, ClientBodyTimeout, ProxyBody};

pub const ERROR_HEADER: &str = "x-switchyard-error";

/// On a response the proxy made for a failure: its `x-switchyard-error` code.
#[derive(Debug, Clone, Copy)]
pub struct ProxyErrorCode(pub &'static str);

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("no route matches this request")]
    NoRoute,
    #[error("the client's key is over the route's rate limit for {retry_after:?} more")]
    RateLimited { requests: u32, per: std::time::Duration, retry_after: std::time::Duration },
    #[error("client {client:?} may not use this {scope}: {refusal}")]
    Forbidden { client: Option<std::net::IpAddr>, scope: &'static str, refusal: crate::config::AddressRefusal },
    /// A route's `auth` found no valid token or key: 401 with `challenge`
    /// as `WWW-Authenticate`.
    #[error("{why}")]
    Unauthenticated { why: &'static str, challenge: &'static str },
    /// A route's `auth` found who the client is, and it may not use the
    /// route: no certificate or an unlisted one, a token whose claims the
    /// route does not accept.
    #[error("{why}")]
    NotAuthorized { why: &'static str },
    #[error("no backend of upstream `{upstream}` can take this request")]
    NoHealthyBackend { upstream: String },
    #[error("could not connect to backend {backend}")]
    UpstreamConnect { backend: String, source: BoxError },
    #[error("backend {backend} closed or reset the connection")]
    UpstreamReset { backend: String, source: BoxError },
    #[error("every backend of upstream `{upstream}` has its circuit open")]
    CircuitOpen { upstream: String },
    #[error("upstream `{upstream}` is busy and its queue is full")]
    QueueFull { upstream: String },
    #[error("upstream `{upstream}` stayed busy for the whole queue timeout")]
    QueueTimeout { upstream: String },
    #[error("upstream `{upstream}` counts its slots in Redis, which cannot be reached (on_unavailable: refuse)")]
    ClusterUnavailable { upstream: String },
    #[error("no response within the route timeout")]
    UpstreamTimeout,
    #[error("request body is larger than the limit of {limit} bytes")]
    BodyTooLarge { limit: u64 },
    #[error("malformed request: {0}")]
    BadRequest(&'static str),
    #[error("{0} is not served by this proxy")]
    MethodNotAllowed(&'static str),
    #[error("the client sent nothing for {0:?} while a request body was due")]
    ClientTimeout(std::time::Duration),
}

impl ProxyError {
    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::NoRoute => StatusCode::NOT_FOUND,
            ProxyError::Forbidden { .. } => StatusCode::FORBIDDEN,
            ProxyError::Unauthenticated { .. } => StatusCode::UNAUTHORIZED,
            ProxyError::NotAuthorized { .. } => StatusCode::FORBIDDEN,
            ProxyError::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            ProxyError::NoHealthyBackend { .. }
            | ProxyError::CircuitOpen { .. }
            | ProxyError::QueueFull { .. }
            | ProxyError::QueueTimeout { .. }
            | ProxyError::ClusterUnavailable { .. } => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::UpstreamConnect { .. } | ProxyError::UpstreamReset { .. } => StatusCode::BAD_GATEWAY,
            ProxyError::UpstreamTimeout => StatusCode::GATEWAY_TIMEOUT,
            ProxyError::BodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ProxyError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ProxyError::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            ProxyError::ClientTimeout(_) => StatusCode::REQUEST_TIMEOUT,
        }
    }

    /// Whether the backend is to blame (for passive health): it could not be
    /// reached or dropped the exchange. Client mistakes are not its fault.
    pub fn is_backend_failure(&self) -> bool {
        matches!(
            self,
            ProxyError::UpstreamConnect { .. } | ProxyError::UpstreamReset { .. } | ProxyError::UpstreamTimeout
        )
    }

    /// The `x-switchyard-error` value; `None` for plain client errors.
    pub fn code(&self) -> Option<&'static str> {
        Some(match self {
            ProxyError::NoRoute => "no_route",
            ProxyError::Forbidden { .. } => "forbidden",
            ProxyError::Unauthenticated { .. } => "unauthenticated",
            ProxyError::NotAuthorized { .. } => "forbidden",
            ProxyError::RateLimited { .. } => "rate_limited",
            ProxyError::NoHealthyBackend { .. } => "no_healthy_backend",
            ProxyError::CircuitOpen { .. } => "circuit_open",
            ProxyError::QueueFull { .. } => "queue_full",
            ProxyError::QueueTimeout { .. } => "queue_timeout",
            ProxyError::ClusterUnavailable { .. } => "cluster_unavailable",
            ProxyError::UpstreamConnect { .. } => "upstream_connect",
            ProxyError::UpstreamReset { .. } => "upstream_reset",
            ProxyError::UpstreamTimeout => "upstream_timeout",
            ProxyError::BodyTooLarge { .. } => "body_too_large",
            ProxyError::BadRequest(_) | ProxyError::MethodNotAllowed(_) | ProxyError::ClientTimeout(_) => return None,
        })
    }

    /// The one line the client reads: what went wrong, in words that name
    /// no backend address or upstream (those are for the log, which has
    /// this error's `Display`).
    fn public_message(&self) -> std::borrow::Cow<'static, str> {
        std::borrow::Cow::Borrowed(match self {
            ProxyError::NoRoute => "no route matches this request\n",
            ProxyError::Forbidden { .. } => "this client may not make this request\n",
            ProxyError::Unauthenticated { .. } => "this request needs valid credentials\n",
            ProxyError::NotAuthorized { .. } => "this client's credentials do not allow this request\n",
            ProxyError::RateLimited { .. } => "too many requests: try again after Retry-After seconds\n",
            ProxyError::NoHealthyBackend { .. } => "no backend can take this request now\n",
            ProxyError::UpstreamConnect { .. } => "could not connect to a backend\n",
            ProxyError::UpstreamReset { .. } => "the backend closed or reset the connection\n",
            ProxyError::CircuitOpen { .. } => "every backend for this request has its circuit open\n",
            ProxyError::QueueFull { .. } => "the backends are busy and the queue is full\n",
            ProxyError::QueueTimeout { .. } => "the backends stayed busy for the whole queue timeout\n",
            ProxyError::ClusterUnavailable { .. } => "the shared slot store cannot be reached\n",
            ProxyError::UpstreamTimeout => "no response within the route timeout\n",
            ProxyError::BodyTooLarge { .. } | ProxyError::BadRequest(_) | ProxyError::MethodNotAllowed(_) => {
                return std::borrow::Cow::Owned(format!("{self}\n"))
            }
            ProxyError::ClientTimeout(_) => "the request body stopped arriving\n",
        })
    }

    pub fn into_response(self) -> Response<ProxyBody> {
        let mut response = Response::new(match self.public_message() {
            std::borrow::Cow::Borrowed(line) => full(line),
            std::borrow::Cow::Owned(line) => full(line),
        });
        *response.status_mut() = self.status();
        let headers = response.headers_mut();
        headers.insert(http::header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
        if let Some(code) = self.code() {
            headers.insert(ERROR_HEADER, HeaderValue::from_static(code));
        }
        if matches!(
            self,
            ProxyError::QueueFull { .. } | ProxyError::QueueTimeout { .. } | ProxyError::ClusterUnavailable { .. }
        ) {
            // The queue is a moment's wait; a client should come back soon.
            headers.insert(http::header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        if matches!(
            self,
            ProxyError::BadRequest(_)
                | ProxyError::BodyTooLarge { .. }
                | ProxyError::MethodNotAllowed(_)
                | ProxyError::ClientTimeout(_)
        ) {
            // The rest of the request may still be on the wire (after a CONNECT,
            // bytes meant for a tunnel): never parse it as another request.
            headers.insert(http::header::CONNECTION, HeaderValue::from_static("close"));
        }
        if let ProxyError::Unauthenticated { challenge, .. } = &self {
            headers.insert(http::header::WWW_AUTHENTICATE, HeaderValue::from_static(challenge));
        }
        if let ProxyError::RateLimited { requests, per, retry_after } = &self {
            // Whole seconds, rounded up: a client that waits this long finds a token.
            let wait = retry_after.as_secs() + u64::from(retry_after.subsec_nanos() > 0);
            let wait = wait.max(1);
            headers.insert(http::header::RETRY_AFTER, HeaderValue::from(wait));
            // draft-ietf-httpapi-ratelimit-headers: the policy, and what is left of it.
            let policy = format!("\"route\";q={requests};w={}", per.as_secs());
            headers.insert("ratelimit-policy", HeaderValue::try_from(policy).expect("digits and quotes"));
            let left = format!("\"route\";r=0;t={wait}");
            headers.insert("ratelimit", HeaderValue::try_from(left).expect("digits and quotes"));
        }
        if let Some(code) = self.code() {
            // Marks the response as the proxy's own, which a backend's
            // `x-switchyard-error` (passed through) cannot do.
            response.extensions_mut().insert(ProxyErrorCode(code));
        }
        response
    }
}

/// What the client is told when reading its own request body failed: the
/// client's fault, never the backend's. `None` when the error came from elsewhere.
pub fn client_body_failure(error: &(dyn std::error::Error + 'static)) -> Option<ProxyError> {
    let mut source = Some(error);
    while let Some(cause) = source {
        if let Some(ClientBodyTimeout(idle)) = cause.downcast_ref::<ClientBodyTimeout>() {
            return Some(ProxyError::ClientTimeout(*idle));
        }
        if cause.is::<ClientBodyError>() {
            return Some(ProxyError::BadRequest("request body was malformed or cut off"));
        }
        source = cause.source();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_error_maps_to_the_contract() {
        let cases = [
            (ProxyError::NoRoute, 404, Some("no_route")),
            (ProxyError::NoHealthyBackend { upstream: "u".into() }, 503, Some("no_healthy_backend")),
            (ProxyError::UpstreamConnect { backend: "b".into(), source: "x".into() }, 502, Some("upstream_connect")),
            (ProxyError::UpstreamReset { backend: "b".into(), source: "x".into() }, 502, Some("upstream_reset")),
            (ProxyError::UpstreamTimeout, 504, Some("upstream_timeout")),
            (ProxyError::CircuitOpen { upstream: "u".into() }, 503, Some("circuit_open")),
            (ProxyError::QueueFull { upstream: "u".into() }, 503, Some("queue_full")),
            (ProxyError::QueueTimeout { upstream: "u".into() }, 503, Some("queue_timeout")),
            (ProxyError::ClusterUnavailable { upstream: "u".into() }, 503, Some("cluster_unavailable")),
            (ProxyError::BodyTooLarge { limit: 1 }, 413, Some("body_too_large")),
            (ProxyError::BadRequest("x"), 400, None),
            (ProxyError::MethodNotAllowed("CONNECT"), 405, None),
            (ProxyError::ClientTimeout(std::time::Duration::from_secs(1)), 408, None),
        ];
        for (error, status, code) in cases {
            let response = error.into_response();
            assert_eq!(response.status().as_u16(), status);
            assert_eq!(response.headers().get(ERROR_HEADER).map(|v| v.to_str().unwrap()), code);
        }
    }

    #[test]
    fn the_body_names_no_backend_address_or_upstream() {
        let (backend, upstream) = ("10.9.8.7:8270", "payroll-bots");
        let errors = [
            ProxyError::UpstreamConnect { backend: backend.into(), source: "refused".into() },
            ProxyError::UpstreamReset { backend: backend.into(), source: "reset".into() },
            ProxyError::NoHealthyBackend { upstream: upstream.into() },
            ProxyError::CircuitOpen { upstream: upstream.into() },
            ProxyError::QueueFull { upstream: upstream.into() },
            ProxyError::QueueTimeout { upstream: upstream.into() },
            ProxyError::ClusterUnavailable { upstream: upstream.into() },
        ];
        for error in errors {
            let line = error.public_message();
            assert!(!line.contains(backend) && !line.contains(upstream), "{line}");
            assert!(error.to_string().contains(backend) || error.to_string().contains(upstream), "the log keeps it");
        }
    }
}
