//! One config schema, kept whole. The keys the parser accepts are read from
//! the raw serde structs themselves; each must be documented in its section
//! of docs/configuration.md, be used by this test's full config, and every
//! key of that config must show in `/config` (the effective config), so a
//! key added to the parser and forgotten in the docs or in `/config` fails
//! here.

use std::collections::BTreeSet;

use serde::de::{self, DeserializeOwned, Deserializer, Visitor};
use switchyard::config::raw::*;

/// The field names a derived `Deserialize` asks for: serde hands them to
/// `deserialize_struct`, which this deserializer records, then stops.
fn fields_of<T: DeserializeOwned>() -> &'static [&'static str] {
    #[derive(Debug)]
    struct Stop;
    impl std::fmt::Display for Stop {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("stop")
        }
    }
    impl std::error::Error for Stop {}
    impl de::Error for Stop {
        fn custom<M: std::fmt::Display>(_: M) -> Self {
            Stop
        }
    }
    struct Probe<'a>(&'a mut &'static [&'static str]);
    impl<'de> Deserializer<'de> for Probe<'_> {
        type Error = Stop;
        fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Stop> {
            Err(Stop)
        }
        fn deserialize_struct<V: Visitor<'de>>(
            self,
            _: &'static str,
            fields: &'static [&'static str],
            _: V,
        ) -> Result<V::Value, Stop> {
            *self.0 = fields;
            Err(Stop)
        }
        serde::forward_to_deserialize_any! {
            bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf option unit
            unit_struct newtype_struct seq tuple tuple_struct map enum identifier ignored_any
        }
    }
    let mut fields: &'static [&'static str] = &[];
    let _ = T::deserialize(Probe(&mut fields));
    assert!(!fields.is_empty(), "{} has no fields?", std::any::type_name::<T>());
    fields
}

/// Each raw struct, its keys, and the docs section (heading) that documents them.
fn schema() -> Vec<(&'static str, &'static [&'static str], &'static str)> {
    macro_rules! sections {
        ($($raw:ty => $heading:literal),* $(,)?) => {
            vec![$((stringify!($raw), fields_of::<$raw>(), $heading)),*]
        };
    }
    sections![
        RawListener => "## `listeners`",
        RawListenerTls => "### `tls` (per listener)",
        RawCertificate => "### `tls` (per listener)",
        RawClientAuth => "### `tls` (per listener)",
        RawAdmin => "## `admin`",
        RawResolver => "## `resolver`",
        RawCluster => "## `cluster`",
        RawTracing => "## `tracing`",
        RawLog => "## `log`",
        RawLimits => "## `limits`",
        RawPaths => "## `paths`",
        RawRoute => "## `routes`",
        RawMatch => "## `routes`",
        RawRateLimit => "## `routes`",
        RawAuth => "### `auth`",
        RawClientCert => "### `auth`",
        RawJwt => "### `auth`",
        RawApiKey => "### `auth`",
        RawRetry => "### `retry`",
        RawBackoff => "### `retry`",
        RawBudget => "### `retry`",
        RawUpstream => "## `upstreams`",
        RawBalance => "## `upstreams`",
        RawUpstreamTls => "### `tls` (per upstream)",
        RawHealth => "### `health`",
        RawActiveCheck => "### `health`",
        RawPassive => "### `health`",
        RawBreaker => "### `circuit_breaker`",
        RawQueue => "### `queue`",
        RawDiscovery => "### `discovery`",
        RawBackendDefaults => "### Backends",
        RawBackend => "### Backends",
    ]
}

fn docs() -> String {
    std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/configuration.md")).unwrap()
}

/// From the heading to the next heading.
fn section<'a>(docs: &'a str, heading: &str) -> &'a str {
    let start = docs.lines().position(|l| l.starts_with(heading)).unwrap_or_else(|| panic!("no section {heading}"));
    let lines: Vec<&str> = docs.lines().collect();
    let end = lines[start + 1..].iter().position(|l| l.starts_with('#')).map_or(lines.len(), |at| start + 1 + at);
    let from = docs.find(lines[start]).unwrap();
    let to = if end < lines.len() { docs[from..].find(lines[end]).unwrap() + from } else { docs.len() };
    &docs[from..to]
}

/// Whether a table row of `section` has `key`, `parent.key` or `key.child`
/// in its first cell.
fn documented(section: &str, key: &str) -> bool {
    section.lines().filter(|l| l.starts_with("| `")).any(|row| {
        let first = row.split('|').nth(1).unwrap_or("");
        first
            .split('`')
            .skip(1)
            .step_by(2)
            .any(|token| token == key || token.ends_with(&format!(".{key}")) || token.starts_with(&format!("{key}.")))
    })
}

#[test]
fn every_key_the_parser_accepts_is_documented_in_its_section() {
    let docs = docs();
    let mut missing = Vec::new();
    for top in fields_of::<RawConfig>() {
        if !docs.lines().any(|l| l.starts_with(&format!("## `{top}`"))) {
            missing.push(format!("top-level `{top}`: no `## `{top}`` section"));
        }
    }
    for (raw, keys, heading) in schema() {
        let section = section(&docs, heading);
        for key in keys {
            if !documented(section, key) {
                missing.push(format!("{raw}.{key}: not in a table row of {heading}"));
            }
        }
    }
    assert!(missing.is_empty(), "keys missing from docs/configuration.md:\n{}", missing.join("\n"));
}

#[test]
fn the_docs_check_can_fail() {
    let docs = docs();
    let limits = section(&docs, "## `limits`");
    assert!(documented(limits, "idle_timeout"));
    assert!(!documented(limits, "no_such_key"));
    assert!(!documented(limits, "timeout"), "a suffix of a key is not the key");
}

/// Every mapping key of `value`, with its dotted path (list items as `[i]`).
fn key_paths(value: &serde_json::Value, at: &str, out: &mut BTreeSet<String>) {
    match value {
        serde_json::Value::Object(map) => {
            for (key, item) in map {
                let path = if at.is_empty() { key.clone() } else { format!("{at}.{key}") };
                out.insert(path.clone());
                key_paths(item, &path, out);
            }
        }
        serde_json::Value::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                key_paths(item, &format!("{at}[{i}]"), out);
            }
        }
        _ => {}
    }
}

/// A config that sets every key there is (each of two exclusive keys in its
/// own place: `backends` and `discovery`, `dns` and `srv`), with real files.
fn full_config(dir: &std::path::Path) -> String {
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["bots.internal".to_owned()]).unwrap().self_signed(&key).unwrap();
    for (name, text) in [("cert.pem", cert.pem()), ("key.pem", key.serialize_pem())] {
        std::fs::write(dir.join(name), text).unwrap();
    }
    std::fs::write(dir.join("token"), "an-admin-token-of-enough-length\n").unwrap();
    std::fs::write(dir.join("redis-password"), "secret\n").unwrap();
    let jwk = r#"{"kty":"RSA","kid":"k1","alg":"RS256","n":"sXchDaQebHnPiGvyDOAT4saGEUetSyo9MKLOoWFsueri23bOdgWp4Dy1WlUzewbgBHod5pcM9H95GQRV3JDXboIRROSBigeC5yjU1hGzHHyXss8UDprecbAYxknTcQkhslANGRUZmdTOQ5qTRsLAt6BTYuyvVRdhS8exSZEy_c4gs_7svlJJQ4H9_NxsiIoLwAEk7-Q3UXERGYw_75IDrGA84-lA_-Ct4eTlXHBIY2EaV7t7LjJaynVJCpkv4LKjTTAumiGUIuQhrNhZLuF_RJLqHpM2kgWFLU7-VTdL1VbC2tejvcI2BlMkEpk1BzBZI0KQB0GaDWFLN-aEAw3vRw","e":"AQAB"}"#;
    std::fs::write(dir.join("jwks.json"), format!("{{\"keys\":[{jwk}]}}")).unwrap();
    std::fs::write(dir.join("api-keys"), format!("robot:{}\n", "ab".repeat(32))).unwrap();
    r#"
listeners:
  - name: web
    bind: "127.0.0.1:0"
    proxy_protocol: false
  - name: web-tls
    bind: "127.0.0.1:0"
    tls:
      certificates: [{ cert: cert.pem, key: key.pem }]
      alpn: [h2, http/1.1]
      client_auth: { ca: cert.pem, mode: optional }
    allow: ["10.0.0.0/8"]
    deny: ["10.9.0.0/16"]
admin: { bind: "127.0.0.1:0", token_file: token, metrics_without_token: true }
resolver: { servers: ["127.0.0.1:5353"] }
cluster:
  redis: "redis://switchyard@127.0.0.1:6379/0"
  password_file: redis-password
  key_prefix: "switchyard:"
  lease: 10s
  on_unavailable: local
tracing: { otlp_endpoint: "http://127.0.0.1:4318", sample_ratio: 0.01, service_name: edge }
log: { level: info, format: text, access: false, file: events.log, access_file: access.log }
workers: 1
limits:
  max_header_bytes: 65536
  max_body_bytes: 1048576
  header_read_timeout: 10s
  idle_timeout: 60s
  max_connections: 100
  shutdown_grace: 30s
  connect_timeout: 5s
  client_body_timeout: 60s
  client_send_timeout: 60s
  tunnel_idle_timeout: 1h
  tls_handshake_timeout: 10s
  backend_read_timeout: 60s
  max_concurrent_streams: 100
trusted_proxies: ["10.0.0.0/8"]
paths: { merge_slashes: false }
routes:
  - name: jobs
    match:
      host: "*.bots.internal"
      path_prefix: "/jobs/"
      methods: [GET, POST]
      headers: { x-tenant: blue }
    upstream: listed
    timeout: 20s
    allow: ["10.0.0.0/8", "192.168.1.7"]
    deny: ["10.66.0.0/16"]
    rate_limit: { requests: 100, per: 1s, burst: 20, key: client_ip, scope: cluster }
    retry:
      attempts: 2
      per_try_timeout: 10s
      on: [connect-failure]
      backoff: { base: 25ms, max: 1s }
      budget: { ratio: 0.2, min_per_second: 10 }
      non_idempotent: false
  - name: by-dns
    upstream: by-dns
    auth:
      client_cert: { sans: ["*.bots.internal"], forward_header: x-client-cert }
      jwt:
        jwks_file: jwks.json
        issuers: ["https://idp.internal"]
        audiences: [bots]
        required_claims: [tenant]
        claims: { role: [ops, admin], scope: "jobs:run" }
        forward_claims: { sub: x-user }
        keep_token: false
      api_key: { file: api-keys, header: x-api-key, forward_header: x-api-client, keep_key: false }
  - name: by-srv
    upstream: by-srv
    auth: { jwt: { jwks_url: "https://idp.internal/jwks.json", refresh: 5m } }
upstreams:
  listed:
    balance: { policy: consistent_hash, key: "header:x-job-id", bounded_load: 1.25 }
    backends: [{ address: "127.0.0.1:9000", weight: 2, max_concurrency: 4 }]
    protocol: h2
    tls: { ca: cert.pem, client_cert: cert.pem, client_key: key.pem, server_name: bots.internal }
    health:
      active:
        kind: http
        path: /healthz
        expect_status: [200]
        host: bots.internal
        expect_body: ok
        interval: 2s
        timeout: 1s
        healthy_after: 2
        unhealthy_after: 3
      passive: { consecutive_failures: 5, ejection_time: 30s, max_ejection_percent: 50 }
      slow_start: 10s
    circuit_breaker:
      consecutive_failures: 5
      failure_rate: 0.5
      min_requests: 20
      window: 10s
      open_for: 10s
      half_open_requests: 3
    queue: { max_waiting: 10, timeout: 5s, priority_header: x-priority }
    max_concurrency_scope: cluster
  by-dns:
    discovery: { dns: "bots.internal:8270", refresh: 5s, max_backends: 64, allow_link_local: false }
    backend_defaults: { weight: 1, max_concurrency: 1 }
    health: { active: { kind: grpc, service: bots } }
  by-srv:
    discovery: { srv: "_bot._tcp.bots.internal" }
"#
    .to_owned()
}

#[test]
fn a_full_config_uses_every_key_and_every_key_shows_in_the_effective_config() {
    let dir = tempfile::tempdir().unwrap();
    let yaml = full_config(dir.path());
    let path = dir.path().join("switchyard.yaml");
    std::fs::write(&path, &yaml).unwrap();
    let config = switchyard::config::load(&path).unwrap_or_else(|e| panic!("the full config does not validate:\n{e}"));

    // Every key the parser knows is set somewhere (by name: the structs'
    // places are checked by the docs test above). `token` is the one left
    // out: it and `token_file` exclude each other.
    let raw: serde_json::Value = serde_saphyr::from_str(&yaml).unwrap();
    let mut used = BTreeSet::new();
    key_paths(&raw, "", &mut used);
    let names: BTreeSet<&str> = used.iter().map(|p| p.rsplit('.').next().unwrap().split('[').next().unwrap()).collect();
    let mut unused: Vec<String> = Vec::new();
    for (raw_struct, keys, _) in schema() {
        for key in keys.iter().filter(|k| !names.contains(**k) && **k != "token") {
            unused.push(format!("{raw_struct}.{key}"));
        }
    }
    for key in fields_of::<RawConfig>().iter().filter(|k| !names.contains(**k)) {
        unused.push(format!("RawConfig.{key}"));
    }
    assert!(unused.is_empty(), "keys the full config does not set: {unused:?}");

    // ... and every key set shows in `/config`, at the same path (a secret's
    // file shows as the secret, redacted).
    let effective = switchyard::explain::effective_config(&config);
    let mut shown = BTreeSet::new();
    key_paths(&effective, "", &mut shown);
    let renamed = |path: &str| path.replace("admin.token_file", "admin.token");
    let hidden: Vec<String> = used.iter().map(|p| renamed(p)).filter(|p| !shown.contains(p)).collect();
    assert!(hidden.is_empty(), "keys of the config missing from /config:\n{}", hidden.join("\n"));

    // Values as the file writes them: durations as text, secrets redacted,
    // enums in their YAML spelling, paths resolved against the config's directory.
    assert_eq!(effective["limits"]["idle_timeout"], "60s");
    assert_eq!(effective["limits"]["max_body_bytes"], 1_048_576);
    assert_eq!(effective["admin"]["token"], "<redacted>");
    assert_eq!(effective["admin"]["bind"], "127.0.0.1:0");
    assert_eq!(effective["log"]["level"], "info");
    assert_eq!(effective["log"]["format"], "text");
    assert_eq!(effective["log"]["file"], dir.path().join("events.log").display().to_string());
    assert_eq!(effective["paths"]["merge_slashes"], false);
    assert_eq!(effective["routes"][0]["retry"]["backoff"]["base"], "25ms");
    let retry = &effective["routes"][0]["retry"];
    assert_eq!((&retry["per_try_timeout"], &retry["on"]), (&"10s".into(), &serde_json::json!(["connect-failure"])));
    assert_eq!((&retry["budget"]["ratio"], &retry["budget"]["min_per_second"]), (&0.2.into(), &10.into()));
    assert_eq!(effective["routes"][1]["retry"], serde_json::Value::Null, "no retry: null");
    assert_eq!(effective["listeners"][1]["tls"]["alpn"], serde_json::json!(["h2", "http/1.1"]));
    assert_eq!(effective["upstreams"]["listed"]["tls"]["server_name"], "bots.internal");
    let listed = &effective["upstreams"]["listed"];
    assert_eq!(listed["circuit_breaker"]["window"], "10s");
    assert_eq!(listed["circuit_breaker"]["failure_rate"], 0.5);
    assert_eq!(listed["queue"]["priority_header"], "x-priority");
    assert_eq!(listed["health"]["passive"]["ejection_time"], "30s");
    assert_eq!(effective["upstreams"]["by-dns"]["backend_defaults"]["max_concurrency"], 1);
    let active = &listed["health"]["active"];
    assert_eq!(
        (&active["kind"], &active["path"], &active["interval"]),
        (&"http".into(), &"/healthz".into(), &"2s".into())
    );
    assert_eq!(active["expect_status"], serde_json::json!([200]));
    assert_eq!(effective["upstreams"]["by-dns"]["health"]["active"]["kind"], "grpc");
    assert_eq!(listed["backends"][0]["address"], "127.0.0.1:9000");
    assert_eq!(listed["backends"][0]["weight"], 2);
    assert_eq!(listed["health"]["slow_start"], "10s");
    assert_eq!(listed["protocol"], "h2");
    assert_eq!(
        listed["balance"],
        serde_json::json!({ "policy": "consistent_hash", "key": "header:x-job-id", "bounded_load": 1.25 })
    );
    assert_eq!(effective["upstreams"]["by-dns"]["balance"], serde_json::json!({ "policy": "round_robin" }));
    let route = &effective["routes"][0];
    assert_eq!(
        route["match"],
        serde_json::json!({
            "host": "*.bots.internal", "path_prefix": "/jobs/", "methods": ["GET", "POST"],
            "headers": { "x-tenant": "blue" }
        })
    );
    assert_eq!(
        (&route["name"], &route["upstream"], &route["timeout"]),
        (&"jobs".into(), &"listed".into(), &"20s".into())
    );
    assert_eq!(effective["resolver"], serde_json::json!({ "servers": ["127.0.0.1:5353"] }));
    assert_eq!(effective["trusted_proxies"], serde_json::json!(["10.0.0.0/8"]));
    let tls = &listed["tls"];
    let file = |name: &str| dir.path().join(name).display().to_string();
    assert_eq!(
        (&tls["ca"], &tls["client_cert"], &tls["client_key"]),
        (&file("cert.pem").into(), &file("cert.pem").into(), &file("key.pem").into())
    );
    assert_eq!(
        effective["upstreams"]["by-dns"]["discovery"],
        serde_json::json!({ "dns": "bots.internal:8270", "refresh": "5s", "max_backends": 64, "allow_link_local": false })
    );
    assert_eq!(effective["upstreams"]["by-dns"]["backends"], serde_json::Value::Null, "discovered: no list");
    assert_eq!(effective["upstreams"]["by-srv"]["discovery"]["srv"], "_bot._tcp.bots.internal");
    assert_eq!(effective["upstreams"]["by-srv"]["discovery"]["max_backends"], 512, "defaults filled in");
    let cluster = &effective["cluster"];
    // The URL's user part could be a password: never shown, nor the password file's.
    assert_eq!(cluster["redis"], "redis://<redacted>@127.0.0.1:6379/0");
    assert_eq!(cluster["password_file"], "<redacted>");
    assert_eq!((&cluster["lease"], &cluster["on_unavailable"]), (&"10s".into(), &"local".into()));
}
