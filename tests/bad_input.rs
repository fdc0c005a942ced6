//! Records that are awkward on purpose: binary keys and header values, headers that would break
//! HTTP, empty values, tombstones, and a reply too large for the reply topic. Each has a defined
//! outcome, and none wedges a partition.

mod common;

use std::time::Duration;

use base64::Engine;
use common::*;
use ferry::outcome::Outcome;
use ferry::sidecar::Sidecar;

const WAIT: Duration = Duration::from_secs(30);

#[tokio::test]
async fn awkward_records_each_get_their_defined_outcome() {
    let kafka = Kafka::start();
    let t = kafka.route_topics(1).await;
    let service = Service::start(|r: Req| async move {
        if r.body == "huge" {
            // Twice librdkafka's default message.max.bytes: no broker takes it as a reply.
            Resp::new(200, &"x".repeat(2 * 1024 * 1024))
        } else {
            Resp::new(200, &format!("seen:{}", r.body))
        }
    })
    .await;
    let text = route_config(&kafka, &t, &service.url("/h"), "    ordering: partition\n");
    let sidecar = Sidecar::start(parse(&text)).await.expect("sidecar starts");

    // 0: a key that is not UTF-8, and a header value that is not either.
    kafka
        .send_raw(
            &t.source,
            Some(&[0xff, 0x00, 0xfe]),
            Some(b"binary"),
            &[("trace-bytes", &[0xc3, 0x28])],
        )
        .await;
    // 1: headers that would break an HTTP request: a newline, a `host` header, an empty name.
    kafka
        .send_raw(
            &t.source,
            Some(b"k1"),
            Some(b"sneaky"),
            &[
                ("x-evil", b"a\r\nInjected: yes"),
                ("host", b"attacker.example"),
                ("", b"nameless"),
            ],
        )
        .await;
    // 2: an empty value; 3: a tombstone.
    kafka.send_raw(&t.source, Some(b"k2"), Some(b""), &[]).await;
    kafka.send_raw(&t.source, Some(b"k3"), None, &[]).await;
    // 4: a reply too large for the reply topic; 5: and a record after it.
    kafka.send_raw(&t.source, Some(b"k4"), Some(b"huge"), &[]).await;
    kafka.send_raw(&t.source, Some(b"k5"), Some(b"after"), &[]).await;

    eventually(WAIT, "all six committed", || async {
        (kafka.committed_total(&t.group, &t.source, 1).await == 6).then_some(())
    })
    .await;
    let requests = service.requests();
    let by_body = |b: &str| {
        requests
            .iter()
            .find(|r| r.body == b)
            .unwrap_or_else(|| panic!("no call for {b:?}"))
    };

    // The binary key travels as base64; the non-text header value is forwarded as raw bytes
    // where HTTP allows them, or left out, never mangled into something else.
    let binary = by_body("binary");
    assert_eq!(binary.header("ferry-key"), None);
    assert_eq!(
        binary.header("ferry-key-base64"),
        Some(
            base64::engine::general_purpose::STANDARD
                .encode([0xff, 0x00, 0xfe])
                .as_str()
        )
    );

    // Header injection is impossible: the value with a newline is not forwarded, the record's
    // `host` travels as ferry-header-host and the request's Host is the service's.
    let sneaky = by_body("sneaky");
    assert_eq!(sneaky.header("ferry-header-x-evil"), None);
    assert_eq!(sneaky.header("injected"), None);
    assert_eq!(sneaky.header("ferry-header-host"), Some("attacker.example"));
    assert_eq!(sneaky.header("host"), Some(service.addr.to_string().as_str()));

    // The empty value and the tombstone are called with an empty body.
    assert_eq!(requests.iter().filter(|r| r.body.is_empty()).count(), 2);

    // The reply that no broker would take is dead-lettered as too large, once, not retried forever.
    let dead = kafka.read(&t.dlq, 1, WAIT).await;
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].header("ferry.error.reason"), Some("too_large"));
    assert_eq!(
        dead[0].header("ferry.error.status"),
        Some("200"),
        "the service's answer"
    );
    assert!(
        dead[0]
            .header("ferry.error.message")
            .unwrap()
            .contains("could not be published")
    );
    assert_eq!(dead[0].value.as_deref(), Some("huge"), "the input is kept");
    assert_eq!(requests.iter().filter(|r| r.body == "huge").count(), 1);

    let replies = kafka.read(&t.reply, 5, WAIT).await;
    let values: Vec<&str> = replies.iter().filter_map(|r| r.value.as_deref()).collect();
    assert!(
        values.contains(&"seen:after"),
        "the partition went on: {values:?}"
    );
    let s = &sidecar.snapshot()[0];
    assert_eq!(s.get(Outcome::Replied), 5, "{s:?}");
    assert_eq!(s.get(Outcome::DeadLettered), 1, "{s:?}");
}
