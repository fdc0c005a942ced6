//! One record's way through its route: call, decide, retry in place, publish, finish.
//!
//! Fed by a dispatch lane with records in lane order; feeds the producer with reply and
//! dead-letter records and the offset tracker with each record's end. A record ends in exactly
//! one outcome, or is abandoned when its partition's drain (revoke or stop) ends before it is
//! final.
//!
//! Handling comes in two halves, so that a lane can call its next record while the broker
//! acknowledges the previous one's output: [`RouteHandler::start`] runs until the output is
//! handed to the producer, and [`RouteHandler::settle`] takes the broker's answer from there.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::call::{Attempt, CallError, Status, Transport};
use crate::circuit::{Breaker, Verdict};
use crate::config::Route;
use crate::contract;
use crate::offsets::Tracker;
use crate::outcome::{self, Decision, Failure, Outcome, Policy, Reason};
use crate::produce::{self, Attempts, Outgoing, ProduceError, Producer, Written};
use crate::record::Record;
use crate::retry::{self, Next};
use crate::telemetry::RouteMetrics;
use crate::telemetry::trace::{RecordTrace, Step, Tracing};

/// Everything one route needs to handle a record.
pub struct RouteHandler {
    pub config: Route,
    pub call: Transport,
    pub producer: Producer,
    pub tracker: Arc<Tracker>,
    pub metrics: Arc<RouteMetrics>,
    /// Shared by every route and the committer, which ends the traces of committed records.
    pub tracing: Arc<Tracing>,
    /// `concurrency.rate`: spaces calls towards the service.
    pub pace: Pace,
    /// Opens when most calls fail for a retryable reason.
    pub circuit: Arc<Breaker>,
}

/// Spaces calls evenly at a fixed rate (no bursts): each call takes the next free slot.
pub struct Pace {
    interval: Option<Duration>,
    next: std::sync::Mutex<Instant>,
}

impl Pace {
    /// `rate` calls per second; 0 means unlimited.
    pub fn new(rate: f64) -> Pace {
        Pace {
            interval: (rate > 0.0).then(|| Duration::from_secs_f64(1.0 / rate)),
            next: std::sync::Mutex::new(Instant::now()),
        }
    }

    /// Waits for this call's slot.
    pub async fn wait(&self) {
        let Some(interval) = self.interval else { return };
        let slot = {
            let mut next = self.next.lock().unwrap_or_else(|p| p.into_inner());
            let slot = (*next).max(Instant::now());
            *next = slot + interval;
            slot
        };
        tokio::time::sleep_until(slot.into()).await;
    }
}

impl RouteHandler {
    /// Handles `record` until its outcome is decided and its output (reply, dead letter or
    /// retry-topic record) is with the producer. `Some`: the broker's acknowledgement is still to
    /// come, and [`settle`](Self::settle) takes the record on from there; meanwhile its lane may
    /// call its next record. `None`: the record has ended (final, or abandoned). Never fails:
    /// every problem becomes an outcome, a retry, or (when the partition goes away) an abandoned
    /// record that the next owner repeats.
    pub async fn start(&self, record: Record) -> Option<Pending> {
        let trace = self.tracing.record(&record, &self.config.name);
        match self.run(&record, &trace).await {
            End::Writing(write) => Some(Pending { record, trace, write }),
            End::Final(outcome, reason) => {
                self.conclude(record, trace, outcome, reason);
                None
            }
            End::Abandoned => {
                self.abandon(&record);
                trace.abandon();
                None
            }
        }
    }

    /// A pending record's write is acknowledged: its outcome is final.
    pub fn acknowledged(&self, pending: Pending) {
        let Pending { record, trace, write } = pending;
        write.step.end("ok", false);
        let (outcome, reason) = write.what.outcome();
        self.conclude(record, trace, outcome, reason);
    }

    /// Takes a pending record to its end with the broker's answer to its write: final when
    /// acknowledged; otherwise written again (or, too large, dead-lettered instead) until the
    /// broker acknowledges or the partition goes away.
    pub async fn settle(&self, pending: Pending, acked: Result<(), ProduceError>) {
        if acked.is_ok() {
            return self.acknowledged(pending);
        }
        let Pending { record, trace, write } = pending;
        let mut backoff = Duration::from_millis(500);
        let flow = self
            .written(&record, &write.out, write.step, acked, &mut backoff)
            .await;
        self.carry_on(record, trace, write.out, write.what, flow).await;
    }

    /// Writes a pending record's output again, once the broker has answered its first write,
    /// because an earlier write of its lane failed and was written again after it: the last copy
    /// of each output then follows lane order (see `dispatch`).
    pub async fn rewrite(&self, pending: Pending, acked: Result<(), ProduceError>) {
        let Pending { record, trace, write } = pending;
        let flow = match acked {
            // Never written: nothing to put back in order.
            Err(e @ ProduceError::TooLarge(_)) => {
                let mut backoff = Duration::from_millis(500);
                self.written(&record, &write.out, write.step, Err(e), &mut backoff)
                    .await
            }
            _ if record.lease.is_cancelled() => {
                write.step.end("abandoned", false);
                Flow::GaveUp
            }
            Ok(()) => {
                write.step.end("ok", false);
                Flow::Again
            }
            Err(_) => {
                write.step.end("error", true);
                self.metrics.produce_error();
                Flow::Again
            }
        };
        self.carry_on(record, trace, write.out, write.what, flow).await;
    }

    /// Goes on from the broker's answer to a write until the record ends.
    async fn carry_on(
        &self,
        record: Record,
        trace: RecordTrace,
        mut out: Outgoing,
        mut what: Output,
        mut flow: Flow,
    ) {
        loop {
            let published = match flow {
                Flow::Done => Ok(Published::Done),
                Flow::GaveUp => Ok(Published::GaveUp),
                Flow::Refused(e) => Err(e),
                Flow::Again => {
                    self.publish(&record, &trace, &mut out, |_| None, Acknowledge::Now)
                        .await
                }
            };
            let end = match what {
                Output::DeadLetter(failure, attempts) => {
                    self.dead_lettered(&record, &trace, out, failure, attempts, published)
                        .await
                }
                what => self.handed(&record, &trace, out, what, published).await,
            };
            match end {
                End::Final(outcome, reason) => return self.conclude(record, trace, outcome, reason),
                End::Abandoned => {
                    self.abandon(&record);
                    return trace.abandon();
                }
                // Only a write that leaves its acknowledgement for later comes back here, and
                // none of the writes above does; wait for it all the same.
                End::Writing(write) => {
                    let mut backoff = Duration::from_millis(500);
                    let acked = write.written.await;
                    flow = self
                        .written(&record, &write.out, write.step, acked, &mut backoff)
                        .await;
                    (out, what) = (write.out, write.what);
                }
            }
        }
    }

    /// Marks a record final and ends its trace.
    fn conclude(&self, record: Record, trace: RecordTrace, outcome: Outcome, reason: Option<Reason>) {
        if self.finish(&record, outcome, reason) {
            let tp = &record.lease.tp;
            self.tracing.finished(trace, tp, record.offset, outcome, reason);
        } else {
            trace.abandon();
        }
    }

    async fn run(&self, record: &Record, trace: &RecordTrace) -> End {
        if record.lease.is_cancelled() {
            return End::Abandoned;
        }
        if self.too_old(record) {
            return End::Final(Outcome::Expired, None);
        }
        if let Some(schema) = self
            .config
            .validate
            .as_ref()
            .and_then(|v| v.schema.compiled.as_ref())
        {
            if let Err(message) = contract::check(schema, record.value.as_deref(), "the record's value") {
                let f = Failure {
                    reason: Reason::Schema,
                    status: None,
                    message,
                    retry_after: None,
                };
                // It never reaches the service: no attempt was made.
                return self
                    .dead_letter(record, trace, f, Attempts::default(), Acknowledge::Later)
                    .await;
            }
        }
        let policy = Policy {
            rules: &self.config.rules,
            reply: &self.config.reply,
        };
        // A record from a retry topic waits for its time, and goes on counting its attempts.
        if let Some(not_before) = record.not_before_ms() {
            let wait = Duration::from_millis(not_before.saturating_sub(epoch_ms()).max(0) as u64);
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                // Its time may be minutes away: not worth holding a handover for.
                _ = record.lease.draining.cancelled() => return End::Abandoned,
            }
        }
        let mut attempts = Attempts::default();
        // Attempts that count towards max_attempts: not those the service's outage failed.
        let mut counted = 0;
        // Since the first attempt, on whichever topic it was.
        let mut first = Instant::now();
        if let Some((count, first_at)) = record.earlier_attempts() {
            attempts.count = count;
            attempts.first_at_ms = Some(first_at);
            counted = count;
            let since = Duration::from_millis(epoch_ms().saturating_sub(first_at).max(0) as u64);
            first = Instant::now().checked_sub(since).unwrap_or(first);
        }
        let mut outage = Duration::ZERO;
        loop {
            let waiting = Instant::now();
            let admission = tokio::select! {
                // A closed circuit admits at once, draining or not.
                biased;
                a = self.circuit.admit() => a,
                // An open one may stay open past the drain: the next owner calls instead.
                _ = record.lease.draining.cancelled() => return End::Abandoned,
            };
            // Time the service was known to be down is not the record's age.
            outage += waiting.elapsed();
            let before = attempts;
            attempts.count += 1;
            let now = epoch_ms();
            attempts.first_at_ms.get_or_insert(now);
            attempts.last_at_ms = Some(now);
            tokio::select! {
                _ = self.pace.wait() => {}
                _ = record.lease.cancel.cancelled() => return End::Abandoned,
            }
            let step = trace.call(&self.config.name, attempts.count);
            let attempt = Attempt {
                number: attempts.count,
                trace: step.headers().cloned(),
            };
            let started = Instant::now();
            let result = self.call.call(record, &attempt).await;
            // Not when the record cannot be made into a request (its value does not fit the
            // gRPC method's message, its key makes no valid URL): as with a record refused by
            // its schema, the service was never called; it is not an attempt, says nothing to
            // the circuit, and is never retried.
            let called = !matches!(&result, Err(CallError::Encode(_)));
            if !called {
                attempts = before;
            }
            self.metrics.call(&result, started.elapsed());
            let decision = outcome::decide(&result, &policy);
            let retryable = matches!(&decision, Decision::Retry(f) if f.reason != Reason::ServiceSaid);
            step.end(
                crate::telemetry::metrics::call_result(&result),
                !matches!(decision, Decision::Reply { .. } | Decision::Done | Decision::Drop),
            );
            let verdict = match &result {
                Err(CallError::Unreachable(_)) if retryable => Verdict::Unreachable,
                _ if retryable => Verdict::Failed,
                _ => Verdict::Fine,
            };
            // Whether the attempt is the record's: not when the outage that opened the circuit
            // failed it (see `Breaker::record`). A connection that broke mid-call reached the
            // service, which may have crashed on this very record: that counts, probe or not,
            // so that a record that crashes the service each time it is called is
            // dead-lettered after its attempts rather than called for ever while the service
            // restarts between the probes.
            let counts = if called {
                self.circuit.record(admission, verdict)
            } else {
                self.circuit.not_called(admission);
                false
            };
            if counts || matches!(&result, Err(CallError::Connect(_))) {
                counted += 1;
            }
            let failure = match decision {
                Decision::Reply {
                    topic,
                    key,
                    headers,
                    value,
                } => {
                    // The service answered, well: its status goes on a dead letter that takes
                    // the reply's place.
                    let status = result.as_ref().ok().map(|a| a.status);
                    if let Some(schema) = self
                        .config
                        .reply
                        .schema
                        .as_ref()
                        .and_then(|s| s.compiled.as_ref())
                    {
                        if let Err(message) = contract::check(schema, Some(&value), "the service's reply") {
                            let f = Failure {
                                reason: Reason::ReplySchema,
                                status: status.map(Status::name),
                                message,
                                retry_after: None,
                            };
                            return self
                                .dead_letter(record, trace, f, attempts, Acknowledge::Later)
                                .await;
                        }
                    }
                    let out = produce::reply(record, topic, key, headers, value);
                    return self
                        .publish_reply(record, trace, out, attempts, status, Acknowledge::Later)
                        .await;
                }
                Decision::Done => return End::Final(Outcome::Done, None),
                Decision::Drop => return End::Final(Outcome::Dropped, None),
                Decision::DeadLetter(f) => {
                    return self
                        .dead_letter(record, trace, f, attempts, Acknowledge::Later)
                        .await;
                }
                Decision::Retry(f) => f,
            };
            let delay = match retry::next(
                &self.config.retry,
                counted,
                first.elapsed().saturating_sub(outage),
                failure.retry_after,
                rand::random(),
            ) {
                Next::After(d) if !self.config.retry.topics.is_empty() => {
                    return self
                        .defer(record, trace, failure, attempts, d, Acknowledge::Later)
                        .await;
                }
                Next::After(d) => d,
                Next::Exhausted => {
                    return self
                        .dead_letter(record, trace, failure, attempts, Acknowledge::Later)
                        .await;
                }
                Next::TooOld => {
                    let f = Failure {
                        reason: Reason::TooOld,
                        message: outcome::truncate(
                            format!(
                                "gave up after {} attempts: the next one would start more than {} after the first; last error: {}",
                                attempts.count, self.config.retry.max_record_age, failure.message
                            ),
                            outcome::MAX_MESSAGE,
                        ),
                        ..failure
                    };
                    return self
                        .dead_letter(record, trace, f, attempts, Acknowledge::Later)
                        .await;
                }
            };
            tracing::debug!(
                route = %self.config.name, record.topic = %record.topic, record.partition = record.partition,
                record.offset = record.offset, attempt = attempts.count, reason = %failure.reason,
                delay_ms = delay.as_millis() as u64, "Retrying record"
            );
            self.metrics.retry(failure.reason);
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                // The partition is going away: the next owner retries it.
                _ = record.lease.cancel.cancelled() => return End::Abandoned,
            }
        }
    }

    /// Moves a failed record to the next retry topic, to be tried again after `delay` without
    /// holding up its partition; after the last retry topic it is dead-lettered.
    async fn defer(
        &self,
        record: &Record,
        trace: &RecordTrace,
        failure: Failure,
        attempts: Attempts,
        delay: Duration,
        ack: Acknowledge,
    ) -> End {
        let hop = record.retry_hop();
        let Some(topic) = self.config.retry.topics.get(hop) else {
            let f = Failure {
                message: format!(
                    "{} (after the last retry topic, {})",
                    failure.message,
                    self.config.retry.topics.last().map_or("", String::as_str)
                ),
                ..failure
            };
            return self.dead_letter(record, trace, f, attempts, ack).await;
        };
        let not_before = epoch_ms() + delay.as_millis() as i64;
        tracing::debug!(
            route = %self.config.name, record.topic = %record.topic, record.partition = record.partition,
            record.offset = record.offset, reason = %failure.reason, retry_topic = %topic,
            delay_ms = delay.as_millis() as u64, "Deferring record to a retry topic"
        );
        self.metrics.retry(failure.reason);
        let mut out = produce::deferred(record, &self.config.name, topic, attempts, hop + 1, not_before);
        let instead = |_: &Outgoing| {
            let f = too_large(
                format!("the record could not be moved to {topic}: too large for the broker"),
                None,
            );
            Some(self.dead_letter_record(record, &f, attempts))
        };
        let published = self.publish(record, trace, &mut out, instead, ack).await;
        self.handed(record, trace, out, Output::Deferred(attempts), published)
            .await
    }

    async fn publish_reply(
        &self,
        record: &Record,
        trace: &RecordTrace,
        mut out: Outgoing,
        attempts: Attempts,
        status: Option<Status>,
        ack: Acknowledge,
    ) -> End {
        let instead = |out: &Outgoing| {
            let f = too_large(
                format!(
                    "the reply to {} could not be published: too large for the broker",
                    out.topic
                ),
                status,
            );
            Some(self.dead_letter_record(record, &f, attempts))
        };
        let published = self.publish(record, trace, &mut out, instead, ack).await;
        self.handed(record, trace, out, Output::Reply(attempts, status), published)
            .await
    }

    /// Goes on from handing a reply or a retry-topic record to the producer. One the broker
    /// refuses as too large never landed, so its record becomes a dead letter instead.
    async fn handed(
        &self,
        record: &Record,
        trace: &RecordTrace,
        out: Outgoing,
        what: Output,
        published: Result<Published, ProduceError>,
    ) -> End {
        match published {
            Ok(Published::Done) => {
                let (outcome, reason) = what.outcome();
                End::Final(outcome, reason)
            }
            Ok(Published::Writing(step, written)) => End::Writing(Write {
                out,
                step,
                written,
                what,
            }),
            Ok(Published::GaveUp) => End::Abandoned,
            Err(e) => {
                let f = too_large(what.refused(&out.topic, &e), what.status());
                self.dead_letter(record, trace, f, what.attempts(), Acknowledge::Now)
                    .await
            }
        }
    }

    async fn dead_letter(
        &self,
        record: &Record,
        trace: &RecordTrace,
        failure: Failure,
        attempts: Attempts,
        ack: Acknowledge,
    ) -> End {
        let mut out = self.dead_letter_record(record, &failure, attempts);
        tracing::info!(
            route = %self.config.name, record.topic = %record.topic, record.partition = record.partition,
            record.offset = record.offset, reason = %failure.reason, status = failure.status.as_deref(),
            attempts = attempts.count, "Dead-lettering record"
        );
        let published = self.publish(record, trace, &mut out, |_| None, ack).await;
        self.dead_lettered(record, trace, out, failure, attempts, published)
            .await
    }

    async fn dead_lettered(
        &self,
        record: &Record,
        trace: &RecordTrace,
        mut out: Outgoing,
        failure: Failure,
        attempts: Attempts,
        mut published: Result<Published, ProduceError>,
    ) -> End {
        loop {
            match published {
                Ok(Published::Done) => return End::Final(Outcome::DeadLettered, Some(failure.reason)),
                Ok(Published::Writing(step, written)) => {
                    return End::Writing(Write {
                        out,
                        step,
                        written,
                        what: Output::DeadLetter(failure, attempts),
                    });
                }
                Ok(Published::GaveUp) => return End::Abandoned,
                // Keep the reason even when the payload (then the record's own headers and key)
                // cannot travel with it.
                Err(e) if produce::shrink(&mut out) => {
                    tracing::warn!(error = %e, "Dead letter too large, sending it smaller");
                }
                Err(e) => {
                    tracing::error!(error = %e, record.offset = record.offset, "Dead letter cannot be written even without payload, headers and key; will retry");
                    if !self.pause_or_abandon(record, Duration::from_secs(5)).await {
                        return End::Abandoned;
                    }
                }
            }
            published = self
                .publish(record, trace, &mut out, |_| None, Acknowledge::Now)
                .await;
        }
    }

    fn dead_letter_record(&self, record: &Record, failure: &Failure, attempts: Attempts) -> Outgoing {
        produce::dead_letter(
            record,
            &self.config.name,
            &self.config.dead_letter,
            failure,
            attempts,
        )
    }

    /// Hands `out` to the producer, retrying broker trouble until the producer takes it and,
    /// with `Acknowledge::Now`, the broker acknowledges it, or until the partition goes away
    /// (`Published::GaveUp`). `Err`: the record can never be written as it is.
    ///
    /// With `delivery: exactly_once` the output is held for the transaction that commits the
    /// record's offset, with `instead()` to write should the broker refuse it as too large.
    async fn publish(
        &self,
        record: &Record,
        trace: &RecordTrace,
        out: &mut Outgoing,
        instead: impl FnOnce(&Outgoing) -> Option<Outgoing>,
        ack: Acknowledge,
    ) -> Result<Published, ProduceError> {
        if let Some(transactions) = self.producer.transactions() {
            let step = trace.publish(&out.topic);
            if let Some(h) = step.headers() {
                h.replace_in(&mut out.headers);
            }
            let instead = instead(out);
            transactions.hold(&record.lease, record.offset, out.clone(), instead);
            step.end("held", false);
            return Ok(Published::Done);
        }
        let mut backoff = Duration::from_millis(500);
        loop {
            let step = trace.publish(&out.topic);
            if let Some(h) = step.headers() {
                h.replace_in(&mut out.headers);
            }
            let acked = match self.producer.enqueue(out).await {
                Ok(written) if ack == Acknowledge::Later => return Ok(Published::Writing(step, written)),
                Ok(written) => written.await,
                Err(e) => Err(e),
            };
            match self.written(record, out, step, acked, &mut backoff).await {
                Flow::Done => return Ok(Published::Done),
                Flow::GaveUp => return Ok(Published::GaveUp),
                Flow::Refused(e) => return Err(e),
                Flow::Again => {}
            }
        }
    }

    /// What the broker's answer to a write means for the record. Broker trouble is logged,
    /// counted and waited out (`backoff`, doubled each time) before the record is written again.
    async fn written(
        &self,
        record: &Record,
        out: &Outgoing,
        step: Step,
        acked: Result<(), ProduceError>,
        backoff: &mut Duration,
    ) -> Flow {
        match acked {
            Ok(()) => {
                step.end("ok", false);
                Flow::Done
            }
            Err(e @ ProduceError::TooLarge(_)) => {
                step.end("too_large", true);
                Flow::Refused(e)
            }
            Err(e) => {
                step.end("error", true);
                self.metrics.produce_error();
                tracing::error!(
                    route = %self.config.name, topic = %out.topic, error = %e,
                    "Cannot publish; the record stays uncommitted and will be retried"
                );
                if record.lease.is_cancelled() || !self.pause_or_abandon(record, *backoff).await {
                    return Flow::GaveUp;
                }
                *backoff = (*backoff * 2).min(Duration::from_secs(30));
                Flow::Again
            }
        }
    }

    /// Sleeps `d`; `false` if the partition went away meanwhile.
    async fn pause_or_abandon(&self, record: &Record, d: Duration) -> bool {
        tokio::select! {
            _ = tokio::time::sleep(d) => true,
            _ = record.lease.cancel.cancelled() => false,
        }
    }

    /// Marks the record final and counts its outcome. `false`: the partition was released while
    /// the record was live; it was counted as abandoned then and its new owner handles it again.
    fn finish(&self, record: &Record, outcome: Outcome, reason: Option<Reason>) -> bool {
        if !self.tracker.finish(&record.lease, record.offset) {
            return false;
        }
        let age = record
            .timestamp_ms
            .map(|ts| Duration::from_millis(epoch_ms().saturating_sub(ts).max(0) as u64));
        self.metrics.outcome(outcome, reason, age);
        true
    }

    /// Ends a record without calling the service: superseded by a newer record of its key.
    pub fn expire(&self, record: &Record) {
        self.finish(record, Outcome::Expired, None);
    }

    fn too_old(&self, record: &Record) -> bool {
        let (Some(max), Some(ts)) = (
            self.config.freshness.as_ref().and_then(|f| f.max_age),
            record.timestamp_ms,
        ) else {
            return false;
        };
        epoch_ms().saturating_sub(ts) > max.0.as_millis() as i64
    }

    /// Abandons a record known only by its lease and offset (after a panic while handling it).
    pub fn give_up(&self, lease: &crate::offsets::Lease, offset: i64) {
        if self.tracker.abandon(lease, offset) {
            self.metrics.abandoned(1);
        }
    }

    fn abandon(&self, record: &Record) {
        self.give_up(&record.lease, record.offset);
    }
}

/// Where handling a record has come to.
// Moved up a few frames once per record: cheaper than boxing the write, which would allocate.
#[allow(clippy::large_enum_variant)]
enum End {
    /// Its outcome is safely in Kafka (or needs nothing there).
    Final(Outcome, Option<Reason>),
    /// Given up because its partition went away; the next owner repeats it.
    Abandoned,
    /// Its output is with the producer; the broker's acknowledgement decides the rest.
    Writing(Write),
}

/// An output handed to the producer, the broker's answer still to come.
struct Write {
    out: Outgoing,
    /// The write's span, ended by the broker's answer.
    step: Step,
    written: Written,
    what: Output,
}

/// What an output is, and so what its record's outcome becomes once it is acknowledged.
enum Output {
    /// With the status of the answer it is the body of.
    Reply(Attempts, Option<Status>),
    Deferred(Attempts),
    DeadLetter(Failure, Attempts),
}

impl Output {
    fn outcome(&self) -> (Outcome, Option<Reason>) {
        match self {
            Output::Reply(..) => (Outcome::Replied, None),
            Output::Deferred(_) => (Outcome::Deferred, None),
            Output::DeadLetter(f, _) => (Outcome::DeadLettered, Some(f.reason)),
        }
    }

    fn attempts(&self) -> Attempts {
        match self {
            Output::Reply(a, _) | Output::Deferred(a) | Output::DeadLetter(_, a) => *a,
        }
    }

    /// The service's status, for the dead letter that takes the output's place.
    fn status(&self) -> Option<Status> {
        match self {
            Output::Reply(_, status) => *status,
            Output::Deferred(_) | Output::DeadLetter(..) => None,
        }
    }

    /// Why the output could not be written, for the dead letter that takes its place.
    fn refused(&self, topic: &str, e: &ProduceError) -> String {
        match self {
            Output::Reply(..) => format!("the reply to {topic} could not be published: {e}"),
            Output::Deferred(_) => format!("the record could not be moved to {topic}: {e}"),
            Output::DeadLetter(..) => format!("the dead letter to {topic} could not be published: {e}"),
        }
    }
}

/// Whether a write waits for the broker's acknowledgement.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Acknowledge {
    Now,
    /// Only hand it to the producer: the record's lane settles it (see [`Pending`]).
    Later,
}

/// What came of handing an output to the producer.
enum Published {
    /// Acknowledged by the broker (or held for the transaction).
    Done,
    Writing(Step, Written),
    /// The partition went away first.
    GaveUp,
}

/// What to do after the broker's answer to a write.
enum Flow {
    Done,
    /// Write it again.
    Again,
    /// The partition went away meanwhile.
    GaveUp,
    /// It can never be written as it is.
    Refused(ProduceError),
}

/// A record whose output is with the producer, its acknowledgement still to come.
pub struct Pending {
    record: Record,
    trace: RecordTrace,
    write: Write,
}

impl Pending {
    pub fn record(&self) -> &Record {
        &self.record
    }

    /// Resolves with the broker's answer to the write.
    pub fn acknowledgement(&mut self) -> &mut Written {
        &mut self.write.written
    }
}

/// `status`: the service's, when it answered and what it answered was too large.
fn too_large(message: String, status: Option<Status>) -> Failure {
    Failure {
        reason: Reason::TooLarge,
        status: status.map(Status::name),
        message,
        retry_after: None,
    }
}

fn epoch_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}
