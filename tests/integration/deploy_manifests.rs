//! `deploy/` is part of the product: these tests keep the container image, the Kubernetes
//! manifests and the systemd unit consistent with each other and with the config they carry,
//! and run the real binary's `check` on every shipped config.
//!
//! Each manifest names the same things in several places (a port in config.toml, in
//! `containerPort`, in a probe and in the Service; a path in config.toml and in a
//! `mountPath`), and nothing in Kubernetes cross-checks them: a mismatch only shows up as a
//! pod that never turns ready, or a certificate that silently stops rotating. So every pair
//! is checked here, by resolving names (named ports, volume names, Secret names) the way the
//! kubelet does.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::common::certs::{KeyFormat, TestPki};
use crate::common::fake_cdp::TestKey;
use crate::common::gateway::run_check;

const GATEWAY_CONTAINER: &str = "onramp-gateway";
const APP_CONTAINER: &str = "app";

fn repo_path(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(repo_path(rel)).unwrap_or_else(|e| panic!("read {rel}: {e}"))
}

/// Every YAML document in `rel` (`---`-separated), as JSON values so they can be indexed
/// like `doc["spec"]["template"]`. Kubernetes keys are all strings, so nothing is lost.
fn yaml_docs(rel: &str) -> Vec<Value> {
    let text = read(rel);
    serde_yaml_ng::Deserializer::from_str(&text)
        .map(|doc| {
            serde::Deserialize::deserialize(doc).unwrap_or_else(|e| panic!("parse {rel}: {e}"))
        })
        .filter(|v: &Value| !v.is_null())
        .collect()
}

/// The resources listed in the kustomization, parsed, keyed by `kind`.
struct Kustomize {
    docs: Vec<(String, Value)>,
}

impl Kustomize {
    fn load() -> Kustomize {
        let k = yaml_docs("deploy/kubernetes/kustomization.yaml")
            .pop()
            .expect("kustomization.yaml has a document");
        let resources: Vec<String> = k["resources"]
            .as_array()
            .expect("kustomization resources")
            .iter()
            .map(|r| r.as_str().expect("resource is a path").to_string())
            .collect();
        assert!(
            !resources.iter().any(|r| r.contains("secret")),
            "kustomization must not apply the example Secret(s): {resources:?}"
        );
        let mut docs = Vec::new();
        for r in &resources {
            let rel = format!("deploy/kubernetes/{r}");
            assert!(
                repo_path(&rel).is_file(),
                "kustomization lists missing {rel}"
            );
            for d in yaml_docs(&rel) {
                docs.push((r.clone(), d));
            }
        }
        Kustomize { docs }
    }

    fn one(&self, kind: &str) -> &Value {
        let found: Vec<&Value> = self
            .docs
            .iter()
            .map(|(_, d)| d)
            .filter(|d| d["kind"] == kind)
            .collect();
        assert_eq!(
            found.len(),
            1,
            "expected exactly one {kind} in the kustomization"
        );
        found[0]
    }
}

/// Everything the checks need, resolved from the manifests.
struct K8s {
    deployment: Value,
    service: Value,
    configmap: Value,
    /// `config.toml` from the ConfigMap, parsed.
    config: toml::Table,
    config_text: String,
}

impl K8s {
    fn load() -> K8s {
        let k = Kustomize::load();
        let deployment = k.one("Deployment").clone();
        let service = k.one("Service").clone();
        let configmap = k.one("ConfigMap").clone();
        let config_text = configmap["data"]["config.toml"]
            .as_str()
            .expect("ConfigMap data has config.toml")
            .to_string();
        let config: toml::Table = toml::from_str(&config_text)
            .unwrap_or_else(|e| panic!("ConfigMap config.toml is not TOML: {e}"));
        K8s {
            deployment,
            service,
            configmap,
            config,
            config_text,
        }
    }

    fn pod_spec(&self) -> &Value {
        &self.deployment["spec"]["template"]["spec"]
    }

    fn container(&self, name: &str) -> &Value {
        self.pod_spec()["containers"]
            .as_array()
            .expect("containers")
            .iter()
            .find(|c| c["name"] == name)
            .unwrap_or_else(|| panic!("no container named {name:?} in deployment.yaml"))
    }

    fn gateway(&self) -> &Value {
        self.container(GATEWAY_CONTAINER)
    }

    /// A config value as a string, e.g. `cfg_str("server", "listen")`.
    fn cfg_str(&self, section: &str, key: &str) -> &str {
        self.config
            .get(section)
            .and_then(|s| s.get(key))
            .and_then(|v| v.as_str())
            .unwrap_or_else(|| panic!("ConfigMap config.toml lacks [{section}] {key}"))
    }

    /// A config integer, or the gateway's documented default when absent.
    fn cfg_u64(&self, section: &str, key: &str, default: u64) -> u64 {
        match self.config.get(section).and_then(|s| s.get(key)) {
            Some(v) => v
                .as_integer()
                .and_then(|i| u64::try_from(i).ok())
                .unwrap_or_else(|| panic!("[{section}] {key} is not a non-negative integer")),
            None => default,
        }
    }

    /// The volume named by a mount, and that mount, for the gateway container.
    fn gateway_mounts(&self) -> Vec<(&Value, &Value)> {
        let volumes = self.pod_spec()["volumes"].as_array().expect("volumes");
        self.gateway()["volumeMounts"]
            .as_array()
            .expect("gateway volumeMounts")
            .iter()
            .map(|m| {
                let v = volumes
                    .iter()
                    .find(|v| v["name"] == m["name"])
                    .unwrap_or_else(|| panic!("volumeMount {} has no volume", m["name"]));
                (m, v)
            })
            .collect()
    }
}

/// `containerPort` by port name, for one container.
fn named_ports(container: &Value) -> BTreeMap<String, u16> {
    container["ports"]
        .as_array()
        .unwrap_or_else(|| panic!("container {} declares no ports", container["name"]))
        .iter()
        .map(|p| {
            let name = p["name"].as_str().unwrap_or_default().to_string();
            let port = p["containerPort"].as_u64().expect("containerPort") as u16;
            (name, port)
        })
        .collect()
}

/// A probe/Service port (number or port name) resolved against `container`'s ports, as the
/// kubelet and the endpoints controller do.
fn resolve_port(container: &Value, port: &Value) -> u16 {
    match port {
        Value::Number(n) => n.as_u64().expect("port number") as u16,
        Value::String(name) => *named_ports(container)
            .get(name)
            .unwrap_or_else(|| panic!("port name {name:?} is not a port of {}", container["name"])),
        other => panic!("unexpected port value {other}"),
    }
}

fn socket_addr(s: &str, what: &str) -> SocketAddr {
    s.parse()
        .unwrap_or_else(|e| panic!("{what} = {s:?} is not ip:port: {e}"))
}

/// The argv a container runs: its `command` or else the image ENTRYPOINT (deploy/Dockerfile),
/// followed by `args`. Kubernetes `args` replace CMD only, so they append to ENTRYPOINT.
fn container_argv(container: &Value) -> Vec<String> {
    let strings = |v: &Value| -> Vec<String> {
        v.as_array()
            .map(|a| a.iter().map(|s| s.as_str().unwrap().to_string()).collect())
            .unwrap_or_default()
    };
    let mut argv = match container.get("command") {
        Some(c) => strings(c),
        None => dockerfile_entrypoint(),
    };
    argv.extend(strings(&container["args"]));
    argv
}

/// The value after `--config` (or `--config=`), or the CLI default `config.toml`.
fn config_flag(argv: &[String]) -> String {
    let mut it = argv.iter();
    while let Some(a) = it.next() {
        if a == "--config" {
            return it.next().expect("--config needs a value").clone();
        }
        if let Some(v) = a.strip_prefix("--config=") {
            return v.to_string();
        }
    }
    "config.toml".to_string()
}

/// The exec-form ENTRYPOINT of the Dockerfile's final stage.
fn dockerfile_entrypoint() -> Vec<String> {
    let text = read("deploy/Dockerfile");
    let line = final_stage(&text)
        .lines()
        .rev()
        .find_map(|l| l.trim().strip_prefix("ENTRYPOINT "))
        .expect("Dockerfile final stage has an ENTRYPOINT");
    serde_json::from_str(line.trim()).unwrap_or_else(|e| {
        panic!("ENTRYPOINT must be the exec (JSON) form, so signals reach the gateway: {e}")
    })
}

/// The Dockerfile text from the last `FROM` on (the runtime stage).
fn final_stage(dockerfile: &str) -> &str {
    let start = dockerfile
        .match_indices("\nFROM ")
        .last()
        .map(|(i, _)| i + 1)
        .expect("Dockerfile has a FROM");
    &dockerfile[start..]
}

/// `config_text` with `tls.cert`/`tls.key` pointing at `pki`'s files, written to a tempdir.
/// The shipped configs name the production paths (a Secret mount, /etc), which do not exist
/// here; everything else is checked exactly as shipped.
fn with_test_certs(config_text: &str, pki: &TestPki) -> (tempfile::TempDir, PathBuf) {
    let mut config: toml::Table = toml::from_str(config_text).expect("config is TOML");
    let tls = config
        .get_mut("tls")
        .and_then(|t| t.as_table_mut())
        .expect("config has a [tls] table");
    assert!(
        tls.get("self_signed").and_then(|v| v.as_bool()) != Some(true),
        "a deployment config must not use tls.self_signed"
    );
    tls.insert(
        "cert".into(),
        toml::Value::String(pki.cert_path.to_string_lossy().into_owned()),
    );
    tls.insert(
        "key".into(),
        toml::Value::String(pki.key_path.to_string_lossy().into_owned()),
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("config.toml");
    std::fs::write(&path, toml::to_string(&config).expect("serialize")).expect("write config");
    (dir, path)
}

/// Runs `onramp-gateway check` on `config_text` (test certificates, a test CDP key in the
/// environment as the Secret would provide it) and asserts it passes.
fn assert_check_passes(what: &str, config_text: &str) -> String {
    let pki = TestPki::new(KeyFormat::Pkcs8Ecdsa);
    let (_dir, path) = with_test_certs(config_text, &pki);
    let mut env = TestKey::es256_sec1().env();
    env.push((
        "ONRAMP_TICKET_SECRET".into(),
        "deploy-test-ticket-secret-0123456789abcdef".into(),
    ));
    let out = run_check(&path, &env);
    // A shipped config must not let the browser choose the wallet.
    let parsed: toml::Value = toml::from_str(config_text).expect("shipped config is TOML");
    let source = parsed
        .get("addresses")
        .and_then(|a| a.get("source"))
        .and_then(|s| s.as_str())
        .unwrap_or("request");
    assert!(
        source == "upstream" || source == "ticket",
        "{what} ships addresses.source = {source:?}"
    );
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "`onramp-gateway check` refused {what}: {}\n--- stdout ---\n{stdout}\n--- stderr ---\n{stderr}",
        out.status
    );
    assert!(
        stdout.lines().any(|l| l == "ok"),
        "{what}: no `ok` line:\n{stdout}"
    );
    stdout
}

#[test]
fn configmap_config_passes_check() {
    let k8s = K8s::load();
    let stdout = assert_check_passes("the ConfigMap's config.toml", &k8s.config_text);
    assert!(
        stdout.contains("listen:         https://0.0.0.0:8443"),
        "{stdout}"
    );
    assert!(stdout.contains("cdp key:        "), "{stdout}");
    let cm_name = k8s.configmap["metadata"]["name"].as_str().unwrap();
    assert!(!cm_name.is_empty());
}

#[test]
fn gateway_ports_and_probes_match_the_config() {
    let k8s = K8s::load();
    let gw = k8s.gateway();
    let ports = named_ports(gw);

    let listen = socket_addr(k8s.cfg_str("server", "listen"), "server.listen");
    let admin = socket_addr(k8s.cfg_str("admin", "listen"), "admin.listen");
    // Loopback would be unreachable from the Service (https) and the kubelet (admin).
    assert!(
        listen.ip().is_unspecified(),
        "server.listen must bind the pod IP: {listen}"
    );
    assert!(
        admin.ip().is_unspecified(),
        "admin.listen must bind the pod IP: {admin}"
    );
    assert_eq!(
        ports.get("https"),
        Some(&listen.port()),
        "https containerPort vs server.listen"
    );
    assert_eq!(
        ports.get("admin"),
        Some(&admin.port()),
        "admin containerPort vs admin.listen"
    );
    assert_eq!(
        ports.len(),
        2,
        "gateway declares exactly https and admin: {ports:?}"
    );

    for (probe, path) in [("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")] {
        let get = &gw[probe]["httpGet"];
        assert_eq!(get["path"], path, "{probe} path");
        assert_eq!(
            resolve_port(gw, &get["port"]),
            admin.port(),
            "{probe} must target the admin listener"
        );
        assert_ne!(get["scheme"], "HTTPS", "the admin listener is plain HTTP");
    }
}

#[test]
fn tls_secret_is_mounted_as_a_directory_where_the_config_looks() {
    let k8s = K8s::load();
    let cert = PathBuf::from(k8s.cfg_str("tls", "cert"));
    let key = PathBuf::from(k8s.cfg_str("tls", "key"));
    assert!(
        cert.is_absolute() && key.is_absolute(),
        "absolute tls paths in the ConfigMap"
    );
    let dir = cert.parent().unwrap();
    assert_eq!(
        key.parent().unwrap(),
        dir,
        "tls.cert and tls.key in one Secret mount"
    );
    // The key names of a kubernetes.io/tls Secret.
    assert_eq!(cert.file_name().unwrap(), "tls.crt");
    assert_eq!(key.file_name().unwrap(), "tls.key");

    let secret_mounts: Vec<_> = k8s
        .gateway_mounts()
        .into_iter()
        .filter(|(_, v)| v.get("secret").is_some())
        .collect();
    assert_eq!(secret_mounts.len(), 1, "one Secret volume (the TLS pair)");
    let (mount, volume) = secret_mounts[0];
    assert_eq!(
        Path::new(mount["mountPath"].as_str().unwrap()),
        dir,
        "TLS Secret mountPath vs the directory of tls.cert/tls.key"
    );
    assert!(
        mount.get("subPath").is_none() && mount.get("subPathExpr").is_none(),
        "the TLS Secret must not use subPath: subPath mounts never see the kubelet's \
         ..data symlink swap, so a rotated certificate would never reach the gateway"
    );
    assert!(
        volume["secret"].get("items").is_none(),
        "items would rename the tls.crt/tls.key files the config names"
    );
    let secret_name = volume["secret"]["secretName"].as_str().unwrap();
    let example = example_secret(secret_name);
    assert_eq!(example["type"], "kubernetes.io/tls", "{secret_name} type");
}

#[test]
fn configmap_is_mounted_at_the_config_path_the_image_runs_with() {
    let k8s = K8s::load();
    let gw = k8s.gateway();
    let config_path = config_flag(&container_argv(gw));
    let cm_name = k8s.configmap["metadata"]["name"].as_str().unwrap();
    let (mount, volume) = k8s
        .gateway_mounts()
        .into_iter()
        .find(|(_, v)| v["configMap"]["name"] == cm_name)
        .unwrap_or_else(|| panic!("ConfigMap {cm_name} is not mounted in the gateway"));
    assert_eq!(
        mount["mountPath"],
        config_path.as_str(),
        "ConfigMap mountPath vs --config"
    );
    // A single-file mount: the subPath must name the data key holding the config.
    let sub = mount["subPath"]
        .as_str()
        .expect("config mounted via subPath");
    assert!(
        k8s.configmap["data"].get(sub).is_some(),
        "subPath {sub:?} is not a key of the ConfigMap"
    );
    assert!(volume["configMap"].get("items").is_none());
}

#[test]
fn service_exposes_only_the_https_port() {
    let k8s = K8s::load();
    let gw = k8s.gateway();
    let https = named_ports(gw)["https"];
    let admin = named_ports(gw)["admin"];
    let app = named_ports(k8s.container(APP_CONTAINER));

    let ports = k8s.service["spec"]["ports"]
        .as_array()
        .expect("Service ports");
    assert_eq!(ports.len(), 1, "the Service exposes HTTPS only: {ports:?}");
    let p = &ports[0];
    assert_eq!(p["port"], 443);
    let target = resolve_port(gw, &p["targetPort"]);
    assert_eq!(
        target, https,
        "Service targetPort must be the gateway's https port"
    );
    assert_ne!(target, admin);
    assert!(
        !app.values().any(|&a| a == target),
        "Service must not target the app port"
    );

    // The selector must pick this Deployment's pods.
    let labels = &k8s.deployment["spec"]["template"]["metadata"]["labels"];
    for (k, v) in k8s.service["spec"]["selector"]
        .as_object()
        .expect("selector")
    {
        assert_eq!(&labels[k], v, "Service selector {k} vs pod labels");
    }
}

#[test]
fn cdp_key_comes_from_a_secret() {
    let k8s = K8s::load();
    let env = k8s.gateway()["env"].as_array().expect("gateway env");
    for name in ["CDP_API_KEY_ID", "CDP_API_KEY_SECRET"] {
        let var = env
            .iter()
            .find(|e| e["name"] == name)
            .unwrap_or_else(|| panic!("gateway env lacks {name}"));
        assert!(
            var.get("value").is_none(),
            "{name} must not be a literal in the manifest"
        );
        let r = &var["valueFrom"]["secretKeyRef"];
        let (secret, key) = (r["name"].as_str(), r["key"].as_str());
        let (Some(secret), Some(key)) = (secret, key) else {
            panic!("{name} must come from valueFrom.secretKeyRef: {var}");
        };
        // The example Secret documents exactly the keys the Deployment reads.
        let example = example_secret(secret);
        assert!(
            example["stringData"].get(key).is_some() || example["data"].get(key).is_some(),
            "secret.example.yaml {secret} lacks key {key}"
        );
    }
    // And the key is not put in the config either (it would land in a ConfigMap).
    let cdp = k8s.config.get("cdp").and_then(|c| c.as_table());
    let key_file = cdp.and_then(|c| c.get("key_file")).and_then(|v| v.as_str());
    assert!(
        key_file.unwrap_or("").is_empty(),
        "use the env Secret, not cdp.key_file"
    );
}

#[test]
fn gateway_runs_locked_down() {
    let k8s = K8s::load();
    let pod = &k8s.pod_spec()["securityContext"];
    let sc = &k8s.gateway()["securityContext"];
    // Container-level settings override pod-level ones; either may carry them.
    let effective = |key: &str| sc.get(key).or_else(|| pod.get(key)).cloned();
    assert_eq!(
        effective("runAsNonRoot"),
        Some(Value::Bool(true)),
        "runAsNonRoot"
    );
    assert_eq!(sc["readOnlyRootFilesystem"], true, "readOnlyRootFilesystem");
    assert_eq!(
        sc["allowPrivilegeEscalation"], false,
        "allowPrivilegeEscalation"
    );
    assert_eq!(
        sc["capabilities"]["drop"],
        serde_json::json!(["ALL"]),
        "drop ALL"
    );
    assert!(
        sc["capabilities"].get("add").is_none(),
        "8443/9901 need no capability"
    );
    assert_eq!(
        effective("seccompProfile").map(|s| s["type"].clone()),
        Some(Value::from("RuntimeDefault"))
    );
    // A numeric non-root user, so runAsNonRoot can be verified by the kubelet.
    let uid = effective("runAsUser").and_then(|u| u.as_u64());
    assert!(
        matches!(uid, Some(u) if u != 0),
        "numeric non-root runAsUser: {uid:?}"
    );
    let res = &k8s.gateway()["resources"];
    for k in ["requests", "limits"] {
        assert!(res[k]["memory"].is_string(), "gateway resources.{k}.memory");
    }
}

#[test]
fn termination_grace_covers_the_shutdown_delay_and_drain() {
    let k8s = K8s::load();
    let delay = k8s.cfg_u64("server", "shutdown_delay_ms", 0);
    let grace = k8s.cfg_u64("server", "shutdown_grace_ms", 30_000);
    assert!(
        delay >= 1000,
        "behind a Service, shutdown_delay_ms should let endpoints be withdrawn"
    );
    let tgps = k8s.pod_spec()["terminationGracePeriodSeconds"]
        .as_u64()
        .expect("terminationGracePeriodSeconds set (the default 30 s is too short)");
    assert!(
        tgps * 1000 > delay + grace,
        "terminationGracePeriodSeconds {tgps} s must exceed shutdown_delay_ms {delay} + \
         shutdown_grace_ms {grace}, or the kubelet SIGKILLs the drain"
    );
    // The gateway image has no shell: a preStop exec hook would fail.
    let gw_hook = &k8s.gateway()["lifecycle"]["preStop"];
    assert!(
        gw_hook.get("exec").is_none(),
        "distroless has no shell/sleep for preStop exec"
    );
}

#[test]
fn upstream_is_the_app_container() {
    let k8s = K8s::load();
    let upstream = url::Url::parse(k8s.cfg_str("upstream", "url")).expect("upstream.url");
    assert_eq!(upstream.scheme(), "http");
    assert_eq!(
        upstream.host_str(),
        Some("127.0.0.1"),
        "the app is in the same pod: loopback"
    );
    let app = named_ports(k8s.container(APP_CONTAINER));
    assert!(
        app.values()
            .any(|&p| Some(p) == upstream.port_or_known_default()),
        "upstream.url port vs the app container's ports {app:?}"
    );
}

#[test]
fn dockerfile_matches_the_manifests() {
    let text = read("deploy/Dockerfile");
    let runtime = final_stage(&text);
    assert!(
        text.contains("cargo build --release --locked"),
        "reproducible build from Cargo.lock"
    );
    let user = runtime
        .lines()
        .find_map(|l| l.trim().strip_prefix("USER "))
        .expect("runtime stage sets USER");
    let uid = user.split(':').next().unwrap().trim();
    assert!(
        uid.parse::<u32>().is_ok_and(|u| u != 0),
        "USER must be a numeric non-root uid (runAsNonRoot cannot verify a name): {user}"
    );
    let exposed: Vec<u16> = runtime
        .lines()
        .filter_map(|l| l.trim().strip_prefix("EXPOSE "))
        .flat_map(|l| {
            l.split_whitespace()
                .map(|p| p.parse::<u16>().expect("EXPOSE port"))
        })
        .collect();
    let k8s = K8s::load();
    let ports = named_ports(k8s.gateway());
    let mut declared: Vec<u16> = ports.values().copied().collect();
    declared.sort_unstable();
    let mut exposed_sorted = exposed.clone();
    exposed_sorted.sort_unstable();
    assert_eq!(
        exposed_sorted, declared,
        "EXPOSE vs the gateway's containerPorts"
    );
    let entry = dockerfile_entrypoint();
    assert_eq!(entry.first().map(String::as_str), Some("/onramp-gateway"));

    let ignore = read(".dockerignore");
    for must in ["target/", ".venv/", ".git/"] {
        assert!(
            ignore.lines().any(|l| l.trim() == must),
            ".dockerignore lacks {must}"
        );
    }
}

/// A Secret from secret.example.yaml by name.
fn example_secret(name: &str) -> Value {
    let docs = yaml_docs("deploy/kubernetes/secret.example.yaml");
    docs.into_iter()
        .find(|d| d["kind"] == "Secret" && d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("secret.example.yaml documents no Secret {name:?}"))
}

// ------------------------------------------------------------------------------------------
// systemd
// ------------------------------------------------------------------------------------------

/// `Key=value` lines of a unit file (comments dropped); a key may repeat.
fn unit_entries(text: &str) -> Vec<(String, String)> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#') && !l.starts_with(';'))
        .filter(|l| !l.starts_with('['))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect()
}

fn unit_value<'a>(entries: &'a [(String, String)], key: &str) -> Option<&'a str> {
    entries
        .iter()
        .rev()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
}

/// systemd time span (`45s`, `1min 30s`, `90`) in seconds.
fn systemd_seconds(span: &str) -> u64 {
    let mut total = 0;
    for part in span.split_whitespace() {
        let digits: String = part.chars().take_while(char::is_ascii_digit).collect();
        let unit = &part[digits.len()..];
        let n: u64 = digits
            .parse()
            .unwrap_or_else(|_| panic!("time span {span:?}"));
        total += match unit {
            "" | "s" | "sec" => n,
            "min" | "m" => n * 60,
            other => panic!("unexpected systemd time unit {other:?} in {span:?}"),
        };
    }
    total
}

#[test]
fn systemd_unit_runs_the_example_config_and_it_passes_check() {
    let unit = read("deploy/systemd/onramp-gateway.service");
    let entries = unit_entries(&unit);
    let exec: Vec<String> = unit_value(&entries, "ExecStart")
        .expect("ExecStart")
        .split_whitespace()
        .map(str::to_string)
        .collect();
    assert!(
        exec[0].ends_with("/onramp-gateway"),
        "ExecStart runs the gateway: {exec:?}"
    );
    let config_path = config_flag(&exec);
    let file_name = Path::new(&config_path)
        .file_name()
        .unwrap()
        .to_str()
        .unwrap();
    let example = format!("deploy/systemd/{file_name}");
    assert!(
        repo_path(&example).is_file(),
        "ExecStart's {config_path} has no example at {example}"
    );
    let text = read(&example);
    assert_check_passes(&example, &text);

    let config: toml::Table = toml::from_str(&text).unwrap();
    let server = config.get("server").and_then(|s| s.as_table());
    let num = |k: &str, d: i64| {
        server
            .and_then(|s| s.get(k))
            .and_then(|v| v.as_integer())
            .unwrap_or(d) as u64
    };
    let (delay, grace) = (
        num("shutdown_delay_ms", 0),
        num("shutdown_grace_ms", 30_000),
    );
    let stop = systemd_seconds(unit_value(&entries, "TimeoutStopSec").expect("TimeoutStopSec"));
    assert!(
        stop * 1000 > delay + grace,
        "TimeoutStopSec {stop} s must exceed shutdown_delay_ms + shutdown_grace_ms"
    );

    assert_eq!(unit_value(&entries, "KillSignal"), Some("SIGTERM"));
    assert!(unit_value(&entries, "ExecReload").is_some_and(|r| r.contains("-HUP $MAINPID")));
    assert!(
        unit_value(&entries, "EnvironmentFile").is_some(),
        "CDP key from an env file"
    );
    assert_eq!(unit_value(&entries, "NoNewPrivileges"), Some("yes"));
    assert_eq!(unit_value(&entries, "ProtectSystem"), Some("strict"));

    // A privileged port needs CAP_NET_BIND_SERVICE; otherwise the unit keeps no capability.
    let listen = config
        .get("server")
        .and_then(|s| s.get("listen"))
        .and_then(|v| v.as_str())
        .unwrap_or("0.0.0.0:8443");
    let port = socket_addr(listen, "server.listen").port();
    let ambient = unit_value(&entries, "AmbientCapabilities").unwrap_or("");
    if port < 1024 {
        assert!(
            ambient.contains("CAP_NET_BIND_SERVICE"),
            "port {port} needs the capability"
        );
    } else {
        assert!(
            ambient.is_empty(),
            "port {port} needs no capability: {ambient}"
        );
        assert_eq!(unit_value(&entries, "CapabilityBoundingSet"), Some(""));
    }
}

/// The NetworkPolicy admits HTTPS from anywhere, the admin port only from listed sources,
/// and nothing else (so the app port is closed to the cluster), for the gateway's pods.
#[test]
fn network_policy_admits_https_from_anywhere_and_admin_only_from_node_and_prometheus() {
    let k = Kustomize::load();
    let policy = k.one("NetworkPolicy").clone();
    let k8s = K8s::load();
    let gw = k8s.gateway();
    let https = named_ports(gw)["https"];
    let admin = named_ports(gw)["admin"];

    let labels = &k8s.deployment["spec"]["template"]["metadata"]["labels"];
    for (key, v) in policy["spec"]["podSelector"]["matchLabels"]
        .as_object()
        .expect("podSelector.matchLabels")
    {
        assert_eq!(
            &labels[key], v,
            "NetworkPolicy selector {key} vs pod labels"
        );
    }
    let types = policy["spec"]["policyTypes"]
        .as_array()
        .expect("policyTypes");
    assert!(types.iter().any(|t| t == "Ingress"), "{types:?}");

    let rules = policy["spec"]["ingress"].as_array().expect("ingress rules");
    let mut https_from_anywhere = false;
    let mut admin_rules = 0;
    for rule in rules {
        let ports: Vec<u16> = rule["ports"]
            .as_array()
            .expect("every rule names its ports (a rule without ports admits all)")
            .iter()
            .map(|p| resolve_port(gw, &p["port"]))
            .collect();
        let anywhere = rule.get("from").is_none_or(|f| f.is_null());
        for port in &ports {
            assert!(
                *port == https || *port == admin,
                "the policy admits port {port}, which is neither https nor admin"
            );
        }
        if ports.contains(&admin) {
            admin_rules += 1;
            assert!(!anywhere, "the admin port must not be open to everyone");
            let from = rule["from"].as_array().expect("admin rule sources");
            assert!(
                from.iter().any(|f| f.get("ipBlock").is_some()),
                "admin: the nodes (kubelet probes) must be admitted: {from:?}"
            );
            assert!(
                from.iter().any(|f| f.get("podSelector").is_some()),
                "admin: Prometheus must be admitted: {from:?}"
            );
            for f in from {
                if let Some(cidr) = f["ipBlock"]["cidr"].as_str() {
                    assert!(
                        !cidr.ends_with("/0"),
                        "admin must not be admitted from {cidr}"
                    );
                }
            }
        }
        if ports.contains(&https) && anywhere {
            https_from_anywhere = true;
        }
    }
    assert!(https_from_anywhere, "HTTPS must be admitted from anywhere");
    assert_eq!(admin_rules, 1);
}

/// `server.max_connections` fits the gateway container's memory limit at the worst
/// per-connection cost stated in README.md (56 KiB), with half the limit left over.
#[test]
fn max_connections_fits_the_memory_limit() {
    let k8s = K8s::load();
    let limit = k8s.gateway()["resources"]["limits"]["memory"]
        .as_str()
        .expect("gateway memory limit");
    let bytes: u64 = if let Some(mi) = limit.strip_suffix("Mi") {
        mi.parse::<u64>().unwrap() << 20
    } else if let Some(gi) = limit.strip_suffix("Gi") {
        gi.parse::<u64>().unwrap() << 30
    } else {
        panic!("unexpected memory limit {limit}")
    };
    let max = k8s.cfg_u64("server", "max_connections", 10_000);
    assert!(
        max * 56 * 1024 <= bytes / 2,
        "max_connections = {max} x 56 KiB exceeds half of the {limit} memory limit"
    );
    let per_ip = k8s.cfg_u64("server", "max_connections_per_ip", 0);
    assert!(
        per_ip > 0 && per_ip < max,
        "one IP must not take every slot"
    );
}
