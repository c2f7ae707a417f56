//! HTTP/1.x messages as the listeners read and write them, without I/O: a
//! client's request head parsed and judged (`request`), and the head of the
//! response written back with its body's framing (`response`). The I/O, the
//! connection's life and the body in both directions are `server::http1`'s;
//! chunked bodies are read with the backend client's decoder
//! (`client::http1::codec`), the one reading of chunks in the proxy.

pub mod request;
pub mod response;

use http::HeaderValue;

/// A length value (`Content-Length`): decimal digits only (no sign, no
/// list), at most what a u64 holds.
pub(crate) fn parse_length(digits: &[u8]) -> Option<u64> {
    if digits.is_empty() || digits.len() > 19 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    digits.iter().try_fold(0u64, |sum, digit| sum.checked_mul(10)?.checked_add(u64::from(digit - b'0')))
}

/// The comma-separated tokens of a header value, trimmed.
fn tokens(value: &HeaderValue) -> impl DoubleEndedIterator<Item = &[u8]> {
    value.as_bytes().split(|&b| b == b',').map(<[u8]>::trim_ascii)
}

/// Whether `value` lists `token` (ASCII case ignored), as `Connection` does.
fn has_token(value: &HeaderValue, token: &[u8]) -> bool {
    tokens(value).any(|t| t.eq_ignore_ascii_case(token))
}
