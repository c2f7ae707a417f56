//! Numbers as decimal text, written into byte buffers without the `fmt`
//! machinery: what the request path and the access log write per request.

/// The decimal digits of `value`, written at the end of `scratch`.
pub fn decimal(mut value: u64, scratch: &mut [u8; 20]) -> &[u8] {
    let mut at = scratch.len();
    loop {
        at -= 1;
        scratch[at] = b'0' + (value % 10) as u8;
        value /= 10;
        if value == 0 {
            return &scratch[at..];
        }
    }
}

/// A duration as the config writes it: `30s`, or `250ms` below whole seconds.
pub fn duration(duration: std::time::Duration) -> String {
    if duration.subsec_millis() == 0 {
        format!("{}s", duration.as_secs())
    } else {
        format!("{}ms", duration.as_millis())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decimals_match_display() {
        for value in [0u64, 7, 10, 65_535, u64::MAX] {
            assert_eq!(decimal(value, &mut [0; 20]), value.to_string().as_bytes());
        }
    }
}
