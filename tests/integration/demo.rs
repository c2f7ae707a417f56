//! `switchyard demo` works end to end: bots and proxy start, and `curl` against
//! the printed URL gets a bot's answer.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use crate::support::Killed;

fn curl(args: &[&str]) -> String {
    let output = Command::new("curl")
        // Straight to loopback, whatever http_proxy the environment sets.
        .args(["-s", "--max-time", "30", "--noproxy", "*"])
        .args(args)
        .output()
        .expect("curl is installed (scripts/install-test-deps)");
    assert!(output.status.success(), "curl {args:?} failed: {output:?}");
    String::from_utf8(output.stdout).unwrap()
}

#[test]
fn demo_prints_urls_that_answer_with_a_bot() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(["demo", "--port", "0"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let _child = Killed(child);
    let mut proxy_url = None;
    // The URL is printed only once the proxy listens, so it is ready when read.
    for line in BufReader::new(stdout).lines() {
        let line = line.unwrap();
        if let Some(url) = line.trim().strip_prefix("proxy") {
            proxy_url = Some(url.trim().to_owned());
        }
        if line.starts_with("Press Ctrl-C") {
            break;
        }
    }
    let proxy_url = proxy_url.expect("demo prints the proxy URL");
    let mut bots = std::collections::HashSet::new();
    for _ in 0..3 {
        let answer = curl(&[&format!("{proxy_url}/robot/run"), "-d", "{\"task\":\"invoice\"}"]);
        assert!(answer.contains("\"status\":\"done\""), "{answer}");
        bots.insert(answer.split("\"bot\":\"").nth(1).unwrap().split('"').next().unwrap().to_owned());
    }
    assert_eq!(bots.len(), 3, "round robin reaches all three bots");
    let sticky = |_: usize| curl(&["-H", "x-job-id: job-42", &format!("{proxy_url}/jobs/status")]);
    let first = sticky(0);
    assert!((1..5).all(|i| sticky(i) == first), "the same job id reaches the same bot");
}
