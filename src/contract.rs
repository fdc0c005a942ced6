//! Payload contracts: a record's value checked against `validate.schema` before it reaches the
//! service, and a reply body against `reply.schema` before it is published.
//!
//! Fed by the route handler; a record or reply that breaks its contract becomes a dead letter
//! (reasons `schema` and `reply_schema`) whose message names every failing path.

use jsonschema::Validator;

/// At most this many violations are listed in a dead letter's message.
const LISTED: usize = 5;

/// Checks `payload` (a JSON document; `None` for a tombstone, checked as `null`) against
/// `schema`. `Err` says what is wrong and where, for `ferry.error.message`.
pub fn check(schema: &Validator, payload: Option<&[u8]>, what: &str) -> Result<(), String> {
    let value: serde_json::Value = match payload {
        None => serde_json::Value::Null,
        Some(bytes) => serde_json::from_slice(bytes)
            .map_err(|e| format!("{what} is not JSON ({e}), so it cannot match its schema"))?,
    };
    let violations: Vec<String> = schema
        .iter_errors(&value)
        .map(|e| {
            let at = e.instance_path().as_str();
            format!("at {}: {e}", if at.is_empty() { "/" } else { at })
        })
        .collect();
    if violations.is_empty() {
        return Ok(());
    }
    let more = violations.len().saturating_sub(LISTED);
    let mut message = format!(
        "{what} does not match its schema: {}",
        violations[..violations.len().min(LISTED)].join("; ")
    );
    if more > 0 {
        message.push_str(&format!("; and {more} more"));
    }
    Err(message)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schema() -> Validator {
        jsonschema::validator_for(&serde_json::json!({
            "type": "object",
            "required": ["id", "amount"],
            "properties": { "id": {"type": "string"}, "amount": {"type": "number", "minimum": 0} }
        }))
        .unwrap()
    }

    #[test]
    fn names_each_failing_path() {
        let s = schema();
        assert_eq!(check(&s, Some(br#"{"id":"a","amount":3}"#), "the value"), Ok(()));
        let e = check(&s, Some(br#"{"id":7,"amount":-1}"#), "the value").unwrap_err();
        assert!(e.starts_with("the value does not match its schema: "), "{e}");
        assert!(e.contains("at /amount: -1 is less than the minimum of 0"), "{e}");
        assert!(e.contains("at /id: 7 is not of type \"string\""), "{e}");
        let e = check(&s, Some(b"{}"), "the value").unwrap_err();
        assert!(e.contains("at /: \"id\" is a required property"), "{e}");
    }

    #[test]
    fn non_json_and_tombstones_are_refused_not_crashed_on() {
        let s = schema();
        let e = check(&s, Some(b"\xff not json"), "the value").unwrap_err();
        assert!(e.starts_with("the value is not JSON"), "{e}");
        assert!(
            check(&s, None, "the value")
                .unwrap_err()
                .contains("null is not of type \"object\"")
        );
    }
}
