//! Self-validating config values.
//!
//! Each type here parses and checks itself inside `Deserialize`, so a bad value is
//! reported by serde-saphyr at the value's own line and column (`weight: 0` points at
//! the `0`). Parsing functions are public for unit tests and for `/explain`-style
//! tooling that needs the same grammar.

use std::fmt;
use std::net::SocketAddr;
use std::str::FromStr;
use std::time::Duration;

use serde::de::{self, Deserializer};
use serde::Deserialize;

/// A duration written as a number and a unit: `150ms`, `2s`, `1.5s`, `5m`, `1h`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DurationValue(pub Duration);

impl FromStr for DurationValue {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let text = text.trim();
        let split = text
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(|| format!("duration `{text}` has no unit (use ms, s, m or h, e.g. `2s`)"))?;
        let (number, unit) = text.split_at(split);
        let value: f64 = number.parse().map_err(|_| format!("duration `{text}` does not start with a number"))?;
        let seconds_per_unit = match unit {
            "ms" => 0.001,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return Err(format!("duration `{text}` has unknown unit `{unit}` (use ms, s, m or h)")),
        };
        let seconds = value * seconds_per_unit;
        // Ten years: anything longer is a typo, and larger values overflow Instant arithmetic.
        if !(0.0..=315_360_000.0).contains(&seconds) {
            return Err(format!("duration `{text}` is out of range"));
        }
        Ok(DurationValue(Duration::from_secs_f64(seconds)))
    }
}

impl<'de> Deserialize<'de> for DurationValue {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(de::Error::custom)
    }
}

/// A backend weight: an integer from 1 to [`Weight::MAX`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Weight(pub u32);

impl Weight {
    pub const MAX: u32 = 10_000;
}

impl<'de> Deserialize<'de> for Weight {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let value = i64::deserialize(deserializer)?;
        if value < 1 || value > i64::from(Weight::MAX) {
            return Err(de::Error::custom(format!("weight must be between 1 and {}, got {value}", Weight::MAX)));
        }
        Ok(Weight(value as u32))
    }
}

/// A size in bytes (a plain non-negative integer).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteSize(pub u64);

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let value = i64::deserialize(deserializer)?;
        u64::try_from(value)
            .map(ByteSize)
            .map_err(|_| de::Error::custom(format!("a size in bytes cannot be negative, got {value}")))
    }
}

/// A listener address, `IP:PORT`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BindAddr(pub SocketAddr);

impl<'de> Deserialize<'de> for BindAddr {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse::<SocketAddr>()
            .map(BindAddr)
            .map_err(|_| de::Error::custom(format!("bind `{text}` is not IP:PORT (e.g. `0.0.0.0:8080`)")))
    }
}

/// Where the consistent-hash key comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySpec {
    Header(http::HeaderName),
    Cookie(String),
    Query(String),
    Path,
    ClientIp,
}

impl FromStr for KeySpec {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let bad = || format!("key `{text}` is not one of header:NAME, cookie:NAME, query:NAME, path, client_ip");
        match text {
            "path" => return Ok(KeySpec::Path),
            "client_ip" => return Ok(KeySpec::ClientIp),
            _ => {}
        }
        let (kind, name) = text.split_once(':').ok_or_else(bad)?;
        if name.is_empty() {
            return Err(format!("key `{text}` names no {kind}"));
        }
        match kind {
            "header" => http::HeaderName::from_bytes(name.as_bytes())
                .map(KeySpec::Header)
                .map_err(|_| format!("key `{text}`: `{name}` is not a valid header name")),
            "cookie" => Ok(KeySpec::Cookie(name.to_owned())),
            "query" => Ok(KeySpec::Query(name.to_owned())),
            _ => Err(bad()),
        }
    }
}

/// Written back in the config's own syntax (`header:x-job-id`, `path`, ...).
impl fmt::Display for KeySpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeySpec::Header(name) => write!(f, "header:{name}"),
            KeySpec::Cookie(name) => write!(f, "cookie:{name}"),
            KeySpec::Query(name) => write!(f, "query:{name}"),
            KeySpec::Path => f.write_str("path"),
            KeySpec::ClientIp => f.write_str("client_ip"),
        }
    }
}

impl<'de> Deserialize<'de> for KeySpec {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(de::Error::custom)
    }
}

/// A host to match: exact (`bots.internal`) or a suffix wildcard (`*.internal`).
/// Stored lowercase; matching ignores case and a port in the Host header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostPattern {
    Exact(String),
    /// Holds the suffix including its leading dot: `*.internal` is `.internal`.
    Suffix(String),
}

impl FromStr for HostPattern {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let lower = text.to_ascii_lowercase();
        let valid_label_chars =
            |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.');
        if let Some(suffix) = lower.strip_prefix("*.") {
            if valid_label_chars(suffix) {
                return Ok(HostPattern::Suffix(format!(".{suffix}")));
            }
        } else if valid_label_chars(&lower) {
            return Ok(HostPattern::Exact(lower));
        }
        Err(format!("host `{text}` is not a host name or `*.suffix` pattern"))
    }
}

impl<'de> Deserialize<'de> for HostPattern {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(de::Error::custom)
    }
}

/// An HTTP method name, upper case as written in requests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Method(pub http::Method);

impl<'de> Deserialize<'de> for Method {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        let valid = !text.is_empty() && text.bytes().all(|b| b.is_ascii_uppercase());
        match http::Method::from_bytes(text.as_bytes()) {
            Ok(method) if valid => Ok(Method(method)),
            _ => {
                Err(de::Error::custom(format!("method `{text}` is not an upper-case HTTP method such as GET or POST")))
            }
        }
    }
}

/// A header name used as a map key in `match.headers`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct HeaderName(pub String);

impl<'de> Deserialize<'de> for HeaderName {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        http::HeaderName::from_bytes(text.as_bytes())
            .map(|name| HeaderName(name.as_str().to_owned()))
            .map_err(|_| de::Error::custom(format!("`{text}` is not a valid header name")))
    }
}

impl fmt::Display for HeaderName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_with_units() {
        assert_eq!("150ms".parse::<DurationValue>().unwrap().0, Duration::from_millis(150));
        assert_eq!("2s".parse::<DurationValue>().unwrap().0, Duration::from_secs(2));
        assert_eq!("1.5s".parse::<DurationValue>().unwrap().0, Duration::from_millis(1500));
        assert_eq!("5m".parse::<DurationValue>().unwrap().0, Duration::from_secs(300));
        assert_eq!("1h".parse::<DurationValue>().unwrap().0, Duration::from_secs(3600));
        for bad in ["", "5", "s", "5x", "-1s", "1..2s", "5 s"] {
            assert!(bad.parse::<DurationValue>().is_err(), "{bad:?} should not parse");
        }
    }

    #[test]
    fn key_specs_parse() {
        assert_eq!("path".parse::<KeySpec>().unwrap(), KeySpec::Path);
        assert_eq!("client_ip".parse::<KeySpec>().unwrap(), KeySpec::ClientIp);
        assert_eq!("cookie:sid".parse::<KeySpec>().unwrap(), KeySpec::Cookie("sid".into()));
        assert_eq!("query:job".parse::<KeySpec>().unwrap(), KeySpec::Query("job".into()));
        assert!(matches!("header:X-Job-Id".parse::<KeySpec>().unwrap(), KeySpec::Header(h) if h == "x-job-id"));
        for text in ["path", "client_ip", "cookie:sid", "query:job", "header:x-job-id"] {
            assert_eq!(text.parse::<KeySpec>().unwrap().to_string(), text, "round trip");
        }
        for bad in ["header:", "header:bad name", "body:x", "ip", ""] {
            assert!(bad.parse::<KeySpec>().is_err(), "{bad:?} should not parse");
        }
    }

    #[test]
    fn host_patterns_parse() {
        assert_eq!("Bots.Internal".parse::<HostPattern>().unwrap(), HostPattern::Exact("bots.internal".into()));
        assert_eq!("*.internal".parse::<HostPattern>().unwrap(), HostPattern::Suffix(".internal".into()));
        for bad in ["", "*", "*.", "a b", "*x.com", "bots/internal"] {
            assert!(bad.parse::<HostPattern>().is_err(), "{bad:?} should not parse");
        }
    }
}
