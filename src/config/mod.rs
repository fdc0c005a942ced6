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

use std::collections::HashSet;
use std::fmt;
use std::path::{Path, PathBuf};

pub use check::topic_name_problem;
use document::within;
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

/// A config that loaded, with what is worth a warning (a credential written as a literal).
#[derive(Debug)]
pub struct Loaded {
    pub config: Config,
    pub warnings: Vec<ConfigError>,
}

/// Reads, interpolates, types and checks the config at `path`.
pub fn load(path: &Path, interpolator: &Interpolator) -> Result<Config, ConfigErrors> {
    load_with_warnings(path, interpolator).map(|l| l.config)
}

/// As [`load`], with the warnings.
pub fn load_with_warnings(path: &Path, interpolator: &Interpolator) -> Result<Loaded, ConfigErrors> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        ConfigErrors(vec![ConfigError {
            file: path.to_path_buf(),
            position: None,
            path: String::new(),
            message: format!("cannot read the config file: {e} (give another with -c FILE or FERRY_CONFIG)"),
        }])
    })?;
    parse_with_warnings(&text, path, interpolator)
}

/// As [`load`], for text already in memory; `file` names it in errors.
pub fn parse(text: &str, file: &Path, interpolator: &Interpolator) -> Result<Config, ConfigErrors> {
    parse_with_warnings(text, file, interpolator).map(|l| l.config)
}

/// As [`parse`], with the warnings.
pub fn parse_with_warnings(
    text: &str,
    file: &Path,
    interpolator: &Interpolator,
) -> Result<Loaded, ConfigErrors> {
    let parsed = Document::parse(text, interpolator).map_err(|errors| {
        ConfigErrors(
            errors
                .into_iter()
                .map(|e| ConfigError {
                    file: file.to_path_buf(),
                    position: Some(e.position),
                    path: e.path,
                    message: e.message,
                })
                .collect(),
        )
    });
    let mut doc = parsed?;
    // `--env-optional`: a missing variable's placeholder takes a value of its field's type, and
    // what only the variable's value could tell (librdkafka's check of a property) is skipped.
    let placeholders = if interpolator.env_optional {
        doc.stand_in_placeholders(schema::stand_ins, |value, path| {
            schema::check(value).iter().all(|p| p.path != path)
                && serde_path_to_error::deserialize::<_, Config>(value)
                    .err()
                    .is_none_or(|e| e.path().to_string() != path)
        })
    } else {
        HashSet::new()
    };
    // No message quotes what came from the environment or a file.
    let at = |position: Option<Position>, path: String, message: String| ConfigError {
        file: file.to_path_buf(),
        message: doc.redact(&path, &message),
        position,
        path,
    };
    let problems = schema::check(&doc.value);
    if !problems.is_empty() {
        let mut errors: Vec<ConfigError> = problems
            .iter()
            .map(|p| {
                let position = if p.is_key {
                    doc.key_position(&p.path).unwrap_or_else(|| doc.position(&p.path))
                } else {
                    doc.position(&p.path)
                };
                at(Some(position), p.path.clone(), p.message.clone())
            })
            .collect();
        // Every error at once (SPEC §2): the rules that span fields still look at the rest of
        // the file, as if what the schema refused were left out (its defaults apply).
        let refused: Vec<&str> = problems.iter().map(|p| p.path.as_str()).collect();
        let rest = doc
            .without(&refused)
            .filter(|v| schema::check(v).is_empty())
            .and_then(|v| serde_path_to_error::deserialize::<_, Config>(&v).ok());
        if let Some(mut config) = rest {
            resolve_paths(&mut config, file);
            // What the checks say about a refused value, its parts, what holds it, or (when
            // its default stood in for it) the values beside it, would be about the default.
            let parent = |path: &str| path.rfind(['.', '[']).map_or("", |i| &path[..i]).to_string();
            let related = |path: &str| {
                problems.iter().any(|p| {
                    within(&p.path, path)
                        || within(path, &p.path)
                        || (!p.is_key && within(&parent(&p.path), path))
                })
            };
            for (path, message) in check::check(&config, interpolator.env_optional, &placeholders) {
                if !related(&path) && !placeholders.contains(&path) {
                    errors.push(at(Some(doc.position(&path)), path, message));
                }
            }
        }
        errors.sort_by_key(|e| e.position.map(|p| (p.line, p.column)));
        return Err(ConfigErrors(errors));
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
    let mut problems = check::check(&config, interpolator.env_optional, &placeholders);
    // A stand-in is no value of the user's: nothing it breaks is theirs to fix.
    problems.retain(|(path, _)| !placeholders.contains(path));
    problems.extend(compile_schemas(&mut config));
    if problems.is_empty() {
        let mut warnings = Vec::new();
        literal_secrets(&doc, &doc.value, String::new(), &mut |path| {
            warnings.push(at(
                Some(doc.position(&path)),
                path,
                "holds a credential written into the file; write it as ${VAR} or ${file:/path} so that it stays out of the config (and out of ConfigMaps and git)".into(),
            ));
        });
        // Turning the broker's certificate check off makes TLS encryption without authentication.
        for (key, off, what) in [
            (
                "enable.ssl.certificate.verification",
                "false",
                "the broker's certificate is not verified",
            ),
            (
                "ssl.endpoint.identification.algorithm",
                "none",
                "the broker's host name is not checked against its certificate",
            ),
        ] {
            if config
                .kafka
                .properties
                .get(key)
                .is_some_and(|v| v.0.eq_ignore_ascii_case(off))
            {
                let path = format!("kafka.properties.{key}");
                warnings.push(at(
                    Some(doc.position(&path)),
                    path,
                    format!("{what}: anyone on the path can pose as the broker; remove it and give ssl.ca.location instead"),
                ));
            }
        }
        // Not read at run time (see consume::RouteTable), which the SPEC's own sketch of a
        // pattern route relies on; said here so that it is no surprise.
        for (i, route) in config.routes.iter().enumerate() {
            let Some(pattern) = route
                .from
                .pattern
                .as_deref()
                .and_then(|p| regex::Regex::new(p).ok())
            else {
                continue;
            };
            for (topic, field) in route.writes().filter(|(t, _)| !route.retry.topics.contains(t)) {
                if pattern.is_match(topic) {
                    let path = format!("routes[{i}].from.pattern");
                    warnings.push(at(
                        Some(doc.position(&path)),
                        path,
                        format!("matches `{topic}` (routes[{i}].{field}), which this route writes to: this route does not read it, or it would read its own output forever"),
                    ));
                }
            }
        }
        Ok(Loaded { config, warnings })
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

/// Calls `found` with the path of every credential-like key (`sasl.password`, `admin.token`, an
/// `authorization` header, …) whose value is a literal rather than a `${…}` reference.
fn literal_secrets(doc: &Document, value: &serde_json::Value, path: String, found: &mut impl FnMut(String)) {
    match value {
        serde_json::Value::Object(map) => {
            for (key, v) in map {
                let child = if path.is_empty() {
                    key.clone()
                } else {
                    format!("{path}.{key}")
                };
                let literal = match v {
                    serde_json::Value::String(s) => !s.is_empty(),
                    serde_json::Value::Number(_) => true,
                    _ => false,
                };
                if literal && check::is_secret_key(key) && !doc.is_referenced(&child) {
                    found(child.clone());
                }
                literal_secrets(doc, v, child, found);
            }
        }
        serde_json::Value::Array(items) => {
            for (i, v) in items.iter().enumerate() {
                literal_secrets(doc, v, format!("{path}[{i}]"), found);
            }
        }
        _ => {}
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
    // librdkafka would read these relative to the working directory; like every other file
    // in the config they are relative to the config file.
    for (key, value) in config.kafka.properties.iter_mut() {
        if check::FILE_PROPERTIES.contains(&key.as_str()) && value.0 != "probe" {
            let path = Path::new(&value.0);
            if !value.0.is_empty() && path.is_relative() {
                value.0 = dir.join(path).display().to_string();
            }
        }
    }
    if let Some(r) = config.service.ready.as_mut() {
        fix(&mut r.ca_file);
        fix(&mut r.cert_file);
        fix(&mut r.key_file);
    }
    for route in &mut config.routes {
        if let Some(g) = route.call.grpc.as_mut() {
            fix(&mut g.descriptor_set);
            fix(&mut g.ca_file);
            fix(&mut g.cert_file);
            fix(&mut g.key_file);
        }
        if let Some(h) = route.call.http.as_mut() {
            fix(&mut h.ca_file);
            fix(&mut h.cert_file);
            fix(&mut h.key_file);
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
        .replace("invalid socket address syntax", schema::NOT_A_LISTEN_ADDRESS)
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

    #[test]
    fn a_credential_in_the_call_url_is_refused_at_its_key_without_repeating_it() {
        let text = VALID.replace(
            "url: http://127.0.0.1:8080/{key}",
            "url: http://svc:hunter2@127.0.0.1:8080/{key}",
        );
        let errors = load(&text).expect_err("refused");
        let shown: Vec<String> = errors
            .0
            .iter()
            .map(|e| format!("{}: {}", e.path, e.message))
            .collect();
        assert!(
            shown
                .iter()
                .any(|e| e.starts_with("routes[0].call.http.url: the URL holds a user name or password")),
            "{shown:?}"
        );
        assert!(!shown.iter().any(|e| e.contains("hunter2")), "{shown:?}");
    }

    fn load_with(text: &str, env: &[(&str, &str)]) -> Result<Loaded, ConfigErrors> {
        parse_with_warnings(text, Path::new("p.yaml"), &Interpolator::from_pairs(env))
    }

    #[test]
    fn errors_never_quote_what_came_from_the_environment_or_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("pw");
        std::fs::write(&file, "from-a-file-s3cret\n").unwrap();
        let text = VALID
            .replace("  commit_interval: 1s\n", &format!(
                "  commit_interval: \"${{file:{}}}\"\n  properties:\n    security.protocol: \"${{PW}}\"\n",
                file.display()
            ))
            .replace("    ordering: key\n", "    ordering: \"${PW}\"\n");
        let errors = load_with(&text, &[("PW", "env-s3cret"), ("X", "1")]).unwrap_err();
        let shown = errors.to_string();
        assert!(shown.contains("kafka.commit_interval"), "{shown}");
        assert!(shown.contains("routes[0].ordering"), "{shown}");
        assert!(
            !shown.contains("env-s3cret") && !shown.contains("from-a-file-s3cret"),
            "{shown}"
        );
        assert!(
            shown.contains("${PW}"),
            "the reference stands in for the value: {shown}"
        );

        // Past the schema, the rules that span fields and librdkafka's own check.
        let text = VALID.replace(
            "  commit_interval: 1s\n",
            "  commit_interval: 1s\n  properties:\n    security.protocol: \"${PW}\"\n",
        );
        let shown = load_with(&text, &[("PW", "env-s3cret")]).unwrap_err().to_string();
        assert!(
            shown.contains("kafka.properties.security.protocol: librdkafka: Invalid value \"${PW}\""),
            "{shown}"
        );
        assert!(!shown.contains("env-s3cret"), "{shown}");

        // A message about another field quotes that field as it is, even where a secret's text
        // happens to occur in it: masking it there garbled the message and told what the secret
        // was.
        let text = VALID.replace(
            "  commit_interval: 1s\n",
            "  commit_interval: 1s\n  properties:\n    sasl.password: \"${PW}\"\n    ssl.ca.location: /var/run/secrets/kafka/ca.crt\n",
        );
        let shown = load_with(&text, &[("PW", "kafka")]).unwrap_err().to_string();
        assert!(
            shown.contains("ssl.ca.location: `/var/run/secrets/kafka/ca.crt` does not exist"),
            "{shown}"
        );
        assert!(!shown.contains("${PW}"), "{shown}");
    }

    #[test]
    fn a_pattern_that_matches_its_own_route_s_output_is_warned_about() {
        let text = VALID
            .replace("      topics: [in]\n", "      pattern: '^pay\\..*'\n")
            .replace("      to: out\n", "      to: pay.out\n")
            .replace("      to: dlq\n", "      to: pay.dlq\n");
        let loaded = load_with(&text, &[]).unwrap();
        let shown: Vec<String> = loaded.warnings.iter().map(|w| w.to_string()).collect();
        assert_eq!(shown.len(), 2, "{shown:?}");
        assert!(shown[0].contains("routes[0].from.pattern: matches `pay.out` (routes[0].reply.to), which this route writes to: this route does not read it"), "{shown:?}");
        assert!(
            shown[1].contains("`pay.dlq` (routes[0].dead_letter.to)"),
            "{shown:?}"
        );
        let apart = text
            .replace("      to: pay.out\n", "      to: out\n")
            .replace("      to: pay.dlq\n", "      to: dlq\n");
        assert!(load_with(&apart, &[]).unwrap().warnings.is_empty());
    }

    #[test]
    fn credentials_written_as_literals_are_warned_about() {
        let text = VALID
            .replace("  commit_interval: 1s\n", "  commit_interval: 1s\n  properties:\n    sasl.username: ferry\n    sasl.password: hunter2\n    ssl.key.password: \"${KEY_PW}\"\n")
            .replace("        timeout: 5s\n", "        timeout: 5s\n        headers: { authorization: Bearer abc, x-trace: \"1\" }\n")
            .replace("shutdown:\n", "admin:\n  token: literal-token\nshutdown:\n");
        let loaded = load_with(&text, &[("KEY_PW", "k")]).unwrap();
        let mut paths: Vec<&str> = loaded.warnings.iter().map(|w| w.path.as_str()).collect();
        paths.sort();
        assert_eq!(
            paths,
            [
                "admin.token",
                "kafka.properties.sasl.password",
                "routes[0].call.http.headers.authorization"
            ]
        );
        for w in &loaded.warnings {
            assert!(w.position.is_some_and(|p| p.line > 1), "{w}");
            assert!(
                !w.to_string().contains("hunter2") && !w.to_string().contains("literal-token"),
                "{w}"
            );
        }
        let unverified = text.replace(
            "    sasl.username: ferry\n",
            "    sasl.username: ferry\n    enable.ssl.certificate.verification: false\n    ssl.endpoint.identification.algorithm: none\n",
        );
        let loaded = load_with(&unverified, &[("KEY_PW", "k")]).unwrap();
        for key in [
            "enable.ssl.certificate.verification",
            "ssl.endpoint.identification.algorithm",
        ] {
            assert!(
                loaded
                    .warnings
                    .iter()
                    .any(|w| w.path == format!("kafka.properties.{key}")
                        && w.message.contains("pose as the broker")),
                "{key}: {:?}",
                loaded.warnings
            );
        }
        let referenced = text
            .replace("hunter2", "${PW}")
            .replace("literal-token", "${T}")
            .replace("Bearer abc", "\"Bearer ${T}\"");
        assert!(
            load_with(&referenced, &[("KEY_PW", "k"), ("PW", "p"), ("T", "t")])
                .unwrap()
                .warnings
                .is_empty()
        );
    }

    #[test]
    fn debug_output_of_a_config_holds_no_credential() {
        let text = VALID
            .replace(
                "  commit_interval: 1s\n",
                "  commit_interval: 1s\n  properties:\n    sasl.password: \"${PW}\"\n",
            )
            .replace(
                "        timeout: 5s\n",
                "        timeout: 5s\n        headers: { authorization: \"Bearer ${PW}\" }\n",
            )
            .replace("shutdown:\n", "admin:\n  token: \"${PW}\"\nshutdown:\n");
        let config = load_with(&text, &[("PW", "planted-s3cret")]).unwrap().config;
        let debug = format!("{config:?} {config:#?}");
        assert!(!debug.contains("planted-s3cret"), "{debug}");
        assert!(debug.contains("authorization"), "header names stay visible");
    }

    #[test]
    fn librdkafka_checks_the_properties_and_the_files_they_name() {
        let dir = tempfile::tempdir().unwrap();
        let text = VALID.replace(
            "  commit_interval: 1s\n",
            "  commit_interval: 1s\n  properties:\n    security.protocol: SSLL\n    no.such.property: 1\n    ssl.ca.location: missing-ca.pem\n    ssl.certificate.location: client.pem\n",
        );
        let file = dir.path().join("ferry.yaml");
        let errors = parse(&text, &file, &Interpolator::from_pairs(&[])).unwrap_err();
        let find = |path: &str| {
            errors
                .0
                .iter()
                .find(|e| e.path == path)
                .unwrap_or_else(|| panic!("no error at {path}: {errors}"))
                .clone()
        };
        assert!(
            find("kafka.properties.security.protocol")
                .message
                .contains("SSLL")
        );
        assert!(
            find("kafka.properties.no.such.property")
                .message
                .contains("No such configuration property")
        );
        let ca = find("kafka.properties.ssl.ca.location");
        assert!(
            ca.message
                .contains(&dir.path().join("missing-ca.pem").display().to_string()),
            "relative to the config file: {ca}"
        );
        assert_eq!(ca.position.map(|p| p.line), Some(8), "{ca}");
        assert!(
            errors
                .0
                .iter()
                .any(|e| e.path == "kafka.properties.ssl.certificate.location"
                    && e.message.contains("give `ssl.key.location` too")),
            "{errors}"
        );
    }

    #[test]
    fn librdkafka_judges_the_properties_together_as_ferry_makes_its_clients() {
        let with = |props: &str| {
            let text = VALID.replace(
                "  commit_interval: 1s\n",
                &format!("  commit_interval: 1s\n  properties:\n{props}"),
            );
            parse(&text, Path::new("ferry.yaml"), &Interpolator::from_pairs(&[]))
                .err()
                .map(|e| e.to_string())
        };
        // Each is valid on its own; librdkafka refuses them only when it makes the client.
        let short = with("    max.poll.interval.ms: 30000\n").expect("refused");
        assert!(
            short.contains("kafka.properties: librdkafka refuses these properties together for ferry's consumer: `max.poll.interval.ms`must be >= `session.timeout.ms`"),
            "{short}"
        );
        let gssapi =
            with("    security.protocol: SASL_PLAINTEXT\n    sasl.mechanism: GSSAPI\n").expect("refused");
        assert!(
            gssapi.contains("No provider for SASL mechanism GSSAPI"),
            "{gssapi}"
        );
        let in_flight = with("    max.in.flight.requests.per.connection: 10\n").expect("refused");
        assert!(in_flight.contains("for ferry's producer"), "{in_flight}");
        assert_eq!(with("    max.poll.interval.ms: 60000\n    linger.ms: 1\n"), None);
        // Judged with ferry's own settings: its consumer's prefetch of 1 MiB a partition makes
        // librdkafka's fetch.max.bytes 1 MiB, which this is above.
        assert_eq!(with("    receive.message.max.bytes: 10485760\n"), None);
    }

    #[test]
    fn statuses_and_addresses_are_judged_with_every_other_error_of_the_form() {
        let text = VALID.replace("{ status: 409 }", "{ status: 999 }").replace(
            "  drain_timeout: 25s\n",
            "  drain_timeout: soon\nadmin:\n  listen: nowhere\n",
        );
        let e = load(&text).unwrap_err();
        let paths: Vec<&str> = e.0.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "routes[0].rules[0].when.status",
                "shutdown.drain_timeout",
                "admin.listen"
            ],
            "{e}"
        );
        assert!(e.to_string().contains("a host name is not taken"), "{e}");
    }

    #[test]
    fn a_reference_inside_a_flow_mapping_gets_the_block_style_hint() {
        let text = VALID.replace(
            "    retry:\n      max_attempts: 5\n",
            "    retry: { max_attempts: ${N:-5} }\n",
        );
        let e = parse(&text, Path::new("ferry.yaml"), &Interpolator::from_pairs(&[]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("not valid YAML") && e.contains("block style"), "{e}");
    }

    #[test]
    fn oauthbearer_needs_a_token_source_librdkafka_runs_itself() {
        let with = |props: &str| {
            load(&VALID.replace(
                "  commit_interval: 1s\n",
                &format!("  commit_interval: 1s\n  properties:\n{props}"),
            ))
        };
        let errors = with("    security.protocol: SASL_SSL\n    sasl.mechanism: OAUTHBEARER\n").unwrap_err();
        assert_eq!(errors.0[0].path, "kafka.properties.sasl.mechanism", "{errors}");
        assert!(
            errors.0[0]
                .message
                .contains("enable.sasl.oauthbearer.unsecure.jwt: true"),
            "{errors}"
        );
        let oidc = "    security.protocol: SASL_SSL\n    sasl.mechanism: OAUTHBEARER\n    sasl.oauthbearer.method: oidc\n    sasl.oauthbearer.client.id: ferry\n    sasl.oauthbearer.client.secret: \"${X}\"\n    sasl.oauthbearer.token.endpoint.url: https://idp.example/token\n";
        // This build's librdkafka has no libcurl, so no OIDC: it says so, at the keys.
        let errors = with(oidc).unwrap_err();
        assert!(
            errors
                .0
                .iter()
                .all(|e| e.message.contains("not supported in this build")),
            "{errors}"
        );
        with("    security.protocol: SASL_SSL\n    sasl.mechanism: OAUTHBEARER\n    enable.sasl.oauthbearer.unsecure.jwt: true\n    sasl.oauthbearer.config: principal=ferry\n").unwrap();
    }

    #[test]
    fn tls_files_of_the_service_are_checked_at_load() {
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, text: &str| {
            let p = dir.path().join(name);
            std::fs::write(&p, text).unwrap();
            p
        };
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca = write("ca.pem", &ca_params.self_signed(&ca_key).unwrap().pem());
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = write(
            "client.pem",
            &rcgen::CertificateParams::new(vec!["client".into()])
                .unwrap()
                .self_signed(&key)
                .unwrap()
                .pem(),
        );
        let key_file = write("client.key", &key.serialize_pem());
        let other_key = write("other.key", &rcgen::KeyPair::generate().unwrap().serialize_pem());
        let junk = write("junk.pem", "not a certificate\n");
        let http = |url: &str, tls: &str| {
            VALID.replace(
                "        url: http://127.0.0.1:8080/{key}\n",
                &format!("        url: {url}\n{tls}"),
            )
        };
        let problems = |text: String| -> Vec<String> {
            match load(&text) {
                Ok(_) => Vec::new(),
                Err(e) => e.0.iter().map(|e| format!("{}: {}", e.path, e.message)).collect(),
            }
        };
        let good = format!(
            "        ca_file: {}\n        cert_file: {}\n        key_file: {}\n",
            ca.display(),
            cert.display(),
            key_file.display()
        );
        assert_eq!(
            problems(http("https://localhost:8443/", &good)),
            Vec::<String>::new()
        );
        let p = problems(http("https://localhost:8443/", ""));
        assert!(
            p[0].starts_with("routes[0].call.http.ca_file: an https:// URL needs the CA"),
            "{p:?}"
        );
        let p = problems(http(
            "http://localhost:8080/",
            &format!("        ca_file: {}\n", ca.display()),
        ));
        assert!(p[0].contains("TLS files are for https:// URLs"), "{p:?}");
        let p = problems(http(
            "https://localhost:8443/",
            &format!("        ca_file: {}\n", junk.display()),
        ));
        assert!(
            p[0].starts_with("routes[0].call.http.ca_file:") && p[0].contains("holds no certificate"),
            "{p:?}"
        );
        let p = problems(http("https://localhost:8443/", "        ca_file: nowhere.pem\n"));
        assert!(
            p[0].contains("cannot read") && p[0].contains("nowhere.pem"),
            "{p:?}"
        );
        let p = problems(http(
            "https://localhost:8443/",
            &format!(
                "        ca_file: {}\n        cert_file: {}\n",
                ca.display(),
                cert.display()
            ),
        ));
        assert!(
            p[0].starts_with("routes[0].call.http.key_file: a client certificate needs its private key"),
            "{p:?}"
        );
        let p = problems(http(
            "https://localhost:8443/",
            &format!(
                "        ca_file: {}\n        cert_file: {}\n        key_file: {}\n",
                ca.display(),
                cert.display(),
                other_key.display()
            ),
        ));
        assert!(
            p[0].starts_with("routes[0].call.http.key_file:")
                && p[0].contains("is not the key of the certificate"),
            "{p:?}"
        );
        let p = problems(http(
            "https://localhost:8443/",
            &format!(
                "        ca_file: {}\n        cert_file: {}\n        key_file: {}\n",
                ca.display(),
                cert.display(),
                junk.display()
            ),
        ));
        assert!(p[0].contains("holds no unencrypted private key"), "{p:?}");

        // `ferry validate --env-optional` checks a production file whose certificates are
        // mounted only in production: absent files are no problem there, bad ones still are.
        let mut optional = Interpolator::from_pairs(&[("X", "1")]);
        optional.env_optional = true;
        let absent = http(
            "https://localhost:8443/",
            "        ca_file: /nowhere/ca.pem\n        cert_file: /nowhere/tls.crt\n        key_file: /nowhere/tls.key\n",
        )
        .replace("  commit_interval: 1s\n", "  commit_interval: 1s\n  properties:\n    ssl.ca.location: /nowhere/kafka-ca.pem\n");
        parse(&absent, Path::new("p.yaml"), &optional).unwrap();
        let junk_ca = http(
            "https://localhost:8443/",
            &format!("        ca_file: {}\n", junk.display()),
        );
        assert!(parse(&junk_ca, Path::new("p.yaml"), &optional).is_err());
    }

    #[test]
    fn merge_keys_share_a_route_s_settings_and_its_own_keys_win() {
        let text = "\
kafka: { brokers: 127.0.0.1:9092, group_id: g }
routes:
  - &first
    name: a
    from: { topics: [in] }
    call: { http: { url: \"http://127.0.0.1:8080/\", timeout: 3s } }
    dead_letter: { to: dlq }
  - <<: *first
    name: b
    from: { topics: [in2] }
  - <<: [{ name: c, ordering: none }, *first]
    from: { topics: [in3] }
";
        let config = load(text).unwrap();
        let names: Vec<&str> = config.routes.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, ["a", "b", "c"]);
        assert_eq!(config.routes[1].from.topics, ["in2"]);
        assert_eq!(
            config.routes[2].ordering,
            Ordering::None,
            "the first merged mapping first"
        );
        for r in &config.routes {
            let timeout = r.call.http.as_ref().map(|h| h.timeout.0);
            assert_eq!(timeout, Some(std::time::Duration::from_secs(3)), "{}", r.name);
            assert_eq!(r.dead_letter.to, "dlq");
        }
        let e = load(&text.replace("<<: *first", "<<: 3"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("a merge key `<<` takes a mapping"), "{e}");
        // An item of a merged list is checked at the mapping's own path.
        let e = load(&text.replace("ordering: none", "ordering: sideways"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("routes[2].ordering: unknown value `sideways`"), "{e}");
    }

    #[test]
    fn env_optional_placeholders_stand_in_for_typed_values_and_the_rest_is_still_checked() {
        // A production file whose numbers, durations and librdkafka properties come from the
        // environment: without it, their placeholders take a value of their field's type.
        let text = VALID
            .replace("        timeout: 5s", "        timeout: ${CALL_TIMEOUT}")
            .replace(
                "  commit_interval: 1s\n",
                "  commit_interval: ${COMMIT}\n  properties:\n    security.protocol: ${PROTO}\n    session.timeout.ms: ${SESSION_MS}\n",
            )
            .replace("      max_attempts: 5", "      max_attempts: ${ATTEMPTS}")
            .replace(
                "      backoff: { initial: 200ms, max: 30s, multiplier: 2.0, jitter: full }",
                "      backoff:\n        multiplier: ${FACTOR}\n        jitter: ${JITTER}",
            )
            // Values of a set (an enum) and addresses too; a set's stand-in is its default
            // where it has one, which conflating needs here (`ordering: key`).
            .replace(
                "    ordering: key\n",
                "    ordering: ${ORDERING}\n    freshness: { conflate: true }\n",
            )
            .replace("shutdown:\n", "admin:\n  listen: \"${ADMIN}\"\nshutdown:\n");
        let mut optional = Interpolator::from_pairs(&[]);
        optional.env_optional = true;
        if let Err(e) = parse(&text, Path::new("p.yaml"), &optional) {
            panic!("placeholders in typed fields are no error:\n{e}");
        }
        // What is written in the file is still checked, beside the placeholders.
        let wrong = text.replace("group_id: g", "group_id: g\n  commit_interval_typo: 1s");
        let e = parse(&wrong, Path::new("p.yaml"), &optional)
            .unwrap_err()
            .to_string();
        assert!(e.contains("commit_interval_typo"), "{e}");
        let zero = text.replace("${ATTEMPTS}", "0");
        let e = parse(&zero, Path::new("p.yaml"), &optional)
            .unwrap_err()
            .to_string();
        assert!(e.contains("max_attempts") && e.contains("minimum of 1"), "{e}");
        // Without --env-optional the variables are needed.
        assert!(parse(&text, Path::new("p.yaml"), &Interpolator::from_pairs(&[])).is_err());
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
