//! Arbitrary hosts, paths and header values through key parsing and extraction:
//! whatever a client sends, key extraction must not panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use switchyard::balance::{extract_key, PickRequest};
use switchyard::config::KeySpec;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let mut parts = text.splitn(3, '\n');
    let (spec, target, header) = (parts.next().unwrap_or(""), parts.next().unwrap_or("/"), parts.next().unwrap_or(""));
    let Ok(spec) = spec.parse::<KeySpec>() else { return };
    let Ok(uri) = target.parse::<http::Uri>() else { return };
    let mut headers = http::HeaderMap::new();
    if let Ok(value) = http::HeaderValue::from_str(header) {
        headers.insert(http::header::COOKIE, value.clone());
        headers.insert("x-job-id", value);
    }
    let request = PickRequest { headers: &headers, uri: &uri, client_ip: std::net::IpAddr::from([10, 0, 0, 1]), exclude: &[] };
    let _ = extract_key(&spec, &request, |bytes| bytes.len());
});
