//! Two replicas in front of one-job bots, as the Kubernetes example deploys
//! them: `cargo bench --bench cluster` (needs `redis-server`, which
//! scripts/install-test-deps installs).
//!
//! 8 bots that each run one job at a time and refuse (503) a job that comes
//! while they run one (a collision: the double booking the bot's owner
//! sees), 24 clients each submitting 10 jobs of 50 to 400 ms over a
//! keep-alive connection, one in six `x-priority: high`, through an L4
//! spreader that deals connections to the replicas in turn (as a Kubernetes
//! Service does). Run three ways: one replica; two replicas counting
//! `max_concurrency` each on its own (`replica` scope); two replicas sharing
//! it through Redis (`cluster` scope). For each: jobs done, collisions, the
//! makespan against the ideal (the jobs' total length over 8 bots, a lower
//! bound), and the mean queue wait of high and normal jobs.
//!
//! Then the cost of a cluster-scoped pick: 2,000 sequential requests to an
//! idle bot through one replica, `replica` against `cluster` scope: client
//! latency at p50 and p99, and Redis script calls per request (from Redis's
//! own `INFO commandstats`).

#![allow(clippy::disallowed_types)] // std::time::Instant: a benchmark measures wall time

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::{TcpListener, TcpStream};

const BOTS: usize = 8;
const CLIENTS: usize = 24;
const JOBS_PER_CLIENT: usize = 10;

struct Bot {
    addr: SocketAddr,
    collisions: Arc<AtomicUsize>,
}

/// A bot that runs one job at a time (`?ms=N` long) and answers 503 to a job
/// that arrives while it runs one.
async fn start_bot() -> Bot {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let busy = Arc::new(AtomicBool::new(false));
    let collisions = Arc::new(AtomicUsize::new(0));
    let counted = Arc::clone(&collisions);
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else { continue };
            let (busy, collisions) = (Arc::clone(&busy), Arc::clone(&counted));
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |request: Request<hyper::body::Incoming>| {
                    let (busy, collisions) = (Arc::clone(&busy), Arc::clone(&collisions));
                    async move {
                        let ms: u64 = request
                            .uri()
                            .query()
                            .and_then(|q| q.strip_prefix("ms="))
                            .and_then(|v| v.parse().ok())
                            .unwrap_or(0);
                        if busy.swap(true, Ordering::SeqCst) {
                            collisions.fetch_add(1, Ordering::SeqCst);
                            let mut refused = Response::new(Full::new(Bytes::from_static(b"busy\n")));
                            *refused.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
                            return Ok::<_, Infallible>(refused);
                        }
                        tokio::time::sleep(Duration::from_millis(ms)).await;
                        busy.store(false, Ordering::SeqCst);
                        Ok(Response::new(Full::new(Bytes::from_static(b"done\n"))))
                    }
                });
                let _ =
                    hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), service).await;
            });
        }
    });
    Bot { addr, collisions }
}

/// Deals each accepted connection to the next replica in turn.
async fn start_spreader(replicas: Vec<SocketAddr>) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let mut next = 0;
        loop {
            let Ok((mut client, _)) = listener.accept().await else { continue };
            let replica = replicas[next % replicas.len()];
            next += 1;
            tokio::spawn(async move {
                if let Ok(mut upstream) = TcpStream::connect(replica).await {
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
                }
            });
        }
    });
    addr
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

async fn wait_for_port(addr: SocketAddr, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while TcpStream::connect(addr).await.is_err() {
        assert!(Instant::now() < deadline, "{what} did not start");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn start_redis(dir: &std::path::Path) -> (Child, u16) {
    let port = free_port();
    let child = std::process::Command::new("redis-server")
        .args(["--bind", "127.0.0.1", "--port", &port.to_string(), "--save", "", "--appendonly", "no"])
        .arg("--dir")
        .arg(dir)
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("redis-server (scripts/install-test-deps installs it)");
    wait_for_port(SocketAddr::from(([127, 0, 0, 1], port)), "redis-server").await;
    (Child(child), port)
}

async fn start_replica(dir: &std::path::Path, name: &str, yaml: &str) -> (Child, SocketAddr) {
    let port = free_port();
    let admin = free_port();
    let path = dir.join(format!("{name}.yaml"));
    let yaml = yaml.replace("{port}", &port.to_string()).replace("{admin}", &admin.to_string());
    std::fs::write(&path, yaml).unwrap();
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(["run", "-c"])
        .arg(&path)
        .env_remove("RUST_LOG")
        .env("XDG_RUNTIME_DIR", dir)
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("the switchyard binary");
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    wait_for_port(addr, "switchyard").await;
    (Child(child), addr)
}

fn config(bots: &[Bot], scope: &str, redis_port: Option<u16>) -> String {
    let list: Vec<String> = bots.iter().map(|b| format!("{{ address: \"{}\", max_concurrency: 1 }}", b.addr)).collect();
    let cluster =
        redis_port.map_or(String::new(), |port| format!("cluster: {{ redis: \"redis://127.0.0.1:{port}/0\" }}\n"));
    format!(
        "admin: {{ bind: \"127.0.0.1:{{admin}}\" }}\nlisteners: [{{ bind: \"127.0.0.1:{{port}}\" }}]\n{cluster}\
         routes: [{{ upstream: bots, timeout: 10m }}]\nupstreams:\n  bots:\n    max_concurrency_scope: {scope}\n    \
         queue: {{ max_waiting: 1000, timeout: 5m, priority_header: x-priority }}\n    backends: [{}]\n",
        list.join(", ")
    )
}

fn job_ms(client: usize, job: usize) -> u64 {
    50 + ((client * JOBS_PER_CLIENT + job) * 37 % 351) as u64
}

fn is_high(client: usize, job: usize) -> bool {
    (client * JOBS_PER_CLIENT + job).is_multiple_of(6)
}

struct Outcome {
    done: usize,
    collisions: usize,
    makespan: Duration,
    high_wait: Duration,
    normal_wait: Duration,
}

/// Every client's jobs through `entry`, each client on its own keep-alive
/// connection; the wait of a job is its time at the client minus its length.
async fn run_jobs(entry: SocketAddr, bots: &[Bot]) -> Outcome {
    let before: usize = bots.iter().map(|b| b.collisions.load(Ordering::SeqCst)).sum();
    let started = Instant::now();
    let clients: Vec<_> = (0..CLIENTS)
        .map(|client| {
            tokio::spawn(async move {
                let http = hyper_util::client::legacy::Client::builder(TokioExecutor::new())
                    .pool_max_idle_per_host(1)
                    .build_http::<Empty<Bytes>>();
                let mut results = Vec::new();
                for job in 0..JOBS_PER_CLIENT {
                    let ms = job_ms(client, job);
                    let mut request = Request::get(format!("http://{entry}/job?ms={ms}"));
                    if is_high(client, job) {
                        request = request.header("x-priority", "high");
                    }
                    let sent = Instant::now();
                    let status = match http.request(request.body(Empty::new()).unwrap()).await {
                        Ok(response) => {
                            let status = response.status();
                            let _ = response.into_body().collect().await;
                            status
                        }
                        Err(_) => StatusCode::BAD_GATEWAY,
                    };
                    let wait = sent.elapsed().saturating_sub(Duration::from_millis(ms));
                    results.push((status == StatusCode::OK, is_high(client, job), wait));
                }
                results
            })
        })
        .collect();
    let mut results = Vec::new();
    for client in clients {
        results.extend(client.await.unwrap());
    }
    let makespan = started.elapsed();
    let after: usize = bots.iter().map(|b| b.collisions.load(Ordering::SeqCst)).sum();
    let mean = |high: bool| {
        let waits: Vec<Duration> = results.iter().filter(|r| r.0 && r.1 == high).map(|r| r.2).collect();
        waits.iter().sum::<Duration>() / waits.len().max(1) as u32
    };
    Outcome {
        done: results.iter().filter(|r| r.0).count(),
        collisions: after - before,
        makespan,
        high_wait: mean(true),
        normal_wait: mean(false),
    }
}

async fn redis_script_calls(port: u16) -> u64 {
    let client = redis::Client::open(format!("redis://127.0.0.1:{port}/0")).unwrap();
    let mut connection = client.get_multiplexed_async_connection().await.unwrap();
    let info: String = redis::cmd("INFO").arg("commandstats").query_async(&mut connection).await.unwrap();
    info.lines()
        .filter(|line| line.starts_with("cmdstat_evalsha:") || line.starts_with("cmdstat_eval:"))
        .filter_map(|line| line.split("calls=").nth(1)?.split(',').next()?.parse::<u64>().ok())
        .sum()
}

async fn latencies(entry: SocketAddr, count: usize) -> (Duration, Duration) {
    let http = hyper_util::client::legacy::Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
    let mut taken = Vec::with_capacity(count);
    for _ in 0..count {
        let sent = Instant::now();
        let response = http.request(Request::get(format!("http://{entry}/job?ms=0")).body(Empty::new()).unwrap()).await;
        let _ = response.unwrap().into_body().collect().await;
        taken.push(sent.elapsed());
    }
    taken.sort();
    (taken[count / 2], taken[count * 99 / 100])
}

#[tokio::main]
async fn main() {
    let dir = tempfile::tempdir().unwrap();
    let mut bots = Vec::new();
    for _ in 0..BOTS {
        bots.push(start_bot().await);
    }
    let total: u64 = (0..CLIENTS).flat_map(|c| (0..JOBS_PER_CLIENT).map(move |j| job_ms(c, j))).sum();
    let ideal = Duration::from_millis(total / BOTS as u64);
    println!(
        "{} jobs of 50-400 ms ({:.1} s in all), {CLIENTS} clients, {BOTS} one-job bots; ideal makespan {:.2} s\n",
        CLIENTS * JOBS_PER_CLIENT,
        total as f64 / 1e3,
        ideal.as_secs_f64()
    );
    println!(
        "| setup | first job after start | done | collisions | makespan | x ideal | high wait (mean) | normal wait (mean) |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    let mut cluster_collisions = 0;
    for (setup, replicas, scope) in [
        ("one replica", 1, "replica"),
        ("two replicas, replica scope", 2, "replica"),
        ("two replicas, cluster scope", 2, "cluster"),
    ] {
        let redis = if scope == "cluster" { Some(start_redis(dir.path()).await) } else { None };
        let yaml = config(&bots, scope, redis.as_ref().map(|r| r.1));
        let mut processes = Vec::new();
        let mut addrs = Vec::new();
        for n in 0..replicas {
            let (child, addr) = start_replica(dir.path(), &format!("{scope}-{n}"), &yaml).await;
            processes.push(child);
            addrs.push(addr);
        }
        let entry = start_spreader(addrs).await;
        // A Redis that has just started holds picks for a moment (replicas
        // that held slots before a restart register them first): measured
        // here, once, and out of the run, as a deployment meets it once.
        let first = Instant::now();
        let http = hyper_util::client::legacy::Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
        let warm = http.request(Request::get(format!("http://{entry}/job?ms=0")).body(Empty::new()).unwrap()).await;
        assert_eq!(warm.unwrap().status(), StatusCode::OK);
        let first_pick = first.elapsed();
        let outcome = run_jobs(entry, &bots).await;
        if scope == "cluster" {
            cluster_collisions = outcome.collisions;
        }
        println!(
            "| {setup} | {:.0} ms | {}/{} | {} | {:.2} s | {:.2}x | {:.0} ms | {:.0} ms |",
            first_pick.as_secs_f64() * 1e3,
            outcome.done,
            CLIENTS * JOBS_PER_CLIENT,
            outcome.collisions,
            outcome.makespan.as_secs_f64(),
            outcome.makespan.as_secs_f64() / ideal.as_secs_f64(),
            outcome.high_wait.as_secs_f64() * 1e3,
            outcome.normal_wait.as_secs_f64() * 1e3,
        );
        drop(processes);
        drop(redis);
    }

    // The cost of a pick through Redis, with nothing to wait for.
    let idle = [start_bot().await];
    let requests = 2_000;
    println!("\n{requests} sequential requests to an idle bot through one replica:\n");
    println!("| scope | p50 | p99 | Redis script calls per request |");
    println!("|---|---|---|---|");
    for scope in ["replica", "cluster"] {
        let redis = if scope == "cluster" { Some(start_redis(dir.path()).await) } else { None };
        let yaml =
            config(&idle, scope, redis.as_ref().map(|r| r.1)).replace("max_concurrency: 1", "max_concurrency: 100");
        let (_replica, addr) = start_replica(dir.path(), &format!("cost-{scope}"), &yaml).await;
        let _ = latencies(addr, 200).await;
        let calls_before = match &redis {
            Some((_, port)) => redis_script_calls(*port).await,
            None => 0,
        };
        let (p50, p99) = latencies(addr, requests).await;
        let calls = match &redis {
            Some((_, port)) => (redis_script_calls(*port).await - calls_before) as f64 / requests as f64,
            None => 0.0,
        };
        println!("| {scope} | {:.0} us | {:.0} us | {calls:.2} |", p50.as_secs_f64() * 1e6, p99.as_secs_f64() * 1e6);
    }
    assert_eq!(cluster_collisions, 0, "two replicas sharing slots double-booked a bot");
}
