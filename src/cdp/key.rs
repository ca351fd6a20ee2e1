//! CDP Secret API key loading.
//!
//! A CDP key is an id (UUID, or the legacy `organizations/{org}/apiKeys/{key}` name) plus a
//! secret that is either an EC P-256 private key in PEM (SEC1 `BEGIN EC PRIVATE KEY`, as the
//! portal hands it out, or PKCS#8 `BEGIN PRIVATE KEY`) or the base64 of 64 bytes Ed25519
//! seed‖public key. Either is parsed once, at load, into an aws-lc-rs key pair that signs every
//! later JWT, and is test-signed (and the signature verified) so a bad key stops the process at
//! start instead of failing the first user's request.
//!
//! Nothing in this module ever prints key material: error messages name the field or file and
//! say what is wrong with it, never what it contains.

use std::fmt;
use std::path::Path;
use std::sync::Arc;

use aws_lc_rs::signature::{
    EcdsaKeyPair, EcdsaSigningAlgorithm, Ed25519KeyPair, KeyPair, RsaKeyPair, UnparsedPublicKey,
    VerificationAlgorithm, ECDSA_P256K1_SHA256_FIXED_SIGNING, ECDSA_P256_SHA256_FIXED,
    ECDSA_P256_SHA256_FIXED_SIGNING, ECDSA_P384_SHA384_FIXED_SIGNING,
    ECDSA_P521_SHA512_FIXED_SIGNING, ED25519,
};
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use base64::Engine as _;
use jsonwebtoken::Algorithm;
use rustls_pki_types::pem::{self, PemObject};
use rustls_pki_types::PrivateKeyDer;

/// Environment variable holding the key id (what Coinbase's SDKs read).
pub const ENV_KEY_ID: &str = "CDP_API_KEY_ID";
/// Older name for the key id, still read by the TS and Python SDKs.
pub const ENV_KEY_NAME: &str = "CDP_API_KEY_NAME";
/// Environment variable holding the key secret.
pub const ENV_KEY_SECRET: &str = "CDP_API_KEY_SECRET";

/// A real CDP key file is a few hundred bytes; anything this large is the wrong file, and
/// refusing it early avoids reading e.g. a log file into memory.
const MAX_KEY_FILE_BYTES: u64 = 64 * 1024;

/// Length of an Ed25519 CDP secret once base64-decoded: 32-byte seed ‖ 32-byte public key.
const ED25519_SECRET_LEN: usize = 64;

/// Signature algorithm of a CDP key, as it appears in the JWT header `alg`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KeyAlgorithm {
    /// ECDSA P-256 with SHA-256 (EC PEM secret).
    Es256,
    /// Ed25519 (base64 64-byte secret).
    EdDsa,
}

impl KeyAlgorithm {
    /// The `jsonwebtoken` algorithm used to sign with a key of this kind.
    pub fn jwt_algorithm(self) -> Algorithm {
        match self {
            KeyAlgorithm::Es256 => Algorithm::ES256,
            KeyAlgorithm::EdDsa => Algorithm::EdDSA,
        }
    }

    /// The JOSE `alg` name.
    pub fn as_str(self) -> &'static str {
        match self {
            KeyAlgorithm::Es256 => "ES256",
            KeyAlgorithm::EdDsa => "EdDSA",
        }
    }
}

impl fmt::Display for KeyAlgorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a CDP key could not be loaded. `field` is where the value came from (an env var name,
/// `<file>: privateKey`, ...) so an operator knows which setting to fix. No variant carries
/// key material.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("{field}: the key id is empty")]
    EmptyId { field: String },
    #[error("{field}: the key id contains control characters (a stray newline or quote?)")]
    IdControlChars { field: String },
    #[error("{field}: the key secret is empty")]
    EmptySecret { field: String },
    #[error("{field}: not a PEM EC key nor a base64 Ed25519 key (64 bytes)")]
    NotAKey { field: String },
    #[error(
        "{field}: not a PEM EC key nor a base64 Ed25519 key (64 bytes): \
         it base64-decodes to {len} bytes"
    )]
    Ed25519Length { field: String, len: usize },
    #[error(
        "{field}: Ed25519 secret is inconsistent: its last 32 bytes are not the public key \
         of its first 32 bytes (truncated or mixed-up key?)"
    )]
    Ed25519Mismatch { field: String },
    #[error("{field}: PEM is malformed: {reason}")]
    BadPem { field: String, reason: &'static str },
    #[error("{field}: encrypted PEM keys are not supported; export the key without a passphrase")]
    EncryptedPem { field: String },
    #[error("{field}: this PEM holds a {what}, not a private key")]
    NotPrivateKey { field: String, what: &'static str },
    #[error(
        "{field}: this is an RSA key; CDP Secret API keys are ECDSA P-256 (PEM) or Ed25519 \
         (base64)"
    )]
    RsaKey { field: String },
    #[error("{field}: this is an EC key on curve {curve}; CDP ECDSA keys must be P-256 (ES256)")]
    WrongCurve { field: String, curve: &'static str },
    #[error(
        "{field}: this is an Ed25519 key in PEM form; CDP expects Ed25519 secrets as the base64 \
         of 64 bytes (seed followed by public key), as shown in the CDP portal"
    )]
    Ed25519Pem { field: String },
    #[error("{field}: PEM private key could not be parsed as an EC P-256 key")]
    InvalidEcKey { field: String },
    #[error("{field}: the key was parsed but a test signature with it failed to verify")]
    SelfTest { field: String },
    #[error(
        "{present} is set but {missing} is not: set both the key id and the key secret, \
         or neither"
    )]
    MissingHalf {
        present: &'static str,
        missing: &'static str,
    },
    #[error("CDP key file {path}: cannot read: {source}")]
    KeyFileRead {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("CDP key file {path}: larger than {max} bytes, not a CDP key file")]
    KeyFileTooLarge { path: String, max: u64 },
    #[error("CDP key file {path}: not valid JSON ({problem} at line {line}, column {column})")]
    KeyFileJson {
        path: String,
        problem: &'static str,
        line: usize,
        column: usize,
    },
    #[error("CDP key file {path}: {problem}")]
    KeyFileFields { path: String, problem: String },
}

/// A loaded, validated CDP Secret API key, ready to sign JWTs. Cheap to clone.
#[derive(Clone)]
pub struct CdpKey {
    id: String,
    signing_key: SigningKey,
}

/// The private key, parsed once. Not a `jsonwebtoken::EncodingKey`: that holds PKCS#8 bytes and
/// `jsonwebtoken::encode` re-parses them on every call, which costs about as much as the
/// signature itself (release, on-CPU per token: ES256 52 µs through `encode` against 23 µs for
/// the bare signature; EdDSA 35 µs against 18 µs — see `examples/jwt_bench.rs`). Every user
/// redirect mints one JWT, so the JWS is assembled in `jwt.rs` and signed here.
#[derive(Clone)]
enum SigningKey {
    Es256(Arc<EcdsaKeyPair>),
    EdDsa(Arc<Ed25519KeyPair>),
}

/// Signing failed inside aws-lc (it gives no detail; nothing secret either way).
#[derive(Debug, thiserror::Error)]
#[error("the signature operation failed")]
pub struct SignError;

impl fmt::Debug for CdpKey {
    // Hand-written so the key can never end up in a log through `{:?}`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CdpKey")
            .field("id", &self.id)
            .field("algorithm", &self.algorithm())
            .finish_non_exhaustive()
    }
}

impl CdpKey {
    /// Build a key from its id and secret.
    ///
    /// `id` is the key id (UUID or legacy `organizations/../apiKeys/..`); `secret` is an EC PEM
    /// (SEC1 `BEGIN EC PRIVATE KEY` or PKCS#8 `BEGIN PRIVATE KEY`, P-256 only) or the base64 of
    /// 64 bytes Ed25519 seed‖public key. Literal two-character `\n` sequences in `secret` are
    /// turned into newlines first, because that is how PEMs survive env vars and `.env` files.
    pub fn from_parts(id: &str, secret: &str) -> Result<Self, KeyError> {
        Self::from_labeled_parts(id, "CDP API key id", secret, "CDP API key secret")
    }

    /// Load the JSON key file the CDP portal downloads: the id in `id` (new) or `name`
    /// (legacy), the secret in `privateKey` or `secret`.
    pub fn from_key_file(path: &Path) -> Result<Self, KeyError> {
        let shown = path.display().to_string();
        let bytes = read_small_file(path, &shown)?;
        // Parse into a generic Value rather than a struct: serde's "invalid type" messages quote
        // the offending value, which here could be the secret.
        let value: serde_json::Value =
            serde_json::from_slice(&bytes).map_err(|e| KeyError::KeyFileJson {
                path: shown.clone(),
                problem: match e.classify() {
                    serde_json::error::Category::Io => "read error",
                    serde_json::error::Category::Syntax => "syntax error",
                    serde_json::error::Category::Data => "unexpected data",
                    serde_json::error::Category::Eof => "unexpected end of file",
                },
                line: e.line(),
                column: e.column(),
            })?;
        let obj = value.as_object().ok_or_else(|| KeyError::KeyFileFields {
            path: shown.clone(),
            problem: "expected a JSON object with `id` (or `name`) and `privateKey` (or `secret`)"
                .to_owned(),
        })?;

        // `id` first: newer files use it, and should a file ever carry both, `name` is more
        // likely to be a human label than the key id.
        let (id_name, id) = pick_string_field(
            obj,
            &["id", "name"],
            &shown,
            "missing the key id: expected a string field `id` or `name`",
        )?;
        let (secret_name, secret) = pick_string_field(
            obj,
            &["privateKey", "secret"],
            &shown,
            "missing the key secret: expected a string field `privateKey` or `secret`",
        )?;
        Self::from_labeled_parts(
            id,
            &format!("CDP key file {shown}: `{id_name}`"),
            secret,
            &format!("CDP key file {shown}: `{secret_name}`"),
        )
    }

    /// Read the key from `CDP_API_KEY_ID` (fallback `CDP_API_KEY_NAME`) and
    /// `CDP_API_KEY_SECRET` through `get`, so tests need not touch the process environment.
    ///
    /// `Ok(None)` when neither half is set; an error when only one is. Empty or all-blank
    /// values count as unset, because orchestrators commonly render a missing secret as `""`.
    pub fn from_env_with(get: impl Fn(&str) -> Option<String>) -> Result<Option<Self>, KeyError> {
        let non_blank = |name: &str| get(name).filter(|v| !v.trim().is_empty());
        let id = non_blank(ENV_KEY_ID)
            .map(|v| (ENV_KEY_ID, v))
            .or_else(|| non_blank(ENV_KEY_NAME).map(|v| (ENV_KEY_NAME, v)));
        let secret = non_blank(ENV_KEY_SECRET);
        match (id, secret) {
            (None, None) => Ok(None),
            (Some((id_var, _)), None) => Err(KeyError::MissingHalf {
                present: id_var,
                missing: ENV_KEY_SECRET,
            }),
            (None, Some(_)) => Err(KeyError::MissingHalf {
                present: ENV_KEY_SECRET,
                missing: "CDP_API_KEY_ID (or CDP_API_KEY_NAME)",
            }),
            (Some((id_var, id)), Some(secret)) => {
                Self::from_labeled_parts(&id, id_var, &secret, ENV_KEY_SECRET).map(Some)
            }
        }
    }

    /// [`CdpKey::from_env_with`] over the process environment.
    pub fn from_env() -> Result<Option<Self>, KeyError> {
        Self::from_env_with(|k| std::env::var(k).ok())
    }

    /// The key id, used as JWT `kid` and `sub`.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Which JWT algorithm this key signs with.
    pub fn algorithm(&self) -> KeyAlgorithm {
        match self.signing_key {
            SigningKey::Es256(_) => KeyAlgorithm::Es256,
            SigningKey::EdDsa(_) => KeyAlgorithm::EdDsa,
        }
    }

    /// JWS signature over `message`: raw r‖s (64 bytes) for ES256, as JOSE requires — not
    /// DER — or the 64-byte Ed25519 signature.
    pub(crate) fn sign(&self, message: &[u8]) -> Result<Vec<u8>, SignError> {
        match &self.signing_key {
            // aws-lc ignores the rng argument (it draws its own nonce, hedged per RFC 6979 +
            // randomness), so a fresh SystemRandom handle costs nothing.
            SigningKey::Es256(pair) => pair
                .sign(&aws_lc_rs::rand::SystemRandom::new(), message)
                .map(|sig| sig.as_ref().to_vec())
                .map_err(|_| SignError),
            SigningKey::EdDsa(pair) => pair
                .try_sign(message)
                .map(|sig| sig.as_ref().to_vec())
                .map_err(|_| SignError),
        }
    }

    fn public_key(&self) -> (&'static dyn VerificationAlgorithm, &[u8]) {
        match &self.signing_key {
            SigningKey::Es256(pair) => (&ECDSA_P256_SHA256_FIXED, pair.public_key().as_ref()),
            SigningKey::EdDsa(pair) => (&ED25519, pair.public_key().as_ref()),
        }
    }

    fn from_labeled_parts(
        id: &str,
        id_field: &str,
        secret: &str,
        secret_field: &str,
    ) -> Result<Self, KeyError> {
        let id = validate_id(id, id_field)?;
        let signing_key = parse_secret(secret, secret_field)?;
        let key = CdpKey { id, signing_key };
        key.self_test(secret_field)?;
        Ok(key)
    }

    /// Sign once and verify the signature with the public key, so a key that parses but cannot
    /// produce valid signatures fails at start, not on a user's request.
    fn self_test(&self, field: &str) -> Result<(), KeyError> {
        let fail = || KeyError::SelfTest {
            field: field.to_owned(),
        };
        let message = b"onramp-gateway CDP key self-test";
        let signature = self.sign(message).map_err(|_| fail())?;
        let (alg, public) = self.public_key();
        UnparsedPublicKey::new(alg, public)
            .verify(message, &signature)
            .map_err(|_| fail())
    }
}

fn read_small_file(path: &Path, shown: &str) -> Result<Vec<u8>, KeyError> {
    let read_err = |source| KeyError::KeyFileRead {
        path: shown.to_owned(),
        source,
    };
    let meta = std::fs::metadata(path).map_err(read_err)?;
    if meta.len() > MAX_KEY_FILE_BYTES {
        return Err(KeyError::KeyFileTooLarge {
            path: shown.to_owned(),
            max: MAX_KEY_FILE_BYTES,
        });
    }
    std::fs::read(path).map_err(read_err)
}

/// First of `names` present in `obj`; it must be a string. `missing` is the error text when
/// none is present.
fn pick_string_field<'a>(
    obj: &'a serde_json::Map<String, serde_json::Value>,
    names: &[&'static str],
    path: &str,
    missing: &str,
) -> Result<(&'static str, &'a str), KeyError> {
    for &name in names {
        if let Some(v) = obj.get(name) {
            return v
                .as_str()
                .map(|s| (name, s))
                .ok_or_else(|| KeyError::KeyFileFields {
                    path: path.to_owned(),
                    problem: format!("field `{name}` is not a string"),
                });
        }
    }
    Err(KeyError::KeyFileFields {
        path: path.to_owned(),
        problem: missing.to_owned(),
    })
}

fn validate_id(id: &str, field: &str) -> Result<String, KeyError> {
    // Trim: ids pasted into env vars or mounted from files often carry a trailing newline.
    let id = id.trim();
    if id.is_empty() {
        return Err(KeyError::EmptyId {
            field: field.to_owned(),
        });
    }
    if id.chars().any(char::is_control) {
        return Err(KeyError::IdControlChars {
            field: field.to_owned(),
        });
    }
    Ok(id.to_owned())
}

fn parse_secret(secret: &str, field: &str) -> Result<SigningKey, KeyError> {
    // Same normalisation as the Python SDK: a PEM stored in an env var often has its newlines
    // written as the two characters `\n`.
    let secret = secret.replace("\\n", "\n");
    let secret = secret.trim();
    if secret.is_empty() {
        return Err(KeyError::EmptySecret {
            field: field.to_owned(),
        });
    }
    if secret.contains("-----BEGIN") {
        parse_pem(secret, field).map(|pair| SigningKey::Es256(Arc::new(pair)))
    } else {
        parse_ed25519_base64(secret, field).map(|pair| SigningKey::EdDsa(Arc::new(pair)))
    }
}

fn parse_pem(secret: &str, field: &str) -> Result<EcdsaKeyPair, KeyError> {
    let f = || field.to_owned();
    let der = match PrivateKeyDer::from_pem_slice(secret.as_bytes()) {
        Ok(der) => der,
        // Errors are mapped to fixed texts: the pem crate's own messages may quote input lines.
        Err(pem::Error::NoItemsFound) => return Err(classify_non_key_pem(secret, field)),
        Err(pem::Error::MissingSectionEnd { .. }) => {
            return Err(KeyError::BadPem {
                field: f(),
                reason: "no matching -----END line (truncated?)",
            })
        }
        Err(pem::Error::Base64Decode(_)) => {
            return Err(KeyError::BadPem {
                field: f(),
                reason: "the body between BEGIN and END is not valid base64",
            })
        }
        Err(pem::Error::IllegalSectionStart { .. }) => {
            return Err(KeyError::BadPem {
                field: f(),
                reason: "a -----BEGIN line is garbled",
            })
        }
        Err(_) => {
            return Err(KeyError::BadPem {
                field: f(),
                reason: "it could not be decoded",
            })
        }
    };
    if let PrivateKeyDer::Pkcs1(_) = der {
        return Err(KeyError::RsaKey { field: f() });
    }
    // from_private_key_der takes both SEC1 (RFC 5915) and PKCS#8, and insists on the curve.
    EcdsaKeyPair::from_private_key_der(&ECDSA_P256_SHA256_FIXED_SIGNING, der.secret_der())
        .map_err(|_| diagnose_non_p256(&der, field))
}

/// A PEM with no private-key section: say what it is instead, for a useful error.
fn classify_non_key_pem(secret: &str, field: &str) -> KeyError {
    let field = field.to_owned();
    if secret.contains("ENCRYPTED PRIVATE KEY") {
        KeyError::EncryptedPem { field }
    } else if secret.contains("-----BEGIN PUBLIC KEY") || secret.contains("-----BEGIN EC PUBLIC") {
        KeyError::NotPrivateKey {
            field,
            what: "public key",
        }
    } else if secret.contains("-----BEGIN CERTIFICATE") {
        KeyError::NotPrivateKey {
            field,
            what: "certificate",
        }
    } else if secret.contains("-----BEGIN EC PARAMETERS") {
        KeyError::NotPrivateKey {
            field,
            what: "set of EC parameters only",
        }
    } else {
        KeyError::BadPem {
            field,
            reason: "no EC PRIVATE KEY or PRIVATE KEY section found",
        }
    }
}

/// The DER did not load as P-256: find out what it is, for an error that says what to do.
fn diagnose_non_p256(der: &PrivateKeyDer<'_>, field: &str) -> KeyError {
    let field = field.to_owned();
    let bytes = der.secret_der();
    let other_curves: [(&'static EcdsaSigningAlgorithm, &'static str); 3] = [
        (&ECDSA_P384_SHA384_FIXED_SIGNING, "P-384"),
        (&ECDSA_P521_SHA512_FIXED_SIGNING, "P-521"),
        (&ECDSA_P256K1_SHA256_FIXED_SIGNING, "secp256k1"),
    ];
    for (alg, curve) in other_curves {
        if EcdsaKeyPair::from_private_key_der(alg, bytes).is_ok() {
            return KeyError::WrongCurve { field, curve };
        }
    }
    if let PrivateKeyDer::Pkcs8(_) = der {
        if RsaKeyPair::from_pkcs8(bytes).is_ok() {
            return KeyError::RsaKey { field };
        }
        if Ed25519KeyPair::from_pkcs8_maybe_unchecked(bytes).is_ok() {
            return KeyError::Ed25519Pem { field };
        }
    }
    KeyError::InvalidEcKey { field }
}

fn parse_ed25519_base64(secret: &str, field: &str) -> Result<Ed25519KeyPair, KeyError> {
    // Standard alphabet as the portal shows it; padding optional and line breaks ignored so a
    // secret that was wrapped or copied without its `==` still loads.
    const B64: GeneralPurpose = GeneralPurpose::new(
        &base64::alphabet::STANDARD,
        GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
    );
    let compact: String = secret.split_ascii_whitespace().collect();
    let raw = B64
        .decode(compact.as_bytes())
        .map_err(|_| KeyError::NotAKey {
            field: field.to_owned(),
        })?;
    if raw.len() != ED25519_SECRET_LEN {
        return Err(KeyError::Ed25519Length {
            field: field.to_owned(),
            len: raw.len(),
        });
    }
    let (seed, public) = raw.split_at(32);
    // Checks the public half really belongs to the seed: a mismatch means a corrupted secret,
    // and Coinbase would reject every JWT signed with it.
    Ed25519KeyPair::from_seed_and_public_key(seed, public).map_err(|_| KeyError::Ed25519Mismatch {
        field: field.to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use aws_lc_rs::encoding::{AsDer, Pkcs8V1Der};
    use base64::engine::general_purpose::STANDARD;
    use std::collections::HashMap;

    const ID: &str = "3f1c0e2a-9b7d-4c55-8e21-0a6b1d2c3e4f";
    const LEGACY_ID: &str =
        "organizations/11111111-2222-3333-4444-555555555555/apiKeys/66666666-7777-8888-9999-000000000000";

    fn pem(label: &str, der: &[u8]) -> String {
        let b64 = STANDARD.encode(der);
        let mut out = format!("-----BEGIN {label}-----\n");
        for chunk in b64.as_bytes().chunks(64) {
            out.push_str(std::str::from_utf8(chunk).unwrap());
            out.push('\n');
        }
        out.push_str(&format!("-----END {label}-----\n"));
        out
    }

    fn ec_pair(alg: &'static EcdsaSigningAlgorithm) -> EcdsaKeyPair {
        EcdsaKeyPair::generate(alg).unwrap()
    }

    fn sec1_pem(pair: &EcdsaKeyPair) -> String {
        let der = pair.private_key().as_der().unwrap();
        pem("EC PRIVATE KEY", der.as_ref())
    }

    fn pkcs8_pem(pair: &EcdsaKeyPair) -> String {
        pem("PRIVATE KEY", pair.to_pkcs8v1().unwrap().as_ref())
    }

    fn ed_secret() -> (String, Vec<u8>) {
        let pair = Ed25519KeyPair::generate().unwrap();
        let seed = pair.seed().unwrap();
        let seed = aws_lc_rs::encoding::AsBigEndian::<
            aws_lc_rs::encoding::Curve25519SeedBin<'static>,
        >::as_be_bytes(&seed)
        .unwrap();
        let public = pair.public_key().as_ref().to_vec();
        let mut raw = seed.as_ref().to_vec();
        raw.extend_from_slice(&public);
        (STANDARD.encode(raw), public)
    }

    /// Sign with the loaded key and check the signature against the generated public key, so
    /// a test proves the right private key was loaded, not merely some key.
    fn assert_signs_for(key: &CdpKey, public: &[u8]) {
        let msg = b"header.claims";
        let sig = key.sign(msg).unwrap();
        assert_eq!(
            sig.len(),
            64,
            "JOSE signatures are 64 bytes for ES256 and EdDSA"
        );
        let alg: &dyn aws_lc_rs::signature::VerificationAlgorithm = match key.algorithm() {
            KeyAlgorithm::Es256 => &ECDSA_P256_SHA256_FIXED,
            KeyAlgorithm::EdDsa => &ED25519,
        };
        aws_lc_rs::signature::UnparsedPublicKey::new(alg, public)
            .verify(msg, &sig)
            .expect("signature verifies against the generated public key");
        assert_eq!(key.public_key().1, public);
    }

    #[test]
    fn accepts_sec1_pem() {
        let pair = ec_pair(&ECDSA_P256_SHA256_FIXED_SIGNING);
        let key = CdpKey::from_parts(ID, &sec1_pem(&pair)).unwrap();
        assert_eq!(key.algorithm(), KeyAlgorithm::Es256);
        assert_eq!(key.id(), ID);
        assert_signs_for(&key, pair.public_key().as_ref());
    }

    #[test]
    fn accepts_pkcs8_pem() {
        let pair = ec_pair(&ECDSA_P256_SHA256_FIXED_SIGNING);
        let key = CdpKey::from_parts(ID, &pkcs8_pem(&pair)).unwrap();
        assert_eq!(key.algorithm(), KeyAlgorithm::Es256);
        assert_signs_for(&key, pair.public_key().as_ref());
    }

    #[test]
    fn accepts_sec1_with_ec_parameters_block_and_crlf() {
        // `openssl ecparam -genkey` output: an EC PARAMETERS block precedes the key.
        let pair = ec_pair(&ECDSA_P256_SHA256_FIXED_SIGNING);
        let params =
            "-----BEGIN EC PARAMETERS-----\nBggqhkjOPQMBBw==\n-----END EC PARAMETERS-----\n";
        let secret = format!("{params}{}", sec1_pem(&pair)).replace('\n', "\r\n");
        let key = CdpKey::from_parts(ID, &secret).unwrap();
        assert_signs_for(&key, pair.public_key().as_ref());
    }

    #[test]
    fn accepts_escaped_newlines_in_pem() {
        let pair = ec_pair(&ECDSA_P256_SHA256_FIXED_SIGNING);
        let escaped = sec1_pem(&pair).replace('\n', "\\n");
        assert!(!escaped.contains('\n'));
        let key = CdpKey::from_parts(ID, &escaped).unwrap();
        assert_signs_for(&key, pair.public_key().as_ref());
    }

    #[test]
    fn accepts_ed25519_base64_with_and_without_padding() {
        let (secret, public) = ed_secret();
        assert!(secret.ends_with("=="));
        for s in [
            secret.clone(),
            secret.trim_end_matches('=').to_owned(),
            format!("  {secret}\n"),
        ] {
            let key = CdpKey::from_parts(ID, &s).unwrap();
            assert_eq!(key.algorithm(), KeyAlgorithm::EdDsa);
            assert_signs_for(&key, &public);
        }
    }

    #[test]
    fn accepts_legacy_id_and_trims_id() {
        let (secret, _) = ed_secret();
        let key = CdpKey::from_parts(&format!(" {LEGACY_ID}\n"), &secret).unwrap();
        assert_eq!(key.id(), LEGACY_ID);
    }

    #[test]
    fn algorithm_display() {
        assert_eq!(KeyAlgorithm::Es256.to_string(), "ES256");
        assert_eq!(KeyAlgorithm::EdDsa.to_string(), "EdDSA");
    }

    #[test]
    fn debug_does_not_print_key() {
        let pair = ec_pair(&ECDSA_P256_SHA256_FIXED_SIGNING);
        let key = CdpKey::from_parts(ID, &sec1_pem(&pair)).unwrap();
        let dbg = format!("{key:?}");
        assert!(dbg.contains(ID) && dbg.contains("Es256"), "{dbg}");
        assert!(!dbg.contains("content") && dbg.len() < 120, "{dbg}");
    }

    fn err(id: &str, secret: &str) -> KeyError {
        CdpKey::from_parts(id, secret).unwrap_err()
    }

    /// Every message must be free of the secret; check with a recognisable chunk of it.
    fn assert_no_leak(e: &KeyError, secret: &str) {
        let msg = e.to_string();
        let dbg = format!("{e:?}");
        for line in secret
            .lines()
            .filter(|l| l.len() > 12 && !l.starts_with("-----"))
        {
            assert!(!msg.contains(&line[..12]), "message leaks key: {msg}");
            assert!(!dbg.contains(&line[..12]), "debug leaks key: {dbg}");
        }
    }

    #[test]
    fn rejects_empty_id() {
        let (secret, _) = ed_secret();
        for id in ["", "   ", "\n"] {
            let e = err(id, &secret);
            assert!(matches!(e, KeyError::EmptyId { .. }), "{e}");
        }
        let e = err("abc\u{7}def", &secret);
        assert!(matches!(e, KeyError::IdControlChars { .. }), "{e}");
    }

    #[test]
    fn rejects_empty_secret() {
        let e = err(ID, " \n ");
        assert!(matches!(e, KeyError::EmptySecret { .. }), "{e}");
    }

    #[test]
    fn rejects_garbage() {
        let e = err(ID, "not a key at all!");
        assert!(matches!(e, KeyError::NotAKey { .. }), "{e}");
        assert_eq!(
            e.to_string(),
            "CDP API key secret: not a PEM EC key nor a base64 Ed25519 key (64 bytes)"
        );
    }

    #[test]
    fn rejects_base64_of_wrong_length() {
        for len in [32usize, 63, 65, 96] {
            let secret = STANDARD.encode(vec![7u8; len]);
            let e = err(ID, &secret);
            assert!(
                matches!(e, KeyError::Ed25519Length { len: l, .. } if l == len),
                "{e}"
            );
            assert!(e.to_string().contains(&format!("{len} bytes")), "{e}");
            assert_no_leak(&e, &secret);
        }
    }

    #[test]
    fn rejects_mismatched_ed25519_halves() {
        let (a, _) = ed_secret();
        let (b, _) = ed_secret();
        let a = STANDARD.decode(a).unwrap();
        let b = STANDARD.decode(b).unwrap();
        let mut mixed = a[..32].to_vec();
        mixed.extend_from_slice(&b[32..]);
        let e = err(ID, &STANDARD.encode(mixed));
        assert!(matches!(e, KeyError::Ed25519Mismatch { .. }), "{e}");
    }

    #[test]
    fn rejects_other_curves() {
        for (alg, curve) in [
            (&ECDSA_P384_SHA384_FIXED_SIGNING, "P-384"),
            (&ECDSA_P521_SHA512_FIXED_SIGNING, "P-521"),
            (&ECDSA_P256K1_SHA256_FIXED_SIGNING, "secp256k1"),
        ] {
            let pair = ec_pair(alg);
            for secret in [sec1_pem(&pair), pkcs8_pem(&pair)] {
                let e = err(ID, &secret);
                assert!(
                    matches!(e, KeyError::WrongCurve { curve: c, .. } if c == curve),
                    "{curve}: {e}"
                );
                assert_no_leak(&e, &secret);
            }
        }
    }

    #[test]
    fn rejects_rsa() {
        let rsa = RsaKeyPair::generate(aws_lc_rs::rsa::KeySize::Rsa2048).unwrap();
        let der: Pkcs8V1Der<'static> = rsa.as_der().unwrap();
        let secret = pem("PRIVATE KEY", der.as_ref());
        let e = err(ID, &secret);
        assert!(matches!(e, KeyError::RsaKey { .. }), "{e}");
        assert_no_leak(&e, &secret);
        // PKCS#1 is refused by its label alone.
        let e = err(ID, &pem("RSA PRIVATE KEY", b"\x30\x03\x02\x01\x00"));
        assert!(matches!(e, KeyError::RsaKey { .. }), "{e}");
    }

    #[test]
    fn rejects_ed25519_pem() {
        let doc = Ed25519KeyPair::generate_pkcs8(&aws_lc_rs::rand::SystemRandom::new()).unwrap();
        let e = err(ID, &pem("PRIVATE KEY", doc.as_ref()));
        assert!(matches!(e, KeyError::Ed25519Pem { .. }), "{e}");
    }

    #[test]
    fn rejects_broken_pems() {
        let pair = ec_pair(&ECDSA_P256_SHA256_FIXED_SIGNING);
        let good = sec1_pem(&pair);

        let truncated = good.split("-----END").next().unwrap().to_owned();
        let e = err(ID, &truncated);
        assert!(matches!(e, KeyError::BadPem { .. }), "{e}");
        assert_no_leak(&e, &good);

        let bad_b64 = good.replacen("\n", "\n!!!!", 1);
        let e = err(ID, &bad_b64);
        assert!(matches!(e, KeyError::BadPem { .. }), "{e}");
        assert_no_leak(&e, &good);

        let e = err(ID, &pem("EC PRIVATE KEY", b"\x30\x03\x02\x01\x01"));
        assert!(matches!(e, KeyError::InvalidEcKey { .. }), "{e}");

        let e = err(ID, &pem("ENCRYPTED PRIVATE KEY", b"\x30\x00"));
        assert!(matches!(e, KeyError::EncryptedPem { .. }), "{e}");

        let spki = pair.public_key().as_der().unwrap();
        let e = err(ID, &pem("PUBLIC KEY", spki.as_ref()));
        assert!(
            matches!(
                e,
                KeyError::NotPrivateKey {
                    what: "public key",
                    ..
                }
            ),
            "{e}"
        );

        let e = err(ID, &pem("CERTIFICATE", b"\x30\x00"));
        assert!(
            matches!(
                e,
                KeyError::NotPrivateKey {
                    what: "certificate",
                    ..
                }
            ),
            "{e}"
        );
    }

    fn env(vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| map.get(k).cloned()
    }

    #[test]
    fn env_none_when_unset_or_blank() {
        assert!(CdpKey::from_env_with(env(&[])).unwrap().is_none());
        let blank = env(&[(ENV_KEY_ID, ""), (ENV_KEY_SECRET, "  ")]);
        assert!(CdpKey::from_env_with(blank).unwrap().is_none());
    }

    #[test]
    fn env_loads_id_and_secret() {
        let pair = ec_pair(&ECDSA_P256_SHA256_FIXED_SIGNING);
        let secret = sec1_pem(&pair).replace('\n', "\\n");
        let key = CdpKey::from_env_with(env(&[(ENV_KEY_ID, ID), (ENV_KEY_SECRET, &secret)]))
            .unwrap()
            .unwrap();
        assert_eq!(key.id(), ID);
        assert_eq!(key.algorithm(), KeyAlgorithm::Es256);
        assert_signs_for(&key, pair.public_key().as_ref());
    }

    #[test]
    fn env_falls_back_to_key_name_and_prefers_key_id() {
        let (secret, _) = ed_secret();
        let key =
            CdpKey::from_env_with(env(&[(ENV_KEY_NAME, LEGACY_ID), (ENV_KEY_SECRET, &secret)]))
                .unwrap()
                .unwrap();
        assert_eq!(key.id(), LEGACY_ID);
        let key = CdpKey::from_env_with(env(&[
            (ENV_KEY_ID, ID),
            (ENV_KEY_NAME, LEGACY_ID),
            (ENV_KEY_SECRET, &secret),
        ]))
        .unwrap()
        .unwrap();
        assert_eq!(key.id(), ID);
    }

    #[test]
    fn env_errors_when_only_one_half_set() {
        let (secret, _) = ed_secret();
        let e = CdpKey::from_env_with(env(&[(ENV_KEY_SECRET, &secret)])).unwrap_err();
        assert!(matches!(e, KeyError::MissingHalf { .. }), "{e}");
        assert!(e.to_string().contains("CDP_API_KEY_ID"), "{e}");
        assert_no_leak(&e, &secret);

        let e = CdpKey::from_env_with(env(&[(ENV_KEY_NAME, ID)])).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("CDP_API_KEY_NAME is set but CDP_API_KEY_SECRET is not"),
            "{e}"
        );
    }

    #[test]
    fn env_error_names_the_variable() {
        let e = CdpKey::from_env_with(env(&[(ENV_KEY_ID, ID), (ENV_KEY_SECRET, "not a key!")]))
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "CDP_API_KEY_SECRET: not a PEM EC key nor a base64 Ed25519 key (64 bytes)"
        );
    }

    fn write_file(dir: &tempfile::TempDir, name: &str, content: &str) -> std::path::PathBuf {
        let path = dir.path().join(name);
        std::fs::write(&path, content).unwrap();
        path
    }

    #[test]
    fn key_file_all_field_spellings() {
        let dir = tempfile::tempdir().unwrap();
        let pair = ec_pair(&ECDSA_P256_SHA256_FIXED_SIGNING);
        let pem = sec1_pem(&pair);
        let (ed, ed_public) = ed_secret();
        let cases = [
            serde_json::json!({"name": LEGACY_ID, "privateKey": pem}),
            serde_json::json!({"id": ID, "privateKey": ed}),
            serde_json::json!({"id": ID, "secret": pem}),
            serde_json::json!({"name": LEGACY_ID, "secret": ed}),
            // `id` wins over `name`, `privateKey` over `secret`.
            serde_json::json!({"id": ID, "name": "my label", "privateKey": ed, "secret": "x"}),
        ];
        for (i, case) in cases.iter().enumerate() {
            let path = write_file(&dir, &format!("k{i}.json"), &case.to_string());
            let key = CdpKey::from_key_file(&path).unwrap();
            let want_id = case.get("id").or(case.get("name")).unwrap();
            assert_eq!(key.id(), want_id.as_str().unwrap());
            if key.algorithm() == KeyAlgorithm::EdDsa {
                assert_signs_for(&key, &ed_public);
            } else {
                assert_signs_for(&key, pair.public_key().as_ref());
            }
        }
    }

    #[test]
    fn key_file_rejections() {
        let dir = tempfile::tempdir().unwrap();
        let (ed, _) = ed_secret();

        let missing = dir.path().join("nope.json");
        let e = CdpKey::from_key_file(&missing).unwrap_err();
        assert!(matches!(e, KeyError::KeyFileRead { .. }), "{e}");
        assert!(e.to_string().contains("nope.json"), "{e}");

        // Malformed JSON right after the secret: the message must not quote it.
        let path = write_file(
            &dir,
            "bad.json",
            &format!("{{\"id\": \"{ID}\", \"privateKey\": \"{ed}\" oops}}"),
        );
        let e = CdpKey::from_key_file(&path).unwrap_err();
        assert!(matches!(e, KeyError::KeyFileJson { .. }), "{e}");
        assert!(!e.to_string().contains(&ed[..12]), "{e}");

        // A bare JSON string (someone saved only the secret): not an object, not quoted back.
        let path = write_file(&dir, "str.json", &serde_json::json!(ed).to_string());
        let e = CdpKey::from_key_file(&path).unwrap_err();
        assert!(matches!(e, KeyError::KeyFileFields { .. }), "{e}");
        assert!(!e.to_string().contains(&ed[..12]), "{e}");

        let path = write_file(
            &dir,
            "noid.json",
            &serde_json::json!({"privateKey": ed}).to_string(),
        );
        let e = CdpKey::from_key_file(&path).unwrap_err();
        assert!(e.to_string().contains("`id` or `name`"), "{e}");

        let path = write_file(
            &dir,
            "nokey.json",
            &serde_json::json!({"id": ID}).to_string(),
        );
        let e = CdpKey::from_key_file(&path).unwrap_err();
        assert!(e.to_string().contains("`privateKey` or `secret`"), "{e}");

        let path = write_file(
            &dir,
            "num.json",
            &serde_json::json!({"id": 5, "privateKey": ed}).to_string(),
        );
        let e = CdpKey::from_key_file(&path).unwrap_err();
        assert!(matches!(e, KeyError::KeyFileFields { .. }), "{e}");

        let path = write_file(
            &dir,
            "empty.json",
            &serde_json::json!({"id": "", "privateKey": ed}).to_string(),
        );
        let e = CdpKey::from_key_file(&path).unwrap_err();
        assert!(matches!(e, KeyError::EmptyId { .. }), "{e}");
        assert!(e.to_string().contains("empty.json: `id`"), "{e}");

        let path = write_file(
            &dir,
            "badkey.json",
            &serde_json::json!({"id": ID, "secret": "zzz"}).to_string(),
        );
        let e = CdpKey::from_key_file(&path).unwrap_err();
        assert!(
            e.to_string().ends_with(
                "badkey.json: `secret`: not a PEM EC key nor a base64 Ed25519 key (64 bytes)"
            ),
            "{e}"
        );

        let big = "x".repeat(MAX_KEY_FILE_BYTES as usize + 1);
        let path = write_file(&dir, "big.json", &big);
        let e = CdpKey::from_key_file(&path).unwrap_err();
        assert!(matches!(e, KeyError::KeyFileTooLarge { .. }), "{e}");
    }
}
