//! The command line: config errors with file, line, column and key (exit 78), the examples are
//! valid, and the demo runs to the end.

use std::process::Command;

fn ferry(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args(args)
        .env_remove("FERRY_CONFIG")
        .output()
        .expect("ferry runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn validate(yaml: &str) -> (i32, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.yaml");
    std::fs::write(&path, yaml).unwrap();
    let (code, _, stderr) = ferry(&["validate", "-c", path.to_str().unwrap()]);
    (code, stderr)
}

const GOOD: &str = "\
kafka:
  brokers: 127.0.0.1:9092
  group_id: g
routes:
  - name: r
    from:
      topics: [in]
    call:
      http:
        url: http://127.0.0.1:8080/
    retry:
      backoff:
        initial: 200ms
    dead_letter:
      to: dlq
";

/// Fails with `stderr` unless it holds every line of `expected`.
fn says_all(stderr: &str, expected: &[&str]) {
    for says in expected {
        assert!(stderr.contains(says), "missing `{says}` in:\n{stderr}");
    }
}

#[test]
fn a_good_config_validates() {
    let (code, stderr) = validate(GOOD);
    assert_eq!(code, 0, "{stderr}");
}

#[test]
fn unknown_key_is_reported_at_its_line_and_column() {
    let (code, stderr) = validate(&GOOD.replace("    retry:\n", "    retyr:\n"));
    assert_eq!(code, 78);
    assert!(
        stderr.contains("bad.yaml:11:5: routes[0].retyr: unknown key `retyr`"),
        "{stderr}"
    );
}

#[test]
fn bad_duration_is_reported_with_its_path() {
    let (code, stderr) = validate(&GOOD.replace("initial: 200ms", "initial: 200 parsecs"));
    assert_eq!(code, 78);
    assert!(
        stderr.contains("bad.yaml:13:18: routes[0].retry.backoff.initial: `200 parsecs` is not a duration"),
        "{stderr}"
    );
}

#[test]
fn missing_variable_is_reported_where_it_is_used() {
    let (code, stderr) =
        validate(&GOOD.replace("brokers: 127.0.0.1:9092", "brokers: ${FERRY_TEST_SURELY_UNSET}"));
    assert_eq!(code, 78);
    assert!(
        stderr.contains(
            "bad.yaml:2:12: kafka.brokers: environment variable FERRY_TEST_SURELY_UNSET is not set"
        ),
        "{stderr}"
    );
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.yaml");
    std::fs::write(
        &path,
        GOOD.replace("brokers: 127.0.0.1:9092", "brokers: ${FERRY_TEST_SURELY_UNSET}"),
    )
    .unwrap();
    let (code, _, stderr) = ferry(&["validate", "--env-optional", "-c", path.to_str().unwrap()]);
    assert_eq!(code, 0, "--env-optional accepts it: {stderr}");
}

#[test]
fn missing_required_key_and_semantic_errors_are_all_reported() {
    let (code, stderr) = validate(&GOOD.replace("    dead_letter:\n      to: dlq\n", ""));
    assert_eq!(code, 78);
    assert!(
        stderr.contains("routes[0]: `dead_letter` is required here"),
        "{stderr}"
    );
    // Said at the key of the mapping it is missing from.
    let (code, stderr) = validate(&GOOD.replace("  group_id: g\n", ""));
    assert_eq!(code, 78);
    assert!(
        stderr.contains("bad.yaml:1:1: kafka: `group_id` is required here"),
        "{stderr}"
    );

    let two_problems = GOOD
        .replace("group_id: g", "group_id: \"\"")
        .replace("      to: dlq", "      to: in");
    let (code, stderr) = validate(&two_problems);
    assert_eq!(code, 78);
    assert!(stderr.contains("kafka.group_id"), "{stderr}");
    assert!(stderr.contains("routes[0].dead_letter.to"), "{stderr}");
    assert!(stderr.contains("2 errors"), "{stderr}");
}

#[test]
fn yaml_syntax_error_has_a_line() {
    let (code, stderr) = validate("kafka:\n  brokers: [a, b\n");
    assert_eq!(code, 78);
    assert!(stderr.contains("bad.yaml:"), "{stderr}");
    assert!(stderr.contains("not valid YAML"), "{stderr}");
}

#[test]
fn reserved_property_is_refused_with_the_alternative() {
    let text = GOOD.replace(
        "  group_id: g\n",
        "  group_id: g\n  properties:\n    enable.auto.commit: true\n",
    );
    let (code, stderr) = validate(&text);
    assert_eq!(code, 78);
    assert!(stderr.contains("kafka.properties.enable.auto.commit"), "{stderr}");
}

#[test]
fn run_with_a_bad_config_exits_78() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.yaml");
    std::fs::write(&path, "kafka: {}\n").unwrap();
    let (code, _, stderr) = ferry(&["run", "-c", path.to_str().unwrap()]);
    assert_eq!(code, 78, "{stderr}");
    let (code, _, stderr) = ferry(&["run", "-c", "/does/not/exist.yaml"]);
    assert_eq!(code, 78, "{stderr}");
    assert!(stderr.contains("cannot read the config file"), "{stderr}");
}

#[test]
fn usage_errors_exit_2() {
    let (code, _, _) = ferry(&["frobnicate"]);
    assert_eq!(code, 2);
}

#[test]
fn every_config_example_is_valid() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/config-examples");
    let mut checked = 0;
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "yaml") {
            let (code, _, stderr) = ferry(&["validate", "-c", path.to_str().unwrap()]);
            assert_eq!(code, 0, "{}: {stderr}", path.display());
            checked += 1;
        }
    }
    assert!(checked >= 3);
}

#[test]
fn demo_runs_and_shows_every_outcome() {
    let (code, stdout, stderr) = ferry(&["demo", "--records", "120"]);
    assert_eq!(code, 0, "{stdout}\n{stderr}");
    for word in [
        "replied",
        "done",
        "dead_lettered",
        "dropped",
        "reason status",
        "/metrics",
        "received         120",
        "call latency p50",
        "result 2xx",
        "committed offsets",
        "demo.orders.dlq",
    ] {
        assert!(stdout.contains(word), "missing `{word}` in:\n{stdout}");
    }
}

#[test]
fn dev_broker_serves_the_kafka_protocol_on_the_given_port() {
    use rdkafka::ClientConfig;
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
    use std::io::{BufRead, BufReader};
    use std::time::Duration;

    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut child = Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args([
            "dev",
            "broker",
            "--port",
            &port.to_string(),
            "--topic",
            "orders:3",
            "--topic",
            "dlq",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let address = loop {
        let line = lines.next().expect("the broker prints its address").unwrap();
        if let Some(addr) = line.strip_prefix("embedded broker listening on ") {
            break addr.to_string();
        }
    };
    assert_eq!(address, format!("127.0.0.1:{port}"));

    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &address)
        .create()
        .unwrap();
    let md = consumer
        .fetch_metadata(Some("orders"), Duration::from_secs(10))
        .unwrap();
    assert_eq!(
        md.topics()[0].partitions().len(),
        3,
        "--topic NAME:PARTITIONS creates the topic"
    );
    let producer: ThreadedProducer<DefaultProducerContext> = ClientConfig::new()
        .set("bootstrap.servers", &address)
        .create()
        .unwrap();
    producer
        .send(BaseRecord::<str, str>::to("dlq").payload("x"))
        .unwrap();
    producer.flush(Duration::from_secs(10)).unwrap();
    let (_, high) = consumer
        .fetch_watermarks("dlq", 0, Duration::from_secs(10))
        .unwrap();
    assert_eq!(high, 1, "a record was produced through the fixed port");
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn grpc_settings_are_checked() {
    let grpc = |block: &str| GOOD.replace("      http:\n        url: http://127.0.0.1:8080/\n", block);
    let (code, stderr) = validate(&grpc(
        "      grpc:\n        endpoint: http://127.0.0.1:50051\n        method: inventory.v1.Inventory/Check\n",
    ));
    assert_eq!(code, 78);
    assert!(
        stderr.contains("routes[0].call.grpc.method: say where the method's schema comes from"),
        "{stderr}"
    );

    let (code, stderr) = validate(&grpc("      grpc:\n        endpoint: https://127.0.0.1:50051\n"));
    assert_eq!(code, 78);
    assert!(stderr.contains("routes[0].call.grpc.ca_file"), "{stderr}");

    let (code, stderr) = validate(&grpc(
        "      grpc:\n        endpoint: http://127.0.0.1:50051\n        method: nodots\n        reflection: true\n",
    ));
    assert_eq!(code, 78);
    assert!(stderr.contains("`nodots` is not a method"), "{stderr}");

    let (code, stderr) = validate(&grpc(
        "      grpc:\n        endpoint: http://127.0.0.1:50051\n        method: a.B/C\n        descriptor_set: missing.binpb\n",
    ));
    assert_eq!(code, 78);
    assert!(stderr.contains("missing.binpb does not exist"), "{stderr}");

    let both = GOOD.replace(
        "        url: http://127.0.0.1:8080/\n",
        "        url: http://127.0.0.1:8080/\n      grpc:\n        endpoint: http://127.0.0.1:50051\n",
    );
    let (code, stderr) = validate(&both);
    assert_eq!(code, 78);
    assert!(stderr.contains("give either `http` or `grpc`"), "{stderr}");

    let rule = GOOD.replace(
        "    dead_letter:\n",
        "    rules:\n      - when: { grpc: NOT_A_CODE }\n        then: drop\n    dead_letter:\n",
    );
    let (code, stderr) = validate(&rule);
    assert_eq!(code, 78);
    assert!(
        stderr.contains("`NOT_A_CODE` is not a gRPC status code"),
        "{stderr}"
    );
}

#[test]
fn telemetry_settings_are_checked() {
    let (code, stderr) = validate(&format!("{GOOD}telemetry:\n  log: {{ format: yaml }}\n"));
    assert_eq!(code, 78);
    assert!(
        stderr.contains("telemetry.log.format: unknown value `yaml`, expected `text` or `json`"),
        "{stderr}"
    );
    let yaml = format!(
        "{GOOD}telemetry:\n  traces: {{ otlp_endpoint: \"https://collector:4317\", sample_ratio: 1.5 }}\n"
    );
    let (code, stderr) = validate(&yaml);
    assert_eq!(code, 78);
    says_all(
        &stderr,
        &[
            "telemetry.traces.sample_ratio: must be between 0 and 1",
            "telemetry.traces.otlp_endpoint: TLS to the collector is not supported yet",
        ],
    );
    let good = format!(
        "{GOOD}telemetry:\n  log: {{ format: json, level: \"info,ferry=debug\" }}\n  traces: {{ otlp_endpoint: \"http://127.0.0.1:4317\", sample_ratio: 0.25 }}\nadmin:\n  listen: 0.0.0.0:9464\n  token: \"${{FERRY_ADMIN_TOKEN:-}}\"\n"
    );
    let (code, stderr) = validate(&good);
    assert_eq!(code, 0, "{stderr}");
    let (code, stderr) = validate(&format!("{GOOD}telemetry:\n  log: {{ level: \"info,[\" }}\n"));
    assert_eq!(code, 78);
    assert!(stderr.contains("telemetry.log.level"), "{stderr}");
}

#[test]
fn the_committed_schema_is_what_ferry_schema_prints() {
    let (code, printed, stderr) = ferry(&["schema"]);
    assert_eq!(code, 0, "{stderr}");
    let committed = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/config-examples/ferry.schema.json"
    ))
    .unwrap();
    let printed: serde_json::Value = serde_json::from_str(&printed).unwrap();
    let committed: serde_json::Value = serde_json::from_str(&committed).unwrap();
    assert!(
        printed == committed,
        "config-examples/ferry.schema.json is stale: run `cargo run -- schema > config-examples/ferry.schema.json`"
    );
}

/// The schema on its own, as an editor uses it: every example passes, and a broken config fails
/// for each planted reason.
#[test]
fn the_schema_alone_accepts_the_examples_and_rejects_mistakes() {
    let (_, printed, _) = ferry(&["schema"]);
    let schema: serde_json::Value = serde_json::from_str(&printed).unwrap();
    assert_eq!(schema["$schema"], "https://json-schema.org/draft/2020-12/schema");
    let validator = jsonschema::validator_for(&schema).unwrap();
    let yaml = |text: &str| {
        ferry::config::Document::parse(
            text,
            &ferry::config::Interpolator::from_pairs(&[("KAFKA_USER", "u")]),
        )
        .unwrap()
        .value
    };
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/config-examples");
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "yaml") {
            let mut i = ferry::config::Interpolator::from_pairs(&[]);
            i.env_optional = true;
            let doc = ferry::config::Document::parse(&std::fs::read_to_string(&path).unwrap(), &i).unwrap();
            let errors: Vec<String> = validator.iter_errors(&doc.value).map(|e| e.to_string()).collect();
            assert!(errors.is_empty(), "{}: {errors:?}", path.display());
        }
    }
    assert!(validator.is_valid(&yaml(GOOD)));
    assert!(!validator.is_valid(&yaml(&GOOD.replace("    retry:\n", "    retyr:\n"))));
    assert!(!validator.is_valid(&yaml(&GOOD.replace("      to: dlq\n", ""))));
    assert!(!validator.is_valid(&yaml(&GOOD.replace("  group_id: g\n", "  group_id: [g]\n"))));
}

#[test]
fn validate_reports_every_planted_error_with_its_line_at_once() {
    let planted = GOOD
        .replace("  group_id: g\n", "  group_id: g\n  grup: x\n")
        .replace(
            "        url: http://127.0.0.1:8080/\n",
            "        url: http://127.0.0.1:8080/\n        method: 42\n        timeout: soon\n",
        )
        .replace("    dead_letter:\n      to: dlq\n", "    ordering: sideways\n");
    let (code, stderr) = validate(&planted);
    assert_eq!(code, 78);
    says_all(
        &stderr,
        &[
            "bad.yaml:4:3: kafka.grup: unknown key `grup`",
            "bad.yaml:12:17: routes[0].call.http.method: expected string, found `42`",
            "bad.yaml:13:18: routes[0].call.http.timeout: `soon` is not a duration",
            "bad.yaml:17:15: routes[0].ordering: unknown value `sideways`, expected `key` or `partition` or `none`",
            "routes[0]: `dead_letter` is required here",
            "5 errors",
        ],
    );
}

#[test]
fn a_drain_longer_than_the_poll_interval_is_refused() {
    let text = GOOD.replace(
        "  group_id: g\n",
        "  group_id: g\n  properties:\n    max.poll.interval.ms: 20000\n",
    ) + "shutdown:\n  drain_timeout: 30s\n";
    let (code, stderr) = validate(&text);
    assert_eq!(code, 78);
    assert!(
        stderr.contains("shutdown.drain_timeout: must be below max.poll.interval.ms (20s)"),
        "{stderr}"
    );
    // With the drain timeout at its default, which the file does not hold: said at the property,
    // with its line.
    let text = GOOD.replace(
        "  group_id: g\n",
        "  group_id: g\n  properties:\n    max.poll.interval.ms: 1000\n",
    );
    let (code, stderr) = validate(&text);
    assert_eq!(code, 78);
    assert!(
        stderr.contains(
            ":5:27: kafka.properties.max.poll.interval.ms: must be above shutdown.drain_timeout (25s, its default)"
        ),
        "{stderr}"
    );
}

#[test]
fn retry_topics_need_ordering_none_and_their_own_topics() {
    let with = |ordering: &str, topics: &str| {
        GOOD.replace(
            "    retry:\n",
            &format!("    ordering: {ordering}\n    retry:\n      topics: {topics}\n"),
        )
    };
    let (code, stderr) = validate(&with("none", "[in.retry1, in.retry2]"));
    assert_eq!(code, 0, "{stderr}");
    let (code, stderr) = validate(&with("key", "[in.retry1]"));
    assert_eq!(code, 78);
    assert!(
        stderr.contains("routes[0].retry.topics: retry topics reorder"),
        "{stderr}"
    );
    let (code, stderr) = validate(&with("none", "[in]"));
    assert_eq!(code, 78);
    assert!(
        stderr.contains("routes[0].retry.topics[0]: `in` is a source"),
        "{stderr}"
    );
    // A reply written to a retry topic would be read back as a retry of itself, answered, and
    // written there again, growing, until too large.
    for reply in ["reply: { to: in.retry1 }", "reply: { topics: [in.retry1] }"] {
        let (code, stderr) = validate(
            &with("none", "[in.retry1]")
                .replace("    dead_letter:\n", &format!("    {reply}\n    dead_letter:\n")),
        );
        assert_eq!(code, 78, "{reply}: {stderr}");
        assert!(
            stderr.contains(
                "`in.retry1` is also one of this route's retry topics: replies would be consumed again, forever"
            ),
            "{reply}: {stderr}"
        );
    }
}

#[test]
fn broker_addresses_librdkafka_cannot_read_are_refused() {
    let with = |brokers: &str| GOOD.replace("127.0.0.1:9092", &format!("\"{brokers}\""));
    // A trailing comma is nothing to librdkafka either.
    let (code, stderr) = validate(&with("[::1]:9092, SSL://kafka-0.kafka:9093,kafka_1,b:9092,"));
    assert_eq!(code, 0, "{stderr}");
    let (code, stderr) = validate(&with(
        "http://127.0.0.1:19092,not a broker list,127.0.0.1:99999,::1:9092,b:9092",
    ));
    assert_eq!(code, 78, "{stderr}");
    says_all(
        &stderr,
        &[
            "kafka.brokers: `http://127.0.0.1:19092`: Kafka is not reached over `http://`",
            "kafka.brokers: `not a broker list` is not host:port; write host:port[,host:port…]",
            "kafka.brokers: `127.0.0.1:99999`: the port must be a number from 1 to 65535",
            "kafka.brokers: `::1:9092`: an IPv6 address goes in brackets, e.g. [::1]:9092",
            "4 errors in",
        ],
    );
}

#[test]
fn replies_cannot_go_to_the_dead_letter_topic_and_prestop_needs_the_admin_endpoint() {
    let (code, stderr) = validate(
        &GOOD
            .replace(
                "    dead_letter:\n",
                "    reply: { to: out, topics: [dlq] }\n    dead_letter:\n",
            )
            .replace(
                "  group_id: g\n",
                "  group_id: g\nadmin: { listen: null, prestop: true }\n",
            ),
    );
    assert_eq!(code, 78, "{stderr}");
    says_all(
        &stderr,
        &[
            "routes[0].reply.topics[0]: `dlq` is also this route's dead-letter topic: replies would read as dead letters",
            "admin.prestop: `GET /prestop` is served by the admin endpoint, which `listen: null` turns off",
            "2 errors in",
        ],
    );
}

#[test]
fn headers_ferry_sets_per_request_cannot_be_configured() {
    let (code, stderr) = validate(&GOOD.replace(
        "        url: http://127.0.0.1:8080/\n",
        "        url: http://127.0.0.1:8080/\n        headers: { idempotency-key: x, Content-Length: \"5\", ferry-topic: t, x-api: \"1\", content-type: application/json }\n",
    ));
    assert_eq!(code, 78, "{stderr}");
    says_all(
        &stderr,
        &[
            "routes[0].call.http.headers.idempotency-key: ferry sets `idempotency-key` itself, per request (the record's idempotency key): remove it",
            "routes[0].call.http.headers.Content-Length: ferry sets `Content-Length` itself, per request (the body's framing)",
            "routes[0].call.http.headers.ferry-topic: ferry sets `ferry-topic` itself",
            "3 errors in",
        ],
    );
    // Under CloudEvents, the attributes ferry makes; an extension of the service's own goes.
    let (code, stderr) = validate(&GOOD.replace(
        "        url: http://127.0.0.1:8080/\n",
        "        url: http://127.0.0.1:8080/\n        format: cloudevents\n        headers: { ce-id: x, ce-dataschema: s }\n",
    ));
    assert_eq!(code, 78, "{stderr}");
    says_all(
        &stderr,
        &[
            "routes[0].call.http.headers.ce-id: ferry sets `ce-id` itself",
            "1 error in",
        ],
    );
}

#[test]
fn a_demo_of_fewer_records_than_partitions_ends() {
    // One record leaves partitions without any: their lag is nothing to wait for (the demo
    // waited for it, and gave up after two minutes with an error).
    let (code, stdout, stderr) = ferry(&["demo", "--records", "1"]);
    assert_eq!(code, 0, "{stdout}\n{stderr}");
    assert!(stdout.contains("received           1"), "{stdout}");
}

#[test]
fn the_consumer_group_protocol_is_taken() {
    // ferry's cooperative-sticky strategy is the classic protocol's; librdkafka refuses any
    // client-side strategy with `group.protocol: consumer`.
    let (code, stderr) = validate(&GOOD.replace(
        "  group_id: g\n",
        "  group_id: g\n  properties:\n    group.protocol: consumer\n",
    ));
    assert_eq!(code, 0, "{stderr}");
}

#[test]
fn a_log_level_that_is_no_level_is_refused() {
    let (code, stderr) = validate(&format!("{GOOD}telemetry:\n  log:\n    level: warning\n"));
    assert_eq!(code, 78, "{stderr}");
    assert!(
        stderr.contains("telemetry.log.level: `warning` is not a level"),
        "{stderr}"
    );
    let (code, stderr) = validate(&format!(
        "{GOOD}telemetry:\n  log:\n    level: \"warn,ferry::consume,rdkafka=debug\"\n"
    ));
    assert_eq!(code, 0, "{stderr}");
}

#[test]
fn a_log_setting_in_the_environment_that_means_nothing_is_a_config_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ferry.yaml");
    std::fs::write(
        &path,
        "kafka: { brokers: 127.0.0.1:9, group_id: g }\nroutes:\n  - name: r\n    from: { topics: [in] }\n    call: { http: { url: \"http://127.0.0.1:9/\" } }\n    dead_letter: { to: dlq }\n",
    )
    .unwrap();
    for (var, value, says) in [
        (
            "FERRY_LOG",
            "bogus===",
            "FERRY_LOG: `bogus===` is not a log filter",
        ),
        // A typo of a level is a target name to tracing, which then shows nothing else.
        (
            "FERRY_LOG",
            "info,warning",
            "FERRY_LOG: `info,warning` is not a log filter (`warning` is not a level (error, warn, info, debug, trace, off); to show one target, write it with its level (`ferry=debug`))",
        ),
        (
            "FERRY_LOG_FORMAT",
            "xml",
            "FERRY_LOG_FORMAT: `xml` is not a log format: write text or json",
        ),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_ferry"))
            .args(["run", "-c", path.to_str().unwrap()])
            .env(var, value)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(78), "{var}={value}: {stderr}");
        assert!(stderr.contains(says), "{stderr}");
    }
}

#[test]
fn topic_names_kafka_refuses_are_reported_at_load() {
    let (code, stderr) = validate(
        &GOOD
            .replace("topics: [in]", "topics: [in, 'x y', '']")
            .replace("to: dlq", "to: a/b"),
    );
    assert_eq!(code, 78, "{stderr}");
    says_all(
        &stderr,
        &[
            "routes[0].from.topics[1]: `x y` is not a topic name Kafka accepts",
            "routes[0].from.topics[2]: a topic name cannot be empty",
            "routes[0].dead_letter.to: `a/b` is not a topic name Kafka accepts: use letters, digits, `.`, `_` and `-`",
        ],
    );
}

#[test]
fn an_admin_port_in_use_is_named_once_with_what_to_change() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ferry.yaml");
    std::fs::write(
        &path,
        format!("kafka: {{ brokers: 127.0.0.1:9, group_id: g }}\nroutes:\n  - name: r\n    from: {{ topics: [in] }}\n    call: {{ http: {{ url: \"http://127.0.0.1:9/\" }} }}\n    dead_letter: {{ to: dlq }}\nadmin: {{ listen: 127.0.0.1:{port} }}\n"),
    )
    .unwrap();
    let (code, _, stderr) = ferry(&["run", "-c", path.to_str().unwrap()]);
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("(change admin.listen)"), "{stderr}");
    assert_eq!(stderr.matches("Address already in use").count(), 1, "{stderr}");

    // With JSON logs, the reason is a JSON line too; so is a config that does not load.
    let json_run = |config: &std::path::Path| {
        let out = Command::new(env!("CARGO_BIN_EXE_ferry"))
            .args(["run", "-c", config.to_str().unwrap()])
            .env("FERRY_LOG_FORMAT", "json")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        let lines: Vec<serde_json::Value> = stderr
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
            .collect();
        (out.status.code(), lines)
    };
    let (code, lines) = json_run(&path);
    assert_eq!(code, Some(1));
    assert!(
        lines
            .iter()
            .any(|l| l["level"] == "ERROR" && l.to_string().contains("(change admin.listen)")),
        "{lines:?}"
    );
    let bad = dir.path().join("bad.yaml");
    std::fs::write(&bad, "kafka: {}\n").unwrap();
    let (code, lines) = json_run(&bad);
    assert_eq!(code, Some(78));
    assert!(
        lines
            .iter()
            .any(|l| l["level"] == "ERROR" && l.to_string().contains("is required here")),
        "{lines:?}"
    );
}

#[test]
fn value_errors_say_what_would_be_valid() {
    for (from, to, says) in [
        (
            "initial: 200ms",
            "initial: 200ms\n        jitter: some",
            "routes[0].retry.backoff.jitter: unknown value `some`, expected `none` or `full` or `equal`",
        ),
        (
            "    retry:\n",
            "    retry:\n      max_attempts: -3\n",
            "routes[0].retry.max_attempts: -3 is less than the minimum of 1",
        ),
        (
            "routes:",
            "admin: { listen: \"localhost:9464\" }\nroutes:",
            "admin.listen: not an address to listen on: write IP:PORT",
        ),
        (
            "routes:",
            "admin: { listen: 9464 }\nroutes:",
            "admin.listen: expected null or string, found `9464`",
        ),
    ] {
        let (code, stderr) = validate(&GOOD.replace(from, to));
        assert_eq!(code, 78, "{stderr}");
        assert!(stderr.contains(says), "missing `{says}` in:\n{stderr}");
    }
}

#[test]
fn schema_errors_and_errors_across_fields_are_reported_together() {
    // The rules that span fields looked at a file only once the schema took it: a typo hid
    // every other mistake until it was fixed.
    let (code, stderr) = validate(
        &GOOD
            .replace("  group_id: g\n", "  group_id: g\n  comit_interval: 1s\n")
            .replace(
                "        url: http://127.0.0.1:8080/\n",
                "        url: http://127.0.0.1:8080/\n        timeout: 0s\n",
            )
            .replace(
                "        initial: 200ms\n",
                "        initial: 200ms\n        jitter: some\n",
            )
            .replace(
                "    retry:\n",
                "    concurrency: { per_partition: eight, total: 16 }\n    retry:\n",
            )
            .replace("to: dlq", "to: in"),
    );
    assert_eq!(code, 78, "{stderr}");
    says_all(
        &stderr,
        &[
            "kafka.comit_interval: unknown key `comit_interval`",
            "routes[0].call.http.timeout: must be above zero",
            "routes[0].retry.backoff.jitter: unknown value `some`",
            "routes[0].concurrency.per_partition: expected integer, found `eight`",
            "routes[0].dead_letter.to: the dead-letter topic cannot be a source of the same route",
            "5 errors in",
        ],
    );
    // Nothing about the default that stood in for the refused value (per_partition's 32).
    assert!(!stderr.contains("concurrency.total"), "{stderr}");
}

#[test]
fn an_unknown_key_names_the_key_meant_or_the_keys_taken() {
    let (code, stderr) = validate(
        &GOOD
            .replace(
                "        url: http://127.0.0.1:8080/\n",
                "        url: http://127.0.0.1:8080/\n        timout: 1s\n",
            )
            .replace("    retry:\n", "    zzz: 1\n    retry:\n"),
    );
    assert_eq!(code, 78, "{stderr}");
    assert!(
        stderr.contains("routes[0].call.http.timout: unknown key `timout`; did you mean `timeout`?"),
        "{stderr}"
    );
    assert!(
        stderr.contains("routes[0].zzz: unknown key `zzz`; this mapping takes `call`, `circuit`"),
        "{stderr}"
    );
}
