//! Extra CA certificates from a PEM file: the one loader behind every `*.ca_file` key
//! (`cdp.ca_file`, `tls.acme.ca_file`, `rate_limit.redis_ca_file`).
//!
//! Each of those keys *adds* trust to a client's built-in roots (a corporate egress TLS
//! proxy, a private or test CA); none replaces them. The file is read, every
//! `-----BEGIN CERTIFICATE-----` block parsed, and each certificate checked to be usable as
//! a trust anchor, exactly as rustls (and so reqwest) will check it when the client is
//! built. That is why `check` can refuse a bad file by its key instead of the run failing
//! later.

use std::fmt;
use std::path::{Path, PathBuf};

use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::CertificateDer;

/// The certificates of one CA file, each validated as a trust anchor.
#[derive(Clone)]
pub struct ExtraRoots {
    path: PathBuf,
    certs: Vec<CertificateDer<'static>>,
}

impl fmt::Debug for ExtraRoots {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ExtraRoots")
            .field("path", &self.path)
            .field("certificates", &self.certs.len())
            .finish()
    }
}

impl ExtraRoots {
    /// Reads and validates `path`. The error says what is wrong with the file (and names
    /// it), not which key pointed at it: callers prefix their key.
    pub fn load(path: &Path) -> Result<Self, String> {
        let pem =
            std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        let certs = CertificateDer::pem_slice_iter(&pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("{}: bad PEM: {e}", path.display()))?;
        if certs.is_empty() {
            return Err(format!(
                "{}: no PEM certificate (-----BEGIN CERTIFICATE-----) in it",
                path.display()
            ));
        }
        // The same check rustls applies when the client's root store is built.
        let mut store = rustls::RootCertStore::empty();
        for cert in &certs {
            store
                .add(cert.clone())
                .map_err(|e| format!("{}: not a usable CA certificate: {e}", path.display()))?;
        }
        Ok(Self {
            path: path.to_path_buf(),
            certs,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn certs(&self) -> &[CertificateDer<'static>] {
        &self.certs
    }

    /// Adds these roots to a reqwest client's built-in ones.
    pub fn add_to(&self, mut builder: reqwest::ClientBuilder) -> reqwest::ClientBuilder {
        for cert in &self.certs {
            // `from_der` only stores the bytes with the rustls backend; the anchor itself
            // was validated in `load`.
            if let Ok(c) = reqwest::Certificate::from_der(cert.as_ref()) {
                builder = builder.add_root_certificate(c);
            }
        }
        builder
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(text: &[u8]) -> tempfile::NamedTempFile {
        let f = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(f.path(), text).unwrap();
        f
    }

    #[test]
    fn loads_a_ca_and_refuses_what_rustls_would() {
        let ca = rcgen::generate_simple_self_signed(vec!["ca.test".into()]).unwrap();
        let f = file(ca.cert.pem().as_bytes());
        let roots = ExtraRoots::load(f.path()).unwrap();
        assert_eq!(roots.certs().len(), 1);
        assert!(format!("{roots:?}").contains("certificates: 1"));

        let missing = ExtraRoots::load(Path::new("/nonexistent/ca.pem")).unwrap_err();
        assert!(
            missing.contains("cannot read /nonexistent/ca.pem"),
            "{missing}"
        );
        let empty = ExtraRoots::load(file(b"just text\n").path()).unwrap_err();
        assert!(empty.contains("no PEM certificate"), "{empty}");
        let garbage = ExtraRoots::load(
            file(b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n").path(),
        )
        .unwrap_err();
        assert!(garbage.contains("not a usable CA"), "{garbage}");
    }
}
