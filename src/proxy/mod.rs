//! The innermost service: pick a backend, rewrite the request, forward it, and
//! stream the response back.
//!
//! Reads top to bottom as one function, `forward`, with a comment per step;
//! header rewriting is in `rewrite`, WebSocket tunnels in `tunnel`, the
//! replayable body with the retry policy (`retry`), the queue's wait protocol in
//! `queue`, and the verdict on a try in `upstream::Outcome`.
//! Bodies are never buffered: the request body streams to the backend through a
//! size limit, the response body streams back holding the backend's in-flight slot
//! until its last byte. `Upgrade` requests (WebSocket) become a byte tunnel after
//! the backend answers 101.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use tokio::time::Instant;

use http::header::{self, HeaderValue};
use http::{Request, Response, StatusCode};
use http_body_util::BodyExt;

use crate::backend::InFlightGuard;
use crate::balance::{Pick, PickRequest};
use crate::body::{ClientBody, ClientRequestBody, ProxyBody};
use crate::client::{ConnectError, SendError, SendToBackend, UpstreamBody, UpstreamClients};
use crate::config::RetryOn;
use crate::conn::ClientUpgrade;
use crate::error::ProxyError;
use crate::notes::{RequestNotes, RoutedNotes, RoutedRequest};
use crate::queue::{Priority, WaitEnded};
use crate::retry::{self, RequestBody};
use crate::route::{Route, RoutePolicy};
use crate::trace::TryEnd;
use crate::upstream::{Outcome, Unavailable, Upstream};

mod response;
pub(crate) mod rewrite;
mod tunnel;

pub use response::BackendReadTimeout;

use rewrite::{add_forwarding_headers, clone_parts, content_length, for_backend, is_upgrade, strip_hop_by_hop};
use tunnel::tunnel;

/// Forwarding through the worker's clients (`C`: see [`SendToBackend`]).
pub struct Forward<C = UpstreamClients> {
    clients: Arc<C>,
}

impl<C> Forward<C> {
    pub fn new(clients: Arc<C>) -> Self {
        Forward { clients }
    }
}

impl<C> Clone for Forward<C> {
    fn clone(&self) -> Self {
        Forward { clients: Arc::clone(&self.clients) }
    }
}

type ForwardFuture = Pin<Box<dyn Future<Output = Result<Response<ProxyBody>, ProxyError>> + Send>>;

impl<C: SendToBackend> tower::Service<RoutedRequest> for Forward<C> {
    type Response = Response<ProxyBody>;
    type Error = ProxyError;
    type Future = ForwardFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: RoutedRequest) -> ForwardFuture {
        // The rewriting before the first await runs here, outside the future:
        // what it needs on the way (the original request) is then not kept
        // in the future, which is boxed and moved for every request.
        match Prepared::new(request) {
            Ok(prepared) => Box::pin(forward(Arc::clone(&self.clients), prepared)),
            Err(error) => Box::pin(std::future::ready(Err(error))),
        }
    }
}

/// A request rewritten for backends (steps 1 and 2 of `forward`), with what
/// the tries need from the client's side.
struct Prepared {
    notes: RoutedNotes,
    /// The client: the connection's peer, or whom a trusted proxy names.
    client_ip: std::net::IpAddr,
    /// Method, target and headers every try starts from; the last try takes it.
    template: Option<http::request::Parts>,
    body: Option<ClientRequestBody>,
    client_upgrade: Option<ClientUpgrade>,
    original_host: Option<HeaderValue>,
}

impl Prepared {
    fn new(routed: RoutedRequest) -> Result<Prepared, ProxyError> {
        let RoutedRequest { mut request, notes } = routed;
        let snapshot = notes.snapshot();

        // 1. Refuse a body that declares itself too large before touching a backend.
        let limit = snapshot.limits.max_body_bytes;
        if content_length(request.headers()).is_some_and(|length| length > limit) {
            return Err(ProxyError::BodyTooLarge { limit });
        }

        // 2. Rewrite what is the same for every try: forwarding headers, no hop-by-hop.
        let client_upgrade =
            if is_upgrade(&request) { request.extensions_mut().remove::<ClientUpgrade>() } else { None };
        let (mut template, body) = request.into_parts();
        let original_host = template
            .headers
            .get(header::HOST)
            .cloned()
            .or_else(|| template.uri.authority().and_then(|a| HeaderValue::from_str(a.as_str()).ok()));
        strip_hop_by_hop(&mut template.headers, client_upgrade.is_some());
        let trusted = &snapshot.config.trusted_proxies;
        let conn = notes.conn();
        let forwarded_client = add_forwarding_headers(&mut template.headers, conn, original_host.as_ref(), trusted);
        if let Some(client) = forwarded_client {
            notes.set_forwarded_client(client);
        }
        let client_ip = forwarded_client.unwrap_or_else(|| conn.client.ip());
        Ok(Prepared { notes, client_ip, template: Some(template), body: Some(body), client_upgrade, original_host })
    }
}

/// One try's request: a copy of the template, or the template itself for the
/// last try, in the form the backend takes.
fn next_try(
    template: &mut Option<http::request::Parts>,
    last: bool,
    upstream: &Upstream,
    backend: &crate::backend::Backend,
    original_host: Option<&HeaderValue>,
    body: ProxyBody,
) -> Result<Request<ProxyBody>, ProxyError> {
    let parts = if last {
        template.take().expect("present until the last try")
    } else {
        clone_parts(template.as_ref().expect("present until the last try"))
    };
    let parts = for_backend(parts, upstream, backend, original_host)?;
    Ok(Request::from_parts(parts, body))
}

// Not an `async fn`: its arguments would be copied into the future next to
// their originals; the `async move` block uses `prepared`'s fields in place.
#[allow(clippy::manual_async_fn)]
fn forward<C: SendToBackend>(
    clients: Arc<C>,
    mut prepared: Prepared,
) -> impl Future<Output = Result<Response<ProxyBody>, ProxyError>> + Send {
    async move {
        let route = prepared.notes.route();
        // The upstream tries go to; a reload can replace it under a waiting request.
        let mut upstream = Arc::clone(&route.upstream);
        let mut reroutes = 0;
        let limits = &prepared.notes.snapshot().limits;
        let limit = limits.max_body_bytes;
        // One deadline for the whole exchange up to the response head: queueing,
        // every try and every backoff. Each try's timer is cut to it, so a timeout
        // is one event, seen by the try it ends and charged to that try's backend.
        let deadline = tokio::time::Instant::now() + route.timeout;

        // 3. How many tries this request may have, and the body they send (see `plan_tries`).
        let upgrade = prepared.client_upgrade.is_some();
        let client_body = ClientBody::new(
            prepared.body.take().expect("taken once"),
            limits.client_body_timeout,
            &route.body_bytes.received,
        );
        let method = prepared.template.as_ref().expect("kept until the last try").method.clone();
        let (retries, mut body) = plan_tries(route, upgrade, client_body, &method, deadline).await?;

        let mut tried: Vec<usize> = Vec::new();
        // Times a bot said it was busy with work from elsewhere and the
        // request went back to the queue (see `busy_answer`).
        let mut busy_requeues = 0u32;
        // The last try's answer, given to the client if no further try can start.
        let mut previous: Option<Result<Response<ProxyBody>, ProxyError>> = None;
        let mut attempts_made = 0u32;
        loop {
            let attempt = attempts_made + 1;
            let last = attempt >= retries.attempts;
            // A recorded request's try span starts with the pick, queue wait
            // included (what it notes stays in the trace, not in this future).
            if let Some(trace) = prepared.notes.trace() {
                trace.try_begins(prepared.notes.queue_wait());
            }

            // 4. Pick a backend (waiting in the upstream's queue when every one is
            //    busy); the pick reserves its in-flight slot. A request that waited
            //    through a reload which replaced its upstream (its old backends are
            //    retired) goes on with the new one.
            let template = prepared.template.as_ref().expect("kept until the last try");
            let picked = pick_backend(&upstream, template, prepared.client_ip, &tried, deadline, &prepared.notes).await;
            if let Err(ProxyError::NoHealthyBackend { .. } | ProxyError::CircuitOpen { .. }) = &picked {
                if let Some(replacement) = upstream.replacement().filter(|_| reroutes < MAX_REROUTES) {
                    reroutes += 1;
                    upstream = replacement;
                    tried.clear();
                    prepared.notes.rerouted();
                    continue;
                }
            }
            let pick = match (picked, previous.take()) {
                (Ok(pick), _) => pick,
                (Err(_), Some(previous)) => return previous,
                (Err(error), None) => return Err(error),
            };
            let backend = &upstream.backends[pick.index];
            prepared.notes.tried(pick.index, (reroutes > 0).then_some(&upstream));
            let outcome = upstream.outcome(pick.index);
            // A one-job bot that turns out busy sends the request back to the
            // queue, which needs the request again.
            let may_requeue = upstream.queue.is_some()
                && backend.max_concurrency != u32::MAX
                && body.is_replay()
                && busy_requeues < MAX_BUSY_REQUEUES;

            // 5. This try's request: the backend's target form and protocol.
            let host = prepared.original_host.as_ref();
            let take_template = last && !may_requeue;
            let mut outgoing =
                next_try(&mut prepared.template, take_template, &upstream, backend, host, body.for_try(limit))?;
            if let Some(trace) = prepared.notes.trace() {
                if let Some(parent) = trace.try_sent(attempt, &backend.address, prepared.notes.queue_wait()) {
                    outgoing.headers_mut().insert(&crate::trace::context::TRACEPARENT, parent);
                }
            }

            // 6. Send, bounded by the per-try timeout cut to the route's deadline;
            //    time to response head feeds the latency estimate.
            let started = Instant::now();
            let per_try = retries.policy.and_then(|p| p.config.per_try_timeout);
            let try_deadline = per_try.map_or(deadline, |limit| deadline.min(tokio::time::Instant::now() + limit));
            let sent = clients.send(upstream.protocol, upstream.config.tls.as_ref(), backend, outgoing);
            let result = tokio::time::timeout_at(try_deadline, sent).await;
            let took = started.elapsed();
            backend.state.series.upstream_duration.record(took);
            let busy = may_requeue.then(|| result.as_ref().ok()?.as_ref().ok().and_then(busy_answer)).flatten();
            if let Some(busy_for) = busy {
                if let Some(trace) = prepared.notes.trace() {
                    let status = result.as_ref().ok().and_then(|sent| sent.as_ref().ok()).map(|r| r.status().as_u16());
                    trace.try_ended(TryEnd::Status(status.unwrap_or(429)));
                    trace.retrying("busy");
                }
                // Not the bot's failure: no verdict for its health or breaker.
                drop(outcome);
                backend_answered_busy(&upstream, backend, busy_for);
                busy_requeues += 1;
                drop(pick);
                continue;
            }

            // 7. The verdict, with whether it is retried (see `Retries::decide`).
            let at_route_deadline = try_deadline >= deadline;
            let verdict =
                TryVerdict { outcome, pick: &pick, took, at_route_deadline, backend: &backend.address, limit };
            let result = judge(result, verdict, &retries.after(last, &upstream));
            if let Some(trace) = prepared.notes.trace() {
                trace.try_ended(match &result.answer {
                    Ok(response) => TryEnd::Status(response.status().as_u16()),
                    Err(error) => TryEnd::Failed(error.code().unwrap_or("error")),
                });
            }
            let Some((policy, reason)) = result.retry else {
                return match result.answer {
                    Ok(response) => {
                        let held = Held { guard: pick.guard, notes: prepared.notes.shared() };
                        Ok(respond(response, held, limits.backend_read_timeout, prepared.client_upgrade.take()))
                    }
                    Err(error) => Err(error),
                };
            };
            tracing::debug!(backend = %backend.address, attempt, reason = retry::reason_label(reason), "retrying");
            if let Some(trace) = prepared.notes.trace() {
                trace.retrying(retry::reason_label(reason));
            }
            tried.push(pick.index);
            attempts_made += 1;
            // Give the slot back before waiting: the backoff is not the backend's time.
            drop(pick);
            let answer = result.answer.map(|response| unguarded(response, limits.backend_read_timeout));
            let resume = tokio::time::Instant::now() + retry::backoff(&policy.config, attempt - 1);
            if resume >= deadline {
                // No try could start in time: the client gets this one's answer now.
                return answer;
            }
            previous = Some(answer);
            tokio::time::sleep_until(resume).await;
        }
    }
}

/// Step 3: how many tries a request may have and the body they send. Retries
/// need a retry policy, no upgrade, and a body small enough to keep for replay
/// (collected here, within the deadline); otherwise one try streams the body.
/// A request with a policy counts toward its retry budget.
async fn plan_tries<'a>(
    route: &'a Route,
    upgrade: bool,
    client_body: ClientBody,
    method: &'a http::Method,
    deadline: tokio::time::Instant,
) -> Result<(Retries<'a>, RequestBody), ProxyError> {
    let policy = route.retry.as_ref().filter(|_| !upgrade);
    // A queued upstream's request may go back to the queue when its bot turns
    // out busy (see `busy_answer`): it keeps its body too.
    let body = if (policy.is_some() || route.upstream.queue.is_some()) && !upgrade {
        // Boxed: collecting a body is rare, and would make every request's future larger.
        Box::pin(RequestBody::replayable(client_body, deadline)).await?
    } else {
        RequestBody::streaming(client_body)
    };
    let attempts = match (policy, &body) {
        (Some(policy), RequestBody::Replay(_)) => policy.config.attempts,
        _ => 1,
    };
    if let Some(policy) = policy {
        policy.budget.record_request();
    }
    Ok((Retries { policy, attempts, method, route }, body))
}

/// What decides whether a failed try is retried, fixed for the request by
/// step 3: the route's policy, how many tries it allows this request, and
/// the request's method.
struct Retries<'a> {
    policy: Option<&'a RoutePolicy>,
    attempts: u32,
    method: &'a http::Method,
    route: &'a Route,
}

/// [`Retries`] for one try: whether it is the last, and the upstream it went to.
struct RetryAfter<'a> {
    retries: &'a Retries<'a>,
    last: bool,
    upstream: &'a Upstream,
}

impl<'a> Retries<'a> {
    fn after(&'a self, last: bool, upstream: &'a Upstream) -> RetryAfter<'a> {
        RetryAfter { retries: self, last, upstream }
    }
}

impl<'a> RetryAfter<'a> {
    /// The one decision on a retry: a try that failed as `reason` is retried
    /// when it is not the last, the policy retries `reason` for this method,
    /// and the route's budget grants it (counted in the metrics either way).
    fn decide(&self, reason: Option<RetryOn>) -> Option<(&'a RoutePolicy, RetryOn)> {
        let (policy, reason) = self.retries.policy.zip(reason)?;
        if self.last || !retry::allows(&policy.config, reason, self.retries.method) {
            return None;
        }
        let route = self.retries.route;
        if policy.budget.try_withdraw(policy.config.budget.ratio, policy.config.budget.min_per_second) {
            crate::metrics::retry(&route.name, &self.upstream.name, retry::reason_label(reason));
            Some((policy, reason))
        } else {
            crate::metrics::retry_budget_exhausted(&route.name, &self.upstream.name);
            None
        }
    }
}

/// What step 7 judges a try by besides its result.
struct TryVerdict<'a> {
    outcome: Outcome<'a>,
    pick: &'a Pick,
    took: std::time::Duration,
    /// The try's timer was the route's deadline, not a per-try timeout.
    at_route_deadline: bool,
    backend: &'a str,
    limit: u64,
}

/// Step 7: what the client would get from a try, whether it is retried, and
/// the outcome reported for the backend (a response's latency feeds its
/// estimate; a 5xx, a failure of the backend's own or a timeout count
/// against it; a failure of the client's own body says nothing).
fn judge<'a>(
    result: Result<Result<Response<UpstreamBody>, SendError>, tokio::time::error::Elapsed>,
    verdict: TryVerdict<'_>,
    retry: &RetryAfter<'a>,
) -> Try<'a> {
    let TryVerdict { outcome, pick, took, at_route_deadline, backend, limit } = verdict;
    match result {
        Ok(Ok(response)) => {
            pick.guard.state().latency.observe(took);
            outcome.report(response.status().is_server_error());
            let reason = matches!(response.status().as_u16(), 502..=504).then_some(RetryOn::GatewayError);
            Try { retry: retry.decide(reason), answer: Ok(response) }
        }
        Ok(Err(error)) => {
            let (error, reason) = classify(error, backend, limit);
            if error.is_backend_failure() {
                outcome.report(true);
            }
            Try { retry: retry.decide(reason), answer: Err(error) }
        }
        Err(_elapsed) => {
            outcome.report(true);
            // The route's deadline ends the request; a per-try timeout may be retried.
            let reason = (!at_route_deadline).then_some(RetryOn::Timeout);
            Try { retry: retry.decide(reason), answer: Err(ProxyError::UpstreamTimeout) }
        }
    }
}

/// How many times one request may go back to the queue because the bot it
/// reached said it was busy; the route's deadline bounds it as well.
const MAX_BUSY_REQUEUES: u32 = 16;

/// The longest a `Retry-After` keeps a bot out, and the shortest (`0` or a
/// date past would send the job straight back to it).
const MAX_BUSY: std::time::Duration = std::time::Duration::from_secs(300);
const MIN_BUSY: std::time::Duration = std::time::Duration::from_secs(1);

/// How long a bot that answered 429 or 503 with `Retry-After` (seconds or an
/// HTTP date) says it is busy: another scheduler gave it work while this
/// proxy believed it free.
fn busy_answer(response: &Response<UpstreamBody>) -> Option<std::time::Duration> {
    if !matches!(response.status(), StatusCode::TOO_MANY_REQUESTS | StatusCode::SERVICE_UNAVAILABLE) {
        return None;
    }
    let value = response.headers().get(http::header::RETRY_AFTER)?.to_str().ok()?.trim();
    let wait = match value.parse::<u64>() {
        Ok(seconds) => std::time::Duration::from_secs(seconds),
        Err(_) => {
            httpdate::parse_http_date(value).ok()?.duration_since(std::time::SystemTime::now()).unwrap_or_default()
        }
    };
    Some(wait.clamp(MIN_BUSY, MAX_BUSY))
}

/// Keeps `backend` out for `busy_for`. No slot frees when that ends: the
/// housekeeping tick, which gives each queue's first waiter a look every
/// second, finds it back.
fn backend_answered_busy(upstream: &Upstream, backend: &crate::backend::Backend, busy_for: std::time::Duration) {
    let until = crate::clock::nanos_since_epoch() + busy_for.as_nanos() as u64;
    backend.state.mark_busy(until);
    tracing::info!(upstream = %upstream.name, backend = %backend.address, seconds = busy_for.as_secs_f64(),
        "backend answered busy (Retry-After): the request goes back to the queue");
}

/// How many times one request may move to a reloaded upstream.
const MAX_REROUTES: u32 = 3;

/// One try's result, and the retry it was granted, if any.
struct Try<'a> {
    answer: Result<Response<UpstreamBody>, ProxyError>,
    retry: Option<(&'a RoutePolicy, RetryOn)>,
}

/// A response for the client built from a try that will not be the last one
/// sent, without the backend slot attached (it was given back already), its
/// body's reads bounded all the same.
fn unguarded(mut response: Response<UpstreamBody>, read_timeout: std::time::Duration) -> Response<ProxyBody> {
    strip_hop_by_hop(response.headers_mut(), false);
    response.map(|body| response::ResponseBody::without_slot(body, read_timeout).boxed_unsync())
}

/// Picks a backend for the request, excluding those already tried while any
/// other can serve. With a queue configured and every eligible backend busy,
/// waits in line (see `queue`); otherwise fails at once with the reason.
async fn pick_backend(
    upstream: &Upstream,
    parts: &http::request::Parts,
    client_ip: std::net::IpAddr,
    tried: &[usize],
    route_deadline: tokio::time::Instant,
    notes: &RequestNotes,
) -> Result<Pick, ProxyError> {
    let request = PickRequest { headers: &parts.headers, uri: &parts.uri, client_ip, exclude: tried };
    let unavailable = || match upstream.unavailable() {
        Unavailable::CircuitOpen => ProxyError::CircuitOpen { upstream: upstream.name.to_string() },
        Unavailable::NoHealthy | Unavailable::AllBusy => {
            ProxyError::NoHealthyBackend { upstream: upstream.name.to_string() }
        }
    };
    let priority = match upstream.config.queue.as_ref().and_then(|q| q.priority_header.as_ref()) {
        Some(header) => Priority::from_header(parts.headers.get(header)),
        None => Priority::Normal,
    };
    // Whether the last cluster-wide pick found every candidate full in Redis:
    // busy, though this replica alone sees room.
    let cluster_full = std::sync::atomic::AtomicBool::new(false);
    // Boxed: the Redis round trip's state would otherwise enlarge every
    // request's future, cluster or not.
    let try_pick = || async {
        match &upstream.cluster {
            Some(slots) => Box::pin(pick_in_cluster(upstream, slots, &request, priority, &cluster_full)).await,
            None => upstream.balancer.pick(&upstream.backends, &request).map(Ok),
        }
    };
    let (Some(queue), Some(config)) = (&upstream.queue, &upstream.config.queue) else {
        if upstream.cluster.is_none() {
            return upstream.balancer.pick(&upstream.backends, &request).ok_or_else(unavailable);
        }
        return try_pick().await.unwrap_or_else(|| Err(unavailable()));
    };
    let all_busy =
        || cluster_full.load(std::sync::atomic::Ordering::Relaxed) || upstream.unavailable() == Unavailable::AllBusy;
    let (picked, queued_for) = queue
        .pick_or_wait(priority, config.max_waiting as usize, config.timeout, route_deadline, try_pick, all_busy)
        .await;
    if let Some(waited) = queued_for {
        notes.queued(waited);
    }
    let ended = match picked {
        Ok(pick) => return pick,
        Err(ended) => ended,
    };
    Err(match ended {
        WaitEnded::Unavailable => unavailable(),
        WaitEnded::Deadline => ProxyError::UpstreamTimeout,
        WaitEnded::Full => {
            crate::metrics::queue_rejected(&upstream.name, "full");
            ProxyError::QueueFull { upstream: upstream.name.to_string() }
        }
        WaitEnded::Timeout => {
            crate::metrics::queue_rejected(&upstream.name, "timeout");
            ProxyError::QueueTimeout { upstream: upstream.name.to_string() }
        }
    })
}

/// One pick of a cluster-scoped upstream: the policy's candidates by what
/// this replica knows, then the first with room across the cluster, from
/// Redis in one round trip. `None` when none has room (`cluster_full` says
/// whether that was Redis's answer); while Redis cannot be reached, a pick
/// by this replica's own limits (`on_unavailable: local`) or 503 (`refuse`).
async fn pick_in_cluster(
    upstream: &Upstream,
    slots: &crate::cluster::UpstreamSlots,
    request: &PickRequest<'_>,
    priority: Priority,
    cluster_full: &std::sync::atomic::AtomicBool,
) -> Option<Result<Pick, ProxyError>> {
    let cluster = &slots.cluster;
    cluster_full.store(false, std::sync::atomic::Ordering::Relaxed);
    if cluster.available() {
        let candidates = upstream.balancer.candidates(&upstream.backends, request, crate::cluster::MAX_CANDIDATES);
        if candidates.is_empty() {
            return None;
        }
        let limits: Vec<(usize, u32)> =
            candidates.iter().map(|&index| (index, upstream.backends[index].max_concurrency)).collect();
        match cluster.acquire(slots, &limits, priority as u8).await {
            Ok(Some((index, lease))) => {
                // Room in Redis means room here (this replica's requests hold
                // slots there too), unless the backend turned ineligible
                // meanwhile: then the slot goes back.
                let guard = upstream.backends[index].try_acquire(u32::MAX)?;
                return Some(Ok(Pick { index, guard: guard.with_lease(lease) }));
            }
            Ok(None) => {
                cluster_full.store(true, std::sync::atomic::Ordering::Relaxed);
                return None;
            }
            Err(crate::cluster::Unreachable) => {}
        }
    }
    match cluster.on_unavailable() {
        crate::config::OnUnavailable::Local => {
            let pick = upstream.balancer.pick(&upstream.backends, request)?;
            let lease = cluster.hold_locally(slots, pick.index);
            Some(Ok(Pick { index: pick.index, guard: pick.guard.with_lease(lease) }))
        }
        crate::config::OnUnavailable::Refuse => {
            cluster.refused();
            Some(Err(ProxyError::ClusterUnavailable { upstream: upstream.name.to_string() }))
        }
    }
}

/// The backend slot a response holds, and the request's notes, which say
/// whose backend it is.
struct Held<'a> {
    guard: InFlightGuard,
    notes: &'a Arc<RequestNotes>,
}

/// The response for the client: a tunnel for a 101, else the backend's
/// response streaming back while holding the backend's slot, each wait for
/// its next bytes bounded by `read_timeout`.
fn respond(
    mut response: Response<UpstreamBody>,
    held: Held<'_>,
    read_timeout: std::time::Duration,
    client_upgrade: Option<ClientUpgrade>,
) -> Response<ProxyBody> {
    let Held { guard, notes } = held;
    let conn = notes.conn();
    if response.status() == StatusCode::SWITCHING_PROTOCOLS {
        if let (Some(client_upgrade), Some(backend)) = (client_upgrade, response.body_mut().take_upgrade()) {
            let tunnel = tunnel(client_upgrade, backend, guard, Arc::clone(conn));
            match &conn.tunnels {
                // Tracked, so that the listener's drain waits for it.
                Some(home) => drop(home.tracker.spawn(tunnel)),
                None => drop(tokio::spawn(tunnel)),
            }
            return response.map(|_| crate::body::empty());
        }
    }
    strip_hop_by_hop(response.headers_mut(), false);
    let notes = Arc::clone(notes);
    response.map(|body| response::ResponseBody::new(body, guard, notes, read_timeout).boxed_unsync())
}

/// Maps a client failure to what the client is told and the retry condition
/// it matches. A request body that exceeded the limit or broke mid-stream
/// surfaces here as the body's error and is the client's fault, never retried.
fn classify(error: SendError, backend: &str, limit: u64) -> (ProxyError, Option<RetryOn>) {
    let error = match error {
        SendError::Connect(failed) => {
            // A certificate problem is configuration, not a passing failure:
            // say which one, once per failed connection.
            if let ConnectError::TlsHandshake(_) = *failed {
                tracing::warn!(backend, error = %failed, "cannot connect to backend over TLS");
            }
            let error = ProxyError::UpstreamConnect { backend: backend.to_owned(), source: Box::new(failed) };
            return (error, Some(RetryOn::ConnectFailure));
        }
        SendError::Request(error) => error,
    };
    let mut refused = false;
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(&*error);
    while let Some(cause) = source {
        if let Some(alert) = tls_refusal(cause) {
            // With TLS 1.3 a backend refuses our client certificate only after
            // the client's side of the handshake is done, at the first read:
            // nothing was processed, so it is a failure to connect.
            tracing::warn!(backend, error = %alert, "cannot connect to backend over TLS: it refused the handshake");
            return (
                ProxyError::UpstreamConnect { backend: backend.to_owned(), source: error },
                Some(RetryOn::ConnectFailure),
            );
        }
        if cause.is::<http_body_util::LengthLimitError>() {
            return (ProxyError::BodyTooLarge { limit }, None);
        }
        if let Some(error) = crate::error::client_body_failure(cause) {
            return (error, None);
        }
        if let Some(h2) = cause.downcast_ref::<h2::Error>() {
            // The backend refused the stream before processing it (RFC 9113 8.7).
            refused |= h2.reason() == Some(h2::Reason::REFUSED_STREAM);
        }
        source = cause.source();
    }
    let reason = if refused { RetryOn::Refused } else { RetryOn::Reset };
    (ProxyError::UpstreamReset { backend: backend.to_owned(), source: error }, Some(reason))
}

/// The alert a backend sent to end the TLS handshake (a client certificate
/// missing or refused, no common parameters), if that is what `cause` is.
fn tls_refusal<'a>(cause: &'a (dyn std::error::Error + 'static)) -> Option<&'a rustls::Error> {
    use rustls::AlertDescription as Alert;
    let io = cause.downcast_ref::<std::io::Error>()?;
    let tls = io.get_ref()?.downcast_ref::<rustls::Error>()?;
    match tls {
        rustls::Error::AlertReceived(
            Alert::CertificateRequired
            | Alert::BadCertificate
            | Alert::UnsupportedCertificate
            | Alert::CertificateRevoked
            | Alert::CertificateExpired
            | Alert::CertificateUnknown
            | Alert::UnknownCA
            | Alert::AccessDenied
            | Alert::HandshakeFailure,
        ) => Some(tls),
        _ => None,
    }
}

#[cfg(test)]
mod tests;
