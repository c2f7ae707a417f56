//! The real binary's life (SIGTERM drain, exit codes), the admin listener under
//! hostile clients, and features otherwise untested: gRPC trailers after data,
//! `non_idempotent` retries, the `low` priority, interim responses to health
//! probes.

use std::process::Stdio;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::BodyExt;
use hyper::body::Frame;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::*;

#[tokio::test]
async fn sigterm_drains_in_flight_refuses_new_connections_and_exits_0() {
    let backend = Backend::start("a").await;
    let yaml = format!(
        "listeners: [{{ bind: \"127.0.0.1:{{port}}\" }}]\nlimits: {{ shutdown_grace: 20s }}\nroutes: [{{ upstream: pool }}]\nupstreams:\n  pool:\n    backends: [{{ address: \"{}\" }}]\n",
        backend.addr
    );
    let mut proxy = ProxyProcess::start(&yaml).await;
    let held = tokio::spawn({
        let url = proxy.url("/hold");
        async move { get(&client(), &url).await }
    });
    wait_until("the held request", Duration::from_secs(10), || backend.in_flight() == 1).await;
    proxy.signal(libc::SIGTERM);
    let addr = proxy.addr;
    wait_until("new connections to be refused", Duration::from_secs(20), || {
        std::net::TcpStream::connect(addr).is_err()
    })
    .await;
    assert!(proxy.child.try_wait().unwrap().is_none(), "the process waits for the in-flight request");
    backend.release_held();
    assert_eq!(held.await.unwrap().status, 200, "the in-flight request completed");
    let status = proxy.wait_for_exit(Duration::from_secs(20), "did not exit within the grace period").await;
    assert_eq!(status.code(), Some(0));
}

/// One HTTP/1.1 connection to `addr` and the task driving it, which ends when
/// the connection closes.
async fn kept_alive(
    addr: std::net::SocketAddr,
) -> (hyper::client::conn::http1::SendRequest<TestBody>, tokio::task::JoinHandle<()>) {
    let stream = TcpStream::connect(addr).await.unwrap();
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.unwrap();
    (sender, tokio::spawn(async move { drop(connection.await) }))
}

#[tokio::test]
async fn sigterm_closes_idle_connections_at_once_and_busy_ones_after_their_response() {
    let backend = Backend::start("a").await;
    // A grace far longer than the waits below: connections must be closed by
    // the drain itself, not when the grace runs out.
    let yaml = format!(
        "listeners: [{{ bind: \"127.0.0.1:{{port}}\" }}]\nlimits: {{ shutdown_grace: 120s, header_read_timeout: 120s, idle_timeout: 120s }}\nroutes: [{{ upstream: pool }}]\nupstreams:\n  pool:\n    backends: [{{ address: \"{}\" }}]\n",
        backend.addr
    );
    let mut proxy = ProxyProcess::start(&yaml).await;
    let (mut idle, idle_connection) = kept_alive(proxy.addr).await;
    let answer = idle.send_request(Request::get("/").header("host", "x").body(full("")).unwrap()).await.unwrap();
    assert_eq!(answer.status(), 200);
    answer.into_body().collect().await.unwrap();
    let (mut busy, busy_connection) = kept_alive(proxy.addr).await;
    let held = tokio::spawn(async move {
        let response = busy.send_request(Request::get("/hold").header("host", "x").body(full("")).unwrap()).await;
        let response = response.unwrap();
        let closing = response.headers().get("connection").is_some_and(|v| v == "close");
        (response.status(), closing)
    });
    wait_until("the held request", Duration::from_secs(10), || backend.in_flight() == 1).await;

    proxy.signal(libc::SIGTERM);
    tokio::time::timeout(Duration::from_secs(30), idle_connection)
        .await
        .expect("the idle kept-alive connection is closed by the drain")
        .unwrap();
    assert!(!busy_connection.is_finished(), "the busy connection stays for its response");
    backend.release_held();
    let (status, closing) = held.await.unwrap();
    assert_eq!(status, 200);
    assert!(closing, "the last response says the connection closes");
    tokio::time::timeout(Duration::from_secs(30), busy_connection)
        .await
        .expect("the busy connection closes after its response")
        .unwrap();
    let status = proxy.wait_for_exit(Duration::from_secs(30), "did not exit once its connections closed").await;
    assert_eq!(status.code(), Some(0));
}

#[tokio::test]
async fn a_listener_that_cannot_bind_exits_3() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("switchyard.yaml");
    let yaml = format!(
        "listeners: [{{ bind: \"127.0.0.1:{port}\" }}]\nroutes: [{{ upstream: pool }}]\nupstreams:\n  pool:\n    backends: [{{ address: \"127.0.0.1:1\" }}]\n"
    );
    std::fs::write(&path, with_test_admin(&yaml)).unwrap();
    let output = switchyard_for(&path).args(["run", "-c"]).arg(&path).stdin(Stdio::null()).output().unwrap();
    assert_eq!(output.status.code(), Some(3), "{}", String::from_utf8_lossy(&output.stderr));
}

/// CPU time (user + system) a process has used, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = stat.rsplit_once(')').unwrap().1.split_whitespace().collect();
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

#[tokio::test]
async fn out_of_file_descriptors_the_admin_listener_does_not_spin() {
    let admin_port = free_port();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("switchyard.yaml");
    let yaml = format!(
        "admin: {{ bind: \"127.0.0.1:{admin_port}\" }}\nlisteners: [{{ bind: \"127.0.0.1:0\" }}]\nroutes: [{{ upstream: pool }}]\nupstreams:\n  pool:\n    backends: [{{ address: \"127.0.0.1:1\" }}]\n"
    );
    std::fs::write(&path, yaml).unwrap();
    // A low descriptor limit, so that a few client connections exhaust it.
    let mut child = std::process::Command::new("sh")
        .env("XDG_RUNTIME_DIR", dir.path())
        .arg("-c")
        .arg(format!("ulimit -n 48 && exec {} run -c {}", env!("CARGO_BIN_EXE_switchyard"), path.display()))
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let admin: std::net::SocketAddr = format!("127.0.0.1:{admin_port}").parse().unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while TcpStream::connect(admin).await.is_err() {
        assert!(tokio::time::Instant::now() < deadline, "admin listener did not start");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Idle connections until the proxy can accept no more; the kernel still
    // completes handshakes into the backlog, so accept keeps failing (EMFILE).
    let mut idle = Vec::new();
    for _ in 0..80 {
        idle.push(TcpStream::connect(admin).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = cpu_ticks(child.id());
    tokio::time::sleep(Duration::from_secs(2)).await;
    let used = cpu_ticks(child.id()) - before;
    let _ = child.kill();
    let _ = child.wait();
    // A busy accept loop burns a whole core: ~200 ticks in 2 s at 100 Hz.
    assert!(used < 40, "the proxy used {used} ticks of CPU in 2 s while out of descriptors");
}

#[tokio::test]
async fn grpc_trailers_after_data_reach_the_client() {
    // A real HTTP/2 server answering like a gRPC server-streaming call that
    // fails after two messages: DATA, DATA, then trailers in their own frame.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let backend = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let service = hyper::service::service_fn(|_request| async {
                    let mut trailers = http::HeaderMap::new();
                    trailers.insert("grpc-status", "5".parse().unwrap());
                    trailers.insert("grpc-message", "job%20not%20found".parse().unwrap());
                    let frames = vec![
                        Ok::<_, std::convert::Infallible>(Frame::data(Bytes::from_static(b"\0\0\0\0\x02ab"))),
                        Ok(Frame::data(Bytes::from_static(b"\0\0\0\0\x02cd"))),
                        Ok(Frame::trailers(trailers)),
                    ];
                    let body = http_body_util::StreamBody::new(futures::stream::iter(frames));
                    let response =
                        http::Response::builder().header("content-type", "application/grpc").body(body).unwrap();
                    Ok::<_, std::convert::Infallible>(response)
                });
                let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    let yaml = format!(
        "listeners: [{{ bind: \"127.0.0.1:0\" }}]\nroutes: [{{ upstream: grpc }}]\nupstreams:\n  grpc:\n    protocol: h2c\n    backends: [{{ address: \"{backend}\" }}]\n"
    );
    let proxy = start_proxy(&yaml).await;
    let request = Request::post(proxy.url("/bots.Runner/Watch"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(full(Bytes::from_static(b"\0\0\0\0\0")))
        .unwrap();
    let response = h2c_client().request(request).await.unwrap();
    assert_eq!(response.status(), 200);
    assert!(response.headers().get("grpc-status").is_none(), "not a trailers-only response");
    let mut body = response.into_body();
    let (mut data, mut trailers) = (Vec::new(), None);
    while let Some(frame) = body.frame().await {
        let frame = frame.unwrap();
        if let Some(chunk) = frame.data_ref() {
            assert!(trailers.is_none(), "data after trailers");
            data.extend_from_slice(chunk);
        } else {
            trailers = frame.into_trailers().ok();
        }
    }
    assert_eq!(data, b"\0\0\0\0\x02ab\0\0\0\0\x02cd");
    let trailers = trailers.expect("trailers after the data");
    assert_eq!(trailers["grpc-status"], "5");
    assert_eq!(trailers["grpc-message"], "job%20not%20found");
}

#[tokio::test]
async fn non_idempotent_true_retries_a_post_that_reached_the_backend() {
    let (addr, requests) = resetting_backend().await;
    let yaml = format!(
        "listeners: [{{ bind: \"127.0.0.1:0\" }}]\nroutes:\n  - upstream: pool\n    retry: {{ attempts: 3, non_idempotent: true, backoff: {{ base: 1ms, max: 2ms }} }}\nupstreams:\n  pool:\n    backends: [{{ address: \"{addr}\" }}]\n"
    );
    let proxy = start_proxy(&yaml).await;
    let post = send(&client(), Request::post(proxy.url("/job")).body(full("again is fine")).unwrap()).await;
    assert_eq!((post.status.as_u16(), post.error_code()), (502, Some("upstream_reset")));
    assert_eq!(requests.load(Ordering::SeqCst), 3, "the operator allowed retrying the POST: sent 3 times");
}

#[tokio::test]
async fn low_priority_jobs_wait_for_normal_ones() {
    let bot = Backend::start("bot").await;
    let yaml = format!(
        "listeners: [{{ bind: \"127.0.0.1:0\" }}]\nroutes: [{{ upstream: bots }}]\nupstreams:\n  bots:\n    backends: [{{ address: \"{}\", max_concurrency: 1 }}]\n    queue: {{ max_waiting: 20, timeout: 30s, priority_header: x-priority }}\n",
        bot.addr
    );
    let proxy = start_proxy(&yaml).await;
    let admin = proxy.running.admin_addr().await;
    let waiting = || async move {
        let status = get(&client(), &format!("http://{admin}/status")).await;
        serde_json::from_str::<serde_json::Value>(&status.body).unwrap()["upstreams"][0]["queue_waiting"]
            .as_u64()
            .unwrap()
    };
    let send_job = |name: String, priority: &'static str| {
        // The first job holds the bot until every other job is queued.
        let url = proxy.url(if name == "first" { "/hold" } else { "/job?delay_ms=20" });
        tokio::spawn(async move {
            let request = Request::post(url).header("x-job-id", name).header("x-priority", priority).body(full(""));
            send(&client(), request.unwrap()).await
        })
    };
    let first = send_job("first".into(), "normal");
    wait_until("the first job", Duration::from_secs(10), || bot.hits() == 1).await;
    let mut jobs = vec![first];
    // Low jobs queue first, normal ones after them: the normal ones still go first.
    for i in 0..3 {
        jobs.push(send_job(format!("low-{i}"), "low"));
        let expected = i + 1;
        wait_until_async("the low job to queue", || async move { waiting().await >= expected }).await;
    }
    for i in 0..3 {
        jobs.push(send_job(format!("normal-{i}"), "normal"));
        let expected = i + 4;
        wait_until_async("the normal job to queue", || async move { waiting().await >= expected }).await;
    }
    bot.release_held();
    for job in jobs {
        assert_eq!(job.await.unwrap().status, 200);
    }
    let mut order = bot.stats.started.lock().unwrap().clone();
    order.sort();
    let names: Vec<String> = order.into_iter().map(|(_, name)| name).collect();
    assert_eq!(names.len(), 7);
    assert_eq!(&names[4..], ["low-0", "low-1", "low-2"], "low jobs ran last, in arrival order: {names:?}");
}

#[tokio::test]
async fn a_health_probe_skips_interim_responses() {
    // Answers every request with `100 Continue` and then the real status.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buffer = vec![0u8; 4096];
                let mut seen = Vec::new();
                loop {
                    match stream.read(&mut buffer).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => seen.extend_from_slice(&buffer[..n]),
                    }
                    while let Some(end) = seen.windows(4).position(|w| w == b"\r\n\r\n") {
                        seen.drain(..end + 4);
                        let reply = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                        if stream.write_all(reply).await.is_err() {
                            return;
                        }
                    }
                }
            });
        }
    });
    let yaml = format!(
        "listeners: [{{ bind: \"127.0.0.1:0\" }}]\nroutes: [{{ upstream: pool }}]\nupstreams:\n  pool:\n    backends: [{{ address: \"{addr}\" }}]\n    health:\n      active: {{ kind: http, path: /healthz, interval: 100ms, timeout: 100ms, healthy_after: 1, unhealthy_after: 1 }}\n"
    );
    let proxy = start_proxy(&yaml).await;
    let admin = proxy.running.admin_addr().await;
    let check = || async move {
        let status = get(&client(), &format!("http://{admin}/status")).await;
        serde_json::from_str::<serde_json::Value>(&status.body).unwrap()["upstreams"][0]["backends"][0]["active_check"]
            .clone()
    };
    wait_until_async("three probes", || async move { check().await["consecutive_passes"].as_u64() >= Some(3) }).await;
    let check = check().await;
    assert_eq!(check["consecutive_failures"], 0, "{check}");
    assert_eq!(check["last_reason"], "status 200", "{check}");
}

/// Open file descriptors of process `pid`.
fn open_descriptors(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |dir| dir.count())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_thousand_idle_admin_connections_leave_the_proxy_listener_its_descriptors() {
    let backend = Backend::start("bot").await;
    let (admin_port, port) = (free_port(), free_port());
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("switchyard.yaml");
    let yaml = PoolConfig::new(&[&backend]).on_port(port).yaml();
    std::fs::write(&path, format!("admin: {{ bind: \"127.0.0.1:{admin_port}\" }}\n{yaml}")).unwrap();
    // 256 descriptors: far fewer than the connections the admin is offered.
    let child = Killed(
        std::process::Command::new("sh")
            .env("XDG_RUNTIME_DIR", dir.path())
            .arg("-c")
            .arg(format!("ulimit -n 256 && exec {} run -c {}", env!("CARGO_BIN_EXE_switchyard"), path.display()))
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let (admin, proxy): (std::net::SocketAddr, std::net::SocketAddr) =
        (format!("127.0.0.1:{admin_port}").parse().unwrap(), format!("127.0.0.1:{port}").parse().unwrap());
    wait_until_async("the proxy to serve", || async { TcpStream::connect(proxy).await.is_ok() }).await;
    let base = open_descriptors(child.0.id());

    // 2,000 connections that send nothing: beyond what the admin takes, the
    // kernel's backlog holds them, and beyond that their SYNs wait.
    let idle: Vec<_> = (0..2000)
        .map(|_| {
            tokio::spawn(async move { tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(admin)).await })
        })
        .collect();
    let pid = child.0.id();
    wait_until("the admin to take connections", Duration::from_secs(30), || open_descriptors(pid) >= base + 32).await;
    let answer = tokio::time::timeout(Duration::from_secs(30), get(&client(), &format!("http://{proxy}/")))
        .await
        .expect("the proxy listener still accepts");
    assert_eq!(answer.status, 200);
    let held = open_descriptors(pid).saturating_sub(base);
    drop(child);
    drop(idle);
    // The admin holds at most its 64 places (the proxy's own request and
    // backend connection aside).
    assert!(held <= 64 + 8, "the admin took {held} descriptors");
}

#[tokio::test]
async fn a_signal_that_comes_while_the_proxy_starts_waits_for_it_instead_of_killing_it() {
    // A first DNS answer that is slow to come holds the start: the process
    // runs, but serves nothing yet.
    let bot = Backend::start("bot").await;
    let dns = crate::dns::DnsServer::start().await;
    dns.set_addresses("bots.test", &[bot.addr.ip()]);
    dns.set_delay(Duration::from_secs(1));
    let (port, admin) = (free_port(), free_port());
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("switchyard.yaml");
    let yaml = format!(
        "{}admin: {{ bind: \"127.0.0.1:{admin}\" }}\nlisteners: [{{ bind: \"127.0.0.1:{port}\" }}]\n\
         routes: [{{ upstream: bots }}]\nupstreams:\n  bots:\n    discovery: {{ dns: \"bots.test:{}\" }}\n",
        dns.resolver_yaml(),
        bot.addr.port()
    );
    std::fs::write(&path, yaml).unwrap();
    let child = switchyard_for(&path).args(["run", "-c"]).arg(&path).stderr(Stdio::null()).spawn().unwrap();
    let _child = Killed(child);
    wait_until("the start to ask DNS", Duration::from_secs(30), || dns.queries_for("bots.test") > 0).await;
    let pid = libc::pid_t::try_from(_child.0.id()).unwrap();
    // SAFETY: kill(2) on our own child, which has not been waited for.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGHUP) }, 0);
    // It starts all the same, then acts on the signal: a reload.
    wait_until_async("the proxy to serve", || async { TcpStream::connect(("127.0.0.1", port)).await.is_ok() }).await;
    assert_eq!(get(&client(), &format!("http://127.0.0.1:{port}/")).await.body, "bot");
    wait_until_async("the SIGHUP's reload", || async {
        let status = get(&client(), &format!("http://127.0.0.1:{admin}/status")).await.body;
        serde_json::from_str::<serde_json::Value>(&status).unwrap()["generation"] == 2
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigquit_drains_like_sigterm_and_a_second_stop_signal_cuts_the_drain_short() {
    let bot = Backend::start("bot").await;
    let yaml = PoolConfig::new(&[&bot]).on_chosen_port().limit("shutdown_grace", "30s").yaml();
    let client = client();
    let hold = |proxy: &ProxyProcess| {
        let (client, url) = (client.clone(), proxy.url("/hold"));
        tokio::spawn(async move { get(&client, &url).await })
    };

    // SIGUSR1 (logrotate's) does not stop it; SIGQUIT drains the held job, then exits 0.
    let mut proxy = ProxyProcess::start(&yaml).await;
    proxy.signal(libc::SIGUSR1);
    assert_eq!(get(&client, &proxy.url("/")).await.status, 200, "still serving after SIGUSR1");
    let held = hold(&proxy);
    wait_until("the held job", Duration::from_secs(30), || bot.in_flight() == 1).await;
    proxy.signal(libc::SIGQUIT);
    wait_until_async("the listener to close", || async { TcpStream::connect(proxy.addr).await.is_err() }).await;
    assert!(proxy.child.try_wait().unwrap().is_none(), "it waits for the held job");
    bot.release_held();
    assert_eq!(held.await.unwrap().status, 200);
    assert_eq!(proxy.wait_for_exit(Duration::from_secs(30), "SIGQUIT's drain").await.code(), Some(0));

    // A second stop signal during the drain exits at once, job or not (a
    // bot of its own: the first one now lets every job through).
    let bot = Backend::start("bot").await;
    let yaml = PoolConfig::new(&[&bot]).on_chosen_port().limit("shutdown_grace", "30s").yaml();
    let mut proxy = ProxyProcess::start(&yaml).await;
    let held = hold(&proxy);
    wait_until("the held job", Duration::from_secs(30), || bot.in_flight() == 1).await;
    proxy.signal(libc::SIGTERM);
    wait_until_async("the listener to close", || async { TcpStream::connect(proxy.addr).await.is_err() }).await;
    proxy.signal(libc::SIGTERM);
    let status = proxy.wait_for_exit(Duration::from_secs(20), "the second SIGTERM").await;
    assert_eq!(status.code(), Some(switchyard::app::exit::DRAIN_CUT_SHORT), "it did not wait for the job");
    // The held job's connection was cut (its client's helper panics on that).
    assert!(held.await.is_err());
    bot.release_held();
}
