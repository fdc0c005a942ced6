//! From the service's answer to a decision (SPEC §4): a pure function, table-tested below.
//!
//! Precedence: an explicit action from the service (`ferry-action`), then the route's rules,
//! then the defaults. Whether a retry is still allowed (attempts, age) is not decided here but by
//! [`crate::retry`]; this module only classifies.

use std::fmt;
use std::time::Duration;

use bytes::Bytes;

use crate::call::{Answer, CallError};
use crate::config::{Action, ErrorKind, Reply, Rule};

/// How a record ended. Every record ends in exactly one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// A reply record was published.
    Replied,
    /// Success with nothing to publish.
    Done,
    DeadLettered,
    Dropped,
    /// Too old, or superseded by a newer record of its key.
    Expired,
    /// Moved to a retry topic.
    Deferred,
}

impl Outcome {
    pub const ALL: [Outcome; 6] = [
        Outcome::Replied,
        Outcome::Done,
        Outcome::DeadLettered,
        Outcome::Dropped,
        Outcome::Expired,
        Outcome::Deferred,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Replied => "replied",
            Outcome::Done => "done",
            Outcome::DeadLettered => "dead_lettered",
            Outcome::Dropped => "dropped",
            Outcome::Expired => "expired",
            Outcome::Deferred => "deferred",
        }
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a record was dead-lettered: the `ferry.error.reason` header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Reason {
    Status,
    Timeout,
    Connect,
    Schema,
    ReplySchema,
    Contract,
    Rule,
    TooOld,
    TooLarge,
    BadReplyTopic,
    ServiceSaid,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Status => "status",
            Reason::Timeout => "timeout",
            Reason::Connect => "connect",
            Reason::Schema => "schema",
            Reason::ReplySchema => "reply_schema",
            Reason::Contract => "contract",
            Reason::Rule => "rule",
            Reason::TooOld => "too_old",
            Reason::TooLarge => "too_large",
            Reason::BadReplyTopic => "bad_reply_topic",
            Reason::ServiceSaid => "service_said",
        }
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What went wrong, as it will be written on a dead letter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub reason: Reason,
    /// The HTTP status, when there was an answer.
    pub status: Option<u16>,
    /// At most [`MAX_MESSAGE`] bytes of the answer or of the error.
    pub message: String,
    /// Asked for by the service with `Retry-After`.
    pub retry_after: Option<Duration>,
}

/// `ferry.error.message` is capped at 1 KiB.
pub const MAX_MESSAGE: usize = 1024;

/// What to do with a record after one attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Publish `value` to `topic`.
    Reply {
        topic: String,
        key: Option<Bytes>,
        headers: Vec<(String, Bytes)>,
        value: Bytes,
    },
    /// Success, nothing to publish.
    Done,
    /// Try again, if the retry policy allows; otherwise dead-letter with this failure.
    Retry(Failure),
    DeadLetter(Failure),
    Drop,
}

/// The route settings the decision depends on.
pub struct Policy<'a> {
    pub rules: &'a [Rule],
    pub reply: &'a Reply,
}

/// Decides what to do with a record given the result of one call.
pub fn decide(result: &Result<Answer, CallError>, policy: &Policy<'_>) -> Decision {
    let answer = match result {
        Ok(a) => a,
        Err(e) => return decide_error(e, policy),
    };
    if answer.body_too_large {
        return Decision::DeadLetter(failure(
            Reason::TooLarge,
            Some(answer.status),
            format!("the answer is larger than {} bytes", crate::call::http::MAX_BODY),
        ));
    }
    // 1. The service's own word.
    if let Some(raw) = &answer.action {
        return match Action::from_header(raw) {
            Some(Action::Reply) => reply(answer, policy),
            Some(Action::Retry) => Decision::Retry(Failure {
                retry_after: answer.retry_after,
                ..answer_failure(Reason::ServiceSaid, answer)
            }),
            Some(Action::DeadLetter) => Decision::DeadLetter(answer_failure(Reason::ServiceSaid, answer)),
            Some(Action::Drop) => Decision::Drop,
            None => Decision::DeadLetter(failure(
                Reason::Contract,
                Some(answer.status),
                format!("ferry-action `{raw}` is not one of reply, retry, dead-letter, drop"),
            )),
        };
    }
    // 2. The route's rules.
    let status = answer.status;
    if let Some(rule) = policy
        .rules
        .iter()
        .find(|r| r.when.error.is_none() && r.when.status.is_some_and(|s| s.matches(status)))
    {
        return match rule.then {
            Action::Reply => reply(answer, policy),
            Action::Retry => Decision::Retry(Failure {
                retry_after: answer.retry_after,
                ..answer_failure(Reason::Status, answer)
            }),
            Action::DeadLetter => Decision::DeadLetter(answer_failure(Reason::Rule, answer)),
            Action::Drop => Decision::Drop,
        };
    }
    // 3. The defaults.
    match status {
        200..=299 => reply(answer, policy),
        408 | 429 | 500..=599 => Decision::Retry(Failure {
            retry_after: answer.retry_after,
            ..answer_failure(Reason::Status, answer)
        }),
        _ => Decision::DeadLetter(answer_failure(Reason::Status, answer)),
    }
}

fn decide_error(error: &CallError, policy: &Policy<'_>) -> Decision {
    let (kind, reason) = match error {
        CallError::Timeout(_) => (ErrorKind::Timeout, Reason::Timeout),
        CallError::Connect(_) => (ErrorKind::Connect, Reason::Connect),
    };
    let f = failure(reason, None, error.to_string());
    match policy
        .rules
        .iter()
        .find(|r| r.when.error == Some(kind) && r.when.status.is_none())
    {
        // There is no body to publish after an error: replying means done.
        Some(rule) if rule.then == Action::Reply => Decision::Done,
        Some(rule) if rule.then == Action::DeadLetter => Decision::DeadLetter(Failure {
            reason: Reason::Rule,
            ..f
        }),
        Some(rule) if rule.then == Action::Drop => Decision::Drop,
        _ => Decision::Retry(f),
    }
}

/// A reply: published when there is a body and somewhere to publish it, `done` otherwise.
fn reply(answer: &Answer, policy: &Policy<'_>) -> Decision {
    if answer.body.is_empty() || answer.status == 204 {
        return Decision::Done;
    }
    let topic = match &answer.reply_topic {
        Some(t) if policy.reply.topics.iter().any(|allowed| allowed == t) => t.clone(),
        Some(t) => {
            return Decision::DeadLetter(failure(
                Reason::BadReplyTopic,
                Some(answer.status),
                format!("ferry-reply-topic `{t}` is not one of this route's reply.topics"),
            ));
        }
        None => match &policy.reply.to {
            Some(to) => to.clone(),
            // No reply topic configured: the body is discarded by design.
            None => return Decision::Done,
        },
    };
    let mut headers = answer.headers.clone();
    if let Some(ct) = &answer.content_type {
        if !headers
            .iter()
            .any(|(k, _)| k.eq_ignore_ascii_case("content-type"))
        {
            headers.push(("content-type".into(), Bytes::copy_from_slice(ct.as_bytes())));
        }
    }
    Decision::Reply {
        topic,
        key: answer.reply_key.clone(),
        headers,
        value: answer.body.clone(),
    }
}

fn answer_failure(reason: Reason, answer: &Answer) -> Failure {
    failure(
        reason,
        Some(answer.status),
        String::from_utf8_lossy(&answer.body).into_owned(),
    )
}

fn failure(reason: Reason, status: Option<u16>, message: String) -> Failure {
    Failure {
        reason,
        status,
        message: truncate(message, MAX_MESSAGE),
        retry_after: None,
    }
}

/// Cuts `s` to at most `max` bytes on a character boundary.
pub fn truncate(mut s: String, max: usize) -> String {
    if s.len() > max {
        let mut end = max;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{StatusMatch, When};

    fn ans(status: u16, body: &str) -> Result<Answer, CallError> {
        Ok(Answer {
            status,
            body: Bytes::from(body.to_string()),
            ..Answer::default()
        })
    }

    fn with(mut a: Result<Answer, CallError>, f: impl FnOnce(&mut Answer)) -> Result<Answer, CallError> {
        if let Ok(x) = a.as_mut() {
            f(x)
        }
        a
    }

    fn rule(status: Option<StatusMatch>, error: Option<ErrorKind>, then: Action) -> Rule {
        Rule {
            when: When { status, error },
            then,
        }
    }

    /// The shape of a decision, for a compact table.
    fn shape(d: &Decision) -> String {
        match d {
            Decision::Reply { topic, .. } => format!("reply:{topic}"),
            Decision::Done => "done".into(),
            Decision::Retry(f) => format!("retry:{}", f.reason),
            Decision::DeadLetter(f) => format!("dead_letter:{}", f.reason),
            Decision::Drop => "drop".into(),
        }
    }

    #[test]
    fn table() {
        let reply = Reply {
            to: Some("out".into()),
            topics: vec!["alt".into()],
        };
        let rules = vec![
            rule(Some(StatusMatch::Exact(409)), None, Action::Drop),
            rule(Some(StatusMatch::Exact(410)), None, Action::DeadLetter),
            rule(Some(StatusMatch::Exact(422)), None, Action::Reply),
            rule(Some(StatusMatch::Exact(425)), None, Action::Retry),
            rule(None, Some(ErrorKind::Connect), Action::DeadLetter),
        ];
        let policy = Policy {
            rules: &rules,
            reply: &reply,
        };
        let action = |s: u16, a: &str| with(ans(s, "body"), |x| x.action = Some(a.into()));
        let cases: Vec<(&str, Result<Answer, CallError>, &str)> = vec![
            ("2xx with a body", ans(200, "hi"), "reply:out"),
            ("201 with a body", ans(201, "hi"), "reply:out"),
            ("2xx without a body", ans(200, ""), "done"),
            ("204", ans(204, "ignored"), "done"),
            ("408", ans(408, ""), "retry:status"),
            ("429", ans(429, ""), "retry:status"),
            ("500", ans(500, ""), "retry:status"),
            ("503", ans(503, ""), "retry:status"),
            ("404", ans(404, "no"), "dead_letter:status"),
            ("400", ans(400, "bad"), "dead_letter:status"),
            (
                "3xx is an answer, not followed",
                ans(302, ""),
                "dead_letter:status",
            ),
            (
                "timeout",
                Err(CallError::Timeout(Duration::from_secs(1))),
                "retry:timeout",
            ),
            (
                "connect error with a rule",
                Err(CallError::Connect("refused".into())),
                "dead_letter:rule",
            ),
            ("rule: 409 -> drop", ans(409, ""), "drop"),
            ("rule: 410 -> dead_letter", ans(410, ""), "dead_letter:rule"),
            ("rule: 422 -> reply", ans(422, "x"), "reply:out"),
            ("rule: 425 -> retry", ans(425, ""), "retry:status"),
            (
                "action beats defaults",
                action(200, "dead-letter"),
                "dead_letter:service_said",
            ),
            (
                "action spelled dead_letter",
                action(200, "dead_letter"),
                "dead_letter:service_said",
            ),
            ("action beats rules", action(409, "retry"), "retry:service_said"),
            ("action reply on 500", action(500, "reply"), "reply:out"),
            ("action drop", action(200, "DROP"), "drop"),
            ("unknown action", action(200, "maybe"), "dead_letter:contract"),
            (
                "chosen reply topic",
                with(ans(200, "x"), |a| a.reply_topic = Some("alt".into())),
                "reply:alt",
            ),
            (
                "reply topic not allowed",
                with(ans(200, "x"), |a| a.reply_topic = Some("evil".into())),
                "dead_letter:bad_reply_topic",
            ),
            (
                "too large",
                with(ans(200, "x"), |a| a.body_too_large = true),
                "dead_letter:too_large",
            ),
        ];
        for (name, input, want) in cases {
            assert_eq!(shape(&decide(&input, &policy)), want, "{name}");
        }
    }

    #[test]
    fn without_rules_a_connect_error_is_retried() {
        let reply = Reply::default();
        let policy = Policy {
            rules: &[],
            reply: &reply,
        };
        let d = decide(&Err(CallError::Connect("refused".into())), &policy);
        assert_eq!(shape(&d), "retry:connect");
    }

    #[test]
    fn without_a_reply_topic_the_body_is_discarded() {
        let reply = Reply::default();
        let policy = Policy {
            rules: &[],
            reply: &reply,
        };
        assert_eq!(decide(&ans(200, "hi"), &policy), Decision::Done);
    }

    #[test]
    fn reply_carries_key_headers_and_content_type() {
        let reply = Reply {
            to: Some("out".into()),
            topics: vec![],
        };
        let policy = Policy {
            rules: &[],
            reply: &reply,
        };
        let input = with(ans(200, "{}"), |a| {
            a.reply_key = Some(Bytes::from_static(b"k2"));
            a.headers = vec![("x".into(), Bytes::from_static(b"1"))];
            a.content_type = Some("application/json".into());
        });
        match decide(&input, &policy) {
            Decision::Reply {
                key, headers, value, ..
            } => {
                assert_eq!(key.as_deref(), Some(&b"k2"[..]));
                assert_eq!(value, Bytes::from_static(b"{}"));
                assert_eq!(headers.len(), 2);
                assert_eq!(headers[1].0, "content-type");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn failure_messages_are_capped_at_a_char_boundary() {
        let reply = Reply::default();
        let policy = Policy {
            rules: &[],
            reply: &reply,
        };
        let long = "é".repeat(2000);
        match decide(&ans(400, &long), &policy) {
            Decision::DeadLetter(f) => {
                assert!(f.message.len() <= MAX_MESSAGE);
                assert_eq!(f.status, Some(400));
            }
            other => panic!("{other:?}"),
        }
        let retry_after = with(ans(503, ""), |a| a.retry_after = Some(Duration::from_secs(3)));
        match decide(&retry_after, &policy) {
            Decision::Retry(f) => assert_eq!(f.retry_after, Some(Duration::from_secs(3))),
            other => panic!("{other:?}"),
        }
    }
}
