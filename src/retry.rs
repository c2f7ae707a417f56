//! Retry policy of a route: which failures are retried, how long to wait
//! between tries, the budget that keeps retries from multiplying load on a
//! struggling upstream, and the request body kept so that a try can be sent
//! again ([`RequestBody`]).
//!
//! Methods matter: an idempotent request (GET, HEAD, OPTIONS, TRACE, PUT,
//! DELETE) may be retried on any listed condition; any other request only when
//! it provably never reached a backend (connect failure, HTTP/2 refused
//! stream), unless the route sets `non_idempotent: true`.
//!
//! The budget follows Finagle's and linkerd's: over a sliding 10 s window,
//! retries may not exceed `ratio` x requests + `min_per_second` x 10. Counting
//! is done in ten one-second buckets of atomics, so recording a request costs
//! two relaxed atomic operations.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http_body::Body as _;
use http_body_util::{BodyExt, Limited};

use crate::body::{ClientBody, ProxyBody};
use crate::clock::nanos_since_epoch;
use crate::config::{RetryConfig, RetryOn};
use crate::error::ProxyError;

const WINDOW_SECONDS: u64 = 10;

/// Why a try failed, in the terms of `retry.on`.
pub type RetryReason = RetryOn;

pub fn reason_label(reason: RetryReason) -> &'static str {
    match reason {
        RetryOn::ConnectFailure => "connect-failure",
        RetryOn::Refused => "refused",
        RetryOn::Reset => "reset",
        RetryOn::GatewayError => "gateway-error",
        RetryOn::Timeout => "timeout",
    }
}

pub fn is_idempotent(method: &http::Method) -> bool {
    use http::Method;
    [Method::GET, Method::HEAD, Method::OPTIONS, Method::TRACE, Method::PUT, Method::DELETE].contains(method)
}

/// Whether `reason` may be retried for `method` under `config` (the budget aside).
pub fn allows(config: &RetryConfig, reason: RetryReason, method: &http::Method) -> bool {
    if !config.on.contains(&reason) {
        return false;
    }
    let never_reached_backend = matches!(reason, RetryOn::ConnectFailure | RetryOn::Refused);
    never_reached_backend || is_idempotent(method) || config.non_idempotent
}

/// Exponential backoff with full jitter (AWS architecture blog, "Exponential
/// Backoff and Jitter"): a random wait up to `min(max, base x 2^retry)`.
pub fn backoff(config: &RetryConfig, retry: u32) -> Duration {
    let ceiling =
        config.backoff.base.saturating_mul(1u32.checked_shl(retry).unwrap_or(u32::MAX)).min(config.backoff.max);
    ceiling.mul_f64(fastrand::f64())
}

#[derive(Debug, Default)]
struct Bucket {
    second: AtomicU64,
    requests: AtomicU64,
    retries: AtomicU64,
}

/// The retry budget shared by all requests of one route.
#[derive(Debug, Default)]
pub struct RetryBudget {
    buckets: [Bucket; WINDOW_SECONDS as usize],
}

impl RetryBudget {
    fn bucket(&self, second: u64) -> &Bucket {
        let bucket = &self.buckets[(second % WINDOW_SECONDS) as usize];
        let seen = bucket.second.load(Ordering::Acquire);
        // The first request of a new second recycles the bucket; a racing
        // increment may land in the old count, which a budget can live with.
        if seen != second && bucket.second.compare_exchange(seen, second, Ordering::AcqRel, Ordering::Acquire).is_ok() {
            bucket.requests.store(0, Ordering::Relaxed);
            bucket.retries.store(0, Ordering::Relaxed);
        }
        bucket
    }

    pub fn record_request(&self) {
        self.bucket(now_second()).requests.fetch_add(1, Ordering::Relaxed);
    }

    /// Takes one retry from the budget if there is room.
    pub fn try_withdraw(&self, ratio: f64, min_per_second: u32) -> bool {
        let now = now_second();
        let (mut requests, mut retries) = (0u64, 0u64);
        for bucket in &self.buckets {
            let second = bucket.second.load(Ordering::Acquire);
            if second + WINDOW_SECONDS > now && second <= now {
                requests += bucket.requests.load(Ordering::Relaxed);
                retries += bucket.retries.load(Ordering::Relaxed);
            }
        }
        let allowed = ratio * requests as f64 + f64::from(min_per_second) * WINDOW_SECONDS as f64;
        if (retries as f64) < allowed {
            self.bucket(now).retries.fetch_add(1, Ordering::Relaxed);
            true
        } else {
            false
        }
    }
}

fn now_second() -> u64 {
    // +1 so that second 0 never equals a fresh bucket's zero.
    nanos_since_epoch() / 1_000_000_000 + 1
}

/// Request bodies up to this size are kept in memory so that a retry can send
/// them again; larger or unsized (chunked) bodies stream, and are not retried.
pub const MAX_REPLAY_BODY: u64 = 64 * 1024;

/// The request body, either kept for replay or streamed once.
pub enum RequestBody {
    Replay(Bytes),
    Streaming(Option<ClientBody>),
}

impl RequestBody {
    /// Whether every try can send the whole body again.
    pub fn is_replay(&self) -> bool {
        matches!(self, RequestBody::Replay(_))
    }

    /// Streams the body, unless there is none (most GETs): an empty body costs
    /// no allocation.
    pub fn streaming(body: ClientBody) -> RequestBody {
        if body.is_end_stream() {
            RequestBody::Replay(Bytes::new())
        } else {
            RequestBody::Streaming(Some(body))
        }
    }

    /// Keeps the body in memory if it is empty or declares a small length;
    /// otherwise it streams (and the request will not be retried).
    pub async fn replayable(body: ClientBody, deadline: tokio::time::Instant) -> Result<RequestBody, ProxyError> {
        if body.is_end_stream() {
            return Ok(RequestBody::Replay(Bytes::new()));
        }
        match body.size_hint().exact() {
            Some(length) if length <= MAX_REPLAY_BODY => {
                let collect = Limited::new(body, MAX_REPLAY_BODY as usize).collect();
                match tokio::time::timeout_at(deadline, collect).await {
                    Ok(Ok(collected)) => Ok(RequestBody::Replay(collected.to_bytes())),
                    Ok(Err(error)) => Err(crate::error::client_body_failure(&*error)
                        .unwrap_or(ProxyError::BadRequest("request body was malformed or cut off"))),
                    Err(_) => Err(ProxyError::UpstreamTimeout),
                }
            }
            _ => Ok(RequestBody::Streaming(Some(body))),
        }
    }

    pub fn for_try(&mut self, limit: u64) -> ProxyBody {
        match self {
            // `Empty` is zero-sized: boxing it allocates nothing.
            RequestBody::Replay(bytes) if bytes.is_empty() => crate::body::empty(),
            RequestBody::Replay(bytes) => crate::body::full(bytes.clone()),
            RequestBody::Streaming(body) => {
                let body = body.take().expect("a streamed body is sent once");
                Limited::new(body, usize::try_from(limit).unwrap_or(usize::MAX)).boxed_unsync()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(on: &[RetryOn], non_idempotent: bool) -> RetryConfig {
        RetryConfig {
            attempts: 3,
            per_try_timeout: None,
            on: on.to_vec(),
            backoff: crate::config::RetryBackoff { base: Duration::from_millis(25), max: Duration::from_secs(1) },
            budget: crate::config::RetryBudget { ratio: 0.2, min_per_second: 0 },
            non_idempotent,
        }
    }

    #[test]
    fn non_idempotent_requests_retry_only_when_they_never_reached_a_backend() {
        let all = RetryConfig::DEFAULT_ON;
        let c = config(&all, false);
        assert!(allows(&c, RetryOn::ConnectFailure, &http::Method::POST));
        assert!(allows(&c, RetryOn::Refused, &http::Method::POST));
        assert!(!allows(&c, RetryOn::Reset, &http::Method::POST));
        assert!(!allows(&c, RetryOn::GatewayError, &http::Method::PATCH));
        assert!(allows(&c, RetryOn::Reset, &http::Method::GET));
        assert!(allows(&config(&all, true), RetryOn::Reset, &http::Method::POST));
        assert!(
            !allows(&config(&[RetryOn::Reset], false), RetryOn::Timeout, &http::Method::GET),
            "only listed conditions"
        );
    }

    #[test]
    fn backoff_is_jittered_under_an_exponential_ceiling() {
        let c = config(&[], false);
        for retry in 0..8 {
            let ceiling = (Duration::from_millis(25) * 2u32.pow(retry)).min(Duration::from_secs(1));
            let waits: Vec<Duration> = (0..2000).map(|_| backoff(&c, retry)).collect();
            assert!(waits.iter().all(|&wait| wait <= ceiling), "retry {retry}: above the ceiling");
            // Full jitter: spread evenly over [0, ceiling), so the mean is about
            // half the ceiling and both halves are used.
            let mean = waits.iter().sum::<Duration>() / waits.len() as u32;
            assert!(mean > ceiling.mul_f64(0.4) && mean < ceiling.mul_f64(0.6), "retry {retry}: mean {mean:?}");
            assert!(waits.iter().any(|&wait| wait < ceiling / 4) && waits.iter().any(|&wait| wait > ceiling * 3 / 4));
        }
    }

    #[test]
    fn the_budget_allows_a_ratio_of_requests_plus_a_floor() {
        let budget = RetryBudget::default();
        for _ in 0..100 {
            budget.record_request();
        }
        let granted = (0..100).filter(|_| budget.try_withdraw(0.2, 0)).count();
        assert_eq!(granted, 20);
        let budget = RetryBudget::default();
        let floor = (0..100).filter(|_| budget.try_withdraw(0.2, 1)).count();
        assert_eq!(floor, 10, "1 per second over a 10 s window with no requests");
    }
}
