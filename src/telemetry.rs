//! Every metric name in one place, the in-process counters behind them, and log set-up.
//!
//! Counters reconcile: `received = Σ outcomes + in flight + abandoned`, where abandoned counts
//! records that were live when their partition was revoked or ferry stopped.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::outcome::{Outcome, Reason};

/// Metric names, following `ferry_<thing>_<unit>` and `_total` for counters.
pub mod names {
    pub const RECORDS_RECEIVED: &str = "ferry_records_received_total";
    pub const OUTCOMES: &str = "ferry_outcomes_total";
    pub const CALLS: &str = "ferry_calls_total";
    pub const RETRIES: &str = "ferry_retries_total";
    pub const ABANDONED: &str = "ferry_records_abandoned_total";
    pub const PRODUCE_ERRORS: &str = "ferry_produce_errors_total";
}

/// Counters of one route.
#[derive(Debug, Default)]
pub struct RouteStats {
    pub received: AtomicU64,
    outcomes: [AtomicU64; 6],
    dead_letter_reasons: Mutex<BTreeMap<Reason, u64>>,
    pub calls: AtomicU64,
    pub retries: AtomicU64,
    pub abandoned: AtomicU64,
    pub produce_errors: AtomicU64,
}

impl RouteStats {
    pub fn outcome(&self, outcome: Outcome, reason: Option<Reason>) {
        self.outcomes[index(outcome)].fetch_add(1, Ordering::Relaxed);
        if let Some(r) = reason {
            let mut m = self.dead_letter_reasons.lock().unwrap_or_else(|p| p.into_inner());
            *m.entry(r).or_default() += 1;
        }
    }

    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            received: self.received.load(Ordering::Relaxed),
            outcomes: Outcome::ALL
                .iter()
                .map(|&o| (o, self.outcomes[index(o)].load(Ordering::Relaxed)))
                .collect(),
            dead_letter_reasons: self
                .dead_letter_reasons
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
            calls: self.calls.load(Ordering::Relaxed),
            retries: self.retries.load(Ordering::Relaxed),
            abandoned: self.abandoned.load(Ordering::Relaxed),
        }
    }
}

fn index(o: Outcome) -> usize {
    Outcome::ALL.iter().position(|&x| x == o).unwrap_or(0)
}

/// A point-in-time copy of a route's counters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Snapshot {
    pub received: u64,
    pub outcomes: BTreeMap<Outcome, u64>,
    pub dead_letter_reasons: BTreeMap<Reason, u64>,
    pub calls: u64,
    pub retries: u64,
    pub abandoned: u64,
}

impl Snapshot {
    pub fn finished(&self) -> u64 {
        self.outcomes.values().sum()
    }

    pub fn get(&self, o: Outcome) -> u64 {
        self.outcomes.get(&o).copied().unwrap_or(0)
    }
}

impl PartialOrd for Outcome {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Outcome {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        index(*self).cmp(&index(*other))
    }
}

/// Log set-up: `FERRY_LOG` (or `RUST_LOG`) filters, `FERRY_LOG_FORMAT=json` for JSON lines.
pub fn init_logging(default_level: &str) {
    use tracing_subscriber::EnvFilter;
    let filter = std::env::var("FERRY_LOG")
        .ok()
        .and_then(|f| EnvFilter::try_new(f).ok())
        .or_else(|| EnvFilter::try_from_default_env().ok())
        .unwrap_or_else(|| EnvFilter::new(default_level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let json = std::env::var("FERRY_LOG_FORMAT").is_ok_and(|f| f == "json");
    // A second initialisation (tests) is harmless; ignore it.
    let _ = if json {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}
