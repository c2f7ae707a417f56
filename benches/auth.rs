//! Cost of a route's JWT check, without the proxy around it: a token the
//! route has verified before (the cache), and one it has not (the signature
//! check: RS256 with a 2048-bit key from openssl, ES256 on P-256 from
//! rcgen). Run:
//! `cargo bench --bench auth` (needs openssl, as the tests do).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::json;
use switchyard::auth::{Jwks, Verifier};
use switchyard::config::auth::{JwksSource, JwtConfig, KeySet};

struct Signer {
    algorithm: Algorithm,
    encoding: EncodingKey,
    jwk: serde_json::Value,
}

impl Signer {
    fn rsa() -> Signer {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key.pem");
        let made = std::process::Command::new("openssl")
            .args(["genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048", "-out"])
            .arg(&path)
            .output()
            .expect("openssl");
        assert!(made.status.success());
        Signer::with(Algorithm::RS256, EncodingKey::from_rsa_pem(&std::fs::read(&path).unwrap()).unwrap())
    }

    fn ec() -> Signer {
        let pair = rcgen::KeyPair::generate().unwrap();
        Signer::with(Algorithm::ES256, EncodingKey::from_ec_pem(pair.serialize_pem().as_bytes()).unwrap())
    }

    fn with(algorithm: Algorithm, encoding: EncodingKey) -> Signer {
        let mut jwk =
            serde_json::to_value(jsonwebtoken::jwk::Jwk::from_encoding_key(&encoding, algorithm).unwrap()).unwrap();
        jwk["kid"] = json!("bench");
        Signer { algorithm, encoding, jwk }
    }

    /// A token no other has been: its `jti` is new.
    fn sign(&self) -> String {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let mut header = Header::new(self.algorithm);
        header.kid = Some("bench".to_owned());
        let exp = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() + 3600;
        let claims = json!({
            "iss": "https://idp.bench", "aud": "bench", "sub": "load", "exp": exp,
            "jti": NEXT.fetch_add(1, Ordering::Relaxed),
        });
        jsonwebtoken::encode(&header, &claims, &self.encoding).unwrap()
    }

    fn verifier(&self) -> Verifier {
        let document = json!({ "keys": [self.jwk.clone()] }).to_string();
        let keys = Arc::new(KeySet::parse(document.as_bytes()).unwrap());
        let config = JwtConfig {
            keys: JwksSource::File { path: "jwks.json".into(), keys },
            issuers: vec!["https://idp.bench".to_owned()],
            audiences: vec!["bench".to_owned()],
            required_claims: vec![],
            claims: vec![],
            forward_claims: vec![("sub".to_owned(), http::HeaderName::from_static("x-user"))],
            keep_token: false,
        };
        Verifier::new(&config, Jwks::for_source(&config.keys, None), None)
    }
}

fn jwt(c: &mut Criterion) {
    // Before anything uses jsonwebtoken, as the proxy does.
    switchyard::auth::crypto::install();
    let mut group = c.benchmark_group("jwt");
    for (name, signer) in [("rs256", Signer::rsa()), ("es256", Signer::ec())] {
        let verifier = signer.verifier();
        let token = signer.sign();
        verifier.verify(token.as_bytes()).expect("a good token");
        group.bench_function(format!("{name}/remembered"), |b| b.iter(|| verifier.verify(token.as_bytes()).unwrap()));
        group.bench_function(format!("{name}/new_token"), |b| {
            b.iter_batched(|| signer.sign(), |token| verifier.verify(token.as_bytes()).unwrap(), BatchSize::SmallInput)
        });
    }
    group.finish();
}

criterion_group!(benches, jwt);
criterion_main!(benches);
