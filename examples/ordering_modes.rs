//! What `key` mode gives over `partition` mode with a service that takes 5 ms per call.
//!
//! Runs the real sidecar against the embedded broker and a local HTTP service that sleeps 5 ms,
//! for each mode and `concurrency.per_partition` in 1, 8, 64, and prints records per second.
//! `cargo run --release --example ordering_modes` (numbers in the README).

use std::time::{Duration, Instant};

use ferry::config::{self, Interpolator};
use ferry::embedded::EmbeddedBroker;
use ferry::sidecar::Sidecar;
use rdkafka::ClientConfig;
use rdkafka::producer::{FutureProducer, FutureRecord};

const RECORDS: usize = 2000;
const PARTITIONS: i32 = 4;
const KEYS: usize = 200;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    ferry::sidecar::install_crypto();
    let app = axum::Router::new().fallback(|body: String| async move {
        tokio::time::sleep(Duration::from_millis(5)).await;
        body
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let service = listener.local_addr()?;
    tokio::spawn(async move { axum::serve(listener, app).await });

    println!("{RECORDS} records, {PARTITIONS} partitions, {KEYS} keys, service latency 5 ms\n");
    println!("| ordering | per_partition | records/s |");
    println!("|---|---:|---:|");
    for ordering in ["partition", "key"] {
        for per_partition in [1, 8, 64] {
            if ordering == "partition" && per_partition > 8 {
                // One call at a time per partition; the bound only gives room for the replies
                // awaiting the broker while the next records are called, and 8 is plenty.
                continue;
            }
            let rate = run(service, ordering, per_partition).await?;
            println!("| {ordering} | {per_partition} | {rate:.0} |");
        }
    }
    Ok(())
}

async fn run(service: std::net::SocketAddr, ordering: &str, per_partition: usize) -> anyhow::Result<f64> {
    let broker = EmbeddedBroker::start(1)?;
    for (t, p) in [("in", PARTITIONS), ("out", PARTITIONS), ("dlq", 1)] {
        broker.create_topic(t, p)?;
    }
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", broker.bootstrap_servers())
        .create()?;
    for i in 0..RECORDS {
        let key = format!("key-{}", i % KEYS);
        producer
            .send(
                FutureRecord::to("in").key(&key).payload("{}"),
                Duration::from_secs(10),
            )
            .await
            .map_err(|(e, _)| e)?;
    }
    let yaml = format!(
        "kafka: {{ brokers: \"{b}\", group_id: bench, commit_interval: 100ms }}\n\
         routes:\n  - name: bench\n    from: {{ topics: [in] }}\n    ordering: {ordering}\n\
         \x20   concurrency: {{ per_partition: {per_partition}, total: 4096 }}\n\
         \x20   call: {{ http: {{ url: \"http://{service}/\" }} }}\n\
         \x20   reply: {{ to: out }}\n    dead_letter: {{ to: dlq }}\nadmin: {{ listen: null }}\n",
        b = broker.bootstrap_servers()
    );
    let config = config::parse(
        &yaml,
        std::path::Path::new("bench.yaml"),
        &Interpolator::from_pairs(&[]),
    )?;
    let sidecar = Sidecar::start(config).await?;
    // Timed from the first record taken, so the group join is not counted.
    while sidecar.snapshot()[0].received == 0 {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let start = Instant::now();
    while sidecar.snapshot()[0].finished() < RECORDS as u64 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let rate = RECORDS as f64 / start.elapsed().as_secs_f64();
    sidecar.shutdown();
    sidecar.wait().await?;
    Ok(rate)
}
