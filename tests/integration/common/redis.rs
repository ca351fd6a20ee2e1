//! A throw-away `redis-server` on an ephemeral loopback port, for the shared rate-limit
//! backend tests.
//!
//! It runs the system `redis-server` (`.ci/run` installs it with apt) with persistence off
//! and its working directory in a tempdir, so nothing survives the test and nothing lands
//! in the repository. Never on 6379: a developer's own Redis must not be touched.
//!
//! `start`, `restart` and `Drop` are synchronous (a process spawn and a short `PING`
//! poll), so they work from `#[test]` and from any flavour of `#[tokio::test]`.

use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

/// How long a fresh `redis-server` may take to answer `PING`. It usually needs a few
/// milliseconds; this only bounds a broken start on a loaded machine.
const START_TIMEOUT: Duration = Duration::from_secs(10);

/// The port a developer's own Redis is probably on.
const DEFAULT_REDIS_PORT: u16 = 6379;

/// A running `redis-server`; SIGKILLed and reaped on drop.
pub struct RedisServer {
    port: u16,
    child: Option<Child>,
    dir: TempDir,
}

impl RedisServer {
    /// Starts `redis-server` on a free loopback port and waits until it answers `PING`.
    /// Panics with a clear message if the binary is missing or it does not come up.
    pub fn start() -> RedisServer {
        let dir = tempfile::Builder::new()
            .prefix("onramp-gw-redis-")
            .tempdir()
            .expect("tempdir for redis-server");
        let mut server = RedisServer {
            port: free_port(),
            child: None,
            dir,
        };
        server.spawn();
        server
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// `redis://127.0.0.1:PORT/0`, for `rate_limit.redis_url`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// A client for inspecting the server from a test (keys, TTLs).
    pub fn client(&self) -> redis::Client {
        redis::Client::open(self.url()).expect("redis client for the test server")
    }

    /// SIGKILLs the server (no shutdown handshake, no save: what a crashed or
    /// network-partitioned Redis looks like to the gateway) and reaps it, so the port is
    /// closed when this returns.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            // `Child::kill` is SIGKILL on Unix.
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts a fresh (empty) server on the same port, as a restarted Redis pod would
    /// come back at the same Service address. Kills the current one first if needed.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("redis.log")
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    fn spawn(&mut self) {
        assert_ne!(
            self.port, DEFAULT_REDIS_PORT,
            "never use the default Redis port"
        );
        let log = std::fs::File::create(self.log_path()).expect("create redis log file");
        let log_err = log.try_clone().expect("clone redis log file handle");
        let spawned = Command::new("redis-server")
            .args([
                "--port",
                &self.port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--daemonize",
                "no",
                "--dir",
                &self.dir.path().to_string_lossy(),
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log_err))
            .spawn();
        let child = match spawned {
            Ok(c) => c,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => panic!(
                "`redis-server` not found on PATH: the Redis rate-limit tests need it \
                 (apt-get install redis-server; .ci/run installs it)"
            ),
            Err(e) => panic!("could not start redis-server: {e}"),
        };
        self.child = Some(child);
        self.wait_for_ping();
    }

    /// Polls `PING` with a short backoff until the server answers, it exits, or
    /// [`START_TIMEOUT`] passes.
    fn wait_for_ping(&mut self) {
        let deadline = Instant::now() + START_TIMEOUT;
        let client = self.client();
        let mut delay = Duration::from_millis(5);
        loop {
            let pong = client
                .get_connection_with_timeout(Duration::from_millis(500))
                .and_then(|mut c| redis::cmd("PING").query::<String>(&mut c));
            match pong {
                Ok(p) if p == "PONG" => return,
                Ok(other) => panic!("redis-server answered PING with {other:?}"),
                Err(e) => {
                    if let Some(status) = self
                        .child
                        .as_mut()
                        .and_then(|c| c.try_wait().ok().flatten())
                    {
                        panic!(
                            "redis-server on port {} exited ({status}) before answering PING \
                             (last error: {e}); its log:\n{}",
                            self.port,
                            self.log()
                        );
                    }
                    if Instant::now() >= deadline {
                        panic!(
                            "redis-server on port {} did not answer PING within {START_TIMEOUT:?} \
                             (last error: {e}); its log:\n{}",
                            self.port,
                            self.log()
                        );
                    }
                }
            }
            std::thread::sleep(delay);
            delay = (delay * 2).min(Duration::from_millis(100));
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A loopback port that was free a moment ago (bound to :0, then released). Redis binds
/// it itself right after, so the window for a clash is tiny.
fn free_port() -> u16 {
    loop {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        let port = listener.local_addr().expect("local addr").port();
        if port != DEFAULT_REDIS_PORT {
            return port;
        }
    }
}
