//! The fault campaign (`scripts/fault-campaign.sh`; ignored by a plain test run): records pushed
//! through two ferry processes in one group, while one process is SIGKILLed again and again, the
//! other is stopped and started, the broker is restarted, and the service fails 1 % of calls with
//! 5xx, times out on 0.5 % and rejects 0.1 % as poison. Then: every input has an outcome, the
//! dead-letter topic holds exactly the poison set, every repeated output is explained by a fault
//! (an earlier copy was in Kafka while its input was uncommitted), and each key's replies keep
//! their order. The figures are printed for the README.
//!
//! Twice: 100 000 records on the embedded broker (its "restart" takes the broker down and up;
//! its log stays), and 10 000 on Tansu with sqlite storage, killed and started again for real
//! (Tansu's sqlite storage slows down past a few tens of thousands of records on this machine).

mod common;

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// Tansu on a loopback port with sqlite storage that survives its restarts.
struct Tansu {
    dir: PathBuf,
    port: u16,
    child: Child,
}

impl Tansu {
    fn start(dir: &Path, port: u16) -> Tansu {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("tansu.log"))
            .unwrap();
        let child = Command::new(std::env::var("FERRY_TANSU").unwrap_or_else(|_| "tansu".into()))
            .args(["broker", "--listener-url"])
            .arg(format!("tcp://127.0.0.1:{port}"))
            .arg("--advertised-listener-url")
            .arg(format!("tcp://127.0.0.1:{port}"))
            .args(["--storage-engine", "sqlite://tansu.db"])
            .current_dir(dir)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("tansu starts (install it: cargo install tansu)");
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "tansu did not listen");
            std::thread::sleep(Duration::from_millis(100));
        }
        Tansu {
            dir: dir.to_path_buf(),
            port,
            child,
        }
    }

    fn restart(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        *self = Tansu::start(&self.dir.clone(), self.port);
    }
}

/// The broker under fire.
enum Broker {
    Tansu(Tansu),
    Embedded(ferry::embedded::EmbeddedBroker),
}

impl Broker {
    fn brokers(&self) -> String {
        match self {
            Broker::Tansu(t) => format!("127.0.0.1:{}", t.port),
            Broker::Embedded(e) => e.bootstrap_servers().to_string(),
        }
    }

    async fn create(&self, kafka: &Kafka, topic: &str, partitions: i32) {
        match self {
            Broker::Tansu(_) => kafka.create(topic, partitions).await,
            Broker::Embedded(e) => e.create_topic(topic, partitions).expect("topic created"),
        }
    }

    async fn restart(&mut self) {
        match self {
            Broker::Tansu(t) => t.restart(),
            Broker::Embedded(e) => {
                let mock = e.mock().expect("the embedded broker's controls");
                mock.broker_down(1).expect("broker down");
                tokio::time::sleep(Duration::from_secs(2)).await;
                mock.broker_up(1).expect("broker up");
            }
        }
    }
}

impl Drop for Tansu {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The group's committed offsets summed over the partitions; `None` while the broker is away.
async fn committed(brokers: &str, group: &str, topic: &str, partitions: i32) -> Option<usize> {
    let (brokers, group, topic) = (brokers.to_string(), group.to_string(), topic.to_string());
    tokio::task::spawn_blocking(move || {
        use rdkafka::consumer::{BaseConsumer, Consumer};
        let c: BaseConsumer = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", &brokers)
            .set("group.id", &group)
            .create()
            .ok()?;
        let mut tpl = rdkafka::TopicPartitionList::new();
        for p in 0..partitions {
            tpl.add_partition(&topic, p);
        }
        let got = c.committed_offsets(tpl, Duration::from_secs(5)).ok()?;
        Some(
            got.elements()
                .iter()
                .map(|e| match e.offset() {
                    rdkafka::Offset::Offset(o) => o.max(0) as usize,
                    _ => 0,
                })
                .sum(),
        )
    })
    .await
    .ok()
    .flatten()
}

/// What was in Kafka at a fault: the group's committed offsets of the input and the high
/// watermarks of the reply and dead-letter topics. An output below those watermarks whose input
/// is at or above its partition's committed offset was final but not committed: SPEC §1 allows
/// the fault to repeat it.
struct Snapshot {
    committed: Vec<i64>,
    reply_hw: Vec<i64>,
    dlq_hw: Vec<i64>,
}

async fn snapshot(brokers: &str, group: &str, t: &RouteTopics, partitions: i32) -> Snapshot {
    let (brokers, group) = (brokers.to_string(), group.to_string());
    let (source, reply, dlq) = (t.source.clone(), t.reply.clone(), t.dlq.clone());
    tokio::task::spawn_blocking(move || {
        use rdkafka::consumer::{BaseConsumer, Consumer};
        let c: BaseConsumer = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", &brokers)
            .set("group.id", &group)
            .create()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let got = (|| {
                let mut tpl = rdkafka::TopicPartitionList::new();
                for p in 0..partitions {
                    tpl.add_partition(&source, p);
                }
                let offsets = c.committed_offsets(tpl, Duration::from_secs(5)).ok()?;
                let committed = (0..partitions)
                    .map(|p| match offsets.find_partition(&source, p).map(|e| e.offset()) {
                        Some(rdkafka::Offset::Offset(o)) => o,
                        _ => 0,
                    })
                    .collect();
                let marks = |topic: &str, n: i32| -> Option<Vec<i64>> {
                    (0..n)
                        .map(|p| {
                            c.fetch_watermarks(topic, p, Duration::from_secs(5))
                                .ok()
                                .map(|(_, high)| high)
                        })
                        .collect()
                };
                Some(Snapshot {
                    committed,
                    reply_hw: marks(&reply, partitions)?,
                    dlq_hw: marks(&dlq, 1)?,
                })
            })();
            if let Some(s) = got {
                return s;
            }
            assert!(Instant::now() < deadline, "no snapshot of the offsets");
            std::thread::sleep(Duration::from_millis(200));
        }
    })
    .await
    .unwrap()
}

/// The input partitions that some instance's log reports as lost (taken by the coordinator, not
/// revoked), from ferry's "Partitions revoked" lines.
fn lost_partitions(dir: &Path) -> BTreeSet<usize> {
    let mut lost = BTreeSet::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let text = without_colours(&std::fs::read_to_string(entry.path()).unwrap_or_default());
        for line in text
            .lines()
            .filter(|l| l.contains("Partitions revoked") && l.contains("lost=true"))
        {
            let Some(list) = line.split("partitions=").nth(1) else {
                continue;
            };
            let list = list.split_whitespace().next().unwrap_or("");
            lost.extend(
                list.split(',')
                    .filter_map(|tp| tp.rsplit_once('/'))
                    .filter_map(|(_, p)| p.parse::<usize>().ok()),
            );
        }
    }
    lost
}

/// `text` without its ANSI colour sequences (`ESC [ … m`), as the logs of a terminal-less
/// ferry may still carry them.
fn without_colours(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c == 'm' {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// An input record: its partition and offset.
type Input = (usize, i64);
/// Where one output of an input landed: (in the dead-letter topic, partition, offset).
type Landing = (bool, usize, i64);

/// A deterministic spread of faults over the record values.
fn fate(value: &str) -> u64 {
    value.bytes().fold(0xcbf29ce484222325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100000001b3)
    })
}

fn poison(value: &str) -> bool {
    fate(value) % 1000 == 7
}

fn records(var: &str, default: usize) -> usize {
    std::env::var(var)
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(default)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "the fault campaign: scripts/fault-campaign.sh"]
async fn fault_campaign_embedded_broker() {
    let broker = Broker::Embedded(ferry::embedded::EmbeddedBroker::start(1).expect("embedded broker"));
    campaign(
        "embedded",
        broker,
        records("FERRY_CAMPAIGN_RECORDS", 100_000),
        Repeats::EachExplained,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "the fault campaign: scripts/fault-campaign.sh"]
async fn fault_campaign_tansu() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::Tansu(Tansu::start(dir.path(), free_port()));
    campaign(
        "tansu",
        broker,
        records("FERRY_CAMPAIGN_TANSU_RECORDS", 10_000),
        Repeats::OrOnAPartitionTheBrokerTookAway,
    )
    .await;
}

/// How strictly repeated outputs are checked against the faults.
#[derive(PartialEq)]
enum Repeats {
    /// Each repeat is explained by a fault at which a copy was in Kafka, uncommitted.
    EachExplained,
    /// As above, except on partitions that the group coordinator took from a live instance
    /// (librdkafka reports them lost: the instance cannot commit what it finished, a crash as
    /// far as the group is concerned, but not one the campaign made or could snapshot). Tansu
    /// under load evicts members now and then.
    OrOnAPartitionTheBrokerTookAway,
}

async fn campaign(name: &str, mut broker: Broker, records: usize, repeats: Repeats) {
    let kills_wanted: usize = 10;
    let dir = tempfile::tempdir().unwrap();
    let brokers = broker.brokers();
    let kafka = Kafka::connect(&brokers);
    let partitions = 4;
    let t = RouteTopics {
        source: unique("campaign-in"),
        reply: unique("campaign-out"),
        dlq: unique("campaign-dlq"),
        group: unique("campaign"),
    };
    broker.create(&kafka, &t.source, partitions).await;
    broker.create(&kafka, &t.reply, partitions).await;
    broker.create(&kafka, &t.dlq, 1).await;

    // 1 % 5xx and 0.5 % timeouts on a first attempt (so they are retried and then succeed), and
    // 0.1 % poison, rejected every time.
    let service = Service::start(|r: Req| async move {
        let f = fate(&r.body);
        if poison(&r.body) {
            return Resp::new(422, "poison");
        }
        if r.attempt() == 1 && f % 100 == 13 {
            return Resp::new(503, "flaky");
        }
        if r.attempt() == 1 && f % 200 == 42 {
            tokio::time::sleep(Duration::from_millis(1500)).await;
        }
        Resp::new(200, &r.body)
    })
    .await;
    let text = route_config(&kafka, &t, &service.url("/h"), "")
        .replace("        timeout: 2s\n", "        timeout: 1s\n")
        .replace(
            "    retry:\n      max_attempts: 3\n",
            "    retry:\n      max_attempts: 5\n",
        );
    std::fs::write(dir.path().join("ferry.yaml"), &text).unwrap();
    let config = dir.path().join("ferry.yaml");
    let log = |name: &str| dir.path().join(format!("{name}.log"));
    let mut a = Ferry::spawn(&config, &log("a0"));
    let mut b = Ferry::spawn(&config, &log("b0"));

    // The input: key k{n % 200}, value "{key}:{seq}" with a per-key sequence number.
    let started = Instant::now();
    let producer = {
        let brokers = brokers.clone();
        let topic = t.source.clone();
        tokio::task::spawn_blocking(move || {
            use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
            let p: BaseProducer = rdkafka::ClientConfig::new()
                .set("bootstrap.servers", &brokers)
                .set("enable.idempotence", "true")
                .set("linger.ms", "20")
                .set("message.timeout.ms", "300000")
                .create()
                .unwrap();
            let mut seq = vec![0u32; 200];
            for n in 0..records {
                let k = n % 200;
                let key = format!("k{k}");
                let value = format!("{key}:{}", seq[k]);
                seq[k] += 1;
                loop {
                    match p.send(BaseRecord::to(&topic).key(&key).payload(&value)) {
                        Ok(()) => break,
                        Err((_, _)) => {
                            p.poll(Duration::from_millis(50));
                        }
                    }
                }
                p.poll(Duration::ZERO);
            }
            p.flush(Duration::from_secs(300)).expect("the input is written");
        })
    };

    // The faults, while records flow.
    let (mut kills, mut broker_restarts, mut handovers) = (0, 0, 0);
    let mut round = 0;
    let mut snapshots = Vec::new();
    loop {
        tokio::time::sleep(Duration::from_millis(2500)).await;
        round += 1;
        let committed = committed(&brokers, &t.group, &t.source, partitions)
            .await
            .unwrap_or(0);
        eprintln!(
            "campaign ({name}): {:>4.0}s {committed} of {records} committed; {kills} kills, {broker_restarts} broker restarts",
            started.elapsed().as_secs_f64()
        );
        if kills < kills_wanted {
            a.signal(libc::SIGKILL);
            let _ = a.exit_code(Duration::from_secs(10)).await;
            snapshots.push(("kill", snapshot(&brokers, &t.group, &t, partitions).await));
            kills += 1;
            a = Ferry::spawn(&config, &log(&format!("a{kills}")));
        }
        if round == 4 || round == 8 {
            snapshots.push((
                "before a broker restart",
                snapshot(&brokers, &t.group, &t, partitions).await,
            ));
            broker.restart().await;
            // What the broker came back with, too: a restart may lose its last writes.
            snapshots.push((
                "after a broker restart",
                snapshot(&brokers, &t.group, &t, partitions).await,
            ));
            broker_restarts += 1;
        }
        if round == 6 {
            snapshots.push(("handover", snapshot(&brokers, &t.group, &t, partitions).await));
            b.signal(libc::SIGTERM);
            assert_eq!(
                b.exit_code(Duration::from_secs(60)).await,
                Some(0),
                "a graceful stop"
            );
            b = Ferry::spawn(&config, &log("b1"));
            handovers += 1;
        }
        if kills >= kills_wanted && broker_restarts >= 2 && handovers >= 1 && committed >= records {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(1200),
            "the campaign did not finish: {committed} of {records} committed"
        );
    }
    producer.await.unwrap();
    let elapsed = started.elapsed();
    for f in [&mut a, &mut b] {
        f.signal(libc::SIGTERM);
        let _ = f.exit_code(Duration::from_secs(60)).await;
    }

    // The books.
    let replies = kafka.read_all(&t.reply).await;
    let dead = kafka.read_all(&t.dlq).await;
    eprintln!(
        "campaign ({name}): read {} replies and {} dead letters",
        replies.len(),
        dead.len()
    );
    let inputs: BTreeSet<String> = (0..records)
        .scan(vec![0u32; 200], |seq, n| {
            let k = n % 200;
            let v = format!("k{k}:{}", seq[k]);
            seq[k] += 1;
            Some(v)
        })
        .collect();
    let replied: BTreeSet<String> = replies.iter().filter_map(|r| r.value.clone()).collect();
    let dead_set: BTreeSet<String> = dead.iter().filter_map(|r| r.value.clone()).collect();
    let poison_set: BTreeSet<String> = inputs.iter().filter(|v| poison(v)).cloned().collect();
    let lost: Vec<&String> = inputs
        .iter()
        .filter(|v| !replied.contains(*v) && !dead_set.contains(*v))
        .collect();
    let duplicates = (replies.len() - replied.len()) + (dead.len() - dead_set.len());
    // Every repeated output must be explained by a fault: at some snapshot, an earlier copy was
    // already in Kafka while its input was not yet committed (SPEC §1: duplicates are bounded by
    // what was in flight plus what was final but not yet committed). One fault repeats such a
    // record at most once.
    let source = |r: &common::Rec| -> Input {
        let field = |k: &str| r.header(k).and_then(|v| v.parse().ok());
        (
            field("ferry.source.partition").expect("ferry.source.partition on every output"),
            field("ferry.source.offset").expect("ferry.source.offset on every output") as i64,
        )
    };
    let mut outputs: HashMap<Input, Vec<Landing>> = HashMap::new();
    for (dlq, r) in replies
        .iter()
        .map(|r| (false, r))
        .chain(dead.iter().map(|r| (true, r)))
    {
        outputs
            .entry(source(r))
            .or_default()
            .push((dlq, r.partition as usize, r.offset));
    }
    let uncommitted_at = |s: &Snapshot, (sp, so): Input, copies: &[Landing]| {
        so >= s.committed[sp]
            && copies
                .iter()
                .any(|&(dlq, p, o)| o < if dlq { s.dlq_hw[p] } else { s.reply_hw[p] })
    };
    let per_fault: Vec<(&str, usize)> = snapshots
        .iter()
        .map(|(at, s)| {
            let n = outputs
                .iter()
                .filter(|(src, copies)| uncommitted_at(s, **src, copies))
                .count();
            (*at, n)
        })
        .collect();
    let bound: usize = per_fault.iter().map(|f| f.1).sum();
    let unexplained: Vec<(Input, usize, &Vec<Landing>)> = outputs
        .iter()
        .filter_map(|(src, copies)| {
            let explained = snapshots
                .iter()
                .filter(|(_, s)| uncommitted_at(s, *src, copies))
                .count();
            let repeats = copies.len() - 1;
            (repeats > explained).then(|| (*src, repeats - explained, copies))
        })
        .collect();
    // Per key, in each reply partition's order, first deliveries keep the input order.
    let mut order_breaks = 0;
    let mut last: HashMap<String, i64> = HashMap::new();
    let mut by_partition = replies.clone();
    by_partition.sort_by_key(|r| (r.partition, r.offset));
    let mut seen = BTreeSet::new();
    for r in &by_partition {
        let Some(v) = &r.value else { continue };
        if !seen.insert(v.clone()) {
            continue;
        }
        let (key, seq) = v.split_once(':').unwrap();
        let seq: i64 = seq.parse().unwrap();
        if let Some(prev) = last.insert(key.to_string(), seq) {
            if seq < prev {
                order_breaks += 1;
            }
        }
    }
    println!(
        "fault campaign ({name}): {records} records in {:.0}s; {kills} SIGKILLs, {broker_restarts} broker restarts, {handovers} graceful handover; lost {}, duplicates {duplicates} (final but uncommitted at the faults {bound}, at most {} at one; unexplained {}), dead letters {} (poison {}), order breaks {order_breaks}",
        elapsed.as_secs_f64(),
        lost.len(),
        per_fault.iter().map(|f| f.1).max().unwrap_or(0),
        unexplained.iter().map(|u| u.1).sum::<usize>(),
        dead_set.len(),
        poison_set.len()
    );
    println!("fault campaign ({name}): final but uncommitted outputs at each fault, in order: {per_fault:?}");
    assert!(lost.is_empty(), "lost: {:?}", &lost[..lost.len().min(10)]);
    assert_eq!(
        dead_set, poison_set,
        "the dead-letter topic holds exactly the poison records"
    );
    assert!(
        duplicates <= bound,
        "{duplicates} duplicates, more than the {bound} records uncommitted at the faults"
    );
    if !unexplained.is_empty() {
        let lost = lost_partitions(dir.path());
        // The ferry logs and the snapshots, for the post-mortem.
        eprintln!("campaign ({name}): ferry logs kept in {}", dir.keep().display());
        for (at, s) in &snapshots {
            eprintln!(
                "campaign ({name}): snapshot {at}: committed {:?}, reply high watermarks {:?}, dead letters {:?}",
                s.committed, s.reply_hw, s.dlq_hw
            );
        }
        let what = format!(
            "repeated outputs no fault explains ((source partition, offset), repeats, copies as (dead letter, partition, offset)): {:?}",
            &unexplained[..unexplained.len().min(20)]
        );
        eprintln!("campaign ({name}): partitions an instance lost to the coordinator: {lost:?}");
        let allowed = repeats == Repeats::OrOnAPartitionTheBrokerTookAway
            && unexplained.iter().all(|((p, _), _, _)| lost.contains(p));
        assert!(allowed, "{what}");
        eprintln!("campaign ({name}): {what}");
    }
    assert_eq!(order_breaks, 0, "a key's replies out of order");
}

#[test]
fn lost_partitions_are_read_from_coloured_logs() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("b1.log"),
        "\u{1b}[2mT\u{1b}[0m INFO Partitions revoked, draining \u{1b}[3mpartitions\u{1b}[0m\u{1b}[2m=\u{1b}[0min-0/1,in-0/3 \u{1b}[3mlost\u{1b}[0m\u{1b}[2m=\u{1b}[0mtrue\n\
         INFO Partitions revoked, draining partitions=in-0/2 lost=false\n",
    )
    .unwrap();
    assert_eq!(lost_partitions(dir.path()), BTreeSet::from([1, 3]));
}
