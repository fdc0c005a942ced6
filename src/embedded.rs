//! The embedded broker: librdkafka's mock cluster, for `ferry dev broker`, `ferry demo` and tests.
//!
//! It speaks the Kafka protocol on loopback, supports consumer groups, commits and idempotent
//! produce, and keeps everything in memory for as long as this value lives.

use rdkafka::ClientConfig;
use rdkafka::error::KafkaError;
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{BaseProducer, DefaultProducerContext, Producer};

/// A running embedded broker.
pub struct EmbeddedBroker {
    /// The mock cluster lives inside this client's librdkafka instance.
    host: BaseProducer,
    bootstrap: String,
}

impl EmbeddedBroker {
    /// Starts a cluster of `brokers` brokers on random loopback ports.
    pub fn start(brokers: u32) -> Result<Self, KafkaError> {
        let host: BaseProducer = ClientConfig::new()
            .set("test.mock.num.brokers", brokers.to_string())
            .set("log_level", "3")
            .create()?;
        let bootstrap = host
            .client()
            .mock_cluster()
            .map(|m| m.bootstrap_servers())
            .ok_or_else(|| KafkaError::MockCluster(rdkafka::types::RDKafkaErrorCode::Fail))?;
        // The mock waits 3 s before the first rebalance of a group, like a real broker's
        // group.initial.rebalance.delay.ms; local work wants it at once.
        unsafe {
            let cluster = rdkafka_sys::rd_kafka_handle_mock_cluster(host.client().native_ptr());
            if !cluster.is_null() {
                rdkafka_sys::rd_kafka_mock_group_initial_rebalance_delay_ms(cluster, 0);
            }
        }
        Ok(EmbeddedBroker { host, bootstrap })
    }

    /// The `bootstrap.servers` string.
    pub fn bootstrap_servers(&self) -> &str {
        &self.bootstrap
    }

    pub fn create_topic(&self, name: &str, partitions: i32) -> Result<(), KafkaError> {
        self.mock()?.create_topic(name, partitions, 1)
    }

    /// The mock cluster, for error injection in tests.
    pub fn mock(&self) -> Result<MockCluster<'_, DefaultProducerContext>, KafkaError> {
        self.host
            .client()
            .mock_cluster()
            .ok_or(KafkaError::MockCluster(rdkafka::types::RDKafkaErrorCode::Fail))
    }
}
