//! Exactly once into Kafka (`delivery: exactly_once`, SPEC §1): the outputs of final records and
//! the offsets they make committable are written in one Kafka transaction per batch.
//!
//! Fed by the route handlers, which hand each final record's output here ([`Transactions::hold`])
//! instead of sending it, and by the committer in `consume`, which calls
//! [`Transactions::commit`] with the offsets the tracker says are final. It feeds Kafka: one
//! transaction with those outputs and `send_offsets_to_transaction`, so a `read_committed`
//! reader sees an output exactly when its input's offset is committed.
//!
//! A transaction carries only the outputs of records *below* the offsets it commits. A record
//! that finished above a gap in its partition (a slower record of another key before it) waits
//! for a later transaction: after a crash the partition resumes at the committed offset and
//! that record is handled again, so its output must not be in Kafka yet.
//!
//! Fencing: the producer's `transactional.id` is stable for a pod (`ferry-{group}-{hostname}`
//! by default), so a restarted sidecar's `init_transactions` fences its predecessor and aborts
//! the transaction it left open; a sidecar whose partitions moved to another pod is fenced by
//! the group generation that `send_offsets_to_transaction` carries (KIP-447).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use rdkafka::consumer::ConsumerGroupMetadata;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::Producer as _;
use rdkafka::{Offset, TopicPartitionList};

use crate::offsets::{Lease, Tp};
use crate::produce::{self, Kafka, Outgoing};
use crate::telemetry::Metrics;

/// How long one commit may keep trying before it gives the batch back to the next one.
const COMMIT_DEADLINE: Duration = Duration::from_secs(30);

/// The timeout of each transactional request to the broker.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// The transactional side of the producer.
pub struct Transactions {
    kafka: Arc<Kafka>,
    /// Outputs of final records not yet in a committed transaction, in the order they ended
    /// (which keeps each key's replies in order).
    held: Mutex<Vec<Held>>,
    /// A commit is due once this many outputs are held.
    max_records: usize,
    /// Set once the producer is fenced: nothing more can be written.
    fatal: Mutex<Option<String>>,
    metrics: Arc<Metrics>,
}

/// One final record's output, waiting for its transaction.
struct Held {
    lease: Lease,
    offset: i64,
    out: Outgoing,
    /// Written instead of `out` if the broker refuses `out` as too large: for a reply or a
    /// deferred record, the record's `too_large` dead letter.
    instead: Option<Outgoing>,
}

#[derive(Debug, thiserror::Error)]
pub enum TransactionError {
    /// The transaction did not commit; its outputs stay held and the next commit repeats them.
    #[error("the transaction did not commit: {0}")]
    Retry(String),
    /// The producer can write no more: a newer instance took over.
    #[error(
        "this instance was fenced: {0} (a newer ferry with the same transactional.id started, or the group moved its partitions to another member); stopping so it cannot write duplicates"
    )]
    Fenced(String),
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Transactions {
    pub fn new(kafka: Arc<Kafka>, max_records: usize, metrics: Arc<Metrics>) -> Transactions {
        Transactions {
            kafka,
            held: Mutex::new(Vec::new()),
            max_records: max_records.max(1),
            fatal: Mutex::new(None),
            metrics,
        }
    }

    /// Registers the producer with its transaction coordinator. On a real broker this fences
    /// an earlier producer with the same `transactional.id` and aborts what it left open.
    /// Blocking.
    pub fn init(&self, timeout: Duration) -> Result<(), KafkaError> {
        self.kafka.producer.init_transactions(timeout)
    }

    /// Takes a final record's output for the next transaction that commits its offset.
    pub fn hold(&self, lease: &Lease, offset: i64, out: Outgoing, instead: Option<Outgoing>) {
        lock(&self.held).push(Held {
            lease: lease.clone(),
            offset,
            out,
            instead,
        });
    }

    /// Whether enough outputs are held that the next commit should not wait for its interval.
    pub fn due(&self) -> bool {
        lock(&self.held).len() >= self.max_records
    }

    /// Why this producer can write no more, once it was fenced.
    pub fn fenced(&self) -> Option<String> {
        lock(&self.fatal).clone()
    }

    /// Writes, in one transaction, the held outputs of records below `offsets` and the offsets
    /// themselves. Held outputs of partitions `owns` no longer covers are forgotten (their next
    /// owner repeats the records). Blocking; the caller keeps other commits out meanwhile.
    pub fn commit(
        &self,
        offsets: &[(Tp, i64)],
        group: &ConsumerGroupMetadata,
        owns: impl Fn(&Lease) -> bool,
    ) -> Result<usize, TransactionError> {
        if let Some(why) = self.fenced() {
            return Err(TransactionError::Fenced(why));
        }
        let below: HashMap<&Tp, i64> = offsets.iter().map(|(tp, o)| (tp, *o)).collect();
        let selected = |h: &Held| below.get(&h.lease.tp).is_some_and(|&o| h.offset < o);
        let mut batch: Vec<(Outgoing, Option<Outgoing>)> = lock(&self.held)
            .iter()
            .filter(|h| selected(h))
            .map(|h| (h.out.clone(), h.instead.clone()))
            .collect();
        if batch.is_empty() && offsets.is_empty() {
            return Ok(0);
        }
        let mut tpl = TopicPartitionList::new();
        for ((t, p), o) in offsets {
            let _ = tpl.add_partition_offset(t, *p, Offset::Offset(*o));
        }
        let deadline = Instant::now() + COMMIT_DEADLINE;
        let mut backoff = Duration::from_millis(100);
        loop {
            match self.try_commit(&mut batch, &tpl, group) {
                Ok(()) => {
                    self.metrics.transaction("committed");
                    lock(&self.held).retain(|h| !selected(h) && owns(&h.lease));
                    return Ok(batch.len());
                }
                Err(Failed::Fatal(e)) => {
                    self.metrics.transaction("fenced");
                    let why = e.to_string();
                    tracing::error!(error = %why, "The transactional producer was fenced; stopping");
                    *lock(&self.fatal) = Some(why.clone());
                    return Err(TransactionError::Fenced(why));
                }
                Err(Failed::Aborted(e)) => {
                    self.metrics.transaction("aborted");
                    tracing::warn!(error = %e, outputs = batch.len(), "Transaction aborted; writing it again");
                    if Instant::now() + backoff >= deadline {
                        return Err(TransactionError::Retry(e.to_string()));
                    }
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
    }

    /// One transaction: begin, write every output, add the offsets, commit. Any failure
    /// aborts it, so nothing of it becomes visible.
    ///
    /// `commit_transaction` waits for every output's acknowledgement and fails if one failed,
    /// so deliveries are only looked at after a failure, to find outputs refused as too large.
    fn try_commit(
        &self,
        batch: &mut [(Outgoing, Option<Outgoing>)],
        offsets: &TopicPartitionList,
        group: &ConsumerGroupMetadata,
    ) -> Result<(), Failed> {
        if let Err(e) = self.kafka.producer.begin_transaction() {
            // An abort that timed out earlier must be finished before anything else.
            let failed = self.failed(e);
            if matches!(failed, Failed::Aborted(_)) {
                self.abort()?;
            }
            return Err(failed);
        }
        let mut deliveries = Vec::with_capacity(batch.len());
        let mut trouble = None;
        let mut too_large = Vec::new();
        for (i, (out, _)) in batch.iter().enumerate() {
            match self.kafka.send(out) {
                Ok(ack) => deliveries.push((i, ack)),
                Err(e) => {
                    tracing::debug!(error = %e, "An output was refused before it was sent");
                    if is_too_large(&e) {
                        too_large.push(i);
                    }
                    trouble = Some(e);
                    break;
                }
            }
        }
        let committed = match trouble {
            Some(e) => Err(e),
            None => self
                .kafka
                .producer
                .send_offsets_to_transaction(offsets, group, REQUEST_TIMEOUT)
                .and_then(|()| self.kafka.producer.commit_transaction(COMMIT_DEADLINE)),
        };
        let Err(e) = committed else {
            return Ok(());
        };
        let failed = self.failed(e);
        if let Failed::Fatal(_) = failed {
            return Err(failed);
        }
        self.abort()?;
        // Aborted: every output is acknowledged, failed, or purged by now.
        for (i, ack) in deliveries {
            if let Ok(Err(e)) = futures::executor::block_on(ack) {
                if is_too_large(&e) {
                    too_large.push(i);
                }
            }
        }
        for i in too_large {
            let (out, instead) = &mut batch[i];
            match instead.take() {
                Some(dead_letter) => {
                    tracing::warn!(topic = %out.topic, "Output too large for the broker; dead-lettering its record instead");
                    *out = dead_letter;
                }
                None => {
                    if !produce::shrink(out) {
                        tracing::error!(topic = %out.topic, "Dead letter too large even without payload, headers and key; will retry");
                    }
                }
            }
        }
        Err(failed)
    }

    /// Aborts the open transaction, calling again while librdkafka says the abort is still
    /// under way.
    fn abort(&self) -> Result<(), Failed> {
        let deadline = Instant::now() + COMMIT_DEADLINE;
        loop {
            match self.kafka.producer.abort_transaction(REQUEST_TIMEOUT) {
                Ok(()) => return Ok(()),
                Err(e) => {
                    let retriable = matches!(&e, KafkaError::Transaction(t) if t.is_retriable());
                    match self.failed(e) {
                        Failed::Fatal(e) => return Err(Failed::Fatal(e)),
                        Failed::Aborted(e) if !retriable || Instant::now() >= deadline => {
                            return Err(Failed::Aborted(e));
                        }
                        Failed::Aborted(e) => {
                            tracing::warn!(error = %e, "The abort is not finished yet; waiting for it");
                            std::thread::sleep(Duration::from_millis(100));
                        }
                    }
                }
            }
        }
    }

    fn failed(&self, e: KafkaError) -> Failed {
        let fenced = matches!(
            e.rdkafka_error_code(),
            Some(
                RDKafkaErrorCode::ProducerFenced
                    | RDKafkaErrorCode::InvalidProducerEpoch
                    | RDKafkaErrorCode::Fenced
                    | RDKafkaErrorCode::FencedInstanceId
                    | RDKafkaErrorCode::TransactionalIdAuthorizationFailed
            )
        );
        let fatal = match &e {
            KafkaError::Transaction(t) => t.is_fatal(),
            _ => false,
        };
        if fenced || fatal {
            Failed::Fatal(e)
        } else {
            Failed::Aborted(e)
        }
    }
}

enum Failed {
    /// Aborted (or never begun): try again.
    Aborted(KafkaError),
    /// The producer is unusable.
    Fatal(KafkaError),
}

fn is_too_large(e: &KafkaError) -> bool {
    e.rdkafka_error_code() == Some(RDKafkaErrorCode::MessageSizeTooLarge)
}

/// The `transactional.id` when none is configured: the group and the pod's host name, which
/// survives a restart of the container but not a new pod.
pub fn default_id(group_id: &str) -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .ok()
                .map(|h| h.trim().to_string())
        })
        .unwrap_or_else(|| "ferry".into());
    format!("ferry-{group_id}-{host}")
}
