//! The typed configuration, as SPEC §2 describes it. Field defaults live here, next to the field.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::{Deserialize, Deserializer, de};

/// The whole `ferry.yaml`.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub kafka: Kafka,
    /// The co-located service, when ferry should wait for it.
    #[serde(default)]
    pub service: Service,
    pub routes: Vec<Route>,
    #[serde(default)]
    pub delivery: Delivery,
    #[serde(default)]
    pub admin: Admin,
    #[serde(default)]
    pub telemetry: Telemetry,
    #[serde(default)]
    pub shutdown: Shutdown,
}

#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Kafka {
    /// `host:port[,host:port…]`.
    pub brokers: String,
    pub group_id: String,
    /// Any librdkafka property, passed to the consumer and the producer.
    #[serde(default)]
    pub properties: BTreeMap<String, PropertyValue>,
    /// How often the contiguous watermark of each partition is committed; with
    /// `delivery: exactly_once`, how long a transaction stays open at most.
    #[serde(default = "default_commit_interval")]
    pub commit_interval: Dur,
    /// With `delivery: exactly_once`: the producer's `transactional.id`. Default
    /// `ferry-{group_id}-{HOSTNAME}`, stable across restarts of the container in its pod, so a
    /// restarted sidecar fences its predecessor; replaced pods are fenced by the group's
    /// generation (KIP-447).
    pub transactional_id: Option<String>,
    /// With `delivery: exactly_once`: a transaction is committed once it holds this many
    /// outputs, even before `commit_interval`.
    #[serde(default = "default_transaction_max_records")]
    pub transaction_max_records: usize,
}

fn default_transaction_max_records() -> usize {
    1000
}

fn default_commit_interval() -> Dur {
    Dur(Duration::from_secs(1))
}

/// JSON Schemas of the types written as text and parsed by hand: the `format` names a check
/// that `config::schema` runs with the same parser, so the schema and the loader agree.
macro_rules! text_schema {
    ($ty:ty, $name:literal, $schema:tt) => {
        impl JsonSchema for $ty {
            fn schema_name() -> std::borrow::Cow<'static, str> {
                $name.into()
            }

            fn json_schema(_: &mut SchemaGenerator) -> Schema {
                json_schema!($schema)
            }
        }
    };
}

text_schema!(Dur, "Duration", {
    "type": "string",
    "format": "duration",
    "description": "A number with a unit: 250ms, 5s, 10m, 1h, or a combination such as 1m30s.",
    "examples": ["250ms", "5s", "1m30s"]
});
text_schema!(ByteSize, "ByteSize", {
    "type": ["string", "integer"],
    "format": "byte-size",
    "description": "Bytes, or a size with a unit: 512KiB, 16MiB, 1GiB, 64kB, 1MB.",
    "examples": ["16MiB"]
});
text_schema!(Start, "Start", {
    "type": "string",
    "format": "start",
    "description": "earliest, latest, or an RFC 3339 time such as 2026-01-31T12:00:00Z.",
    "examples": ["earliest", "latest", "2026-01-31T12:00:00Z"]
});
text_schema!(StatusMatch, "StatusMatch", {
    "type": ["integer", "string"],
    "format": "status",
    "minimum": 100,
    "maximum": 599,
    "description": "An HTTP status from 100 to 599, or a class such as \"4xx\".",
    "examples": [409, "4xx"]
});
text_schema!(PropertyValue, "PropertyValue", {
    "type": ["string", "number", "boolean"],
    "description": "A librdkafka property value."
});
text_schema!(Secret, "Secret", {
    "type": "string",
    "description": "A credential; write it as a ${VAR} or ${file:/path} reference."
});

/// A librdkafka property value; YAML numbers and booleans are accepted and passed as text.
///
/// Its `Debug` form hides the value: properties carry passwords, and a debug print of the config
/// must not.
#[derive(Clone, PartialEq, Eq)]
pub struct PropertyValue(pub String);

impl fmt::Debug for PropertyValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PropertyValue(..)")
    }
}

/// A credential: compared in constant time, never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Secret {
        Secret(s.into())
    }

    /// Whether `candidate` equals the secret. The time taken depends on the lengths only, so an
    /// attacker cannot find the secret byte by byte by timing refusals.
    pub fn matches(&self, candidate: &[u8]) -> bool {
        let secret = self.0.as_bytes();
        let mut diff = secret.len() ^ candidate.len();
        for (i, &b) in secret.iter().enumerate() {
            diff |= usize::from(b ^ candidate.get(i).copied().unwrap_or(!b));
        }
        diff == 0
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(..)")
    }
}

impl<'de> Deserialize<'de> for PropertyValue {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match serde_json::Value::deserialize(d)? {
            serde_json::Value::String(s) => Ok(PropertyValue(s)),
            serde_json::Value::Number(n) => Ok(PropertyValue(n.to_string())),
            serde_json::Value::Bool(b) => Ok(PropertyValue(b.to_string())),
            _ => Err(de::Error::custom(
                "a librdkafka property takes a string, number or boolean",
            )),
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Service {
    pub ready: Option<Ready>,
}

/// A readiness probe of the service: ferry subscribes only once it answers, and stops taking
/// records after `failure_threshold` failed probes in a row, until one succeeds.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Ready {
    /// An HTTP URL that answers 2xx when the service is ready.
    pub http: Option<String>,
    /// A gRPC endpoint serving `grpc.health.v1.Health/Check` (overall status, service "").
    pub grpc: Option<String>,
    #[serde(default = "default_ready_interval")]
    pub interval: Dur,
    #[serde(default = "default_failure_threshold")]
    pub failure_threshold: u32,
    /// The CA that signs the service's certificate; required for an `https://` probe.
    pub ca_file: Option<std::path::PathBuf>,
    /// A client certificate (PEM) presented to a service that asks for one (mTLS).
    pub cert_file: Option<std::path::PathBuf>,
    /// The private key (PEM, unencrypted) of `cert_file`.
    pub key_file: Option<std::path::PathBuf>,
}

impl Ready {
    pub fn tls(&self) -> TlsFiles<'_> {
        TlsFiles::new(&self.ca_file, &self.cert_file, &self.key_file)
    }
}

fn default_ready_interval() -> Dur {
    Dur(Duration::from_secs(2))
}

fn default_failure_threshold() -> u32 {
    3
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Delivery {
    /// Commit after acknowledgement: a crash may repeat what was in flight, never lose it.
    #[default]
    AtLeastOnce,
    /// Replies, dead letters, retry-topic records and offsets in one Kafka transaction per
    /// batch: `read_committed` consumers see each outcome once, even across crashes.
    ExactlyOnce,
}

#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Route {
    /// Unique; used in logs, metrics, dead-letter headers and `ferry redrive --route`.
    pub name: String,
    pub from: From,
    /// Which records must wait for each other.
    #[serde(default)]
    pub ordering: Ordering,
    #[serde(default)]
    pub concurrency: Concurrency,
    /// For "latest value wins" streams.
    pub freshness: Option<Freshness>,
    pub call: Call,
    #[serde(default)]
    pub retry: Retry,
    #[serde(default)]
    pub circuit: Circuit,
    #[serde(default)]
    pub reply: Reply,
    pub dead_letter: DeadLetter,
    /// The input's payload contract.
    #[serde(default)]
    pub validate: Option<Validate>,
    /// First match wins; consulted after an explicit `ferry-action` and before the defaults.
    #[serde(default)]
    pub rules: Vec<Rule>,
}

impl Route {
    /// The topics this route writes to, each with its field: replies, dead letters and retry
    /// copies.
    pub fn writes(&self) -> impl Iterator<Item = (&String, &'static str)> {
        self.reply
            .to
            .iter()
            .map(|t| (t, "reply.to"))
            .chain(self.reply.topics.iter().map(|t| (t, "reply.topics")))
            .chain(std::iter::once((&self.dead_letter.to, "dead_letter.to")))
            .chain(self.retry.topics.iter().map(|t| (t, "retry.topics")))
    }
}

/// SPEC §1 ordering modes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Ordering {
    /// Records with the same key one after another; different keys concurrently. A null key is
    /// a lane of its own.
    #[default]
    Key,
    /// Strictly one after another per partition.
    Partition,
    /// Any order, as many at once as the bounds allow.
    None,
}

/// Skipping records whose moment has passed.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Freshness {
    /// Records older than this (by their timestamp) are not called: outcome `expired`.
    pub max_age: Option<Dur>,
    /// Of several queued records of one key, only the newest is called; the older ones are
    /// `expired`. Needs `ordering: key`.
    #[serde(default)]
    pub conflate: bool,
}

/// The in-flight bounds of a route.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Concurrency {
    /// Records of one partition between its committed watermark and the newest taken, finished
    /// ones included: past this the partition is paused.
    #[serde(default = "default_per_partition")]
    pub per_partition: usize,
    /// The same count over all of the route's partitions.
    #[serde(default = "default_total")]
    pub total: usize,
    /// Bytes (key, value, headers) of the records in flight on the route.
    #[serde(default = "default_max_bytes")]
    pub max_bytes: ByteSize,
    /// Calls per second towards the service; 0 = unlimited.
    #[serde(default)]
    pub rate: f64,
}

impl Default for Concurrency {
    fn default() -> Self {
        Concurrency {
            per_partition: default_per_partition(),
            total: default_total(),
            max_bytes: default_max_bytes(),
            rate: 0.0,
        }
    }
}

fn default_per_partition() -> usize {
    32
}

fn default_total() -> usize {
    256
}

fn default_max_bytes() -> ByteSize {
    ByteSize(16 * 1024 * 1024)
}

/// A size written as `512KiB`, `16MiB`, `1GiB`, `64kB` or a plain number of bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteSize(pub u64);

impl ByteSize {
    pub fn parse(s: &str) -> Option<u64> {
        let s = s.trim();
        let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
        let n: u64 = s[..split].parse().ok()?;
        let scale: u64 = match s[split..].trim() {
            "" | "B" => 1,
            "KiB" => 1 << 10,
            "MiB" => 1 << 20,
            "GiB" => 1 << 30,
            "kB" | "KB" => 1_000,
            "MB" => 1_000_000,
            "GB" => 1_000_000_000,
            _ => return None,
        };
        n.checked_mul(scale)
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = serde_json::Value::deserialize(d)?;
        let text = match &v {
            serde_json::Value::String(s) => s.clone(),
            other => other.to_string(),
        };
        ByteSize::parse(&text).map(ByteSize).ok_or_else(|| {
            de::Error::custom(format!(
                "`{text}` is not a size: write bytes, or a number with KiB, MiB or GiB, such as 16MiB"
            ))
        })
    }
}

#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct From {
    #[serde(default)]
    pub topics: Vec<String>,
    /// A regular expression over topic names (librdkafka's `^…` subscription).
    pub pattern: Option<String>,
    #[serde(default)]
    pub start: Start,
}

/// Where a consumer group with no committed offset starts reading.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Start {
    #[default]
    Earliest,
    Latest,
    /// Milliseconds since the epoch.
    Timestamp(i64),
}

impl<'de> Deserialize<'de> for Start {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        match s.as_str() {
            "earliest" => Ok(Start::Earliest),
            "latest" => Ok(Start::Latest),
            other => parse_rfc3339_ms(other).map(Start::Timestamp).ok_or_else(|| {
                de::Error::custom(format!(
                    "`{other}` is not a start position: use earliest, latest or an RFC 3339 time like 2026-01-31T12:00:00Z"
                ))
            }),
        }
    }
}

/// Parses `YYYY-MM-DDTHH:MM:SS[.fff](Z|±HH:MM)` into epoch milliseconds.
fn parse_rfc3339_ms(s: &str) -> Option<i64> {
    let (date, time) = s.split_once(['T', 't'])?;
    let mut d = date.splitn(3, '-');
    let (y, mo, da): (i64, i64, i64) = (
        d.next()?.parse().ok()?,
        d.next()?.parse().ok()?,
        d.next()?.parse().ok()?,
    );
    let (clock, offset_s) = if let Some(c) = time.strip_suffix(['Z', 'z']) {
        (c, 0)
    } else {
        let i = time.rfind(['+', '-'])?;
        let (c, off) = time.split_at(i);
        let sign = if off.starts_with('-') { -1 } else { 1 };
        let (oh, om) = off[1..].split_once(':')?;
        (
            c,
            sign * (oh.parse::<i64>().ok()? * 3600 + om.parse::<i64>().ok()? * 60),
        )
    };
    let (hms, frac) = clock.split_once('.').unwrap_or((clock, ""));
    let mut t = hms.splitn(3, ':');
    let (h, mi, se): (i64, i64, i64) = (
        t.next()?.parse().ok()?,
        t.next()?.parse().ok()?,
        t.next()?.parse().ok()?,
    );
    if !(1..=12).contains(&mo) || !(1..=31).contains(&da) || h > 23 || mi > 59 || se > 60 {
        return None;
    }
    let ms: i64 = format!("{frac:0<3}").get(..3)?.parse().ok()?;
    // Days from civil (Howard Hinnant's algorithm).
    let y2 = if mo <= 2 { y - 1 } else { y };
    let era = y2.div_euclid(400);
    let yoe = y2 - era * 400;
    let doy = (153 * (if mo > 2 { mo - 3 } else { mo + 9 }) + 2) / 5 + da - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some((days * 86_400 + h * 3600 + mi * 60 + se - offset_s) * 1000 + ms)
}

/// How to call the service: exactly one of `http` and `grpc`.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Call {
    pub http: Option<HttpCall>,
    pub grpc: Option<GrpcCall>,
}

#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct GrpcCall {
    /// `http://host:port` (h2c) or `https://host:port` (TLS, with `ca_file`).
    pub endpoint: String,
    #[serde(default = "default_call_timeout")]
    pub timeout: Dur,
    /// `package.Service/Method` of an existing service; omitted: the native
    /// `ferry.v1.Handler/Handle` contract.
    pub method: Option<String>,
    /// A `FileDescriptorSet` that describes `method` (relative to the config file).
    pub descriptor_set: Option<std::path::PathBuf>,
    /// Ask the service for `method`'s descriptors through gRPC server reflection.
    #[serde(default)]
    pub reflection: bool,
    /// The CA that signs the service's certificate; required for `https://` endpoints (the
    /// system's trust store is not used).
    pub ca_file: Option<std::path::PathBuf>,
    /// A client certificate (PEM) presented to a service that asks for one (mTLS).
    pub cert_file: Option<std::path::PathBuf>,
    /// The private key (PEM, unencrypted) of `cert_file`.
    pub key_file: Option<std::path::PathBuf>,
}

impl GrpcCall {
    pub fn tls(&self) -> TlsFiles<'_> {
        TlsFiles::new(&self.ca_file, &self.cert_file, &self.key_file)
    }
}

/// The TLS files of one connection to the service: the same three keys wherever TLS is
/// configured (`call.http`, `call.grpc`, `service.ready`).
#[derive(Debug, Clone, Copy)]
pub struct TlsFiles<'a> {
    pub ca: Option<&'a std::path::Path>,
    pub cert: Option<&'a std::path::Path>,
    pub key: Option<&'a std::path::Path>,
}

impl<'a> TlsFiles<'a> {
    fn new(
        ca: &'a Option<std::path::PathBuf>,
        cert: &'a Option<std::path::PathBuf>,
        key: &'a Option<std::path::PathBuf>,
    ) -> Self {
        TlsFiles {
            ca: ca.as_deref(),
            cert: cert.as_deref(),
            key: key.as_deref(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.ca.is_none() && self.cert.is_none() && self.key.is_none()
    }
}

#[derive(Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct HttpCall {
    /// May hold `{topic}`, `{partition}`, `{offset}`, `{key}` and `{header.NAME}`.
    pub url: String,
    #[serde(default = "default_method")]
    pub method: String,
    #[serde(default = "default_call_timeout")]
    pub timeout: Dur,
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// How the record travels: `raw` (the value as the body, metadata in `ferry-*` headers) or
    /// `cloudevents` (CloudEvents 1.0 HTTP binary mode, with the `ferry-*` headers as well).
    #[serde(default)]
    pub format: Format,
    /// The CA that signs the service's certificate; required for `https://` URLs (the
    /// system's trust store is not used).
    pub ca_file: Option<std::path::PathBuf>,
    /// A client certificate (PEM) presented to a service that asks for one (mTLS).
    pub cert_file: Option<std::path::PathBuf>,
    /// The private key (PEM, unencrypted) of `cert_file`.
    pub key_file: Option<std::path::PathBuf>,
}

impl HttpCall {
    pub fn tls(&self) -> TlsFiles<'_> {
        TlsFiles::new(&self.ca_file, &self.cert_file, &self.key_file)
    }
}

/// Header values often carry credentials: debug output shows the names only.
impl fmt::Debug for HttpCall {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HttpCall")
            .field("url", &self.url)
            .field("method", &self.method)
            .field("timeout", &self.timeout)
            .field("headers", &self.headers.keys().collect::<Vec<_>>())
            .field("format", &self.format)
            .field("ca_file", &self.ca_file)
            .field("cert_file", &self.cert_file)
            .field("key_file", &self.key_file)
            .finish()
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, JsonSchema)]
pub enum Format {
    #[default]
    #[serde(rename = "raw")]
    Raw,
    #[serde(rename = "cloudevents")]
    CloudEvents,
}

fn default_method() -> String {
    "POST".into()
}

fn default_call_timeout() -> Dur {
    Dur(Duration::from_secs(5))
}

#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Retry {
    /// Attempts in total, the first one included.
    #[serde(default = "default_max_attempts")]
    #[schemars(range(min = 1))]
    pub max_attempts: u32,
    #[serde(default)]
    pub backoff: Backoff,
    /// How long after its first attempt a failing record may still be retried.
    #[serde(default = "default_max_record_age")]
    pub max_record_age: Dur,
    /// Non-blocking retries (`ordering: none` only): a failing record moves to the next of
    /// these topics, to be tried again there after its backoff, instead of waiting in place;
    /// after the last one it is dead-lettered. The route reads them too.
    #[serde(default)]
    pub topics: Vec<String>,
}

impl Default for Retry {
    fn default() -> Self {
        Retry {
            max_attempts: default_max_attempts(),
            backoff: Backoff::default(),
            max_record_age: default_max_record_age(),
            topics: Vec::new(),
        }
    }
}

fn default_max_attempts() -> u32 {
    5
}

fn default_max_record_age() -> Dur {
    Dur(Duration::from_secs(600))
}

#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Backoff {
    #[serde(default = "default_initial")]
    pub initial: Dur,
    #[serde(default = "default_backoff_max")]
    pub max: Dur,
    #[serde(default = "default_multiplier")]
    pub multiplier: f64,
    #[serde(default)]
    pub jitter: Jitter,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            initial: default_initial(),
            max: default_backoff_max(),
            multiplier: default_multiplier(),
            jitter: Jitter::default(),
        }
    }
}

fn default_initial() -> Dur {
    Dur(Duration::from_millis(200))
}

fn default_backoff_max() -> Dur {
    Dur(Duration::from_secs(30))
}

fn default_multiplier() -> f64 {
    2.0
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Jitter {
    /// A uniformly random delay between zero and the computed backoff.
    #[default]
    Full,
    /// Half the backoff plus a random part of the other half.
    Equal,
    None,
}

/// When the service, not the record, is the problem: most calls fail for a retryable reason.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Circuit {
    /// Share of retryable failures among the calls of the window that opens the circuit.
    #[serde(default = "default_failure_ratio")]
    pub failure_ratio: f64,
    /// Calls the window must hold before the ratio counts.
    #[serde(default = "default_min_calls")]
    pub min_calls: u32,
    #[serde(default = "default_circuit_window")]
    pub window: Dur,
    /// While open, one probe call this often.
    #[serde(default = "default_probe_every")]
    pub probe_every: Dur,
}

impl Default for Circuit {
    fn default() -> Self {
        Circuit {
            failure_ratio: default_failure_ratio(),
            min_calls: default_min_calls(),
            window: default_circuit_window(),
            probe_every: default_probe_every(),
        }
    }
}

fn default_failure_ratio() -> f64 {
    0.5
}

fn default_min_calls() -> u32 {
    20
}

fn default_circuit_window() -> Dur {
    Dur(Duration::from_secs(10))
}

fn default_probe_every() -> Dur {
    Dur(Duration::from_secs(2))
}

#[derive(Debug, Clone, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Reply {
    /// Omitted: reply bodies are discarded and the record is `done`.
    pub to: Option<String>,
    /// Topics the service may choose with `ferry-reply-topic`.
    #[serde(default)]
    pub topics: Vec<String>,
    /// A JSON Schema every reply body must match; one that does not is dead-lettered
    /// (`reply_schema`) instead of published.
    #[serde(default)]
    pub schema: Option<SchemaFile>,
}

/// The payload contract of a route's input.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Validate {
    /// A JSON Schema the record value must match; a record that does not never reaches the
    /// service and is dead-lettered (`schema`).
    pub schema: SchemaFile,
}

/// A JSON Schema file (draft 2020-12 unless it says otherwise with `$schema`), relative to the
/// config file; compiled once when the config is loaded.
#[derive(Clone)]
pub struct SchemaFile {
    pub path: std::path::PathBuf,
    /// Set by the loader; `None` only before it ran.
    pub compiled: Option<std::sync::Arc<jsonschema::Validator>>,
}

impl fmt::Debug for SchemaFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SchemaFile({})", self.path.display())
    }
}

impl<'de> Deserialize<'de> for SchemaFile {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Ok(SchemaFile {
            path: std::path::PathBuf::deserialize(d)?,
            compiled: None,
        })
    }
}

text_schema!(SchemaFile, "SchemaFile", {
    "type": "string",
    "description": "The path of a JSON Schema file, relative to the config file."
});

#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DeadLetter {
    pub to: String,
    #[serde(default = "yes")]
    pub include_payload: bool,
    /// Record headers (case-insensitive) not copied onto dead letters.
    #[serde(default)]
    pub redact_headers: Vec<String>,
}

fn yes() -> bool {
    true
}

#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    pub when: When,
    pub then: Action,
}

/// Every condition given must hold.
#[derive(Debug, Clone, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct When {
    /// An HTTP status or class.
    pub status: Option<StatusMatch>,
    /// A gRPC status code name, such as `NOT_FOUND`.
    pub grpc: Option<String>,
    pub error: Option<ErrorKind>,
}

/// `409` or a class such as `"4xx"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatusMatch {
    Exact(u16),
    Class(u16),
}

impl StatusMatch {
    pub fn matches(self, status: u16) -> bool {
        match self {
            StatusMatch::Exact(s) => s == status,
            StatusMatch::Class(c) => status / 100 == c,
        }
    }
}

impl<'de> Deserialize<'de> for StatusMatch {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let bad = |s: &str| {
            de::Error::custom(format!(
                "`{s}` is not a status: use a code from 100 to 599 such as 409, or a class such as \"4xx\""
            ))
        };
        match serde_json::Value::deserialize(d)? {
            serde_json::Value::Number(n) => match n.as_u64() {
                Some(c @ 100..=599) => Ok(StatusMatch::Exact(c as u16)),
                _ => Err(bad(&n.to_string())),
            },
            serde_json::Value::String(s) => {
                let b = s.as_bytes();
                if b.len() == 3 && (b'1'..=b'5').contains(&b[0]) && s[1..].eq_ignore_ascii_case("xx") {
                    Ok(StatusMatch::Class(u16::from(b[0] - b'0')))
                } else if let Ok(c @ 100..=599) = s.parse::<u16>() {
                    Ok(StatusMatch::Exact(c))
                } else {
                    Err(bad(&s))
                }
            }
            other => Err(bad(&other.to_string())),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    Timeout,
    Connect,
}

/// What a rule or the service asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    Reply,
    Retry,
    DeadLetter,
    Drop,
}

impl Action {
    /// The spellings of the `ferry-action` response header.
    pub fn from_header(value: &str) -> Option<Action> {
        match value.trim().to_ascii_lowercase().as_str() {
            "reply" => Some(Action::Reply),
            "retry" => Some(Action::Retry),
            "dead-letter" | "dead_letter" => Some(Action::DeadLetter),
            "drop" => Some(Action::Drop),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Admin {
    /// Where the admin endpoint is served; `null` turns the listener off.
    #[serde(default = "default_admin_listen")]
    #[schemars(extend("format" = "listen-address"))]
    pub listen: Option<SocketAddr>,
    /// Needed by `POST /pause|/resume|/drain` when `listen` is not loopback; without it those
    /// are disabled there. An empty value counts as none (`${FERRY_ADMIN_TOKEN:-}`).
    #[serde(default, deserialize_with = "optional_secret")]
    pub token: Option<Secret>,
    /// Serve `GET /prestop`: a drain for Kubernetes preStop hooks, which can only send GET
    /// requests and no secret. Anyone who reaches the admin port can then drain this sidecar
    /// (an authenticated `POST /resume` undoes it).
    #[serde(default)]
    pub prestop: bool,
}

impl Default for Admin {
    fn default() -> Self {
        Admin {
            listen: default_admin_listen(),
            token: None,
            prestop: false,
        }
    }
}

fn optional_secret<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Secret>, D::Error> {
    let s: Option<String> = Option::deserialize(d)?;
    Ok(s.filter(|s| !s.is_empty()).map(Secret))
}

/// Logs and traces.
#[derive(Debug, Clone, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Telemetry {
    #[serde(default)]
    pub log: Log,
    #[serde(default)]
    pub traces: Traces,
}

#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Log {
    #[serde(default)]
    pub format: LogFormat,
    /// A level (`info`) or a filter (`info,ferry=debug`); `FERRY_LOG` overrides it.
    #[serde(default = "default_log_level")]
    pub level: String,
}

impl Default for Log {
    fn default() -> Self {
        Log {
            format: LogFormat::default(),
            level: default_log_level(),
        }
    }
}

fn default_log_level() -> String {
    "info".into()
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// Where spans go. Without an endpoint here or in `OTEL_EXPORTER_OTLP_ENDPOINT`, no spans are
/// made, but a record's `traceparent` still travels on to the service and into its outputs.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Traces {
    /// An OTLP/gRPC collector, `http://host:4317`.
    #[serde(default)]
    pub otlp_endpoint: Option<String>,
    /// The share of records traced when the record's own context does not decide (a sampled
    /// `traceparent` is always followed).
    #[serde(default = "default_sample_ratio")]
    pub sample_ratio: f64,
    /// `service.name` of ferry's spans.
    #[serde(default = "default_service_name")]
    pub service_name: String,
}

impl Default for Traces {
    fn default() -> Self {
        Traces {
            otlp_endpoint: None,
            sample_ratio: default_sample_ratio(),
            service_name: default_service_name(),
        }
    }
}

fn default_sample_ratio() -> f64 {
    0.1
}

fn default_service_name() -> String {
    "ferry".into()
}

fn default_admin_listen() -> Option<SocketAddr> {
    Some(SocketAddr::from(([0, 0, 0, 0], 9464)))
}

#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Shutdown {
    /// How long in-flight records may take to finish on SIGTERM or on a revoke.
    #[serde(default = "default_drain_timeout")]
    pub drain_timeout: Dur,
}

impl Default for Shutdown {
    fn default() -> Self {
        Shutdown {
            drain_timeout: default_drain_timeout(),
        }
    }
}

fn default_drain_timeout() -> Dur {
    Dur(Duration::from_secs(25))
}

/// A duration written as `250ms`, `5s`, `10m`, `1h` (or a combination such as `1m30s`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Dur(pub Duration);

impl Dur {
    pub fn parse(s: &str) -> Option<Duration> {
        let s = s.trim();
        if s.is_empty() {
            return None;
        }
        let mut total = Duration::ZERO;
        let mut rest = s;
        while !rest.is_empty() {
            let digits = rest
                .find(|c: char| !(c.is_ascii_digit() || c == '.'))
                .unwrap_or(rest.len());
            if digits == 0 {
                return None;
            }
            let n: f64 = rest[..digits].parse().ok()?;
            rest = &rest[digits..];
            let unit_len = rest.find(|c: char| c.is_ascii_digit()).unwrap_or(rest.len());
            let scale = match &rest[..unit_len] {
                "ms" => 0.001,
                "s" => 1.0,
                "m" => 60.0,
                "h" => 3600.0,
                _ => return None,
            };
            rest = &rest[unit_len..];
            total += Duration::try_from_secs_f64(n * scale).ok()?;
        }
        Some(total)
    }
}

impl fmt::Display for Dur {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.0)
    }
}

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = serde_json::Value::deserialize(d)?;
        let text = match &v {
            serde_json::Value::String(s) => s.clone(),
            other => other.to_string(),
        };
        Dur::parse(&text).map(Dur).ok_or_else(|| {
            de::Error::custom(format!(
                "`{text}` is not a duration: write a number with a unit, such as 250ms, 5s, 10m or 1h"
            ))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        let ok = [
            ("250ms", 250),
            ("5s", 5000),
            ("10m", 600_000),
            ("1h", 3_600_000),
            ("1m30s", 90_000),
            ("1.5s", 1500),
        ];
        for (s, ms) in ok {
            assert_eq!(Dur::parse(s), Some(Duration::from_millis(ms)), "{s}");
        }
        for bad in ["", "5", "5 s", "s", "5d", "-1s"] {
            assert_eq!(Dur::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn sizes() {
        assert_eq!(ByteSize::parse("16MiB"), Some(16 << 20));
        assert_eq!(ByteSize::parse("512 KiB"), Some(512 << 10));
        assert_eq!(ByteSize::parse("100"), Some(100));
        assert_eq!(ByteSize::parse("64kB"), Some(64_000));
        assert_eq!(ByteSize::parse("lots"), None);
        assert_eq!(ByteSize::parse("5TiB"), None);
    }

    #[test]
    fn rfc3339() {
        assert_eq!(parse_rfc3339_ms("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(
            parse_rfc3339_ms("2026-01-31T12:00:00.5+01:00"),
            Some(1_769_857_200_500)
        );
        assert_eq!(parse_rfc3339_ms("2026-13-01T00:00:00Z"), None);
    }

    #[test]
    fn secrets_compare_whole_and_never_print() {
        let s = Secret::new("t0ken");
        assert!(s.matches(b"t0ken"));
        for wrong in [&b""[..], b"t0ke", b"t0ken!", b"T0ken", b"x0ken", b"t0kex"] {
            assert!(!s.matches(wrong), "{wrong:?}");
        }
        assert!(!Secret::new("").matches(b"a"));
        assert_eq!(format!("{s:?}"), "Secret(..)");
        assert_eq!(format!("{:?}", PropertyValue("pw".into())), "PropertyValue(..)");
    }

    #[test]
    fn status_match() {
        let m: StatusMatch = serde_json::from_str("\"4xx\"").unwrap();
        assert!(m.matches(404) && !m.matches(500));
        let m: StatusMatch = serde_json::from_str("409").unwrap();
        assert!(m.matches(409) && !m.matches(408));
        assert!(serde_json::from_str::<StatusMatch>("\"6xx\"").is_err());
        assert!(serde_json::from_str::<StatusMatch>("42").is_err());
    }
}
