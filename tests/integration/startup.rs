//! Process lifecycle: config validation at start and in `check`, the CLI basics, readiness,
//! and SIGTERM draining.

use std::process::Output;
use std::time::{Duration, Instant};

use crate::common::certs::Alpn;
use crate::common::gateway::{
    binary, run_binary, run_check_raw, CdpKey, GatewayBuilder, WrittenConfig,
};
use crate::common::upstream::Upstream;

const EXIT_WAIT: Duration = Duration::from_secs(20);

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn describe(out: &Output) -> String {
    format!(
        "exit {:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        out.status.code(),
        text(&out.stdout),
        text(&out.stderr)
    )
}

/// A refused start: exit code 1, stderr names each of `needles` and the config file,
/// nothing was listening.
fn refused(out: &Output, needles: &[&str], w: &WrittenConfig, what: &str) -> Result<(), String> {
    let d = describe(out);
    if out.status.code() != Some(1) {
        return Err(format!("{what}: expected exit 1: {d}"));
    }
    let err = text(&out.stderr);
    for n in needles {
        if !err.contains(n) {
            return Err(format!("{what}: stderr does not name `{n}`: {d}"));
        }
    }
    if !(err.contains("config.toml") || err.contains(&*w.path.to_string_lossy())) {
        return Err(format!("{what}: stderr does not name the config file: {d}"));
    }
    let stdout = text(&out.stdout);
    if stdout.contains("\"listening\"") || stdout.contains("\"ready\"") {
        return Err(format!(
            "{what}: logged listening/ready before refusing: {d}"
        ));
    }
    Ok(())
}

fn assert_refused(out: &Output, needles: &[&str], w: &WrittenConfig, what: &str) {
    if let Err(e) = refused(out, needles, w, what) {
        panic!("{e}");
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn upstream_url() -> String {
    // Nothing needs to answer: these gateways never get to proxy.
    format!("http://127.0.0.1:{}", free_port())
}

#[test]
fn unknown_key_refused_naming_key_and_file_nothing_bound() {
    let port = free_port();
    let (out, w) = GatewayBuilder::new(&upstream_url())
        .section("server", &format!("listen = \"127.0.0.1:{port}\""))
        .section("server", "listn = \"127.0.0.1:1\"")
        .run_expect_exit(EXIT_WAIT);
    assert_refused(&out, &["listn"], &w, "unknown key server.listn");
    // The configured port was never taken (the process is gone, but had it bound and
    // then crashed we would at least have seen `listening` above).
    std::net::TcpListener::bind(("127.0.0.1", port)).expect("port still free");

    let out = run_binary(&w.check_args(), &w.env, EXIT_WAIT);
    assert_refused(&out, &["listn"], &w, "check: unknown key server.listn");
}

#[test]
fn unknown_section_refused() {
    let (out, w) = GatewayBuilder::new(&upstream_url())
        .section("servr", "listen = \"127.0.0.1:0\"")
        .run_expect_exit(EXIT_WAIT);
    assert_refused(&out, &["servr"], &w, "unknown section [servr]");
}

#[test]
fn bad_values_refused_naming_the_key() {
    // (section, snippet, the key the message must name)
    let cases: &[(&str, &str, &str)] = &[
        ("server", r#"listen = "nope""#, "listen"),
        ("admin", r#"listen = "127.0.0.1:99999""#, "listen"),
        (
            "server",
            "header_read_timeout_ms = 0",
            "header_read_timeout_ms",
        ),
        (
            "upstream",
            "response_timeout_ms = -5",
            "response_timeout_ms",
        ),
        ("upstream", "connect_timeout_ms = 0", "connect_timeout_ms"),
        (
            "server",
            r#"trusted_proxies = ["10.0.0.0/33"]"#,
            "trusted_proxies",
        ),
        (
            "server",
            r#"trusted_proxies = ["not-a-cidr"]"#,
            "trusted_proxies",
        ),
        ("onramp", r#"path = "onramp""#, "path"),
        ("offramp", r#"path = "offramp""#, "path"),
        ("upstream", r#"url = "not a url""#, "url"),
        ("log", r#"format = "xml""#, "format"),
        ("server", r#"proxy_protocol = "maybe""#, "proxy_protocol"),
    ];
    let mut failures = Vec::new();
    for (section, snippet, key) in cases {
        let what = format!("[{section}] {snippet}");
        let (out, w) = GatewayBuilder::new(&upstream_url())
            .section(section, snippet)
            .run_expect_exit(EXIT_WAIT);
        // Collect rather than stop at the first, so one run reports every gap.
        failures.extend(refused(&out, &[key], &w, &what).err());
        let out = run_binary(&w.check_args(), &w.env, EXIT_WAIT);
        failures.extend(refused(&out, &[key], &w, &format!("check: {what}")).err());
    }
    assert!(
        failures.is_empty(),
        "{} of {} bad-value checks failed:\n\n{}",
        failures.len(),
        cases.len() * 2,
        failures.join("\n\n")
    );
}

#[test]
fn missing_cert_and_key_files_named() {
    for (key, path) in [
        ("cert", "/nonexistent-onramp-test/tls.crt"),
        ("key", "/nonexistent-onramp-test/tls.key"),
    ] {
        let (out, w) = GatewayBuilder::new(&upstream_url())
            .section("tls", &format!("{key} = \"{path}\""))
            .run_expect_exit(EXIT_WAIT);
        let d = describe(&out);
        assert_eq!(out.status.code(), Some(1), "missing tls.{key}: {d}");
        assert!(text(&out.stderr).contains(path), "stderr lacks {path}: {d}");
        assert!(!text(&out.stdout).contains("\"ready\""), "{d}");

        let out = run_binary(&w.check_args(), &w.env, EXIT_WAIT);
        assert_eq!(out.status.code(), Some(1), "check, missing tls.{key}: {d}");
        assert!(
            text(&out.stderr).contains(path),
            "check stderr lacks {path}"
        );
    }
}

#[test]
fn garbage_cert_file_refused() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("garbage.crt");
    std::fs::write(&bad, "this is not PEM\n").unwrap();
    let (out, _w) = GatewayBuilder::new(&upstream_url())
        .section("tls", &format!("cert = \"{}\"", bad.display()))
        .run_expect_exit(EXIT_WAIT);
    let d = describe(&out);
    assert_eq!(out.status.code(), Some(1), "{d}");
    assert!(
        text(&out.stderr).contains(&*bad.to_string_lossy()),
        "stderr does not name the bad cert file: {d}"
    );
}

#[test]
fn unreadable_config_file_named() {
    let path = "/nonexistent-onramp-test/config.toml";
    for args in [
        vec!["--config".to_string(), path.to_string()],
        vec!["check".into(), "--config".into(), path.to_string()],
    ] {
        let out = run_binary(&args, &[], EXIT_WAIT);
        let d = describe(&out);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {d}");
        assert!(text(&out.stderr).contains(path), "{args:?}: {d}");
    }
}

#[test]
fn toml_syntax_error_refused() {
    let (out, _dir, path) = run_check_raw("[server\nlisten = \"127.0.0.1:0\"\n");
    let d = describe(&out);
    assert_eq!(out.status.code(), Some(1), "{d}");
    let err = text(&out.stderr);
    assert!(
        err.contains("config.toml") || err.contains(&*path.to_string_lossy()),
        "{d}"
    );
}

#[test]
fn check_accepts_good_config_and_prints_summary() {
    let key = CdpKey::generate();
    let out = GatewayBuilder::new(&upstream_url())
        .with_cdp_key(key.clone())
        .check();
    let d = describe(&out);
    assert_eq!(out.status.code(), Some(0), "{d}");
    let stdout = text(&out.stdout);
    assert!(!stdout.trim().is_empty(), "check printed no summary: {d}");
    assert!(
        stdout.contains("127.0.0.1"),
        "summary does not show the listen/upstream addresses: {d}"
    );
    let all = format!("{stdout}{}", text(&out.stderr));
    for line in key.secret_body_lines() {
        assert!(!all.contains(&line), "check printed the CDP secret: {d}");
    }
}

#[test]
fn version_and_help() {
    let out = run_binary(&["--version".into()], &[], EXIT_WAIT);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    assert!(
        text(&out.stdout).contains(env!("CARGO_PKG_VERSION")),
        "{}",
        describe(&out)
    );

    let out = run_binary(&["--help".into()], &[], EXIT_WAIT);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    let help = text(&out.stdout);
    for word in ["check", "--config"] {
        assert!(help.contains(word), "--help lacks `{word}`: {help}");
    }
    // The binary under test is the one Cargo built for this crate.
    assert!(binary().ends_with("onramp-gateway"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_with_cdp_key() {
    let up = Upstream::start().await;
    let gw = GatewayBuilder::new(&up.url())
        .with_cdp_key(CdpKey::generate())
        .start()
        .await;
    assert_eq!(gw.admin_get("/healthz").await.0, 200);
    assert_eq!(gw.admin_get("/readyz").await.0, 200, "{}", gw.logs());
}

/// The SPEC's Kubernetes drain: readiness off at once, keep accepting for
/// `shutdown_delay_ms`, then refuse new connections but finish the in-flight request,
/// close idle keep-alives and exit 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_in_flight_request_then_exits_zero() {
    const DELAY: Duration = Duration::from_millis(1000);
    let up = Upstream::start().await;
    let key = CdpKey::generate();
    let mut gw = GatewayBuilder::new(&up.url())
        .section(
            "server",
            &format!(
                "shutdown_delay_ms = {}\nshutdown_grace_ms = 15000",
                DELAY.as_millis()
            ),
        )
        .with_cdp_key(key.clone())
        .start()
        .await;
    assert_eq!(gw.admin_get("/readyz").await.0, 200, "{}", gw.logs());

    let slow_client = gw.https_client(Alpn::Http11);
    let slow_url = gw.url("/slow?ms=3000");
    let slow = tokio::spawn(async move {
        let resp = slow_client.get(slow_url).send().await?;
        let status = resp.status().as_u16();
        Ok::<_, reqwest::Error>((status, resp.text().await?))
    });
    up.wait_for_requests(1, Duration::from_secs(10)).await;

    let t0 = Instant::now();
    gw.sigterm();

    // Readiness flips "at once": allow scheduling slack, not a delay.
    loop {
        let (status, _) = gw.admin_get("/readyz").await;
        if status == 503 {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_millis(500),
            "/readyz still {status} {:?} after SIGTERM",
            t0.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Within the delay, new connections are still served (endpoints are being withdrawn).
    let during = gw.https_client(Alpn::Http11);
    let resp = during
        .get(gw.url("/echo"))
        .send()
        .await
        .expect("new connection refused during shutdown_delay_ms");
    assert_eq!(resp.status(), 200);
    let _ = resp.bytes().await;
    assert!(
        t0.elapsed() < DELAY,
        "test too slow to probe inside the delay ({:?}); inconclusive",
        t0.elapsed()
    );

    // After the delay, while the slow request is still in flight: no new connections.
    tokio::time::sleep_until((t0 + DELAY + Duration::from_millis(500)).into()).await;
    assert!(!slow.is_finished(), "slow request ended early");
    let after = gw
        .https_client(Alpn::Http11)
        .get(gw.url("/echo"))
        .timeout(Duration::from_secs(1))
        .send()
        .await;
    assert!(
        after.is_err(),
        "new connection served {:?} after shutdown_delay_ms",
        t0.elapsed()
    );

    let (status, body) = tokio::time::timeout(Duration::from_secs(10), slow)
        .await
        .expect("in-flight request not finished")
        .unwrap()
        .expect("in-flight request failed during drain");
    assert_eq!((status, body.as_str()), (200, "slow done"));
    let done = Instant::now();

    // `during` still holds an idle keep-alive connection: the gateway must close it rather
    // than wait out the 15 s grace.
    let exit = gw.wait_exit(Duration::from_secs(10)).await;
    assert_eq!(exit.code(), Some(0), "exit status {exit:?}");
    assert!(
        done.elapsed() < Duration::from_secs(3),
        "exit took {:?} after the last request: idle connections kept the drain open",
        done.elapsed()
    );
    drop(during);

    let logs = gw.logs();
    for line in key.secret_body_lines() {
        assert!(!logs.contains(&line), "CDP secret in logs:\n{logs}");
    }
}

async fn idle_signal_exits_zero(sig: &str) {
    let up = Upstream::start().await;
    let mut gw = GatewayBuilder::new(&up.url()).start().await;
    // Leave an idle HTTP/2 connection and an idle HTTP/1.1 keep-alive open.
    let h2 = gw.https_client(Alpn::H2);
    assert_eq!(h2.get(gw.url("/echo")).send().await.unwrap().status(), 200);
    let h1 = gw.https_client(Alpn::Http11);
    assert_eq!(h1.get(gw.url("/echo")).send().await.unwrap().status(), 200);
    let t0 = Instant::now();
    crate::common::gateway::signal(gw.pid, sig);
    let exit = gw.wait_exit(Duration::from_secs(10)).await;
    assert_eq!(exit.code(), Some(0), "SIG{sig}: exit status {exit:?}");
    assert!(
        t0.elapsed() < Duration::from_secs(3),
        "SIG{sig} with shutdown_delay_ms = 0 and only idle connections took {:?}",
        t0.elapsed()
    );
    drop((h1, h2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_with_idle_connections_exits_promptly() {
    idle_signal_exits_zero("TERM").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigint_with_idle_connections_exits_promptly() {
    idle_signal_exits_zero("INT").await;
}

#[test]
fn listen_address_in_use_refused() {
    // Hold the port for the whole test so the gateway cannot bind it.
    let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = held.local_addr().unwrap().to_string();
    for section in ["server", "admin"] {
        let (out, _w) = GatewayBuilder::new(&upstream_url())
            .section(section, &format!("listen = \"{addr}\""))
            .run_expect_exit(EXIT_WAIT);
        let d = describe(&out);
        assert_eq!(out.status.code(), Some(1), "{section}.listen in use: {d}");
        assert!(
            text(&out.stderr).contains(&addr),
            "{section}.listen in use: stderr does not name {addr}: {d}"
        );
        assert!(!text(&out.stdout).contains("\"ready\""), "{d}");
    }
    drop(held);
}

/// SPEC: PATH defaults to `config.toml`, or env `ONRAMP_GATEWAY_CONFIG`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_from_env_var_and_default_path() {
    let up = Upstream::start().await;

    let mut w = GatewayBuilder::new(&up.url()).write();
    // Renamed so that the default ./config.toml does not exist: only the variable can
    // lead the gateway to the file.
    let other = w.dir.path().join("other-name.toml");
    std::fs::rename(&w.path, &other).unwrap();
    w.path = other.clone();
    let path = other.to_string_lossy().into_owned();
    let gw = w
        .start_with_args(vec![], &[("ONRAMP_GATEWAY_CONFIG", &path)])
        .await;
    let resp = gw
        .https_client(Alpn::Http11)
        .get(gw.url("/echo"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    drop(gw);

    // No flag, no variable: ./config.toml (the harness runs the binary in the config's dir).
    let gw = GatewayBuilder::new(&up.url())
        .write()
        .start_with_args(vec![], &[])
        .await;
    let resp = gw
        .https_client(Alpn::Http11)
        .get(gw.url("/echo"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
}
