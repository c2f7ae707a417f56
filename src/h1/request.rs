//! A client's request head, parsed from the bytes a listener read: the
//! request line and headers as `http` types, and how its body is delimited
//! (RFC 9112 sections 3 to 6). Refuses, rather than guesses, wherever a lax
//! reading would let the proxy and a backend read the bytes as different
//! requests: conflicting or malformed lengths, a transfer coding that does
//! not end in `chunked`, a coding on HTTP/1.0, bytes that are not a request.
//! Accepts and refuses what hyper's server did before this parser replaced
//! it, with hyper's statuses (400, 414, 431).

use std::mem::MaybeUninit;

use bytes::BytesMut;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, StatusCode, Uri, Version};

/// At most this many header lines (hyper's limit too); more is 431.
pub const MAX_HEADERS: usize = 100;
/// Headers the proxy may add to a request before it is forwarded.
const ADDED_ON_THE_WAY: usize = 6;
/// A longer request target is 414 (hyper's limit).
const MAX_TARGET: usize = u16::MAX as usize - 1;

/// How the request body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyFraming {
    /// No body (no length, or a length of 0).
    Empty,
    Length(u64),
    Chunked,
}

/// A parsed request head.
#[derive(Debug)]
pub struct RequestHead {
    /// The request with an empty body, its extensions unset.
    pub request: Request<()>,
    pub framing: BodyFraming,
    /// The client allows another request on the connection after this one.
    pub keep_alive: bool,
    /// `Expect: 100-continue`: the client waits for a 100 before its body.
    pub expect_continue: bool,
    /// `Upgrade` on HTTP/1.1: the connection may become a tunnel (a 101).
    pub wants_upgrade: bool,
}

/// Why bytes were not read as a request, with the status the client is
/// told before the connection closes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error("malformed request ({0})")]
    Malformed(&'static str),
    #[error("request head larger than the limit or too many headers")]
    HeadTooLarge,
    #[error("request target longer than {MAX_TARGET} bytes")]
    TargetTooLong,
}

impl Refused {
    pub fn status(self) -> StatusCode {
        match self {
            Refused::Malformed(_) => StatusCode::BAD_REQUEST,
            Refused::HeadTooLarge => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            Refused::TargetTooLong => StatusCode::URI_TOO_LONG,
        }
    }
}

/// Parses a request head from the front of `buf`, removing it (the body, or
/// the next request, stays). `Ok(None)`: not complete yet, and `buf` is
/// within `max_head_bytes`. Header values and the target share the head's
/// bytes rather than copying them.
pub fn parse_request_head(buf: &mut BytesMut, max_head_bytes: usize) -> Result<Option<RequestHead>, Refused> {
    let mut slots = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut parsed = httparse::Request::new(&mut []);
    let length = match httparse::ParserConfig::default().parse_request_with_uninit_headers(&mut parsed, buf, &mut slots)
    {
        Ok(httparse::Status::Complete(length)) if length <= max_head_bytes => length,
        Ok(httparse::Status::Complete(_)) => return Err(Refused::HeadTooLarge),
        Ok(httparse::Status::Partial) if buf.len() >= max_head_bytes => return Err(Refused::HeadTooLarge),
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(Refused::HeadTooLarge),
        Err(httparse::Error::Version) => return Err(Refused::Malformed("version")),
        Err(_) => return Err(Refused::Malformed("not an HTTP/1.x request")),
    };
    let target = parsed.path.expect("a complete request has a target");
    if target.len() > MAX_TARGET {
        return Err(Refused::TargetTooLong);
    }
    let method = Method::from_bytes(parsed.method.expect("a complete request has a method").as_bytes())
        .map_err(|_| Refused::Malformed("method"))?;
    let http11 = parsed.version == Some(1);
    // Offsets into the head, so that its bytes can be frozen once and shared
    // by the target and every value. They fit in u32: the head is bounded.
    let base = buf.as_ptr() as usize;
    let offset = |at: *const u8| (at as usize - base) as u32;
    let target_span = (offset(target.as_ptr()), target.len() as u32);
    let mut spans = [const { MaybeUninit::<[u32; 4]>::uninit() }; MAX_HEADERS];
    let count = parsed.headers.len();
    for (span, line) in spans.iter_mut().zip(parsed.headers.iter()) {
        let (name, value) = (offset(line.name.as_ptr()), offset(line.value.as_ptr()));
        span.write([name, name + line.name.len() as u32, value, value + line.value.len() as u32]);
    }
    let head = buf.split_to(length).freeze();
    let target_start = target_span.0 as usize;
    let uri = Uri::from_maybe_shared(head.slice(target_start..target_start + target_span.1 as usize))
        .map_err(|_| Refused::Malformed("target"))?;

    // Room for what the proxy adds on the way (a request id and up to five
    // forwarding headers): growing the map costs a reallocation and rehash.
    let mut headers = HeaderMap::with_capacity(count + ADDED_ON_THE_WAY);
    let mut framing = BodyFraming::Empty;
    let mut length_seen: Option<u64> = None;
    let mut coded = false;
    let mut chunked_last = false;
    let mut keep_alive = http11;
    let mut close = false;
    let mut expect_continue = false;
    let mut wants_upgrade = false;
    for span in &spans[..count] {
        // SAFETY: the loop above wrote the first `count` spans.
        let [name_start, name_end, value_start, value_end] = unsafe { span.assume_init() };
        let name = HeaderName::from_bytes(&head[name_start as usize..name_end as usize])
            .map_err(|_| Refused::Malformed("header name"))?;
        let value = HeaderValue::from_maybe_shared(head.slice(value_start as usize..value_end as usize))
            .map_err(|_| Refused::Malformed("header value"))?;
        match name {
            header::TRANSFER_ENCODING => {
                if !http11 {
                    return Err(Refused::Malformed("transfer-encoding on HTTP/1.0"));
                }
                coded = true;
                // The last coding of the last line decides (RFC 9112 6.1).
                chunked_last = last_token_is(&value, b"chunked");
            }
            header::CONTENT_LENGTH => {
                let length = super::parse_length(value.as_bytes()).ok_or(Refused::Malformed("content-length"))?;
                if length_seen.is_some_and(|seen| seen != length) {
                    return Err(Refused::Malformed("conflicting content-length"));
                }
                if length_seen.is_some() {
                    continue;
                }
                length_seen = Some(length);
            }
            header::CONNECTION => {
                if super::has_token(&value, b"close") {
                    close = true;
                } else if !http11 && super::has_token(&value, b"keep-alive") {
                    keep_alive = true;
                }
            }
            // HTTP/1.0 clients know no 100 (RFC 9110 10.1.1): they would take it for the response.
            header::EXPECT => expect_continue = http11 && value.as_bytes().eq_ignore_ascii_case(b"100-continue"),
            header::UPGRADE => wants_upgrade = http11,
            _ => {}
        }
        headers.append(name, value);
    }
    if coded {
        if !chunked_last {
            return Err(Refused::Malformed("transfer-encoding not ending in chunked"));
        }
        framing = BodyFraming::Chunked;
        // Both a coding and a length: the coding decides, the length is
        // dropped so no one downstream reads it, and the connection carries
        // nothing after this request (RFC 9112 6.3, as hyper did).
        if length_seen.is_some() {
            headers.remove(header::CONTENT_LENGTH);
            close = true;
        }
    } else if let Some(length) = length_seen.filter(|&length| length > 0) {
        framing = BodyFraming::Length(length);
    }

    // Nothing after a CONNECT is read as a request (it is refused, and what
    // follows it was meant for a tunnel).
    if method == Method::CONNECT {
        close = true;
    }
    let mut request = Request::new(());
    *request.method_mut() = method;
    *request.uri_mut() = uri;
    *request.version_mut() = if http11 { Version::HTTP_11 } else { Version::HTTP_10 };
    *request.headers_mut() = headers;
    Ok(Some(RequestHead { request, framing, keep_alive: keep_alive && !close, expect_continue, wants_upgrade }))
}

fn last_token_is(value: &HeaderValue, token: &[u8]) -> bool {
    super::tokens(value).next_back().is_some_and(|t| t.eq_ignore_ascii_case(token))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &[u8]) -> Result<Option<RequestHead>, Refused> {
        parse_request_head(&mut BytesMut::from(text), 8192)
    }

    fn framing(text: &str) -> Result<BodyFraming, Refused> {
        parse(text.as_bytes()).map(|head| head.expect("complete").framing)
    }

    #[test]
    fn a_request_is_parsed_and_its_body_left_in_the_buffer() {
        let mut buf = BytesMut::from(
            &b"POST /jobs?x=1 HTTP/1.1\r\nHost: bots\r\nContent-Length: 5\r\nX-A: b\r\n\r\nhelloGET"[..],
        );
        let head = parse_request_head(&mut buf, 8192).unwrap().unwrap();
        assert_eq!(head.request.method(), Method::POST);
        assert_eq!(head.request.uri(), "/jobs?x=1");
        assert_eq!(head.request.version(), Version::HTTP_11);
        assert_eq!(head.request.headers()["host"], "bots");
        assert_eq!(head.request.headers()["x-a"], "b");
        assert_eq!(head.framing, BodyFraming::Length(5));
        assert!(head.keep_alive && !head.expect_continue && !head.wants_upgrade);
        assert_eq!(&buf[..], b"helloGET");
    }

    #[test]
    fn an_incomplete_head_waits_and_a_head_over_the_limit_is_431() {
        assert!(parse(b"GET / HTTP/1.1\r\nHost: x\r\n").unwrap().is_none());
        let big = format!("GET / HTTP/1.1\r\nx: {}\r\n", "a".repeat(9000));
        assert_eq!(parse(big.as_bytes()).unwrap_err(), Refused::HeadTooLarge);
        let complete_but_big = format!("GET / HTTP/1.1\r\nx: {}\r\n\r\n", "a".repeat(9000));
        assert_eq!(parse(complete_but_big.as_bytes()).unwrap_err(), Refused::HeadTooLarge);
        let many: String = (0..=MAX_HEADERS).map(|i| format!("x{i}: y\r\n")).collect();
        assert_eq!(parse(format!("GET / HTTP/1.1\r\n{many}\r\n").as_bytes()).unwrap_err(), Refused::HeadTooLarge);
        assert_eq!(Refused::HeadTooLarge.status(), 431);
    }

    #[test]
    fn framing_follows_rfc_9112_and_ambiguity_is_refused() {
        assert_eq!(framing("GET / HTTP/1.1\r\n\r\n"), Ok(BodyFraming::Empty));
        assert_eq!(framing("POST / HTTP/1.1\r\ncontent-length: 0\r\n\r\n"), Ok(BodyFraming::Empty));
        assert_eq!(
            framing("POST / HTTP/1.1\r\ncontent-length: 7\r\ncontent-length: 7\r\n\r\n"),
            Ok(BodyFraming::Length(7))
        );
        assert_eq!(framing("POST / HTTP/1.1\r\ntransfer-encoding: gzip, chunked\r\n\r\n"), Ok(BodyFraming::Chunked));
        for refused in [
            "POST / HTTP/1.1\r\ncontent-length: 5\r\ncontent-length: 6\r\n\r\n",
            "POST / HTTP/1.1\r\ncontent-length: 5, 5\r\n\r\n",
            "POST / HTTP/1.1\r\ncontent-length: +5\r\n\r\n",
            "POST / HTTP/1.1\r\ncontent-length: \r\n\r\n",
            "POST / HTTP/1.1\r\ncontent-length: 99999999999999999999\r\n\r\n",
            "POST / HTTP/1.1\r\ntransfer-encoding: chunked, gzip\r\n\r\n",
            "POST / HTTP/1.1\r\ntransfer-encoding: chunked\r\ntransfer-encoding: identity\r\n\r\n",
            "POST / HTTP/1.0\r\ntransfer-encoding: chunked\r\n\r\n",
        ] {
            assert!(matches!(framing(refused), Err(Refused::Malformed(_))), "{refused:?}");
        }
        // A coding and a length: the coding wins, the length is gone, and the
        // connection ends after this request.
        let head =
            parse(b"POST / HTTP/1.1\r\ncontent-length: 3\r\ntransfer-encoding: chunked\r\n\r\n").unwrap().unwrap();
        assert_eq!(head.framing, BodyFraming::Chunked);
        assert!(!head.request.headers().contains_key(header::CONTENT_LENGTH));
        assert!(!head.keep_alive);
    }

    #[test]
    fn persistence_expectations_and_upgrades_are_read_from_the_headers() {
        let keep = |text: &str| parse(text.as_bytes()).unwrap().unwrap().keep_alive;
        assert!(keep("GET / HTTP/1.1\r\n\r\n"));
        assert!(!keep("GET / HTTP/1.1\r\nConnection: foo, Close\r\n\r\n"));
        assert!(!keep("GET / HTTP/1.0\r\n\r\n"));
        assert!(keep("GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n"));
        assert!(!keep("GET / HTTP/1.1\r\nConnection: close\r\nConnection: keep-alive\r\n\r\n"));
        let head = parse(b"PUT / HTTP/1.1\r\nExpect: 100-Continue\r\nUpgrade: websocket\r\n\r\n").unwrap().unwrap();
        assert!(head.expect_continue && head.wants_upgrade);
        assert!(!parse(b"GET / HTTP/1.0\r\nUpgrade: websocket\r\n\r\n").unwrap().unwrap().wants_upgrade);
        let old = parse(b"POST / HTTP/1.0\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n").unwrap().unwrap();
        assert!(!old.expect_continue, "no 100 to an HTTP/1.0 client");
    }

    #[test]
    fn what_is_not_a_request_is_400() {
        for refused in [
            &b"GARBAGE\r\n\r\n"[..],
            b"GET / HTTP/1.1\r\nhost: x\r\nbad header line\r\n\r\n",
            b"GET / HTTP/9.9\r\n\r\n",
            b"\x00\x01\x02\x03\xff\xfe\r\n\r\n",
            b"GET / HTTP/1.1\r\nx: a\x00b\r\n\r\n",
            b"GET /a b HTTP/1.1\r\n\r\n",
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
        ] {
            let refused_as = parse(refused);
            assert!(
                matches!(refused_as, Err(Refused::Malformed(_))),
                "{:?}: {refused_as:?}",
                String::from_utf8_lossy(refused)
            );
        }
        let long = format!("GET /{} HTTP/1.1\r\n\r\n", "a".repeat(MAX_TARGET));
        assert_eq!(
            parse_request_head(&mut BytesMut::from(long.as_bytes()), 1 << 20).unwrap_err(),
            Refused::TargetTooLong
        );
    }
}
