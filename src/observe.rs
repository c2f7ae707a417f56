//! What happened to each request, told once it is over: the request metrics
//! (`switchyard_requests_total`, `switchyard_request_duration_seconds`,
//! `switchyard_response_body_bytes_total`) and the access log line.
//!
//! Every request carries a `notes::RequestNotes` (made per request by the
//! stack's connection layer) that inner layers fill in (route, backend,
//! attempts, queue wait); [`Observe`] wraps the response body so the record
//! is made when the body ends
//! (or the client goes away): durations are what the client observed, streaming
//! included. With `log.access: false` no access-log field is even captured.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use tokio::time::Instant;

use http::Response;
use http_body::{Body, Frame, SizeHint};
use tower::Service;

use crate::body::{BoxError, ProxyBody};
use crate::notes::{NotedRequest, RequestNotes};

#[derive(Clone)]
pub struct Observe<S> {
    inner: S,
}

impl<S> Observe<S> {
    pub fn new(inner: S) -> Self {
        Observe { inner }
    }
}

/// The request fields of an access log line, captured only when it is on.
struct AccessFields {
    method: http::Method,
    path: String,
    request_id: Option<http::HeaderValue>,
}

/// Everything needed to record the request once it is over.
struct Record {
    notes: Arc<RequestNotes>,
    started: Instant,
    access: Option<AccessFields>,
    /// Response body bytes handed to the client so far.
    sent: u64,
}

impl<S> Service<NotedRequest> for Observe<S>
where
    S: Service<NotedRequest, Response = Response<ProxyBody>, Error = std::convert::Infallible>,
{
    type Response = Response<ObservedBody>;
    type Error = std::convert::Infallible;
    type Future = ObserveFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut noted: NotedRequest) -> Self::Future {
        if let Some(tracing) = &noted.notes.snapshot().tracing {
            if let Some(trace) = tracing.start(&mut noted.request) {
                noted.notes.set_trace(trace);
            }
        }
        let (request, notes) = (&noted.request, Arc::clone(&noted.notes));
        let access = notes.snapshot().access_log.then(|| AccessFields {
            method: request.method().clone(),
            path: request.uri().path().to_owned(),
            request_id: request.headers().get("x-request-id").cloned(),
        });
        let record = Record { notes, started: Instant::now(), access, sent: 0 };
        ObserveFuture { inner: self.inner.call(noted), record: Some(record) }
    }
}

pin_project_lite::pin_project! {
    pub struct ObserveFuture<F> {
        #[pin]
        inner: F,
        record: Option<Record>,
    }

    impl<F> PinnedDrop for ObserveFuture<F> {
        fn drop(this: Pin<&mut Self>) {
            // Dropped before a response: the client went away.
            if let Some(record) = this.project().record.take() {
                record.finish(None);
            }
        }
    }
}

impl<F> Future for ObserveFuture<F>
where
    F: Future<Output = Result<Response<ProxyBody>, std::convert::Infallible>>,
{
    type Output = Result<Response<ObservedBody>, std::convert::Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let Ok(response) = ready!(this.inner.poll(cx));
        let record = this.record.take().expect("polled after completion");
        crate::stream_timeout::note(crate::stream_timeout::StreamEvent::HeadReady);
        let status = response.status().as_u16();
        if let Some(trace) = record.notes.trace() {
            if let Some(crate::error::ProxyErrorCode(code)) = response.extensions().get() {
                trace.answered_error(code);
            }
        }
        // Not boxed again: the client's body is this wrapper around the one box.
        Poll::Ready(Ok(response.map(|body| ObservedBody { inner: body, record: Some((record, status)) })))
    }
}

pin_project_lite::pin_project! {
    /// The response body as the client gets it: records the request when it
    /// ends or is dropped.
    pub struct ObservedBody {
        #[pin]
        inner: ProxyBody,
        record: Option<(Record, u16)>,
    }

    impl PinnedDrop for ObservedBody {
        fn drop(this: Pin<&mut Self>) {
            if let Some((record, status)) = this.project().record.take() {
                record.finish(Some(status));
            }
        }
    }
}

impl Body for ObservedBody {
    type Data = bytes::Bytes;
    type Error = BoxError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        let frame = this.inner.poll_frame(cx);
        // For an HTTP/2 stream's bound on its client (see `stream_timeout`).
        match &frame {
            Poll::Ready(Some(Ok(frame))) => {
                if let (Some((record, _)), Some(data)) = (this.record.as_mut(), frame.data_ref()) {
                    record.sent += data.len() as u64;
                }
                crate::stream_timeout::note(crate::stream_timeout::StreamEvent::Handed)
            }
            Poll::Pending => crate::stream_timeout::note(crate::stream_timeout::StreamEvent::AwaitingBackend),
            Poll::Ready(None | Some(Err(_))) => {
                if let Some((record, status)) = this.record.take() {
                    record.finish(Some(status));
                }
            }
        }
        frame
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Record {
    fn finish(self, status: Option<u16>) {
        let elapsed = self.started.elapsed();
        let route = self.notes.route();
        let last_try = self.notes.last_try();
        if let Some(route) = route.filter(|_| self.sent > 0) {
            route.body_bytes.sent.increment(self.sent);
        }
        match (route, &last_try) {
            (Some(route), Some(tried)) => {
                tried.count_request(route, status);
                route.duration.record(elapsed.as_secs_f64());
            }
            (Some(route), None) => {
                route.requests_without_backend.count(status);
                route.duration.record(elapsed.as_secs_f64());
            }
            (None, _) => crate::metrics::series::UNROUTED_REQUESTS.count(status),
        }
        let backend = route.zip(last_try.as_ref()).map(|(route, tried)| &tried.backend(route).address);
        let (route_name, upstream) = route.map_or(("-", "-"), |r| (&*r.name, &*r.upstream.name));
        let trace = self.notes.trace();
        if let (Some(tracing), Some(trace)) = (&self.notes.snapshot().tracing, trace) {
            let ended = crate::trace::Ended {
                client: self.notes.client(),
                route: route.map(|r| &*r.name),
                upstream: match (&last_try, route) {
                    (Some(tried), Some(route)) => Some(&*tried.upstream(route).name),
                    (None, route) => route.map(|r| &*r.upstream.name),
                    (Some(_), None) => None,
                },
                status,
                attempts: self.notes.attempts(),
            };
            tracing.finish(trace, &ended);
        }
        if let Some(access) = self.access {
            let trace_id = trace.map(|trace| crate::trace::context::trace_id_text(trace.trace_id()));
            crate::logging::access(&crate::logging::AccessLine {
                // Read now: forwarding may have learnt it from a trusted proxy.
                client: Some(self.notes.client()),
                method: access.method.as_str(),
                path: &access.path,
                route: route_name,
                upstream,
                backend: backend.map_or("-", |b| &**b),
                status,
                attempts: self.notes.attempts(),
                queue_wait_ms: self.notes.queue_wait().as_micros() as f64 / 1000.0,
                duration_ms: elapsed.as_secs_f64() * 1000.0,
                request_id: access.request_id.as_ref().and_then(|v| v.to_str().ok()).unwrap_or(""),
                trace_id: trace_id.as_ref().map_or("", |id| std::str::from_utf8(id).expect("hex digits")),
                user: self.notes.principal().unwrap_or(""),
            });
        }
    }
}
