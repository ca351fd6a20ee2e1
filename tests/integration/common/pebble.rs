//! Pebble, Let's Encrypt's ACME test server (Debian package `pebble`), on loopback.
//!
//! Its HTTPS listeners use a [`TestPki`] leaf for `localhost`/`127.0.0.1` (written as
//! `ca.pem` for the gateway's `tls.acme.ca_file`). Validation is real: Pebble's VA
//! resolves the domain (`localhost`) with the system resolver and performs TLS-ALPN-01
//! against `tls_port`, which is the gateway's HTTPS port.

use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use tempfile::TempDir;

use super::certs::{self, Alpn, KeyFormat, TestPki};

pub fn available() -> bool {
    Command::new("pebble")
        .arg("-h")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok()
}

/// A free loopback port (bound then released: another process could take it, which on a
/// test machine does not happen in the milliseconds before it is used).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

pub struct Pebble {
    child: Option<Child>,
    pub dir: TempDir,
    pub pki: TestPki,
    pub listen: SocketAddr,
    pub management: SocketAddr,
    /// The Pebble HTTPS CA, PEM (for `tls.acme.ca_file`).
    pub ca_file: PathBuf,
    log: PathBuf,
}

impl Pebble {
    /// Starts Pebble validating TLS-ALPN-01 on `tls_port`; certificates valid for
    /// `validity_s` seconds. Waits until its directory answers.
    pub async fn start(tls_port: u16, validity_s: u64) -> Pebble {
        let dir = tempfile::Builder::new()
            .prefix("onramp-gw-pebble-")
            .tempdir()
            .expect("tempdir");
        let pki = TestPki::new(KeyFormat::Pkcs8Ecdsa);
        let ca_file = dir.path().join("ca.pem");
        std::fs::write(&ca_file, certs::pem_encode("CERTIFICATE", &pki.ca_der)).unwrap();
        let listen: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let management: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let config = serde_json::json!({"pebble": {
            "listenAddress": listen.to_string(),
            "managementListenAddress": management.to_string(),
            "certificate": pki.cert_path,
            "privateKey": pki.key_path,
            "httpPort": free_port(),
            "tlsPort": tls_port,
            "ocspResponderURL": "",
            "externalAccountBindingRequired": false,
            "certificateValidityPeriod": validity_s,
        }});
        let config_path = dir.path().join("pebble.json");
        std::fs::write(&config_path, config.to_string()).unwrap();
        let log = dir.path().join("pebble.log");
        let child = Command::new("pebble")
            .arg("-config")
            .arg(&config_path)
            // No artificial validation delays, no rejected nonces, a fresh authorization
            // per order (so every order really validates).
            .env("PEBBLE_VA_NOSLEEP", "1")
            .env("PEBBLE_WFE_NONCEREJECT", "0")
            .env("PEBBLE_AUTHZREUSE", "0")
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&log).unwrap())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn pebble");
        let pebble = Pebble {
            child: Some(child),
            dir,
            pki,
            listen,
            management,
            ca_file,
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Ok(r) = pebble.client().get(pebble.directory_url()).send().await {
                if r.status().is_success() {
                    return pebble;
                }
            }
            assert!(
                Instant::now() < deadline,
                "pebble did not answer; log:\n{}",
                pebble.log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub fn directory_url(&self) -> String {
        format!("https://{}/dir", self.listen)
    }

    fn client(&self) -> reqwest::Client {
        reqwest::Client::builder()
            .use_preconfigured_tls((*self.pki.client_config(Alpn::Http11)).clone())
            .no_proxy()
            .timeout(Duration::from_secs(10))
            .build()
            .unwrap()
    }

    /// The root that issues the gateway's certificates (from the management interface).
    pub async fn issuing_root(&self) -> CertificateDer<'static> {
        let pem = self
            .client()
            .get(format!("https://{}/roots/0", self.management))
            .send()
            .await
            .expect("GET /roots/0")
            .text()
            .await
            .unwrap();
        CertificateDer::from_pem_slice(pem.as_bytes()).expect("root PEM")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Pebble {
    fn drop(&mut self) {
        self.stop();
    }
}
