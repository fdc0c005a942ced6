//! The JSON Schema of the config format, generated from the config types (so it cannot drift
//! from what the loader accepts), and the check of a document against it that reports every
//! error at once, each at its own path.
//!
//! Values written as text and parsed by hand (durations, sizes, start positions, statuses) carry
//! a `format` that this check runs with the loader's own parser, and their errors carry the
//! loader's own words.

use std::sync::LazyLock;

use jsonschema::error::ValidationErrorKind;
use jsonschema::{ValidationError, Validator};
use serde_json::Value;

use super::types::{ByteSize, Config, Dur, Start, StatusMatch};

/// The schema, as `ferry schema` prints it.
pub fn schema() -> Value {
    let mut schema = serde_json::to_value(schemars::schema_for!(Config)).unwrap_or_default();
    if let Some(o) = schema.as_object_mut() {
        o.insert("$id".into(), "https://ferry.dev/schema/ferry.json".into());
        o.insert("title".into(), "ferry.yaml".into());
        o.insert(
            "description".into(),
            "The configuration of ferry, a Kafka sidecar. Generated from ferry's config types by `ferry schema`.".into(),
        );
    }
    schema
}

/// Whether `value` parses as `T`; the parser's own message when it does not.
fn parses<T: serde::de::DeserializeOwned>(value: &Value) -> Result<(), String> {
    serde_json::from_value::<T>(value.clone())
        .map(|_| ())
        .map_err(|e| e.to_string())
}

pub(super) const NOT_A_LISTEN_ADDRESS: &str = "not an address to listen on: write IP:PORT, such as 0.0.0.0:9464 (every interface) or 127.0.0.1:9464 (this pod only); a host name is not taken";

fn format_check(format: &str, value: &Value) -> Result<(), String> {
    match format {
        "duration" => parses::<Dur>(value),
        "byte-size" => parses::<ByteSize>(value),
        "start" => parses::<Start>(value),
        "status" => parses::<StatusMatch>(value),
        "listen-address" => parses::<std::net::SocketAddr>(value).map_err(|_| NOT_A_LISTEN_ADDRESS.into()),
        _ => Ok(()),
    }
}

static VALIDATOR: LazyLock<Result<Validator, String>> = LazyLock::new(|| {
    let mut options = jsonschema::options().should_validate_formats(true);
    for f in ["duration", "byte-size", "start", "listen-address"] {
        options = options.with_format(f, move |s: &str| {
            format_check(f, &Value::String(s.into())).is_ok()
        });
    }
    options = options.with_format("status", |s: &str| {
        format_check("status", &Value::String(s.into())).is_ok()
    });
    options.build(&SCHEMA).map_err(|e| e.to_string())
});

static SCHEMA: LazyLock<Value> = LazyLock::new(schema);

/// Values the field at `path` (`routes[0].ordering`) may take beside numbers, durations and
/// booleans, in the schema's order (a set's first value is its usual one: `ordering: key`):
/// its default, the values of its set, and an address where it takes one. `ferry validate
/// --env-optional` tries them in place of a missing variable.
pub fn stand_ins(path: &str) -> Vec<Value> {
    let mut out = Vec::new();
    if let Some(field) = field_schema(&SCHEMA, path) {
        let mut fields = vec![field];
        while let Some(f) = fields.pop() {
            let f = resolve(&SCHEMA, f);
            if let Some(d) = f.get("default").filter(|d| d.is_string()) {
                out.push(d.clone());
            }
            if let Some(c) = f.get("const") {
                out.push(c.clone());
            }
            if let Some(Value::Array(values)) = f.get("enum") {
                out.extend(values.iter().cloned());
            }
            if f.get("format").and_then(Value::as_str) == Some("listen-address") {
                out.push(Value::from("127.0.0.1:1"));
            }
            // Alternatives last to first on the stack, so that they come out in order.
            for k in ["oneOf", "anyOf", "allOf"] {
                if let Some(Value::Array(options)) = f.get(k) {
                    fields.extend(options.iter().rev());
                }
            }
        }
    }
    let mut seen = std::collections::HashSet::new();
    out.retain(|v| seen.insert(v.to_string()));
    out
}

/// `$ref` followed to its definition.
fn resolve<'a>(root: &'a Value, mut v: &'a Value) -> &'a Value {
    while let Some(r) = v.get("$ref").and_then(Value::as_str) {
        match r.strip_prefix('#').and_then(|p| root.pointer(p)) {
            Some(target) => v = target,
            None => break,
        }
    }
    v
}

/// The schema of the field at `path` (`routes[0].call.http.url`), through references, arrays
/// and optional (`anyOf` with null) fields.
fn field_schema<'a>(root: &'a Value, path: &str) -> Option<&'a Value> {
    let mut at = root;
    for segment in path.split('.') {
        let (key, indices) = match segment.find('[') {
            Some(i) => (&segment[..i], segment[i..].matches('[').count()),
            None => (segment, 0),
        };
        at = property(root, at, key)?;
        for _ in 0..indices {
            at = resolve(root, at).get("items")?;
        }
    }
    Some(at)
}

fn property<'a>(root: &'a Value, schema: &'a Value, key: &str) -> Option<&'a Value> {
    let schema = resolve(root, schema);
    if let Some(p) = schema.get("properties").and_then(|p| p.get(key)) {
        return Some(p);
    }
    ["anyOf", "oneOf", "allOf"]
        .iter()
        .filter_map(|k| schema.get(*k).and_then(Value::as_array))
        .flatten()
        .find_map(|option| property(root, option, key))
}

/// What to say after "unknown key `key`": the key meant, when one is close, else the keys the
/// mapping takes. `keyword` is the schema location of the `additionalProperties` that refused
/// it, beside the `properties` it allows.
fn meant(key: &str, keyword: &str) -> String {
    let Some(allowed) = keyword
        .strip_suffix("/additionalProperties")
        .and_then(|node| SCHEMA.pointer(node))
        .and_then(|node| node.get("properties"))
        .and_then(Value::as_object)
    else {
        return String::new();
    };
    let close = allowed
        .keys()
        .map(|k| (edit_distance(&key.to_lowercase(), k), k))
        .filter(|(d, k)| *d <= (k.len() / 3).max(1))
        .min();
    match close {
        Some((_, k)) => format!("; did you mean `{k}`?"),
        None => {
            let keys: Vec<String> = allowed.keys().map(|k| format!("`{k}`")).collect();
            format!("; this mapping takes {}", keys.join(", "))
        }
    }
}

/// Levenshtein distance, for suggesting the key a typo meant.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut previous = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let current = row[j + 1];
            row[j + 1] = (previous + usize::from(ca != *cb))
                .min(row[j] + 1)
                .min(current + 1);
            previous = current;
        }
    }
    row[b.len()]
}

/// One problem: the path of the value (or of the unknown key), whether it names a key, and what
/// is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub path: String,
    pub is_key: bool,
    pub message: String,
}

/// Every way `value` departs from the schema.
pub fn check(value: &Value) -> Vec<Problem> {
    let validator = match &*VALIDATOR {
        Ok(v) => v,
        Err(e) => {
            return vec![Problem {
                path: String::new(),
                is_key: false,
                message: format!("ferry's own config schema does not compile (a bug): {e}"),
            }];
        }
    };
    let mut problems = Vec::new();
    for error in validator.iter_errors(value) {
        describe(&error, &mut problems);
    }
    problems.sort_by(|a, b| a.path.cmp(&b.path));
    problems.dedup();
    problems
}

/// `/routes/0/retry` → `routes[0].retry`.
fn dotted(pointer: &str) -> String {
    let mut out = String::new();
    for part in pointer.split('/').skip(1) {
        let part = part.replace("~1", "/").replace("~0", "~");
        if part.parse::<usize>().is_ok() {
            out.push_str(&format!("[{part}]"));
        } else {
            if !out.is_empty() {
                out.push('.');
            }
            out.push_str(&part);
        }
    }
    out
}

fn child(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

fn shown(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn describe(error: &ValidationError<'_>, out: &mut Vec<Problem>) {
    let path = dotted(error.instance_path().as_str());
    let instance = error.instance();
    let mut say = |path: String, is_key: bool, message: String| {
        out.push(Problem {
            path,
            is_key,
            message,
        })
    };
    match error.kind() {
        ValidationErrorKind::AdditionalProperties { unexpected } => {
            for key in unexpected {
                let hint = meant(key, error.schema_path().as_str());
                say(child(&path, key), true, format!("unknown key `{key}`{hint}"));
            }
        }
        ValidationErrorKind::Required { property } => {
            // At the key of the mapping it is missing from (`kafka:`): the mapping's own
            // position is where its first entry's value begins, a sibling's.
            say(path, true, format!("`{}` is required here", shown(property)));
        }
        ValidationErrorKind::Format { format } => {
            let message = format_check(format, instance)
                .err()
                .unwrap_or_else(|| error.to_string());
            say(path, false, message);
        }
        ValidationErrorKind::Enum { options } => {
            let options: Vec<String> = options
                .as_array()
                .map(|o| o.iter().map(|v| format!("`{}`", shown(v))).collect())
                .unwrap_or_default();
            say(
                path,
                false,
                format!(
                    "unknown value `{}`, expected {}",
                    shown(instance),
                    options.join(" or ")
                ),
            );
        }
        ValidationErrorKind::Type { kind } => {
            let expected = format!("{kind:?}")
                .to_lowercase()
                .replace("single(", "")
                .replace("multiple(", "")
                .replace(['(', ')'], "")
                .replace(", ", " or ");
            say(
                path,
                false,
                format!("expected {expected}, found `{}`", shown(instance)),
            );
        }
        ValidationErrorKind::AnyOf { context } | ValidationErrorKind::OneOfNotValid { context } => {
            // An enum whose values are documented one by one is a `oneOf` of constants (and of
            // one `enum` holding the undocumented values): name them all.
            let constants: Option<Vec<String>> = context
                .iter()
                .map(|b| match b.as_slice() {
                    [e] => match e.kind() {
                        ValidationErrorKind::Constant { expected_value } => {
                            Some(vec![format!("`{}`", shown(expected_value))])
                        }
                        ValidationErrorKind::Enum { options } => options
                            .as_array()
                            .map(|o| o.iter().map(|v| format!("`{}`", shown(v))).collect()),
                        _ => None,
                    },
                    _ => None,
                })
                .collect::<Option<Vec<Vec<String>>>>()
                .map(|v| v.concat());
            if let Some(values) = constants.filter(|v| !v.is_empty()) {
                say(
                    path,
                    false,
                    format!(
                        "unknown value `{}`, expected {}",
                        shown(instance),
                        values.join(" or ")
                    ),
                );
                return;
            }
            // An optional value is `anyOf: [its schema, null]`: say what is wrong with the branch
            // that was meant, the one that fails for more than the value's type.
            let wrong_type_only = |b: &&Vec<ValidationError<'static>>| {
                b.len() == 1
                    && matches!(b[0].kind(), ValidationErrorKind::Type { .. })
                    && b[0].instance_path() == error.instance_path()
            };
            let meant = context
                .iter()
                .filter(|b| !wrong_type_only(b))
                .min_by_key(|b| b.len())
                .or_else(|| context.iter().min_by_key(|b| b.len()));
            match meant {
                Some(branch) if !branch.is_empty() => {
                    for e in branch {
                        describe(e, out);
                    }
                }
                _ => say(path, false, error.to_string()),
            }
        }
        _ => say(path, false, error.to_string()),
    }
}
