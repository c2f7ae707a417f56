//! Active health checks: one checker task per (backend address, check), probing
//! on an interval with jitter, feeding a shared [`CheckStatus`].
//!
//! [`Checkers`] reconciles the running checkers with each new snapshot: checks
//! that appear start, checks that disappear stop, checks that stay keep running
//! (and keep their status), and two upstreams listing the same backend with the
//! same check share one checker. Each probe opens a fresh connection, so a
//! backend that stops accepting is noticed even while pooled proxy connections
//! to it still work.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use bytes::{Buf, Bytes};
use http::{header, Request};
use http_body_util::{BodyExt, Empty, Full, Limited};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;

use super::{describe, CheckStatus, Transition};
use crate::config::{ActiveCheck, Probe};
use crate::state::Snapshot;

/// A health check response body is read up to this size when `expect_body` is set.
const MAX_CHECK_BODY: usize = 64 * 1024;

type Key = (Arc<str>, ActiveCheck);

struct Checker {
    status: Arc<CheckStatus>,
    /// Upstreams listing this backend with this check, for metric labels.
    upstreams: Arc<Mutex<Vec<Arc<str>>>>,
    task: JoinHandle<()>,
}

/// The running checkers of one proxy.
#[derive(Default)]
pub struct Checkers {
    running: HashMap<Key, Checker>,
}

impl Drop for Checkers {
    fn drop(&mut self) {
        for checker in self.running.values() {
            checker.task.abort();
        }
    }
}

impl Checkers {
    /// Makes the running checkers exactly those `snapshot` needs. Must be called
    /// inside a tokio runtime.
    pub fn sync(&mut self, snapshot: &Snapshot) {
        let mut wanted: HashMap<Key, (Arc<CheckStatus>, Vec<Arc<str>>)> = HashMap::new();
        for upstream in &snapshot.upstreams {
            let Some(check) = &upstream.config.health.active else { continue };
            for backend in &upstream.backends {
                let status = backend.check.as_ref().expect("backends of a checked upstream have a status");
                let entry = wanted
                    .entry((Arc::clone(&backend.address), check.clone()))
                    .or_insert_with(|| (Arc::clone(status), Vec::new()));
                entry.1.push(Arc::clone(&upstream.name));
            }
        }
        self.running.retain(|key, checker| {
            let keep = wanted.get(key).is_some_and(|(status, _)| Arc::ptr_eq(status, &checker.status));
            if !keep {
                checker.task.abort();
            }
            keep
        });
        for (key, (status, upstreams)) in wanted {
            match self.running.get(&key) {
                Some(checker) => *checker.upstreams.lock().expect("never poisoned") = upstreams,
                None => {
                    let upstreams = Arc::new(Mutex::new(upstreams));
                    let task =
                        tokio::spawn(run(key.0.clone(), key.1.clone(), Arc::clone(&status), Arc::clone(&upstreams)));
                    self.running.insert(key, Checker { status, upstreams, task });
                }
            }
        }
    }

    pub fn len(&self) -> usize {
        self.running.len()
    }

    pub fn is_empty(&self) -> bool {
        self.running.is_empty()
    }
}

async fn run(address: Arc<str>, check: ActiveCheck, status: Arc<CheckStatus>, upstreams: Arc<Mutex<Vec<Arc<str>>>>) {
    // Spread the first probes of many backends over one interval instead of
    // probing them all at the same instant.
    tokio::time::sleep(check.interval.mul_f64(fastrand::f64())).await;
    loop {
        let (passed, reason) = match tokio::time::timeout(check.timeout, probe(&address, &check.probe)).await {
            Ok(Ok(reason)) => (true, reason),
            Ok(Err(reason)) => (false, reason),
            Err(_) => (false, format!("timeout after {}", describe(check.timeout))),
        };
        let names = upstreams.lock().expect("never poisoned").clone();
        for upstream in &names {
            crate::metrics::health_check(upstream, &address, passed);
        }
        match status.record(passed, reason.clone(), check.healthy_after, check.unhealthy_after) {
            Transition::BecameUnhealthy => {
                tracing::warn!(backend = %address, upstreams = ?names, %reason, "backend is unhealthy")
            }
            Transition::BecameHealthy => {
                tracing::info!(backend = %address, upstreams = ?names, "backend is healthy again")
            }
            Transition::None => {}
        }
        // Up to 10% jitter so checkers started together drift apart.
        tokio::time::sleep(check.interval.mul_f64(0.9 + 0.2 * fastrand::f64())).await;
    }
}

/// One probe: `Ok(reason)` if it passed, `Err(reason)` if not.
pub async fn probe(address: &str, probe: &Probe) -> Result<String, String> {
    match probe {
        Probe::Tcp => TcpStream::connect(address).await.map(|_| "connected".to_owned()).map_err(|e| io_reason(&e)),
        Probe::Http { path, expect_status, host, expect_body } => {
            http_probe(address, path, expect_status, host.as_deref(), expect_body.as_deref()).await
        }
        Probe::Grpc { service } => grpc_probe(address, service).await,
    }
}

fn io_reason(error: &std::io::Error) -> String {
    match error.kind() {
        std::io::ErrorKind::ConnectionRefused => "connection refused".to_owned(),
        std::io::ErrorKind::ConnectionReset => "connection reset".to_owned(),
        _ => error.to_string(),
    }
}

/// Aborts the connection task when the probe ends (or is cancelled by its timeout).
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

async fn http_probe(
    address: &str,
    path: &str,
    expect_status: &[u16],
    host: Option<&str>,
    expect_body: Option<&str>,
) -> Result<String, String> {
    let stream = TcpStream::connect(address).await.map_err(|e| io_reason(&e))?;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.map_err(|e| e.to_string())?;
    let _connection = AbortOnDrop(tokio::spawn(async move {
        let _ = connection.await;
    }));
    let request = Request::get(path)
        .header(header::HOST, host.unwrap_or(address))
        .header(header::USER_AGENT, "switchyard-health-check")
        .body(Empty::<Bytes>::new())
        .map_err(|e| e.to_string())?;
    let response = sender.send_request(request).await.map_err(|e| {
        if e.is_incomplete_message() || e.is_closed() {
            "connection closed before a response".to_owned()
        } else {
            e.to_string()
        }
    })?;
    let status = response.status().as_u16();
    if !expect_status.contains(&status) {
        return Err(format!("status {status}"));
    }
    if let Some(wanted) = expect_body {
        let body = Limited::new(response.into_body(), MAX_CHECK_BODY)
            .collect()
            .await
            .map_err(|e| format!("reading the body failed: {e}"))?
            .to_bytes();
        if !String::from_utf8_lossy(&body).contains(wanted) {
            return Err(format!("status {status}, body does not contain `{wanted}`"));
        }
    }
    Ok(format!("status {status}"))
}

/// `grpc.health.v1.Health/Check` over h2c. The two messages are tiny, so they
/// are encoded by hand: `HealthCheckRequest { string service = 1; }` and
/// `HealthCheckResponse { ServingStatus status = 1; }` with SERVING = 1.
async fn grpc_probe(address: &str, service: &str) -> Result<String, String> {
    let stream = TcpStream::connect(address).await.map_err(|e| io_reason(&e))?;
    let (mut sender, connection) = hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
        .await
        .map_err(|e| format!("HTTP/2 handshake failed: {e}"))?;
    let _connection = AbortOnDrop(tokio::spawn(async move {
        let _ = connection.await;
    }));
    let request = Request::post(format!("http://{address}/grpc.health.v1.Health/Check"))
        .header(header::CONTENT_TYPE, "application/grpc")
        .header(header::TE, "trailers")
        .header(header::USER_AGENT, "switchyard-health-check")
        .body(Full::new(grpc_request(service)))
        .map_err(|e| e.to_string())?;
    let response = sender.send_request(request).await.map_err(|e| e.to_string())?;
    if response.status() != http::StatusCode::OK {
        return Err(format!("status {}", response.status().as_u16()));
    }
    let headers = response.headers().clone();
    let collected = Limited::new(response.into_body(), MAX_CHECK_BODY)
        .collect()
        .await
        .map_err(|e| format!("reading the response failed: {e}"))?;
    // A trailers-only response carries grpc-status in the headers.
    let trailers = collected.trailers().cloned().unwrap_or(headers);
    let grpc_status = trailers.get("grpc-status").and_then(|v| v.to_str().ok()).unwrap_or("missing");
    if grpc_status != "0" {
        let message = trailers.get("grpc-message").and_then(|v| v.to_str().ok()).unwrap_or("");
        return Err(format!("grpc-status {grpc_status} {message}").trim_end().to_owned());
    }
    match grpc_serving_status(collected.to_bytes()) {
        Some(1) => Ok("SERVING".to_owned()),
        Some(2) => Err("NOT_SERVING".to_owned()),
        Some(3) => Err("SERVICE_UNKNOWN".to_owned()),
        Some(0) => Err("UNKNOWN".to_owned()),
        Some(other) => Err(format!("serving status {other}")),
        None => Err("malformed health response".to_owned()),
    }
}

/// A gRPC length-prefixed message holding `HealthCheckRequest { service }`.
fn grpc_request(service: &str) -> Bytes {
    let mut message = Vec::with_capacity(service.len() + 8);
    if !service.is_empty() {
        message.push(0x0a); // field 1, length-delimited
        push_varint(&mut message, service.len() as u64);
        message.extend_from_slice(service.as_bytes());
    }
    let mut frame = Vec::with_capacity(message.len() + 5);
    frame.push(0); // not compressed
    frame.extend_from_slice(&(message.len() as u32).to_be_bytes());
    frame.extend_from_slice(&message);
    Bytes::from(frame)
}

fn push_varint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push((value as u8) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

fn read_varint(bytes: &mut Bytes) -> Option<u64> {
    let mut value = 0u64;
    for shift in (0..64).step_by(7) {
        if !bytes.has_remaining() {
            return None;
        }
        let byte = bytes.get_u8();
        value |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Some(value);
        }
    }
    None
}

/// The `status` field of a framed `HealthCheckResponse`; 0 (UNKNOWN) if absent,
/// as protobuf omits default values.
fn grpc_serving_status(mut frame: Bytes) -> Option<u64> {
    if frame.len() < 5 || frame[0] != 0 {
        return None;
    }
    frame.advance(1);
    let length = frame.get_u32() as usize;
    if frame.len() < length {
        return None;
    }
    let mut message = frame.split_to(length);
    let mut status = 0;
    while message.has_remaining() {
        let tag = read_varint(&mut message)?;
        match (tag >> 3, tag & 7) {
            (1, 0) => status = read_varint(&mut message)?,
            (_, 0) => {
                read_varint(&mut message)?;
            }
            (_, 2) => {
                let skip = read_varint(&mut message)? as usize;
                if message.len() < skip {
                    return None;
                }
                message.advance(skip);
            }
            (_, 1) if message.len() >= 8 => message.advance(8),
            (_, 5) if message.len() >= 4 => message.advance(4),
            _ => return None,
        }
    }
    Some(status)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_messages_round_trip() {
        assert_eq!(&grpc_request("")[..], &[0, 0, 0, 0, 0]);
        assert_eq!(&grpc_request("ab")[..], &[0, 0, 0, 0, 4, 0x0a, 2, b'a', b'b']);
        assert_eq!(grpc_serving_status(Bytes::from_static(&[0, 0, 0, 0, 2, 0x08, 1])), Some(1));
        assert_eq!(grpc_serving_status(Bytes::from_static(&[0, 0, 0, 0, 0])), Some(0));
        assert_eq!(grpc_serving_status(Bytes::from_static(&[0, 0, 0, 0, 4, 0x12, 1, b'x', 0x08])), None);
        assert_eq!(grpc_serving_status(Bytes::from_static(&[1, 0, 0, 0, 0])), None);
        assert_eq!(grpc_serving_status(Bytes::from_static(&[0, 0, 0, 0, 9, 0x08])), None);
    }
}
