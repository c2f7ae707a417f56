//! W3C Trace Context's `traceparent` header (version 00): read from a
//! client, written for a backend. `tracestate` is vendor data the proxy
//! passes through untouched.

use http::HeaderValue;

pub static TRACEPARENT: http::HeaderName = http::HeaderName::from_static("traceparent");

/// What a valid `traceparent` says: the trace, the caller's span in it, and
/// whether the caller sampled it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Parent {
    pub trace_id: u128,
    pub span_id: u64,
    pub sampled: bool,
}

/// Reads a `traceparent`. `None` for anything the spec says to ignore: a
/// wrong length or separator, upper-case or non-hex digits, the invalid
/// version `ff`, all-zero ids, and for version 00 anything after the flags.
/// A later version is read for its first four fields, as the spec asks.
pub fn parse(value: &[u8]) -> Option<Parent> {
    const LENGTH: usize = 55;
    if value.len() < LENGTH || value[2] != b'-' || value[35] != b'-' || value[52] != b'-' {
        return None;
    }
    let version = hex(&value[0..2])? as u8;
    match version {
        0xff => return None,
        0 if value.len() != LENGTH => return None,
        // A later version may add fields, after a dash.
        _ if value.len() > LENGTH && value[LENGTH] != b'-' => return None,
        _ => {}
    }
    let trace_id = hex(&value[3..35])?;
    let span_id = hex(&value[36..52])? as u64;
    let flags = hex(&value[53..55])? as u8;
    (trace_id != 0 && span_id != 0).then_some(Parent { trace_id, span_id, sampled: flags & 1 == 1 })
}

/// Lower-case hex digits as a number (at most 32 of them).
fn hex(digits: &[u8]) -> Option<u128> {
    digits.iter().try_fold(0u128, |value, &digit| {
        let nibble = match digit {
            b'0'..=b'9' => digit - b'0',
            b'a'..=b'f' => digit - b'a' + 10,
            _ => return None,
        };
        Some(value << 4 | u128::from(nibble))
    })
}

/// `00-<trace id>-<span id>-<flags>`.
pub fn traceparent(trace_id: u128, span_id: u64, sampled: bool) -> HeaderValue {
    let mut text = [0u8; 55];
    text[..3].copy_from_slice(b"00-");
    write_hex(&mut text[3..35], trace_id);
    text[35] = b'-';
    write_hex(&mut text[36..52], u128::from(span_id));
    text[52] = b'-';
    text[53..].copy_from_slice(if sampled { b"01" } else { b"00" });
    HeaderValue::from_bytes(&text).expect("hex digits and dashes are a valid header value")
}

/// `value`'s low `out.len()` hex digits, most significant first.
pub fn write_hex(out: &mut [u8], mut value: u128) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for byte in out.iter_mut().rev() {
        *byte = DIGITS[(value & 0xf) as usize];
        value >>= 4;
    }
}

/// A trace id as the 32 hex digits logs and trace viewers show.
pub fn trace_id_text(trace_id: u128) -> [u8; 32] {
    let mut text = [0u8; 32];
    write_hex(&mut text, trace_id);
    text
}

/// A new random id, never zero (zero is the spec's invalid id).
pub fn new_trace_id() -> u128 {
    fastrand::u128(1..)
}

pub fn new_span_id() -> u64 {
    fastrand::u64(1..)
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn the_specs_example_is_read_and_written_back_the_same() {
        let parent = parse(EXAMPLE.as_bytes()).unwrap();
        assert_eq!(parent.trace_id, 0x4bf92f3577b34da6a3ce929d0e0e4736);
        assert_eq!(parent.span_id, 0x00f067aa0ba902b7);
        assert!(parent.sampled);
        assert_eq!(traceparent(parent.trace_id, parent.span_id, true), EXAMPLE);
        assert_eq!(traceparent(parent.trace_id, parent.span_id, false).as_bytes()[53..], *b"00");
        assert_eq!(&trace_id_text(parent.trace_id), b"4bf92f3577b34da6a3ce929d0e0e4736");
    }

    #[test]
    fn what_the_spec_says_to_ignore_is_not_a_parent() {
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473g-00f067aa0ba902b7-01",
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01x",
        ] {
            assert_eq!(parse(bad.as_bytes()), None, "{bad:?}");
        }
        // A later version, with a field of its own.
        assert!(parse(b"01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00-more").is_some_and(|p| !p.sampled));
    }
}
