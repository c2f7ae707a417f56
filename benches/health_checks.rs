//! CPU cost of active health checking: 1000 backends, HTTP checks every second.
//!
//! The backends run in a child process (this same binary, started with
//! `SWITCHYARD_BENCH_SERVE=N`), so the parent's CPU time is the checkers' alone:
//! connect, send `GET /healthz`, read the status, record, sleep. The parent
//! measures its own user+system CPU time (from /proc/self/stat) over a window
//! and reports it as a share of one core. Run: `cargo bench --bench health_checks`.

#![allow(clippy::disallowed_types)] // std::time::Instant: a benchmark measures wall time

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const BACKENDS: usize = 1000;
const WINDOW: Duration = Duration::from_secs(10);

fn main() {
    if let Ok(count) = std::env::var("SWITCHYARD_BENCH_SERVE") {
        serve(count.parse().unwrap());
        return;
    }
    let mut child = Command::new(std::env::current_exe().unwrap())
        .env("SWITCHYARD_BENCH_SERVE", BACKENDS.to_string())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut ports = Vec::new();
    for line in BufReader::new(child.stdout.take().unwrap()).lines() {
        let line = line.unwrap();
        if line == "ready" {
            break;
        }
        ports.push(line.parse::<u16>().unwrap());
    }
    assert_eq!(ports.len(), BACKENDS);

    let mut yaml = String::from("admin: { bind: \"127.0.0.1:0\" }\nlisteners: [{ bind: \"127.0.0.1:0\" }]\nroutes: [{ upstream: u0 }]\nupstreams:\n");
    for (group, chunk) in ports.chunks(100).enumerate() {
        yaml.push_str(&format!(
            "  u{group}:\n    health:\n      active: {{ path: /healthz, interval: 1s, timeout: 500ms }}\n    backends:\n"
        ));
        for port in chunk {
            yaml.push_str(&format!("      - {{ address: \"127.0.0.1:{port}\" }}\n"));
        }
    }
    let config = switchyard::config::parse(&yaml, "bench.yaml").unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let (cpu, checks, failures) = runtime.block_on(async {
        let snapshot = switchyard::state::Snapshot::compile(&config, None, 1);
        let mut checkers = switchyard::probe::Checkers::default();
        checkers.sync(&snapshot);
        assert_eq!(checkers.len(), BACKENDS);
        // Every checker's first probe lands within one interval; let them settle.
        tokio::time::sleep(Duration::from_secs(3)).await;
        let passes_before = passes(&snapshot);
        let (cpu_before, started) = (cpu_time(), Instant::now());
        tokio::time::sleep(WINDOW).await;
        let cpu = (cpu_time() - cpu_before).as_secs_f64() / started.elapsed().as_secs_f64();
        let checks = passes(&snapshot) - passes_before;
        let failures = snapshot
            .upstreams
            .iter()
            .flat_map(|u| &u.backends)
            .filter(|b| !b.check.as_ref().unwrap().is_healthy())
            .count();
        drop(checkers);
        (cpu, checks, failures)
    });
    // The floor for comparison: the same number of request/response exchanges
    // per second on already open connections, with no HTTP and no bookkeeping,
    // on the same 250 ms grid. What is left is the kernel's loopback TCP cost.
    let floor = runtime.block_on(raw_exchange_floor(&ports));
    let _ = child.kill();
    let _ = child.wait();
    println!(
        "{BACKENDS} backends, http check every 1s: {checks} checks in {WINDOW:?} ({:.0}/s), {failures} unhealthy",
        checks as f64 / WINDOW.as_secs_f64()
    );
    println!("checker CPU: {:.2}% of one core", cpu * 100.0);
    println!("floor (raw TCP request/response, same rate): {:.2}% of one core", floor * 100.0);
}

async fn raw_exchange_floor(ports: &[u16]) -> f64 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tasks = Vec::new();
    for &port in ports {
        tasks.push(tokio::spawn(async move {
            let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
            stream.set_nodelay(true).unwrap();
            let start = tokio::time::Instant::now();
            let step = Duration::from_millis(250);
            let mut next = start + step * fastrand::u32(0..4);
            let mut buffer = [0u8; 1024];
            loop {
                tokio::time::sleep_until(next).await;
                stream.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n").await.unwrap();
                let _ = stream.read(&mut buffer).await.unwrap();
                next += Duration::from_secs(1);
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (before, started) = (cpu_time(), Instant::now());
    tokio::time::sleep(WINDOW).await;
    let share = (cpu_time() - before).as_secs_f64() / started.elapsed().as_secs_f64();
    for task in tasks {
        task.abort();
    }
    share
}

fn passes(snapshot: &switchyard::state::Snapshot) -> u64 {
    snapshot
        .upstreams
        .iter()
        .flat_map(|u| &u.backends)
        .map(|b| u64::from(b.check.as_ref().unwrap().consecutive().0))
        .sum()
}

/// User + system CPU time of this process so far.
fn cpu_time() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap();
    // Fields after the command name (which may contain spaces) start after ')'.
    let fields: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..].split_whitespace().collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    // Linux reports these in clock ticks of 1/100 s (USER_HZ) on every common platform.
    Duration::from_millis(ticks * 10)
}

/// The child: `count` minimal HTTP servers answering 200 to anything.
fn serve(count: usize) {
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    runtime.block_on(async move {
        for _ in 0..count {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            println!("{}", listener.local_addr().unwrap().port());
            tokio::spawn(async move {
                while let Ok((stream, _)) = listener.accept().await {
                    tokio::spawn(async move {
                        let service = hyper::service::service_fn(|_request| async {
                            Ok::<_, std::convert::Infallible>(hyper::Response::new(
                                http_body_util::Empty::<bytes::Bytes>::new(),
                            ))
                        });
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                            .await;
                    });
                }
            });
        }
        println!("ready");
        std::future::pending::<()>().await;
    });
}
