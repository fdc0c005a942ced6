//! `ferry redrive`: send a route's dead letters back to be handled again, once each.
//!
//! Reads the route's dead-letter topic up to the end it had when the run started, and writes
//! each dead letter of this route (optionally of one reason) to the route's first source topic
//! or `--to` another topic the route reads: same key, value and headers, minus `ferry.error.*`,
//! keeping `ferry.idempotency_key` so the service can recognise it.
//!
//! Once each, on any broker, with nothing but committed offsets: a run without `--reason` keeps
//! its position in the consumer group `ferry-redrive.<group_id>.<route>`, a run with
//! `--reason R` in `….<route>.<R>`. Each group's position only moves past what its runs
//! examined, so a dead letter of reason R at offset o has been sent iff o is below the position
//! of the unfiltered group or of R's group; every run reads both before it sends anything.
//!
//! And one run at a time per route, whatever its `--reason`: two runs at once would read the same
//! positions and send the same dead letters. See [`Lock`].

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientContext, Offset, TopicPartitionList};

use super::client::{KafkaArgs, Refused, progress};
use crate::consume::RouteTable;
use crate::outcome::Reason;

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
    /// Records without `ferry.route`: not dead letters ferry wrote, whatever else shares the
    /// topic.
    not_ferry: u64,
    /// Of those sent, dead letters of records an earlier run had sent back (`ferry.redriven_from`).
    again: u64,
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
    if let Some(r) = &args.reason {
        if !Reason::ALL.iter().any(|x| x.as_str() == r) {
            let known: Vec<&str> = Reason::ALL.iter().map(|r| r.as_str()).collect();
            return Err(refused(
                2,
                format!(
                    "`{r}` is not a dead-letter reason; reasons are: {}",
                    known.join(", ")
                ),
            ));
        }
    }
    let dead_letters = route.dead_letter.to.clone();
    let base = format!("ferry-redrive.{}.{}", config.kafka.group_id, route.name);
    let group_of = |reason: Option<&str>| match reason {
        None => base.clone(),
        Some(r) => format!("{base}.{r}"),
    };
    let client = args.kafka.client(Some(&config))?;
    let consumer_for = |group: &str| -> Result<BaseConsumer, Refused> {
        let mut c = client.clone();
        c.set("group.id", group)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .remove("group.instance.id");
        c.create()
            .map_err(|e| refused(1, format!("cannot create the consumer: {e}")))
    };
    let consumer = Arc::new(consumer_for(&group_of(args.reason.as_deref()))?);
    // The positions of the groups whose runs may have sent what this run reads: the unfiltered
    // group's for a filtered run, every reason's group for an unfiltered one.
    let mut others: Vec<(Option<String>, BaseConsumer)> = Vec::new();
    match &args.reason {
        Some(_) => others.push((None, consumer_for(&group_of(None))?)),
        None => {
            for r in Reason::ALL {
                others.push((
                    Some(r.as_str().to_string()),
                    consumer_for(&group_of(Some(r.as_str())))?,
                ));
            }
        }
    }
    let mut producer_config = client.clone();
    producer_config
        .set("enable.idempotence", "true")
        .set("acks", "all");
    let producer: FutureProducer = producer_config
        .create()
        .map_err(|e| refused(1, format!("cannot create the producer: {e}")))?;

    // The topic is there before anything waits on it: the lock's group would wait for it for good.
    let (c, topic) = (consumer.clone(), dead_letters.clone());
    let partitions = tokio::task::spawn_blocking(move || partitions_of(&c, &topic))
        .await
        .map_err(|e| refused(1, e.to_string()))??;
    // A dry run sends nothing, so it neither needs the lock nor disturbs the run that holds it.
    let lock = if args.dry_run {
        None
    } else {
        let (client, group, topic, route) = (
            client.clone(),
            format!("ferry-redrive-lock.{}.{}", config.kafka.group_id, route.name),
            dead_letters.clone(),
            route.name.clone(),
        );
        Some(
            tokio::task::spawn_blocking(move || Lock::take(&client, group, &topic, &route))
                .await
                .map_err(|e| refused(1, e.to_string()))??,
        )
    };

    // Read only now, under the lock: what an earlier holder sent is committed.
    let (c, topic) = (consumer.clone(), dead_letters.clone());
    let (starts, ends, sent_before) = tokio::task::spawn_blocking(move || {
        let (starts, ends) = plan(&c, &topic, &partitions)?;
        let mut sent_before: HashMap<Option<String>, HashMap<i32, i64>> = HashMap::new();
        for (reason, c) in &others {
            sent_before.insert(reason.clone(), positions(c, &topic, &ends)?);
        }
        Ok::<_, Refused>((starts, ends, sent_before))
    })
    .await
    .map_err(|e| refused(1, e.to_string()))??;
    let already = |p: i32, o: i64, reason: &str| {
        let key = if args.reason.is_some() {
            None
        } else {
            Some(reason.to_string())
        };
        sent_before
            .get(&key)
            .and_then(|m| m.get(&p))
            .is_some_and(|&pos| o < pos)
    };
    let total: i64 = ends.iter().map(|(p, end)| (end - starts[p]).max(0)).sum();
    let bar = progress(total.max(0) as u64, "dead letters");
    let mut tally = Tally::default();
    // Per partition: the offset after the last one examined, which this run commits.
    let mut next = starts.clone();
    let mut remaining: HashMap<i32, i64> = ends
        .iter()
        .filter(|(p, end)| starts[*p] < **end)
        .map(|(p, e)| (*p, *e))
        .collect();
    while !remaining.is_empty() && args.limit.is_none_or(|l| tally.sent < l) {
        // Whatever was sent is committed already, so a run that loses the lock here just stops:
        // a commit now could move the new holder's position back.
        if let Some(lock) = &lock {
            if let Err(lost) = lock.still_held(&route.name, tally.sent).await {
                bar.finish_and_clear();
                return Err(lost);
            }
        }
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
        next.insert(p, o + 1);
        let header = |name: &str| header_of(&m, name);
        match header("ferry.route") {
            None => {
                tally.not_ferry += 1;
                continue;
            }
            Some(r) if r != route.name => {
                tally.other_route += 1;
                continue;
            }
            Some(_) => {}
        }
        // Sent before comes first: a dead letter of another reason already sent is not left
        // for later.
        let reason = header("ferry.error.reason").unwrap_or_default();
        if already(p, o, &reason) {
            tally.already += 1;
            continue;
        }
        if args.reason.as_ref().is_some_and(|r| *r != reason) {
            tally.other_reason += 1;
            continue;
        }
        if m.payload().is_none() || header("ferry.error.payload_omitted").is_some() {
            tally.no_payload += 1;
            continue;
        }
        let key = m.key().map(|k| String::from_utf8_lossy(k).into_owned());
        let again = u64::from(header("ferry.redriven_from").is_some());
        if args.dry_run {
            bar.suspend(|| {
                println!(
                    "would send {dead_letters}/{p}@{o} (key {}, reason {reason}) to {target}",
                    key.as_deref().unwrap_or("null"),
                )
            });
            tally.sent += 1;
            tally.again += again;
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
        let from = format!("{dead_letters}/{p}/{o}");
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
        if let Err((e, _)) = producer.send(record, Duration::from_secs(30)).await {
            // What was sent before this one is recorded; this one and the rest are not.
            next.insert(p, o);
            commit(&consumer, &dead_letters, &next)?;
            return Err(refused(
                1,
                format!("cannot write to {target}: {e}; {from} and what follows were not sent"),
            ));
        }
        tally.sent += 1;
        tally.again += again;
        // Recorded before the next one, so neither an interrupted run nor one that loses the
        // lock leaves a sent dead letter unrecorded.
        commit(&consumer, &dead_letters, &next)?;
    }
    bar.finish_and_clear();
    // What was examined after the last one sent, recorded only while the lock is still this
    // run's.
    if let Some(lock) = &lock {
        if lock.still_held(&route.name, tally.sent).await.is_ok() {
            commit(&consumer, &dead_letters, &next)?;
        }
    }
    let verb = if args.dry_run { "would send" } else { "sent" };
    println!(
        "{verb} {} dead letter{} from {dead_letters} back to {target}{}",
        tally.sent,
        if tally.sent == 1 { "" } else { "s" },
        args.limit
            .filter(|l| tally.sent >= *l)
            .map_or(String::new(), |l| format!(" (stopped at --limit {l})"))
    );
    if tally.again > 0 {
        println!(
            "  {} of them had been sent back before and failed again (`ferry.redriven_from`): is the cause fixed?",
            tally.again
        );
    }
    let skipped = [
        (tally.already, "sent by an earlier run"),
        (tally.other_route, "of other routes"),
        (tally.other_reason, "of other reasons, left for later"),
        (
            tally.no_payload,
            "without their payload, which cannot be sent back",
        ),
        (tally.not_ferry, "not written by ferry (no `ferry.route` header)"),
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

type Plan = (HashMap<i32, i64>, HashMap<i32, i64>);

/// The dead-letter topic's partitions; a refusal when it does not exist.
fn partitions_of(consumer: &BaseConsumer, topic: &str) -> Result<Vec<i32>, Refused> {
    let metadata = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(10))
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
            format!(
                "the dead-letter topic `{topic}` does not exist (is the route's dead_letter.to right, and -c the config of the sidecar that wrote it?)"
            ),
        ));
    }
    Ok(partitions)
}

/// Reads where this group's last run stopped and the partitions' ends, and assigns the
/// partitions from there.
fn plan(consumer: &BaseConsumer, topic: &str, partitions: &[i32]) -> Result<Plan, Refused> {
    let timeout = Duration::from_secs(10);
    let mut ends = HashMap::new();
    let mut lows = HashMap::new();
    for p in partitions {
        let (low, high) = consumer
            .fetch_watermarks(topic, *p, timeout)
            .map_err(|e| refused(1, format!("cannot read the end of {topic}/{p}: {e}")))?;
        ends.insert(*p, high);
        lows.insert(*p, low);
    }
    let committed = positions(consumer, topic, &ends)?;
    let mut starts = HashMap::new();
    let mut assignment = TopicPartitionList::new();
    for p in partitions {
        let start = committed.get(p).copied().unwrap_or(0).max(lows[p]);
        starts.insert(*p, start);
        let _ = assignment.add_partition_offset(topic, *p, Offset::Offset(start));
    }
    consumer
        .assign(&assignment)
        .map_err(|e| refused(1, format!("cannot read `{topic}`: {e}")))?;
    Ok((starts, ends))
}

/// The committed position of `consumer`'s group in each partition of `ends` (0 when none).
fn positions(
    consumer: &BaseConsumer,
    topic: &str,
    ends: &HashMap<i32, i64>,
) -> Result<HashMap<i32, i64>, Refused> {
    let mut tpl = TopicPartitionList::new();
    for p in ends.keys() {
        tpl.add_partition(topic, *p);
    }
    let committed = consumer
        .committed_offsets(tpl, Duration::from_secs(10))
        .map_err(|e| refused(1, format!("cannot read where earlier redrives stopped: {e}")))?;
    Ok(committed
        .elements()
        .iter()
        .map(|e| {
            let o = match e.offset() {
                Offset::Offset(o) => o,
                _ => 0,
            };
            (e.partition(), o)
        })
        .collect())
}

/// Commits how far this run examined each partition.
fn commit(consumer: &BaseConsumer, topic: &str, next: &HashMap<i32, i64>) -> Result<(), Refused> {
    let mut tpl = TopicPartitionList::new();
    for (p, o) in next {
        let _ = tpl.add_partition_offset(topic, *p, Offset::Offset(*o));
    }
    consumer.commit(&tpl, CommitMode::Sync).map_err(|e| {
        refused(
            1,
            format!("sent, but cannot record it (a rerun may send these again): {e}"),
        )
    })
}

/// The route's redrive lock. A run holds it while the consumer group
/// `ferry-redrive-lock.<group_id>.<route>`, which every run of the route joins subscribed to the
/// dead-letter topic, assigns it partition 0 of that topic: the group gives each partition to one
/// member at a time, on any broker, with nothing to clean up after a crash (a dead run's
/// membership ends with its session). The group assigns with the eager `range` strategy, so a
/// run that joins makes the holder give up every partition first, at its next poll, before the
/// group can give partition 0 to anyone; the holder polls only between dead letters, each of
/// which it has committed, and goes on only if it gets partition 0 back. Either run may end up
/// with it.
#[derive(Clone)]
struct Lock {
    consumer: Arc<BaseConsumer<LockContext>>,
    group: String,
}

#[derive(Default)]
struct LockContext {
    /// Whether the current assignment holds partition 0; `None` between a revoke and the next
    /// assignment.
    holds: Mutex<Option<bool>>,
}

impl ClientContext for LockContext {}

impl ConsumerContext for LockContext {
    fn pre_rebalance(&self, _: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(_) = rebalance {
            *self.holds.lock().unwrap_or_else(PoisonError::into_inner) = None;
        }
    }

    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(partitions) = rebalance {
            let holds = partitions.elements().iter().any(|e| e.partition() == 0);
            *self.holds.lock().unwrap_or_else(PoisonError::into_inner) = Some(holds);
            // The lock's consumer reads nothing.
            let _ = consumer.pause(partitions);
        }
    }
}

/// How long a run waits for the lock's group to assign it: a rebalance waits for every member
/// to join again, which the holder does at its next dead letter, after at most one send
/// (`message.timeout.ms`, five minutes by default).
const LOCK_WAIT: Duration = Duration::from_secs(360);

impl Lock {
    /// Joins the lock's group and waits for its assignment: the lock, or the refusal that says
    /// why not.
    fn take(
        client: &rdkafka::ClientConfig,
        group: String,
        topic: &str,
        route: &str,
    ) -> Result<Lock, Refused> {
        let mut c = client.clone();
        c.set("group.id", &group)
            .set("enable.auto.commit", "false")
            .set("auto.offset.reset", "latest")
            .set("group.protocol", "classic")
            .set("partition.assignment.strategy", "range")
            // Polled between dead letters: a send may take `message.timeout.ms`, and leaving
            // the group meanwhile would hand the lock over with no revoke.
            .set("max.poll.interval.ms", "3600000")
            // A static member id from kafka.properties would make two runs one member, which
            // the broker hands over without a rebalance.
            .remove("group.instance.id");
        let consumer: BaseConsumer<LockContext> = c
            .create_with_context(LockContext::default())
            .map_err(|e| refused(1, format!("cannot create the consumer: {e}")))?;
        consumer
            .subscribe(&[topic])
            .map_err(|e| refused(1, format!("cannot join the consumer group `{group}`: {e}")))?;
        let lock = Lock {
            consumer: Arc::new(consumer),
            group,
        };
        match lock.assignment()? {
            Some(true) => Ok(lock),
            Some(false) => Err(refused(
                1,
                format!(
                    "another `ferry redrive` of route `{route}` is running (it holds partition 0 of `{topic}` in the consumer group `{}`); run this again once it has finished",
                    lock.group
                ),
            )),
            None => Err(refused(1, lock.no_answer())),
        }
    }

    /// `Ok` while this run holds the lock, after serving what the group has said meanwhile
    /// (waiting for the next assignment after a revoke); else why it stopped, having sent `sent`.
    async fn still_held(&self, route: &str, sent: u64) -> Result<(), Refused> {
        let lock = self.clone();
        let held = tokio::task::spawn_blocking(move || lock.assignment())
            .await
            .map_err(|e| refused(1, e.to_string()))?;
        let why = match held? {
            Some(true) => return Ok(()),
            Some(false) => {
                format!("another `ferry redrive` of route `{route}` joined and the group gave it the lock")
            }
            None => self.no_answer(),
        };
        Err(refused(
            1,
            format!(
                "{why}; this run stopped after sending {sent} (each recorded as sent), and a run holding the lock goes on from there"
            ),
        ))
    }

    fn no_answer(&self) -> String {
        format!(
            "the consumer group `{}` assigned nothing within {} s (a run holding the lock may be stuck in a send); run this again later",
            self.group,
            LOCK_WAIT.as_secs()
        )
    }

    /// Serves the group's events until the current assignment is known (`None` after
    /// [`LOCK_WAIT`]); a refusal when the broker refuses the group or the topic.
    fn assignment(&self) -> Result<Option<bool>, Refused> {
        use rdkafka::error::{KafkaError, RDKafkaErrorCode as Code};
        let started = Instant::now();
        let mut wait = Duration::ZERO;
        loop {
            // Messages are not wanted (the partitions are paused); the poll serves the rebalances.
            if let Some(Err(e)) = self.consumer.poll(wait) {
                let code = match &e {
                    KafkaError::MessageConsumption(c) | KafkaError::Global(c) => Some(*c),
                    _ => None,
                };
                if matches!(
                    code,
                    Some(
                        Code::GroupAuthorizationFailed
                            | Code::TopicAuthorizationFailed
                            | Code::UnknownTopicOrPartition
                    )
                ) {
                    return Err(refused(
                        1,
                        format!(
                            "cannot take the redrive lock in the consumer group `{}`: {e} (a run needs the same rights on it as on the groups `ferry-redrive.…`)",
                            self.group
                        ),
                    ));
                }
            }
            let holds = *self
                .consumer
                .context()
                .holds
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if holds.is_some() {
                return Ok(holds);
            }
            if started.elapsed() > LOCK_WAIT {
                return Ok(None);
            }
            wait = Duration::from_millis(100);
        }
    }
}
