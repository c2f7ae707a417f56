//! Replica agreement end to end: two Switchyard processes given the same
//! backends in different orders send every key to the same backend. The
//! property itself (any order, 10,000 keys, every backend owning a share) is
//! a unit test of the policy (`balance::consistent_hash`); this shows that
//! nothing between the file and the pick (parsing, compiling, a per-process
//! hash seed) breaks it. `cargo bench --bench replicas` simulates 100
//! replicas and a churn.

use futures::StreamExt;

use crate::support::*;

fn replica_config(backends: &[&Backend]) -> String {
    let list: Vec<String> = backends.iter().map(|b| format!("{{ address: \"{}\" }}", b.addr)).collect();
    format!(
        "listeners: [{{ bind: \"127.0.0.1:{{port}}\" }}]\nroutes: [{{ upstream: bots }}]\nupstreams:\n  bots:\n    \
         balance: {{ policy: consistent_hash, key: \"header:x-job-id\" }}\n    backends: [{}]\n",
        list.join(", ")
    )
}

#[tokio::test]
async fn two_replica_processes_with_backends_in_different_orders_map_keys_alike() {
    let mut bots = Vec::new();
    for name in ["a", "b", "c", "d", "e"] {
        bots.push(Backend::start(name).await);
    }
    let order: Vec<&Backend> = bots.iter().collect();
    let shuffled: Vec<&Backend> = [2, 4, 0, 3, 1].iter().map(|&i| &bots[i]).collect();
    let replicas =
        [ProxyProcess::start(&replica_config(&order)).await, ProxyProcess::start(&replica_config(&shuffled)).await];
    let client = client();
    let backend_for = |replica: &ProxyProcess, key: usize| {
        let (client, url) = (client.clone(), replica.url("/jobs"));
        async move {
            let answer = get_with(&client, &url, &[("x-job-id", &format!("job-{key}"))]).await;
            assert_eq!(answer.status, 200);
            answer.headers["x-backend"].to_str().unwrap().to_owned()
        }
    };
    let mut mappings = Vec::new();
    for replica in &replicas {
        let mapping: Vec<String> =
            futures::stream::iter(0..1_000).map(|key| backend_for(replica, key)).buffered(16).collect().await;
        mappings.push(mapping);
    }
    let differ = mappings[1].iter().zip(&mappings[0]).filter(|(a, b)| a != b).count();
    assert_eq!(differ, 0, "the second replica maps {differ} of 1,000 keys elsewhere");
    // The keys really spread: every backend owns some.
    for bot in &bots {
        let owned = mappings[0].iter().filter(|name| **name == bot.name).count();
        assert!(owned > 50, "backend {} owns {owned} of 1,000 keys", bot.name);
    }
}
