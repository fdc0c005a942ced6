//! `ferry run -c FILE`: the sidecar, until SIGTERM or SIGINT.

use std::path::Path;

use tokio::signal::unix::{SignalKind, signal};

use crate::config::{self, EXIT_CONFIG, Interpolator, LogFormat};
use crate::memory;
use crate::sidecar::Sidecar;
use crate::telemetry;

pub async fn run(path: &Path) -> i32 {
    let (config, warnings) = match config::load_with_warnings(path, &Interpolator::from_env()) {
        Ok(l) => (l.config, l.warnings),
        Err(errors) => {
            // A log pipeline that reads JSON lines (FERRY_LOG_FORMAT=json) gets this one as
            // JSON too; the config that would say so did not load.
            if std::env::var("FERRY_LOG_FORMAT").as_deref() == Ok("json")
                && telemetry::init_logging("info", true).is_ok()
                && tracing::enabled!(tracing::Level::ERROR)
            {
                tracing::error!(errors = %errors, "The config is not valid");
            } else {
                eprintln!("{errors}");
            }
            return EXIT_CONFIG;
        }
    };
    let log = &config.telemetry.log;
    if let Err(e) = telemetry::init_logging(&log.level, log.format == LogFormat::Json) {
        eprintln!("error: {e}");
        return EXIT_CONFIG;
    }
    for w in &warnings {
        tracing::warn!(warning = %w, "Config warning");
    }
    let (mut term, mut int) = match (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) {
        (Ok(t), Ok(i)) => (t, i),
        _ => {
            return super::fail(
                "cannot install signal handlers",
                &anyhow::anyhow!("signal setup failed"),
            );
        }
    };
    let sidecar = match Sidecar::start(config).await {
        Ok(s) => s,
        Err(e) => {
            // Logging is set up by now: the reason goes where the rest of the log goes, as JSON
            // when that is the format; on stderr as it is when the log filter hides errors.
            let why = format!("{:#}", anyhow::Error::from(e));
            if tracing::enabled!(tracing::Level::ERROR) {
                tracing::error!(error = %why, "Cannot start");
            } else {
                eprintln!("error: cannot start: {why}");
            }
            return 1;
        }
    };
    tracing::info!(
        version = env!("CARGO_PKG_VERSION"),
        runtime_workers = tokio::runtime::Handle::current().metrics().num_workers(),
        "ferry started"
    );
    tokio::spawn(release_startup_code());
    let stopper = sidecar.stopper();
    let mut done = std::pin::pin!(sidecar.wait());
    tokio::select! {
        r = &mut done => return report(r),
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    tracing::info!("Shutdown requested: draining (a second signal exits at once)");
    stopper.stop();
    tokio::select! {
        r = &mut done => report(r),
        _ = term.recv() => second_signal(),
        _ = int.recv() => second_signal(),
    }
}

/// Once the start is well past, lets go of the pages of code only the start ran (see `memory`).
async fn release_startup_code() {
    tokio::time::sleep(memory::RELEASE_AFTER).await;
    match tokio::task::spawn_blocking(memory::release_startup_code).await {
        Ok(Ok(released)) => tracing::info!(
            mappings = released.mappings,
            resident_kib = released.resident_kib,
            "Let go of the start-up code's pages; what runs on is mapped again as it runs"
        ),
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "Cannot read this process's mappings; the start-up code stays resident")
        }
        Err(_) => {}
    }
}

fn report(result: Result<(), crate::sidecar::RunError>) -> i32 {
    match result {
        Ok(()) => {
            tracing::info!("Stopped cleanly");
            0
        }
        Err(e) => super::fail("ferry stopped", &e.into()),
    }
}

fn second_signal() -> i32 {
    tracing::warn!("Second signal: exiting without finishing the drain");
    std::process::exit(1);
}
