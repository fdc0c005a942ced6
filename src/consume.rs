//! The consumer group: subscription, assignment, pause/resume, revoke → drain → commit.
//!
//! Two sides. The group side runs on its own OS thread, so that serving the group protocol
//! never waits on the async world, except for a bounded drain while a revoke or shutdown is in
//! progress; it commits what the tracker says is final. The intake side is a task on the async
//! runtime: woken by librdkafka when an assigned partition's queue gets records, it feeds the
//! dispatch lanes with records and the offset tracker with what was taken, on the thread that
//! then runs their calls (a hand-off from a thread of its own cost a thread wake-up per record).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, Weak};
use std::time::{Duration, Instant};

use hashbrown::{HashMap, HashSet};
use rdkafka::client::ClientContext;
use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::consumer::base_consumer::PartitionQueue;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, RebalanceProtocol};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{BorrowedMessage, Message};
use rdkafka::types::RDKafkaRespErr;
use rdkafka::util::Timeout;
use rdkafka::{Offset, TopicPartitionList};
use regex::Regex;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::admin::{Control, Health};
use crate::config::{Concurrency, Route, Start};
use crate::dispatch::Lanes;
use crate::offsets::{Lease, Load, PauseReason, Released, Tp, Tracker};
use crate::produce::Failed;
use crate::ready::Gate;
use crate::record::Record;
use crate::telemetry::trace::Tracing;
use crate::telemetry::{Metrics, RouteMetrics};
use crate::transaction::{TransactionError, Transactions};

/// Which route reads which topic. A topic a route names is that route's, even where another
/// route's pattern matches it; between patterns, the first route in the file wins; and a pattern
/// never matches a topic its own route writes to (its replies would come back to it forever).
pub struct RouteTable {
    exact: HashMap<String, usize>,
    /// Each pattern with its route and the topics that route writes to.
    patterns: Vec<(Regex, usize, HashSet<String>)>,
    starts: Vec<Start>,
}

impl RouteTable {
    pub fn new(routes: &[Route]) -> Result<Self, regex::Error> {
        let mut exact = HashMap::new();
        let mut patterns = Vec::new();
        for (i, r) in routes.iter().enumerate() {
            for t in r.from.topics.iter().chain(&r.retry.topics) {
                exact.insert(t.clone(), i);
            }
            if let Some(p) = &r.from.pattern {
                let writes = r.writes().map(|(t, _)| t.clone()).collect();
                patterns.push((Regex::new(p)?, i, writes));
            }
        }
        Ok(RouteTable {
            exact,
            patterns,
            starts: routes.iter().map(|r| r.from.start.clone()).collect(),
        })
    }

    /// The route that reads `topic`; `None` for a topic the subscription's patterns match that
    /// no route reads (ferry pauses its partitions).
    pub fn route_for(&self, topic: &str) -> Option<usize> {
        self.exact.get(topic).copied().or_else(|| {
            self.patterns
                .iter()
                .find(|(re, _, writes)| re.is_match(topic) && !writes.contains(topic))
                .map(|(_, i, _)| *i)
        })
    }

    /// The subscription: exact topics, and patterns in librdkafka's `^regex` form.
    pub fn subscription(routes: &[Route]) -> Vec<String> {
        let mut subs = Vec::new();
        for r in routes {
            subs.extend(r.from.topics.iter().cloned());
            subs.extend(r.retry.topics.iter().cloned());
            if let Some(p) = &r.from.pattern {
                subs.push(if p.starts_with('^') {
                    p.clone()
                } else {
                    format!("^.*{p}")
                });
            }
        }
        subs
    }
}

/// The consumer's callbacks: logging, rebalances and commit results.
pub struct Context {
    tracker: Arc<Tracker>,
    routes: Arc<RouteTable>,
    /// Per route, in config order.
    route_metrics: Arc<Vec<Arc<RouteMetrics>>>,
    metrics: Arc<Metrics>,
    /// Ends the traces of records once a commit covers them.
    tracing: Arc<Tracing>,
    lanes: Lanes,
    /// Each route's in-flight bounds.
    bounds: Vec<Concurrency>,
    gate: Arc<Gate>,
    /// Operator pauses and drains.
    control: Arc<Control>,
    /// The consumer itself, to split each assigned partition's queue off before assigning it.
    consumer: OnceLock<Weak<BaseConsumer<Context>>>,
    /// The assigned partitions' queues. Locked by the rebalance callbacks while they change
    /// the assignment, so the intake never takes from a partition the tracker no longer has.
    intake: Arc<Mutex<Intake>>,
    /// Notified by librdkafka when a partition queue gets records: wakes the intake.
    records: Arc<Notify>,
    /// Held while offsets are taken from the tracker and committed, so a periodic commit can
    /// never land after the final commit of a revoked partition.
    commit_lock: Mutex<()>,
    /// Final offsets a stop could not commit yet (the broker refuses commits while the group
    /// rebalances). Should the rebalance revoke their partitions, the revoke commits them, as
    /// it hands the partitions over: after it they are another member's to commit, and the
    /// next owner would repeat every record above the last commit.
    unfinished: Mutex<Vec<(Tp, i64)>>,
    drain_timeout: Duration,
    /// librdkafka's error events, logged without their storms of repeats.
    errors: ClientErrors,
    /// Whether the group still vouches for this member: no new records while it may not.
    membership: Membership,
    /// What librdkafka falls back to when a partition has no committed offset.
    default_start: Start,
    /// With `delivery: exactly_once`: offsets are committed in these transactions, never
    /// through the consumer.
    transactions: Option<Arc<Transactions>>,
    /// Cancelled when the transactional producer is fenced: this instance must stop.
    shutdown: CancellationToken,
    /// Set when the producer failed for good: no record in flight can end any more.
    producer_failed: Arc<crate::produce::Failed>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl ClientContext for Context {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, message: &str) {
        log_rdkafka(level, fac, message);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        if let Some(held_back) = self.errors.admit(&error.to_string(), Instant::now()) {
            tracing::warn!(error = %error, reason, held_back, "Kafka client error");
        }
    }
}

/// Which of librdkafka's error events to log. It reports a broker it cannot reach again at
/// every reconnect attempt, ten or twenty times a second, which buried every other line (and
/// the `/readyz` reason an operator needs) in identical warnings: an error is logged when first
/// seen, then at most once per [`ClientErrors::QUIET`] with how many were held back meanwhile.
#[derive(Default)]
pub struct ClientErrors {
    /// Per error (its text): when it was last logged, and how many were held back since.
    seen: Mutex<HashMap<String, (Instant, u64)>>,
}

impl ClientErrors {
    pub const QUIET: Duration = Duration::from_secs(30);

    /// `Some(held back since the last line)` when `error` is to be logged now.
    pub fn admit(&self, error: &str, now: Instant) -> Option<u64> {
        let mut seen = lock(&self.seen);
        match seen.get_mut(error) {
            Some((last, held)) if now.saturating_duration_since(*last) < Self::QUIET => {
                *held += 1;
                None
            }
            Some((last, held)) => {
                *last = now;
                Some(std::mem::take(held))
            }
            None => {
                seen.insert(error.to_string(), (now, 0));
                Some(0)
            }
        }
    }
}

/// Whether the group still vouches for this member, as far as ferry can tell. A commit carries
/// the member's id and generation, so one the coordinator takes, or refuses only because the
/// group rebalances (the member and generation are checked first), proves the partitions are
/// still this member's; so does an assignment. When none of that has come for a whole session
/// (`session.timeout.ms`) counted from the first commit after the last one taken, the coordinator
/// has given the partitions to another member if it has not heard from this one, and every
/// record taken meanwhile would be handled twice. librdkafka notices such a loss only from a
/// heartbeat in a steady group: a member rejoining (which, with the cooperative protocol, keeps
/// fetching its partitions) and cut off from its coordinator fetched and called on for minutes
/// after the group had moved on (the fault campaign's logs). So ferry takes no new records while
/// the group has not confirmed it for a session, and takes again once it does. Not with
/// `exactly_once` (a transaction carries the generation: a dropped member's outputs are aborted)
/// nor with `group.protocol: consumer` (its heartbeats go on while it reconciles).
struct Membership {
    /// The instant the micros below count from.
    epoch: Instant,
    /// When the first commit not yet followed by one the broker took began, in micros since
    /// `epoch` plus one; 0 while the last commit was taken. Read for every record taken.
    unconfirmed_since: AtomicU64,
    /// Whether records are held for it (to log the change once each way).
    holding: AtomicBool,
    /// Why the last commit was not taken, for the line that says records are held.
    last_refusal: Mutex<String>,
    /// `None`: not guarded (see above).
    session: Option<Duration>,
}

impl Membership {
    fn new(session: Option<Duration>) -> Membership {
        Membership {
            epoch: Instant::now(),
            unconfirmed_since: AtomicU64::new(0),
            holding: AtomicBool::new(false),
            last_refusal: Mutex::new(String::new()),
            session,
        }
    }

    /// The session timeout of the classic group protocol with these properties (librdkafka's
    /// default unless set); `None` where the guard does not apply.
    fn session_of(client: &ClientConfig, exactly_once: bool) -> Option<Duration> {
        let classic = client
            .get("group.protocol")
            .is_none_or(|p| p.trim().eq_ignore_ascii_case("classic"));
        let ms = client
            .get("session.timeout.ms")
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(45_000);
        (classic && !exactly_once).then(|| Duration::from_millis(ms))
    }

    fn micros(&self, at: Instant) -> u64 {
        u64::try_from(at.saturating_duration_since(self.epoch).as_micros()).unwrap_or(u64::MAX - 1) + 1
    }

    /// A commit begins at `at`: unless one is still unconfirmed, the clock starts now.
    fn committing(&self, at: Instant) {
        if self.session.is_some() {
            let _ = self.unconfirmed_since.compare_exchange(
                0,
                self.micros(at),
                Ordering::AcqRel,
                Ordering::Acquire,
            );
        }
    }

    /// The coordinator did not take a commit, for this reason.
    fn refused(&self, why: String) {
        *lock(&self.last_refusal) = why;
    }

    /// The group knows this member: a commit was taken or refused for a rebalance, or
    /// partitions were assigned.
    fn confirmed(&self) {
        self.unconfirmed_since.store(0, Ordering::Release);
        if self.holding.swap(false, Ordering::AcqRel) {
            tracing::info!("The group confirmed this member again; new records are taken again");
        }
    }

    /// Whether to take no new records: the group has not confirmed this member for a whole
    /// session. `now` is read only while a commit is unconfirmed.
    fn in_doubt(&self, now: impl FnOnce() -> Instant) -> bool {
        let since = self.unconfirmed_since.load(Ordering::Acquire);
        let Some(session) = self.session.filter(|_| since != 0) else {
            return false;
        };
        let unconfirmed = Duration::from_micros(self.micros(now()).saturating_sub(since));
        if unconfirmed <= session {
            return false;
        }
        if !self.holding.swap(true, Ordering::AcqRel) {
            // Confirmed meanwhile: not held after all, and the next hold is logged again.
            if self.unconfirmed_since.load(Ordering::Acquire) == 0 {
                self.holding.store(false, Ordering::Release);
                return false;
            }
            tracing::warn!(
                unconfirmed = ?unconfirmed,
                session_timeout = ?session,
                last_refusal = %lock(&self.last_refusal),
                "The group has not taken a commit from this member for longer than its session; taking no new records until it does (or assigns partitions), as its partitions may already have another owner"
            );
        }
        true
    }
}

/// librdkafka's log lines, as tracing events.
pub fn log_rdkafka(level: RDKafkaLogLevel, fac: &str, message: &str) {
    use RDKafkaLogLevel::*;
    match level {
        Emerg | Alert | Critical | Error => tracing::error!(target: "librdkafka", fac, "{message}"),
        // The shared properties reach both clients; each warns about the other's, harmlessly.
        Warning if fac == "CONFWARN" => tracing::debug!(target: "librdkafka", fac, "{message}"),
        Warning => tracing::warn!(target: "librdkafka", fac, "{message}"),
        Notice | Info => tracing::info!(target: "librdkafka", fac, "{message}"),
        Debug => tracing::debug!(target: "librdkafka", fac, "{message}"),
    }
}

impl ConsumerContext for Context {
    fn rebalance(&self, c: &BaseConsumer<Self>, err: RDKafkaRespErr, tpl: &mut TopicPartitionList) {
        let cooperative = matches!(c.rebalance_protocol(), RebalanceProtocol::Cooperative);
        let tps = tps_of(tpl);
        let result = match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                // The coordinator's word (librdkafka assigns after every SyncGroup, even an
                // empty assignment): what is assigned now is this member's. A revoke may be
                // librdkafka's own doing, and proves nothing.
                self.membership.confirmed();
                self.choose_start_offsets(c, tpl);
                let (mut with_routes, mut unread) = (Vec::new(), Vec::new());
                for tp in &tps {
                    match self.routes.route_for(&tp.0) {
                        Some(route) => with_routes.push((tp.clone(), route)),
                        None => unread.push(tp.clone()),
                    }
                }
                {
                    let mut intake = lock(&self.intake);
                    self.tracker.assign(&with_routes);
                    let routed: Vec<Tp> = with_routes.iter().map(|(tp, _)| tp.clone()).collect();
                    self.split_queues(&routed, &mut intake);
                }
                // A cooperative rebalance that moves nothing to this member assigns nothing.
                if !tps.is_empty() {
                    tracing::info!(partitions = %describe(&tps), "Partitions assigned");
                }
                let assigned = if cooperative {
                    c.incremental_assign(tpl)
                } else {
                    c.assign(tpl)
                };
                pause_unread(c, &unread);
                assigned
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                tracing::info!(partitions = %describe(&tps), lost = c.assignment_lost(), "Partitions revoked, draining");
                self.drain(c, &tps, !c.assignment_lost());
                if cooperative {
                    c.incremental_unassign(tpl)
                } else {
                    c.unassign()
                }
            }
            other => {
                tracing::error!(error = ?other, "Rebalance failed; dropping the assignment");
                self.drain(c, &self.tracker.assigned(), false);
                c.unassign()
            }
        };
        if let Err(e) = result {
            tracing::error!(error = %e, "Cannot apply the new assignment");
        }
    }
}

impl Context {
    /// Stops dispatching `tps`, waits (up to the drain timeout) for their in-flight records to
    /// reach their outcomes, commits what is final and forgets them; late results are then
    /// discarded. Without a final commit (the assignment was lost) nothing is waited for: no
    /// outcome could be committed.
    fn drain(&self, c: &BaseConsumer<Self>, tps: &[Tp], commit_final: bool) {
        {
            let mut intake = lock(&self.intake);
            self.tracker.revoke(tps);
            for tp in tps {
                intake.queues.remove(tp);
                intake.fresh.remove(tp);
            }
        }
        if commit_final && !self.wait_quiet(tps) {
            if self.given_up() {
                tracing::warn!(
                    "Nothing more can be written; unfinished records will be handled again by the next owner"
                );
            } else {
                tracing::warn!(timeout = ?self.drain_timeout, "Drain timed out; unfinished records will be handled again by the next owner");
            }
        }
        // Only a final commit needs to keep the periodic one out; a lost assignment commits
        // nothing and must not wait behind a commit to an unreachable coordinator.
        let _committing = commit_final.then(|| lock(&self.commit_lock));
        let acknowledged = self.tracker.acknowledged(tps);
        let Released {
            commits: mut offsets,
            live,
            abandoned,
        } = self.tracker.release(tps);
        if live > 0 {
            self.count_abandoned(tps, live);
        }
        if abandoned > 0 {
            tracing::warn!(
                abandoned,
                "Records given up waiting (for an open circuit or a retry) when their partitions went; the next owner handles them again"
            );
        }
        // A stop in progress released its partitions from the tracker already; what it could
        // not commit is committed here, while the partitions are still ours.
        lock(&self.unfinished).retain(|(tp, offset)| {
            if !tps.contains(tp) {
                return true;
            }
            match offsets.iter_mut().find(|(t, _)| t == tp) {
                Some((_, o)) => *o = (*o).max(*offset),
                None => offsets.push((tp.clone(), *offset)),
            }
            false
        });
        if commit_final {
            if commit(c, &offsets) {
                // Where the next owner should start: for an operator following a handover (and
                // for the fault campaign, which holds the broker to it).
                let mut at: BTreeMap<Tp, i64> = acknowledged.into_iter().collect();
                at.extend(offsets);
                if !at.is_empty() {
                    let at: Vec<(Tp, i64)> = at.into_iter().collect();
                    tracing::info!(offsets = %describe_offsets(&at), "Handed over the revoked partitions at these committed offsets");
                }
            } else {
                // Not repeated later: the partitions are no longer ours. The next owner starts
                // from the last committed offsets and repeats what was final above them.
                tracing::warn!(offsets = %describe_offsets(&offsets), "The broker refused the final commit of revoked partitions; their next owner will repeat the records above the last committed offsets");
            }
        }
        self.tracing.forget(tps);
    }

    /// Waits for the records of `tps` to end, up to the drain timeout, unless nothing more can
    /// be written: then none of them can end, and the stop that follows (the producer failed
    /// for good, or the instance was fenced) must not wait behind this revoke for the timeout.
    fn wait_quiet(&self, tps: &[Tp]) -> bool {
        let deadline = Instant::now() + self.drain_timeout;
        loop {
            let slice = (Instant::now() + Duration::from_millis(100)).min(deadline);
            if self.tracker.wait_quiet(tps, slice) {
                return true;
            }
            if Instant::now() >= deadline || self.given_up() {
                return false;
            }
        }
    }

    /// Whether nothing more can be written: the producer failed for good, or this instance
    /// was fenced (exactly once).
    fn given_up(&self) -> bool {
        self.producer_failed.why().is_some() || self.fenced()
    }

    /// Whether this instance was fenced (exactly once): it can commit nothing more.
    fn fenced(&self) -> bool {
        self.transactions.as_ref().is_some_and(|t| t.fenced().is_some())
    }

    /// Gives each partition its own queue before it is assigned, so its records wait in
    /// librdkafka (bounded by `queued.max.messages.kbytes`) whenever ferry has no room for them,
    /// instead of pausing the partition: a pause throws the prefetched records away and a resume
    /// fetches them again, slowly.
    fn split_queues(&self, tps: &[Tp], intake: &mut Intake) {
        let Some(consumer) = self.consumer.get().and_then(Weak::upgrade) else {
            return;
        };
        for tp in tps {
            match consumer.split_partition_queue(&tp.0, tp.1) {
                Some(mut queue) => {
                    let records = self.records.clone();
                    queue.set_nonempty_callback(move || records.notify_one());
                    intake.fresh.insert(tp.clone());
                    intake.queues.insert(tp.clone(), queue);
                }
                None => {
                    tracing::error!(topic = %tp.0, partition = tp.1, "Cannot split the partition's queue")
                }
            }
        }
    }

    fn count_abandoned(&self, tps: &[Tp], live: usize) {
        // Attributed to the first revoked partition's route: the totals are what reconcile.
        if let Some(route) = tps.iter().find_map(|(t, _)| self.routes.route_for(t)) {
            self.route_metrics[route].abandoned(live as u64);
        }
    }

    /// For partitions with no committed offset, starts where their route's `from.start` says,
    /// when that differs from librdkafka's fallback.
    fn choose_start_offsets(&self, c: &BaseConsumer<Self>, tpl: &mut TopicPartitionList) {
        let mut query = TopicPartitionList::new();
        for e in tpl.elements() {
            if let Some(route) = self.routes.route_for(e.topic()) {
                if self.routes.starts[route] != self.default_start {
                    query.add_partition(e.topic(), e.partition());
                }
            }
        }
        if query.count() == 0 {
            return;
        }
        let committed = match c.committed_offsets(query, Timeout::After(Duration::from_secs(10))) {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "Cannot read committed offsets; partitions without one start at the default");
                return;
            }
        };
        let mut by_time = TopicPartitionList::new();
        for e in committed.elements() {
            if e.offset() != Offset::Invalid {
                continue;
            }
            let Some(route) = self.routes.route_for(e.topic()) else {
                continue;
            };
            let start = match &self.routes.starts[route] {
                Start::Earliest => Offset::Beginning,
                Start::Latest => Offset::End,
                Start::Timestamp(ms) => {
                    let _ = by_time.add_partition_offset(e.topic(), e.partition(), Offset::Offset(*ms));
                    continue;
                }
            };
            let _ = tpl.set_partition_offset(e.topic(), e.partition(), start);
        }
        if by_time.count() > 0 {
            match c.offsets_for_times(by_time, Timeout::After(Duration::from_secs(10))) {
                Ok(found) => {
                    for e in found.elements() {
                        tracing::debug!(topic = e.topic(), partition = e.partition(), offset = ?e.offset(), "Start offset by time");
                        let _ = tpl.set_partition_offset(e.topic(), e.partition(), e.offset());
                    }
                }
                Err(e) => tracing::warn!(error = %e, "Cannot look up start offsets by time"),
            }
        }
    }
}

/// The one seam through which offsets reach the broker. Synchronous, so the tracker learns
/// what the broker confirmed; the periodic commits run on their own thread to keep this
/// round trip off the group side.
fn commit(c: &BaseConsumer<Context>, offsets: &[(Tp, i64)]) -> bool {
    if offsets.is_empty() {
        return true;
    }
    let ctx = c.context();
    if let Some(transactions) = &ctx.transactions {
        return commit_in_transaction(c, transactions, offsets);
    }
    ctx.membership.committing(Instant::now());
    let mut tpl = TopicPartitionList::new();
    for ((t, p), o) in offsets {
        let _ = tpl.add_partition_offset(t, *p, Offset::Offset(*o));
    }
    let committed = c.commit(&tpl, CommitMode::Sync);
    ctx.metrics.commit(committed.is_ok());
    match committed {
        Ok(()) => {
            ctx.membership.confirmed();
            ctx.tracker.committed(offsets);
            ctx.tracing.committed(offsets);
            true
        }
        Err(e) => {
            // Expected while the group rebalances; the revoke's final commit covers it. The
            // coordinator checked the member and its generation first: it still knows us.
            if e.rdkafka_error_code() == Some(RDKafkaErrorCode::RebalanceInProgress) {
                tracing::debug!(error = %e, "Commit deferred by a rebalance");
                ctx.membership.confirmed();
            } else {
                tracing::warn!(error = %e, "Commit failed; it will be repeated");
                ctx.membership.refused(e.to_string());
            }
            ctx.tracker.commit_failed(offsets);
            false
        }
    }
}

/// `delivery: exactly_once`: the offsets and the held outputs of the records below them, in
/// one transaction that carries the group's generation, so a member the group has moved on
/// from cannot commit.
fn commit_in_transaction(
    c: &BaseConsumer<Context>,
    transactions: &Transactions,
    offsets: &[(Tp, i64)],
) -> bool {
    let ctx = c.context();
    let Some(group) = c.group_metadata() else {
        tracing::warn!("No consumer group metadata yet; the transaction waits");
        ctx.tracker.commit_failed(offsets);
        return false;
    };
    // A stop has released its partitions from the tracker already; those whose final offsets
    // wait in `unfinished` are still ours, and so are the outputs they hold back. Otherwise a
    // revoke's transaction for some partitions would drop the held outputs of the others.
    let owns = |lease: &Lease| {
        ctx.tracker.owns(lease) || lock(&ctx.unfinished).iter().any(|(tp, _)| *tp == lease.tp)
    };
    let committed = transactions.commit(offsets, &group, owns);
    ctx.metrics.commit(committed.is_ok());
    match committed {
        Ok(outputs) => {
            tracing::debug!(outputs, partitions = offsets.len(), "Transaction committed");
            ctx.tracker.committed(offsets);
            ctx.tracing.committed(offsets);
            true
        }
        Err(e) => {
            if let TransactionError::Fenced(_) = e {
                ctx.shutdown.cancel();
            } else {
                tracing::warn!(error = %e, "Transaction failed; it will be repeated");
            }
            ctx.tracker.commit_failed(offsets);
            false
        }
    }
}

fn tps_of(tpl: &TopicPartitionList) -> Vec<Tp> {
    tpl.elements()
        .iter()
        .map(|e| (Arc::<str>::from(e.topic()), e.partition()))
        .collect()
}

/// `topic/partition@offset,…`, sorted, for logs.
fn describe_offsets(offsets: &[(Tp, i64)]) -> String {
    sorted_list(offsets.iter().map(|((t, p), o)| format!("{t}/{p}@{o}")))
}

/// `topic/partition,…`, sorted, for logs.
fn describe(tps: &[Tp]) -> String {
    sorted_list(tps.iter().map(|(t, p)| format!("{t}/{p}")))
}

fn sorted_list(items: impl Iterator<Item = String>) -> String {
    let mut v: Vec<String> = items.collect();
    v.sort();
    v.join(",")
}

/// What the consumer thread needs.
pub struct ConsumerSetup {
    pub client: ClientConfig,
    pub routes: Vec<Route>,
    pub tracker: Arc<Tracker>,
    pub lanes: Lanes,
    /// Per route, in config order.
    pub route_metrics: Arc<Vec<Arc<RouteMetrics>>>,
    pub metrics: Arc<Metrics>,
    pub tracing: Arc<Tracing>,
    /// Operator pauses and drains, per route.
    pub control: Arc<Control>,
    pub health: Arc<Health>,
    pub drain_timeout: Duration,
    pub commit_interval: Duration,
    /// Cancelled on SIGTERM: stop fetching, drain, commit, leave the group.
    pub shutdown: CancellationToken,
    /// Closed while the service is not ready: no new records are taken.
    pub gate: Arc<Gate>,
    /// With `delivery: exactly_once`: where offsets are committed.
    pub transactions: Option<Arc<Transactions>>,
    /// Set once the producer failed for good: the records in flight can never end.
    pub producer_failed: Arc<Failed>,
}

/// Why the consumer stopped before it was told to.
#[derive(Debug, thiserror::Error)]
pub enum ConsumeError {
    #[error("cannot set up the Kafka consumer: {0}")]
    Kafka(#[from] KafkaError),
    #[error("the record intake stopped unexpectedly")]
    IntakeStopped,
    /// librdkafka's fatal consumer error: another instance with the same `group.instance.id`
    /// (static membership) took this one's place. Nothing can be committed any more.
    #[error(
        "the Kafka consumer failed for good ({0}); ferry stopped: its next start (the container's restart) takes the records after the last committed offsets again"
    )]
    Failed(String),
}

/// ferry's settings of its consumer over `kafka.properties` (in `client`): also what `ferry
/// validate` gives librdkafka to judge the properties together. `all_latest`: every route starts
/// at the latest offset.
pub fn settings(client: &mut ClientConfig, all_latest: bool) {
    client
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set(
            "auto.offset.reset",
            if all_latest { "latest" } else { "earliest" },
        )
        .set("isolation.level", "read_committed");
    // Under the consumer group protocol (KIP-848) the broker assigns, incrementally, and
    // librdkafka refuses a client-side strategy.
    let broker_assigns = client
        .get("group.protocol")
        .is_some_and(|p| p.eq_ignore_ascii_case("consumer"));
    if client.get("partition.assignment.strategy").is_none() && !broker_assigns {
        // Cooperative rebalancing moves only the partitions that change owner; the others keep
        // flowing during a scale-out.
        client.set("partition.assignment.strategy", "cooperative-sticky");
    }
    if client.get("queued.max.messages.kbytes").is_none() {
        // Each partition has a queue of its own (see `split_queues`), and librdkafka then bounds
        // the prefetch per partition, not per consumer: its 64 MiB default would be 64 MiB a
        // partition. 1 MiB still holds thousands of small records, far more than a fetch round
        // trip's worth; ferry's own window bounds what is taken.
        client.set("queued.max.messages.kbytes", PREFETCH_KIB.to_string());
    }
    if client.get("fetch.queue.backoff.ms").is_none() {
        // A partition whose queue is full is fetched again only after this; librdkafka's 1 s
        // starves a queue that drains in a fraction of it (measured: 1 KiB records at 8 800/s
        // with 1 s, 18 500/s with 20 ms).
        client.set("fetch.queue.backoff.ms", "20");
    }
    if client.get("fetch.wait.max.ms").is_none() {
        // librdkafka has one fetch in flight per broker, and leaves out the partitions whose
        // queue is full. Once the busy partitions' queues are full, the next fetch asks only for
        // the idle ones, and the broker holds it until records arrive or this wait ends; the busy
        // partitions, drained meanwhile, wait for it too. librdkafka's 500 ms starved a ferry
        // that drains its 1 MiB a partition faster than that (1 KiB records at 40 000/s: 25 ms).
        // An idle consumer fetches once per wait: 10 times a second, not 2.
        client.set("fetch.wait.max.ms", "100");
    }
}

/// Runs the consumer until shutdown. Blocks: call it on a dedicated thread.
pub fn run(setup: ConsumerSetup) -> Result<(), ConsumeError> {
    let routes =
        Arc::new(RouteTable::new(&setup.routes).map_err(|e| KafkaError::Subscription(e.to_string()))?);
    let all_latest = setup.routes.iter().all(|r| r.from.start == Start::Latest);
    let default_start = if all_latest {
        Start::Latest
    } else {
        Start::Earliest
    };
    let mut client = setup.client;
    settings(&mut client, all_latest);
    let context = Context {
        tracker: setup.tracker.clone(),
        routes: routes.clone(),
        route_metrics: setup.route_metrics.clone(),
        metrics: setup.metrics.clone(),
        tracing: setup.tracing.clone(),
        lanes: setup.lanes,
        bounds: setup.routes.iter().map(|r| r.concurrency.clone()).collect(),
        gate: setup.gate.clone(),
        control: setup.control.clone(),
        consumer: OnceLock::new(),
        intake: Arc::new(Mutex::new(Intake::default())),
        records: Arc::new(Notify::new()),
        commit_lock: Mutex::new(()),
        unfinished: Mutex::new(Vec::new()),
        drain_timeout: setup.drain_timeout,
        errors: ClientErrors::default(),
        membership: Membership::new(Membership::session_of(&client, setup.transactions.is_some())),
        default_start,
        transactions: setup.transactions.clone(),
        shutdown: setup.shutdown.clone(),
        producer_failed: setup.producer_failed.clone(),
    };
    let consumer: BaseConsumer<Context> = client.create_with_context(context)?;
    let consumer = Arc::new(consumer);
    let _ = consumer.context().consumer.set(Arc::downgrade(&consumer));
    let subscription = RouteTable::subscription(&setup.routes);
    let subs: Vec<&str> = subscription.iter().map(String::as_str).collect();
    consumer.subscribe(&subs)?;
    setup.health.set_subscribed(true);
    tracing::info!(topics = %subscription.join(","), "Subscribed");

    // Dropped when the loop below ends, whatever ended it: the periodic commits stop.
    let (stop_commits, commits_stopped) = std::sync::mpsc::channel::<()>();
    let committer = {
        let consumer = consumer.clone();
        let interval = setup.commit_interval;
        std::thread::Builder::new()
            .name("ferry-commit".into())
            .spawn(move || periodic_commits(&consumer, &commits_stopped, interval))
            .map_err(|e| KafkaError::Subscription(format!("cannot start the commit thread: {e}")))?
    };

    let intake = tokio::runtime::Handle::current().spawn(intake(
        consumer.context().intake.clone(),
        Arc::downgrade(&consumer),
        consumer.context().records.clone(),
    ));
    // Records of partitions whose queue could not be split arrive with the group's events.
    let mut topics: HashMap<String, (Arc<str>, usize)> = HashMap::new();
    let mut next_watermarks = Instant::now();
    // Assigned partitions whose committed offset was asked of the broker.
    let mut looked_up: HashSet<Tp> = HashSet::new();
    let mut intake_failed = false;
    let mut failed: Option<String> = None;
    while !setup.shutdown.is_cancelled() {
        setup.health.beat();
        // It ends only when told to, unless a bug panicked it: then stop as a crashed poll
        // loop would, rather than beat on with nothing taken.
        if intake.is_finished() {
            tracing::error!("The record intake stopped unexpectedly; stopping");
            intake_failed = true;
            break;
        }
        if Instant::now() >= next_watermarks {
            next_watermarks = Instant::now() + WATERMARKS_EVERY;
            read_high_watermarks(&consumer, &setup.tracker);
            read_committed_offsets(&consumer, &setup.tracker, &mut looked_up);
        }
        match consumer.poll(GROUP_WAIT) {
            Some(Ok(msg)) => take(consumer.context(), &msg, &routes, &mut topics),
            // librdkafka recovers from these by itself; they are worth a line, not a stop.
            Some(Err(e)) => tracing::warn!(error = %e, "Consumer error"),
            None => {}
        }
        // An atomic read while there is none. After it the consumer fetches and commits
        // nothing, while ferry would look healthy: stop, so that the container restarts.
        if let Some((_, why)) = consumer.client().fatal_error() {
            tracing::error!(reason = %why, "The Kafka consumer failed for good; stopping");
            setup.health.set_draining();
            failed = Some(why);
            break;
        }
    }
    // No record is taken from here on.
    lock(&consumer.context().intake).stopped = true;
    consumer.context().records.notify_one();
    drop(stop_commits);
    let _ = committer.join();

    // Shutdown: stop fetching, let in-flight records finish, commit, leave.
    tracing::info!(
        in_flight = setup.tracker.live(),
        "Stopping: draining in-flight records"
    );
    let assigned = setup.tracker.assigned();
    if let Ok(a) = consumer.assignment() {
        let _ = consumer.pause(&a);
    }
    setup.tracker.revoke(&assigned);
    for tp in &assigned {
        setup.tracker.set_paused(tp, &[PauseReason::Drain]);
    }
    let fenced = || consumer.context().fenced();
    let deadline = Instant::now() + setup.drain_timeout;
    // A fenced instance can commit nothing, and a failed producer write nothing: their records
    // are given up at once.
    let given_up = || consumer.context().given_up() || failed.is_some();
    while setup.tracker.live() > 0 && Instant::now() < deadline && !given_up() {
        setup.health.beat();
        // Keep serving the group protocol while waiting; records fetched now are not taken.
        let _ = consumer.poll(Duration::from_millis(20));
    }
    lock(&consumer.context().intake).queues.clear();
    let Released {
        commits: mut offsets,
        live,
        abandoned,
    } = setup.tracker.release(&assigned);
    if abandoned > 0 {
        tracing::warn!(
            abandoned,
            "Records given up waiting (for an open circuit or a retry) as ferry stopped; they will be handled again after restart"
        );
    }
    if live > 0 {
        let why = if given_up() {
            "Nothing more can be written"
        } else {
            "Drain timed out"
        };
        tracing::warn!(
            live,
            "{why}; unfinished records will be handled again after restart"
        );
        consumer.context().count_abandoned(&assigned, live);
    }
    // A rebalance in progress (another member joining or leaving) refuses commits for a while;
    // keep serving the group protocol and try again rather than leave them to be repeated.
    let deadline = deadline.max(Instant::now() + Duration::from_secs(5));
    while !commit(&consumer, &offsets) && Instant::now() < deadline && !fenced() && failed.is_none() {
        setup.health.beat();
        // A revoke served by this poll commits its partitions' offsets (see `Context::drain`).
        *lock(&consumer.context().unfinished) = offsets;
        let _ = consumer.poll(Duration::from_millis(100));
        offsets = std::mem::take(&mut *lock(&consumer.context().unfinished));
        // A partition handed to another member meanwhile is theirs to commit: ours would set
        // their offset back.
        if let Ok(assignment) = consumer.assignment() {
            offsets.retain(|((t, p), _)| assignment.find_partition(t, *p).is_some());
        }
    }
    consumer.context().tracing.forget(&assigned);
    consumer.unsubscribe();
    // Queues split off by a last assignment hold the consumer; let them go.
    lock(&consumer.context().intake).queues.clear();
    // Ended by `stopped`; it holds the consumer only while it takes records.
    drop(intake);
    tracing::info!("Unsubscribed; leaving the consumer group");
    if let Some(why) = failed {
        return Err(ConsumeError::Failed(why));
    }
    if intake_failed {
        return Err(ConsumeError::IntakeStopped);
    }
    Ok(())
}

/// Commits the tracker's watermarks every `interval` until `stop`'s sender is dropped, which
/// also ends a wait at once.
fn periodic_commits(consumer: &BaseConsumer<Context>, stop: &Receiver<()>, interval: Duration) {
    let ctx = consumer.context();
    // A transaction is also due once it holds enough outputs, so look at it more often; else
    // the thread sleeps a whole interval (an idle sidecar should hardly wake).
    let nap = match ctx.transactions {
        Some(_) => interval.min(Duration::from_millis(50)),
        None => interval,
    };
    let mut next = Instant::now() + interval;
    while let Err(RecvTimeoutError::Timeout) = stop.recv_timeout(nap) {
        let due = ctx.transactions.as_ref().is_some_and(|t| t.due());
        if Instant::now() < next && !due {
            continue;
        }
        next = Instant::now() + interval;
        let _committing = lock(&ctx.commit_lock);
        commit(consumer, &ctx.tracker.take_commits());
    }
}

/// The intake's state: what is taken from, and where each partition's first record is still
/// to come (where a partition starts is worth a line at each handover).
#[derive(Default)]
struct Intake {
    queues: HashMap<Tp, PartitionQueue<Context>>,
    fresh: HashSet<Tp>,
    topics: HashMap<String, (Arc<str>, usize)>,
    /// Set when ferry stops: nothing more is taken.
    stopped: bool,
}

impl Intake {
    /// Takes what the bounds allow from every queue; the rest waits in librdkafka's queues.
    /// Returns how many records were taken, whether a partition had no room, and whether one
    /// had none only for its in-flight bound (records ending will make room).
    fn take(&mut self, ctx: &Context) -> (usize, bool, bool) {
        let (mut took, mut full, mut bound) = (0, false, false);
        for (tp, queue) in &self.queues {
            let mut turn = 0;
            while turn < TURN {
                match room(ctx, tp) {
                    Room::Free => {}
                    Room::Bound => {
                        (full, bound) = (true, true);
                        break;
                    }
                    Room::Held => {
                        full = true;
                        break;
                    }
                }
                match queue.poll(Duration::ZERO) {
                    Some(Ok(msg)) => {
                        if !self.fresh.is_empty() && self.fresh.remove(tp) {
                            tracing::info!(partition = %format!("{}/{}", tp.0, tp.1), offset = msg.offset(), "First record of an assigned partition");
                        }
                        take(ctx, &msg, &ctx.routes, &mut self.topics)
                    }
                    Some(Err(e)) => tracing::warn!(error = %e, "Consumer error"),
                    None => break,
                }
                turn += 1;
            }
            took += turn;
        }
        (took, full, bound)
    }
}

/// The intake: takes records whenever librdkafka says a partition queue has some, until ferry
/// stops. Holds the consumer only while it takes, so the group side can close it.
async fn intake(shared: Arc<Mutex<Intake>>, consumer: Weak<BaseConsumer<Context>>, records: Arc<Notify>) {
    let Some(tracker) = consumer.upgrade().map(|c| c.context().tracker.clone()) else {
        return;
    };
    loop {
        let (took, full, bound) = {
            let mut intake = lock(&shared);
            if intake.stopped {
                return;
            }
            let Some(consumer) = consumer.upgrade() else {
                return;
            };
            intake.take(consumer.context())
        };
        if took > 0 {
            // A queue left with records (a turn takes at most `TURN`) wakes nobody: librdkafka
            // calls only when a queue stops being empty. So look again at once; the budget
            // yields to the tasks just started only now and then, since a yield also wakes an
            // idle worker to steal.
            tokio::task::coop::consume_budget().await;
            continue;
        }
        // Records wake the intake, and so does a bound-stopped partition's room coming back
        // (`Tracker::wake_when_room`); a partition stopped for another reason (the service
        // unready, its circuit open, an operator's pause, the group's word overdue) is looked at
        // again after a nap. The long wait also covers records queued before a queue's wake-up
        // was set.
        let wait = if full { FULL_NAP } else { IDLE };
        // Room comes back as records end, with their acknowledgements: those must not wait for
        // the runtime to wake of itself (see `crate::wake`).
        let _urgent = bound.then(crate::wake::Urgent::hold);
        let woken = async {
            tokio::select! {
                () = records.notified() => {}
                () = tracker.room() => {}
            }
        };
        let _ = tokio::time::timeout(wait, woken).await;
    }
}

/// librdkafka's prefetch per assigned partition, in KiB, unless `kafka.properties` says.
const PREFETCH_KIB: u64 = 1024;

/// Records taken from one partition queue per turn, so one busy partition cannot starve the
/// others.
const TURN: usize = 64;

/// How long the group side waits for the group's events before it beats and looks at
/// shutdown again.
const GROUP_WAIT: Duration = Duration::from_millis(100);

/// How often the intake looks at a partition stopped by something other than a bound.
const FULL_NAP: Duration = Duration::from_millis(5);

/// The longest the intake sleeps when no record woke it.
const IDLE: Duration = Duration::from_millis(100);

/// How often the high watermarks (for lag) are read from librdkafka's cache.
const WATERMARKS_EVERY: Duration = Duration::from_secs(1);

/// Copies the high watermarks librdkafka learnt from its last fetch of each assigned partition
/// into the tracker. Reads a local cache: no request to the broker.
fn read_high_watermarks(consumer: &BaseConsumer<Context>, tracker: &Tracker) {
    let mut marks = Vec::new();
    for tp in tracker.assigned() {
        let Ok(topic) = std::ffi::CString::new(tp.0.as_bytes()) else {
            continue;
        };
        let (mut low, mut high) = (0i64, 0i64);
        // SAFETY: the client pointer is valid while `consumer` lives, the topic is a valid C
        // string for the call's duration, and the outputs are plain integers we own.
        let err = unsafe {
            rdkafka_sys::rd_kafka_get_watermark_offsets(
                consumer.client().native_ptr(),
                topic.as_ptr(),
                tp.1,
                &mut low,
                &mut high,
            )
        };
        // Before the first fetch the cache holds an invalid offset (negative).
        if err == rdkafka_sys::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR && high >= 0 {
            marks.push((tp, high));
        }
    }
    tracker.set_high_watermarks(&marks);
}

/// Asks the broker, once per assignment, for the committed offsets of the assigned partitions
/// this process has not committed to yet: a partition with nothing new since the last start
/// (or handover) would otherwise show no committed offset and no lag in `/status` and the
/// metrics until its next record.
fn read_committed_offsets(consumer: &BaseConsumer<Context>, tracker: &Tracker, looked_up: &mut HashSet<Tp>) {
    let unknown = tracker.without_committed();
    // Forgets what was revoked (or became known): reassigned later, it is asked again.
    looked_up.retain(|tp| unknown.contains(tp));
    let mut query = TopicPartitionList::new();
    for tp in unknown.iter().filter(|tp| !looked_up.contains(*tp)) {
        query.add_partition(&tp.0, tp.1);
    }
    if query.count() == 0 {
        return;
    }
    // On the group thread, so briefly: a broker that does not answer is asked again next time.
    let Ok(found) = consumer.committed_offsets(query, Timeout::After(Duration::from_millis(500))) else {
        return;
    };
    let mut committed = Vec::new();
    for e in found.elements() {
        let tp: Tp = (e.topic().into(), e.partition());
        if let Offset::Offset(o) = e.offset() {
            committed.push((tp.clone(), o));
        }
        looked_up.insert(tp);
    }
    tracker.committed(&committed);
}

/// Pauses the assigned partitions no route reads: a route's pattern matched a topic that route
/// writes to. The group gives them to a member all the same; they stay unread and uncommitted,
/// here and on every other instance with this config.
fn pause_unread(c: &BaseConsumer<Context>, unread: &[Tp]) {
    if unread.is_empty() {
        return;
    }
    let mut tpl = TopicPartitionList::new();
    for (topic, partition) in unread {
        tpl.add_partition(topic, *partition);
    }
    if let Err(e) = c.pause(&tpl) {
        tracing::error!(error = %e, "Cannot pause the partitions no route reads");
    }
    let names: BTreeSet<&str> = unread.iter().map(|(t, _)| &**t).collect();
    tracing::info!(
        topics = %names.into_iter().collect::<Vec<_>>().join(","),
        "Not read: a route's pattern matches these topics, but that route writes to them (its replies would come back to it forever)"
    );
}

/// Whether a partition may take another record.
enum Room {
    Free,
    /// Not until records end: its in-flight bound is the only reason.
    Bound,
    /// Not while another reason holds (an operator's pause, the service unready, the circuit,
    /// the group's confirmation of this member overdue).
    Held,
}

/// Whether `tp` may take another record: only when no pause reason holds. The reasons are
/// recorded for status.
fn room(ctx: &Context, tp: &Tp) -> Room {
    let Some(route) = ctx.routes.route_for(&tp.0) else {
        return Room::Free;
    };
    let (b, load) = (&ctx.bounds[route], ctx.tracker.load(tp));
    let mut reasons: Vec<PauseReason> = ctx.control.held(route).collect();
    if !ctx.gate.is_open() {
        reasons.push(PauseReason::Unready);
    }
    if !ctx.lanes.accepting(route) {
        reasons.push(PauseReason::Circuit);
    }
    if ctx.membership.in_doubt(Instant::now) {
        reasons.push(PauseReason::Unconfirmed);
    }
    if load.window >= b.per_partition
        || load.route_window >= b.total
        || load.route_bytes as u64 >= b.max_bytes.0
    {
        reasons.push(PauseReason::Bound);
        // Woken when a quarter of the bound is free again: a batch to take per wake-up, not a
        // record, and calls still in flight meanwhile.
        let resume = |bound: usize| bound - bound.div_ceil(4);
        ctx.tracker.wake_when_room(
            tp,
            Load {
                window: resume(b.per_partition),
                route_window: resume(b.total),
                route_bytes: resume(usize::try_from(b.max_bytes.0).unwrap_or(usize::MAX)),
            },
        );
    }
    let room = match reasons.as_slice() {
        [] => Room::Free,
        [PauseReason::Bound] => Room::Bound,
        _ => Room::Held,
    };
    ctx.tracker.set_paused(tp, &reasons);
    room
}

fn take(
    ctx: &Context,
    msg: &BorrowedMessage<'_>,
    routes: &RouteTable,
    topics: &mut HashMap<String, (Arc<str>, usize)>,
) {
    let (topic, route) = match topics.get(msg.topic()) {
        Some(entry) => entry.clone(),
        None => {
            let Some(route) = routes.route_for(msg.topic()) else {
                tracing::warn!(topic = msg.topic(), "Record from a topic no route reads; skipped");
                return;
            };
            let entry = (Arc::<str>::from(msg.topic()), route);
            topics.insert(msg.topic().to_string(), entry.clone());
            entry
        }
    };
    let tp: Tp = (topic.clone(), msg.partition());
    let size = msg.key().map_or(0, <[u8]>::len) + msg.payload().map_or(0, <[u8]>::len);
    // `None`: the partition is being revoked or this offset was seen; not ours to handle.
    let Some(lease) = ctx.tracker.track(&tp, msg.offset(), size) else {
        return;
    };
    ctx.route_metrics[route].received();
    ctx.lanes.dispatch(Record::from_message(msg, topic, route, lease));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_consumer_waits_at_most_100_ms_for_a_fetch_unless_told_otherwise() {
        let mut client = ClientConfig::new();
        settings(&mut client, false);
        assert_eq!(client.get("fetch.wait.max.ms"), Some("100"));
        assert_eq!(client.get("fetch.queue.backoff.ms"), Some("20"));

        let mut client = ClientConfig::new();
        client.set("fetch.wait.max.ms", "500");
        settings(&mut client, false);
        assert_eq!(
            client.get("fetch.wait.max.ms"),
            Some("500"),
            "the user's value stands"
        );
    }

    #[test]
    fn membership_is_in_doubt_only_after_a_whole_session_without_a_commit_taken() {
        let session = Duration::from_secs(6);
        let m = Membership::new(Some(session));
        let t0 = Instant::now();
        let at = |d: Duration| move || t0 + d;
        assert!(!m.in_doubt(at(session * 10)), "no commit tried: nothing to doubt");
        m.committing(t0);
        // A later commit, refused too, does not restart the clock.
        m.committing(t0 + Duration::from_secs(5));
        assert!(!m.in_doubt(at(session)));
        assert!(m.in_doubt(at(session + Duration::from_millis(1))));
        m.confirmed();
        assert!(!m.in_doubt(at(session * 2)));
        m.committing(t0 + session * 2);
        assert!(!m.in_doubt(at(session * 3)));
        assert!(m.in_doubt(at(session * 3 + Duration::from_millis(1))));

        let unguarded = Membership::new(None);
        unguarded.committing(t0);
        assert!(!unguarded.in_doubt(at(session * 10)));
    }

    #[test]
    fn membership_session_is_the_classic_protocols_and_not_for_exactly_once() {
        let mut client = ClientConfig::new();
        assert_eq!(
            Membership::session_of(&client, false),
            Some(Duration::from_secs(45))
        );
        client.set("session.timeout.ms", "6000");
        assert_eq!(
            Membership::session_of(&client, false),
            Some(Duration::from_secs(6))
        );
        assert_eq!(Membership::session_of(&client, true), None);
        client.set("group.protocol", "consumer");
        assert_eq!(Membership::session_of(&client, false), None);
    }

    fn routes(yaml_routes: &str) -> Vec<Route> {
        let text = format!("kafka:\n  brokers: 127.0.0.1:9092\n  group_id: g\nroutes:\n{yaml_routes}");
        let interpolator = crate::config::Interpolator::from_pairs(&[]);
        crate::config::parse(&text, std::path::Path::new("t.yaml"), &interpolator)
            .unwrap_or_else(|e| panic!("{e}"))
            .routes
    }

    fn route(name: &str, from: &str, reply: &str, dlq: &str) -> String {
        format!(
            "  - name: {name}\n    from: {from}\n    call: {{ http: {{ url: http://127.0.0.1:1/ }} }}\n    reply: {{ to: {reply} }}\n    dead_letter: {{ to: {dlq} }}\n"
        )
    }

    #[test]
    fn a_topic_belongs_to_the_route_that_names_it_then_to_the_first_pattern_that_does_not_write_it() {
        let config = routes(
            &[
                route(
                    "named",
                    "{ topics: [orders.priority] }",
                    "orders.priority.out",
                    "named.dlq",
                ),
                route(
                    "pattern",
                    "{ pattern: '^orders\\..*' }",
                    "orders.processed",
                    "orders.dlq",
                ),
                route("fallback", "{ pattern: 'orders' }", "done", "fallback.dlq"),
            ]
            .concat(),
        );
        let table = RouteTable::new(&config).unwrap();
        assert_eq!(
            table.route_for("orders.priority"),
            Some(0),
            "named beats a pattern"
        );
        assert_eq!(
            table.route_for("orders.new"),
            Some(1),
            "the first pattern that matches"
        );
        assert_eq!(
            table.route_for("orders.processed"),
            Some(2),
            "not its own replies: the next pattern's"
        );
        assert_eq!(table.route_for("orders.dlq"), Some(2), "nor its own dead letters");
        assert_eq!(
            table.route_for("orders.priority.out"),
            Some(1),
            "another route's output is a topic like any"
        );
        assert_eq!(table.route_for("payments"), None);

        let alone = routes(&route(
            "pattern",
            "{ pattern: '^orders\\..*' }",
            "orders.processed",
            "orders.dlq",
        ));
        let table = RouteTable::new(&alone).unwrap();
        assert_eq!(
            table.route_for("orders.processed"),
            None,
            "read by no route: paused"
        );
        assert_eq!(table.route_for("orders.dlq"), None);
    }

    #[test]
    fn a_repeated_client_error_is_logged_once_per_quiet_period_with_the_count_held_back() {
        let errors = ClientErrors::default();
        let t0 = Instant::now();
        let down = "Global error: AllBrokersDown";
        assert_eq!(errors.admit(down, t0), Some(0), "the first is logged");
        for ms in (50..3_000).step_by(50) {
            assert_eq!(errors.admit(down, t0 + Duration::from_millis(ms)), None);
        }
        assert_eq!(
            errors.admit("Global error: Authentication", t0 + Duration::from_secs(3)),
            Some(0),
            "another error is logged at once"
        );
        assert_eq!(
            errors.admit(down, t0 + ClientErrors::QUIET),
            Some(59),
            "after the quiet period, with how many were held back"
        );
        assert_eq!(
            errors.admit(down, t0 + ClientErrors::QUIET + Duration::from_secs(1)),
            None
        );
    }
}
