//! Broker faults injected into the embedded broker (librdkafka's mock cluster): failed produce,
//! commit and fetch requests, a leader moving, a broker going down and up. ferry must survive
//! them without losing a record or leaving a partition stuck. Embedded broker only: an external
//! broker cannot be told to fail.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::*;
use ferry::sidecar::Sidecar;
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
