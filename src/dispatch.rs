//! Lanes: which records may run concurrently and which must wait for each other.
//!
//! Fed by the consumer's intake with records in partition order; feeds the route handlers. A lane
//! is a sequence of records handled strictly one after another: one per key (`ordering: key`,
//! with each null-key record a lane of its own), one per partition (`partition`), or one per
//! record (`none`). A lane that has work has exactly one task running it; an in-place retry holds
//! back only its own lane. A lane calls its next record as soon as the previous one's output is
//! with the producer, and settles the broker's answers in order meanwhile (see `Window`). How
//! many records are taken at all is bounded upstream, by pausing the partition (see `consume`),
//! never by blocking the intake.

use std::collections::VecDeque;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::Poll;

use bytes::Bytes;
use futures::FutureExt;
use hashbrown::{Equivalent, HashMap};
use tokio::runtime::Handle;
use tokio::sync::Notify;

use crate::config::Ordering;
use crate::offsets::{Lease, Tp};
use crate::produce::ProduceError;
use crate::record::Record;
use crate::route::{Pending, RouteHandler};

/// Which lane a record belongs to, within its partition.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Lane {
    Key(Bytes),
    /// A record that waits for nothing (null key in `key` mode, any record in `none` mode).
    Alone(i64),
    Partition,
}

impl Lane {
    pub fn of(record: &Record, ordering: Ordering) -> Lane {
        match (ordering, &record.key) {
            // A copy, not a view: the key shares its record's buffer (value included), which a
            // busy lane would otherwise keep for as long as records of its key keep coming.
            (Ordering::Key, Some(k)) => Lane::Key(Bytes::copy_from_slice(k)),
            (Ordering::Key, None) | (Ordering::None, _) => Lane::Alone(record.offset),
            (Ordering::Partition, _) => Lane::Partition,
        }
    }
}

/// The queues of busy lanes: pure bookkeeping, property-tested below.
pub struct Scheduler<T> {
    /// A lane is busy while it has an entry; the queue holds what waits behind the running one.
    /// Keys are record keys, which whoever writes the topic chooses: foldhash's per-map random
    /// seed keeps them from being picked to collide.
    busy: HashMap<(Tp, Lane), Busy<T>>,
}

/// A lane looked up by reference: it hashes as `(Tp, Lane)` does, field by field, so finding a
/// busy lane clones neither its partition nor its key.
#[derive(Hash)]
struct LaneRef<'a>(&'a Tp, &'a Lane);

impl Equivalent<(Tp, Lane)> for LaneRef<'_> {
    fn equivalent(&self, (tp, lane): &(Tp, Lane)) -> bool {
        self.0 == tp && self.1 == lane
    }
}

/// A busy lane: what waits behind its running item, and who to wake when more comes.
struct Busy<T> {
    queue: VecDeque<T>,
    /// Set by a lane task waiting on its writes with nothing queued (see [`Scheduler::watch`]).
    wake: Option<Arc<Notify>>,
}

impl<T> Default for Scheduler<T> {
    fn default() -> Self {
        Scheduler {
            busy: HashMap::default(),
        }
    }
}

impl<T> Scheduler<T> {
    /// Queues `item`; returns it back when its lane was idle and it should start now.
    pub fn push(&mut self, tp: &Tp, lane: Lane, item: T) -> Option<T> {
        match self.busy.get_mut(&LaneRef(tp, &lane)) {
            Some(busy) => {
                busy.queue.push_back(item);
                if let Some(wake) = &busy.wake {
                    wake.notify_one();
                }
                None
            }
            None => {
                let idle = Busy {
                    queue: VecDeque::new(),
                    wake: None,
                };
                self.busy.insert((tp.clone(), lane), idle);
                Some(item)
            }
        }
    }

    /// The lane's running item finished and the lane stays busy (its writes are still settling):
    /// returns the next item to run, if one is queued. With `conflate`, only the newest queued
    /// item runs; the older ones are returned to be finished without running
    /// (freshness.conflate).
    pub fn next(&mut self, tp: &Tp, lane: &Lane, conflate: bool) -> (Option<T>, Vec<T>) {
        let Some(Busy { queue, .. }) = self.busy.get_mut(&LaneRef(tp, lane)) else {
            return (None, Vec::new());
        };
        if conflate {
            let newest = queue.pop_back();
            (newest, queue.drain(..).collect())
        } else {
            (queue.pop_front(), Vec::new())
        }
    }

    /// From now on, an item queued on the busy lane also notifies `wake` (a permit is kept if
    /// nobody waits yet, so an item queued before the wait begins is not missed).
    pub fn watch(&mut self, tp: &Tp, lane: &Lane, wake: &Arc<Notify>) {
        if let Some(busy) = self.busy.get_mut(&LaneRef(tp, lane)) {
            if busy.wake.is_none() {
                busy.wake = Some(wake.clone());
            }
        }
    }

    /// As `next`, and the lane stops being busy when nothing is queued.
    pub fn done(&mut self, tp: &Tp, lane: &Lane, conflate: bool) -> (Option<T>, Vec<T>) {
        let next = self.next(tp, lane, conflate);
        if next.0.is_none() {
            self.busy.remove(&LaneRef(tp, lane));
        }
        next
    }

    /// Busy lanes (for tests and status).
    pub fn busy(&self) -> usize {
        self.busy.len()
    }
}

/// The lanes of every route, shared by the consumer's intake (which adds records) and the lane
/// tasks (which take the next record of their lane).
pub struct Lanes {
    runtime: Handle,
    handlers: Arc<Vec<RouteHandler>>,
    scheduler: Arc<Mutex<Scheduler<Record>>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Lanes {
    pub fn new(runtime: Handle, handlers: Arc<Vec<RouteHandler>>) -> Self {
        Lanes {
            runtime,
            handlers,
            scheduler: Arc::default(),
        }
    }

    /// Whether `route` takes new records: not while its circuit is open.
    pub fn accepting(&self, route: usize) -> bool {
        self.handlers[route].circuit.takes_records()
    }

    /// Queues `record` on its lane; starts a task for the lane if it was idle.
    pub fn dispatch(&self, record: Record) {
        let ordering = self.handlers[record.route].config.ordering;
        let lane = Lane::of(&record, ordering);
        let tp = record.lease.tp.clone();
        let Some(first) = lock(&self.scheduler).push(&tp, lane.clone(), record) else {
            return;
        };
        let handlers = self.handlers.clone();
        let scheduler = self.scheduler.clone();
        // Conflating only makes sense among records of one key.
        let conflate = matches!(lane, Lane::Key(_))
            && handlers[first.route]
                .config
                .freshness
                .as_ref()
                .is_some_and(|f| f.conflate);
        // Boxed: tokio copies a task's future whole as it starts and ends it, and a lane's is
        // kilobytes; a box is a pointer.
        self.runtime.spawn(Box::pin(async move {
            let handler = &handlers[first.route];
            let take = |release: bool| {
                let mut scheduler = lock(&scheduler);
                let (next, older) = if release {
                    scheduler.done(&tp, &lane, conflate)
                } else {
                    scheduler.next(&tp, &lane, conflate)
                };
                drop(scheduler);
                for r in older {
                    handler.expire(&r);
                }
                next
            };
            let mut window = Window::default();
            // Made when the lane first waits on its writes with nothing queued.
            let mut wake: Option<Arc<Notify>> = None;
            let mut next = Some(first);
            loop {
                while let Some(r) = next {
                    let (lease, offset) = (r.lease.clone(), r.offset);
                    // Pinned where it is made, not in `alongside` nor with `tokio::pin!`: a
                    // future moved once more is laid out twice in this task (9.6 KB against
                    // 5.3 KB), and tokio copies a task whole as it starts and ends it.
                    let started = std::pin::pin!(AssertUnwindSafe(handler.start(r)).catch_unwind());
                    match window.alongside(handler, started).await {
                        Ok(Some(pending)) => window.push(pending),
                        Ok(None) => {}
                        Err(_) => given_up(handler, &lease, offset),
                    }
                    window.repair(handler).await;
                    next = take(false);
                }
                // Nothing queued. The lane is released only once its writes are settled, so
                // that a failed one is written again before any write of a later record; but a
                // record that arrives meanwhile is called at once, as it would have been had it
                // come a moment sooner (else a lane waits a produce round trip, or a broker's
                // whole outage, whenever its records come slower than its calls end).
                while window.is_open() {
                    let wake = wake.get_or_insert_with(|| Arc::new(Notify::new()));
                    lock(&scheduler).watch(&tp, &lane, wake);
                    next = take(false);
                    // Woken with nothing queued: a permit left by a record already taken.
                    if next.is_some() || !window.settle_unless(handler, wake).await {
                        break;
                    }
                }
                if next.is_some() {
                    continue;
                }
                next = take(true);
                if next.is_none() {
                    break;
                }
            }
        }));
    }
}

/// The writes of one lane whose acknowledgements are still to come, oldest first.
///
/// A lane calls its next record as soon as the previous one's output is with the producer, not
/// when the broker has acknowledged it: the idempotent producer keeps the order of what it is
/// given, per partition, so a lane of one partition (`ordering: partition`) or one busy key
/// costs one call per record rather than a call and a produce round trip. The answers are
/// settled in lane order. When a write fails and must be written again, every later write of
/// the lane (which may have landed meanwhile) is written again after it, so that the last copy
/// of each output follows lane order; the duplicates are bounded by the window, which the
/// partition's in-flight bound bounds.
#[derive(Default)]
struct Window {
    writes: VecDeque<Pending>,
    /// The oldest write, taken out of `writes`, failed and must be written again before the rest.
    /// (Boxed, like the futures of the rare paths below: every lane task carries a window, and
    /// a burst of records can make hundreds of lanes at once.)
    failed: Option<Box<(Pending, ProduceError)>>,
}

impl Window {
    fn push(&mut self, pending: Pending) {
        // Mostly a lane has one write at a time: room for one, not the default four.
        if self.writes.capacity() == 0 {
            self.writes.reserve_exact(1);
        }
        self.writes.push_back(pending);
    }

    /// Runs `work` (the lane's next record) to its end, settling acknowledgements meanwhile.
    async fn alongside<F: Future>(&mut self, handler: &RouteHandler, mut work: Pin<&mut F>) -> F::Output {
        loop {
            let oldest = std::future::poll_fn(|cx| match self.writes.front_mut() {
                Some(p) if self.failed.is_none() => Pin::new(p.acknowledgement()).poll(cx),
                _ => Poll::Pending,
            });
            tokio::select! {
                biased;
                acked = oldest => self.answered(handler, acked),
                out = work.as_mut() => return out,
            }
        }
    }

    /// Whether writes still await their answers (or a failed one its repair).
    fn is_open(&self) -> bool {
        !self.writes.is_empty() || self.failed.is_some()
    }

    /// Settles every write, in order, unless `wake` is notified first: then returns `true` with
    /// what is left still to settle.
    async fn settle_unless(&mut self, handler: &RouteHandler, wake: &Notify) -> bool {
        loop {
            self.repair(handler).await;
            let Some(oldest) = self.writes.front_mut() else {
                return false;
            };
            tokio::select! {
                biased;
                acked = oldest.acknowledgement() => self.answered(handler, acked),
                _ = wake.notified() => return true,
            }
        }
    }

    /// The oldest write has its answer. Not async, so that it takes no room in the lane's task:
    /// a failed write is left to `repair`.
    fn answered(&mut self, handler: &RouteHandler, acked: Result<(), ProduceError>) {
        let Some(oldest) = self.writes.pop_front() else {
            return;
        };
        match acked {
            Ok(()) => {
                let (lease, offset) = (oldest.record().lease.clone(), oldest.record().offset);
                let ended = std::panic::catch_unwind(AssertUnwindSafe(|| handler.acknowledged(oldest)));
                if ended.is_err() {
                    given_up(handler, &lease, offset);
                }
            }
            Err(e) => self.failed = Some(Box::new((oldest, e))),
        }
    }

    /// After a failed write: writes it again until acknowledged, then writes every later write
    /// of the lane again after it, once the broker has answered its first try. A write refused as
    /// too large never landed: its record is dead-lettered instead, and nothing is written again.
    async fn repair(&mut self, handler: &RouteHandler) {
        let Some(failed) = self.failed.take() else {
            return;
        };
        let writes = &mut self.writes;
        Box::pin(async move {
            let (failed, error) = *failed;
            // Later writes may have landed before it, unless it was refused for its size.
            let overtaken = matches!(error, ProduceError::NotAcknowledged(_));
            guarded(handler, failed, |p| handler.settle(p, Err(error))).await;
            if !overtaken {
                return;
            }
            while let Some(mut later) = writes.pop_front() {
                let acked = later.acknowledgement().await;
                guarded(handler, later, |p| handler.rewrite(p, acked)).await;
            }
        })
        .await
    }
}

/// Runs `f` on a pending record; should it panic, gives the record up.
async fn guarded<F, Fut>(handler: &RouteHandler, pending: Pending, f: F)
where
    F: FnOnce(Pending) -> Fut,
    Fut: Future<Output = ()>,
{
    let (lease, offset) = (pending.record().lease.clone(), pending.record().offset);
    if AssertUnwindSafe(f(pending)).catch_unwind().await.is_err() {
        given_up(handler, &lease, offset);
    }
}

/// A bug must not wedge the lane: the record is given up (the next owner or the next run repeats
/// it) and the lane goes on.
fn given_up(handler: &RouteHandler, lease: &Lease, offset: i64) {
    tracing::error!(topic = %lease.tp.0, partition = lease.tp.1, offset, "Handling a record panicked; it is left uncommitted");
    handler.give_up(lease, offset);
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn conflating_keeps_the_newest_queued_item() {
        let tp: Tp = (Arc::from("t"), 0);
        let lane = Lane::Key(Bytes::from_static(b"k"));
        let mut s: Scheduler<u32> = Scheduler::default();
        assert_eq!(s.push(&tp, lane.clone(), 0), Some(0));
        for i in 1..=4 {
            assert_eq!(s.push(&tp, lane.clone(), i), None);
        }
        assert_eq!(s.done(&tp, &lane, true), (Some(4), vec![1, 2, 3]));
        assert_eq!(s.done(&tp, &lane, true), (None, vec![]));
        assert_eq!(s.busy(), 0);
    }

    proptest! {
        /// Whatever the keys and the completion order: at most one record per lane runs at a
        /// time, and each lane's records start in the order they were pushed.
        #[test]
        fn lanes_keep_order_and_exclusivity(
            keys in proptest::collection::vec(0u8..6, 1..150),
            picks in proptest::collection::vec(any::<proptest::sample::Index>(), 150),
        ) {
            let tp: Tp = (Arc::from("t"), 0);
            let mut s: Scheduler<(u8, usize)> = Scheduler::default();
            let mut running: Vec<(u8, usize)> = Vec::new();
            let mut started: HashMap<u8, Vec<usize>> = HashMap::new();
            let lane = |k: u8| Lane::Key(Bytes::from(vec![k]));
            let mut pick = picks.iter().cycle();
            for (i, &k) in keys.iter().enumerate() {
                if let Some(item) = s.push(&tp, lane(k), (k, i)) {
                    prop_assert!(!running.iter().any(|(rk, _)| *rk == k), "two records of key {} at once", k);
                    running.push(item);
                    started.entry(k).or_default().push(i);
                }
                // Finish a random running record now and then.
                if i % 2 == 0 && !running.is_empty() {
                    let (k, _) = running.swap_remove(pick.next().unwrap().index(running.len()));
                    if let Some(next) = s.done(&tp, &lane(k), false).0 {
                        running.push(next);
                        started.entry(k).or_default().push(next.1);
                    }
                }
            }
            while !running.is_empty() {
                let (k, _) = running.swap_remove(pick.next().unwrap().index(running.len()));
                if let Some(next) = s.done(&tp, &lane(k), false).0 {
                    prop_assert!(!running.iter().any(|(rk, _)| *rk == k));
                    running.push(next);
                    started.entry(k).or_default().push(next.1);
                }
            }
            prop_assert_eq!(s.busy(), 0);
            for (k, order) in started {
                let pushed: Vec<usize> = keys.iter().enumerate().filter(|(_, x)| **x == k).map(|(i, _)| i).collect();
                prop_assert_eq!(order, pushed, "key {} out of order", k);
            }
        }
    }
}
