//! `ferry demo`: an embedded broker, an example service, sample records, the real pipeline with
//! `config-examples/demo.yaml`, and a report of where every record ended.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::Path as UrlPath;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use rdkafka::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::util::Timeout;
use rdkafka::{Offset, TopicPartitionList};

use crate::config::{self, Interpolator};
use crate::embedded::EmbeddedBroker;
use crate::outcome::Outcome;
use crate::sidecar::Sidecar;
use crate::telemetry::names;

const CONFIG: &str = include_str!("../../config-examples/demo.yaml");
const SOURCE: &str = "demo.orders";
const REPLIES: &str = "demo.orders.processed";
const DEAD_LETTERS: &str = "demo.orders.dlq";
const PARTITIONS: i32 = 3;

pub async fn demo(records: u32) -> i32 {
    if let Err(e) = crate::telemetry::init_logging("warn", false) {
        eprintln!("error: {e}");
        return crate::config::EXIT_CONFIG;
    }
    match run(records).await {
        Ok(()) => 0,
        Err(e) => super::fail("the demo failed", &e),
    }
}

async fn run(records: u32) -> anyhow::Result<()> {
    let broker = EmbeddedBroker::start(1)?;
    for (topic, partitions) in [(SOURCE, PARTITIONS), (REPLIES, PARTITIONS), (DEAD_LETTERS, 1)] {
        broker.create_topic(topic, partitions)?;
    }
    let service = example_service().await?;
    println!("embedded broker   {}", broker.bootstrap_servers());
    println!("example service   http://{service}/orders/{{key}}");

    let env = [
        ("FERRY_DEMO_BROKERS", broker.bootstrap_servers()),
        ("FERRY_DEMO_SERVICE", &format!("http://{service}")),
        ("FERRY_DEMO_ADMIN", "127.0.0.1:0"),
    ];
    let config = config::parse(
        CONFIG,
        Path::new("config-examples/demo.yaml"),
        &Interpolator::from_pairs(&env),
    )?;

    let sent = send_samples(broker.bootstrap_servers(), records).await?;
    println!("sent {records} orders to {SOURCE} ({PARTITIONS} partitions)\n");

    let started = Instant::now();
    let sidecar = Sidecar::start(config).await?;
    let deadline = started + Duration::from_secs(120);
    loop {
        let s = &sidecar.snapshot()[0];
        let committed: i64 = sidecar.partitions().iter().filter_map(|p| p.committed).sum();
        // Lag is known once the high watermarks are (read once a second); a partition no
        // sample went to has none to know (`--records` below the partitions).
        let measured = sidecar
            .partitions()
            .iter()
            .all(|p| p.lag.is_some() || p.high_watermark == Some(0));
        if s.finished() >= u64::from(records) && committed >= sent && measured {
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "records did not all finish in time: {} of {records} finished, {committed} committed",
            s.finished()
        );
        tracing::debug!(finished = s.finished(), committed, "Waiting for the demo records");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let elapsed = started.elapsed();
    let snapshot = sidecar.snapshot().remove(0);
    // The figures come from the sidecar's own /metrics, as an operator's Prometheus sees them.
    let admin = sidecar
        .admin_addr
        .ok_or_else(|| anyhow::anyhow!("the demo config has no admin endpoint"))?;
    let scrape = reqwest::Client::builder()
        .no_proxy()
        .build()?
        .get(format!("http://{admin}/metrics"))
        .send()
        .await?
        .text()
        .await?;
    let figures = Figures::parse(&scrape);
    let partitions = sidecar.partitions();
    let stopper = sidecar.stopper();
    stopper.stop();
    sidecar.wait().await?;

    println!(
        "where the {records} records ended (route `orders`, {:.1?}; figures from http://{admin}/metrics):",
        elapsed
    );
    println!(
        "  {:<14} {:>5}",
        "received",
        figures.sum(names::RECORDS_RECEIVED, &[])
    );
    for o in Outcome::ALL {
        let n = figures.sum(names::OUTCOMES, &[("outcome", o.as_str())]);
        if n > 0.0 {
            println!("  {:<14} {n:>5}   {}", o.as_str(), explain(o));
        }
        // The dead letters' reasons under their own line, not under the outcome printed last.
        if o == Outcome::DeadLettered {
            for reason in snapshot.dead_letter_reasons.keys() {
                let n = figures.sum(names::OUTCOMES, &[("outcome", o.as_str()), ("reason", reason)]);
                println!("    reason {reason:<12} {n:>3}");
            }
        }
    }
    let calls = figures.sum(&format!("{}_count", names::CALL_DURATION), &[]);
    println!(
        "  calls {calls}, of which retried {}; call latency p50 {}, p99 {}; end to end p50 {}, p99 {}",
        figures.sum(names::RETRIES, &[]),
        millis(figures.quantile(names::CALL_DURATION, 0.5)),
        millis(figures.quantile(names::CALL_DURATION, 0.99)),
        millis(figures.quantile(names::END_TO_END, 0.5)),
        millis(figures.quantile(names::END_TO_END, 0.99)),
    );
    for (result, n) in figures.by_label(&format!("{}_count", names::CALL_DURATION), "result") {
        println!("    result {result:<12} {n:>3}");
    }
    let lag = if figures.series(names::CONSUMER_LAG, &[]).next().is_some() {
        figures.sum(names::CONSUMER_LAG, &[]).to_string()
    } else {
        "not measured yet (high watermarks are read once a second)".into()
    };
    println!(
        "  consumer lag {lag}, in flight {}, abandoned {}",
        figures.sum(names::IN_FLIGHT, &[]),
        figures.sum(names::ABANDONED, &[])
    );

    let brokers = broker.bootstrap_servers().to_string();
    let (replies, dead) = tokio::task::spawn_blocking(move || {
        (
            read_topic(&brokers, REPLIES, PARTITIONS),
            read_topic(&brokers, DEAD_LETTERS, 1),
        )
    })
    .await?;
    let (replies, dead) = (replies?, dead?);
    println!("\nin Kafka:");
    println!("  {REPLIES:<24} {:>5} replies", replies.len());
    println!("  {DEAD_LETTERS:<24} {:>5} dead letters", dead.len());
    let mut by_reason: BTreeMap<String, usize> = BTreeMap::new();
    for headers in &dead {
        *by_reason
            .entry(headers.get("ferry.error.reason").cloned().unwrap_or_default())
            .or_default() += 1;
    }
    for (reason, n) in by_reason {
        println!("    ferry.error.reason={reason}: {n}");
    }
    if let Some(example) = dead.first() {
        println!("  a dead letter's headers:");
        for (k, v) in example {
            println!("    {k}: {v}");
        }
    }
    println!("\ncommitted offsets of group ferry-demo:");
    for p in partitions {
        println!(
            "  {}/{}  {}",
            p.tp.0,
            p.tp.1,
            p.committed.map_or("-".into(), |c| c.to_string())
        );
    }
    Ok(())
}

fn explain(o: Outcome) -> &'static str {
    match o {
        Outcome::Replied => "the service answered; the answer is on the reply topic",
        Outcome::Done => "the service answered 204: nothing to publish",
        Outcome::DeadLettered => "on the dead-letter topic, with the reason",
        Outcome::Dropped => "a rule dropped them (409: already seen)",
        Outcome::Expired => "too old",
        Outcome::Deferred => "moved to a retry topic",
    }
}

/// Sends `n` orders; returns how many are in the topic.
async fn send_samples(brokers: &str, n: u32) -> anyhow::Result<i64> {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("enable.idempotence", "true")
        .create()?;
    let mut pending = Vec::new();
    for id in 0..i64::from(n) {
        let key = format!("customer-{}", id % 17);
        let amount = if id % 29 == 13 { -5 } else { 10 + id % 90 };
        let value = format!(r#"{{"order":{id},"amount":{amount}}}"#);
        let producer = producer.clone();
        pending.push(tokio::spawn(async move {
            producer
                .send(
                    FutureRecord::to(SOURCE).key(&key).payload(&value),
                    Timeout::After(Duration::from_secs(10)),
                )
                .await
                .map_err(|(e, _)| e)
        }));
    }
    for p in pending {
        p.await??;
    }
    Ok(i64::from(n))
}

/// The example service. Most orders get a reply; negative amounts are poison (422); orders
/// whose number ends in 7 fail once with 503 and then succeed; every 20th is "already seen"
/// (409, dropped by a rule); every 25th needs no reply (204).
async fn example_service() -> anyhow::Result<std::net::SocketAddr> {
    let app = Router::new().route("/orders/{key}", post(order));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Ok(addr)
}

async fn order(UrlPath(key): UrlPath<String>, headers: HeaderMap, body: String) -> Response {
    let parsed: Option<(u64, i64)> = serde_json::from_str::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| Some((v["order"].as_u64()?, v["amount"].as_i64()?)));
    let Some((id, amount)) = parsed else {
        return (StatusCode::BAD_REQUEST, "not an order").into_response();
    };
    let attempt = headers
        .get("ferry-attempt")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u32>().ok())
        .unwrap_or(1);
    if amount <= 0 {
        return (
            StatusCode::UNPROCESSABLE_ENTITY,
            format!("order {id}: amount must be positive, got {amount}"),
        )
            .into_response();
    }
    if id % 10 == 7 && attempt == 1 {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            [("retry-after", "0")],
            "busy, try again",
        )
            .into_response();
    }
    if id % 20 == 0 {
        return (StatusCode::CONFLICT, "already seen").into_response();
    }
    if id % 25 == 0 {
        return StatusCode::NO_CONTENT.into_response();
    }
    (
        StatusCode::OK,
        [
            ("content-type", "application/json"),
            ("ferry-header-order-status", "accepted"),
        ],
        format!(r#"{{"order":{id},"customer":"{key}","status":"accepted"}}"#),
    )
        .into_response()
}

/// Reads every record of `topic` and returns their headers.
fn read_topic(brokers: &str, topic: &str, partitions: i32) -> anyhow::Result<Vec<BTreeMap<String, String>>> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", "ferry-demo-reader")
        .set("enable.auto.commit", "false")
        .create()?;
    let mut tpl = TopicPartitionList::new();
    let mut end = 0;
    for p in 0..partitions {
        tpl.add_partition_offset(topic, p, Offset::Beginning)?;
        let (_, high) = consumer.fetch_watermarks(topic, p, Duration::from_secs(5))?;
        end += high;
    }
    consumer.assign(&tpl)?;
    let mut out = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while (out.len() as i64) < end && Instant::now() < deadline {
        if let Some(m) = consumer.poll(Duration::from_millis(100)) {
            let m = m?;
            let mut headers = BTreeMap::new();
            if let Some(hs) = m.headers() {
                for h in hs.iter() {
                    headers.insert(
                        h.key.to_string(),
                        String::from_utf8_lossy(h.value.unwrap_or_default()).into_owned(),
                    );
                }
            }
            out.push(headers);
        }
    }
    Ok(out)
}

/// The samples of a Prometheus text scrape.
struct Figures(Vec<(String, BTreeMap<String, String>, f64)>);

impl Figures {
    fn parse(text: &str) -> Figures {
        let mut samples = Vec::new();
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let Some((series, value)) = line.rsplit_once(' ') else {
                continue;
            };
            let Ok(value) = value.parse::<f64>() else {
                continue;
            };
            let (name, labels) = match series.split_once('{') {
                Some((n, rest)) => (n, rest.trim_end_matches('}')),
                None => (series, ""),
            };
            let labels = labels
                .split("\",")
                .filter_map(|kv| kv.split_once("=\""))
                .map(|(k, v)| {
                    (
                        k.trim_matches(',').to_string(),
                        v.trim_end_matches('"').to_string(),
                    )
                })
                .collect();
            samples.push((name.to_string(), labels, value));
        }
        Figures(samples)
    }

    fn series<'a>(
        &'a self,
        name: &'a str,
        with: &'a [(&str, &str)],
    ) -> impl Iterator<Item = &'a (String, BTreeMap<String, String>, f64)> {
        self.0.iter().filter(move |(n, labels, _)| {
            n == name && with.iter().all(|(k, v)| labels.get(*k).is_some_and(|l| l == v))
        })
    }

    fn sum(&self, name: &str, with: &[(&str, &str)]) -> f64 {
        // `+ 0.0`: an empty sum is -0.0, which prints as "-0".
        self.series(name, with).map(|(_, _, v)| v).sum::<f64>() + 0.0
    }

    fn by_label(&self, name: &str, label: &str) -> BTreeMap<String, f64> {
        let mut out = BTreeMap::new();
        for (_, labels, v) in self.series(name, &[]) {
            if *v > 0.0 {
                *out.entry(labels.get(label).cloned().unwrap_or_default())
                    .or_default() += v;
            }
        }
        out
    }

    /// The `q` quantile of a histogram over all its series, interpolated within its bucket as
    /// Prometheus' `histogram_quantile` does.
    fn quantile(&self, histogram: &str, q: f64) -> Option<f64> {
        let mut buckets: BTreeMap<u64, (f64, f64)> = BTreeMap::new();
        for (_, labels, v) in self.series(&format!("{histogram}_bucket"), &[]) {
            let le = labels.get("le")?;
            let bound = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().ok()?
            };
            buckets.entry(bound.to_bits()).or_insert((bound, 0.0)).1 += v;
        }
        let mut sorted: Vec<(f64, f64)> = buckets.into_values().collect();
        sorted.sort_by(|a, b| a.0.total_cmp(&b.0));
        let total = sorted.last()?.1;
        if total == 0.0 {
            return None;
        }
        let rank = q * total;
        let (mut lower, mut below) = (0.0, 0.0);
        for (bound, count) in sorted {
            if count >= rank {
                if bound.is_infinite() {
                    return Some(lower);
                }
                let inside = count - below;
                let share = if inside > 0.0 {
                    (rank - below) / inside
                } else {
                    1.0
                };
                return Some(lower + (bound - lower) * share);
            }
            (lower, below) = (bound, count);
        }
        None
    }
}

fn millis(seconds: Option<f64>) -> String {
    seconds.map_or("-".into(), |s| format!("{:.1} ms", s * 1000.0))
}
