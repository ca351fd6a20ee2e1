//! `[tls.acme]` against Pebble with real TLS-ALPN-01 validation on the gateway's HTTPS
//! port: order → the issued chain is served; restart with Pebble stopped → the cached
//! certificate is served (no network call); a short-lived certificate is renewed and the
//! new one served while an open connection keeps working.

use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use rustls::pki_types::CertificateDer;
use rustls::{ClientConfig, RootCertStore};

use crate::common::certs::install_provider;
use crate::common::gateway::{self, field_str, Gateway, GatewayBuilder};
use crate::common::pebble::{self, Pebble};
use crate::common::upstream::Upstream;

const ISSUE_TIMEOUT: Duration = Duration::from_secs(60);

fn trusting(root: &CertificateDer<'static>) -> Arc<ClientConfig> {
    install_provider();
    let mut roots = RootCertStore::empty();
    roots.add(root.clone()).expect("root");
    let mut cfg = ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Arc::new(cfg)
}

fn acme_gateway(
    upstream: &Upstream,
    port: u16,
    pebble: &Pebble,
    cache: &std::path::Path,
) -> GatewayBuilder {
    GatewayBuilder::new(&upstream.url())
        .section("server", &format!("listen = \"127.0.0.1:{port}\"\nidle_timeout_ms = 120000"))
        .section(
            "tls",
            &format!(
                "acme = {{ directory_url = \"{}\", domains = [\"localhost\"], contact = \"mailto:ops@example.com\", cache_dir = \"{}\", ca_file = \"{}\" }}",
                pebble.directory_url(),
                cache.display(),
                pebble.ca_file.display()
            ),
        )
}

fn issued(ev: &serde_json::Value) -> bool {
    field_str(ev, "message").is_some_and(|m| m.contains("certificate issued"))
}

async fn wait_issued(gw: &Gateway, pebble: &Pebble, n: usize) {
    let deadline = std::time::Instant::now() + ISSUE_TIMEOUT;
    while gw.log_events().iter().filter(|e| issued(e)).count() < n {
        assert!(
            std::time::Instant::now() < deadline,
            "certificate #{n} not issued within {ISSUE_TIMEOUT:?}; gateway logs:\n{}\npebble log:\n{}",
            gw.logs(),
            pebble.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The leaf a new connection gets, verified against `root` for `localhost`. A fresh
/// client config each time: a resumed TLS 1.3 session would report the certificate of
/// the session it resumed, not the one the gateway serves now.
async fn served_leaf(gw: &Gateway, root: &CertificateDer<'static>) -> CertificateDer<'static> {
    let tls = gateway::tls_connect(gw.https_addr, trusting(root))
        .await
        .expect("handshake verified against Pebble's root");
    tls.get_ref().1.peer_certificates().expect("certs")[0]
        .clone()
        .into_owned()
}

async fn get_ok(gw: &Gateway, cfg: Arc<ClientConfig>) {
    let client = gateway::https_client_with(cfg, gw.https_addr, crate::common::certs::Alpn::Http11);
    let r = client
        .get(gw.url("/echo"))
        .send()
        .await
        .expect("GET through the gateway");
    assert_eq!(r.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acme_order_serves_the_issued_chain_and_a_restart_uses_the_cache_without_pebble() {
    assert!(
        pebble::available(),
        "pebble not installed (apt-get install pebble)"
    );
    let upstream = Upstream::start().await;
    let port = pebble::free_port();
    let mut pebble = Pebble::start(port, 3600).await;
    let cache = tempfile::tempdir().unwrap();
    let cache_dir = cache.path().join("acme");

    let gw = acme_gateway(&upstream, port, &pebble, &cache_dir)
        .start()
        .await;
    wait_issued(&gw, &pebble, 1).await;
    let root = pebble.issuing_root().await;
    let cfg = trusting(&root);
    let leaf = served_leaf(&gw, &root).await;
    get_ok(&gw, cfg.clone()).await;
    // The chain and key are in the cache, owner-only.
    use std::os::unix::fs::PermissionsExt;
    for f in ["cert.pem", "key.pem", "account.json"] {
        let mode = std::fs::metadata(cache_dir.join(f))
            .expect(f)
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{f}: {mode:o}");
    }
    // The expiry metric follows the issued certificate (same store as file certificates).
    let (_, metrics) = gw.admin_get("/metrics").await;
    assert!(
        metrics.contains("onramp_gateway_tls_cert_not_after_seconds"),
        "{metrics}"
    );
    drop(gw);

    // Restart with the CA gone: the cached certificate is served, no order attempted.
    pebble.stop();
    let gw = acme_gateway(&upstream, pebble::free_port(), &pebble, &cache_dir)
        .start()
        .await;
    assert_eq!(served_leaf(&gw, &root).await, leaf);
    get_ok(&gw, cfg).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let logs = gw.logs();
    assert!(logs.contains("certificate valid"), "{logs}");
    assert!(!logs.contains("order failed"), "{logs}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acme_renews_a_short_lived_certificate_without_dropping_connections() {
    assert!(
        pebble::available(),
        "pebble not installed (apt-get install pebble)"
    );
    let upstream = Upstream::start().await;
    let port = pebble::free_port();
    // 24 s certificates: due for renewal 16 s after issuance.
    let pebble = Pebble::start(port, 24).await;
    let cache = tempfile::tempdir().unwrap();
    let gw = acme_gateway(&upstream, port, &pebble, &cache.path().join("acme"))
        .start()
        .await;
    wait_issued(&gw, &pebble, 1).await;
    let root = pebble.issuing_root().await;
    let cfg = trusting(&root);
    let first = served_leaf(&gw, &root).await;

    // One HTTP/1.1 connection opened on the first certificate, kept across the renewal.
    let tls = gateway::tls_connect(gw.https_addr, cfg.clone())
        .await
        .unwrap();
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .unwrap();
    tokio::spawn(conn);
    let req = || {
        hyper::Request::get("/echo")
            .header("host", "localhost")
            .body(Empty::<bytes::Bytes>::new())
            .unwrap()
    };
    let r = send.send_request(req()).await.expect("first request");
    assert_eq!(r.status(), 200);
    r.into_body().collect().await.unwrap();

    wait_issued(&gw, &pebble, 2).await;
    let second = served_leaf(&gw, &root).await;
    assert_ne!(
        first,
        second,
        "a new certificate after renewal; logs:\n{}",
        gw.logs()
    );
    let r = send
        .send_request(req())
        .await
        .expect("the open connection survives the renewal");
    assert_eq!(r.status(), 200);
    get_ok(&gw, cfg).await;
}

#[test]
fn check_accepts_acme_without_a_network_call_and_refuses_an_unusable_cache_dir() {
    let dir = tempfile::tempdir().unwrap();
    let not_a_dir = dir.path().join("file");
    std::fs::write(&not_a_dir, "x").unwrap();
    let acme = |cache: &std::path::Path| {
        format!(
            // A directory nobody listens on: `check` must not call it.
            "acme = {{ directory_url = \"https://{}/dir\", domains = [\"pay.example.com\"], contact = \"mailto:ops@example.com\", cache_dir = \"{}\" }}",
            crate::common::upstream::dead_address(),
            cache.display()
        )
    };
    let out = GatewayBuilder::new("http://127.0.0.1:3000")
        .section("tls", &acme(&dir.path().join("acme")))
        .check();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("acme https://"), "{stdout}");
    assert!(dir.path().join("acme").is_dir());

    let out = GatewayBuilder::new("http://127.0.0.1:3000")
        .section("tls", &acme(&not_a_dir.join("acme")))
        .check();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("tls.acme.cache_dir"), "{stderr}");
}
