//! Headless Chromium for end-to-end tests, driven over W3C WebDriver (chromedriver) with
//! `fantoccini`.
//!
//! Why fantoccini + chromedriver: it is a thin client (hyper 1, which we already build) that
//! talks plain HTTP to a chromedriver on loopback, so it needs no TLS stack of its own
//! (`default-features = false`: no openssl/native-tls, nothing next to our rustls/aws-lc).
//! Debian ships the matching pair as `chromium` + `chromium-driver`, so versions always agree.
//! chromiumoxide (CDP) would skip chromedriver but compiles the whole generated DevTools
//! protocol, a multi-minute build on a 2-core machine, for features these tests do not use.
//!
//! Lifecycle: chromedriver runs in its own process group, and Chromium (its child) inherits
//! it. [`Browser::quit`] ends the WebDriver session (chromedriver then closes Chromium) and
//! stops chromedriver; if a test panics first, `Drop` SIGKILLs that process group and any
//! leftover process whose command line names this browser's private profile directory. No
//! process is ever matched by name.
//!
//! Tools missing from PATH fail the test with install instructions, unless
//! `ONRAMP_SKIP_BROWSER=1` (then the test prints a loud SKIPPED line and passes). CI installs
//! both packages, so CI always runs these tests.

use std::future::Future;
use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use aws_lc_rs::encoding::AsDer;
use aws_lc_rs::signature::{EcdsaKeyPair, KeyPair, ECDSA_P256_SHA256_ASN1_SIGNING};
use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use fantoccini::wd::{Capabilities, TimeoutConfiguration};
use fantoccini::{Client, ClientBuilder};
use hyper_util::client::legacy::connect::HttpConnector;
use serde_json::json;
use sha2::{Digest, Sha256};
use tempfile::TempDir;

use super::certs::{KeyFormat, TestPki};

/// Env var that turns a missing browser into a skip instead of a failure (local machines
/// without Chromium). CI never sets it.
pub const SKIP_ENV: &str = "ONRAMP_SKIP_BROWSER";

/// chromedriver answering `/status` with `ready: true`.
const DRIVER_START_TIMEOUT: Duration = Duration::from_secs(15);
/// Creating the session = starting Chromium (slow on a loaded 2-core machine, cold disk).
const SESSION_TIMEOUT: Duration = Duration::from_secs(45);
/// Page loads inside the session (enforced by chromedriver itself).
const PAGE_LOAD_TIMEOUT: Duration = Duration::from_secs(20);

/// The two executables, resolved from PATH.
#[derive(Clone, Debug)]
pub struct Tools {
    pub chromium: PathBuf,
    pub chromedriver: PathBuf,
}

/// Finds `chromium` and `chromedriver` on PATH. Missing: panics with how to install them, or,
/// with `ONRAMP_SKIP_BROWSER=1`, prints a loud SKIPPED line and returns `None`.
pub fn tools_or_skip(test: &str) -> Option<Tools> {
    let chromium = which("chromium").or_else(|| which("chromium-browser"));
    let chromedriver = which("chromedriver");
    match (chromium, chromedriver) {
        (Some(chromium), Some(chromedriver)) => Some(Tools {
            chromium,
            chromedriver,
        }),
        (chromium, chromedriver) => {
            let missing: Vec<&str> = [
                chromium.is_none().then_some("chromium"),
                chromedriver.is_none().then_some("chromedriver"),
            ]
            .into_iter()
            .flatten()
            .collect();
            let missing = missing.join(" and ");
            if std::env::var(SKIP_ENV).as_deref() == Ok("1") {
                // Straight to the stderr handle, not eprintln!: libtest captures the macros'
                // output of passing tests, and a skip must be seen in a plain `cargo test`.
                use std::io::Write;
                let _ = writeln!(
                    std::io::stderr(),
                    "\n==================== SKIPPED {test} ====================\n\
                     {missing} not on PATH and {SKIP_ENV}=1: the real-browser test did NOT run.\n\
                     Install: apt-get install chromium chromium-driver\n\
                     ========================================================\n"
                );
                None
            } else {
                panic!(
                    "{test}: {missing} not on PATH. This test drives a real headless Chromium; \
                     install it with `apt-get install chromium chromium-driver` (.ci/run does), \
                     or set {SKIP_ENV}=1 to skip it explicitly on a machine without a browser."
                )
            }
        }
    }
}

fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| is_executable(p))
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// How Chromium treats the gateway's test certificate.
pub enum CertTrust {
    /// Accept exactly the leaf whose SubjectPublicKeyInfo hashes to this (base64 SHA-256),
    /// via `--ignore-certificate-errors-spki-list`; any other certificate still fails. This
    /// is how the tests run: a gateway serving the wrong certificate would fail the test.
    PinnedSpki(String),
}

impl CertTrust {
    /// Pins the leaf certificate of `pki` (whose key must be PKCS#8 ECDSA, the
    /// `GatewayBuilder` default).
    pub fn pin_leaf_of(pki: &TestPki) -> CertTrust {
        assert_eq!(
            pki.format,
            KeyFormat::Pkcs8Ecdsa,
            "SPKI pinning reads a PKCS#8 ECDSA key"
        );
        let pem = std::fs::read_to_string(&pki.key_path).expect("read leaf key");
        let b64: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
        let der = STANDARD.decode(b64).expect("leaf key PEM body is base64");
        let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, &der)
            .expect("leaf key is PKCS#8 P-256");
        let spki = pair.public_key().as_der().expect("SPKI DER");
        CertTrust::PinnedSpki(STANDARD.encode(Sha256::digest(spki.as_ref())))
    }
}

/// A headless Chromium session. Call [`Browser::quit`] at the end of a test; `Drop` kills
/// everything if the test panicked before that.
pub struct Browser {
    client: Option<Client>,
    driver: Option<Child>,
    /// Holds the fresh Chromium profile and chromedriver's log; removed on drop.
    profile: TempDir,
    driver_log: PathBuf,
}

impl Browser {
    /// Starts chromedriver and a headless Chromium session.
    pub async fn launch(tools: &Tools, trust: CertTrust) -> Browser {
        Self::launch_with_args(tools, trust, Vec::new()).await
    }

    /// [`launch`](Self::launch) with extra Chromium switches (e.g. `--host-resolver-rules`
    /// to send a public host name to a loopback stand-in).
    pub async fn launch_with_args(tools: &Tools, trust: CertTrust, extra: Vec<String>) -> Browser {
        let profile = tempfile::Builder::new()
            .prefix("onramp-gw-chromium-")
            .tempdir()
            .expect("profile tempdir");
        let driver_log = profile.path().join("chromedriver.log");
        let user_data_dir = profile.path().join("user-data");
        std::fs::create_dir(&user_data_dir).expect("create user-data-dir");

        // start_driver polls with blocking sleeps: keep it off the async workers, which
        // serve the test's fake app meanwhile.
        let (t, log) = (tools.clone(), driver_log.clone());
        let (driver, port) = tokio::task::spawn_blocking(move || start_driver(&t, &log))
            .await
            .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()));
        let mut browser = Browser {
            client: None,
            driver: Some(driver),
            profile,
            driver_log,
        };

        let mut args = vec![
            "--headless".to_string(),
            "--no-sandbox".into(),
            "--disable-gpu".into(),
            "--no-first-run".into(),
            "--disable-background-networking".into(),
            "--disable-component-update".into(),
            "--disable-sync".into(),
            "--disable-quic".into(),
            // Docker's default 64 MiB /dev/shm is too small for Chromium's renderers.
            "--disable-dev-shm-usage".into(),
            // Only loopback servers exist; a proxy from the environment must not interfere.
            "--no-proxy-server".into(),
            "--window-size=1280,900".into(),
            format!("--user-data-dir={}", user_data_dir.display()),
        ];
        args.extend(extra);
        match &trust {
            CertTrust::PinnedSpki(hash) => {
                args.push(format!("--ignore-certificate-errors-spki-list={hash}"))
            }
        }
        let mut caps = Capabilities::new();
        caps.insert("browserName".into(), json!("chrome"));
        // Certificate errors are NOT waved through: only the pinned key is accepted.
        caps.insert("acceptInsecureCerts".into(), json!(false));
        caps.insert(
            "goog:chromeOptions".into(),
            json!({ "binary": tools.chromium, "args": args }),
        );

        let url = format!("http://127.0.0.1:{port}");
        let mut builder = ClientBuilder::new(HttpConnector::new());
        builder.capabilities(caps);
        let client = match tokio::time::timeout(SESSION_TIMEOUT, builder.connect(&url)).await {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => browser.fail(&format!("chromedriver refused the session: {e}")),
            Err(_) => browser.fail(&format!("no session within {SESSION_TIMEOUT:?}")),
        };
        let timeouts = TimeoutConfiguration::new(
            Some(Duration::from_secs(10)),
            Some(PAGE_LOAD_TIMEOUT),
            Some(Duration::ZERO),
        );
        client
            .update_timeouts(timeouts)
            .await
            .unwrap_or_else(|e| browser.fail(&format!("set timeouts: {e}")));
        browser.client = Some(client);
        browser
    }

    pub fn client(&self) -> &Client {
        self.client.as_ref().expect("browser session")
    }

    /// Runs one WebDriver step with a deadline; on error or timeout, panics naming the step
    /// and showing chromedriver's log tail.
    pub async fn step<T, E: std::fmt::Display>(
        &self,
        what: &str,
        timeout: Duration,
        fut: impl Future<Output = Result<T, E>>,
    ) -> T {
        match tokio::time::timeout(timeout, fut).await {
            Ok(Ok(v)) => v,
            Ok(Err(e)) => self.fail(&format!("{what}: {e}")),
            Err(_) => self.fail(&format!("{what}: no answer within {timeout:?}")),
        }
    }

    /// The last lines of chromedriver's log (Chromium's start-up errors land there too).
    pub fn driver_log_tail(&self) -> String {
        let log = std::fs::read_to_string(&self.driver_log).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    fn fail(&self, why: &str) -> ! {
        panic!(
            "browser: {why}\n--- chromedriver log (tail) ---\n{}",
            self.driver_log_tail()
        )
    }

    /// Ends the session (chromedriver closes Chromium) and stops chromedriver.
    pub async fn quit(mut self) {
        if let Some(client) = self.client.take() {
            // Bounded: a wedged browser is killed by Drop below anyway.
            let _ = tokio::time::timeout(Duration::from_secs(10), client.close()).await;
        }
        // Drop kills chromedriver's process group and reaps it.
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // The client's connection task dies with the runtime; nothing to await here.
        self.client.take();
        if let Some(mut driver) = self.driver.take() {
            // chromedriver leads its own process group (see start_driver), which Chromium and
            // its helpers inherit: kill the group, then reap our direct child.
            let _ = Command::new("kill")
                .args(["-KILL", "--", &format!("-{}", driver.id())])
                .stderr(Stdio::null())
                .status();
            let _ = driver.kill();
            let _ = driver.wait();
        }
        kill_processes_using(self.profile.path());
    }
}

/// SIGKILLs any process whose command line mentions `dir` (this browser's private profile),
/// in case Chromium left its process group. The path is a fresh tempdir, so only processes
/// this `Browser` started can match.
fn kill_processes_using(dir: &Path) {
    let needle = dir.to_string_lossy().into_owned();
    let me = std::process::id();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return;
    };
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        if pid == me {
            continue;
        }
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        if String::from_utf8_lossy(&cmdline).contains(&needle) {
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// Spawns chromedriver on a free loopback port and waits for `/status` to say ready. Retries
/// with another port if it dies at start (the port was taken between probe and bind).
fn start_driver(tools: &Tools, log: &Path) -> (Child, u16) {
    let mut last_err = String::new();
    for _attempt in 0..3 {
        let port = free_port();
        let mut child = Command::new(&tools.chromedriver)
            .arg(format!("--port={port}"))
            .arg(format!("--log-path={}", log.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            // Own process group, so Drop can kill chromedriver and Chromium together.
            .process_group(0)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", tools.chromedriver.display()));
        let deadline = Instant::now() + DRIVER_START_TIMEOUT;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                last_err = format!("chromedriver exited at start: {status}");
                break;
            }
            if driver_ready(port) {
                return (child, port);
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                last_err = format!("chromedriver not ready within {DRIVER_START_TIMEOUT:?}");
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    let log_text = std::fs::read_to_string(log).unwrap_or_default();
    panic!("{last_err}\n--- chromedriver log ---\n{log_text}")
}

fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind probe port");
    l.local_addr().expect("probe addr").port()
}

/// `GET /status` over a raw socket (blocking, short timeouts): `"ready": true` once
/// chromedriver accepts sessions.
fn driver_ready(port: u16) -> bool {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    let _ = s.set_write_timeout(Some(Duration::from_secs(2)));
    let req =
        format!("GET /status HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n");
    if s.write_all(req.as_bytes()).is_err() {
        return false;
    }
    let mut resp = String::new();
    let _ = s.read_to_string(&mut resp);
    resp.starts_with("HTTP/1.1 200") && resp.replace(' ', "").contains("\"ready\":true")
}
