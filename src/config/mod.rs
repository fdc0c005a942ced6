//! YAML → interpolated → typed → checked `Config`.
//!
//! Each step collects every error it finds, with the path and the YAML position of the node it
//! concerns, so `ferry validate` can print them all and exit 78. The steps:
//!
//! 1. [`document`]: parse the YAML into a JSON value with a position for every node, expanding
//!    `${…}` references in values ([`interpolate`]);
//! 2. [`schema`]: check the document against the config's JSON Schema (generated from the
//!    types), reporting every unknown key, missing key, wrong type and bad value at once;
//! 3. deserialize the typed [`Config`];
//! 4. [`check`]: the rules that span fields (unique route names, one route per topic, …).

mod check;
mod document;
mod interpolate;
pub mod schema;
mod types;

use std::fmt;
use std::path::{Path, PathBuf};

pub use document::{Document, Position};
pub use interpolate::Interpolator;
pub use types::*;

/// The exit code for a configuration error (EX_CONFIG).
pub const EXIT_CONFIG: i32 = 78;

/// One thing wrong with a config file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub file: PathBuf,
    pub position: Option<Position>,
    /// The key path, such as `routes[0].retry.backoff.initial`; empty for the whole file.
    pub path: String,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(p) = self.position {
            write!(f, ":{}:{}", p.line, p.column)?;
        }
        if !self.path.is_empty() {
            write!(f, ": {}", self.path)?;
        }
        write!(f, ": {}", self.message)
    }
}

/// Every error found in a config file.
#[derive(Debug, Clone, thiserror::Error)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

/// Reads, interpolates, types and checks the config at `path`.
pub fn load(path: &Path, interpolator: &Interpolator) -> Result<Config, ConfigErrors> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        ConfigErrors(vec![ConfigError {
            file: path.to_path_buf(),
            position: None,
            path: String::new(),
            message: format!("cannot read the config file: {e} (give another with -c FILE or FERRY_CONFIG)"),
        }])
    })?;
    parse(&text, path, interpolator)
}

/// As [`load`], for text already in memory; `file` names it in errors.
pub fn parse(text: &str, file: &Path, interpolator: &Interpolator) -> Result<Config, ConfigErrors> {
    let at = |position: Option<Position>, path: String, message: String| ConfigError {
        file: file.to_path_buf(),
        position,
        path,
        message,
    };
    let doc = Document::parse(text, interpolator).map_err(|errors| {
        ConfigErrors(
            errors
                .into_iter()
                .map(|e| at(Some(e.position), e.path, e.message))
                .collect(),
        )
    })?;
    let problems = schema::check(&doc.value);
    if !problems.is_empty() {
        return Err(ConfigErrors(
            problems
                .into_iter()
                .map(|p| {
                    let position = if p.is_key {
                        doc.key_position(&p.path).unwrap_or_else(|| doc.position(&p.path))
                    } else {
                        doc.position(&p.path)
                    };
                    at(Some(position), p.path, p.message)
                })
                .collect(),
        ));
    }
    let config: Config = serde_path_to_error::deserialize(&doc.value).map_err(|e| {
        let path = e.path().to_string();
        let path = if path == "." { String::new() } else { path };
        let message = e.inner().to_string();
        // serde names an unknown key only in its message; point at the key itself.
        let (path, position) = match unknown_field(&message) {
            Some(key) => {
                // serde_path_to_error already ends the path with the unknown key.
                let child = if path == key || path.ends_with(&format!(".{key}")) {
                    path.clone()
                } else if path.is_empty() {
                    key.to_string()
                } else {
                    format!("{path}.{key}")
                };
                let pos = doc.key_position(&child).unwrap_or_else(|| doc.position(&path));
                (child, pos)
            }
            None => {
                let pos = doc.position(&path);
                (path, pos)
            }
        };
        ConfigErrors(vec![at(Some(position), path, tidy(&message))])
    })?;
    let mut config = config;
    resolve_paths(&mut config, file);
    let mut problems = check::check(&config);
    problems.extend(compile_schemas(&mut config));
    if problems.is_empty() {
        Ok(config)
    } else {
        Err(ConfigErrors(
            problems
                .into_iter()
                .map(|(path, message)| {
                    let position = doc.position(&path);
                    at(Some(position), path, message)
                })
                .collect(),
        ))
    }
}

/// Files named in the config are relative to the config file, not to the working directory.
fn resolve_paths(config: &mut Config, file: &Path) {
    let Some(dir) = file.parent() else { return };
    let fix = |p: &mut Option<PathBuf>| {
        if let Some(path) = p.as_mut() {
            if path.is_relative() {
                *path = dir.join(&*path);
            }
        }
    };
    for route in &mut config.routes {
        if let Some(g) = route.call.grpc.as_mut() {
            fix(&mut g.descriptor_set);
            fix(&mut g.ca_file);
        }
        for schema in route
            .validate
            .as_mut()
            .map(|v| &mut v.schema)
            .into_iter()
            .chain(route.reply.schema.as_mut())
        {
            if schema.path.is_relative() {
                schema.path = dir.join(&schema.path);
            }
        }
    }
}

/// Reads and compiles every payload schema once, at load; a broken one is a config error at
/// the key that names it.
fn compile_schemas(config: &mut Config) -> Vec<(String, String)> {
    let mut problems = Vec::new();
    for (i, route) in config.routes.iter_mut().enumerate() {
        let schemas = route
            .validate
            .as_mut()
            .map(|v| (format!("routes[{i}].validate.schema"), &mut v.schema))
            .into_iter()
            .chain(
                route
                    .reply
                    .schema
                    .as_mut()
                    .map(|s| (format!("routes[{i}].reply.schema"), s)),
            );
        for (at, schema) in schemas {
            match compile_schema(&schema.path) {
                Ok(v) => schema.compiled = Some(std::sync::Arc::new(v)),
                Err(e) => problems.push((at, e)),
            }
        }
    }
    problems
}

fn compile_schema(path: &Path) -> Result<jsonschema::Validator, String> {
    let shown = path.display();
    let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read the schema `{shown}`: {e}"))?;
    let value: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| format!("the schema `{shown}` is not JSON: {e}"))?;
    jsonschema::validator_for(&value).map_err(|e| {
        format!(
            "`{shown}` is not a valid JSON Schema: {e} (at {})",
            e.instance_path()
        )
    })
}

fn unknown_field(message: &str) -> Option<&str> {
    let rest = message.strip_prefix("unknown field `")?;
    rest.split('`').next()
}

/// serde's messages, in the words of this file format.
fn tidy(message: &str) -> String {
    if let Some(key) = unknown_field(message) {
        let expected = message
            .split_once(", expected ")
            .map(|(_, e)| format!("; expected {e}"))
            .unwrap_or_default();
        return format!("unknown key `{key}`{expected}");
    }
    if let Some(rest) = message.strip_prefix("missing field `") {
        let key = rest.split('`').next().unwrap_or(rest);
        return format!("`{key}` is required here");
    }
    message
        .replace("invalid type: map", "expected something else than a mapping")
        .replace("unknown variant", "unknown value")
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const VALID: &str = "\
kafka:
  brokers: 127.0.0.1:9092
  group_id: g
  commit_interval: 1s
routes:
  - name: r
    from:
      topics: [in]
      start: earliest
    ordering: key
    concurrency: { per_partition: 32, total: 256, max_bytes: 16MiB, rate: 0 }
    call:
      http:
        url: http://127.0.0.1:8080/{key}
        timeout: 5s
    retry:
      max_attempts: 5
      backoff: { initial: 200ms, max: 30s, multiplier: 2.0, jitter: full }
    reply:
      to: out
    dead_letter:
      to: dlq
    rules:
      - when: { status: 409 }
        then: drop
shutdown:
  drain_timeout: 25s
";

    fn load(text: &str) -> Result<Config, ConfigErrors> {
        parse(
            text,
            Path::new("p.yaml"),
            &Interpolator::from_pairs(&[("X", "1")]),
        )
    }

    #[test]
    fn the_base_config_is_valid() {
        assert!(load(VALID).is_ok());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2048))]

        /// Any text at all: the loader answers, never panics. 2048 cases per run.
        #[test]
        fn any_text_is_answered(text in ".{0,400}") {
            let _ = load(&text);
        }

        /// A valid config with one value replaced by anything: either still valid, or refused
        /// with every error placed inside the file. 2048 cases per run.
        #[test]
        fn a_broken_value_is_refused_at_a_real_place(
            line in 0usize..30,
            value in prop_oneof![
                Just("".to_string()),
                Just("[]".to_string()),
                Just("{}".to_string()),
                Just("-1".to_string()),
                Just("${MISSING}".to_string()),
                Just("18446744073709551616".to_string()),
                "[a-z0-9 .:{}\\[\\]$,-]{0,20}",
            ],
        ) {
            let lines: Vec<&str> = VALID.lines().collect();
            let i = line % lines.len();
            let broken: Vec<String> = lines
                .iter()
                .enumerate()
                .map(|(n, l)| match l.split_once(": ") {
                    Some((k, _)) if n == i => format!("{k}: {value}"),
                    _ => l.to_string(),
                })
                .collect();
            let text = broken.join("\n");
            if let Err(errors) = load(&text) {
                prop_assert!(!errors.0.is_empty());
                for e in &errors.0 {
                    let p = e.position.expect("every error has a position");
                    prop_assert!(p.line >= 1 && p.line <= lines.len() + 1, "{:?} in:\n{}", e, text);
                    prop_assert!(!e.message.is_empty());
                }
            }
        }
    }
}
