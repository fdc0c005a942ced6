//! Payload contracts and request shaping through the real binary: schema-invalid records and
//! replies become dead letters with the right headers, a broken schema file is a config error
//! at its key, and `format: cloudevents` sends the CloudEvents binary-mode headers.

mod common;

use std::time::Duration;

use common::*;

const WAIT: Duration = Duration::from_secs(30);

const ORDER: &str = r#"{
  "type": "object",
  "required": ["id", "amount"],
  "properties": {
    "id": { "type": "string" },
    "amount": { "type": "number", "minimum": 0 }
  }
}"#;

const RESULT: &str = r#"{
  "type": "object",
  "required": ["status"],
  "properties": { "status": { "enum": ["approved", "rejected"] } }
}"#;

#[tokio::test]
async fn records_and_replies_that_break_their_schema_are_dead_lettered_with_the_failing_path() {
    let kafka = Kafka::start();
    let t = kafka.route_topics(1).await;
    // The service approves, except for order "weird", to which it answers off-contract.
    let service = Service::start(|r: Req| async move {
        if r.body.contains("weird") {
            Resp::new(200, r#"{"status":"maybe"}"#)
        } else {
            Resp::new(200, r#"{"status":"approved"}"#)
        }
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("schemas")).unwrap();
    std::fs::write(dir.path().join("schemas/order.json"), ORDER).unwrap();
    std::fs::write(dir.path().join("schemas/result.json"), RESULT).unwrap();
    let text = route_config(
        &kafka,
        &t,
        &service.url("/orders"),
        "    validate:\n      schema: schemas/order.json\n",
    )
    .replace(
        &format!("      to: {}\n", t.reply),
        &format!("      to: {}\n      schema: schemas/result.json\n", t.reply),
    );
    let config = dir.path().join("ferry.yaml");
    std::fs::write(&config, &text).unwrap();
    let (code, _, stderr) = run_ferry(&["validate", "-c", config.to_str().unwrap()]);
    assert_eq!(code, 0, "{stderr}");
    let _ferry = Ferry::spawn(&config, &dir.path().join("ferry.log"));

    kafka
        .send(&t.source, None, Some("1"), r#"{"id":"1","amount":5}"#, &[])
        .await;
    kafka
        .send(&t.source, None, Some("2"), r#"{"id":2,"amount":-5}"#, &[])
        .await;
    kafka.send(&t.source, None, Some("3"), "amount=5", &[]).await;
    kafka
        .send(&t.source, None, Some("4"), r#"{"id":"weird","amount":1}"#, &[])
        .await;
    // The violation quotes the offending value, here 8 KiB of it.
    let huge = format!(r#"{{"id":["{}"],"amount":1}}"#, "x".repeat(8192));
    kafka.send(&t.source, None, Some("5"), &huge, &[]).await;

    let dead = kafka.read(&t.dlq, 4, WAIT).await;
    assert_eq!(dead.len(), 4);
    let by_key = |k: &str| dead.iter().find(|r| r.key.as_deref() == Some(k)).unwrap();
    let invalid = by_key("2");
    assert_eq!(invalid.header("ferry.error.reason"), Some("schema"));
    let message = invalid.header("ferry.error.message").unwrap();
    assert!(
        message.contains("at /amount: -5 is less than the minimum of 0"),
        "{message}"
    );
    assert!(
        message.contains("at /id: 2 is not of type \"string\""),
        "{message}"
    );
    assert_eq!(
        invalid.header("ferry.attempts"),
        Some("0"),
        "it never reached the service"
    );
    assert_eq!(
        invalid.value.as_deref(),
        Some(r#"{"id":2,"amount":-5}"#),
        "the payload is kept"
    );
    let not_json = by_key("3");
    assert_eq!(not_json.header("ferry.error.reason"), Some("schema"));
    assert!(
        not_json
            .header("ferry.error.message")
            .unwrap()
            .contains("is not JSON")
    );
    let off_contract = by_key("4");
    assert_eq!(off_contract.header("ferry.error.reason"), Some("reply_schema"));
    assert_eq!(
        off_contract.header("ferry.error.status"),
        Some("200"),
        "the service's answer"
    );
    let message = off_contract.header("ferry.error.message").unwrap();
    assert!(
        message.starts_with("the service's reply does not match its schema: at /status:"),
        "{message}"
    );
    assert_eq!(off_contract.header("ferry.attempts"), Some("1"));
    let long = by_key("5").header("ferry.error.message").unwrap();
    assert!(
        long.starts_with("the record's value does not match its schema: at /id: [") && long.len() <= 1024,
        "capped at 1 KiB: {} bytes, starting {}",
        long.len(),
        &long[..long.len().min(80)]
    );

    let replies = kafka.read(&t.reply, 1, WAIT).await;
    assert_eq!(replies.len(), 1);
    assert_eq!(replies[0].key.as_deref(), Some("1"));
    eventually(WAIT, "all five committed", || async {
        (kafka.committed_total(&t.group, &t.source, 1).await == 5).then_some(())
    })
    .await;
    assert_eq!(
        kafka.read_all(&t.reply).await.len(),
        1,
        "the off-contract reply was not published"
    );
    let called: Vec<String> = service.requests().iter().map(|r| r.body.clone()).collect();
    assert_eq!(
        called.len(),
        2,
        "only the valid records reached the service: {called:?}"
    );
}

fn run_ferry(args: &[&str]) -> (i32, String, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn a_broken_schema_file_is_a_config_error_at_its_key() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("broken.json"), "{ \"type\": \"object\", }").unwrap();
    std::fs::write(dir.path().join("wrong.json"), r#"{ "type": "strnig" }"#).unwrap();
    let config = dir.path().join("ferry.yaml");
    std::fs::write(
        &config,
        "kafka:\n  brokers: 127.0.0.1:9092\n  group_id: g\nroutes:\n  - name: r\n    from:\n      topics: [in]\n    call:\n      http:\n        url: http://127.0.0.1:8080/\n    validate:\n      schema: broken.json\n    reply:\n      to: out\n      schema: wrong.json\n    dead_letter:\n      to: dlq\n  - name: s\n    from:\n      topics: [in2]\n    call:\n      http:\n        url: http://127.0.0.1:8080/\n    validate:\n      schema: missing.json\n    dead_letter:\n      to: dlq\n",
    )
    .unwrap();
    let (code, _, stderr) = run_ferry(&["validate", "-c", config.to_str().unwrap()]);
    assert_eq!(code, 78, "{stderr}");
    for expected in [
        ":12:15: routes[0].validate.schema: the schema `",
        "broken.json` is not JSON: trailing comma at line 1 column 21",
        ":15:15: routes[0].reply.schema: `",
        "wrong.json` is not a valid JSON Schema",
        ":25:15: routes[1].validate.schema: cannot read the schema `",
        "3 errors",
    ] {
        assert!(stderr.contains(expected), "missing `{expected}` in:\n{stderr}");
    }
}

#[tokio::test]
async fn cloudevents_format_sends_binary_mode_headers() {
    let kafka = Kafka::start();
    let t = kafka.route_topics(1).await;
    let service = Service::start(|_r: Req| async move { Resp::new(204, "") }).await;
    let text = route_config(&kafka, &t, &service.url("/events"), "").replace(
        "        timeout: 2s\n",
        "        timeout: 2s\n        format: cloudevents\n",
    );
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("ferry.yaml");
    std::fs::write(&config, &text).unwrap();
    let _ferry = Ferry::spawn(&config, &dir.path().join("ferry.log"));
    kafka
        .send_at(&t.source, "order-7", r#"{"id":"7"}"#, 1_769_860_800_123)
        .await;
    // A record that already is a CloudEvent (Kafka binary mode) keeps its attributes.
    kafka
        .send(
            &t.source,
            None,
            Some("k"),
            "{}",
            &[
                ("ce_specversion", "1.0"),
                ("ce_id", "evt-42"),
                ("ce_source", "/orders/api"),
                ("ce_type", "com.example.order.created"),
                ("ce_traceparent", "x"),
                ("content-type", "application/json"),
            ],
        )
        .await;
    let requests = eventually(WAIT, "two calls", || async {
        let r = service.requests();
        (r.len() >= 2).then_some(r)
    })
    .await;
    // Different keys run concurrently: find each by its body.
    let plain = requests.iter().find(|r| r.body.contains("7")).unwrap();
    assert_eq!(plain.header("ce-specversion"), Some("1.0"));
    assert_eq!(plain.header("ce-id"), Some(format!("{}/0/0", t.source).as_str()));
    assert_eq!(
        plain.header("ce-source"),
        Some(format!("kafka:{}", t.source).as_str())
    );
    assert_eq!(plain.header("ce-type"), Some("ferry.record"));
    assert_eq!(plain.header("ce-time"), Some("2026-01-31T12:00:00.123Z"));
    assert_eq!(plain.header("ce-subject"), Some("order-7"));
    assert_eq!(
        plain.header("ferry-offset"),
        Some("0"),
        "ferry's own headers travel too"
    );
    assert_eq!(plain.body, r#"{"id":"7"}"#, "binary mode: the body is the data");
    let event = requests.iter().find(|r| r.body == "{}").unwrap();
    assert_eq!(event.header("ce-id"), Some("evt-42"));
    assert_eq!(event.header("ce-source"), Some("/orders/api"));
    assert_eq!(event.header("ce-type"), Some("com.example.order.created"));
    assert_eq!(event.header("ce-traceparent"), Some("x"), "extensions travel");
    assert_eq!(event.header("content-type"), Some("application/json"));
}
