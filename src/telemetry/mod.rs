//! What ferry tells operators: every metric name and span attribute in one place, the metrics
//! themselves, one trace per record, and the log set-up.
//!
//! Fed by the consumer (records taken, commits), the route handlers (calls, retries, outcomes)
//! and the admin endpoint (the gauges it refreshes from the tracker on each scrape); read by
//! `/metrics`, `/status`, `ferry demo` and the tests.

pub mod metrics;
pub mod trace;

pub use metrics::{Metrics, RouteMetrics, Snapshot};

/// Metric names: `ferry_<thing>_<unit>`, `_total` for counters. Labels come from a short fixed
/// set: `route`, `topic`, `partition`, `outcome`, `reason`, `transport`, `result`, `state`.
pub mod names {
    /// Counter [route]: records taken from Kafka.
    pub const RECORDS_RECEIVED: &str = "ferry_records_received_total";
    /// Counter [route, outcome, reason]: records that reached an outcome; `reason` is set on
    /// dead letters only.
    pub const OUTCOMES: &str = "ferry_outcomes_total";
    /// Counter [route]: records given up unfinished when their partition's drain (revoke or
    /// stop) ended, or it was lost; the next owner handles them again.
    pub const ABANDONED: &str = "ferry_records_abandoned_total";
    /// Counter [route, reason]: attempts that will be repeated.
    pub const RETRIES: &str = "ferry_retries_total";
    /// Counter [route]: failed writes of replies and dead letters (each is retried).
    pub const PRODUCE_ERRORS: &str = "ferry_produce_errors_total";
    /// Counter [result]: offset commits, `ok` or `failed`.
    pub const COMMITS: &str = "ferry_commits_total";
    /// Counter [result]: transactions with `delivery: exactly_once`, `committed`, `aborted` (and
    /// written again) or `fenced`.
    pub const TRANSACTIONS: &str = "ferry_transactions_total";
    /// Histogram [route, transport, result]: calls to the service and how long they took.
    pub const CALL_DURATION: &str = "ferry_call_duration_seconds";
    /// Histogram [route, outcome]: from the record's timestamp to its outcome.
    pub const END_TO_END: &str = "ferry_end_to_end_latency_seconds";
    /// Gauge [route]: records taken and not yet final.
    pub const IN_FLIGHT: &str = "ferry_records_in_flight";
    /// Gauge [route]: age of the oldest record in flight.
    pub const OLDEST_IN_FLIGHT: &str = "ferry_oldest_in_flight_age_seconds";
    /// Gauge [route, topic, partition]: high watermark minus the committed offset.
    pub const CONSUMER_LAG: &str = "ferry_consumer_lag_records";
    /// Gauge [route, topic, partition]: the last offset the broker confirmed.
    pub const COMMITTED_OFFSET: &str = "ferry_committed_offset";
    /// Gauge [route, topic, partition]: the partition's high watermark.
    pub const HIGH_WATERMARK: &str = "ferry_high_watermark_offset";
    /// Gauge [route]: partitions of the route's topics this instance owns in the group (0 on
    /// an instance beyond the partition count, and on every instance while the group cannot
    /// form).
    pub const ASSIGNED_PARTITIONS: &str = "ferry_assigned_partitions";
    /// Gauge [route, reason]: assigned partitions from which ferry takes nothing, by reason.
    pub const PAUSED_PARTITIONS: &str = "ferry_paused_partitions";
    /// Gauge [route, state]: 1 for the circuit's current state (`closed`, `open`, `half_open`).
    pub const CIRCUIT_STATE: &str = "ferry_circuit_state";
    /// Gauge: 1 when `/readyz` answers 200.
    pub const READY: &str = "ferry_ready";
    /// Gauge: 1 while draining (stopping, or after `POST /drain`).
    pub const DRAINING: &str = "ferry_draining";
    /// Counter: control requests refused for a missing or wrong token.
    pub const ADMIN_UNAUTHORIZED: &str = "ferry_admin_unauthorized_total";
    /// Gauge [version]: always 1.
    pub const BUILD_INFO: &str = "ferry_build_info";

    /// Every name above, for the tests that check the dashboard and the alert rules.
    pub const ALL: &[&str] = &[
        RECORDS_RECEIVED,
        OUTCOMES,
        ABANDONED,
        RETRIES,
        PRODUCE_ERRORS,
        COMMITS,
        TRANSACTIONS,
        CALL_DURATION,
        END_TO_END,
        IN_FLIGHT,
        OLDEST_IN_FLIGHT,
        CONSUMER_LAG,
        COMMITTED_OFFSET,
        HIGH_WATERMARK,
        ASSIGNED_PARTITIONS,
        PAUSED_PARTITIONS,
        CIRCUIT_STATE,
        READY,
        DRAINING,
        ADMIN_UNAUTHORIZED,
        BUILD_INFO,
    ];
}

/// Span names and attributes. Messaging attributes follow OpenTelemetry's semantic conventions;
/// ferry's own are prefixed `ferry.`.
pub mod attributes {
    /// The record's span, from taken to committed: `<topic> process`.
    pub const PROCESS: &str = "process";
    /// Child: from taken to the start of handling (time queued in its lane).
    pub const CONSUME: &str = "consume";
    /// Child, one per attempt: the call to the service.
    pub const CALL: &str = "call";
    /// Child: writing the reply or dead letter, until the broker acknowledged it.
    pub const PRODUCE: &str = "publish";
    /// Child: from the outcome to the commit that covers the record's offset.
    pub const COMMIT: &str = "commit";

    pub const MESSAGING_SYSTEM: &str = "messaging.system";
    pub const MESSAGING_OPERATION: &str = "messaging.operation.type";
    pub const DESTINATION: &str = "messaging.destination.name";
    pub const PARTITION: &str = "messaging.destination.partition.id";
    pub const OFFSET: &str = "messaging.kafka.offset";
    pub const CONSUMER_GROUP: &str = "messaging.consumer.group.name";
    pub const ROUTE: &str = "ferry.route";
    pub const ATTEMPT: &str = "ferry.attempt";
    pub const RESULT: &str = "ferry.result";
    pub const OUTCOME: &str = "ferry.outcome";
    pub const REASON: &str = "ferry.reason";
    pub const COMMITTED: &str = "ferry.committed";
}

/// A log filter: levels and `target=level` directives, comma-separated. A bare word that is not
/// a level is refused, though tracing would take it as a target to show alone: that is how a
/// typo (`warning`) silenced every line, errors included.
pub fn log_filter(text: &str) -> Result<tracing_subscriber::EnvFilter, String> {
    // Names and numbers (0 is off, 5 trace), as tracing reads them.
    const LEVELS: [&str; 12] = [
        "trace", "debug", "info", "warn", "error", "off", "0", "1", "2", "3", "4", "5",
    ];
    for directive in text.split(',').map(str::trim).filter(|d| !d.is_empty()) {
        let bare = !directive.contains(['=', '[', ':']);
        if bare && !LEVELS.contains(&directive.to_ascii_lowercase().as_str()) {
            return Err(format!(
                "`{directive}` is not a level (error, warn, info, debug, trace, off); to show one target, write it with its level (`ferry=debug`)"
            ));
        }
    }
    tracing_subscriber::EnvFilter::try_new(text).map_err(|e| e.to_string())
}

/// Log set-up: `level` (a level or a filter) unless `FERRY_LOG` (or `RUST_LOG`) says otherwise;
/// JSON lines when `json` or `FERRY_LOG_FORMAT=json`. Logs go to stderr, coloured only on a terminal.
/// A `FERRY_LOG` or `FERRY_LOG_FORMAT` that means nothing is an error, as the same value in the
/// config is: ignored, it would leave the operator reading logs at a level they did not ask for.
pub fn init_logging(level: &str, json: bool) -> Result<(), String> {
    use tracing_subscriber::EnvFilter;
    let filter = match std::env::var("FERRY_LOG") {
        Ok(f) => log_filter(&f).map_err(|e| {
            format!("FERRY_LOG: `{f}` is not a log filter ({e}): write a level (info) or a filter (info,ferry=debug)")
        })?,
        // RUST_LOG, which other tools set too, is taken only when it reads as a filter.
        Err(_) => std::env::var("RUST_LOG")
            .map_err(|e| e.to_string())
            .and_then(|f| log_filter(&f))
            .or_else(|_| log_filter(level))
            .unwrap_or_else(|_| EnvFilter::new("info")),
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colours for a person at a terminal only: in a pod's log or a file they are noise.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    let json = match std::env::var("FERRY_LOG_FORMAT").as_deref() {
        Ok("json") => true,
        Ok("text") => false,
        Ok(other) => {
            return Err(format!(
                "FERRY_LOG_FORMAT: `{other}` is not a log format: write text or json"
            ));
        }
        Err(_) => json,
    };
    // A second initialisation (tests) is harmless; ignore it.
    let _ = if json {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
    Ok(())
}
