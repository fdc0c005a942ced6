//! The Helm chart, with a real `helm` (scripts/install-helm.sh): lint and render every
//! `helm/ferry/ci/*.yaml` value set, then check the rendered manifests: the sidecar, probes,
//! grace period, security contexts, config checksum, secrets, the optional objects, the refusals,
//! the Kubernetes schemas (kubernetes-validate, when installed) and that the config the chart
//! renders passes `ferry validate`.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

const CHART: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/helm/ferry");

/// A tool on PATH or in ~/.local/bin; `None` (with a note) when missing, unless CI requires it.
fn tool(name: &str) -> Option<PathBuf> {
    let local = std::env::var("HOME").map(|h| Path::new(&h).join(".local/bin").join(name));
    let found = std::env::var("PATH")
        .ok()
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|d| d.join(name))
        .chain(local)
        .find(|p| p.is_file());
    if found.is_none() {
        assert!(
            std::env::var("FERRY_REQUIRE_TOOLS").is_err(),
            "{name} is required (scripts/install-helm.sh, pip install kubernetes-validate)"
        );
        eprintln!("skipping: {name} is not installed");
    }
    found
}

fn run(program: &Path, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(program).args(args).output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn to_json(y: &yaml_rust2::Yaml) -> Value {
    use yaml_rust2::Yaml;
    match y {
        Yaml::Real(r) => r.parse::<f64>().map(Value::from).unwrap_or(Value::Null),
        Yaml::Integer(i) => Value::from(*i),
        Yaml::String(s) => Value::from(s.clone()),
        Yaml::Boolean(b) => Value::from(*b),
        Yaml::Array(a) => Value::Array(a.iter().map(to_json).collect()),
        Yaml::Hash(h) => Value::Object(
            h.iter()
                .map(|(k, v)| {
                    (
                        k.as_str().map(str::to_string).unwrap_or_else(|| format!("{k:?}")),
                        to_json(v),
                    )
                })
                .collect(),
        ),
        _ => Value::Null,
    }
}

/// `helm template` with these value files and `--set`s: the manifests, or helm's error.
fn render(helm: &Path, values: &[&str], set: &[&str]) -> Result<Vec<Value>, String> {
    let mut args = vec!["template", "t", CHART];
    for v in values {
        args.extend(["-f", v]);
    }
    for s in set {
        args.extend(["--set", s]);
    }
    let (ok, out, err) = run(helm, &args);
    if !ok {
        return Err(err);
    }
    Ok(yaml_rust2::YamlLoader::load_from_str(&out)
        .unwrap()
        .iter()
        .map(to_json)
        .filter(|d| !d.is_null())
        .collect())
}

fn kind<'a>(docs: &'a [Value], kind: &str) -> Vec<&'a Value> {
    docs.iter().filter(|d| d["kind"] == kind).collect()
}

fn value_sets() -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(format!("{CHART}/ci"))
        .unwrap()
        .map(|e| e.unwrap().path().display().to_string())
        .filter(|p| p.ends_with(".yaml"))
        .collect();
    v.sort();
    assert!(v.len() >= 3);
    v
}

fn container<'a>(pod: &'a Value, name: &str) -> Option<&'a Value> {
    ["initContainers", "containers"]
        .iter()
        .filter_map(|k| pod[*k].as_array())
        .flatten()
        .find(|c| c["name"] == name)
}

fn hardened(c: &Value, what: &str) {
    let s = &c["securityContext"];
    assert_eq!(s["runAsNonRoot"], true, "{what}: {s}");
    assert_eq!(s["readOnlyRootFilesystem"], true, "{what}: {s}");
    assert_eq!(s["allowPrivilegeEscalation"], false, "{what}: {s}");
    assert_eq!(
        s["capabilities"]["drop"],
        serde_json::json!(["ALL"]),
        "{what}: {s}"
    );
    assert_eq!(s["seccompProfile"]["type"], "RuntimeDefault", "{what}: {s}");
}

#[test]
fn every_value_set_lints_renders_and_makes_a_safe_pod() {
    let Some(helm) = tool("helm") else { return };
    for values in value_sets() {
        let (ok, out, err) = run(&helm, &["lint", "--strict", CHART, "-f", &values]);
        assert!(ok, "helm lint --strict -f {values}:\n{out}{err}");
        let docs = render(&helm, &[&values], &[]).unwrap_or_else(|e| panic!("{values}: {e}"));
        let deployment = kind(&docs, "Deployment")[0];
        let pod = &deployment["spec"]["template"]["spec"];
        let ferry = container(pod, "ferry").expect("a ferry container");
        let app = container(pod, "app").expect("the app container");
        let native = pod["initContainers"]
            .as_array()
            .is_some_and(|c| c.iter().any(|c| c["name"] == "ferry"));
        if values.contains("container") {
            assert!(!native, "{values}: a plain second container");
            assert_eq!(pod["containers"].as_array().unwrap().len(), 2);
            assert!(ferry["restartPolicy"].is_null());
        } else {
            assert!(native, "{values}: a native sidecar by default");
            assert_eq!(ferry["restartPolicy"], "Always");
        }
        assert_eq!(ferry["livenessProbe"]["httpGet"]["path"], "/healthz");
        assert_eq!(ferry["readinessProbe"]["httpGet"]["path"], "/readyz");
        assert_eq!(ferry["startupProbe"]["httpGet"]["path"], "/healthz");
        hardened(ferry, "ferry");
        hardened(app, "app");
        // Every file ferry mounts besides its config comes from a Kubernetes Secret, read-only.
        let volumes = pod["volumes"].as_array().unwrap();
        for mount in ferry["volumeMounts"].as_array().unwrap() {
            let volume = volumes
                .iter()
                .find(|v| v["name"] == mount["name"])
                .unwrap_or_else(|| panic!("{values}: no volume for {mount}"));
            assert_eq!(mount["readOnly"], true, "{values}: {mount}");
            if mount["name"] != "ferry-config" {
                assert!(volume["secret"]["secretName"].is_string(), "{values}: {volume}");
            }
        }
        if values.contains("full") {
            assert!(
                ferry["volumeMounts"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|m| m["mountPath"] == "/var/run/secrets/kafka"),
                "{values}: the Secret with the broker's CA is mounted"
            );
        }
        assert_eq!(pod["securityContext"]["seccompProfile"]["type"], "RuntimeDefault");
        let checksum = deployment["spec"]["template"]["metadata"]["annotations"]["checksum/config"]
            .as_str()
            .unwrap();
        assert!(checksum.len() == 64 && checksum.chars().all(|c| c.is_ascii_hexdigit()));

        // The config the chart renders is a valid ferry config.
        let config_map = kind(&docs, "ConfigMap")
            .into_iter()
            .find(|c| c["data"]["ferry.yaml"].is_string())
            .unwrap();
        let text = config_map["data"]["ferry.yaml"].as_str().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ferry.yaml");
        std::fs::write(&path, text).unwrap();
        let (ok, _, err) = run(
            Path::new(env!("CARGO_BIN_EXE_ferry")),
            &["validate", "--env-optional", "-c", path.to_str().unwrap()],
        );
        assert!(
            ok,
            "{values}: the rendered ferry.yaml does not validate:\n{err}\n{text}"
        );
        let config: Value = to_json(&yaml_rust2::YamlLoader::load_from_str(text).unwrap()[0]);
        assert_eq!(config["admin"]["listen"], "0.0.0.0:9464");

        // Grace period above the drain timeout; the app's preStop drains ferry first.
        let drain: i64 = config["shutdown"]["drain_timeout"]
            .as_str()
            .and_then(|d| d.trim_end_matches('s').parse().ok())
            .unwrap_or(25);
        assert!(pod["terminationGracePeriodSeconds"].as_i64().unwrap() >= drain + 10);
        if config["admin"]["prestop"] == true {
            assert_eq!(
                app["lifecycle"]["preStop"]["httpGet"]["path"], "/prestop?resume_after=70",
                "a restart of the app container alone resumes ferry after the grace period"
            );
            assert_eq!(app["lifecycle"]["preStop"]["httpGet"]["port"], 9464);
        } else {
            assert!(app["lifecycle"].is_null());
        }

        // Secrets come from Kubernetes Secrets, never inline.
        for (key, v) in config["kafka"]["properties"].as_object().into_iter().flatten() {
            if key.contains("password") {
                assert!(v.as_str().unwrap().starts_with("${"), "{key} is inline");
            }
        }
        if let Some(token) = config["admin"]["token"].as_str() {
            assert_eq!(token, "${FERRY_ADMIN_TOKEN}");
            let env = ferry["env"].as_array().unwrap();
            let t = env.iter().find(|e| e["name"] == "FERRY_ADMIN_TOKEN").unwrap();
            assert!(t["valueFrom"]["secretKeyRef"]["name"].is_string());
        }
        if let Some(kv) = tool("kubernetes-validate") {
            let manifests = dir.path().join("manifests.yaml");
            let (_, out, _) = run(&helm, &["template", "t", CHART, "-f", &values]);
            std::fs::write(&manifests, out).unwrap();
            let (ok, out, err) = run(
                &kv,
                &["-k", "1.31.0", "--strict", "--quiet", manifests.to_str().unwrap()],
            );
            assert!(ok, "{values}: not valid Kubernetes 1.31:\n{out}{err}");
        }
    }
}

#[test]
fn the_config_checksum_follows_the_config() {
    let Some(helm) = tool("helm") else { return };
    let values = format!("{CHART}/ci/native-values.yaml");
    let checksum = |set: &[&str]| {
        let docs = render(&helm, &[&values], set).unwrap();
        kind(&docs, "Deployment")[0]["spec"]["template"]["metadata"]["annotations"]["checksum/config"].clone()
    };
    assert_eq!(checksum(&[]), checksum(&[]));
    assert_ne!(
        checksum(&[]),
        checksum(&["ferry.config.shutdown.drain_timeout=20s"])
    );
    assert_eq!(
        checksum(&[]),
        checksum(&["replicaCount=5"]),
        "only the config moves it"
    );
}

#[test]
fn the_optional_objects_carry_the_dashboard_and_alerts() {
    let Some(helm) = tool("helm") else { return };
    let docs = render(&helm, &[&format!("{CHART}/ci/full-values.yaml")], &[]).unwrap();
    let monitor = kind(&docs, "ServiceMonitor")[0];
    assert_eq!(monitor["spec"]["endpoints"][0]["port"], "ferry-admin");
    // The admin port is on a Service of its own, which the monitor selects; never on the app's.
    let services = kind(&docs, "Service");
    let port_names = |s: &Value| -> Vec<String> {
        s["spec"]["ports"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["name"].as_str().unwrap().to_string())
            .collect()
    };
    let admin: Vec<_> = services
        .iter()
        .filter(|s| port_names(s).contains(&"ferry-admin".to_string()))
        .collect();
    assert_eq!(admin.len(), 1, "{services:?}");
    assert_eq!(port_names(admin[0]), ["ferry-admin"]);
    assert_eq!(admin[0]["spec"]["type"], "ClusterIP");
    assert_eq!(
        monitor["spec"]["selector"]["matchLabels"]["app.kubernetes.io/component"],
        admin[0]["metadata"]["labels"]["app.kubernetes.io/component"]
    );
    assert_eq!(monitor["spec"]["endpoints"][0]["path"], "/metrics");
    assert_eq!(kind(&docs, "PodDisruptionBudget")[0]["spec"]["maxUnavailable"], 1);
    let scaled = kind(&docs, "ScaledObject")[0];
    let trigger = &scaled["spec"]["triggers"][0];
    assert_eq!(trigger["type"], "kafka");
    assert_eq!(trigger["metadata"]["consumerGroup"], "telemetry");
    assert_eq!(trigger["metadata"]["topic"], "telemetry.readings");
    assert_eq!(trigger["metadata"]["lagThreshold"], "5000");
    // KEDA reads no init container's environment (ferry's, in native mode): the brokers are
    // resolved from ferry's `env` into the trigger itself.
    assert_eq!(trigger["metadata"]["bootstrapServers"], "kafka:9093");
    assert!(trigger["metadata"]["bootstrapServersFromEnv"].is_null());
    let full = format!("{CHART}/ci/full-values.yaml");
    let servers = |set: &[&str]| {
        render(&helm, &[&full], set).map(|d| {
            kind(&d, "ScaledObject")[0]["spec"]["triggers"][0]["metadata"]["bootstrapServers"].clone()
        })
    };
    assert_eq!(
        servers(&["ferry.env=null", "ferry.config.kafka.brokers=${B:-k:1}"]).unwrap(),
        "k:1"
    );
    assert_eq!(servers(&["autoscaling.bootstrapServers=x:9"]).unwrap(), "x:9");
    let unresolved = servers(&["ferry.env=null"]).unwrap_err();
    assert!(
        unresolved.contains("set autoscaling.bootstrapServers to the brokers' addresses"),
        "{unresolved}"
    );
    assert!(
        kind(&docs, "Deployment")[0]["spec"]["replicas"].is_null(),
        "KEDA owns the replicas"
    );
    let dashboard = kind(&docs, "ConfigMap")
        .into_iter()
        .find(|c| c["metadata"]["labels"]["grafana_dashboard"] == "1")
        .unwrap();
    let shipped: Value = serde_json::from_str(dashboard["data"]["ferry.json"].as_str().unwrap()).unwrap();
    let ours: Value = serde_json::from_str(
        &std::fs::read_to_string(format!("{CHART}/files/grafana-dashboard.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(shipped, ours);
    let rule = kind(&docs, "PrometheusRule")[0];
    let alerts: Vec<&str> = rule["spec"]["groups"][0]["rules"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["alert"].as_str().unwrap())
        .collect();
    assert!(
        alerts.contains(&"FerryConsumerLagGrowing") && alerts.contains(&"FerryCircuitOpen"),
        "{alerts:?}"
    );
    assert_eq!(rule["metadata"]["labels"]["release"], "prometheus");
}

#[test]
fn unsafe_or_incomplete_values_are_refused_with_the_reason() {
    let Some(helm) = tool("helm") else { return };
    let native = format!("{CHART}/ci/native-values.yaml");
    let refused = |set: &[&str], why: &str| {
        let err = render(&helm, &[&native], set).expect_err(why);
        assert!(err.contains(why), "expected `{why}` in:\n{err}");
    };
    refused(
        &["terminationGracePeriodSeconds=30"],
        "must be at least ferry's drain_timeout (25s) + 10s",
    );
    // Durations as ferry reads them, rounded up to whole seconds.
    refused(
        &[
            "ferry.config.shutdown.drain_timeout=25900ms",
            "terminationGracePeriodSeconds=35",
        ],
        "must be at least ferry's drain_timeout (26s) + 10s",
    );
    refused(
        &["ferry.config.shutdown.drain_timeout=1m30s"],
        "must be at least ferry's drain_timeout (90s) + 10s",
    );
    assert!(
        render(
            &helm,
            &[&native],
            &[
                "ferry.config.shutdown.drain_timeout=1m30s",
                "terminationGracePeriodSeconds=100"
            ]
        )
        .is_ok()
    );
    refused(
        &["ferry.config.kafka.properties.sasl\\.password=hunter2"],
        "holds a literal secret",
    );
    refused(
        &["ferry.config.shutdown.drain_timeout=soon"],
        "write a duration, e.g. 25s, 1m30s, 1.5s or 500ms",
    );
    refused(
        &["ferry.mode=sideways"],
        "value must be one of 'native', 'container'",
    );
    // Native sidecars need Kubernetes 1.29; `container` mode is for the clusters before it.
    let older = |mode: &str| {
        let (ok, _, err) = run(
            &helm,
            &[
                "template",
                "t",
                CHART,
                "-f",
                &native,
                "--kube-version",
                "1.28.0",
                "--set",
                mode,
            ],
        );
        (ok, err)
    };
    let (ok, err) = older("ferry.mode=native");
    assert!(
        !ok && err.contains("ferry.mode native needs native sidecars, Kubernetes 1.29"),
        "{err}"
    );
    let (ok, err) = older("ferry.mode=container");
    assert!(ok, "{err}");
    // The defaults name no routes and no service: both are the user's to give.
    let err = render(&helm, &[], &[]).expect_err("no routes");
    assert!(err.contains("ferry.config.routes is empty"), "{err}");
    refused(&["app.image.repository="], "app.image.repository is required");
}

#[test]
fn a_probe_with_its_own_handler_replaces_ferry_s_and_the_admin_endpoint_can_listen_on_ipv6() {
    let Some(helm) = tool("helm") else { return };
    let native = format!("{CHART}/ci/native-values.yaml");
    let docs = render(&helm, &[&native], &["ferry.readinessProbe.exec.command={true}"]).unwrap();
    let pod = &kind(&docs, "Deployment")[0]["spec"]["template"]["spec"];
    let ferry = container(pod, "ferry").unwrap();
    let readiness = &ferry["readinessProbe"];
    assert_eq!(readiness["exec"]["command"][0], true);
    assert!(
        readiness["httpGet"].is_null(),
        "one handler per probe: {readiness}"
    );
    assert_eq!(readiness["periodSeconds"], 5, "the other settings stay");
    assert_eq!(ferry["livenessProbe"]["httpGet"]["path"], "/healthz");

    // An IPv6-only cluster: the admin endpoint listens on IPv6.
    let docs = render(&helm, &[&native], &["ferry.adminHost=::"]).unwrap();
    let text = kind(&docs, "ConfigMap")[0]["data"]["ferry.yaml"]
        .as_str()
        .unwrap();
    assert!(text.contains("listen: '[::]:9464'"), "{text}");
}

/// The README's recipe: another chart adds ferry to its own pod with the named templates.
#[test]
fn another_chart_can_add_the_sidecar_with_the_named_templates() {
    let Some(helm) = tool("helm") else { return };
    let dir = tempfile::tempdir().unwrap();
    let parent = dir.path().join("shop");
    std::fs::create_dir_all(parent.join("templates")).unwrap();
    std::fs::copy(
        format!("{CHART}/templates/_helpers.tpl"),
        parent.join("templates/_ferry.tpl"),
    )
    .unwrap();
    std::fs::write(
        parent.join("Chart.yaml"),
        "apiVersion: v2\nname: shop\nversion: 1.0.0\n",
    )
    .unwrap();
    std::fs::write(
        parent.join("values.yaml"),
        r#"
sidecar:
  image: { repository: registry.example.com/ferry, tag: "0.1.0", pullPolicy: IfNotPresent }
  mode: native
  adminPort: 9464
  env: [{ name: KAFKA_BROKERS, value: "kafka:9092" }]
  secretEnv: []
  adminTokenSecret: { name: "", key: token }
  resources: {}
  securityContext: { runAsNonRoot: true, readOnlyRootFilesystem: true }
  livenessProbe: { periodSeconds: 10 }
  readinessProbe: { periodSeconds: 5 }
  config:
    kafka: { brokers: "${KAFKA_BROKERS}" }
    routes:
      - name: orders
        from: { topics: [orders] }
        call: { http: { url: "http://127.0.0.1:8080/orders" } }
        dead_letter: { to: orders.dlq }
"#,
    )
    .unwrap();
    std::fs::write(
        parent.join("templates/deployment.yaml"),
        r#"{{- $ferry := dict "ferry" .Values.sidecar "configMap" (printf "%s-ferry" .Release.Name) "context" $ }}
apiVersion: apps/v1
kind: Deployment
metadata:
  name: {{ .Release.Name }}-shop
spec:
  selector: { matchLabels: { app: shop } }
  template:
    metadata:
      labels: { app: shop }
      annotations:
        checksum/ferry: {{ include "ferry.config" (dict "ferry" .Values.sidecar "prestop" true "group" .Release.Name) | sha256sum }}
    spec:
      terminationGracePeriodSeconds: 60
      initContainers:
        {{- include "ferry.sidecar" $ferry | nindent 8 }}
      containers:
        - name: shop
          image: registry.example.com/shop:2.0
          lifecycle:
            preStop:
              httpGet: { path: "/prestop?resume_after=70", port: 9464 }
      volumes:
        {{- include "ferry.volume" $ferry | nindent 8 }}
---
apiVersion: v1
kind: ConfigMap
metadata:
  name: {{ .Release.Name }}-ferry
data:
  ferry.yaml: |
    {{- include "ferry.config" (dict "ferry" .Values.sidecar "prestop" true "group" .Release.Name) | nindent 4 }}
"#,
    )
    .unwrap();
    let (ok, out, err) = run(&helm, &["template", "web", parent.to_str().unwrap()]);
    assert!(ok, "{err}");
    let docs: Vec<Value> = yaml_rust2::YamlLoader::load_from_str(&out)
        .unwrap()
        .iter()
        .map(to_json)
        .filter(|d| !d.is_null())
        .collect();
    assert_eq!(docs.len(), 2, "only the parent's objects: {out}");
    let pod = &kind(&docs, "Deployment")[0]["spec"]["template"]["spec"];
    let ferry = container(pod, "ferry").unwrap();
    assert_eq!(ferry["restartPolicy"], "Always");
    assert_eq!(ferry["image"], "registry.example.com/ferry:0.1.0");
    assert_eq!(pod["volumes"][0]["configMap"]["name"], "web-ferry");
    let text = kind(&docs, "ConfigMap")[0]["data"]["ferry.yaml"]
        .as_str()
        .unwrap();
    let config = to_json(&yaml_rust2::YamlLoader::load_from_str(text).unwrap()[0]);
    assert_eq!(config["kafka"]["group_id"], "web");
    assert_eq!(config["admin"]["prestop"], true);
    let path = dir.path().join("ferry.yaml");
    std::fs::write(&path, text).unwrap();
    let (ok, _, err) = run(
        Path::new(env!("CARGO_BIN_EXE_ferry")),
        &["validate", "--env-optional", "-c", path.to_str().unwrap()],
    );
    assert!(ok, "{err}");

    // Without an admin token secret at all: no token, and no failure to render.
    let chart = parent.to_str().unwrap();
    let (ok, out, err) = run(
        &helm,
        &["template", "web", chart, "--set", "sidecar.adminTokenSecret=null"],
    );
    assert!(ok, "{err}");
    assert!(!out.contains("FERRY_ADMIN_TOKEN"), "{out}");
    // The host chart's appVersion is not ferry's: the tag must be given.
    let (ok, _, err) = run(&helm, &["template", "web", chart, "--set", "sidecar.image.tag="]);
    assert!(!ok);
    assert!(err.contains("the ferry sidecar's image.tag is required"), "{err}");
}
