//! Runs the real `onramp-gateway` binary against a generated config.toml.
//!
//! Readiness is the gateway's own signal: it logs one `"message":"listening"` JSON line per
//! listener (with the actual bound `addr`) and then `"message":"ready"` on stdout. The
//! harness reads stdout up to that line, then keeps draining it into a shared buffer so
//! tests can assert on the logs later (access log, "no secret in logs", warnings).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rustls::pki_types::ServerName;
use rustls::ClientConfig;
use tempfile::TempDir;
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use super::certs::{self, Alpn, KeyFormat, TestPki};

/// How long a gateway may take from spawn to its `ready` line. Generous because debug
/// builds on a loaded 2-core machine can be slow; a healthy start takes milliseconds.
pub const READY_TIMEOUT: Duration = Duration::from_secs(20);

/// Path of the binary under test, built by Cargo for this test crate.
pub fn binary() -> &'static str {
    env!("CARGO_BIN_EXE_onramp-gateway")
}

/// Key id and secret to put in `CDP_API_KEY_ID` / `CDP_API_KEY_SECRET`.
#[derive(Clone, Debug)]
pub struct CdpKey {
    pub id: String,
    pub secret: String,
}

impl CdpKey {
    /// A fresh EC P-256 key in SEC1 PEM, as the CDP portal hands it out.
    pub fn generate() -> CdpKey {
        CdpKey {
            id: "organizations/test-org/apiKeys/test-key-id".to_string(),
            secret: certs::ec_p256_sec1_pem(),
        }
    }

    /// The base64 body of the PEM (no armour lines): if any of it shows up in the logs,
    /// the secret leaked.
    pub fn secret_body_lines(&self) -> Vec<String> {
        self.secret
            .lines()
            .filter(|l| !l.starts_with("-----") && l.len() >= 16)
            .map(str::to_string)
            .collect()
    }
}

/// Builds a config.toml and starts (or checks) the gateway with it.
pub struct GatewayBuilder {
    config: toml::Table,
    key_format: KeyFormat,
    self_signed: bool,
    env: Vec<(String, String)>,
    cdp_key: Option<CdpKey>,
}

impl GatewayBuilder {
    /// Defaults: HTTPS and admin on 127.0.0.1:0, JSON logs, a CA-signed `localhost` cert
    /// (PKCS#8 ECDSA), `upstream_url` as the upstream, no CDP key.
    pub fn new(upstream_url: &str) -> GatewayBuilder {
        let config: toml::Table = toml::from_str(&format!(
            r#"
[server]
listen = "127.0.0.1:0"

[upstream]
url = "{upstream_url}"

[admin]
listen = "127.0.0.1:0"

[log]
format = "json"
level = "info"
"#
        ))
        .expect("default config parses");
        GatewayBuilder {
            config,
            key_format: KeyFormat::Pkcs8Ecdsa,
            self_signed: false,
            env: Vec::new(),
            cdp_key: None,
        }
    }

    /// Merges a TOML snippet into `[section]`; its keys replace the defaults.
    /// Example: `.section("server", "header_read_timeout_ms = 500")`.
    pub fn section(mut self, section: &str, snippet: &str) -> Self {
        let parsed: toml::Table = toml::from_str(snippet)
            .unwrap_or_else(|e| panic!("bad TOML snippet for [{section}]: {e}\n{snippet}"));
        let entry = self
            .config
            .entry(section.to_string())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        let table = entry.as_table_mut().expect("section is a table");
        for (k, v) in parsed {
            table.insert(k, v);
        }
        self
    }

    /// Removes `key` from `[section]` (e.g. to fall back to the gateway's own default).
    pub fn remove(mut self, section: &str, key: &str) -> Self {
        if let Some(t) = self.config.get_mut(section).and_then(|v| v.as_table_mut()) {
            t.remove(key);
        }
        self
    }

    pub fn key_format(mut self, f: KeyFormat) -> Self {
        self.key_format = f;
        self
    }

    /// `tls.self_signed = true` instead of cert/key files.
    pub fn self_signed(mut self) -> Self {
        self.self_signed = true;
        self
    }

    /// Sets a CDP key through the environment (`CDP_API_KEY_ID` / `CDP_API_KEY_SECRET`), so
    /// `/readyz` can be 200.
    pub fn with_cdp_key(mut self, key: CdpKey) -> Self {
        self.cdp_key = Some(key);
        self
    }

    pub fn env(mut self, k: &str, v: &str) -> Self {
        self.env.push((k.to_string(), v.to_string()));
        self
    }

    /// Writes PKI files and config.toml into a fresh tempdir; returns everything needed to
    /// run the binary against it.
    pub fn write(self) -> WrittenConfig {
        let dir = tempfile::Builder::new()
            .prefix("onramp-gw-")
            .tempdir()
            .expect("tempdir");
        let pki = TestPki::new(self.key_format);
        let mut config = self.config;
        let tls = config
            .entry("tls".to_string())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()))
            .as_table_mut()
            .expect("[tls] is a table");
        if self.self_signed {
            tls.insert("self_signed".into(), toml::Value::Boolean(true));
        } else {
            // Only fill in what a test did not set itself (e.g. a missing-file test).
            tls.entry("cert").or_insert_with(|| {
                toml::Value::String(pki.cert_path.to_string_lossy().into_owned())
            });
            tls.entry("key").or_insert_with(|| {
                toml::Value::String(pki.key_path.to_string_lossy().into_owned())
            });
        }
        let text = toml::to_string(&config).expect("serialize config");
        let path = dir.path().join("config.toml");
        std::fs::write(&path, &text).expect("write config.toml");
        let mut env = self.env;
        if let Some(k) = &self.cdp_key {
            env.push(("CDP_API_KEY_ID".into(), k.id.clone()));
            env.push(("CDP_API_KEY_SECRET".into(), k.secret.clone()));
        }
        WrittenConfig {
            dir,
            path,
            text,
            pki,
            env,
            cdp_key: self.cdp_key,
        }
    }

    /// Starts the gateway and waits for its `ready` log line.
    pub async fn start(self) -> Gateway {
        self.write().start().await
    }

    /// `onramp-gateway check --config <file>`.
    pub fn check(self) -> Output {
        let w = self.write();
        run_binary(&w.check_args(), &w.env, Duration::from_secs(20))
    }

    /// Runs the gateway expecting it to refuse to start; returns its output once it exits.
    /// Panics (with the output) if it is still running after `timeout`.
    pub fn run_expect_exit(self, timeout: Duration) -> (Output, WrittenConfig) {
        let w = self.write();
        let out = run_binary(&w.run_args(), &w.env, timeout);
        (out, w)
    }
}

/// A config.toml on disk plus the PKI it refers to.
pub struct WrittenConfig {
    pub dir: TempDir,
    pub path: PathBuf,
    pub text: String,
    pub pki: TestPki,
    pub env: Vec<(String, String)>,
    pub cdp_key: Option<CdpKey>,
}

impl WrittenConfig {
    pub fn run_args(&self) -> Vec<String> {
        vec!["--config".into(), self.path.to_string_lossy().into_owned()]
    }

    pub fn check_args(&self) -> Vec<String> {
        vec![
            "check".into(),
            "--config".into(),
            self.path.to_string_lossy().into_owned(),
        ]
    }

    /// Replaces the file with `text` verbatim (for configs the builder cannot express,
    /// such as syntax errors).
    pub fn overwrite(&mut self, text: &str) {
        std::fs::write(&self.path, text).expect("rewrite config");
        self.text = text.to_string();
    }

    pub async fn start(self) -> Gateway {
        let args = self.run_args();
        self.start_with_args(args, &[]).await
    }

    /// Starts the binary with `args` (instead of `--config <file>`) and extra environment,
    /// in the config's directory, and waits for `ready`.
    pub async fn start_with_args(self, args: Vec<String>, extra_env: &[(&str, &str)]) -> Gateway {
        let mut env = self.env.clone();
        env.extend(
            extra_env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string())),
        );
        let mut cmd = clean_command(&env);
        cmd.args(args)
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("spawn onramp-gateway");
        let pid = child.id();
        let logs = Arc::new(Mutex::new(String::new()));
        let stderr = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = mpsc::channel::<String>();

        let stdout_pipe = child.stdout.take().unwrap();
        let buf = logs.clone();
        std::thread::spawn(move || drain(stdout_pipe, buf, Some(tx)));
        let stderr_pipe = child.stderr.take().unwrap();
        let buf = stderr.clone();
        std::thread::spawn(move || drain(stderr_pipe, buf, None));

        // The wait blocks on a std channel, so keep it off the async worker threads (the
        // fake upstream may share this runtime).
        let waited = tokio::task::spawn_blocking(move || wait_ready(rx))
            .await
            .expect("ready waiter panicked");
        let mut gw = Gateway {
            child: Some(child),
            pid,
            https_addr: "0.0.0.0:0".parse().unwrap(),
            admin_addr: None,
            http_addr: None,
            logs,
            stderr,
            config: self,
        };
        match waited {
            Ok(addrs) => {
                gw.https_addr = addrs
                    .https
                    .unwrap_or_else(|| gw.fail("no `listening` event with listener=https"));
                gw.admin_addr = addrs.admin;
                gw.http_addr = addrs.http;
                gw
            }
            Err(why) => gw.fail(&why),
        }
    }
}

/// A running gateway; killed (SIGKILL) on drop if still running.
pub struct Gateway {
    child: Option<Child>,
    pub pid: u32,
    pub https_addr: SocketAddr,
    pub admin_addr: Option<SocketAddr>,
    pub http_addr: Option<SocketAddr>,
    logs: Arc<Mutex<String>>,
    stderr: Arc<Mutex<String>>,
    pub config: WrittenConfig,
}

impl Gateway {
    /// Everything the gateway printed on stdout so far.
    pub fn logs(&self) -> String {
        self.logs.lock().unwrap().clone()
    }

    /// Everything the gateway printed on stderr so far.
    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// stdout lines that parse as JSON objects.
    pub fn log_events(&self) -> Vec<serde_json::Value> {
        self.logs()
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| v.is_object())
            .collect()
    }

    /// Waits until a JSON log event satisfies `pred`; panics with the logs after `timeout`.
    /// Polling is the only option: the access log line is written after the response.
    pub async fn wait_for_log(
        &self,
        timeout: Duration,
        what: &str,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(ev) = self.log_events().into_iter().find(|e| pred(e)) {
                return ev;
            }
            if Instant::now() >= deadline {
                panic!(
                    "no log event matching {what} within {timeout:?}; logs:\n{}",
                    self.logs()
                );
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_addr
            .unwrap_or_else(|| self.fail("no `listening` event with listener=admin"))
    }

    /// `https://localhost:PORT{path}` (the client resolves localhost to the bound address).
    pub fn url(&self, path: &str) -> String {
        format!("https://localhost:{}{}", self.https_addr.port(), path)
    }

    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{}", self.admin_addr(), path)
    }

    pub fn client_config(&self, alpn: Alpn) -> Arc<ClientConfig> {
        self.config.pki.client_config(alpn)
    }

    /// A reqwest client that trusts the test CA and offers `alpn`. With `Alpn::Http11` it
    /// speaks HTTP/1.1 only. Requests time out after 20 s so a hung gateway fails the test.
    pub fn https_client(&self, alpn: Alpn) -> reqwest::Client {
        https_client_with(self.client_config(alpn), self.https_addr, alpn)
    }

    /// Plain-HTTP client for the admin listener.
    pub fn admin_client(&self) -> reqwest::Client {
        certs::install_provider();
        reqwest::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(10))
            .build()
            .expect("admin client")
    }

    pub async fn admin_get(&self, path: &str) -> (u16, String) {
        let resp = self
            .admin_client()
            .get(self.admin_url(path))
            .send()
            .await
            .unwrap_or_else(|e| panic!("admin GET {path}: {e}"));
        let status = resp.status().as_u16();
        (status, resp.text().await.unwrap_or_default())
    }

    /// A raw TLS connection (SNI `localhost`, verified against the test CA).
    pub async fn tls_connect(&self, alpn: Alpn) -> TlsStream<TcpStream> {
        tls_connect(self.https_addr, self.client_config(alpn))
            .await
            .unwrap_or_else(|e| panic!("TLS connect to {}: {e}", self.https_addr))
    }

    pub fn sigterm(&self) {
        signal(self.pid, "TERM");
    }

    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => c.try_wait().expect("try_wait").is_none(),
            None => false,
        }
    }

    /// Waits for the process to exit; panics with the logs after `timeout`.
    pub async fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            let child = self.child.as_mut().expect("gateway already reaped");
            if let Some(status) = child.try_wait().expect("try_wait") {
                return status;
            }
            if Instant::now() >= deadline {
                let logs = self.logs();
                panic!("gateway did not exit within {timeout:?}; logs:\n{logs}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn fail(&self, why: &str) -> ! {
        panic!(
            "gateway {}: {why}\n--- config.toml ---\n{}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.pid,
            self.config.text,
            self.logs(),
            self.stderr()
        )
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Sends `SIG{name}` to `pid` with the `kill` utility (no libc dependency needed).
pub fn signal(pid: u32, name: &str) {
    let st = Command::new("kill")
        .arg(format!("-{name}"))
        .arg(pid.to_string())
        .status()
        .expect("run kill");
    assert!(st.success(), "kill -{name} {pid} failed");
}

/// A reqwest client for `https://localhost:PORT` using `cfg`, pinned to `addr`.
pub fn https_client_with(cfg: Arc<ClientConfig>, addr: SocketAddr, alpn: Alpn) -> reqwest::Client {
    certs::install_provider();
    let mut b = reqwest::Client::builder()
        .use_preconfigured_tls((*cfg).clone())
        .resolve("localhost", addr)
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(20));
    match alpn {
        Alpn::Http11 | Alpn::None => b = b.http1_only(),
        Alpn::H2 => b = b.http2_prior_knowledge(),
        Alpn::H2AndHttp11 => {}
    }
    b.build().expect("build reqwest client")
}

/// TCP + TLS handshake to `addr` with SNI `localhost`.
pub async fn tls_connect(
    addr: SocketAddr,
    cfg: Arc<ClientConfig>,
) -> std::io::Result<TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    TlsConnector::from(cfg)
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
}

/// `onramp-gateway check --config <path>` with a clean environment.
pub fn run_check(config_path: &Path, env: &[(String, String)]) -> Output {
    let args = vec![
        "check".to_string(),
        "--config".to_string(),
        config_path.to_string_lossy().into_owned(),
    ];
    run_binary(&args, env, Duration::from_secs(20))
}

/// Writes `text` as `config.toml` in a fresh tempdir and runs `check` on it.
pub fn run_check_raw(text: &str) -> (Output, TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("config.toml");
    std::fs::write(&path, text).expect("write config");
    let out = run_check(&path, &[]);
    (out, dir, path)
}

/// Runs the binary with `args` to completion; kills it and panics if it outlives `timeout`
/// (a refused config must make it exit, not serve).
pub fn run_binary(args: &[String], env: &[(String, String)], timeout: Duration) -> Output {
    let mut child = clean_command(env)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn onramp-gateway");
    let out_buf = Arc::new(Mutex::new(String::new()));
    let err_buf = Arc::new(Mutex::new(String::new()));
    let (o, e) = (child.stdout.take().unwrap(), child.stderr.take().unwrap());
    let ob = out_buf.clone();
    let t1 = std::thread::spawn(move || drain(o, ob, None));
    let eb = err_buf.clone();
    let t2 = std::thread::spawn(move || drain(e, eb, None));
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(st) = child.try_wait().expect("try_wait") {
            break st;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            let _ = (t1.join(), t2.join());
            panic!(
                "`onramp-gateway {}` still running after {timeout:?} (expected it to exit)\n\
                 --- stdout ---\n{}\n--- stderr ---\n{}",
                args.join(" "),
                out_buf.lock().unwrap(),
                err_buf.lock().unwrap()
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let _ = (t1.join(), t2.join());
    let stdout = out_buf.lock().unwrap().clone().into_bytes();
    let stderr = err_buf.lock().unwrap().clone().into_bytes();
    Output {
        status,
        stdout,
        stderr,
    }
}

/// The binary with an empty environment plus PATH and HOME: no CDP key, RUST_LOG or
/// ONRAMP_GATEWAY_CONFIG leaks in from the developer's shell or CI.
fn clean_command(env: &[(String, String)]) -> Command {
    let mut cmd = Command::new(binary());
    cmd.env_clear();
    for k in ["PATH", "HOME"] {
        if let Ok(v) = std::env::var(k) {
            cmd.env(k, v);
        }
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd
}

fn drain(pipe: impl std::io::Read, buf: Arc<Mutex<String>>, tx: Option<mpsc::Sender<String>>) {
    use std::io::BufRead;
    let reader = std::io::BufReader::new(pipe);
    for line in reader.split(b'\n') {
        let Ok(line) = line else { break };
        let line = String::from_utf8_lossy(&line).into_owned();
        {
            let mut b = buf.lock().unwrap();
            b.push_str(&line);
            b.push('\n');
        }
        if let Some(tx) = &tx {
            // The receiver is gone after `ready`; keep draining regardless.
            let _ = tx.send(line);
        }
    }
}

#[derive(Default)]
struct Addrs {
    https: Option<SocketAddr>,
    http: Option<SocketAddr>,
    admin: Option<SocketAddr>,
}

/// Looks `name` up at the top level of a log event, then under `fields` (tracing-subscriber's
/// non-flattened JSON layout). The contract says flat; `proxy::access_log_*` checks that
/// strictly, so readiness does not hinge on it.
pub fn field<'a>(ev: &'a serde_json::Value, name: &str) -> Option<&'a serde_json::Value> {
    ev.get(name)
        .or_else(|| ev.get("fields").and_then(|f| f.get(name)))
}

pub fn field_str<'a>(ev: &'a serde_json::Value, name: &str) -> Option<&'a str> {
    field(ev, name).and_then(|v| v.as_str())
}

fn wait_ready(rx: mpsc::Receiver<String>) -> Result<Addrs, String> {
    let deadline = Instant::now() + READY_TIMEOUT;
    let mut addrs = Addrs::default();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = match rx.recv_timeout(left) {
            Ok(l) => l,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                return Err(format!("no `ready` log line within {READY_TIMEOUT:?}"))
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                return Err("stdout closed (process exited?) before `ready`".into())
            }
        };
        let Ok(ev) = serde_json::from_str::<serde_json::Value>(&line) else {
            continue;
        };
        match field_str(&ev, "message") {
            Some("listening") => {
                let addr = field_str(&ev, "addr").and_then(|a| a.parse::<SocketAddr>().ok());
                match (field_str(&ev, "listener"), addr) {
                    (Some("https"), Some(a)) => addrs.https = Some(a),
                    (Some("http"), Some(a)) => addrs.http = Some(a),
                    (Some("admin"), Some(a)) => addrs.admin = Some(a),
                    _ => return Err(format!("unparseable `listening` event: {line}")),
                }
            }
            Some("ready") => return Ok(addrs),
            _ => {}
        }
    }
}
