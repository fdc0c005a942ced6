//! The circuit breaker of a route (SPEC §1, "the service is down, not the record").
//!
//! Fed with the result of every call; consulted before every call. When most calls in the window
//! fail for a retryable reason the circuit opens: the route takes no new records, one probe call
//! at a time tests the service (every `probe_every`), and the attempts made meanwhile do not count
//! towards `max_attempts`. A successful probe closes it. A service restart therefore never turns
//! a backlog into dead letters.

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

#[derive(Debug)]
enum State {
    Closed,
    /// Since when, and whether a probe is out.
    Open {
        next_probe: Instant,
        probing: bool,
    },
}

#[derive(Debug)]
struct Inner {
    state: State,
    /// Recent calls: when, and whether they failed for a retryable reason.
    calls: VecDeque<(Instant, bool)>,
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
        Breaker {
            config,
            inner: Mutex::new(Inner {
                state: State::Closed,
                calls: VecDeque::new(),
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
            State::Open { next_probe, probing } => !probing && Instant::now() >= next_probe,
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
                    State::Open { next_probe, probing } => {
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

    /// Records the result of a call admitted as `admission`. `failed`: it failed for a
    /// retryable reason (connection, timeout, 5xx, 408, 429, retryable gRPC codes).
    pub fn record(&self, admission: Admission, failed: bool) {
        let now = Instant::now();
        let mut inner = self.lock();
        match (admission, &inner.state) {
            (Admission::Probe, _) if !failed => {
                inner.state = State::Closed;
                inner.calls.clear();
                inner.consecutive = 0;
                tracing::info!("Circuit closed: the service answers again");
            }
            (Admission::Probe, _) => {
                inner.state = State::Open {
                    next_probe: now + self.config.probe_every.0,
                    probing: false,
                };
            }
            (Admission::Call, State::Closed) => {
                inner.consecutive = if failed { inner.consecutive + 1 } else { 0 };
                inner.calls.push_back((now, failed));
                while inner
                    .calls
                    .front()
                    .is_some_and(|(t, _)| now.duration_since(*t) > self.config.window.0)
                {
                    inner.calls.pop_front();
                }
                let total = inner.calls.len();
                let failures = inner.calls.iter().filter(|(_, f)| *f).count();
                let mostly_failing = total >= self.config.min_calls as usize
                    && failures as f64 >= self.config.failure_ratio * total as f64;
                if mostly_failing || inner.consecutive >= self.config.min_calls {
                    inner.state = State::Open {
                        next_probe: now + self.config.probe_every.0,
                        probing: false,
                    };
                    tracing::warn!(
                        failures,
                        calls = total,
                        "Circuit open: the service is failing; probing it before taking more records"
                    );
                }
            }
            // A call admitted before the circuit opened: its result is already accounted for.
            (Admission::Call, State::Open { .. }) => {}
        }
        drop(inner);
        self.changed.notify_waiters();
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

    #[tokio::test]
    async fn opens_on_failures_probes_one_at_a_time_and_closes_on_success() {
        let b = Breaker::new(config());
        for failed in [false, true, true] {
            assert_eq!(b.admit().await, Admission::Call);
            b.record(Admission::Call, failed);
        }
        assert!(b.is_closed(), "below min_calls");
        b.record(Admission::Call, true);
        assert!(!b.is_closed(), "3 of 4 failed");

        let first = b.admit().await;
        assert_eq!(first, Admission::Probe);
        // A second caller waits while the probe is out.
        let second = tokio::time::timeout(Duration::from_millis(100), b.admit()).await;
        assert!(second.is_err(), "only one probe at a time");
        b.record(Admission::Probe, true);
        assert!(!b.is_closed());
        assert_eq!(
            b.admit().await,
            Admission::Probe,
            "the next probe, after probe_every"
        );
        b.record(Admission::Probe, false);
        assert!(b.is_closed());
        assert_eq!(b.admit().await, Admission::Call);
    }

    #[tokio::test]
    async fn a_sudden_outage_after_many_successes_opens_it_at_once() {
        let b = Breaker::new(config());
        for _ in 0..1000 {
            b.record(Admission::Call, false);
        }
        for _ in 0..4 {
            b.record(Admission::Call, true);
        }
        assert!(!b.is_closed(), "min_calls failures in a row open it");
    }

    #[tokio::test]
    async fn successes_keep_it_closed() {
        let b = Breaker::new(config());
        for i in 0..20 {
            b.record(Admission::Call, i % 3 == 1);
        }
        assert!(b.is_closed(), "a third failing is below the ratio");
    }
}
