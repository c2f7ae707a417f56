//! `switchyard check` on a table of broken configs: each must exit 1 and name the
//! file, line and column of the problem, with a message that says what is wrong.

use std::process::Command;

const HEAD: &str = "listeners:\n  - bind: \"127.0.0.1:8080\"\n";

/// (what is broken, file text, expected line, expected column, words the message must contain)
fn cases() -> Vec<(&'static str, String, usize, usize, &'static str)> {
    let upstream = |backends: &str| format!("upstreams:\n  pool:\n    backends: {backends}\n");
    let routes = "routes:\n  - upstream: pool\n";
    let ok_backends = "[{ address: \"127.0.0.1:9000\" }]";
    vec![
        ("typo in a top-level key", format!("{HEAD}{routes}{}listner: 1\n", upstream(ok_backends)), 8, 1, "unknown field `listner`"),
        ("typo in a backend key", format!("{HEAD}{routes}{}", upstream("[{ adress: \"127.0.0.1:9000\" }]")), 7, 18, "unknown field `adress`"),
        ("unknown upstream in a route", format!("{HEAD}routes:\n  - upstream: robots\n{}", upstream(ok_backends)), 4, 15, "unknown upstream `robots`"),
        (
            "duplicate backend",
            format!("{HEAD}{routes}upstreams:\n  pool:\n    backends:\n      - address: \"127.0.0.1:9000\"\n      - address: \"127.0.0.1:9000\"\n"),
            9,
            18,
            "listed twice",
        ),
        ("weight 0", format!("{HEAD}{routes}{}", upstream("[{ address: \"127.0.0.1:9000\", weight: 0 }]")), 7, 53, "weight must be between 1"),
        ("duration without unit", format!("{HEAD}routes:\n  - upstream: pool\n    timeout: 5\n{}", upstream(ok_backends)), 5, 14, "has no unit"),
        ("duration with a bad unit", format!("{HEAD}routes:\n  - upstream: pool\n    timeout: 5sec\n{}", upstream(ok_backends)), 5, 14, "unknown unit"),
        (
            "unparsable hash key",
            format!("{HEAD}{routes}upstreams:\n  pool:\n    balance: {{ policy: consistent_hash, key: \"body:x\" }}\n    backends: {ok_backends}\n"),
            7,
            46,
            "key `body:x`",
        ),
        (
            "consistent_hash without key",
            format!("{HEAD}{routes}upstreams:\n  pool:\n    balance: {{ policy: consistent_hash }}\n    backends: {ok_backends}\n"),
            7,
            24,
            "needs a `key`",
        ),
        (
            "bounded_load below 1",
            format!("{HEAD}{routes}upstreams:\n  pool:\n    balance: {{ policy: consistent_hash, key: path, bounded_load: 0.9 }}\n    backends: {ok_backends}\n"),
            7,
            66,
            "bounded_load must be greater than 1.0",
        ),
        ("key on round robin", format!("{HEAD}{routes}upstreams:\n  pool:\n    balance: {{ key: path }}\n    backends: {ok_backends}\n"), 7, 21, "only applies to policy `consistent_hash`"),
        ("unknown policy", format!("{HEAD}{routes}upstreams:\n  pool:\n    balance: {{ policy: fastest }}\n    backends: {ok_backends}\n"), 7, 24, "fastest"),
        ("bind without IP", format!("listeners:\n  - bind: \"8080\"\n{routes}{}", upstream(ok_backends)), 2, 11, "not IP:PORT"),
        ("no backends", format!("{HEAD}{routes}{}", upstream("[]")), 7, 15, "has no backends"),
        ("backend without port", format!("{HEAD}{routes}{}", upstream("[{ address: \"bot1.internal\" }]")), 7, 27, "a port is required"),
        (
            "path_prefix without slash",
            format!("{HEAD}routes:\n  - upstream: pool\n    match: {{ path_prefix: robot }}\n{}", upstream(ok_backends)),
            5,
            27,
            "must start with `/`",
        ),
        ("lower-case method", format!("{HEAD}routes:\n  - upstream: pool\n    match: {{ methods: [get] }}\n{}", upstream(ok_backends)), 5, 24, "method `get`"),
        ("max_concurrency 0", format!("{HEAD}{routes}{}", upstream("[{ address: \"127.0.0.1:9000\", max_concurrency: 0 }]")), 7, 62, "max_concurrency must be at least 1"),
        (
            "duplicate route name",
            format!("{HEAD}routes:\n  - {{ name: r, upstream: pool }}\n  - {{ name: r, upstream: pool }}\n{}", upstream(ok_backends)),
            5,
            13,
            "route name `r` is used twice",
        ),
        ("header limit too small", format!("{HEAD}{routes}{}limits: {{ max_header_bytes: 100 }}\n", upstream(ok_backends)), 8, 29, "at least 8192"),
        ("YAML syntax error", format!("{HEAD}{routes}upstreams:\n  pool:\n    backends: [{{ address: \"127.0.0.1:9000\" }}\n"), 7, 15, "unclosed bracket"),
        ("duplicate upstream", format!("{HEAD}{routes}{}  pool:\n    backends: {ok_backends}\n", upstream(ok_backends)), 8, 3, "duplicate mapping key"),
        ("no listeners", format!("listeners: []\n{routes}{}", upstream(ok_backends)), 1, 1, "no listeners"),
        ("protocol h2 without tls", format!("{HEAD}{routes}{}    protocol: h2\n", upstream(ok_backends)), 8, 15, "HTTP/2 over TLS: add `tls:`"),
        (
            "backends and discovery both",
            format!("{HEAD}{routes}{}    discovery: {{ dns: \"bots.svc:80\" }}\n", upstream(ok_backends)),
            8,
            16,
            "has both `backends` and `discovery`",
        ),
        ("no backends nor discovery", format!("{HEAD}{routes}upstreams:\n  pool:\n    protocol: h2c\n"), 7, 5, "list `backends` or set `discovery`"),
        ("dns without port", format!("{HEAD}{routes}upstreams:\n  pool:\n    discovery: {{ dns: bots.svc }}\n"), 7, 23, "is not NAME:PORT"),
        ("dns and srv both", format!("{HEAD}{routes}upstreams:\n  pool:\n    discovery: {{ dns: \"a:1\", srv: b }}\n"), 7, 16, "exactly one of"),
        ("not a DNS name", format!("{HEAD}{routes}upstreams:\n  pool:\n    discovery: {{ srv: \"bots svc\" }}\n"), 7, 23, "is not a DNS name"),
        ("refresh too short", format!("{HEAD}{routes}upstreams:\n  pool:\n    discovery: {{ srv: b, refresh: 10ms }}\n"), 7, 35, "refresh must be at least"),
        (
            "backend_defaults without discovery",
            format!("{HEAD}{routes}{}    backend_defaults: {{ weight: 2 }}\n", upstream(ok_backends)),
            8,
            23,
            "applies to discovered backends",
        ),
        ("resolver server not an IP", format!("resolver: {{ servers: [dns.local] }}\n{HEAD}{routes}{}", upstream(ok_backends)), 1, 23, "not IP or IP:PORT"),
        ("negative body limit", format!("{HEAD}{routes}{}limits: {{ max_body_bytes: -1 }}\n", upstream(ok_backends)), 8, 27, "cannot be negative"),
        ("trusted proxy not a CIDR", format!("trusted_proxies: [10.0.0.0/8, 10.0.0.0/33]\n{HEAD}{routes}{}", upstream(ok_backends)), 1, 31, "not a CIDR block"),
        ("no HTTP/2 streams", format!("{HEAD}{routes}{}limits: {{ max_concurrent_streams: 0 }}\n", upstream(ok_backends)), 8, 35, "at least 1"),
        ("zero backend read timeout", format!("{HEAD}{routes}{}limits: {{ backend_read_timeout: 0s }}\n", upstream(ok_backends)), 8, 33, "backend_read_timeout"),
        ("zero idle timeout", format!("{HEAD}{routes}{}limits: {{ idle_timeout: 0s }}\n", upstream(ok_backends)), 8, 25, "idle_timeout must be greater than zero"),
        ("zero header read timeout", format!("{HEAD}{routes}{}limits: {{ header_read_timeout: 0ms }}\n", upstream(ok_backends)), 8, 32, "header_read_timeout must be greater"),
        ("typo in paths", format!("paths: {{ merge_slash: true }}\n{HEAD}{routes}{}", upstream(ok_backends)), 1, 10, "unknown field `merge_slash`"),
        ("log file in a missing directory", format!("log: {{ file: no-such-dir/events.log }}\n{HEAD}{routes}{}", upstream(ok_backends)), 1, 14, "does not exist"),
        ("proxy_protocol not a boolean", format!("listeners:\n  - {{ bind: \"127.0.0.1:80\", proxy_protocol: sometimes }}\n{routes}{}", upstream(ok_backends)), 2, 45, "invalid boolean"),
    ]
}

#[test]
fn check_reports_file_line_column_for_each_broken_config() {
    let dir = tempfile::tempdir().unwrap();
    let cases = cases();
    assert!(cases.len() >= 15);
    let mut failures = Vec::new();
    for (index, (what, text, line, column, words)) in cases.iter().enumerate() {
        let path = dir.path().join(format!("bad-{index}.yaml"));
        std::fs::write(&path, text).unwrap();
        let output = Command::new(env!("CARGO_BIN_EXE_switchyard")).arg("check").arg("-c").arg(&path).output().unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        let expected_prefix = format!("{}:{line}:{column}: ", path.display());
        let first = stderr.lines().next().unwrap_or("");
        if output.status.code() != Some(1) || !first.starts_with(&expected_prefix) || !first.contains(words) {
            failures.push(format!(
                "{what}: exit {:?}, wanted `{expected_prefix}...{words}`, got `{stderr}`",
                output.status.code()
            ));
        }
    }
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));
}

#[test]
fn check_needs_no_dns() {
    // Nothing answers DNS on the discard port: `check` must not ask.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("discovered.yaml");
    let text = format!(
        "resolver: {{ servers: [\"127.0.0.1:9\"] }}\n{HEAD}routes:\n  - upstream: pool\nupstreams:\n  pool:\n    \
         discovery: {{ srv: _bot._tcp.bots.service.consul, refresh: 5s }}\n    backend_defaults: {{ max_concurrency: 1 }}\n"
    );
    std::fs::write(&path, text).unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_switchyard")).arg("check").arg("-c").arg(&path).output().unwrap();
    assert_eq!(output.status.code(), Some(0), "{}", String::from_utf8_lossy(&output.stderr));
}

#[test]
fn an_alias_bomb_is_refused_by_the_parser_budget() {
    let mut text = String::from("a: &a [x, x, x, x, x, x, x, x, x, x]\n");
    for level in 1..12 {
        let prev = (b'a' + level - 1) as char;
        let this = (b'a' + level) as char;
        text.push_str(&format!("{this}: &{this} [*{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}]\n"));
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bomb.yaml");
    std::fs::write(&path, text).unwrap();
    let started = std::time::Instant::now();
    let output = Command::new(env!("CARGO_BIN_EXE_switchyard")).arg("check").arg("-c").arg(&path).output().unwrap();
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.starts_with(&format!("{}:", path.display())), "{stderr}");
    eprintln!("alias bomb refused in {:?}: {stderr}", started.elapsed());
}

#[test]
fn the_example_config_and_several_errors_at_once() {
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/config/switchyard.yaml");
    let output = Command::new(env!("CARGO_BIN_EXE_switchyard")).args(["check", "-c", example]).output().unwrap();
    assert_eq!(output.status.code(), Some(0), "{}", String::from_utf8_lossy(&output.stderr));

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("two.yaml");
    std::fs::write(&path, format!("{HEAD}routes:\n  - upstream: a\n  - upstream: b\nupstreams:\n  c:\n    backends: [{{ address: \"h:1\" }}]\n")).unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_switchyard")).arg("check").arg("-c").arg(&path).output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1));
    assert_eq!(stderr.lines().count(), 2, "both unknown upstreams are reported: {stderr}");

    let usage = Command::new(env!("CARGO_BIN_EXE_switchyard")).arg("--no-such-flag").output().unwrap();
    assert_eq!(usage.status.code(), Some(2));
}

#[test]
fn check_warns_when_a_route_may_outlast_the_shutdown_grace_naming_both_lines() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("long.yaml");
    let check = |yaml: &str| {
        std::fs::write(&path, yaml).unwrap();
        let output = Command::new(env!("CARGO_BIN_EXE_switchyard")).arg("check").arg("-c").arg(&path).output().unwrap();
        assert_eq!(output.status.code(), Some(0), "a warning does not refuse the config");
        String::from_utf8_lossy(&output.stderr).into_owned()
    };
    let routes = "routes:\n  - { name: jobs, upstream: a, timeout: 10m }\n  - { name: quick, upstream: a, timeout: 5s }\nupstreams:\n  a:\n    backends: [{ address: \"h:1\" }]\n";
    let stderr = check(&format!("{HEAD}limits:\n  shutdown_grace: 30s\n{routes}"));
    let file = path.display();
    assert_eq!(stderr.lines().count(), 1, "only the long route: {stderr}");
    assert!(
        stderr.starts_with(&format!("{file}:6:41: warning: route `jobs` waits up to 600s")),
        "at the route's timeout: {stderr}"
    );
    assert!(stderr.contains("limits.shutdown_grace 30s (line 4)"), "naming the grace's line: {stderr}");
    // The default grace is named as such; a grace long enough says nothing.
    assert!(check(&format!("{HEAD}{routes}")).contains("limits.shutdown_grace, 30s by default,"));
    assert_eq!(check(&format!("{HEAD}limits:\n  shutdown_grace: 11m\n{routes}")), "");
}

#[test]
fn version_and_dash_dash_version_name_the_version_and_the_commit_built_from() {
    let run = |arg: &str| {
        let output = Command::new(env!("CARGO_BIN_EXE_switchyard")).arg(arg).output().unwrap();
        assert!(output.status.success(), "{arg}");
        String::from_utf8(output.stdout).unwrap()
    };
    // The commit the checkout is at (what build.rs recorded), when git can tell.
    let head = Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .ok()
        .filter(|output| output.status.success())
        .map(|output| String::from_utf8(output.stdout).unwrap().trim().to_owned())
        .unwrap_or_else(|| "unknown".to_owned());
    let in_git = std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/.git")).exists();
    assert!(!in_git || head != "unknown", "git could not name the commit of this checkout");
    let expected = format!("switchyard {} (commit {head})\n", env!("CARGO_PKG_VERSION"));
    assert_eq!(run("version"), expected);
    assert_eq!(run("--version"), expected);
}
