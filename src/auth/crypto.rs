//! The signature checks of JWTs, by `ring` (the library rustls already
//! brings): a custom `CryptoProvider` for jsonwebtoken whose verifiers are
//! ring's, a few times faster than the RustCrypto ones jsonwebtoken ships
//! (see benches/auth.rs). Signing, which the proxy never does, and the JWK
//! helpers stay RustCrypto's.
//!
//! What it verifies is what a key set admits (`config::auth`): RSA
//! PKCS#1 v1.5 and PSS with SHA-256/384/512 (ring takes 2048 to 8192-bit
//! moduli only: a 1024-bit key does not verify), ECDSA P-256 and P-384
//! with fixed-size signatures as JWS writes them, and Ed25519. Anything
//! else (an HMAC algorithm, a key of another kind) verifies nothing.

use std::sync::OnceLock;

use jsonwebtoken::crypto::{rust_crypto, CryptoProvider, JwtVerifier};
use jsonwebtoken::{Algorithm, DecodingKey, DecodingKeyKind};
use ring::signature::{self as ring_signature, RsaParameters, UnparsedPublicKey, VerificationAlgorithm};

/// Makes ring's verifiers jsonwebtoken's, once per process. Where something
/// used jsonwebtoken first (a test signing tokens), its built-in provider
/// stays: slower, as correct.
pub fn install() {
    static PROVIDER: OnceLock<CryptoProvider> = OnceLock::new();
    static INSTALLED: std::sync::Once = std::sync::Once::new();
    INSTALLED.call_once(|| {
        let provider = PROVIDER.get_or_init(|| CryptoProvider {
            signer_factory: rust_crypto::DEFAULT_PROVIDER.signer_factory,
            verifier_factory: ring_verifier,
            key_utils: rust_crypto::DEFAULT_PROVIDER.key_utils.clone(),
        });
        if provider.install_default().is_err() {
            tracing::debug!("jsonwebtoken had a crypto provider already; JWT signatures are checked by it");
        }
    });
}

enum PublicKey {
    Rsa { n: Vec<u8>, e: Vec<u8>, parameters: &'static RsaParameters },
    Other { bytes: Vec<u8>, algorithm: &'static dyn VerificationAlgorithm },
}

struct RingVerifier {
    algorithm: Algorithm,
    key: PublicKey,
}

impl signature::Verifier<Vec<u8>> for RingVerifier {
    fn verify(&self, message: &[u8], signature: &Vec<u8>) -> Result<(), signature::Error> {
        let verified = match &self.key {
            PublicKey::Rsa { n, e, parameters } => {
                ring_signature::RsaPublicKeyComponents { n, e }.verify(parameters, message, signature)
            }
            PublicKey::Other { bytes, algorithm } => {
                UnparsedPublicKey::new(*algorithm, bytes).verify(message, signature)
            }
        };
        verified.map_err(|_| signature::Error::new())
    }
}

impl JwtVerifier for RingVerifier {
    fn algorithm(&self) -> Algorithm {
        self.algorithm
    }
}

/// Big-endian without leading zero bytes, as ring wants a modulus and exponent.
fn unpadded(bytes: &[u8]) -> Vec<u8> {
    let start = bytes.iter().position(|byte| *byte != 0).unwrap_or(bytes.len());
    bytes[start..].to_vec()
}

fn ring_verifier(algorithm: &Algorithm, key: &DecodingKey) -> jsonwebtoken::errors::Result<Box<dyn JwtVerifier>> {
    use jsonwebtoken::AlgorithmFamily;
    let rsa = |parameters: &'static RsaParameters| match key.kind() {
        DecodingKeyKind::RsaModulusExponent { n, e } if key.family() == AlgorithmFamily::Rsa => {
            Some(PublicKey::Rsa { n: unpadded(n), e: unpadded(e), parameters })
        }
        _ => None,
    };
    let other = |family: AlgorithmFamily, algorithm: &'static dyn VerificationAlgorithm| match key.kind() {
        DecodingKeyKind::SecretOrDer(bytes) if key.family() == family => {
            Some(PublicKey::Other { bytes: bytes.clone(), algorithm })
        }
        _ => None,
    };
    let public = match algorithm {
        Algorithm::RS256 => rsa(&ring_signature::RSA_PKCS1_2048_8192_SHA256),
        Algorithm::RS384 => rsa(&ring_signature::RSA_PKCS1_2048_8192_SHA384),
        Algorithm::RS512 => rsa(&ring_signature::RSA_PKCS1_2048_8192_SHA512),
        Algorithm::PS256 => rsa(&ring_signature::RSA_PSS_2048_8192_SHA256),
        Algorithm::PS384 => rsa(&ring_signature::RSA_PSS_2048_8192_SHA384),
        Algorithm::PS512 => rsa(&ring_signature::RSA_PSS_2048_8192_SHA512),
        // From a JWK, an EC key is its uncompressed point, as ring takes it.
        Algorithm::ES256 => other(AlgorithmFamily::Ec, &ring_signature::ECDSA_P256_SHA256_FIXED),
        Algorithm::ES384 => other(AlgorithmFamily::Ec, &ring_signature::ECDSA_P384_SHA384_FIXED),
        Algorithm::EdDSA => other(AlgorithmFamily::Ed, &ring_signature::ED25519),
        _ => None,
    };
    match public {
        Some(key) => Ok(Box::new(RingVerifier { algorithm: *algorithm, key })),
        // A key of another kind than the algorithm's, or an HMAC algorithm,
        // which no key set holds: nothing to verify with.
        None => Err(jsonwebtoken::errors::ErrorKind::InvalidKeyFormat.into()),
    }
}
