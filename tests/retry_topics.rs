//! Retry topics (`retry.topics`, ordering `none`): a failing record moves on to be tried again
//! later, so it does not hold up its partition; attempts and the idempotency key carry over; after
//! the last retry topic comes the dead-letter topic.

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use ferry::outcome::Outcome;
use ferry::sidecar::Sidecar;

const WAIT: Duration = Duration::from_secs(30);

struct Bench {
    kafka: Kafka,
    t: RouteTopics,
    retries: [String; 2],
    service: Service,
    sidecar: Sidecar,
}

/// The service fails a value `fail-N` with 503 for its first N calls, and answers 200 otherwise.
async fn bench() -> Bench {
    bench_with("").await
}

/// [`bench`], with these lines added to the route's `http` block.
async fn bench_with(http: &str) -> Bench {
    let kafka = Kafka::start();
    let t = kafka.route_topics(1).await;
    let retries = [kafka.topic("retry1", 1).await, kafka.topic("retry2", 1).await];
    let calls: Arc<Mutex<HashMap<String, u32>>> = Arc::default();
    let service = Service::start(move |r: Req| {
        let n = {
            let mut c = calls.lock().unwrap();
            let n = c.entry(r.body.clone()).or_default();
            *n += 1;
            *n
        };
        async move {
            let fails: u32 = r
                .body
                .strip_prefix("fail-")
                .and_then(|n| n.parse().ok())
                .unwrap_or(0);
            if n <= fails {
                Resp::new(503, "not yet")
            } else {
                Resp::new(200, &format!("ok:{}", r.body))
            }
        }
    })
    .await;
    let extra = format!(
        "    ordering: none\n    retry:\n      max_attempts: 10\n      backoff: {{ initial: 700ms, max: 700ms, jitter: none }}\n      topics: [{}, {}]\n",
        retries[0], retries[1]
    );
    let text = route_config(&kafka, &t, &service.url("/h"), "")
        .replace(
            "    retry:\n      max_attempts: 3\n      backoff: { initial: 10ms, max: 50ms }\n",
            &extra,
        )
        .replace("        timeout: 2s\n", &format!("        timeout: 2s\n{http}"));
    assert!(text.contains("topics: ["), "{text}");
    let sidecar = Sidecar::start(parse(&text)).await.expect("sidecar starts");
    Bench {
        kafka,
        t,
        retries,
        service,
        sidecar,
    }
}

#[tokio::test]
async fn a_failing_record_moves_through_retry_topics_without_holding_up_its_partition() {
    let b = bench().await;
    let sent = Instant::now();
    b.kafka
        .send(&b.t.source, Some(0), Some("slow"), "fail-2", &[])
        .await;
    for i in 0..3 {
        b.kafka
            .send(
                &b.t.source,
                Some(0),
                Some(&format!("k{i}")),
                &format!("fast-{i}"),
                &[],
            )
            .await;
    }
    // The later records are replied to, and the source partition committed past the failing
    // one, long before its retries are due.
    let replies = b.kafka.read(&b.t.reply, 3, WAIT).await;
    assert!(
        replies
            .iter()
            .all(|r| r.value.as_deref().unwrap().starts_with("ok:fast-")),
        "{replies:?}"
    );
    eventually(
        WAIT,
        "the source partition committed past the failing record",
        || async { (b.kafka.committed_total(&b.t.group, &b.t.source, 1).await == 4).then_some(()) },
    )
    .await;
    let fast_offsets: Vec<i64> = replies.iter().map(|r| r.offset).collect();

    let replies = b.kafka.read(&b.t.reply, 4, WAIT).await;
    let slow = replies
        .iter()
        .find(|r| r.value.as_deref() == Some("ok:fail-2"))
        .expect("the failing record's reply");
    assert!(
        sent.elapsed() >= Duration::from_millis(1400),
        "two backoffs of 700 ms"
    );
    assert!(
        fast_offsets.iter().all(|&o| o < slow.offset),
        "the later records were replied to before the failing one: {fast_offsets:?} vs {}",
        slow.offset
    );
    // Its lineage points at where it was first consumed.
    assert_eq!(slow.header("ferry.source.topic"), Some(b.t.source.as_str()));
    assert_eq!(slow.header("ferry.source.offset"), Some("0"));

    // It passed through both retry topics, counting attempts, with the same idempotency key.
    let first = &b.kafka.read(&b.retries[0], 1, WAIT).await[0];
    let second = &b.kafka.read(&b.retries[1], 1, WAIT).await[0];
    let key = format!("{}/0/0", b.t.source);
    for (r, hop) in [(first, "1"), (second, "2")] {
        assert_eq!(r.header("ferry.retry.hop"), Some(hop));
        assert_eq!(r.header("ferry.idempotency_key"), Some(key.as_str()));
        assert_eq!(r.header("ferry.source.topic"), Some(b.t.source.as_str()));
        assert!(r.header("ferry.retry.not_before").is_some());
        assert_eq!(r.value.as_deref(), Some("fail-2"));
        assert_eq!(r.key.as_deref(), Some("slow"));
    }
    assert_eq!(first.header("ferry.attempts"), Some("1"));
    assert_eq!(second.header("ferry.attempts"), Some("2"));
    let calls: Vec<(String, String, String, Option<String>)> = b
        .service
        .requests()
        .iter()
        .filter(|r| r.body == "fail-2")
        .map(|r| {
            (
                r.header("ferry-attempt").unwrap().to_string(),
                r.header("idempotency-key").unwrap().to_string(),
                r.header("ferry-topic").unwrap().to_string(),
                r.header("ferry-header-ferry.source.topic").map(str::to_string),
            )
        })
        .collect();
    // A retry topic's copy is called as that topic's record, its lineage among its headers.
    let origin = Some(b.t.source.clone());
    assert_eq!(
        calls,
        vec![
            ("1".into(), key.clone(), b.t.source.clone(), None),
            ("2".into(), key.clone(), b.retries[0].clone(), origin.clone()),
            ("3".into(), key.clone(), b.retries[1].clone(), origin)
        ]
    );
    eventually(WAIT, "the retry topics committed too", || async {
        let a = b.kafka.committed_total(&b.t.group, &b.retries[0], 1).await;
        let c = b.kafka.committed_total(&b.t.group, &b.retries[1], 1).await;
        (a == 1 && c == 1).then_some(())
    })
    .await;
    let s = &b.sidecar.snapshot()[0];
    assert_eq!(s.get(Outcome::Deferred), 2, "{s:?}");
    assert_eq!(s.get(Outcome::Replied), 4, "{s:?}");
    assert_eq!(s.received, 6, "four from the source, two from the retry topics");
}

#[tokio::test]
async fn after_the_last_retry_topic_the_record_is_dead_lettered() {
    let b = bench().await;
    b.kafka
        .send(&b.t.source, Some(0), Some("bad"), "fail-99", &[])
        .await;
    let dead = &b.kafka.read(&b.t.dlq, 1, WAIT).await[0];
    assert_eq!(dead.header("ferry.error.reason"), Some("status"));
    assert_eq!(dead.header("ferry.error.status"), Some("503"));
    assert_eq!(dead.header("ferry.attempts"), Some("3"), "one attempt per topic");
    assert!(
        dead.header("ferry.error.message")
            .unwrap()
            .contains("after the last retry topic")
    );
    assert_eq!(dead.header("ferry.source.topic"), Some(b.t.source.as_str()));
    assert_eq!(dead.header("ferry.source.offset"), Some("0"));
    assert_eq!(
        dead.header("ferry.idempotency_key"),
        Some(format!("{}/0/0", b.t.source).as_str())
    );
    assert!(
        dead.header("ferry.retry.hop").is_none(),
        "re-driven, it starts afresh"
    );
    assert_eq!(dead.value.as_deref(), Some("fail-99"));
    // The timestamp the record first arrived with travels through the retry topics, as the
    // rest of its lineage does.
    let mut copies = Vec::new();
    for topic in &b.retries {
        copies.push(b.kafka.read(topic, 1, WAIT).await.remove(0));
    }
    let first = copies[0].header("ferry.source.timestamp");
    assert!(first.is_some(), "{:?}", copies[0]);
    assert_eq!(copies[1].header("ferry.source.timestamp"), first);
    assert_eq!(dead.header("ferry.source.timestamp"), first);
}

/// In CloudEvents format an event's identity is (source, id): every attempt, on whichever retry
/// topic, is the same event, with the same source and time.
#[tokio::test]
async fn a_cloud_event_keeps_its_source_and_time_through_the_retry_topics() {
    let b = bench_with("        format: cloudevents\n").await;
    b.kafka.send(&b.t.source, Some(0), Some("k"), "fail-2", &[]).await;
    b.kafka.read(&b.t.reply, 1, WAIT).await;
    let calls: Vec<_> = b
        .service
        .requests()
        .into_iter()
        .filter(|r| r.body == "fail-2")
        .collect();
    assert_eq!(calls.len(), 3, "the source, then each retry topic");
    let attribute = |name: &str| -> Vec<Option<String>> {
        calls.iter().map(|r| r.header(name).map(str::to_string)).collect()
    };
    let source = Some(format!("kafka:{}", b.t.source));
    assert_eq!(
        attribute("ce-source"),
        vec![source.clone(), source.clone(), source]
    );
    let id = Some(format!("{}/0/0", b.t.source));
    assert_eq!(attribute("ce-id"), vec![id.clone(), id.clone(), id]);
    let times = attribute("ce-time");
    assert!(
        times[0].is_some() && times.iter().all(|t| *t == times[0]),
        "{times:?}"
    );
}
