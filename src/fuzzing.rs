//! Entry points for the fuzz targets in `fuzz/`: each takes arbitrary bytes,
//! drives one piece of the proxy that meets untrusted input, and asserts what
//! must hold whatever the input (a panic is a finding). `cargo +nightly fuzz`
//! runs them coverage-guided; `tests/integration/fuzzing.rs` replays their seed
//! corpora and every regression input on the stable toolchain, so a crash once
//! found stays fixed.

use bytes::BytesMut;
use http::{header, HeaderName, HeaderValue, Method, Request};

use crate::balance::{extract_key, PickRequest};
use crate::client::http1::codec::{parse_response_head, Chunk, ChunkedDecoder, ResponseFraming};
use crate::config::KeySpec;
use crate::conn::ConnInfo;
use crate::proxy::rewrite;

/// A config file: parsing and validation return the config or errors with
/// positions, never panic or run away (alias bombs, deep nesting).
pub fn config_parse(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Err(errors) = crate::config::parse(text, "fuzz.yaml") {
        assert!(!errors.0.is_empty());
        for error in &errors.0 {
            assert!(error.line >= 1 && error.column >= 1);
        }
    }
}

/// Routes the fuzzed requests are matched against: exact and wildcard hosts,
/// path prefixes, methods and a header, then a catch-all.
const ROUTES: &str = r#"
listeners: [{ bind: "127.0.0.1:0" }]
routes:
  - { match: { host: "bots.internal", path_prefix: "/robot/", methods: [POST], headers: { x-tenant: acme } }, upstream: u }
  - { match: { host: "*.bots", path_prefix: "/jobs/" }, upstream: u }
  - { match: { path_prefix: "/api/", methods: [GET, HEAD] }, upstream: u }
  - { upstream: u }
upstreams:
  u: { backends: [{ address: "10.0.0.1:80" }] }
"#;

/// A key spec, a request target, a header value and a host (one per line)
/// through routing and key extraction: whatever a client sends, the first
/// matching route is found (the catch-all at worst) and no panic.
pub fn route_and_key(data: &[u8]) {
    static SNAPSHOT: std::sync::OnceLock<crate::state::Snapshot> = std::sync::OnceLock::new();
    let snapshot = SNAPSHOT.get_or_init(|| {
        let config = crate::config::parse(ROUTES, "routes.yaml").expect("the fuzz routes are valid");
        crate::state::Snapshot::compile(&config, None, 1)
    });
    let text = String::from_utf8_lossy(data);
    let mut parts = text.splitn(4, '\n');
    let (spec, target, value) = (parts.next().unwrap_or(""), parts.next().unwrap_or("/"), parts.next().unwrap_or(""));
    let host = parts.next();
    let Ok(uri) = target.parse::<http::Uri>() else { return };
    let mut request = Request::builder().uri(uri).body(()).expect("valid parts");
    *request.method_mut() = if target.len() % 2 == 0 { Method::GET } else { Method::POST };
    if let Ok(value) = HeaderValue::from_str(value) {
        request.headers_mut().insert(header::COOKIE, value.clone());
        request.headers_mut().insert("x-tenant", value.clone());
        request.headers_mut().insert("x-job-id", value);
    }
    if let Some(Ok(host)) = host.map(HeaderValue::from_str) {
        request.headers_mut().insert(header::HOST, host);
    }
    let _ = crate::route::request_host(&request);
    let Some(found) = snapshot.router.find_index(&request) else {
        // Only a target without a path (authority form, which the listener
        // refuses before routing anyway) escapes the catch-all: 404.
        assert!(!request.uri().path().starts_with('/'), "no route for {}", request.uri());
        return;
    };
    // What each route asks, checked apart from the router's own matching.
    let path = request.uri().path();
    let host = crate::route::request_host(&request).unwrap_or("");
    let tenant = request.headers().get("x-tenant").is_some_and(|v| v == "acme");
    let first = host.eq_ignore_ascii_case("bots.internal")
        && request.method() == Method::POST
        && path.starts_with("/robot/")
        && tenant;
    assert_eq!(found == 0, first, "route 0 for {host} {} {path}", request.method());
    if found == 2 {
        assert!(path.starts_with("/api/") && request.method() == Method::GET);
    }

    let Ok(spec) = spec.parse::<KeySpec>() else { return };
    let client_ip = std::net::IpAddr::from([10, 0, 0, 1]);
    let pick = PickRequest { headers: request.headers(), uri: request.uri(), client_ip, exclude: &[] };
    let _ = extract_key(&spec, &pick, |bytes| bytes.len());
}

/// A request head (`METHOD TARGET` then `name: value` lines) through the
/// header rewriting every forwarded request gets: hop-by-hop headers and those
/// named in `Connection` never reach a backend (nor does `Expect`), `TE` only as `trailers`, and
/// `X-Forwarded-For` ends with the client.
pub fn header_rewrite(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let mut lines = text.split('\n');
    let mut request_line = lines.next().unwrap_or("").split(' ');
    let Ok(method) = Method::from_bytes(request_line.next().unwrap_or("").as_bytes()) else { return };
    let Ok(uri) = request_line.next().unwrap_or("/").parse::<http::Uri>() else { return };
    let mut request = Request::builder().method(method).uri(uri).body(()).expect("valid parts");
    for line in lines {
        let Some((name, value)) = line.split_once(':') else { continue };
        if let (Ok(name), Ok(value)) = (HeaderName::from_bytes(name.as_bytes()), HeaderValue::from_str(value.trim())) {
            request.headers_mut().append(name, value);
        }
    }
    let keep_upgrade = rewrite::is_upgrade(&request);
    let named: Vec<HeaderName> = rewrite::connection_tokens(request.headers())
        .filter_map(|token| HeaderName::from_bytes(token.as_bytes()).ok())
        .collect();
    let (mut parts, ()) = request.into_parts();
    let host = parts.headers.get(header::HOST).cloned();
    rewrite::strip_hop_by_hop(&mut parts.headers, keep_upgrade);

    let headers = &parts.headers;
    let always_hop_by_hop =
        ["keep-alive", "proxy-connection", "http2-settings", "transfer-encoding", "trailer", "proxy-authenticate"];
    for name in always_hop_by_hop.iter().chain(&["proxy-authorization", "expect"]) {
        assert!(!headers.contains_key(*name), "{name} reached the backend");
    }
    for te in headers.get_all(header::TE) {
        assert_eq!(te, "trailers", "TE other than trailers reached the backend");
    }
    if keep_upgrade {
        assert_eq!(headers.get(header::CONNECTION).unwrap(), "upgrade");
        assert!(headers.get(header::UPGRADE).is_some_and(|u| u.as_bytes().eq_ignore_ascii_case(b"websocket")));
    } else {
        assert!(!headers.contains_key(header::CONNECTION) && !headers.contains_key(header::UPGRADE));
        for name in &named {
            assert!(!headers.contains_key(name), "{name}, named in Connection, reached the backend");
        }
    }

    // The same head from an untrusted client and from a trusted proxy.
    let conn = ConnInfo::new("192.0.2.7:40000".parse().unwrap(), "fuzz".into());
    let mut from_proxy = parts.headers.clone();
    assert_eq!(rewrite::add_forwarding_headers(&mut parts.headers, &conn, host.as_ref(), &[]), None);
    let forwarded = parts.headers.get_all("x-forwarded-for").iter().collect::<Vec<_>>();
    assert_eq!(forwarded, ["192.0.2.7"], "an untrusted client's X-Forwarded-For is replaced");
    for claimed in parts.headers.get_all("x-real-ip") {
        assert_eq!(claimed, "192.0.2.7", "an untrusted client's X-Real-IP is replaced");
    }
    for claimed in parts.headers.get_all(header::FORWARDED) {
        assert!(claimed.to_str().is_ok_and(|c| c.starts_with("for=192.0.2.7;")), "Forwarded {claimed:?}");
    }
    assert_eq!(parts.headers.get("x-forwarded-host"), host.as_ref(), "X-Forwarded-Host is the request's own");
    let trusted = ["192.0.2.0/24".parse().expect("a CIDR")];
    let client = rewrite::add_forwarding_headers(&mut from_proxy, &conn, host.as_ref(), &trusted);
    let chain = from_proxy.get("x-forwarded-for").expect("always set").to_str().expect("ASCII");
    assert!(chain == "192.0.2.7" || chain.ends_with(", 192.0.2.7"), "X-Forwarded-For {chain}");
    assert_ne!(client, Some(conn.client.ip()), "a named client is someone else than the peer");

    let origin = rewrite::origin_form(parts.uri.clone());
    assert!(origin.scheme().is_none() && origin.authority().is_none(), "{origin} is not in origin form");
    let authority: http::uri::Authority = "10.0.0.1:8080".parse().unwrap();
    if let Ok(absolute) = rewrite::backend_uri(parts.uri, &authority) {
        assert_eq!(absolute.authority(), Some(&authority), "an HTTP/2 request goes to the backend, not elsewhere");
    }
}

/// Bytes from a backend, through the HTTP/1.1 client's response parser and
/// chunked decoder, split where the first byte says: a head is complete or
/// refused, never misread, and a body never yields more than arrived.
pub fn backend_response(data: &[u8]) {
    let Some((&split, data)) = data.split_first() else { return };
    let method = if split & 1 == 0 { Method::GET } else { Method::HEAD };
    // The bytes arrive in two reads, as they would over a socket.
    let cut = usize::from(split).min(data.len());
    let mut buf = BytesMut::from(&data[..cut]);
    let mut parsed = parse_response_head(&mut buf, &method);
    buf.extend_from_slice(&data[cut..]);
    if let Ok(None) = parsed {
        parsed = parse_response_head(&mut buf, &method);
    }
    let Ok(Some(head)) = parsed else { return };
    let reads_a_body = !matches!(head.framing, ResponseFraming::Empty | ResponseFraming::Upgrade);
    if reads_a_body && head.headers.contains_key(header::TRANSFER_ENCODING) {
        // A body read by its encoding must not reach the client with a length too.
        assert!(!head.headers.contains_key(header::CONTENT_LENGTH), "read two ways: Content-Length kept");
    }
    if method == Method::HEAD {
        assert!(matches!(head.framing, ResponseFraming::Empty | ResponseFraming::Upgrade));
    }
    if head.framing != ResponseFraming::Chunked {
        return;
    }
    decode_chunks(&mut buf);
}

/// Bytes from a client, through the listener's request head parser, split
/// into two reads where the first byte says: a head is read the same whether
/// it arrived whole or in parts, takes exactly its own bytes (the body or the
/// next request is left as it came), and its body is delimited one way only.
pub fn client_request(data: &[u8]) {
    use crate::h1::request::{parse_request_head, BodyFraming};
    const MAX_HEAD: usize = 8192;
    let Some((&split, data)) = data.split_first() else { return };
    let cut = usize::from(split).min(data.len());
    let mut whole = BytesMut::from(data);
    let at_once = parse_request_head(&mut whole, MAX_HEAD);
    let mut buf = BytesMut::from(&data[..cut]);
    let mut parsed = parse_request_head(&mut buf, MAX_HEAD);
    if let Ok(None) = parsed {
        buf.extend_from_slice(&data[cut..]);
        parsed = parse_request_head(&mut buf, MAX_HEAD);
    } else {
        buf.extend_from_slice(&data[cut..]);
    }
    match (&at_once, &parsed) {
        (Ok(Some(a)), Ok(Some(b))) => {
            assert_eq!(a.request.uri(), b.request.uri());
            assert_eq!(a.request.headers(), b.request.headers());
            assert_eq!((a.framing, a.keep_alive), (b.framing, b.keep_alive));
            assert_eq!(whole, buf, "a head read in parts took other bytes than the head read whole");
        }
        (Ok(None), Ok(None)) => return,
        (Err(a), Err(b)) => {
            assert_eq!(a.status(), b.status());
            return;
        }
        // A head that is refused once its whole bytes are seen may be
        // complete within the first read (a later line is what is wrong).
        (Err(_), Ok(Some(_))) | (Ok(Some(_)), Err(_)) | (Ok(None), _) | (_, Ok(None)) => return,
    }
    let Ok(Some(head)) = at_once else { return };
    assert!(data.ends_with(&whole), "the bytes after the head are the input's own, unchanged");
    let lengths = head.request.headers().get_all(header::CONTENT_LENGTH).iter().count();
    match head.framing {
        BodyFraming::Chunked => {
            assert_eq!(lengths, 0, "read two ways: Content-Length kept beside chunked");
            assert_eq!(head.request.version(), http::Version::HTTP_11);
        }
        BodyFraming::Length(length) => {
            assert!(length > 0);
            let declared = head.request.headers()[header::CONTENT_LENGTH].to_str().expect("digits");
            assert_eq!(declared.parse::<u64>().ok(), Some(length));
        }
        BodyFraming::Empty => {}
    }
    if head.request.method() == Method::CONNECT {
        assert!(!head.keep_alive, "nothing after a CONNECT is read as a request");
    }
    if head.framing != BodyFraming::Chunked {
        return;
    }
    decode_chunks(&mut whole);
}

/// Decodes the chunked body at the front of `buf` as far as it goes: no
/// empty data chunk (it would end the body early), never more bytes out
/// than went in.
fn decode_chunks(buf: &mut BytesMut) {
    let available = buf.len();
    let mut decoder = ChunkedDecoder::default();
    let mut decoded = 0usize;
    loop {
        match decoder.decode(buf) {
            Ok(Chunk::Data(bytes)) => {
                assert!(!bytes.is_empty(), "an empty data chunk would end the body early");
                decoded += bytes.len();
                assert!(decoded <= available, "decoded {decoded} bytes of {available}");
            }
            Ok(Chunk::Trailers(_)) => {}
            Ok(Chunk::Incomplete) | Ok(Chunk::End) | Err(_) => return,
        }
    }
}
