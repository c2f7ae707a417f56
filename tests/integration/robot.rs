//! Real RPA bot servers nobody here wrote: three Robot Framework remote servers
//! (robotremoteserver, XML-RPC over HTTP) behind the proxy, called through it by
//! Robot Framework's own `Remote` library client. Needs the Python packages in
//! tests/requirements.txt (installed by scripts/install-test-deps).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::Duration;

use crate::support::*;

struct PythonBot {
    child: Child,
    port: u16,
}

impl Drop for PythonBot {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn robot_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/robot")
}

async fn start_bot(name: &str, dir: &Path) -> PythonBot {
    start_bot_with_cold_start(name, dir, 0.0).await
}

/// A bot whose first invoice takes `cold_start` seconds longer.
async fn start_bot_with_cold_start(name: &str, dir: &Path, cold_start: f64) -> PythonBot {
    let port_file = dir.join(format!("{name}.port"));
    let mut child = python()
        .arg(robot_dir().join("bot_library.py"))
        .arg(name)
        .arg(&port_file)
        .arg(cold_start.to_string())
        .stdout(Stdio::null())
        .spawn()
        .expect("python3 is installed");
    // Ready once the server has written its port and accepts connections.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            panic!("robot bot {name} exited with {status}: are tests/requirements.txt installed? (scripts/install-test-deps)");
        }
        let port = std::fs::read_to_string(&port_file).ok().and_then(|text| text.trim().parse::<u16>().ok());
        if let Some(port) = port {
            if tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_ok() {
                return PythonBot { child, port };
            }
        }
        assert!(tokio::time::Instant::now() < deadline, "robot bot {name} did not start");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Calls `process_invoice` `calls` times in a row through a proxy in front of
/// `bots` balanced by `balance`, with `fields` on each backend; checks every
/// receipt and returns the calls each bot served (and the client's output).
async fn sequential_calls(
    bots: &[PythonBot],
    balance: &str,
    fields: &str,
    calls: usize,
) -> (HashMap<String, usize>, String) {
    let backends: String =
        bots.iter().map(|b| format!("      - {{ address: \"127.0.0.1:{}\"{fields} }}\n", b.port)).collect();
    let yaml = format!(
        "listeners: [{{ bind: \"127.0.0.1:0\" }}]\nroutes: [{{ upstream: robots, timeout: 60s }}]\nupstreams:\n  robots:\n    balance: {balance}\n    backends:\n{backends}"
    );
    let proxy = start_proxy(&yaml).await;
    let url = proxy.url("/");
    let output = tokio::task::spawn_blocking(move || {
        python()
            .arg(robot_dir().join("call_keywords.py"))
            .arg(url)
            .arg(calls.to_string())
            .output()
            .expect("python3 runs")
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(output.status.success(), "client failed: {}\n{stdout}", String::from_utf8_lossy(&output.stderr));
    let mut lines = stdout.lines();
    let keywords = lines.next().unwrap();
    assert!(keywords.contains("process_invoice") && keywords.contains("whoami"), "{keywords}");
    let mut per_bot: HashMap<String, usize> = HashMap::new();
    for i in 0..calls {
        let line = lines.next().unwrap();
        assert!(line.contains(&format!("\"invoice\": \"inv-{i}\"")) && line.contains("\"total\": 120.0"), "{line}");
        let bot = ["bot-1", "bot-2", "bot-3"]
            .into_iter()
            .find(|b| line.contains(&format!("\"bot\": \"{b}\"")))
            .expect("a receipt names its bot");
        *per_bot.entry(bot.to_owned()).or_default() += 1;
    }
    let rest = lines.collect::<Vec<_>>().join("\n");
    (per_bot, rest)
}

#[tokio::test]
async fn robot_framework_remote_servers_behind_the_proxy() {
    let dir = tempfile::tempdir().unwrap();
    let bots = [
        start_bot("bot-1", dir.path()).await,
        start_bot("bot-2", dir.path()).await,
        start_bot("bot-3", dir.path()).await,
    ];
    let (per_bot, rest) = sequential_calls(&bots, "{ policy: round_robin }", "", 30).await;
    // Round robin: 30 consecutive keyword calls, 10 per bot.
    assert_eq!(per_bot.values().copied().collect::<Vec<_>>(), vec![10, 10, 10], "{per_bot:?}");
    // A failing keyword's error travels back as the XML-RPC fault it is.
    assert_eq!(rest, "{\"failure\": \"boom\"}");
}

#[tokio::test]
async fn least_loaded_does_not_starve_a_bot_whose_first_job_was_slow() {
    let dir = tempfile::tempdir().unwrap();
    // Every bot's first job is slow (a cold keyword library), one's much more.
    let bots = [
        start_bot_with_cold_start("bot-1", dir.path(), 1.5).await,
        start_bot_with_cold_start("bot-2", dir.path(), 0.1).await,
        start_bot_with_cold_start("bot-3", dir.path(), 0.1).await,
    ];
    // One call at a time: every bot is idle at every pick, so the latency of a
    // cold first call must not keep a bot out.
    let (per_bot, _) = sequential_calls(&bots, "{ policy: least_loaded }", ", max_concurrency: 4", 100).await;
    for bot in ["bot-1", "bot-2", "bot-3"] {
        let served = per_bot.get(bot).copied().unwrap_or(0);
        assert!(served >= 15, "least_loaded starved {bot}: {per_bot:?}");
    }
}
