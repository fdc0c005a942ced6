//! From the service's answer to a decision (SPEC §4): a pure function, table-tested below.
//!
//! Precedence: an explicit action from the service (`ferry-action`), then the route's rules,
//! then the defaults. Whether a retry is still allowed (attempts, age) is not decided here but by
//! [`crate::retry`]; this module only classifies.

use std::fmt;
use std::time::Duration;

use bytes::Bytes;

use crate::call::{Answer, CallError, Status};
use crate::config::{Action, ErrorKind, Reply, Rule};

/// How a record ended. Every record ends in exactly one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
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
    pub const ALL: [Reason; 11] = [
        Reason::Status,
        Reason::Timeout,
        Reason::Connect,
        Reason::Schema,
        Reason::ReplySchema,
        Reason::Contract,
        Reason::Rule,
        Reason::TooOld,
        Reason::TooLarge,
        Reason::BadReplyTopic,
        Reason::ServiceSaid,
    ];

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
    /// The HTTP status or gRPC code name, when there was an answer.
    pub status: Option<String>,
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
        headers: crate::produce::Headers,
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
            format!("the answer is larger than {} bytes", crate::call::MAX_BODY),
        ));
    }
    // 1. The service's own word.
    match &answer.action {
        Some(Ok(action)) => return act(*action, Reason::ServiceSaid, answer, policy),
        Some(Err(why)) => {
            return Decision::DeadLetter(failure(Reason::Contract, Some(answer.status), why.clone()));
        }
        None => {}
    }
    // 2. The route's rules.
    if let Some(rule) = policy.rules.iter().find(|r| rule_matches(r, answer.status)) {
        return act(rule.then, Reason::Rule, answer, policy);
    }
    // 3. The defaults.
    match answer.status {
        Status::Http(200..=299) | Status::Grpc(0) => reply(answer, policy),
        Status::Http(408 | 429 | 500..=599) => Decision::Retry(retryable(answer)),
        Status::Grpc(c) if RETRYABLE_GRPC.contains(&c) => Decision::Retry(retryable(answer)),
        _ => Decision::DeadLetter(answer_failure(Reason::Status, answer)),
    }
}

/// UNKNOWN, DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED, ABORTED, INTERNAL, UNAVAILABLE.
const RETRYABLE_GRPC: [i32; 6] = [2, 4, 8, 10, 13, 14];

fn rule_matches(rule: &Rule, status: Status) -> bool {
    let w = &rule.when;
    if w.error.is_some() {
        return false;
    }
    match status {
        Status::Http(s) => w.grpc.is_none() && w.status.is_some_and(|m| m.matches(s)),
        Status::Grpc(c) => w.status.is_none() && w.grpc.as_deref() == Some(crate::call::grpc::code_name(c)),
    }
}

/// An action asked for by the service (`reason` = `service_said`) or a rule (`rule`).
fn act(action: Action, reason: Reason, answer: &Answer, policy: &Policy<'_>) -> Decision {
    match action {
        Action::Reply => reply(answer, policy),
        Action::Retry => Decision::Retry(Failure {
            // A retry a rule asked for keeps the answer's own reason when it runs out.
            reason: if reason == Reason::Rule {
                Reason::Status
            } else {
                reason
            },
            ..retryable(answer)
        }),
        Action::DeadLetter => Decision::DeadLetter(answer_failure(reason, answer)),
        Action::Drop => Decision::Drop,
    }
}

fn decide_error(error: &CallError, policy: &Policy<'_>) -> Decision {
    let (kind, reason) = match error {
        CallError::Timeout(_) => (ErrorKind::Timeout, Reason::Timeout),
        CallError::Connect(_) | CallError::Unreachable(_) => (ErrorKind::Connect, Reason::Connect),
        // Neither is the service's fault nor will change on a retry.
        CallError::Encode(m) => return Decision::DeadLetter(failure(Reason::Schema, None, m.clone())),
        CallError::Contract(m) => return Decision::DeadLetter(failure(Reason::Contract, None, m.clone())),
    };
    let f = failure(reason, None, error.to_string());
    match policy.rules.iter().find(|r| r.when.error == Some(kind)) {
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
    if answer.body.is_empty() || answer.status == Status::Http(204) {
        return Decision::Done;
    }
    let topic = match &answer.reply_topic {
        // The route's own reply topic is always one the service may name.
        Some(t)
            if policy.reply.topics.iter().any(|allowed| allowed == t)
                || policy.reply.to.as_ref() == Some(t) =>
        {
            t.clone()
        }
        Some(t) => {
            return Decision::DeadLetter(failure(
                Reason::BadReplyTopic,
                Some(answer.status),
                format!("reply topic `{t}` is neither this route's reply.to nor one of its reply.topics"),
            ));
        }
        None => match &policy.reply.to {
            Some(to) => to.clone(),
            // No reply topic configured: the body is discarded by design.
            None => return Decision::Done,
        },
    };
    // Room for the content type, and for the lineage the reply gets when it is written
    // (`produce::reply`): the headers are allocated once.
    let mut headers: crate::produce::Headers =
        Vec::with_capacity(answer.headers.len() + 1 + crate::produce::LINEAGE_HEADERS);
    headers.extend(answer.headers.iter().map(|(k, v)| (k.clone().into(), v.clone())));
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

fn retryable(answer: &Answer) -> Failure {
    Failure {
        retry_after: answer.retry_after,
        ..answer_failure(Reason::Status, answer)
    }
}

/// The service's explanation when it gave one, else its body.
fn answer_failure(reason: Reason, answer: &Answer) -> Failure {
    let message = match &answer.error {
        Some(e) => e.clone(),
        None => String::from_utf8_lossy(&answer.body).into_owned(),
    };
    failure(reason, Some(answer.status), message)
}

fn failure(reason: Reason, status: Option<Status>, message: String) -> Failure {
    Failure {
        reason,
        status: status.map(Status::name),
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
            status: Status::Http(status),
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
            when: When {
                status,
                error,
                grpc: None,
            },
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
            schema: None,
        };
        let rules = vec![
            rule(Some(StatusMatch::Exact(409)), None, Action::Drop),
            rule(Some(StatusMatch::Exact(410)), None, Action::DeadLetter),
            rule(Some(StatusMatch::Exact(422)), None, Action::Reply),
            rule(Some(StatusMatch::Exact(425)), None, Action::Retry),
            rule(None, Some(ErrorKind::Connect), Action::DeadLetter),
            Rule {
                when: When {
                    grpc: Some("NOT_FOUND".into()),
                    ..When::default()
                },
                then: Action::Drop,
            },
        ];
        let policy = Policy {
            rules: &rules,
            reply: &reply,
        };
        let action = |s: u16, a: &str| {
            with(ans(s, "body"), |x| {
                x.action = Some(Action::from_header(a).ok_or_else(|| format!("bad `{a}`")))
            })
        };
        let grpc = |code: i32| -> Result<Answer, CallError> {
            Ok(Answer {
                status: Status::Grpc(code),
                error: Some("why".into()),
                ..Answer::default()
            })
        };
        let native = |a: Result<Action, String>, payload: &str| -> Result<Answer, CallError> {
            Ok(Answer {
                status: Status::Grpc(0),
                action: Some(a),
                body: Bytes::from(payload.to_string()),
                ..Answer::default()
            })
        };
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
                Err(CallError::Connect("reset".into())),
                "dead_letter:rule",
            ),
            (
                "unreachable is a connect error to rules",
                Err(CallError::Unreachable("refused".into())),
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
                "the route's own reply topic, named",
                with(ans(200, "x"), |a| a.reply_topic = Some("out".into())),
                "reply:out",
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
            (
                "grpc OK, native REPLY with payload",
                native(Ok(Action::Reply), "p"),
                "reply:out",
            ),
            (
                "grpc OK, native REPLY without payload",
                native(Ok(Action::Reply), ""),
                "done",
            ),
            (
                "grpc OK, native RETRY",
                native(Ok(Action::Retry), ""),
                "retry:service_said",
            ),
            (
                "grpc OK, native DEAD_LETTER",
                native(Ok(Action::DeadLetter), ""),
                "dead_letter:service_said",
            ),
            ("grpc OK, native DROP", native(Ok(Action::Drop), ""), "drop"),
            (
                "grpc OK, ACTION_UNSPECIFIED",
                native(Err("unset".into()), ""),
                "dead_letter:contract",
            ),
            (
                "grpc OK, dynamic JSON",
                with(grpc(0), |a| a.body = Bytes::from_static(b"{}")),
                "reply:out",
            ),
            ("UNKNOWN", grpc(2), "retry:status"),
            ("DEADLINE_EXCEEDED", grpc(4), "retry:status"),
            ("RESOURCE_EXHAUSTED", grpc(8), "retry:status"),
            ("ABORTED", grpc(10), "retry:status"),
            ("INTERNAL", grpc(13), "retry:status"),
            ("UNAVAILABLE", grpc(14), "retry:status"),
            ("INVALID_ARGUMENT", grpc(3), "dead_letter:status"),
            ("NOT_FOUND, by a rule", grpc(5), "drop"),
            ("PERMISSION_DENIED", grpc(7), "dead_letter:status"),
            ("FAILED_PRECONDITION", grpc(9), "dead_letter:status"),
            ("UNIMPLEMENTED", grpc(12), "dead_letter:status"),
            (
                "value does not fit the message",
                Err(CallError::Encode("bad".into())),
                "dead_letter:schema",
            ),
            (
                "undecodable answer",
                Err(CallError::Contract("bad".into())),
                "dead_letter:contract",
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
        for error in [
            CallError::Connect("reset".into()),
            CallError::Unreachable("refused".into()),
        ] {
            assert_eq!(shape(&decide(&Err(error), &policy)), "retry:connect");
        }
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
            schema: None,
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
                assert_eq!(f.status.as_deref(), Some("400"));
            }
            other => panic!("{other:?}"),
        }
        let retry_after = with(ans(503, ""), |a| a.retry_after = Some(Duration::from_secs(3)));
        match decide(&retry_after, &policy) {
            Decision::Retry(f) => assert_eq!(f.retry_after, Some(Duration::from_secs(3))),
            other => panic!("{other:?}"),
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(4096))]

        /// Whatever the service answers, `decide` gives a decision, and the precedence holds:
        /// the service's own action first, then the route's rules, then the defaults. 4096 cases
        /// per run.
        #[test]
        fn every_answer_gets_a_decision_by_precedence(
            status in 100u16..600,
            grpc in proptest::option::of(0i32..17),
            action in proptest::option::of(0usize..5),
            rule_status in proptest::option::of(100u16..600),
            rule_then in 0usize..4,
            body in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..64),
            reply_to in proptest::prelude::any::<bool>(),
        ) {
            let actions = [Action::Reply, Action::Retry, Action::DeadLetter, Action::Drop];
            let answer = Answer {
                status: grpc.map_or(Status::Http(status), Status::Grpc),
                action: action.map(|a| if a == 4 { Err("nonsense".to_string()) } else { Ok(actions[a]) }),
                body: Bytes::from(body),
                ..Answer::default()
            };
            let rules: Vec<Rule> = rule_status
                .map(|s| rule(Some(StatusMatch::Exact(s)), None, actions[rule_then]))
                .into_iter()
                .collect();
            let reply = Reply { to: reply_to.then(|| "out".to_string()), topics: vec![], schema: None };
            let policy = Policy { rules: &rules, reply: &reply };
            let d = decide(&Ok(answer.clone()), &policy);
            let kind = |d: &Decision| match d {
                Decision::Reply { .. } | Decision::Done => "reply",
                Decision::Retry(_) => "retry",
                Decision::DeadLetter(_) => "dead_letter",
                Decision::Drop => "drop",
            };
            let of = |a: Action| match a {
                Action::Reply => "reply",
                Action::Retry => "retry",
                Action::DeadLetter => "dead_letter",
                Action::Drop => "drop",
            };
            match (&answer.action, rules.first()) {
                (Some(Ok(a)), _) => proptest::prop_assert_eq!(kind(&d), of(*a)),
                (Some(Err(_)), _) => proptest::prop_assert!(matches!(&d, Decision::DeadLetter(f) if f.reason == Reason::Contract)),
                (None, Some(r)) if grpc.is_none() && rule_status == Some(status) => proptest::prop_assert_eq!(kind(&d), of(r.then)),
                (None, _) => {
                    let expected = match answer.status {
                        Status::Http(200..=299) | Status::Grpc(0) => "reply",
                        Status::Http(408 | 429 | 500..=599) => "retry",
                        Status::Grpc(c) if RETRYABLE_GRPC.contains(&c) => "retry",
                        _ => "dead_letter",
                    };
                    proptest::prop_assert_eq!(kind(&d), expected);
                }
            }
            if let Decision::DeadLetter(f) = &d {
                proptest::prop_assert!(f.message.len() <= MAX_MESSAGE + 64);
            }
        }
    }
}
