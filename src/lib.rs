//! ferry: a Kafka sidecar. It consumes topics, calls the co-located service for each record,
//! turns the answer into an outcome, and commits a record's offset only once that outcome is
//! safely in Kafka.
//!
//! ```text
//!            ┌────────────┐  records  ┌──────────┐ lane order ┌─────────┐  answer  ┌─────────┐
//!  Kafka ───▶│  consume   │──────────▶│ dispatch │───────────▶│  route  │◀────────▶│  call   │◀─▶ service
//!            │ (own thread)│          └──────────┘            │ handler │          └─────────┘
//!            └─────┬──────┘                                   └────┬────┘
//!                  │ commit the                      outcome::decide│ retry::next
//!                  │ contiguous watermark                           ▼
//!            ┌─────┴──────┐        finish / abandon          ┌─────────┐  acks=all
//!            │  offsets   │◀─────────────────────────────────│ produce │──────────▶ Kafka
//!            └────────────┘                                  └─────────┘  (reply, dead letter)
//! ```
//!
//! # Layout
//!
//! Modules in the order a record meets them:
//!
//! - [`config`]: YAML → interpolated → typed → checked [`config::Config`];
//! - [`consume`]: the consumer group on its own thread (rebalances: revoke → drain → commit),
//!   and the intake, a task that takes records as the bounds allow;
//! - [`record`]: the owned record that travels;
//! - [`contract`]: payload schemas of records and replies;
//! - [`dispatch`]: lanes (per key, per partition or per record) that keep order;
//! - [`route`]: one record's way through its route;
//! - [`call`]: the service, over HTTP or gRPC;
//! - [`ready`]: the service's readiness gate;
//! - [`outcome`]: answer → decision (pure), and the outcome and reason vocabulary;
//! - [`retry`]: when to try again;
//! - [`circuit`]: the route's circuit breaker;
//! - [`produce`]: reply and dead-letter records, acknowledged by the broker;
//! - [`transaction`]: with `delivery: exactly_once`, outputs and offsets in one transaction;
//! - [`offsets`]: per-partition completion; the only place that decides a commit;
//! - [`admin`]: `/healthz`, `/readyz`, `/metrics`, `/status` and the control verbs (pause,
//!   resume, drain);
//! - [`telemetry`]: every metric name and span attribute, the metrics, one trace per record, logs;
//! - [`sidecar`]: all of the above assembled;
//! - [`broker`]: why the brokers cannot be reached (TLS, SASL), for the start-up check;
//! - [`embedded`]: the embedded broker for local work and tests;
//! - [`memory`]: letting go of the pages only the start needed;
//! - [`wake`]: news that can wait until the runtime is awake anyway (the broker's acknowledgements);
//! - [`cli`]: the commands.

pub mod config;
pub mod consume;
pub mod record;
pub mod contract;
pub mod dispatch;
pub mod route;
pub mod call;
pub mod ready;
pub mod outcome;
pub mod retry;
pub mod circuit;
pub mod produce;
pub mod transaction;
pub mod offsets;
pub mod admin;
pub mod telemetry;
pub mod sidecar;
pub mod broker;
pub mod embedded;
pub mod memory;
pub mod wake;
pub mod cli;
