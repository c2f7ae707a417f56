//! Hot reload: edits take effect without a restart, without a failed request,
//! and without losing what the proxy knows about its backends.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::support::*;

const POLICIES: [&str; 4] = [
    "{ policy: round_robin }",
    "{ policy: least_loaded }",
    "{ policy: random }",
    "{ policy: consistent_hash, key: \"header:x-job-id\" }",
];

fn generation_config(backends: &[&Backend], policy: &str, second_listener: Option<u16>) -> String {
    let list: String = backends.iter().map(|b| format!("      - {{ address: \"{}\" }}\n", b.addr)).collect();
    let second =
        second_listener.map_or(String::new(), |port| format!("  - {{ name: extra, bind: \"127.0.0.1:{port}\" }}\n"));
    format!(
        "listeners:\n  - {{ name: main, bind: \"127.0.0.1:0\" }}\n{second}routes: [{{ upstream: pool }}]\nupstreams:\n  pool:\n    balance: {policy}\n    backends:\n{list}"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_rewrites_under_steady_load_lose_no_request() {
    let backends: Vec<Backend> =
        futures::future::join_all((0..5).map(|i| async move { Backend::start(&format!("b{i}")).await })).await;
    let extra_port = free_port();
    let all: Vec<&Backend> = backends.iter().collect();
    let proxy = FileProxy::start(&generation_config(&all[..3], POLICIES[0], None)).await;

    // Steady load: four keep-alive clients for the whole test.
    let stop = Arc::new(AtomicBool::new(false));
    let (sent, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let mut load = Vec::new();
    for worker in 0..4 {
        let (stop, sent, failed, url) = (Arc::clone(&stop), Arc::clone(&sent), Arc::clone(&failed), proxy.url("/"));
        load.push(tokio::spawn(async move {
            let client = client();
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                i += 1;
                let request = http::Request::get(&url)
                    .header("x-job-id", format!("w{worker}-{}", i % 50))
                    .body(full(""))
                    .unwrap();
                match client.request(request).await {
                    Ok(response) if response.status() == 200 => {}
                    Ok(response) => {
                        eprintln!("steady request failed: {}", response.status());
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(error) => {
                        eprintln!("steady request failed: {error}");
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                }
                sent.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }

    let probe = client();
    let (mut generation, mut errors) = (1u64, 0u64);
    let mut extra_listening = false;
    for rewrite in 0..100 {
        if rewrite % 4 == 3 {
            // An invalid file: reported, and nothing changes.
            let broken = generation_config(&all[..2], "{ policy: fastest }", Some(extra_port));
            proxy.replace_config(&broken);
            errors += 1;
            proxy.wait_for_reload_errors(errors).await;
            assert_eq!(proxy.generation().await, generation, "a broken file changed the generation");
            continue;
        }
        let size = 2 + rewrite % 3;
        let chosen: Vec<&Backend> = (0..size).map(|k| &backends[(rewrite + k) % 5]).collect();
        let with_extra = rewrite % 2 == 1;
        let policy = POLICIES[rewrite % 4];
        proxy.replace_config(&generation_config(&chosen, policy, with_extra.then_some(extra_port)));
        generation += 1;
        proxy.wait_for_generation(generation).await;

        // Traffic now follows the new config: only the chosen backends answer.
        let names: HashSet<&str> = chosen.iter().map(|b| b.name.as_str()).collect();
        for k in 0..(3 * size) {
            let answer = get_with(&probe, &proxy.url("/"), &[("x-job-id", &format!("probe-{k}"))]).await;
            assert_eq!(answer.status, 200);
            assert!(
                names.contains(answer.body.as_str()),
                "rewrite {rewrite} ({policy}): {} answered, config has {names:?}",
                answer.body
            );
        }
        // The extra listener comes and goes with the config.
        let extra_url = format!("http://127.0.0.1:{extra_port}/");
        if with_extra {
            let answer = get_with(&client(), &extra_url, &[("x-job-id", "extra")]).await;
            assert!(names.contains(answer.body.as_str()), "extra listener answered {}", answer.body);
        } else if extra_listening {
            wait_until("the removed listener to close", Duration::from_secs(10), || {
                std::net::TcpStream::connect(("127.0.0.1", extra_port)).is_err()
            })
            .await;
        }
        extra_listening = with_extra;
    }

    stop.store(true, Ordering::Relaxed);
    for worker in load {
        worker.await.unwrap();
    }
    let (sent, failed) = (sent.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    eprintln!("{sent} requests during 100 rewrites ({} good, {errors} invalid), {failed} failed", generation - 1);
    assert_eq!(failed, 0);
    assert!(sent > 500, "the steady load kept going ({sent} requests)");
}

#[tokio::test]
async fn rename_replace_in_place_edit_and_kubernetes_symlink_swap_are_all_picked_up() {
    let [a, b, c] = [Backend::start("a").await, Backend::start("b").await, Backend::start("c").await];
    // Kubernetes ConfigMap layout: config -> ..data/config, ..data -> ..v1
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_path_buf();
    let write_version = |version: &str, backend: &Backend| {
        let version_dir = root.join(version);
        std::fs::create_dir_all(&version_dir).unwrap();
        std::fs::write(
            version_dir.join("switchyard.yaml"),
            with_test_admin(&generation_config(&[backend], POLICIES[0], None)),
        )
        .unwrap();
    };
    write_version("..v1", &a);
    std::os::unix::fs::symlink("..v1", root.join("..data")).unwrap();
    std::os::unix::fs::symlink("..data/switchyard.yaml", root.join("switchyard.yaml")).unwrap();
    let path = root.join("switchyard.yaml");
    let proxy = FileProxy::start_at(dir, path.clone()).await;
    let client = client();
    assert_eq!(get(&client, &proxy.url("/")).await.body, "a");

    // Kubernetes swaps ..data atomically: new symlink, renamed over the old one.
    write_version("..v2", &b);
    std::os::unix::fs::symlink("..v2", proxy.dir.path().join("..data_tmp")).unwrap();
    std::fs::rename(proxy.dir.path().join("..data_tmp"), proxy.dir.path().join("..data")).unwrap();
    proxy.wait_for_generation(2).await;
    assert_eq!(get(&client, &proxy.url("/")).await.body, "b");

    // An editor's rename-replace of the file (the symlink is replaced by a plain file).
    proxy.replace_config(&generation_config(&[&c], POLICIES[0], None));
    proxy.wait_for_generation(3).await;
    assert_eq!(get(&client, &proxy.url("/")).await.body, "c");

    // An in-place edit (truncate and write).
    std::fs::write(&path, with_test_admin(&generation_config(&[&a], POLICIES[0], None))).unwrap();
    proxy.wait_for_generation(4).await;
    assert_eq!(get(&client, &proxy.url("/")).await.body, "a");

    // Touching the file without changing it is not a reload: the watcher sees
    // the event, reads the file, and finds nothing to do.
    let unchanged = proxy.status().await["reloads"]["unchanged"].as_u64().unwrap();
    let text = std::fs::read(&path).unwrap();
    std::fs::write(&path, text).unwrap();
    let status = &proxy;
    wait_until_async("the watcher to look at the touched file", || async {
        status.status().await["reloads"]["unchanged"].as_u64().unwrap() > unchanged
    })
    .await;
    assert_eq!(proxy.generation().await, 4, "a touch did not reload");
    assert_eq!(proxy.post_reload().await.status, 200, "an explicit reload still works");
    assert_eq!(proxy.generation().await, 5);
}

#[tokio::test]
async fn a_request_in_flight_finishes_after_a_reload_removes_its_backend() {
    let [slow, other] = [Backend::start("slow").await, Backend::start("other").await];
    let proxy = FileProxy::start(&generation_config(&[&slow], POLICIES[0], None)).await;
    let client = client();
    let held = tokio::spawn({
        let (client, url) = (client.clone(), proxy.url("/?delay_ms=3000"));
        async move { get(&client, &url).await }
    });
    wait_until("the slow request to start", Duration::from_secs(10), || slow.in_flight() == 1).await;
    proxy.replace_config(&generation_config(&[&other], POLICIES[1], None));
    proxy.wait_for_generation(2).await;
    assert_eq!(get(&client, &proxy.url("/")).await.body, "other", "new requests go to the new backend");
    assert!(!held.is_finished(), "the slow request was still in flight during the reload");
    let answer = held.await.unwrap();
    assert_eq!((answer.status.as_u16(), answer.body.as_str()), (200, "slow"));
}

#[tokio::test]
async fn an_invalid_file_changes_nothing_and_says_where_it_is_wrong() {
    let a = Backend::start("a").await;
    let proxy = FileProxy::start(&generation_config(&[&a], POLICIES[0], None)).await;
    std::fs::write(
        &proxy.path,
        with_test_admin(&generation_config(&[&a], POLICIES[0], None)).edit("balance:", "balanse:"),
    )
    .unwrap();
    let answer = proxy.post_reload().await;
    assert_eq!(answer.status, 400);
    let expected = format!("{}:", proxy.path.display());
    assert!(answer.body.starts_with(&expected) && answer.body.contains("unknown field `balanse`"), "{}", answer.body);
    let status = proxy.status().await;
    assert_eq!(status["generation"], 1);
    assert!(status["reloads"]["last_error"].as_str().unwrap().contains("balanse"));
    assert_eq!(get(&client(), &proxy.url("/")).await.body, "a", "the old config still serves");
}

#[tokio::test]
async fn backend_state_survives_a_reload_that_keeps_the_backend() {
    let [a, b] = [Backend::start("a").await, Backend::start("b").await];
    let two = |policy: &str| {
        format!(
            "listeners: [{{ bind: \"127.0.0.1:0\" }}]\nroutes: [{{ upstream: pool }}]\nupstreams:\n  pool:\n    balance: {policy}\n    backends:\n      - {{ address: \"{}\", max_concurrency: 1 }}\n      - {{ address: \"{}\", max_concurrency: 1 }}\n",
            a.addr, b.addr
        )
    };
    let proxy = FileProxy::start(&two(POLICIES[0])).await;
    let client = client();
    // Occupy backend a's only slot, then reload with another policy.
    let held = tokio::spawn({
        let (client, url) = (client.clone(), proxy.url("/hold"));
        async move { get(&client, &url).await }
    });
    wait_until("a to be busy", Duration::from_secs(10), || a.in_flight() == 1).await;
    for _ in 0..5 {
        assert_eq!(get(&client, &proxy.url("/")).await.body, "b");
    }
    proxy.replace_config(&two(POLICIES[2]));
    proxy.wait_for_generation(2).await;
    let status = proxy.status().await;
    let backends = status["upstreams"][0]["backends"].as_array().unwrap();
    let a_status = backends.iter().find(|x| x["address"] == a.addr.to_string()).unwrap();
    assert_eq!(a_status["in_flight"], 1, "the in-flight count was carried over");
    assert!(
        backends.iter().find(|x| x["address"] == b.addr.to_string()).unwrap()["latency_ms"].is_number(),
        "the latency estimate was carried over"
    );
    // The carried count still blocks the full backend under the new policy.
    for _ in 0..20 {
        assert_eq!(get(&client, &proxy.url("/")).await.body, "b");
    }
    a.release_held();
    assert_eq!(held.await.unwrap().status, 200);
    // Released: its slot is free again for the new snapshot's policy.
    wait_until("a to be idle", Duration::from_secs(10), || a.in_flight() == 0).await;
    let url = proxy.url("/");
    let answers = futures::future::join_all((0..20).map(|_| get(&client, &url))).await;
    let names: HashSet<String> = answers.into_iter().map(|a| a.body).collect();
    assert!(names.contains("a"), "a takes requests again: {names:?}");
}

#[tokio::test]
async fn sighup_reloads_and_reload_results_are_counted_in_metrics() {
    let [a, b] = [Backend::start("a").await, Backend::start("b").await];
    let admin_port = free_port();
    let config = |backend: &Backend| {
        format!(
            "admin: {{ bind: \"127.0.0.1:{admin_port}\" }}\nlisteners: [{{ bind: \"127.0.0.1:{{port}}\" }}]\nroutes: [{{ upstream: pool }}]\nupstreams:\n  pool:\n    backends: [{{ address: \"{}\" }}]\n",
            backend.addr
        )
    };
    let proxy = ProxyProcess::start(&config(&a)).await;
    let metrics_url = format!("http://127.0.0.1:{admin_port}/metrics");
    let status_url = format!("http://127.0.0.1:{admin_port}/status");
    let generation = || async {
        serde_json::from_str::<serde_json::Value>(&get(&client(), &status_url).await.body).unwrap()["generation"]
            .as_u64()
            .unwrap()
    };
    assert_eq!(metric_value(&scrape(&metrics_url).await, "switchyard_config_generation", &[]), Some(1.0));

    // SIGHUP reloads even an unchanged file.
    proxy.signal(libc::SIGHUP);
    wait_until_async("generation 2 after SIGHUP", || async { generation().await == 2 }).await;

    // A broken file is refused and counted; the good one after it is applied.
    let port = proxy.addr.port().to_string();
    std::fs::write(&proxy.path, config(&b).replace("{port}", &port).edit("backends:", "backendz:")).unwrap();
    proxy.signal(libc::SIGHUP);
    wait_until_async("the error to be counted", || async {
        metric_value(&scrape(&metrics_url).await, "switchyard_config_reloads_total", &[("result", "error")]).is_some()
    })
    .await;
    assert_eq!(generation().await, 2);
    assert_eq!(get(&client(), &proxy.url("/")).await.body, "a");
    std::fs::write(&proxy.path, config(&b).replace("{port}", &port)).unwrap();
    wait_until_async("generation 3", || async { generation().await == 3 }).await;
    assert_eq!(get(&client(), &proxy.url("/")).await.body, "b");

    let scrape = scrape(&metrics_url).await;
    assert_eq!(metric_value(&scrape, "switchyard_config_generation", &[]), Some(3.0));
    assert_eq!(metric_value(&scrape, "switchyard_config_reloads_total", &[("result", "success")]), Some(2.0));
    assert!(metric_value(&scrape, "switchyard_config_reloads_total", &[("result", "error")]).unwrap() >= 1.0);
}
