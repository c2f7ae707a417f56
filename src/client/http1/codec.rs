//! HTTP/1.1 framing towards backends, without I/O: the request head as bytes,
//! the response head parsed from bytes, and how the response body is delimited
//! (RFC 9112 section 6). Strict where a lax reading would let a backend's
//! message be read two ways: conflicting lengths, a bad chunk size or a
//! malformed head end the exchange, and the connection is never reused.

use bytes::{Buf, Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, StatusCode, Version};

/// A response head larger than this is refused (hyper's default buffer limit
/// is larger; backends of bots and RPC services send a few hundred bytes).
pub const MAX_HEAD_BYTES: usize = 64 * 1024;
/// At most this many response header lines (hyper's limit too).
pub const MAX_HEADERS: usize = 100;
/// A chunk-size line (with extensions) longer than this is refused.
const MAX_CHUNK_LINE: usize = 4096;

/// Why a backend's response could not be read as one HTTP/1.1 message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Malformed {
    #[error("malformed response head ({0})")]
    Head(&'static str),
    #[error("response head larger than {MAX_HEAD_BYTES} bytes")]
    HeadTooLarge,
    #[error("invalid or conflicting Content-Length")]
    ContentLength,
    #[error("invalid chunk in a chunked body")]
    Chunk,
    #[error("malformed trailers")]
    Trailers,
    #[error("more than {MAX_INTERIM} interim (1xx) responses before the final one")]
    TooManyInterim,
}

/// Interim responses (100 Continue, 103 Early Hints) read before the final
/// one; a backend that sends more is not answering, it is stalling the proxy.
pub const MAX_INTERIM: u8 = 16;

/// How the request body is delimited on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestFraming {
    /// No body and no length header (GET, HEAD, DELETE... without a body).
    NoBody,
    /// `Content-Length`; `add_header` when the request did not carry it.
    Length { length: u64, add_header: bool },
    /// `Transfer-Encoding: chunked`, for a body of unknown length.
    Chunked,
}

impl RequestFraming {
    /// `declared` is the request's own `Content-Length`, if it has one;
    /// `empty` and `exact` describe the body to send.
    pub fn choose(method: &Method, declared: Option<u64>, empty: bool, exact: Option<u64>) -> Self {
        match (declared, exact) {
            (Some(length), _) => RequestFraming::Length { length, add_header: false },
            // Methods whose meaning implies a body announce an empty one, as
            // hyper and curl do; others send no length at all.
            (None, _) if empty => match *method {
                Method::POST | Method::PUT | Method::PATCH => RequestFraming::Length { length: 0, add_header: true },
                _ => RequestFraming::NoBody,
            },
            (None, Some(length)) => RequestFraming::Length { length, add_header: true },
            (None, None) => RequestFraming::Chunked,
        }
    }
}

/// Writes the request line and headers. The target must be in origin form
/// (the proxy rewrites it); `Transfer-Encoding` is the proxy's to set, and
/// is written only by `framing`.
pub fn encode_request_head(
    out: &mut Vec<u8>,
    method: &Method,
    target: &str,
    headers: &HeaderMap,
    framing: RequestFraming,
) {
    out.extend_from_slice(method.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(target.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    for (name, value) in headers {
        if name == header::TRANSFER_ENCODING {
            continue;
        }
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    match framing {
        RequestFraming::NoBody | RequestFraming::Length { add_header: false, .. } => {}
        RequestFraming::Length { length, add_header: true } => {
            out.extend_from_slice(b"content-length: ");
            out.extend_from_slice(crate::text::decimal(length, &mut [0; 20]));
            out.extend_from_slice(b"\r\n");
        }
        RequestFraming::Chunked => out.extend_from_slice(b"transfer-encoding: chunked\r\n"),
    }
    out.extend_from_slice(b"\r\n");
}

/// The prefix of one chunk of `length` bytes: its size in hex and CRLF.
pub fn chunk_prefix(length: usize, out: &mut Vec<u8>) {
    let digits = (usize::BITS - length.leading_zeros()).div_ceil(4).max(1);
    for shift in (0..digits).rev() {
        out.push(b"0123456789abcdef"[(length >> (shift * 4)) & 0xf]);
    }
    out.extend_from_slice(b"\r\n");
}

/// How the response body is delimited: one type for responses read from
/// backends and written to clients.
pub use crate::h1::response::ResponseFraming;

/// A parsed response head.
#[derive(Debug)]
pub struct ResponseHead {
    pub status: StatusCode,
    pub version: Version,
    pub headers: HeaderMap,
    pub framing: ResponseFraming,
    /// The connection may carry another request after this response.
    pub keep_alive: bool,
}

/// Parses a response head from the front of `buf`, removing it. `Ok(None)`:
/// not complete yet. Interim 1xx responses other than 101 are returned too
/// (the caller skips them).
pub fn parse_response_head(buf: &mut BytesMut, method: &Method) -> Result<Option<ResponseHead>, Malformed> {
    let mut slots = [const { std::mem::MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut response = httparse::Response::new(&mut []);
    let parsed = httparse::ParserConfig::default().parse_response_with_uninit_headers(&mut response, buf, &mut slots);
    let length = match parsed {
        Ok(httparse::Status::Complete(length)) if length <= MAX_HEAD_BYTES => length,
        Ok(httparse::Status::Complete(_)) => return Err(Malformed::HeadTooLarge),
        Ok(httparse::Status::Partial) if buf.len() >= MAX_HEAD_BYTES => return Err(Malformed::HeadTooLarge),
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(Malformed::Head("too many headers")),
        Err(_) => return Err(Malformed::Head("not HTTP/1.x")),
    };
    let version = match response.version {
        Some(0) => Version::HTTP_10,
        _ => Version::HTTP_11,
    };
    let status = response.code.and_then(|code| StatusCode::from_u16(code).ok()).ok_or(Malformed::Head("status"))?;
    // Header values are slices of the head, not copies: the head's bytes are
    // frozen once, and each value shares them.
    // Offsets fit in u32: the head is at most MAX_HEAD_BYTES.
    let base = buf.as_ptr() as usize;
    let offset = |at: *const u8| (at as usize - base) as u32;
    // Uninitialised, like httparse's slots: zeroing 1.6 KiB per response
    // showed up as a fifth of all cache-line writes a request caused.
    let mut spans = [const { std::mem::MaybeUninit::<[u32; 4]>::uninit() }; MAX_HEADERS];
    let count = response.headers.len();
    for (span, line) in spans.iter_mut().zip(response.headers.iter()) {
        let (name, value) = (offset(line.name.as_ptr()), offset(line.value.as_ptr()));
        span.write([name, name + line.name.len() as u32, value, value + line.value.len() as u32]);
    }
    let head = buf.split_to(length).freeze();
    let mut headers = HeaderMap::with_capacity(count);
    for span in &spans[..count] {
        // SAFETY: the loop above wrote the first `count` spans.
        let [name_start, name_end, value_start, value_end] = unsafe { span.assume_init() };
        let name = HeaderName::from_bytes(&head[name_start as usize..name_end as usize])
            .map_err(|_| Malformed::Head("header name"))?;
        let value = HeaderValue::from_maybe_shared(head.slice(value_start as usize..value_end as usize))
            .map_err(|_| Malformed::Head("header value"))?;
        headers.append(name, value);
    }
    let (framing, delimited) = response_framing(status, method, &mut headers)?;
    let keep_alive = delimited && persistent(version, &headers);
    Ok(Some(ResponseHead { status, version, headers, framing, keep_alive }))
}

/// The body's framing, and whether its end is known without the connection
/// closing (a message after it can be read unambiguously).
fn response_framing(
    status: StatusCode,
    method: &Method,
    headers: &mut HeaderMap,
) -> Result<(ResponseFraming, bool), Malformed> {
    if status == StatusCode::SWITCHING_PROTOCOLS {
        return Ok((ResponseFraming::Upgrade, false));
    }
    if status.is_informational() || status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED {
        return Ok((ResponseFraming::Empty, true));
    }
    if method == Method::HEAD {
        return Ok((ResponseFraming::Empty, true));
    }
    if headers.contains_key(header::TRANSFER_ENCODING) {
        // Transfer-Encoding overrides Content-Length, and a message with both
        // may be an attempt to be read two ways: this one is read by the
        // encoding, and the connection is not reused (RFC 9112 6.3).
        let both = headers.remove(header::CONTENT_LENGTH).is_some();
        let chunked_last = headers
            .get_all(header::TRANSFER_ENCODING)
            .iter()
            .next_back()
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.rsplit(',').next())
            .is_some_and(|coding| coding.trim().eq_ignore_ascii_case("chunked"));
        return Ok(if chunked_last { (ResponseFraming::Chunked, !both) } else { (ResponseFraming::UntilClose, false) });
    }
    let mut length: Option<u64> = None;
    for value in headers.get_all(header::CONTENT_LENGTH) {
        let text = value.to_str().map_err(|_| Malformed::ContentLength)?;
        for part in text.split(',') {
            let part = part.trim();
            if part.is_empty() || !part.bytes().all(|b| b.is_ascii_digit()) {
                return Err(Malformed::ContentLength);
            }
            let parsed: u64 = part.parse().map_err(|_| Malformed::ContentLength)?;
            if length.is_some_and(|seen| seen != parsed) {
                return Err(Malformed::ContentLength);
            }
            length = Some(parsed);
        }
    }
    Ok(match length {
        Some(length) => (ResponseFraming::Length(length), true),
        None => (ResponseFraming::UntilClose, false),
    })
}

/// HTTP/1.1 persists unless `Connection: close`; 1.0 only with `keep-alive`.
fn persistent(version: Version, headers: &HeaderMap) -> bool {
    let mut tokens = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .map(str::trim);
    if version == Version::HTTP_10 {
        tokens.any(|token| token.eq_ignore_ascii_case("keep-alive"))
    } else {
        !tokens.any(|token| token.eq_ignore_ascii_case("close"))
    }
}

/// The length of the chunk-size line at the front of `buf`, its CRLF
/// included; `None` while it is incomplete. A line that is too long, or with
/// a CR or LF anywhere but at its end (a bare LF inside an extension is where
/// two readers of one body part ways), is malformed.
fn size_line(buf: &[u8]) -> Result<Option<usize>, Malformed> {
    let window = &buf[..buf.len().min(MAX_CHUNK_LINE)];
    let Some(lf) = window.iter().position(|&b| b == b'\n') else {
        return if buf.len() >= MAX_CHUNK_LINE { Err(Malformed::Chunk) } else { Ok(None) };
    };
    if lf == 0 || buf[lf - 1] != b'\r' || window[..lf - 1].contains(&b'\r') {
        return Err(Malformed::Chunk);
    }
    Ok(Some(lf + 1))
}

/// Every LF in `lines` follows a CR.
fn lines_end_in_crlf(lines: &[u8]) -> bool {
    lines.iter().enumerate().all(|(at, &b)| b != b'\n' || (at > 0 && lines[at - 1] == b'\r'))
}

/// Reads a chunked body (RFC 9112 section 7.1) from a buffer that fills as
/// bytes arrive.
#[derive(Debug)]
pub struct ChunkedDecoder {
    state: ChunkState,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ChunkState {
    Size,
    Data(u64),
    DataEnd,
    Trailers,
    Done,
}

/// What the decoder could take from the buffer.
#[derive(Debug)]
pub enum Chunk {
    Data(Bytes),
    Trailers(HeaderMap),
    /// More bytes are needed.
    Incomplete,
    /// The body ended (after any trailers).
    End,
}

impl Default for ChunkedDecoder {
    fn default() -> Self {
        ChunkedDecoder { state: ChunkState::Size }
    }
}

impl ChunkedDecoder {
    /// Takes the next piece of the body from the front of `buf`.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Chunk, Malformed> {
        loop {
            match self.state {
                ChunkState::Size => match size_line(buf)?.map(|line| httparse::parse_chunk_size(&buf[..line])) {
                    None => return Ok(Chunk::Incomplete),
                    Some(parsed) => match parsed {
                        // httparse reads a line without a digit (`\r\n`, `;x\r\n`)
                        // as size 0, the last chunk: the body would end early and
                        // what follows would be read as the next response.
                        Ok(httparse::Status::Complete(_)) if !buf[0].is_ascii_hexdigit() => {
                            return Err(Malformed::Chunk)
                        }
                        Ok(httparse::Status::Complete((used, size))) => {
                            buf.advance(used);
                            self.state = if size == 0 { ChunkState::Trailers } else { ChunkState::Data(size) };
                        }
                        // The whole line is there: httparse wanting more means it is not one.
                        Ok(httparse::Status::Partial) | Err(_) => return Err(Malformed::Chunk),
                    },
                },
                ChunkState::Data(left) => {
                    if buf.is_empty() {
                        return Ok(Chunk::Incomplete);
                    }
                    let take = usize::try_from(left).unwrap_or(usize::MAX).min(buf.len());
                    let data = buf.split_to(take).freeze();
                    let left = left - take as u64;
                    self.state = if left == 0 { ChunkState::DataEnd } else { ChunkState::Data(left) };
                    return Ok(Chunk::Data(data));
                }
                ChunkState::DataEnd => {
                    if buf.len() < 2 {
                        return Ok(Chunk::Incomplete);
                    }
                    if &buf[..2] != b"\r\n" {
                        return Err(Malformed::Chunk);
                    }
                    buf.advance(2);
                    self.state = ChunkState::Size;
                }
                ChunkState::Trailers => {
                    if buf.len() < 2 {
                        return Ok(Chunk::Incomplete);
                    }
                    if buf.starts_with(b"\r\n") {
                        buf.advance(2);
                        self.state = ChunkState::Done;
                        return Ok(Chunk::End);
                    }
                    let mut slots = [httparse::EMPTY_HEADER; 32];
                    match httparse::parse_headers(buf, &mut slots) {
                        // Lines end in CRLF, as the chunk lines do: httparse
                        // also takes a bare LF, which another reader may not.
                        Ok(httparse::Status::Complete((used, _))) if !lines_end_in_crlf(&buf[..used]) => {
                            return Err(Malformed::Trailers)
                        }
                        Ok(httparse::Status::Complete((used, lines))) => {
                            let mut trailers = HeaderMap::with_capacity(lines.len());
                            for line in lines.iter() {
                                let name =
                                    HeaderName::from_bytes(line.name.as_bytes()).map_err(|_| Malformed::Trailers)?;
                                let value = HeaderValue::from_bytes(line.value).map_err(|_| Malformed::Trailers)?;
                                trailers.append(name, value);
                            }
                            buf.advance(used);
                            self.state = ChunkState::Done;
                            return Ok(Chunk::Trailers(trailers));
                        }
                        Ok(httparse::Status::Partial) if buf.len() > MAX_HEAD_BYTES => return Err(Malformed::Trailers),
                        Ok(httparse::Status::Partial) => return Ok(Chunk::Incomplete),
                        Err(_) => return Err(Malformed::Trailers),
                    }
                }
                ChunkState::Done => return Ok(Chunk::End),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str, method: Method) -> Result<Option<ResponseHead>, Malformed> {
        parse_response_head(&mut BytesMut::from(text), &method)
    }

    #[test]
    fn request_head_carries_headers_and_framing() {
        let mut headers = HeaderMap::new();
        headers.insert(header::HOST, HeaderValue::from_static("bots"));
        headers.insert(header::TRANSFER_ENCODING, HeaderValue::from_static("gzip"));
        let mut out = Vec::new();
        let framing = RequestFraming::choose(&Method::POST, None, false, None);
        encode_request_head(&mut out, &Method::POST, "/jobs?x=1", &headers, framing);
        assert_eq!(out, b"POST /jobs?x=1 HTTP/1.1\r\nhost: bots\r\ntransfer-encoding: chunked\r\n\r\n");

        out.clear();
        let framing = RequestFraming::choose(&Method::PUT, None, true, Some(0));
        encode_request_head(&mut out, &Method::PUT, "/", &HeaderMap::new(), framing);
        assert_eq!(out, b"PUT / HTTP/1.1\r\ncontent-length: 0\r\n\r\n");

        out.clear();
        let framing = RequestFraming::choose(&Method::GET, None, true, Some(0));
        encode_request_head(&mut out, &Method::GET, "/", &HeaderMap::new(), framing);
        assert_eq!(out, b"GET / HTTP/1.1\r\n\r\n");

        out.clear();
        let framing = RequestFraming::choose(&Method::POST, None, false, Some(12_345_678_901));
        encode_request_head(&mut out, &Method::POST, "/", &HeaderMap::new(), framing);
        assert_eq!(out, b"POST / HTTP/1.1\r\ncontent-length: 12345678901\r\n\r\n");
        assert_eq!(
            RequestFraming::choose(&Method::POST, Some(5), false, None),
            RequestFraming::Length { length: 5, add_header: false }
        );
    }

    #[test]
    fn chunk_prefixes_are_hex() {
        for (length, expected) in [(0, "0\r\n"), (1, "1\r\n"), (255, "ff\r\n"), (4096, "1000\r\n")] {
            let mut out = Vec::new();
            chunk_prefix(length, &mut out);
            assert_eq!(out, expected.as_bytes());
        }
    }

    #[test]
    fn heads_are_parsed_with_their_framing() {
        let head = parse("HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-A: b\r\n\r\nhello", Method::GET).unwrap().unwrap();
        assert_eq!(head.status, 200);
        assert_eq!(head.framing, ResponseFraming::Length(5));
        assert!(head.keep_alive);
        assert_eq!(head.headers["x-a"], "b");

        let mut buf = BytesMut::from("HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello");
        parse_response_head(&mut buf, &Method::GET).unwrap().unwrap();
        assert_eq!(&buf[..], b"hello", "the body stays in the buffer");

        assert_eq!(parse("HTTP/1.1 200 OK\r\nContent-Len", Method::GET).unwrap().map(|h| h.status), None);
        let chunked =
            parse("HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", Method::GET).unwrap().unwrap();
        assert_eq!(chunked.framing, ResponseFraming::Chunked);
        assert!(chunked.keep_alive);
        let close = parse("HTTP/1.1 200 OK\r\n\r\n", Method::GET).unwrap().unwrap();
        assert_eq!((close.framing, close.keep_alive), (ResponseFraming::UntilClose, false));
        let head = parse("HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n", Method::HEAD).unwrap().unwrap();
        assert_eq!((head.framing, head.keep_alive), (ResponseFraming::Empty, true));
        let empty = parse("HTTP/1.1 304 Not Modified\r\nContent-Length: 9\r\n\r\n", Method::GET).unwrap().unwrap();
        assert_eq!(empty.framing, ResponseFraming::Empty);
        let upgrade = parse("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n", Method::GET);
        assert_eq!(upgrade.unwrap().unwrap().framing, ResponseFraming::Upgrade);
        let interim = parse("HTTP/1.1 100 Continue\r\n\r\n", Method::POST).unwrap().unwrap();
        assert!(interim.status.is_informational());
    }

    #[test]
    fn persistence_follows_version_and_connection() {
        let old = parse("HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n", Method::GET).unwrap().unwrap();
        assert!(!old.keep_alive);
        let old = parse("HTTP/1.0 200 OK\r\nConnection: Keep-Alive\r\nContent-Length: 0\r\n\r\n", Method::GET);
        assert!(old.unwrap().unwrap().keep_alive);
        let closing = parse("HTTP/1.1 200 OK\r\nConnection: foo, close\r\nContent-Length: 0\r\n\r\n", Method::GET);
        assert!(!closing.unwrap().unwrap().keep_alive);
    }

    #[test]
    fn ambiguous_lengths_are_refused_or_not_reused() {
        assert_eq!(
            parse("HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n", Method::GET).unwrap_err(),
            Malformed::ContentLength
        );
        assert_eq!(
            parse("HTTP/1.1 200 OK\r\nContent-Length: +5\r\n\r\n", Method::GET).unwrap_err(),
            Malformed::ContentLength
        );
        assert_eq!(
            parse("HTTP/1.1 200 OK\r\nContent-Length: 5, 6\r\n\r\n", Method::GET).unwrap_err(),
            Malformed::ContentLength
        );
        let same = parse("HTTP/1.1 200 OK\r\nContent-Length: 5, 5\r\n\r\n", Method::GET).unwrap().unwrap();
        assert_eq!(same.framing, ResponseFraming::Length(5));
        let both = parse("HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n", Method::GET)
            .unwrap()
            .unwrap();
        assert_eq!((both.framing, both.keep_alive), (ResponseFraming::Chunked, false));
        assert!(!both.headers.contains_key(header::CONTENT_LENGTH));
        assert!(matches!(parse("HTTP/1.1 200 OK\r\nBad Header: x\r\n\r\n", Method::GET), Err(Malformed::Head(_))));
        assert!(matches!(parse("SSH-2.0-OpenSSH\r\n\r\n", Method::GET), Err(Malformed::Head(_))));
        let huge = format!("HTTP/1.1 200 OK\r\nX: {}", "a".repeat(MAX_HEAD_BYTES));
        assert_eq!(parse(&huge, Method::GET).unwrap_err(), Malformed::HeadTooLarge);
    }

    #[test]
    fn chunked_bodies_decode_across_partial_reads() {
        let wire = b"5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nGrpc-Status: 0\r\n\r\n";
        // Fed one byte at a time, the decoder yields the same body and trailers.
        let mut decoder = ChunkedDecoder::default();
        let mut buf = BytesMut::new();
        let mut body = Vec::new();
        let mut trailers = None;
        for &byte in wire {
            buf.extend_from_slice(&[byte]);
            loop {
                match decoder.decode(&mut buf).unwrap() {
                    Chunk::Data(data) => body.extend_from_slice(&data),
                    Chunk::Trailers(map) => trailers = Some(map),
                    Chunk::Incomplete | Chunk::End => break,
                }
            }
        }
        assert_eq!(body, b"hello world");
        assert_eq!(trailers.unwrap()["grpc-status"], "0");
        assert!(matches!(decoder.decode(&mut buf), Ok(Chunk::End)));
        assert!(buf.is_empty());

        let mut decoder = ChunkedDecoder::default();
        let mut buf = BytesMut::from(&b"3\r\nabc\r\n0\r\n\r\nNEXT"[..]);
        assert!(matches!(decoder.decode(&mut buf).unwrap(), Chunk::Data(d) if d == "abc"));
        assert!(matches!(decoder.decode(&mut buf).unwrap(), Chunk::End));
        assert_eq!(&buf[..], b"NEXT", "bytes after the body are left alone");
    }

    #[test]
    fn bad_chunks_are_refused() {
        let no_digits = [&b"\r\n\r\n"[..], b";ext\r\n\r\n", b" \r\n\r\n", b"3\r\nabc\r\n\r\n\r\n"];
        for wire in [&b"zz\r\n"[..], b"3\r\nabcX\r\n", b"11111111111111111\r\n"].into_iter().chain(no_digits) {
            let mut decoder = ChunkedDecoder::default();
            let mut buf = BytesMut::from(wire);
            let mut result = Ok(Chunk::Incomplete);
            for _ in 0..4 {
                result = decoder.decode(&mut buf);
                if !matches!(result, Ok(Chunk::Data(_))) {
                    break;
                }
            }
            assert_eq!(result.unwrap_err(), Malformed::Chunk, "{}", String::from_utf8_lossy(wire));
        }
        let mut decoder = ChunkedDecoder::default();
        let mut buf = BytesMut::from(&[b'1'; MAX_CHUNK_LINE + 1][..]);
        assert_eq!(decoder.decode(&mut buf).unwrap_err(), Malformed::Chunk);
    }

    #[test]
    fn chunk_lines_end_in_crlf_and_nowhere_else() {
        let long_extension = format!("2;{}\r\nxx\r\n", "e".repeat(MAX_CHUNK_LINE));
        let lines: [&[u8]; 5] =
            [b"2;\nxx\r\n", b"2\nxx\r\n", b"2;a\rb\r\nxx\r\n", b"2\r\r\nxx\r\n", long_extension.as_bytes()];
        for wire in lines {
            let mut buf = BytesMut::from(wire);
            let refused = ChunkedDecoder::default().decode(&mut buf);
            assert_eq!(refused.unwrap_err(), Malformed::Chunk, "{:?}", String::from_utf8_lossy(wire));
        }
        for wire in [&b"0\r\n\nGET"[..], b"0\r\nx: y\n\r\n", b"0\r\nx: y\r\n\n"] {
            let mut buf = BytesMut::from(wire);
            let refused = ChunkedDecoder::default().decode(&mut buf);
            assert_eq!(refused.unwrap_err(), Malformed::Trailers, "{:?}", String::from_utf8_lossy(wire));
        }
        let mut buf = BytesMut::from(&b"2;name=\"v\"\r\nxx\r\n0\r\n\r\n"[..]);
        let mut decoder = ChunkedDecoder::default();
        assert!(matches!(decoder.decode(&mut buf).unwrap(), Chunk::Data(d) if d == "xx"));
        assert!(matches!(decoder.decode(&mut buf).unwrap(), Chunk::End));
    }

    /// Arbitrary and mangled bytes from a backend never panic the parser or
    /// the chunk decoder (a smoke test of mutated messages, not a fuzzer).
    #[test]
    fn arbitrary_bytes_never_panic() {
        let seeds: [&[u8]; 3] = [
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"HTTP/1.0 101 Switching\r\nConnection: keep-alive, close\r\n\r\n",
            b"5;a=b\r\nhello\r\n0\r\nX: y\r\n\r\n",
        ];
        let mut rng = fastrand::Rng::with_seed(7);
        for round in 0..20_000 {
            let mut input = seeds[round % seeds.len()].to_vec();
            for _ in 0..rng.usize(0..6) {
                let at = rng.usize(0..=input.len());
                match rng.u8(0..3) {
                    0 if at < input.len() => input[at] = rng.u8(..),
                    1 => input.insert(at, rng.u8(..)),
                    _ => input.truncate(at),
                }
            }
            for method in [Method::GET, Method::HEAD] {
                let _ = parse_response_head(&mut BytesMut::from(&input[..]), &method);
            }
            let mut decoder = ChunkedDecoder::default();
            let mut buf = BytesMut::from(&input[..]);
            for _ in 0..64 {
                match decoder.decode(&mut buf) {
                    Ok(Chunk::Data(_) | Chunk::Trailers(_)) => {}
                    _ => break,
                }
            }
        }
    }
}
