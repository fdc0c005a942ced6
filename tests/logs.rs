//! Logs: JSON lines with record coordinates as fields, and no secret anywhere — not in logs at
//! any level, not in `/status`, not in `/metrics`.

mod common;

use std::time::Duration;

use common::*;

const WAIT: Duration = Duration::from_secs(30);

#[tokio::test]
async fn secrets_never_appear_in_trace_logs_status_or_metrics() {
    let kafka = Kafka::start();
    let t = kafka.route_topics(1).await;
    let service = Service::start(|r: Req| async move {
        if r.body.starts_with("bad") {
            Resp::new(422, "invalid")
        } else {
            Resp::new(200, &r.body)
        }
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let kafka_password = "kafka-pa55word-planted";
    let admin_token = "admin-t0ken-planted";
    let service_token = "service-t0ken-planted";
    std::fs::write(dir.path().join("kafka-password"), kafka_password).unwrap();
    let port = free_port();
    let text = route_config(&kafka, &t, &service.url("/h"), "")
        .replace(
            "    session.timeout.ms: 6000\n",
            &format!(
                "    session.timeout.ms: 6000\n    sasl.username: ferry\n    sasl.password: \"${{file:{}/kafka-password}}\"\n",
                dir.path().display()
            ),
        )
        .replace(
            "        timeout: 2s\n",
            "        timeout: 2s\n        headers: { authorization: \"Bearer ${SERVICE_TOKEN}\" }\n",
        )
        .replace(
            "admin:\n  listen: 127.0.0.1:0\n",
            &format!(
                "admin:\n  listen: 127.0.0.1:{port}\n  token: \"${{FERRY_ADMIN_TOKEN}}\"\ntelemetry:\n  log: {{ format: json, level: trace }}\n"
            ),
        );
    assert!(text.contains("sasl.password") && text.contains("SERVICE_TOKEN") && text.contains("json"));
    let config = dir.path().join("ferry.yaml");
    std::fs::write(&config, &text).unwrap();
    let log = dir.path().join("ferry.log");
    let mut ferry = Ferry::spawn_with(
        &config,
        &log,
        &[
            ("FERRY_ADMIN_TOKEN", admin_token),
            ("SERVICE_TOKEN", service_token),
            // The level comes from the config; make sure the environment does not lower it.
            ("FERRY_LOG", "trace"),
        ],
    );
    let base = format!("http://127.0.0.1:{port}");
    eventually(WAIT, "ferry ready", || async {
        let ok = reqwest::get(format!("{base}/readyz")).await.ok()?.status() == 200;
        ok.then_some(())
    })
    .await;
    kafka.send(&t.source, None, Some("k1"), "good", &[]).await;
    kafka.send(&t.source, None, Some("k2"), "bad", &[]).await;
    kafka.read(&t.dlq, 1, WAIT).await;
    kafka.read(&t.reply, 1, WAIT).await;
    assert!(
        service.requests()[0].header("authorization") == Some(&format!("Bearer {service_token}")),
        "the configured header reached the service"
    );
    let (_, _, status) = admin_call("GET", &format!("{base}/status"), None).await;
    let (_, _, metrics) = admin_call("GET", &format!("{base}/metrics"), None).await;
    let (code, _, _) = admin_call("POST", &format!("{base}/pause"), Some("wrong")).await;
    assert_eq!(code, 200, "on loopback the verbs are open");
    ferry.signal(libc::SIGTERM);
    assert_eq!(ferry.exit_code(WAIT).await, Some(0));
    let logs = std::fs::read_to_string(&log).unwrap();
    assert!(logs.lines().count() > 50, "trace level logs a lot:\n{logs}");
    for secret in [kafka_password, admin_token, service_token] {
        for (what, text) in [("logs", &logs), ("/status", &status), ("/metrics", &metrics)] {
            assert!(!text.contains(secret), "`{secret}` appears in {what}");
        }
    }

    // Every line is a JSON event; the dead letter's line names the record by its coordinates.
    let events: Vec<serde_json::Value> = logs
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    let dead = events
        .iter()
        .find(|e| e["fields"]["message"] == "Dead-lettering record")
        .expect("a log event for the dead letter");
    let fields = &dead["fields"];
    assert_eq!(fields["record.topic"], t.source.as_str());
    assert_eq!(fields["record.partition"], 0);
    assert_eq!(fields["record.offset"], 1);
    assert_eq!(fields["reason"], "status");
    assert_eq!(fields["route"], "test");
    assert_eq!(dead["level"], "INFO");
}

/// A broker that cannot be reached is reported by librdkafka at every reconnect attempt; the log
/// says so once (then once per 30 s), so that what an operator needs is not buried.
#[tokio::test]
async fn an_unreachable_broker_is_logged_without_a_storm_of_repeats() {
    let dir = tempfile::tempdir().unwrap();
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let text = format!(
        "kafka:\n  brokers: \"{closed}\"\n  group_id: g\nroutes:\n  - name: r\n    from: {{ topics: [in] }}\n    call: {{ http: {{ url: \"http://127.0.0.1:9/\" }} }}\n    dead_letter: {{ to: dlq }}\nadmin:\n  listen: 127.0.0.1:0\n"
    );
    let config = dir.path().join("ferry.yaml");
    std::fs::write(&config, text).unwrap();
    let log = dir.path().join("ferry.log");
    let mut ferry = Ferry::spawn(&config, &log);
    tokio::time::sleep(Duration::from_secs(4)).await;
    ferry.signal(libc::SIGTERM);
    let _ = ferry.exit_code(WAIT).await;
    let text = std::fs::read_to_string(&log).unwrap();
    let errors: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("Kafka producer error") || l.contains("Kafka client error"))
        .collect();
    assert!(
        text.contains("AllBrokersDown") || text.contains("Connection refused"),
        "the log says the broker cannot be reached:\n{text}"
    );
    let mut distinct = errors.clone();
    distinct.sort_by_key(|l| l.split("error=").nth(1).unwrap_or(l).to_string());
    distinct.dedup_by_key(|l| l.split("error=").nth(1).unwrap_or(l).to_string());
    assert_eq!(
        errors.len(),
        distinct.len(),
        "each client error once in 4 s, not at every reconnect:\n{}",
        errors.join("\n")
    );
}
