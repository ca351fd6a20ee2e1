//! `[tls.acme]`: certificates ordered and renewed over ACME (RFC 8555) with the
//! TLS-ALPN-01 challenge (RFC 8737) answered on the HTTPS listener itself.
//!
//! The order logic is `instant-acme`'s; everything around it is here: the account and
//! certificate cache in `tls.acme.cache_dir` (files 0600), the renewal schedule, and
//! handing the challenge certificates to [`CertStore`]. The issued certificate is
//! written to the cache and then loaded through [`CertStore::reload`], so expiry metric,
//! SIGHUP and renewal are one mechanism. At start the cache is read with no network
//! call; the order task only talks to the directory when the cached certificate is
//! missing, does not cover `domains`, or is due for renewal.

use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use instant_acme::{
    Account, AccountCredentials, AuthorizationStatus, BodyWrapper, BytesResponse, ChallengeType,
    HttpClient, Identifier, NewAccount, NewOrder, OrderStatus, RetryPolicy,
};
use rustls::sign::CertifiedKey;
use rustls_pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};

use crate::tls::{self, CertStore};

/// The ALPN protocol of TLS-ALPN-01 validation connections (RFC 8737 §6.2).
pub const ACME_TLS_ALPN: &[u8] = b"acme-tls/1";

/// Bound on each HTTP call to the directory (connect + response).
const HTTP_TIMEOUT: Duration = Duration::from_secs(15);
/// Bound on one whole order (account, challenges, finalize, download).
const ORDER_TIMEOUT: Duration = Duration::from_secs(180);
/// How long the CA may take to validate the challenges / issue the certificate.
const POLL_TIMEOUT: Duration = Duration::from_secs(90);
/// First retry delay after a failed order; doubled per failure up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_secs(5);
const MAX_BACKOFF: Duration = Duration::from_secs(3600);
/// Longest sleep between two looks at the cached certificate.
const RECHECK_EVERY: Duration = Duration::from_secs(3600);

#[derive(Debug, thiserror::Error)]
pub enum AcmeError {
    #[error("tls.acme.cache_dir: {path}: {source}")]
    CacheDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("tls.acme.ca_file: {0}")]
    CaFile(String),
    #[error("tls.acme.directory_url: {0}")]
    Directory(String),
    #[error("tls.acme: {0}")]
    Order(String),
}

impl From<instant_acme::Error> for AcmeError {
    fn from(e: instant_acme::Error) -> Self {
        AcmeError::Order(e.to_string())
    }
}

/// `[tls.acme]`, validated (see `config.rs`), paths resolved.
#[derive(Debug, Clone)]
pub struct AcmeSettings {
    pub directory_url: String,
    pub domains: Vec<String>,
    pub contact: String,
    pub cache_dir: PathBuf,
    pub ca_file: Option<PathBuf>,
}

impl AcmeSettings {
    pub fn cert_path(&self) -> PathBuf {
        self.cache_dir.join("cert.pem")
    }
    pub fn key_path(&self) -> PathBuf {
        self.cache_dir.join("key.pem")
    }
    fn account_path(&self) -> PathBuf {
        self.cache_dir.join("account.json")
    }
}

/// Everything the order task needs, built at start-up with no network call (so `check`
/// refuses an unusable `cache_dir` or `ca_file` the same way the run does).
pub struct Acme {
    settings: AcmeSettings,
    http: reqwest::Client,
}

impl std::fmt::Debug for Acme {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Acme")
            .field("settings", &self.settings)
            .finish()
    }
}

impl Acme {
    pub fn prepare(settings: AcmeSettings) -> Result<Self, AcmeError> {
        prepare_cache_dir(&settings.cache_dir)?;
        let mut builder = reqwest::Client::builder()
            .use_rustls_tls()
            .connect_timeout(HTTP_TIMEOUT)
            .timeout(HTTP_TIMEOUT)
            // ACME responses are small JSON/PEM; a directory never needs to redirect us.
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("onramp-gateway/", env!("CARGO_PKG_VERSION")));
        if let Some(path) = &settings.ca_file {
            let roots = crate::ca_file::ExtraRoots::load(path).map_err(AcmeError::CaFile)?;
            builder = roots.add_to(builder);
        }
        let http = builder
            .build()
            .map_err(|e| AcmeError::Directory(format!("cannot build the HTTP client: {e}")))?;
        Ok(Self { settings, http })
    }

    pub fn settings(&self) -> &AcmeSettings {
        &self.settings
    }

    /// Orders at once when needed, then sleeps until renewal; forever.
    pub fn spawn(self, store: Arc<CertStore>) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move { self.run(store).await })
    }

    async fn run(self, store: Arc<CertStore>) {
        let mut failures: u32 = 0;
        loop {
            let wait = match tls::load_certified_key(
                &self.settings.cert_path(),
                &self.settings.key_path(),
            ) {
                Ok(key) if covers(&key, &self.settings.domains) => {
                    renewal_delay(&key, SystemTime::now())
                }
                Ok(_) => {
                    tracing::info!(
                        "tls.acme: cached certificate does not cover tls.acme.domains; ordering"
                    );
                    Duration::ZERO
                }
                Err(_) => Duration::ZERO,
            };
            if !wait.is_zero() {
                tracing::info!(renew_in_s = wait.as_secs(), "tls.acme: certificate valid");
                // Woken at least hourly to look again: the sleep runs on the monotonic
                // clock, certificate times are wall-clock (suspend, clock steps), and the
                // cache may have been replaced by hand.
                tokio::time::sleep(wait.min(RECHECK_EVERY)).await;
                continue;
            }
            let outcome = match tokio::time::timeout(ORDER_TIMEOUT, self.order(&store)).await {
                Ok(r) => r,
                Err(_) => Err(AcmeError::Order(format!(
                    "order not done within {} s",
                    ORDER_TIMEOUT.as_secs()
                ))),
            };
            // Never leave a challenge certificate behind, whatever happened.
            store.clear_challenges();
            match outcome.and_then(|()| {
                store
                    .reload()
                    .map_err(|e| AcmeError::Order(format!("issued certificate unusable: {e}")))
            }) {
                Ok(()) => {
                    failures = 0;
                    tracing::info!(domains = ?self.settings.domains, "tls.acme: certificate issued and now served");
                }
                Err(e) => {
                    failures = failures.saturating_add(1);
                    let delay = backoff(failures);
                    tracing::error!(error = %e, retry_in_s = delay.as_secs(), "tls.acme: order failed; the current certificate stays in use");
                    tokio::time::sleep(delay).await;
                }
            }
        }
    }

    async fn account(&self) -> Result<Account, AcmeError> {
        let path = self.settings.account_path();
        if let Ok(bytes) = tokio::fs::read(&path).await {
            if let Ok(cached) = serde_json::from_slice::<CachedAccount>(&bytes) {
                if cached.directory_url == self.settings.directory_url {
                    let builder =
                        Account::builder_with_http(Box::new(ReqwestHttp(self.http.clone())));
                    match builder.from_credentials(cached.credentials).await {
                        Ok(a) => return Ok(a),
                        Err(e) => {
                            tracing::warn!(error = %e, "tls.acme: cached account unusable; creating a new one")
                        }
                    }
                }
            }
        }
        let builder = Account::builder_with_http(Box::new(ReqwestHttp(self.http.clone())));
        let contact = [self.settings.contact.as_str()];
        let (account, credentials) = builder
            .create(
                &NewAccount {
                    contact: &contact,
                    terms_of_service_agreed: true,
                    only_return_existing: false,
                },
                self.settings.directory_url.clone(),
                None,
            )
            .await?;
        let cached = CachedAccount {
            directory_url: self.settings.directory_url.clone(),
            credentials,
        };
        let json = serde_json::to_vec(&cached)
            .map_err(|e| AcmeError::Order(format!("cannot encode the account: {e}")))?;
        write_private(&path, &json)?;
        Ok(account)
    }

    async fn order(&self, store: &CertStore) -> Result<(), AcmeError> {
        let account = match self.account().await {
            Ok(a) => a,
            Err(e) => return Err(e),
        };
        let ids: Vec<Identifier> = self
            .settings
            .domains
            .iter()
            .map(|d| Identifier::Dns(d.clone()))
            .collect();
        let mut order = match account.new_order(&NewOrder::new(&ids)).await {
            Ok(o) => o,
            Err(e) => {
                // An account the CA forgot (e.g. a test CA restarted): start afresh next time.
                let _ = std::fs::remove_file(self.settings.account_path());
                return Err(e.into());
            }
        };
        let mut authorizations = order.authorizations();
        while let Some(authz) = authorizations.next().await {
            let mut authz = authz?;
            match authz.status {
                AuthorizationStatus::Valid => continue,
                AuthorizationStatus::Pending => {}
                other => {
                    return Err(AcmeError::Order(format!(
                        "authorization for {} is {other:?}",
                        authz.identifier()
                    )))
                }
            }
            let mut challenge = authz
                .challenge(ChallengeType::TlsAlpn01)
                .ok_or_else(|| AcmeError::Order("the CA offers no tls-alpn-01 challenge".into()))?;
            let name = challenge.identifier().to_string();
            let digest = challenge.key_authorization().digest();
            store.set_challenge(
                name.clone(),
                Arc::new(challenge_cert(&name, digest.as_ref())?),
            );
            challenge.set_ready().await?;
        }
        let poll = RetryPolicy::new()
            .initial_delay(Duration::from_millis(250))
            .timeout(POLL_TIMEOUT);
        let status = order.poll_ready(&poll).await?;
        if status != OrderStatus::Ready {
            return Err(AcmeError::Order(format!(
                "order is {status:?} after validation (challenge failed?)"
            )));
        }
        let key = rcgen::KeyPair::generate().map_err(|e| AcmeError::Order(e.to_string()))?;
        let mut params = rcgen::CertificateParams::new(self.settings.domains.clone())
            .map_err(|e| AcmeError::Order(e.to_string()))?;
        params.distinguished_name = rcgen::DistinguishedName::new();
        let csr = params
            .serialize_request(&key)
            .map_err(|e| AcmeError::Order(e.to_string()))?;
        order.finalize_csr(csr.der()).await?;
        let chain = order.poll_certificate(&poll).await?;
        self.store_certificate(chain.as_bytes(), key.serialize_pem().as_bytes())
    }

    /// Checks the pair, then replaces the cache (each file written aside and renamed).
    fn store_certificate(&self, chain: &[u8], key: &[u8]) -> Result<(), AcmeError> {
        let (cert_path, key_path) = (self.settings.cert_path(), self.settings.key_path());
        let (cert_tmp, key_tmp) = (
            cert_path.with_extension("new"),
            key_path.with_extension("new"),
        );
        write_private(&cert_tmp, chain)?;
        write_private(&key_tmp, key)?;
        tls::load_certified_key(&cert_tmp, &key_tmp)
            .map_err(|e| AcmeError::Order(format!("the CA's certificate does not load: {e}")))?;
        // Key first: a crash between the renames leaves a mismatched pair, which the next
        // start treats as no cached certificate (and orders again), never as a bad one served.
        rename(&key_tmp, &key_path)?;
        rename(&cert_tmp, &cert_path)?;
        Ok(())
    }
}

#[derive(serde::Serialize, serde::Deserialize)]
struct CachedAccount {
    directory_url: String,
    credentials: AccountCredentials,
}

fn rename(from: &Path, to: &Path) -> Result<(), AcmeError> {
    std::fs::rename(from, to).map_err(|source| AcmeError::CacheDir {
        path: to.to_path_buf(),
        source,
    })
}

/// Creates `cache_dir` (0700) when missing and proves it is writable.
pub fn prepare_cache_dir(dir: &Path) -> Result<(), AcmeError> {
    use std::os::unix::fs::DirBuilderExt;
    let err = |source| AcmeError::CacheDir {
        path: dir.to_path_buf(),
        source,
    };
    if !dir.is_dir() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(err)?;
    }
    let probe = dir.join(".write-test");
    write_private(&probe, b"")?;
    let _ = std::fs::remove_file(&probe);
    Ok(())
}

/// Writes a file readable by the owner only (keys and account credentials live here).
fn write_private(path: &Path, data: &[u8]) -> Result<(), AcmeError> {
    use std::io::Write;
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let err = |source| AcmeError::CacheDir {
        path: path.to_path_buf(),
        source,
    };
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(err)?;
    // `mode` only applies on creation; a file left by an older run is tightened too.
    f.set_permissions(std::fs::Permissions::from_mode(0o600))
        .map_err(err)?;
    f.write_all(data).map_err(err)?;
    f.sync_all().map_err(err)
}

/// The self-signed certificate that answers a TLS-ALPN-01 validation for `name`: the
/// name as its only SAN and the key authorization digest in the critical
/// acmeIdentifier extension (RFC 8737 §3).
pub fn challenge_cert(name: &str, digest: &[u8]) -> Result<CertifiedKey, AcmeError> {
    let fail = |e: rcgen::Error| AcmeError::Order(format!("challenge certificate: {e}"));
    let mut params = rcgen::CertificateParams::new(vec![name.to_string()]).map_err(fail)?;
    params.custom_extensions = vec![rcgen::CustomExtension::new_acme_identifier(digest)];
    let key = rcgen::KeyPair::generate().map_err(fail)?;
    let cert = params.self_signed(&key).map_err(fail)?;
    let der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    let signing = tls::provider()
        .key_provider
        .load_private_key(der)
        .map_err(|e| AcmeError::Order(format!("challenge key: {e}")))?;
    Ok(CertifiedKey::new(vec![cert.der().clone()], signing))
}

/// Whether the leaf's DNS names include every configured domain.
fn covers(key: &CertifiedKey, domains: &[String]) -> bool {
    let Some(leaf) = key.cert.first() else {
        return false;
    };
    let Ok((_, parsed)) = x509_parser::parse_x509_certificate(leaf.as_ref()) else {
        return false;
    };
    let names: Vec<String> = match parsed.subject_alternative_name() {
        Ok(Some(san)) => san
            .value
            .general_names
            .iter()
            .filter_map(|n| match n {
                x509_parser::extensions::GeneralName::DNSName(d) => Some(d.to_ascii_lowercase()),
                _ => None,
            })
            .collect(),
        _ => return false,
    };
    domains
        .iter()
        .all(|d| names.iter().any(|n| n == &d.to_ascii_lowercase()))
}

/// Time until the certificate is due: at 2/3 of its lifetime (30 days before expiry for
/// Let's Encrypt's 90-day certificates; proportionally for short-lived ones).
pub fn renewal_delay(key: &CertifiedKey, now: SystemTime) -> Duration {
    let Some(leaf) = key.cert.first() else {
        return Duration::ZERO;
    };
    let Ok((_, parsed)) = x509_parser::parse_x509_certificate(leaf.as_ref()) else {
        return Duration::ZERO;
    };
    let nb = parsed.validity().not_before.timestamp();
    let na = parsed.validity().not_after.timestamp();
    if na <= nb {
        return Duration::ZERO;
    }
    let ahead = (na - nb) / 3;
    let due = na - ahead;
    let now = now
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    Duration::from_secs(due.saturating_sub(now).max(0) as u64)
}

fn backoff(failures: u32) -> Duration {
    let factor = 1u32 << failures.saturating_sub(1).min(12);
    FIRST_BACKOFF.saturating_mul(factor).min(MAX_BACKOFF)
}

/// instant-acme's HTTP calls through reqwest: the process's one HTTP client stack, with
/// its rustls (aws-lc-rs) config, `ca_file` trust and timeouts.
struct ReqwestHttp(reqwest::Client);

impl HttpClient for ReqwestHttp {
    fn request(
        &self,
        req: http::Request<BodyWrapper<Bytes>>,
    ) -> Pin<Box<dyn std::future::Future<Output = Result<BytesResponse, instant_acme::Error>> + Send>>
    {
        let client = self.0.clone();
        Box::pin(async move {
            let other = |e: Box<dyn std::error::Error + Send + Sync>| instant_acme::Error::Other(e);
            let (parts, body) = req.into_parts();
            let body = body
                .collect()
                .await
                .map_err(|e| other(e.into()))?
                .to_bytes();
            let rsp = client
                .request(parts.method, parts.uri.to_string())
                .headers(parts.headers)
                .body(body)
                .send()
                .await
                .map_err(|e| other(Box::new(e)))?;
            let mut out = http::Response::builder().status(rsp.status());
            for (k, v) in rsp.headers() {
                out = out.header(k, v);
            }
            let bytes = rsp.bytes().await.map_err(|e| other(Box::new(e)))?;
            let out = out.body(Full::new(bytes)).map_err(|e| other(Box::new(e)))?;
            Ok(BytesResponse::from(out))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cert_valid_for(secs_before: i64, secs_after: i64) -> CertifiedKey {
        let mut p = rcgen::CertificateParams::new(vec!["a.example".into()]).unwrap();
        let now = time_now();
        p.not_before = rcgen::date_time_ymd(1970, 1, 1)
            + std::time::Duration::from_secs((now - secs_before) as u64);
        p.not_after = rcgen::date_time_ymd(1970, 1, 1)
            + std::time::Duration::from_secs((now + secs_after) as u64);
        let k = rcgen::KeyPair::generate().unwrap();
        let c = p.self_signed(&k).unwrap();
        let der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(k.serialize_der()));
        CertifiedKey::new(
            vec![c.der().clone()],
            tls::provider().key_provider.load_private_key(der).unwrap(),
        )
    }

    fn time_now() -> i64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64
    }

    #[test]
    fn renewal_is_due_at_two_thirds_of_the_lifetime() {
        // 90 days, 10 in: due 30 days before expiry = in 50 days.
        let d = renewal_delay(&cert_valid_for(10 * 86400, 80 * 86400), SystemTime::now());
        assert!((49 * 86400..=51 * 86400).contains(&d.as_secs()), "{d:?}");
        // 30 s lifetime, 5 s in: due at 20 s = in 15 s.
        let d = renewal_delay(&cert_valid_for(5, 25), SystemTime::now());
        assert!((13..=16).contains(&d.as_secs()), "{d:?}");
        // Past due: now.
        assert_eq!(
            renewal_delay(&cert_valid_for(100, 10), SystemTime::now()),
            Duration::ZERO
        );
    }

    #[test]
    fn coverage_needs_every_domain() {
        let k = cert_valid_for(0, 100);
        assert!(covers(&k, &["a.example".into()]));
        assert!(!covers(&k, &["a.example".into(), "b.example".into()]));
    }

    #[test]
    fn challenge_cert_carries_the_acme_identifier() {
        let k = challenge_cert("a.example", &[7u8; 32]).unwrap();
        let (_, parsed) = x509_parser::parse_x509_certificate(k.cert[0].as_ref()).unwrap();
        let ext = parsed
            .extensions()
            .iter()
            .find(|e| e.oid.to_id_string() == "1.3.6.1.5.5.7.1.31")
            .expect("acmeIdentifier");
        assert!(ext.critical);
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        assert_eq!(backoff(1), FIRST_BACKOFF);
        assert_eq!(backoff(2), FIRST_BACKOFF * 2);
        assert_eq!(backoff(100), MAX_BACKOFF);
    }
}
