//! Lanes: which records may run concurrently and which must wait for each other.
//!
//! Fed by the consumer's intake with records in partition order; feeds the route handlers. A lane
//! is a sequence of records handled strictly one after another: one per key (`ordering: key`,
//! with each null-key record a lane of its own), one per partition (`partition`), or one per
//! record (`none`). A lane that has work has exactly one task running it; an in-place retry holds
//! back only its own lane. How many records are taken at all is bounded upstream, by pausing the
//! partition (see `consume`), never by blocking the intake.

use std::collections::{HashMap, VecDeque};
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use futures::FutureExt;
use tokio::runtime::Handle;

use crate::config::Ordering;
use crate::offsets::Tp;
use crate::record::Record;
use crate::route::RouteHandler;

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
            (Ordering::Key, Some(k)) => Lane::Key(k.clone()),
            (Ordering::Key, None) | (Ordering::None, _) => Lane::Alone(record.offset),
            (Ordering::Partition, _) => Lane::Partition,
        }
    }
}

/// The queues of busy lanes: pure bookkeeping, property-tested below.
pub struct Scheduler<T> {
    /// A lane is busy while it has an entry; the queue holds what waits behind the running one.
    busy: HashMap<(Tp, Lane), VecDeque<T>>,
}

impl<T> Default for Scheduler<T> {
    fn default() -> Self {
        Scheduler { busy: HashMap::new() }
    }
}

impl<T> Scheduler<T> {
    /// Queues `item`; returns it back when its lane was idle and it should start now.
    pub fn push(&mut self, tp: &Tp, lane: Lane, item: T) -> Option<T> {
        match self.busy.get_mut(&(tp.clone(), lane.clone())) {
            Some(queue) => {
                queue.push_back(item);
                None
            }
            None => {
                self.busy.insert((tp.clone(), lane), VecDeque::new());
                Some(item)
            }
        }
    }

    /// The running item of a lane finished; returns the next one to start, if any.
    pub fn done(&mut self, tp: &Tp, lane: &Lane) -> Option<T> {
        let key = (tp.clone(), lane.clone());
        let next = self.busy.get_mut(&key).and_then(VecDeque::pop_front);
        if next.is_none() {
            self.busy.remove(&key);
        }
        next
    }

    /// As `done`, keeping only the newest queued item: the older ones are returned to be
    /// finished without running (freshness.conflate).
    pub fn done_conflated(&mut self, tp: &Tp, lane: &Lane) -> (Option<T>, Vec<T>) {
        let key = (tp.clone(), lane.clone());
        let Some(queue) = self.busy.get_mut(&key) else {
            return (None, Vec::new());
        };
        let newest = queue.pop_back();
        let skipped = queue.drain(..).collect();
        if newest.is_none() {
            self.busy.remove(&key);
        }
        (newest, skipped)
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
        self.runtime.spawn(async move {
            let mut next = Some(first);
            while let Some(r) = next {
                let handler = &handlers[r.route];
                let (lease, offset) = (r.lease.clone(), r.offset);
                // A bug must not wedge the lane: give the record up (the next owner or the next
                // run repeats it) and go on with the lane.
                if AssertUnwindSafe(handler.handle(r)).catch_unwind().await.is_err() {
                    tracing::error!(topic = %lease.tp.0, partition = lease.tp.1, offset, "Handling a record panicked; it is left uncommitted");
                    handler.give_up(&lease, offset);
                }
                next = if conflate {
                    let (newest, older) = lock(&scheduler).done_conflated(&tp, &lane);
                    for r in older {
                        handler.expire(&r);
                    }
                    newest
                } else {
                    lock(&scheduler).done(&tp, &lane)
                };
            }
        });
    }
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
        assert_eq!(s.done_conflated(&tp, &lane), (Some(4), vec![1, 2, 3]));
        assert_eq!(s.done_conflated(&tp, &lane), (None, vec![]));
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
                    if let Some(next) = s.done(&tp, &lane(k)) {
                        running.push(next);
                        started.entry(k).or_default().push(next.1);
                    }
                }
            }
            while !running.is_empty() {
                let (k, _) = running.swap_remove(pick.next().unwrap().index(running.len()));
                if let Some(next) = s.done(&tp, &lane(k)) {
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
