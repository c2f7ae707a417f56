//! Extraction of the consistent-hash key from a request, without allocating.

use crate::balance::PickRequest;
use crate::config::KeySpec;

/// Hashes the request's key per `spec` with `hash`, or returns `None` when the
/// request carries no such key (the caller then falls back to round robin).
pub fn extract_key<R>(spec: &KeySpec, request: &PickRequest<'_>, hash: impl FnOnce(&[u8]) -> R) -> Option<R> {
    match spec {
        KeySpec::Header(name) => request.headers.get(name).map(|value| hash(value.as_bytes())),
        KeySpec::Cookie(name) => request
            .headers
            .get_all(http::header::COOKIE)
            .iter()
            .filter_map(|value| value.to_str().ok())
            .flat_map(|value| value.split(';'))
            .find_map(|pair| {
                let (key, value) = pair.trim().split_once('=')?;
                (key == name).then_some(value)
            })
            .map(|value| hash(value.as_bytes())),
        KeySpec::Query(name) => request
            .uri
            .query()?
            .split('&')
            .find_map(|pair| {
                let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
                (key == name).then_some(value)
            })
            .map(|value| hash(value.as_bytes())),
        KeySpec::Path => Some(hash(request.uri.path().as_bytes())),
        KeySpec::ClientIp => Some(match request.client_ip {
            std::net::IpAddr::V4(ip) => hash(&ip.octets()),
            std::net::IpAddr::V6(ip) => hash(&ip.octets()),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::balance::test_support::request;

    fn key_of(spec: &str, headers: &http::HeaderMap, uri: &str) -> Option<String> {
        let uri: http::Uri = uri.parse().unwrap();
        let spec: KeySpec = spec.parse().unwrap();
        extract_key(&spec, &request(headers, &uri), |bytes| String::from_utf8_lossy(bytes).into_owned())
    }

    #[test]
    fn keys_come_from_each_source() {
        let mut headers = http::HeaderMap::new();
        headers.insert("x-job-id", "job-7".parse().unwrap());
        headers.append("cookie", "a=1; sid=abc".parse().unwrap());
        assert_eq!(key_of("header:x-job-id", &headers, "/"), Some("job-7".into()));
        assert_eq!(key_of("header:x-other", &headers, "/"), None);
        assert_eq!(key_of("cookie:sid", &headers, "/"), Some("abc".into()));
        assert_eq!(key_of("cookie:none", &headers, "/"), None);
        assert_eq!(key_of("query:job", &headers, "/p?x=1&job=42"), Some("42".into()));
        assert_eq!(key_of("query:job", &headers, "/p?jobs=1"), None);
        assert_eq!(key_of("path", &headers, "/a/b?q=1"), Some("/a/b".into()));
        assert_eq!(key_of("client_ip", &headers, "/"), Some("\u{7f}\0\0\u{1}".into()));
    }
}
