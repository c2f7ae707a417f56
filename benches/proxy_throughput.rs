//! Proxy throughput with the access log off and on: the same load through the
//! same proxy, differing only in `log.access`. Backend, proxy and load run in
//! this one process on loopback, so the figures are relative, not absolute:
//! what they show is the access log's cost. Lines are formatted as JSON and
//! written to a sink, so the cost measured is the proxy's, not a terminal's.
//! Run: `cargo bench --bench proxy_throughput`.

#![allow(clippy::disallowed_types)] // std::time::Instant: a benchmark measures wall time

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use switchyard::app::RunningProxy;

const CONCURRENCY: usize = 32;
const WARM_UP: Duration = Duration::from_secs(1);
const RUN: Duration = Duration::from_secs(3);
/// Off and on alternate this many times; medians damp a shared machine's noise.
const ROUNDS: usize = 5;

fn main() {
    tracing_subscriber::fmt()
        .json()
        .with_env_filter(tracing_subscriber::EnvFilter::new("warn,access=info"))
        .with_writer(std::io::sink)
        .init();
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    runtime.block_on(async {
        let backend = start_backend().await;
        let mut results = Vec::new();
        for _ in 0..ROUNDS {
            for access in [false, true] {
                let rate = measure(backend, access).await;
                println!("access log {:<3}  {rate:>8.0} requests/s", if access { "on" } else { "off" });
                results.push((access, rate));
            }
        }
        let median = |on: bool| {
            let mut rates: Vec<f64> = results.iter().filter(|(a, _)| *a == on).map(|(_, r)| *r).collect();
            rates.sort_by(f64::total_cmp);
            rates[rates.len() / 2]
        };
        let (off, on) = (median(false), median(true));
        println!(
            "median: off {off:.0}/s, on {on:.0}/s, access log costs {:.1}% of throughput",
            (1.0 - on / off) * 100.0
        );
    });
}

async fn start_backend() -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let service = hyper::service::service_fn(|_request| async {
                    Ok::<_, std::convert::Infallible>(hyper::Response::new(Full::new(Bytes::from_static(
                        b"{\"status\":\"done\"}",
                    ))))
                });
                let _ =
                    hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), service).await;
            });
        }
    });
    addr
}

async fn measure(backend: std::net::SocketAddr, access: bool) -> f64 {
    let yaml = format!(
        "admin: {{ bind: \"127.0.0.1:0\" }}\nlog: {{ access: {access} }}\nlisteners: [{{ bind: \"127.0.0.1:0\" }}]\nroutes: [{{ name: bench, upstream: pool }}]\nupstreams:\n  pool:\n    backends: [{{ address: \"{backend}\" }}]\n"
    );
    let config = switchyard::config::parse(&yaml, "bench.yaml").unwrap();
    let proxy = RunningProxy::start(&config).await.unwrap();
    let url: hyper::Uri = format!("http://{}/run", proxy.listener_addrs().await[0].1).parse().unwrap();
    let client: Client<_, Empty<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let (counting, stop, done) =
        (Arc::new(AtomicBool::new(false)), Arc::new(AtomicBool::new(false)), Arc::new(AtomicU64::new(0)));
    let mut workers = Vec::new();
    for _ in 0..CONCURRENCY {
        let (client, url, counting, stop, done) =
            (client.clone(), url.clone(), counting.clone(), stop.clone(), done.clone());
        workers.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let response = client.get(url.clone()).await.expect("the proxy answers");
                let _ = response.into_body().collect().await;
                if counting.load(Ordering::Relaxed) {
                    done.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    tokio::time::sleep(WARM_UP).await;
    counting.store(true, Ordering::Relaxed);
    let started = Instant::now();
    tokio::time::sleep(RUN).await;
    let rate = done.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    for worker in workers {
        let _ = worker.await;
    }
    proxy.shutdown().await;
    rate
}
