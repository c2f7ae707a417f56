//! Answers "why does this request go there?" in words: the state of each
//! backend (`/status`), and for a described request the route, the policy,
//! every candidate and the backend it would get now (`/explain`), computed from
//! the live snapshot without sending traffic or moving any balancer state. Also
//! renders the effective config for `/config`, secrets redacted.

use std::net::IpAddr;
use std::time::Duration;

use serde::Serialize;
use serde_json::{json, Value};

use crate::backend::{AdminState, Backend, Ineligible};
use crate::balance::{Balancer, PickRequest};
use crate::clock::nanos_since_epoch;
use crate::config::Config;
use crate::state::Snapshot;

/// Whether a backend can take a request now, and why (or why not) in words.
pub fn backend_verdict(backend: &Backend, now: u64) -> (bool, String) {
    let in_flight = backend.in_flight();
    match backend.ineligible(|| now) {
        None => {}
        Some(Ineligible::CheckFailing) => {
            let check = backend.check.as_ref().and_then(|c| c.last());
            let reason = check.map_or_else(|| "no result yet".to_owned(), |last| last.reason);
            return (false, format!("unhealthy: active check failing ({reason})"));
        }
        Some(Ineligible::Retired) => return (false, "removed by a reload".to_owned()),
        Some(Ineligible::Ejected { until }) => {
            let left = Duration::from_nanos(until - now).as_secs_f64();
            return (false, format!("ejected for {left:.1}s more after consecutive failed requests"));
        }
        Some(Ineligible::CircuitOpen) => {
            return match backend.state.breaker.snapshot().open_remaining(now) {
                Some(left) => (false, format!("circuit open for {:.1}s more", left.as_secs_f64())),
                None => (false, "circuit half-open, probe requests already in flight".to_owned()),
            };
        }
        Some(Ineligible::Full) => {
            return (false, format!("at max_concurrency ({in_flight}/{} in flight)", backend.max_concurrency));
        }
        Some(Ineligible::Busy { until }) => {
            let left = Duration::from_nanos(until.saturating_sub(now)).as_secs_f64();
            return (
                false,
                format!("busy with work from elsewhere for {left:.1}s more (it answered with Retry-After)"),
            );
        }
        Some(Ineligible::Admin(AdminState::Draining)) if in_flight > 0 => {
            return (false, format!("draining (admin): no new requests, {in_flight} in flight to finish"));
        }
        Some(Ineligible::Admin(AdminState::Draining)) => {
            return (false, "drained (admin): no new requests, none in flight".to_owned());
        }
        Some(Ineligible::Admin(_)) => return (false, "disabled (admin)".to_owned()),
    }
    let ramp = backend.ramp(now);
    let load = if backend.max_concurrency == u32::MAX {
        format!("{in_flight} in flight")
    } else {
        format!("{in_flight}/{} in flight", backend.max_concurrency)
    };
    if ramp < 1.0 {
        (true, format!("eligible, slow start at {:.0}% of its weight, {load}", ramp * 100.0))
    } else {
        (true, format!("eligible, {load}"))
    }
}

/// A request described by `/explain`'s query string.
#[derive(Debug, Default)]
pub struct Described {
    pub method: String,
    pub host: Option<String>,
    pub path: String,
    pub headers: Vec<(String, String)>,
    pub client_ip: Option<IpAddr>,
}

impl Described {
    /// From `method=&host=&path=&header=NAME:VALUE` (header repeatable).
    pub fn from_query(query: &str) -> Result<Described, String> {
        let mut described = Described { method: "GET".into(), path: "/".into(), ..Described::default() };
        for (key, value) in form_urlencoded(query) {
            match key.as_str() {
                "method" => described.method = value,
                "host" => described.host = Some(value),
                "path" => described.path = value,
                "header" => {
                    let (name, value) = value.split_once(':').ok_or("header must be NAME:VALUE")?;
                    described.headers.push((name.trim().to_owned(), value.trim().to_owned()));
                }
                "client_ip" => described.client_ip = Some(value.parse().map_err(|_| "client_ip is not an IP address")?),
                other => return Err(format!("unknown parameter `{other}` (method, host, path, header, client_ip)")),
            }
        }
        Ok(described)
    }

    fn request(&self) -> Result<http::Request<()>, String> {
        let mut builder = http::Request::builder().method(self.method.as_str()).uri(self.path.as_str());
        if let Some(host) = &self.host {
            builder = builder.header(http::header::HOST, host);
        }
        for (name, value) in &self.headers {
            builder = builder.header(name.as_str(), value.as_str());
        }
        builder.body(()).map_err(|e| format!("not a valid request: {e}"))
    }
}

fn form_urlencoded(query: &str) -> Vec<(String, String)> {
    query
        .split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            (percent_decode(key), percent_decode(value))
        })
        .collect()
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() && hex(bytes[i + 1]).is_some() && hex(bytes[i + 2]).is_some() => {
                out.push((hex(bytes[i + 1]).unwrap_or(0) * 16 + hex(bytes[i + 2]).unwrap_or(0)) as u8);
                i += 2;
            }
            byte => out.push(byte),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[derive(Debug, Serialize)]
pub struct Candidate {
    pub address: String,
    pub weight: u32,
    pub effective_weight: f64,
    pub in_flight: u32,
    pub eligible: bool,
    pub why: String,
}

/// `/explain`: the whole decision for one described request.
pub fn explain(snapshot: &Snapshot, described: &Described) -> Value {
    let request = match described.request() {
        Ok(request) => request,
        Err(error) => return json!({ "error": error }),
    };
    let Some(index) = snapshot.router.find_index(&request) else {
        return json!({
            "route": null,
            "decision": "no route matches: the request would get 404 no_route",
        });
    };
    let route = &snapshot.router.routes()[index];
    let upstream = &route.upstream;
    let now = nanos_since_epoch();
    let candidates: Vec<Candidate> = upstream
        .backends
        .iter()
        .map(|b| {
            let (eligible, why) = backend_verdict(b, now);
            Candidate {
                address: b.address.to_string(),
                weight: b.weight,
                effective_weight: b.effective_weight(now),
                in_flight: b.in_flight(),
                eligible,
                why,
            }
        })
        .collect();
    let client_ip = described.client_ip.unwrap_or(IpAddr::from([127, 0, 0, 1]));
    let pick = PickRequest { headers: request.headers(), uri: request.uri(), client_ip, exclude: &[] };
    let chosen = upstream.balancer.peek(&upstream.backends, &pick);
    let how = match &upstream.balancer {
        Balancer::RoundRobin(_) => "the next eligible backend in the smooth weighted round-robin order".to_owned(),
        Balancer::LeastLoaded(_) => {
            "the cheaper of two eligible backends drawn at random, by in_flight x latency / weight (this is one such draw)"
                .to_owned()
        }
        Balancer::Random(_) => "a weighted random draw among eligible backends (this is one such draw)".to_owned(),
        Balancer::ConsistentHash(policy) => {
            let key = policy.key();
            match crate::balance::extract_key(key, &pick, |bytes| String::from_utf8_lossy(bytes).into_owned()) {
                Some(value) => format!(
                    "the owner of key `{key}` = {value:?} on the hash ring, or the next eligible backend clockwise"
                ),
                None => format!("the request has no `{key}`, so it is balanced round robin"),
            }
        }
    };
    let scope = match &upstream.cluster {
        None => "max_concurrency holds in this replica",
        Some(slots) if slots.cluster.available() => {
            "max_concurrency holds across the cluster: the pick takes the first of these candidates with a free slot in Redis"
        }
        Some(slots) if slots.cluster.on_unavailable() == crate::config::OnUnavailable::Refuse => {
            "max_concurrency holds across the cluster, but Redis cannot be reached: 503 cluster_unavailable"
        }
        Some(_) => "max_concurrency holds across the cluster, but Redis cannot be reached: this replica's own limits apply",
    };
    let access = access_verdict(&route.access, described.client_ip, "route");
    let auth = auth_verdict(route.auth.as_ref(), &request);
    let listeners: serde_json::Map<String, Value> = snapshot
        .listener_access
        .iter()
        .map(|(_, (name, rules))| {
            (name.to_string(), Value::String(access_verdict(rules, described.client_ip, "listener").0))
        })
        .collect();
    let decision = match (access.1.or(auth.1), chosen) {
        (Some(refusal), _) => refusal,
        (None, Some(index)) => format!("would go to {}", upstream.backends[index].address),
        (None, None) => match (upstream.unavailable(), &upstream.queue) {
            (crate::upstream::Unavailable::AllBusy, Some(_)) => {
                "every eligible backend is busy: the request would wait in the queue".to_owned()
            }
            (crate::upstream::Unavailable::CircuitOpen, _) => {
                "every healthy backend has its circuit open: 503 circuit_open".to_owned()
            }
            _ => "no backend is eligible: 503 no_healthy_backend".to_owned(),
        },
    };
    json!({
        "route": route.name.as_ref(),
        "upstream": upstream.name.as_ref(),
        "policy": upstream.config.policy.name(),
        "how": how,
        "max_concurrency_scope": upstream.config.max_concurrency_scope,
        "scope": scope,
        "access": access.0,
        "listener_access": listeners,
        "auth": auth.0,
        "rate_limit": rate_limit_said(route),
        "candidates": candidates,
        "backend": chosen.map(|i| upstream.backends[i].address.to_string()),
        "decision": decision,
    })
}

/// What a listener's or route's `allow` / `deny` say of the described
/// client, in words; with the decision that replaces the pick's when they
/// refuse it.
fn access_verdict(
    rules: &crate::config::AddressRules,
    client: Option<IpAddr>,
    scope: &str,
) -> (String, Option<String>) {
    if rules.is_empty() {
        return (format!("no allow or deny on the {scope}: every client may use it"), None);
    }
    let Some(client) = client else {
        return (format!("the {scope} has allow or deny: describe a client_ip to see whether it may use it"), None);
    };
    match rules.admit(Some(client)) {
        Ok(()) => (format!("client {client} may use the {scope}"), None),
        Err(refusal) => {
            let said = format!("client {client} may not use the {scope}: {refusal}");
            (said.clone(), (scope == "route").then(|| format!("{said}: 403 forbidden")))
        }
    }
}

/// The route's `rate_limit` in words: what it allows, per what, and where
/// its buckets are (a bucket's level is not read: reading it would be a
/// request of its own in Redis).
fn rate_limit_said(route: &crate::route::Route) -> String {
    let Some(limit) = &route.rate_limit else {
        return "no rate_limit on the route".to_owned();
    };
    let config = &limit.config;
    let place = match (config.scope, limit.has_link(), limit.shared()) {
        (crate::config::ConcurrencyScope::Replica, _, _) => "in this replica's buckets",
        (_, false, _) => "in this replica's buckets: the Redis link of `cluster:` did not start",
        (_, true, true) => "in buckets the replicas share through Redis",
        (_, true, false) => "in this replica's buckets while Redis does not answer (shared again when it does)",
    };
    format!(
        "{} requests per {} for each {}, bursts of {}, {place}; over it: 429 rate_limited",
        config.requests,
        crate::text::duration(config.per),
        config.key,
        config.burst
    )
}

/// What the route's `auth:` asks and what it makes of the described
/// request's credentials (a client certificate cannot be described); with
/// the decision that replaces the pick's when they are refused.
fn auth_verdict(auth: Option<&crate::auth::RouteAuth>, request: &http::Request<()>) -> (String, Option<String>) {
    let Some(auth) = auth else {
        return ("no auth on the route: it asks for no credentials".to_owned(), None);
    };
    let methods = auth.methods().join(" and ");
    let certificate = if auth.config.client_cert.is_some() {
        " (a client certificate is checked per connection: /explain presents none and leaves it out)"
    } else {
        ""
    };
    let mut probe = request.clone();
    match auth.check_presented(&mut probe) {
        Ok(passed) => {
            let who = passed.principal.as_deref().map_or(String::new(), |who| format!(" as {who:?}"));
            (format!("the route asks for {methods}{certificate}; the described request passes{who}"), None)
        }
        Err(refusal) => {
            let answer = if refusal.is_unauthenticated() { "401 unauthenticated" } else { "403 forbidden" };
            let said = format!("the route asks for {methods}{certificate}; the described request fails: {refusal}");
            (said.clone(), Some(format!("{said}: {answer}")))
        }
    }
}

/// A part of the config as its type serializes itself (see `config::shown`).
fn shown(part: &impl serde::Serialize) -> Value {
    serde_json::to_value(part).expect("config values serialize to JSON: strings, numbers, booleans")
}

/// The effective config (defaults filled in) as a JSON value; the admin token
/// appears as `<redacted>`.
pub fn effective_config(config: &Config) -> Value {
    shown(config)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_strings_decode() {
        let d =
            Described::from_query("method=POST&host=bots.internal&path=%2Fjobs%2F1&header=x-job-id:job%2042").unwrap();
        assert_eq!((d.method.as_str(), d.host.as_deref(), d.path.as_str()), ("POST", Some("bots.internal"), "/jobs/1"));
        assert_eq!(d.headers, vec![("x-job-id".to_owned(), "job 42".to_owned())]);
        assert!(Described::from_query("bogus=1").is_err());
        assert_eq!(percent_decode("a%2"), "a%2");
        assert_eq!(percent_decode("%41+b"), "A b");
    }
}
