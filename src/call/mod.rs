//! Calling the service: one call per record attempt, behind one trait per transport.
//!
//! Fed by the route handler with a record and its attempt number; returns the service's
//! [`Answer`] or a [`CallError`], which [`crate::outcome`] turns into a decision.

pub mod http;
pub mod template;

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use bytes::Bytes;

use crate::record::Record;

/// The service's answer, whatever the transport.
#[derive(Debug, Clone, Default)]
pub struct Answer {
    /// The HTTP status.
    pub status: u16,
    /// The raw `ferry-action` response header, if any.
    pub action: Option<String>,
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
}

/// A call that got no answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CallError {
    #[error("the call timed out after {0:?}")]
    Timeout(Duration),
    /// The service could not be reached, or the connection broke before an answer.
    #[error("cannot reach the service: {0}")]
    Connect(String),
}

pub type CallFuture<'a> = Pin<Box<dyn Future<Output = Result<Answer, CallError>> + Send + 'a>>;

/// One transport to the service.
pub trait Call: Send + Sync {
    /// Calls the service for `record`; `attempt` counts from 1.
    fn call<'a>(&'a self, record: &'a Record, attempt: u32) -> CallFuture<'a>;
}
