//! `ferry redrive`: send a route's dead letters back to be handled again, once each.
//!
//! Reads the route's dead-letter topic with a consumer group of its own
//! (`ferry-redrive.<group_id>.<route>`), up to the end it had when the run started, and writes
//! each dead letter of this route (optionally of one reason) to the route's first source topic
//! or `--to` another topic the route reads: same key, value and headers, minus `ferry.error.*`,
//! keeping `ferry.idempotency_key` so the service can recognise it. What a run has sent is
//! committed with the group's offsets: offsets below the committed one are done, and dead
//! letters past it that were sent (because a `--reason` run skipped some before them) are listed
//! in the commit's metadata. A second run therefore sends nothing twice.

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};

use super::client::{KafkaArgs, Refused, progress};
use crate::consume::RouteTable;

#[derive(clap::Args, Debug)]
pub struct RedriveArgs {
    #[command(flatten)]
    pub kafka: KafkaArgs,
    /// The route whose dead letters go back.
    #[arg(long)]
    pub route: String,
    /// Write them here instead of the route's first source topic: a topic only this route reads,
    /// so that other consumers of the source see no duplicates.
    #[arg(long)]
    pub to: Option<String>,
    /// Only dead letters of this `ferry.error.reason` (status, timeout, schema, …).
    #[arg(long)]
    pub reason: Option<String>,
    /// At most this many.
    #[arg(long)]
    pub limit: Option<u64>,
    /// Print what would be sent; send and commit nothing.
    #[arg(long)]
    pub dry_run: bool,
}

fn refused(code: i32, message: impl Into<String>) -> Refused {
    Refused {
        code,
        message: message.into(),
    }
}

pub async fn redrive(args: RedriveArgs) -> i32 {
    match run(args).await {
        Ok(()) => 0,
        Err(r) => {
            eprintln!("error: {}", r.message);
            r.code
        }
    }
}

/// What a run did, for the summary.
#[derive(Default)]
struct Tally {
    sent: u64,
    already: u64,
    other_route: u64,
    other_reason: u64,
    no_payload: u64,
}

/// The offsets of one partition already sent back: everything below `below`, and `beyond`.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct Done {
    below: i64,
    beyond: BTreeSet<i64>,
}

const METADATA_PREFIX: &str = "ferry-redrive:v1:";

impl Done {
    fn contains(&self, offset: i64) -> bool {
        offset < self.below || self.beyond.contains(&offset)
    }

    fn insert(&mut self, offset: i64) {
        self.beyond.insert(offset);
        while self.beyond.remove(&self.below) {
            self.below += 1;
        }
    }

    /// `a-b,c`: the offsets past `below`, as ranges.
    fn metadata(&self) -> String {
        let mut ranges: Vec<(i64, i64)> = Vec::new();
        for &o in &self.beyond {
            match ranges.last_mut() {
                Some((_, end)) if *end + 1 == o => *end = o,
                _ => ranges.push((o, o)),
            }
        }
        let parts: Vec<String> = ranges
            .iter()
            .map(|(a, b)| if a == b { a.to_string() } else { format!("{a}-{b}") })
            .collect();
        format!("{METADATA_PREFIX}{}", parts.join(","))
    }

    fn parse(below: i64, metadata: &str) -> Done {
        let mut done = Done {
            below,
            beyond: BTreeSet::new(),
        };
        let Some(ranges) = metadata.strip_prefix(METADATA_PREFIX) else {
            return done;
        };
        for part in ranges.split(',').filter(|p| !p.is_empty()) {
            let (a, b) = part.split_once('-').unwrap_or((part, part));
            if let (Ok(a), Ok(b)) = (a.parse::<i64>(), b.parse::<i64>()) {
                for o in a.max(below)..=b.min(a.saturating_add(1_000_000)) {
                    done.beyond.insert(o);
                }
            }
        }
        done
    }
}

async fn run(args: RedriveArgs) -> Result<(), Refused> {
    let config = args
        .kafka
        .load()?
        .ok_or_else(|| refused(2, "redrive needs the sidecar's config: -c FILE"))?;
    let (index, route) = config
        .routes
        .iter()
        .enumerate()
        .find(|(_, r)| r.name == args.route)
        .ok_or_else(|| {
            let names: Vec<&str> = config.routes.iter().map(|r| r.name.as_str()).collect();
            refused(
                2,
                format!(
                    "no route named `{}`; routes are: {}",
                    args.route,
                    names.join(", ")
                ),
            )
        })?;
    let target = match (&args.to, route.from.topics.first()) {
        (Some(t), _) => t.clone(),
        (None, Some(t)) => t.clone(),
        (None, None) => {
            return Err(refused(
                2,
                format!(
                    "route `{}` reads a pattern: say where to send the dead letters with --to TOPIC",
                    route.name
                ),
            ));
        }
    };
    let table = RouteTable::new(&config.routes).map_err(|e| refused(78, e.to_string()))?;
    if table.route_for(&target) != Some(index) {
        return Err(refused(
            2,
            format!(
                "route `{}` does not read `{target}`: dead letters sent there would not come back through it; use one of its source topics",
                route.name
            ),
        ));
    }
    let dead_letters = route.dead_letter.to.clone();
    let group = format!("ferry-redrive.{}.{}", config.kafka.group_id, route.name);
    let client = args.kafka.client(Some(&config))?;

    let mut consumer_config = client.clone();
    consumer_config
        .set("group.id", &group)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false");
    let consumer: BaseConsumer = consumer_config
        .create()
        .map_err(|e| refused(1, format!("cannot create the consumer: {e}")))?;
    let mut producer_config = client;
    producer_config
        .set("enable.idempotence", "true")
        .set("acks", "all");
    let producer: FutureProducer = producer_config
        .create()
        .map_err(|e| refused(1, format!("cannot create the producer: {e}")))?;

    // Where each partition starts (and what it already sent), and where this run ends.
    let (consumer, mut done, ends) = tokio::task::spawn_blocking(move || plan(consumer, &dead_letters))
        .await
        .map_err(|e| refused(1, e.to_string()))??;
    let total: i64 = ends.iter().map(|(p, end)| (end - done[p].below).max(0)).sum();
    let bar = progress(total.max(0) as u64, "dead letters");
    let mut tally = Tally::default();
    let mut remaining: HashMap<i32, i64> = ends
        .iter()
        .filter(|(p, end)| done[*p].below < **end)
        .map(|(p, e)| (*p, *e))
        .collect();
    let consumer = std::sync::Arc::new(consumer);
    while !remaining.is_empty() && args.limit.is_none_or(|l| tally.sent < l) {
        let c = consumer.clone();
        let polled = tokio::task::spawn_blocking(move || {
            c.poll(Duration::from_millis(500)).map(|m| m.map(|m| m.detach()))
        })
        .await
        .map_err(|e| refused(1, e.to_string()))?;
        let m = match polled {
            Some(Ok(m)) => m,
            Some(Err(e)) => {
                eprintln!("warning: {e}");
                continue;
            }
            None => continue,
        };
        let (p, o) = (m.partition(), m.offset());
        let Some(&end) = remaining.get(&p) else { continue };
        if o >= end {
            remaining.remove(&p);
            continue;
        }
        if o + 1 >= end {
            remaining.remove(&p);
        }
        bar.inc(1);
        let d = done.entry(p).or_default();
        if d.contains(o) {
            tally.already += 1;
            continue;
        }
        let header = |name: &str| header_of(&m, name);
        if header("ferry.route").as_deref().is_some_and(|r| r != route.name) {
            tally.other_route += 1;
            d.insert(o);
            continue;
        }
        let reason = header("ferry.error.reason").unwrap_or_default();
        if args.reason.as_ref().is_some_and(|r| *r != reason) {
            // Left for a later run: not marked done.
            tally.other_reason += 1;
            continue;
        }
        if m.payload().is_none() || header("ferry.error.payload_omitted").is_some() {
            tally.no_payload += 1;
            d.insert(o);
            continue;
        }
        let key = m.key().map(|k| String::from_utf8_lossy(k).into_owned());
        if args.dry_run {
            bar.suspend(|| {
                println!(
                    "would send {dead}/{p}@{o} (key {}, reason {reason}) to {target}",
                    key.as_deref().unwrap_or("null"),
                    dead = route.dead_letter.to
                )
            });
            tally.sent += 1;
            continue;
        }
        let mut headers = OwnedHeaders::new();
        if let Some(hs) = m.headers() {
            for h in hs.iter().filter(|h| !h.key.starts_with("ferry.error.")) {
                headers = headers.insert(Header {
                    key: h.key,
                    value: h.value,
                });
            }
        }
        let from = format!("{}/{p}/{o}", route.dead_letter.to);
        headers = headers.insert(Header {
            key: "ferry.redriven_from",
            value: Some(from.as_bytes()),
        });
        let mut record: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(&target).headers(headers);
        if let Some(k) = m.key() {
            record = record.key(k);
        }
        if let Some(v) = m.payload() {
            record = record.payload(v);
        }
        producer
            .send(record, Duration::from_secs(30))
            .await
            .map_err(|(e, _)| {
                refused(
                    1,
                    format!("cannot write to {target}: {e}; nothing after {from} was sent"),
                )
            })?;
        d.insert(o);
        tally.sent += 1;
        // Commit as we go, so an interrupted run never repeats what it sent.
        if tally.sent % 100 == 0 {
            commit(&consumer, &route.dead_letter.to, &done)?;
        }
    }
    bar.finish_and_clear();
    if !args.dry_run {
        commit(&consumer, &route.dead_letter.to, &done)?;
    }
    let verb = if args.dry_run { "would send" } else { "sent" };
    println!(
        "{verb} {} dead letters from {} back to {target}{}",
        tally.sent,
        route.dead_letter.to,
        args.limit
            .filter(|l| tally.sent >= *l)
            .map_or(String::new(), |l| format!(" (stopped at --limit {l})"))
    );
    let skipped = [
        (tally.already, "sent by an earlier run"),
        (tally.other_route, "of other routes"),
        (tally.other_reason, "of other reasons, left for later"),
        (
            tally.no_payload,
            "without their payload, which cannot be sent back",
        ),
    ];
    for (n, why) in skipped.iter().filter(|(n, _)| *n > 0) {
        println!("  skipped {n} {why}");
    }
    Ok(())
}

fn header_of(m: &rdkafka::message::OwnedMessage, name: &str) -> Option<String> {
    m.headers()?
        .iter()
        .find(|h| h.key == name)
        .and_then(|h| h.value)
        .map(|v| String::from_utf8_lossy(v).into_owned())
}

type Plan = (BaseConsumer, HashMap<i32, Done>, HashMap<i32, i64>);

/// Reads the group's commits and the partitions' ends, and assigns the partitions from where
/// the last run stopped.
fn plan(consumer: BaseConsumer, topic: &str) -> Result<Plan, Refused> {
    let timeout = Duration::from_secs(10);
    let metadata = consumer
        .fetch_metadata(Some(topic), timeout)
        .map_err(|e| refused(1, format!("cannot read the metadata of `{topic}`: {e}")))?;
    let partitions: Vec<i32> = metadata
        .topics()
        .iter()
        .filter(|t| t.name() == topic && t.error().is_none())
        .flat_map(|t| t.partitions().iter().map(|p| p.id()))
        .collect();
    if partitions.is_empty() {
        return Err(refused(
            1,
            format!("the dead-letter topic `{topic}` does not exist"),
        ));
    }
    let mut tpl = TopicPartitionList::new();
    for p in &partitions {
        tpl.add_partition(topic, *p);
    }
    let committed = consumer
        .committed_offsets(tpl, timeout)
        .map_err(|e| refused(1, format!("cannot read where the last redrive stopped: {e}")))?;
    let mut done = HashMap::new();
    let mut ends = HashMap::new();
    let mut assignment = TopicPartitionList::new();
    for e in committed.elements() {
        let (low, high) = consumer
            .fetch_watermarks(topic, e.partition(), timeout)
            .map_err(|err| {
                refused(
                    1,
                    format!("cannot read the end of {topic}/{}: {err}", e.partition()),
                )
            })?;
        let below = match e.offset() {
            Offset::Offset(o) => o,
            _ => low,
        };
        done.insert(e.partition(), Done::parse(below, e.metadata()));
        ends.insert(e.partition(), high);
        let _ = assignment.add_partition_offset(topic, e.partition(), Offset::Offset(below.max(low)));
    }
    consumer
        .assign(&assignment)
        .map_err(|e| refused(1, format!("cannot read `{topic}`: {e}")))?;
    Ok((consumer, done, ends))
}

/// Commits each partition's progress, with the offsets sent past it in the metadata.
fn commit(consumer: &BaseConsumer, topic: &str, done: &HashMap<i32, Done>) -> Result<(), Refused> {
    let mut tpl = TopicPartitionList::new();
    for (p, d) in done {
        let mut e = tpl.add_partition(topic, *p);
        let _ = e.set_offset(Offset::Offset(d.below));
        e.set_metadata(d.metadata());
    }
    consumer.commit(&tpl, CommitMode::Sync).map_err(|e| {
        refused(
            1,
            format!("sent, but cannot record it (a rerun may send these again): {e}"),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn done_offsets_round_trip_through_commit_metadata() {
        let mut d = Done::parse(10, "");
        for o in [10, 11, 14, 15, 16, 20] {
            d.insert(o);
        }
        assert_eq!(d.below, 12, "the contiguous prefix moves the committed offset");
        assert_eq!(d.metadata(), "ferry-redrive:v1:14-16,20");
        let back = Done::parse(12, &d.metadata());
        assert_eq!(back, d);
        assert!(back.contains(11) && back.contains(15) && !back.contains(13) && !back.contains(17));
        assert_eq!(Done::parse(5, "someone else's"), Done::parse(5, ""));
    }
}
