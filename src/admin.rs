//! The admin endpoint (SPEC §6): probes, metrics and status for anyone, and the control verbs
//! (pause, resume, drain) for whoever may use them.
//!
//! Liveness means the process makes progress (the poll loop beats), never merely that the broker
//! or the service is down. Readiness means subscribed, topics checked, the service ready and not
//! draining. Status and the scrape-time metrics are read from the offset tracker, the circuits
//! and the control flags; the control verbs set flags that the consumer loop reads before it
//! takes each record.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::circuit::Breaker;
use crate::config::Secret;
use crate::offsets::{PauseReason, Tracker};
use crate::telemetry::Metrics;

/// What the probes read, written by the consumer loop and the start-up checks.
pub struct Health {
    start: Instant,
    /// Milliseconds after `start` of the poll loop's last turn.
    heartbeat_ms: AtomicU64,
    /// A stuck loop is one that has not turned for this long.
    stall_after: Duration,
    subscribed: AtomicBool,
    topics_checked: AtomicBool,
    draining: AtomicBool,
    /// Set by `POST /drain` without a route, cleared by `POST /resume`.
    drained_by_operator: AtomicBool,
    /// Why ferry is not ready, for the `/readyz` body and the logs.
    problem: Mutex<Option<String>>,
    /// The service's readiness, when a probe is configured.
    service: std::sync::OnceLock<Arc<crate::ready::Gate>>,
    /// The topics the broker refuses ferry to write to.
    writes: std::sync::OnceLock<Arc<crate::produce::Refusals>>,
}

impl Health {
    pub fn new(stall_after: Duration) -> Arc<Self> {
        Arc::new(Health {
            start: Instant::now(),
            heartbeat_ms: AtomicU64::new(0),
            stall_after,
            subscribed: AtomicBool::new(false),
            topics_checked: AtomicBool::new(false),
            draining: AtomicBool::new(false),
            drained_by_operator: AtomicBool::new(false),
            problem: Mutex::new(None),
            service: std::sync::OnceLock::new(),
            writes: std::sync::OnceLock::new(),
        })
    }

    pub fn beat(&self) {
        self.heartbeat_ms
            .store(self.start.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    pub fn set_subscribed(&self, v: bool) {
        self.subscribed.store(v, Ordering::Relaxed);
    }

    pub fn set_topics_checked(&self, problem: Option<String>) {
        self.topics_checked.store(problem.is_none(), Ordering::Relaxed);
        *self.problem.lock().unwrap_or_else(|p| p.into_inner()) = problem;
    }

    /// Makes readiness follow the service's readiness gate.
    pub fn watch_service(&self, gate: Arc<crate::ready::Gate>) {
        let _ = self.service.set(gate);
    }

    /// Makes readiness follow whether the broker takes ferry's writes.
    pub fn watch_writes(&self, refusals: Arc<crate::produce::Refusals>) {
        let _ = self.writes.set(refusals);
    }

    pub fn set_draining(&self) {
        self.draining.store(true, Ordering::Relaxed);
    }

    pub fn set_drained_by_operator(&self, v: bool) {
        self.drained_by_operator.store(v, Ordering::Relaxed);
    }

    pub fn is_draining(&self) -> bool {
        self.is_stopping() || self.drained_by_operator.load(Ordering::Relaxed)
    }

    /// Whether ferry is stopping (SIGTERM), which no operator's resume undoes.
    pub fn is_stopping(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    /// Whether the service's readiness probe passes (`true` when none is configured).
    pub fn service_ready(&self) -> bool {
        self.service.get().is_none_or(|g| g.is_open())
    }

    pub fn live(&self) -> bool {
        let last = Duration::from_millis(self.heartbeat_ms.load(Ordering::Relaxed));
        self.start.elapsed().saturating_sub(last) < self.stall_after
    }

    /// `Ok` when ready, else why not.
    pub fn ready(&self) -> Result<(), String> {
        if self.is_draining() {
            return Err("draining".into());
        }
        if !self.topics_checked.load(Ordering::Relaxed) {
            let problem = self.problem.lock().unwrap_or_else(|p| p.into_inner()).clone();
            return Err(problem.unwrap_or_else(|| "checking topics".into()));
        }
        if let Some(problem) = self.writes.get().and_then(|w| w.problem()) {
            return Err(problem);
        }
        if let Some(gate) = self.service.get().filter(|g| !g.is_open()) {
            return Err(match gate.why_closed() {
                Some(why) => format!("the service is not ready: {why}"),
                None => "the service is not ready".into(),
            });
        }
        if !self.subscribed.load(Ordering::Relaxed) {
            return Err("not subscribed yet".into());
        }
        Ok(())
    }
}

/// Operator pauses and drains, per route, read by the consumer loop before it takes a record.
pub struct Control {
    routes: Vec<Flags>,
    /// Held while a verb changes the flags and readiness together, so that a drain and a resume
    /// at once cannot leave ferry unready with no route drained.
    verb: Mutex<()>,
    /// Verbs applied so far: a preStop drain resumes by itself only if no verb came after it.
    verbs: AtomicU64,
}

#[derive(Default)]
struct Flags {
    paused: AtomicBool,
    draining: AtomicBool,
}

impl Control {
    pub fn new(routes: usize) -> Arc<Control> {
        Arc::new(Control {
            routes: (0..routes).map(|_| Flags::default()).collect(),
            verb: Mutex::new(()),
            verbs: AtomicU64::new(0),
        })
    }

    /// Why an operator holds `route`: paused, drained, both or neither. Each is a reason of its
    /// own (SPEC §1): a resume clears both, and status shows both while both hold.
    pub fn held(&self, route: usize) -> impl Iterator<Item = PauseReason> {
        let f = self.routes.get(route);
        let paused = f.is_some_and(|f| f.paused.load(Ordering::Relaxed));
        let draining = f.is_some_and(|f| f.draining.load(Ordering::Relaxed));
        [(paused, PauseReason::Operator), (draining, PauseReason::Drain)]
            .into_iter()
            .filter_map(|(on, reason)| on.then_some(reason))
    }

    /// Runs `f` while no other verb changes the flags; with the count of verbs, `f`'s included.
    fn one_verb_at_a_time<R>(&self, f: impl FnOnce() -> R) -> (R, u64) {
        let _turn = self.verb.lock().unwrap_or_else(|p| p.into_inner());
        let n = self.verbs.fetch_add(1, Ordering::Relaxed) + 1;
        (f(), n)
    }

    fn set(&self, route: usize, paused: bool, draining: bool) {
        if let Some(f) = self.routes.get(route) {
            f.paused.store(paused, Ordering::Relaxed);
            f.draining.store(draining, Ordering::Relaxed);
        }
    }

    pub fn is_paused(&self, route: usize) -> bool {
        self.routes
            .get(route)
            .is_some_and(|f| f.paused.load(Ordering::Relaxed))
    }

    pub fn is_draining(&self, route: usize) -> bool {
        self.routes
            .get(route)
            .is_some_and(|f| f.draining.load(Ordering::Relaxed))
    }
}

/// Who may use the control verbs (SPEC §6).
#[derive(Debug, Clone)]
pub enum Access {
    /// The listener is on loopback: only processes of the pod reach it.
    Loopback,
    /// Off loopback with a token: `Authorization: Bearer <token>`.
    Token(Secret),
    /// Off loopback without a token: the verbs answer 403.
    Disabled,
}

impl Access {
    pub fn new(listen: SocketAddr, token: Option<Secret>) -> Access {
        match token {
            _ if listen.ip().is_loopback() => Access::Loopback,
            Some(t) => Access::Token(t),
            None => Access::Disabled,
        }
    }
}

/// What the admin endpoint reads and steers.
pub struct Admin {
    pub health: Arc<Health>,
    pub control: Arc<Control>,
    pub tracker: Arc<Tracker>,
    pub metrics: Arc<Metrics>,
    /// Per route, in config order: its name and its circuit.
    pub routes: Vec<(String, Arc<Breaker>)>,
    pub access: Access,
    /// How long `POST /drain` waits for in-flight records.
    pub drain_timeout: Duration,
    /// Whether `GET /prestop` is served.
    pub prestop: bool,
    /// Serialises the refresh of the gauges with the rendering of `/metrics`.
    pub scrape: Mutex<()>,
}

/// Binds the admin listener now (so a taken port fails the start) and serves until `stop`.
pub async fn serve(
    addr: SocketAddr,
    admin: Arc<Admin>,
    stop: CancellationToken,
) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    match &admin.access {
        Access::Loopback => {}
        Access::Token(_) => tracing::info!("Control endpoints need the admin token"),
        Access::Disabled => tracing::warn!(
            addr = %local,
            "Control endpoints (POST /pause, /resume, /drain) are disabled: the admin endpoint is not on loopback and admin.token is not set"
        ),
    }
    let app = Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/status", get(status))
        .route("/pause", post(pause))
        .route("/resume", post(resume))
        .route("/drain", post(drain))
        .route("/prestop", get(prestop))
        .fallback(unknown)
        .method_not_allowed_fallback(wrong_method)
        .with_state(admin);
    tokio::spawn(async move {
        let served = axum::serve(listener, app)
            .with_graceful_shutdown(async move { stop.cancelled().await })
            .await;
        if let Err(e) = served {
            tracing::error!(error = %e, "Admin endpoint stopped");
        }
    });
    tracing::info!(addr = %local, "Admin endpoint listening");
    Ok(local)
}

async fn healthz(State(a): State<Arc<Admin>>) -> (StatusCode, &'static str) {
    if a.health.live() {
        (StatusCode::OK, "ok\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "the poll loop is stuck\n")
    }
}

async fn readyz(State(a): State<Arc<Admin>>) -> (StatusCode, String) {
    match a.health.ready() {
        Ok(()) => (StatusCode::OK, "ready\n".into()),
        Err(why) => (StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {why}\n")),
    }
}

async fn metrics(State(a): State<Arc<Admin>>) -> Response {
    let text = {
        let _one_at_a_time = a.scrape.lock().unwrap_or_else(|p| p.into_inner());
        a.refresh(&a.tracker.status());
        a.metrics.render()
    };
    ([(header::CONTENT_TYPE, prometheus::TEXT_FORMAT)], text).into_response()
}

async fn status(State(a): State<Arc<Admin>>, Query(t): Query<Target>) -> Response {
    match a.targets(t.route.as_deref()) {
        Ok(routes) => {
            let mut status = a.status();
            status.routes = (status.routes.into_iter().enumerate())
                .filter_map(|(i, r)| routes.contains(&i).then_some(r))
                .collect();
            axum::Json(status).into_response()
        }
        Err(refusal) => refusal.into_response(),
    }
}

/// `GET /status`.
#[derive(Debug, Serialize, Deserialize)]
pub struct Status {
    pub version: String,
    pub live: bool,
    pub ready: bool,
    /// Why not, when not ready.
    pub not_ready: Option<String>,
    pub draining: bool,
    pub service_ready: bool,
    pub routes: Vec<RouteStatus>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct RouteStatus {
    pub name: String,
    /// Paused by an operator (`POST /pause`).
    pub paused: bool,
    /// Drained by an operator (`POST /drain`).
    pub draining: bool,
    /// `closed`, `open` or `half_open`.
    pub circuit: String,
    pub in_flight: u64,
    pub oldest_in_flight_seconds: Option<f64>,
    /// Summed over the route's partitions with a known lag.
    pub lag: i64,
    pub received: u64,
    /// Records by outcome.
    pub outcomes: std::collections::BTreeMap<String, u64>,
    /// Dead letters by reason.
    pub dead_letters: std::collections::BTreeMap<String, u64>,
    pub retries: u64,
    pub abandoned: u64,
    pub partitions: Vec<PartitionView>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct PartitionView {
    pub topic: String,
    pub partition: i32,
    pub committed: Option<i64>,
    pub high_watermark: Option<i64>,
    pub lag: Option<i64>,
    pub in_flight: u64,
    pub oldest_in_flight_seconds: Option<f64>,
    /// Why ferry takes nothing from it now: `bound`, `unready`, `circuit`, `drain`, `operator`,
    /// `unconfirmed`.
    pub paused: Vec<String>,
}

impl Admin {
    pub fn status(&self) -> Status {
        let partitions = self.tracker.status();
        {
            let _one_at_a_time = self.scrape.lock().unwrap_or_else(|p| p.into_inner());
            self.refresh(&partitions);
        }
        let routes = self
            .routes
            .iter()
            .enumerate()
            .map(|(i, (name, circuit))| {
                let mine: Vec<_> = partitions.iter().filter(|p| p.route == i).collect();
                let counts = self.metrics.snapshot(name);
                RouteStatus {
                    name: name.clone(),
                    paused: self.control.is_paused(i),
                    draining: self.control.is_draining(i),
                    circuit: circuit.state_name().to_string(),
                    in_flight: mine.iter().map(|p| p.in_flight as u64).sum(),
                    oldest_in_flight_seconds: mine
                        .iter()
                        .filter_map(|p| p.oldest_in_flight)
                        .max()
                        .map(|d| d.as_secs_f64()),
                    lag: mine.iter().filter_map(|p| p.lag).sum(),
                    received: counts.received,
                    outcomes: counts
                        .outcomes
                        .iter()
                        .map(|(o, n)| (o.as_str().to_string(), *n))
                        .collect(),
                    dead_letters: counts.dead_letter_reasons,
                    retries: counts.retries,
                    abandoned: counts.abandoned,
                    partitions: mine
                        .iter()
                        .map(|p| PartitionView {
                            topic: p.tp.0.to_string(),
                            partition: p.tp.1,
                            committed: p.committed,
                            high_watermark: p.high_watermark,
                            lag: p.lag,
                            in_flight: p.in_flight as u64,
                            oldest_in_flight_seconds: p.oldest_in_flight.map(|d| d.as_secs_f64()),
                            paused: p.paused.iter().map(|r| r.as_str().to_string()).collect(),
                        })
                        .collect(),
                }
            })
            .collect();
        let ready = self.health.ready();
        Status {
            version: env!("CARGO_PKG_VERSION").to_string(),
            live: self.health.live(),
            ready: ready.is_ok(),
            not_ready: ready.err(),
            draining: self.health.is_draining(),
            service_ready: self.health.service_ready(),
            routes,
        }
    }

    /// Sets the scrape-time gauges from the tracker's view of the partitions.
    fn refresh(&self, partitions: &[crate::offsets::PartitionStatus]) {
        let m = &self.metrics;
        for g in [&m.lag, &m.committed, &m.high_watermark, &m.paused] {
            g.reset();
        }
        m.oldest_in_flight.reset();
        for (i, (name, circuit)) in self.routes.iter().enumerate() {
            let mine = || partitions.iter().filter(move |p| p.route == i);
            m.in_flight
                .with_label_values(&[name.as_str()])
                .set(mine().map(|p| p.in_flight as i64).sum());
            m.assigned
                .with_label_values(&[name.as_str()])
                .set(mine().count() as i64);
            if let Some(oldest) = mine().filter_map(|p| p.oldest_in_flight).max() {
                m.oldest_in_flight
                    .with_label_values(&[name.as_str()])
                    .set(oldest.as_secs_f64());
            }
            let state = circuit.state_name();
            for s in ["closed", "open", "half_open"] {
                m.circuit
                    .with_label_values(&[name.as_str(), s])
                    .set(i64::from(s == state));
            }
            for p in mine() {
                let partition = p.tp.1.to_string();
                let labels = [name.as_str(), &p.tp.0, partition.as_str()];
                if let Some(c) = p.committed {
                    m.committed.with_label_values(&labels).set(c);
                }
                if let Some(h) = p.high_watermark {
                    m.high_watermark.with_label_values(&labels).set(h);
                }
                if let Some(l) = p.lag {
                    m.lag.with_label_values(&labels).set(l);
                }
                for r in &p.paused {
                    m.paused.with_label_values(&[name.as_str(), r.as_str()]).inc();
                }
            }
        }
        m.ready.set(i64::from(self.health.ready().is_ok()));
        m.draining.set(i64::from(self.health.is_draining()));
    }

    /// The routes a control request names: all of them, or the one in `?route=`.
    fn targets(&self, route: Option<&str>) -> Result<Vec<usize>, Refusal> {
        match route {
            None => Ok((0..self.routes.len()).collect()),
            Some(name) => match self.routes.iter().position(|(n, _)| n == name) {
                Some(i) => Ok(vec![i]),
                None => Err(Refusal::NoSuchRoute {
                    name: name.to_string(),
                    known: self.routes.iter().map(|(n, _)| n.clone()).collect(),
                }),
            },
        }
    }

    /// Checks a control request's credentials.
    fn authorize(&self, headers: &HeaderMap, verb: &str) -> Result<(), Refusal> {
        match &self.access {
            Access::Loopback => Ok(()),
            Access::Disabled => Err(Refusal::Disabled),
            Access::Token(token) => {
                // The scheme's name is case-insensitive (RFC 9110, 11.1).
                let given = headers
                    .get(header::AUTHORIZATION)
                    .and_then(|v| v.as_bytes().split_at_checked(7))
                    .filter(|(scheme, _)| scheme.eq_ignore_ascii_case(b"Bearer "))
                    .map(|(_, token)| token);
                if given.is_some_and(|g| token.matches(g)) {
                    return Ok(());
                }
                self.metrics.admin_unauthorized.inc();
                tracing::warn!(verb, "Control request refused: missing or wrong admin token");
                Err(Refusal::Unauthorized)
            }
        }
    }
}

/// Why a control request is refused.
#[derive(Debug, thiserror::Error)]
enum Refusal {
    #[error("send the admin token as `Authorization: Bearer <token>`")]
    Unauthorized,
    #[error(
        "control endpoints are disabled: the admin endpoint is not on loopback and admin.token is not set"
    )]
    Disabled,
    #[error("no route named `{name}`; routes are: {}", known.join(", "))]
    NoSuchRoute { name: String, known: Vec<String> },
    #[error(
        "ferry is stopping (SIGTERM): it finishes what is in flight and takes nothing new, whatever an operator asks"
    )]
    Stopping,
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        let code = match self {
            Refusal::Unauthorized => StatusCode::UNAUTHORIZED,
            Refusal::Disabled => StatusCode::FORBIDDEN,
            Refusal::NoSuchRoute { .. } => StatusCode::NOT_FOUND,
            Refusal::Stopping => StatusCode::CONFLICT,
        };
        let mut r = problem(code, self.to_string());
        if code == StatusCode::UNAUTHORIZED {
            r.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Bearer"),
            );
        }
        r
    }
}

/// An error answer: `{"error": "..."}`.
fn problem(code: StatusCode, error: String) -> Response {
    (code, axum::Json(serde_json::json!({ "error": error }))).into_response()
}

#[derive(Debug, Deserialize)]
struct Target {
    route: Option<String>,
}

/// The answer to a control verb.
#[derive(Debug, Serialize, Deserialize)]
pub struct Done {
    pub routes: Vec<String>,
    pub paused: bool,
    pub draining: bool,
    /// `POST /drain` only: whether every record in flight finished and its offset was committed
    /// before the drain timeout.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub drained: Option<bool>,
    pub in_flight: u64,
}

impl Admin {
    /// After a resume: a whole drain holds readiness until no route is drained any more, however
    /// the routes were resumed.
    fn undrained(&self) {
        if (0..self.routes.len()).all(|i| !self.control.is_draining(i)) {
            self.health.set_drained_by_operator(false);
        }
    }

    fn done(&self, routes: &[usize], drained: Option<bool>) -> Done {
        let partitions = self.tracker.status();
        Done {
            routes: routes.iter().map(|&i| self.routes[i].0.clone()).collect(),
            paused: routes.iter().all(|&i| self.control.is_paused(i)),
            draining: routes.iter().all(|&i| self.control.is_draining(i)),
            drained,
            in_flight: partitions
                .iter()
                .filter(|p| routes.contains(&p.route))
                .map(|p| p.in_flight as u64)
                .sum(),
        }
    }

    /// Whether nothing of these routes is in flight and everything final is committed.
    fn settled(&self, routes: &[usize]) -> bool {
        self.tracker
            .status()
            .iter()
            .filter(|p| routes.contains(&p.route))
            .all(|p| p.in_flight == 0 && (p.committable.is_none() || p.committed >= p.committable))
    }
}

async fn pause(State(a): State<Arc<Admin>>, headers: HeaderMap, Query(t): Query<Target>) -> Response {
    control(&a, &headers, t.route.as_deref(), "pause", |a, routes| {
        a.control.one_verb_at_a_time(|| {
            for &i in routes {
                a.control.set(i, true, a.control.is_draining(i));
            }
        });
        tracing::info!(routes = ?names(a, routes), "Paused by an operator");
        Ok(())
    })
}

async fn resume(State(a): State<Arc<Admin>>, headers: HeaderMap, Query(t): Query<Target>) -> Response {
    control(&a, &headers, t.route.as_deref(), "resume", |a, routes| {
        if a.health.is_stopping() {
            return Err(Refusal::Stopping);
        }
        a.control.one_verb_at_a_time(|| {
            for &i in routes {
                a.control.set(i, false, false);
            }
            a.undrained();
        });
        tracing::info!(routes = ?names(a, routes), "Resumed by an operator");
        Ok(())
    })
}

async fn drain(State(a): State<Arc<Admin>>, headers: HeaderMap, Query(t): Query<Target>) -> Response {
    match a
        .authorize(&headers, "drain")
        .and_then(|()| a.targets(t.route.as_deref()))
    {
        Ok(routes) => drain_and_wait(&a, routes, t.route.is_none()).await,
        Err(refusal) => refusal.into_response(),
    }
}

/// Any other path: what there is, for whoever guessed `/ready` or `/health`.
async fn unknown(method: axum::http::Method, uri: axum::http::Uri) -> Response {
    (StatusCode::NOT_FOUND, endpoints(&method, &uri)).into_response()
}

/// A method the path does not take (`GET /drain`): the same list, with 405.
async fn wrong_method(method: axum::http::Method, uri: axum::http::Uri) -> Response {
    (StatusCode::METHOD_NOT_ALLOWED, endpoints(&method, &uri)).into_response()
}

fn endpoints(method: &axum::http::Method, uri: &axum::http::Uri) -> String {
    format!(
        "no {method} {}: ferry's admin endpoint serves GET /healthz, /readyz, /metrics, /status (and /prestop with admin.prestop), and POST /pause, /resume, /drain\n",
        uri.path()
    )
}

/// `GET /prestop`: a whole drain for a Kubernetes preStop hook, when `admin.prestop` allows it.
async fn prestop(State(a): State<Arc<Admin>>, Query(p): Query<Prestop>) -> Response {
    if !a.prestop {
        return problem(
            StatusCode::NOT_FOUND,
            "GET /prestop is off: set admin.prestop: true to let a preStop hook drain ferry".into(),
        );
    }
    tracing::info!("preStop hook: draining before the pod stops");
    let all: Vec<usize> = (0..a.routes.len()).collect();
    let drained_at = start_drain(&a, &all, true);
    // Kubernetes runs a container's preStop hook whenever it stops that container, also to
    // restart it (a failed liveness probe): then no stop follows, and a drain nobody undoes
    // would hold the pod unready and idle until it is deleted. Not before the drain could end,
    // and not over a verb that came after it (another preStop, an operator's drain or pause).
    if let Some(seconds) = p.resume_after {
        let wait = Duration::from_secs(seconds).max(a.drain_timeout);
        let a = a.clone();
        tokio::spawn(async move {
            tokio::time::sleep(wait).await;
            if a.health.is_stopping() {
                return;
            }
            let ((), _) = a.control.one_verb_at_a_time(|| {
                if a.control.verbs.load(Ordering::Relaxed) != drained_at + 1 {
                    return;
                }
                tracing::warn!(
                    seconds = wait.as_secs(),
                    "No stop came after the preStop hook's drain: the container was restarted, not the pod stopped; resuming"
                );
                // Only the drain is undone: an operator's pause from before stays.
                for i in 0..a.routes.len() {
                    a.control.set(i, a.control.is_paused(i), false);
                }
                a.undrained();
            });
        });
    }
    wait_drained(&a, &all).await
}

/// `GET /prestop?resume_after=SECONDS`: resume by itself unless ferry is stopped within that
/// long (the pod's grace period).
#[derive(Deserialize)]
struct Prestop {
    resume_after: Option<u64>,
}

/// Stops `routes` taking records and answers once what they have in flight is final and
/// committed (200), or at the drain timeout (202). A whole drain also turns the pod unready.
async fn drain_and_wait(a: &Admin, routes: Vec<usize>, whole: bool) -> Response {
    start_drain(a, &routes, whole);
    wait_drained(a, &routes).await
}

/// Stops `routes` taking records (a whole drain also turns the pod unready); the count of verbs
/// with this one.
fn start_drain(a: &Admin, routes: &[usize], whole: bool) -> u64 {
    let ((), n) = a.control.one_verb_at_a_time(|| {
        for &i in routes {
            a.control.set(i, a.control.is_paused(i), true);
        }
        if whole {
            a.health.set_drained_by_operator(true);
        }
    });
    tracing::info!(routes = ?names(a, routes), "Draining by an operator's request");
    n
}

/// Answers once what `routes` have in flight is final and committed (200), or at the drain
/// timeout (202).
async fn wait_drained(a: &Admin, routes: &[usize]) -> Response {
    let routes = routes.to_vec();
    let deadline = tokio::time::Instant::now() + a.drain_timeout;
    let drained = loop {
        if a.settled(&routes) {
            break true;
        }
        if tokio::time::Instant::now() >= deadline {
            break false;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    };
    let done = a.done(&routes, Some(drained));
    tracing::info!(drained, in_flight = done.in_flight, "Drain finished");
    let code = if drained {
        StatusCode::OK
    } else {
        StatusCode::ACCEPTED
    };
    (code, axum::Json(done)).into_response()
}

fn control(
    a: &Admin,
    headers: &HeaderMap,
    route: Option<&str>,
    verb: &str,
    apply: impl FnOnce(&Admin, &[usize]) -> Result<(), Refusal>,
) -> Response {
    let applied = a
        .authorize(headers, verb)
        .and_then(|()| a.targets(route))
        .and_then(|routes| apply(a, &routes).map(|()| routes));
    match applied {
        Ok(routes) => axum::Json(a.done(&routes, None)).into_response(),
        Err(refusal) => refusal.into_response(),
    }
}

fn names(a: &Admin, routes: &[usize]) -> Vec<String> {
    routes.iter().map(|&i| a.routes[i].0.clone()).collect()
}
