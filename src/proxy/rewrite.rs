//! Rewriting a request for its backend and a response for its client: the
//! hop-by-hop headers removed, the forwarding headers added, the target in the
//! form the backend's protocol takes, and which `Upgrade`s are tunnelled.

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Uri, Version};

use crate::config::UpstreamProtocol;
use crate::conn::ConnInfo;
use crate::error::ProxyError;
use crate::upstream::Upstream;

static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");
static HTTP2_SETTINGS: HeaderName = HeaderName::from_static("http2-settings");

/// One try's request head as `backend` takes it: origin form and `Host` over
/// HTTP/1.1, the absolute URI over HTTP/2 (the original host travels in
/// X-Forwarded-Host).
pub(crate) fn for_backend(
    mut parts: http::request::Parts,
    upstream: &Upstream,
    backend: &crate::backend::Backend,
    original_host: Option<&HeaderValue>,
) -> Result<http::request::Parts, ProxyError> {
    match upstream.protocol {
        UpstreamProtocol::Http1 => {
            parts.uri = origin_form(parts.uri);
            parts.version = Version::HTTP_11;
            if !parts.headers.contains_key(header::HOST) {
                let host = original_host.cloned().unwrap_or_else(|| {
                    HeaderValue::from_str(backend.authority.as_str()).expect("an authority is a valid header value")
                });
                parts.headers.insert(header::HOST, host);
            }
        }
        UpstreamProtocol::H2c | UpstreamProtocol::H2 => {
            parts.uri = backend_uri(parts.uri, &backend.authority)?;
            parts.version = Version::HTTP_2;
            parts.headers.remove(header::HOST);
        }
    }
    Ok(parts)
}

pub(crate) fn clone_parts(parts: &http::request::Parts) -> http::request::Parts {
    let mut request = Request::new(());
    *request.method_mut() = parts.method.clone();
    *request.uri_mut() = parts.uri.clone();
    *request.version_mut() = parts.version;
    *request.headers_mut() = parts.headers.clone();
    request.into_parts().0
}

pub(crate) fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers.get(header::CONTENT_LENGTH)?.to_str().ok()?.parse().ok()
}

/// Whether the request asks for a protocol switch the proxy tunnels: WebSocket
/// only. Any other `Upgrade` (notably `h2c`, which would hand the client a raw
/// HTTP/2 connection to the backend, past routing) is stripped as hop-by-hop.
pub(crate) fn is_upgrade<B>(request: &Request<B>) -> bool {
    let mut upgrades = request.headers().get_all(header::UPGRADE).iter();
    let websocket = upgrades.next().is_some_and(|value| value.as_bytes().eq_ignore_ascii_case(b"websocket"));
    request.version() == Version::HTTP_11
        && websocket
        && upgrades.next().is_none()
        && connection_tokens(request.headers()).any(|token| token.eq_ignore_ascii_case("upgrade"))
}

pub(crate) fn connection_tokens(headers: &HeaderMap) -> impl Iterator<Item = &str> {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .map(str::trim)
        .filter(|token| !token.is_empty())
}

/// Removes the headers that describe one connection rather than the message
/// (RFC 9110 section 7.6.1), including any named in `Connection`. `TE: trailers`
/// survives because gRPC requires it end to end.
pub(crate) fn strip_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    // One pass over the names finds which are present (most messages carry
    // none, or only `Connection: keep-alive`); only those are removed, each
    // removal being a hashed lookup.
    let hop_by_hop: [&HeaderName; 10] = [
        &header::CONNECTION,
        &header::UPGRADE,
        &KEEP_ALIVE,
        &PROXY_CONNECTION,
        &HTTP2_SETTINGS,
        &header::TRANSFER_ENCODING,
        &header::TRAILER,
        &header::PROXY_AUTHENTICATE,
        &header::PROXY_AUTHORIZATION,
        &header::TE,
    ];
    let mut present = 0u16;
    for name in headers.keys() {
        // A match on the text (its length first) rather than ten comparisons
        // of header names: this runs for every header of every message.
        let index = match name.as_str() {
            "connection" => 0,
            "upgrade" => 1,
            "keep-alive" => 2,
            "proxy-connection" => 3,
            "http2-settings" => 4,
            "transfer-encoding" => 5,
            "trailer" => 6,
            "proxy-authenticate" => 7,
            "proxy-authorization" => 8,
            "te" => 9,
            _ => continue,
        };
        debug_assert_eq!(hop_by_hop[index], name);
        present |= 1 << index;
    }
    if present == 0 && !keep_upgrade {
        return;
    }
    if present & 1 != 0 {
        let listed: Vec<HeaderName> = connection_tokens(headers)
            .filter(|token| !["keep-alive", "close", "upgrade"].iter().any(|t| token.eq_ignore_ascii_case(t)))
            .filter_map(|token| HeaderName::from_bytes(token.as_bytes()).ok())
            .collect();
        for name in listed {
            headers.remove(name);
        }
    }
    if keep_upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        present &= !0b11;
    }
    for (index, name) in hop_by_hop.iter().enumerate() {
        if present & (1 << index) == 0 {
            continue;
        }
        if **name == header::TE {
            // Only `trailers` travels end to end (gRPC needs it), and only as
            // that one value: `TE: gzip` beside it is this hop's business, and
            // an HTTP/2 backend refuses a request that carries it.
            let mut values = headers.get_all(header::TE).iter();
            if values.next().is_some_and(|te| te == "trailers") && values.next().is_none() {
                continue;
            }
            let trailers = headers
                .get_all(header::TE)
                .iter()
                .flat_map(|value| value.as_bytes().split(|&b| b == b','))
                .any(|token| token.trim_ascii().eq_ignore_ascii_case(b"trailers"));
            headers.remove(header::TE);
            if trailers {
                headers.insert(header::TE, HeaderValue::from_static("trailers"));
            }
            continue;
        }
        headers.remove(*name);
    }
}

pub(crate) fn add_forwarding_headers(headers: &mut HeaderMap, conn: &ConnInfo, host: Option<&HeaderValue>) {
    let forwarded_for = match headers.get(&X_FORWARDED_FOR).and_then(|v| v.to_str().ok()) {
        Some(previous) => HeaderValue::try_from(format!("{previous}, {}", conn.client.ip()))
            .unwrap_or_else(|_| conn.client_ip_header.clone()),
        None => conn.client_ip_header.clone(),
    };
    headers.insert(&X_FORWARDED_FOR, forwarded_for);
    let proto = if conn.tls { "https" } else { "http" };
    headers.insert(&X_FORWARDED_PROTO, HeaderValue::from_static(proto));
    if let Some(host) = host {
        headers.insert(&X_FORWARDED_HOST, host.clone());
    }
}

/// The path and query alone: what an HTTP/1.1 request line carries to an
/// origin server.
pub(crate) fn origin_form(uri: Uri) -> Uri {
    if uri.scheme().is_none() && uri.authority().is_none() {
        return uri;
    }
    uri.path_and_query().map_or_else(|| Uri::from_static("/"), |path| Uri::from(path.clone()))
}

pub(crate) fn backend_uri(uri: Uri, authority: &http::uri::Authority) -> Result<Uri, ProxyError> {
    let mut parts = uri.into_parts();
    parts.scheme = Some(http::uri::Scheme::HTTP);
    parts.authority = Some(authority.clone());
    if parts.path_and_query.is_none() {
        parts.path_and_query = Some(http::uri::PathAndQuery::from_static("/"));
    }
    Uri::from_parts(parts).map_err(|_| ProxyError::BadRequest("request target cannot be forwarded"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_are_removed_but_te_trailers_stays() {
        let mut headers = HeaderMap::new();
        headers.insert(header::CONNECTION, "keep-alive, x-secret".parse().unwrap());
        headers.insert("x-secret", "1".parse().unwrap());
        headers.insert("keep-alive", "timeout=5".parse().unwrap());
        headers.insert(header::TE, "trailers".parse().unwrap());
        headers.insert(header::UPGRADE, "websocket".parse().unwrap());
        headers.insert("x-kept", "1".parse().unwrap());
        strip_hop_by_hop(&mut headers, false);
        let names: Vec<&str> = headers.keys().map(|k| k.as_str()).collect();
        assert_eq!(names, vec!["te", "x-kept"]);
    }

    #[test]
    fn forwarded_for_appends() {
        let conn = ConnInfo::new("10.1.2.3:5555".parse().unwrap(), "web".into());
        let mut headers = HeaderMap::new();
        add_forwarding_headers(&mut headers, &conn, None);
        assert_eq!(headers[&X_FORWARDED_FOR], "10.1.2.3");
        headers.insert(&X_FORWARDED_FOR, "1.1.1.1".parse().unwrap());
        add_forwarding_headers(&mut headers, &conn, Some(&HeaderValue::from_static("bots")));
        assert_eq!(headers[&X_FORWARDED_FOR], "1.1.1.1, 10.1.2.3");
        assert_eq!(headers[&X_FORWARDED_HOST], "bots");
        assert_eq!(headers[&X_FORWARDED_PROTO], "http");
    }
}
