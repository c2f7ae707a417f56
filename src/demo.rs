//! `switchyard demo`: three sample bot servers on loopback and the proxy in front
//! of them, so a newcomer sees balancing work with nothing but this binary.
//!
//! Each bot answers every request with a one-line JSON receipt naming itself, and
//! `GET /healthz` with `ok`. `?ms=N` makes a bot take N milliseconds, like a job.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;

use crate::app::{exit, RunningProxy};
use crate::config;

/// Bot ports that `config/switchyard.yaml` points at.
pub const BOT_PORTS: [u16; 3] = [18271, 18272, 18273];

/// Starts the bots (and, unless `bots_only`, the proxy on `proxy_port`), prints
/// how to try them, and serves until Ctrl-C. Returns the exit code.
pub async fn run(proxy_port: u16, bots_only: bool) -> i32 {
    let mut bots = Vec::new();
    for (i, port) in BOT_PORTS.iter().enumerate() {
        match start_bot(format!("bot-{}", i + 1), *port).await {
            Ok(addr) => bots.push(addr),
            Err(error) => {
                eprintln!("cannot start demo bot: {error}");
                return exit::CANNOT_SERVE;
            }
        }
    }
    println!("Switchyard demo");
    for (i, addr) in bots.iter().enumerate() {
        println!("  bot-{}   http://{addr}", i + 1);
    }
    if bots_only {
        println!("Bots only; run the proxy with: switchyard run -c config/switchyard.yaml");
    } else {
        let text = demo_config(&bots, proxy_port);
        let config = match config::parse(&text, "<demo>") {
            Ok(config) => config,
            Err(errors) => {
                eprintln!("{errors}");
                return exit::BAD_CONFIG;
            }
        };
        if let Err(error) = crate::logging::init(&config.log) {
            eprintln!("{error}");
            return exit::CANNOT_SERVE;
        }
        let proxy = match RunningProxy::start(&config).await {
            Ok(proxy) => proxy,
            Err(error) => {
                eprintln!("{error}");
                return exit::CANNOT_SERVE;
            }
        };
        let addr = proxy.listener_addrs().await[0].1;
        let admin = proxy.admin_addr().await;
        println!("  proxy   http://{addr}");
        println!("  admin   http://{admin}/        (status page; JSON at /status)");
        println!();
        println!("Try:");
        println!("  curl -s http://{addr}/robot/run -d '{{\"task\":\"invoice\"}}'     # round robin over the 3 bots");
        println!(
            "  curl -s -H 'x-job-id: job-42' http://{addr}/jobs/status   # consistent hash: same bot for the same job"
        );
        // Leak the proxy: it serves until the process ends.
        std::mem::forget(proxy);
    }
    println!("Press Ctrl-C to stop.");
    let _ = tokio::signal::ctrl_c().await;
    exit::OK
}

fn demo_config(bots: &[SocketAddr], proxy_port: u16) -> String {
    let backends: String = bots.iter().map(|b| format!("      - address: \"{b}\"\n")).collect();
    format!(
        "listeners:\n  - name: demo\n    bind: \"127.0.0.1:{proxy_port}\"\nadmin:\n  bind: \"127.0.0.1:0\"\nlog:\n  level: warn\nroutes:\n  - name: jobs\n    match: {{ path_prefix: /jobs/ }}\n    upstream: sticky-bots\n  - name: default\n    upstream: bots\nupstreams:\n  bots:\n    balance: {{ policy: round_robin }}\n    backends:\n{backends}  sticky-bots:\n    balance: {{ policy: consistent_hash, key: \"header:x-job-id\" }}\n    backends:\n{backends}"
    )
}

/// Serves one sample bot, on `port` if free, else on any port.
pub async fn start_bot(name: String, port: u16) -> std::io::Result<SocketAddr> {
    let listener = match TcpListener::bind(("127.0.0.1", port)).await {
        Ok(listener) => listener,
        Err(_) => TcpListener::bind(("127.0.0.1", 0)).await?,
    };
    let addr = listener.local_addr()?;
    let name: Arc<str> = name.into();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let name = Arc::clone(&name);
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |request| bot_answer(Arc::clone(&name), request));
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection_with_upgrades(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    Ok(addr)
}

async fn bot_answer(name: Arc<str>, request: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    if request.uri().path() == "/healthz" {
        return Ok(Response::new(Full::from("ok\n")));
    }
    let delay = request
        .uri()
        .query()
        .and_then(|q| q.split('&').find_map(|pair| pair.strip_prefix("ms=")))
        .and_then(|ms| ms.parse::<u64>().ok())
        .unwrap_or(0);
    let job = request.headers().get("x-job-id").and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
    let (method, path) = (request.method().clone(), request.uri().path().to_owned());
    let received = request.into_body().collect().await.map(|b| b.to_bytes().len()).unwrap_or(0);
    tokio::time::sleep(Duration::from_millis(delay.min(60_000))).await;
    let receipt = format!(
        "{{\"bot\":\"{name}\",\"method\":\"{method}\",\"path\":{path:?},\"job\":{job:?},\"bytes\":{received},\"status\":\"done\"}}\n"
    );
    let mut response = Response::new(Full::from(receipt));
    response.headers_mut().insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("application/json"));
    Ok(response)
}
