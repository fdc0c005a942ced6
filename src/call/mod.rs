//! Calling the service: one call per record attempt, over the route's transport.
//!
//! Fed by the route handler with a record and its attempt number; returns the service's
//! [`Answer`] or a [`CallError`], which [`crate::outcome`] turns into a decision.

/// Answers above this (an HTTP body, a gRPC reply message) are not read further; the record is
/// dead-lettered as `too_large`.
pub const MAX_BODY: usize = 16 * 1024 * 1024;

pub mod grpc;
pub mod http;
pub mod pool;
pub mod template;
pub mod tls;

use std::time::Duration;

use base64::Engine;
use bytes::Bytes;

use crate::config::Action;
use crate::record::Record;
use crate::telemetry::trace::TraceHeaders;

/// One attempt at calling the service for a record.
#[derive(Debug, Clone, Default)]
pub struct Attempt {
    /// Counts from 1.
    pub number: u32,
    /// The attempt's own trace context, when ferry traces; otherwise the record's travels on.
    pub trace: Option<TraceHeaders>,
}

/// How the call ended, in its transport's terms.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Http(u16),
    /// A gRPC status code (`tonic::Code` as its number).
    Grpc(i32),
}

impl Default for Status {
    fn default() -> Self {
        Status::Http(200)
    }
}

impl Status {
    /// As written in `ferry.error.status`: the HTTP status, or the gRPC code's name.
    pub fn name(self) -> String {
        match self {
            Status::Http(s) => s.to_string(),
            Status::Grpc(c) => grpc::code_name(c).to_string(),
        }
    }
}

/// The service's answer, whatever the transport.
#[derive(Debug, Clone, Default)]
pub struct Answer {
    pub status: Status,
    /// What the service asked for explicitly (`ferry-action`, `Reply.action`); `Err` holds why
    /// the request is not understood (a contract error).
    pub action: Option<Result<Action, String>>,
    /// `ferry-reply-topic`.
    pub reply_topic: Option<String>,
    /// `ferry-reply-key`.
    pub reply_key: Option<Bytes>,
    /// `ferry-header-<name>` response headers, with the prefix removed.
    pub headers: Vec<(String, Bytes)>,
    pub content_type: Option<String>,
    pub body: Bytes,
    /// `Retry-After`, as a delay from now.
    pub retry_after: Option<Duration>,
    /// The body was longer than ferry accepts; `body` holds its beginning.
    pub body_too_large: bool,
    /// The service's own explanation of a failure (gRPC `Reply.error`), preferred over the body
    /// for `ferry.error.message`.
    pub error: Option<String>,
}

/// A call that got no answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CallError {
    #[error("the call timed out after {0:?}")]
    Timeout(Duration),
    /// No connection to the service could be opened (nothing listens on its port, say, while
    /// it restarts): the request never reached it, so the failure says nothing about the
    /// record, and the route's circuit opens at once (see `circuit`).
    #[error("cannot reach the service: {0}")]
    Unreachable(String),
    /// The connection failed otherwise: it broke before an answer (the service may have
    /// crashed on this very record, so it counts towards the record's attempts, even as the
    /// probe of an open circuit), or its TLS handshake or name lookup failed.
    #[error("the connection to the service failed: {0}")]
    Connect(String),
    /// The record cannot be turned into a request (a JSON value that does not fit the method's
    /// message). Never retried.
    #[error("{0}")]
    Encode(String),
    /// The answer cannot be understood (an undecodable response message).
    #[error("{0}")]
    Contract(String),
}

/// Whether `error` (or one of its causes) is a connection the operating system refused to
/// open: nothing listening on the port, no route to the host. The service was never reached.
/// (Not `AddrNotAvailable`: that is this host out of local ports, not the service away.)
pub(crate) fn never_reached(error: &(dyn std::error::Error + 'static)) -> bool {
    use std::io::ErrorKind::*;
    let mut cause = Some(error);
    while let Some(e) = cause {
        if let Some(io) = e.downcast_ref::<std::io::Error>()
            && matches!(
                io.kind(),
                ConnectionRefused | HostUnreachable | NetworkUnreachable
            )
        {
            return true;
        }
        cause = e.source();
    }
    false
}

/// The request metadata SPEC §3 lists, for either transport: `put(name, value)` adds one entry
/// and says whether the transport could carry it (a key that cannot travel as text goes as
/// `ferry-key-base64`; a record header that cannot travel is left out, with a debug line).
pub(crate) fn describe(record: &Record, attempt: &Attempt, mut put: impl FnMut(&str, &[u8]) -> bool) {
    // Numbers are formatted on the stack: this runs for every attempt.
    let mut number = itoa::Buffer::new();
    put("ferry-topic", record.topic.as_bytes());
    put("ferry-partition", number.format(record.partition).as_bytes());
    put("ferry-offset", number.format(record.offset).as_bytes());
    if let Some(ts) = record.timestamp_ms {
        put("ferry-timestamp", number.format(ts).as_bytes());
    }
    if let Some(key) = &record.key {
        let printable = std::str::from_utf8(key).is_ok_and(|k| !k.chars().any(char::is_control));
        if !(printable && put("ferry-key", key)) {
            put(
                "ferry-key-base64",
                base64::engine::general_purpose::STANDARD.encode(key).as_bytes(),
            );
        }
    }
    put("ferry-attempt", number.format(attempt.number).as_bytes());
    record.with_idempotency_key(|k| put("idempotency-key", k.as_bytes()));
    if let Some(trace) = &attempt.trace {
        for (name, value) in &trace.0 {
            put(name, value.as_bytes());
        }
    }
    for (name, value) in &record.headers {
        if attempt.trace.is_none() && (name == "traceparent" || name == "tracestate") {
            put(name, value);
        }
        if !put(&format!("ferry-header-{}", name.to_ascii_lowercase()), value) {
            tracing::debug!(header = %name, "Header cannot travel to the service, not forwarded");
        }
    }
}

/// An error and its causes: hyper's and reqwest's top-level messages are generic ("client error
/// (Connect)", "error sending request"); the cause says what happened.
pub(crate) fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut parts = vec![e.to_string()];
    let mut source = e.source();
    while let Some(s) = source {
        parts.push(s.to_string());
        source = s.source();
    }
    parts.dedup();
    parts.join(": ")
}

/// The transport of a route to the service.
///
/// An enum rather than a trait object: a call's future then lives in the lane's task, which is
/// allocated anyway, instead of a box of kilobytes of its own per attempt.
pub enum Transport {
    Http(http::Http),
    Grpc(grpc::Grpc),
}

impl Transport {
    /// Calls the service for `record`.
    pub async fn call(&self, record: &Record, attempt: &Attempt) -> Result<Answer, CallError> {
        match self {
            Transport::Http(h) => h.call(record, attempt).await,
            Transport::Grpc(g) => g.call(record, attempt).await,
        }
    }

    /// As the metrics label it: `http` or `grpc`.
    pub fn name(&self) -> &'static str {
        match self {
            Transport::Http(_) => "http",
            Transport::Grpc(_) => "grpc",
        }
    }
}
