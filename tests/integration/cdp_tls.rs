//! The CDP call over HTTPS, as against the real API: the verifying fake CDP serves TLS with
//! a certificate from its own test CA (not the gateway's listener CA) and ALPN `h2`,
//! `http/1.1`. `cdp.ca_file` (an addition beyond SPEC) makes the gateway trust that CA on
//! top of its built-in roots; without it the CDP is unreachable for the gateway (`502`),
//! which keeps serving. `check` refuses a bad `cdp.ca_file` by its key, as the run does.

use std::path::Path;
use std::time::Duration;

use reqwest::StatusCode;

use crate::common::certs::{Alpn, KeyFormat, TestPki};
use crate::common::fake_cdp::{FakeCdp, TestKey};
use crate::common::gateway::{Gateway, GatewayBuilder};
use crate::common::upstream::Upstream;

const ADDR: &str = "0x1111111111111111111111111111111111111111";

fn mint_path() -> String {
    format!("/onramp?address={ADDR}&blockchains=base")
}

async fn gateway(up: &Upstream, key: &TestKey, cdp: &str) -> Gateway {
    let mut b = GatewayBuilder::new(&up.url())
        .section("cdp", cdp)
        .section("rate_limit", "requests_per_minute = 60000\nburst = 1000");
    for (k, v) in key.env() {
        b = b.env(&k, &v);
    }
    b.start().await
}

fn toml_path(p: &Path) -> String {
    format!("{:?}", p.display().to_string())
}

/// With `cdp.ca_file` naming the fake's CA, mints work over TLS; the calls go over HTTP/2
/// and, once one connection is up, every concurrent mint is multiplexed on it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mints_over_tls_and_h2_with_cdp_ca_file() {
    let key = TestKey::es256_sec1();
    let cdp_pki = TestPki::new(KeyFormat::Pkcs8Ecdsa);
    let fake = FakeCdp::start_tls(&key, &cdp_pki);
    assert!(fake.api_base().starts_with("https://127.0.0.1:"));
    let up = Upstream::start().await;
    let gw = gateway(
        &up,
        &key,
        &format!(
            "api_base = \"{}\"\nca_file = {}",
            fake.api_base(),
            toml_path(&cdp_pki.write_ca_pem())
        ),
    )
    .await;
    let client = gw.https_client(Alpn::H2AndHttp11);

    let first = client.get(gw.url(&mint_path())).send().await.unwrap();
    assert_eq!(first.status(), StatusCode::FOUND, "{}", gw.logs());
    let location = first.headers()["location"].to_str().unwrap().to_owned();
    assert!(location.contains(&fake.tokens()[0]), "{location}");

    let mints = (0..16).map(|_| {
        let client = client.clone();
        let url = gw.url(&mint_path());
        async move { client.get(url).send().await.map(|r| r.status()) }
    });
    for status in futures_util::future::join_all(mints).await {
        assert_eq!(status.unwrap(), StatusCode::FOUND, "{}", gw.logs());
    }
    fake.assert_all_verified();
    let requests = fake.requests();
    assert_eq!(requests.len(), 17);
    assert!(
        requests.iter().all(|r| r.version == http::Version::HTTP_2),
        "{:?}",
        requests.iter().map(|r| r.version).collect::<Vec<_>>()
    );
    // The `uris` claim still binds host:port + path (the fake checked it), no scheme.
    assert_eq!(
        requests[0].claims["uris"][0].as_str(),
        Some(fake.expected_uri())
    );
    assert_eq!(fake.connections(), 1, "h2 calls are multiplexed");
}

/// Without `cdp.ca_file` the fake's certificate is not trusted: the mint is the documented
/// "CDP unreachable" `502`, no request reaches the fake, and the gateway keeps proxying
/// and answering.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn untrusted_cdp_certificate_is_502_and_serving_continues() {
    let key = TestKey::es256_sec1();
    let cdp_pki = TestPki::new(KeyFormat::Pkcs8Ecdsa);
    let fake = FakeCdp::start_tls(&key, &cdp_pki);
    let up = Upstream::start().await;
    let mut gw = gateway(
        &up,
        &key,
        &format!("api_base = \"{}\"\ntimeout_ms = 3000", fake.api_base()),
    )
    .await;
    let client = gw.https_client(Alpn::H2AndHttp11);
    for _ in 0..2 {
        let resp = tokio::time::timeout(
            Duration::from_secs(10),
            client
                .get(gw.url(&mint_path()))
                .header("accept", "application/json")
                .send(),
        )
        .await
        .expect("answered in time")
        .unwrap();
        assert_eq!(resp.status(), StatusCode::BAD_GATEWAY, "{}", gw.logs());
        assert!(resp.headers().get("location").is_none());
        let echo = client.get(gw.url("/echo")).send().await.unwrap();
        assert_eq!(echo.status(), StatusCode::OK);
    }
    assert_eq!(fake.count(), 0, "no request got past the TLS handshake");
    assert!(fake.connections() >= 1, "the gateway did try");
    assert!(gw.is_running());
    assert!(gw.logs().contains("cdp-unavailable"), "{}", gw.logs());
}

/// `check` refuses a missing, empty or non-certificate `cdp.ca_file` with a message naming
/// the key and the file, the run refuses it the same way, and a good one passes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_and_run_refuse_a_bad_cdp_ca_file() {
    let pki = TestPki::new(KeyFormat::Pkcs8Ecdsa);
    let good = pki.write_ca_pem();
    let garbage = pki.dir.path().join("garbage-ca.pem");
    std::fs::write(&garbage, "this is not a certificate\n").unwrap();
    let missing = pki.dir.path().join("no-such-ca.pem");
    let builder = |ca: &Path| {
        GatewayBuilder::new("http://127.0.0.1:3000").section(
            "cdp",
            &format!(
                "api_base = \"https://127.0.0.1:1\"\nca_file = {}",
                toml_path(ca)
            ),
        )
    };
    let text = |out: &std::process::Output| {
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    };
    for (bad, why) in [(&missing, "cannot read"), (&garbage, "no PEM certificate")] {
        let name = bad.file_name().unwrap().to_str().unwrap();
        let out = builder(bad).check();
        let t = text(&out);
        assert!(!out.status.success(), "check accepted {name}: {t}");
        assert!(t.contains("cdp.ca_file"), "{t}");
        assert!(t.contains(name) && t.contains(why), "{t}");
        let (out, _w) = builder(bad).run_expect_exit(Duration::from_secs(20));
        let t = text(&out);
        assert!(!out.status.success(), "the run started with {name}: {t}");
        assert!(t.contains("cdp.ca_file") && t.contains(name), "{t}");
    }
    let out = builder(&good).check();
    assert!(
        out.status.success(),
        "check refused a good CA: {}",
        text(&out)
    );
    assert!(text(&out).contains("CA certificate"), "{}", text(&out));
}
