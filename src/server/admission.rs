//! What a request must be before anything acts on it: the checks that keep the
//! proxy from forwarding what it did not parse as exactly one request.
//!
//! - `CONNECT` is refused (405) and the connection is closed, so the bytes a
//!   client sends after the CONNECT head (meant for a tunnel) are never parsed
//!   as another request and forwarded.
//! - An HTTP/1.1 request needs exactly one `Host` (RFC 9112 section 3.2): none,
//!   or several, is 400. A target in absolute form wins over `Host` (section
//!   3.2.2): `Host` is rewritten to the target's authority, so routing, the
//!   backend and `X-Forwarded-Host` all see the same host.
//! - The path is normalised (dot segments, `%2e` included; runs of slashes
//!   with `paths.merge_slashes`: see `path`), so routing and the backend see
//!   the same path: `/public/../admin` is `/admin` for both. A path that
//!   climbs above the root is 400.

use http::uri::PathAndQuery;
use http::{header, HeaderValue, Method, Request, Uri, Version};

use crate::error::ProxyError;
use crate::path::PathError;

/// Checks `request` and normalises its host and path; an error is the
/// client's answer.
pub fn admit<B>(request: &mut Request<B>, merge_slashes: bool) -> Result<(), ProxyError> {
    if request.method() == Method::CONNECT {
        return Err(ProxyError::MethodNotAllowed("CONNECT"));
    }
    let mut hosts = request.headers().get_all(header::HOST).iter();
    let first = hosts.next();
    if hosts.next().is_some() {
        return Err(ProxyError::BadRequest("more than one Host header"));
    }
    match request.uri().authority() {
        // The absolute-form target (or HTTP/2 `:authority`) is the host.
        Some(authority) if first.is_none_or(|host| host.as_bytes() != authority.as_str().as_bytes()) => {
            let host = HeaderValue::from_str(authority.as_str())
                .map_err(|_| ProxyError::BadRequest("request target authority is not a valid host"))?;
            request.headers_mut().insert(header::HOST, host);
        }
        Some(_) => {}
        None if first.is_none() && request.version() == Version::HTTP_11 => {
            return Err(ProxyError::BadRequest("HTTP/1.1 request without Host"));
        }
        None => {}
    }
    match crate::path::normalize(request.uri().path(), merge_slashes) {
        Ok(None) => {}
        Ok(Some(path)) => *request.uri_mut() = with_path(request.uri(), path)?,
        Err(PathError::AboveRoot) => return Err(ProxyError::BadRequest("the path climbs above the root")),
        Err(PathError::Backslash) => return Err(ProxyError::BadRequest("a backslash in the path")),
    }
    Ok(())
}

/// `uri` with its path replaced (its query kept).
fn with_path(uri: &Uri, path: String) -> Result<Uri, ProxyError> {
    let target = match uri.query() {
        Some(query) => format!("{path}?{query}"),
        None => path,
    };
    let mut parts = uri.clone().into_parts();
    parts.path_and_query =
        Some(PathAndQuery::try_from(target).map_err(|_| ProxyError::BadRequest("the path cannot be normalised"))?);
    Uri::from_parts(parts).map_err(|_| ProxyError::BadRequest("the path cannot be normalised"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(method: Method, uri: &str, version: Version, hosts: &[&str]) -> Request<()> {
        let mut builder = Request::builder().method(method).uri(uri).version(version);
        for host in hosts {
            builder = builder.header(header::HOST, *host);
        }
        builder.body(()).unwrap()
    }

    fn verdict(mut request: Request<()>) -> Result<Option<String>, u16> {
        admit(&mut request, false)
            .map(|()| request.headers().get(header::HOST).map(|h| h.to_str().unwrap().to_owned()))
            .map_err(|e| e.status().as_u16())
    }

    #[test]
    fn the_path_is_normalised_with_its_query_and_authority_kept() {
        let mut relative = request(Method::GET, "/public/%2e%2e/admin/?a=/../b", Version::HTTP_11, &["h"]);
        admit(&mut relative, false).unwrap();
        assert_eq!(relative.uri(), "/admin/?a=/../b");
        let mut absolute = request(Method::GET, "http://h:81/a/./b//c", Version::HTTP_2, &[]);
        admit(&mut absolute, true).unwrap();
        assert_eq!(absolute.uri(), "http://h:81/a/b/c");
        assert_eq!(verdict(request(Method::GET, "/a/../../etc/passwd", Version::HTTP_11, &["h"])), Err(400));
    }

    #[test]
    fn connect_is_refused() {
        assert_eq!(verdict(request(Method::CONNECT, "example.com:443", Version::HTTP_11, &["example.com"])), Err(405));
    }

    #[test]
    fn http11_needs_exactly_one_host() {
        assert_eq!(verdict(request(Method::GET, "/", Version::HTTP_11, &[])), Err(400));
        assert_eq!(verdict(request(Method::GET, "/", Version::HTTP_11, &["a", "b"])), Err(400));
        assert_eq!(verdict(request(Method::GET, "/", Version::HTTP_11, &["a", "a"])), Err(400));
        assert_eq!(verdict(request(Method::GET, "/", Version::HTTP_11, &["a"])), Ok(Some("a".into())));
        assert_eq!(verdict(request(Method::GET, "/", Version::HTTP_10, &[])), Ok(None), "HTTP/1.0 may omit Host");
    }

    #[test]
    fn an_absolute_target_wins_over_host() {
        let absolute = request(Method::GET, "http://target.example:81/x", Version::HTTP_11, &["other.example"]);
        assert_eq!(verdict(absolute), Ok(Some("target.example:81".into())));
        let without_host = request(Method::GET, "http://target.example/x", Version::HTTP_11, &[]);
        assert_eq!(verdict(without_host), Ok(Some("target.example".into())));
    }
}
