//! Backends from DNS: a real DNS server on loopback (`dns.rs`) whose records
//! change while traffic flows. The proxy follows A and SRV records, never
//! fails a request for a backend that stays, keeps a staying backend's state,
//! and keeps its last good set when DNS fails.

use std::collections::{BTreeSet, HashMap};
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;
use tokio::net::TcpListener;

use crate::dns::{DnsServer, Srv};
use crate::support::*;

/// `count` backends on 127.0.0.2, 127.0.0.3, ... all on one port, as the
/// pods behind a headless Service are: A records carry no port.
async fn backends_on_one_port(count: usize) -> (u16, Vec<Backend>) {
    'retry: loop {
        let first = TcpListener::bind("127.0.0.2:0").await.unwrap();
        let port = first.local_addr().unwrap().port();
        let mut listeners = vec![first];
        for i in 1..count {
            match TcpListener::bind(format!("127.0.0.{}:{port}", i + 2)).await {
                Ok(listener) => listeners.push(listener),
                Err(_) => continue 'retry,
            }
        }
        let backends = listeners.into_iter().enumerate().map(|(i, l)| Backend::serve(&format!("bot{i}"), l));
        return (port, backends.collect());
    }
}

fn ip(backend: &Backend) -> IpAddr {
    backend.addr.ip()
}

fn ips(backends: &[&Backend]) -> Vec<IpAddr> {
    backends.iter().map(|b| ip(b)).collect()
}

fn dns_config(dns: &DnsServer, discovery: &str, upstream_extra: &str) -> String {
    format!(
        "{}listeners: [{{ bind: \"127.0.0.1:0\" }}]\nroutes: [{{ upstream: bots }}]\nupstreams:\n  bots:\n    \
         discovery: {discovery}\n{upstream_extra}",
        dns.resolver_yaml()
    )
}

fn discovery_status(status: &Value) -> &Value {
    &status["upstreams"][0]["discovery"]
}

fn served(status: &Value) -> BTreeSet<String> {
    status["upstreams"][0]["backends"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["address"].as_str().unwrap().to_owned())
        .collect()
}

fn addresses(backends: &[&Backend]) -> BTreeSet<String> {
    backends.iter().map(|b| b.addr.to_string()).collect()
}

/// Waits until the proxy serves exactly `backends`.
async fn wait_for_set(proxy: &FileProxy, backends: &[&Backend]) {
    let wanted = addresses(backends);
    wait_until_async(&format!("the proxy to serve {wanted:?}"), || async { served(&proxy.status().await) == wanted })
        .await;
}

/// Clients sending requests until stopped, counting failures and which
/// backend answered.
struct SteadyLoad {
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicUsize>,
    failures: Arc<Mutex<Vec<String>>>,
    answered_by: Arc<Mutex<HashMap<String, usize>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl SteadyLoad {
    fn start(url: String, clients: usize) -> SteadyLoad {
        let load = SteadyLoad {
            stop: Arc::default(),
            sent: Arc::default(),
            failures: Arc::default(),
            answered_by: Arc::default(),
            tasks: Vec::new(),
        };
        let tasks = (0..clients)
            .map(|worker| {
                let (stop, sent, failures, answered_by, url) = (
                    Arc::clone(&load.stop),
                    Arc::clone(&load.sent),
                    Arc::clone(&load.failures),
                    Arc::clone(&load.answered_by),
                    url.clone(),
                );
                tokio::spawn(async move {
                    let client = client();
                    let mut i = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        i += 1;
                        let answer = get_with(&client, &url, &[("x-job-id", &format!("w{worker}-{}", i % 64))]).await;
                        sent.fetch_add(1, Ordering::Relaxed);
                        if answer.status == 200 {
                            let by = answer.headers["x-backend"].to_str().unwrap().to_owned();
                            *answered_by.lock().unwrap().entry(by).or_default() += 1;
                        } else {
                            failures.lock().unwrap().push(format!("{} {:?}", answer.status, answer.error_code()));
                        }
                    }
                })
            })
            .collect();
        SteadyLoad { tasks, ..load }
    }

    fn answered_by(&self, backend: &Backend) -> usize {
        self.answered_by.lock().unwrap().get(&backend.name).copied().unwrap_or(0)
    }

    async fn wait_for_answers_from(&self, backend: &Backend, more_than: usize) {
        wait_until(&format!("answers from {}", backend.name), Duration::from_secs(30), || {
            self.answered_by(backend) > more_than
        })
        .await;
    }

    /// Stops the clients, and fails the test if any request failed.
    async fn finish_without_failures(self) {
        self.stop.store(true, Ordering::Relaxed);
        for task in self.tasks {
            task.await.unwrap();
        }
        assert_no_failures(self.sent.load(Ordering::Relaxed), &self.failures.lock().unwrap());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_records_are_followed_under_load_without_failing_a_request_for_a_staying_backend() {
    let (port, bots) = backends_on_one_port(3).await;
    let dns = DnsServer::start().await;
    dns.set_addresses("bots.test", &ips(&[&bots[0], &bots[1]]));
    // A slow first answer: the proxy waits for it before it serves, so no
    // request meets an empty upstream.
    dns.set_delay(Duration::from_millis(500));
    // A refresh long enough that polling `/status` sees each change before
    // the lookup after next, however slow the machine.
    let proxy = FileProxy::start(&dns_config(&dns, &format!("{{ dns: \"bots.test:{port}\", refresh: 1s }}"), "")).await;
    assert_eq!(served(&proxy.status().await), addresses(&[&bots[0], &bots[1]]));
    assert_eq!(get(&client(), &proxy.url("/")).await.status, 200);
    dns.set_delay(Duration::ZERO);

    let load = SteadyLoad::start(proxy.url("/"), 4);
    load.wait_for_answers_from(&bots[1], 50).await;
    load.wait_for_answers_from(&bots[0], 1).await;
    let metrics_url = format!("http://{}/metrics", proxy.admin);
    // A backend's counters and histogram (its gauges expire a few seconds later).
    let counted = |scrape: &prometheus_parse::Scrape, backend: &Backend| {
        let address = backend.addr.to_string();
        scrape
            .samples
            .iter()
            .filter(|s| s.labels.get("backend") == Some(&address))
            .filter(|s| {
                s.metric.starts_with("switchyard_requests_total") || s.metric.starts_with("switchyard_upstream_")
            })
            .count()
    };
    assert!(counted(&scrape(&metrics_url).await, &bots[0]) > 0, "bot0 has series while it serves");

    // bot0 leaves, bot2 joins; bot1 stays.
    let asked = dns.queries_for("bots.test");
    dns.set_addresses("bots.test", &ips(&[&bots[1], &bots[2]]));
    wait_for_set(&proxy, &[&bots[1], &bots[2]]).await;
    // Followed within one refresh: served by the next lookup (or one already
    // on its way when the records changed), one A query each.
    assert!(dns.queries_for("bots.test") <= asked + 2, "{} lookups", dns.queries_for("bots.test") - asked);
    load.wait_for_answers_from(&bots[2], 50).await;
    let bot0_after_removal = bots[0].hits();
    let after_leaving = scrape(&metrics_url).await;
    assert_eq!(counted(&after_leaving, &bots[0]), 0, "bot0's series left with it");
    assert!(counted(&after_leaving, &bots[1]) > 0, "bot1's series stay");

    // Everyone back.
    dns.set_addresses("bots.test", &ips(&[&bots[0], &bots[1], &bots[2]]));
    wait_for_set(&proxy, &[&bots[0], &bots[1], &bots[2]]).await;
    load.wait_for_answers_from(&bots[0], load.answered_by(&bots[0]) + 50).await;
    load.finish_without_failures().await;
    assert!(bot0_after_removal > 0 && bots[0].hits() > bot0_after_removal, "bot0 served again after it came back");

    let status = proxy.status().await;
    let discovery = discovery_status(&status);
    assert_eq!(discovery["source"], format!("dns bots.test:{port}"));
    assert_eq!(discovery["backends"], 3);
    assert_eq!(discovery["ok"], true);
    let scrape = scrape(&format!("http://{}/metrics", proxy.admin)).await;
    assert_eq!(metric_value(&scrape, "switchyard_discovered_backends", &[("upstream", "bots")]), Some(3.0));
    let lookups =
        metric_value(&scrape, "switchyard_discovery_lookups_total", &[("upstream", "bots"), ("result", "success")]);
    assert!(lookups.unwrap() >= 3.0, "{lookups:?}");
    assert_eq!(
        metric_value(&scrape, "switchyard_discovery_lookups_total", &[("upstream", "bots"), ("result", "error")]),
        Some(0.0)
    );
    assert_promtool_accepts(&format!("http://{}/metrics", proxy.admin)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn srv_records_bring_targets_ports_and_weights_and_are_followed_under_load() {
    let bots: Vec<Backend> = futures::future::join_all(["a", "b", "c", "spare"].map(Backend::start)).await;
    let dns = DnsServer::start().await;
    for (bot, host) in bots.iter().zip(["a.bots.test", "b.bots.test", "c.bots.test", "spare.bots.test"]) {
        dns.set_addresses(host, &[ip(bot)]);
    }
    let srv = |bot: &Backend, target: &'static str, priority: u16, weight: u16| Srv {
        priority,
        weight,
        port: bot.addr.port(),
        target,
    };
    let service = "_bot._tcp.bots.test";
    // The spare has a higher priority number: used only if none of the others were listed.
    dns.set_services(
        service,
        &[
            srv(&bots[0], "a.bots.test", 1, 3),
            srv(&bots[1], "b.bots.test", 1, 1),
            srv(&bots[3], "spare.bots.test", 5, 1),
        ],
    );
    let proxy = FileProxy::start(&dns_config(
        &dns,
        &format!("{{ srv: \"{service}\", refresh: 1s }}"),
        "    backend_defaults: { max_concurrency: 8 }\n",
    ))
    .await;
    let status = proxy.status().await;
    assert_eq!(served(&status), addresses(&[&bots[0], &bots[1]]), "the lowest priority only");
    let weights: HashMap<String, (u64, u64)> = status["upstreams"][0]["backends"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| {
            let address = b["address"].as_str().unwrap().to_owned();
            (address, (b["weight"].as_u64().unwrap(), b["max_concurrency"].as_u64().unwrap()))
        })
        .collect();
    assert_eq!(weights[&bots[0].addr.to_string()], (3, 8), "weight from SRV, max_concurrency from backend_defaults");
    assert_eq!(weights[&bots[1].addr.to_string()], (1, 8));

    let load = SteadyLoad::start(proxy.url("/"), 4);
    load.wait_for_answers_from(&bots[1], 50).await;
    // b leaves, c joins (and without glue records: its address is looked up).
    dns.set_glue(false);
    let asked = dns.queries_for(service);
    dns.set_services(service, &[srv(&bots[0], "a.bots.test", 1, 3), srv(&bots[2], "c.bots.test", 1, 1)]);
    wait_for_set(&proxy, &[&bots[0], &bots[2]]).await;
    assert!(dns.queries_for(service) <= asked + 2, "followed within one refresh");
    load.wait_for_answers_from(&bots[2], 50).await;
    load.finish_without_failures().await;
    assert_eq!(bots[3].hits(), 0, "the lower-priority spare was never used");

    // An answer whose only target is "." (the service is not offered here)
    // would empty the upstream: it is a failure, and the set is kept.
    dns.set_services(service, &[Srv { priority: 1, weight: 1, port: 1, target: "." }]);
    expect_failure(&proxy, "no records", &[&bots[0], &bots[2]]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_staying_backends_ejection_survives_a_change_of_the_set() {
    let (port, bots) = backends_on_one_port(3).await;
    let dns = DnsServer::start().await;
    dns.set_addresses("bots.test", &ips(&[&bots[0], &bots[1]]));
    let health = "    health: { passive: { consecutive_failures: 2, ejection_time: 60s, max_ejection_percent: 50 } }\n";
    let proxy =
        FileProxy::start(&dns_config(&dns, &format!("{{ dns: \"bots.test:{port}\", refresh: 200ms }}"), health)).await;
    bots[0].stats.fail_with.store(500, Ordering::SeqCst);
    let client = client();
    wait_until_async("bot0 to be ejected", || async {
        let _ = get(&client, &proxy.url("/")).await;
        let bot0 = backend_in_status(&proxy.status().await, &bots[0].addr.to_string());
        bot0.is_some_and(|b| !b["ejected_for_seconds"].is_null())
    })
    .await;

    dns.set_addresses("bots.test", &ips(&[&bots[0], &bots[1], &bots[2]]));
    wait_for_set(&proxy, &[&bots[0], &bots[1], &bots[2]]).await;
    let bot0 = backend_in_status(&proxy.status().await, &bots[0].addr.to_string()).unwrap();
    let left = bot0["ejected_for_seconds"].as_f64().expect("still ejected after the set changed");
    assert!(left > 30.0, "the ejection kept its time: {left} s left");
    assert!(!bot0["healthy"].as_bool().unwrap());
    // And it gets no traffic while ejected.
    let before = bots[0].hits();
    for _ in 0..30 {
        assert_eq!(get(&client, &proxy.url("/")).await.status, 200);
    }
    assert_eq!(bots[0].hits(), before);
}

/// The reason of the failed last lookup, or `None` when it succeeded.
async fn failure_reason(proxy: &FileProxy) -> Option<String> {
    let status = proxy.status().await;
    let discovery = discovery_status(&status);
    (discovery["ok"] == false).then(|| discovery["last_failure"]["reason"].as_str().unwrap().to_owned())
}

/// Waits for a lookup to fail with `reason`, then checks that the last good
/// set still serves.
async fn expect_failure(proxy: &FileProxy, reason: &str, kept: &[&Backend]) {
    wait_until_async(&format!("a lookup failure `{reason}`"), || async {
        failure_reason(proxy).await.is_some_and(|r| r.contains(reason))
    })
    .await;
    assert_eq!(served(&proxy.status().await), addresses(kept), "the last good set is kept");
    let client = client();
    for _ in 0..10 {
        assert_eq!(get(&client, &proxy.url("/")).await.status, 200);
    }
}

async fn expect_recovery(proxy: &FileProxy) {
    wait_until_async("a successful lookup", || async { failure_reason(proxy).await.is_none() }).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_lookups_keep_the_last_good_set_and_say_why() {
    let (port, bots) = backends_on_one_port(2).await;
    let mut dns = DnsServer::start().await;
    let everyone = [&bots[0], &bots[1]];
    dns.set_addresses("bots.test", &ips(&everyone));
    let proxy =
        FileProxy::start(&dns_config(&dns, &format!("{{ dns: \"bots.test:{port}\", refresh: 200ms }}"), "")).await;

    dns.set_failing(true);
    expect_failure(&proxy, "SERVFAIL", &everyone).await;
    dns.set_failing(false);
    expect_recovery(&proxy).await;

    dns.remove("bots.test");
    expect_failure(&proxy, "NXDOMAIN", &everyone).await;
    dns.set_addresses("bots.test", &[]);
    expect_failure(&proxy, "no records", &everyone).await;
    dns.set_addresses("bots.test", &ips(&everyone));
    expect_recovery(&proxy).await;

    // The DNS server goes away: lookups time out, the set stays, /status says so.
    dns.stop().await;
    expect_failure(&proxy, "timeout", &everyone).await;
    let status = proxy.status().await;
    let discovery = discovery_status(&status);
    assert!(discovery["consecutive_failures"].as_u64().unwrap() >= 1);
    assert!(discovery["last_failure"]["at"].as_str().unwrap().ends_with('Z'));
    assert!(discovery["last_success"]["seconds_ago"].as_f64().is_some());
    let scrape = scrape(&format!("http://{}/metrics", proxy.admin)).await;
    let errors =
        metric_value(&scrape, "switchyard_discovery_lookups_total", &[("upstream", "bots"), ("result", "error")]);
    assert!(errors.unwrap() >= 4.0, "{errors:?}");
    assert_eq!(metric_value(&scrape, "switchyard_discovered_backends", &[("upstream", "bots")]), Some(2.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_whose_first_lookup_fails_answers_503_until_a_lookup_succeeds() {
    let (port, bots) = backends_on_one_port(1).await;
    let dns = DnsServer::start().await;
    let proxy =
        FileProxy::start(&dns_config(&dns, &format!("{{ dns: \"bots.test:{port}\", refresh: 200ms }}"), "")).await;
    let client = client();
    let answer = get(&client, &proxy.url("/")).await;
    assert_eq!((answer.status.as_u16(), answer.error_code()), (503, Some("no_healthy_backend")));
    let status = proxy.status().await;
    assert_eq!(discovery_status(&status)["last_failure"]["reason"], "NXDOMAIN");
    assert_eq!(discovery_status(&status)["backends"], 0);

    dns.set_addresses("bots.test", &[ip(&bots[0])]);
    wait_for_set(&proxy, &[&bots[0]]).await;
    assert_eq!(get(&client, &proxy.url("/")).await.status, 200);
    assert_eq!(bots[0].hits(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_that_adds_discovery_serves_the_discovered_set_at_once() {
    let (port, bots) = backends_on_one_port(2).await;
    let dns = DnsServer::start().await;
    dns.set_addresses("bots.test", &ips(&[&bots[0], &bots[1]]));
    let listed = format!(
        "{}listeners: [{{ bind: \"127.0.0.1:0\" }}]\nroutes: [{{ upstream: bots }}]\nupstreams:\n  bots:\n    \
         backends: [{{ address: \"{}\" }}]\n",
        dns.resolver_yaml(),
        bots[0].addr
    );
    let proxy = FileProxy::start(&listed).await;
    dns.set_delay(Duration::from_millis(500));
    std::fs::write(
        &proxy.path,
        with_test_admin(&dns_config(&dns, &format!("{{ dns: \"bots.test:{port}\", refresh: 10s }}"), "")),
    )
    .unwrap();
    let answer = proxy.post_reload().await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    // The reload looked the name up before it swapped: both serve at once.
    assert_eq!(served(&proxy.status().await), addresses(&[&bots[0], &bots[1]]));
    let client = client();
    for _ in 0..10 {
        assert_eq!(get(&client, &proxy.url("/")).await.status, 200);
    }
    assert!(bots[1].hits() > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_proxies_map_keys_alike_whatever_order_dns_answers_in() {
    let bots: Vec<Backend> = futures::future::join_all(["a", "b", "c", "d"].map(Backend::start)).await;
    let hosts = ["a.bots.test", "b.bots.test", "c.bots.test", "d.bots.test"];
    let records: Vec<Srv> = bots
        .iter()
        .zip(hosts)
        .map(|(bot, host)| Srv { priority: 1, weight: 1, port: bot.addr.port(), target: host })
        .collect();
    let first_dns = DnsServer::start().await;
    let second_dns = DnsServer::start().await;
    for (bot, host) in bots.iter().zip(hosts) {
        first_dns.set_addresses(host, &[ip(bot)]);
        second_dns.set_addresses(host, &[ip(bot)]);
    }
    let mut reversed = records.clone();
    reversed.reverse();
    first_dns.set_services("_bot._tcp.bots.test", &records);
    second_dns.set_services("_bot._tcp.bots.test", &reversed);
    let balance = "    balance: { policy: consistent_hash, key: \"header:x-job-id\" }\n";
    let discovery = "{ srv: \"_bot._tcp.bots.test\" }";
    let first = FileProxy::start(&dns_config(&first_dns, discovery, balance)).await;
    let second = FileProxy::start(&dns_config(&second_dns, discovery, balance)).await;
    let client = client();
    let mut differ = 0;
    let mut owners = HashMap::<String, usize>::new();
    for key in 0..2_000 {
        let job = format!("job-{key}");
        let one = get_with(&client, &first.url("/"), &[("x-job-id", &job)]).await;
        let other = get_with(&client, &second.url("/"), &[("x-job-id", &job)]).await;
        let owner = one.headers["x-backend"].to_str().unwrap().to_owned();
        differ += usize::from(owner != other.headers["x-backend"].to_str().unwrap());
        *owners.entry(owner).or_default() += 1;
    }
    assert_eq!(differ, 0, "{differ} of 2,000 keys map to different backends");
    assert_eq!(owners.len(), 4, "every backend owns keys: {owners:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ttl_longer_than_refresh_is_waited_out_and_refresh_is_the_floor() {
    let (port, bots) = backends_on_one_port(1).await;
    let dns = DnsServer::start().await;
    dns.set_addresses("bots.test", &[ip(&bots[0])]);
    dns.set_ttl(1);
    let proxy =
        FileProxy::start(&dns_config(&dns, &format!("{{ dns: \"bots.test:{port}\", refresh: 100ms }}"), "")).await;
    wait_until("four lookups", Duration::from_secs(30), || dns.queries_for("bots.test") >= 4).await;
    let times = dns.query_times("bots.test");
    for gap in times.windows(2).map(|pair| pair[1] - pair[0]) {
        // The answer is good for 1 s: asking every 100 ms would ignore the TTL.
        assert!(gap >= Duration::from_millis(950), "asked again after {gap:?} with a TTL of 1 s");
    }

    // A TTL of 0 (Consul's default): `refresh` sets the pace, and is never undercut.
    dns.set_ttl(0);
    let seen = dns.queries_for("bots.test");
    wait_until("four more lookups", Duration::from_secs(30), || dns.queries_for("bots.test") >= seen + 5).await;
    let times = dns.query_times("bots.test");
    for gap in times[seen + 1..].windows(2).map(|pair| pair[1] - pair[0]) {
        assert!(gap >= Duration::from_millis(95), "asked again after {gap:?} with refresh 100ms");
    }
    let status = proxy.status().await;
    assert!(discovery_status(&status)["next_lookup_in_seconds"].as_f64().unwrap() <= 0.1);
}

#[tokio::test]
async fn whoever_controls_the_records_cannot_make_the_set_unbounded_or_point_it_anywhere() {
    let dns = DnsServer::start().await;
    // 600 ordinary addresses (no traffic goes to them), and the hostile ones.
    let mut answer: Vec<IpAddr> =
        (0..600).map(|i| IpAddr::from([10, 9, (i / 200) as u8, (i % 200 + 1) as u8])).collect();
    let hostile: [IpAddr; 6] = [
        [0, 0, 0, 0].into(),
        [224, 0, 0, 1].into(),
        [255, 255, 255, 255].into(),
        [169, 254, 169, 254].into(),
        "ff02::1".parse().unwrap(),
        "fe80::1".parse().unwrap(),
    ];
    answer.extend(hostile);
    dns.set_addresses("bots.test", &answer);
    let port = free_port();
    let discovery = format!("{{ dns: \"bots.test:{port}\", refresh: 10s, max_backends: 100 }}");
    // The proxy's own listener is on 127.0.0.1 at that port: never a backend of its own.
    dns.set_addresses("bots.test", &[answer.as_slice(), &[[127, 0, 0, 1].into()]].concat());
    let yaml = dns_config(&dns, &discovery, "").edit("bind: \"127.0.0.1:0\"", &format!("bind: \"127.0.0.1:{port}\""));
    let proxy = FileProxy::start(&yaml).await;
    let status = proxy.status().await;
    let set = served(&status);
    assert_eq!(set.len(), 100, "max_backends holds");
    for address in &set {
        assert!(address.starts_with("10.9."), "{address} is not a usable backend");
    }
    let dropped = &discovery_status(&status)["dropped"];
    assert_eq!(dropped["over_max_backends"], 500, "{dropped}");
    // 0.0.0.0, 224.0.0.1, 255.255.255.255, 169.254.169.254 (one family per
    // name: IPv4 is asked first, so the IPv6 ones are not seen).
    assert_eq!(dropped["unusable_addresses"], 4, "{dropped}");
    assert_eq!(dropped["own_addresses"], 1, "{dropped}");
    let scrape = scrape(&format!("http://{}/metrics", proxy.admin)).await;
    let count = |reason| {
        metric_value(&scrape, "switchyard_discovery_dropped_total", &[("upstream", "bots"), ("reason", reason)])
    };
    assert!(count("over_max_backends") >= Some(500.0) && count("unusable_address") >= Some(4.0));

    // Every replica keeps the same subset of the same usable answer. (The
    // other replica listens elsewhere, so 127.0.0.1 on that port would be a
    // usable backend to it, and could take one of the 100 places: it is left
    // out of the answer the other one gets.)
    dns.set_addresses("bots.test", &answer);
    let other = FileProxy::start(&dns_config(&dns, &discovery, "")).await;
    assert_eq!(served(&other.status().await), set, "another replica picked another subset");
}

#[tokio::test]
async fn srv_weights_are_held_to_the_configs_range_and_link_local_is_opt_in() {
    let dns = DnsServer::start().await;
    let service = "_robot._tcp.bots.test";
    dns.set_addresses("heavy.test", &[[10, 8, 0, 1].into()]);
    dns.set_addresses("metadata.test", &[[169, 254, 169, 254].into()]);
    dns.set_services(
        service,
        &[
            Srv { priority: 1, weight: 65535, port: 8270, target: "heavy.test" },
            Srv { priority: 1, weight: 1, port: 80, target: "metadata.test" },
        ],
    );
    let proxy = FileProxy::start(&dns_config(&dns, &format!("{{ srv: {service}, refresh: 10s }}"), "")).await;
    let status = proxy.status().await;
    let backends = status["upstreams"][0]["backends"].as_array().unwrap();
    assert_eq!(backends.len(), 1, "the metadata service is not a backend: {backends:?}");
    assert_eq!(backends[0]["weight"], 10_000, "held to the config's largest weight");
    let allowed =
        FileProxy::start(&dns_config(&dns, &format!("{{ srv: {service}, refresh: 10s, allow_link_local: true }}"), ""))
            .await;
    assert!(served(&allowed.status().await).contains("169.254.169.254:80"), "allowed when asked for");
}

#[tokio::test]
async fn targets_without_glue_resolve_together_and_one_that_fails_is_left_out() {
    let dns = DnsServer::start().await;
    dns.set_glue(false);
    let service = "_robot._tcp.bots.test";
    let hosts: Vec<&'static str> = (0..20).map(|i| &*Box::leak(format!("bot{i}.bots.test").into_boxed_str())).collect();
    let mut records: Vec<Srv> = Vec::new();
    for (i, host) in hosts.iter().enumerate() {
        dns.set_addresses(host, &[[10, 7, 0, i as u8 + 1].into()]);
        records.push(Srv { priority: 1, weight: 1, port: 8270, target: host });
    }
    // A target nobody can resolve.
    records.push(Srv { priority: 1, weight: 1, port: 8270, target: "gone.bots.test" });
    dns.set_services(service, &records);
    // Every answer takes a second: one after the other, 21 lookups would
    // not fit the 5 s the targets get together.
    dns.set_delay(Duration::from_secs(1));
    let proxy = FileProxy::start(&dns_config(&dns, &format!("{{ srv: {service}, refresh: 60s }}"), "")).await;
    let status = proxy.status().await;
    assert_eq!(served(&status).len(), 20, "every target that resolved is served");
    assert_eq!(discovery_status(&status)["dropped"]["failed_targets"], serde_json::json!(["gone.bots.test."]));
    assert_eq!(discovery_status(&status)["ok"], true);
}
