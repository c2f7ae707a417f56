//! Each balancing policy's distribution, measured at real backends.

use std::sync::Arc;
use std::time::Duration;

use crate::support::*;

#[tokio::test]
async fn round_robin_weights_1_2_3_give_exactly_1_2_3() {
    let backends = [Backend::start("a").await, Backend::start("b").await, Backend::start("c").await];
    let list: String = backends
        .iter()
        .zip([1, 2, 3])
        .map(|(b, w)| format!("      - {{ address: \"{}\", weight: {w} }}\n", b.addr))
        .collect();
    let yaml = format!(
        "listeners: [{{ bind: \"127.0.0.1:0\" }}]\nroutes: [{{ upstream: pool }}]\nupstreams:\n  pool:\n    balance: {{ policy: round_robin }}\n    backends:\n{list}"
    );
    let proxy = start_proxy(&yaml).await;
    let client = client();
    for _ in 0..600 {
        assert_eq!(get(&client, &proxy.url("/")).await.status, 200);
    }
    assert_eq!([backends[0].hits(), backends[1].hits(), backends[2].hits()], [100, 200, 300]);
}

#[tokio::test]
async fn least_loaded_sends_the_next_request_to_an_idle_backend() {
    let backends = [Backend::start("a").await, Backend::start("b").await, Backend::start("c").await];
    let proxy = start_proxy(&simple_config("{ policy: least_loaded }", &backends.iter().collect::<Vec<_>>(), "")).await;
    let client = client();
    let held = tokio::spawn({
        let (client, url) = (client.clone(), proxy.url("/hold"));
        async move { get(&client, &url).await }
    });
    wait_until("the held request to reach a backend", Duration::from_secs(10), || {
        backends.iter().any(|b| b.in_flight() == 1)
    })
    .await;
    let busy = backends.iter().position(|b| b.in_flight() == 1).unwrap();
    for _ in 0..30 {
        let answer = get(&client, &proxy.url("/")).await;
        assert_ne!(answer.body, backends[busy].name, "a request went to the busy backend");
    }
    assert_eq!(backends[busy].hits(), 1);
    backends[busy].release_held();
    assert_eq!(held.await.unwrap().status, 200);
}

#[tokio::test]
async fn least_loaded_gives_a_ten_times_slower_backend_well_under_a_third() {
    let backends = [Backend::start("slow").await, Backend::start("fast1").await, Backend::start("fast2").await];
    backends[0].set_delay(Duration::from_millis(50));
    backends[1].set_delay(Duration::from_millis(5));
    backends[2].set_delay(Duration::from_millis(5));
    let proxy = start_proxy(&simple_config("{ policy: least_loaded }", &backends.iter().collect::<Vec<_>>(), "")).await;
    let client = client();
    let mut workers = Vec::new();
    for _ in 0..8 {
        let (client, url) = (client.clone(), proxy.url("/"));
        workers.push(tokio::spawn(async move {
            let mut bodies = Vec::new();
            for _ in 0..40 {
                bodies.push(get(&client, &url).await.body);
            }
            bodies
        }));
    }
    let mut all = Vec::new();
    for worker in workers {
        all.extend(worker.await.unwrap());
    }
    let counts = tally(all);
    let slow_share = *counts.get("slow").unwrap_or(&0) as f64 / 320.0;
    eprintln!("least_loaded shares: {counts:?}");
    assert!(slow_share < 0.2, "slow backend got {:.0}% of the traffic", slow_share * 100.0);
}

fn hash_config(backends: &[&Backend], bounded: &str) -> String {
    simple_config(&format!("{{ policy: consistent_hash, key: \"header:x-job-id\"{bounded} }}"), backends, "")
}

async fn key_mapping(proxy: &Proxy, keys: usize, rounds: usize) -> Vec<String> {
    let client = client();
    let mut mapping = vec![String::new(); keys];
    for round in 0..rounds {
        for (key, owner) in mapping.iter_mut().enumerate() {
            let job = format!("job-{key}");
            let answer = get_with(&client, &proxy.url("/"), &[("x-job-id", &job)]).await;
            if round == 0 {
                *owner = answer.body;
            } else {
                assert_eq!(*owner, answer.body, "key {job} moved between requests");
            }
        }
    }
    mapping
}

#[tokio::test]
async fn consistent_hash_is_sticky_and_removal_moves_only_the_removed_backends_keys() {
    let backends = [
        Backend::start("b0").await,
        Backend::start("b1").await,
        Backend::start("b2").await,
        Backend::start("b3").await,
        Backend::start("b4").await,
    ];
    let all: Vec<&Backend> = backends.iter().collect();
    let proxy = start_proxy(&hash_config(&all, "")).await;
    // 1000 requests: 200 keys, 5 rounds, every key always on the same backend.
    let before = key_mapping(&proxy, 200, 5).await;
    let counts = tally(before.clone());
    assert_eq!(counts.len(), 5, "every backend owns some keys: {counts:?}");

    // A second proxy with the same backends in another order agrees on every key.
    let reversed: Vec<&Backend> = backends.iter().rev().collect();
    let replica = start_proxy(&hash_config(&reversed, "")).await;
    assert_eq!(key_mapping(&replica, 200, 1).await, before, "replicas disagree");

    // Without b2, only b2's keys move.
    let without: Vec<&Backend> = backends.iter().filter(|b| b.name != "b2").collect();
    let smaller = start_proxy(&hash_config(&without, "")).await;
    let after = key_mapping(&smaller, 200, 1).await;
    let mut moved = 0;
    for (old, new) in before.iter().zip(&after) {
        if old == "b2" {
            moved += 1;
            assert_ne!(new, "b2");
        } else {
            assert_eq!(old, new, "a key that was not on b2 moved");
        }
    }
    assert_eq!(moved, counts["b2"]);
}

#[tokio::test]
async fn bounded_load_keeps_every_backend_within_the_factor_under_skewed_keys() {
    let backends = [
        Backend::start("b0").await,
        Backend::start("b1").await,
        Backend::start("b2").await,
        Backend::start("b3").await,
    ];
    let all: Vec<&Backend> = backends.iter().collect();
    let proxy = start_proxy(&hash_config(&all, ", bounded_load: 1.25")).await;
    let client = client();
    let mut requests = Vec::new();
    // 40 held requests, 32 of them with the same hot key.
    for i in 0..40 {
        let key = if i % 5 == 0 { format!("cold-{i}") } else { "hot".to_owned() };
        let (client, url) = (client.clone(), proxy.url("/hold"));
        requests.push(tokio::spawn(async move { get_with(&client, &url, &[("x-job-id", &key)]).await }));
    }
    wait_until("all 40 requests to be held", Duration::from_secs(20), || {
        backends.iter().map(|b| b.in_flight()).sum::<usize>() == 40
    })
    .await;
    let mean = 40.0 / 4.0;
    let bound = (1.25f64 * mean).ceil() as usize;
    for backend in &backends {
        let peak = backend.stats.peak_in_flight.load(std::sync::atomic::Ordering::SeqCst);
        assert!(peak <= bound, "{} peaked at {peak} in flight; bound is {bound}", backend.name);
    }
    for backend in &backends {
        backend.release_held();
    }
    for request in requests {
        assert_eq!(request.await.unwrap().status, 200);
    }
}

#[tokio::test]
async fn every_policy_respects_max_concurrency() {
    for policy in ["round_robin", "least_loaded", "random", "consistent_hash, key: \"header:x-job-id\""] {
        let backends = [Backend::start("a").await, Backend::start("b").await, Backend::start("c").await];
        let all: Vec<&Backend> = backends.iter().collect();
        let proxy = start_proxy(&simple_config(&format!("{{ policy: {policy} }}"), &all, ", max_concurrency: 2")).await;
        let client = client();
        let mut held = Vec::new();
        for i in 0..6 {
            let (client, url) = (client.clone(), proxy.url("/hold"));
            let key = format!("k{}", i % 2);
            held.push(tokio::spawn(async move { get_with(&client, &url, &[("x-job-id", &key)]).await }));
        }
        wait_until("six held requests", Duration::from_secs(10), || {
            backends.iter().map(|b| b.in_flight()).sum::<usize>() == 6
        })
        .await;
        // Every slot is taken: the next requests are refused at once, whatever the policy.
        for _ in 0..3 {
            let answer = get_with(&client, &proxy.url("/"), &[("x-job-id", "k0")]).await;
            assert_eq!(answer.status, 503, "{policy}");
            assert_eq!(answer.error_code(), Some("no_healthy_backend"));
        }
        for backend in &backends {
            assert!(backend.stats.peak_in_flight.load(std::sync::atomic::Ordering::SeqCst) <= 2, "{policy}");
            backend.release_held();
        }
        for request in held {
            assert_eq!(request.await.unwrap().status, 200);
        }
        drop(Arc::new(proxy));
    }
}
