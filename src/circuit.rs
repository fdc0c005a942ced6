//! The circuit breaker of a route (SPEC §1, "the service is down, not the record").
//!
//! Fed with the result of every call; consulted before every call. When most calls in the window
//! fail for a retryable reason the circuit opens: the route takes no new records, one probe call
//! at a time tests the service (every `probe_every`), and the attempts made meanwhile do not count
//! towards `max_attempts`. A successful probe closes it. A call that cannot connect at all (the
//! service not listening, as while it restarts) opens it at once, whatever the window holds, and
//! any answer to a probe then closes it. A service restart therefore never turns a backlog, or
//! the few records of a quiet route, into dead letters.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tokio::sync::Notify;

use crate::config;

/// What a caller may do now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// The circuit is closed: call, and the attempt counts.
    Call,
    /// The circuit is open and this call is its probe: the attempt does not count.
    Probe,
}

/// What a call's result says about the service.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// It answered, whatever the answer.
    Fine,
    /// It failed for a retryable reason (a timeout, a 5xx, a broken connection): perhaps the
    /// service, perhaps this record; the window of recent calls decides.
    Failed,
    /// No connection could be opened: the service is not there (restarting, say), whatever
    /// the record. The circuit opens at once, so a record that arrives while the service is
    /// away waits for it instead of spending its attempts: below `min_calls` failures a quiet
    /// route would otherwise dead-letter everything sent during a restart.
    Unreachable,
}

#[derive(Debug)]
enum State {
    Closed,
    /// Since when, and whether a probe is out.
    Open {
        next_probe: Instant,
        probing: bool,
        /// Opened because the service could not be reached (not because most calls failed):
        /// any answer to a probe shows it is back.
        refused: bool,
    },
}

/// The calls of the last `window`, counted in time slices so that recording a call costs the
/// same at 10 calls/s as at 50 000 (a list of every call made the breaker the hottest code of a
/// busy route). A slice leaves the window whole, so the window reaches back up to one slice
/// further than configured.
#[derive(Debug)]
struct Window {
    length: Duration,
    slices: VecDeque<Slice>,
    calls: u32,
    failures: u32,
}

#[derive(Debug)]
struct Slice {
    start: Instant,
    calls: u32,
    failures: u32,
}

/// Slices per window.
const SLICES: u32 = 16;

impl Window {
    fn new(length: Duration) -> Self {
        Window {
            length,
            slices: VecDeque::with_capacity(SLICES as usize + 1),
            calls: 0,
            failures: 0,
        }
    }

    fn slice(&self) -> Duration {
        (self.length / SLICES).max(Duration::from_millis(1))
    }

    fn record(&mut self, now: Instant, failed: bool) {
        let slice = self.slice();
        while let Some(old) = self.slices.front() {
            if now.saturating_duration_since(old.start) <= self.length + slice {
                break;
            }
            self.calls -= old.calls;
            self.failures -= old.failures;
            self.slices.pop_front();
        }
        match self.slices.back_mut() {
            Some(last) if now.saturating_duration_since(last.start) < slice => {
                last.calls += 1;
                last.failures += u32::from(failed);
            }
            _ => self.slices.push_back(Slice {
                start: now,
                calls: 1,
                failures: u32::from(failed),
            }),
        }
        self.calls += 1;
        self.failures += u32::from(failed);
    }

    fn clear(&mut self) {
        self.slices.clear();
        self.calls = 0;
        self.failures = 0;
    }
}

#[derive(Debug)]
struct Inner {
    state: State,
    /// Recent calls, and how many failed for a retryable reason.
    calls: Window,
    /// Retryable failures in a row, whatever the window holds: a sudden outage after a long
    /// run of successes must open the circuit at once, not after as many failures.
    consecutive: u32,
}

pub struct Breaker {
    config: config::Circuit,
    inner: Mutex<Inner>,
    /// Wakes callers waiting for the circuit to close or for their turn to probe.
    changed: Notify,
}

impl Breaker {
    pub fn new(config: config::Circuit) -> Self {
        let window = Window::new(config.window.0);
        Breaker {
            config,
            inner: Mutex::new(Inner {
                state: State::Closed,
                calls: window,
                consecutive: 0,
            }),
            changed: Notify::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn is_closed(&self) -> bool {
        matches!(self.lock().state, State::Closed)
    }

    /// `closed`, `open`, or `half_open` while a probe is out: for status and metrics.
    pub fn state_name(&self) -> &'static str {
        match self.lock().state {
            State::Closed => "closed",
            State::Open { probing: true, .. } => "half_open",
            State::Open { probing: false, .. } => "open",
        }
    }

    /// Whether the route should take a new record: always while closed, and while open only when
    /// a probe is due and none is out — so an open circuit with nothing in flight (all of it
    /// revoked, say) still gets its probe from the next record.
    pub fn takes_records(&self) -> bool {
        match self.lock().state {
            State::Closed => true,
            State::Open {
                next_probe, probing, ..
            } => !probing && Instant::now() >= next_probe,
        }
    }

    /// Waits until a call may be made.
    pub async fn admit(&self) -> Admission {
        loop {
            let notified = self.changed.notified();
            let wait = {
                let mut inner = self.lock();
                match &mut inner.state {
                    State::Closed => return Admission::Call,
                    State::Open {
                        next_probe, probing, ..
                    } => {
                        let now = Instant::now();
                        if !*probing && now >= *next_probe {
                            *probing = true;
                            return Admission::Probe;
                        }
                        // Until the next probe is due (or until something changes).
                        next_probe
                            .saturating_duration_since(now)
                            .max(Duration::from_millis(10))
                    }
                }
            };
            tokio::select! {
                _ = notified => {}
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// An admitted call that was never made (the record could not be made into a request):
    /// it says nothing about the service. A probe's turn passes to the next record at once.
    pub fn not_called(&self, admission: Admission) {
        let mut inner = self.lock();
        if let (Admission::Probe, State::Open { probing, .. }) = (admission, &mut inner.state) {
            *probing = false;
            drop(inner);
            self.changed.notify_waiters();
        }
    }

    /// Records the result of a call admitted as `admission`, and says whether the attempt
    /// counts towards the record's `max_attempts`. It does not when the service, not the
    /// record, failed it: the call that opened the circuit, a call that ended while it was
    /// open, and the probes of a circuit that opened because most calls failed (SPEC §1). The
    /// probe of a circuit that opened because the service could not be reached closes it as
    /// soon as anything answers (the service is back) and counts as a call: a record that
    /// fails the service each time is the record's problem, and is dead-lettered after its
    /// attempts instead of probing for ever.
    pub fn record(&self, admission: Admission, verdict: Verdict) -> bool {
        let failed = verdict != Verdict::Fine;
        let now = Instant::now();
        let mut inner = self.lock();
        let open = |refused: bool| State::Open {
            next_probe: now + self.config.probe_every.0,
            probing: false,
            refused,
        };
        let counts = match (admission, &inner.state) {
            (Admission::Probe, State::Open { refused, .. })
                if verdict != Verdict::Unreachable && (!failed || *refused) =>
            {
                let refused = *refused;
                inner.state = State::Closed;
                inner.calls.clear();
                inner.consecutive = u32::from(failed);
                if failed {
                    inner.calls.record(now, true);
                }
                tracing::info!("Circuit closed: the service answers again");
                refused
            }
            (Admission::Probe, _) => {
                inner.state = open(verdict == Verdict::Unreachable);
                false
            }
            (Admission::Call, State::Closed) => {
                inner.consecutive = if failed { inner.consecutive + 1 } else { 0 };
                inner.calls.record(now, failed);
                let (total, failures) = (inner.calls.calls, inner.calls.failures);
                let mostly_failing = total >= self.config.min_calls
                    && f64::from(failures) >= self.config.failure_ratio * f64::from(total);
                if verdict == Verdict::Unreachable {
                    inner.state = open(true);
                    tracing::warn!(
                        "Circuit open: the service cannot be reached; probing it before taking more records"
                    );
                    false
                } else if mostly_failing || inner.consecutive >= self.config.min_calls {
                    inner.state = open(false);
                    tracing::warn!(
                        failures,
                        calls = total,
                        "Circuit open: the service is failing; probing it before taking more records"
                    );
                    false
                } else {
                    // Nothing changed that a waiter could act on.
                    return true;
                }
            }
            // A call admitted before the circuit opened: its failure is the outage's.
            (Admission::Call, State::Open { .. }) => return !failed,
        };
        drop(inner);
        self.changed.notify_waiters();
        counts
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> config::Circuit {
        config::Circuit {
            failure_ratio: 0.5,
            min_calls: 4,
            window: config::Dur(Duration::from_secs(10)),
            probe_every: config::Dur(Duration::from_millis(50)),
        }
    }

    #[test]
    fn the_window_forgets_calls_older_than_its_length_plus_a_slice() {
        let mut w = Window::new(Duration::from_secs(16));
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        for ms in 0..1000 {
            w.record(at(ms), ms % 2 == 0);
        }
        assert_eq!((w.calls, w.failures), (1000, 500));
        assert_eq!(w.slices.len(), 1, "one slice of 1 s holds the first second");
        // 16 s later the first slice is still within the window plus a slice...
        w.record(at(17_000), false);
        assert_eq!((w.calls, w.failures), (1001, 500));
        // ...and past that it is gone, whole.
        w.record(at(17_001), true);
        assert_eq!((w.calls, w.failures), (2, 1));
        // Steady traffic keeps at most a window's worth of slices.
        for ms in (17_002..100_000).step_by(7) {
            w.record(at(ms), false);
        }
        assert!(w.slices.len() <= SLICES as usize + 2, "{} slices", w.slices.len());
    }

    #[tokio::test]
    async fn a_call_never_made_neither_closes_nor_counts_and_passes_the_probe_on() {
        let b = Breaker::new(config());
        assert_eq!(b.admit().await, Admission::Call);
        b.record(Admission::Call, Verdict::Unreachable);
        let probe = b.admit().await;
        assert_eq!(probe, Admission::Probe);
        b.not_called(probe);
        assert_eq!(b.state_name(), "open", "the service was not reached: still open");
        let next = tokio::time::timeout(Duration::from_millis(20), b.admit()).await;
        assert_eq!(
            next.ok(),
            Some(Admission::Probe),
            "the next record probes at once"
        );
        b.record(Admission::Probe, Verdict::Fine);
        assert!(b.is_closed());
        b.not_called(Admission::Call);
        assert!(b.is_closed());
    }

    #[tokio::test]
    async fn opens_on_failures_probes_one_at_a_time_and_closes_on_success() {
        let b = Breaker::new(config());
        for verdict in [Verdict::Fine, Verdict::Failed, Verdict::Failed] {
            assert_eq!(b.admit().await, Admission::Call);
            b.record(Admission::Call, verdict);
        }
        assert!(b.is_closed(), "below min_calls");
        b.record(Admission::Call, Verdict::Failed);
        assert!(!b.is_closed(), "3 of 4 failed");

        let first = b.admit().await;
        assert_eq!(first, Admission::Probe);
        // A second caller waits while the probe is out.
        let second = tokio::time::timeout(Duration::from_millis(100), b.admit()).await;
        assert!(second.is_err(), "only one probe at a time");
        b.record(Admission::Probe, Verdict::Failed);
        assert!(!b.is_closed());
        assert_eq!(
            b.admit().await,
            Admission::Probe,
            "the next probe, after probe_every"
        );
        b.record(Admission::Probe, Verdict::Fine);
        assert!(b.is_closed());
        assert_eq!(b.admit().await, Admission::Call);
    }

    #[tokio::test]
    async fn a_sudden_outage_after_many_successes_opens_it_at_once() {
        let b = Breaker::new(config());
        for _ in 0..1000 {
            b.record(Admission::Call, Verdict::Fine);
        }
        for _ in 0..4 {
            b.record(Admission::Call, Verdict::Failed);
        }
        assert!(!b.is_closed(), "min_calls failures in a row open it");
    }

    #[tokio::test]
    async fn successes_keep_it_closed() {
        let b = Breaker::new(config());
        for i in 0..20 {
            let verdict = if i % 3 == 1 {
                Verdict::Failed
            } else {
                Verdict::Fine
            };
            b.record(Admission::Call, verdict);
        }
        assert!(b.is_closed(), "a third failing is below the ratio");
    }

    #[tokio::test]
    async fn a_service_that_cannot_be_reached_opens_it_at_the_first_call() {
        let b = Breaker::new(config());
        for _ in 0..1000 {
            b.record(Admission::Call, Verdict::Fine);
        }
        assert!(
            !b.record(Admission::Call, Verdict::Unreachable),
            "not the record's attempt"
        );
        assert!(
            !b.is_closed(),
            "a refused connection is the service's absence, not a record's fault"
        );
        assert_eq!(b.admit().await, Admission::Probe);
        assert!(!b.record(Admission::Probe, Verdict::Unreachable));
        assert!(!b.is_closed(), "still away");
        assert_eq!(b.admit().await, Admission::Probe);
        b.record(Admission::Probe, Verdict::Fine);
        assert!(b.is_closed(), "back");
    }

    #[tokio::test]
    async fn any_answer_to_the_probe_of_a_refused_service_closes_it_and_counts_as_the_record_s() {
        let b = Breaker::new(config());
        b.record(Admission::Call, Verdict::Unreachable);
        assert_eq!(b.admit().await, Admission::Probe);
        assert!(
            b.record(Admission::Probe, Verdict::Failed),
            "the service is back and failed this record: its attempt"
        );
        assert!(b.is_closed());

        // A circuit opened because most calls failed keeps SPEC §1: its probes are not the
        // record's attempts, and only a success closes it.
        for _ in 0..4 {
            b.record(Admission::Call, Verdict::Failed);
        }
        assert!(!b.is_closed());
        assert_eq!(b.admit().await, Admission::Probe);
        assert!(!b.record(Admission::Probe, Verdict::Failed));
        assert!(!b.is_closed());
    }
}
