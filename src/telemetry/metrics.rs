//! The Prometheus metrics: counters and histograms updated as records move, gauges refreshed from
//! the tracker when `/metrics` is scraped.
//!
//! Counters reconcile within one process: `received = Σ outcomes + in flight + abandoned`, where
//! abandoned counts records given up unfinished when their partition's drain ended or it was lost.

use std::collections::BTreeMap;
use std::time::Duration;

use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
};

use super::names;
use crate::call::{Answer, CallError, Status};
use crate::outcome::{Outcome, Reason};

/// Call durations: a co-located service answers in well under a millisecond when it is fast, and
/// timeouts run to tens of seconds.
const CALL_BUCKETS: &[f64] = &[
    0.0002, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

/// End-to-end latency also covers retries with backoff and backlogs after an outage.
const END_TO_END_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0,
    3600.0,
];

/// Every metric of one sidecar, in its own registry (several sidecars may share a process in
/// tests).
pub struct Metrics {
    registry: Registry,
    received: IntCounterVec,
    outcomes: IntCounterVec,
    abandoned: IntCounterVec,
    retries: IntCounterVec,
    produce_errors: IntCounterVec,
    commits: IntCounterVec,
    transactions: IntCounterVec,
    call_duration: HistogramVec,
    end_to_end: HistogramVec,
    pub admin_unauthorized: IntCounter,
    /// The gauges below are set from the tracker on every scrape.
    pub in_flight: IntGaugeVec,
    pub oldest_in_flight: prometheus::GaugeVec,
    pub lag: IntGaugeVec,
    pub committed: IntGaugeVec,
    pub high_watermark: IntGaugeVec,
    pub assigned: IntGaugeVec,
    pub paused: IntGaugeVec,
    pub circuit: IntGaugeVec,
    pub ready: IntGauge,
    pub draining: IntGauge,
}

fn counter(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), labels).expect("a valid metric definition");
    r.register(Box::new(c.clone())).expect("metric names are unique");
    c
}

fn gauge(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    let g = IntGaugeVec::new(Opts::new(name, help), labels).expect("a valid metric definition");
    r.register(Box::new(g.clone())).expect("metric names are unique");
    g
}

fn histogram(r: &Registry, name: &str, help: &str, buckets: &[f64], labels: &[&str]) -> HistogramVec {
    let h = HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets.to_vec()), labels)
        .expect("a valid metric definition");
    r.register(Box::new(h.clone())).expect("metric names are unique");
    h
}

impl Metrics {
    /// The definitions are constants: a failure to register them is a bug that every test
    /// catches, never something a user or a broker can cause.
    pub fn new() -> Metrics {
        let r = Registry::new();
        let route_tp = &["route", "topic", "partition"];
        let m = Metrics {
            received: counter(
                &r,
                names::RECORDS_RECEIVED,
                "Records taken from Kafka.",
                &["route"],
            ),
            outcomes: counter(
                &r,
                names::OUTCOMES,
                "Records that reached an outcome; reason is set on dead letters.",
                &["route", "outcome", "reason"],
            ),
            abandoned: counter(
                &r,
                names::ABANDONED,
                "Records given up unfinished when their partition's drain (revoke or stop) ended, or it was lost; handled again by the next owner.",
                &["route"],
            ),
            retries: counter(
                &r,
                names::RETRIES,
                "Attempts that will be repeated, by why.",
                &["route", "reason"],
            ),
            produce_errors: counter(
                &r,
                names::PRODUCE_ERRORS,
                "Failed writes of replies and dead letters (each is retried).",
                &["route"],
            ),
            commits: counter(&r, names::COMMITS, "Offset commits by result.", &["result"]),
            transactions: counter(
                &r,
                names::TRANSACTIONS,
                "Transactions (delivery: exactly_once) by result: committed, aborted (and written again), fenced.",
                &["result"],
            ),
            call_duration: histogram(
                &r,
                names::CALL_DURATION,
                "Calls to the service by result, and how long they took.",
                CALL_BUCKETS,
                &["route", "transport", "result"],
            ),
            end_to_end: histogram(
                &r,
                names::END_TO_END,
                "From the record's timestamp to its outcome.",
                END_TO_END_BUCKETS,
                &["route", "outcome"],
            ),
            admin_unauthorized: counter(
                &r,
                names::ADMIN_UNAUTHORIZED,
                "Control requests refused for a missing or wrong token.",
                &[],
            )
            .with_label_values(&[] as &[&str]),
            in_flight: gauge(
                &r,
                names::IN_FLIGHT,
                "Records taken and not yet final.",
                &["route"],
            ),
            oldest_in_flight: {
                let g = prometheus::GaugeVec::new(
                    Opts::new(names::OLDEST_IN_FLIGHT, "Age of the oldest record in flight."),
                    &["route"],
                )
                .expect("a valid metric definition");
                r.register(Box::new(g.clone())).expect("metric names are unique");
                g
            },
            lag: gauge(
                &r,
                names::CONSUMER_LAG,
                "High watermark minus the committed offset.",
                route_tp,
            ),
            committed: gauge(
                &r,
                names::COMMITTED_OFFSET,
                "The last offset the broker confirmed as committed.",
                route_tp,
            ),
            high_watermark: gauge(
                &r,
                names::HIGH_WATERMARK,
                "The partition's high watermark.",
                route_tp,
            ),
            assigned: gauge(
                &r,
                names::ASSIGNED_PARTITIONS,
                "Partitions of the route's topics this instance owns in the group.",
                &["route"],
            ),
            paused: gauge(
                &r,
                names::PAUSED_PARTITIONS,
                "Assigned partitions from which ferry takes nothing, by reason.",
                &["route", "reason"],
            ),
            circuit: gauge(
                &r,
                names::CIRCUIT_STATE,
                "1 for the circuit's current state.",
                &["route", "state"],
            ),
            ready: gauge(&r, names::READY, "1 when /readyz answers 200.", &[])
                .with_label_values(&[] as &[&str]),
            draining: gauge(&r, names::DRAINING, "1 while draining.", &[]).with_label_values(&[] as &[&str]),
            registry: r,
        };
        gauge(&m.registry, names::BUILD_INFO, "ferry's version.", &["version"])
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        m
    }

    /// The handles one route updates per record. Counters that may stay at zero for long are
    /// created now, so they are exported (and `rate()` works) from the start.
    pub fn route(&self, name: &str, transport: &'static str) -> RouteMetrics {
        for r in [
            Reason::Status,
            Reason::Timeout,
            Reason::Connect,
            Reason::ServiceSaid,
        ] {
            self.retries.with_label_values(&[name, r.as_str()]);
        }
        let outcome = |o: Outcome| self.outcomes.with_label_values(&[name, o.as_str(), ""]);
        RouteMetrics {
            name: name.to_string(),
            transport,
            received: self.received.with_label_values(&[name]),
            abandoned: self.abandoned.with_label_values(&[name]),
            produce_errors: self.produce_errors.with_label_values(&[name]),
            outcomes: Outcome::ALL
                .iter()
                .filter(|&&o| o != Outcome::DeadLettered)
                .map(|&o| (o, outcome(o)))
                .collect(),
            dead_letters: self.outcomes.clone(),
            retries: self.retries.clone(),
            calls: self.call_duration.clone(),
            end_to_end: Outcome::ALL
                .iter()
                .map(|&o| (o, self.end_to_end.with_label_values(&[name, o.as_str()])))
                .collect(),
        }
    }

    pub fn commit(&self, ok: bool) {
        self.commits
            .with_label_values(&[if ok { "ok" } else { "failed" }])
            .inc();
    }

    pub fn transaction(&self, result: &str) {
        self.transactions.with_label_values(&[result]).inc();
    }

    /// The text exposition of everything registered.
    pub fn render(&self) -> String {
        prometheus::TextEncoder::new()
            .encode_to_string(&self.registry.gather())
            .unwrap_or_else(|e| format!("# cannot encode metrics: {e}\n"))
    }

    /// One route's counters, read back from the registry: exactly what `/metrics` shows.
    pub fn snapshot(&self, route: &str) -> Snapshot {
        let mut s = Snapshot::default();
        for family in self.registry.gather() {
            for m in family.get_metric() {
                let label = |n: &str| {
                    m.get_label()
                        .iter()
                        .find(|l| l.name() == n)
                        .map(|l| l.value().to_string())
                };
                if label("route").as_deref() != Some(route) {
                    continue;
                }
                let count = m.get_counter().get_value() as u64;
                match family.name() {
                    names::RECORDS_RECEIVED => s.received += count,
                    names::ABANDONED => s.abandoned += count,
                    names::RETRIES => s.retries += count,
                    names::PRODUCE_ERRORS => s.produce_errors += count,
                    names::OUTCOMES => {
                        let outcome = label("outcome").unwrap_or_default();
                        if let Some(o) = Outcome::ALL.iter().find(|o| o.as_str() == outcome) {
                            *s.outcomes.entry(*o).or_default() += count;
                        }
                        if let Some(r) = label("reason").filter(|r| !r.is_empty()) {
                            *s.dead_letter_reasons.entry(r).or_default() += count;
                        }
                    }
                    names::CALL_DURATION => s.calls += m.get_histogram().get_sample_count(),
                    names::IN_FLIGHT => s.in_flight = m.get_gauge().get_value() as u64,
                    _ => {}
                }
            }
        }
        s
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

/// The counters one route updates, resolved once so the per-record path does no label lookup
/// for them.
pub struct RouteMetrics {
    pub name: String,
    transport: &'static str,
    received: IntCounter,
    abandoned: IntCounter,
    produce_errors: IntCounter,
    outcomes: Vec<(Outcome, IntCounter)>,
    dead_letters: IntCounterVec,
    retries: IntCounterVec,
    calls: HistogramVec,
    end_to_end: Vec<(Outcome, Histogram)>,
}

impl RouteMetrics {
    pub fn received(&self) {
        self.received.inc();
    }

    pub fn abandoned(&self, n: u64) {
        self.abandoned.inc_by(n);
    }

    pub fn produce_error(&self) {
        self.produce_errors.inc();
    }

    pub fn retry(&self, reason: Reason) {
        self.retries
            .with_label_values(&[self.name.as_str(), reason.as_str()])
            .inc();
    }

    /// A record reached `outcome`; `age` is the time since its timestamp, when it has one.
    pub fn outcome(&self, outcome: Outcome, reason: Option<Reason>, age: Option<Duration>) {
        match (outcome, reason) {
            (Outcome::DeadLettered, r) => self
                .dead_letters
                .with_label_values(&[self.name.as_str(), outcome.as_str(), r.map_or("", Reason::as_str)])
                .inc(),
            _ => {
                if let Some((_, c)) = self.outcomes.iter().find(|(o, _)| *o == outcome) {
                    c.inc();
                }
            }
        }
        if let (Some(age), Some((_, h))) = (age, self.end_to_end.iter().find(|(o, _)| *o == outcome)) {
            h.observe(age.as_secs_f64());
        }
    }

    /// A call ended with `result` after `took`.
    pub fn call(&self, result: &Result<Answer, CallError>, took: Duration) {
        self.calls
            .with_label_values(&[self.name.as_str(), self.transport, call_result(result)])
            .observe(took.as_secs_f64());
    }
}

/// The `result` label of a call: the HTTP status class, the gRPC code's name, or why there was no
/// answer. A short fixed set, whatever the service answers.
pub fn call_result(result: &Result<Answer, CallError>) -> &'static str {
    match result {
        Ok(a) => match a.status {
            Status::Http(s) => match s / 100 {
                1 => "1xx",
                2 => "2xx",
                3 => "3xx",
                4 => "4xx",
                _ => "5xx",
            },
            Status::Grpc(c) => crate::call::grpc::code_name(c),
        },
        Err(CallError::Timeout(_)) => "timeout",
        Err(CallError::Connect(_) | CallError::Unreachable(_)) => "connect",
        Err(CallError::Encode(_)) => "encode",
        Err(CallError::Contract(_)) => "contract",
    }
}

/// A point-in-time copy of a route's counters, as `/metrics` reports them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Snapshot {
    pub received: u64,
    pub outcomes: BTreeMap<Outcome, u64>,
    /// Dead letters by `ferry.error.reason`.
    pub dead_letter_reasons: BTreeMap<String, u64>,
    pub calls: u64,
    pub retries: u64,
    /// Writes the broker did not acknowledge (each written again).
    pub produce_errors: u64,
    pub abandoned: u64,
    /// As of the last refresh of the gauges (a scrape of `/metrics` or `/status`).
    pub in_flight: u64,
}

impl Snapshot {
    pub fn finished(&self) -> u64 {
        self.outcomes.values().sum()
    }

    pub fn get(&self, o: Outcome) -> u64 {
        self.outcomes.get(&o).copied().unwrap_or(0)
    }
}
