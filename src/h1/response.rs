//! A response head as the listener writes it to an HTTP/1.x client: the
//! status line, the headers, and the framing of the body, which is the
//! listener's to choose (a backend's `Content-Length` or chunking is not
//! passed through blindly): the body's known length, chunks for a body of
//! unknown length, or the connection's end for an HTTP/1.0 client.

use std::cell::RefCell;

use http::header::{self, HeaderMap};
use http::{Method, StatusCode};

/// How a response body follows its head (the backend client reads by it too).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResponseFraming {
    /// No body bytes at all (HEAD, 1xx, 204, 304, or a body known empty).
    Empty,
    Length(u64),
    Chunked,
    /// Until the connection closes (a body of unknown length to HTTP/1.0, or
    /// a backend's without a length).
    UntilClose,
    /// 101: the connection becomes a tunnel after the head.
    Upgrade,
}

/// What the body to send is known to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyLength {
    Known(u64),
    Unknown,
}

/// The request a response answers, as far as its head depends on it.
#[derive(Debug, Clone, Copy)]
pub struct Answering<'a> {
    pub method: &'a Method,
    /// The client spoke HTTP/1.1 (chunks are understood).
    pub http11: bool,
    /// The connection may carry another request after this response.
    pub keep_alive: bool,
}

/// Writes the head into `out`; returns the body's framing and whether the
/// connection stays open after the body.
pub fn encode_response_head(
    out: &mut Vec<u8>,
    status: StatusCode,
    headers: &HeaderMap,
    body: BodyLength,
    answering: Answering<'_>,
) -> (ResponseFraming, bool) {
    let mut keep_alive = answering.keep_alive;
    if status == StatusCode::OK {
        out.extend_from_slice(b"HTTP/1.1 200 OK\r\n");
    } else {
        out.extend_from_slice(b"HTTP/1.1 ");
        out.extend_from_slice(status.as_str().as_bytes());
        out.push(b' ');
        out.extend_from_slice(status.canonical_reason().unwrap_or("Unknown").as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    let mut date = false;
    let mut connection = false;
    let mut declared: Option<&[u8]> = None;
    for (name, value) in headers {
        match *name {
            // The listener frames the body itself.
            header::TRANSFER_ENCODING => continue,
            header::CONTENT_LENGTH => {
                declared.get_or_insert(value.as_bytes());
                continue;
            }
            header::CONNECTION => {
                connection = true;
                if super::has_token(value, b"close") {
                    keep_alive = false;
                }
            }
            header::DATE => date = true,
            _ => {}
        }
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }

    let framing = if status == StatusCode::SWITCHING_PROTOCOLS {
        keep_alive = false;
        ResponseFraming::Upgrade
    } else if status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
        || (answering.method == Method::CONNECT && status.is_success())
    {
        ResponseFraming::Empty
    } else if answering.method == Method::HEAD {
        // The length of the body a GET would have had, as the backend said
        // (when it is one number).
        if let Some(length) = declared.filter(|length| super::parse_length(length).is_some()) {
            write_length_line(out, length);
        }
        ResponseFraming::Empty
    } else {
        // A body of unknown length with a declared one is held to it.
        let known = match body {
            BodyLength::Known(length) => Some(length),
            BodyLength::Unknown => declared.and_then(super::parse_length),
        };
        match known {
            Some(length) => {
                out.extend_from_slice(b"content-length: ");
                out.extend_from_slice(crate::text::decimal(length, &mut [0; 20]));
                out.extend_from_slice(b"\r\n");
                if length == 0 {
                    ResponseFraming::Empty
                } else {
                    ResponseFraming::Length(length)
                }
            }
            None if answering.http11 => {
                out.extend_from_slice(b"transfer-encoding: chunked\r\n");
                ResponseFraming::Chunked
            }
            None => {
                keep_alive = false;
                ResponseFraming::UntilClose
            }
        }
    };
    if framing != ResponseFraming::Upgrade {
        if !keep_alive && !connection {
            out.extend_from_slice(b"connection: close\r\n");
        } else if keep_alive && !answering.http11 {
            out.extend_from_slice(b"connection: keep-alive\r\n");
        }
    }
    if !date {
        out.extend_from_slice(b"date: ");
        extend_with_date(out);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
    (framing, keep_alive)
}

fn write_length_line(out: &mut Vec<u8>, length: &[u8]) {
    out.extend_from_slice(b"content-length: ");
    out.extend_from_slice(length);
    out.extend_from_slice(b"\r\n");
}

/// A one-line response the listener makes itself, to a request it refused
/// before any service saw it; the connection closes after it.
pub fn refusal(out: &mut Vec<u8>, status: StatusCode) {
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("Unknown").as_bytes());
    out.extend_from_slice(b"\r\ncontent-length: 0\r\nconnection: close\r\ndate: ");
    extend_with_date(out);
    out.extend_from_slice(b"\r\n\r\n");
}

/// The `Date` value (RFC 9110 5.6.7), formatted once a second per thread.
fn extend_with_date(out: &mut Vec<u8>) {
    thread_local! {
        static CACHED: RefCell<(u64, [u8; 29])> = const { RefCell::new((u64::MAX, [0; 29])) };
    }
    let now = std::time::SystemTime::now();
    let second = now.duration_since(std::time::UNIX_EPOCH).map_or(0, |since| since.as_secs());
    CACHED.with_borrow_mut(|(cached_second, text)| {
        if *cached_second != second {
            text.copy_from_slice(httpdate::fmt_http_date(now).as_bytes());
            *cached_second = second;
        }
        out.extend_from_slice(&text[..]);
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn head(
        status: u16,
        headers: &[(&str, &str)],
        body: BodyLength,
        method: Method,
        http11: bool,
    ) -> (String, ResponseFraming, bool) {
        let mut map = HeaderMap::new();
        for (name, value) in headers {
            map.append(http::HeaderName::from_bytes(name.as_bytes()).unwrap(), HeaderValue::from_str(value).unwrap());
        }
        map.insert(header::DATE, HeaderValue::from_static("then"));
        let mut out = Vec::new();
        let answering = Answering { method: &method, http11, keep_alive: true };
        let (framing, keep) =
            encode_response_head(&mut out, StatusCode::from_u16(status).unwrap(), &map, body, answering);
        (String::from_utf8(out).unwrap(), framing, keep)
    }

    #[test]
    fn the_body_is_framed_by_its_length_chunks_or_the_close() {
        let (text, framing, keep) =
            head(200, &[("content-length", "99"), ("x-a", "b")], BodyLength::Known(5), Method::GET, true);
        assert_eq!(text, "HTTP/1.1 200 OK\r\nx-a: b\r\ndate: then\r\ncontent-length: 5\r\n\r\n");
        assert_eq!((framing, keep), (ResponseFraming::Length(5), true));

        let (text, framing, _) = head(502, &[("transfer-encoding", "chunked")], BodyLength::Unknown, Method::GET, true);
        assert_eq!(text, "HTTP/1.1 502 Bad Gateway\r\ndate: then\r\ntransfer-encoding: chunked\r\n\r\n");
        assert_eq!(framing, ResponseFraming::Chunked);

        let (text, framing, keep) = head(200, &[], BodyLength::Unknown, Method::GET, false);
        assert_eq!(text, "HTTP/1.1 200 OK\r\ndate: then\r\nconnection: close\r\n\r\n");
        assert_eq!((framing, keep), (ResponseFraming::UntilClose, false));

        let (_, framing, _) = head(200, &[("content-length", "7")], BodyLength::Unknown, Method::GET, true);
        assert_eq!(framing, ResponseFraming::Length(7));
    }

    #[test]
    fn head_204_304_and_101_carry_no_body() {
        let (text, framing, _) = head(200, &[("content-length", "1234")], BodyLength::Known(0), Method::HEAD, true);
        assert_eq!(text, "HTTP/1.1 200 OK\r\ndate: then\r\ncontent-length: 1234\r\n\r\n");
        assert_eq!(framing, ResponseFraming::Empty);
        for status in [204, 304] {
            let (text, framing, _) = head(status, &[("content-length", "3")], BodyLength::Known(3), Method::GET, true);
            assert!(!text.contains("content-length"), "{text}");
            assert_eq!(framing, ResponseFraming::Empty);
        }
        let (text, framing, keep) =
            head(101, &[("connection", "upgrade"), ("upgrade", "websocket")], BodyLength::Unknown, Method::GET, true);
        assert_eq!(
            text,
            "HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\nupgrade: websocket\r\ndate: then\r\n\r\n"
        );
        assert_eq!((framing, keep), (ResponseFraming::Upgrade, false));
    }

    #[test]
    fn persistence_is_said_where_it_differs_from_the_default() {
        let (text, _, keep) = head(200, &[("connection", "close")], BodyLength::Known(0), Method::GET, true);
        assert!(!keep && text.contains("connection: close\r\n") && text.matches("connection").count() == 1);
        let (text, _, keep) = head(200, &[], BodyLength::Known(0), Method::GET, false);
        assert!(keep && text.contains("connection: keep-alive\r\n"), "{text}");
        let mut out = Vec::new();
        refusal(&mut out, StatusCode::BAD_REQUEST);
        assert!(String::from_utf8(out)
            .unwrap()
            .starts_with("HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\nconnection: close\r\ndate: "));
    }
}
