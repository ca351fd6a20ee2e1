//! A throw-away `redis-server` on an ephemeral loopback port, for the shared rate-limit
//! backend tests.
//!
//! It runs the system `redis-server` (`.ci/run` installs it with apt) with persistence off
//! and its working directory in a tempdir, so nothing survives the test and nothing lands
//! in the repository. Never on 6379: a developer's own Redis must not be touched.
//!
//! `start`, `restart` and `Drop` are synchronous (a process spawn and a short `PING`
//! poll), so they work from `#[test]` and from any flavour of `#[tokio::test]`.
//!
//! Also: a TLS-only server ([`RedisServer::start_tls`], certificates made by the test) and
//! a three-primary Redis Cluster ([`RedisCluster`], `redis-cli --cluster create`).

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
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
    /// Arguments after the common ones (TLS files, cluster mode).
    extra: Vec<String>,
    /// The CA PEM a TLS-only server's certificate chains to (None: plain TCP).
    tls_ca_pem: Option<Vec<u8>>,
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
            extra: Vec::new(),
            tls_ca_pem: None,
        };
        server.spawn();
        server
    }

    /// A server that speaks only TLS (`--port 0 --tls-port P`) with `cert`/`key` (which
    /// chain to the CA in `ca_file`), not asking clients for certificates.
    pub fn start_tls(cert: &Path, key: &Path, ca_file: &Path) -> RedisServer {
        crate::common::certs::install_provider();
        let dir = tempfile::Builder::new()
            .prefix("onramp-gw-redis-tls-")
            .tempdir()
            .expect("tempdir for redis-server");
        let mut server = RedisServer {
            port: free_port(),
            child: None,
            dir,
            extra: tls_args(cert, key, ca_file),
            tls_ca_pem: Some(std::fs::read(ca_file).expect("read the test CA")),
        };
        server.spawn();
        server
    }

    /// One node of a cluster: cluster mode on, its `nodes.conf` in its own directory (so a
    /// restarted node comes back as the same node with the same slots), and
    /// `cluster-require-full-coverage no` so the other primaries keep serving their slots
    /// while one is down (the behaviour the README asks operators to configure).
    /// `tls`: (cert, key, CA) for a TLS-only node whose cluster bus is TLS too.
    fn start_cluster_node(tls: Option<(&Path, &Path, &Path)>) -> RedisServer {
        let dir = tempfile::Builder::new()
            .prefix("onramp-gw-redis-cluster-")
            .tempdir()
            .expect("tempdir for redis-server");
        let mut server = RedisServer {
            port: free_port(),
            child: None,
            dir,
            extra: vec![
                "--cluster-enabled".into(),
                "yes".into(),
                "--cluster-config-file".into(),
                "nodes.conf".into(),
                // The bus port, explicitly: port + 10000 may be taken or past 65535.
                "--cluster-port".into(),
                free_port().to_string(),
                "--cluster-node-timeout".into(),
                "2000".into(),
                "--cluster-require-full-coverage".into(),
                "no".into(),
            ],
            tls_ca_pem: None,
        };
        if let Some((cert, key, ca_file)) = tls {
            crate::common::certs::install_provider();
            server.extra.extend(["--tls-cluster".into(), "yes".into()]);
            server.extra.extend(tls_args(cert, key, ca_file));
            server.tls_ca_pem = Some(std::fs::read(ca_file).expect("read the test CA"));
        }
        server.spawn();
        server
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// `redis://127.0.0.1:PORT/0` (`rediss://` for a TLS server), for
    /// `rate_limit.redis_url`.
    pub fn url(&self) -> String {
        let scheme = if self.tls_ca_pem.is_some() {
            "rediss"
        } else {
            "redis"
        };
        format!("{scheme}://127.0.0.1:{}/0", self.port)
    }

    /// A client for inspecting the server from a test (keys, TTLs); a TLS server's trusts
    /// the test CA.
    pub fn client(&self) -> redis::Client {
        match &self.tls_ca_pem {
            None => redis::Client::open(self.url()).expect("redis client for the test server"),
            Some(ca) => redis::Client::build_with_tls(
                self.url(),
                redis::TlsCertificates {
                    client_tls: None,
                    root_cert: Some(ca.clone()),
                },
            )
            .expect("TLS redis client for the test server"),
        }
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
        let port = self.port.to_string();
        // (No --tls-port on a plain server: a build without TLS would refuse the option.)
        let ports: &[&str] = if self.tls_ca_pem.is_some() {
            &["--port", "0", "--tls-port", &port]
        } else {
            &["--port", &port]
        };
        let spawned = Command::new("redis-server")
            .args(ports)
            .args([
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
            .args(&self.extra)
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

/// How long `redis-cli --cluster create` and the nodes' agreement on it may take.
const CLUSTER_TIMEOUT: Duration = Duration::from_secs(30);

/// Three primaries (no replicas) holding all 16384 slots between them.
pub struct RedisCluster {
    pub nodes: Vec<RedisServer>,
}

impl RedisCluster {
    pub fn start() -> RedisCluster {
        Self::start_with(None)
    }

    /// TLS-only nodes (clients and the cluster bus) with `cert`/`key` chaining to the CA
    /// in `ca_file`; the nodes announce their TLS ports.
    pub fn start_tls(cert: &Path, key: &Path, ca_file: &Path) -> RedisCluster {
        Self::start_with(Some((cert, key, ca_file)))
    }

    fn start_with(tls: Option<(&Path, &Path, &Path)>) -> RedisCluster {
        let nodes: Vec<RedisServer> = (0..3)
            .map(|_| RedisServer::start_cluster_node(tls))
            .collect();
        let mut create = Command::new("redis-cli");
        if let Some((_, _, ca_file)) = tls {
            create.arg("--tls").arg("--cacert").arg(ca_file);
        }
        create.args(["--cluster", "create"]);
        for node in &nodes {
            create.arg(format!("127.0.0.1:{}", node.port));
        }
        let out = create
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .stdin(Stdio::null())
            .output()
            .expect("run redis-cli --cluster create (apt-get install redis-tools)");
        assert!(
            out.status.success(),
            "redis-cli --cluster create failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let cluster = RedisCluster { nodes };
        for i in 0..cluster.nodes.len() {
            cluster.wait_until_ok(i);
        }
        cluster
    }

    /// The seed URL for `rate_limit.redis_url` (the first node; the gateway learns the rest).
    pub fn seed_url(&self) -> String {
        let scheme = if self.nodes[0].tls_ca_pem.is_some() {
            "rediss"
        } else {
            "redis"
        };
        format!("{scheme}://127.0.0.1:{}", self.nodes[0].port)
    }

    /// The index of the node serving `key`'s slot (asked of a node that is up).
    pub fn node_for(&self, key: &str) -> usize {
        let alive = self
            .nodes
            .iter()
            .find(|n| n.child.is_some())
            .expect("a cluster node is up");
        let mut con = alive.client().get_connection().expect("connect to a node");
        let slot: i64 = redis::cmd("CLUSTER")
            .arg("KEYSLOT")
            .arg(key)
            .query(&mut con)
            .expect("CLUSTER KEYSLOT");
        // [[start, end, [ip, port, id], ...], ...]
        let ranges: Vec<redis::Value> = redis::cmd("CLUSTER")
            .arg("SLOTS")
            .query(&mut con)
            .expect("CLUSTER SLOTS");
        for range in ranges {
            let redis::Value::Array(parts) = range else {
                continue;
            };
            let (Some(redis::Value::Int(start)), Some(redis::Value::Int(end))) =
                (parts.first(), parts.get(1))
            else {
                continue;
            };
            if (*start..=*end).contains(&slot) {
                let Some(redis::Value::Array(primary)) = parts.get(2) else {
                    break;
                };
                let Some(redis::Value::Int(port)) = primary.get(1) else {
                    break;
                };
                return self
                    .nodes
                    .iter()
                    .position(|n| i64::from(n.port) == *port)
                    .expect("slot owner is one of ours");
            }
        }
        panic!("no node serves slot {slot} of {key:?}")
    }

    /// `GET key` on the node that owns it.
    pub fn get(&self, key: &str) -> Option<String> {
        let node = &self.nodes[self.node_for(key)];
        let mut con = node
            .client()
            .get_connection()
            .expect("connect to the owner");
        redis::cmd("GET").arg(key).query(&mut con).expect("GET")
    }

    /// SIGKILLs every node, restarts them all from their `nodes.conf`, and waits until
    /// each says the cluster is ok.
    pub fn restart_all(&mut self) {
        for node in &mut self.nodes {
            node.restart();
        }
        for i in 0..self.nodes.len() {
            self.wait_until_ok(i);
        }
    }

    /// `number_of_cached_scripts` of node `i` (`INFO memory`): 0 on a fresh node.
    pub fn cached_scripts(&self, i: usize) -> u64 {
        let mut con = self.nodes[i].client().get_connection().expect("connect");
        let info: String = redis::cmd("INFO")
            .arg("memory")
            .query(&mut con)
            .expect("INFO");
        info.lines()
            .find_map(|l| l.trim().strip_prefix("number_of_cached_scripts:"))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no number_of_cached_scripts in INFO memory:\n{info}"))
    }

    /// SIGKILLs node `i` (its slots are then unserved; the others keep theirs).
    pub fn kill(&mut self, i: usize) {
        self.nodes[i].kill();
    }

    /// Restarts node `i` from its `nodes.conf` (same id, same slots, empty data) and waits
    /// until it says the cluster is ok again.
    pub fn restart(&mut self, i: usize) {
        self.nodes[i].restart();
        self.wait_until_ok(i);
    }

    /// Polls `CLUSTER INFO` on node `i` (Redis offers no signal for this) until it reports
    /// `cluster_state:ok` with every slot assigned and the others known.
    fn wait_until_ok(&self, i: usize) {
        let deadline = Instant::now() + CLUSTER_TIMEOUT;
        let node = &self.nodes[i];
        let mut last = String::new();
        while Instant::now() < deadline {
            if let Ok(mut con) = node
                .client()
                .get_connection_with_timeout(Duration::from_millis(500))
            {
                last = redis::cmd("CLUSTER")
                    .arg("INFO")
                    .query(&mut con)
                    .unwrap_or_default();
                let known = last
                    .lines()
                    .find_map(|l| l.trim().strip_prefix("cluster_known_nodes:"))
                    .and_then(|v| v.parse::<usize>().ok());
                if last.contains("cluster_state:ok")
                    && last.contains("cluster_slots_ok:16384")
                    && known == Some(self.nodes.len())
                {
                    return;
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!(
            "cluster node {} not ok within {CLUSTER_TIMEOUT:?}:\n{last}\nits log:\n{}",
            node.port,
            node.log()
        );
    }
}

/// redis-server's TLS settings: this leaf and key, this CA, clients not asked for a
/// certificate (the gateway authenticates the server, not the other way round).
fn tls_args(cert: &Path, key: &Path, ca_file: &Path) -> Vec<String> {
    let path = |p: &Path| p.to_string_lossy().into_owned();
    vec![
        "--tls-cert-file".into(),
        path(cert),
        "--tls-key-file".into(),
        path(key),
        "--tls-ca-cert-file".into(),
        path(ca_file),
        "--tls-auth-clients".into(),
        "no".into(),
    ]
}
