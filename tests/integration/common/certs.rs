//! Test PKI: a throw-away CA and a `localhost` / `127.0.0.1` leaf certificate, written as
//! PEM files in the key encodings operators actually have on disk (PKCS#8, SEC1, PKCS#1),
//! plus rustls client configs that trust that CA.
//!
//! A CA + leaf (rather than one self-signed leaf) mirrors a real deployment: the server
//! presents only the leaf and the client trusts only the CA, so a gateway that served the
//! wrong certificate would fail verification here.

use std::path::PathBuf;
use std::sync::Arc;

use aws_lc_rs::encoding::AsDer;
use aws_lc_rs::signature::{EcdsaKeyPair, ECDSA_P256_SHA256_ASN1_SIGNING};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair, KeyUsagePurpose,
    SanType, PKCS_ECDSA_P256_SHA256, PKCS_RSA_SHA256,
};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, RootCertStore, SupportedProtocolVersion};
use tempfile::TempDir;

/// Both `ring` (via other crates) and `aws-lc-rs` are compiled in, so rustls cannot pick a
/// process default on its own; every test path that builds a rustls config calls this first.
pub fn install_provider() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
}

/// How the server key is encoded in `tls.key`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyFormat {
    /// ECDSA P-256, `-----BEGIN PRIVATE KEY-----` (what rcgen and most tools emit).
    Pkcs8Ecdsa,
    /// ECDSA P-256, `-----BEGIN EC PRIVATE KEY-----` (RFC 5915 / SEC1, `openssl ecparam`).
    Sec1Ecdsa,
    /// RSA 2048, `-----BEGIN RSA PRIVATE KEY-----` (PKCS#1, `openssl genrsa -traditional`).
    Pkcs1Rsa,
    /// RSA 2048, `-----BEGIN PRIVATE KEY-----`.
    Pkcs8Rsa,
}

/// ALPN protocols offered by a test client.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Alpn {
    /// `h2`, then `http/1.1` (what browsers offer).
    H2AndHttp11,
    /// `http/1.1` only (needed for WebSocket upgrades and byte-level HTTP/1 tests).
    Http11,
    /// `h2` only.
    H2,
    /// No ALPN extension at all (old clients, curl --no-alpn).
    None,
}

impl Alpn {
    pub fn protocols(self) -> Vec<Vec<u8>> {
        match self {
            Alpn::H2AndHttp11 => vec![b"h2".to_vec(), b"http/1.1".to_vec()],
            Alpn::Http11 => vec![b"http/1.1".to_vec()],
            Alpn::H2 => vec![b"h2".to_vec()],
            Alpn::None => vec![],
        }
    }
}

/// A CA and a leaf for `localhost` + `127.0.0.1`, with the leaf chain and key on disk.
pub struct TestPki {
    /// Holds the PEM files; removed on drop.
    pub dir: TempDir,
    /// Leaf certificate PEM (the chain the server presents).
    pub cert_path: PathBuf,
    /// Leaf private key PEM in `format`.
    pub key_path: PathBuf,
    pub format: KeyFormat,
    /// The CA certificate that clients trust.
    pub ca_der: CertificateDer<'static>,
    pub leaf_der: CertificateDer<'static>,
}

impl TestPki {
    /// A TLS server with this PKI's leaf chain and key, offering `alpn` (for the fakes
    /// that speak TLS: the fake CDP, the browser tests' page servers).
    pub fn acceptor(&self, alpn: &[&[u8]]) -> tokio_rustls::TlsAcceptor {
        use rustls::pki_types::pem::PemObject as _;
        use rustls::pki_types::PrivateKeyDer;
        install_provider();
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&self.cert_path)
            .expect("read the test chain")
            .map(|c| c.expect("a test certificate"))
            .collect();
        let key = PrivateKeyDer::from_pem_file(&self.key_path).expect("read the test key");
        let mut cfg = rustls::ServerConfig::builder()
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .expect("test TLS server config");
        cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        tokio_rustls::TlsAcceptor::from(Arc::new(cfg))
    }

    pub fn new(format: KeyFormat) -> TestPki {
        install_provider();
        let dir = tempfile::Builder::new()
            .prefix("onramp-gw-pki-")
            .tempdir()
            .expect("tempdir");

        let ca_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).expect("CA key");
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "onramp-gateway test CA");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca = CertifiedIssuer::self_signed(ca_params, ca_key).expect("CA cert");

        let leaf_key = match format {
            KeyFormat::Pkcs8Ecdsa | KeyFormat::Sec1Ecdsa => {
                KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).expect("EC leaf key")
            }
            // rcgen can generate RSA keys only with the aws-lc-rs backend, which is the one
            // this crate enables.
            KeyFormat::Pkcs1Rsa | KeyFormat::Pkcs8Rsa => {
                KeyPair::generate_for(&PKCS_RSA_SHA256).expect("RSA leaf key")
            }
        };
        let mut leaf_params =
            CertificateParams::new(vec!["localhost".to_string()]).expect("leaf params");
        leaf_params
            .subject_alt_names
            .push(SanType::IpAddress("127.0.0.1".parse().unwrap()));
        leaf_params
            .distinguished_name
            .push(DnType::CommonName, "localhost");
        let leaf = leaf_params
            .signed_by(&leaf_key, &ca)
            .expect("sign leaf certificate");

        let key_pem = match format {
            KeyFormat::Pkcs8Ecdsa | KeyFormat::Pkcs8Rsa => leaf_key.serialize_pem(),
            KeyFormat::Sec1Ecdsa => pem_encode("EC PRIVATE KEY", &sec1_from_pkcs8(&leaf_key)),
            KeyFormat::Pkcs1Rsa => pem_encode(
                "RSA PRIVATE KEY",
                pkcs8_inner_private_key(leaf_key.serialized_der()),
            ),
        };

        let cert_path = dir.path().join("tls.crt");
        let key_path = dir.path().join("tls.key");
        std::fs::write(&cert_path, leaf.pem()).expect("write cert");
        std::fs::write(&key_path, key_pem).expect("write key");

        TestPki {
            dir,
            cert_path,
            key_path,
            format,
            ca_der: ca.der().clone(),
            leaf_der: leaf.der().clone(),
        }
    }

    /// Writes the CA certificate as PEM next to the leaf (`ca.crt`) and returns its path,
    /// for servers and clients that take a CA file (redis-server, `rate_limit.redis_ca_file`).
    pub fn write_ca_pem(&self) -> PathBuf {
        let path = self.dir.path().join("ca.crt");
        std::fs::write(&path, pem_encode("CERTIFICATE", &self.ca_der)).expect("write CA PEM");
        path
    }

    /// A client config trusting this PKI's CA, offering `alpn`, TLS 1.2 and 1.3.
    pub fn client_config(&self, alpn: Alpn) -> Arc<ClientConfig> {
        self.client_config_versions(alpn, rustls::DEFAULT_VERSIONS)
    }

    /// As [`client_config`](Self::client_config) but limited to `versions`
    /// (e.g. `&[&rustls::version::TLS12]`).
    pub fn client_config_versions(
        &self,
        alpn: Alpn,
        versions: &[&'static SupportedProtocolVersion],
    ) -> Arc<ClientConfig> {
        install_provider();
        let mut roots = RootCertStore::empty();
        roots.add(self.ca_der.clone()).expect("add CA root");
        let mut cfg = ClientConfig::builder_with_protocol_versions(versions)
            .with_root_certificates(roots)
            .with_no_client_auth();
        cfg.alpn_protocols = alpn.protocols();
        Arc::new(cfg)
    }
}

/// A client config that accepts any server certificate. Only for `tls.self_signed = true`,
/// whose in-memory certificate no test can know in advance.
pub fn insecure_client_config(alpn: Alpn) -> Arc<ClientConfig> {
    install_provider();
    let provider = rustls::crypto::aws_lc_rs::default_provider();
    let mut cfg = ClientConfig::builder()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AcceptAnyCert(provider)))
        .with_no_client_auth();
    cfg.alpn_protocols = alpn.protocols();
    Arc::new(cfg)
}

#[derive(Debug)]
struct AcceptAnyCert(rustls::crypto::CryptoProvider);

impl rustls::client::danger::ServerCertVerifier for AcceptAnyCert {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    // Signatures are still checked so the handshake is a real one.
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// A fresh P-256 key as SEC1 PEM (`-----BEGIN EC PRIVATE KEY-----`), the format of the
/// `privateKey` in a CDP "Secret API key" download. Used as `CDP_API_KEY_SECRET`.
pub fn ec_p256_sec1_pem() -> String {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).expect("EC key");
    pem_encode("EC PRIVATE KEY", &sec1_from_pkcs8(&key))
}

/// SEC1 (RFC 5915) DER of a P-256 key. aws-lc-rs emits it with the curve parameters, which
/// a bare copy of the PKCS#8 inner octet string would lack (and which SEC1 parsers need).
fn sec1_from_pkcs8(key: &KeyPair) -> Vec<u8> {
    let kp = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, key.serialized_der())
        .expect("re-parse P-256 PKCS#8");
    let der = kp.private_key().as_der().expect("SEC1 export");
    der.as_ref().to_vec()
}

/// The `privateKey` OCTET STRING of a PKCS#8 `PrivateKeyInfo`: for RSA that is exactly the
/// PKCS#1 `RSAPrivateKey`. A tiny DER walk avoids shelling out to `openssl rsa -traditional`.
fn pkcs8_inner_private_key(pkcs8: &[u8]) -> &[u8] {
    // PrivateKeyInfo ::= SEQUENCE { version INTEGER, algorithm SEQUENCE, privateKey OCTET STRING, .. }
    let (tag, body, _) = der_tlv(pkcs8);
    assert_eq!(tag, 0x30, "PKCS#8 is not a SEQUENCE");
    let (tag, _, rest) = der_tlv(body);
    assert_eq!(tag, 0x02, "PKCS#8 version is not an INTEGER");
    let (tag, _, rest) = der_tlv(rest);
    assert_eq!(tag, 0x30, "PKCS#8 algorithm is not a SEQUENCE");
    let (tag, inner, _) = der_tlv(rest);
    assert_eq!(tag, 0x04, "PKCS#8 privateKey is not an OCTET STRING");
    inner
}

/// Splits one DER TLV off `input`: (tag, value, remainder).
fn der_tlv(input: &[u8]) -> (u8, &[u8], &[u8]) {
    let tag = input[0];
    let first = input[1] as usize;
    let (len, hdr) = if first < 0x80 {
        (first, 2)
    } else {
        let n = first & 0x7f;
        let len = input[2..2 + n]
            .iter()
            .fold(0usize, |acc, b| (acc << 8) | *b as usize);
        (len, 2 + n)
    };
    (tag, &input[hdr..hdr + len], &input[hdr + len..])
}

pub fn pem_encode(label: &str, der: &[u8]) -> String {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(line).unwrap());
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

/// Self-checks of the fixture itself, independent of the gateway: each key file must parse
/// as the PEM kind it claims and serve a handshake that the matching client config accepts.
#[cfg(test)]
mod selftest {
    use super::*;
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::PrivateKeyDer;

    #[tokio::test]
    async fn pki_key_files_serve_a_verified_handshake() {
        for format in [
            KeyFormat::Pkcs8Ecdsa,
            KeyFormat::Sec1Ecdsa,
            KeyFormat::Pkcs1Rsa,
            KeyFormat::Pkcs8Rsa,
        ] {
            let pki = TestPki::new(format);
            let key = PrivateKeyDer::from_pem_file(&pki.key_path).expect("key PEM parses");
            let kind_ok = matches!(
                (&key, format),
                (
                    PrivateKeyDer::Pkcs8(_),
                    KeyFormat::Pkcs8Ecdsa | KeyFormat::Pkcs8Rsa
                ) | (PrivateKeyDer::Sec1(_), KeyFormat::Sec1Ecdsa)
                    | (PrivateKeyDer::Pkcs1(_), KeyFormat::Pkcs1Rsa)
            );
            assert!(kind_ok, "{format:?} written as the wrong PEM kind");
            let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&pki.cert_path)
                .unwrap()
                .collect::<Result<_, _>>()
                .unwrap();
            assert_eq!(chain, vec![pki.leaf_der.clone()]);
            let mut server = rustls::ServerConfig::builder()
                .with_no_client_auth()
                .with_single_cert(chain, key)
                .unwrap_or_else(|e| panic!("{format:?}: rustls refuses the key: {e}"));
            server.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];

            let (c, s) = tokio::io::duplex(64 * 1024);
            let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
            let srv = tokio::spawn(async move { acceptor.accept(s).await.map(|_| ()) });
            let tls = tokio_rustls::TlsConnector::from(pki.client_config(Alpn::H2AndHttp11))
                .connect(ServerName::try_from("localhost").unwrap(), c)
                .await
                .unwrap_or_else(|e| panic!("{format:?}: client handshake: {e}"));
            assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
            srv.await.unwrap().unwrap();
        }
    }

    #[test]
    fn cdp_secret_is_sec1_pem() {
        let pem = ec_p256_sec1_pem();
        assert!(pem.starts_with("-----BEGIN EC PRIVATE KEY-----\n"));
        let key = PrivateKeyDer::from_pem_slice(pem.as_bytes()).unwrap();
        assert!(matches!(key, PrivateKeyDer::Sec1(_)));
    }
}
