//! The benchmark: ferry end to end against its two ceilings, on one machine, in one run.
//!
//! - B0, the service path: ferry's HTTP client stack (hyper's pooled client, same settings) or gRPC stack
//!   (tonic) driving the same echo service at the same concurrency, no Kafka;
//! - B1, the broker path: a plain rdkafka consume → produce loop, no call;
//! - B3, ferry: the release binary, consume → call → reply → commit, for HTTP and gRPC, `key`
//!   and `partition` ordering, 100 B and 1 KiB values;
//! - at a fixed offered rate of 1 000 records/s: ferry's CPU per record, its steady and peak
//!   RSS, and the latency it adds over B2, the smallest loop that does the same job (consume →
//!   call → produce, one record at a time), and B2's own CPU per record, the floor under
//!   ferry's with the same libraries;
//! - start to ready: process start to `/readyz` answering 200.
//!
//! `cargo bench --bench pipeline [-- --brokers HOST:PORT] [--records N] [--seconds S]
//! [--repeat R] [--fetch-wait-ms MS] [--only PARTS] [--case "http key 100"]... [--out DIR]`. Without `--brokers` it runs
//! the embedded broker in a process of its own (`ferry dev broker`). Prints a table and writes
//! `DIR/bench.json` and `DIR/bench.svg` (default DIR: `docs`).

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use ferry::call::grpc::proto::handler_client::HandlerClient;
use ferry::call::grpc::proto::handler_server::{Handler, HandlerServer};
use ferry::call::grpc::proto::{Action, Event, Reply};
use http_body_util::{BodyExt, Full};
use rdkafka::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use serde_json::json;

const PARTITIONS: i32 = 4;
const KEYS: usize = 1000;
/// ferry's in-flight bound in `key` mode: `per_partition` × partitions.
const PER_PARTITION: usize = 32;
const RATE: u64 = 1000;

struct Options {
    brokers: Option<String>,
    records: usize,
    seconds: u64,
    out: PathBuf,
    /// Run only these parts (b0, b1, b3, steady, idle, ready); all when empty.
    only: Vec<String>,
    /// Runs of the latency measurement (ferry and B2 in turn); the report takes the medians.
    repeat: usize,
    /// Only these throughput cases ("http key 100", `--case`, repeatable); all when empty.
    cases: Vec<String>,
}

impl Options {
    /// Whether the throughput case (transport, ordering, value size) is to run.
    fn case(&self, transport: &str, mode: &str, size: usize) -> bool {
        self.cases.is_empty()
            || self
                .cases
                .iter()
                .any(|c| *c == format!("{transport} {mode} {size}"))
    }
}

/// `fetch.wait.max.ms` of the bench's consumers and ferry's (`--fetch-wait-ms`); librdkafka's
/// default (500 ms) unless told. A broker answers a waiting fetch as soon as records arrive, so
/// the wait adds no latency; for a broker that holds a fetch for its whole wait regardless, as
/// the embedded broker did (see vendor/README.md), a short one stands in for that at the price
/// of a fetch per wait.
static FETCH_WAIT_MS: std::sync::OnceLock<u32> = std::sync::OnceLock::new();

fn fetch_wait_ms() -> Option<u32> {
    FETCH_WAIT_MS.get().copied()
}

/// The ferry binary measured (`--ferry PATH`): this build's unless told, so that two builds can
/// be run in turn, or one under a profiler, without touching `target/`.
static FERRY_BIN: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();

fn ferry_bin() -> &'static Path {
    FERRY_BIN.get_or_init(|| PathBuf::from(env!("CARGO_BIN_EXE_ferry")))
}

/// Extra librdkafka properties for ferry (`--ferry-property key=value`), to try a tuning.
static FERRY_PROPERTIES: std::sync::OnceLock<Vec<(String, String)>> = std::sync::OnceLock::new();

fn options() -> Options {
    let mut o = Options {
        brokers: None,
        records: 20_000,
        // Short runs, repeated: the embedded broker finds a fetch's offset by walking the
        // partition's log from its start (librdkafka's mock: "FIXME: Maintain an index"), and
        // at 1 000 records/s with `linger.ms: 0` every record is a batch of its own, so each
        // fetch costs more the longer a run lasts. In 15 s runs the tails grew from a few
        // milliseconds to hundreds, for the minimal loop (B2) as much as for ferry.
        seconds: 5,
        out: PathBuf::from("docs"),
        only: Vec::new(),
        repeat: 5,
        cases: Vec::new(),
    };
    let mut args = std::env::args().skip(1);
    let mut properties = Vec::new();
    // A mistyped flag or value stops the run: a whole benchmark run on defaults, and docs/
    // written over, is what it would cost otherwise.
    fn refuse(message: String) -> ! {
        eprintln!(
            "{message}\nflags: --brokers HOST:PORT, --records N, --seconds S, --repeat R, --out DIR, \
             --only b0,b1,b3,steady,idle,ready, --case \"http key 100\", --ferry PATH, \
             --ferry-property key=value, --fetch-wait-ms MS"
        );
        std::process::exit(2)
    }
    fn value(args: &mut impl Iterator<Item = String>, flag: &str) -> String {
        args.next()
            .unwrap_or_else(|| refuse(format!("{flag} needs a value")))
    }
    fn number<T: std::str::FromStr>(args: &mut impl Iterator<Item = String>, flag: &str) -> T {
        let v = value(args, flag);
        v.parse()
            .unwrap_or_else(|_| refuse(format!("{flag} takes a number, not {v:?}")))
    }
    while let Some(a) = args.next() {
        match a.as_str() {
            "--brokers" => o.brokers = Some(value(&mut args, &a)),
            "--records" => o.records = number(&mut args, &a),
            "--seconds" => o.seconds = number(&mut args, &a),
            "--repeat" => o.repeat = number(&mut args, &a),
            "--out" => o.out = PathBuf::from(value(&mut args, &a)),
            "--ferry-property" => {
                let kv = value(&mut args, &a);
                let Some((k, v)) = kv.split_once('=') else {
                    refuse(format!("--ferry-property takes key=value, not {kv:?}"))
                };
                properties.push((k.to_string(), v.to_string()));
            }
            "--case" => o.cases.push(value(&mut args, &a)),
            "--ferry" => {
                let _ = FERRY_BIN.set(PathBuf::from(value(&mut args, &a)));
            }
            "--fetch-wait-ms" => {
                let _ = FETCH_WAIT_MS.set(number(&mut args, &a));
            }
            "--only" => o.only = value(&mut args, &a).split(',').map(String::from).collect(),
            // `cargo bench` passes --bench.
            "--bench" => {}
            other => refuse(format!("unknown flag {other:?}")),
        }
    }
    let _ = FERRY_PROPERTIES.set(properties);
    o
}

fn now_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// A value of `size` bytes that starts with the time it was made, for latency.
fn value(size: usize) -> Vec<u8> {
    let mut v = format!("{}:", now_micros()).into_bytes();
    v.resize(size.max(v.len()), b'x');
    v
}

fn sent_at(v: &[u8]) -> Option<u64> {
    let end = v.iter().position(|&b| b == b':')?;
    std::str::from_utf8(&v[..end]).ok()?.parse().ok()
}

// ---------------------------------------------------------------- the echo services

async fn serve_http() -> SocketAddr {
    let app = axum::Router::new().fallback(|body: axum::body::Bytes| async move { body });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    // Without TCP_NODELAY a response written in more than one piece waits for the client's
    // delayed acknowledgement (up to 40 ms): the service, not the client, would set the pace.
    use axum::serve::ListenerExt;
    let listener = listener.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    tokio::spawn(async move { axum::serve(listener, app).await });
    addr
}

struct Echo;

#[tonic::async_trait]
impl Handler for Echo {
    async fn handle(&self, request: tonic::Request<Event>) -> Result<tonic::Response<Reply>, tonic::Status> {
        let event = request.into_inner();
        Ok(tonic::Response::new(Reply {
            action: Action::Reply as i32,
            payload: Some(event.value),
            ..Default::default()
        }))
    }
}

async fn serve_grpc() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    // TCP_NODELAY, as for the HTTP service: HTTP/2 writes a response as headers, data and
    // trailers, and without it the later pieces wait for the client's delayed acknowledgement.
    use tokio_stream::StreamExt;
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener).map(|s| {
        s.inspect(|tcp| {
            let _ = tcp.set_nodelay(true);
        })
    });
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(HandlerServer::new(Echo))
            .serve_with_incoming(incoming),
    );
    addr
}

// ---------------------------------------------------------------- B0: the service path

/// Calls per second through the client stack alone, `concurrency` at a time.
async fn b0(transport: &str, addr: SocketAddr, size: usize, concurrency: usize, calls: usize) -> f64 {
    let left = Arc::new(AtomicU64::new(calls as u64));
    let started = Instant::now();
    let mut tasks = Vec::new();
    if transport == "http" {
        let client = http_client();
        let uri: http::Uri = format!("http://{addr}/h").parse().expect("uri");
        for _ in 0..concurrency {
            let (client, uri, left) = (client.clone(), uri.clone(), left.clone());
            tasks.push(tokio::spawn(async move {
                while left.fetch_sub(1, Ordering::Relaxed) as i64 > 0 {
                    post(&client, &uri, value(size)).await.expect("call");
                }
            }));
        }
    } else {
        // One multiplexed HTTP/2 channel, as ferry uses.
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .expect("endpoint")
            .tcp_nodelay(true)
            .connect_lazy();
        for _ in 0..concurrency {
            let (mut client, left) = (HandlerClient::new(channel.clone()), left.clone());
            tasks.push(tokio::spawn(async move {
                while left.fetch_sub(1, Ordering::Relaxed) as i64 > 0 {
                    let e = Event {
                        value: value(size),
                        ..Default::default()
                    };
                    client.handle(e).await.expect("call");
                }
            }));
        }
    }
    for t in tasks {
        let _ = t.await;
    }
    calls as f64 / started.elapsed().as_secs_f64()
}

/// ferry's own HTTP client: its pool of keep-alive connections (src/call/pool.rs).
fn http_client() -> HttpClient {
    Arc::new(ferry::call::pool::Pool::new(None))
}

type HttpClient = Arc<ferry::call::pool::Pool>;

/// One POST and its whole answer.
async fn post(client: &HttpClient, uri: &http::Uri, body: Vec<u8>) -> Result<Bytes, String> {
    let request = http::Request::post(uri.clone())
        .body(Full::new(Bytes::from(body)))
        .map_err(|e| e.to_string())?;
    let (response, connection) = client.send(request).await.map_err(|e| e.to_string())?;
    let body = response.into_body().collect().await.map_err(|e| e.to_string())?;
    connection.give_back();
    Ok(body.to_bytes())
}

// ---------------------------------------------------------------- Kafka helpers

struct Broker {
    brokers: String,
    /// The embedded broker's own process (`ferry dev broker`), with the topics made for it.
    embedded: Option<EmbeddedProcess>,
}

/// The embedded broker in a process of its own, as an external broker would be, rather than
/// threads of the bench process beside the load generator and the readers. Its topics are made
/// at start (it has no controller for CreateTopics): a pool of triples handed out in turn.
struct EmbeddedProcess {
    child: std::process::Child,
    pool: u64,
    /// Kept open: the broker still prints after its address, and a closed pipe would end it.
    _stdout: std::io::BufReader<std::process::ChildStdout>,
    next: AtomicU64,
}

impl EmbeddedProcess {
    /// With `pool` topic triples.
    fn start(pool: u64) -> (EmbeddedProcess, String) {
        use std::io::BufRead;
        let mut command = std::process::Command::new(ferry_bin());
        command.args(["dev", "broker"]);
        for n in 0..pool {
            let (source, reply, dlq) = pool_names(n);
            command
                .arg("--topic")
                .arg(format!("{source}:{PARTITIONS}"))
                .arg("--topic")
                .arg(format!("{reply}:{PARTITIONS}"))
                .arg("--topic")
                .arg(format!("{dlq}:1"));
        }
        let mut child = command
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("the embedded broker starts");
        let stdout = child.stdout.take().expect("its output");
        let mut stdout = std::io::BufReader::new(stdout);
        let address = (&mut stdout)
            .lines()
            .map_while(Result::ok)
            .find_map(|l| {
                l.strip_prefix("embedded broker listening on ")
                    .map(str::to_string)
            })
            .expect("the embedded broker prints its address");
        let process = EmbeddedProcess {
            child,
            pool,
            _stdout: stdout,
            next: AtomicU64::new(0),
        };
        (process, address)
    }
}

impl Drop for EmbeddedProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn pool_names(n: u64) -> (String, String, String) {
    (
        format!("bench-{n}-in"),
        format!("bench-{n}-out"),
        format!("bench-{n}-dlq"),
    )
}

static TOPICS: AtomicU64 = AtomicU64::new(0);

impl Broker {
    /// A fresh (source, reply, dead-letter) topic triple.
    fn topics(&self) -> (String, String, String) {
        if let Some(e) = &self.embedded {
            let n = e.next.fetch_add(1, Ordering::Relaxed);
            assert!(n < e.pool, "the embedded broker's topic pool is used up");
            return pool_names(n);
        }
        let n = TOPICS.fetch_add(1, Ordering::Relaxed);
        let run = std::process::id();
        let names = (
            format!("bench-{run}-{n}-in"),
            format!("bench-{run}-{n}-out"),
            format!("bench-{run}-{n}-dlq"),
        );
        for (t, p) in [(&names.0, PARTITIONS), (&names.1, PARTITIONS), (&names.2, 1)] {
            create_external(&self.brokers, t, p);
        }
        names
    }
}

fn create_external(brokers: &str, topic: &str, partitions: i32) {
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    let admin: AdminClient<_> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .expect("admin client");
    let t = NewTopic::new(topic, partitions, TopicReplication::Fixed(1));
    futures::executor::block_on(admin.create_topics(&[t], &AdminOptions::new())).expect("create topic");
}

fn producer(brokers: &str, linger_ms: &str) -> BaseProducer {
    ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", linger_ms)
        .create()
        .expect("producer")
}

fn consumer(brokers: &str, group: &str) -> BaseConsumer {
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", brokers)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest");
    if let Some(ms) = fetch_wait_ms() {
        config.set("fetch.wait.max.ms", ms.to_string());
    }
    config.create().expect("consumer")
}

/// Sends `record`, waiting for room while librdkafka's queue is full: no input is dropped.
fn send<K: rdkafka::message::ToBytes + ?Sized, P: rdkafka::message::ToBytes + ?Sized>(
    p: &BaseProducer,
    mut record: BaseRecord<'_, K, P>,
) {
    loop {
        match p.send(record) {
            Ok(()) => break,
            Err((_, r)) => {
                record = r;
                p.poll(Duration::from_millis(1));
            }
        }
    }
    p.poll(Duration::ZERO);
}

/// Writes `n` records of `size` bytes with keys spread over `KEYS`.
fn preload(brokers: &str, topic: &str, n: usize, size: usize) {
    let p = producer(brokers, "5");
    for i in 0..n {
        let key = format!("k{}", i % KEYS);
        let v = value(size);
        send(&p, BaseRecord::to(topic).key(&key).payload(&v));
    }
    p.flush(Duration::from_secs(60)).expect("preload flushed");
    // librdkafka's mock broker keeps at most 5 MiB of each partition's log and drops the oldest
    // batches beyond it; a run would then wait for records that are gone.
    for partition in 0..PARTITIONS {
        let (low, _) = p
            .client()
            .fetch_watermarks(topic, partition, Duration::from_secs(10))
            .expect("watermarks");
        if low > 0 {
            eprintln!(
                "the broker dropped the oldest {low} records of {topic} [{partition}]: {n} records of {size} B \
                 exceed what it keeps (the embedded broker keeps 5 MiB per partition); \
                 use fewer --records, or --brokers for a broker with more room"
            );
            std::process::exit(2);
        }
    }
}

/// Reads `topic` from the beginning until `n` records arrived; each record's arrival time in µs,
/// and the time its value says it was sent.
fn read_replies(
    brokers: &str,
    topic: &str,
    n: usize,
    within: Duration,
    stop: &AtomicBool,
) -> Vec<(u64, Option<u64>)> {
    read_replies_after(brokers, topic, 0, n, within, stop, &AtomicBool::new(false))
}

/// As `read_replies`, for a reader that must be live before the records it times are offered:
/// sets `live` once it has its partitions and has read the `backlog` already on the topic (the
/// warm-up's replies, counted in `n`). A reader still catching up would add its catch-up time
/// to the first records it times.
fn read_replies_after(
    brokers: &str,
    topic: &str,
    backlog: usize,
    n: usize,
    within: Duration,
    stop: &AtomicBool,
    live: &AtomicBool,
) -> Vec<(u64, Option<u64>)> {
    // A group of its own per reader, from the earliest offset. (Readers that assigned the
    // partitions themselves lagged: hundreds of milliseconds behind at p99 in some runs, while
    // a second reader of the same topic in another process saw the replies within 40 ms.)
    let c = consumer(
        brokers,
        &format!("reader-{topic}-{}", TOPICS.fetch_add(1, Ordering::Relaxed)),
    );
    c.subscribe(&[topic]).expect("subscribe");
    let deadline = Instant::now() + within;
    let mut got = Vec::with_capacity(n);
    while got.len() < n && Instant::now() < deadline && !stop.load(Ordering::Relaxed) {
        if let Some(Ok(m)) = c.poll(Duration::from_millis(20)) {
            got.push((now_micros(), m.payload().and_then(sent_at)));
        }
        if got.len() >= backlog && !live.load(Ordering::Relaxed) {
            live.store(c.assignment().is_ok_and(|a| a.count() > 0), Ordering::Relaxed);
        }
    }
    got
}

/// Waits for a reader to be live (see `read_replies_after`), at most a minute.
fn wait_live(live: &AtomicBool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !live.load(Ordering::Relaxed) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
}

// ---------------------------------------------------------------- B1: the broker path

/// Records per second through a plain consume → produce loop.
fn b1(broker: &Broker, size: usize, n: usize) -> f64 {
    let (source, reply, _) = broker.topics();
    preload(&broker.brokers, &source, n, size);
    let c = consumer(&broker.brokers, &format!("b1-{source}"));
    c.subscribe(&[&source]).expect("subscribe");
    let p = producer(&broker.brokers, "5");
    let mut started = None;
    let mut taken = 0;
    let mut last_commit = Instant::now();
    while taken < n {
        let Some(Ok(m)) = c.poll(Duration::from_millis(100)) else {
            continue;
        };
        started.get_or_insert_with(Instant::now);
        let mut record = BaseRecord::to(&reply).payload(m.payload().unwrap_or_default());
        if let Some(k) = m.key() {
            record = record.key(k);
        }
        send(&p, record);
        taken += 1;
        if last_commit.elapsed() > Duration::from_secs(1) {
            let _ = c.commit_consumer_state(rdkafka::consumer::CommitMode::Async);
            last_commit = Instant::now();
        }
    }
    p.flush(Duration::from_secs(60)).expect("flushed");
    let _ = c.commit_consumer_state(rdkafka::consumer::CommitMode::Sync);
    n as f64 / started.map_or(1.0, |s| s.elapsed().as_secs_f64())
}

// ---------------------------------------------------------------- B3: ferry

struct Ferry {
    child: std::process::Child,
    admin: SocketAddr,
}

impl Ferry {
    fn spawn_with(
        dir: &Path,
        brokers: &str,
        source: &str,
        reply: &str,
        dlq: &str,
        call: &str,
        ordering: &str,
    ) -> Ferry {
        let admin = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let wait = fetch_wait_ms().map(|ms| ("fetch.wait.max.ms".to_string(), ms.to_string()));
        let extra: String = wait
            .iter()
            .chain(FERRY_PROPERTIES.get().into_iter().flatten())
            .map(|(k, v)| format!("    {k}: \"{v}\"\n"))
            .collect();
        let properties = if extra.is_empty() {
            extra
        } else {
            format!("  properties:\n{extra}")
        };
        let yaml = format!(
            "kafka:\n  brokers: \"{brokers}\"\n  group_id: ferry-{source}\n{properties}\
             routes:\n  - name: bench\n    from: {{ topics: [{source}] }}\n    ordering: {ordering}\n\
             \x20   concurrency: {{ per_partition: {PER_PARTITION}, total: 256 }}\n\
             \x20   call: {call}\n    reply: {{ to: {reply} }}\n    dead_letter: {{ to: {dlq} }}\n\
             admin: {{ listen: \"{admin}\" }}\ntelemetry: {{ log: {{ level: warn }} }}\n"
        );
        let path = dir.join(format!("{source}.yaml"));
        std::fs::write(&path, yaml).expect("config written");
        let child = std::process::Command::new(ferry_bin())
            .args(["run", "-c"])
            .arg(&path)
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(dir.join(format!("{source}.log"))).expect("log"))
            .spawn()
            .expect("ferry starts");
        Ferry { child, admin }
    }

    /// User plus system CPU time so far, in seconds.
    fn cpu_seconds(&self) -> f64 {
        process_cpu_seconds(self.child.id())
    }

    /// Context switches of all its threads so far: each is a thread going to sleep or being
    /// put off the CPU, so at a low rate about one per wake-up.
    fn switches(&self) -> u64 {
        self.by_thread()
            .values()
            .map(|t| t.woken + t.preempted)
            .sum::<f64>() as u64
    }

    /// CPU and context switches so far, by kind of thread: ferry's runtime, its commit thread,
    /// its group thread (the consumer's poll loop), librdkafka's broker threads and its main
    /// threads (threads that have ended are not counted). Shows which side of ferry a record's
    /// cost is on.
    fn by_thread(&self) -> BTreeMap<&'static str, Threads> {
        let mut kinds = BTreeMap::new();
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{}/task", self.child.id())) else {
            return kinds;
        };
        for t in tasks.flatten() {
            let read = |f: &str| std::fs::read_to_string(t.path().join(f)).unwrap_or_default();
            let name = read("comm");
            let kind = match name.trim() {
                n if n.starts_with("tokio-rt") => "runtime",
                n if n.starts_with("rdk:broker") => "librdkafka broker threads",
                n if n.starts_with("rdk:main") => "librdkafka main threads",
                "ferry-commit" => "commit thread",
                "ferry-group" => "group thread",
                _ => "other",
            };
            // schedstat: time on the CPU in ns, first; precise where stat's ticks are 10 ms.
            let ns = read("schedstat")
                .split_whitespace()
                .next()
                .and_then(|v| v.parse::<f64>().ok())
                .unwrap_or(0.0);
            let status = read("status");
            let switches = |field: &str| -> u64 {
                status
                    .lines()
                    .find_map(|l| l.strip_prefix(field))
                    .and_then(|v| v.trim().parse().ok())
                    .unwrap_or(0)
            };
            let entry = kinds.entry(kind).or_insert_with(Threads::default);
            entry.cpu_us += ns / 1e3;
            entry.woken += switches("voluntary_ctxt_switches:") as f64;
            entry.preempted += switches("nonvoluntary_ctxt_switches:") as f64;
        }
        kinds
    }

    /// (current RSS, peak RSS) in MiB.
    fn rss_mib(&self) -> (f64, f64) {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap_or_default();
        let field = |name: &str| {
            status
                .lines()
                .find(|l| l.starts_with(name))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
                .map_or(0.0, |kb| kb / 1024.0)
        };
        (field("VmRSS:"), field("VmHWM:"))
    }

    fn ready(&self) -> bool {
        use std::io::{Read, Write};
        let Ok(mut s) = std::net::TcpStream::connect_timeout(&self.admin, Duration::from_millis(50)) else {
            return false;
        };
        let _ = s.write_all(b"GET /readyz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        let mut buf = [0u8; 16];
        matches!(s.read(&mut buf), Ok(n) if n >= 12 && &buf[9..12] == b"200")
    }

    /// The text of `/metrics`; empty when it cannot be read.
    fn metrics(&self) -> String {
        use std::io::{Read, Write};
        let Ok(mut s) = std::net::TcpStream::connect_timeout(&self.admin, Duration::from_secs(1)) else {
            return String::new();
        };
        let _ = s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n");
        let mut text = String::new();
        let _ = s.read_to_string(&mut text);
        text
    }

    fn stop(mut self) {
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
    }
}

impl Drop for Ferry {
    fn drop(&mut self) {
        let _ = self.child.kill();
    }
}

/// User plus system CPU time of process `pid` so far, in seconds.
fn process_cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // utime and stime are fields 14 and 15 of the whole line: 11 and 12 after the name.
    (ticks(11) + ticks(12)) / clock_ticks()
}

fn clock_ticks() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as f64 } else { 100.0 }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

fn call_yaml(transport: &str, http: SocketAddr, grpc: SocketAddr) -> String {
    match transport {
        "http" => format!("{{ http: {{ url: \"http://{http}/h\" }} }}"),
        _ => format!("{{ grpc: {{ endpoint: \"http://{grpc}\" }} }}"),
    }
}

struct Throughput {
    rate: f64,
    cpu_per_10k: f64,
    peak_rss: f64,
    /// CPU µs per record of the rest of the machine's work meanwhile: the embedded broker's
    /// process (none for an external broker) and this process (the echo service and the reader).
    broker_us: Option<f64>,
    bench_us: f64,
}

/// ferry end to end over `n` preloaded records: replies per second from the first reply to the
/// last (the group join is not counted), and its CPU and peak memory.
fn b3(broker: &Broker, dir: &Path, call: &str, ordering: &str, size: usize, n: usize) -> Throughput {
    let (source, reply, dlq) = broker.topics();
    preload(&broker.brokers, &source, n, size);
    let broker_pid = broker.embedded.as_ref().map(|e| e.child.id());
    let others_before = (
        broker_pid.map(process_cpu_seconds),
        process_cpu_seconds(std::process::id()),
    );
    let ferry = Ferry::spawn_with(dir, &broker.brokers, &source, &reply, &dlq, call, ordering);
    let stop = AtomicBool::new(false);
    let got = read_replies(&broker.brokers, &reply, n, Duration::from_secs(600), &stop);
    let cpu = ferry.cpu_seconds();
    let per_record_us = |before: f64, now: f64| (now - before) / n as f64 * 1e6;
    let broker_us = broker_pid
        .zip(others_before.0)
        .map(|(pid, before)| per_record_us(before, process_cpu_seconds(pid)));
    let bench_us = per_record_us(others_before.1, process_cpu_seconds(std::process::id()));
    let (_, peak) = ferry.rss_mib();
    ferry.stop();
    assert_eq!(got.len(), n, "every record replied within the time limit");
    let first = got.iter().map(|g| g.0).min().unwrap_or(0);
    let last = got.iter().map(|g| g.0).max().unwrap_or(1);
    Throughput {
        rate: (n - 1) as f64 / ((last - first).max(1) as f64 / 1e6),
        cpu_per_10k: cpu / n as f64 * 10_000.0,
        peak_rss: peak,
        broker_us,
        bench_us,
    }
}

// ---------------------------------------------------------------- at a fixed rate

/// Offers `RATE` records/s to `source` for `seconds`, stopping early if `stop` is set.
fn offer(brokers: &str, source: &str, size: usize, seconds: u64) -> usize {
    let p = producer(brokers, "0");
    // The producer's own start (metadata, producer id) is not the path being measured: wait
    // for it with one record whose value carries no send time, so latency readers skip it.
    p.client()
        .fetch_metadata(Some(source), Duration::from_secs(10))
        .expect("metadata");
    send(
        &p,
        BaseRecord::<(), [u8]>::to(source)
            .partition(0)
            .payload(b"warm-up"[..].as_ref()),
    );
    p.flush(Duration::from_secs(10)).expect("the producer is up");
    let total = (RATE * seconds) as usize;
    let started = Instant::now();
    for i in 0..total {
        let due = started + Duration::from_micros(i as u64 * 1_000_000 / RATE);
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        let key = format!("k{}", i % KEYS);
        let v = value(size);
        send(&p, BaseRecord::to(source).key(&key).payload(&v));
    }
    p.flush(Duration::from_secs(30)).expect("offered records flushed");
    total
}

fn percentiles(mut micros: Vec<u64>) -> [f64; 3] {
    micros.sort_unstable();
    let at = |q: f64| {
        if micros.is_empty() {
            return 0.0;
        }
        let i = ((micros.len() as f64 * q).ceil() as usize).clamp(1, micros.len()) - 1;
        micros[i] as f64 / 1000.0
    };
    [at(0.50), at(0.99), at(0.999)]
}

/// End-to-end latency percentiles (p50, p99, p99.9 in ms): input produced → reply read.
/// (Kafka's record timestamps, in milliseconds, are too coarse to split it at the reply's.)
#[derive(Clone, Copy, Default)]
struct Latency {
    end_to_end: [f64; 3],
}

impl Latency {
    /// From the reader's (arrival µs, sent µs), without the first `skip`.
    fn of(got: &[(u64, Option<u64>)], skip: usize) -> Latency {
        let end_to_end = percentiles(
            got.iter()
                .skip(skip)
                .filter_map(|&(at, sent)| sent.map(|s| at.saturating_sub(s)))
                .collect(),
        );
        Latency { end_to_end }
    }

    /// Per percentile, the median over `runs`.
    fn median(runs: &[Latency]) -> Latency {
        let mut end_to_end = [0.0; 3];
        for (i, o) in end_to_end.iter_mut().enumerate() {
            *o = median(runs.iter().map(|r| r.end_to_end[i]).collect());
        }
        Latency { end_to_end }
    }
}

/// The middle value (the upper of the two middle ones); 0 when there is none.
/// What one thread wake-up costs on this machine, in µs of CPU: two threads hand a token back
/// and forth through a mutex and a condition variable, each asleep while the other holds it, as
/// ferry's and librdkafka's threads are between records at a low rate. The median of 5 runs of
/// 20 000 round trips (two wake-ups each), counted by the two threads' own CPU clocks.
fn wake_up_cost_us() -> f64 {
    use std::sync::{Condvar, Mutex};
    fn thread_cpu_us() -> f64 {
        let mut t = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: a valid clock id and a timespec we own.
        unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut t) };
        t.tv_sec as f64 * 1e6 + t.tv_nsec as f64 / 1e3
    }
    const ROUNDS: u64 = 20_000;
    let run = || {
        // The token's holder: 0 or 1.
        let turn = Arc::new((Mutex::new(0u8), Condvar::new()));
        let player = |me: u8| {
            let turn = turn.clone();
            std::thread::spawn(move || {
                let start = thread_cpu_us();
                let (lock, cond) = &*turn;
                for _ in 0..ROUNDS {
                    let mut holder = lock.lock().expect("lock");
                    while *holder != me {
                        holder = cond.wait(holder).expect("wait");
                    }
                    *holder = 1 - me;
                    cond.notify_one();
                }
                thread_cpu_us() - start
            })
        };
        let (a, b) = (player(0), player(1));
        let cpu = a.join().expect("player") + b.join().expect("player");
        cpu / (2 * ROUNDS) as f64
    };
    median((0..5).map(|_| run()).collect())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

struct Steady {
    latency: Latency,
    /// From ferry's own histograms over the measured seconds, as bucket bounds in ms:
    /// (record timestamp → outcome p50, p99), (call p50, p99).
    inside_ms: ([f64; 2], [f64; 2]),
    costs: Costs,
}

/// What threads of one kind took: CPU µs, and context switches, those where the thread went to
/// sleep (to be woken) and those where another took its core.
#[derive(Clone, Copy, Default)]
struct Threads {
    cpu_us: f64,
    woken: f64,
    preempted: f64,
}

impl Threads {
    /// What was taken since `before`, per record.
    fn per_record(self, before: Threads, records: usize) -> Threads {
        let per = records.max(1) as f64;
        // A thread that ended meanwhile takes its counts with it: never below zero.
        let since = |now: f64, then: f64| (now - then).max(0.0) / per;
        Threads {
            cpu_us: since(self.cpu_us, before.cpu_us),
            woken: since(self.woken, before.woken),
            preempted: since(self.preempted, before.preempted),
        }
    }
}

/// What ferry took over the measured seconds of a steady run.
struct Costs {
    /// Memory the process touched during the measured seconds (pages referenced, from
    /// `clear_refs` at the start to `smaps_rollup` at the end), MiB: its working set, where RSS
    /// also counts pages of the executable touched once at start.
    working_set: f64,
    cpu_us_per_record: f64,
    /// Context switches of ferry's threads per record.
    switches_per_record: f64,
    /// By kind of thread ([`Ferry::by_thread`]), per record.
    by_thread: BTreeMap<&'static str, Threads>,
    rss_steady: f64,
    rss_peak: f64,
}

/// ferry at `RATE` records/s: end-to-end latency, CPU per record and memory over `seconds`,
/// after a warm-up.
fn ferry_steady(broker: &Broker, dir: &Path, call: &str, size: usize, seconds: u64) -> Steady {
    let (source, reply, dlq) = broker.topics();
    let ferry = Ferry::spawn_with(dir, &broker.brokers, &source, &reply, &dlq, call, "key");
    let spawned = Instant::now();
    while !ferry.ready() {
        std::thread::sleep(Duration::from_millis(20));
    }
    // Warm-up: the group join, connections, allocator pools.
    offer(&broker.brokers, &source, size, 3);
    let warm = read_replies(
        &broker.brokers,
        &reply,
        (RATE * 3) as usize,
        Duration::from_secs(60),
        &AtomicBool::new(false),
    );
    let skip = warm.len();
    // A running sidecar has let go of its start-up code (ferry::memory): measure that one.
    let settled = ferry::memory::RELEASE_AFTER + Duration::from_secs(1);
    std::thread::sleep(settled.saturating_sub(spawned.elapsed()));
    // Writing "1" clears the referenced bits of every page of the process: what is referenced
    // at the end was touched while measured.
    let _ = std::fs::write(format!("/proc/{}/clear_refs", ferry.child.id()), "1");
    let cpu_before = ferry.cpu_seconds();
    let switches_before = ferry.switches();
    let threads_before = ferry.by_thread();
    let metrics_before = ferry.metrics();
    let stop = Arc::new(AtomicBool::new(false));
    let mut rss = Vec::new();
    let sampler = {
        let stop = stop.clone();
        let pid = ferry.child.id();
        std::thread::spawn(move || {
            let mut samples = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
                if let Some(kb) = status
                    .lines()
                    .find(|l| l.starts_with("VmRSS:"))
                    .and_then(|l| l.split_whitespace().nth(1))
                    .and_then(|kb| kb.parse::<f64>().ok())
                {
                    samples.push(kb / 1024.0);
                }
                std::thread::sleep(Duration::from_millis(250));
            }
            samples
        })
    };
    let live = Arc::new(AtomicBool::new(false));
    let reader = {
        let (brokers, reply, stop, live) =
            (broker.brokers.clone(), reply.clone(), stop.clone(), live.clone());
        let want = skip + (RATE * seconds) as usize;
        std::thread::spawn(move || {
            let within = Duration::from_secs(seconds + 60);
            read_replies_after(&brokers, &reply, skip, want, within, &stop, &live)
        })
    };
    wait_live(&live);
    let offered = offer(&broker.brokers, &source, size, seconds);
    let got = reader.join().expect("reader");
    let cpu = ferry.cpu_seconds() - cpu_before;
    let switches = ferry.switches() - switches_before;
    let by_thread = ferry
        .by_thread()
        .into_iter()
        .map(|(kind, now)| {
            let before = threads_before.get(kind).copied().unwrap_or_default();
            (kind, now.per_record(before, offered))
        })
        .collect();
    let metrics_after = ferry.metrics();
    let inside = |name: &str| {
        let during = Buckets::of(&metrics_after, name).minus(&Buckets::of(&metrics_before, name));
        [during.quantile_ms(0.5), during.quantile_ms(0.99)]
    };
    use ferry::telemetry::names;
    let inside_ms = (inside(names::END_TO_END), inside(names::CALL_DURATION));
    let working_set = std::fs::read_to_string(format!("/proc/{}/smaps_rollup", ferry.child.id()))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("Referenced:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0);
    stop.store(true, Ordering::Relaxed);
    rss.extend(sampler.join().expect("sampler"));
    let (_, peak) = ferry.rss_mib();
    ferry.stop();
    Steady {
        latency: Latency::of(&got, skip),
        inside_ms,
        costs: Costs {
            working_set,
            cpu_us_per_record: cpu * 1e6 / offered as f64,
            switches_per_record: switches as f64 / offered as f64,
            by_thread,
            rss_steady: median(rss),
            rss_peak: peak,
        },
    }
}

/// B2's loop: each record of `source` posted to the service through `call`, its answer
/// produced to `reply`, one at a time, until `stop` (looked at every `poll` when idle).
fn b2_loop(
    c: &BaseConsumer,
    (source, reply): (&str, &str),
    brokers: &str,
    (stop, poll): (&AtomicBool, Duration),
    call: impl Fn(Vec<u8>) -> Result<Bytes, String>,
) {
    c.subscribe(&[source]).expect("subscribe");
    let p = producer(brokers, "0");
    while !stop.load(Ordering::Relaxed) {
        p.poll(Duration::ZERO);
        let Some(Ok(m)) = c.poll(poll) else {
            continue;
        };
        let Ok(answer) = call(m.payload().unwrap_or_default().to_vec()) else {
            continue;
        };
        let mut record = BaseRecord::to(reply).payload(answer.as_ref());
        if let Some(k) = m.key() {
            record = record.key(k);
        }
        send(&p, record);
    }
    let _ = p.flush(Duration::from_secs(10));
}

/// B2 at `RATE` records/s: consume → call (ferry's client settings) → produce, one record at a
/// time, in this process.
fn b2_steady(
    broker: &Broker,
    http: SocketAddr,
    size: usize,
    seconds: u64,
    rt: &tokio::runtime::Handle,
) -> Latency {
    let (source, reply, _) = broker.topics();
    let stop = Arc::new(AtomicBool::new(false));
    let lp = {
        let (brokers, source, reply, stop, rt) = (
            broker.brokers.clone(),
            source.clone(),
            reply.clone(),
            stop.clone(),
            rt.clone(),
        );
        std::thread::spawn(move || {
            let client = http_client();
            let uri: http::Uri = format!("http://{http}/h").parse().expect("uri");
            let c = consumer(&brokers, &format!("b2-{source}"));
            let every = Duration::from_millis(5);
            b2_loop(&c, (&source, &reply), &brokers, (&stop, every), |body| {
                rt.block_on(post(&client, &uri, body))
            });
        })
    };
    std::thread::sleep(Duration::from_secs(3));
    let live = Arc::new(AtomicBool::new(false));
    let reader = {
        let (brokers, reply, stop2) = (
            broker.brokers.clone(),
            reply.clone(),
            Arc::new(AtomicBool::new(false)),
        );
        let want = (RATE * seconds) as usize;
        let live = live.clone();
        std::thread::spawn(move || {
            let within = Duration::from_secs(seconds + 60);
            read_replies_after(&brokers, &reply, 0, want, within, &stop2, &live)
        })
    };
    wait_live(&live);
    offer(&broker.brokers, &source, size, seconds);
    let got = reader.join().expect("reader");
    stop.store(true, Ordering::Relaxed);
    let _ = lp.join();
    Latency::of(&got, 0)
}

/// B2's CPU per record at `RATE` records/s: the same consume → call → produce as ferry with
/// none of ferry's work (no lanes, offsets bookkeeping, commits, metrics or headers), one record
/// at a time on one thread that drives its own HTTP client (a single-threaded runtime), with
/// the fetch wait of ferry's. Counts that thread and the threads
/// of its two librdkafka clients: the floor under ferry's CPU with these libraries on this
/// machine.
fn b2_cpu(broker: &Broker, http: SocketAddr, size: usize, seconds: u64) -> B2Cpu {
    let (source, reply, _) = broker.topics();
    let stop = Arc::new(AtomicBool::new(false));
    let (tid_tx, tid_rx) = std::sync::mpsc::channel();
    // The loop's thread and its clients' threads are those started from here on (librdkafka
    // starts a broker's thread once it learns of the broker, after the client is made).
    let before = own_threads();
    let lp = {
        let (brokers, source, reply, stop) = (
            broker.brokers.clone(),
            source.clone(),
            reply.clone(),
            stop.clone(),
        );
        std::thread::spawn(move || {
            let _ = tid_tx.send(unsafe { libc::gettid() });
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            let client = http_client();
            let uri: http::Uri = format!("http://{http}/h").parse().expect("uri");
            let c = consumer(&brokers, &format!("b2-cpu-{source}"));
            // Idle, it wakes seldom, as ferry does.
            let every = Duration::from_millis(100);
            b2_loop(&c, (&source, &reply), &brokers, (&stop, every), |body| {
                rt.block_on(post(&client, &uri, body))
            });
        })
    };
    let own = [tid_rx.recv().expect("B2's thread")];
    let cpu_ns = |threads: &[i32]| -> f64 {
        threads
            .iter()
            .map(|t| {
                std::fs::read_to_string(format!("/proc/self/task/{t}/schedstat"))
                    .unwrap_or_default()
                    .split_whitespace()
                    .next()
                    .and_then(|ns| ns.parse::<f64>().ok())
                    .unwrap_or(0.0)
            })
            .sum()
    };
    // The group join, connections and the first records, as ferry's warm-up.
    std::thread::sleep(Duration::from_secs(3));
    offer(&broker.brokers, &source, size, 3);
    std::thread::sleep(Duration::from_millis(500));
    // The warm-up's producer is gone by now.
    let clients: Vec<i32> = own_threads()
        .difference(&before)
        .copied()
        .filter(|t| *t != own[0])
        .collect();
    let (clients, own) = (&clients[..], &own[..]);
    let before = (cpu_ns(clients), cpu_ns(own));
    let offered = offer(&broker.brokers, &source, size, seconds);
    std::thread::sleep(Duration::from_millis(500));
    let per = |ns: f64| ns / 1e3 / offered.max(1) as f64;
    let used = B2Cpu {
        clients: per(cpu_ns(clients) - before.0),
        own: per(cpu_ns(own) - before.1),
    };
    stop.store(true, Ordering::Relaxed);
    let _ = lp.join();
    used
}

/// B2's CPU per record, in µs.
struct B2Cpu {
    /// librdkafka's threads of its consumer and producer.
    clients: f64,
    /// The loop's thread: polling, the call, the produce.
    own: f64,
}

/// The thread ids of this process now.
fn own_threads() -> BTreeSet<i32> {
    std::fs::read_dir("/proc/self/task")
        .map(|tasks| {
            tasks
                .flatten()
                .filter_map(|t| t.file_name().to_str().and_then(|n| n.parse().ok()))
                .collect()
        })
        .unwrap_or_default()
}

/// One broker hop at `RATE` records/s: produced → read back, latency percentiles.
fn hop(broker: &Broker, size: usize, seconds: u64) -> [f64; 3] {
    let (source, _, _) = broker.topics();
    let live = Arc::new(AtomicBool::new(false));
    let reader = {
        let (brokers, source) = (broker.brokers.clone(), source.clone());
        let want = (RATE * seconds) as usize;
        let live = live.clone();
        std::thread::spawn(move || {
            let within = Duration::from_secs(seconds + 60);
            read_replies_after(&brokers, &source, 0, want, within, &AtomicBool::new(false), &live)
        })
    };
    wait_live(&live);
    offer(&broker.brokers, &source, size, seconds);
    let got = reader.join().expect("reader");
    percentiles(
        got.iter()
            .filter_map(|(at, sent)| sent.map(|s| at.saturating_sub(s)))
            .collect(),
    )
}

/// Process start to `/readyz` answering 200, the median of five starts.
fn start_to_ready(broker: &Broker, dir: &Path, call: &str) -> f64 {
    let mut times = Vec::new();
    for _ in 0..5 {
        let (source, reply, dlq) = broker.topics();
        let started = Instant::now();
        let ferry = Ferry::spawn_with(dir, &broker.brokers, &source, &reply, &dlq, call, "key");
        while !ferry.ready() {
            std::thread::sleep(Duration::from_millis(1));
            assert!(started.elapsed() < Duration::from_secs(30), "ferry became ready");
        }
        times.push(started.elapsed().as_secs_f64() * 1000.0);
        ferry.stop();
    }
    median(times)
}

/// ferry with nothing to do, in the group and with librdkafka's default fetch wait: (ms of CPU
/// per second, context switches per second) over 10 s, after a record has been through (so
/// the group is joined and the connections are open). A sidecar idles most of its life in many
/// pods: this is its floor.
fn idle(broker: &Broker, dir: &Path, call: &str) -> (f64, f64) {
    let (source, reply, dlq) = broker.topics();
    let ferry = Ferry::spawn_with(dir, &broker.brokers, &source, &reply, &dlq, call, "key");
    let spawned = Instant::now();
    while !ferry.ready() {
        std::thread::sleep(Duration::from_millis(20));
    }
    let p = producer(&broker.brokers, "0");
    send(
        &p,
        BaseRecord::<(), [u8]>::to(&source)
            .partition(0)
            .payload(b"idle"[..].as_ref()),
    );
    p.flush(Duration::from_secs(10)).expect("the record is offered");
    let got = read_replies(
        &broker.brokers,
        &reply,
        1,
        Duration::from_secs(60),
        &AtomicBool::new(false),
    );
    assert_eq!(got.len(), 1, "the idle run's record was handled");
    // Past ferry's one-off release of its start-up code (ferry::memory).
    let settled = ferry::memory::RELEASE_AFTER + Duration::from_secs(1);
    std::thread::sleep(
        settled
            .saturating_sub(spawned.elapsed())
            .max(Duration::from_secs(2)),
    );
    let (cpu, switches, started) = (ferry.cpu_seconds(), ferry.switches(), Instant::now());
    std::thread::sleep(Duration::from_secs(10));
    let secs = started.elapsed().as_secs_f64();
    let idle = (
        (ferry.cpu_seconds() - cpu) * 1000.0 / secs,
        (ferry.switches() - switches) as f64 / secs,
    );
    ferry.stop();
    idle
}

/// A Prometheus histogram's cumulative bucket counts, summed over its label sets.
struct Buckets(Vec<(f64, f64)>);

impl Buckets {
    /// `name`'s buckets in the text `metrics`.
    fn of(metrics: &str, name: &str) -> Buckets {
        let prefix = format!("{name}_bucket{{");
        let mut by_bound: BTreeMap<String, (f64, f64)> = BTreeMap::new();
        for line in metrics.lines().filter(|l| l.starts_with(&prefix)) {
            let Some((labels, count)) = line.rsplit_once(' ') else {
                continue;
            };
            let Some(le) = labels.split("le=\"").nth(1).and_then(|r| r.split('"').next()) else {
                continue;
            };
            let bound = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().unwrap_or(f64::NAN)
            };
            let e = by_bound.entry(le.to_string()).or_insert((bound, 0.0));
            e.1 += count.parse::<f64>().unwrap_or(0.0);
        }
        let mut v: Vec<(f64, f64)> = by_bound.into_values().collect();
        v.sort_by(|a, b| a.0.total_cmp(&b.0));
        Buckets(v)
    }

    fn minus(&self, before: &Buckets) -> Buckets {
        Buckets(
            self.0
                .iter()
                .map(|&(b, n)| {
                    let was = before.0.iter().find(|(bb, _)| *bb == b).map_or(0.0, |x| x.1);
                    (b, n - was)
                })
                .collect(),
        )
    }

    /// The upper bound, in ms, of the bucket holding quantile `q`; NaN without samples.
    fn quantile_ms(&self, q: f64) -> f64 {
        let total = self.0.last().map_or(0.0, |x| x.1);
        if total <= 0.0 {
            return f64::NAN;
        }
        self.0
            .iter()
            .find(|(_, n)| *n >= q * total)
            .map_or(f64::NAN, |(b, _)| b * 1000.0)
    }
}

// ---------------------------------------------------------------- the report

fn main() {
    // A test runner lists a target's tests by running it with `--list` (cargo-nextest does so
    // for every target with `--all-targets`, even with `--no-run`): this one has none, and
    // running it would overwrite docs/bench.* with a run made while the machine builds.
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let o = options();
    ferry::sidecar::install_crypto();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let (http, grpc) = rt.block_on(async { (serve_http().await, serve_grpc().await) });
    let broker = match &o.brokers {
        Some(b) => Broker {
            brokers: b.clone(),
            embedded: None,
        },
        None => {
            // Throughput runs and start-to-ready take 15 triples; each latency run two more.
            let (e, address) = EmbeddedProcess::start(20 + 2 * o.repeat as u64);
            Broker {
                brokers: address,
                embedded: Some(e),
            }
        }
    };
    let dir = tempfile::tempdir().expect("temp dir");
    let n = o.records;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let machine = format!(
        "{cores} cores, {}",
        std::fs::read_to_string("/proc/cpuinfo")
            .unwrap_or_default()
            .lines()
            .find(|l| l.starts_with("model name"))
            .and_then(|l| l.split_once(':'))
            .map_or("unknown CPU".to_string(), |(_, m)| m.trim().to_string())
    );
    let broker_name = if broker.embedded.is_some() {
        "embedded (librdkafka mock, `ferry dev broker` in its own process)".to_string()
    } else {
        format!("external at {}", broker.brokers)
    };
    println!(
        "ferry benchmark: {machine}; broker {broker_name}; ferry {}",
        ferry_bin().display()
    );
    println!(
        "settings: {n} records per throughput run, {PARTITIONS} partitions, {KEYS} keys; ferry per_partition {PER_PARTITION} (key mode in flight {}), total 256; producers idempotent, acks=all; B1 linger.ms 5; B0 at ferry's concurrency; fixed rate {RATE}/s for {} s after a 3 s warm-up, {} runs, fresh topics each; consumers' fetch.wait.max.ms {}\n",
        PER_PARTITION * PARTITIONS as usize,
        o.seconds,
        o.repeat,
        fetch_wait_ms().map_or("librdkafka's default (500)".to_string(), |ms| ms.to_string())
    );

    let run = |part: &str| o.only.is_empty() || o.only.iter().any(|p| p == part);
    let mut rows: Vec<serde_json::Value> = Vec::new();
    let mut b0_rates = BTreeMap::new();
    if run("b0") || run("b3") {
        for transport in ["http", "grpc"] {
            for size in [100, 1024] {
                for (mode, concurrency) in [
                    ("key", PER_PARTITION * PARTITIONS as usize),
                    ("partition", PARTITIONS as usize),
                ] {
                    if !o.case(transport, mode, size) {
                        continue;
                    }
                    let addr = if transport == "http" { http } else { grpc };
                    let rate = rt.block_on(b0(transport, addr, size, concurrency, n));
                    println!(
                        "B0 {transport:<4} {size:>5} B  concurrency {concurrency:>3}: {rate:>9.0} calls/s"
                    );
                    b0_rates.insert((transport, size, mode), rate);
                    rows.push(json!({"bench": "B0", "transport": transport, "size": size, "concurrency": concurrency, "rate": rate}));
                }
            }
        }
    }
    let mut b1_rates = BTreeMap::new();
    if run("b1") || run("b3") {
        for size in [100, 1024] {
            if !["http", "grpc"]
                .iter()
                .any(|t| ["key", "partition"].iter().any(|m| o.case(t, m, size)))
            {
                continue;
            }
            let rate = b1(&broker, size, n);
            println!("B1      {size:>5} B                 : {rate:>9.0} records/s");
            b1_rates.insert(size, rate);
            rows.push(json!({"bench": "B1", "size": size, "rate": rate}));
        }
    }
    let mut chart = Vec::new();
    let mut others = Vec::new();
    if run("b3") {
        println!();
        println!("| B3: ferry | value | records/s | B3 / min(B0, B1) | CPU s per 10 000 | peak RSS MiB |");
        println!("|---|---:|---:|---:|---:|---:|");
        for transport in ["http", "grpc"] {
            for mode in ["key", "partition"] {
                for size in [100, 1024] {
                    if !o.case(transport, mode, size) {
                        continue;
                    }
                    let t = b3(
                        &broker,
                        dir.path(),
                        &call_yaml(transport, http, grpc),
                        mode,
                        size,
                        n,
                    );
                    let ceiling = b0_rates[&(transport, size, mode)].min(b1_rates[&size]);
                    let ratio = t.rate / ceiling;
                    println!(
                        "| {transport} {mode} | {size} B | {:.0} | {ratio:.2} | {:.2} | {:.1} |",
                        t.rate, t.cpu_per_10k, t.peak_rss
                    );
                    chart.push((format!("{transport} {mode} {size}B"), t.rate, ceiling));
                    // What the cores would allow if ferry took no CPU at all: the rest of the
                    // run's work (the broker, the echo service, the reader) alone fills them.
                    let others_us = t.broker_us.unwrap_or(0.0) + t.bench_us;
                    let bound = cores as f64 * 1e6 / others_us.max(f64::MIN_POSITIVE);
                    // And what ferry may take per record for B3 to reach 0.8 of its ceiling
                    // with the cores full: the cores' time per record at that rate, less the rest.
                    let budget = cores as f64 * 1e6 / (0.8 * ceiling) - others_us;
                    others.push(format!(
                        "| {transport} {mode} | {size} B | {} | {:.1} | {:.1} | {budget:.1} | {bound:.0} | {:.2} |",
                        t.broker_us.map_or("not counted".into(), |us| format!("{us:.1}")),
                        t.bench_us,
                        t.cpu_per_10k * 100.0,
                        bound / ceiling
                    ));
                    rows.push(json!({"bench": "B3", "transport": transport, "ordering": mode, "size": size, "rate": t.rate, "ceiling": ceiling, "ratio": ratio, "cpu_seconds_per_10k": t.cpu_per_10k, "peak_rss_mib": t.peak_rss,
                        "others_cpu_us_per_record": {"broker": t.broker_us, "echo_service_and_reader": t.bench_us}, "rate_bound_with_ferry_at_no_cpu": bound, "ferry_cpu_us_budget_for_ratio_0_8": budget}));
                }
            }
        }
        println!();
        println!(
            "What the rest of each B3 run took (CPU µs per record), what ferry may take for B3 / min(B0, B1) to reach 0.8 with the {cores} cores full, and the rate the cores would allow if ferry took no CPU at all:"
        );
        println!();
        println!(
            "| B3: ferry | value | broker | echo service and reader | ferry | ferry's budget for 0.8 | records/s with ferry at no CPU | its ratio |"
        );
        println!("|---|---:|---:|---:|---:|---:|---:|---:|");
        for line in &others {
            println!("{line}");
        }
    }
    if run("steady") {
        let one_hop = hop(&broker, 100, o.seconds);
        // This machine's noise moves the tails by tens of milliseconds from one run to the next:
        // ferry and B2 are measured in turn, `--repeat` times, and each percentile is the median.
        let mut ferry_runs = Vec::new();
        let mut b2_runs = Vec::new();
        let mut inside = Vec::new();
        let mut all_costs = Vec::new();
        for _ in 0..o.repeat.max(1) {
            let s = ferry_steady(
                &broker,
                dir.path(),
                &call_yaml("http", http, grpc),
                100,
                o.seconds,
            );
            ferry_runs.push(s.latency);
            inside.push(s.inside_ms);
            all_costs.push(s.costs);
            b2_runs.push(b2_steady(&broker, http, 100, o.seconds, rt.handle()));
        }
        // The costs of the run of median CPU, so that its figures by thread add up.
        all_costs.sort_by(|a, b| a.cpu_us_per_record.total_cmp(&b.cpu_us_per_record));
        let cpu_runs: Vec<String> = all_costs
            .iter()
            .map(|c| format!("{:.0}", c.cpu_us_per_record))
            .collect();
        let rss_runs = median(all_costs.iter().map(|c| c.rss_steady).collect());
        let costs = all_costs.swap_remove(all_costs.len() / 2);
        let b2_cpu_us = b2_cpu(&broker, http, 100, o.seconds);
        let (ferry_lat, base) = (Latency::median(&ferry_runs), Latency::median(&b2_runs));
        let added: Vec<f64> = ferry_lat
            .end_to_end
            .iter()
            .zip(base.end_to_end)
            .map(|(f, b)| f - b)
            .collect();
        println!();
        println!(
            "at {RATE} records/s (http, key, 100 B), median of {} runs per percentile:",
            ferry_runs.len()
        );
        let show = |name: &str, l: &[f64]| {
            println!(
                "  {name:<24}p50 {:>7.2} ms  p99 {:>7.2} ms  p99.9 {:>7.2} ms",
                l[0], l[1], l[2]
            )
        };
        show("one broker hop", &one_hop);
        show("B2 (minimal loop)", &base.end_to_end);
        show("ferry end to end", &ferry_lat.end_to_end);
        show("added by ferry", &added);
        let runs = |l: &[Latency]| {
            l.iter()
                .map(|r| format!("{:.1}", r.end_to_end[1]))
                .collect::<Vec<_>>()
                .join(", ")
        };
        println!(
            "  p99 of each run: ferry {} ms; B2 {} ms",
            runs(&ferry_runs),
            runs(&b2_runs)
        );
        for (e2e, call) in &inside {
            println!(
                "  inside ferry            record timestamp to outcome p50 ≤ {} ms, p99 ≤ {} ms; the call p50 ≤ {} ms, p99 ≤ {} ms (its histograms' bucket bounds)",
                e2e[0], e2e[1], call[0], call[1]
            );
        }
        println!(
            "  ferry CPU               {:.1} µs per record, the median of the runs ({} µs)",
            costs.cpu_us_per_record,
            cpu_runs.join(", ")
        );
        println!(
            "  B2 CPU                  {:.1} µs per record ({:.1} its loop's thread, {:.1} librdkafka's threads): the same consume → call → produce with none of ferry's work",
            b2_cpu_us.own + b2_cpu_us.clients,
            b2_cpu_us.own,
            b2_cpu_us.clients
        );
        let wake_up = wake_up_cost_us();
        println!(
            "  ferry's threads         {:.2} context switches per record; one thread wake-up costs {wake_up:.1} µs of CPU on this machine",
            costs.switches_per_record
        );
        for (kind, t) in &costs.by_thread {
            println!(
                "    {kind:<28}{:>6.1} µs, {:.2} switches per record ({:.2} woken, {:.2} preempted)",
                t.cpu_us,
                t.woken + t.preempted,
                t.woken,
                t.preempted
            );
        }
        println!(
            "  ferry RSS               steady {rss_runs:.1} MiB (the median of the runs), peak {:.1} MiB; working set {:.1} MiB (pages touched while measured)",
            costs.rss_peak, costs.working_set
        );
        rows.push(json!({
            "bench": "steady", "rate": RATE, "transport": "http", "ordering": "key", "size": 100,
            "runs": ferry_runs.len(), "fetch_wait_ms": fetch_wait_ms(), "cpu_us_per_record_runs": cpu_runs,
            "hop_latency_ms": one_hop, "ferry_latency_ms": ferry_lat.end_to_end, "b2_latency_ms": base.end_to_end,
            "ferry_p99_per_run_ms": ferry_runs.iter().map(|r| r.end_to_end[1]).collect::<Vec<_>>(),
            "b2_p99_per_run_ms": b2_runs.iter().map(|r| r.end_to_end[1]).collect::<Vec<_>>(),
            "added_latency_ms": added,
            "inside_ferry_end_to_end_ms_p50_p99": inside.iter().map(|i| i.0).collect::<Vec<_>>(),
            "inside_ferry_call_ms_p50_p99": inside.iter().map(|i| i.1).collect::<Vec<_>>(),
            "cpu_us_per_record": costs.cpu_us_per_record,
            "b2_cpu_us_per_record": {"total": b2_cpu_us.own + b2_cpu_us.clients, "loop_thread": b2_cpu_us.own, "librdkafka_threads": b2_cpu_us.clients},
            "switches_per_record": costs.switches_per_record, "wake_up_cpu_us": wake_up,
            "per_record_by_thread": costs.by_thread.iter().map(|(k, t)| (k.to_string(), json!({"cpu_us": t.cpu_us, "switches": t.woken + t.preempted, "woken": t.woken, "preempted": t.preempted}))).collect::<serde_json::Map<_, _>>(),
            "rss_steady_mib": rss_runs, "rss_peak_mib": costs.rss_peak, "working_set_mib": costs.working_set,
        }));
    }
    if run("idle") {
        let (cpu_ms, switches) = idle(&broker, dir.path(), &call_yaml("http", http, grpc));
        println!(
            "idle: {cpu_ms:.2} ms of CPU per second, {switches:.0} context switches per second (10 s, in the group, nothing to consume)"
        );
        rows.push(json!({"bench": "idle", "cpu_ms_per_second": cpu_ms, "switches_per_second": switches}));
    }
    if run("ready") {
        let ready_ms = start_to_ready(&broker, dir.path(), &call_yaml("http", http, grpc));
        println!(
            "start to ready: {ready_ms:.0} ms (median of 5; process start to /readyz 200, before the group join)"
        );
        rows.push(json!({"bench": "start_to_ready", "ms": ready_ms}));
    }
    let report = json!({"machine": machine, "broker": broker_name, "records": n, "results": rows});
    std::fs::create_dir_all(&o.out).expect("output directory");
    let json_path = o.out.join("bench.json");
    std::fs::write(&json_path, serde_json::to_string_pretty(&report).expect("json")).expect("json written");
    if !chart.is_empty() {
        let svg_path = o.out.join("bench.svg");
        std::fs::write(&svg_path, svg(&chart, &machine)).expect("chart written");
        println!("wrote {}", svg_path.display());
    }
    println!("wrote {}", json_path.display());
}

/// A bar chart: ferry's records/s per variant, beside its ceiling min(B0, B1).
fn svg(bars: &[(String, f64, f64)], machine: &str) -> String {
    let max = bars.iter().map(|b| b.1.max(b.2)).fold(1.0, f64::max);
    let (w, row, left) = (760.0, 34.0, 170.0);
    let h = 70.0 + row * bars.len() as f64;
    let scale = |v: f64| v / max * (w - left - 90.0);
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <text x=\"10\" y=\"20\" font-size=\"14\" font-weight=\"bold\">ferry end to end (records/s) and its ceiling min(B0, B1)</text>\n\
         <text x=\"10\" y=\"38\" fill=\"#555\">{machine}</text>\n"
    );
    for (i, (label, rate, ceiling)) in bars.iter().enumerate() {
        let y = 55.0 + row * i as f64;
        s += &format!(
            "<text x=\"{}\" y=\"{}\" text-anchor=\"end\">{label}</text>\n\
             <rect x=\"{left}\" y=\"{y}\" width=\"{:.1}\" height=\"12\" fill=\"#bbb\"/>\n\
             <rect x=\"{left}\" y=\"{}\" width=\"{:.1}\" height=\"12\" fill=\"#2a7ab0\"/>\n\
             <text x=\"{:.1}\" y=\"{}\">{rate:.0} / {ceiling:.0}</text>\n",
            left - 8.0,
            y + 16.0,
            scale(*ceiling),
            y + 13.0,
            scale(*rate),
            left + scale(rate.max(*ceiling)) + 6.0,
            y + 16.0,
        );
    }
    s += "</svg>\n";
    s
}
