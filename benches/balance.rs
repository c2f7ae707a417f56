//! Cost of one balancing decision (pick + release) per policy, for a small bot
//! fleet, a large RPC fleet and a very large one (10,000 backends). Run:
//! `cargo bench --bench balance`.

use std::net::IpAddr;
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use switchyard::backend::Backend;
use switchyard::balance::{Balancer, PickRequest};
use switchyard::config::{BackendConfig, PolicyConfig};

fn fleet(n: usize) -> Vec<BackendConfig> {
    (0..n)
        .map(|i| BackendConfig {
            address: format!("10.0.{}.{}:8270", i / 250, i % 250 + 1),
            weight: 1 + (i % 3) as u32,
            max_concurrency: None,
        })
        .collect()
}

/// The backends as a compiled upstream has them, keeping the policy's totals.
fn attached(configs: &[BackendConfig], balancer: &Balancer) -> Vec<Arc<Backend>> {
    configs.iter().map(|c| Arc::new(Backend { load: balancer.upstream_load(), ..Backend::detached(c) })).collect()
}

fn picks(c: &mut Criterion) {
    let mut group = c.benchmark_group("pick");
    let policies = [
        ("round_robin", PolicyConfig::RoundRobin),
        ("least_loaded", PolicyConfig::LeastLoaded),
        ("random", PolicyConfig::Random),
        (
            "consistent_hash",
            PolicyConfig::ConsistentHash { key: "header:x-job-id".parse().unwrap(), bounded_load: None },
        ),
        (
            "consistent_hash_bounded",
            PolicyConfig::ConsistentHash { key: "header:x-job-id".parse().unwrap(), bounded_load: Some(1.25) },
        ),
    ];
    let mut headers = http::HeaderMap::new();
    headers.insert("x-job-id", "job-123456".parse().unwrap());
    let uri = http::Uri::from_static("/robot/run");
    let request = PickRequest { headers: &headers, uri: &uri, client_ip: IpAddr::from([127, 0, 0, 1]), exclude: &[] };
    for size in [3, 100, 10_000] {
        let configs = fleet(size);
        for (name, policy) in &policies {
            let balancer = Balancer::new(policy, &configs);
            let backends = attached(&configs, &balancer);
            group.bench_with_input(BenchmarkId::new(*name, size), &size, |b, _| {
                b.iter(|| balancer.pick(&backends, &request).expect("a free backend"))
            });
        }
    }
    group.finish();
}

criterion_group!(benches, picks);
criterion_main!(benches);
