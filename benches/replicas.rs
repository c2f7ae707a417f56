//! Many replicas, one mapping: a simulation of `consistent_hash` across
//! Switchyard replicas that learn the same backends (from DNS, say) in
//! different orders, through a churn of the backend set. Run:
//! `cargo bench --bench replicas` (REPLICAS, BACKENDS, KEYS to change the size;
//! the defaults are 100 replicas, 10,000 backends, 100,000 keys).
//!
//! It prints, and checks:
//! - every replica maps every key to the same backend, whatever the order in
//!   which it was given the backends;
//! - after 1% of the backends change (half of them leave, as many new ones
//!   join), the share of keys that moved, against the floor a perfect
//!   mapping would move (the keys of the leavers plus the new ones' share),
//!   and every replica still agrees on every key;
//! - with `bounded_load: 1.25`, no backend of a replica holds more requests
//!   than 1.25 x the mean (rounded up), with every request held.

#![allow(clippy::disallowed_types)] // std::time::Instant: a benchmark measures wall time

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Instant;

use switchyard::backend::Backend;
use switchyard::balance::{Balancer, ConsistentHash, PickRequest};
use switchyard::config::{BackendConfig, PolicyConfig};

fn env(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn backend(n: usize) -> BackendConfig {
    BackendConfig {
        address: format!("10.{}.{}.{}:8270", n / 62_500, n / 250 % 250, n % 250 + 1),
        weight: 1,
        max_concurrency: None,
    }
}

/// Each replica's view: the same backends in its own (shuffled) order, mapped
/// back to addresses so that replicas can be compared.
fn replica_mapping(backends: &[BackendConfig], keys: &[String], seed: u64) -> Vec<Arc<str>> {
    let mut order: Vec<BackendConfig> = backends.to_vec();
    fastrand::Rng::with_seed(seed).shuffle(&mut order);
    let policy = ConsistentHash::new(&order, "path".parse().unwrap(), None);
    let addresses: Vec<Arc<str>> = order.iter().map(|b| Arc::from(b.address.as_str())).collect();
    keys.iter().map(|key| Arc::clone(&addresses[policy.owner_of(key.as_bytes()).unwrap()])).collect()
}

fn main() {
    let (replicas, backends, keys) = (env("REPLICAS", 100), env("BACKENDS", 10_000), env("KEYS", 100_000));
    let fleet: Vec<BackendConfig> = (0..backends).map(backend).collect();
    let keys: Vec<String> = (0..keys).map(|k| format!("/jobs/{k:08x}")).collect();

    // 1. Every replica agrees, whatever the order it learned the backends in.
    let started = Instant::now();
    let reference = replica_mapping(&fleet, &keys, 0);
    let mut disagreements = 0usize;
    for replica in 1..replicas {
        let mapping = replica_mapping(&fleet, &keys, replica as u64);
        disagreements += mapping.iter().zip(&reference).filter(|(a, b)| a != b).count();
    }
    println!(
        "{replicas} replicas x {backends} backends x {} keys: {disagreements} disagreements ({:.1} s)",
        keys.len(),
        started.elapsed().as_secs_f64()
    );
    assert_eq!(disagreements, 0, "replicas must map every key alike");

    // 2. Churn: 1% of the backends change, half leaving, as many joining.
    let changed = backends / 100;
    // Seeded, and deduplicated in draw order, so every run churns the same backends.
    let mut rng = fastrand::Rng::with_seed(42);
    let mut drawn = HashSet::new();
    let leaving: HashSet<usize> =
        std::iter::repeat_with(|| rng.usize(..backends)).filter(|i| drawn.insert(*i)).take(changed / 2).collect();
    let mut churned: Vec<BackendConfig> =
        fleet.iter().enumerate().filter(|(i, _)| !leaving.contains(i)).map(|(_, b)| b.clone()).collect();
    churned.extend((backends..backends + changed / 2).map(backend));
    let after = replica_mapping(&churned, &keys, 7);
    // Every replica agrees after the churn too, each with its own order of the new set.
    let started = Instant::now();
    let mut disagreements = 0usize;
    for replica in 0..replicas {
        let mapping = replica_mapping(&churned, &keys, 1_000 + replica as u64);
        disagreements += mapping.iter().zip(&after).filter(|(a, b)| a != b).count();
    }
    println!(
        "after the churn, {replicas} replicas x {} backends x {} keys: {disagreements} disagreements ({:.1} s)",
        churned.len(),
        keys.len(),
        started.elapsed().as_secs_f64()
    );
    assert_eq!(disagreements, 0, "replicas must map every key alike after a churn");
    let moved = after.iter().zip(&reference).filter(|(a, b)| a != b).count();
    let left: HashSet<Arc<str>> = leaving.iter().map(|&i| Arc::from(fleet[i].address.as_str())).collect();
    let orphaned = reference.iter().filter(|owner| left.contains(*owner)).count();
    let joined: HashSet<Arc<str>> =
        (backends..backends + changed / 2).map(|n| Arc::from(backend(n).address.as_str())).collect();
    let taken = after.iter().filter(|owner| joined.contains(*owner)).count();
    let share = |n: usize| 100.0 * n as f64 / keys.len() as f64;
    println!(
        "churn of {changed} backends ({} left, {} joined): {:.2}% of keys moved; the leavers held {:.2}%, the joiners took {:.2}%",
        changed / 2,
        changed / 2,
        share(moved),
        share(orphaned),
        share(taken)
    );
    assert_eq!(
        moved,
        orphaned + taken
            - after.iter().zip(&reference).filter(|(a, b)| left.contains(*b) && joined.contains(*a)).count(),
        "only the leavers' keys and the joiners' keys move"
    );
    assert!(share(moved) <= 1.1, "a 1% churn moved {:.2}% of keys", share(moved));

    // 3. Bounded load holds per replica: every request held, none released.
    let policy = PolicyConfig::ConsistentHash { key: "path".parse().unwrap(), bounded_load: Some(1.25) };
    for replica in 0..3u64 {
        let mut order = fleet.clone();
        fastrand::Rng::with_seed(100 + replica).shuffle(&mut order);
        let balancer = Balancer::new(&policy, &order);
        let runtime: Vec<Arc<Backend>> = order
            .iter()
            .map(|c| Arc::new(Backend { load: balancer.upstream_load(), ..Backend::detached(c) }))
            .collect();
        let headers = http::HeaderMap::new();
        let mut held = Vec::with_capacity(keys.len());
        let requests = (3 * backends).min(keys.len());
        for key in &keys[..requests] {
            let uri: http::Uri = key.parse().unwrap();
            let request = PickRequest {
                headers: &headers,
                uri: &uri,
                client_ip: std::net::IpAddr::from([127, 0, 0, 1]),
                exclude: &[],
            };
            held.push(balancer.pick(&runtime, &request).expect("bounded load always finds a backend"));
        }
        let most = runtime.iter().map(|b| b.in_flight()).max().unwrap_or(0);
        let bound = (1.25 * held.len() as f64 / backends as f64).ceil() as u32;
        println!(
            "replica {replica}: {} requests held over {backends} backends, the busiest holds {most} (bound {bound})",
            held.len()
        );
        assert!(most <= bound, "bounded load exceeded on replica {replica}: {most} > {bound}");
    }
}
