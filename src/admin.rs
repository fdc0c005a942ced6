//! The admin endpoint: `GET /healthz` and `GET /readyz` for Kubernetes probes.
//!
//! Liveness means the process makes progress (the poll loop beats), never merely that the broker
//! or the service is down. Readiness means subscribed, topics checked and not draining.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

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
    /// Why ferry is not ready, for the `/readyz` body and the logs.
    problem: Mutex<Option<String>>,
    /// The service's readiness, when a probe is configured.
    service: std::sync::OnceLock<Arc<crate::ready::Gate>>,
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
            problem: Mutex::new(None),
            service: std::sync::OnceLock::new(),
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

    pub fn set_draining(&self) {
        self.draining.store(true, Ordering::Relaxed);
    }

    pub fn live(&self) -> bool {
        let last = Duration::from_millis(self.heartbeat_ms.load(Ordering::Relaxed));
        self.start.elapsed().saturating_sub(last) < self.stall_after
    }

    /// `Ok` when ready, else why not.
    pub fn ready(&self) -> Result<(), String> {
        if self.draining.load(Ordering::Relaxed) {
            return Err("draining".into());
        }
        if !self.topics_checked.load(Ordering::Relaxed) {
            let problem = self.problem.lock().unwrap_or_else(|p| p.into_inner()).clone();
            return Err(problem.unwrap_or_else(|| "checking topics".into()));
        }
        if self.service.get().is_some_and(|g| !g.is_open()) {
            return Err("the service is not ready".into());
        }
        if !self.subscribed.load(Ordering::Relaxed) {
            return Err("not subscribed yet".into());
        }
        Ok(())
    }
}

/// Binds the admin listener now (so a taken port fails the start) and serves until `stop`.
pub async fn serve(
    addr: SocketAddr,
    health: Arc<Health>,
    stop: CancellationToken,
) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    let app = Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(health);
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

async fn healthz(State(h): State<Arc<Health>>) -> (StatusCode, &'static str) {
    if h.live() {
        (StatusCode::OK, "ok\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "the poll loop is stuck\n")
    }
}

async fn readyz(State(h): State<Arc<Health>>) -> (StatusCode, String) {
    match h.ready() {
        Ok(()) => (StatusCode::OK, "ready\n".into()),
        Err(why) => (StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {why}\n")),
    }
}
