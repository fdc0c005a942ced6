//! Why the brokers cannot be reached.
//!
//! librdkafka reports a failed TLS handshake or SASL authentication only to its error callback
//! and its log; a metadata request merely times out. When the start-up topic check cannot read
//! metadata, [`explain`] connects once more with a client that keeps those reports, so that
//! `/readyz` and the log say what is wrong (`certificate verify failed`, `SASL authentication
//! failed`) instead of a bare timeout. Fed by the shared client settings; feeds the topic check's
//! message.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use rdkafka::ClientConfig;
use rdkafka::client::ClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::KafkaError;

/// Keeps what librdkafka reports instead of logging it (the sidecar's own clients log it).
#[derive(Default)]
struct Reports(Mutex<Vec<String>>);

impl Reports {
    fn push(&self, report: String) {
        let mut reports = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if !reports.contains(&report) {
            reports.push(report);
        }
    }
}

impl ClientContext for Reports {
    fn log(&self, level: RDKafkaLogLevel, _fac: &str, message: &str) {
        use RDKafkaLogLevel::*;
        if matches!(level, Emerg | Alert | Critical | Error) {
            self.push(message.to_string());
        }
    }

    fn error(&self, _error: KafkaError, reason: &str) {
        self.push(reason.to_string());
    }
}

impl ConsumerContext for Reports {}

/// What librdkafka says when it tries to reach the brokers with `client`, within `within`; `None`
/// when it says nothing (the brokers answered, or are simply slow).
pub fn explain(client: &ClientConfig, within: Duration) -> Option<String> {
    let consumer: BaseConsumer<Reports> = client.create_with_context(Reports::default()).ok()?;
    // The first report that names a cause; "all brokers are down" only counts them.
    let telling = |r: &&String| !r.contains("brokers are down");
    let reports = || {
        consumer
            .context()
            .0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    };
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if consumer.fetch_metadata(None, Duration::from_millis(500)).is_ok() {
            return None;
        }
        // Logs and errors reach the context only while the client is polled.
        let _ = consumer.poll(Duration::from_millis(100));
        if reports().iter().any(|r| telling(&r)) {
            break;
        }
    }
    let reports = reports();
    reports.iter().find(telling).or(reports.first()).map(|r| tidy(r))
}

/// `ssl://localhost:9093/bootstrap: SSL handshake failed: …` → `localhost:9093: SSL handshake
/// failed: …`: the broker and librdkafka's words, without its thread decorations.
fn tidy(report: &str) -> String {
    let report = report.trim();
    // Log lines start with the thread: `[thrd:sasl_plaintext://host:port/bootstrap]: `.
    let report = match report.strip_prefix("[thrd:").and_then(|r| r.split_once("]: ")) {
        Some((_, rest)) => rest,
        None => report,
    };
    match report.split_once(": ") {
        Some((broker, rest)) if broker.ends_with("/bootstrap") || broker.contains("://") => {
            let broker = broker.trim_end_matches("/bootstrap");
            let broker = broker.split_once("://").map_or(broker, |(_, b)| b);
            format!("{broker}: {rest}")
        }
        _ => report.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_keep_the_broker_and_the_cause() {
        assert_eq!(
            tidy("ssl://localhost:9093/bootstrap: SSL handshake failed: certificate verify failed"),
            "localhost:9093: SSL handshake failed: certificate verify failed"
        );
        assert_eq!(
            tidy(
                "[thrd:sasl_plaintext://127.0.0.1:1/bootstrap]: sasl_plaintext://127.0.0.1:1/bootstrap: Failed to initialize SASL authentication"
            ),
            "127.0.0.1:1: Failed to initialize SASL authentication"
        );
        assert_eq!(tidy("1/1 brokers are down"), "1/1 brokers are down");
    }

    #[test]
    fn an_unreachable_broker_is_explained() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .unwrap();
        let mut client = ClientConfig::new();
        client.set("bootstrap.servers", format!("127.0.0.1:{port}"));
        let why = explain(&client, Duration::from_secs(2)).expect("an explanation");
        assert!(why.contains("Connection refused"), "{why}");
    }
}
