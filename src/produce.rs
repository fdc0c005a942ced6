//! Reply and dead-letter records, and the producer that writes them.
//!
//! Fed by the route handler with a decision; a record's outcome is final only once the
//! broker has acknowledged what this module sent (idempotent producer, acks=all).

use std::borrow::Cow;
use std::collections::{BTreeMap, VecDeque};
use std::ffi::c_void;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use rdkafka::ClientConfig;
use rdkafka::Message as _;
use rdkafka::client::ClientContext;
use rdkafka::config::{FromClientConfigAndContext, RDKafkaLogLevel};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseProducer, BaseRecord, DeliveryResult, Producer as _, ProducerContext};
use rdkafka::util::Timeout;
use tokio::sync::{Notify, oneshot};
use tokio_util::sync::CancellationToken;

use crate::config::DeadLetter;
use crate::outcome::Failure;
use crate::record::{
    IDEMPOTENCY_KEY_HEADER, NOT_BEFORE_HEADER, RETRY_HOP_HEADER, Record, SOURCE_TIMESTAMP_HEADER,
};
use crate::telemetry::Metrics;
use crate::transaction::Transactions;

/// A record to write.
#[derive(Debug, Clone)]
pub struct Outgoing {
    pub topic: String,
    pub key: Option<Bytes>,
    pub value: Option<Bytes>,
    pub headers: Headers,
}

/// The headers of a record ferry writes. Names are mostly ferry's own (`ferry.source.topic`),
/// borrowed rather than allocated for every record.
pub type Headers = Vec<(Cow<'static, str>, Bytes)>;

#[derive(Debug, thiserror::Error)]
pub enum ProduceError {
    /// The record can never be written as it is.
    #[error("the record is too large for the broker: {0}")]
    TooLarge(KafkaError),
    /// The broker did not take it; trying again may work.
    #[error("the broker did not acknowledge the record: {0}")]
    NotAcknowledged(KafkaError),
}

/// The idempotent, acks=all producer shared by every route.
/// ferry's settings of its producer over `kafka.properties` (in `config`): also what `ferry
/// validate` gives librdkafka to judge the properties together.
pub fn settings(config: &mut ClientConfig) {
    config
        .set("enable.idempotence", "true")
        .set("acks", "all")
        // Sent at once: replies are on the service's latency path. Under load the outbox
        // hands them over together, so they share requests all the same (see `Outbox`).
        // Uncompressed, as Kafka's producers are unless told otherwise: librdkafka makes an
        // lz4 context for every batch and zeroes 80 KiB for it, which a sidecar's batches (a
        // reply or a few) do not repay (1 % of ferry's CPU at full speed). `compression.type`
        // in `kafka.properties` turns it on.
        .set_if_unset("linger.ms", "0");
}

#[derive(Clone)]
pub struct Producer {
    inner: Arc<Kafka>,
    /// With `delivery: exactly_once`: outputs go into transactions instead of straight out.
    transactions: Option<Arc<Transactions>>,
}

impl Producer {
    /// Must be called on the async runtime, which serves the producer's acknowledgements.
    pub fn new(mut config: ClientConfig) -> Result<Producer, KafkaError> {
        settings(&mut config);
        Ok(Producer {
            inner: Kafka::start(&config)?,
            transactions: None,
        })
    }

    /// A transactional producer with `transactional_id`: every output waits for the
    /// transaction that also commits its record's offset.
    pub fn transactional(
        mut config: ClientConfig,
        transactional_id: &str,
        max_records: usize,
        metrics: Arc<Metrics>,
    ) -> Result<Producer, KafkaError> {
        config.set("transactional.id", transactional_id);
        let mut p = Producer::new(config)?;
        p.transactions = Some(Arc::new(Transactions::new(p.inner.clone(), max_records, metrics)));
        Ok(p)
    }

    /// The transactions, with `delivery: exactly_once`.
    pub fn transactions(&self) -> Option<&Arc<Transactions>> {
        self.transactions.as_ref()
    }

    /// Hands `out` to the producer; the returned [`Written`] resolves with the broker's answer.
    /// Records enqueued one after another reach each partition in that order (idempotent
    /// producer), so a lane need not wait for one acknowledgement before making its next reply.
    ///
    /// The record goes into the producer's outbox, which is handed to librdkafka once the
    /// runtime has run the other tasks ready now (see [`Outbox`]); an error librdkafka gives at
    /// once comes through the [`Written`] too.
    pub async fn enqueue(&self, out: &Outgoing) -> Result<Written, ProduceError> {
        let (ack, full) = self.inner.outbox.put(out);
        if full && !self.inner.hand_over() {
            // librdkafka's buffer is full: the hand-over task waits for room.
            self.inner.outbox.ready.notify_one();
        }
        Ok(Written(ack))
    }

    /// Waits until everything queued is acknowledged, or `timeout`.
    pub fn flush(&self, timeout: Duration) -> Result<(), KafkaError> {
        // What the outbox still holds first. librdkafka's buffer has room for it unless
        // `queue.buffering.max.messages` was set below what is in flight; then the hand-over
        // task keeps at it while librdkafka flushes.
        if !self.inner.hand_over() {
            self.inner.outbox.ready.notify_one();
        }
        self.inner.producer.flush(Timeout::After(timeout))
    }

    /// Set once librdkafka has failed the producer for good.
    pub fn failed(&self) -> Arc<Failed> {
        self.inner.failed.clone()
    }

    /// The topics the broker refuses ferry to write to; readiness follows them.
    pub fn refusals(&self) -> Arc<Refusals> {
        self.inner.producer.context().refusals.clone()
    }

    /// Metadata of every topic (never creates one, unlike a lookup by name).
    pub fn metadata(&self, timeout: Duration) -> Result<rdkafka::metadata::Metadata, KafkaError> {
        self.inner.producer.client().fetch_metadata(None, timeout)
    }
}

/// The broker's answer for one record: acknowledged, or why not.
pub type Ack = oneshot::Receiver<Result<(), KafkaError>>;

/// A record handed to the producer, its acknowledgement still to come.
#[derive(Debug)]
pub struct Written(Ack);

impl Future for Written {
    type Output = Result<(), ProduceError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Pin::new(&mut self.0).poll(cx).map(|answer| {
            // A dropped sender: the producer went away with the record unanswered.
            answer
                .unwrap_or(Err(KafkaError::Canceled))
                .map_err(ProduceError::from)
        })
    }
}

impl From<KafkaError> for ProduceError {
    fn from(e: KafkaError) -> Self {
        match e.rdkafka_error_code() {
            Some(RDKafkaErrorCode::MessageSizeTooLarge) => ProduceError::TooLarge(e),
            _ => ProduceError::NotAcknowledged(e),
        }
    }
}

/// librdkafka's producer, its acknowledgements served on the async runtime: the thread that
/// reads the broker's answer wakes the task waiting for it through [`serve_acks`], not through a
/// polling thread of its own (a thread wake-up per acknowledgement was a tenth of ferry's CPU
/// at 1 000 records/s); and only when the runtime is awake anyway (see [`crate::wake`]).
pub struct Kafka {
    /// Declared before `producer`, so the wake-up is switched off before the client goes.
    wake: MainQueue,
    pub(crate) producer: BaseProducer<Acks>,
    failed: Arc<Failed>,
    outbox: Outbox,
    /// Set while [`serve_acks`] waits with nothing in flight, on its long turn: the next
    /// hand-over tells it to wait on its short one.
    acks_idle: AtomicBool,
}

impl Kafka {
    fn start(config: &ClientConfig) -> Result<Arc<Kafka>, KafkaError> {
        let acks = Acks {
            ready: Arc::new(Notify::new()),
            refusals: Arc::default(),
            errors: Default::default(),
        };
        let ready = acks.ready.clone();
        let producer = BaseProducer::from_config_and_context(config, acks)?;
        let wake = MainQueue::wake_on_events(&producer);
        let kafka = Arc::new(Kafka {
            wake,
            producer,
            failed: Arc::default(),
            outbox: Outbox::default(),
            acks_idle: AtomicBool::new(true),
        });
        tokio::spawn(serve_acks(Arc::downgrade(&kafka), ready));
        tokio::spawn(hand_over(Arc::downgrade(&kafka), kafka.outbox.ready.clone()));
        Ok(kafka)
    }

    /// Queues `out`; the answer comes through the returned [`Ack`].
    pub fn send(&self, out: &Outgoing) -> Result<Ack, KafkaError> {
        let (tx, rx) = oneshot::channel();
        let mut record = BaseRecord::with_opaque_to(&out.topic, Box::new(tx)).headers(headers(out));
        if let Some(k) = &out.key {
            record = record.key(k.as_ref());
        }
        if let Some(v) = &out.value {
            record = record.payload(v.as_ref());
        }
        self.producer.send(record).map_err(|(e, _)| e)?;
        self.expect_acks();
        Ok(rx)
    }

    /// Hands up to `SERVE_TURN` events of acknowledgements to the tasks waiting for them.
    /// Returns whether more are ready: librdkafka notifies again only once the queue has been
    /// empty, so the caller must come back for them.
    fn serve(&self) -> bool {
        for _ in 0..SERVE_TURN {
            if self.wake.pending() == 0 {
                return false;
            }
            self.producer.poll(Duration::ZERO);
            // librdkafka queues a fatal error as an event like any other: looked at once it is
            // served (an atomic read while there is none).
            if let Some((code, why)) = self.producer.client().fatal_error() {
                self.failed.set(code, why);
            }
        }
        self.wake.pending() > 0
    }
}

/// Why the producer can write no more, once librdkafka has failed it for good: the idempotent
/// producer's fatal error, raised when it can no longer vouch for the order or the once-ness of
/// what it wrote (its sequence numbers out of step with the broker's, say). Every later write
/// fails at once and only a new producer can write again, so ferry stops, committing nothing past
/// what the broker acknowledged; its next start (the container's restart) takes those records
/// again.
#[derive(Default)]
pub struct Failed {
    why: OnceLock<String>,
    set: CancellationToken,
}

impl Failed {
    fn set(&self, code: RDKafkaErrorCode, why: String) {
        if self.why.set(format!("{code}: {why}")).is_ok() {
            tracing::error!(error = %why, code = ?code, "The Kafka producer failed for good; stopping, so that the next start writes with a new one");
            self.set.cancel();
        }
    }

    /// Why, once it failed.
    pub fn why(&self) -> Option<&str> {
        self.why.get().map(String::as_str)
    }

    /// Resolves once it failed.
    pub async fn wait(&self) {
        self.set.cancelled().await
    }
}

impl Drop for Kafka {
    fn drop(&mut self) {
        // Ends `hand_over`.
        self.outbox.ready.notify_one();
    }
}

/// Records waiting to be handed to librdkafka, in the order they were put in.
///
/// With `linger.ms: 0` librdkafka's broker thread sends what a partition holds as soon as it
/// wakes, and a record put into an empty partition wakes it: handed over one at a time as the
/// service's answers come in, replies left in a produce request each, and each request cost a
/// wake-up of that thread, a send and a read of its answer on both sides (on this machine ferry's
/// CPU per record at full speed doubled). Handed over together once the runtime has run the
/// tasks ready now, the replies made meanwhile share a request; when the runtime has nothing
/// else to do (a record alone, at a low rate) that is at once, so no reply waits for another.
#[derive(Default)]
struct Outbox {
    queue: Mutex<VecDeque<Queued>>,
    /// Held through a hand-over: two at once (a lane and the task, on two workers) would
    /// interleave their records, and a lane's must reach librdkafka in the order it made them.
    turn: Mutex<()>,
    /// Notified when the queue stops being empty.
    ready: Arc<Notify>,
}

/// Records in the outbox that make a request's worth: the lane that puts the last of them in
/// hands them over at once rather than leave them to wait for the other tasks ready now (under
/// load, the outbox held a reply 140 µs at the median and 0.6 to 1 ms at p99 without it, 40 µs
/// and 0.3 to 0.4 ms with it, for the same throughput within the noise).
const HAND_OVER_AT: usize = 16;

/// A record in the outbox, owned, in librdkafka's terms.
struct Queued {
    topic: String,
    key: Option<Bytes>,
    value: Option<Bytes>,
    headers: Option<OwnedHeaders>,
    ack: Box<oneshot::Sender<Result<(), KafkaError>>>,
}

impl Outbox {
    /// Puts `out` in; also says whether the outbox holds a request's worth.
    fn put(&self, out: &Outgoing) -> (Ack, bool) {
        let (tx, rx) = oneshot::channel();
        let queued = Queued {
            topic: out.topic.clone(),
            key: out.key.clone(),
            value: out.value.clone(),
            headers: Some(headers(out)),
            ack: Box::new(tx),
        };
        let len = {
            let mut queue = self.queue.lock().unwrap_or_else(|p| p.into_inner());
            queue.push_back(queued);
            queue.len()
        };
        if len == 1 {
            self.ready.notify_one();
        }
        (rx, len >= HAND_OVER_AT)
    }
}

/// Hands the outbox to librdkafka whenever it has records, after the tasks ready now, until the
/// producer is gone.
async fn hand_over(kafka: Weak<Kafka>, ready: Arc<Notify>) {
    loop {
        ready.notified().await;
        // tokio runs a yielding task again only after the other tasks ready now (up to its
        // event interval) or once it has none: the replies they make join this hand-over.
        tokio::task::yield_now().await;
        loop {
            let Some(kafka) = kafka.upgrade() else {
                return;
            };
            if kafka.hand_over() {
                break;
            }
            drop(kafka);
            // librdkafka's buffer is full: wait for room, as long as it takes (the records'
            // offsets are not committed meanwhile, and the partitions' bounds stop intake).
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

impl Kafka {
    /// Tells [`serve_acks`], if it waits on its long turn, that acknowledgements are to come.
    fn expect_acks(&self) {
        if self.acks_idle.swap(false, Ordering::SeqCst) {
            self.producer.context().ready.notify_one();
        }
    }

    /// Hands the outbox's records to librdkafka in order; `false` if its buffer is full, with
    /// the rest left in the outbox.
    fn hand_over(&self) -> bool {
        let _turn = self.outbox.turn.lock().unwrap_or_else(|p| p.into_inner());
        let batch = std::mem::take(&mut *self.outbox.queue.lock().unwrap_or_else(|p| p.into_inner()));
        let mut batch = batch.into_iter();
        while let Some(mut q) = batch.next() {
            let mut record = BaseRecord::with_opaque_to(&q.topic, q.ack);
            record.headers = q.headers.take();
            if let Some(k) = &q.key {
                record = record.key(k.as_ref());
            }
            if let Some(v) = &q.value {
                record = record.payload(v.as_ref());
            }
            match self.producer.send(record) {
                Ok(()) => self.expect_acks(),
                Err((e, record)) if e.rdkafka_error_code() == Some(RDKafkaErrorCode::QueueFull) => {
                    let (headers, ack) = (record.headers, record.delivery_opaque);
                    let mut queue = self.outbox.queue.lock().unwrap_or_else(|p| p.into_inner());
                    // Before what was put in meanwhile, in the order they came.
                    let mut rest: VecDeque<Queued> = std::iter::once(Queued { headers, ack, ..q })
                        .chain(batch)
                        .collect();
                    rest.append(&mut queue);
                    *queue = rest;
                    return false;
                }
                Err((e, record)) => {
                    let _ = record.delivery_opaque.send(Err(e));
                }
            }
        }
        true
    }
}

/// Serves `kafka`'s acknowledgements whenever librdkafka has some and the runtime is awake,
/// until the producer is gone.
async fn serve_acks(kafka: Weak<Kafka>, ready: Arc<Notify>) {
    // One timer, moved only when it has gone off or must go off sooner. A timer armed anew on
    // every turn (a `timeout` each) is a deadline sooner than the one the runtime last slept
    // towards, so tokio wakes its driver to say so: a write to its eventfd and an empty turn of
    // the runtime, per record at a low rate.
    let turn_ends = tokio::time::sleep(IDLE_TURN);
    tokio::pin!(turn_ends);
    loop {
        tokio::select! {
            () = ready.notified() => {}
            () = &mut turn_ends => {}
        }
        loop {
            let Some(kafka) = kafka.upgrade() else {
                return;
            };
            if !kafka.serve() {
                // Acknowledgements still to come may arrive while the runtime sleeps, and wait
                // for it to wake (see `crate::wake`): at most `ACK_WAIT`, should nothing else wake it.
                kafka.acks_idle.store(true, Ordering::SeqCst);
                let turn = if kafka.producer.in_flight_count() > 0 {
                    kafka.acks_idle.store(false, Ordering::SeqCst);
                    ACK_WAIT
                } else {
                    IDLE_TURN
                };
                let due = tokio::time::Instant::now() + turn;
                if turn_ends.is_elapsed() || turn_ends.deadline() > due {
                    turn_ends.as_mut().reset(due);
                }
                break;
            }
            drop(kafka);
            // A long burst must not hold this worker from the tasks it wakes.
            tokio::task::yield_now().await;
        }
    }
}

/// The longest an acknowledgement waits for the runtime to wake of itself: short beside the
/// commit interval and the drains, the things that wait for it (see `crate::wake`).
const ACK_WAIT: Duration = Duration::from_millis(10);

/// [`serve_acks`]'s turn with nothing in flight: it notices a dropped producer, and errors
/// queued before the wake-up was switched on.
const IDLE_TURN: Duration = Duration::from_millis(100);

/// Events (each a batch of acknowledgements) served per turn of [`serve_acks`].
const SERVE_TURN: usize = 64;

/// The producer's callbacks: each acknowledgement to its waiting task, logs to tracing.
pub struct Acks {
    /// Notified (on a librdkafka thread) when the main queue gets events.
    ready: Arc<Notify>,
    refusals: Arc<Refusals>,
    /// librdkafka's error events, logged without their storms of repeats.
    errors: crate::consume::ClientErrors,
}

impl ClientContext for Acks {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, message: &str) {
        crate::consume::log_rdkafka(level, fac, message);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        if let Some(held_back) = self.errors.admit(&error.to_string(), std::time::Instant::now()) {
            tracing::warn!(error = %error, reason, held_back, "Kafka producer error");
        }
    }
}

impl ProducerContext for Acks {
    type DeliveryOpaque = Box<oneshot::Sender<Result<(), KafkaError>>>;

    fn delivery(&self, result: &DeliveryResult<'_>, waiting: Self::DeliveryOpaque) {
        match result {
            Ok(m) => self.refusals.accepted(m.topic()),
            Err((e, m)) if is_refusal(e) => self.refusals.refused(m.topic(), e),
            Err(_) => {}
        }
        // A waiter that gave up (its partition was revoked) no longer needs the answer.
        let _ = waiting.send(result.as_ref().map(|_| ()).map_err(|(e, _)| e.clone()));
    }
}

/// The broker's answer when ferry's principal may not write to a topic (a Kafka ACL).
fn is_refusal(e: &KafkaError) -> bool {
    matches!(
        e.rdkafka_error_code(),
        Some(RDKafkaErrorCode::TopicAuthorizationFailed | RDKafkaErrorCode::ClusterAuthorizationFailed)
    )
}

/// The topics the broker refused ferry to write to, with its answer. Such a topic keeps ferry
/// unready (SPEC: a topic ferry may not write keeps it unready) until a write to it is
/// acknowledged: the records stay uncommitted and are written again with backoff meanwhile, so
/// granting the permission is all it takes. Only visible in the writes themselves: the metadata
/// ferry checks at start says whether a topic exists, not who may write to it.
#[derive(Default)]
pub struct Refusals {
    /// Whether any topic is refused: read on every acknowledgement, so the lock is taken only
    /// while something is wrong.
    any: AtomicBool,
    topics: Mutex<BTreeMap<String, String>>,
}

impl Refusals {
    fn topics(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, String>> {
        self.topics.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn refused(&self, topic: &str, error: &KafkaError) {
        let mut topics = self.topics();
        if topics.insert(topic.to_string(), error.to_string()).is_none() {
            tracing::error!(topic, error = %error, "The broker refuses ferry's writes to this topic; not ready until it takes one");
        }
        self.any.store(true, Ordering::Release);
    }

    fn accepted(&self, topic: &str) {
        if !self.any.load(Ordering::Acquire) {
            return;
        }
        let mut topics = self.topics();
        if topics.remove(topic).is_some() {
            tracing::info!(topic, "The broker takes ferry's writes to this topic again");
        }
        self.any.store(!topics.is_empty(), Ordering::Release);
    }

    /// Why ferry may not write, while the broker refuses a topic.
    pub fn problem(&self) -> Option<String> {
        if !self.any.load(Ordering::Acquire) {
            return None;
        }
        let topics = self.topics();
        if topics.is_empty() {
            return None;
        }
        let which: Vec<String> = topics
            .iter()
            .map(|(topic, e)| format!("ferry may not write to topic `{topic}` ({e})"))
            .collect();
        Some(format!(
            "{}: grant ferry's principal Write on it (a Kafka ACL); the records wait, uncommitted, and are written again",
            which.join("; ")
        ))
    }
}

/// The producer's main queue (acknowledgements and errors), set to notify [`Acks::ready`]
/// whenever it stops being empty.
struct MainQueue(*mut rdkafka_sys::rd_kafka_queue_t);

// SAFETY: librdkafka's queue handles may be used from any thread.
unsafe impl Send for MainQueue {}
unsafe impl Sync for MainQueue {}

impl MainQueue {
    fn wake_on_events(producer: &BaseProducer<Acks>) -> MainQueue {
        unsafe extern "C" fn on_event(_: *mut rdkafka_sys::rd_kafka_t, ready: *mut c_void) {
            // SAFETY: `ready` points into the producer's context, which outlives this
            // callback: it is switched off (`Drop`) before the client is destroyed.
            crate::wake::when_awake(unsafe { &*(ready as *const Arc<Notify>) })
        }
        let ready: *const Arc<Notify> = &producer.context().ready;
        // SAFETY: the client pointer is valid while `producer` lives; the handle is released
        // in `Drop`, before the producer (field order of `Kafka`).
        unsafe {
            let queue = rdkafka_sys::rd_kafka_queue_get_main(producer.client().native_ptr());
            rdkafka_sys::rd_kafka_queue_cb_event_enable(queue, Some(on_event), ready as *mut c_void);
            MainQueue(queue)
        }
    }

    /// Events waiting to be served.
    fn pending(&self) -> usize {
        // SAFETY: the handle is valid until `Drop`.
        unsafe { rdkafka_sys::rd_kafka_queue_length(self.0) }
    }
}

impl Drop for MainQueue {
    fn drop(&mut self) {
        // SAFETY: the handle came from `rd_kafka_queue_get_main` and is released once.
        unsafe {
            rdkafka_sys::rd_kafka_queue_cb_event_enable(self.0, None, std::ptr::null_mut());
            rdkafka_sys::rd_kafka_queue_destroy(self.0);
        }
    }
}

/// `out`'s headers in librdkafka's form.
pub fn headers(out: &Outgoing) -> OwnedHeaders {
    let mut headers = OwnedHeaders::new_with_capacity(out.headers.len());
    for (k, v) in &out.headers {
        headers = headers.insert(Header {
            key: k,
            value: Some(v.as_ref()),
        });
    }
    headers
}

/// Makes a dead letter the broker refused as too large smaller, keeping its reason: first
/// without the payload, then without the record's own headers and key; ferry's lineage stays.
/// `false` when nothing is left to take away.
pub fn shrink(out: &mut Outgoing) -> bool {
    if out.value.is_some() {
        out.value = None;
        out.headers
            .push(("ferry.error.payload_omitted".into(), "too_large".into()));
        true
    } else if out.headers.iter().any(|(k, _)| !k.starts_with("ferry.")) || out.key.is_some() {
        out.headers.retain(|(k, _)| k.starts_with("ferry."));
        out.key = None;
        true
    } else {
        false
    }
}

trait SetIfUnset {
    fn set_if_unset(&mut self, key: &str, value: &str) -> &mut Self;
}

impl SetIfUnset for ClientConfig {
    fn set_if_unset(&mut self, key: &str, value: &str) -> &mut Self {
        if self.get(key).is_none() {
            self.set(key, value);
        }
        self
    }
}

fn header(name: &'static str, value: impl std::fmt::Display) -> (Cow<'static, str>, Bytes) {
    // `Bytes::from(value.to_string())` allocated twice (the string, then the shared buffer a
    // string with spare capacity becomes), and every record ferry writes carries several.
    let value = crate::record::formatted(format_args!("{value}"), |v| Bytes::copy_from_slice(v.as_bytes()));
    (Cow::Borrowed(name), value)
}

/// How many headers [`reply`] adds to the service's: the source's topic, partition and offset,
/// and its trace context.
pub const LINEAGE_HEADERS: usize = 4;

/// The lineage every record ferry writes carries: where the record was first consumed (for a
/// record from a retry topic, where it was before its first retry).
fn source_headers(record: &Record, out: &mut Headers) {
    let names = [
        "ferry.source.topic",
        "ferry.source.partition",
        "ferry.source.offset",
    ];
    if record.retry_hop() > 0 && names.iter().all(|n| record.header(n).is_some()) {
        for n in names {
            if let Some(v) = record.header(n) {
                out.push((Cow::Borrowed(n), v.clone()));
            }
        }
        return;
    }
    // Made without `fmt`: every reply carries them, and formatting them through it was 2 % of
    // ferry's instructions per record.
    let number = |n: i64| Bytes::copy_from_slice(itoa::Buffer::new().format(n).as_bytes());
    let [topic, partition, offset] = names.map(Cow::Borrowed);
    out.push((topic, Bytes::copy_from_slice(record.topic.as_bytes())));
    out.push((partition, number(record.partition.into())));
    out.push((offset, number(record.offset)));
}

/// A reply record: the service's body and headers, the input key unless the service chose one.
pub fn reply(
    record: &Record,
    topic: String,
    key: Option<Bytes>,
    mut headers: Headers,
    value: Bytes,
) -> Outgoing {
    source_headers(record, &mut headers);
    if let Some(tp) = record.header("traceparent") {
        headers.push((Cow::Borrowed("traceparent"), tp.clone()));
    }
    Outgoing {
        topic,
        key: key.or_else(|| record.key.clone()),
        value: Some(value),
        headers,
    }
}

/// Headers ferry writes on a dead letter; an input's own copies (a re-driven record) are
/// replaced, not stacked. The idempotency key is rewritten with the same value.
fn is_lineage(name: &str) -> bool {
    name.starts_with("ferry.error.")
        || name.starts_with("ferry.source.")
        || name.starts_with("ferry.retry.")
        || matches!(
            name,
            IDEMPOTENCY_KEY_HEADER
                | "ferry.attempts"
                | "ferry.first_attempt_at"
                | "ferry.last_attempt_at"
                | "ferry.route"
        )
}

/// A record moved to retry topic `topic` (its `hop`-th), to be tried again at `not_before_ms`:
/// the input with its lineage, attempt count and idempotency key carried over.
pub fn deferred(
    record: &Record,
    route: &str,
    topic: &str,
    attempts: Attempts,
    hop: usize,
    not_before_ms: i64,
) -> Outgoing {
    let mut headers: Headers = record
        .headers
        .iter()
        .filter(|(k, _)| !is_lineage(k))
        .map(|(k, v)| (Cow::Owned(k.clone()), v.clone()))
        .collect();
    source_headers(record, &mut headers);
    if let Some(ts) = record.origin_timestamp_ms() {
        headers.push(header(SOURCE_TIMESTAMP_HEADER, ts));
    }
    headers.push(header(IDEMPOTENCY_KEY_HEADER, record.idempotency_key()));
    headers.push(header("ferry.attempts", attempts.count));
    if let Some(t) = attempts.first_at_ms {
        headers.push(header("ferry.first_attempt_at", t));
    }
    if let Some(t) = attempts.last_at_ms {
        headers.push(header("ferry.last_attempt_at", t));
    }
    headers.push(header("ferry.route", route));
    headers.push(header(RETRY_HOP_HEADER, hop));
    headers.push(header(NOT_BEFORE_HEADER, not_before_ms));
    Outgoing {
        topic: topic.to_string(),
        key: record.key.clone(),
        value: record.value.clone(),
        headers,
    }
}

/// When the attempts of a record were made, for the dead letter's lineage.
#[derive(Debug, Clone, Copy, Default)]
pub struct Attempts {
    pub count: u32,
    /// Milliseconds since the epoch.
    pub first_at_ms: Option<i64>,
    pub last_at_ms: Option<i64>,
}

/// A dead-letter record: the input (minus redacted headers and, if asked, the payload) and why.
pub fn dead_letter(
    record: &Record,
    route: &str,
    config: &DeadLetter,
    failure: &Failure,
    attempts: Attempts,
) -> Outgoing {
    let redacted = |name: &str| config.redact_headers.iter().any(|r| r.eq_ignore_ascii_case(name));
    let mut headers: Headers = record
        .headers
        .iter()
        .filter(|(k, _)| !redacted(k) && !is_lineage(k))
        .map(|(k, v)| (Cow::Owned(k.clone()), v.clone()))
        .collect();
    headers.push(header("ferry.error.reason", failure.reason));
    if let Some(s) = &failure.status {
        headers.push(header("ferry.error.status", s));
    }
    if config.include_payload && !failure.message.is_empty() {
        // Capped here, where every dead letter is written, whoever made the message (a schema
        // check quotes the offending values, which can be any size).
        let message = crate::outcome::truncate(failure.message.clone(), crate::outcome::MAX_MESSAGE);
        headers.push(header("ferry.error.message", message));
    }
    source_headers(record, &mut headers);
    if let Some(ts) = record.origin_timestamp_ms() {
        headers.push(header(SOURCE_TIMESTAMP_HEADER, ts));
    }
    headers.push(header("ferry.attempts", attempts.count));
    headers.push(header(IDEMPOTENCY_KEY_HEADER, record.idempotency_key()));
    if let Some(t) = attempts.first_at_ms {
        headers.push(header("ferry.first_attempt_at", t));
    }
    if let Some(t) = attempts.last_at_ms {
        headers.push(header("ferry.last_attempt_at", t));
    }
    headers.push(header("ferry.route", route));
    Outgoing {
        topic: config.to.clone(),
        key: record.key.clone(),
        value: if config.include_payload {
            record.value.clone()
        } else {
            None
        },
        headers,
    }
}

#[cfg(test)]
mod tests {
    use std::ffi::{CStr, CString, c_char};

    use rdkafka::client::Client;

    use super::*;

    /// A property as the running librdkafka client holds it.
    fn property(client: &Client<Acks>, name: &str) -> String {
        let name = CString::new(name).expect("a property name");
        let mut value = [0 as c_char; 64];
        let mut size = value.len();
        // SAFETY: the client is alive for the call, `rd_kafka_conf` returns its own
        // configuration (read only here), and `value` holds `size` bytes.
        let rc = unsafe {
            let conf = rdkafka_sys::rd_kafka_conf(client.native_ptr());
            rdkafka_sys::rd_kafka_conf_get(conf, name.as_ptr(), value.as_mut_ptr(), &mut size)
        };
        assert_eq!(rc, rdkafka_sys::rd_kafka_conf_res_t::RD_KAFKA_CONF_OK, "{name:?}");
        // SAFETY: librdkafka wrote a NUL-terminated string into `value`.
        unsafe { CStr::from_ptr(value.as_ptr()) }
            .to_string_lossy()
            .into_owned()
    }

    /// Nothing connects: the client is only made, and its configuration read back.
    fn config(extra: &[(&str, &str)]) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", "127.0.0.1:9");
        for (k, v) in extra {
            c.set(*k, *v);
        }
        c
    }

    #[tokio::test]
    async fn writes_are_uncompressed_unless_kafka_properties_say() {
        let plain = Producer::new(config(&[])).unwrap();
        assert_eq!(
            property(plain.inner.producer.client(), "compression.type"),
            "none"
        );
        let lz4 = Producer::new(config(&[("compression.type", "lz4")])).unwrap();
        assert_eq!(property(lz4.inner.producer.client(), "compression.type"), "lz4");
        // What the guarantees rest on is set whatever the properties say.
        assert_eq!(
            property(plain.inner.producer.client(), "enable.idempotence"),
            "true"
        );
    }
}
