//! TLS on listeners with real TLS on both ends: certificates made at run time
//! (rcgen), the proxy's rustls server, a rustls client (tokio-rustls) speaking
//! HTTP/1.1 or HTTP/2 through hyper, and `switchyard check` on bad files.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use http::Request;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use crate::support::*;

/// A test certificate authority.
struct Authority {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

/// A certificate with its key, as PEM, and the leaf's DER to compare with.
struct Issued {
    cert_pem: String,
    key_pem: String,
    der: CertificateDer<'static>,
}

impl Authority {
    fn new() -> Authority {
        Authority::named("Switchyard test CA")
    }

    fn named(name: &str) -> Authority {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(rcgen::DnType::CommonName, name);
        Authority { issuer: CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap() }
    }

    fn issue(&self, names: &[&str]) -> Issued {
        self.issue_with(names, |_| {})
    }

    fn issue_with(&self, names: &[&str], adjust: impl FnOnce(&mut CertificateParams)) -> Issued {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>()).unwrap();
        // A subject of its own: OpenSSL takes a leaf named like its issuer for self-signed.
        params.distinguished_name.push(rcgen::DnType::CommonName, names[0]);
        adjust(&mut params);
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        Issued { cert_pem: cert.pem(), key_pem: key.serialize_pem(), der: cert.der().clone() }
    }

    fn client(&self, alpn: &[&[u8]], sni: bool) -> TlsConnector {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.issuer.der().clone()).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        config.enable_sni = sni;
        TlsConnector::from(Arc::new(config))
    }
}

fn write(dir: &Path, name: &str, issued: &Issued) {
    std::fs::write(dir.join(format!("{name}.pem")), &issued.cert_pem).unwrap();
    std::fs::write(dir.join(format!("{name}.key")), &issued.key_pem).unwrap();
}

/// A TLS listener serving `bots.pem` (the default) and `api.pem` from the
/// config's directory.
fn tls_config(backend: &Backend, alpn: &str) -> String {
    format!(
        "listeners:\n  - name: secure\n    bind: \"127.0.0.1:0\"\n    tls:\n      certificates:\n        - {{ cert: bots.pem, key: bots.key }}\n        - {{ cert: api.pem, key: api.key }}\n{alpn}routes:\n  - upstream: pool\nupstreams:\n  pool:\n    backends: [{{ address: \"{}\" }}]\n",
        backend.addr
    )
}

/// Starts a file-based proxy whose directory holds the certificates.
async fn start(authority: &Authority, backend: &Backend, alpn: &str) -> (FileProxy, Issued, Issued) {
    let dir = tempfile::tempdir().unwrap();
    let (bots, api) =
        (authority.issue(&["bots.example.test"]), authority.issue(&["api.example.test", "*.api.example.test"]));
    write(dir.path(), "bots", &bots);
    write(dir.path(), "api", &api);
    let path = dir.path().join("switchyard.yaml");
    std::fs::write(&path, with_test_admin(&tls_config(backend, alpn))).unwrap();
    (FileProxy::start_at(dir, path).await, bots, api)
}

/// A TLS connection to the proxy asking for `name`: the certificate it was
/// served, the protocol ALPN chose, and the stream.
async fn connect(
    connector: &TlsConnector,
    addr: SocketAddr,
    name: &str,
) -> std::io::Result<(CertificateDer<'static>, Option<Vec<u8>>, tokio_rustls::client::TlsStream<TcpStream>)> {
    let tcp = TcpStream::connect(addr).await?;
    let stream = connector.connect(ServerName::try_from(name.to_owned()).unwrap(), tcp).await?;
    let (_, session) = stream.get_ref();
    let served = session.peer_certificates().expect("a server certificate")[0].clone();
    let alpn = session.alpn_protocol().map(<[u8]>::to_vec);
    Ok((served, alpn, stream))
}

/// One GET over an established TLS stream, HTTP/1.1 or HTTP/2 as negotiated.
async fn get_over(stream: tokio_rustls::client::TlsStream<TcpStream>, h2: bool, host: &str) -> (u16, String) {
    let io = TokioIo::new(stream);
    let request = Request::get("/who").header("host", host).body(Empty::<bytes::Bytes>::new()).unwrap();
    let response = if h2 {
        let (mut sender, connection) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io).await.unwrap();
        tokio::spawn(connection);
        let request = Request::get(format!("https://{host}/who")).body(Empty::<bytes::Bytes>::new()).unwrap();
        sender.send_request(request).await.unwrap()
    } else {
        let (mut sender, connection) = hyper::client::conn::http1::handshake(io).await.unwrap();
        tokio::spawn(connection);
        sender.send_request(request).await.unwrap()
    };
    let status = response.status().as_u16();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

#[tokio::test]
async fn sni_chooses_the_certificate_and_a_client_without_sni_gets_the_first() {
    let authority = Authority::new();
    let backend = Backend::start("a").await;
    let (proxy, bots, api) = start(&authority, &backend, "").await;
    let client = authority.client(&[b"http/1.1"], true);

    let (served, _, stream) = connect(&client, proxy.addr, "api.example.test").await.unwrap();
    assert_eq!(served, api.der, "SNI api.example.test gets the api certificate");
    let (status, body) = get_over(stream, false, "api.example.test").await;
    assert_eq!((status, body.as_str()), (200, "a"));
    let (served, _, _) = connect(&client, proxy.addr, "jobs.api.example.test").await.unwrap();
    assert_eq!(served, api.der, "a wildcard name matches one level down");
    let (served, _, _) = connect(&client, proxy.addr, "bots.example.test").await.unwrap();
    assert_eq!(served, bots.der);

    // No SNI (or a name no certificate has): the first certificate.
    let (served, _, _) = connect(&authority.client(&[], false), proxy.addr, "bots.example.test").await.unwrap();
    assert_eq!(served, bots.der, "a client without SNI gets the default certificate");
    let unknown = connect(&client, proxy.addr, "other.example.test").await;
    assert!(unknown.is_err(), "a name no certificate has gets the default, which the client rejects");

    // The backend was told the client came over TLS.
    let headers = backend.stats.last_headers.lock().unwrap().clone().unwrap();
    assert_eq!(headers["x-forwarded-proto"], "https");
}

#[tokio::test]
async fn alpn_negotiates_h2_or_http1_and_both_serve_the_routes() {
    let authority = Authority::new();
    let backend = Backend::start("a").await;
    let (proxy, _, _) = start(&authority, &backend, "").await;

    let (_, alpn, stream) =
        connect(&authority.client(&[b"h2", b"http/1.1"], true), proxy.addr, "bots.example.test").await.unwrap();
    assert_eq!(alpn.as_deref(), Some(&b"h2"[..]), "h2 is preferred by default");
    assert_eq!(get_over(stream, true, "bots.example.test").await, (200, "a".to_owned()));

    let (_, alpn, stream) =
        connect(&authority.client(&[b"http/1.1"], true), proxy.addr, "bots.example.test").await.unwrap();
    assert_eq!(alpn.as_deref(), Some(&b"http/1.1"[..]));
    assert_eq!(get_over(stream, false, "bots.example.test").await, (200, "a".to_owned()));

    // A listener that offers only http/1.1 never agrees to h2.
    let (proxy, _, _) = start(&authority, &backend, "      alpn: [http/1.1]\n").await;
    let (_, alpn, stream) =
        connect(&authority.client(&[b"h2", b"http/1.1"], true), proxy.addr, "bots.example.test").await.unwrap();
    assert_eq!(alpn.as_deref(), Some(&b"http/1.1"[..]));
    assert_eq!(get_over(stream, false, "bots.example.test").await, (200, "a".to_owned()));
}

#[tokio::test]
async fn a_replaced_certificate_serves_after_a_reload_and_a_broken_one_keeps_the_old() {
    let authority = Authority::new();
    let backend = Backend::start("a").await;
    let (proxy, bots, _) = start(&authority, &backend, "").await;
    let connector = authority.client(&[b"http/1.1"], true);
    let addr = proxy.addr;

    // A client making new TLS connections all along.
    let running = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let traffic = tokio::spawn({
        let (connector, running) = (connector.clone(), Arc::clone(&running));
        async move {
            let (mut ok, mut failed) = (0, 0);
            while running.load(std::sync::atomic::Ordering::Relaxed) {
                let status = match connect(&connector, addr, "bots.example.test").await {
                    Ok((_, _, stream)) => get_over(stream, false, "bots.example.test").await.0,
                    Err(_) => 0,
                };
                if status == 200 {
                    ok += 1;
                } else {
                    failed += 1;
                }
            }
            (ok, failed)
        }
    });

    let renewed = authority.issue(&["bots.example.test"]);
    write(proxy.dir.path(), "bots", &renewed);
    assert_eq!(proxy.post_reload().await.status, 200);
    let (served, _, _) = connect(&connector, addr, "bots.example.test").await.unwrap();
    assert_eq!(served, renewed.der, "the new certificate serves after the reload");
    assert_ne!(served, bots.der);

    // A broken replacement: the reload fails and the last good one serves on.
    std::fs::write(proxy.dir.path().join("bots.pem"), "not a certificate").unwrap();
    let answer = proxy.post_reload().await;
    assert_eq!(answer.status, 400, "{}", answer.body);
    assert!(answer.body.contains("bots.pem"), "the failed reload names the file: {}", answer.body);
    let (served, _, _) = connect(&connector, addr, "bots.example.test").await.unwrap();
    assert_eq!(served, renewed.der);

    running.store(false, std::sync::atomic::Ordering::Relaxed);
    let (ok, failed) = traffic.await.unwrap();
    assert!(ok > 0);
    assert_eq!(failed, 0, "no request failed across the reloads");
}

#[tokio::test]
async fn a_client_that_never_finishes_its_handshake_is_closed() {
    let authority = Authority::new();
    let backend = Backend::start("a").await;
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "bots", &authority.issue(&["bots.example.test"]));
    write(dir.path(), "api", &authority.issue(&["api.example.test"]));
    let path = dir.path().join("switchyard.yaml");
    let yaml = format!("limits: {{ tls_handshake_timeout: 300ms }}\n{}", tls_config(&backend, ""));
    std::fs::write(&path, with_test_admin(&yaml)).unwrap();
    let proxy = FileProxy::start_at(dir, path).await;

    let mut silent = TcpStream::connect(proxy.addr).await.unwrap();
    let mut buf = [0u8; 1];
    let closed = tokio::time::timeout(Duration::from_secs(10), tokio::io::AsyncReadExt::read(&mut silent, &mut buf))
        .await
        .expect("the proxy closes a silent handshake within its timeout");
    assert!(matches!(closed, Ok(0) | Err(_)), "closed without a byte: {closed:?}");
}

#[test]
fn check_refuses_expired_mismatched_and_garbage_certificates_with_positions() {
    let authority = Authority::new();
    let good = authority.issue(&["bots.example.test"]);
    let other = authority.issue(&["bots.example.test"]);
    let expired = authority.issue_with(&["bots.example.test"], |params| {
        params.not_before = rcgen::date_time_ymd(2020, 1, 1);
        params.not_after = rcgen::date_time_ymd(2021, 1, 1);
    });
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "good", &good);
    write(dir.path(), "expired", &expired);
    std::fs::write(dir.path().join("other.key"), &other.key_pem).unwrap();
    std::fs::write(dir.path().join("garbage.pem"), "-----BEGIN CERTIFICATE-----\nnot base64!\n").unwrap();
    std::fs::write(dir.path().join("empty.pem"), "nothing here\n").unwrap();

    let tail = "routes:\n  - upstream: pool\nupstreams:\n  pool:\n    backends: [{ address: \"127.0.0.1:9000\" }]\n";
    let config = |cert: &str, key: &str| {
        format!("listeners:\n  - bind: \"127.0.0.1:8443\"\n    tls:\n      certificates:\n        - {{ cert: {cert}, key: {key} }}\n{tail}")
    };
    // (case, config, line, column, words): `cert` values start at column 19,
    // `key` values 7 columns after the cert value's end.
    let cases = [
        ("expired", config("expired.pem", "expired.key"), 5, 19, "expired on 2021-01-01T00:00:00Z"),
        ("key of another certificate", config("good.pem", "other.key"), 5, 34, "does not match certificate"),
        ("garbage", config("garbage.pem", "good.key"), 5, 19, "garbage.pem is not valid PEM"),
        ("no certificate in the file", config("empty.pem", "good.key"), 5, 19, "holds no PEM certificate"),
        ("missing file", config("missing.pem", "good.key"), 5, 19, "cannot read certificate"),
    ];
    for (case, text, line, column, words) in cases {
        let path = dir.path().join(format!("{}.yaml", case.replace(' ', "-")));
        std::fs::write(&path, &text).unwrap();
        assert_check_reports(&path, case, line, column, words);
    }
    let path = dir.path().join("good.yaml");
    std::fs::write(&path, config("good.pem", "good.key")).unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_switchyard")).arg("check").arg("-c").arg(&path).output().unwrap();
    assert_eq!(output.status.code(), Some(0), "{}", String::from_utf8_lossy(&output.stderr));
}

#[tokio::test]
async fn status_and_metrics_show_each_certificate_and_its_expiry() {
    let authority = Authority::new();
    let backend = Backend::start("a").await;
    let dir = tempfile::tempdir().unwrap();
    // 2030-01-01T00:00:00Z
    let expiring = authority.issue_with(&["bots.example.test"], |params| {
        params.not_after = rcgen::date_time_ymd(2030, 1, 1);
    });
    write(dir.path(), "bots", &expiring);
    write(dir.path(), "api", &authority.issue(&["api.example.test"]));
    let path = dir.path().join("switchyard.yaml");
    // A listener name of its own: metrics are process-wide in this test binary.
    let yaml = tls_config(&backend, "").edit("name: secure", "name: expiring");
    std::fs::write(&path, with_test_admin(&yaml)).unwrap();
    let proxy = FileProxy::start_at(dir, path).await;
    let left =
        1_893_456_000 - std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;

    let status = proxy.status().await;
    let certificates = &status["listeners"][0]["certificates"];
    assert_eq!(certificates[0]["names"], serde_json::json!(["bots.example.test"]));
    assert_eq!(certificates[0]["not_after"], "2030-01-01T00:00:00Z");
    assert!((certificates[0]["expires_in_seconds"].as_i64().unwrap() - left).abs() < 60, "{certificates}");
    assert_eq!(certificates[1]["names"], serde_json::json!(["api.example.test"]));

    let client = authority.client(&[b"http/1.1"], true);
    let (_, _, stream) = connect(&client, proxy.addr, "bots.example.test").await.unwrap();
    assert_eq!(get_over(stream, false, "bots.example.test").await.0, 200);
    // A client that rejects the certificate it is given: a failed handshake.
    assert!(connect(&client, proxy.addr, "other.example.test").await.is_err());

    let metrics_url = format!("http://{}/metrics", proxy.admin);
    wait_until_async("the handshakes to be counted", || async {
        let scrape = scrape(&metrics_url).await;
        let count = |result| {
            metric_value(&scrape, "switchyard_tls_handshakes_total", &[("listener", "expiring"), ("result", result)])
        };
        count("ok") == Some(1.0) && count("failed") == Some(1.0)
    })
    .await;
    let scrape = scrape(&metrics_url).await;
    let expiry = metric_value(
        &scrape,
        "switchyard_certificate_expiry_timestamp_seconds",
        &[("listener", "expiring"), ("name", "bots.example.test")],
    )
    .expect("an expiry gauge per certificate");
    assert_eq!(expiry, 1_893_456_000.0, "2030-01-01T00:00:00Z, in seconds since the epoch");
    assert_promtool_accepts(&metrics_url).await;
}

/// Runs a command to its end off the async runtime; (exit success, stdout + stderr).
async fn run(program: &str, args: Vec<String>, stdin: Vec<u8>) -> (bool, String) {
    let program = program.to_owned();
    tokio::task::spawn_blocking(move || {
        use std::io::Write;
        let mut child = Command::new(&program)
            .args(&args)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("{program} (scripts/install-test-deps installs it): {e}"));
        child.stdin.take().unwrap().write_all(&stdin).unwrap();
        let output = child.wait_with_output().unwrap();
        let text = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
        (output.status.success(), text)
    })
    .await
    .unwrap()
}

/// `openssl s_client` with `version` (`-tls1`, `-tls1_1`, `-tls1_2`, `-tls1_3`)
/// and SNI `name`: whether the handshake succeeded, and the PEM it was served.
async fn s_client(addr: SocketAddr, name: &str, version: &str) -> (bool, String) {
    // SECLEVEL=0: the client itself must be willing to speak TLS 1.0 and 1.1,
    // so that a refusal is the proxy's.
    let args =
        ["s_client", "-connect", &addr.to_string(), "-servername", name, version, "-cipher", "DEFAULT:@SECLEVEL=0"];
    let (_, text) = run("openssl", args.iter().map(|a| a.to_string()).collect(), b"Q\n".to_vec()).await;
    let pem = text.find("-----BEGIN CERTIFICATE-----").and_then(|start| {
        text[start..].find("-----END CERTIFICATE-----").map(|end| text[start..start + end + 25].to_owned())
    });
    (pem.is_some(), pem.unwrap_or(text))
}

#[tokio::test]
async fn openssl_curl_and_nghttp_see_sni_alpn_and_no_old_protocols() {
    let authority = Authority::new();
    let backend = Backend::start("a").await;
    let (proxy, _, _) = start(&authority, &backend, "").await;

    // SNI with openssl: the certificate for the name asked.
    let (ok, pem) = s_client(proxy.addr, "api.example.test", "-tls1_2").await;
    assert!(ok, "TLS 1.2 handshake: {pem}");
    let (_, names) =
        run("openssl", vec!["x509".into(), "-noout".into(), "-ext".into(), "subjectAltName".into()], pem.into_bytes())
            .await;
    assert!(names.contains("DNS:api.example.test"), "{names}");
    let (ok, text) = s_client(proxy.addr, "bots.example.test", "-tls1_3").await;
    assert!(ok, "TLS 1.3 handshake: {text}");
    for old in ["-tls1", "-tls1_1"] {
        let (ok, text) = s_client(proxy.addr, "bots.example.test", old).await;
        assert!(!ok, "{old} must be refused: {text}");
        // An alert from the server (protocol version, or handshake failure for
        // TLS 1.0 hellos that offer nothing it has), not the client refusing.
        assert!(text.contains("SSL alert number"), "{old}: the proxy's refusal, not the client's: {text}");
    }

    // ALPN with curl and nghttp.
    let ca = proxy.dir.path().join("ca.pem");
    std::fs::write(&ca, authority.issuer.pem()).unwrap();
    let port = proxy.addr.port();
    let url = format!("https://bots.example.test:{port}/");
    let curl = |http: &str| {
        vec![
            "-sS".to_owned(),
            // Straight to loopback, whatever https_proxy the environment sets.
            "--noproxy".to_owned(),
            "*".to_owned(),
            http.to_owned(),
            "--cacert".to_owned(),
            ca.display().to_string(),
            "--resolve".to_owned(),
            format!("bots.example.test:{port}:127.0.0.1"),
            "-w".to_owned(),
            " %{http_version}".to_owned(),
            url.clone(),
        ]
    };
    assert_eq!(run("curl", curl("--http2"), Vec::new()).await, (true, "a 2".to_owned()));
    assert_eq!(run("curl", curl("--http1.1"), Vec::new()).await, (true, "a 1.1".to_owned()));
    let (ok, text) = run("nghttp", vec!["-v".into(), format!("https://127.0.0.1:{port}/")], Vec::new()).await;
    assert!(ok && text.contains("negotiated protocol: h2"), "{text}");
}

#[tokio::test]
async fn a_certificate_renewed_in_a_kubernetes_style_secret_volume_serves_without_a_manual_reload() {
    let authority = Authority::new();
    let backend = Backend::start("a").await;
    let dir = tempfile::tempdir().unwrap();
    // A Secret volume: certs/tls.crt -> ..data/tls.crt, ..data -> ..v1; the
    // kubelet writes ..v2 and swaps ..data in one rename.
    let certs = dir.path().join("certs");
    let version = |name: &str, issued: &Issued| {
        let versioned = certs.join(name);
        std::fs::create_dir_all(&versioned).unwrap();
        std::fs::write(versioned.join("tls.crt"), &issued.cert_pem).unwrap();
        std::fs::write(versioned.join("tls.key"), &issued.key_pem).unwrap();
    };
    let first = authority.issue(&["bots.example.test"]);
    version("..v1", &first);
    std::os::unix::fs::symlink("..v1", certs.join("..data")).unwrap();
    std::os::unix::fs::symlink("..data/tls.crt", certs.join("tls.crt")).unwrap();
    std::os::unix::fs::symlink("..data/tls.key", certs.join("tls.key")).unwrap();
    let yaml = format!(
        "listeners:\n  - bind: \"127.0.0.1:0\"\n    tls:\n      certificates: [{{ cert: certs/tls.crt, key: certs/tls.key }}]\nroutes:\n  - upstream: pool\nupstreams:\n  pool:\n    backends: [{{ address: \"{}\" }}]\n",
        backend.addr
    );
    let path = dir.path().join("switchyard.yaml");
    std::fs::write(&path, with_test_admin(&yaml)).unwrap();
    let proxy = FileProxy::start_at(dir, path).await;
    let client = authority.client(&[b"http/1.1"], true);
    assert_eq!(connect(&client, proxy.addr, "bots.example.test").await.unwrap().0, first.der);

    let renewed = authority.issue(&["bots.example.test"]);
    version("..v2", &renewed);
    std::os::unix::fs::symlink("..v2", certs.join("..data_tmp")).unwrap();
    std::fs::rename(certs.join("..data_tmp"), certs.join("..data")).unwrap();

    proxy.wait_for_generation(2).await;
    assert_eq!(connect(&client, proxy.addr, "bots.example.test").await.unwrap().0, renewed.der);
    // The config file itself did not change: touching it does not reload again.
    std::fs::write(&proxy.path, std::fs::read(&proxy.path).unwrap()).unwrap();
    let unchanged = proxy.status().await["reloads"]["unchanged"].as_u64().unwrap();
    wait_until_async("the touch to be seen as unchanged", || async {
        proxy.status().await["reloads"]["unchanged"].as_u64().unwrap() > unchanged
    })
    .await;
    assert_eq!(proxy.generation().await, 2);
}

/// A backend that speaks only TLS (HTTP/1.1 and HTTP/2 by ALPN) with a
/// certificate from `authority` for `bots.example.test`, and, with
/// `require_client_cert`, only to clients with a certificate from it. Answers
/// with the HTTP version it saw and whether the client showed a certificate.
async fn tls_backend(authority: &Authority, require_client_cert: bool) -> SocketAddr {
    let issued = authority.issue(&["bots.example.test"]);
    let chain = vec![issued.der.clone()];
    let key = <rustls::pki_types::PrivateKeyDer as rustls::pki_types::pem::PemObject>::from_pem_slice(
        issued.key_pem.as_bytes(),
    )
    .unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .unwrap();
    let builder = if require_client_cert {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(authority.issuer.der().clone()).unwrap();
        builder.with_client_cert_verifier(
            rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider).build().unwrap(),
        )
    } else {
        builder.with_no_client_auth()
    };
    let mut config = builder.with_single_cert(chain, key).unwrap();
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else { return };
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(stream) = acceptor.accept(tcp).await else { return };
                let client_cert = stream.get_ref().1.peer_certificates().is_some();
                let service = hyper::service::service_fn(move |request: Request<hyper::body::Incoming>| async move {
                    let text = format!("{:?} client-cert={client_cert}", request.version());
                    Ok::<_, std::convert::Infallible>(hyper::Response::new(http_body_util::Full::new(
                        bytes::Bytes::from(text),
                    )))
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    addr
}

/// A plain listener in front of one TLS upstream with `tls` settings, files in `dir`.
fn upstream_tls_config(backend: SocketAddr, protocol: &str, tls: &str) -> String {
    format!(
        "listeners:\n  - bind: \"127.0.0.1:0\"\nroutes:\n  - upstream: secure\nupstreams:\n  secure:\n    protocol: {protocol}\n    tls: {tls}\n    backends: [{{ address: \"{backend}\" }}]\n"
    )
}

async fn start_in(dir: tempfile::TempDir, yaml: &str) -> FileProxy {
    let path = dir.path().join("switchyard.yaml");
    std::fs::write(&path, with_test_admin(yaml)).unwrap();
    FileProxy::start_at(dir, path).await
}

#[tokio::test]
async fn https_and_http2_over_tls_to_backends_with_a_pinned_ca_and_server_name() {
    let authority = Authority::new();
    let backend = tls_backend(&authority, false).await;
    for (protocol, version) in [("http1", "HTTP/1.1"), ("h2", "HTTP/2.0")] {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("ca.pem"), authority.issuer.pem()).unwrap();
        let tls = "{ ca: ca.pem, server_name: bots.example.test }";
        let proxy = start_in(dir, &upstream_tls_config(backend, protocol, tls)).await;
        for _ in 0..3 {
            let answer = get(&client(), &proxy.url("/")).await;
            assert_eq!(answer.status, 200, "{protocol}: {}", answer.body);
            assert_eq!(answer.body, format!("{version} client-cert=false"), "{protocol}");
        }
    }
}

#[tokio::test]
async fn mutual_tls_to_a_backend_that_requires_a_client_certificate() {
    let authority = Authority::new();
    let backend = tls_backend(&authority, true).await;
    let client_cert = authority.issue(&["switchyard.example.test"]);
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("ca.pem"), authority.issuer.pem()).unwrap();
    write(dir.path(), "client", &client_cert);
    let tls = "{ ca: ca.pem, server_name: bots.example.test, client_cert: client.pem, client_key: client.key }";
    let proxy = start_in(dir, &upstream_tls_config(backend, "http1", tls)).await;
    let answer = get(&client(), &proxy.url("/")).await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    assert_eq!(answer.body, "HTTP/1.1 client-cert=true");

    // Without the client certificate the backend refuses the handshake.
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("ca.pem"), authority.issuer.pem()).unwrap();
    let proxy =
        start_in(dir, &upstream_tls_config(backend, "http1", "{ ca: ca.pem, server_name: bots.example.test }")).await;
    let answer = get(&client(), &proxy.url("/")).await;
    assert_eq!(answer.status, 502, "{}", answer.body);
    assert_eq!(answer.error_code(), Some("upstream_connect"));
}

#[tokio::test]
async fn a_backend_certificate_from_another_ca_is_a_502_and_a_log_line_that_says_why() {
    let authority = Authority::new();
    let stranger = Authority::named("Some other CA");
    let backend = tls_backend(&stranger, false).await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("ca.pem"), authority.issuer.pem()).unwrap();
    let port = free_port();
    let yaml = upstream_tls_config(backend, "http1", "{ ca: ca.pem, server_name: bots.example.test }")
        .edit("127.0.0.1:0", &format!("127.0.0.1:{port}"));
    let path = dir.path().join("switchyard.yaml");
    std::fs::write(&path, with_test_admin(&yaml)).unwrap();
    let log = dir.path().join("proxy.log");
    let _proxy = LoggingProxy::start(&path, &log);
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    wait_until_async("the proxy to listen", || async { TcpStream::connect(addr).await.is_ok() }).await;
    let answer = get(&client(), &format!("http://{addr}/")).await;
    let line = wait_for_log_line(&log, "cannot connect to backend over TLS").await;
    assert_eq!(answer.status, 502, "{}", answer.body);
    assert_eq!(answer.error_code(), Some("upstream_connect"));
    assert!(line.contains("UnknownIssuer") && line.contains(&backend.to_string()), "{line}");
}

#[test]
fn check_refuses_upstream_tls_settings_that_cannot_work() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("empty.pem"), "nothing\n").unwrap();
    let head = "listeners:\n  - bind: \"127.0.0.1:8080\"\nroutes:\n  - upstream: pool\nupstreams:\n  pool:\n";
    let backends = "    backends: [{ address: \"127.0.0.1:9443\" }]\n";
    // (case, upstream keys, line, column, words)
    let cases = [
        ("h2 without tls", "    protocol: h2\n", 7, 15, "add `tls:`"),
        ("tls with h2c", "    protocol: h2c\n    tls: {}\n", 8, 10, "use protocol `h2`"),
        ("client_cert without key", "    tls: { client_cert: c.pem }\n", 7, 25, "client_cert needs client_key"),
        ("a CA bundle without certificates", "    tls: { ca: empty.pem }\n", 7, 16, "holds no PEM certificate"),
        ("a missing CA bundle", "    tls: { ca: missing.pem }\n", 7, 16, "cannot read CA bundle"),
    ];
    for (case, keys, line, column, words) in cases {
        let path = dir.path().join(format!("{}.yaml", case.replace(' ', "-")));
        std::fs::write(&path, format!("{head}{keys}{backends}")).unwrap();
        assert_check_reports(&path, case, line, column, words);
    }
}

#[tokio::test]
async fn active_checks_of_a_tls_upstream_go_over_tls_with_its_ca() {
    let authority = Authority::new();
    let backend = tls_backend(&authority, false).await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("ca.pem"), authority.issuer.pem()).unwrap();
    std::fs::write(dir.path().join("other-ca.pem"), Authority::named("Some other CA").issuer.pem()).unwrap();
    // The same backend in two upstreams: one trusts its CA, one does not.
    let check = "    health: { active: { kind: http, path: /, interval: 200ms, timeout: 200ms, healthy_after: 1, unhealthy_after: 1 } }\n";
    let yaml = format!(
        "listeners:\n  - bind: \"127.0.0.1:0\"\nroutes:\n  - upstream: trusted\nupstreams:\n  trusted:\n    tls: {{ ca: ca.pem, server_name: bots.example.test }}\n{check}    backends: [{{ address: \"{backend}\" }}]\n  untrusted:\n    tls: {{ ca: other-ca.pem, server_name: bots.example.test }}\n{check}    backends: [{{ address: \"{backend}\" }}]\n"
    );
    let proxy = start_in(dir, &yaml).await;
    let check_of = |status: &serde_json::Value, upstream: &str| {
        let upstreams = status["upstreams"].as_array().unwrap().clone();
        let found = upstreams.into_iter().find(|u| u["name"] == upstream).unwrap();
        found["backends"][0]["active_check"].clone()
    };
    wait_until_async("both checks to report", || async {
        let status = proxy.status().await;
        check_of(&status, "trusted")["last_reason"].is_string()
            && check_of(&status, "untrusted")["last_reason"].is_string()
    })
    .await;
    let status = proxy.status().await;
    let (trusted, untrusted) = (check_of(&status, "trusted"), check_of(&status, "untrusted"));
    assert_eq!(trusted["healthy"], true, "{trusted}");
    assert_eq!(trusted["last_reason"], "status 200", "{trusted}");
    assert_eq!(untrusted["healthy"], false, "{untrusted}");
    assert!(untrusted["last_reason"].as_str().unwrap().contains("UnknownIssuer"), "{untrusted}");
    let answer = get(&client(), &proxy.url("/")).await;
    assert_eq!((answer.status.as_u16(), answer.body.as_str()), (200, "HTTP/1.1 client-cert=false"));
}

#[tokio::test]
async fn grpc_over_tls_end_to_end_unary_and_streaming_with_trailers() {
    let authority = Authority::new();
    // The bot service: tonic's health service over TLS only.
    let backend_cert = authority.issue(&["grpc.example.test"]);
    let (reporter, service) = tonic_health::server::health_reporter();
    reporter.set_service_status("bots.Runner", tonic_health::ServingStatus::Serving).await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let backend_addr = listener.local_addr().unwrap();
    let identity = tonic::transport::Identity::from_pem(&backend_cert.cert_pem, &backend_cert.key_pem);
    tokio::spawn(
        tonic::transport::Server::builder()
            .tls_config(tonic::transport::ServerTlsConfig::new().identity(identity))
            .unwrap()
            .add_service(service)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );

    // The proxy: TLS listener, `protocol: h2` with TLS towards the service.
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "bots", &authority.issue(&["bots.example.test"]));
    std::fs::write(dir.path().join("ca.pem"), authority.issuer.pem()).unwrap();
    let yaml = format!(
        "listeners:\n  - bind: \"127.0.0.1:0\"\n    tls:\n      certificates: [{{ cert: bots.pem, key: bots.key }}]\nroutes:\n  - upstream: grpc\nupstreams:\n  grpc:\n    protocol: h2\n    tls: {{ ca: ca.pem, server_name: grpc.example.test }}\n    health: {{ active: {{ kind: grpc, service: bots.Runner, interval: 200ms, timeout: 200ms, healthy_after: 1 }} }}\n    backends: [{{ address: \"{backend_addr}\" }}]\n"
    );
    let proxy = start_in(dir, &yaml).await;
    // Its gRPC health check goes over TLS too.
    wait_until_async("the gRPC check over TLS to pass", || async {
        proxy.status().await["upstreams"][0]["backends"][0]["active_check"]["last_reason"] == "SERVING"
    })
    .await;

    let ca = tonic::transport::Certificate::from_pem(authority.issuer.pem());
    let channel = tonic::transport::Channel::from_shared(format!("https://127.0.0.1:{}", proxy.addr.port()))
        .unwrap()
        .tls_config(tonic::transport::ClientTlsConfig::new().ca_certificate(ca).domain_name("bots.example.test"))
        .unwrap()
        .connect()
        .await
        .expect("a TLS connection to the proxy, ALPN h2");
    crate::grpc::exercise_health_calls(channel, &reporter).await;
}

#[tokio::test]
async fn a_returning_client_resumes_its_session() {
    let authority = Authority::new();
    let backend = Backend::start("a").await;
    let (proxy, _, _) = start(&authority, &backend, "").await;
    // One client config, hence one session store, for both connections.
    let client = authority.client(&[b"http/1.1"], true);
    for expected in [rustls::HandshakeKind::Full, rustls::HandshakeKind::Resumed] {
        let (_, _, stream) = connect(&client, proxy.addr, "bots.example.test").await.unwrap();
        let kind = stream.get_ref().1.handshake_kind();
        // The ticket arrives after the handshake: one exchange lets the client keep it.
        assert_eq!(get_over(stream, false, "bots.example.test").await.0, 200);
        assert_eq!(kind, Some(expected));
    }
}
