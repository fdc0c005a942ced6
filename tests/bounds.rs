//! In-flight bounds: a hung service pauses the partition at its bound while the poll loop keeps
//! the group membership, and the rate caps calls per second.

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use ferry::sidecar::Sidecar;

const WAIT: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_service_pauses_the_partition_at_its_bound_without_leaving_the_group() {
    let kafka = Kafka::start();
    let RouteTopics {
        source,
        reply,
        dlq,
        group,
    } = kafka.route_topics(1).await;
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let held = gate.clone();
    let service = Service::start(move |req: Req| {
        let held = held.clone();
        async move {
            let _p = held.acquire().await;
            Resp::new(200, &req.body)
        }
    })
    .await;
    // The service hangs for longer than max.poll.interval.ms: a sidecar that stopped polling
    // would be thrown out of the group and its partitions handed over.
    let extra = "    ordering: none\n    concurrency: { per_partition: 8, total: 8 }\n";
    let text = config_text(&kafka, &group, &source, &service.url("/"), &reply, &dlq, extra)
        .replace(
            "    heartbeat.interval.ms: 500\n",
            "    heartbeat.interval.ms: 500\n    max.poll.interval.ms: 6000\n",
        )
        .replace("        timeout: 2s", "        timeout: 30s");
    for i in 0..2000 {
        kafka
            .send(&source, None, Some(&format!("k{i}")), &format!("v{i}"), &[])
            .await;
    }
    let sidecar = Sidecar::start(parse(&text)).await.unwrap();
    eventually(WAIT, "the partition paused at its bound", || async {
        sidecar
            .partitions()
            .first()
            .filter(|p| p.paused == vec![ferry::offsets::PauseReason::Bound])
            .map(|_| ())
    })
    .await;
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(8) {
        let p = sidecar.partitions();
        assert_eq!(p.len(), 1, "the partition stays assigned: {p:?}");
        assert!(p[0].window <= 8, "records held past the bound: {p:?}");
        assert!(sidecar.snapshot()[0].received <= 8, "{:?}", sidecar.snapshot());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(service.requests().len() <= 8);
    gate.add_permits(10_000);
    eventually(WAIT, "all 2000 committed", || async {
        (kafka.committed_total(&group, &source, 1).await == 2000).then_some(())
    })
    .await;
    let s = sidecar.snapshot().remove(0);
    assert_eq!(s.abandoned, 0, "never revoked: {s:?}");
    assert_eq!(s.received, 2000, "each record taken once: {s:?}");
    sidecar.shutdown();
    sidecar.wait().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_caps_calls_per_second() {
    let kafka = Kafka::start();
    let RouteTopics {
        source,
        reply,
        dlq,
        group,
    } = kafka.route_topics(2).await;
    let calls: Arc<Mutex<Vec<Instant>>> = Arc::default();
    let log = calls.clone();
    let service = Service::start(move |req: Req| {
        log.lock().unwrap().push(Instant::now());
        async move { Resp::new(200, &req.body) }
    })
    .await;
    let extra = "    ordering: none\n    concurrency: { rate: 20 }\n";
    let text = config_text(&kafka, &group, &source, &service.url("/"), &reply, &dlq, extra);
    for i in 0..40 {
        kafka.send(&source, Some(i % 2), Some("k"), "v", &[]).await;
    }
    let sidecar = Sidecar::start(parse(&text)).await.unwrap();
    eventually(WAIT, "all 40 committed", || async {
        (kafka.committed_total(&group, &source, 2).await == 40).then_some(())
    })
    .await;
    let calls = calls.lock().unwrap().clone();
    // However slow the machine, no second holds more than the rate (plus the one at its edge).
    for (i, t) in calls.iter().enumerate() {
        let within = calls[i..]
            .iter()
            .take_while(|u| u.duration_since(*t) < Duration::from_secs(1))
            .count();
        assert!(within <= 21, "{within} calls within one second at a rate of 20/s");
    }
    sidecar.shutdown();
    sidecar.wait().await.unwrap();
}

/// Resident memory of a process, in bytes.
fn rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_stays_bounded_while_a_hung_service_holds_a_large_backlog() {
    // Enough partitions that a prefetch bound per partition, not per consumer, shows.
    const PARTITIONS: i32 = 12;
    let kafka = Kafka::start();
    let RouteTopics {
        source,
        reply,
        dlq,
        group,
    } = kafka.route_topics(PARTITIONS).await;
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let held = gate.clone();
    let service = Service::start(move |_req: Req| {
        let held = held.clone();
        async move {
            let _p = held.acquire().await;
            Resp::new(204, "")
        }
    })
    .await;
    // 4800 records of 32 KiB: 150 MiB waiting in the topic, 12.5 MiB a partition.
    let value = "x".repeat(32 * 1024);
    for i in 0..4800 {
        kafka
            .send(&source, Some(i % PARTITIONS), Some(&format!("k{i}")), &value, &[])
            .await;
    }
    let text = config_text(&kafka, &group, &source, &service.url("/"), &reply, &dlq, "")
        .replace("        timeout: 2s", "        timeout: 60s");
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("ferry.yaml");
    std::fs::write(&config, text).unwrap();
    let ferry = Ferry::spawn(&config, &dir.path().join("ferry.log"));
    let pid = ferry.pid();
    eventually(WAIT, "the service holds calls", || async {
        (service.requests().len() >= 2).then_some(())
    })
    .await;
    let mut peak = 0;
    for _ in 0..20 {
        peak = peak.max(rss(pid));
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    drop(ferry);
    gate.add_permits(100_000);
    eprintln!(
        "peak RSS with a hung service and 150 MiB waiting: {} MiB",
        peak >> 20
    );
    // ferry holds at most `concurrency.max_bytes` (16 MiB) of records, and librdkafka
    // prefetches at most `queued.max.messages.kbytes` per partition (its queues are split), plus
    // a fetch of up to 1 MiB: 12 x 2 MiB. At 8 MiB a partition the prefetch alone would be
    // 108 MiB (measured: 85 MiB peak with 8 partitions, against 62 at 1 MiB). The rest is the
    // process itself, whose start-up code is still resident here (see `memory.rs`).
    assert!(peak > 0, "RSS was read");
    assert!(
        peak < 90 << 20,
        "RSS {} MiB: the backlog leaked into memory",
        peak >> 20
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_stays_bounded_when_the_broker_goes_away() {
    let mut kafka = Kafka::start();
    if kafka.is_external() {
        eprintln!("skipped: this test stops the embedded broker");
        return;
    }
    let RouteTopics {
        source,
        reply,
        dlq,
        group,
    } = kafka.route_topics(2).await;
    // Every answer is a 32 KiB reply that, once the broker is gone, cannot be written.
    let body = "y".repeat(32 * 1024);
    let service = Service::start(move |_req: Req| {
        let body = body.clone();
        async move { Resp::new(200, &body) }
    })
    .await;
    let value = "x".repeat(32 * 1024);
    for i in 0..3000 {
        kafka
            .send(&source, Some(i % 2), Some(&format!("k{i}")), &value, &[])
            .await;
    }
    let text = config_text(&kafka, &group, &source, &service.url("/"), &reply, &dlq, "");
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("ferry.yaml");
    std::fs::write(&config, text).unwrap();
    let mut ferry = Ferry::spawn(&config, &dir.path().join("ferry.log"));
    let pid = ferry.pid();
    kafka.read(&reply, 20, WAIT).await;
    // The broker vanishes mid-stream.
    kafka.embedded = None;
    let mut peak = 0;
    for _ in 0..25 {
        peak = peak.max(rss(pid));
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let alive = ferry.alive();
    drop(ferry);
    eprintln!("peak RSS with the broker gone: {} MiB", peak >> 20);
    assert!(alive, "ferry keeps running without its broker");
    assert!(
        peak > 0 && peak < 64 << 20,
        "RSS {} MiB with the broker gone",
        peak >> 20
    );
}
