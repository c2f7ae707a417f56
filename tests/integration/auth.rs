//! Access control at the edge, credentials: a route's `auth:` with real
//! credentials made at test time — client certificates from an rcgen CA
//! over a real TLS handshake, JWTs signed with an RSA key from openssl and
//! an EC key from rcgen, served as a JWKS file and from a JWKS HTTP
//! endpoint that rotates its key, API keys from a file of hashes. Refused
//! requests never reach the backend; what passed reaches it as the route's
//! headers, never as the client's own.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use http::Request;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use serde_json::{json, Value};
use tokio::net::TcpStream;

use crate::support::*;

// ---- tokens ----------------------------------------------------------------

/// A signing key with its public JWK.
struct SigningKey {
    kid: String,
    algorithm: Algorithm,
    encoding: EncodingKey,
    jwk: Value,
    /// The public key as PEM (what an attacker may know of it).
    public_pem: Vec<u8>,
}

impl SigningKey {
    /// A 2048-bit RSA key from openssl.
    fn rsa(kid: &str) -> SigningKey {
        let dir = tempfile::tempdir().unwrap();
        let private = dir.path().join("key.pem");
        let public = dir.path().join("public.pem");
        let made = std::process::Command::new("openssl")
            .args(["genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048", "-out"])
            .arg(&private)
            .output()
            .expect("openssl runs (scripts/install-test-deps installs it)");
        assert!(made.status.success(), "{}", String::from_utf8_lossy(&made.stderr));
        let made = std::process::Command::new("openssl")
            .arg("pkey")
            .arg("-in")
            .arg(&private)
            .arg("-pubout")
            .arg("-out")
            .arg(&public)
            .output()
            .unwrap();
        assert!(made.status.success());
        let encoding = EncodingKey::from_rsa_pem(&std::fs::read(&private).unwrap()).unwrap();
        SigningKey::with_jwk(kid, Algorithm::RS256, encoding, std::fs::read(&public).unwrap())
    }

    /// A P-256 key from rcgen.
    fn ec(kid: &str) -> SigningKey {
        let pair = KeyPair::generate().unwrap();
        let encoding = EncodingKey::from_ec_pem(pair.serialize_pem().as_bytes()).unwrap();
        SigningKey::with_jwk(kid, Algorithm::ES256, encoding, pair.public_key_pem().into_bytes())
    }

    fn with_jwk(kid: &str, algorithm: Algorithm, encoding: EncodingKey, public_pem: Vec<u8>) -> SigningKey {
        // As the proxy does when it starts: the signature checks below are ring's.
        switchyard::auth::crypto::install();
        let mut jwk =
            serde_json::to_value(jsonwebtoken::jwk::Jwk::from_encoding_key(&encoding, algorithm).unwrap()).unwrap();
        jwk["kid"] = json!(kid);
        jwk["use"] = json!("sig");
        SigningKey { kid: kid.to_owned(), algorithm, encoding, jwk, public_pem }
    }

    fn sign(&self, claims: &Value) -> String {
        let mut header = Header::new(self.algorithm);
        header.kid = Some(self.kid.clone());
        jsonwebtoken::encode(&header, claims, &self.encoding).unwrap()
    }
}

fn key_set(keys: &[&SigningKey]) -> String {
    json!({ "keys": keys.iter().map(|key| key.jwk.clone()).collect::<Vec<_>>() }).to_string()
}

fn now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs()
}

/// Claims the test routes accept, with `changes` merged in.
fn claims(changes: Value) -> Value {
    let mut claims = json!({
        "iss": "https://idp.test", "aud": "bots", "sub": "alice", "exp": now() + 600, "tenant": "acme",
    });
    for (name, value) in changes.as_object().unwrap() {
        claims[name] = value.clone();
    }
    claims
}

fn base64url(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

/// The route's settings checked against the test claims.
const JWT_RULES: &str = "issuers: [\"https://idp.test\"], audiences: [bots], required_claims: [tenant], \
                         forward_claims: { sub: x-user, tenant: x-tenant }";

fn proxy_config(backend: SocketAddr, auth: &str, extra_routes: &str) -> String {
    format!(
        "listeners:\n  - {{ name: main, bind: \"127.0.0.1:0\" }}\nroutes:\n  - {{ name: {{NAME}}, match: {{ path_prefix: /jobs }}, upstream: bots, auth: {auth} }}\n{extra_routes}  - {{ name: {{NAME}}-open, upstream: bots }}\nupstreams:\n  bots: {{ backends: [{{ address: \"{backend}\" }}] }}\n"
    )
}

fn named(yaml: String, name: &str) -> String {
    yaml.replace("{NAME}", name)
}

fn seen(backend: &Backend, header: &str) -> Option<String> {
    let headers = backend.stats.last_headers.lock().unwrap();
    headers.as_ref()?.get(header).map(|value| value.to_str().unwrap().to_owned())
}

#[tokio::test]
async fn a_jwt_route_takes_only_good_tokens_and_forwards_their_claims_not_the_clients_headers() {
    let backend = Backend::start("bot").await;
    let (rsa, ec) = (SigningKey::rsa("rsa-1"), SigningKey::ec("ec-1"));
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("jwks.json"), key_set(&[&rsa, &ec])).unwrap();
    let yaml = proxy_config(backend.addr, &format!("{{ jwt: {{ jwks_file: jwks.json, {JWT_RULES} }} }}"), "");
    let path = dir.path().join("switchyard.yaml");
    std::fs::write(&path, with_test_admin(&named(yaml, "jwt-file"))).unwrap();
    let proxy = FileProxy::start_at(dir, path).await;
    let client = client();
    let url = proxy.url("/jobs/1");

    // Good tokens of either key pass; the backend sees the claims in the
    // route's headers (not the client's own x-user, nor an x_user that
    // CGI-style backends would read as one, nor without them because the
    // client listed them in Connection) and no token.
    let good = rsa.sign(&claims(json!({})));
    let forged = [
        ("authorization", bearer(&good)),
        ("x-user", "mallory".to_owned()),
        ("x_user", "mallory".to_owned()),
        ("connection", "keep-alive, x-user, x-tenant".to_owned()),
    ];
    let answer = get_with(&client, &url, &forged.iter().map(|(n, v)| (*n, v.as_str())).collect::<Vec<_>>()).await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    assert_eq!(seen(&backend, "x-user").as_deref(), Some("alice"));
    assert_eq!(seen(&backend, "x-tenant").as_deref(), Some("acme"));
    assert_eq!(seen(&backend, "authorization"), None, "the token is stripped");
    assert_eq!(seen(&backend, "x_user"), None);
    let by_ec = ec.sign(&claims(json!({ "sub": "bob" })));
    assert_eq!(get_with(&client, &url, &[("authorization", &bearer(&by_ec))]).await.status, 200);
    assert_eq!(seen(&backend, "x-user").as_deref(), Some("bob"));
    assert_eq!(backend.hits(), 2);

    // Every bad token is refused with 401 and a challenge, and reaches nothing.
    let other_rsa = SigningKey::rsa("rsa-1");
    let none_token = format!(
        "{}.{}.",
        base64url(br#"{"alg":"none","typ":"JWT","kid":"rsa-1"}"#),
        base64url(claims(json!({})).to_string().as_bytes())
    );
    let mut hs_header = Header::new(Algorithm::HS256);
    hs_header.kid = Some("rsa-1".to_owned());
    let confused =
        jsonwebtoken::encode(&hs_header, &claims(json!({})), &EncodingKey::from_secret(&rsa.public_pem).unwrap())
            .unwrap();
    let no_tenant = {
        let mut claims = claims(json!({}));
        claims.as_object_mut().unwrap().remove("tenant");
        rsa.sign(&claims)
    };
    let bad = [
        ("expired", rsa.sign(&claims(json!({ "exp": now() - 3600 })))),
        ("wrong audience", rsa.sign(&claims(json!({ "aud": "billing" })))),
        ("wrong issuer", rsa.sign(&claims(json!({ "iss": "https://evil.test" })))),
        ("alg none", none_token),
        ("HS256 keyed with the RSA public key", confused),
        ("signed by another key with the same kid", other_rsa.sign(&claims(json!({})))),
        ("an unknown kid", SigningKey::ec("ec-9").sign(&claims(json!({})))),
        ("without a required claim", no_tenant),
        ("not yet valid", rsa.sign(&claims(json!({ "nbf": now() + 3600 })))),
        ("garbage", "not.a.token".to_owned()),
    ];
    for (what, token) in &bad {
        let answer = get_with(&client, &url, &[("authorization", &bearer(token))]).await;
        assert_eq!((answer.status.as_u16(), answer.error_code()), (401, Some("unauthenticated")), "{what}");
        let challenge = answer.headers.get("www-authenticate").map(|v| v.to_str().unwrap().to_owned());
        assert_eq!(challenge.as_deref(), Some("Bearer realm=\"switchyard\", error=\"invalid_token\""), "{what}");
    }
    let missing = get(&client, &url).await;
    assert_eq!(missing.status, 401);
    assert_eq!(missing.headers.get("www-authenticate").unwrap(), "Bearer realm=\"switchyard\"");
    // A verified token remembered by the cache is still checked for expiry:
    // the first good token again passes, and the route without auth asks nothing.
    assert_eq!(get_with(&client, &url, &[("authorization", &bearer(&good))]).await.status, 200);
    assert_eq!(get(&client, &proxy.url("/open")).await.status, 200);
    assert_eq!(backend.hits(), 4, "no refused request reached the backend");

    let metrics = scrape(&format!("http://{}/metrics", proxy.admin)).await;
    let refused = metric_value(&metrics, "switchyard_access_denied_total", &[("route", "jwt-file"), ("reason", "jwt")]);
    assert_eq!(refused, Some((bad.len() + 1) as f64));

    // `/explain` says what the route asks and what it makes of a token.
    let admin = proxy.admin;
    let explain = |header: String| async move {
        let target = format!("http://{admin}/explain?path=/jobs/9&header={}", urlencode(&header));
        serde_json::from_str::<Value>(&get(&crate::support::client(), &target).await.body).unwrap()
    };
    let passes = explain(format!("Authorization: Bearer {good}")).await;
    assert!(passes["auth"].as_str().unwrap().contains("passes as \"alice\""), "{passes}");
    let fails = explain(format!("Authorization: Bearer {}", bad[0].1)).await;
    assert!(fails["decision"].as_str().unwrap().contains("expired: 401 unauthenticated"), "{fails}");
}

fn urlencode(text: &str) -> String {
    text.bytes()
        .map(|byte| match byte {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (byte as char).to_string(),
            _ => format!("%{byte:02X}"),
        })
        .collect()
}

/// A JWKS endpoint whose document and status the test changes, counting fetches.
struct JwksServer {
    addr: SocketAddr,
    document: Arc<Mutex<(u16, String)>>,
    fetches: Arc<AtomicUsize>,
}

impl JwksServer {
    async fn start(document: String) -> JwksServer {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let document = Arc::new(Mutex::new((200, document)));
        let fetches = Arc::new(AtomicUsize::new(0));
        let (served, counted) = (Arc::clone(&document), Arc::clone(&fetches));
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else { continue };
                let (served, counted) = (Arc::clone(&served), Arc::clone(&counted));
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |_request| {
                        let (status, body) = served.lock().unwrap().clone();
                        counted.fetch_add(1, Ordering::SeqCst);
                        async move {
                            let mut response = http::Response::new(full(body));
                            *response.status_mut() = http::StatusCode::from_u16(status).unwrap();
                            Ok::<_, Infallible>(response)
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        JwksServer { addr, document, fetches }
    }

    fn serve(&self, status: u16, document: String) {
        *self.document.lock().unwrap() = (status, document);
    }
}

#[tokio::test]
async fn a_jwks_url_is_fetched_follows_its_key_rotation_and_keeps_the_last_good_set() {
    let backend = Backend::start("bot").await;
    let (first, second) = (SigningKey::ec("first"), SigningKey::ec("second"));
    let jwks = JwksServer::start(key_set(&[&first])).await;
    let auth = format!("{{ jwt: {{ jwks_url: \"http://{}/jwks.json\", refresh: 1s, {JWT_RULES} }} }}", jwks.addr);
    let proxy = FileProxy::start(&named(proxy_config(backend.addr, &auth, ""), "jwt-url")).await;
    let client = client();
    let url = proxy.url("/jobs/1");
    let with = |token: &str| vec![("authorization".to_owned(), bearer(token))];
    let status = |headers: Vec<(String, String)>| {
        let (client, url) = (client.clone(), url.clone());
        async move {
            let headers: Vec<(&str, &str)> = headers.iter().map(|(n, v)| (n.as_str(), v.as_str())).collect();
            get_with(&client, &url, &headers).await.status.as_u16()
        }
    };
    let by_first = first.sign(&claims(json!({})));
    wait_until_async("the first key set is fetched", || async { status(with(&by_first)).await == 200 }).await;
    assert_eq!(status(with(&by_first)).await, 200);

    // The identity provider rotates: a token of the new key brings the new set.
    jwks.serve(200, key_set(&[&second]));
    let by_second = second.sign(&claims(json!({ "sub": "bob" })));
    wait_until_async("a token of the rotated key passes", || async { status(with(&by_second)).await == 200 }).await;
    assert_eq!(seen(&backend, "x-user").as_deref(), Some("bob"));
    assert_eq!(status(with(&by_first)).await, 401, "the retired key's tokens, even remembered ones, are refused");

    // The endpoint breaks: the last good set is kept through failed fetches.
    jwks.serve(500, "down".to_owned());
    let before = jwks.fetches.load(Ordering::SeqCst);
    wait_until_async("two fetches fail", || async { jwks.fetches.load(Ordering::SeqCst) >= before + 2 }).await;
    assert_eq!(status(with(&by_second)).await, 200);
    jwks.serve(200, "{\"keys\": []}".to_owned());
    let before = jwks.fetches.load(Ordering::SeqCst);
    wait_until_async("an empty set is fetched", || async { jwks.fetches.load(Ordering::SeqCst) >= before + 2 }).await;
    assert_eq!(status(with(&by_second)).await, 200, "a set with no key is not a good set");
}

/// `sha256sum` of a key, as the key file holds it.
fn sha256_hex(key: &str) -> String {
    ring::digest::digest(&ring::digest::SHA256, key.as_bytes()).as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

#[tokio::test]
async fn api_keys_are_checked_against_a_file_of_hashes_and_a_reload_changes_them_without_losing_a_request() {
    let backend = Backend::start("bot").await;
    let dir = tempfile::tempdir().unwrap();
    let (robot_key, later_key) = ("k-robot-0f3a9c1e77b24d0e", "k-later-5d6e7f8091a2b3c4");
    std::fs::write(dir.path().join("keys.txt"), format!("# test keys\nrobot-1:{}\n", sha256_hex(robot_key))).unwrap();
    let auth = "{ api_key: { file: keys.txt, forward_header: x-api-client } }";
    let yaml = named(proxy_config(backend.addr, auth, ""), "api-key");
    let path = dir.path().join("switchyard.yaml");
    std::fs::write(&path, with_test_admin(&yaml)).unwrap();
    let proxy = FileProxy::start_at(dir, path).await;
    let client = client();
    let url = proxy.url("/jobs/1");

    let forged = [("x-api-key", robot_key), ("x-api-client", "someone-else")];
    assert_eq!(get_with(&client, &url, &forged).await.status, 200);
    assert_eq!(seen(&backend, "x-api-client").as_deref(), Some("robot-1"));
    assert_eq!(seen(&backend, "x-api-key"), None, "the key is stripped");
    for (what, headers) in [
        ("no key", vec![]),
        ("an unknown key", vec![("x-api-key", later_key)]),
        ("the key twice", vec![("x-api-key", robot_key), ("x-api-key", robot_key)]),
        ("the hash for the key", vec![("x-api-key", sha256_hex(robot_key).leak() as &str)]),
    ] {
        let answer = get_with(&client, &url, &headers).await;
        assert_eq!((answer.status.as_u16(), answer.error_code()), (401, Some("unauthenticated")), "{what}");
        assert_eq!(answer.headers.get("www-authenticate").unwrap(), "ApiKey realm=\"switchyard\"", "{what}");
    }
    assert_eq!(backend.hits(), 1);

    // Requests flow while a reload adds a key: none is lost or refused.
    let running = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let load = {
        let (client, url, running) = (client.clone(), url.clone(), Arc::clone(&running));
        tokio::spawn(async move {
            let (mut sent, mut failures) = (0, Vec::new());
            while running.load(Ordering::SeqCst) || sent < 50 {
                let answer = get_with(&client, &url, &[("x-api-key", robot_key)]).await;
                sent += 1;
                if answer.status != 200 {
                    failures.push(format!("{} {}", answer.status, answer.body));
                }
            }
            (sent, failures)
        })
    };
    let generation = proxy.generation().await;
    let keys = format!("robot-1:{}\nlater:{}\n", sha256_hex(robot_key), sha256_hex(later_key));
    std::fs::write(proxy.dir.path().join("keys.txt"), keys).unwrap();
    assert_eq!(proxy.post_reload().await.status, 200);
    proxy.wait_for_generation(generation + 1).await;
    running.store(false, Ordering::SeqCst);
    let (sent, failures) = load.await.unwrap();
    assert_no_failures(sent, &failures);
    assert_eq!(get_with(&client, &url, &[("x-api-key", later_key)]).await.status, 200, "the reloaded file's key");
    assert_eq!(seen(&backend, "x-api-client").as_deref(), Some("later"));
}

#[tokio::test]
async fn a_rate_limit_keyed_by_a_claim_holds_each_subject_to_its_own_bucket() {
    let backend = Backend::start("bot").await;
    let key = SigningKey::ec("ec-1");
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("jwks.json"), key_set(&[&key])).unwrap();
    let auth = format!("{{ jwt: {{ jwks_file: jwks.json, {JWT_RULES} }} }}, rate_limit: {{ requests: 2, per: 1h, key: \"claim:sub\" }}");
    let path = dir.path().join("switchyard.yaml");
    std::fs::write(&path, with_test_admin(&named(proxy_config(backend.addr, &auth, ""), "by-claim"))).unwrap();
    let proxy = FileProxy::start_at(dir, path).await;
    let client = client();
    let url = proxy.url("/jobs/1");
    let (alice, bob) = (key.sign(&claims(json!({}))), key.sign(&claims(json!({ "sub": "bob" }))));
    let alice_again = key.sign(&claims(json!({ "exp": now() + 900 })));
    let mut statuses = Vec::new();
    for token in [&alice, &alice_again, &alice, &bob] {
        statuses.push(get_with(&client, &url, &[("authorization", &bearer(token))]).await.status.as_u16());
    }
    assert_eq!(statuses, [200, 200, 429, 200], "alice's two tokens share her bucket; bob has his own");
    assert_eq!(backend.hits(), 3);
}

// ---- client certificates -----------------------------------------------------

struct Authority(CertifiedIssuer<'static, KeyPair>);

impl Authority {
    fn new(name: &str) -> Authority {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(rcgen::DnType::CommonName, name);
        Authority(CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap())
    }

    /// A certificate for `names` with its key.
    fn issue(&self, names: &[&str]) -> (CertificateDer<'static>, KeyPair) {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>()).unwrap();
        params.distinguished_name.push(rcgen::DnType::CommonName, names[0]);
        (params.signed_by(&key, &self.0).unwrap().der().clone(), key)
    }

    fn write(&self, dir: &Path, name: &str, names: &[&str]) {
        let (der, key) = self.issue(names);
        std::fs::write(dir.join(format!("{name}.pem")), pem_of(&der)).unwrap();
        std::fs::write(dir.join(format!("{name}.key")), key.serialize_pem()).unwrap();
    }
}

fn pem_of(der: &CertificateDer<'_>) -> String {
    use base64::Engine;
    let text = base64::engine::general_purpose::STANDARD.encode(der.as_ref());
    let lines: Vec<&str> = text.as_bytes().chunks(64).map(|chunk| std::str::from_utf8(chunk).unwrap()).collect();
    format!("-----BEGIN CERTIFICATE-----\n{}\n-----END CERTIFICATE-----\n", lines.join("\n"))
}

/// A TLS client trusting `server_ca`, presenting `certificate` if given.
fn tls_client(
    server_ca: &Authority,
    certificate: Option<(CertificateDer<'static>, KeyPair)>,
) -> tokio_rustls::TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(server_ca.0.der().clone()).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    let mut config = match certificate {
        Some((der, key)) => {
            let key = PrivateKeyDer::try_from(key.serialize_der()).unwrap();
            builder.with_client_auth_cert(vec![der], key).unwrap()
        }
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    tokio_rustls::TlsConnector::from(Arc::new(config))
}

/// One GET over a new TLS connection: the status, or the error that ended it.
async fn tls_get(
    connector: &tokio_rustls::TlsConnector,
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
) -> Result<u16, String> {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let name = ServerName::try_from("bots.test").unwrap();
    let stream = connector.connect(name, tcp).await.map_err(|error| format!("handshake: {error}"))?;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.map_err(|e| e.to_string())?;
    tokio::spawn(connection);
    let mut request = Request::get(path).header("host", "bots.test");
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    // TLS 1.3 sends the server's verdict on the certificate after the
    // client's handshake is done: a refused certificate shows on the request.
    let response = sender.send_request(request.body(Empty::<bytes::Bytes>::new()).unwrap()).await;
    let response = response.map_err(|error| format!("request: {error}"))?;
    let status = response.status().as_u16();
    let _ = response.into_body().collect().await;
    Ok(status)
}

fn client_cert_config(mode: &str) -> String {
    format!(
        "listeners:\n  - name: secure\n    bind: \"127.0.0.1:0\"\n    tls:\n      certificates: [{{ cert: server.pem, key: server.key }}]\n      client_auth: {{ ca: clients-ca.pem, mode: {mode} }}\nroutes:\n  - {{ name: ops, match: {{ path_prefix: /ops }}, upstream: bots, auth: {{ client_cert: {{ sans: [\"*.ops.corp\", \"spiffe://corp/robot\"], forward_header: x-client-cert }} }} }}\n  - {{ name: certified-open, upstream: bots }}\nupstreams:\n  bots: {{ backends: [{{ address: \"BACKEND\" }}] }}\n"
    )
}

#[tokio::test]
async fn client_certificates_are_verified_by_the_listener_and_matched_by_the_route() {
    let backend = Backend::start("bot").await;
    let (server_ca, clients_ca, stranger_ca) =
        (Authority::new("server CA"), Authority::new("clients CA"), Authority::new("stranger CA"));
    let dir = tempfile::tempdir().unwrap();
    server_ca.write(dir.path(), "server", &["bots.test"]);
    std::fs::write(dir.path().join("clients-ca.pem"), pem_of(clients_ca.0.der())).unwrap();
    let yaml = client_cert_config("optional").replace("BACKEND", &backend.addr.to_string());
    let path = dir.path().join("switchyard.yaml");
    std::fs::write(&path, with_test_admin(&yaml)).unwrap();
    let proxy = FileProxy::start_at(dir, path).await;

    let anonymous = tls_client(&server_ca, None);
    let ops = tls_client(&server_ca, Some(clients_ca.issue(&["bot-1.ops.corp"])));
    let robot = tls_client(&server_ca, Some(clients_ca.issue(&["robot", "spiffe://corp/robot"])));
    let intruder = tls_client(&server_ca, Some(clients_ca.issue(&["intruder.example"])));
    let stranger = tls_client(&server_ca, Some(stranger_ca.issue(&["bot-2.ops.corp"])));
    let addr = proxy.addr;

    // Optional: a client without a certificate may use routes that ask for none.
    assert_eq!(tls_get(&anonymous, addr, "/open", &[]).await, Ok(200));
    assert_eq!(tls_get(&anonymous, addr, "/ops/1", &[]).await, Ok(403));
    let forged = [("x-client-cert", "bot-9.ops.corp")];
    assert_eq!(tls_get(&ops, addr, "/ops/1", &forged).await, Ok(200));
    assert_eq!(
        seen(&backend, "x-client-cert").as_deref(),
        Some("bot-1.ops.corp"),
        "the certificate's name, not the header"
    );
    assert_eq!(tls_get(&robot, addr, "/ops/2", &[]).await, Ok(200));
    assert_eq!(seen(&backend, "x-client-cert").as_deref(), Some("spiffe://corp/robot"));
    assert_eq!(tls_get(&intruder, addr, "/ops/3", &[]).await, Ok(403), "a name the route does not list");
    assert!(tls_get(&stranger, addr, "/open", &[]).await.is_err(), "a certificate of another CA fails the handshake");
    assert_eq!(backend.hits(), 3);
    let metrics = scrape(&format!("http://{}/metrics", proxy.admin)).await;
    let refused =
        metric_value(&metrics, "switchyard_access_denied_total", &[("route", "ops"), ("reason", "client_certificate")]);
    assert_eq!(refused, Some(2.0));

    // A reload makes the certificate required: clients without one are
    // refused by the handshake; the others go on.
    let generation = proxy.generation().await;
    proxy.replace_config(&client_cert_config("required").replace("BACKEND", &backend.addr.to_string()));
    assert_eq!(proxy.post_reload().await.status, 200);
    proxy.wait_for_generation(generation + 1).await;
    assert!(tls_get(&anonymous, addr, "/open", &[]).await.is_err());
    assert_eq!(tls_get(&ops, addr, "/ops/4", &[]).await, Ok(200));
}

#[test]
fn auth_settings_that_cannot_hold_are_config_errors_at_their_place() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("keys.txt"), format!("robot:{}\n", sha256_hex("k"))).unwrap();
    let config = |route: &str| {
        format!(
            "listeners: [{{ bind: \"127.0.0.1:0\" }}]\ncluster: {{ redis: \"redis://127.0.0.1:1/0\" }}\nroutes:\n{route}\nupstreams:\n  a: {{ backends: [{{ address: \"x:1\" }}] }}\n"
        )
    };
    let path = dir.path().join("switchyard.yaml");
    let cases = [
        (
            "a forwarded header that frames the request",
            "  - upstream: a\n    auth: { api_key: { file: keys.txt, forward_header: content-length } }",
            (5, 11),
            "cannot forward into `content-length`",
        ),
        (
            "a JWKS fetched in the clear from another host",
            "  - upstream: a\n    auth: { jwt: { jwks_url: \"http://idp.example/jwks\" } }",
            (5, 30),
            "jwks_url must be https://",
        ),
        (
            "a shared rate limit on a key the client makes up",
            "  - upstream: a\n    rate_limit: { requests: 5, key: \"header:x-k\", scope: cluster }",
            (5, 58),
            "keyed by client_ip or claim:NAME",
        ),
        (
            "a rate limit on a claim of no token",
            "  - upstream: a\n    rate_limit: { requests: 5, key: \"claim:sub\" }",
            (5, 37),
            "needs the route's `auth.jwt`",
        ),
        (
            "a client_cert rule no listener can satisfy",
            "  - upstream: a\n    auth: { client_cert: {} }",
            (5, 26),
            "tls.client_auth",
        ),
    ];
    for (case, route, (line, column), words) in cases {
        std::fs::write(&path, config(route)).unwrap();
        assert_check_reports(&path, case, line, column, words);
    }
}

#[tokio::test]
async fn a_routes_claims_decide_what_a_valid_token_may_do_with_403_for_the_others() {
    let backend = Backend::start("bot").await;
    let key = SigningKey::ec("ec-1");
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("jwks.json"), key_set(&[&key])).unwrap();
    let auth = format!(
        "{{ jwt: {{ jwks_file: jwks.json, {JWT_RULES}, claims: {{ role: [ops, admin], scope: \"jobs:run\" }} }} }}"
    );
    let path = dir.path().join("switchyard.yaml");
    std::fs::write(&path, with_test_admin(&named(proxy_config(backend.addr, &auth, ""), "claims"))).unwrap();
    let proxy = FileProxy::start_at(dir, path).await;
    let client = client();
    let url = proxy.url("/jobs/1");
    let cases = [
        ("a role and a scope among several", json!({ "role": "ops", "scope": "jobs:read jobs:run" }), 200),
        ("roles as an array", json!({ "role": ["viewer", "admin"], "scope": "jobs:run" }), 200),
        ("a role not accepted", json!({ "role": "viewer", "scope": "jobs:run" }), 403),
        ("no role", json!({ "scope": "jobs:run" }), 403),
        ("a scope that only starts like one", json!({ "role": "ops", "scope": "jobs:runner" }), 403),
        ("a role that is a scope list elsewhere", json!({ "role": "viewer ops", "scope": "jobs:run" }), 403),
    ];
    let mut served = 0;
    for (what, extra, expected) in cases {
        let token = key.sign(&claims(extra));
        let answer = get_with(&client, &url, &[("authorization", &bearer(&token))]).await;
        assert_eq!(answer.status.as_u16(), expected, "{what}");
        if expected == 403 {
            assert_eq!(answer.error_code(), Some("forbidden"), "{what}");
            // Again: the token is remembered, the answer the same.
            assert_eq!(get_with(&client, &url, &[("authorization", &bearer(&token))]).await.status, 403, "{what}");
        } else {
            served += 1;
        }
    }
    assert_eq!(backend.hits(), served);
}
