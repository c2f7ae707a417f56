//! Test harness: real backends and the real proxy on loopback, ephemeral ports.
//!
//! [`Backend`] is a small HTTP server (HTTP/1.1 and h2c) whose behaviour each
//! request chooses through its query string, and which records what it saw: hits,
//! concurrent requests (current and peak), and the last request's headers.
//! [`start_proxy`] runs Switchyard in-process from a YAML string.

#![allow(dead_code)]

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{combinators::UnsyncBoxBody, BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::{TokioExecutor, TokioIo};
use switchyard::app::RunningProxy;
use tokio::net::TcpListener;
use tokio::sync::Notify;

pub type TestBody = UnsyncBoxBody<Bytes, Box<dyn std::error::Error + Send + Sync>>;

#[derive(Default)]
pub struct BackendStats {
    pub hits: AtomicUsize,
    pub in_flight: AtomicUsize,
    pub peak_in_flight: AtomicUsize,
    pub bytes_received: AtomicU64,
    pub last_headers: Mutex<Option<http::HeaderMap>>,
    /// The target (path and query) of the last request, as it arrived.
    pub last_target: Mutex<Option<String>>,
    /// Requests to `/hold` wait until this is notified (or `release_all` is set).
    pub release: Notify,
    pub release_all: AtomicBool,
    /// Added to every request's latency, in milliseconds.
    pub base_delay_ms: AtomicU64,
    /// When nonzero, every request (health checks aside) gets this status.
    pub fail_with: std::sync::atomic::AtomicU16,
    /// Status for `GET /healthz`; 0 means 200.
    pub health_status: std::sync::atomic::AtomicU16,
    pub health_checks: AtomicUsize,
    /// When each request started, with its `x-job-id`.
    pub started: Mutex<Vec<(std::time::Instant, String)>>,
    /// TCP connections accepted.
    pub connections: AtomicUsize,
}

pub struct Backend {
    pub name: String,
    pub addr: SocketAddr,
    pub stats: Arc<BackendStats>,
    task: tokio::task::JoinHandle<()>,
    /// Tells connection tasks to drop their connections (see [`Backend::kill`]).
    kill: tokio::sync::watch::Sender<bool>,
}

impl Backend {
    pub async fn start(name: &str) -> Backend {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        Self::serve(name, listener)
    }

    /// Serves on an already bound listener (to restart a backend on its old port).
    pub fn serve(name: &str, listener: TcpListener) -> Backend {
        let addr = listener.local_addr().unwrap();
        let stats = Arc::new(BackendStats::default());
        let name_owned = name.to_owned();
        let (kill, killed) = tokio::sync::watch::channel(false);
        let task = {
            let stats = Arc::clone(&stats);
            let name: Arc<str> = name.into();
            tokio::spawn(async move {
                loop {
                    let Ok((stream, _)) = listener.accept().await else { continue };
                    stats.connections.fetch_add(1, Ordering::SeqCst);
                    let (stats, name, mut killed) = (Arc::clone(&stats), Arc::clone(&name), killed.clone());
                    tokio::spawn(async move {
                        let service = hyper::service::service_fn(move |request| {
                            handle(Arc::clone(&name), Arc::clone(&stats), request)
                        });
                        let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                        let connection = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
                        tokio::select! {
                            _ = connection => {}
                            _ = killed.wait_for(|k| *k) => {}
                        }
                    });
                }
            })
        };
        Backend { name: name_owned, addr, stats, task, kill }
    }

    /// Like a crashed process: the port refuses connections and every open
    /// connection is dropped.
    pub fn kill(&self) {
        self.task.abort();
        let _ = self.kill.send(true);
    }

    /// A new server on the same port, as a restarted process would be.
    pub async fn restart(&self) -> Backend {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            match TcpListener::bind(self.addr).await {
                Ok(listener) => return Backend::serve(&self.name, listener),
                Err(error) => {
                    assert!(tokio::time::Instant::now() < deadline, "cannot rebind {}: {error}", self.addr);
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }
    }

    pub fn hits(&self) -> usize {
        self.stats.hits.load(Ordering::SeqCst)
    }

    pub fn in_flight(&self) -> usize {
        self.stats.in_flight.load(Ordering::SeqCst)
    }

    pub fn set_delay(&self, delay: Duration) {
        self.stats.base_delay_ms.store(delay.as_millis() as u64, Ordering::SeqCst);
    }

    pub fn release_held(&self) {
        self.stats.release_all.store(true, Ordering::SeqCst);
        self.stats.release.notify_waiters();
    }

    /// Stops accepting new connections (existing ones finish).
    pub fn stop(&self) {
        self.task.abort();
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.kill();
    }
}

struct InFlight<'a>(&'a BackendStats);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

fn query_param<'a>(request: &'a Request<Incoming>, name: &str) -> Option<&'a str> {
    request.uri().query()?.split('&').find_map(|pair| {
        let (key, value) = pair.split_once('=')?;
        (key == name).then_some(value)
    })
}

/// Behaviour by path: `.../mimics-the-proxy` answers 200 with an
/// `x-switchyard-error` header; `/hold` waits for release; `/download?bytes=N` streams N
/// bytes; `/status?code=N` answers N; anything else answers with the backend's
/// name after `?delay_ms=N`. Every request body is read and counted, streaming.
async fn handle(
    name: Arc<str>,
    stats: Arc<BackendStats>,
    request: Request<Incoming>,
) -> Result<Response<TestBody>, Infallible> {
    if request.uri().path() == "/healthz" {
        stats.health_checks.fetch_add(1, Ordering::SeqCst);
        let mut response = Response::new(full("ok"));
        let status = stats.health_status.load(Ordering::SeqCst);
        if status != 0 {
            *response.status_mut() = StatusCode::from_u16(status).unwrap();
        }
        return Ok(response);
    }
    stats.hits.fetch_add(1, Ordering::SeqCst);
    let job = request.headers().get("x-job-id").and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
    stats.started.lock().unwrap().push((std::time::Instant::now(), job));
    let now = stats.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
    stats.peak_in_flight.fetch_max(now, Ordering::SeqCst);
    let _in_flight = InFlight(&stats);
    *stats.last_headers.lock().unwrap() = Some(request.headers().clone());
    *stats.last_target.lock().unwrap() = request.uri().path_and_query().map(|target| target.to_string());

    let path = request.uri().path().to_owned();
    let delay = query_param(&request, "delay_ms").and_then(|d| d.parse().ok()).unwrap_or(0)
        + stats.base_delay_ms.load(Ordering::SeqCst);
    let status = query_param(&request, "code").and_then(|c| c.parse::<u16>().ok()).or_else(|| {
        let forced = stats.fail_with.load(Ordering::SeqCst);
        (forced != 0).then_some(forced)
    });
    let download = query_param(&request, "bytes").and_then(|b| b.parse::<u64>().ok());

    let mut body = request.into_body();
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(frame) => {
                if let Some(data) = frame.data_ref() {
                    stats.bytes_received.fetch_add(data.len() as u64, Ordering::SeqCst);
                }
            }
            Err(_) => break,
        }
    }
    if delay > 0 {
        tokio::time::sleep(Duration::from_millis(delay)).await;
    }
    if path.ends_with("/hold") {
        while !stats.release_all.load(Ordering::SeqCst) {
            let notified = stats.release.notified();
            if stats.release_all.load(Ordering::SeqCst) {
                break;
            }
            notified.await;
        }
    }
    if let Some(total) = download {
        return Ok(Response::new(streaming_body(total)));
    }
    let mut response = Response::new(full(format!("{name}")));
    if let Some(code) = status {
        *response.status_mut() = StatusCode::from_u16(code).unwrap();
    }
    response.headers_mut().insert("x-backend", name.parse().unwrap());
    if path.ends_with("/mimics-the-proxy") {
        // A backend that sends the proxy's error header on a good answer.
        response.headers_mut().insert("x-switchyard-error", "upstream_timeout".parse().unwrap());
    }
    Ok(response)
}

pub fn full(text: impl Into<Bytes>) -> TestBody {
    Full::new(text.into()).map_err(|never| match never {}).boxed_unsync()
}

/// A body of `total` bytes produced in 64 KiB chunks, never held whole in memory.
pub fn streaming_body(total: u64) -> TestBody {
    const CHUNK: u64 = 64 * 1024;
    let chunk = Bytes::from(vec![b'x'; CHUNK as usize]);
    let stream = futures::stream::unfold(0u64, move |sent| {
        let chunk = chunk.clone();
        async move {
            if sent >= total {
                return None;
            }
            let n = CHUNK.min(total - sent);
            Some((Ok::<_, Box<dyn std::error::Error + Send + Sync>>(Frame::data(chunk.slice(..n as usize))), sent + n))
        }
    });
    StreamBody::new(stream).boxed_unsync()
}

pub struct Proxy {
    pub running: RunningProxy,
    pub addr: SocketAddr,
}

impl Proxy {
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }
}

/// Test configs get an admin listener on a free port unless they name one, so
/// parallel tests never fight over the default admin port.
pub fn with_test_admin(yaml: &str) -> String {
    if yaml.contains("\nadmin:") || yaml.starts_with("admin:") {
        yaml.to_owned()
    } else {
        format!("admin: {{ bind: \"127.0.0.1:0\" }}\n{yaml}")
    }
}

/// Starts the proxy from YAML; the first listener's address is `addr`.
pub async fn start_proxy(yaml: &str) -> Proxy {
    let yaml = with_test_admin(yaml);
    let config =
        switchyard::config::parse(&yaml, "test.yaml").unwrap_or_else(|e| panic!("test config invalid:\n{e}\n{yaml}"));
    let running = RunningProxy::start(&config).await.expect("proxy starts");
    let addr = running.listener_addrs().await[0].1;
    Proxy { running, addr }
}

/// A config of one listener, one catch-all route and one upstream, `pool`,
/// built by what a test sets rather than by editing YAML text: a setting
/// that no longer applies fails to compile instead of silently replacing
/// nothing.
#[derive(Clone, Debug)]
pub struct PoolConfig {
    backends: Vec<std::net::SocketAddr>,
    balance: String,
    backend_fields: String,
    health: Option<String>,
    bind: String,
    listener_name: Option<String>,
    route_timeout: Option<String>,
    limits: Vec<String>,
    workers: Option<usize>,
    log: Option<String>,
    admin: Option<String>,
}

impl PoolConfig {
    /// Over `backends`, balanced by the default policy, listening on a free port.
    pub fn new(backends: &[&Backend]) -> Self {
        PoolConfig {
            backends: backends.iter().map(|backend| backend.addr).collect(),
            balance: "{}".to_owned(),
            backend_fields: String::new(),
            health: None,
            bind: "127.0.0.1:0".to_owned(),
            listener_name: None,
            route_timeout: None,
            limits: Vec::new(),
            workers: None,
            log: None,
            admin: None,
        }
    }

    /// `balance:` of the upstream, a YAML flow mapping (`{ policy: round_robin }`).
    pub fn balance(mut self, balance: &str) -> Self {
        balance.clone_into(&mut self.balance);
        self
    }

    /// More fields of every backend, after its address (`, max_concurrency: 4`).
    pub fn backend_fields(mut self, fields: &str) -> Self {
        fields.clone_into(&mut self.backend_fields);
        self
    }

    /// `health:` of the upstream, a YAML flow mapping.
    pub fn health(mut self, health: &str) -> Self {
        self.health = Some(health.to_owned());
        self
    }

    /// Listens on the port `ProxyProcess` and `FileProxy` choose (`{port}`),
    /// which stays the same across restarts and upgrades.
    pub fn on_chosen_port(self) -> Self {
        self.on_bind("127.0.0.1:{port}")
    }

    pub fn on_port(self, port: u16) -> Self {
        self.on_bind(&format!("127.0.0.1:{port}"))
    }

    fn on_bind(mut self, bind: &str) -> Self {
        bind.clone_into(&mut self.bind);
        self
    }

    pub fn listener_name(mut self, name: &str) -> Self {
        self.listener_name = Some(name.to_owned());
        self
    }

    pub fn route_timeout(mut self, timeout: &str) -> Self {
        self.route_timeout = Some(timeout.to_owned());
        self
    }

    /// One key of `limits:` (`limit("idle_timeout", "1h")`).
    pub fn limit(mut self, key: &str, value: impl std::fmt::Display) -> Self {
        self.limits.push(format!("{key}: {value}"));
        self
    }

    pub fn workers(mut self, workers: usize) -> Self {
        self.workers = Some(workers);
        self
    }

    /// `log:`, a YAML flow mapping (`{ access: true }`).
    pub fn log(mut self, log: &str) -> Self {
        self.log = Some(log.to_owned());
        self
    }

    /// `admin:`, a YAML flow mapping; without it, tests add one on a free port.
    pub fn admin(mut self, admin: &str) -> Self {
        self.admin = Some(admin.to_owned());
        self
    }

    pub fn yaml(&self) -> String {
        let mut yaml = String::new();
        if let Some(admin) = &self.admin {
            yaml += &format!("admin: {admin}\n");
        }
        if let Some(workers) = self.workers {
            yaml += &format!("workers: {workers}\n");
        }
        if let Some(log) = &self.log {
            yaml += &format!("log: {log}\n");
        }
        if !self.limits.is_empty() {
            yaml += &format!("limits: {{ {} }}\n", self.limits.join(", "));
        }
        let name = self.listener_name.as_ref().map(|name| format!("name: {name}, ")).unwrap_or_default();
        yaml += &format!("listeners:\n  - {{ {name}bind: \"{}\" }}\n", self.bind);
        let timeout = self.route_timeout.as_ref().map(|timeout| format!(", timeout: {timeout}")).unwrap_or_default();
        yaml += &format!("routes:\n  - {{ upstream: pool{timeout} }}\n");
        yaml += &format!("upstreams:\n  pool:\n    balance: {}\n", self.balance);
        if let Some(health) = &self.health {
            yaml += &format!("    health: {health}\n");
        }
        yaml += "    backends:\n";
        for backend in &self.backends {
            yaml += &format!("      - {{ address: \"{backend}\"{} }}\n", self.backend_fields);
        }
        yaml
    }
}

/// Edits of a config's text that fail the test when what they edit is not
/// there exactly once, instead of silently changing nothing.
pub trait YamlEdit {
    fn edit(&self, from: &str, to: &str) -> String;
}

impl YamlEdit for str {
    fn edit(&self, from: &str, to: &str) -> String {
        let found = self.matches(from).count();
        assert_eq!(found, 1, "`{from}` is in the config {found} times, not once:\n{self}");
        self.replace(from, to)
    }
}

/// The YAML of [`PoolConfig`] with `balance` and `backend_fields`, nothing else set.
pub fn simple_config(balance: &str, backends: &[&Backend], backend_fields: &str) -> String {
    PoolConfig::new(backends).balance(balance).backend_fields(backend_fields).yaml()
}

pub fn client() -> Client<HttpConnector, TestBody> {
    Client::builder(TokioExecutor::new()).pool_max_idle_per_host(64).build_http()
}

pub fn h2c_client() -> Client<HttpConnector, TestBody> {
    Client::builder(TokioExecutor::new()).http2_only(true).build_http()
}

pub struct Answer {
    pub status: StatusCode,
    pub headers: http::HeaderMap,
    pub body: String,
}

impl Answer {
    pub fn error_code(&self) -> Option<&str> {
        self.headers.get("x-switchyard-error").and_then(|v| v.to_str().ok())
    }
}

pub async fn send(client: &Client<HttpConnector, TestBody>, request: Request<TestBody>) -> Answer {
    let response = client.request(request).await.expect("request reaches the proxy");
    let (parts, body) = response.into_parts();
    let body = body.collect().await.expect("body").to_bytes();
    Answer { status: parts.status, headers: parts.headers, body: String::from_utf8_lossy(&body).into_owned() }
}

pub async fn get(client: &Client<HttpConnector, TestBody>, url: &str) -> Answer {
    send(client, Request::get(url).body(full("")).unwrap()).await
}

pub async fn get_with(client: &Client<HttpConnector, TestBody>, url: &str, headers: &[(&str, &str)]) -> Answer {
    let mut builder = Request::get(url);
    for (name, value) in headers {
        builder = builder.header(*name, *value);
    }
    send(client, builder.body(full("")).unwrap()).await
}

/// Counts answers by body (the backend's name).
pub fn tally(answers: impl IntoIterator<Item = String>) -> HashMap<String, usize> {
    let mut counts = HashMap::new();
    for answer in answers {
        *counts.entry(answer).or_insert(0) += 1;
    }
    counts
}

/// Polls `condition` every 10 ms until it holds, failing after `limit`.
pub async fn wait_until(what: &str, limit: Duration, mut condition: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + limit;
    while !condition() {
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A free loopback port for a child process to bind. It is taken below the
/// kernel's ephemeral range, where no connection's local port and no other
/// `bind(:0)` lands, so it stays free between this check and the child's
/// bind; and each port is handed out once per test run, so two tests never
/// get the same one. (A port from `bind(:0)`, released, could be given to
/// anything in between: a proxy with `SO_REUSEPORT` would even share it.)
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse::<u32>().ok())
        .unwrap_or(32768);
    const LOW: u32 = 10_000;
    if ephemeral_low < LOW + 1_000 {
        // No room below the range: the kernel's choice is the best left.
        return std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    }
    let span = ephemeral_low - LOW;
    // Each run starts elsewhere, away from ports a previous run may have left in TIME_WAIT.
    let start = std::process::id().wrapping_mul(7_919) % span;
    let _ = NEXT.compare_exchange(0, start + 1, Ordering::Relaxed, Ordering::Relaxed);
    for _ in 0..span {
        let port = LOW + (NEXT.fetch_add(1, Ordering::Relaxed) - 1) % span;
        if std::net::TcpListener::bind(("127.0.0.1", port as u16)).is_ok() {
            return port as u16;
        }
    }
    panic!("no free port in {LOW}..{ephemeral_low}");
}

/// The Python of the tests' own virtual environment, which
/// scripts/install-test-deps makes and fills from tests/requirements.txt.
pub fn python() -> std::process::Command {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/target/python/bin/python3");
    assert!(std::path::Path::new(path).exists(), "no {path}: run scripts/install-test-deps");
    std::process::Command::new(path)
}

/// `switchyard` serving `config` as a child process, with its log level the
/// config's (a `RUST_LOG` in the test's environment would hide or bury the
/// lines tests wait for), and its upgrade socket beside the config, where
/// the test's temporary directory takes it away (`XDG_RUNTIME_DIR`: every
/// process of one config, the upgraded ones too, finds it there).
pub fn switchyard_for(config: &std::path::Path) -> std::process::Command {
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_switchyard"));
    command.env_remove("RUST_LOG");
    command.env("XDG_RUNTIME_DIR", config.parent().expect("a config file in a directory"));
    command
}

/// The processes whose command line names `config` (the proxy and any
/// successor it started), by pid.
pub fn processes_of(config: &std::path::Path) -> Vec<libc::pid_t> {
    let wanted = config.to_str().unwrap();
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<libc::pid_t>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|line| line.split(|b| *b == 0).any(|arg| arg == wanted.as_bytes()))
        })
        .collect()
}

/// Kills whatever still serves `config` when the test ends, passed or not
/// (the successor is not this test's child, so nothing else would).
pub struct KillOnDrop(pub std::path::PathBuf);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        for pid in processes_of(&self.0) {
            // SAFETY: kill(2) on a process serving this test's config.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
}

/// The proxy as a separate process (for measuring its memory, or its CLI).
pub struct ProxyProcess {
    pub child: std::process::Child,
    pub addr: SocketAddr,
    pub path: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl ProxyProcess {
    /// Writes `yaml` (with `{port}` replaced by a free port) and runs
    /// `switchyard run -c` on it, waiting until the port accepts connections.
    pub async fn start(yaml: &str) -> ProxyProcess {
        ProxyProcess::start_with(yaml, |_| {}).await
    }

    /// [`Self::start`], with `configure` adding to the command (environment, say).
    pub async fn start_with(yaml: &str, configure: impl FnOnce(&mut std::process::Command)) -> ProxyProcess {
        let proxy = ProxyProcess::spawn_with(yaml, configure);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while tokio::net::TcpStream::connect(proxy.addr).await.is_err() {
            assert!(tokio::time::Instant::now() < deadline, "proxy process did not start listening");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        proxy
    }

    /// [`Self::start_with`] without waiting for the port.
    pub fn spawn_with(yaml: &str, configure: impl FnOnce(&mut std::process::Command)) -> ProxyProcess {
        let port = free_port();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("switchyard.yaml");
        std::fs::write(&path, with_test_admin(&yaml.replace("{port}", &port.to_string()))).unwrap();
        let mut command = switchyard_for(&path);
        command.args(["run", "-c"]).arg(&path).stderr(std::process::Stdio::null());
        configure(&mut command);
        let child = command.spawn().expect("switchyard binary runs");
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        ProxyProcess { child, addr, path, _dir: dir }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// A field of /proc/PID/status in KiB (VmRSS, VmHWM).
    pub fn memory_kib(&self, field: &str) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        status
            .lines()
            .find_map(|line| line.strip_prefix(field)?.strip_prefix(':'))
            .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or_else(|| panic!("no {field} in /proc status"))
    }

    pub fn signal(&self, signal: libc::c_int) {
        let pid = libc::pid_t::try_from(self.child.id()).unwrap();
        // SAFETY: kill(2) on our own child, which has not been waited for.
        let sent = unsafe { libc::kill(pid, signal) };
        assert_eq!(sent, 0, "kill: {}", std::io::Error::last_os_error());
    }

    /// The process's exit status, waiting up to `limit` (failing with `why`).
    pub async fn wait_for_exit(&mut self, limit: Duration, why: &str) -> std::process::ExitStatus {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(tokio::time::Instant::now() < deadline, "{why}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Resets the peak-RSS counter (VmHWM) so a later read covers only what follows.
    pub fn reset_peak(&self) {
        std::fs::write(format!("/proc/{}/clear_refs", self.child.id()), "5").unwrap();
    }
}

impl Drop for ProxyProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A proxy started from a config file, so it can be reloaded, with helpers
/// for its admin API.
pub struct FileProxy {
    pub running: RunningProxy,
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    pub dir: tempfile::TempDir,
    pub path: std::path::PathBuf,
}

impl FileProxy {
    pub async fn start(yaml: &str) -> FileProxy {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("switchyard.yaml");
        std::fs::write(&path, with_test_admin(yaml)).unwrap();
        Self::start_at(dir, path).await
    }

    /// Starts on an existing file (for symlinked layouts the test builds itself).
    pub async fn start_at(dir: tempfile::TempDir, path: std::path::PathBuf) -> FileProxy {
        let running = RunningProxy::start_from_file(&path).await.expect("proxy starts");
        let addr = running.listener_addrs().await[0].1;
        let admin = running.admin_addr().await;
        FileProxy { running, addr, admin, dir, path }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// Replaces the config the way editors do: write a temporary file, rename it over.
    pub fn replace_config(&self, yaml: &str) {
        let temporary = self.dir.path().join(".switchyard.yaml.tmp");
        std::fs::write(&temporary, with_test_admin(yaml)).unwrap();
        std::fs::rename(&temporary, &self.path).unwrap();
    }

    pub async fn status(&self) -> serde_json::Value {
        let answer = get(&client(), &format!("http://{}/status", self.admin)).await;
        assert_eq!(answer.status, 200);
        serde_json::from_str(&answer.body).unwrap()
    }

    pub async fn generation(&self) -> u64 {
        self.status().await["generation"].as_u64().unwrap()
    }

    pub async fn reload_errors(&self) -> u64 {
        self.status().await["reloads"]["error"].as_u64().unwrap()
    }

    /// Waits until `/status` reports `generation`.
    pub async fn wait_for_generation(&self, generation: u64) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let now = self.generation().await;
            if now == generation {
                return;
            }
            assert!(now < generation, "generation jumped past {generation} to {now}");
            assert!(tokio::time::Instant::now() < deadline, "config generation {generation} never arrived (at {now})");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until `/status` counts `errors` failed reloads.
    pub async fn wait_for_reload_errors(&self, errors: u64) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while self.reload_errors().await < errors {
            assert!(tokio::time::Instant::now() < deadline, "reload error {errors} never reported");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub async fn post_reload(&self) -> Answer {
        send(&client(), Request::post(format!("http://{}/reload", self.admin)).body(full("")).unwrap()).await
    }
}

/// Scrapes a Prometheus endpoint and parses it with a real text-format parser.
pub async fn scrape(url: &str) -> prometheus_parse::Scrape {
    let answer = get(&client(), url).await;
    assert_eq!(answer.status, 200);
    prometheus_parse::Scrape::parse(answer.body.lines().map(|line| Ok(line.to_owned()))).expect("valid Prometheus text")
}

/// Fails unless `promtool check metrics` (Debian's `prometheus` package,
/// installed by scripts/install-test-deps) finds nothing wrong in a scrape of
/// `url`: every family has its `# HELP` and `# TYPE`, counters end in
/// `_total`, units are base units, names are snake case.
pub async fn assert_promtool_accepts(url: &str) {
    let answer = get(&client(), url).await;
    assert_eq!(answer.status, 200);
    let text = answer.body.clone();
    let (ok, said) = tokio::task::spawn_blocking(move || {
        use std::io::Write;
        let mut child = std::process::Command::new("promtool")
            .args(["check", "metrics"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("promtool is installed (scripts/install-test-deps)");
        child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
        let output = child.wait_with_output().unwrap();
        let said = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
        (output.status.success(), said)
    })
    .await
    .unwrap();
    assert!(ok && said.trim().is_empty(), "promtool check metrics: {said}\n--- the scrape:\n{}", answer.body);
}

/// The value of `name` with every label in `labels`, if the scrape has it.
pub fn metric_value(scrape: &prometheus_parse::Scrape, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    scrape.samples.iter().find(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v))).map(
        |s| match s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => v,
            _ => panic!("{name} is not a plain number"),
        },
    )
}

/// Polls an async `condition` every 20 ms until it holds, failing after 30 s.
pub async fn wait_until_async<F, Fut>(what: &str, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !condition().await {
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A backend that reads a request and then resets the connection without answering.
pub async fn resetting_backend() -> (std::net::SocketAddr, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let requests = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&requests);
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let counter = Arc::clone(&counter);
            tokio::spawn(async move {
                let mut buffer = vec![0u8; 65536];
                let mut seen = Vec::new();
                while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
                    match tokio::io::AsyncReadExt::read(&mut stream, &mut buffer).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => seen.extend_from_slice(&buffer[..n]),
                    }
                }
                counter.fetch_add(1, Ordering::SeqCst);
                let _ = stream.set_zero_linger();
                drop(stream);
            });
        }
    });
    (addr, requests)
}

/// The first line of the log file at `path` that contains `needle`, waiting
/// for the process writing it (up to 10 s).
pub async fn wait_for_log_line(path: &std::path::Path, needle: &str) -> String {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        if let Some(line) = text.lines().find(|l| l.contains(needle)) {
            return line.to_owned();
        }
        assert!(std::time::Instant::now() < deadline, "no line with `{needle}` in:\n{text}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Runs `switchyard check` on `path` and asserts it exits 1 with a line
/// `path:line:column: ...words...`.
pub fn assert_check_reports(path: &std::path::Path, case: &str, line: usize, column: usize, words: &str) {
    let output =
        std::process::Command::new(env!("CARGO_BIN_EXE_switchyard")).arg("check").arg("-c").arg(path).output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{case}: {stderr}");
    let position = format!("{}:{line}:{column}: ", path.display());
    assert!(
        stderr.lines().any(|l| l.starts_with(&position) && l.contains(words)),
        "{case}: expected `{position}...{words}` in:\n{stderr}"
    );
}

/// `switchyard run -c config` as a child process writing its log to `log`;
/// killed when dropped, however the test ends.
pub struct LoggingProxy(std::process::Child);

impl LoggingProxy {
    pub fn start(config: &std::path::Path, log: &std::path::Path) -> LoggingProxy {
        let child = switchyard_for(config)
            .arg("run")
            .arg("-c")
            .arg(config)
            .stderr(std::fs::File::create(log).unwrap())
            .spawn()
            .unwrap();
        LoggingProxy(child)
    }
}

impl Drop for LoggingProxy {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Fails the test when any of `sent` requests failed, showing the first few.
pub fn assert_no_failures(sent: usize, failures: &[String]) {
    assert!(
        failures.is_empty(),
        "{} of {sent} requests failed: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
}

/// The backend with `address` in the first upstream of a `/status` answer.
pub fn backend_in_status(status: &serde_json::Value, address: &str) -> Option<serde_json::Value> {
    status["upstreams"][0]["backends"].as_array()?.iter().find(|b| b["address"] == address).cloned()
}

/// A child process killed when dropped, however the test ends.
pub struct Killed(pub std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
