//! The sidecar assembled: admin endpoint, topic checks, producer, routes, consumer thread.
//!
//! `Sidecar::start` returns once the admin endpoint listens; the pipeline then checks its
//! topics (unready until they exist), subscribes and runs until `shutdown`, after which it drains,
//! flushes, commits and leaves the group.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::error::KafkaError;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::admin::{self, Access, Admin, Control, Health};
use crate::call::Transport;
use crate::call::grpc::Grpc;
use crate::call::http::Http;
use crate::circuit::Breaker;
use crate::config::{Config, Delivery};
use crate::consume::{self, ConsumerSetup};
use crate::dispatch::Lanes;
use crate::offsets::{PartitionStatus, Tracker};
use crate::produce::{Failed, Producer};
use crate::ready::{self, Gate, Probe};
use crate::route::{Pace, RouteHandler};
use crate::telemetry::trace::Tracing;
use crate::telemetry::{Metrics, Snapshot};
use crate::transaction;

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    // Not a `source`, as for `Admin`: the message says it, and a source is printed again after it.
    #[error("cannot set up the Kafka client: {0}")]
    Kafka(KafkaError),
    // `error`, not `source`: the message already says it, and a source is printed again after it.
    #[error("cannot listen for the admin endpoint on {addr}: {error} (change admin.listen)")]
    Admin { addr: SocketAddr, error: std::io::Error },
    #[error("route `{route}`: {message}")]
    Route { route: String, message: String },
    #[error("the consumer thread failed: {0}")]
    Consumer(String),
    #[error(transparent)]
    Transaction(#[from] transaction::TransactionError),
    #[error(
        "the Kafka producer failed for good ({0}); ferry stopped without committing what it could not write: its next start (the container's restart) takes those records again with a new producer"
    )]
    ProducerFailed(String),
    #[error(
        "the stop did not finish within {0:?} (shutdown.drain_timeout + {after:?}): the broker did not answer the final commit or the group leave in time; records after the last committed offsets will be handled again by their partition's next owner",
        after = STOP_AFTER_DRAIN
    )]
    StopCutShort(Duration),
}

impl From<KafkaError> for RunError {
    fn from(e: KafkaError) -> Self {
        RunError::Kafka(e)
    }
}

/// How long a stop may go on past `shutdown.drain_timeout` (the final commit, leaving the group,
/// the producer's flush, the traces' export) before ferry gives up on a broker that does not
/// answer: a sync commit waits for the coordinator as long as `socket.timeout.ms` (60 s by
/// default), leaving waits for a rebalance to end. The flush and the export get at least a
/// second each even past it, so a stop ends within the drain timeout plus 10 s: the Helm
/// chart's smallest grace period.
pub const STOP_AFTER_DRAIN: Duration = Duration::from_secs(8);

/// A running sidecar.
pub struct Sidecar {
    pub health: Arc<Health>,
    pub tracker: Arc<Tracker>,
    pub metrics: Arc<Metrics>,
    pub route_names: Vec<String>,
    /// What the admin endpoint reads and steers.
    pub admin: Arc<Admin>,
    /// Where the admin endpoint listens, when enabled.
    pub admin_addr: Option<SocketAddr>,
    /// Cancelling it starts the graceful shutdown.
    shutdown: CancellationToken,
    task: JoinHandle<Result<(), RunError>>,
    /// A sidecar dropped without `shutdown` still stops (its consumer thread would otherwise
    /// keep the runtime alive).
    _stop_on_drop: tokio_util::sync::DropGuard,
}

/// The librdkafka settings shared by consumer and producer.
pub fn client_config(config: &Config) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &config.kafka.brokers);
    c.set("client.id", format!("ferry-{}", config.kafka.group_id));
    for (k, v) in &config.kafka.properties {
        c.set(k, &v.0);
    }
    c
}

impl Sidecar {
    pub async fn start(config: Config) -> Result<Sidecar, RunError> {
        install_crypto();
        let shutdown = CancellationToken::new();
        let drain_timeout = config.shutdown.drain_timeout.0;
        // A revoke or a shutdown may hold the poll loop for up to the drain timeout.
        let health = Health::new(drain_timeout.max(Duration::from_secs(20)) + Duration::from_secs(10));
        health.beat();
        let client = client_config(&config);
        let mut producer_config = client.clone();
        producer_config.set("client.id", format!("ferry-{}-producer", config.kafka.group_id));
        let metrics = Arc::new(Metrics::new());
        let producer = match config.delivery {
            Delivery::AtLeastOnce => Producer::new(producer_config)?,
            Delivery::ExactlyOnce => {
                let id = config
                    .kafka
                    .transactional_id
                    .clone()
                    .unwrap_or_else(|| transaction::default_id(&config.kafka.group_id));
                tracing::info!(transactional_id = %id, "Exactly once: outputs and offsets in transactions");
                Producer::transactional(
                    producer_config,
                    &id,
                    config.kafka.transaction_max_records,
                    metrics.clone(),
                )?
            }
        };
        health.watch_writes(producer.refusals());
        let failed = producer.failed();
        tokio::spawn(stop_when_failed(
            failed.clone(),
            Stopper {
                health: health.clone(),
                shutdown: shutdown.clone(),
            },
        ));
        let tracker = Tracker::new();
        let tracing = Arc::new(
            Tracing::start(&config.telemetry.traces, &config.kafka.group_id).map_err(|message| {
                RunError::Route {
                    route: "telemetry.traces".into(),
                    message,
                }
            })?,
        );
        let mut handlers = Vec::new();
        for route in &config.routes {
            let route_error = |message| RunError::Route {
                route: route.name.clone(),
                message,
            };
            let call = match (&route.call.http, &route.call.grpc) {
                (Some(http), _) => Transport::Http(Http::new(http).map_err(route_error)?),
                (None, Some(grpc)) => Transport::Grpc(Grpc::new(grpc).map_err(route_error)?),
                (None, None) => return Err(route_error("no call configured".into())),
            };
            let transport = call.name();
            handlers.push(RouteHandler {
                config: route.clone(),
                call,
                producer: producer.clone(),
                tracker: tracker.clone(),
                metrics: Arc::new(metrics.route(&route.name, transport)),
                tracing: tracing.clone(),
                pace: Pace::new(route.concurrency.rate),
                circuit: Arc::new(Breaker::new(route.circuit.clone())),
            });
        }
        let mut consumer_config = client;
        consumer_config.set("group.id", &config.kafka.group_id);
        let gate = Arc::new(Gate::new(config.service.ready.is_none()));
        health.watch_service(gate.clone());
        let control = Control::new(config.routes.len());
        let admin = Arc::new(Admin {
            health: health.clone(),
            control: control.clone(),
            tracker: tracker.clone(),
            metrics: metrics.clone(),
            routes: handlers
                .iter()
                .map(|h| (h.config.name.clone(), h.circuit.clone()))
                .collect(),
            access: match config.admin.listen {
                Some(addr) => Access::new(addr, config.admin.token.clone()),
                None => Access::Disabled,
            },
            drain_timeout,
            prestop: config.admin.prestop,
            scrape: std::sync::Mutex::new(()),
        });
        let admin_stop = CancellationToken::new();
        let admin_addr = match config.admin.listen {
            Some(addr) => Some(
                admin::serve(addr, admin.clone(), admin_stop.clone())
                    .await
                    .map_err(|error| RunError::Admin { addr, error })?,
            ),
            None => None,
        };
        let route_metrics = Arc::new(handlers.iter().map(|h| h.metrics.clone()).collect());
        let lanes = Lanes::new(tokio::runtime::Handle::current(), Arc::new(handlers));
        let setup = ConsumerSetup {
            client: consumer_config,
            routes: config.routes.clone(),
            tracker: tracker.clone(),
            lanes,
            route_metrics,
            metrics: metrics.clone(),
            tracing: tracing.clone(),
            control,
            health: health.clone(),
            drain_timeout,
            commit_interval: config.kafka.commit_interval.0,
            shutdown: shutdown.clone(),
            gate: gate.clone(),
            transactions: producer.transactions().cloned(),
            producer_failed: failed,
        };
        let task = tokio::spawn(pipeline(
            config.clone(),
            setup,
            producer,
            health.clone(),
            shutdown.clone(),
            admin_stop,
            tracing,
        ));
        Ok(Sidecar {
            health,
            tracker,
            metrics,
            admin,
            route_names: config.routes.iter().map(|r| r.name.clone()).collect(),
            admin_addr,
            _stop_on_drop: shutdown.clone().drop_guard(),
            shutdown,
            task,
        })
    }

    /// Starts the graceful shutdown: unready, stop fetching, drain, flush, commit, leave.
    pub fn shutdown(&self) {
        self.stopper().stop();
    }

    /// A handle that starts the shutdown, usable after `wait` took the sidecar.
    pub fn stopper(&self) -> Stopper {
        Stopper {
            health: self.health.clone(),
            shutdown: self.shutdown.clone(),
        }
    }

    /// Waits for the pipeline to end (after `shutdown`, or on a fatal error).
    pub async fn wait(self) -> Result<(), RunError> {
        match self.task.await {
            Ok(r) => r,
            Err(e) => Err(RunError::Consumer(e.to_string())),
        }
    }

    /// Each route's counters, as `/metrics` shows them, with its records in flight now.
    pub fn snapshot(&self) -> Vec<Snapshot> {
        let partitions = self.tracker.status();
        self.route_names
            .iter()
            .enumerate()
            .map(|(i, name)| Snapshot {
                in_flight: partitions
                    .iter()
                    .filter(|p| p.route == i)
                    .map(|p| p.in_flight as u64)
                    .sum(),
                ..self.metrics.snapshot(name)
            })
            .collect()
    }

    pub fn partitions(&self) -> Vec<PartitionStatus> {
        self.tracker.status()
    }
}

/// A producer failed for good stops the sidecar: unready at once, then the stop's steps, with
/// the records it could not write given up uncommitted.
async fn stop_when_failed(failed: Arc<Failed>, stopper: Stopper) {
    tokio::select! {
        _ = failed.wait() => stopper.stop(),
        // Ends with the sidecar, failed or not.
        _ = stopper.shutdown.cancelled() => {}
    }
}

/// Starts a sidecar's graceful shutdown.
#[derive(Clone)]
pub struct Stopper {
    health: Arc<Health>,
    shutdown: CancellationToken,
}

impl Stopper {
    pub fn stop(&self) {
        self.health.set_draining();
        self.shutdown.cancel();
    }
}

async fn pipeline(
    config: Config,
    setup: ConsumerSetup,
    producer: Producer,
    health: Arc<Health>,
    shutdown: CancellationToken,
    admin_stop: CancellationToken,
    tracing: Arc<Tracing>,
) -> Result<(), RunError> {
    // Unready, and not consuming, until every topic ferry writes exists.
    loop {
        health.beat();
        let p = producer.clone();
        let c = config.clone();
        let problem = tokio::task::spawn_blocking(move || check_topics(&p, &c))
            .await
            .unwrap_or_else(|e| Some(e.to_string()));
        health.set_topics_checked(problem.clone());
        match problem {
            None => {
                tracing::debug!("Topics checked");
                break;
            }
            Some(p) => tracing::error!(problem = %p, "Not ready: topics are not usable"),
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(5)) => {}
            _ = shutdown.cancelled() => {
                admin_stop.cancel();
                return Ok(());
            }
        }
    }
    // With a readiness probe: subscribe only once the service answers, then keep watching it.
    if let Some(ready) = &config.service.ready {
        let probe = Probe::new(ready).map_err(|message| RunError::Route {
            route: "service.ready".into(),
            message,
        })?;
        if !ready::wait_until_ready(&probe, ready, &setup.gate, &shutdown, &health).await {
            admin_stop.cancel();
            return Ok(());
        }
        tokio::spawn(ready::watch(
            probe,
            ready.clone(),
            setup.gate.clone(),
            shutdown.clone(),
        ));
    }
    // Exactly once: register the transactional producer, which fences an earlier instance with
    // the same transactional.id and aborts what it left open, before anything is consumed.
    if let Some(transactions) = producer.transactions().cloned() {
        loop {
            health.beat();
            let t = transactions.clone();
            let init = tokio::task::spawn_blocking(move || t.init(Duration::from_secs(30)))
                .await
                .map_err(|e| RunError::Consumer(e.to_string()))?;
            match init {
                Ok(()) => break,
                Err(e)
                    if e.rdkafka_error_code().is_some_and(|c| {
                        matches!(
                            c,
                            rdkafka::error::RDKafkaErrorCode::OperationTimedOut
                                | rdkafka::error::RDKafkaErrorCode::RequestTimedOut
                        )
                    }) =>
                {
                    tracing::warn!(error = %e, "Cannot register the transactional producer yet; trying again");
                }
                Err(e) => {
                    admin_stop.cancel();
                    return Err(RunError::Route {
                        route: "delivery".into(),
                        message: format!("exactly once needs a broker with transactions: {e}"),
                    });
                }
            }
            if shutdown.is_cancelled() {
                admin_stop.cancel();
                return Ok(());
            }
        }
    }
    let transactions = producer.transactions().cloned();
    let budget = config.shutdown.drain_timeout.0 + STOP_AFTER_DRAIN;
    let (consumed, stop_deadline) = consume_until_stopped(setup, &shutdown, budget).await;
    // The flush and the traces' export each get what is left of the stop's budget, at least a
    // second and at most ten.
    let left = || {
        stop_deadline.map_or(Duration::from_secs(10), |d| {
            d.saturating_duration_since(tokio::time::Instant::now())
                .clamp(Duration::from_secs(1), Duration::from_secs(10))
        })
    };
    let flushed = {
        let p = producer.clone();
        let within = left();
        tokio::task::spawn_blocking(move || p.flush(within)).await
    };
    if let Ok(Err(e)) = flushed {
        tracing::warn!(error = %e, "Producer flush incomplete");
    }
    // Sends the spans still buffered; blocking, so off the runtime's workers. A collector that
    // does not answer is not waited for past the budget.
    let exported = tokio::task::spawn_blocking(move || tracing.shutdown());
    if tokio::time::timeout(left(), exported).await.is_err() {
        tracing::warn!("Trace export did not finish within the stop's budget; the last spans are dropped");
    }
    admin_stop.cancel();
    let result = match consumed {
        Ok(()) => match (transactions.and_then(|t| t.fenced()), producer.failed().why()) {
            (Some(why), _) => Err(transaction::TransactionError::Fenced(why).into()),
            (None, Some(why)) => Err(RunError::ProducerFailed(why.to_string())),
            (None, None) => Ok(()),
        },
        Err(e) => Err(e),
    };
    if let Err(e) = &result {
        tracing::error!(error = %e, "The pipeline stopped");
    }
    result
}

/// Runs the consumer on a thread of its own until it ends, or until `budget` after `shutdown`:
/// a stop must end even when the broker never answers. Also says when the stop's budget runs out.
///
/// A plain thread rather than a blocking task, as the runtime would wait for a blocking task
/// still stuck in librdkafka when it shuts down.
async fn consume_until_stopped(
    setup: ConsumerSetup,
    shutdown: &CancellationToken,
    budget: Duration,
) -> (Result<(), RunError>, Option<tokio::time::Instant>) {
    let (tx, mut rx) = tokio::sync::oneshot::channel();
    let runtime = tokio::runtime::Handle::current();
    let spawned = std::thread::Builder::new()
        .name("ferry-group".into())
        .spawn(move || {
            // The consumer starts its record intake on the runtime.
            let _runtime = runtime.enter();
            let _ = tx.send(consume::run(setup));
        });
    if let Err(e) = spawned {
        return (Err(RunError::Consumer(e.to_string())), None);
    }
    let ended = |r: Result<Result<(), consume::ConsumeError>, _>| match r {
        Ok(r) => r.map_err(|e| match e {
            consume::ConsumeError::Kafka(e) => RunError::Kafka(e),
            e => RunError::Consumer(e.to_string()),
        }),
        Err(_) => Err(RunError::Consumer("it ended without an answer".into())),
    };
    tokio::select! {
        r = &mut rx => return (ended(r), None),
        _ = shutdown.cancelled() => {}
    }
    let deadline = tokio::time::Instant::now() + budget;
    match tokio::time::timeout_at(deadline, rx).await {
        Ok(r) => (ended(r), Some(deadline)),
        Err(_) => (Err(RunError::StopCutShort(budget)), Some(deadline)),
    }
}

/// Reply and dead-letter topics must exist before anything is consumed. Returns what is wrong.
fn check_topics(producer: &Producer, config: &Config) -> Option<String> {
    let metadata = match producer.metadata(Duration::from_secs(10)) {
        Ok(m) => m,
        Err(e) => {
            // A refused TLS handshake or SASL login shows only as a timeout here: ask why.
            let why = crate::broker::explain(&client_config(config), Duration::from_secs(5))
                .map(|w| format!(": {w}"))
                .unwrap_or_default();
            return Some(format!(
                "cannot read topic metadata from {}: {e}{why}",
                config.kafka.brokers
            ));
        }
    };
    let usable = |name: &str| {
        metadata
            .topics()
            .iter()
            .any(|t| t.name() == name && t.error().is_none() && !t.partitions().is_empty())
    };
    let mut missing = Vec::new();
    for (i, r) in config.routes.iter().enumerate() {
        for (topic, field) in r.writes() {
            if !usable(topic) {
                missing.push(format!(
                    "topic `{topic}` (routes[{i}].{field}) does not exist or cannot be seen"
                ));
            }
        }
        for topic in &r.from.topics {
            if !usable(topic) {
                tracing::warn!(topic = %topic, route = %r.name, "Source topic does not exist yet; waiting for it");
            }
        }
    }
    if missing.is_empty() {
        None
    } else {
        Some(format!("{}: create it, or fix the config", missing.join("; ")))
    }
}

/// rustls needs one process-wide crypto provider; ferry uses ring.
pub fn install_crypto() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}
