//! Two sidecars in one consumer group: partitions move between them while records flow, and
//! every record still ends with an outcome, nothing committed early, counts reconciled.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::*;
use ferry::sidecar::Sidecar;

const WAIT: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_instance_takes_over_partitions_without_losing_records() {
    let kafka = Kafka::start();
    let service = Service::start(|req: Req| async move {
        tokio::time::sleep(Duration::from_millis(5)).await;
        Resp::new(200, &req.body)
    })
    .await;
    let source = kafka.topic("in", 4).await;
    let reply = kafka.topic("out", 1).await;
    let dlq = kafka.topic("dlq", 1).await;
    let group = unique("group");
    let text = config_text(&kafka, &group, &source, &service.url("/"), &reply, &dlq, "");

    let mut sent = HashSet::new();
    for i in 0..200 {
        sent.insert(
            kafka
                .send(
                    &source,
                    Some(i % 4),
                    Some(&format!("k{i}")),
                    &format!("a{i}"),
                    &[],
                )
                .await,
        );
    }
    let a = Sidecar::start(parse(&text)).await.unwrap();
    kafka.read(&reply, 40, WAIT).await;
    let b = Sidecar::start(parse(&text)).await.unwrap();
    eventually(WAIT, "the second instance got partitions", || async {
        (!b.partitions().is_empty()).then_some(())
    })
    .await;
    for i in 0..200 {
        sent.insert(
            kafka
                .send(
                    &source,
                    Some(i % 4),
                    Some(&format!("k{i}")),
                    &format!("b{i}"),
                    &[],
                )
                .await,
        );
    }
    eventually(WAIT, "all 400 records committed", || async {
        (kafka.committed_total(&group, &source, 4).await == 400).then_some(())
    })
    .await;

    let (sa, sb) = (a.snapshot().remove(0), b.snapshot().remove(0));
    for s in [a, b] {
        s.shutdown();
        tokio::time::timeout(WAIT, s.wait()).await.unwrap().unwrap();
    }
    assert!(sb.received > 0, "the second instance handled records");
    for s in [&sa, &sb] {
        // Nothing is in flight once everything is committed: what was received either ended
        // in an outcome or was abandoned at a revoke (and handled again by the new owner).
        assert_eq!(s.received, s.finished() + s.abandoned, "{s:?}");
    }
    let replies = kafka.read_all(&reply).await;
    let got: HashSet<(i32, i64)> = replies
        .iter()
        .map(|r| {
            (
                r.header("ferry.source.partition").unwrap().parse().unwrap(),
                r.header("ferry.source.offset").unwrap().parse().unwrap(),
            )
        })
        .collect();
    for rec in &sent {
        assert!(got.contains(rec), "record {rec:?} has no reply");
    }
}
