//! Distributed tracing: each request's W3C trace context ([`context`]), the
//! decision whether to record it, and the proxy's spans, exported over OTLP
//! ([`export`]): one server span per request and one client span per try,
//! so a retried call shows each try, with its backend and why it was
//! retried, and a queued one shows its wait.
//!
//! A request whose client sent a valid `traceparent` follows its sampled
//! flag; any other starts a trace at `sample_ratio`. A recorded request's
//! backend gets a `traceparent` naming the try's span as its parent. An
//! unsampled request is passed on as it came: the client's context goes
//! through untouched, and one that came without any gets none (writing an
//! unsampled `traceparent` into every request cost more than the rest of
//! tracing at a ratio of 0.01). Spans are built only when the request is
//! over (with the times noted on the way), and only for recorded requests;
//! without `tracing:` nothing here runs.

pub mod context;
mod export;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use http::{HeaderValue, Method};
use opentelemetry::trace::{SpanContext, SpanId, SpanKind, Status, TraceFlags, TraceId, TraceState};
use opentelemetry::{InstrumentationScope, KeyValue};
use opentelemetry_sdk::trace::{SpanData, SpanEvents, SpanLinks};

use crate::config::TracingConfig;
use context::{new_span_id, new_trace_id, traceparent, TRACEPARENT};
use export::Exporter;

static TRACESTATE: http::HeaderName = http::HeaderName::from_static("tracestate");

/// `tracing:` of a snapshot.
#[derive(Debug)]
pub struct Tracing {
    pub config: TracingConfig,
    /// `None` while only checking a config (no runtime), or when the
    /// exporter could not be made (logged): requests still carry trace
    /// context, and nothing is recorded.
    exporter: Option<Arc<Exporter>>,
    scope: InstrumentationScope,
}

impl Tracing {
    /// `previous` is the running snapshot's: its exporter (and the spans it
    /// holds) is kept when the collector and service name are the same.
    pub fn compile(config: &TracingConfig, previous: Option<&Tracing>) -> Tracing {
        let kept = previous.and_then(|p| p.exporter.as_ref()).filter(|e| e.serves(config));
        let exporter = match kept {
            Some(exporter) => Some(Arc::clone(exporter)),
            None if tokio::runtime::Handle::try_current().is_err() => None,
            // OpenTelemetry's processor panics if its thread cannot start.
            None => match std::panic::catch_unwind(|| Exporter::start(config)) {
                Ok(Ok(exporter)) => Some(Arc::new(exporter)),
                Ok(Err(error)) => {
                    tracing::error!(%error, "cannot export traces; requests carry trace context, no span is sent");
                    None
                }
                Err(_) => {
                    tracing::error!("cannot start the trace exporter's thread; no span is sent");
                    None
                }
            },
        };
        let scope = InstrumentationScope::builder("switchyard").with_version(env!("CARGO_PKG_VERSION")).build();
        Tracing { config: config.clone(), exporter, scope }
    }

    /// Sends the spans still waiting; blocks the calling thread up to the
    /// export's bound. For the end of a drain, after the last request.
    pub fn flush(&self) {
        if let Some(exporter) = &self.exporter {
            exporter.flush();
        }
    }

    /// The trace of a request: `None` when it belongs to none the proxy
    /// knows of and is not sampled, which costs one header lookup and one
    /// random number. An invalid `traceparent` (and its `tracestate`) is
    /// removed: it belongs to no trace.
    pub fn start<B>(&self, request: &mut http::Request<B>) -> Option<RequestTrace> {
        let headers = request.headers_mut();
        let mut given = headers.get_all(&TRACEPARENT).iter();
        // Two of them say two things: neither is believed (as the spec's tests ask).
        let (parent, invalid) = match (given.next(), given.next()) {
            (None, _) => (None, false),
            (Some(value), None) => {
                let parent = context::parse(value.as_bytes());
                (parent, parent.is_none())
            }
            (Some(_), Some(_)) => (None, true),
        };
        if invalid {
            headers.remove(&TRACEPARENT);
            headers.remove(&TRACESTATE);
        }
        let sampled = match parent {
            Some(parent) => parent.sampled,
            None => self.config.sample_ratio > 0.0 && fastrand::f64() < self.config.sample_ratio,
        };
        let recording = (sampled && self.exporter.is_some()).then(|| {
            Box::new(Recording {
                started: SystemTime::now(),
                method: span_method(request.method()),
                path: truncated(request.uri().path(), MAX_PATH_ATTRIBUTE).to_owned(),
                tries: Mutex::new(Vec::new()),
                next: Mutex::new(NextTry::default()),
                error: Mutex::new(None),
            })
        });
        if parent.is_none() {
            recording.as_ref()?;
            // A trace starts here; a state that came without a parent is of no trace.
            request.headers_mut().remove(&TRACESTATE);
        }
        let trace_id = parent.map_or_else(new_trace_id, |parent| parent.trace_id);
        Some(RequestTrace { trace_id, span_id: new_span_id(), parent: parent.map(|p| p.span_id), recording })
    }

    /// Exports a recorded request's spans: the server span, and one per try.
    pub fn finish(&self, trace: &RequestTrace, ended: &Ended<'_>) {
        let (Some(recording), Some(exporter)) = (&trace.recording, &self.exporter) else { return };
        let now = SystemTime::now();
        let error = *recording.error.lock().expect("never poisoned");
        let mut attributes = vec![
            KeyValue::new("http.request.method", recording.method),
            KeyValue::new("url.path", recording.path.clone()),
            KeyValue::new("client.address", ended.client.ip().to_string()),
            KeyValue::new("switchyard.attempts", i64::from(ended.attempts)),
        ];
        if let Some(route) = ended.route {
            attributes.push(KeyValue::new("switchyard.route", route.to_owned()));
        }
        if let Some(upstream) = ended.upstream {
            attributes.push(KeyValue::new("switchyard.upstream", upstream.to_owned()));
        }
        let status = outcome(&mut attributes, ended.status, error.or(ended.status.is_none().then_some("client_left")));
        let name = match ended.route {
            Some(route) => format!("{} {route}", recording.method),
            None => recording.method.to_owned(),
        };
        exporter.export(self.span(
            trace,
            trace.span_id,
            trace.parent.map_or(SpanId::INVALID, span_id),
            SpanKind::Server,
            name,
            (recording.started, now),
            attributes,
            Vec::new(),
            status,
        ));
        let tries = std::mem::take(&mut *recording.tries.lock().expect("never poisoned"));
        for sent in tries {
            let mut attributes = vec![
                KeyValue::new("server.address", sent.backend.to_string()),
                KeyValue::new("switchyard.attempt", i64::from(sent.attempt)),
            ];
            if let Some(upstream) = ended.upstream {
                attributes.push(KeyValue::new("switchyard.upstream", upstream.to_owned()));
            }
            if let Some(reason) = sent.retry_reason {
                attributes.push(KeyValue::new("switchyard.retry_reason", reason));
            }
            let (end, answer) = sent.ended.unwrap_or((now, TryEnd::Failed("cancelled")));
            let status = match answer {
                TryEnd::Status(code) => outcome(&mut attributes, Some(code), None),
                TryEnd::Failed(code) => outcome(&mut attributes, None, Some(code)),
            };
            let events = sent
                .queued
                .map(|(at, waited)| {
                    let waited_ms = waited.as_secs_f64() * 1000.0;
                    opentelemetry::trace::Event::new(
                        "queued",
                        at,
                        vec![KeyValue::new("switchyard.queue_wait_ms", waited_ms)],
                        0,
                    )
                })
                .into_iter()
                .collect();
            let name = format!("{} {}", recording.method, ended.upstream.unwrap_or("-"));
            exporter.export(self.span(
                trace,
                sent.span_id,
                span_id(trace.span_id),
                SpanKind::Client,
                name,
                (sent.started, end),
                attributes,
                events,
                status,
            ));
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn span(
        &self,
        trace: &RequestTrace,
        id: u64,
        parent: SpanId,
        kind: SpanKind,
        name: String,
        (start_time, end_time): (SystemTime, SystemTime),
        attributes: Vec<KeyValue>,
        events: Vec<opentelemetry::trace::Event>,
        status: Status,
    ) -> SpanData {
        let context = SpanContext::new(
            TraceId::from_bytes(trace.trace_id.to_be_bytes()),
            span_id(id),
            TraceFlags::SAMPLED,
            false,
            TraceState::default(),
        );
        SpanData {
            span_context: context,
            parent_span_id: parent,
            parent_span_is_remote: kind == SpanKind::Server && trace.parent.is_some(),
            span_kind: kind,
            name: name.into(),
            start_time,
            end_time,
            attributes,
            dropped_attributes_count: 0,
            events: {
                let mut all = SpanEvents::default();
                all.events = events;
                all
            },
            links: SpanLinks::default(),
            status,
            instrumentation_scope: self.scope.clone(),
        }
    }
}

/// The longest `url.path` a span carries: the client chooses the path, and a
/// span (and the export queue of them) must stay small.
const MAX_PATH_ATTRIBUTE: usize = 256;

/// The method as spans name it: an extension method, which the client
/// chooses, is `_OTHER` (OpenTelemetry's HTTP conventions).
fn span_method(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::HEAD => "HEAD",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::CONNECT => "CONNECT",
        Method::OPTIONS => "OPTIONS",
        Method::TRACE => "TRACE",
        Method::PATCH => "PATCH",
        _ => "_OTHER",
    }
}

/// `text` cut to at most `limit` bytes, at a character boundary.
fn truncated(text: &str, limit: usize) -> &str {
    if text.len() <= limit {
        return text;
    }
    let mut end = limit;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

fn span_id(id: u64) -> SpanId {
    SpanId::from_bytes(id.to_be_bytes())
}

/// Adds the status code or the error to `attributes`, and says whether the
/// span failed: no response, or a 5xx.
fn outcome(attributes: &mut Vec<KeyValue>, status: Option<u16>, error: Option<&str>) -> Status {
    if let Some(code) = status {
        attributes.push(KeyValue::new("http.response.status_code", i64::from(code)));
    }
    match (status, error) {
        (_, Some(error)) => {
            attributes.push(KeyValue::new("error.type", error.to_owned()));
            Status::error(error.to_owned())
        }
        (Some(code), None) if code >= 500 => {
            attributes.push(KeyValue::new("error.type", code.to_string()));
            Status::error("")
        }
        _ => Status::Unset,
    }
}

/// What the server span tells of how the request ended.
pub struct Ended<'a> {
    pub client: SocketAddr,
    pub route: Option<&'a str>,
    pub upstream: Option<&'a str>,
    /// `None`: the client left before a response.
    pub status: Option<u16>,
    pub attempts: u32,
}

/// One request's trace: its ids, and when it is recorded, what the spans
/// will tell.
#[derive(Debug)]
pub struct RequestTrace {
    trace_id: u128,
    /// The proxy's server span.
    span_id: u64,
    /// The client's span, from its `traceparent`.
    parent: Option<u64>,
    recording: Option<Box<Recording>>,
}

#[derive(Debug)]
struct Recording {
    started: SystemTime,
    method: &'static str,
    path: String,
    tries: Mutex<Vec<SentTry>>,
    /// What is known of the try about to be sent.
    next: Mutex<NextTry>,
    /// The `x-switchyard-error` code of the response, when the proxy made it.
    error: Mutex<Option<&'static str>>,
}

#[derive(Debug)]
struct NextTry {
    began: SystemTime,
    queue_wait_before: Duration,
    retry_reason: Option<&'static str>,
}

impl Default for NextTry {
    fn default() -> Self {
        NextTry { began: SystemTime::now(), queue_wait_before: Duration::ZERO, retry_reason: None }
    }
}

#[derive(Debug)]
struct SentTry {
    span_id: u64,
    attempt: u32,
    retry_reason: Option<&'static str>,
    started: SystemTime,
    backend: Arc<str>,
    /// When the try was sent, having left the queue, and how long it waited there.
    queued: Option<(SystemTime, Duration)>,
    ended: Option<(SystemTime, TryEnd)>,
}

/// How a try ended.
#[derive(Debug, Clone, Copy)]
pub enum TryEnd {
    /// The backend's response head.
    Status(u16),
    /// No response: the proxy's error code for it.
    Failed(&'static str),
}

impl RequestTrace {
    pub fn trace_id(&self) -> u128 {
        self.trace_id
    }

    /// Whether its spans will be exported: it was sampled, and tracing exports.
    pub fn recording(&self) -> bool {
        self.recording.is_some()
    }

    /// A try begins (its pick), after `queue_wait` so far in the queue.
    pub fn try_begins(&self, queue_wait: Duration) {
        if let Some(recording) = &self.recording {
            let mut next = recording.next.lock().expect("never poisoned");
            next.began = SystemTime::now();
            next.queue_wait_before = queue_wait;
        }
    }

    /// The next try is a retry, for `reason`.
    pub fn retrying(&self, reason: &'static str) {
        if let Some(recording) = &self.recording {
            recording.next.lock().expect("never poisoned").retry_reason = Some(reason);
        }
    }

    /// The try that began went out to `backend`, the request having waited
    /// `queue_wait` in all. Gives the `traceparent` the backend gets, naming
    /// the try's span; `None` when the request is not recorded.
    pub fn try_sent(&self, attempt: u32, backend: &Arc<str>, queue_wait: Duration) -> Option<HeaderValue> {
        let recording = self.recording.as_ref()?;
        let span_id = new_span_id();
        let next = std::mem::take(&mut *recording.next.lock().expect("never poisoned"));
        let queued = queue_wait.saturating_sub(next.queue_wait_before);
        let queued = (!queued.is_zero()).then(|| (SystemTime::now(), queued));
        recording.tries.lock().expect("never poisoned").push(SentTry {
            span_id,
            attempt,
            retry_reason: next.retry_reason,
            started: next.began,
            backend: Arc::clone(backend),
            queued,
            ended: None,
        });
        Some(traceparent(self.trace_id, span_id, true))
    }

    /// The last try sent ended so.
    pub fn try_ended(&self, end: TryEnd) {
        let Some(recording) = &self.recording else { return };
        if let Some(last) = recording.tries.lock().expect("never poisoned").last_mut() {
            last.ended.get_or_insert((SystemTime::now(), end));
        }
    }

    /// The proxy answered with its own error code (`x-switchyard-error`).
    pub fn answered_error(&self, code: &'static str) {
        if let Some(recording) = &self.recording {
            *recording.error.lock().expect("never poisoned") = Some(code);
        }
    }
}
