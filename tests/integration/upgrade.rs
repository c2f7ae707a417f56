//! Zero-downtime binary upgrades (`switchyard run --upgrade`): real processes
//! hand their listening sockets over under load, and no client sees a failure.

use std::process::{Child, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::Request;

use crate::support::*;

/// `switchyard run -c PATH --upgrade`, taking over from the process serving PATH.
fn upgrade(config: &std::path::Path) -> Child {
    switchyard_for(config)
        .args(["run", "--upgrade", "-c"])
        .arg(config)
        .stderr(Stdio::null())
        .spawn()
        .expect("switchyard binary runs")
}

async fn exit_of(child: &mut Child, why: &str) -> std::process::ExitStatus {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(tokio::time::Instant::now() < deadline, "{why}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Clients until stopped: `keep_alive` of them reuse connections, `fresh` of
/// them open a new connection for every request.
struct Load {
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicUsize>,
    failures: Arc<Mutex<Vec<String>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    fn start(url: String, keep_alive: usize, fresh: usize) -> Load {
        let (stop, sent): (Arc<AtomicBool>, Arc<AtomicUsize>) = (Arc::default(), Arc::default());
        let failures: Arc<Mutex<Vec<String>>> = Arc::default();
        let tasks = (0..keep_alive + fresh)
            .map(|i| {
                let (stop, sent, failures, url) =
                    (Arc::clone(&stop), Arc::clone(&sent), Arc::clone(&failures), url.clone());
                tokio::spawn(async move {
                    let client = client();
                    while !stop.load(Ordering::Relaxed) {
                        let mut request = Request::get(&url);
                        if i >= keep_alive {
                            request = request.header("connection", "close");
                        }
                        // A connection queued where nothing accepts it would hang, not fail.
                        let answer = tokio::time::timeout(
                            Duration::from_secs(20),
                            send(&client, request.body(full("")).unwrap()),
                        )
                        .await;
                        sent.fetch_add(1, Ordering::Relaxed);
                        match answer {
                            Ok(answer) if answer.status == 200 => {}
                            Ok(answer) => failures.lock().unwrap().push(format!("{} {}", answer.status, answer.body)),
                            Err(_) => failures.lock().unwrap().push("no answer within 20 s".to_owned()),
                        }
                    }
                })
            })
            .collect();
        Load { stop, sent, failures, tasks }
    }

    fn sent(&self) -> usize {
        self.sent.load(Ordering::Relaxed)
    }

    async fn finish_without_failures(self) -> usize {
        self.stop.store(true, Ordering::Relaxed);
        for task in self.tasks {
            task.await.unwrap();
        }
        let sent = self.sent.load(Ordering::Relaxed);
        assert_no_failures(sent, &self.failures.lock().unwrap());
        sent
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_upgrades_under_steady_load_lose_no_request_and_each_old_process_exits_0() {
    let (a, b) = (Backend::start("a").await, Backend::start("b").await);
    let yaml = PoolConfig::new(&[&a, &b])
        .balance("{ policy: round_robin }")
        .on_chosen_port()
        .limit("shutdown_grace", "10s")
        .yaml();
    let mut proxy = ProxyProcess::start(&yaml).await;
    let load = Load::start(proxy.url("/"), 4, 2);
    for round in 1..=10 {
        let before = load.sent();
        wait_until("traffic", Duration::from_secs(30), || load.sent() > before + 50).await;
        let mut old = std::mem::replace(&mut proxy.child, upgrade(&proxy.path));
        let status = exit_of(&mut old, &format!("upgrade {round}: the old process never exited")).await;
        assert_eq!(status.code(), Some(0), "upgrade {round}: the old process exits 0");
        assert!(proxy.child.try_wait().unwrap().is_none(), "upgrade {round}: the new process serves");
    }
    let before = load.sent();
    wait_until("traffic after the last upgrade", Duration::from_secs(30), || load.sent() > before + 50).await;
    let sent = load.finish_without_failures().await;
    eprintln!("10 upgrades, {sent} requests, none failed");

    // The last process owns the upgrade socket, and removes it when it stops.
    // In $XDG_RUNTIME_DIR/switchyard, the config's directory here (`switchyard_for`).
    let name = switchyard::upgrade::socket_path(&proxy.path).file_name().unwrap().to_owned();
    let socket = proxy.path.parent().unwrap().join("switchyard").join(name);
    assert!(socket.exists(), "{} is where the next upgrade finds this process", socket.display());
    proxy.signal(libc::SIGTERM);
    assert_eq!(proxy.wait_for_exit(Duration::from_secs(60), "SIGTERM").await.code(), Some(0));
    assert!(!socket.exists(), "a stopped process leaves no socket file behind");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_waiting_in_the_listen_queue_at_the_hand_over_are_served() {
    // One worker with room for one connection: the bot's job holds it, and the
    // next connections wait in the kernel's queue while the upgrade happens.
    // Handed-over sockets keep that queue; a new socket beside the old one
    // would leave them to be reset when the old one closed.
    let bot = Backend::start("bot").await;
    let yaml = PoolConfig::new(&[&bot])
        .on_chosen_port()
        .workers(1)
        .limit("max_connections", 1)
        .limit("shutdown_grace", "30s")
        .yaml();
    let mut proxy = ProxyProcess::start(&yaml).await;
    let held = {
        let url = proxy.url("/hold");
        tokio::spawn(async move { get(&client(), &url).await })
    };
    wait_until("the held job", Duration::from_secs(10), || bot.in_flight() == 1).await;
    let queued: Vec<_> = (0..10)
        .map(|_| {
            let url = proxy.url("/");
            tokio::spawn(async move {
                let request = Request::get(&url).header("connection", "close").body(full("")).unwrap();
                send(&client(), request).await
            })
        })
        .collect();
    // Their connections are established (by the kernel) and their requests sent.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(bot.hits(), 1, "the queued requests are still waiting");

    let mut old = std::mem::replace(&mut proxy.child, upgrade(&proxy.path));
    for request in queued {
        let answer = request.await.unwrap();
        assert_eq!(answer.status, 200, "a queued connection was lost: {}", answer.body);
    }
    assert_eq!(bot.hits(), 11);
    bot.release_held();
    assert_eq!(held.await.unwrap().status, 200, "the old process finished the job it had");
    assert_eq!(exit_of(&mut old, "the old process never exited").await.code(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_process_that_fails_leaves_the_old_one_serving() {
    let bot = Backend::start("bot").await;
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let yaml = PoolConfig::new(&[&bot]).on_chosen_port().yaml();
    let mut proxy = ProxyProcess::start(&yaml).await;

    // A plain second `run` of the same config refuses: the first one serves it.
    let second = switchyard_for(&proxy.path).args(["run", "-c"]).arg(&proxy.path).output().unwrap();
    assert_eq!(second.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&second.stderr).contains("use --upgrade"));

    // The new binary's config asks for a port that is taken: it fails after
    // receiving the sockets, before it serves.
    let good = std::fs::read_to_string(&proxy.path).unwrap();
    let broken = good.edit(
        "listeners:\n",
        &format!("listeners:\n  - {{ name: extra, bind: \"{}\" }}\n", taken.local_addr().unwrap()),
    );
    std::fs::write(&proxy.path, &broken).unwrap();
    let mut failed = upgrade(&proxy.path);
    assert_eq!(exit_of(&mut failed, "the failing new process never exited").await.code(), Some(3));
    std::fs::write(&proxy.path, &good).unwrap();
    assert!(proxy.child.try_wait().unwrap().is_none(), "the old process still runs");
    for _ in 0..20 {
        assert_eq!(get(&client(), &proxy.url("/")).await.status, 200, "and still serves");
    }

    // A later upgrade works.
    let mut old = std::mem::replace(&mut proxy.child, upgrade(&proxy.path));
    assert_eq!(exit_of(&mut old, "the old process never exited").await.code(), Some(0));
    assert_eq!(get(&client(), &proxy.url("/")).await.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_binary_with_another_worker_count_serves_every_inherited_socket() {
    // Two workers hand over two sockets per listener: a successor with one
    // worker must accept on both (the kernel spreads new connections over
    // them), and one with three binds a third beside them.
    let bot = Backend::start("bot").await;
    let yaml = |workers: usize| PoolConfig::new(&[&bot]).on_chosen_port().workers(workers).yaml();
    let mut proxy = ProxyProcess::start(&yaml(2)).await;
    let port = proxy.addr.port().to_string();
    let load = Load::start(proxy.url("/"), 2, 4);
    let mut previous = 2;
    for workers in [1, 3, 2] {
        let config = std::fs::read_to_string(&proxy.path).unwrap();
        let changed = config.edit(&format!("workers: {previous}"), &format!("workers: {workers}"));
        assert!(changed.contains(&format!("workers: {workers}")) && changed.contains(&port));
        previous = workers;
        std::fs::write(&proxy.path, changed).unwrap();
        let before = load.sent();
        wait_until("traffic", Duration::from_secs(30), || load.sent() > before + 100).await;
        let mut old = std::mem::replace(&mut proxy.child, upgrade(&proxy.path));
        assert_eq!(exit_of(&mut old, "the old process never exited").await.code(), Some(0));
        let before = load.sent();
        wait_until("traffic after the upgrade", Duration::from_secs(30), || load.sent() > before + 200).await;
    }
    load.finish_without_failures().await;
}

/// The one socket file in `directory`.
fn socket_in(directory: &std::path::Path) -> std::path::PathBuf {
    let sockets: Vec<_> = std::fs::read_dir(directory)
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.extension().is_some_and(|e| e == "sock"))
        .collect();
    assert_eq!(sockets.len(), 1, "{sockets:?}");
    sockets[0].clone()
}

fn mode(path: &std::path::Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::symlink_metadata(path).unwrap().permissions().mode() & 0o777
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_upgrade_socket_is_the_users_alone_and_a_shared_directory_is_refused() {
    let bot = Backend::start("bot").await;
    let yaml = PoolConfig::new(&[&bot]).on_chosen_port().yaml();
    let proxy = ProxyProcess::start(&yaml).await;
    // XDG_RUNTIME_DIR is the config's directory (see `switchyard_for`).
    let directory = proxy.path.parent().unwrap().join("switchyard");
    wait_until("the upgrade socket", Duration::from_secs(30), || {
        directory.exists() && std::fs::read_dir(&directory).unwrap().count() == 1
    })
    .await;
    assert_eq!(mode(&directory), 0o700, "only its user may enter the directory");
    assert_eq!(mode(&socket_in(&directory)), 0o600, "only its user may connect");
    drop(proxy);

    // A directory others may write to is not used: the proxy serves, says
    // why it does not listen for upgrades, and makes no socket there.
    let dir = tempfile::tempdir().unwrap();
    let (config, log) = (dir.path().join("switchyard.yaml"), dir.path().join("log"));
    let port = free_port();
    std::fs::write(&config, with_test_admin(&yaml.replace("{port}", &port.to_string()))).unwrap();
    let shared = dir.path().join("switchyard");
    std::fs::create_dir(&shared).unwrap();
    std::fs::set_permissions(&shared, std::os::unix::fs::PermissionsExt::from_mode(0o777)).unwrap();
    let _proxy = LoggingProxy::start(&config, &log);
    let line = wait_for_log_line(&log, "not private").await;
    assert!(line.contains("mode is 777"), "{line}");
    // The line comes before the listeners are bound.
    wait_until_async("the proxy to listen", || async {
        tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_ok()
    })
    .await;
    let answer = get(&client(), &format!("http://127.0.0.1:{port}/")).await;
    assert_eq!(answer.status, 200, "it serves all the same");
    assert_eq!(std::fs::read_dir(&shared).unwrap().count(), 0, "no socket in a shared directory");
}

/// Whether this test process may act as another user (it runs as root).
fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_socket_squatted_by_another_user_does_not_keep_the_proxy_down() {
    if !is_root() {
        // Making a second user's socket needs root; the private directory
        // (checked above) is what keeps other users out in the first place.
        eprintln!("skipped: not root, so no second user to squat with");
        return;
    }
    let bot = Backend::start("bot").await;
    let dir = tempfile::tempdir().unwrap();
    let shared = dir.path().join("shared");
    std::fs::create_dir(&shared).unwrap();
    std::fs::set_permissions(&shared, std::os::unix::fs::PermissionsExt::from_mode(0o777)).unwrap();
    let socket = shared.join("upgrade.sock");
    // User 65534 (nobody) listens on the path first.
    let script = format!(
        "import os, socket, sys, time\nos.setgid(65534)\nos.setuid(65534)\ns = socket.socket(socket.AF_UNIX)\ns.bind({:?})\ns.listen(8)\nprint('listening', flush=True)\ntime.sleep(600)\n",
        socket.display().to_string()
    );
    let mut squatter = Killed(python().arg("-c").arg(script).stdout(Stdio::piped()).spawn().unwrap());
    let mut said = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(squatter.0.stdout.take().unwrap()), &mut said).unwrap();
    assert_eq!(said.trim(), "listening");

    let (config, log) = (dir.path().join("switchyard.yaml"), dir.path().join("log"));
    let port = free_port();
    let yaml = PoolConfig::new(&[&bot]).on_port(port).yaml();
    std::fs::write(&config, with_test_admin(&yaml)).unwrap();
    let _proxy = Killed(
        switchyard_for(&config)
            .args(["run", "--upgrade-socket"])
            .arg(&socket)
            .arg("-c")
            .arg(&config)
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap(),
    );
    let line = wait_for_log_line(&log, "squats").await;
    assert!(line.contains("user 65534"), "{line}");
    // Logged before the proxy listens: its listeners are bound once it says
    // where the admin listener is.
    wait_for_log_line(&log, "admin listening").await;
    let answer = get(&client(), &format!("http://127.0.0.1:{port}/")).await;
    assert_eq!(answer.status, 200, "the squatter did not keep the proxy down");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigusr2_starts_the_process_that_takes_over_under_load_and_leaves_one() {
    let (a, b) = (Backend::start("a").await, Backend::start("b").await);
    let yaml = PoolConfig::new(&[&a, &b])
        .balance("{ policy: round_robin }")
        .on_chosen_port()
        .limit("shutdown_grace", "10s")
        .yaml();
    let mut proxy = ProxyProcess::start(&yaml).await;
    let config = std::path::absolute(&proxy.path).unwrap();
    let _successor = KillOnDrop(config.clone());
    let load = Load::start(proxy.url("/"), 4, 2);
    wait_until("traffic", Duration::from_secs(30), || load.sent() > 50).await;
    // nginx's habit: USR2 upgrades. The process starts its own executable
    // with `run --upgrade`, which takes the sockets over; the old one drains.
    proxy.signal(libc::SIGUSR2);
    let status = proxy.wait_for_exit(Duration::from_secs(60), "the old process to hand over and exit").await;
    assert_eq!(status.code(), Some(0));
    let before = load.sent();
    wait_until("traffic after the upgrade", Duration::from_secs(30), || load.sent() > before + 50).await;
    let sent = load.finish_without_failures().await;
    eprintln!("SIGUSR2 upgrade, {sent} requests, none failed");
    let serving = processes_of(&config);
    assert_eq!(serving.len(), 1, "one process serves the config: {serving:?}");
    // The successor is not our child: stop it by its pid, as an operator would.
    // SAFETY: kill(2) on the process this test's proxy started.
    assert_eq!(unsafe { libc::kill(serving[0], libc::SIGTERM) }, 0);
    wait_until("the successor to exit", Duration::from_secs(30), || processes_of(&config).is_empty()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_hand_over_one_stop_signal_lets_the_old_process_finish_its_jobs() {
    // What `systemctl stop` does in the middle of an upgrade: SIGTERM to
    // every process of the unit, the old one draining among them. That is
    // the first stop signal the old one gets; it must not cut the drain.
    let bot = Backend::start("bot").await;
    let yaml =
        PoolConfig::new(&[&bot]).on_chosen_port().limit("shutdown_grace", "30s").log("{ file: events.log }").yaml();
    let mut proxy = ProxyProcess::start(&yaml).await;
    let config = std::path::absolute(&proxy.path).unwrap();
    let _successor = KillOnDrop(config.clone());
    let events = proxy.path.with_file_name("events.log");
    let held = {
        let (client, url) = (client(), proxy.url("/hold"));
        tokio::spawn(async move { get(&client, &url).await })
    };
    wait_until("the held job", Duration::from_secs(30), || bot.in_flight() == 1).await;
    proxy.signal(libc::SIGUSR2);
    wait_until("the hand-over", Duration::from_secs(60), || {
        std::fs::read_to_string(&events).is_ok_and(|log| log.contains("the new process serves; draining and exiting"))
    })
    .await;
    proxy.signal(libc::SIGTERM);
    wait_until("the old process to hear the SIGTERM", Duration::from_secs(30), || {
        std::fs::read_to_string(&events).is_ok_and(|log| log.contains("already draining after a hand-over"))
    })
    .await;
    assert!(proxy.child.try_wait().unwrap().is_none(), "one SIGTERM cut the old process's drain");
    bot.release_held();
    assert_eq!(held.await.unwrap().status, 200, "the job finished");
    assert_eq!(proxy.wait_for_exit(Duration::from_secs(30), "the old drain").await.code(), Some(0));
    for pid in processes_of(&config) {
        // SAFETY: kill(2) on the successor serving this test's config.
        unsafe { libc::kill(pid, libc::SIGTERM) };
    }
    wait_until("the successor to exit", Duration::from_secs(30), || processes_of(&config).is_empty()).await;
}
