//! Per-partition completion tracking: the only place that decides what may be committed.
//!
//! Fed by the consumer (`track` as records are taken, `assign`/`revoke`/`release` as the group
//! rebalances) and by the route handlers (`finish` once an outcome is safely in Kafka, `abandon`
//! when a record is given up because its partition is going away). It feeds the committer with
//! the contiguous watermark of each partition: the offset below which every record is final.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Instant;

use hashbrown::{HashMap, HashSet};
use tokio_util::sync::CancellationToken;

/// A topic and partition.
pub type Tp = (Arc<str>, i32);

/// The state of one taken record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Slot {
    /// Queued or being handled.
    Live,
    /// Its outcome is in Kafka (or it was dropped): committable once everything below is.
    Final,
    /// Given up because its partition went away (or its drain gave up on it); never committed
    /// past, so the next owner handles it again.
    Abandoned,
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    offset: i64,
    slot: Slot,
    /// Bytes it holds in memory while live.
    size: usize,
    /// When it was taken, for the age of the oldest record in flight.
    taken: Instant,
}

/// The records of one partition between its committable offset and the newest taken.
///
/// Offsets arrive in increasing order (with gaps: compaction, transaction markers), complete in
/// any order, and the watermark moves only over a prefix of finished records.
#[derive(Debug, Default)]
pub struct Window {
    /// Each taken record, in offset order.
    slots: VecDeque<Entry>,
    committable: Option<i64>,
    live: usize,
    /// Bytes held by live records (final ones no longer hold their data).
    live_bytes: usize,
}

impl Window {
    /// Records that `offset` was taken. Offsets at or below the newest taken are ignored (a
    /// repeat delivery after a seek), and `false` is returned.
    pub fn push(&mut self, offset: i64) -> bool {
        self.push_sized(offset, 0)
    }

    /// As `push`, for a record of `size` bytes.
    pub fn push_sized(&mut self, offset: i64, size: usize) -> bool {
        if let Some(last) = self.slots.back() {
            if offset <= last.offset {
                return false;
            }
        } else if let Some(c) = self.committable {
            if offset < c {
                return false;
            }
        }
        self.slots.push_back(Entry {
            offset,
            slot: Slot::Live,
            size,
            taken: Instant::now(),
        });
        self.live += 1;
        self.live_bytes += size;
        true
    }

    /// Marks `offset` final. Returns `false` if it was not live (unknown, already final or abandoned).
    pub fn finish(&mut self, offset: i64) -> bool {
        if !self.set(offset, Slot::Final) {
            return false;
        }
        while let Some(&Entry {
            offset: o,
            slot: Slot::Final,
            ..
        }) = self.slots.front()
        {
            self.committable = Some(o + 1);
            self.slots.pop_front();
        }
        true
    }

    /// Marks `offset` abandoned: no longer in flight, never committed past.
    pub fn abandon(&mut self, offset: i64) -> bool {
        self.set(offset, Slot::Abandoned)
    }

    fn set(&mut self, offset: i64, to: Slot) -> bool {
        let Ok(i) = self.slots.binary_search_by_key(&offset, |e| e.offset) else {
            return false;
        };
        let e = &mut self.slots[i];
        if e.slot != Slot::Live {
            return false;
        }
        e.slot = to;
        self.live -= 1;
        self.live_bytes -= e.size;
        true
    }

    /// The offset to commit: one past the last record of the finished prefix.
    pub fn committable(&self) -> Option<i64> {
        self.committable
    }

    /// Records taken and not yet final (queued, being handled).
    pub fn live(&self) -> usize {
        self.live
    }

    /// Records given up unfinished, which the next owner handles again.
    pub fn abandoned(&self) -> usize {
        self.slots.iter().filter(|e| e.slot == Slot::Abandoned).count()
    }

    pub fn live_bytes(&self) -> usize {
        self.live_bytes
    }

    /// When the oldest record still in flight was taken.
    pub fn oldest_live(&self) -> Option<Instant> {
        self.slots.iter().find(|e| e.slot == Slot::Live).map(|e| e.taken)
    }

    /// The first offset not yet final: the watermark, or the oldest taken record.
    pub fn position(&self) -> Option<i64> {
        self.slots.front().map(|e| e.offset).or(self.committable)
    }

    /// Every record between the watermark and the newest taken, finished ones included: what
    /// the in-flight bounds count.
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }
}

/// A record's tie to one assignment of its partition.
#[derive(Debug, Clone)]
pub struct Lease {
    pub tp: Tp,
    generation: u64,
    /// Cancelled when the partition starts draining (revoked, or ferry stopping). The record
    /// still goes on to its outcome, retries included, since every record that ends before the
    /// drain does is one the next owner need not repeat; only a wait with no end in sight (an
    /// open circuit, a retry topic's delay) gives up at once.
    pub draining: CancellationToken,
    /// Cancelled when the partition is released (its drain ended, done or timed out) or
    /// assigned anew: handlers give up at once, and a result would be discarded anyway.
    pub cancel: CancellationToken,
}

impl Lease {
    pub fn is_cancelled(&self) -> bool {
        self.cancel.is_cancelled()
    }
}

struct Partition {
    /// Index of the route that reads this partition's topic.
    route: usize,
    generation: u64,
    /// The leases' tokens: `draining` is a child of `cancel`, so a release also ends a drain.
    cancel: CancellationToken,
    draining: CancellationToken,
    window: Window,
    /// The last offset handed to the committer.
    requested: Option<i64>,
    /// The last offset the broker confirmed as committed.
    committed: Option<i64>,
    /// The partition's high watermark as of the consumer's last fetch.
    high_watermark: Option<i64>,
    /// Why ferry takes no records from this partition now (empty: it does).
    paused: Vec<PauseReason>,
    /// Set while a bound stops the intake from taking: the window length at or below which
    /// it is woken (see `Tracker::wake_when_room`).
    resume_at: Option<usize>,
}

#[derive(Default)]
struct State {
    partitions: HashMap<Tp, Partition>,
    next_generation: u64,
    /// Per route: the windows and live bytes of all its partitions, kept up to date on every
    /// change so the per-record bound check is O(1).
    routes: HashMap<usize, RouteLoad>,
}

#[derive(Debug, Default, Clone, Copy)]
struct RouteLoad {
    window: usize,
    bytes: usize,
    /// As `Partition::resume_at`, for the route's bounds: its window and live bytes.
    resume_at: Option<(usize, usize)>,
}

impl State {
    /// Applies `f` to a partition's window and carries the change into its route's totals.
    fn change<R>(&mut self, tp: &Tp, f: impl FnOnce(&mut Partition) -> R) -> Option<R> {
        let p = self.partitions.get_mut(tp)?;
        let (len, bytes) = (p.window.len(), p.window.live_bytes());
        let r = f(p);
        let (len2, bytes2) = (p.window.len(), p.window.live_bytes());
        let load = self.routes.entry(p.route).or_default();
        load.window = load.window + len2 - len;
        load.bytes = load.bytes + bytes2 - bytes;
        Some(r)
    }

    /// Whether `tp`'s load fell to where the intake asked to be woken (and disarms it).
    fn room_freed(&mut self, tp: &Tp) -> bool {
        let Some(p) = self.partitions.get_mut(tp) else {
            return false;
        };
        let mut freed = false;
        if p.resume_at.is_some_and(|at| p.window.len() <= at) {
            p.resume_at = None;
            freed = true;
        }
        if let Some(route) = self.routes.get_mut(&p.route)
            && route
                .resume_at
                .is_some_and(|(window, bytes)| route.window <= window && route.bytes <= bytes)
        {
            route.resume_at = None;
            freed = true;
        }
        freed
    }
}

/// The in-flight load that decides pausing.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Load {
    pub window: usize,
    pub route_window: usize,
    pub route_bytes: usize,
}

/// What the status of a partition looks like from outside.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionStatus {
    pub tp: Tp,
    /// Index of the route that reads it.
    pub route: usize,
    pub committed: Option<i64>,
    pub committable: Option<i64>,
    pub high_watermark: Option<i64>,
    /// Records between the group's position (committed, else the oldest not final) and the
    /// high watermark.
    pub lag: Option<i64>,
    pub in_flight: usize,
    pub window: usize,
    /// How long the oldest record in flight has been.
    pub oldest_in_flight: Option<std::time::Duration>,
    /// Why ferry takes no records from this partition now; empty when it does.
    pub paused: Vec<PauseReason>,
}

/// SPEC §1: pauses have reasons, and a partition resumes only when every reason has cleared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PauseReason {
    /// An in-flight bound (`concurrency`) is reached.
    Bound,
    /// The service's readiness probe fails.
    Unready,
    /// The route's circuit is open.
    Circuit,
    /// ferry is stopping, the partition is being revoked, or an operator asked for a drain.
    Drain,
    /// An operator paused the route (`POST /pause`).
    Operator,
    /// The group has not taken a commit from this member for a whole session: its partitions
    /// may have another owner (see `consume::Membership`).
    Unconfirmed,
}

impl PauseReason {
    pub fn as_str(self) -> &'static str {
        match self {
            PauseReason::Bound => "bound",
            PauseReason::Unready => "unready",
            PauseReason::Circuit => "circuit",
            PauseReason::Drain => "drain",
            PauseReason::Operator => "operator",
            PauseReason::Unconfirmed => "unconfirmed",
        }
    }
}

/// What [`Tracker::release`] leaves: the offsets still to commit for the released partitions,
/// the records still live (their results will be discarded) and those already given up (waiting
/// for an open circuit or a retry when their partition went); the next owner handles both again.
pub struct Released {
    pub commits: Vec<(Tp, i64)>,
    pub live: usize,
    pub abandoned: usize,
}

/// The shared tracker of every assigned partition.
pub struct Tracker {
    state: Mutex<State>,
    /// Signalled whenever a record stops being live, for drains to wait on.
    quiet: Condvar,
    /// Drains waiting on `quiet`: a record's end signals only when one waits.
    waiting: AtomicUsize,
    /// Signalled when a record's end frees the room a bound-stopped intake asked for.
    room: tokio::sync::Notify,
}

impl Tracker {
    pub fn new() -> Arc<Self> {
        Arc::new(Tracker {
            state: Mutex::new(State::default()),
            quiet: Condvar::new(),
            waiting: AtomicUsize::new(0),
            room: tokio::sync::Notify::new(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding this lock is a bug elsewhere; the data is still consistent
        // because every update is a single step.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts tracking newly assigned partitions, each with a fresh generation, with the index
    /// of the route that reads them.
    pub fn assign(&self, tps: &[(Tp, usize)]) {
        let mut s = self.lock();
        for (tp, route) in tps {
            s.next_generation += 1;
            let generation = s.next_generation;
            if let Some(old) = s.partitions.remove(tp) {
                old.cancel.cancel();
                let load = s.routes.entry(old.route).or_default();
                load.window -= old.window.len();
                load.bytes -= old.window.live_bytes();
            }
            let cancel = CancellationToken::new();
            s.partitions.insert(
                tp.clone(),
                Partition {
                    route: *route,
                    generation,
                    draining: cancel.child_token(),
                    cancel,
                    window: Window::default(),
                    requested: None,
                    committed: None,
                    high_watermark: None,
                    paused: Vec::new(),
                    resume_at: None,
                },
            );
        }
    }

    /// Records that `offset` was taken; `None` when the partition is not assigned or the
    /// offset was seen already.
    pub fn track(&self, tp: &Tp, offset: i64, size: usize) -> Option<Lease> {
        let mut s = self.lock();
        s.change(tp, |p| {
            if p.draining.is_cancelled() || !p.window.push_sized(offset, size) {
                return None;
            }
            Some(Lease {
                tp: tp.clone(),
                generation: p.generation,
                draining: p.draining.clone(),
                cancel: p.cancel.clone(),
            })
        })
        .flatten()
    }

    /// Marks a record final. `false` means its partition was released meanwhile and the result
    /// must be forgotten (the next owner repeats the record).
    pub fn finish(&self, lease: &Lease, offset: i64) -> bool {
        self.update(lease, |w| w.finish(offset))
    }

    /// Whether the lease's partition is still assigned under the same generation.
    pub fn owns(&self, lease: &Lease) -> bool {
        self.lock()
            .partitions
            .get(&lease.tp)
            .is_some_and(|p| p.generation == lease.generation)
    }

    /// Gives a record up without an outcome (its partition is going away).
    pub fn abandon(&self, lease: &Lease, offset: i64) -> bool {
        self.update(lease, |w| w.abandon(offset))
    }

    fn update(&self, lease: &Lease, f: impl FnOnce(&mut Window) -> bool) -> bool {
        let mut s = self.lock();
        let done = s
            .change(&lease.tp, |p| {
                p.generation == lease.generation && f(&mut p.window)
            })
            .unwrap_or(false);
        let room = done && s.room_freed(&lease.tp);
        drop(s);
        if room {
            self.room.notify_one();
        }
        // A drain waits on `quiet`; without one, a record's end costs no futex call.
        if done && self.waiting.load(Ordering::SeqCst) > 0 {
            self.quiet.notify_all();
        }
        done
    }

    /// Starts draining these partitions: no record is taken any more, and those taken go on
    /// to their outcomes until `release` (see `Lease::draining`).
    pub fn revoke(&self, tps: &[Tp]) {
        let s = self.lock();
        for tp in tps {
            if let Some(p) = s.partitions.get(tp) {
                p.draining.cancel();
            }
        }
    }

    /// Waits until no record of these partitions is live, or until `deadline`. Returns whether
    /// they went quiet.
    pub fn wait_quiet(&self, tps: &[Tp], deadline: Instant) -> bool {
        let mut s = self.lock();
        loop {
            let live: usize = tps
                .iter()
                .filter_map(|tp| s.partitions.get(tp))
                .map(|p| p.window.live())
                .sum();
            if live == 0 {
                return true;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            // Counted while the state lock is held, so an update after the wait began sees it.
            self.waiting.fetch_add(1, Ordering::SeqCst);
            s = self
                .quiet
                .wait_timeout(s, deadline - now)
                .map(|(g, _)| g)
                .unwrap_or_else(|p| p.into_inner().0);
            self.waiting.fetch_sub(1, Ordering::SeqCst);
        }
    }

    /// The offsets the broker last confirmed for these partitions (their last commits that
    /// succeeded).
    pub fn acknowledged(&self, tps: &[Tp]) -> Vec<(Tp, i64)> {
        let s = self.lock();
        tps.iter()
            .filter_map(|tp| Some((tp.clone(), s.partitions.get(tp)?.committed?)))
            .collect()
    }

    /// Forgets these partitions: the offsets still to commit for them, and the records that
    /// will not finish here.
    pub fn release(&self, tps: &[Tp]) -> Released {
        let mut s = self.lock();
        let mut commits = Vec::new();
        let (mut live, mut abandoned) = (0, 0);
        for tp in tps {
            if let Some(p) = s.partitions.remove(tp) {
                let load = s.routes.entry(p.route).or_default();
                load.window -= p.window.len();
                load.bytes -= p.window.live_bytes();
                p.cancel.cancel();
                live += p.window.live();
                abandoned += p.window.abandoned();
                if let Some(c) = p.window.committable() {
                    if p.committed != Some(c) {
                        commits.push((tp.clone(), c));
                    }
                }
            }
        }
        Released {
            commits,
            live,
            abandoned,
        }
    }

    /// Offsets that advanced since they were last handed out, for the periodic commit.
    pub fn take_commits(&self) -> Vec<(Tp, i64)> {
        let mut s = self.lock();
        let mut out = Vec::new();
        for (tp, p) in s.partitions.iter_mut() {
            if let Some(c) = p.window.committable() {
                if p.requested != Some(c) {
                    p.requested = Some(c);
                    out.push((tp.clone(), c));
                }
            }
        }
        out
    }

    /// Every committable offset, whether handed out before or not (for the final commit).
    pub fn all_commits(&self) -> Vec<(Tp, i64)> {
        let s = self.lock();
        s.partitions
            .iter()
            .filter_map(|(tp, p)| p.window.committable().map(|c| (tp.clone(), c)))
            .collect()
    }

    /// Notes offsets the broker confirmed.
    pub fn committed(&self, offsets: &[(Tp, i64)]) {
        let mut s = self.lock();
        for (tp, o) in offsets {
            if let Some(p) = s.partitions.get_mut(tp) {
                p.committed = Some(p.committed.map_or(*o, |c| c.max(*o)));
            }
        }
    }

    /// Forgets that these offsets were handed out, so the next periodic commit repeats them.
    pub fn commit_failed(&self, offsets: &[(Tp, i64)]) {
        let mut s = self.lock();
        for (tp, o) in offsets {
            if let Some(p) = s.partitions.get_mut(tp) {
                if p.requested == Some(*o) {
                    p.requested = None;
                }
            }
        }
    }

    pub fn set_paused(&self, tp: &Tp, reasons: &[PauseReason]) {
        if let Some(p) = self.lock().partitions.get_mut(tp) {
            if p.paused != reasons {
                p.paused = reasons.to_vec();
            }
        }
    }

    /// Asks to be woken (`room`) once `tp`'s load falls to `resume` in each dimension that is
    /// above it now: the partition's window, or its route's window and live bytes. A record's
    /// end that crosses it wakes the intake at once, where a nap would leave a bound-stopped
    /// partition idle for the rest of the nap after its records ended (at full speed, most of
    /// the time: a window of 32 ends in a few milliseconds).
    pub fn wake_when_room(&self, tp: &Tp, resume: Load) {
        let mut s = self.lock();
        let Some(p) = s.partitions.get_mut(tp) else {
            return;
        };
        let mut armed = false;
        if p.window.len() > resume.window {
            p.resume_at = Some(resume.window);
            armed = true;
        }
        let route = p.route;
        let load = s.routes.entry(route).or_default();
        if load.window > resume.route_window || load.bytes > resume.route_bytes {
            load.resume_at = Some((resume.route_window, resume.route_bytes));
            armed = true;
        }
        drop(s);
        // Records ended since the bound was checked: there is room already.
        if !armed {
            self.room.notify_one();
        }
    }

    /// Waits for a record's end to free the room asked for with `wake_when_room` (or returns at
    /// once if one did since the last wait).
    pub async fn room(&self) {
        self.room.notified().await;
    }

    /// What the in-flight bounds look at for `tp`: its window, and the windows and live bytes of
    /// all partitions of its route.
    pub fn load(&self, tp: &Tp) -> Load {
        let s = self.lock();
        let Some(p) = s.partitions.get(tp) else {
            return Load::default();
        };
        let route = s.routes.get(&p.route).copied().unwrap_or_default();
        Load {
            window: p.window.len(),
            route_window: route.window,
            route_bytes: route.bytes,
        }
    }

    /// Notes the partitions' high watermarks, as the consumer last saw them.
    pub fn set_high_watermarks(&self, marks: &[(Tp, i64)]) {
        let mut s = self.lock();
        for (tp, h) in marks {
            if let Some(p) = s.partitions.get_mut(tp) {
                p.high_watermark = Some(*h);
            }
        }
    }

    /// Live records across every partition.
    pub fn live(&self) -> usize {
        self.lock().partitions.values().map(|p| p.window.live()).sum()
    }

    /// The assigned partitions with no committed offset known yet.
    pub fn without_committed(&self) -> HashSet<Tp> {
        let s = self.lock();
        s.partitions
            .iter()
            .filter(|(_, p)| p.committed.is_none())
            .map(|(tp, _)| tp.clone())
            .collect()
    }

    pub fn assigned(&self) -> Vec<Tp> {
        self.lock().partitions.keys().cloned().collect()
    }

    pub fn status(&self) -> Vec<PartitionStatus> {
        let s = self.lock();
        let mut v: Vec<_> = s
            .partitions
            .iter()
            .map(|(tp, p)| {
                let position = p.committed.or_else(|| p.window.position());
                PartitionStatus {
                    tp: tp.clone(),
                    route: p.route,
                    committed: p.committed,
                    committable: p.window.committable(),
                    high_watermark: p.high_watermark,
                    lag: p.high_watermark.zip(position).map(|(h, c)| (h - c).max(0)),
                    in_flight: p.window.live(),
                    window: p.window.len(),
                    oldest_in_flight: p.window.oldest_live().map(|t| t.elapsed()),
                    paused: p.paused.clone(),
                }
            })
            .collect();
        v.sort_by(|a, b| a.tp.cmp(&b.tp));
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn watermark_waits_for_the_oldest_record() {
        let mut w = Window::default();
        for o in [10, 11, 13] {
            assert!(w.push(o));
        }
        assert!(w.finish(11));
        assert!(w.finish(13));
        assert_eq!(w.committable(), None, "10 is still live");
        assert!(w.finish(10));
        assert_eq!(w.committable(), Some(14));
        assert!(w.is_empty());
        assert!(!w.finish(10), "a second finish is refused");
        assert!(!w.push(12), "an offset below the watermark is a repeat");
    }

    #[test]
    fn an_abandoned_record_holds_the_watermark_but_is_not_live() {
        let mut w = Window::default();
        w.push(0);
        w.push(1);
        w.abandon(0);
        w.finish(1);
        assert_eq!(w.committable(), None);
        assert_eq!(w.live(), 0);
        assert_eq!(w.len(), 2);
        assert_eq!(w.abandoned(), 1);
    }

    #[test]
    fn a_release_counts_the_records_given_up_and_those_still_live() {
        let t = Tracker::new();
        let tp: Tp = (Arc::from("t"), 0);
        t.assign(&[(tp.clone(), 0)]);
        let waiting = t.track(&tp, 5, 10).unwrap();
        let done = t.track(&tp, 6, 10).unwrap();
        let _calling = t.track(&tp, 7, 10).unwrap();
        assert!(t.abandon(&waiting, 5));
        assert!(t.finish(&done, 6));
        let r = t.release(std::slice::from_ref(&tp));
        assert_eq!((r.commits, r.live, r.abandoned), (vec![], 1, 1));
    }

    #[test]
    fn late_results_of_a_released_partition_are_discarded() {
        let t = Tracker::new();
        let tp: Tp = (Arc::from("t"), 0);
        t.assign(&[(tp.clone(), 0)]);
        let old = t.track(&tp, 5, 10).unwrap();
        t.revoke(std::slice::from_ref(&tp));
        assert!(old.draining.is_cancelled(), "draining at the revoke");
        assert!(!old.is_cancelled(), "a draining record goes on to its outcome");
        assert!(t.track(&tp, 6, 10).is_none(), "nothing is taken while draining");
        let Released { commits, live, .. } = t.release(std::slice::from_ref(&tp));
        assert!(old.is_cancelled(), "given up at the release");
        assert!(commits.is_empty());
        assert_eq!(live, 1);
        t.assign(&[(tp.clone(), 0)]);
        let new = t.track(&tp, 5, 10).unwrap();
        assert!(!t.finish(&old, 5), "the old generation's result is dropped");
        assert!(t.finish(&new, 5));
        assert_eq!(t.take_commits(), vec![(tp.clone(), 6)]);
        assert!(
            t.take_commits().is_empty(),
            "unchanged offsets are not handed out twice"
        );
    }

    #[test]
    fn route_totals_follow_every_change() {
        let t = Tracker::new();
        let (a, b): (Tp, Tp) = ((Arc::from("t"), 0), (Arc::from("t"), 1));
        t.assign(&[(a.clone(), 7), (b.clone(), 7)]);
        let la = t.track(&a, 0, 100).unwrap();
        let _ = t.track(&a, 1, 50).unwrap();
        let lb = t.track(&b, 0, 10).unwrap();
        assert_eq!(
            t.load(&a),
            Load {
                window: 2,
                route_window: 3,
                route_bytes: 160
            }
        );
        assert!(t.finish(&la, 0));
        assert_eq!(
            t.load(&b),
            Load {
                window: 1,
                route_window: 2,
                route_bytes: 60
            }
        );
        assert!(t.abandon(&lb, 0));
        assert_eq!(
            t.load(&a),
            Load {
                window: 1,
                route_window: 2,
                route_bytes: 50
            }
        );
        t.release(std::slice::from_ref(&b));
        assert_eq!(
            t.load(&a),
            Load {
                window: 1,
                route_window: 1,
                route_bytes: 50
            }
        );
        t.assign(&[(a.clone(), 7)]);
        assert_eq!(
            t.load(&a),
            Load {
                window: 0,
                route_window: 0,
                route_bytes: 0
            },
            "a reassignment starts afresh"
        );
    }

    /// Whether `room()` has been signalled, without waiting.
    fn woken(t: &Tracker) -> bool {
        use futures::FutureExt;
        t.room().now_or_never().is_some()
    }

    #[test]
    fn a_bound_stopped_intake_is_woken_once_its_room_comes_back() {
        let t = Tracker::new();
        let (a, b): (Tp, Tp) = ((Arc::from("t"), 0), (Arc::from("t"), 1));
        t.assign(&[(a.clone(), 0), (b.clone(), 0)]);
        let leases: Vec<_> = (0..4).map(|o| t.track(&a, o, 10).unwrap()).collect();
        // A partition bound of 4: woken at 3.
        t.wake_when_room(
            &a,
            Load {
                window: 3,
                route_window: usize::MAX,
                route_bytes: usize::MAX,
            },
        );
        assert!(!woken(&t), "nothing ended yet");
        assert!(t.finish(&leases[1], 1));
        assert!(!woken(&t), "a record ending behind a live one frees no room");
        assert!(t.finish(&leases[0], 0));
        assert!(woken(&t), "the window fell to 2");
        assert!(t.finish(&leases[2], 2));
        assert!(!woken(&t), "disarmed until the intake asks again");

        // A route bound of 2 records: a record of another partition ending frees it.
        let lb = t.track(&b, 0, 10).unwrap();
        t.wake_when_room(
            &a,
            Load {
                window: usize::MAX,
                route_window: 1,
                route_bytes: usize::MAX,
            },
        );
        assert!(!woken(&t));
        assert!(t.finish(&lb, 0));
        assert!(woken(&t), "the route's window fell to 1");

        // And by bytes: 10 live bytes against a resume at 5.
        let _ = t.track(&b, 1, 10).unwrap();
        t.wake_when_room(
            &b,
            Load {
                window: usize::MAX,
                route_window: usize::MAX,
                route_bytes: 5,
            },
        );
        assert!(!woken(&t));
        assert!(t.finish(&leases[3], 3));
        assert!(!woken(&t), "still 10 live bytes");

        // Room that came back between the check and the asking wakes at once.
        t.wake_when_room(
            &a,
            Load {
                window: 1,
                route_window: usize::MAX,
                route_bytes: usize::MAX,
            },
        );
        assert!(woken(&t), "partition 0's window is empty already");
    }

    proptest! {
        /// Whatever the completion order, the watermark never passes a record that is not
        /// final, and ends one past the newest record once all are final.
        #[test]
        fn watermark_is_the_finished_prefix(
            gaps in proptest::collection::vec(1i64..4, 1..200),
            order in any::<proptest::sample::Index>(),
            abandon_at in proptest::option::of(any::<proptest::sample::Index>()),
        ) {
            let mut offsets = Vec::new();
            let mut o = 0;
            for g in &gaps { o += g; offsets.push(o); }
            let mut w = Window::default();
            for &o in &offsets { prop_assert!(w.push(o)); }
            let mut pending = offsets.clone();
            // A shuffle driven by proptest's input, so failures shrink.
            let mut seed = order.index(usize::MAX) as u64 | 1;
            let mut finished = std::collections::BTreeSet::new();
            let abandoned = abandon_at.map(|i| offsets[i.index(offsets.len())]);
            while !pending.is_empty() {
                seed ^= seed << 13; seed ^= seed >> 7; seed ^= seed << 17;
                let o = pending.swap_remove((seed % pending.len() as u64) as usize);
                if Some(o) == abandoned { prop_assert!(w.abandon(o)); continue; }
                prop_assert!(w.finish(o));
                finished.insert(o);
                if let Some(c) = w.committable() {
                    for &x in offsets.iter().filter(|&&x| x < c) {
                        prop_assert!(finished.contains(&x), "watermark {} passed live {}", c, x);
                    }
                }
            }
            prop_assert_eq!(w.live(), 0);
            match abandoned {
                None => prop_assert_eq!(w.committable(), Some(offsets[offsets.len() - 1] + 1)),
                Some(a) => {
                    let below = offsets.iter().filter(|&&x| x < a).max();
                    prop_assert_eq!(w.committable(), below.map(|b| b + 1));
                }
            }
        }
    }
}
