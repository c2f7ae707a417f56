//! Reload cost at scale: a config with 10,000 backends across 100 upstreams.
//!
//! Measures (1) parse + validate of the YAML text, (2) compile + swap of the
//! runtime snapshot carrying every backend's state forward, and (3) the longest
//! time a reader (standing in for the request path: load the snapshot, match a
//! route, pick a backend) took while swaps were happening on another thread.
//! Run: `cargo bench --bench reload`.

#![allow(clippy::disallowed_types)] // std::time::Instant: a benchmark measures wall time

use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use switchyard::balance::PickRequest;
use switchyard::state::Snapshot;

const UPSTREAMS: usize = 100;
const BACKENDS_PER_UPSTREAM: usize = 100;
const RUNS: usize = 20;

fn big_config(variant: usize) -> String {
    let policies = ["round_robin", "least_loaded", "random", "consistent_hash, key: \"header:x-job-id\""];
    let mut text = String::from("admin: { bind: \"127.0.0.1:0\" }\nlisteners: [{ bind: \"127.0.0.1:0\" }]\nroutes:\n");
    for u in 0..UPSTREAMS {
        text.push_str(&format!("  - {{ match: {{ path_prefix: /u{u}/ }}, upstream: u{u} }}\n"));
    }
    text.push_str("upstreams:\n");
    for u in 0..UPSTREAMS {
        text.push_str(&format!("  u{u}:\n    balance: {{ policy: {} }}\n    backends:\n", policies[(u + variant) % 4]));
        for b in 0..BACKENDS_PER_UPSTREAM {
            let weight = 1 + (b + variant) % 3;
            text.push_str(&format!(
                "      - {{ address: \"10.{}.{}.{}:8270\", weight: {weight} }}\n",
                u / 250,
                u % 250,
                b + 1
            ));
        }
    }
    text
}

fn summary(name: &str, mut samples: Vec<Duration>) {
    samples.sort();
    let median = samples[samples.len() / 2];
    let max = samples[samples.len() - 1];
    println!("{name:<28} median {:>8.2} ms   max {:>8.2} ms   ({} runs)", ms(median), ms(max), samples.len());
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn main() {
    let texts = [big_config(0), big_config(1)];
    let configs: Vec<_> = texts.iter().map(|t| switchyard::config::parse(t, "bench.yaml").unwrap()).collect();
    let live = Arc::new(ArcSwap::from_pointee(Snapshot::compile(&configs[0], None, 1)));

    let mut parse = Vec::new();
    for i in 0..RUNS {
        let started = Instant::now();
        let config = switchyard::config::parse(&texts[i % 2], "bench.yaml").unwrap();
        parse.push(started.elapsed());
        std::hint::black_box(config);
    }

    // Readers hammer the snapshot the way requests do while swaps happen.
    let stop = Arc::new(AtomicBool::new(false));
    let reader = {
        let (live, stop) = (Arc::clone(&live), Arc::clone(&stop));
        std::thread::spawn(move || {
            let mut headers = http::HeaderMap::new();
            headers.insert("x-job-id", "job-1".parse().unwrap());
            let mut worst = Duration::ZERO;
            let mut reads = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let started = Instant::now();
                let snapshot = live.load_full();
                let request = http::Request::get("/u42/run").body(()).unwrap();
                let index = snapshot.router.find_index(&request).unwrap();
                let upstream = &snapshot.router.routes()[index].upstream;
                let pick = PickRequest {
                    headers: &headers,
                    uri: request.uri(),
                    client_ip: IpAddr::from([127, 0, 0, 1]),
                    exclude: &[],
                };
                std::hint::black_box(upstream.balancer.pick(&upstream.backends, &pick));
                drop(snapshot);
                worst = worst.max(started.elapsed());
                reads += 1;
            }
            (worst, reads)
        })
    };

    // As in the proxy, the reloader keeps retired snapshots and frees them once no
    // reader holds them, so freeing 10,000 backends never lands on a request.
    let mut retired = Vec::new();
    let mut compile_and_swap = Vec::new();
    for i in 0..RUNS {
        let started = Instant::now();
        let previous = live.load_full();
        let next = Snapshot::compile(&configs[(i + 1) % 2], Some(&previous), previous.generation + 1);
        live.store(Arc::new(next));
        compile_and_swap.push(started.elapsed());
        retired.push(previous);
        std::thread::sleep(Duration::from_millis(5));
        retired.retain(|snapshot| Arc::strong_count(snapshot) > 1);
    }
    stop.store(true, Ordering::Relaxed);
    let (worst_read, reads) = reader.join().unwrap();

    // The common edit: one upstream's backend list changes, the other 99 do not.
    let edited_text = texts[0].replacen("\"10.0.7.1:8270\", weight: 1", "\"10.0.7.1:8270\", weight: 3", 1);
    assert_ne!(edited_text, texts[0]);
    let edited = [configs[0].clone(), switchyard::config::parse(&edited_text, "bench.yaml").unwrap()];
    live.store(Arc::new(Snapshot::compile(&edited[0], Some(&live.load_full()), 100)));
    let mut one_upstream = Vec::new();
    for i in 0..RUNS {
        let started = Instant::now();
        let previous = live.load_full();
        live.store(Arc::new(Snapshot::compile(&edited[(i + 1) % 2], Some(&previous), previous.generation + 1)));
        one_upstream.push(started.elapsed());
        retired.push(previous);
    }

    println!("reload of {} backends across {UPSTREAMS} upstreams", UPSTREAMS * BACKENDS_PER_UPSTREAM);
    summary("parse + validate", parse);
    summary("compile + swap (all new)", compile_and_swap);
    summary("compile + swap (1 edited)", one_upstream);
    println!("{:<28} {:>8.3} ms over {reads} reads during {RUNS} swaps", "slowest reader", ms(worst_read));
}
