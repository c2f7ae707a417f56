//! `max_concurrency_scope: cluster`: replicas sharing one-job bots through a
//! real `redis-server` (installed by scripts/install-test-deps) on loopback.
//! The bots are the test backends, which record how many requests each ran
//! at once; a bot that ever ran two is a double booking.

use std::time::Duration;

use futures::StreamExt;
use serde_json::Value;

use crate::support::*;

/// A `redis-server` of the test's own, without persistence, on a free port.
pub struct RedisServer {
    child: Option<std::process::Child>,
    pub port: u16,
    dir: tempfile::TempDir,
}

impl RedisServer {
    pub async fn start() -> RedisServer {
        let mut server = RedisServer { child: None, port: free_port(), dir: tempfile::tempdir().unwrap() };
        server.run().await;
        server
    }

    async fn run(&mut self) {
        let child = std::process::Command::new("redis-server")
            .args(["--bind", "127.0.0.1", "--port", &self.port.to_string(), "--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(self.dir.path())
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("redis-server (scripts/install-test-deps installs it)");
        self.child = Some(child);
        let client = redis::Client::open(self.url()).unwrap();
        wait_until_async("redis-server to answer PING", || {
            let client = client.clone();
            async move {
                match client.get_multiplexed_async_connection().await {
                    Ok(mut connection) => redis::cmd("PING").query_async::<String>(&mut connection).await.is_ok(),
                    Err(_) => false,
                }
            }
        })
        .await;
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Stops and starts again on the same port, empty.
    pub async fn restart(&mut self) {
        self.stop();
        self.run().await;
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A replica's config: the bots with `max_concurrency: 1`, shared through
/// `redis` with a short lease, a queue that waits long enough for any test.
fn replica_yaml(admin_port: u16, redis: &RedisServer, bots: &[&Backend], cluster_extra: &str) -> String {
    let list: Vec<String> = bots.iter().map(|b| format!("{{ address: \"{}\", max_concurrency: 1 }}", b.addr)).collect();
    format!(
        "admin: {{ bind: \"127.0.0.1:{admin_port}\" }}\nlisteners: [{{ bind: \"127.0.0.1:{{port}}\" }}]\n\
         cluster: {{ redis: \"{}\", lease: 1s{cluster_extra} }}\nroutes: [{{ upstream: bots, timeout: 60s }}]\n\
         upstreams:\n  bots:\n    max_concurrency_scope: cluster\n    queue: {{ max_waiting: 500, timeout: 50s }}\n    \
         backends: [{}]\n",
        redis.url(),
        list.join(", ")
    )
}

struct Replica {
    process: ProxyProcess,
    admin: u16,
}

impl Replica {
    async fn start(redis: &RedisServer, bots: &[&Backend], cluster_extra: &str) -> Replica {
        let admin = free_port();
        Replica { process: ProxyProcess::start(&replica_yaml(admin, redis, bots, cluster_extra)).await, admin }
    }

    async fn status(&self) -> Value {
        let answer = get(&client(), &format!("http://127.0.0.1:{}/status", self.admin)).await;
        serde_json::from_str(&answer.body).expect("JSON status")
    }

    async fn queue_waiting(&self) -> u64 {
        self.status().await["upstreams"][0]["queue_waiting"].as_u64().expect("a queue")
    }

    async fn redis_available(&self) -> bool {
        self.status().await["cluster"]["available"].as_bool().expect("a cluster section")
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_never_give_a_one_job_bot_two_jobs() {
    let redis = RedisServer::start().await;
    let mut bots = Vec::new();
    for name in ["bot-0", "bot-1", "bot-2", "bot-3"] {
        bots.push(Backend::start(name).await);
    }
    let bot_refs: Vec<&Backend> = bots.iter().collect();
    let replicas = [Replica::start(&redis, &bot_refs, "").await, Replica::start(&redis, &bot_refs, "").await];
    // 16 clients, 8 on each replica, 6 jobs each of 20 to 60 ms: far more
    // jobs at once than bots, from both sides.
    let client = client();
    let jobs = futures::stream::iter(0..96)
        .map(|job| {
            let url = replicas[job % 2].process.url(&format!("/job?delay_ms={}", 20 + (job * 7) % 41));
            let client = client.clone();
            async move { get(&client, &url).await.status }
        })
        .buffer_unordered(16)
        .collect::<Vec<_>>()
        .await;
    assert!(jobs.iter().all(|status| *status == 200), "{jobs:?}");
    for bot in &bots {
        let peak = bot.stats.peak_in_flight.load(std::sync::atomic::Ordering::SeqCst);
        assert_eq!(peak, 1, "{} ran {peak} jobs at once", bot.name);
        assert!(bot.hits() > 0, "{} got no job", bot.name);
    }
    assert_eq!(bots.iter().map(Backend::hits).sum::<usize>(), 96, "every job ran once");
    for replica in &replicas {
        let status = replica.status().await;
        assert_eq!(status["cluster"]["available"], true, "{status}");
        assert_eq!(status["cluster"]["fallbacks"], 0, "{status}");
        assert_eq!(status["upstreams"][0]["max_concurrency_scope"], "cluster");
        assert_eq!(status["cluster"]["held_slots"], 0, "every slot was released: {status}");
        let explain = get(&client, &format!("http://127.0.0.1:{}/explain?path=/job", replica.admin)).await.body;
        let explain: Value = serde_json::from_str(&explain).unwrap();
        assert_eq!(explain["max_concurrency_scope"], "cluster", "{explain}");
        let config = get(&client, &format!("http://127.0.0.1:{}/config", replica.admin)).await.body;
        assert!(config.contains("max_concurrency_scope: cluster") && config.contains("lease: 1s"), "{config}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_replicas_slot_comes_back_after_its_lease() {
    let redis = RedisServer::start().await;
    let bot = Backend::start("bot").await;
    let [first, second] = [Replica::start(&redis, &[&bot], "").await, Replica::start(&redis, &[&bot], "").await];
    let client = client();
    // The first replica's job holds the only bot.
    let held = tokio::spawn({
        let (client, url) = (client.clone(), first.process.url("/hold"));
        async move { get(&client, &url).await }
    });
    wait_until("the held job to reach the bot", Duration::from_secs(30), || bot.in_flight() == 1).await;
    // The second replica sees the bot busy across the cluster: its job waits.
    let waiting = tokio::spawn({
        let (client, url) = (client.clone(), second.process.url("/after"));
        async move { get(&client, &url).await }
    });
    wait_until_async("the second replica's job to queue", || async { second.queue_waiting().await == 1 }).await;
    assert_eq!(bot.hits(), 1, "the bot got no second job while busy");
    let status = second.status().await;
    assert_eq!(status["upstreams"][0]["backends"][0]["cluster_slots"], 1, "{status}");

    // SIGKILL: no release is ever sent; the slot lapses with its lease, and
    // the waiting job runs then.
    let mut first = first;
    first.process.signal(libc::SIGKILL);
    first.process.wait_for_exit(Duration::from_secs(10), "the killed replica to exit").await;
    // The bot finishes the orphaned job; the replica's slot stays taken in
    // Redis until its lease lapses.
    bot.release_held();
    let _ = held.await;
    assert_eq!(waiting.await.unwrap().status, 200);
    assert_eq!(bot.stats.peak_in_flight.load(std::sync::atomic::Ordering::SeqCst), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_redis_local_limits_serve_and_slots_taken_meanwhile_are_not_given_twice_after() {
    let mut redis = RedisServer::start().await;
    let bot = Backend::start("bot").await;
    let [first, second] = [Replica::start(&redis, &[&bot], "").await, Replica::start(&redis, &[&bot], "").await];
    let client = client();
    assert_eq!(get(&client, &first.process.url("/before")).await.status, 200);

    redis.stop();
    // Every request is served, by each replica's own limit.
    for replica in [&first, &second] {
        assert_eq!(get(&client, &replica.process.url("/meanwhile")).await.status, 200);
        assert!(!replica.redis_available().await, "the fallback shows in /status");
    }
    let metrics = scrape(&format!("http://127.0.0.1:{}/metrics", first.admin)).await;
    assert_eq!(metric_value(&metrics, "switchyard_cluster_available", &[]), Some(0.0));
    assert!(metric_value(&metrics, "switchyard_cluster_fallbacks_total", &[]).unwrap() >= 1.0);
    assert_promtool_accepts(&format!("http://127.0.0.1:{}/metrics", first.admin)).await;

    // A job taken by local limits while Redis is away...
    let held = tokio::spawn({
        let (client, url) = (client.clone(), first.process.url("/hold"));
        async move { get(&client, &url).await }
    });
    wait_until("the held job to reach the bot", Duration::from_secs(30), || bot.in_flight() == 1).await;
    // ...is registered when Redis is back (empty: it lost everything), so
    // the other replica does not give the bot a second job.
    redis.restart().await;
    for replica in [&first, &second] {
        wait_until_async("the replica to use Redis again", || replica.redis_available()).await;
    }
    wait_until_async("the first replica's slot to be registered", || async {
        second.status().await["upstreams"][0]["backends"][0]["cluster_slots"] == 1
    })
    .await;
    let waiting = tokio::spawn({
        let (client, url) = (client.clone(), second.process.url("/after"));
        async move { get(&client, &url).await }
    });
    wait_until_async("the second replica's job to queue", || async { second.queue_waiting().await == 1 }).await;
    bot.release_held();
    assert_eq!(held.await.unwrap().status, 200);
    assert_eq!(waiting.await.unwrap().status, 200);
    assert_eq!(bot.stats.peak_in_flight.load(std::sync::atomic::Ordering::SeqCst), 1, "never two jobs at once");
}

#[tokio::test]
async fn without_redis_refuse_answers_503_with_its_code() {
    let mut redis = RedisServer::start().await;
    let bot = Backend::start("bot").await;
    let replica = Replica::start(&redis, &[&bot], ", on_unavailable: refuse").await;
    let client = client();
    assert_eq!(get(&client, &replica.process.url("/")).await.status, 200);
    redis.stop();
    let refused = get(&client, &replica.process.url("/")).await;
    assert_eq!(refused.status, 503);
    assert_eq!(refused.headers["x-switchyard-error"], "cluster_unavailable");
    redis.restart().await;
    wait_until_async("the replica to use Redis again", || replica.redis_available()).await;
    assert_eq!(get(&client, &replica.process.url("/")).await.status, 200);
}

#[tokio::test]
async fn a_normal_pick_gives_way_to_a_high_one_waiting_on_another_replica() {
    let redis = RedisServer::start().await;
    let yaml = format!(
        "cluster: {{ redis: \"{}\" }}\nlisteners: [{{ bind: \"127.0.0.1:0\" }}]\nroutes: [{{ upstream: bots }}]\nupstreams:\n  bots:\n    backends: [{{ address: \"10.0.0.1:1\" }}]\n",
        redis.url()
    );
    let config = switchyard::config::parse(&yaml, "t.yaml").unwrap().cluster.unwrap();
    let [first, second] =
        [switchyard::cluster::Cluster::start(&config).unwrap(), switchyard::cluster::Cluster::start(&config).unwrap()];
    let slots = [first.upstream("bots", &["10.0.0.1:1"], None), second.upstream("bots", &["10.0.0.1:1"], None)];
    let one_job = [(0, 1)];
    let (high, normal) = (0, 1);
    let free = || async { second.slots_in_use(&slots[1]).await == Some(vec![0]) };

    // The first replica's job holds the bot (once Redis, new and empty, has
    // waited for running jobs to be registered); its high request then waits.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let held = loop {
        if let Some(lease) = first.acquire(&slots[0], &one_job, normal).await.unwrap() {
            break lease;
        }
        assert!(tokio::time::Instant::now() < deadline, "the bot never became free");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(first.acquire(&slots[0], &one_job, high).await.unwrap().is_none(), "the bot is busy");
    drop(held);
    wait_until_async("the release to reach Redis", free).await;
    // The bot is free, but the second replica's normal request gives way...
    assert!(second.acquire(&slots[1], &one_job, normal).await.unwrap().is_none(), "a high one waits elsewhere");
    // ...to the high one, which takes it and so clears its note.
    let taken = first.acquire(&slots[0], &one_job, high).await.unwrap().expect("the high request's slot");
    drop(taken);
    wait_until_async("the release to reach Redis", free).await;
    let held = second.acquire(&slots[1], &one_job, normal).await.unwrap().expect("no high one waits any more");

    // A note whose waiter went away lapses on its own.
    assert!(first.acquire(&slots[0], &one_job, high).await.unwrap().is_none(), "the bot is busy");
    drop(held);
    wait_until_async("the bot to be free", free).await;
    wait_until_async("the lapsed note to stop holding normal requests back", || async {
        second.acquire(&slots[1], &one_job, normal).await.unwrap().is_some()
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_that_restarts_empty_gets_running_jobs_back_before_it_hands_out_their_bots() {
    let mut redis = RedisServer::start().await;
    let bot = Backend::start("bot").await;
    let [first, second] = [Replica::start(&redis, &[&bot], "").await, Replica::start(&redis, &[&bot], "").await];
    let client = client();
    let held = tokio::spawn({
        let (client, url) = (client.clone(), first.process.url("/hold"));
        async move { get(&client, &url).await }
    });
    wait_until("the held job to reach the bot", Duration::from_secs(30), || bot.in_flight() == 1).await;
    // Restarted without persistence: every slot is gone, and nobody saw an outage.
    redis.restart().await;
    let waiting = tokio::spawn({
        let (client, url) = (client.clone(), second.process.url("/after"));
        async move { get(&client, &url).await }
    });
    wait_until_async("the first replica to add its running job's slot back", || async {
        first.status().await["cluster"]["slots_lost"] == 1
    })
    .await;
    wait_until_async("the second replica's job to queue", || async { second.queue_waiting().await == 1 }).await;
    assert_eq!(bot.hits(), 1, "the bot got no second job");
    bot.release_held();
    assert_eq!(held.await.unwrap().status, 200);
    assert_eq!(waiting.await.unwrap().status, 200);
    assert_eq!(bot.stats.peak_in_flight.load(std::sync::atomic::Ordering::SeqCst), 1, "never two jobs at once");
    assert_eq!(second.status().await["cluster"]["fallbacks"], 0, "a restart is not an outage");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_cut_off_past_its_lease_learns_its_slot_lapsed_and_adds_it_back() {
    let redis = RedisServer::start().await;
    let bot = Backend::start("bot").await;
    let [first, second] = [Replica::start(&redis, &[&bot], "").await, Replica::start(&redis, &[&bot], "").await];
    let client = client();
    let held = tokio::spawn({
        let (client, url) = (client.clone(), first.process.url("/hold"));
        async move { get(&client, &url).await }
    });
    wait_until("the held job to reach the bot", Duration::from_secs(30), || bot.in_flight() == 1).await;
    let slots = || async { second.status().await["upstreams"][0]["backends"][0]["cluster_slots"].clone() };
    wait_until_async("the slot to show in Redis", || async { slots().await == 1 }).await;
    // Frozen (as if cut off): no renewal, so the slot lapses in Redis.
    first.process.signal(libc::SIGSTOP);
    wait_until_async("the frozen replica's slot to lapse", || async { slots().await == 0 }).await;
    // Back: its next renewal finds the slot gone, says so, and adds it back,
    // since its job still runs.
    first.process.signal(libc::SIGCONT);
    wait_until_async("the replica to find its slot lapsed", || async {
        first.status().await["cluster"]["slots_lost"] == 1
    })
    .await;
    assert_eq!(slots().await, 1, "the running job's slot is back");
    let waiting = tokio::spawn({
        let (client, url) = (client.clone(), second.process.url("/after"));
        async move { get(&client, &url).await }
    });
    wait_until_async("the second replica's job to queue", || async { second.queue_waiting().await == 1 }).await;
    bot.release_held();
    assert_eq!(held.await.unwrap().status, 200);
    assert_eq!(waiting.await.unwrap().status, 200);
    assert_eq!(bot.stats.peak_in_flight.load(std::sync::atomic::Ordering::SeqCst), 1);
}

/// A replica whose one route has a `rate_limit` shared through `redis`.
async fn rate_limited_replica(redis: &RedisServer, bot: &Backend, scope: &str) -> Replica {
    let admin = free_port();
    let yaml = format!(
        "admin: {{ bind: \"127.0.0.1:{}\" }}\nlisteners: [{{ bind: \"127.0.0.1:{{port}}\" }}]\n\
         cluster: {{ redis: \"{}\", lease: 1s }}\n\
         routes: [{{ upstream: bots, rate_limit: {{ requests: 6, per: 1h, scope: {scope} }} }}]\n\
         upstreams:\n  bots:\n    backends: [{{ address: \"{}\" }}]\n",
        admin,
        redis.url(),
        bot.addr
    );
    Replica { process: ProxyProcess::start(&yaml).await, admin }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_rate_limit_holds_across_replicas_and_each_replica_holds_it_alone_while_redis_is_away() {
    let mut redis = RedisServer::start().await;
    let bot = Backend::start("bot").await;
    let replicas =
        [rate_limited_replica(&redis, &bot, "cluster").await, rate_limited_replica(&redis, &bot, "cluster").await];
    let client = client();
    // One client, alternating between the replicas: six requests an hour in all.
    let mut statuses = Vec::new();
    for round in 0..10 {
        let answer = get(&client, &replicas[round % 2].process.url("/job")).await;
        if answer.status == 429 {
            assert!(answer.headers.contains_key("retry-after"), "a 429 says when to come back");
        }
        statuses.push(answer.status.as_u16());
    }
    assert_eq!(statuses.iter().filter(|s| **s == 200).count(), 6, "{statuses:?}");
    assert_eq!(statuses.iter().filter(|s| **s == 429).count(), 4, "{statuses:?}");
    assert_eq!(bot.hits(), 6);
    let explained = get(&client, &format!("http://127.0.0.1:{}/explain?path=/job", replicas[0].admin)).await.body;
    let said: Value = serde_json::from_str(&explained).unwrap();
    assert_eq!(
        said["rate_limit"],
        "6 requests per 3600s for each client_ip, bursts of 6, in buckets the replicas share through Redis; over it: 429 rate_limited"
    );

    // Without Redis each replica limits on its own, from its own full bucket.
    redis.stop();
    let mut alone = Vec::new();
    for _ in 0..7 {
        alone.push(get(&client, &replicas[0].process.url("/job")).await.status.as_u16());
    }
    assert_eq!(alone, [200, 200, 200, 200, 200, 200, 429]);
}
