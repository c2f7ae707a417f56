//! Resilience: circuit breakers, retries within a budget, and queueing for bots
//! that run one job at a time, shown by what real backends saw.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::Request;
use serde_json::Value;

use crate::support::*;

fn upstream_config(backends: &[&Backend], route_extra: &str, upstream_extra: &str, fields: &str) -> String {
    let list: String = backends.iter().map(|b| format!("      - {{ address: \"{}\"{fields} }}\n", b.addr)).collect();
    format!(
        "listeners: [{{ bind: \"127.0.0.1:0\" }}]\nroutes:\n  - upstream: pool\n{route_extra}upstreams:\n  pool:\n{upstream_extra}    backends:\n{list}"
    )
}

async fn status(proxy: &Proxy) -> Value {
    let admin = proxy.running.admin_addr().await;
    serde_json::from_str(&get(&client(), &format!("http://{admin}/status")).await.body).unwrap()
}

fn backend_field(status: &Value, backend: &Backend, field: &str) -> Value {
    status["upstreams"][0]["backends"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["address"] == backend.addr.to_string().as_str())
        .unwrap()[field]
        .clone()
}

#[tokio::test]
async fn a_failing_backend_trips_its_breaker_gets_nothing_while_open_and_closes_after_probes() {
    let [bad, good] = [Backend::start("bad").await, Backend::start("good").await];
    bad.stats.fail_with.store(503, Ordering::SeqCst);
    let breaker = "    circuit_breaker: { consecutive_failures: 3, open_for: 3s, half_open_requests: 2 }\n";
    let proxy = start_proxy(&upstream_config(&[&bad, &good], "", breaker, "")).await;
    let client = client();
    while bad.hits() < 3 {
        get(&client, &proxy.url("/")).await;
    }
    let s = status(&proxy).await;
    assert_eq!(backend_field(&s, &bad, "circuit"), "open", "{s:#}");
    // Open: no traffic at all reaches the bad backend.
    for _ in 0..10 {
        assert_eq!(get(&client, &proxy.url("/")).await.body, "good");
    }
    assert_eq!(bad.hits(), 3);

    // It recovers; once open_for has passed, two probes go through and close it.
    bad.stats.fail_with.store(0, Ordering::SeqCst);
    wait_until_async("open_for to pass", || async {
        backend_field(&status(&proxy).await, &bad, "circuit_open_for_seconds").is_null()
    })
    .await;
    for _ in 0..6 {
        assert_eq!(get(&client, &proxy.url("/")).await.status, 200);
    }
    assert_eq!(backend_field(&status(&proxy).await, &bad, "circuit"), "closed");
    let before = bad.hits();
    assert!(before >= 5, "the probes reached the recovered backend");
    for _ in 0..10 {
        get(&client, &proxy.url("/")).await;
    }
    assert!(bad.hits() >= before + 4, "closed again: it gets its share");
}

#[tokio::test]
async fn with_one_backend_refusing_connections_clients_see_no_errors() {
    let [a, b] = [Backend::start("a").await, Backend::start("b").await];
    let refusing = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap()
    };
    let yaml = format!(
        "listeners: [{{ bind: \"127.0.0.1:0\" }}]\nroutes:\n  - upstream: pool\n    retry: {{ attempts: 3 }}\nupstreams:\n  pool:\n    backends:\n      - {{ address: \"{}\" }}\n      - {{ address: \"{refusing}\" }}\n      - {{ address: \"{}\" }}\n",
        a.addr, b.addr
    );
    let proxy = start_proxy(&yaml).await;
    let failures = Arc::new(AtomicUsize::new(0));
    let mut workers = Vec::new();
    for _ in 0..4 {
        let (failures, url) = (Arc::clone(&failures), proxy.url("/"));
        workers.push(tokio::spawn(async move {
            let client = client();
            for _ in 0..50 {
                // GET and POST alike: a refused connection never reached a backend.
                let request = Request::post(&url).body(full("job")).unwrap();
                if send(&client, request).await.status != 200 {
                    failures.fetch_add(1, Ordering::SeqCst);
                }
            }
        }));
    }
    for worker in workers {
        worker.await.unwrap();
    }
    assert_eq!(failures.load(Ordering::SeqCst), 0);
    assert_eq!(a.hits() + b.hits(), 200);
}

#[tokio::test]
async fn retries_stay_within_the_budget_when_every_backend_fails() {
    let backends = [Backend::start("a").await, Backend::start("b").await, Backend::start("c").await];
    for backend in &backends {
        backend.stats.fail_with.store(503, Ordering::SeqCst);
    }
    let all: Vec<&Backend> = backends.iter().collect();
    let route =
        "    retry: { attempts: 3, backoff: { base: 1ms, max: 2ms }, budget: { ratio: 0.2, min_per_second: 1 } }\n";
    let proxy = start_proxy(&upstream_config(&all, route, "", "")).await;
    let client = client();
    let requests = 100;
    for _ in 0..requests {
        assert_eq!(get(&client, &proxy.url("/")).await.status, 503);
    }
    let attempts: usize = backends.iter().map(|b| b.hits()).sum();
    let retries = attempts - requests;
    let budget = (0.2 * requests as f64) as usize + 10;
    eprintln!(
        "{requests} requests to failing backends: {retries} retries (budget {budget}, without it up to {})",
        2 * requests
    );
    assert!(retries > 0, "some retries happen");
    assert!(retries <= budget, "{retries} retries exceed the budget of {budget}");
}

#[tokio::test]
async fn a_post_that_reached_a_backend_and_got_a_reset_is_not_retried() {
    let (addr, requests) = resetting_backend().await;
    let yaml = format!(
        "listeners: [{{ bind: \"127.0.0.1:0\" }}]\nroutes:\n  - upstream: pool\n    retry: {{ attempts: 3, backoff: {{ base: 1ms, max: 2ms }} }}\nupstreams:\n  pool:\n    backends: [{{ address: \"{addr}\" }}]\n"
    );
    let proxy = start_proxy(&yaml).await;
    let post = send(&client(), Request::post(proxy.url("/job")).body(full("do it once")).unwrap()).await;
    assert_eq!((post.status.as_u16(), post.error_code()), (502, Some("upstream_reset")));
    assert_eq!(requests.load(Ordering::SeqCst), 1, "the POST reached the backend once and was not retried");
    let get_answer = get(&client(), &proxy.url("/status")).await;
    assert_eq!(get_answer.status, 502);
    assert_eq!(requests.load(Ordering::SeqCst), 4, "a GET is idempotent: tried 3 times");
}

fn queue_config(bots: &[&Backend], max_waiting: u32, timeout: &str) -> String {
    upstream_config(
        bots,
        "",
        &format!("    queue: {{ max_waiting: {max_waiting}, timeout: {timeout}, priority_header: x-priority }}\n"),
        ", max_concurrency: 1",
    )
}

#[tokio::test]
async fn thirty_jobs_for_three_one_at_a_time_bots_queue_in_priority_order() {
    let bots = [Backend::start("bot1").await, Backend::start("bot2").await, Backend::start("bot3").await];
    let all: Vec<&Backend> = bots.iter().collect();
    let proxy = start_proxy(&queue_config(&all, 100, "30s")).await;
    let send_job = |name: String, priority: &'static str| {
        let url = proxy.url("/job?delay_ms=200");
        tokio::spawn(async move {
            let request =
                Request::post(url).header("x-job-id", &name).header("x-priority", priority).body(full("job")).unwrap();
            send(&client(), request).await
        })
    };
    let mut jobs = Vec::new();
    let started = || bots.iter().map(|b| b.hits()).sum::<usize>();
    // One at a time, each running or queued before the next is sent, so the
    // order the proxy saw them in is the order they were sent in (connections
    // land on different worker threads, which would otherwise race).
    for i in 0..27 {
        jobs.push(send_job(format!("normal-{i}"), "normal"));
        wait_until_async("the job to run or queue", || async {
            status(&proxy).await["upstreams"][0]["queue_waiting"].as_u64().unwrap() as usize + started() > i
        })
        .await;
    }
    assert!(status(&proxy).await["upstreams"][0]["queue_waiting"].as_u64().unwrap() > 3, "normal jobs are waiting");
    for i in 0..3 {
        jobs.push(send_job(format!("high-{i}"), "high"));
    }
    // Every job is now running or waiting; note how many had started.
    wait_until_async("all 30 jobs running or waiting", || async {
        status(&proxy).await["upstreams"][0]["queue_waiting"].as_u64().unwrap() as usize + started() >= 30
    })
    .await;
    let started_when_high_queued = started();
    for job in jobs {
        let answer = job.await.unwrap();
        assert_eq!(answer.status, 200, "{}", answer.body);
    }
    for bot in &bots {
        assert_eq!(bot.stats.peak_in_flight.load(Ordering::SeqCst), 1, "{} ran two jobs at once", bot.name);
    }
    let mut order: Vec<(Instant, String)> = bots.iter().flat_map(|b| b.stats.started.lock().unwrap().clone()).collect();
    order.sort();
    assert_eq!(order.len(), 30);
    let names: Vec<&str> = order.iter().map(|(_, name)| name.as_str()).collect();
    for position in names.iter().enumerate().filter(|(_, n)| n.starts_with("high")).map(|(i, _)| i) {
        assert!(position < started_when_high_queued + 3, "a high job started at {position}: {names:?}");
    }
    // Normal jobs start in arrival order. Two jobs woken for slots that freed
    // at the same moment are forwarded by different worker threads and may
    // reach their bots a hair apart in either order; a job overtaken by one
    // that arrived later would start a whole job (200 ms) later.
    let mut normal_starts: Vec<(usize, Instant)> =
        order.iter().filter_map(|(at, name)| Some((name.strip_prefix("normal-")?.parse().unwrap(), *at))).collect();
    normal_starts.sort();
    for pair in normal_starts.windows(2) {
        let ((earlier, earlier_at), (later, later_at)) = (pair[0], pair[1]);
        assert!(
            later_at + Duration::from_millis(50) >= earlier_at,
            "normal-{later} started {:?} before normal-{earlier}, which arrived first",
            earlier_at - later_at
        );
    }
}

#[tokio::test]
async fn a_full_queue_refuses_at_once_and_a_long_wait_times_out() {
    let bots = [Backend::start("bot1").await, Backend::start("bot2").await, Backend::start("bot3").await];
    let all: Vec<&Backend> = bots.iter().collect();
    let proxy = start_proxy(&queue_config(&all, 5, "30s")).await;
    let mut jobs = Vec::new();
    for _ in 0..30 {
        let url = proxy.url("/hold");
        jobs.push(tokio::spawn(async move { get(&client(), &url).await }));
    }
    wait_until_async("3 running and 5 waiting", || async {
        bots.iter().map(|b| b.in_flight()).sum::<usize>() == 3
            && status(&proxy).await["upstreams"][0]["queue_waiting"] == 5
    })
    .await;
    // The 22 others were refused without waiting for anything.
    wait_until("22 refusals", Duration::from_secs(10), || jobs.iter().filter(|j| j.is_finished()).count() == 22).await;
    for bot in &bots {
        bot.release_held();
    }
    let mut refused = 0;
    for job in jobs {
        let answer = job.await.unwrap();
        if answer.status == 503 {
            assert_eq!(answer.error_code(), Some("queue_full"));
            assert_eq!(answer.headers["retry-after"], "1");
            refused += 1;
        } else {
            assert_eq!(answer.status, 200);
        }
    }
    assert_eq!(refused, 22);

    let short = start_proxy(&queue_config(&all[..1], 5, "200ms")).await;
    let busy = tokio::spawn({
        let url = short.url("/?delay_ms=2000");
        async move { get(&client(), &url).await }
    });
    wait_until("the bot to be busy", Duration::from_secs(10), || bots[0].in_flight() == 1).await;
    let waited = get(&client(), &short.url("/")).await;
    assert_eq!((waited.status.as_u16(), waited.error_code()), (503, Some("queue_timeout")));
    assert!(waited.headers.contains_key("retry-after"));
    assert_eq!(busy.await.unwrap().status, 200);
}

#[tokio::test]
async fn a_client_that_gives_up_leaves_the_queue() {
    let bot = Backend::start("bot").await;
    let proxy = start_proxy(&queue_config(&[&bot], 10, "30s")).await;
    let busy = tokio::spawn({
        let url = proxy.url("/hold");
        async move { get(&client(), &url).await }
    });
    wait_until("the bot to be busy", Duration::from_secs(10), || bot.in_flight() == 1).await;
    let impatient = tokio::spawn({
        let url = proxy.url("/");
        async move { get(&client(), &url).await }
    });
    wait_until_async("one waiting", || async { status(&proxy).await["upstreams"][0]["queue_waiting"] == 1 }).await;
    impatient.abort();
    wait_until_async("nobody waiting", || async { status(&proxy).await["upstreams"][0]["queue_waiting"] == 0 }).await;
    bot.release_held();
    assert_eq!(busy.await.unwrap().status, 200);
    assert_eq!(bot.hits(), 1, "the departed request was never sent");
}

#[tokio::test]
async fn a_slow_backend_behind_least_loaded_does_not_hold_up_the_others() {
    let [slow, fast1, fast2] =
        [Backend::start("slow").await, Backend::start("fast1").await, Backend::start("fast2").await];
    slow.set_delay(Duration::from_secs(5));
    let proxy =
        start_proxy(&upstream_config(&[&slow, &fast1, &fast2], "", "    balance: { policy: least_loaded }\n", ""))
            .await;
    let mut requests = Vec::new();
    for _ in 0..30 {
        let url = proxy.url("/");
        requests.push(tokio::spawn(async move { get(&client(), &url).await.body }));
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Everything the fast backends took finished while the slow one still works.
    wait_until("the fast backends' requests", Duration::from_secs(20), || {
        fast1.hits() + fast2.hits() + slow.hits() == 30
            && requests.iter().filter(|r| r.is_finished()).count() == fast1.hits() + fast2.hits()
    })
    .await;
    assert!(slow.in_flight() > 0, "the slow requests are still running");
    assert!(slow.hits() <= 3, "the slow backend got {} of 30", slow.hits());
    for request in requests {
        request.await.unwrap();
    }
}

/// A one-job bot that another scheduler keeps busy: its first job is
/// answered 503 with `Retry-After: {seconds}`, later ones 200. Counts what it got.
async fn bot_busy_elsewhere(seconds: u32) -> (std::net::SocketAddr, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(AtomicUsize::new(0));
    let counted = Arc::clone(&seen);
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else { continue };
            let seen = Arc::clone(&counted);
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |_request: Request<hyper::body::Incoming>| {
                    let first = seen.fetch_add(1, Ordering::SeqCst) == 0;
                    async move {
                        let mut response = http::Response::new(full(if first { "busy" } else { "done" }));
                        if first {
                            *response.status_mut() = http::StatusCode::SERVICE_UNAVAILABLE;
                            response.headers_mut().insert("retry-after", seconds.into());
                        }
                        Ok::<_, std::convert::Infallible>(response)
                    }
                });
                let io = hyper_util::rt::TokioIo::new(stream);
                let _ = hyper::server::conn::http1::Builder::new().serve_connection(io, service).await;
            });
        }
    });
    (addr, seen)
}

#[tokio::test]
async fn a_bot_busy_with_work_from_elsewhere_sends_the_job_back_to_the_queue_unharmed() {
    let (busy_addr, busy_seen) = bot_busy_elsewhere(30).await;
    let free = Backend::start("free").await;
    // Listed first: round robin offers it the first job.
    let yaml = format!(
        "listeners: [{{ bind: \"127.0.0.1:0\" }}]\nroutes: [{{ upstream: pool }}]\nupstreams:\n  pool:\n    \
         queue: {{ max_waiting: 10, timeout: 30s }}\n    health: {{ passive: {{ consecutive_failures: 1 }} }}\n    \
         backends:\n      - {{ address: \"{busy_addr}\", max_concurrency: 1 }}\n      - {{ address: \"{}\", max_concurrency: 1 }}\n",
        free.addr
    );
    let proxy = start_proxy(&yaml).await;
    let job = Request::post(proxy.url("/jobs")).body(full("invoice 4711")).unwrap();
    let answer = send(&client(), job).await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    assert_eq!(answer.body, "free", "the job went on to the free bot");
    assert_eq!(busy_seen.load(Ordering::SeqCst), 1, "the busy bot was asked once");
    assert_eq!(free.stats.bytes_received.load(Ordering::SeqCst), 12, "the free bot got the whole body");

    let status = status(&proxy).await;
    let busy = &status["upstreams"][0]["backends"][0];
    assert_eq!(busy["failed_requests"], 0, "a busy answer is not the bot's failure: {busy}");
    assert_eq!(busy["ejected_for_seconds"], Value::Null, "nor does it eject it: {busy}");
    assert!(busy["why"].as_str().unwrap().starts_with("busy with work from elsewhere"), "{busy}");
    // While it says it is busy, it gets nothing.
    for _ in 0..4 {
        assert_eq!(get(&client(), &proxy.url("/jobs")).await.body, "free");
    }
    assert_eq!(busy_seen.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn a_job_waits_out_the_only_bots_retry_after_and_then_runs() {
    let (addr, seen) = bot_busy_elsewhere(1).await;
    let yaml = format!(
        "listeners: [{{ bind: \"127.0.0.1:0\" }}]\nroutes: [{{ upstream: pool }}]\nupstreams:\n  pool:\n    \
         queue: {{ max_waiting: 10, timeout: 30s }}\n    backends: [{{ address: \"{addr}\", max_concurrency: 1 }}]\n"
    );
    let proxy = start_proxy(&yaml).await;
    let sent = Instant::now();
    let answer = get(&client(), &proxy.url("/jobs")).await;
    // Nothing frees a slot when a Retry-After runs out: the queue is woken then.
    assert_eq!((answer.status.as_u16(), answer.body.as_str()), (200, "done"));
    assert_eq!(seen.load(Ordering::SeqCst), 2);
    assert!(sent.elapsed() >= Duration::from_secs(1), "asked again only after its Retry-After");
}
