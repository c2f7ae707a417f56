//! Rewriting a request for its backend and a response for its client: the
//! hop-by-hop headers removed, the forwarding headers added, the target in the
//! form the backend's protocol takes, and which `Upgrade`s are tunnelled.

use std::net::IpAddr;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Uri, Version};

use crate::config::UpstreamProtocol;
use crate::conn::ConnInfo;
use crate::error::ProxyError;
use crate::upstream::Upstream;

static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
static X_REAL_IP: HeaderName = HeaderName::from_static("x-real-ip");
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
///
/// `Expect` goes too, as nginx and Envoy drop it: the proxy answers `100
/// Continue` to its client itself (hyper does, when the body is first read)
/// and sends the body at once. Forwarded, it would let a backend answer
/// (417, 401) without reading the body and then read that body from the
/// pooled connection as a request of its own, whose answer a later client
/// would get.
pub(crate) fn strip_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    // One pass over the names finds which are present (most messages carry
    // none, or only `Connection: keep-alive`); only those are removed, each
    // removal being a hashed lookup.
    let hop_by_hop: [&HeaderName; 11] = [
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
        &header::EXPECT,
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
            "expect" => 10,
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

/// Sets the forwarding headers for the backend, and says who the client is.
///
/// From a peer in `trusted` (a balancer or proxy in front), what it says is
/// kept: `X-Forwarded-For` and `Forwarded` get this hop appended,
/// `X-Forwarded-Proto` and `X-Forwarded-Host` pass as they are (set here
/// only when absent), and the client is the last address of the
/// `X-Forwarded-For` chain that is not itself trusted (else `X-Real-IP`),
/// which is returned. An `X-Real-IP` is set to that client: a balancer that
/// appends to `X-Forwarded-For` passes a client's own `X-Real-IP` untouched. From anyone else, what the client claims is replaced:
/// `X-Forwarded-For`, `-Proto` and `-Host` are this proxy's, and an
/// `X-Real-IP` or `Forwarded` it sent becomes the peer's address.
pub(crate) fn add_forwarding_headers(
    headers: &mut HeaderMap,
    conn: &ConnInfo,
    host: Option<&HeaderValue>,
    trusted: &[ipnet::IpNet],
) -> Option<IpAddr> {
    let peer = conn.client.ip();
    let scheme = if conn.tls { "https" } else { "http" };
    let proto = HeaderValue::from_static(scheme);
    if !is_trusted(trusted, peer) {
        headers.insert(&X_FORWARDED_FOR, conn.client_ip_header.clone());
        headers.insert(&X_FORWARDED_PROTO, proto);
        match host {
            Some(host) => drop(headers.insert(&X_FORWARDED_HOST, host.clone())),
            None => drop(headers.remove(&X_FORWARDED_HOST)),
        }
        if headers.contains_key(&X_REAL_IP) {
            headers.insert(&X_REAL_IP, conn.client_ip_header.clone());
        }
        if headers.contains_key(header::FORWARDED) {
            let element = format!("{};proto={scheme}", forwarded_for(peer));
            headers.insert(header::FORWARDED, HeaderValue::try_from(element).expect("an address is a valid value"));
        }
        return None;
    }
    let client = chain_client(headers, peer, trusted);
    if let Some(client) = client.filter(|_| headers.contains_key(&X_REAL_IP)) {
        headers.insert(&X_REAL_IP, HeaderValue::try_from(client.to_string()).expect("an address is a valid value"));
    }
    let chain = joined(headers, &X_FORWARDED_FOR).and_then(|previous| format!("{previous}, {peer}").try_into().ok());
    headers.insert(&X_FORWARDED_FOR, chain.unwrap_or_else(|| conn.client_ip_header.clone()));
    if let Some(previous) = joined(headers, &header::FORWARDED) {
        if let Ok(value) = HeaderValue::try_from(format!("{previous}, {}", forwarded_for(peer))) {
            headers.insert(header::FORWARDED, value);
        }
    }
    headers.entry(&X_FORWARDED_PROTO).or_insert(proto);
    if let Some(host) = host {
        headers.entry(&X_FORWARDED_HOST).or_insert_with(|| host.clone());
    }
    client.filter(|client| *client != peer)
}

/// The client's address as the proxy establishes it: the connection's peer
/// (the PROXY protocol's client on a listener that has it), or, from a
/// trusted peer, the client its forwarding headers name (as
/// [`add_forwarding_headers`] reads them).
///
/// `None` when a trusted peer's `X-Forwarded-For` cannot be read up to an
/// untrusted hop (an entry that is not an address before one): for access
/// rules the client is then unknown, never the trusted hop itself. Entries
/// are read from the raw bytes, so bytes that are not text in what a client
/// sent do not hide the address its balancer appended after them.
// The fuzzing build leaves out the server, its one caller.
#[cfg_attr(fuzzing, allow(dead_code))]
pub(crate) fn established_client(headers: &HeaderMap, conn: &ConnInfo, trusted: &[ipnet::IpNet]) -> Option<IpAddr> {
    let peer = conn.client.ip();
    if !is_trusted(trusted, peer) {
        return Some(peer);
    }
    let mut lines = headers.get_all(&X_FORWARDED_FOR).iter().peekable();
    if lines.peek().is_none() {
        return match headers.get(&X_REAL_IP) {
            Some(value) => std::str::from_utf8(value.as_bytes()).ok().and_then(address),
            None => Some(peer),
        };
    }
    let mut client = peer;
    for line in lines.collect::<Vec<_>>().into_iter().rev() {
        for entry in line.as_bytes().rsplit(|byte| *byte == b',') {
            client = std::str::from_utf8(entry).ok().and_then(address)?;
            if !is_trusted(trusted, client) {
                return Some(client);
            }
        }
    }
    // Every hop trusted: the first is where the request came from.
    Some(client)
}

fn is_trusted(trusted: &[ipnet::IpNet], address: IpAddr) -> bool {
    // An IPv4 peer on a dual-stack socket arrives as ::ffff:a.b.c.d (the
    // config's blocks are stored the same way: see `config`).
    let address = address.to_canonical();
    trusted.iter().any(|net| net.contains(&address))
}

/// Every value of `name`, joined as one list; `None` without any (or with
/// one that is not text).
fn joined(headers: &HeaderMap, name: &HeaderName) -> Option<String> {
    let mut values = headers.get_all(name).iter();
    let mut list = values.next()?.to_str().ok()?.to_owned();
    for value in values {
        list.push_str(", ");
        list.push_str(value.to_str().ok()?);
    }
    Some(list)
}

/// The client behind a trusted `peer`: walking `X-Forwarded-For` from its
/// end, the first address that is not trusted (each trusted hop vouches for
/// the one before it); where an entry is not an address the walk stops at
/// the last trusted one. Without the header, `X-Real-IP`.
fn chain_client(headers: &HeaderMap, peer: IpAddr, trusted: &[ipnet::IpNet]) -> Option<IpAddr> {
    let mut client = peer;
    let mut lines = headers.get_all(&X_FORWARDED_FOR).iter().peekable();
    if lines.peek().is_none() {
        return headers.get(&X_REAL_IP).and_then(|v| address(v.to_str().ok()?));
    }
    // From the last line back; a line that is not text ends the walk like
    // an entry that is not an address.
    for line in lines.collect::<Vec<_>>().into_iter().rev() {
        let Ok(line) = line.to_str() else { break };
        for entry in line.rsplit(',') {
            let Some(hop) = address(entry) else { return Some(client) };
            client = hop;
            if !is_trusted(trusted, hop) {
                return Some(client);
            }
        }
    }
    Some(client)
}

/// An address as forwarding headers write one: `1.2.3.4`, `2001:db8::1`,
/// `[2001:db8::1]`, with a port or not (`1.2.3.4:80`, `[2001:db8::1]:80`).
fn address(text: &str) -> Option<IpAddr> {
    let text = text.trim();
    let bare = text.strip_prefix('[').and_then(|rest| rest.strip_suffix(']')).unwrap_or(text);
    bare.parse().ok().or_else(|| text.parse::<std::net::SocketAddr>().ok().map(|a| a.ip()))
}

/// A `Forwarded` element's `for=` (RFC 7239: an IPv6 address is bracketed and quoted).
fn forwarded_for(address: IpAddr) -> String {
    match address {
        IpAddr::V4(v4) => format!("for={v4}"),
        IpAddr::V6(v6) => format!("for=\"[{v6}]\""),
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
        headers.insert(header::EXPECT, "100-continue".parse().unwrap());
        strip_hop_by_hop(&mut headers, false);
        let mut names: Vec<&str> = headers.keys().map(|k| k.as_str()).collect();
        names.sort_unstable();
        assert_eq!(names, vec!["te", "x-kept"]);
    }

    fn spoofed() -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(&X_FORWARDED_FOR, "6.6.6.6".parse().unwrap());
        headers.append(&X_FORWARDED_FOR, "7.7.7.7, 10.0.0.9".parse().unwrap());
        headers.insert(&X_REAL_IP, "6.6.6.6".parse().unwrap());
        headers.insert(header::FORWARDED, "for=6.6.6.6;proto=https".parse().unwrap());
        headers.insert(&X_FORWARDED_PROTO, "https".parse().unwrap());
        headers.insert(&X_FORWARDED_HOST, "evil.example".parse().unwrap());
        headers
    }

    #[test]
    fn what_an_untrusted_client_says_of_itself_is_replaced() {
        let conn = ConnInfo::new("10.1.2.3:5555".parse().unwrap(), "web".into());
        let mut headers = spoofed();
        let trusted: Vec<ipnet::IpNet> = vec!["192.168.0.0/16".parse().unwrap()];
        assert_eq!(add_forwarding_headers(&mut headers, &conn, None, &trusted), None);
        assert_eq!(headers.get_all(&X_FORWARDED_FOR).iter().collect::<Vec<_>>(), ["10.1.2.3"]);
        assert_eq!(headers[&X_REAL_IP], "10.1.2.3");
        assert_eq!(headers[header::FORWARDED], "for=10.1.2.3;proto=http");
        assert_eq!(headers[&X_FORWARDED_PROTO], "http");
        assert!(!headers.contains_key(&X_FORWARDED_HOST), "an HTTP/1.0 request without Host passes no client's host");
        let mut headers = HeaderMap::new();
        add_forwarding_headers(&mut headers, &conn, Some(&HeaderValue::from_static("bots")), &[]);
        assert_eq!(headers[&X_FORWARDED_FOR], "10.1.2.3");
        assert_eq!(headers[&X_FORWARDED_HOST], "bots");
        assert!(!headers.contains_key(&X_REAL_IP) && !headers.contains_key(header::FORWARDED), "not added");
        let v6 = ConnInfo::new("[2001:db8::5]:80".parse().unwrap(), "web".into());
        let mut headers = spoofed();
        add_forwarding_headers(&mut headers, &v6, None, &[]);
        assert_eq!(headers[header::FORWARDED], "for=\"[2001:db8::5]\";proto=http");
    }

    #[test]
    fn a_trusted_proxy_is_appended_to_and_names_the_client() {
        let trusted: Vec<ipnet::IpNet> = vec!["10.0.0.0/8".parse().unwrap()];
        let conn = ConnInfo::new("10.1.2.3:5555".parse().unwrap(), "web".into());
        let mut headers = spoofed();
        // 6.6.6.6 and 7.7.7.7 are both untrusted: the last of them is the client.
        let client = add_forwarding_headers(&mut headers, &conn, Some(&HeaderValue::from_static("bots")), &trusted);
        assert_eq!(client, Some("7.7.7.7".parse().unwrap()));
        assert_eq!(headers[&X_FORWARDED_FOR], "6.6.6.6, 7.7.7.7, 10.0.0.9, 10.1.2.3");
        assert_eq!(headers[&X_REAL_IP], "7.7.7.7", "a client's own X-Real-IP does not pass a balancer");
        assert_eq!(headers[header::FORWARDED], "for=6.6.6.6;proto=https, for=10.1.2.3");
        assert_eq!(headers[&X_FORWARDED_PROTO], "https");
        assert_eq!(headers[&X_FORWARDED_HOST], "evil.example");
        let mut headers = HeaderMap::new();
        headers.insert(&X_FORWARDED_FOR, "garbage, 10.0.0.7".parse().unwrap());
        assert_eq!(add_forwarding_headers(&mut headers, &conn, None, &trusted), Some("10.0.0.7".parse().unwrap()));
        let mut headers = HeaderMap::new();
        headers.insert(&X_REAL_IP, "8.8.8.8".parse().unwrap());
        assert_eq!(add_forwarding_headers(&mut headers, &conn, None, &trusted), Some("8.8.8.8".parse().unwrap()));
        assert_eq!(headers[&X_FORWARDED_FOR], "10.1.2.3");
        let mut headers = HeaderMap::new();
        headers.insert(&X_FORWARDED_FOR, "8.8.8.8".parse().unwrap());
        headers.append(&X_FORWARDED_FOR, HeaderValue::from_bytes(b"\xff").unwrap());
        assert_eq!(
            add_forwarding_headers(&mut headers, &conn, None, &trusted),
            None,
            "a line that is not text stops the walk at the peer, as it stops the chain"
        );
        let mut headers = HeaderMap::new();
        headers.insert(&X_FORWARDED_FOR, "[2001:db8::1], 10.0.0.5".parse().unwrap());
        assert_eq!(add_forwarding_headers(&mut headers, &conn, None, &trusted), Some("2001:db8::1".parse().unwrap()));
        let mapped = ConnInfo::new("[::ffff:10.1.2.3]:1".parse().unwrap(), "web".into());
        let mut headers = spoofed();
        assert!(
            add_forwarding_headers(&mut headers, &mapped, None, &trusted).is_some(),
            "v4-mapped peers match v4 blocks"
        );
    }
}
