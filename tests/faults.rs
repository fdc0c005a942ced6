//! Broker faults injected into the embedded broker (librdkafka's mock cluster): failed produce,
//! commit and fetch requests, a leader moving, a broker going down and up. ferry must survive
//! them without losing a record or leaving a partition stuck. Embedded broker only: an external
//! broker cannot be told to fail.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::*;
use ferry::sidecar::Sidecar;
use rdkafka::mocking::MockCoordinator;
use rdkafka::types::RDKafkaRespErr::*;
use rdkafka_sys::types::RDKafkaApiKey;

const WAIT: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn produce_commit_and_fetch_errors_leader_moves_and_a_broker_restart_lose_nothing() {
    let kafka = Kafka::start_cluster(3);
    let Some(embedded) = &kafka.embedded else {
        eprintln!("skipping: faults are injected into the embedded broker only");
        return;
    };
    let t = kafka.route_topics(2).await;
    let service = Service::start(|r: Req| async move { Resp::new(200, &r.body) }).await;
    let text = route_config(&kafka, &t, &service.url("/h"), "");
    let sidecar = Sidecar::start(parse(&text)).await.expect("sidecar starts");
    let mock = embedded.mock().unwrap();
    let mut sent = 0;
    let mut send = |n: usize| {
        let range = sent..sent + n;
        sent += n;
        range
    };
    for i in send(20) {
        kafka
            .send(&t.source, None, Some(&format!("k{i}")), &i.to_string(), &[])
            .await;
    }

    // Produce requests fail (the replies), retriably.
    mock.request_errors(
        RDKafkaApiKey::Produce,
        &[
            RD_KAFKA_RESP_ERR_NOT_LEADER_FOR_PARTITION,
            RD_KAFKA_RESP_ERR_REQUEST_TIMED_OUT,
            RD_KAFKA_RESP_ERR_NOT_ENOUGH_REPLICAS,
        ],
    );
    // Commits fail for a while.
    mock.request_errors(
        RDKafkaApiKey::OffsetCommit,
        &[
            RD_KAFKA_RESP_ERR_COORDINATOR_NOT_AVAILABLE,
            RD_KAFKA_RESP_ERR_NOT_COORDINATOR,
            RD_KAFKA_RESP_ERR_REQUEST_TIMED_OUT,
        ],
    );
    // Fetches fail.
    mock.request_errors(
        RDKafkaApiKey::Fetch,
        &[
            RD_KAFKA_RESP_ERR_NOT_LEADER_FOR_PARTITION,
            RD_KAFKA_RESP_ERR_UNKNOWN_TOPIC_OR_PART,
            RD_KAFKA_RESP_ERR_REQUEST_TIMED_OUT,
        ],
    );
    for i in send(20) {
        kafka
            .send(&t.source, None, Some(&format!("k{i}")), &i.to_string(), &[])
            .await;
    }
    // Leaders move: the source's partitions and the reply topic's.
    mock.partition_leader(&t.source, 0, Some(2)).unwrap();
    mock.partition_leader(&t.source, 1, Some(3)).unwrap();
    mock.partition_leader(&t.reply, 0, Some(2)).unwrap();
    for i in send(20) {
        kafka
            .send(&t.source, None, Some(&format!("k{i}")), &i.to_string(), &[])
            .await;
    }
    // A broker goes down for two seconds and comes back.
    mock.broker_down(1).unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    mock.broker_up(1).unwrap();
    for i in send(20) {
        kafka
            .send(&t.source, None, Some(&format!("k{i}")), &i.to_string(), &[])
            .await;
    }

    // Every record replied to, every offset committed, nothing dead-lettered.
    eventually(WAIT, "all committed", || async {
        (kafka.committed_total(&t.group, &t.source, 2).await == sent as i64).then_some(())
    })
    .await;
    let replies = kafka.read_all(&t.reply).await;
    let got: BTreeSet<usize> = replies
        .iter()
        .filter_map(|r| r.value.as_deref()?.parse().ok())
        .collect();
    let want: BTreeSet<usize> = (0..sent).collect();
    assert_eq!(got, want, "a record was lost");
    assert!(
        kafka.read_all(&t.dlq).await.is_empty(),
        "broker faults are not the record's fault"
    );
    eprintln!(
        "faults: {sent} records, {} replies ({} repeated)",
        replies.len(),
        replies.len() - sent
    );
    // Nothing is stuck: a record sent now goes straight through.
    kafka.send(&t.source, None, Some("last"), "last", &[]).await;
    eventually(WAIT, "a record after the faults", || async {
        (kafka.committed_total(&t.group, &t.source, 2).await == sent as i64 + 1).then_some(())
    })
    .await;
    sidecar.shutdown();
    tokio::time::timeout(WAIT, sidecar.wait()).await.unwrap().unwrap();
}

/// The reply topic led by broker 2, everything else (the source, the dead letters, the group's
/// coordinator) by broker 1: broker 2 going down holds back the replies and nothing else.
async fn replies_on_broker_2(kafka: &Kafka, t: &RouteTopics) {
    let mock = kafka
        .embedded
        .as_ref()
        .and_then(|e| e.mock().ok())
        .expect("embedded broker");
    mock.partition_leader(&t.source, 0, Some(1)).unwrap();
    mock.partition_leader(&t.dlq, 0, Some(1)).unwrap();
    mock.partition_leader(&t.reply, 0, Some(2)).unwrap();
    mock.coordinator(MockCoordinator::Group(t.group.clone()), 1)
        .unwrap();
}

/// The values of `replies` in the order of each one's last copy: what a reader that keeps the
/// newest copy of a record sees.
fn last_copies(replies: &[Rec]) -> Vec<String> {
    let values: Vec<String> = replies.iter().filter_map(|r| r.value.clone()).collect();
    let mut last: Vec<String> = Vec::new();
    for v in values {
        last.retain(|x| *x != v);
        last.push(v);
    }
    last
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partition_lane_calls_its_next_record_while_the_previous_reply_awaits_the_broker() {
    let kafka = Kafka::start_cluster(2);
    if kafka.embedded.is_none() {
        eprintln!("skipping: needs a broker that can be taken down");
        return;
    }
    let t = kafka.route_topics(1).await;
    replies_on_broker_2(&kafka, &t).await;
    let service = Service::start(|r: Req| async move { Resp::new(200, &r.body) }).await;
    let text = route_config(&kafka, &t, &service.url("/h"), "    ordering: partition\n");
    let sidecar = Sidecar::start(parse(&text)).await.expect("sidecar starts");
    kafka.send(&t.source, Some(0), Some("k"), "warm", &[]).await;
    eventually(WAIT, "the first record committed", || async {
        (kafka.committed_total(&t.group, &t.source, 1).await == 1).then_some(())
    })
    .await;

    // No reply can be acknowledged now; the lane calls its records one after another anyway.
    let mock = kafka.embedded.as_ref().and_then(|e| e.mock().ok()).unwrap();
    mock.broker_down(2).unwrap();
    let values: Vec<String> = (0..10).map(|i| format!("{i:03}")).collect();
    // Spaced out, so the lane has called each record before the next arrives: it must not
    // wait for the broker's answers to its earlier replies before it calls a newcomer.
    for v in &values {
        kafka.send(&t.source, Some(0), Some(v), v, &[]).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eventually(WAIT, "all ten records called", || async {
        (service.requests().len() == 11).then_some(())
    })
    .await;
    let called: Vec<String> = service.requests().into_iter().skip(1).map(|r| r.body).collect();
    assert_eq!(called, values, "called strictly in partition order");
    assert_eq!(
        kafka.committed_total(&t.group, &t.source, 1).await,
        1,
        "nothing is committed while its reply is unacknowledged"
    );

    mock.broker_up(2).unwrap();
    eventually(
        WAIT,
        "all committed once the replies are acknowledged",
        || async { (kafka.committed_total(&t.group, &t.source, 1).await == 11).then_some(()) },
    )
    .await;
    let replies = kafka.read_all(&t.reply).await;
    let mut want = vec!["warm".to_string()];
    want.extend(values);
    assert_eq!(last_copies(&replies), want, "replies in partition order");
    assert_eq!(sidecar.snapshot()[0].get(ferry::outcome::Outcome::Replied), 11);
    sidecar.shutdown();
    tokio::time::timeout(WAIT, sidecar.wait()).await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_reply_is_written_again_before_the_later_replies_of_its_lane() {
    let kafka = Kafka::start_cluster(2);
    let Some(embedded) = &kafka.embedded else {
        eprintln!("skipping: faults are injected into the embedded broker only");
        return;
    };
    let t = kafka.route_topics(1).await;
    replies_on_broker_2(&kafka, &t).await;
    // The first record's call waits for the test, so that the failure hits its reply. The
    // calls behind it take 25 ms each, so that their replies reach the producer after the first
    // reply's request has left. On a loaded machine the test failed on its precondition (the
    // first reply not lost) about one run in fifteen; the likely cause, not proven, is
    // librdkafka's broker thread waking late and putting all ten replies in that one refused
    // request, which is then written again in order and tests nothing.
    let gate = std::sync::Arc::new(tokio::sync::Semaphore::new(0));
    let held = gate.clone();
    let service = Service::start(move |r: Req| {
        let held = held.clone();
        async move {
            if r.body == "000" {
                let _permit = held.acquire().await;
            } else if r.body != "warm" {
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
            Resp::new(200, &r.body)
        }
    })
    .await;
    // One produce request in flight: the replies behind the lost one wait in the producer's
    // queue, not in requests the broker would refuse as out of sequence, so librdkafka writes
    // them once it has bumped its epoch past the gap.
    let text = route_config(&kafka, &t, &service.url("/h"), "    ordering: partition\n").replace(
        "    heartbeat.interval.ms: 500\n",
        "    heartbeat.interval.ms: 500\n    max.in.flight.requests.per.connection: 1\n",
    );
    let sidecar = Sidecar::start(parse(&text)).await.expect("sidecar starts");
    // A first reply opens the producer's connection to broker 2, so that the replies below
    // leave one request each rather than pile up behind the connection's set-up.
    kafka.send(&t.source, Some(0), Some("k"), "warm", &[]).await;
    eventually(WAIT, "the first record committed", || async {
        (kafka.committed_total(&t.group, &t.source, 1).await == 1).then_some(())
    })
    .await;
    let values: Vec<String> = (0..10).map(|i| format!("{i:03}")).collect();
    for v in &values {
        kafka.send(&t.source, Some(0), Some(v), v, &[]).await;
    }
    eventually(WAIT, "the first record called", || async {
        (service.requests().len() == 2).then_some(())
    })
    .await;

    // The broker refuses the next produce request for good (`INVALID_RECORD`: librdkafka does
    // not retry it, nor, unlike an authorization error, fail the topic's other records): the
    // first reply is lost. It answers after half a second, by when the lane has called the
    // records behind it and handed their replies to the producer.
    let mock = embedded.mock().unwrap();
    mock.broker_round_trip_time(2, Duration::from_millis(500))
        .unwrap();
    mock.request_errors(RDKafkaApiKey::Produce, &[RD_KAFKA_RESP_ERR_INVALID_RECORD]);
    gate.add_permits(1);
    eventually(WAIT, "all committed", || async {
        (kafka.committed_total(&t.group, &t.source, 1).await == 11).then_some(())
    })
    .await;
    let replies: Vec<Rec> = kafka.read_all(&t.reply).await.into_iter().skip(1).collect();
    let landed: Vec<String> = replies.iter().filter_map(|r| r.value.clone()).collect();
    let s = &sidecar.snapshot()[0];
    assert!(
        s.produce_errors >= 1,
        "the injected error never hit a reply: {landed:?}"
    );
    assert!(
        landed.first().map(String::as_str) != Some("000"),
        "the first reply was not lost, so nothing was tested: {landed:?}"
    );
    assert_eq!(
        last_copies(&replies),
        values,
        "the lost reply was written after later ones without them following it: {landed:?}"
    );
    assert_eq!(s.get(ferry::outcome::Outcome::Replied), 11);
    assert!(kafka.read_all(&t.dlq).await.is_empty());
    sidecar.shutdown();
    tokio::time::timeout(WAIT, sidecar.wait()).await.unwrap().unwrap();
}

/// A sync commit waits for the group coordinator up to `socket.timeout.ms`, and leaving the
/// group for a rebalance to end: a stop must not wait on them for ever (one such stop, in a
/// group the campaign kept churning, had not ended after 60 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_ends_in_time_when_the_group_coordinator_does_not_answer() {
    let kafka = Kafka::start_cluster(2);
    if kafka.embedded.is_none() {
        eprintln!("skipping: needs a broker whose answers can be held back");
        return;
    }
    let t = kafka.route_topics(1).await;
    let mock = kafka.embedded.as_ref().and_then(|e| e.mock().ok()).unwrap();
    for topic in [&t.source, &t.reply, &t.dlq] {
        mock.partition_leader(topic, 0, Some(1)).unwrap();
    }
    mock.coordinator(MockCoordinator::Group(t.group.clone()), 2)
        .unwrap();
    let service = Service::start(|r: Req| async move { Resp::new(200, &r.body) }).await;
    // The real binary, so that the exit code is checked too.
    let text = route_config(&kafka, &t, &service.url("/h"), "");
    let drain_timeout = parse(&text).shutdown.drain_timeout.0;
    let dir = tempfile::tempdir().unwrap();
    let (config, log) = (dir.path().join("ferry.yaml"), dir.path().join("ferry.log"));
    std::fs::write(&config, &text).unwrap();
    let mut ferry = Ferry::spawn(&config, &log);
    kafka.send(&t.source, Some(0), Some("k"), "first", &[]).await;
    eventually(WAIT, "the first record committed", || async {
        (kafka.committed_total(&t.group, &t.source, 1).await == 1).then_some(())
    })
    .await;

    // From now on the coordinator answers after a minute: the next record's commit hangs.
    mock.broker_round_trip_time(2, Duration::from_secs(60)).unwrap();
    kafka.send(&t.source, Some(0), Some("k"), "second", &[]).await;
    eventually(WAIT, "the second reply", || async {
        (kafka.read_all(&t.reply).await.len() == 2).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;

    let started = std::time::Instant::now();
    ferry.signal(libc::SIGTERM);
    let budget = drain_timeout + ferry::sidecar::STOP_AFTER_DRAIN;
    // Past the budget, the producer's flush and the traces' export get a second each at most;
    // `exit_code` panics if ferry has not exited by then.
    let code = ferry.exit_code(budget + Duration::from_secs(3)).await;
    let took = started.elapsed();
    let log = std::fs::read_to_string(&log).unwrap_or_default();
    assert_eq!(code, Some(1), "a stop cut short is not a clean one:\n{log}");
    assert!(
        log.contains(&format!("the stop did not finish within {budget:?}")),
        "{log}"
    );
    assert!(took >= budget, "gave up before its budget: {took:?}");
}

/// An echo service that answers only once the returned gate is given permits.
async fn held_echo() -> (Service, std::sync::Arc<tokio::sync::Semaphore>) {
    let gate = std::sync::Arc::new(tokio::sync::Semaphore::new(0));
    let held = gate.clone();
    let service = Service::start(move |r: Req| {
        let held = held.clone();
        async move {
            let _go = held.acquire().await;
            Resp::new(200, &r.body)
        }
    })
    .await;
    (service, gate)
}

/// The ferry binary with one record ("paid", key "k") whose call the service holds until
/// `gate` opens, with the librdkafka `property` added and a drain long past the tests'
/// patience: records that can never end must not make the stop wait for them.
struct InFlight {
    ferry: Ferry,
    log: std::path::PathBuf,
    /// The config, for the next start.
    text: String,
    gate: std::sync::Arc<tokio::sync::Semaphore>,
    _service: Service,
    _dir: tempfile::TempDir,
}

async fn a_call_in_flight(kafka: &Kafka, t: &RouteTopics, property: &str) -> InFlight {
    let (service, gate) = held_echo().await;
    let text = route_config(kafka, t, &service.url("/h"), "")
        .replace("drain_timeout: 5s", "drain_timeout: 120s")
        .replace(
            "session.timeout.ms: 6000",
            &format!("session.timeout.ms: 6000\n    {property}"),
        );
    let dir = tempfile::tempdir().unwrap();
    let (config, log) = (dir.path().join("ferry.yaml"), dir.path().join("ferry.log"));
    std::fs::write(&config, &text).unwrap();
    let ferry = Ferry::spawn(&config, &log);
    kafka.send(&t.source, None, Some("k"), "paid", &[]).await;
    eventually(WAIT, "the call", || async {
        (!service.requests().is_empty()).then_some(())
    })
    .await;
    InFlight {
        _service: service,
        ferry,
        log,
        text,
        gate,
        _dir: dir,
    }
}

/// `/readyz`'s status and body.
async fn readyz(addr: std::net::SocketAddr) -> (u16, String) {
    let answer = reqwest::get(format!("http://{addr}/readyz")).await.unwrap();
    let status = answer.status().as_u16();
    (status, answer.text().await.unwrap_or_default())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_topic_ferry_may_not_write_keeps_it_unready_until_the_broker_takes_a_write() {
    let kafka = Kafka::start();
    let Some(embedded) = &kafka.embedded else {
        eprintln!("skipping: faults are injected into the embedded broker only");
        return;
    };
    let t = kafka.route_topics(1).await;
    // The service answers once told to, so the errors below meet ferry's reply and not the
    // test's own input record (the broker fails the next produce requests of any client).
    let (service, gate) = held_echo().await;
    let text = route_config(&kafka, &t, &service.url("/h"), "");
    let sidecar = Sidecar::start(parse(&text)).await.expect("sidecar starts");
    let admin = sidecar.admin_addr.unwrap();
    eventually(WAIT, "ready", || async {
        (readyz(admin).await.0 == 200).then_some(())
    })
    .await;
    kafka.send(&t.source, None, Some("k"), "paid", &[]).await;
    eventually(WAIT, "the call", || async {
        (!service.requests().is_empty()).then_some(())
    })
    .await;

    // The broker refuses the reply's first four writes, as it does without a Write ACL; then
    // the permission is there. ferry writes again after 0.5, 1, 2 and 4 s.
    let mock = embedded.mock().unwrap();
    mock.request_errors(
        RDKafkaApiKey::Produce,
        &[RD_KAFKA_RESP_ERR_TOPIC_AUTHORIZATION_FAILED; 4],
    );
    gate.add_permits(1000);
    let why = eventually(WAIT, "unready", || async {
        let (status, body) = readyz(admin).await;
        (status == 503).then_some(body)
    })
    .await;
    assert!(
        why.contains(&format!("ferry may not write to topic `{}`", t.reply))
            && why.contains("grant ferry's principal Write on it"),
        "{why}"
    );
    assert_eq!(
        kafka.committed_total(&t.group, &t.source, 1).await,
        0,
        "nothing is committed past a reply the broker refused"
    );

    eventually(WAIT, "committed once the broker takes the reply", || async {
        (kafka.committed_total(&t.group, &t.source, 1).await == 1).then_some(())
    })
    .await;
    assert_eq!(readyz(admin).await.0, 200, "ready again");
    let replies = kafka.read_all(&t.reply).await;
    assert_eq!(replies.len(), 1);
    assert_eq!(replies[0].value.as_deref(), Some("paid"));
    assert!(
        kafka.read_all(&t.dlq).await.is_empty(),
        "a permission is not the record's fault"
    );
    sidecar.shutdown();
    tokio::time::timeout(WAIT, sidecar.wait()).await.unwrap().unwrap();
}

/// librdkafka's idempotent producer gives up for good when it can no longer vouch for the
/// order or the once-ness of what it wrote (its sequence numbers out of step with the broker's,
/// say): every later write fails. ferry must not sit there, live and failing every reply for
/// ever: it stops, commits nothing past what the broker acknowledged, and exits non-zero, so
/// its next start (a restart of the container) takes the records again with a new producer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_producer_that_failed_for_good_stops_ferry_and_its_records_wait_for_the_next_start() {
    let kafka = Kafka::start();
    let Some(embedded) = &kafka.embedded else {
        eprintln!("skipping: faults are injected into the embedded broker only");
        return;
    };
    let t = kafka.route_topics(1).await;
    // Held until the fault is armed, so that it meets ferry's reply and not the test's record.
    let mut call = a_call_in_flight(&kafka, &t, "max.poll.interval.ms: 300000").await;

    let (code, log) = the_reply_fails_the_producer_for_good(embedded, &mut call).await;
    assert_eq!(
        code,
        Some(1),
        "a producer failed for good ends the run with an error:\n{log}"
    );
    assert!(
        log.contains("The Kafka producer failed for good")
            && log.contains("out of order sequence number")
            && log.contains("its next start (the container's restart) takes those records again"),
        "the log says why:\n{log}"
    );
    assert_eq!(
        kafka.committed_total(&t.group, &t.source, 1).await,
        0,
        "nothing is committed past a reply the broker did not take"
    );

    // The next start takes the record again, with a producer of its own.
    the_next_start_replies_and_commits(&kafka, &t, &call.text).await;
    assert!(
        kafka.read_all(&t.dlq).await.is_empty(),
        "a producer's failure is not the record's fault"
    );
}

/// Lets the held call answer, and has the broker answer its reply's first write as if the
/// producer's sequence numbers were out of step with its own: for the first request in flight,
/// librdkafka's fatal error. Returns ferry's exit code (within `WAIT`) and its log.
async fn the_reply_fails_the_producer_for_good(
    embedded: &ferry::embedded::EmbeddedBroker,
    call: &mut InFlight,
) -> (Option<i32>, String) {
    embedded.mock().unwrap().request_errors(
        RDKafkaApiKey::Produce,
        &[RD_KAFKA_RESP_ERR_OUT_OF_ORDER_SEQUENCE_NUMBER],
    );
    call.gate.add_permits(1000);
    let code = call.ferry.exit_code(WAIT).await;
    (code, std::fs::read_to_string(&call.log).unwrap_or_default())
}

/// A rebalance revokes the partition while its record's call is held; the record's reply then
/// meets a producer failed for good. The revoke's drain gives up at once (nothing more can be
/// written, so no record in flight can end) rather than wait out its 120 s, and ferry stops with
/// the reason; the next start takes the record again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoke_under_way_gives_up_at_once_when_the_producer_fails_for_good() {
    use rdkafka::ClientConfig;
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    let kafka = Kafka::start();
    let Some(embedded) = &kafka.embedded else {
        eprintln!("skipping: faults are injected into the embedded broker only");
        return;
    };
    let t = kafka.route_topics(1).await;
    // An eager protocol: a member joining revokes every partition of every member.
    let mut call = a_call_in_flight(&kafka, &t, "partition.assignment.strategy: range").await;
    let stop = Arc::new(AtomicBool::new(false));
    let member = {
        let (brokers, group, source, stop) = (
            kafka.brokers.clone(),
            t.group.clone(),
            t.source.clone(),
            stop.clone(),
        );
        std::thread::spawn(move || {
            let c: BaseConsumer = ClientConfig::new()
                .set("bootstrap.servers", &brokers)
                .set("group.id", &group)
                .set("partition.assignment.strategy", "range")
                .set("enable.auto.commit", "false")
                .set("session.timeout.ms", "6000")
                .create()
                .unwrap();
            c.subscribe(&[&source]).unwrap();
            while !stop.load(Ordering::SeqCst) {
                let _ = c.poll(Duration::from_millis(50));
            }
        })
    };
    eventually(WAIT, "the revoke draining the held record", || async {
        std::fs::read_to_string(&call.log)
            .unwrap_or_default()
            .contains("Partitions revoked, draining")
            .then_some(())
    })
    .await;

    let (code, log) = the_reply_fails_the_producer_for_good(embedded, &mut call).await;
    assert_eq!(
        code,
        Some(1),
        "stopped well within the revoke's 120 s drain:\n{log}"
    );
    assert!(
        log.contains(
            "Nothing more can be written; unfinished records will be handled again by the next owner"
        ),
        "{log}"
    );
    assert_eq!(kafka.committed_total(&t.group, &t.source, 1).await, 0);
    stop.store(true, Ordering::SeqCst);
    member.join().unwrap();
    the_next_start_replies_and_commits(&kafka, &t, &call.text).await;
}

/// With static membership (`group.instance.id` in `kafka.properties`), the broker fences a
/// member when another takes its instance id: librdkafka's fatal consumer error, after which
/// nothing is fetched or committed. ferry stops with the reason rather than look healthy while
/// its partitions stand still, and the next start takes the record again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_fenced_for_good_stops_ferry_and_its_records_wait_for_the_next_start() {
    let kafka = Kafka::start();
    let Some(embedded) = &kafka.embedded else {
        eprintln!("skipping: faults are injected into the embedded broker only");
        return;
    };
    let t = kafka.route_topics(1).await;
    // Held until the consumer is fenced: the record is then in flight, and cannot be committed.
    let mut call = a_call_in_flight(&kafka, &t, "group.instance.id: ferry-0").await;

    // What the group coordinator answers a member whose instance id another member now holds.
    let mock = embedded.mock().unwrap();
    // One: the next heartbeat is ferry's, and a second would fence the next start too.
    mock.request_errors(RDKafkaApiKey::Heartbeat, &[RD_KAFKA_RESP_ERR_FENCED_INSTANCE_ID]);
    let code = call.ferry.exit_code(WAIT).await;
    call.gate.add_permits(1000);
    let log = std::fs::read_to_string(&call.log).unwrap_or_default();
    assert_eq!(
        code,
        Some(1),
        "a consumer failed for good ends the run with an error:\n{log}"
    );
    assert!(
        log.contains("The Kafka consumer failed for good")
            && log.contains("group.instance.id")
            && log.contains("its next start (the container's restart) takes the records"),
        "the log says why:\n{log}"
    );
    assert_eq!(
        kafka.committed_total(&t.group, &t.source, 1).await,
        0,
        "a fenced member commits nothing"
    );

    // The next start, with the same instance id, takes the record again.
    the_next_start_replies_and_commits(&kafka, &t, &call.text).await;
}

/// After a stop for good: the next start (in process) takes the call's record again, replies
/// and commits it.
async fn the_next_start_replies_and_commits(kafka: &Kafka, t: &RouteTopics, text: &str) {
    let sidecar = Sidecar::start(parse(text)).await.expect("sidecar starts");
    eventually(WAIT, "committed by the next start", || async {
        (kafka.committed_total(&t.group, &t.source, 1).await == 1).then_some(())
    })
    .await;
    let replies = kafka.read_all(&t.reply).await;
    assert!(
        replies.iter().any(|r| r.value.as_deref() == Some("paid")),
        "the record's reply is written by the next start"
    );
    sidecar.shutdown();
    tokio::time::timeout(WAIT, sidecar.wait()).await.unwrap().unwrap();
}

/// librdkafka's buffer for records not yet acknowledged is full far more often than with its
/// default (a hundred thousand): replies wait in ferry's outbox for room, none is lost, and they
/// keep their lane's order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replies_wait_for_room_in_a_full_producer_buffer_and_keep_their_order() {
    let kafka = Kafka::start();
    let t = kafka.route_topics(1).await;
    let service = Service::start(|r: Req| async move { Resp::new(200, &r.body) }).await;
    let text = route_config(&kafka, &t, &service.url("/h"), "    ordering: partition\n").replace(
        "    heartbeat.interval.ms: 500",
        "    heartbeat.interval.ms: 500\n    queue.buffering.max.messages: 3",
    );
    let sidecar = Sidecar::start(parse(&text)).await.expect("sidecar starts");
    let want: Vec<String> = (0..300).map(|i| format!("{i:03}")).collect();
    for v in &want {
        kafka.send(&t.source, Some(0), Some("k"), v, &[]).await;
    }
    eventually(WAIT, "all committed", || async {
        (kafka.committed_total(&t.group, &t.source, 1).await == want.len() as i64).then_some(())
    })
    .await;
    let replies = kafka.read_all(&t.reply).await;
    assert_eq!(last_copies(&replies), want, "every reply, in partition order");
    assert_eq!(
        replies.len(),
        want.len(),
        "each reply written once: a full buffer is waited out, not a failed write"
    );
    assert_eq!(sidecar.snapshot()[0].produce_errors, 0);
    assert!(kafka.read_all(&t.dlq).await.is_empty());
    sidecar.shutdown();
    tokio::time::timeout(WAIT, sidecar.wait()).await.unwrap().unwrap();
}

/// A coordinator that takes none of this member's commits for longer than a session (out of
/// reach, as far as the member can tell) may have given its partitions to another member: ferry
/// takes no new record until a commit is taken again, says why in `/status` and the metrics, and
/// then takes them all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_wait_while_the_group_takes_no_commit_for_a_whole_session() {
    let kafka = Kafka::start();
    let Some(embedded) = &kafka.embedded else {
        eprintln!("skipping: faults are injected into the embedded broker only");
        return;
    };
    let t = kafka.route_topics(1).await;
    let service = Service::start(|r: Req| async move { Resp::new(200, &r.body) }).await;
    let text = route_config(&kafka, &t, &service.url("/h"), "");
    let text = text.replace("    session.timeout.ms: 6000\n", "    session.timeout.ms: 3000\n");
    assert!(text.contains("session.timeout.ms: 3000"), "{text}");
    let sidecar = Sidecar::start(parse(&text)).await.expect("sidecar starts");
    let base = format!("http://{}", sidecar.admin_addr.expect("admin listens"));
    let status = || async {
        let (code, _, body) = admin_call("GET", &format!("{base}/status"), None).await;
        assert_eq!(code, 200, "{body}");
        body
    };
    kafka.send(&t.source, None, Some("k"), "first", &[]).await;
    eventually(WAIT, "the first record committed", || async {
        (kafka.committed_total(&t.group, &t.source, 1).await == 1).then_some(())
    })
    .await;

    // Every commit times out from now on, for about 30 s (librdkafka tries each up to three
    // times); the heartbeats go on. (Not `REBALANCE_IN_PROGRESS`: the
    // coordinator checks the member and its generation before it refuses a commit for a
    // rebalance, so that refusal confirms the member.) The second record's commit is the first.
    embedded.mock().unwrap().request_errors(
        RDKafkaApiKey::OffsetCommit,
        &[RD_KAFKA_RESP_ERR_REQUEST_TIMED_OUT; 250],
    );
    kafka.send(&t.source, None, Some("k"), "second", &[]).await;
    eventually(WAIT, "the partition held, its reason given", || async {
        status().await.contains("\"unconfirmed\"").then_some(())
    })
    .await;
    assert_eq!(
        service.requests().len(),
        2,
        "the records before the hold were called"
    );
    for v in ["third", "fourth", "fifth"] {
        kafka.send(&t.source, None, Some("k"), v, &[]).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let body = status().await;
    assert!(
        body.contains("\"unconfirmed\""),
        "still held: the refusals last longer: {body}"
    );
    assert_eq!(
        service.requests().len(),
        2,
        "no new record is called while the group has not taken a commit for a session"
    );
    let (_, _, metrics) = admin_call("GET", &format!("{base}/metrics"), None).await;
    assert!(
        metrics.contains(r#"ferry_paused_partitions{reason="unconfirmed",route="test"} 1"#),
        "{metrics}"
    );

    // Once a commit is taken again, every record gets through, none lost.
    eventually(Duration::from_secs(180), "all five committed", || async {
        (kafka.committed_total(&t.group, &t.source, 1).await == 5).then_some(())
    })
    .await;
    let replied: BTreeSet<String> = kafka
        .read_all(&t.reply)
        .await
        .into_iter()
        .filter_map(|r| r.value)
        .collect();
    let sent: BTreeSet<String> = ["first", "second", "third", "fourth", "fifth"]
        .into_iter()
        .map(String::from)
        .collect();
    assert_eq!(replied, sent);
    eventually(WAIT, "taking records again", || async {
        (!status().await.contains("\"unconfirmed\"")).then_some(())
    })
    .await;
    sidecar.shutdown();
    tokio::time::timeout(WAIT, sidecar.wait()).await.unwrap().unwrap();
}
