//! The fully static binary (deploy/build-static.sh) in an empty root, the way a
//! `FROM scratch` / distroless-static image runs it: `unshare --mount --pid --fork` +
//! `chroot` into a directory holding only the binary, a CA bundle, its config and its
//! certificate, as the distroless `nonroot` user (65532). One HTTPS request end to end
//! to an upstream on loopback.
//!
//! Ignored unless run with `--ignored` and `ONRAMP_GATEWAY_STATIC_BIN` naming the binary
//! (.ci/run builds it once and runs this): the static build is a release build.

use std::io::BufRead;
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::certs::{Alpn, KeyFormat, TestPki};
use crate::common::gateway::https_client_with;
use crate::common::upstream::Upstream;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs ONRAMP_GATEWAY_STATIC_BIN (deploy/build-static.sh) and root for chroot"]
async fn static_binary_serves_https_from_an_empty_root() {
    let bin = std::env::var("ONRAMP_GATEWAY_STATIC_BIN")
        .expect("ONRAMP_GATEWAY_STATIC_BIN: path of the binary built by deploy/build-static.sh");
    let upstream = Upstream::start().await;
    let pki = TestPki::new(KeyFormat::Pkcs8Ecdsa);

    // The whole root: nothing else (no libc, no loader, no shell, no /proc).
    let root = tempfile::Builder::new()
        .prefix("onramp-gw-root-")
        .tempdir()
        .unwrap();
    let r = root.path();
    let etc = r.join("etc/onramp-gateway");
    std::fs::create_dir_all(&etc).unwrap();
    std::fs::create_dir_all(r.join("etc/ssl/certs")).unwrap();
    std::fs::copy(&bin, r.join("onramp-gateway")).expect("copy the static binary");
    std::fs::copy(&pki.cert_path, etc.join("tls.crt")).unwrap();
    std::fs::copy(&pki.key_path, etc.join("tls.key")).unwrap();
    let bundle = std::fs::read("/etc/ssl/certs/ca-certificates.crt").unwrap_or_default();
    std::fs::write(r.join("etc/ssl/certs/ca-certificates.crt"), bundle).unwrap();
    std::fs::write(
        etc.join("config.toml"),
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\n[upstream]\nurl = \"{}\"\n[admin]\nlisten = \"\"\n\
             [tls]\ncert = \"tls.crt\"\nkey = \"tls.key\"\n[log]\nformat = \"json\"\n",
            upstream.url()
        ),
    )
    .unwrap();
    // Readable by the unprivileged user the image runs as.
    Command::new("chmod")
        .args(["-R", "a+rX"])
        .arg(r)
        .status()
        .expect("chmod");
    let entries: Vec<String> = walk(r);
    assert_eq!(
        entries.len(),
        5,
        "only the binary, CA bundle, config, cert and key: {entries:?}"
    );

    let mut child = Command::new("unshare")
        .args([
            "--mount",
            "--pid",
            "--fork",
            "--kill-child",
            "chroot",
            "--userspec=65532:65532",
        ])
        .arg(r)
        .args([
            "/onramp-gateway",
            "--config",
            "/etc/onramp-gateway/config.toml",
        ])
        // Nothing from the test's environment reaches the gateway but a PATH for
        // unshare to find chroot.
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn unshare (util-linux)");
    // `--kill-child` does not reach the gateway (chroot's setuid clears the parent-death
    // signal), so the guard kills the namespace's pid 1, which takes the namespace down.
    let guard = KillNamespace(child.id());
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            let _ = tx.send(line);
        }
    });
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut https: Option<SocketAddr> = None;
    let mut seen = String::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => {
                seen.push_str(&line);
                seen.push('\n');
                let ev: serde_json::Value = serde_json::from_str(&line).unwrap_or_default();
                if ev["listener"] == "https" {
                    https = ev["addr"].as_str().and_then(|a| a.parse().ok());
                }
                if line.contains("\"ready\"") {
                    break;
                }
            }
            Err(_) => {
                drop(guard);
                let out = child.wait_with_output().unwrap();
                panic!(
                    "not ready in the empty root; stdout:\n{seen}\nstderr:\n{}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
        }
    }
    let https = https.unwrap_or_else(|| panic!("no https listening event:\n{seen}"));
    let client = https_client_with(
        pki.client_config(Alpn::H2AndHttp11),
        https,
        Alpn::H2AndHttp11,
    );
    let resp = client
        .get(format!("https://localhost:{}/echo", https.port()))
        .send()
        .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    drop(guard);
    let out = child.wait_with_output().unwrap();
    seen.extend(rx.try_iter().map(|l| l + "\n"));
    let resp = resp.unwrap_or_else(|e| {
        panic!(
            "HTTPS request to the gateway in the empty root: {e}\nstdout:\n{seen}\nstderr:\n{}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    assert_eq!(resp.status(), 200);
    assert!(upstream.requests() >= 1);
}

/// SIGKILLs the children of `unshare` (the namespace's pid 1) and `unshare` itself.
struct KillNamespace(u32);

impl Drop for KillNamespace {
    fn drop(&mut self) {
        let pid = self.0;
        let children =
            std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
        let mut pids: Vec<String> = children.split_whitespace().map(str::to_string).collect();
        pids.push(pid.to_string());
        for p in pids {
            let _ = Command::new("kill").args(["-KILL", &p]).status();
        }
    }
}

fn walk(dir: &std::path::Path) -> Vec<String> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p.display().to_string());
        }
    }
    out
}
