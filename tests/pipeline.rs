//! The pipeline end to end: a broker, a real HTTP service on loopback, ferry's real `Sidecar`,
//! and assertions on what landed in Kafka and what was committed.

mod common;

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use ferry::outcome::Outcome;
use ferry::sidecar::Sidecar;

const WAIT: Duration = Duration::from_secs(30);

struct Bench {
    kafka: Kafka,
    service: Service,
    source: String,
    reply: String,
    dlq: String,
    group: String,
    sidecar: Option<Sidecar>,
}

impl Bench {
    async fn start<F, Fut>(partitions: i32, extra: &str, handler: F) -> Bench
    where
        F: Fn(Req) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Resp> + Send + 'static,
    {
        let kafka = Kafka::start();
        let source = kafka.topic("in", partitions).await;
        let reply = kafka.topic("out", 1).await;
        let dlq = kafka.topic("dlq", 1).await;
        let group = unique("group");
        let service = Service::start(handler).await;
        let text = config_text(
            &kafka,
            &group,
            &source,
            &service.url("/handle/{key}"),
            &reply,
            &dlq,
            extra,
        );
        let sidecar = Sidecar::start(parse(&text)).await.expect("sidecar starts");
        Bench {
            kafka,
            service,
            source,
            reply,
            dlq,
            group,
            sidecar: Some(sidecar),
        }
    }

    fn sidecar(&self) -> &Sidecar {
        self.sidecar.as_ref().unwrap()
    }

    async fn committed(&self) -> i64 {
        let partitions = self.kafka.committed(&self.group, &self.source, 1).await;
        partitions[0].unwrap_or(-1)
    }

    async fn wait_committed(&self, want: i64) {
        eventually(WAIT, &format!("offset {want} committed"), || async {
            (self.committed().await >= want).then_some(())
        })
        .await;
    }

    async fn wait_outcome(&self, outcome: Outcome, n: u64) {
        eventually(WAIT, &format!("{n} x {outcome}"), || async {
            (self.sidecar().snapshot()[0].get(outcome) >= n).then_some(())
        })
        .await;
    }

    async fn stop(mut self) {
        let s = self.sidecar.take().unwrap();
        s.shutdown();
        tokio::time::timeout(WAIT, s.wait())
            .await
            .expect("stops in time")
            .expect("stops cleanly");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reply_lands_on_the_reply_topic_with_key_and_lineage_headers() {
    let b = Bench::start(1, "", |req: Req| async move {
        Resp::new(200, &format!("echo:{}", req.body))
            .header("ferry-header-verdict", "ok")
            .header("content-type", "text/plain")
    })
    .await;
    let traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    let (_, offset) = b
        .kafka
        .send(
            &b.source,
            None,
            Some("order-1"),
            "hello",
            &[("traceparent", traceparent), ("tenant", "acme")],
        )
        .await;

    let replies = b.kafka.read(&b.reply, 1, WAIT).await;
    assert_eq!(replies.len(), 1);
    let r = &replies[0];
    assert_eq!(r.key.as_deref(), Some("order-1"));
    assert_eq!(r.value.as_deref(), Some("echo:hello"));
    assert_eq!(
        r.header("verdict"),
        Some("ok"),
        "ferry-header-* becomes a reply header"
    );
    assert_eq!(r.header("content-type"), Some("text/plain"));
    assert_eq!(r.header("ferry.source.topic"), Some(b.source.as_str()));
    assert_eq!(r.header("ferry.source.partition"), Some("0"));
    assert_eq!(r.header("ferry.source.offset"), Some(offset.to_string().as_str()));
    assert_eq!(r.header("traceparent"), Some(traceparent));

    let req = &b.service.requests()[0];
    assert_eq!(req.path, "/handle/order-1", "URL template");
    assert_eq!(req.body, "hello");
    assert_eq!(req.header("content-length"), Some("5"));
    assert_eq!(req.header("ferry-topic"), Some(b.source.as_str()));
    assert_eq!(req.header("ferry-partition"), Some("0"));
    assert_eq!(req.header("ferry-offset"), Some(offset.to_string().as_str()));
    assert_eq!(req.header("ferry-key"), Some("order-1"));
    assert_eq!(req.header("ferry-attempt"), Some("1"));
    assert!(
        req.header("ferry-timestamp")
            .is_some_and(|t| t.parse::<i64>().is_ok())
    );
    assert_eq!(
        req.header("idempotency-key"),
        Some(format!("{}/0/{offset}", b.source).as_str())
    );
    assert_eq!(req.header("content-type"), Some("application/octet-stream"));
    assert_eq!(req.header("ferry-header-tenant"), Some("acme"));
    assert_eq!(req.header("traceparent"), Some(traceparent));

    b.wait_committed(offset + 1).await;
    assert_eq!(b.sidecar().snapshot()[0].get(Outcome::Replied), 1);
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_content_publishes_nothing_and_commits() {
    let b = Bench::start(1, "", |_req: Req| async { Resp::new(204, "") }).await;
    for i in 0..3 {
        b.kafka
            .send(&b.source, None, Some("k"), &format!("v{i}"), &[])
            .await;
    }
    b.wait_committed(3).await;
    b.wait_outcome(Outcome::Done, 3).await;
    assert!(
        b.kafka
            .read(&b.reply, 1, Duration::from_millis(500))
            .await
            .is_empty()
    );
    assert!(
        b.kafka
            .read(&b.dlq, 1, Duration::from_millis(200))
            .await
            .is_empty()
    );
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_error_is_dead_lettered_at_once_with_error_headers() {
    let b = Bench::start(1, "", |_req: Req| async { Resp::new(404, "no such order") }).await;
    let (_, offset) = b
        .kafka
        .send(
            &b.source,
            None,
            Some("k1"),
            "payload",
            &[("authorization", "Bearer secret"), ("tenant", "acme")],
        )
        .await;
    let dead = b.kafka.read(&b.dlq, 1, WAIT).await;
    assert_eq!(dead.len(), 1);
    let d = &dead[0];
    assert_eq!(d.key.as_deref(), Some("k1"));
    assert_eq!(d.value.as_deref(), Some("payload"));
    assert_eq!(d.header("ferry.error.reason"), Some("status"));
    assert_eq!(d.header("ferry.error.status"), Some("404"));
    assert_eq!(d.header("ferry.error.message"), Some("no such order"));
    assert_eq!(d.header("ferry.attempts"), Some("1"));
    assert_eq!(d.header("ferry.route"), Some("test"));
    assert_eq!(d.header("ferry.source.topic"), Some(b.source.as_str()));
    assert_eq!(d.header("ferry.source.partition"), Some("0"));
    assert_eq!(d.header("ferry.source.offset"), Some(offset.to_string().as_str()));
    assert!(d.header("ferry.source.timestamp").is_some());
    assert_eq!(
        d.header("ferry.idempotency_key"),
        Some(format!("{}/0/{offset}", b.source).as_str())
    );
    assert!(d.header("ferry.first_attempt_at").is_some() && d.header("ferry.last_attempt_at").is_some());
    assert_eq!(d.header("tenant"), Some("acme"), "input headers are kept");
    assert_eq!(
        d.header("authorization"),
        Some("Bearer secret"),
        "kept: this route redacts nothing"
    );
    b.wait_committed(offset + 1).await;
    assert_eq!(b.service.requests().len(), 1, "a poison record is not retried");
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_503s_then_200_is_a_reply_after_three_attempts() {
    let b = Bench::start(1, "", |req: Req| async move {
        if req.attempt() < 3 {
            Resp::new(503, "busy")
        } else {
            Resp::new(200, "finally")
        }
    })
    .await;
    b.kafka.send(&b.source, None, Some("k"), "v", &[]).await;
    let replies = b.kafka.read(&b.reply, 1, WAIT).await;
    assert_eq!(replies[0].value.as_deref(), Some("finally"));
    let attempts: Vec<u32> = b.service.requests().iter().map(Req::attempt).collect();
    assert_eq!(attempts, vec![1, 2, 3]);
    let keys: Vec<_> = b
        .service
        .requests()
        .iter()
        .map(|r| r.header("idempotency-key").unwrap().to_string())
        .collect();
    assert!(
        keys.windows(2).all(|w| w[0] == w[1]),
        "the idempotency key never changes"
    );
    b.wait_committed(1).await;
    assert_eq!(b.sidecar().snapshot()[0].retries, 2);
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn persistent_503_is_dead_lettered_after_max_attempts() {
    let b = Bench::start(1, "", |_req: Req| async {
        Resp::new(503, "down for maintenance")
    })
    .await;
    b.kafka.send(&b.source, None, Some("k"), "v", &[]).await;
    let dead = b.kafka.read(&b.dlq, 1, WAIT).await;
    assert_eq!(dead[0].header("ferry.error.reason"), Some("status"));
    assert_eq!(dead[0].header("ferry.error.status"), Some("503"));
    assert_eq!(dead[0].header("ferry.attempts"), Some("3"));
    assert_eq!(b.service.requests().len(), 3);
    b.wait_committed(1).await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timeout_is_retried() {
    let b = Bench::start(1, "", |req: Req| async move {
        if req.attempt() == 1 {
            tokio::time::sleep(Duration::from_secs(4)).await;
        }
        Resp::new(200, "in time")
    })
    .await;
    b.kafka.send(&b.source, None, Some("k"), "v", &[]).await;
    let replies = b.kafka.read(&b.reply, 1, WAIT).await;
    assert_eq!(replies[0].value.as_deref(), Some("in time"));
    assert_eq!(b.service.requests().len(), 2);
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timeout_until_max_attempts_is_dead_lettered_as_timeout() {
    let b = Bench::start(1, "", |_req: Req| async move {
        tokio::time::sleep(Duration::from_secs(4)).await;
        Resp::new(200, "too late")
    })
    .await;
    b.kafka.send(&b.source, None, Some("k"), "v", &[]).await;
    let dead = b.kafka.read(&b.dlq, 1, WAIT).await;
    assert_eq!(dead[0].header("ferry.error.reason"), Some("timeout"));
    assert_eq!(dead[0].header("ferry.error.status"), None);
    assert_eq!(dead[0].header("ferry.attempts"), Some("3"));
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_without_the_key_its_url_takes_is_dead_lettered_not_sent_elsewhere() {
    // The URL is `/handle/{key}`: without a key it would be `/handle/`, another endpoint.
    let b = Bench::start(1, "", |_req: Req| async { Resp::new(200, "ok") }).await;
    b.kafka.send(&b.source, None, None, "no key", &[]).await;
    b.kafka.send(&b.source, None, Some("k"), "keyed", &[]).await;
    let dead = b.kafka.read(&b.dlq, 1, WAIT).await;
    assert_eq!(dead[0].value.as_deref(), Some("no key"));
    assert_eq!(dead[0].header("ferry.error.reason"), Some("schema"));
    assert_eq!(
        dead[0].header("ferry.error.message"),
        Some("the URL takes the record's key (`{key}`), and the record has none")
    );
    b.wait_committed(2).await;
    let paths: Vec<String> = b.service.requests().iter().map(|r| r.path.clone()).collect();
    assert_eq!(paths, ["/handle/k"], "only the keyed record was called");
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_can_dead_letter_with_ferry_action() {
    let b = Bench::start(1, "", |_req: Req| async {
        Resp::new(200, "cannot ever handle this").header("ferry-action", "dead-letter")
    })
    .await;
    b.kafka.send(&b.source, None, Some("k"), "v", &[]).await;
    let dead = b.kafka.read(&b.dlq, 1, WAIT).await;
    assert_eq!(dead[0].header("ferry.error.reason"), Some("service_said"));
    assert_eq!(
        dead[0].header("ferry.error.message"),
        Some("cannot ever handle this")
    );
    assert!(
        b.kafka
            .read(&b.reply, 1, Duration::from_millis(300))
            .await
            .is_empty()
    );
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_chooses_reply_key_and_topic() {
    let b = Bench::start(1, "", |_req: Req| async {
        Resp::new(200, "rekeyed").header("ferry-reply-key", "new-key")
    })
    .await;
    b.kafka.send(&b.source, None, Some("old-key"), "v", &[]).await;
    let replies = b.kafka.read(&b.reply, 1, WAIT).await;
    assert_eq!(replies[0].key.as_deref(), Some("new-key"));
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rule_turns_409_into_drop() {
    let extra = "    rules:\n      - when: { status: 409 }\n        then: drop\n";
    let b = Bench::start(1, extra, |_req: Req| async { Resp::new(409, "seen it") }).await;
    b.kafka.send(&b.source, None, Some("k"), "v", &[]).await;
    b.wait_committed(1).await;
    b.wait_outcome(Outcome::Dropped, 1).await;
    assert!(
        b.kafka
            .read(&b.dlq, 1, Duration::from_millis(500))
            .await
            .is_empty()
    );
    assert!(
        b.kafka
            .read(&b.reply, 1, Duration::from_millis(200))
            .await
            .is_empty()
    );
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redacted_headers_and_payload_stay_out_of_dead_letters() {
    let kafka = Kafka::start();
    let source = kafka.topic("in", 1).await;
    let reply = kafka.topic("out", 1).await;
    let dlq = kafka.topic("dlq", 1).await;
    let service = Service::start(|_req: Req| async { Resp::new(400, "card 4111 declined") }).await;
    let text = config_text(&kafka, &unique("g"), &source, &service.url("/"), &reply, &dlq, "").replace(
        &format!("      to: {dlq}\n"),
        &format!("      to: {dlq}\n      include_payload: false\n      redact_headers: [Authorization]\n"),
    );
    let sidecar = Sidecar::start(parse(&text)).await.unwrap();
    kafka
        .send(
            &source,
            None,
            Some("k"),
            "secret payload",
            &[("authorization", "Bearer x"), ("tenant", "acme")],
        )
        .await;
    let dead = kafka.read(&dlq, 1, WAIT).await;
    assert_eq!(dead[0].value, None, "include_payload: false drops the value");
    assert_eq!(
        dead[0].header("ferry.error.message"),
        None,
        "…and the service's answer"
    );
    assert_eq!(
        dead[0].header("authorization"),
        None,
        "redaction is case-insensitive"
    );
    assert_eq!(dead[0].header("tenant"), Some("acme"));
    assert_eq!(dead[0].header("ferry.error.reason"), Some("status"));
    sidecar.shutdown();
    sidecar.wait().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commit_stays_behind_a_record_still_in_flight() {
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let held = gate.clone();
    let b = Bench::start(1, "", move |req: Req| {
        let held = held.clone();
        async move {
            if req.body == "slow" {
                // Holds this record until the test releases it.
                let _permit = held.acquire().await;
            }
            Resp::new(200, "ok")
        }
    })
    .await;
    for v in ["a", "b", "slow", "c", "d"] {
        b.kafka.send(&b.source, None, Some("k"), v, &[]).await;
    }
    b.wait_committed(2).await;
    // Several commit intervals pass; the commit must not move past the held record.
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(
        b.committed().await,
        2,
        "committed past a record whose outcome is not in Kafka"
    );
    assert_eq!(
        b.kafka.read(&b.reply, 3, Duration::from_millis(300)).await.len(),
        2
    );
    gate.add_permits(1);
    b.wait_committed(5).await;
    assert_eq!(b.kafka.read(&b.reply, 5, WAIT).await.len(), 5);
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commit_waits_for_the_broker_to_acknowledge_the_reply() {
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let held = gate.clone();
    let b = Bench::start(1, "", move |req: Req| {
        let held = held.clone();
        async move {
            if req.body == "second" {
                let _permit = held.acquire().await;
            }
            Resp::new(200, "reply")
        }
    })
    .await;
    let Some(embedded) = &b.kafka.embedded else {
        eprintln!("skipped: needs the embedded broker's error injection");
        return b.stop().await;
    };
    b.kafka.send(&b.source, None, Some("k"), "first", &[]).await;
    b.wait_committed(1).await;
    b.kafka.send(&b.source, None, Some("k"), "second", &[]).await;
    eventually(WAIT, "the second record reached the service", || async {
        (b.service.requests().len() >= 2).then_some(())
    })
    .await;

    // From now on the broker refuses produce requests (retriably) for a while, then the service
    // answers: the reply exists but is not acknowledged.
    use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
    embedded.mock().unwrap().request_errors(
        RDKafkaApiKey::Produce,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_ENOUGH_REPLICAS; 20],
    );
    gate.add_permits(1);
    let released = std::time::Instant::now();
    let mut behind_while_unacknowledged = 0;
    loop {
        let committed = b.committed().await;
        let replies = b.kafka.read(&b.reply, 2, Duration::from_millis(50)).await.len();
        assert!(
            committed < 2 || replies == 2,
            "offset 1 committed before its reply was acknowledged"
        );
        if committed == 1 && replies < 2 {
            behind_while_unacknowledged += 1;
        }
        if committed >= 2 {
            break;
        }
        assert!(released.elapsed() < WAIT * 2, "the reply was never acknowledged");
    }
    assert!(
        behind_while_unacknowledged > 0,
        "the injected errors never delayed the acknowledgement"
    );
    assert_eq!(b.kafka.read(&b.reply, 2, WAIT).await.len(), 2);
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partition_mode_handles_each_partition_in_order() {
    let seen: Arc<Mutex<HashMap<String, Vec<String>>>> = Arc::default();
    let log = seen.clone();
    let b = Bench::start(3, "    ordering: partition\n", move |req: Req| {
        let log = log.clone();
        async move {
            let key = req.header("ferry-partition").unwrap_or("?").to_string();
            log.lock().unwrap().entry(key).or_default().push(req.body.clone());
            Resp::new(200, &req.body)
        }
    })
    .await;
    let mut sent: HashMap<i32, Vec<String>> = HashMap::new();
    for i in 0..60 {
        let v = format!("{i:03}");
        let (p, _) = b
            .kafka
            .send(&b.source, Some(i % 3), Some(&format!("k{i}")), &v, &[])
            .await;
        sent.entry(p).or_default().push(v);
    }
    eventually(WAIT, "all 60 committed", || async {
        let c = b.kafka.committed_total(&b.group, &b.source, 3).await;
        (c == 60).then_some(())
    })
    .await;
    let seen = seen.lock().unwrap().clone();
    for (p, values) in sent {
        assert_eq!(seen[&p.to_string()], values, "partition {p} out of order");
    }
    let s = &b.sidecar().snapshot()[0];
    assert_eq!(s.received, 60);
    assert_eq!(s.finished(), 60, "received = sum of outcomes once idle");
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_positions_apply_to_a_group_without_a_commit() {
    let kafka = Kafka::start();
    let service = Service::start(|req: Req| async move { Resp::new(200, &req.body) }).await;
    let reply = kafka.topic("out", 1).await;
    let dlq = kafka.topic("dlq", 1).await;

    // `latest`: records already in the topic are skipped; new ones are handled.
    let source = kafka.topic("in", 1).await;
    kafka.send(&source, None, Some("k"), "old", &[]).await;
    let group = unique("g");
    let text = config_text(&kafka, &group, &source, &service.url("/"), &reply, &dlq, "").replace(
        &format!("      topics: [{source}]\n"),
        &format!("      topics: [{source}]\n      start: latest\n"),
    );
    let sidecar = Sidecar::start(parse(&text)).await.unwrap();
    eventually(WAIT, "assigned", || async {
        (!sidecar.partitions().is_empty()).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    kafka.send(&source, None, Some("k"), "new", &[]).await;
    let replies = kafka.read(&reply, 1, WAIT).await;
    assert_eq!(replies[0].value.as_deref(), Some("new"));
    sidecar.shutdown();
    sidecar.wait().await.unwrap();
    assert!(
        service.requests().iter().all(|r| r.body != "old"),
        "start: latest skipped the old record"
    );

    // A timestamp: records before it are skipped.
    if !kafka.is_external() {
        eprintln!(
            "timestamp part skipped: librdkafka's mock cannot look offsets up by time (its ListOffsets answers -1)"
        );
        return;
    }
    let source = kafka.topic("in", 1).await;
    kafka.send(&source, None, Some("k"), "before", &[]).await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let cut = std::time::SystemTime::now();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    kafka.send(&source, None, Some("k"), "after", &[]).await;
    let secs = cut.duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    let stamp = format!("{}Z", rfc3339(secs));
    let reply2 = kafka.topic("out", 1).await;
    let text = config_text(
        &kafka,
        &unique("g"),
        &source,
        &service.url("/"),
        &reply2,
        &dlq,
        "",
    )
    .replace(
        &format!("      topics: [{source}]\n"),
        &format!("      topics: [{source}]\n      start: \"{stamp}\"\n"),
    );
    let sidecar = Sidecar::start(parse(&text)).await.unwrap();
    let replies = kafka.read(&reply2, 1, WAIT).await;
    assert_eq!(replies[0].value.as_deref(), Some("after"));
    assert!(
        kafka.read(&reply2, 2, Duration::from_secs(1)).await.len() == 1,
        "the record before {stamp} was skipped"
    );
    sidecar.shutdown();
    sidecar.wait().await.unwrap();
}

/// `YYYY-MM-DDTHH:MM:SS` of epoch seconds (UTC).
fn rfc3339(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Civil from days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_mode_keeps_each_keys_order_and_runs_keys_concurrently() {
    let seen: Arc<Mutex<HashMap<String, Vec<String>>>> = Arc::default();
    let in_flight = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let most = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let (log, now, peak) = (seen.clone(), in_flight.clone(), most.clone());
    let b = Bench::start(1, "", move |req: Req| {
        let (log, now, peak) = (log.clone(), now.clone(), peak.clone());
        async move {
            use std::sync::atomic::Ordering::SeqCst;
            let n = now.fetch_add(1, SeqCst) + 1;
            peak.fetch_max(n, SeqCst);
            let key = req.header("ferry-key").unwrap_or("?").to_string();
            log.lock().unwrap().entry(key).or_default().push(req.body.clone());
            // Uneven latency: a key's later record would overtake its earlier one if lanes leaked.
            let jitter = req.body.len() as u64 % 3 * 7;
            tokio::time::sleep(Duration::from_millis(5 + jitter)).await;
            now.fetch_sub(1, SeqCst);
            Resp::new(200, &req.body)
        }
    })
    .await;
    let mut sent: HashMap<String, Vec<String>> = HashMap::new();
    for i in 0..80 {
        let key = format!("k{}", i % 5);
        let v = format!("{key}-{}", "x".repeat(i % 4));
        let v = format!("{v}-{i}");
        b.kafka.send(&b.source, None, Some(&key), &v, &[]).await;
        sent.entry(key).or_default().push(v);
    }
    b.wait_committed(80).await;
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen, sent, "every key's records were called in input order");
    let replies = b.kafka.read_all(&b.reply).await;
    let mut replied: HashMap<String, Vec<String>> = HashMap::new();
    for r in replies {
        replied.entry(r.key.unwrap()).or_default().push(r.value.unwrap());
    }
    assert_eq!(replied, sent, "every key's replies were published in input order");
    assert!(
        most.load(std::sync::atomic::Ordering::SeqCst) >= 2,
        "different keys of one partition ran concurrently"
    );
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_older_than_max_age_expire_without_a_call() {
    let extra = "    freshness: { max_age: 5s }\n";
    let b = Bench::start(1, extra, |req: Req| async move { Resp::new(200, &req.body) }).await;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    b.kafka.send_at(&b.source, "k", "stale", now - 60_000).await;
    b.kafka.send_at(&b.source, "k", "fresh", now).await;
    b.wait_committed(2).await;
    b.wait_outcome(Outcome::Expired, 1).await;
    let bodies: Vec<String> = b.service.requests().iter().map(|r| r.body.clone()).collect();
    assert_eq!(bodies, vec!["fresh"], "the stale record was never called");
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conflate_calls_only_the_newest_queued_record_of_a_key() {
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let held = gate.clone();
    let extra = "    freshness: { conflate: true }\n";
    let b = Bench::start(1, extra, move |req: Req| {
        let held = held.clone();
        async move {
            if req.body == "price-0" {
                let _p = held.acquire().await;
            }
            Resp::new(200, &req.body)
        }
    })
    .await;
    for i in 0..6 {
        b.kafka
            .send(&b.source, None, Some("EURUSD"), &format!("price-{i}"), &[])
            .await;
    }
    b.kafka
        .send(&b.source, None, Some("GBPUSD"), "other-0", &[])
        .await;
    eventually(WAIT, "all 7 records taken", || async {
        (b.sidecar().snapshot()[0].received == 7).then_some(())
    })
    .await;
    gate.add_permits(1);
    b.wait_committed(7).await;
    let mut bodies: Vec<String> = b.service.requests().iter().map(|r| r.body.clone()).collect();
    bodies.sort();
    assert_eq!(
        bodies,
        vec!["other-0", "price-0", "price-5"],
        "price-1..4 were superseded by price-5"
    );
    let s = &b.sidecar().snapshot()[0];
    assert_eq!(s.get(Outcome::Expired), 4);
    assert_eq!(s.get(Outcome::Replied), 3);
    b.stop().await;
}

/// The SPEC's sketch of a pattern route (`pattern: '^payments\..*'`, replies to
/// `payments.processed`, dead letters to `payments.dlq`): the pattern matches the route's own
/// output, which ferry does not read. Each record is called once, and its reply or dead letter
/// lands once; read back, they would have been called again and again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pattern_route_does_not_read_the_topics_it_writes_to() {
    let kafka = Kafka::start();
    let prefix = unique("payments");
    let (source, reply, dlq) = (
        format!("{prefix}.incoming"),
        format!("{prefix}.processed"),
        format!("{prefix}.dlq"),
    );
    kafka.create(&source, 2).await;
    kafka.create(&reply, 1).await;
    kafka.create(&dlq, 1).await;
    let service = Service::start(|r: Req| async move {
        if r.body == "bad" {
            Resp::new(422, "refused")
        } else {
            Resp::new(200, &format!("done:{}", r.body))
        }
    })
    .await;
    let group = unique("group");
    let text = config_text(&kafka, &group, &source, &service.url("/h"), &reply, &dlq, "").replace(
        &format!("      topics: [{source}]\n"),
        &format!("      pattern: '^{}\\..*'\n", regex::escape(&prefix)),
    );
    let sidecar = Sidecar::start(parse(&text)).await.expect("sidecar starts");
    for (k, v) in [("a", "1"), ("b", "2"), ("c", "bad"), ("d", "3")] {
        kafka.send(&source, None, Some(k), v, &[]).await;
    }

    let replies = kafka.read(&reply, 3, WAIT).await;
    assert_eq!(kafka.read(&dlq, 1, WAIT).await.len(), 1);
    // A loop shows at once: the service answers in microseconds.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(service.requests().len(), 4, "each record is called once");
    assert_eq!(kafka.read_all(&reply).await.len(), replies.len());
    assert_eq!(kafka.read_all(&dlq).await.len(), 1);
    assert!(
        replies
            .iter()
            .all(|r| r.value.as_deref().is_some_and(|v| !v.starts_with("done:done:")))
    );
    sidecar.shutdown();
    tokio::time::timeout(WAIT, sidecar.wait())
        .await
        .expect("stops in time")
        .expect("stops cleanly");
}
