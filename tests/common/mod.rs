//! Shared test bench: a broker (embedded, or external via `FERRY_TEST_BROKERS`), a programmable
//! HTTP service on 127.0.0.1:0, and helpers to send, read and look at committed offsets.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use ferry::config::{self, Config, Interpolator};
use ferry::embedded::EmbeddedBroker;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::util::Timeout;
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

/// A broker for one test: the embedded one, or the one `FERRY_TEST_BROKERS` names.
pub struct Kafka {
    pub embedded: Option<EmbeddedBroker>,
    pub brokers: String,
    producer: FutureProducer,
}

static COUNTER: AtomicU64 = AtomicU64::new(0);

/// A name no other test (or earlier run against the same external broker) uses.
pub fn unique(prefix: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    format!(
        "{prefix}-{}-{}-{}",
        std::process::id(),
        nanos % 1_000_000_000,
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

impl Kafka {
    pub fn start() -> Kafka {
        Kafka::start_cluster(1)
    }

    /// As `start`; an embedded broker gets `brokers` brokers (for leader changes).
    pub fn start_cluster(brokers: u32) -> Kafka {
        let _ = ferry::telemetry::init_logging("warn", false);
        ferry::sidecar::install_crypto();
        let count = brokers;
        let (embedded, brokers) = match std::env::var("FERRY_TEST_BROKERS") {
            Ok(b) if !b.is_empty() => (None, b),
            _ => {
                let e = EmbeddedBroker::start(count).expect("embedded broker starts");
                let b = e.bootstrap_servers().to_string();
                (Some(e), b)
            }
        };
        let producer = ClientConfig::new()
            .set("bootstrap.servers", &brokers)
            .set("enable.idempotence", "true")
            .set("linger.ms", "0")
            .create()
            .expect("test producer");
        Kafka {
            embedded,
            brokers,
            producer,
        }
    }

    /// A client of the broker at `brokers` (one the test runs itself).
    pub fn connect(brokers: &str) -> Kafka {
        let _ = ferry::telemetry::init_logging("warn", false);
        ferry::sidecar::install_crypto();
        let producer = ClientConfig::new()
            .set("bootstrap.servers", brokers)
            .set("enable.idempotence", "true")
            .set("linger.ms", "5")
            .create()
            .expect("test producer");
        Kafka {
            embedded: None,
            brokers: brokers.to_string(),
            producer,
        }
    }

    pub fn is_external(&self) -> bool {
        self.embedded.is_none()
    }

    /// Creates a topic with a unique name and returns the name.
    pub async fn topic(&self, prefix: &str, partitions: i32) -> String {
        let name = unique(prefix);
        self.create(&name, partitions).await;
        name
    }

    /// A route's topics and group, all fresh: a source with `partitions`, one-partition reply
    /// and dead-letter topics.
    pub async fn route_topics(&self, partitions: i32) -> RouteTopics {
        RouteTopics {
            source: self.topic("in", partitions).await,
            reply: self.topic("out", 1).await,
            dlq: self.topic("dlq", 1).await,
            group: unique("group"),
        }
    }

    pub async fn create(&self, name: &str, partitions: i32) {
        match &self.embedded {
            Some(e) => e.create_topic(name, partitions).expect("create topic"),
            None => {
                let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
                    .set("bootstrap.servers", &self.brokers)
                    .create()
                    .expect("admin client");
                let topic = NewTopic::new(name, partitions, TopicReplication::Fixed(1));
                let results = admin
                    .create_topics(
                        [&topic],
                        &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))),
                    )
                    .await
                    .expect("create topics");
                for r in results {
                    r.expect("topic created");
                }
                // Wait until the topic is visible with all its partitions.
                let brokers = self.brokers.clone();
                let n = name.to_string();
                tokio::task::spawn_blocking(move || {
                    let c: BaseConsumer = ClientConfig::new()
                        .set("bootstrap.servers", &brokers)
                        .create()
                        .unwrap();
                    let deadline = Instant::now() + Duration::from_secs(20);
                    while Instant::now() < deadline {
                        if let Ok(m) = c.fetch_metadata(Some(&n), Duration::from_secs(5)) {
                            if m.topics()
                                .iter()
                                .any(|t| t.error().is_none() && t.partitions().len() == partitions as usize)
                            {
                                return;
                            }
                        }
                        std::thread::sleep(Duration::from_millis(100));
                    }
                    panic!("topic {n} did not appear");
                })
                .await
                .unwrap();
            }
        }
    }

    /// Sends one record and returns its partition and offset.
    pub async fn send(
        &self,
        topic: &str,
        partition: Option<i32>,
        key: Option<&str>,
        value: &str,
        headers: &[(&str, &str)],
    ) -> (i32, i64) {
        let mut hs = OwnedHeaders::new();
        for (k, v) in headers {
            hs = hs.insert(Header {
                key: k,
                value: Some(v.as_bytes()),
            });
        }
        let mut r: FutureRecord<'_, str, str> = FutureRecord::to(topic).payload(value).headers(hs);
        if let Some(k) = key {
            r = r.key(k);
        }
        if let Some(p) = partition {
            r = r.partition(p);
        }
        let d = self
            .producer
            .send(r, Timeout::After(Duration::from_secs(20)))
            .await
            .map_err(|(e, _)| e)
            .expect("send");
        (d.partition, d.offset)
    }

    /// Sends one record of raw bytes: any key, a value or a tombstone, any header bytes.
    pub async fn send_raw(
        &self,
        topic: &str,
        key: Option<&[u8]>,
        value: Option<&[u8]>,
        headers: &[(&str, &[u8])],
    ) {
        let mut hs = OwnedHeaders::new();
        for (k, v) in headers {
            hs = hs.insert(Header {
                key: k,
                value: Some(*v),
            });
        }
        let mut r: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(topic).headers(hs).partition(0);
        if let Some(k) = key {
            r = r.key(k);
        }
        if let Some(v) = value {
            r = r.payload(v);
        }
        self.producer
            .send(r, Timeout::After(Duration::from_secs(20)))
            .await
            .map_err(|(e, _)| e)
            .expect("send");
    }

    /// Sends one record with the given timestamp (ms).
    pub async fn send_at(&self, topic: &str, key: &str, value: &str, timestamp_ms: i64) {
        let r: FutureRecord<'_, str, str> = FutureRecord::to(topic)
            .key(key)
            .payload(value)
            .timestamp(timestamp_ms);
        self.producer
            .send(r, Timeout::After(Duration::from_secs(20)))
            .await
            .map_err(|(e, _)| e)
            .expect("send");
    }

    /// Reads every record of `topic` until `want` arrived or `within` passed.
    pub async fn read(&self, topic: &str, want: usize, within: Duration) -> Vec<Rec> {
        let brokers = self.brokers.clone();
        let topic = topic.to_string();
        tokio::task::spawn_blocking(move || read_blocking(&brokers, &topic, None, want, within))
            .await
            .unwrap()
    }

    /// Reads every record now in `topic` (up to its high watermarks).
    pub async fn read_all(&self, topic: &str) -> Vec<Rec> {
        let brokers = self.brokers.clone();
        let topic = topic.to_string();
        tokio::task::spawn_blocking(move || {
            let c: BaseConsumer = ClientConfig::new()
                .set("bootstrap.servers", &brokers)
                .create()
                .unwrap();
            // A broker that has just been through a fault campaign may answer slowly for a while.
            let deadline = Instant::now() + Duration::from_secs(90);
            let retry = |what: &str, e: rdkafka::error::KafkaError| {
                assert!(Instant::now() < deadline, "{what}: {e}");
                std::thread::sleep(Duration::from_millis(500));
            };
            let md = loop {
                match c.fetch_metadata(Some(&topic), Duration::from_secs(10)) {
                    Ok(md) => break md,
                    Err(e) => retry("metadata", e),
                }
            };
            let partitions = md.topics().first().map(|t| t.partitions().len()).unwrap_or(1);
            let mut each = Vec::new();
            for p in 0..partitions as i32 {
                let (low, high) = loop {
                    match c.fetch_watermarks(&topic, p, Duration::from_secs(10)) {
                        Ok(w) => break w,
                        Err(e) => retry("watermarks", e),
                    }
                };
                each.push((high - low) as usize);
            }
            let total: usize = each.iter().sum();
            // Some brokers hand out small fetches: allow for large topics.
            let within = Duration::from_secs(30) + Duration::from_millis(2 * total as u64);
            let first = read_blocking(&brokers, &topic, None, total, within);
            if first.len() >= total {
                return first;
            }
            // A broker that stalled for a while (Tansu's sqlite storage under load) gets a
            // second reader, one partition at a time: after a fault campaign Tansu has been
            // seen serving only one partition of a fetch for all of them, without an error.
            // What that returns is the answer.
            eprintln!("read {topic}: short; reading again, one partition at a time");
            (0..partitions as i32)
                .flat_map(|p| read_blocking(&brokers, &topic, Some(p), each[p as usize], within))
                .collect()
        })
        .await
        .unwrap()
    }

    /// The committed offsets of `group` for each partition of `topic`.
    pub async fn committed(&self, group: &str, topic: &str, partitions: i32) -> Vec<Option<i64>> {
        let brokers = self.brokers.clone();
        let (group, topic) = (group.to_string(), topic.to_string());
        tokio::task::spawn_blocking(move || {
            let c: BaseConsumer = ClientConfig::new()
                .set("bootstrap.servers", &brokers)
                .set("group.id", &group)
                .create()
                .unwrap();
            let mut tpl = TopicPartitionList::new();
            for p in 0..partitions {
                tpl.add_partition(&topic, p);
            }
            let got = c
                .committed_offsets(tpl, Duration::from_secs(10))
                .expect("committed offsets");
            (0..partitions)
                .map(|p| match got.find_partition(&topic, p).map(|e| e.offset()) {
                    Some(Offset::Offset(o)) => Some(o),
                    _ => None,
                })
                .collect()
        })
        .await
        .unwrap()
    }

    /// Sum of committed offsets over the partitions of `topic`.
    pub async fn committed_total(&self, group: &str, topic: &str, partitions: i32) -> i64 {
        self.committed(group, topic, partitions)
            .await
            .into_iter()
            .flatten()
            .sum()
    }
}

/// Reads `want` records of `topic` (of its partition `only`, or of all) from the beginning.
fn read_blocking(brokers: &str, topic: &str, only: Option<i32>, want: usize, within: Duration) -> Vec<Rec> {
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", unique("reader"))
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    let md = c
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .expect("metadata");
    let partitions = md.topics().first().map(|t| t.partitions().len()).unwrap_or(1);
    let mut tpl = TopicPartitionList::new();
    for p in (0..partitions as i32).filter(|p| only.is_none_or(|o| o == *p)) {
        tpl.add_partition_offset(topic, p, Offset::Beginning).unwrap();
    }
    c.assign(&tpl).unwrap();
    let mut out = Vec::new();
    let mut last_error = None;
    let deadline = Instant::now() + within;
    while out.len() < want && Instant::now() < deadline {
        let m = match c.poll(Duration::from_millis(50)) {
            Some(Ok(m)) => m,
            Some(Err(e)) => {
                last_error = Some(e);
                continue;
            }
            None => continue,
        };
        let mut headers = BTreeMap::new();
        if let Some(hs) = m.headers() {
            for h in hs.iter() {
                headers.insert(
                    h.key.to_string(),
                    String::from_utf8_lossy(h.value.unwrap_or_default()).into_owned(),
                );
            }
        }
        out.push(Rec {
            partition: m.partition(),
            offset: m.offset(),
            key: m.key().map(|k| String::from_utf8_lossy(k).into_owned()),
            value: m.payload().map(|v| String::from_utf8_lossy(v).into_owned()),
            headers,
            timestamp: m.timestamp().to_millis(),
        });
    }
    if out.len() < want {
        // Where the reading stopped, for the post-mortem of a broker that stopped serving.
        let mut last: BTreeMap<i32, i64> = BTreeMap::new();
        for r in &out {
            let o = last.entry(r.partition).or_insert(r.offset);
            *o = (*o).max(r.offset);
        }
        eprintln!(
            "read {topic}: {} of {want} records within {within:?}; last offset read per partition {last:?}; last error {last_error:?}",
            out.len()
        );
    }
    out
}

/// The topics and group of one test route.
pub struct RouteTopics {
    pub source: String,
    pub reply: String,
    pub dlq: String,
    pub group: String,
}

/// A record read back.
#[derive(Debug, Clone)]
pub struct Rec {
    pub partition: i32,
    pub offset: i64,
    pub key: Option<String>,
    pub value: Option<String>,
    pub headers: BTreeMap<String, String>,
    /// Milliseconds since the epoch (for `ferry send`, when the producer took the record).
    pub timestamp: Option<i64>,
}

impl Rec {
    pub fn header(&self, k: &str) -> Option<&str> {
        self.headers.get(k).map(String::as_str)
    }
}

/// A request the test service received.
#[derive(Debug, Clone)]
pub struct Req {
    pub path: String,
    pub headers: BTreeMap<String, String>,
    pub body: String,
}

impl Req {
    pub fn header(&self, k: &str) -> Option<&str> {
        self.headers.get(k).map(String::as_str)
    }

    pub fn attempt(&self) -> u32 {
        self.header("ferry-attempt")
            .and_then(|a| a.parse().ok())
            .unwrap_or(0)
    }
}

/// What the test service answers.
#[derive(Debug, Clone, Default)]
pub struct Resp {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Resp {
    pub fn new(status: u16, body: &str) -> Resp {
        Resp {
            status,
            headers: Vec::new(),
            body: body.to_string(),
        }
    }

    pub fn header(mut self, k: &str, v: &str) -> Resp {
        self.headers.push((k.to_string(), v.to_string()));
        self
    }
}

type Handler = Arc<dyn Fn(Req) -> Pin<Box<dyn Future<Output = Resp> + Send>> + Send + Sync>;

/// An HTTP service on 127.0.0.1:0 that records every request and answers with `handler`.
pub struct Service {
    pub addr: SocketAddr,
    pub requests: Arc<Mutex<Vec<Req>>>,
}

impl Service {
    pub async fn start<F, Fut>(handler: F) -> Service
    where
        F: Fn(Req) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Resp> + Send + 'static,
    {
        let handler: Handler = Arc::new(move |r| Box::pin(handler(r)));
        let requests: Arc<Mutex<Vec<Req>>> = Arc::default();
        let app = axum::Router::new()
            .fallback(serve)
            .with_state((handler, requests.clone()));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Service { addr, requests }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn requests(&self) -> Vec<Req> {
        self.requests.lock().unwrap().clone()
    }
}

async fn serve(
    State((handler, requests)): State<(Handler, Arc<Mutex<Vec<Req>>>)>,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let req = Req {
        path: uri.path().to_string(),
        headers: headers
            .iter()
            .map(|(k, v)| {
                (
                    k.as_str().to_string(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect(),
        body: String::from_utf8_lossy(&body).into_owned(),
    };
    requests.lock().unwrap().push(req.clone());
    let resp = handler(req).await;
    let mut h = HeaderMap::new();
    for (k, v) in &resp.headers {
        h.append(
            axum::http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
            v.parse().unwrap(),
        );
    }
    (StatusCode::from_u16(resp.status).unwrap(), h, resp.body).into_response()
}

/// A config for one route from `source` to the service, with `extra` YAML lines appended to the
/// route (indented by the caller with 4 spaces).
pub fn config_text(
    kafka: &Kafka,
    group: &str,
    source: &str,
    url: &str,
    reply: &str,
    dlq: &str,
    extra: &str,
) -> String {
    format!(
        r#"kafka:
  brokers: "{brokers}"
  group_id: {group}
  commit_interval: 100ms
  properties:
    topic.metadata.refresh.interval.ms: 1000
    session.timeout.ms: 6000
    heartbeat.interval.ms: 500
routes:
  - name: test
    from:
      topics: [{source}]
    call:
      http:
        url: "{url}"
        timeout: 2s
    reply:
      to: {reply}
    dead_letter:
      to: {dlq}
    retry:
      max_attempts: 3
      backoff: {{ initial: 10ms, max: 50ms }}
{extra}
admin:
  listen: 127.0.0.1:0
shutdown:
  drain_timeout: 5s
"#,
        brokers = kafka.brokers
    )
}

/// [`config_text`] for one route over `t`'s topics.
pub fn route_config(kafka: &Kafka, t: &RouteTopics, url: &str, extra: &str) -> String {
    config_text(kafka, &t.group, &t.source, url, &t.reply, &t.dlq, extra)
}

pub fn parse(text: &str) -> Config {
    config::parse(
        text,
        std::path::Path::new("test.yaml"),
        &Interpolator::from_pairs(&[]),
    )
    .unwrap_or_else(|e| panic!("test config is valid: {e}\n{text}"))
}

/// Polls `f` until it returns `Some`, or panics after `within`.
pub async fn eventually<T, F, Fut>(within: Duration, what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A ferry process, killed when dropped.
pub struct Ferry(pub std::process::Child);

impl Ferry {
    /// `ferry run -c config`, its stderr in `log`.
    pub fn spawn(config: &std::path::Path, log: &std::path::Path) -> Ferry {
        Ferry::spawn_with(config, log, &[("FERRY_LOG", "info")])
    }

    /// As `spawn`, with these environment variables.
    pub fn spawn_with(config: &std::path::Path, log: &std::path::Path, env: &[(&str, &str)]) -> Ferry {
        let log = std::fs::File::create(log).unwrap();
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_ferry"))
            .args(["run", "-c"])
            .arg(config)
            .envs(env.iter().copied())
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .spawn()
            .expect("ferry starts");
        Ferry(child)
    }

    pub fn signal(&self, sig: i32) {
        unsafe {
            libc::kill(self.0.id() as i32, sig);
        }
    }

    pub fn pid(&self) -> u32 {
        self.0.id()
    }

    /// Whether the process is still running.
    pub fn alive(&mut self) -> bool {
        matches!(self.0.try_wait(), Ok(None))
    }

    /// Waits for the exit code, up to `within`; panics past it.
    pub async fn exit_code(&mut self, within: Duration) -> Option<i32> {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.0.try_wait() {
                return status.code();
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("ferry did not exit within {within:?}");
    }
}

impl Drop for Ferry {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A loopback port free right now, for a process that must be told its port up front.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

/// `GET` or `POST` on an admin endpoint: status code, content type and body.
pub async fn admin_call(method: &str, url: &str, token: Option<&str>) -> (u16, String, String) {
    let client = reqwest::Client::builder().no_proxy().build().unwrap();
    let mut r = match method {
        "GET" => client.get(url),
        _ => client.post(url),
    };
    if let Some(t) = token {
        r = r.bearer_auth(t);
    }
    let response = r.send().await.expect("the admin endpoint answers");
    let code = response.status().as_u16();
    let content_type = response
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    (code, content_type, response.text().await.unwrap_or_default())
}

/// Prometheus text as `(name{labels}, value)` samples.
pub fn samples(text: &str) -> Vec<(String, f64)> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| {
            let (k, v) = l.rsplit_once(' ')?;
            Some((k.to_string(), v.parse().ok()?))
        })
        .collect()
}

/// The sum of every sample of metric `name` whose labels contain all of `with` (`key="value"`).
pub fn metric_sum(text: &str, name: &str, with: &[&str]) -> f64 {
    samples(text)
        .iter()
        .filter(|(k, _)| k == name || k.starts_with(&format!("{name}{{")))
        .filter(|(k, _)| with.iter().all(|w| k.contains(w)))
        .map(|(_, v)| v)
        .sum()
}
