//! `delivery: exactly_once`: outputs and offsets in one transaction per batch.
//!
//! What the embedded broker (librdkafka's mock) can show: ferry writes its outputs inside
//! transactions and never commits offsets outside them (the mock keeps no offsets of
//! `TxnOffsetCommit`, so the group shows none, where at-least-once would show them all); the
//! offsets ferry committed in transactions match the outputs exactly; an aborted transaction is
//! written again whole; an output too large for the broker becomes a dead letter inside the
//! transaction. What it cannot show (its fetch ignores `read_committed`, it does not fence
//! producers): the kill test at the bottom, which runs against any broker with transactions
//! named by `FERRY_EOS_BROKERS`, and is skipped with a reason otherwise.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use common::*;
use ferry::sidecar::Sidecar;
use rdkafka::types::RDKafkaRespErr::*;
use rdkafka_sys::types::RDKafkaApiKey;

const WAIT: Duration = Duration::from_secs(60);

/// The tests' one-route config with `delivery: exactly_once`.
fn exactly_once_config(kafka: &Kafka, t: &RouteTopics, service: &Service) -> String {
    route_config(kafka, t, &service.url("/h"), "").replace("admin:\n", "delivery: exactly_once\nadmin:\n")
}

/// The offsets ferry committed (in transactions), summed over its partitions.
fn committed_by_ferry(sidecar: &Sidecar) -> i64 {
    sidecar.partitions().iter().filter_map(|p| p.committed).sum()
}

fn poison(value: &str) -> bool {
    value.parse::<u32>().is_ok_and(|n| n % 17 == 3)
}

async fn echo_with_poison() -> Service {
    Service::start(|r: Req| async move {
        if poison(&r.body) {
            Resp::new(422, "poison")
        } else {
            Resp::new(200, &r.body)
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outputs_and_offsets_are_committed_together_and_offsets_never_outside_a_transaction() {
    let kafka = Kafka::start();
    if kafka.is_external() {
        eprintln!("skipping: the broker under test has no transactions (see FERRY_EOS_BROKERS)");
        return;
    }
    let t = kafka.route_topics(4).await;
    let service = echo_with_poison().await;
    let text = exactly_once_config(&kafka, &t, &service);
    let sidecar = Sidecar::start(parse(&text)).await.expect("sidecar starts");
    let n = 200;
    for i in 0..n {
        kafka
            .send(
                &t.source,
                None,
                Some(&format!("k{}", i % 13)),
                &i.to_string(),
                &[],
            )
            .await;
    }
    eventually(WAIT, "every offset committed in a transaction", || async {
        (committed_by_ferry(&sidecar) == n as i64).then_some(())
    })
    .await;
    let replies = kafka.read_all(&t.reply).await;
    let dead = kafka.read_all(&t.dlq).await;
    let values = |rs: &[Rec]| rs.iter().filter_map(|r| r.value.clone()).collect::<Vec<_>>();
    let want_replies: Vec<String> = (0..n).map(|i| i.to_string()).filter(|v| !poison(v)).collect();
    let want_dead: Vec<String> = (0..n).map(|i| i.to_string()).filter(|v| poison(v)).collect();
    let sorted = |mut v: Vec<String>| {
        v.sort();
        v
    };
    // Each output once: the committed offsets cover exactly these outputs, no more, no fewer.
    assert_eq!(sorted(values(&replies)), sorted(want_replies));
    assert_eq!(sorted(values(&dead)), sorted(want_dead));
    assert!(
        dead.iter()
            .all(|d| d.header("ferry.error.reason") == Some("status"))
    );
    // Per key, replies in input order.
    let mut last: BTreeMap<String, i64> = BTreeMap::new();
    let mut in_order = replies.clone();
    in_order.sort_by_key(|r| (r.partition, r.offset));
    for r in &in_order {
        let v: i64 = r.value.as_deref().unwrap().parse().unwrap();
        let key = r.key.clone().unwrap();
        if let Some(prev) = last.insert(key, v) {
            assert!(prev < v, "replies of a key out of order");
        }
    }
    let metrics = sidecar.metrics.render();
    assert!(metric_sum(&metrics, "ferry_transactions_total", &["result=\"committed\""]) >= 1.0);
    assert_eq!(
        metric_sum(&metrics, "ferry_transactions_total", &["result=\"aborted\""]),
        0.0
    );
    // The embedded broker keeps no offsets committed through TxnOffsetCommit: a group offset
    // here could only have come from a plain OffsetCommit, which exactly-once never sends.
    assert_eq!(
        kafka.committed(&t.group, &t.source, 4).await,
        vec![None; 4],
        "offsets committed outside a transaction"
    );
    sidecar.shutdown();
    sidecar.wait().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_aborted_transaction_is_written_again_whole() {
    let kafka = Kafka::start();
    let Some(embedded) = &kafka.embedded else {
        eprintln!("skipping: faults are injected into the embedded broker only");
        return;
    };
    let t = kafka.route_topics(2).await;
    let service = echo_with_poison().await;
    let text = exactly_once_config(&kafka, &t, &service);
    let n = 60;
    for i in 0..n {
        kafka
            .send(&t.source, None, Some(&format!("k{i}")), &i.to_string(), &[])
            .await;
    }
    // The first writes of replies fail for good: their transaction must be aborted.
    embedded.mock().unwrap().request_errors(
        RDKafkaApiKey::Produce,
        &[
            RD_KAFKA_RESP_ERR_TOPIC_AUTHORIZATION_FAILED,
            RD_KAFKA_RESP_ERR_TOPIC_AUTHORIZATION_FAILED,
        ],
    );
    let sidecar = Sidecar::start(parse(&text)).await.expect("sidecar starts");
    eventually(WAIT, "every offset committed after the abort", || async {
        (committed_by_ferry(&sidecar) == n as i64).then_some(())
    })
    .await;
    let metrics = sidecar.metrics.render();
    assert!(
        metric_sum(&metrics, "ferry_transactions_total", &["result=\"aborted\""]) >= 1.0,
        "a transaction was aborted"
    );
    // Every output is there (the embedded broker also shows the aborted copies, which a
    // read_committed reader of a real broker skips).
    let written: BTreeSet<String> = kafka
        .read_all(&t.reply)
        .await
        .into_iter()
        .chain(kafka.read_all(&t.dlq).await)
        .filter_map(|r| r.value)
        .collect();
    let want: BTreeSet<String> = (0..n).map(|i| i.to_string()).collect();
    assert_eq!(written, want);
    sidecar.shutdown();
    sidecar.wait().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_too_large_for_the_broker_is_dead_lettered_inside_the_transaction() {
    let kafka = Kafka::start();
    if kafka.is_external() {
        eprintln!("skipping: the broker under test has no transactions (see FERRY_EOS_BROKERS)");
        return;
    }
    let t = kafka.route_topics(1).await;
    let service = Service::start(|r: Req| async move {
        if r.body == "huge" {
            // Twice librdkafka's default message.max.bytes.
            Resp::new(200, &"x".repeat(2 * 1024 * 1024))
        } else {
            Resp::new(200, &r.body)
        }
    })
    .await;
    let text = exactly_once_config(&kafka, &t, &service);
    let sidecar = Sidecar::start(parse(&text)).await.expect("sidecar starts");
    for v in ["a", "huge", "b"] {
        kafka.send(&t.source, None, Some("k"), v, &[]).await;
    }
    eventually(WAIT, "all three committed", || async {
        (committed_by_ferry(&sidecar) == 3).then_some(())
    })
    .await;
    let dead = kafka.read_all(&t.dlq).await;
    assert_eq!(dead.len(), 1, "one dead letter");
    assert_eq!(dead[0].value.as_deref(), Some("huge"));
    assert_eq!(dead[0].header("ferry.error.reason"), Some("too_large"));
    let replies: BTreeSet<String> = kafka
        .read_all(&t.reply)
        .await
        .into_iter()
        .filter_map(|r| r.value)
        .collect();
    assert_eq!(replies, BTreeSet::from(["a".to_string(), "b".to_string()]));
    sidecar.shutdown();
    sidecar.wait().await.expect("clean stop");
}

/// Reads `topic` as a `read_committed` consumer would (librdkafka's default isolation).
async fn read_committed(brokers: &str, topic: &str) -> Vec<Rec> {
    Kafka::connect(brokers).read_all(topic).await
}

/// The proof a broker with transactions can give: ferry SIGKILLed again and again while records
/// flow, and a `read_committed` reader of the output sees each outcome exactly once. Also: an
/// instance frozen mid-transaction is fenced by its successor with the same transactional.id
/// and stops when it wakes, without writing anything visible.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkilled_again_and_again_a_read_committed_reader_sees_each_outcome_once() {
    let Ok(brokers) = std::env::var("FERRY_EOS_BROKERS") else {
        eprintln!(
            "skipping: set FERRY_EOS_BROKERS to a broker with transactions (Kafka, Redpanda); neither Tansu 0.6 nor the embedded broker gives read_committed isolation and fencing"
        );
        return;
    };
    let kafka = Kafka::connect(&brokers);
    let t = kafka.route_topics(4).await;
    let service = echo_with_poison().await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("ferry.yaml");
    let text = exactly_once_config(&kafka, &t, &service).replace(
        "  commit_interval: 100ms\n",
        &format!(
            "  commit_interval: 200ms\n  transactional_id: {}\n",
            unique("txn")
        ),
    );
    std::fs::write(&config, text).unwrap();
    let n = 5000;
    let feeder = {
        let kafka = Kafka::connect(&brokers);
        let topic = t.source.clone();
        tokio::spawn(async move {
            for i in 0..n {
                kafka
                    .send(&topic, None, Some(&format!("k{}", i % 50)), &i.to_string(), &[])
                    .await;
                if i % 100 == 0 {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        })
    };
    let mut kills = 0;
    let started = Instant::now();
    let mut ferry = Ferry::spawn(&config, &dir.path().join("ferry-0.log"));
    while kills < 10 {
        tokio::time::sleep(Duration::from_millis(700 + rand::random::<u64>() % 1500)).await;
        ferry.signal(libc::SIGKILL);
        let _ = ferry.exit_code(Duration::from_secs(10)).await;
        kills += 1;
        ferry = Ferry::spawn(&config, &dir.path().join(format!("ferry-{kills}.log")));
    }
    feeder.await.unwrap();

    // Fencing: freeze this instance, start its successor, wake it: it must stop.
    tokio::time::sleep(Duration::from_secs(2)).await;
    ferry.signal(libc::SIGSTOP);
    let mut successor = Ferry::spawn(&config, &dir.path().join("successor.log"));
    tokio::time::sleep(Duration::from_secs(10)).await;
    ferry.signal(libc::SIGCONT);
    let code = ferry.exit_code(Duration::from_secs(60)).await;
    assert_ne!(code, Some(0), "a fenced instance does not carry on");

    let want = n - (0..n).filter(|i| poison(&i.to_string())).count();
    eventually(Duration::from_secs(300), "every reply committed", || async {
        (read_committed(&brokers, &t.reply).await.len() >= want).then_some(())
    })
    .await;
    successor.signal(libc::SIGTERM);
    assert_eq!(successor.exit_code(Duration::from_secs(60)).await, Some(0));
    let replies = read_committed(&brokers, &t.reply).await;
    let dead = read_committed(&brokers, &t.dlq).await;
    let distinct: BTreeSet<&str> = replies.iter().filter_map(|r| r.value.as_deref()).collect();
    let dead_distinct: BTreeSet<&str> = dead.iter().filter_map(|r| r.value.as_deref()).collect();
    println!(
        "exactly once: {n} records, {kills} SIGKILLs and one fenced instance in {:.0}s; {} replies ({} distinct), {} dead letters ({} distinct)",
        started.elapsed().as_secs_f64(),
        replies.len(),
        distinct.len(),
        dead.len(),
        dead_distinct.len()
    );
    assert_eq!(replies.len(), distinct.len(), "duplicate replies");
    assert_eq!(dead.len(), dead_distinct.len(), "duplicate dead letters");
    assert_eq!(distinct.len() + dead_distinct.len(), n, "lost records");
}
