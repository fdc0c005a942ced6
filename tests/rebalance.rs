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
    let RouteTopics {
        source,
        reply,
        dlq,
        group,
    } = kafka.route_topics(4).await;
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_instances_keep_each_keys_order_across_handovers() {
    let kafka = Kafka::start();
    let service = Service::start(|req: Req| async move {
        tokio::time::sleep(Duration::from_millis(2)).await;
        Resp::new(200, &req.body)
    })
    .await;
    let RouteTopics {
        source,
        reply,
        dlq,
        group,
    } = kafka.route_topics(6).await;
    let text = config_text(&kafka, &group, &source, &service.url("/"), &reply, &dlq, "");
    let keys = 20;
    let mut next = vec![0u32; keys];
    let a = Sidecar::start(parse(&text)).await.unwrap();
    send_batch(&kafka, &source, &mut next, 200).await;
    let b = Sidecar::start(parse(&text)).await.unwrap();
    send_batch(&kafka, &source, &mut next, 200).await;
    let c = Sidecar::start(parse(&text)).await.unwrap();
    send_batch(&kafka, &source, &mut next, 200).await;
    // The first instance leaves while records flow; its partitions move to the others.
    a.shutdown();
    tokio::time::timeout(WAIT, a.wait()).await.unwrap().unwrap();
    send_batch(&kafka, &source, &mut next, 200).await;
    eventually(WAIT, "all 800 committed", || async {
        (kafka.committed_total(&group, &source, 6).await == 800).then_some(())
    })
    .await;
    for s in [b, c] {
        s.shutdown();
        tokio::time::timeout(WAIT, s.wait()).await.unwrap().unwrap();
    }
    let mut per_key: std::collections::HashMap<String, Vec<u32>> = Default::default();
    for r in kafka.read_all(&reply).await {
        per_key
            .entry(r.key.unwrap())
            .or_default()
            .push(r.value.unwrap().parse().unwrap());
    }
    let mut repeats = 0;
    for k in 0..keys {
        let got = &per_key[&format!("k{k}")];
        let want: Vec<u32> = (0..next[k]).collect();
        // At least once: a record may be repeated, but nothing is lost and, once repeats are
        // set aside, each key's replies are in input order.
        let mut first_seen = Vec::new();
        for v in got {
            if !first_seen.contains(v) {
                first_seen.push(*v);
            }
        }
        assert_eq!(
            first_seen, want,
            "key k{k}: replies lost or out of order across handovers"
        );
        repeats += got.len() - first_seen.len();
    }
    // Repeats are bounded by what a partition may hold between its committed watermark and its
    // newest record (concurrency.per_partition, 32): what was in flight or final but not yet
    // committed when a partition moved. Graceful handovers usually repeat nothing; the embedded
    // broker refuses commits during its (slow) rebalances, which shows up here.
    assert!(
        repeats <= 32 * 6,
        "{repeats} repeated replies across graceful handovers"
    );
    eprintln!("three instances: {repeats} repeated replies");
}

/// A sidecar stopped while the group rebalances: the broker refuses its final commit until the
/// rebalance ends, and by then the rebalance has revoked its partitions. It commits them as it
/// hands them over, so the member that takes them repeats nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_during_a_rebalance_commits_as_it_hands_its_partitions_over() {
    let kafka = Kafka::start();
    let service = Service::start(|req: Req| async move { Resp::new(200, &req.body) }).await;
    let RouteTopics {
        source,
        reply,
        dlq,
        group,
    } = kafka.route_topics(4).await;
    // No periodic commit: only the stop's final commit spares the next owner a repeat. The
    // stop's commits get long enough to outlast the rebalance it meets and the one its revoke
    // starts (5 s each on the embedded broker).
    let text = config_text(&kafka, &group, &source, &service.url("/"), &reply, &dlq, "")
        .replace("commit_interval: 100ms", "commit_interval: 1h")
        .replace("drain_timeout: 5s", "drain_timeout: 15s");
    let a = Sidecar::start(parse(&text)).await.unwrap();
    for i in 0..100 {
        kafka
            .send(
                &source,
                Some(i % 4),
                Some(&format!("k{i}")),
                &format!("v{i}"),
                &[],
            )
            .await;
    }
    kafka.read(&reply, 100, WAIT).await;
    // The second member's join starts a rebalance. The embedded broker keeps the group joining
    // for the session timeout less a second (5 s here), refusing commits meanwhile.
    let b = Sidecar::start(parse(&text)).await.unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    a.shutdown();
    tokio::time::timeout(WAIT, a.wait()).await.unwrap().unwrap();
    assert_eq!(
        kafka.committed_total(&group, &source, 4).await,
        100,
        "the stopped sidecar's final offsets are not all committed"
    );
    eventually(WAIT, "the second member owns every partition", || async {
        (b.partitions().len() == 4).then_some(())
    })
    .await;
    // Time to repeat what it would.
    tokio::time::sleep(Duration::from_secs(1)).await;
    b.shutdown();
    tokio::time::timeout(WAIT, b.wait()).await.unwrap().unwrap();
    let replies = kafka.read_all(&reply).await;
    assert_eq!(
        replies.len(),
        100,
        "records replied twice: the next owner started below the stopped sidecar's offsets"
    );
}

/// Sends `n` records round-robin over the keys, each key's values counting up from where it was.
async fn send_batch(kafka: &Kafka, topic: &str, next: &mut [u32], n: usize) {
    for i in 0..n {
        let k = i % next.len();
        kafka
            .send(topic, None, Some(&format!("k{k}")), &next[k].to_string(), &[])
            .await;
        next[k] += 1;
    }
}

/// SPEC §1 (Rebalance): a revoke waits for the partition's in-flight records, and a record
/// waiting out a retry's backoff is in flight. It is retried and finished by its owner within
/// the drain, so the handover commits past it and past the records finished above it: the new
/// owner repeats nothing (when the broker takes that commit).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handover_waits_for_a_record_between_retries_and_repeats_nothing() {
    let kafka = Kafka::start();
    let service = Service::start(|req: Req| async move {
        if req.body.starts_with("slow") && req.attempt() == 1 {
            return Resp::new(503, "not yet");
        }
        Resp::new(200, &req.body)
    })
    .await;
    let t = kafka.route_topics(2).await;
    // The second attempt comes 6 s after the first: long enough for the second instance to
    // join and the first to be told to hand a partition over while its slow record waits.
    let text = route_config(&kafka, &t, &service.url("/"), "")
        .replace(
            "backoff: { initial: 10ms, max: 50ms }",
            "backoff: { initial: 6s, max: 6s, jitter: none }",
        )
        .replace("drain_timeout: 5s", "drain_timeout: 20s");
    // Each partition: a record that fails its first attempt, then 20 that succeed at once (other
    // keys, so they run past it and wait, final, above its uncommitted offset).
    let per_partition = 21;
    for p in 0..2 {
        kafka
            .send(&t.source, Some(p), Some("slow"), &format!("slow{p}"), &[])
            .await;
        for i in 0..per_partition - 1 {
            kafka
                .send(
                    &t.source,
                    Some(p),
                    Some(&format!("k{i}")),
                    &format!("v{p}-{i}"),
                    &[],
                )
                .await;
        }
    }
    let a = Sidecar::start(parse(&text)).await.unwrap();
    kafka.read(&t.reply, 2 * (per_partition as usize - 1), WAIT).await;
    let b = Sidecar::start(parse(&text)).await.unwrap();
    eventually(WAIT, "the second instance got a partition", || async {
        (!b.partitions().is_empty()).then_some(())
    })
    .await;
    eventually(WAIT, "every record committed", || async {
        (kafka.committed_total(&t.group, &t.source, 2).await == 2 * per_partition as i64).then_some(())
    })
    .await;
    let (sa, sb) = (a.snapshot().remove(0), b.snapshot().remove(0));
    for s in [a, b] {
        s.shutdown();
        tokio::time::timeout(WAIT, s.wait()).await.unwrap().unwrap();
    }
    // What the revoke changed: the first instance retried and finished every record itself,
    // the two slow ones included, and gave none up.
    assert_eq!(sa.abandoned, 0, "the first instance gave nothing up: {sa:?}");
    assert_eq!(
        sa.retries, 2,
        "the first instance retried both slow records: {sa:?}"
    );
    assert_eq!(
        sa.finished(),
        2 * per_partition as u64,
        "the first instance finished every record: {sa:?}"
    );
    // So its handover commits past all of them and the new owner repeats nothing, unless the
    // broker refuses that commit: the embedded broker now and then moves the group on while a
    // revoke drains (ferry warns "The broker refused the final commit"), and then the new owner
    // repeats the partition, as after a crash.
    let replies = kafka.read_all(&t.reply).await;
    let mut seen = HashSet::new();
    let mut repeated = Vec::new();
    for r in &replies {
        let source = (
            r.header("ferry.source.partition").unwrap().to_string(),
            r.header("ferry.source.offset").unwrap().to_string(),
        );
        if !seen.insert(source.clone()) {
            repeated.push(source);
        }
    }
    assert_eq!(seen.len(), 2 * per_partition as usize);
    if sb.received == 0 {
        assert!(
            repeated.is_empty(),
            "repeated without a refused commit: {repeated:?}"
        );
    } else {
        eprintln!(
            "the broker refused the handover's commit: {} repeated",
            repeated.len()
        );
        assert_eq!(
            repeated.len() as u64,
            sb.received,
            "only the refused partition repeated"
        );
    }
}
