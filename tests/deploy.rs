//! The deployment files are valid for what reads them, wired together, and
//! start: Kubernetes manifests against the API's JSON schemas (kubeconform
//! -strict, raw and rendered by kustomize), docker-compose.yml through the
//! Compose Specification's loader (compose-go), deploy/Dockerfile through
//! BuildKit's parser and `docker build --check` rules, prometheus.yml
//! through promtool, Grafana's provisioning by its fields. Each checker is
//! also shown rejecting a broken file, so a pass means something. The
//! Kubernetes config and the compose environment are started for real in
//! Kafka mode against the test Kafka and Redis, and the pod's memory request
//! is checked against a baseline RSS measured here.
//!
//! Tools: `eval "$(scripts/tools.sh)"` (scripts/test.sh does it); promtool
//! and the services: `scripts/services.sh up`.

mod common;

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::services::{create_topics, kafka, redis, unique};
use common::Server;
use quotaflow::settings::Settings;
use serde_json::Value;

/// Kubernetes versions the manifests are validated against: the oldest and
/// newest that scripts/tools.sh extracts (K8S_VERSIONS there).
const K8S_VERSIONS: [&str; 2] = ["1.25.0", "1.37.0"];

/// docs/benchmarks.md, "memory per key": 112.7 B/key at 1M keys.
const BYTES_PER_KEY: u64 = 113;

const TOOLS_HINT: &str = "run `eval \"$(scripts/tools.sh)\"` first (scripts/test.sh does)";

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn run(cmd: &mut Command) -> Output {
    let name = format!("{:?}", cmd.get_program());
    cmd.output()
        .unwrap_or_else(|e| panic!("cannot run {name} ({e}); {TOOLS_HINT}"))
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn run_ok(cmd: &mut Command) -> Output {
    let shown = format!("{cmd:?}");
    let out = run(cmd);
    assert!(out.status.success(), "{shown} failed:\n{}", text(&out));
    out
}

fn with_stdin(cmd: &mut Command, input: &str) -> Output {
    let shown = format!("{cmd:?}");
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {shown} ({e}); {TOOLS_HINT}"));
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(input.as_bytes())
        .expect("write stdin");
    child.wait_with_output().expect("wait")
}

/// Every YAML document of a file, as JSON.
fn yaml_file(path: &Path) -> Vec<Value> {
    yaml_docs(
        &run(Command::new("yaml2json").arg(path)),
        &path.display().to_string(),
    )
}

/// Every YAML document of `text`, as JSON.
fn yaml_text(text: &str) -> Vec<Value> {
    yaml_docs(
        &with_stdin(Command::new("yaml2json").arg("-"), text),
        "stdin",
    )
}

fn yaml_docs(out: &Output, what: &str) -> Vec<Value> {
    assert!(out.status.success(), "yaml2json {what}:\n{}", text(out));
    match serde_json::from_slice(&out.stdout).expect("yaml2json prints JSON") {
        Value::Array(docs) => docs,
        other => panic!("yaml2json printed {other}"),
    }
}

fn schemas() -> String {
    std::env::var("QUOTAFLOW_K8S_SCHEMAS")
        .unwrap_or_else(|_| panic!("QUOTAFLOW_K8S_SCHEMAS is unset; {TOOLS_HINT}"))
}

/// kubeconform -strict against the local schemas for `version`; `-` reads stdin.
fn kubeconform(version: &str, args: &[&str], stdin: Option<&str>) -> (bool, String) {
    let location = format!(
        "{}/{{{{ .NormalizedKubernetesVersion }}}}-local{{{{ .StrictSuffix }}}}/{{{{ .ResourceKind }}}}{{{{ .KindSuffix }}}}.json",
        schemas()
    );
    let mut cmd = Command::new("kubeconform");
    cmd.args(["-strict", "-summary", "-kubernetes-version", version])
        .args(["-schema-location", &location])
        .args(args)
        .current_dir(repo());
    let out = match stdin {
        Some(i) => with_stdin(&mut cmd, i),
        None => run(&mut cmd),
    };
    (out.status.success(), text(&out))
}

fn kustomize_build() -> String {
    let out = run_ok(
        Command::new("kustomize")
            .args(["build", "deploy/kubernetes"])
            .current_dir(repo()),
    );
    String::from_utf8(out.stdout).expect("utf-8")
}

fn kind<'a>(docs: &'a [Value], kind: &str) -> &'a Value {
    let found: Vec<&Value> = docs.iter().filter(|d| d["kind"] == kind).collect();
    assert_eq!(found.len(), 1, "expected one {kind}, found {}", found.len());
    found[0]
}

/// Bytes of a Kubernetes memory quantity (`160Mi`, `1Gi`, `512M`, `1000`).
fn quantity(q: &str) -> u64 {
    let units = [
        ("Ki", 1u64 << 10),
        ("Mi", 1 << 20),
        ("Gi", 1 << 30),
        ("k", 1_000),
        ("M", 1_000_000),
        ("G", 1_000_000_000),
    ];
    for (suffix, factor) in units {
        if let Some(n) = q.strip_suffix(suffix) {
            return n.parse::<u64>().expect("quantity") * factor;
        }
    }
    q.parse().expect("quantity")
}

fn str_of<'a>(v: &'a Value, what: &str) -> &'a str {
    v.as_str()
        .unwrap_or_else(|| panic!("{what}: expected a string, got {v}"))
}

/// An image reference pinned to a tag or digest other than `latest`.
fn assert_pinned(image: &str, whose: &str) {
    let (name, tag) = match image.rsplit_once('@') {
        Some(_) => return,
        None => match image.rsplit_once(':') {
            Some((n, t)) if !t.contains('/') => (n, t),
            _ => panic!("{whose}: image {image} has no tag"),
        },
    };
    assert!(
        !name.is_empty() && tag != "latest",
        "{whose}: image {image}"
    );
}

// ---------------------------------------------------------------- Kubernetes

#[test]
fn kubernetes_manifests_validate_against_the_api_schemas() {
    let rendered = kustomize_build();
    for version in K8S_VERSIONS {
        let (ok, out) = kubeconform(
            version,
            &[
                "-ignore-filename-pattern",
                "kustomization\\.yaml",
                "deploy/kubernetes",
            ],
            None,
        );
        assert!(ok, "kubeconform {version}, deploy/kubernetes:\n{out}");
        assert!(
            out.contains("Valid: 5, Invalid: 0, Errors: 0, Skipped: 0"),
            "{version}: {out}"
        );
        // What `kubectl apply -k` sends: the same plus the generated ConfigMap.
        let (ok, out) = kubeconform(version, &["-"], Some(&rendered));
        assert!(ok, "kubeconform {version}, kustomize build:\n{out}");
        assert!(
            out.contains("Valid: 6, Invalid: 0, Errors: 0, Skipped: 0"),
            "{version}: {out}"
        );
    }
}

#[test]
fn kubeconform_rejects_broken_manifests() {
    // Three defects the API server would refuse: an unknown field, a wrong
    // type, a required field missing.
    let broken = r#"
apiVersion: apps/v1
kind: Deployment
metadata: {name: unknown-field}
spec:
  selector: {matchLabels: {app: x}}
  template:
    metadata: {labels: {app: x}}
    spec:
      containers: [{name: x, image: "x:1", livenessProbe: {httpGet: {path: /healthz, port: 8080}, periodSecond: 10}}]
---
apiVersion: v1
kind: Service
metadata: {name: wrong-type}
spec:
  ports: [{port: "eighty"}]
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: no-selector}
spec:
  template:
    metadata: {labels: {app: x}}
    spec:
      containers: [{name: x, image: "x:1"}]
"#;
    for version in K8S_VERSIONS {
        let (ok, out) = kubeconform(version, &["-"], Some(broken));
        assert!(
            !ok,
            "kubeconform {version} accepted broken manifests:\n{out}"
        );
        assert!(out.contains("periodSecond"), "{out}");
        assert!(out.contains("/spec/ports/0/port"), "{out}");
        assert!(out.contains("selector"), "{out}");
        assert!(out.contains("Invalid: 3"), "{version}: {out}");
    }
}

#[test]
fn kubernetes_deployment_is_probed_hardened_and_wired() {
    let docs = yaml_text(&kustomize_build());
    let kinds: BTreeSet<&str> = docs.iter().map(|d| str_of(&d["kind"], "kind")).collect();
    let want = [
        "ConfigMap",
        "Deployment",
        "HorizontalPodAutoscaler",
        "PodDisruptionBudget",
        "Secret",
        "Service",
    ];
    assert_eq!(kinds, want.into_iter().collect());

    let deploy = kind(&docs, "Deployment");
    let pod = &deploy["spec"]["template"];
    let labels = &pod["metadata"]["labels"];
    assert_eq!(
        &deploy["spec"]["selector"]["matchLabels"]["app.kubernetes.io/name"],
        &labels["app.kubernetes.io/name"]
    );
    assert!(
        deploy["spec"].get("replicas").is_none(),
        "replicas belong to the HPA"
    );
    let spec = &pod["spec"];
    let containers = spec["containers"].as_array().expect("containers");
    assert_eq!(containers.len(), 1);
    let c = &containers[0];
    assert_pinned(str_of(&c["image"], "image"), "Deployment");

    // Probes on the sidecar's port.
    let port = &c["ports"][0];
    assert_eq!(port["name"], "http");
    assert_eq!(port["containerPort"], 8080);
    assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(c["livenessProbe"]["httpGet"]["port"], "http");
    assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert_eq!(c["readinessProbe"]["httpGet"]["port"], "http");

    // Non-root, read-only, nothing extra.
    assert_eq!(spec["securityContext"]["runAsNonRoot"], true);
    assert!(spec["securityContext"]["runAsUser"].as_u64().unwrap_or(0) > 0);
    assert_eq!(c["securityContext"]["readOnlyRootFilesystem"], true);
    assert_eq!(c["securityContext"]["allowPrivilegeEscalation"], false);
    assert_eq!(c["securityContext"]["capabilities"]["drop"][0], "ALL");

    // The config comes from the generated ConfigMap, holding the checked file.
    let configmap = kind(&docs, "ConfigMap");
    let cm_name = str_of(&configmap["metadata"]["name"], "ConfigMap name");
    assert!(
        cm_name.starts_with("quotaflow-config-"),
        "{cm_name}: no content hash"
    );
    assert_eq!(spec["volumes"][0]["configMap"]["name"], cm_name);
    let mount = str_of(&c["volumeMounts"][0]["mountPath"], "mountPath");
    let args: Vec<&str> = c["args"]
        .as_array()
        .expect("args")
        .iter()
        .map(|a| str_of(a, "arg"))
        .collect();
    assert_eq!(
        args,
        ["serve", "--config", &format!("{mount}/quotaflow.toml")]
    );
    let toml_path = repo().join("deploy/kubernetes/quotaflow.toml");
    let file = std::fs::read_to_string(&toml_path).expect("quotaflow.toml");
    assert_eq!(configmap["data"]["quotaflow.toml"], file.as_str());

    // Secrets by environment: the admin token (docs/security.md) and the
    // fingerprint key Kafka mode needs.
    let secret = kind(&docs, "Secret");
    let secret_name = &secret["metadata"]["name"];
    for (var, key) in [
        ("QUOTAFLOW_ADMIN_TOKEN", "admin-token"),
        ("QUOTAFLOW__SECURITY__FINGERPRINT_KEY", "fingerprint-key"),
    ] {
        let env = c["env"]
            .as_array()
            .expect("env")
            .iter()
            .find(|e| e["name"] == var)
            .unwrap_or_else(|| panic!("no {var} in the container's env"));
        let by = &env["valueFrom"]["secretKeyRef"];
        assert_eq!(&by["name"], secret_name, "{var}");
        assert_eq!(by["key"], key, "{var}");
        assert!(
            secret["stringData"].get(key).is_some(),
            "Secret lacks {key}"
        );
        assert!(
            by.get("optional").is_none_or(|o| o == false),
            "{var} must be required"
        );
    }

    // Shutdown fits in the grace period (docs/configuration.md, shutdown_grace).
    let settings = Settings::load_with_env(Some(&toml_path), false).expect("settings");
    let needed = settings.server.shutdown_grace + settings.stream.drain_timeout;
    let grace = spec["terminationGracePeriodSeconds"]
        .as_u64()
        .expect("grace");
    assert!(
        Duration::from_secs(grace) > needed,
        "{grace}s <= {needed:?}"
    );
    assert!(
        !settings.kafka.bootstrap_servers.is_empty(),
        "the ConfigMap is Kafka mode"
    );

    // Service, PDB and HPA select and target these pods.
    let name_label = &labels["app.kubernetes.io/name"];
    let service = kind(&docs, "Service");
    assert_eq!(
        &service["spec"]["selector"]["app.kubernetes.io/name"],
        name_label
    );
    assert_eq!(service["spec"]["ports"][0]["targetPort"], "http");
    let pdb = kind(&docs, "PodDisruptionBudget");
    assert_eq!(
        &pdb["spec"]["selector"]["matchLabels"]["app.kubernetes.io/name"],
        name_label
    );
    let hpa = kind(&docs, "HorizontalPodAutoscaler");
    assert_eq!(hpa["spec"]["scaleTargetRef"]["kind"], "Deployment");
    assert_eq!(
        hpa["spec"]["scaleTargetRef"]["name"],
        deploy["metadata"]["name"]
    );
    assert!(
        c["resources"]["requests"].get("cpu").is_some(),
        "the HPA scales on CPU requests"
    );
}

/// RSS of a process in bytes, from /proc.
fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc status");
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().strip_suffix("kB"))
        .and_then(|v| v.trim().parse().ok())
        .expect("VmRSS");
    kb * 1024
}

fn http_get(base: &str, path: &str) -> (u16, String) {
    let addr = base.trim_start_matches("http://");
    let mut s = std::net::TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").expect("send");
    let mut resp = String::new();
    s.read_to_string(&mut resp).expect("read");
    let status = resp
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = resp
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// Wait until /readyz answers 200 and the instance owns `partitions`.
fn wait_stream_ready(server: &Server, partitions: u32) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let ready = http_get(&server.base, "/readyz").0 == 200;
        let metrics = http_get(&server.base, "/metrics").1;
        let owned = metrics
            .lines()
            .find_map(|l| l.strip_prefix("quotaflow_partitions_owned "))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .unwrap_or(0.0);
        if ready && owned as u32 == partitions {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "not ready in Kafka mode within 60 s (ready {ready}, partitions owned {owned})"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Own topics, group and key prefix on the shared test Kafka and Redis.
fn private_stream_env(name: &str) -> Vec<(String, String)> {
    let requests = unique(&format!("{name}-requests"));
    tokio::runtime::Runtime::new()
        .expect("runtime")
        .block_on(create_topics(&[(&requests, 4)]));
    vec![
        ("QUOTAFLOW__KAFKA__BOOTSTRAP_SERVERS".into(), kafka()),
        ("QUOTAFLOW__REDIS__URL".into(), redis()),
        // The internal listener on a free loopback port, not the
        // container's fixed one (which may be taken on a shared machine).
        ("QUOTAFLOW__CLUSTER__LISTEN".into(), "127.0.0.1:0".into()),
        ("QUOTAFLOW__CLUSTER__ADVERTISE".into(), String::new()),
        (
            "QUOTAFLOW__KAFKA__GROUP_ID".into(),
            unique(&format!("{name}-group")),
        ),
        ("QUOTAFLOW__KAFKA__REQUESTS_TOPIC".into(), requests),
        (
            "QUOTAFLOW__KAFKA__DECISIONS_TOPIC".into(),
            unique(&format!("{name}-decisions")),
        ),
        (
            "QUOTAFLOW__KAFKA__ALERTS_TOPIC".into(),
            unique(&format!("{name}-alerts")),
        ),
        (
            "QUOTAFLOW__KAFKA__DEAD_LETTER_TOPIC".into(),
            unique(&format!("{name}-dlq")),
        ),
        // Its own config log, seeded with this file's limits.
        (
            "QUOTAFLOW__KAFKA__CONFIG_TOPIC".into(),
            unique(&format!("{name}-config")),
        ),
        (
            "QUOTAFLOW__REDIS__KEY_PREFIX".into(),
            unique(&format!("qftest-{name}")),
        ),
    ]
}

#[test]
fn kubernetes_config_starts_in_kafka_mode_within_its_memory_request() {
    let path = repo().join("deploy/kubernetes/quotaflow.toml");
    let out = run_ok(
        Command::new(env!("CARGO_BIN_EXE_quotaflow"))
            .arg("check-config")
            .arg(&path),
    );
    assert!(text(&out).contains(": ok"), "{}", text(&out));

    // The pod's config with the test services in place of the cluster's.
    let file = std::fs::read_to_string(&path).expect("quotaflow.toml");
    let mut env = private_stream_env("deploy-k8s");
    env.push((
        "QUOTAFLOW__SECURITY__FINGERPRINT_KEY".into(),
        "deploy-test-key".into(),
    ));
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let server = Server::start(Some(&file), &env);
    wait_stream_ready(&server, 4);
    let baseline = rss_bytes(server.pid());
    // Every limit counted once for the group: keyed by the partition key.
    let unaligned: Vec<String> = server
        .logs()
        .into_iter()
        .filter(|l| l.contains("limit_not_partition_aligned"))
        .collect();
    assert!(unaligned.is_empty(), "{unaligned:?}");

    // deployment.yaml's figures: request >= baseline + max_keys x 113 B.
    let docs = yaml_text(&kustomize_build());
    let resources =
        &kind(&docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]["resources"];
    let request = quantity(str_of(&resources["requests"]["memory"], "memory request"));
    let limit = quantity(str_of(&resources["limits"]["memory"], "memory limit"));
    let max_keys = Settings::load_with_env(Some(&path), false)
        .expect("settings")
        .state
        .max_keys as u64;
    let needed = baseline + max_keys * BYTES_PER_KEY;
    eprintln!(
        "baseline RSS {:.1} MiB (Kafka mode, 4 partitions, idle); + {max_keys} keys x {BYTES_PER_KEY} B = {:.1} MiB; request {:.0} MiB, limit {:.0} MiB",
        baseline as f64 / 1048576.0,
        needed as f64 / 1048576.0,
        request as f64 / 1048576.0,
        limit as f64 / 1048576.0
    );
    assert!(
        request >= needed,
        "memory request {request} B is below baseline {baseline} B + {max_keys} keys x {BYTES_PER_KEY} B = {needed} B (docs/deployment.md, \"Resources\")"
    );
    assert!(
        limit > request,
        "the limit leaves no room for the stream side"
    );
}

// ------------------------------------------------------------------ Compose

fn compose_check(file: &Path) -> Output {
    // Only PATH: the file's own defaults are what is checked, not this shell's.
    let mut cmd = Command::new("compose-check");
    cmd.arg(file)
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default());
    run(&mut cmd)
}

fn compose_project() -> Value {
    let out = compose_check(&repo().join("docker-compose.yml"));
    assert!(
        out.status.success(),
        "compose-check docker-compose.yml:\n{}",
        text(&out)
    );
    serde_json::from_slice(&out.stdout).expect("compose-check prints JSON")
}

/// host:port of `url` (`redis://redis:6379`, `kafka:29092`).
fn host_port(url: &str) -> (&str, u16) {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let rest = rest.split('/').next().unwrap_or(rest);
    let (host, port) = rest.rsplit_once(':').expect("host:port");
    (host, port.parse().expect("port"))
}

/// The bind mount of `service` whose target is `target`; its source.
fn bind_source<'a>(service: &'a Value, target: &str) -> &'a str {
    let v = service["volumes"]
        .as_array()
        .expect("volumes")
        .iter()
        .find(|v| v["target"] == target)
        .unwrap_or_else(|| panic!("no volume at {target}"));
    assert_eq!(v["type"], "bind", "{target}");
    assert_eq!(v["read_only"], true, "{target} should be read-only");
    str_of(&v["source"], "source")
}

#[test]
fn compose_file_follows_the_spec_and_wires_the_stack() {
    let p = compose_project();
    let s = &p["services"];
    let names: BTreeSet<&str> = s
        .as_object()
        .expect("services")
        .keys()
        .map(String::as_str)
        .collect();
    for want in [
        "kafka",
        "redis",
        "quotaflow-1",
        "quotaflow-2",
        "prometheus",
        "grafana",
    ] {
        assert!(names.contains(want), "no service {want}: {names:?}");
    }
    for (name, service) in s.as_object().expect("services") {
        assert_pinned(str_of(&service["image"], "image"), name);
    }

    // Kafka's listener for other containers, and Redis.
    let kafka_env = &s["kafka"]["environment"];
    let advertised = str_of(
        &kafka_env["KAFKA_ADVERTISED_LISTENERS"],
        "advertised listeners",
    );
    let internal = advertised
        .split(',')
        .find_map(|l| l.strip_prefix("INTERNAL://"))
        .expect("an INTERNAL listener");
    assert_eq!(host_port(internal).0, "kafka", "{internal}");

    let mut ports = BTreeSet::new();
    let mut keys = BTreeSet::new();
    for q in ["quotaflow-1", "quotaflow-2"] {
        let svc = &s[q];
        let env = &svc["environment"];
        assert_eq!(env["QUOTAFLOW__KAFKA__BOOTSTRAP_SERVERS"], internal, "{q}");
        let (redis_host, redis_port) =
            host_port(str_of(&env["QUOTAFLOW__REDIS__URL"], "redis url"));
        assert!(
            names.contains(redis_host),
            "{q}: Redis host {redis_host} is no service"
        );
        assert_eq!(redis_port, 6379, "{q}");
        assert_eq!(
            svc["depends_on"]["redis"]["condition"], "service_healthy",
            "{q}"
        );
        let kafka_dep = svc["depends_on"]
            .as_object()
            .expect("depends_on")
            .keys()
            .find(|k| k.starts_with("kafka"))
            .unwrap_or_else(|| panic!("{q} does not wait for Kafka"));
        assert_ne!(
            svc["depends_on"][kafka_dep]["condition"], "service_started",
            "{q}"
        );
        assert!(
            svc["build"]["dockerfile"]
                .as_str()
                .is_some_and(|d| d.ends_with("deploy/Dockerfile")),
            "{q}"
        );
        assert_eq!(svc["read_only"], true, "{q}");
        keys.insert(
            str_of(
                &env["QUOTAFLOW__SECURITY__FINGERPRINT_KEY"],
                "fingerprint key",
            )
            .to_owned(),
        );
        assert!(
            env.get("QUOTAFLOW_ADMIN_TOKEN").is_some(),
            "{q}: config writes from the host need a token"
        );
        let listen = str_of(&env["QUOTAFLOW__SERVER__LISTEN"], "listen");
        assert_eq!(host_port(listen), ("0.0.0.0", 8080), "{q}");
        assert_eq!(svc["ports"][0]["target"], 8080, "{q}");
        ports.insert(str_of(&svc["ports"][0]["published"], "published").to_owned());
    }
    assert_eq!(ports.len(), 2, "the instances publish different ports");
    assert_eq!(keys.len(), 1, "one group needs one fingerprint key");

    // Prometheus: its config and the rules it loads are in the mounted dir.
    let prom = &s["prometheus"];
    let prom_dir = PathBuf::from(bind_source(prom, "/etc/prometheus"));
    assert_eq!(prom_dir, repo().join("deploy/prometheus"));
    let command: Vec<&str> = prom["command"]
        .as_array()
        .expect("command")
        .iter()
        .map(|c| str_of(c, "arg"))
        .collect();
    assert!(
        command.contains(&"--config.file=/etc/prometheus/prometheus.yml"),
        "{command:?}"
    );
    let config = &yaml_file(&prom_dir.join("prometheus.yml"))[0];
    for rules in config["rule_files"].as_array().expect("rule_files") {
        let file = prom_dir.join(str_of(rules, "rule file"));
        assert!(
            file.is_file(),
            "{} is not in the mounted directory",
            file.display()
        );
    }
    assert!(prom_dir.join("quotaflow-rules.yml").is_file());
    let scrape = config["scrape_configs"]
        .as_array()
        .expect("scrape_configs")
        .iter()
        .find(|j| j["job_name"] == "quotaflow")
        .expect("a quotaflow job");
    let targets: BTreeSet<&str> = scrape["static_configs"][0]["targets"]
        .as_array()
        .expect("targets")
        .iter()
        .map(|t| str_of(t, "target"))
        .collect();
    assert_eq!(
        targets,
        ["quotaflow-1:8080", "quotaflow-2:8080"]
            .into_iter()
            .collect()
    );

    // Grafana: provisioning and dashboards mounted where the provider looks.
    let grafana = &s["grafana"];
    let provisioning = PathBuf::from(bind_source(grafana, "/etc/grafana/provisioning"));
    assert_eq!(provisioning, repo().join("deploy/grafana/provisioning"));
    let provider = &yaml_file(&provisioning.join("dashboards/quotaflow.yml"))[0];
    let path = str_of(
        &provider["providers"][0]["options"]["path"],
        "provider path",
    );
    assert_eq!(
        PathBuf::from(bind_source(grafana, path)),
        repo().join("deploy/grafana/dashboards")
    );
    let datasource = &yaml_file(&provisioning.join("datasources/prometheus.yml"))[0];
    let url = str_of(&datasource["datasources"][0]["url"], "datasource url");
    assert_eq!(host_port(url), ("prometheus", 9090));
    assert_eq!(prom["ports"][0]["target"], 9090);
}

#[test]
fn compose_check_rejects_invalid_files() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cases = [
        // Not in the Compose Specification.
        ("unknown-key", "services:\n  a:\n    image: redis:7.4\n    prots: [\"6379:6379\"]\n", "prots"),
        ("wrong-type", "services:\n  a:\n    image: redis:7.4\n    read_only: sometimes\n", "read_only"),
        // Valid by the schema, but Docker would mount an empty directory.
        (
            "missing-bind",
            "services:\n  a:\n    image: redis:7.4\n    volumes: [\"./nowhere/prometheus.yml:/etc/prometheus/prometheus.yml:ro\"]\n",
            "nowhere",
        ),
        ("missing-dockerfile", "services:\n  a:\n    build: {context: ., dockerfile: Nofile}\n", "Nofile"),
    ];
    for (name, body, mention) in cases {
        let file = dir.path().join(format!("{name}.yml"));
        std::fs::write(&file, body).expect("write");
        let out = compose_check(&file);
        assert!(!out.status.success(), "{name} accepted:\n{}", text(&out));
        assert!(text(&out).contains(mention), "{name}: {}", text(&out));
    }
}

#[test]
fn compose_environment_starts_quotaflow_in_kafka_mode() {
    // quotaflow-1 as compose runs it: the image's config (config/default.toml,
    // the embedded default) plus the service's environment, with the test's
    // Kafka and Redis in place of the `kafka` and `redis` containers.
    let p = compose_project();
    let compose_env = p["services"]["quotaflow-1"]["environment"]
        .as_object()
        .expect("environment");
    let private = private_stream_env("deploy-compose");
    let mut env: Vec<(String, String)> = compose_env
        .iter()
        .filter(|(k, _)| !private.iter().any(|(p, _)| p == *k))
        .map(|(k, v)| (k.clone(), str_of(v, k).to_owned()))
        .collect();
    assert!(env
        .iter()
        .any(|(k, _)| k == "QUOTAFLOW__SECURITY__FINGERPRINT_KEY"));
    env.extend(private);
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let server = Server::start(None, &env);
    wait_stream_ready(&server, 4);
    let started = server.wait_log(Duration::from_secs(5), |v| v["event"] == "listening");
    assert_eq!(started["admin_token"], true, "{started}");
}

// --------------------------------------------------------------- Dockerfile

fn dockerfile_check(file: &Path, context: &Path) -> (bool, Value) {
    let out = run(Command::new("dockerfile-check")
        .arg("-context")
        .arg(context)
        .arg(file));
    let report = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("dockerfile-check printed no JSON ({e}):\n{}", text(&out)));
    (out.status.success(), report)
}

#[test]
fn dockerfile_is_multi_stage_non_root_and_lint_clean() {
    let (ok, r) = dockerfile_check(&repo().join("deploy/Dockerfile"), &repo());
    assert!(ok, "dockerfile-check deploy/Dockerfile:\n{r:#}");
    let stages = r["stages"].as_array().expect("stages");
    assert!(stages.len() >= 2, "not multi-stage");
    let names: Vec<&str> = stages
        .iter()
        .map(|s| s["name"].as_str().unwrap_or(""))
        .collect();
    for s in stages {
        let base = str_of(&s["base"], "base");
        if !names.contains(&base) {
            assert_pinned(base, "FROM");
        }
    }
    let last = stages.last().expect("a stage");
    let cmds = |s: &Value, cmd: &str| -> Vec<String> {
        s["instructions"]
            .as_array()
            .expect("instructions")
            .iter()
            .filter(|i| i["cmd"] == cmd)
            .map(|i| str_of(&i["text"], "text").to_owned())
            .collect()
    };
    // The runtime stage is small: a fresh base, the binary copied in.
    assert!(
        !names.contains(&str_of(&last["base"], "base")),
        "the final stage builds on a build stage"
    );
    assert!(
        cmds(last, "RUN").is_empty(),
        "the runtime stage runs nothing: {:?}",
        cmds(last, "RUN")
    );
    assert!(
        cmds(last, "COPY").iter().any(|c| c.contains("--from=")),
        "the binary comes from the build stage"
    );

    // Numeric, non-root user (Kubernetes' runAsNonRoot can verify only a number).
    let user = cmds(last, "USER");
    let user = user.last().expect("a USER in the final stage");
    let id = user.trim_start_matches("USER ").trim();
    assert!(
        id.split(':')
            .all(|p| p.parse::<u32>().is_ok_and(|n| n != 0)),
        "USER {id}: not numeric and non-root"
    );

    // A HEALTHCHECK, or HEALTHCHECK NONE with the reason written above it.
    let health = cmds(last, "HEALTHCHECK");
    let health = health.last().expect("a HEALTHCHECK instruction");
    if health.contains("NONE") {
        let file = std::fs::read_to_string(repo().join("deploy/Dockerfile")).expect("Dockerfile");
        let lines: Vec<&str> = file.lines().collect();
        let at = lines
            .iter()
            .position(|l| l.starts_with("HEALTHCHECK"))
            .expect("line");
        assert!(
            lines[..at]
                .iter()
                .rev()
                .take_while(|l| l.starts_with('#'))
                .any(|l| l.contains("HEALTHCHECK")),
            "HEALTHCHECK NONE without a comment saying why"
        );
    }

    // Dependencies build in their own layer: the first cargo build comes
    // before the sources are copied in.
    let build = &stages[0];
    let steps = build["instructions"].as_array().expect("instructions");
    let first_build = steps
        .iter()
        .position(|i| i["cmd"] == "RUN" && str_of(&i["text"], "text").contains("cargo build"))
        .expect("a cargo build");
    let src_copy = steps
        .iter()
        .position(|i| i["cmd"] == "COPY" && str_of(&i["text"], "text").contains(" src "))
        .expect("COPY src");
    assert!(
        first_build < src_copy,
        "dependencies are not cached apart from the sources"
    );

    let ignore = std::fs::read_to_string(repo().join(".dockerignore")).expect(".dockerignore");
    for t in ["target", "target-*", "**/target"] {
        assert!(
            ignore.lines().any(|l| l.trim() == t),
            ".dockerignore lacks {t}"
        );
    }
}

#[test]
fn dockerfile_check_rejects_lint_failures_and_a_broken_context() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join(".dockerignore"), "target\n").expect("write");
    std::fs::create_dir(dir.path().join("target")).expect("mkdir");
    std::fs::write(dir.path().join("target/app"), "").expect("write");
    let file = dir.path().join("Dockerfile");
    std::fs::write(
        &file,
        "from debian:12 as Build\nCOPY target/app /app\nCOPY missing.txt /\nWORKDIR app\nCMD /app\n",
    )
    .expect("write");
    let (ok, r) = dockerfile_check(&file, dir.path());
    assert!(!ok, "accepted:\n{r:#}");
    let rules: BTreeSet<&str> = r["warnings"]
        .as_array()
        .expect("warnings")
        .iter()
        .map(|w| str_of(&w["rule"], "rule"))
        .collect();
    for want in [
        "StageNameCasing",
        "ConsistentInstructionCasing",
        "WorkdirRelativePath",
        "JSONArgsRecommended",
        "CopyIgnoredFile",
        "CopySourceMissing",
    ] {
        assert!(rules.contains(want), "{want} not reported: {rules:?}");
    }

    std::fs::write(&file, "FROM debian:12\nFROBNICATE x\n").expect("write");
    let (ok, r) = dockerfile_check(&file, dir.path());
    assert!(
        !ok && r["error"].as_str().is_some_and(|e| !e.is_empty()),
        "{r:#}"
    );
}

#[test]
fn dependency_layer_loads_from_the_manifests_alone() {
    // Copy what the build stage has before its first RUN, run that RUN's
    // stub step, and let cargo load the workspace and check Cargo.lock:
    // a new crate, bench or binary missing from the stubs fails here, not
    // in someone's `docker build`.
    let (_, r) = dockerfile_check(&repo().join("deploy/Dockerfile"), &repo());
    let steps = r["stages"][0]["instructions"]
        .as_array()
        .expect("instructions")
        .clone();
    let dir = tempfile::tempdir().expect("tempdir");
    let workdir = dir.path();
    for step in &steps {
        let t = str_of(&step["text"], "text");
        match step["cmd"].as_str() {
            Some("COPY") => {
                let words: Vec<&str> = t
                    .split_whitespace()
                    .skip(1)
                    .filter(|w| !w.starts_with("--"))
                    .collect();
                let (dest, sources) = words.split_last().expect("COPY src... dest");
                for src in sources {
                    let from = repo().join(src);
                    let to = if dest.ends_with('/') || sources.len() > 1 {
                        workdir
                            .join(dest)
                            .join(Path::new(src).file_name().expect("name"))
                    } else {
                        workdir.join(dest)
                    };
                    std::fs::create_dir_all(to.parent().expect("parent")).expect("mkdir");
                    assert!(
                        from.is_file(),
                        "{src}: the dependency layer copies only files"
                    );
                    std::fs::copy(&from, &to).expect("copy");
                }
            }
            Some("RUN") => {
                let stub = t
                    .trim_start_matches("RUN ")
                    .split("&&")
                    .next()
                    .expect("a command")
                    .trim();
                assert!(stub.contains("stub-sources.sh"), "first RUN: {t}");
                run_ok(Command::new("sh").arg("-c").arg(stub).current_dir(workdir));
                break;
            }
            _ => {}
        }
    }
    run_ok(
        Command::new(env!("CARGO"))
            .args(["fetch", "--locked", "--offline"])
            .current_dir(workdir),
    );
    // And the same check fails without a stub.
    std::fs::remove_file(workdir.join("benches/memory.rs")).expect("a bench stub");
    let out = run(Command::new(env!("CARGO"))
        .args(["fetch", "--locked", "--offline"])
        .current_dir(workdir));
    assert!(
        !out.status.success() && text(&out).contains("memory"),
        "{}",
        text(&out)
    );
}

// ------------------------------------------------------ Prometheus, Grafana

#[test]
fn prometheus_config_is_valid() {
    let out = run_ok(
        Command::new("promtool")
            .args(["check", "config", "prometheus.yml"])
            .current_dir(repo().join("deploy/prometheus")),
    );
    let t = text(&out);
    assert!(t.contains("is valid prometheus config file syntax"), "{t}");
    assert!(t.contains("SUCCESS: 1 rule files found"), "{t}");

    // And promtool does fail on a config it cannot load.
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(
        dir.path().join("p.yml"),
        "rule_files: [missing.yml]\nscrape_configs:\n  - job_name: x\n    scrape_intervl: 5s\n",
    )
    .expect("write");
    let out = run(Command::new("promtool")
        .args(["check", "config", "p.yml"])
        .current_dir(dir.path()));
    assert!(!out.status.success(), "{}", text(&out));
}

#[test]
fn grafana_provisioning_declares_the_datasource_and_dashboard_provider() {
    let base = repo().join("deploy/grafana/provisioning");
    let ds = &yaml_file(&base.join("datasources/prometheus.yml"))[0];
    assert_eq!(ds["apiVersion"], 1);
    let sources = ds["datasources"].as_array().expect("datasources");
    assert_eq!(sources.len(), 1);
    let d = &sources[0];
    assert_eq!(d["type"], "prometheus");
    assert_eq!(d["access"], "proxy");
    assert_eq!(d["isDefault"], true);
    assert!(
        d["uid"].as_str().is_some_and(|u| !u.is_empty()),
        "dashboards refer to a fixed uid"
    );
    assert!(str_of(&d["url"], "url").starts_with("http://"));

    let dash = &yaml_file(&base.join("dashboards/quotaflow.yml"))[0];
    assert_eq!(dash["apiVersion"], 1);
    let p = &dash["providers"][0];
    assert_eq!(p["type"], "file");
    assert!(p["name"].as_str().is_some_and(|n| !n.is_empty()));
    assert!(str_of(&p["options"]["path"], "path").starts_with('/'));

    // Whatever dashboards are there must be JSON objects Grafana can load.
    for entry in
        std::fs::read_dir(repo().join("deploy/grafana/dashboards")).expect("dashboards dir")
    {
        let path = entry.expect("entry").path();
        if path.extension().is_some_and(|e| e == "json") {
            let v: Value = serde_json::from_str(&std::fs::read_to_string(&path).expect("read"))
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            assert!(v.is_object(), "{}", path.display());
        }
    }
}

#[test]
fn tools_script_prints_only_its_exports() {
    let out = run_ok(&mut Command::new(repo().join("scripts/tools.sh")));
    let stdout = String::from_utf8(out.stdout).expect("utf-8");
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 3, "{stdout}");
    assert!(lines.iter().all(|l| l.starts_with("export ")), "{stdout}");
    assert!(
        lines[2].starts_with("export ENVOY_RATELIMIT_BIN="),
        "{stdout}"
    );
}
