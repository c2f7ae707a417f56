//! Distributed tracing against a real OTLP receiver (tests/otlp_receiver.py,
//! which decodes what the proxy posts with OpenTelemetry's own protobuf
//! definitions): the spans of a direct, a retried and a queued call, with
//! their parentage as the backends saw it in `traceparent`; sampling
//! decisions that travel on; and a collector that never answers, which
//! loses spans and nothing else.

use std::io::BufRead;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::Request;
use serde_json::Value;

use crate::support::*;

/// The receiver as a child process, and every span it has printed so far.
struct Receiver {
    child: std::process::Child,
    port: u16,
    spans: Arc<Mutex<Vec<Value>>>,
}

impl Receiver {
    fn start() -> Receiver {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/otlp_receiver.py");
        let mut child = python()
            .arg(script)
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("the tests' Python runs (scripts/install-test-deps)");
        let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
        let first: Value = serde_json::from_str(&lines.next().expect("the receiver says its port").unwrap()).unwrap();
        let port = first["listening"].as_u64().expect("a port") as u16;
        let spans = Arc::new(Mutex::new(Vec::new()));
        let collected = Arc::clone(&spans);
        std::thread::spawn(move || {
            for line in lines.map_while(Result::ok) {
                collected.lock().unwrap().push(serde_json::from_str::<Value>(&line).unwrap());
            }
        });
        Receiver { child, port, spans }
    }

    /// The spans of `trace_id`, once `count` of them have arrived.
    async fn trace(&self, trace_id: &str, count: usize) -> Vec<Value> {
        let spans = Arc::clone(&self.spans);
        wait_until(&format!("{count} spans of trace {trace_id}"), Duration::from_secs(30), || {
            spans.lock().unwrap().iter().filter(|s| s["trace_id"] == trace_id).count() >= count
        })
        .await;
        self.spans.lock().unwrap().iter().filter(|s| s["trace_id"] == trace_id).cloned().collect()
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn one<'a>(spans: &'a [Value], kind: &str) -> &'a Value {
    let found: Vec<&Value> = spans.iter().filter(|s| s["kind"] == kind).collect();
    assert_eq!(found.len(), 1, "one {kind} span in {spans:#?}");
    found[0]
}

fn clients(spans: &[Value]) -> Vec<&Value> {
    let mut tries: Vec<&Value> = spans.iter().filter(|s| s["kind"] == "SPAN_KIND_CLIENT").collect();
    tries.sort_by_key(|s| s["attributes"]["switchyard.attempt"].as_i64());
    tries
}

/// The `traceparent` the backend last received, split into its fields.
fn traceparent_seen(backend: &Backend) -> Vec<String> {
    let headers = backend.stats.last_headers.lock().unwrap().clone().expect("the backend got a request");
    let value = headers.get("traceparent").expect("a traceparent reached the backend").to_str().unwrap();
    value.split('-').map(str::to_owned).collect()
}

async fn get_traced(url: String, traceparent: Option<String>) -> Answer {
    let mut request = Request::get(url);
    if let Some(value) = traceparent {
        request = request.header("traceparent", value.as_str()).header("tracestate", "vendor=kept");
    }
    send(&client(), request.body(full("")).unwrap()).await
}

fn closed_port() -> std::net::SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_of_a_direct_a_retried_and_a_queued_call_arrive_with_their_parentage() {
    let receiver = Receiver::start();
    let [direct, good, bot] =
        [Backend::start("direct").await, Backend::start("good").await, Backend::start("bot").await];
    let refusing = closed_port();
    let admin_port = free_port();
    let yaml = format!(
        r#"admin: {{ bind: "127.0.0.1:{admin_port}" }}
listeners: [{{ name: main, bind: "127.0.0.1:{{port}}" }}]
tracing: {{ otlp_endpoint: "http://127.0.0.1:{receiver}", service_name: bots-edge }}
routes:
  - {{ name: direct, match: {{ path_prefix: /direct }}, upstream: direct }}
  - name: retried
    match: {{ path_prefix: /retried }}
    upstream: half-dead
    retry: {{ attempts: 2, backoff: {{ base: 1ms, max: 1ms }} }}
  - {{ name: queued, match: {{ path_prefix: /queued }}, upstream: one-bot }}
upstreams:
  direct: {{ backends: [{{ address: "{direct}" }}] }}
  half-dead: {{ backends: [{{ address: "{refusing}" }}, {{ address: "{good}" }}] }}
  one-bot:
    backends: [{{ address: "{bot}", max_concurrency: 1 }}]
    queue: {{ max_waiting: 5, timeout: 30s }}
"#,
        receiver = receiver.port,
        direct = direct.addr,
        good = good.addr,
        bot = bot.addr,
    );
    let proxy = ProxyProcess::start(&yaml).await;

    // A direct call, in a trace the client started and sampled.
    let client_trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let client_span = "00f067aa0ba902b7";
    let answer = get_traced(proxy.url("/direct"), Some(format!("00-{client_trace}-{client_span}-01"))).await;
    assert_eq!(answer.status, 200);
    let seen = traceparent_seen(&direct);
    let spans = receiver.trace(client_trace, 2).await;
    let metrics_url = format!("http://127.0.0.1:{admin_port}/metrics");
    wait_until_async("the exported spans to be counted", || async {
        let exported = |scrape| metric_value(&scrape, "switchyard_trace_spans_total", &[("result", "exported")]);
        exported(scrape(&metrics_url).await) == Some(2.0)
    })
    .await;
    let server = one(&spans, "SPAN_KIND_SERVER");
    let tried = one(&spans, "SPAN_KIND_CLIENT");
    assert_eq!(server["parent_span_id"], client_span, "the proxy's span is the client's child");
    assert_eq!(tried["parent_span_id"], server["span_id"], "the try is the proxy's span's child");
    assert_eq!(seen, ["00", client_trace, tried["span_id"].as_str().unwrap(), "01"], "the backend's parent is the try");
    let tracestate = direct.stats.last_headers.lock().unwrap().as_ref().unwrap()["tracestate"].clone();
    assert_eq!(tracestate, "vendor=kept", "tracestate goes through as it came");
    assert_eq!(server["service"], "bots-edge");
    assert_eq!(server["name"], "GET direct");
    assert_eq!(server["attributes"]["switchyard.route"], "direct");
    assert_eq!(server["attributes"]["switchyard.upstream"], "direct");
    assert_eq!(server["attributes"]["http.response.status_code"], 200);
    assert_eq!(server["attributes"]["url.path"], "/direct");
    assert_eq!(tried["attributes"]["server.address"], direct.addr.to_string());
    assert_eq!(tried["attributes"]["switchyard.attempt"], 1);
    assert_eq!(tried["attributes"]["http.response.status_code"], 200);
    assert!(tried["attributes"].get("switchyard.retry_reason").is_none(), "{tried}");
    assert!(server["start"].as_u64() <= tried["start"].as_u64() && tried["end"].as_u64() <= server["end"].as_u64());

    // What the client chooses stays small in a span: an extension method is
    // `_OTHER`, a long path is cut. A backend's `x-switchyard-error` is not
    // the proxy's: the span does not fail.
    let long_path = format!("/direct/{}/mimics-the-proxy", "p".repeat(3000));
    let request = Request::builder()
        .method("FROBNICATE")
        .uri(proxy.url(&long_path))
        .header("traceparent", format!("00-{}-{client_span}-01", "cd".repeat(16)))
        .body(full(""))
        .unwrap();
    assert_eq!(send(&client(), request).await.status, 200);
    let spans = receiver.trace(&"cd".repeat(16), 2).await;
    let server = one(&spans, "SPAN_KIND_SERVER");
    assert_eq!(server["name"], "_OTHER direct");
    assert_eq!(server["attributes"]["http.request.method"], "_OTHER");
    assert_eq!(server["attributes"]["url.path"].as_str().unwrap(), &long_path[..256]);
    assert!(server["attributes"].get("error.type").is_none(), "{server}");
    assert_eq!(server["status"], "STATUS_CODE_UNSET");

    // A retried call, in a trace the proxy starts (no traceparent).
    assert_eq!(get_traced(proxy.url("/retried"), None).await.status, 200);
    let seen = traceparent_seen(&good);
    let spans = receiver.trace(&seen[1], 3).await;
    let server = one(&spans, "SPAN_KIND_SERVER");
    assert_eq!(server["parent_span_id"], "", "a trace started here has no parent");
    assert_eq!(server["attributes"]["switchyard.attempts"], 2);
    let tries = clients(&spans);
    assert_eq!(tries.len(), 2, "a span per try: {spans:#?}");
    assert!(tries.iter().all(|t| t["parent_span_id"] == server["span_id"]));
    assert_eq!(tries[0]["attributes"]["server.address"], refusing.to_string());
    assert_eq!(tries[0]["attributes"]["error.type"], "upstream_connect");
    assert_eq!(tries[0]["status"], "STATUS_CODE_ERROR");
    assert_eq!(tries[1]["attributes"]["server.address"], good.addr.to_string());
    assert_eq!(tries[1]["attributes"]["switchyard.retry_reason"], "connect-failure");
    assert_eq!(tries[1]["attributes"]["http.response.status_code"], 200);
    assert_eq!(seen[2], tries[1]["span_id"].as_str().unwrap(), "the backend's parent is the try that reached it");
    assert_eq!(seen[3], "01");

    // A queued call: the bot runs one job, the second waits for it.
    let holding = tokio::spawn(get_traced(proxy.url("/queued/hold"), None));
    wait_until("the bot to be busy", Duration::from_secs(30), || bot.in_flight() == 1).await;
    let waiting =
        tokio::spawn(get_traced(proxy.url("/queued/next"), Some(format!("00-{}-{client_span}-01", "ab".repeat(16)))));
    wait_until_async("the second job to queue", || async {
        metric_value(&scrape(&metrics_url).await, "switchyard_queue_waiting", &[("upstream", "one-bot")]) == Some(1.0)
    })
    .await;
    bot.release_held();
    assert_eq!(holding.await.unwrap().status, 200);
    assert_eq!(waiting.await.unwrap().status, 200);
    let spans = receiver.trace(&"ab".repeat(16), 2).await;
    let tried = one(&spans, "SPAN_KIND_CLIENT");
    let events = tried["events"].as_array().unwrap();
    assert_eq!(events.len(), 1, "{tried}");
    assert_eq!(events[0]["name"], "queued");
    assert!(events[0]["attributes"]["switchyard.queue_wait_ms"].as_f64().unwrap() > 0.0, "{tried}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unsampled_request_goes_on_as_it_came_and_records_nothing() {
    let receiver = Receiver::start();
    let backend = Backend::start("a").await;
    let yaml = format!(
        "listeners: [{{ bind: \"127.0.0.1:{{port}}\" }}]\ntracing: {{ otlp_endpoint: \"http://127.0.0.1:{}/\", sample_ratio: 0 }}\nroutes: [{{ upstream: bots }}]\nupstreams:\n  bots: {{ backends: [{{ address: \"{}\" }}] }}\n",
        receiver.port, backend.addr
    );
    let proxy = ProxyProcess::start(&yaml).await;
    let last_headers = || backend.stats.last_headers.lock().unwrap().clone().expect("the backend got a request");
    // The client's unsampled trace goes on as it came.
    let unsampled = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00";
    assert_eq!(get_traced(proxy.url("/a"), Some(unsampled.to_owned())).await.status, 200);
    assert_eq!(traceparent_seen(&backend).join("-"), unsampled);
    assert_eq!(last_headers()["tracestate"], "vendor=kept");
    // Without a traceparent, and not sampled: none is made up.
    assert_eq!(get_traced(proxy.url("/b"), None).await.status, 200);
    assert!(last_headers().get("traceparent").is_none(), "{:?}", last_headers());
    // An invalid one belongs to no trace: it goes, with its tracestate.
    let invalid = "00-0AF7651916CD43DD8448EB211C80319C-b7ad6b7169203331-01".to_owned();
    assert_eq!(get_traced(proxy.url("/c"), Some(invalid)).await.status, 200);
    let headers = last_headers();
    assert!(headers.get("traceparent").is_none() && headers.get("tracestate").is_none(), "{headers:?}");
    // Two traceparents say two things: neither goes on.
    let twice = Request::get(proxy.url("/twice"))
        .header("traceparent", unsampled)
        .header("traceparent", "00-1af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")
        .body(full(""))
        .unwrap();
    assert_eq!(send(&client(), twice).await.status, 200);
    assert!(last_headers().get("traceparent").is_none(), "{:?}", last_headers());
    // A sampled client trace is followed whatever the ratio.
    let sampled = "5bf92f3577b34da6a3ce929d0e0e4736";
    assert_eq!(get_traced(proxy.url("/d"), Some(format!("00-{sampled}-00f067aa0ba902b7-01"))).await.status, 200);
    receiver.trace(sampled, 2).await;
    // Spans leave in order: had the earlier requests any, they would be here by now.
    assert_eq!(receiver.spans.lock().unwrap().len(), 2, "only the sampled request's spans");
}

/// A collector that accepts connections and never answers: each export
/// waits out its timeout. Requests are served all the same, and the spans
/// waiting for export are bounded (the rest are dropped), so memory does not
/// grow with the traffic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_collector_that_never_answers_loses_spans_not_requests_and_holds_no_more_memory() {
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let collector = silent.local_addr().unwrap();
    // Accepted, kept open, never read.
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for connection in silent.incoming().map_while(Result::ok) {
            held.push(connection);
        }
    });
    let backend = Backend::start("a").await;
    let admin_port = free_port();
    let yaml = format!(
        "admin: {{ bind: \"127.0.0.1:{admin_port}\" }}\nlisteners: [{{ bind: \"127.0.0.1:{{port}}\" }}]\ntracing: {{ otlp_endpoint: \"http://{collector}\", sample_ratio: 1.0 }}\nroutes: [{{ upstream: bots }}]\nupstreams:\n  bots: {{ backends: [{{ address: \"{}\" }}] }}\n",
        backend.addr
    );
    let proxy = ProxyProcess::start(&yaml).await;
    let url = proxy.url("/job");
    let send_all = |count: usize| {
        let url = url.clone();
        async move {
            let client = client();
            let tasks: Vec<_> = (0..16)
                .map(|_| {
                    let (client, url) = (client.clone(), url.clone());
                    tokio::spawn(async move {
                        for _ in 0..count / 16 {
                            assert_eq!(get(&client, &url).await.status, 200, "every request is served");
                        }
                    })
                })
                .collect();
            for task in tasks {
                task.await.unwrap();
            }
        }
    };
    // Enough to fill the export queue, then the baseline.
    send_all(10_000).await;
    let before = proxy.memory_kib("VmRSS");
    send_all(20_000).await;
    let after = proxy.memory_kib("VmRSS");
    assert_eq!(backend.hits(), 30_000);
    // 40,000 more spans held would be some 20 MiB (measured with the queue unbounded).
    assert!(after < before + 8 * 1024, "RSS grew from {before} KiB to {after} KiB with the collector silent");
    // What was lost is counted: 60,000 spans, at most 4,096 waiting and a
    // few batches in the air, none exported.
    let scrape = scrape(&format!("http://127.0.0.1:{admin_port}/metrics")).await;
    let spans = |result| metric_value(&scrape, "switchyard_trace_spans_total", &[("result", result)]).unwrap();
    assert!(spans("dropped") >= 50_000.0, "dropped {}", spans("dropped"));
    assert_eq!(spans("exported"), 0.0);
}

/// `tracing:` is reloadable: a ratio raised from 0 to 1 by a reload records
/// the requests that start after it, through the exporter the reload made
/// for its new service name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_changes_what_is_sampled() {
    let receiver = Receiver::start();
    let backend = Backend::start("a").await;
    let config = |ratio: &str, service: &str| {
        format!(
            "listeners: [{{ bind: \"127.0.0.1:{{port}}\" }}]\ntracing: {{ otlp_endpoint: \"http://127.0.0.1:{}\", sample_ratio: {ratio}, service_name: {service} }}\nroutes: [{{ upstream: bots }}]\nupstreams:\n  bots: {{ backends: [{{ address: \"{}\" }}] }}\n",
            receiver.port, backend.addr
        )
    };
    let proxy = ProxyProcess::start(&config("0", "edge")).await;
    assert_eq!(get_traced(proxy.url("/before"), None).await.status, 200);
    let headers = backend.stats.last_headers.lock().unwrap().clone().unwrap();
    assert!(headers.get("traceparent").is_none(), "not sampled at a ratio of 0");
    let port = proxy.addr.port().to_string();
    // A new service name: a new exporter, made by the reload.
    std::fs::write(&proxy.path, with_test_admin(&config("1.0", "renamed").replace("{port}", &port))).unwrap();
    proxy.signal(libc::SIGHUP);
    wait_until_async("the reload to sample", || async {
        let served = get_traced(proxy.url("/after"), None).await.status == 200;
        let headers = backend.stats.last_headers.lock().unwrap().clone().unwrap();
        served && headers.get("traceparent").is_some()
    })
    .await;
    let sampled = traceparent_seen(&backend)[1].clone();
    let spans = receiver.trace(&sampled, 2).await;
    let server = one(&spans, "SPAN_KIND_SERVER");
    assert_eq!(
        (server["attributes"]["url.path"].as_str(), server["service"].as_str()),
        (Some("/after"), Some("renamed"))
    );
}

/// A proxy told to stop sends the spans of the requests it drained before
/// it exits, rather than lose the last second of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopping_proxy_sends_its_last_spans() {
    let receiver = Receiver::start();
    let backend = Backend::start("a").await;
    let yaml = format!(
        "listeners: [{{ bind: \"127.0.0.1:{{port}}\" }}]\ntracing: {{ otlp_endpoint: \"http://127.0.0.1:{}\" }}\nroutes: [{{ upstream: bots }}]\nupstreams:\n  bots: {{ backends: [{{ address: \"{}\" }}] }}\n",
        receiver.port, backend.addr
    );
    let mut proxy = ProxyProcess::start(&yaml).await;
    let last = "6bf92f3577b34da6a3ce929d0e0e4736";
    assert_eq!(get_traced(proxy.url("/last"), Some(format!("00-{last}-00f067aa0ba902b7-01"))).await.status, 200);
    proxy.signal(libc::SIGTERM);
    let status = proxy.wait_for_exit(Duration::from_secs(30), "the proxy to stop").await;
    assert!(status.success(), "{status:?}");
    let spans = receiver.trace(last, 2).await;
    assert_eq!(one(&spans, "SPAN_KIND_SERVER")["attributes"]["url.path"], "/last");
}
