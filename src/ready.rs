//! The service's readiness gate (`service.ready`): ferry subscribes only once the service answers
//! its probe, and stops taking records after `failure_threshold` failed probes in a row, until a
//! probe succeeds again. Records already taken finish (or retry) as usual.
//!
//! Fed by a probe loop; read by the consumer loop (no room while closed) and by `/readyz`.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::admin::Health;
use crate::config::Ready;

/// Open when the service is ready (or no probe is configured); closed, with what the last probe
/// said, when it is not.
#[derive(Debug)]
pub struct Gate {
    open: AtomicBool,
    /// What the last failed probe said, for `/readyz` and the log.
    why: Mutex<Option<String>>,
}

impl Gate {
    pub fn new(open: bool) -> Self {
        Gate {
            open: AtomicBool::new(open),
            why: Mutex::new(None),
        }
    }

    pub fn is_open(&self) -> bool {
        self.open.load(Ordering::Relaxed)
    }

    /// What the last failed probe said, while the gate is closed.
    pub fn why_closed(&self) -> Option<String> {
        if self.is_open() {
            return None;
        }
        self.why.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn open(&self) {
        if !self.open.swap(true, Ordering::Relaxed) {
            tracing::info!("Service is ready: taking records");
        }
    }

    /// Closes the gate, or keeps it closed, because the probe said `why`.
    pub fn close(&self, why: String) {
        let was_open = self.open.swap(false, Ordering::Relaxed);
        if was_open {
            tracing::warn!(why = %why, "Service is not ready: no new records until it is");
        }
        *self.why.lock().unwrap_or_else(|p| p.into_inner()) = Some(why);
    }
}

/// One way of asking the service whether it is ready.
pub enum Probe {
    Http {
        client: reqwest::Client,
        url: String,
    },
    Grpc {
        channel: tonic::transport::Channel,
        url: String,
    },
}

impl Probe {
    pub fn new(config: &Ready) -> Result<Probe, String> {
        let timeout = config.interval.0.min(Duration::from_secs(5));
        if let Some(url) = &config.http {
            let builder = reqwest::Client::builder().no_proxy().timeout(timeout);
            let client = with_tls(builder, config.tls())?
                .build()
                .map_err(|e| format!("cannot build the probe client: {e}"))?;
            return Ok(Probe::Http {
                client,
                url: url.clone(),
            });
        }
        let url = config.grpc.clone().unwrap_or_default();
        let endpoint = tonic::transport::Endpoint::from_shared(url.clone())
            .map_err(|e| format!("`{url}` is not a gRPC endpoint: {e}"))?
            .timeout(timeout);
        let channel = crate::call::grpc::with_tls(endpoint, config.tls())?.connect_lazy();
        Ok(Probe::Grpc { channel, url })
    }

    /// `Ok` when the service says it is ready, else why not.
    pub async fn check(&self) -> Result<(), String> {
        match self {
            Probe::Http { client, url } => match client.get(url).send().await {
                Ok(r) if r.status().is_success() => Ok(()),
                Ok(r) => Err(format!("{url} answered {}", r.status())),
                Err(e) => Err(format!("{url}: {}", crate::call::error_chain(&e.without_url()))),
            },
            Probe::Grpc { channel, url } => {
                use tonic_health::pb::health_check_response::ServingStatus;
                use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
                let mut client = HealthClient::new(channel.clone());
                match client
                    .check(HealthCheckRequest {
                        service: String::new(),
                    })
                    .await
                {
                    Ok(r) if r.get_ref().status == ServingStatus::Serving as i32 => Ok(()),
                    Ok(r) => Err(format!(
                        "{url}'s health service answered {}",
                        ServingStatus::try_from(r.get_ref().status)
                            .map_or("an unknown status", |s| s.as_str_name())
                    )),
                    Err(s) => Err(format!("{url}'s health check failed: {}", s.message())),
                }
            }
        }
    }
}

/// Probes until the service is ready for the first time; `false` if `stop` came first.
pub async fn wait_until_ready(
    probe: &Probe,
    config: &Ready,
    gate: &Gate,
    stop: &CancellationToken,
    health: &Health,
) -> bool {
    loop {
        // Waiting for the service is progress, not a stuck process: stay live.
        health.beat();
        match probe.check().await {
            Ok(()) => {
                gate.open();
                return true;
            }
            Err(why) => {
                tracing::info!(why = %why, "Waiting for the service to be ready");
                gate.close(why);
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(config.interval.0) => {}
            _ = stop.cancelled() => return false,
        }
    }
}

/// Keeps probing: closes `gate` after `failure_threshold` failures in a row, opens it on the next
/// success.
pub async fn watch(probe: Probe, config: Ready, gate: std::sync::Arc<Gate>, stop: CancellationToken) {
    let mut failures = 0;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(config.interval.0) => {}
            _ = stop.cancelled() => return,
        }
        match probe.check().await {
            Ok(()) => {
                failures = 0;
                gate.open();
            }
            Err(why) => {
                failures += 1;
                tracing::debug!(why = %why, failures, "Readiness probe failed");
                if failures >= config.failure_threshold {
                    gate.close(why);
                }
            }
        }
    }
}

/// Trusts only the configured CA (no system roots) and presents the client certificate, if any.
fn with_tls(
    builder: reqwest::ClientBuilder,
    files: crate::config::TlsFiles<'_>,
) -> Result<reqwest::ClientBuilder, String> {
    let Some(pem) = crate::call::tls::load(files)? else {
        return Ok(builder);
    };
    let ca = reqwest::Certificate::from_pem_bundle(&pem.ca).map_err(|e| format!("ca_file: {e}"))?;
    let mut builder = builder.tls_certs_only(ca);
    if let Some(bundle) = pem.identity_bundle() {
        builder = builder
            .identity(reqwest::Identity::from_pem(&bundle).map_err(|e| format!("cert_file/key_file: {e}"))?);
    }
    Ok(builder)
}
