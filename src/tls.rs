//! TLS termination: certificate loading (PEM; PKCS#8, PKCS#1 and SEC1 keys), the
//! development self-signed certificate, and the rustls `ServerConfig`.
//!
//! The certificate is served through [`CertStore`], a `ResolvesServerCert` whose
//! current key can be swapped atomically: new handshakes pick up a reloaded
//! certificate while established connections keep the one they negotiated. A
//! failed reload never replaces a working certificate.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::ServerConfig;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("tls.cert: cannot read {path}: {source}")]
    ReadCert {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("tls.key: cannot read {path}: {source}")]
    ReadKey {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("tls.cert: {path}: no PEM certificate found")]
    NoCertificate { path: PathBuf },
    #[error("tls.cert: {path}: invalid PEM: {reason}")]
    BadCertificate { path: PathBuf, reason: String },
    #[error("tls.key: {path}: no PEM private key found (expected PKCS#8, PKCS#1 or SEC1)")]
    NoKey { path: PathBuf },
    #[error("tls.key: {path}: unusable private key: {reason}")]
    BadKey { path: PathBuf, reason: String },
    #[error("tls: the key in {key} does not match the certificate in {cert}")]
    KeyMismatch { cert: PathBuf, key: PathBuf },
    #[error("tls: cannot generate the self-signed certificate: {0}")]
    SelfSigned(String),
    #[error("tls: {0}")]
    Config(#[from] rustls::Error),
}

/// The crypto provider for every TLS context in the process: aws-lc-rs. It is rustls'
/// default, it is what jsonwebtoken signs with here (one crypto library in the binary's
/// hot paths), and its AES-GCM/P-256 code is the faster of the two on x86-64 and arm64.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// Installs aws-lc-rs as the process default. Needed because two providers are compiled
/// in (reqwest's dependency tree brings ring's types) and rustls refuses to guess.
pub fn install_default_provider() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
}

/// A certificate + key pair read from PEM files and checked to belong together.
pub fn load_certified_key(cert: &Path, key: &Path) -> Result<CertifiedKey, TlsError> {
    let cert_pem = std::fs::read(cert).map_err(|source| TlsError::ReadCert {
        path: cert.to_path_buf(),
        source,
    })?;
    let key_pem = std::fs::read(key).map_err(|source| TlsError::ReadKey {
        path: key.to_path_buf(),
        source,
    })?;
    certified_key_from_pem(&cert_pem, &key_pem, cert, key)
}

fn certified_key_from_pem(
    cert_pem: &[u8],
    key_pem: &[u8],
    cert_path: &Path,
    key_path: &Path,
) -> Result<CertifiedKey, TlsError> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<_, _>>()
        .map_err(|e| TlsError::BadCertificate {
            path: cert_path.to_path_buf(),
            reason: e.to_string(),
        })?;
    if chain.is_empty() {
        return Err(TlsError::NoCertificate {
            path: cert_path.to_path_buf(),
        });
    }
    // from_pem_slice takes the first PRIVATE KEY / RSA PRIVATE KEY / EC PRIVATE KEY block.
    let key_der = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| match e {
        rustls_pki_types::pem::Error::NoItemsFound => TlsError::NoKey {
            path: key_path.to_path_buf(),
        },
        other => TlsError::BadKey {
            path: key_path.to_path_buf(),
            reason: other.to_string(),
        },
    })?;
    let signing_key = provider()
        .key_provider
        .load_private_key(key_der)
        .map_err(|e| TlsError::BadKey {
            path: key_path.to_path_buf(),
            reason: e.to_string(),
        })?;
    let certified = CertifiedKey::new(chain, signing_key);
    match certified.keys_match() {
        Ok(()) => Ok(certified),
        Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => Ok(certified),
        Err(rustls::Error::InconsistentKeys(_)) => Err(TlsError::KeyMismatch {
            cert: cert_path.to_path_buf(),
            key: key_path.to_path_buf(),
        }),
        Err(e) => Err(TlsError::BadCertificate {
            path: cert_path.to_path_buf(),
            reason: e.to_string(),
        }),
    }
}

/// An in-memory certificate for `localhost`, `127.0.0.1` and `::1` (development only).
pub fn self_signed() -> Result<CertifiedKey, TlsError> {
    let names = vec![
        "localhost".to_string(),
        "127.0.0.1".to_string(),
        "::1".to_string(),
    ];
    let generated = rcgen::generate_simple_self_signed(names)
        .map_err(|e| TlsError::SelfSigned(e.to_string()))?;
    let cert_pem = generated.cert.pem();
    let key_pem = generated.signing_key.serialize_pem();
    certified_key_from_pem(
        cert_pem.as_bytes(),
        key_pem.as_bytes(),
        Path::new("<self-signed>"),
        Path::new("<self-signed>"),
    )
}

/// Where the served certificate comes from.
#[derive(Debug, Clone)]
pub enum CertSource {
    Files {
        cert: PathBuf,
        key: PathBuf,
    },
    SelfSigned,
    /// `[tls.acme]`: the cache in `tls.acme.cache_dir`, written by `acme`'s order task.
    /// Until a first certificate is issued, an in-memory self-signed one for `domains`
    /// is served (clients cannot verify it: there is nothing better to serve yet).
    Acme {
        cert: PathBuf,
        key: PathBuf,
        domains: Vec<String>,
    },
}

impl CertSource {
    pub fn load(&self) -> Result<CertifiedKey, TlsError> {
        match self {
            CertSource::Files { cert, key } => load_certified_key(cert, key),
            CertSource::SelfSigned => self_signed(),
            CertSource::Acme { cert, key, .. } => load_certified_key(cert, key),
        }
    }

    /// What to serve at start: the source's certificate, or for ACME with no usable
    /// cache yet, a placeholder (a bad cache is re-ordered, never a reason not to start).
    fn load_initial(&self) -> Result<CertifiedKey, TlsError> {
        match (self.load(), self) {
            (Ok(k), _) => Ok(k),
            (Err(e), CertSource::Acme { domains, .. }) => {
                if !matches!(&e, TlsError::ReadCert { source, .. } if source.kind() == std::io::ErrorKind::NotFound)
                {
                    tracing::warn!(error = %e, "tls.acme: cached certificate unusable; a new one is ordered");
                }
                self_signed_for(domains.clone())
            }
            (Err(e), _) => Err(e),
        }
    }
}

/// An in-memory self-signed certificate for `names`.
pub fn self_signed_for(names: Vec<String>) -> Result<CertifiedKey, TlsError> {
    let generated = rcgen::generate_simple_self_signed(names)
        .map_err(|e| TlsError::SelfSigned(e.to_string()))?;
    certified_key_from_pem(
        generated.cert.pem().as_bytes(),
        generated.signing_key.serialize_pem().as_bytes(),
        Path::new("<self-signed>"),
        Path::new("<self-signed>"),
    )
}

/// Told about every certificate that goes live (metrics: expiry time).
pub type CertObserver = Box<dyn Fn(&CertifiedKey) + Send + Sync>;

/// The certificate every new handshake gets; swapped atomically on reload.
pub struct CertStore {
    source: CertSource,
    current: ArcSwap<CertifiedKey>,
    observer: std::sync::OnceLock<CertObserver>,
    /// TLS-ALPN-01 answers by SNI name, set by the ACME order task while it validates.
    challenges: ArcSwap<HashMap<String, Arc<CertifiedKey>>>,
}

impl std::fmt::Debug for CertStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertStore")
            .field("source", &self.source)
            .finish()
    }
}

impl CertStore {
    pub fn load(source: CertSource) -> Result<Arc<Self>, TlsError> {
        let first = source.load_initial()?;
        Ok(Arc::new(Self {
            source,
            current: ArcSwap::from_pointee(first),
            observer: std::sync::OnceLock::new(),
            challenges: ArcSwap::from_pointee(HashMap::new()),
        }))
    }

    /// Serves `key` to TLS-ALPN-01 validation handshakes (ALPN `acme-tls/1`) for `name`.
    pub fn set_challenge(&self, name: String, key: Arc<CertifiedKey>) {
        self.challenges.rcu(|m| {
            let mut m = HashMap::clone(m);
            m.insert(name.to_ascii_lowercase(), key.clone());
            m
        });
    }

    pub fn clear_challenges(&self) {
        self.challenges.store(Arc::new(HashMap::new()));
    }

    fn is_acme(&self) -> bool {
        matches!(self.source, CertSource::Acme { .. })
    }

    /// Re-reads the files. On error the current certificate stays in use.
    pub fn reload(&self) -> Result<(), TlsError> {
        let fresh = Arc::new(self.source.load()?);
        self.current.store(fresh.clone());
        if let Some(observe) = self.observer.get() {
            observe(&fresh);
        }
        Ok(())
    }

    /// Registers the observer and tells it about the current certificate.
    pub fn observe(&self, observer: CertObserver) {
        observer(&self.current.load_full());
        let _ = self.observer.set(observer);
    }

    pub fn source(&self) -> &CertSource {
        &self.source
    }

    pub fn current(&self) -> Arc<CertifiedKey> {
        self.current.load_full()
    }
}

/// How often the certificate files are re-read to notice a rotation.
pub const WATCH_INTERVAL: std::time::Duration = std::time::Duration::from_secs(2);

/// Watches the certificate and key files and reloads when their content changes.
///
/// Polling the content (not inotify via the `notify` crate) on purpose: Kubernetes
/// Secret volumes rotate by atomically swapping the `..data` symlink, which inotify
/// only reports on the parent directory and which editors, `cp` and cert-manager
/// each trigger differently; reading two small files every 2 s sees every one of
/// those the same way, costs nothing measurable, and cannot miss a swap.
/// A pair that fails to load (half-written file, mismatched key) is logged once and
/// the current certificate stays in use; the next change is tried again.
pub fn spawn_file_watch(store: Arc<CertStore>) -> Option<tokio::task::JoinHandle<()>> {
    let CertSource::Files { cert, key } = store.source().clone() else {
        return None;
    };
    Some(tokio::spawn(async move {
        let mut last = fingerprint(&cert, &key).await;
        let mut ticker = tokio::time::interval(WATCH_INTERVAL);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticker.tick().await;
            let now = fingerprint(&cert, &key).await;
            if now == last || now.is_none() {
                continue;
            }
            last = now;
            match store.reload() {
                Ok(()) => {
                    tracing::info!(cert = %cert.display(), "certificate files changed: reloaded")
                }
                Err(e) => tracing::error!(
                    error = %e,
                    "certificate files changed but cannot be loaded; keeping the current certificate"
                ),
            }
        }
    }))
}

/// A hash of both files' bytes (None while either is unreadable, e.g. mid-swap).
async fn fingerprint(cert: &Path, key: &Path) -> Option<u64> {
    use std::hash::{Hash, Hasher};
    let c = tokio::fs::read(cert).await.ok()?;
    let k = tokio::fs::read(key).await.ok()?;
    let mut h = std::collections::hash_map::DefaultHasher::new();
    c.hash(&mut h);
    k.hash(&mut h);
    Some(h.finish())
}

impl ResolvesServerCert for CertStore {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        // A validation connection offers `acme-tls/1` alone (RFC 8737 §3); it gets the
        // challenge certificate for its SNI or no handshake at all, never the real one.
        if self.is_acme() && is_acme_validation(&hello) {
            let name = hello.server_name()?.to_ascii_lowercase();
            return self.challenges.load().get(&name).cloned();
        }
        Some(self.current.load_full())
    }
}

fn is_acme_validation(hello: &ClientHello<'_>) -> bool {
    let Some(mut protocols) = hello.alpn() else {
        return false;
    };
    protocols.next() == Some(crate::acme::ACME_TLS_ALPN) && protocols.next().is_none()
}

/// The leaf certificate's notAfter, in seconds since the Unix epoch.
pub fn not_after(key: &CertifiedKey) -> Option<i64> {
    let leaf = key.cert.first()?;
    let (_, parsed) = x509_parser::parse_x509_certificate(leaf.as_ref()).ok()?;
    Some(parsed.validity().not_after.timestamp())
}

/// The listener's provider: the process's one ([`provider`]) with the SHA-256 suites (AES-128-GCM, then
/// ChaCha20-Poly1305) ahead of AES-256-GCM-SHA384, chosen in this order whatever the
/// client's order (`ignore_client_order`). All are strong; browsers already ask for
/// AES-128-GCM first. The order matters for CPU: SHA-384's key schedule runs on aws-lc's
/// generic SHA-512 code on AMD CPUs (its AVX path is Intel-only), while SHA-256 uses the
/// SHA extensions: with OpenSSL-based clients (which list AES-256 first), the handshake
/// hashing was 16% of a new connection's CPU (perf, proxy-bench newconn).
fn listener_provider() -> Arc<CryptoProvider> {
    let mut p = CryptoProvider::clone(&provider());
    // Stable: rustls' own order is kept within each hash.
    p.cipher_suites.sort_by_key(|suite| {
        let hash = match suite {
            rustls::SupportedCipherSuite::Tls13(s) => s.common.hash_provider.algorithm(),
            rustls::SupportedCipherSuite::Tls12(s) => s.common.hash_provider.algorithm(),
        };
        u8::from(hash != rustls::crypto::hash::HashAlgorithm::SHA256)
    });
    Arc::new(p)
}

/// TLS 1.2 and 1.3 only, ALPN `h2` then `http/1.1`.
/// With `[tls.acme]`, `acme-tls/1` too (for TLS-ALPN-01 validation connections).
pub fn server_config(store: Arc<CertStore>) -> Result<Arc<ServerConfig>, TlsError> {
    let store_is_acme = store.is_acme();
    let mut config = ServerConfig::builder_with_provider(listener_provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_no_client_auth()
        .with_cert_resolver(store);
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    config.ignore_client_order = true;
    if store_is_acme {
        // Last: a client offering h2 or http/1.1 never gets acme-tls/1.
        config
            .alpn_protocols
            .push(crate::acme::ACME_TLS_ALPN.to_vec());
    }
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn self_signed_builds_a_server_config() {
        let store = CertStore::load(CertSource::SelfSigned).expect("self-signed");
        let cfg = server_config(store).expect("config");
        assert_eq!(
            cfg.alpn_protocols,
            vec![b"h2".to_vec(), b"http/1.1".to_vec()]
        );
    }

    #[test]
    fn sha256_suites_come_first_in_the_servers_order() {
        let store = CertStore::load(CertSource::SelfSigned).expect("self-signed");
        let cfg = server_config(store).expect("config");
        assert!(cfg.ignore_client_order);
        let names: Vec<String> = cfg
            .crypto_provider()
            .cipher_suites
            .iter()
            .map(|s| format!("{:?}", s.suite()))
            .collect();
        assert_eq!(names[0], "TLS13_AES_128_GCM_SHA256", "{names:?}");
        assert_eq!(names[1], "TLS13_CHACHA20_POLY1305_SHA256", "{names:?}");
        let first_sha384 = names.iter().position(|n| n.ends_with("SHA384")).unwrap();
        assert!(
            names[first_sha384..].iter().all(|n| n.ends_with("SHA384")),
            "{names:?}"
        );
        // Nothing dropped: a client that offers only AES-256 is still served.
        assert_eq!(
            names.len(),
            rustls::crypto::aws_lc_rs::default_provider()
                .cipher_suites
                .len()
        );
    }

    #[test]
    fn expiry_is_read_from_the_leaf() {
        let store = CertStore::load(CertSource::SelfSigned).unwrap();
        let t = not_after(&store.current()).expect("parsable");
        assert!(t > 1_700_000_000, "{t}");
    }

    #[test]
    fn mismatched_key_is_refused() {
        let a = rcgen::generate_simple_self_signed(vec!["a".into()]).unwrap();
        let b = rcgen::generate_simple_self_signed(vec!["b".into()]).unwrap();
        let err = certified_key_from_pem(
            a.cert.pem().as_bytes(),
            b.signing_key.serialize_pem().as_bytes(),
            Path::new("a.crt"),
            Path::new("b.key"),
        )
        .unwrap_err();
        assert!(matches!(err, TlsError::KeyMismatch { .. }), "{err}");
    }

    #[test]
    fn garbage_files_are_named() {
        let err = certified_key_from_pem(
            b"nothing",
            b"nothing",
            Path::new("c.pem"),
            Path::new("k.pem"),
        )
        .unwrap_err();
        assert!(err.to_string().contains("c.pem"), "{err}");
    }

    #[test]
    fn failed_reload_keeps_the_old_certificate() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
        let g = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
        std::fs::write(&cert, g.cert.pem()).unwrap();
        std::fs::write(&key, g.signing_key.serialize_pem()).unwrap();
        let store = CertStore::load(CertSource::Files {
            cert: cert.clone(),
            key,
        })
        .unwrap();
        let before = store.current();
        std::fs::write(&cert, "-----BEGIN CERTIFICATE-----\nhalf").unwrap();
        assert!(store.reload().is_err());
        assert!(Arc::ptr_eq(&before, &store.current()));
    }
}
