//! `${VAR}`, `${VAR:-default}` and `${file:/path}` in config values.
//!
//! References are expanded inside scalar values after the YAML structure is parsed, so a secret
//! containing `:` or a newline can never change the shape of the document, and an error points at
//! the value that holds the reference. `$${` is a literal `${`.

use std::collections::HashMap;

/// What could not be expanded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Missing {
    Variable(String),
    File { path: String, error: String },
    Syntax(String),
}

/// A value with its references expanded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Expanded {
    pub text: String,
    /// How many `${…}` references the value held.
    pub references: usize,
    /// What came from the environment or a file, each with the reference that brought it.
    pub fragments: Vec<(String, String)>,
    /// How many references were missing and stand as placeholders (`--env-optional`).
    pub placeholders: usize,
}

/// Where a reference's value came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Origin {
    /// The environment or another file: perhaps a secret.
    Outside,
    /// A default written in the file itself.
    File,
    /// Nowhere: a missing variable's placeholder (`--env-optional`).
    Placeholder,
}

/// Expands references against an environment.
pub struct Interpolator {
    env: HashMap<String, String>,
    /// When set, a missing variable expands to a placeholder instead of failing
    /// (`ferry validate --env-optional`).
    pub env_optional: bool,
}

impl Interpolator {
    /// Uses the process environment.
    pub fn from_env() -> Self {
        Interpolator {
            env: std::env::vars().collect(),
            env_optional: false,
        }
    }

    /// Uses the given pairs only (tests).
    pub fn from_pairs(pairs: &[(&str, &str)]) -> Self {
        Interpolator {
            env: pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            env_optional: false,
        }
    }

    pub fn expand(&self, text: &str) -> Result<String, Missing> {
        self.expand_tracked(text).map(|e| e.text)
    }

    /// As [`expand`](Self::expand), saying which references the value held and what each
    /// expanded to, so that no error message ever quotes what came from the environment or a
    /// file.
    pub fn expand_tracked(&self, text: &str) -> Result<Expanded, Missing> {
        let mut expanded = Expanded {
            text: String::with_capacity(text.len()),
            references: 0,
            fragments: Vec::new(),
            placeholders: 0,
        };
        let mut rest = text;
        while let Some(i) = rest.find('$') {
            expanded.text.push_str(&rest[..i]);
            let tail = &rest[i..];
            if let Some(after) = tail.strip_prefix("$${") {
                expanded.text.push_str("${");
                rest = after;
            } else if let Some(body) = tail.strip_prefix("${") {
                let Some(end) = body.find('}') else {
                    return Err(Missing::Syntax(tail.to_string()));
                };
                let reference = &body[..end];
                let (value, origin) = self.resolve(reference)?;
                expanded.references += 1;
                expanded.placeholders += usize::from(origin == Origin::Placeholder);
                if origin == Origin::Outside && !value.is_empty() {
                    expanded
                        .fragments
                        .push((value.clone(), format!("${{{reference}}}")));
                }
                expanded.text.push_str(&value);
                rest = &body[end + 1..];
            } else {
                expanded.text.push('$');
                rest = &tail[1..];
            }
        }
        expanded.text.push_str(rest);
        Ok(expanded)
    }

    /// The value of a reference, and where it came from.
    fn resolve(&self, reference: &str) -> Result<(String, Origin), Missing> {
        if let Some(path) = reference.strip_prefix("file:") {
            return match std::fs::read_to_string(path) {
                // Secret files usually end with a newline that is not part of the secret.
                Ok(s) => Ok((s.strip_suffix('\n').unwrap_or(&s).to_string(), Origin::Outside)),
                Err(_) if self.env_optional => Ok((format!("<file:{path}>"), Origin::Placeholder)),
                Err(e) => Err(Missing::File {
                    path: path.to_string(),
                    error: e.to_string(),
                }),
            };
        }
        let (name, default) = match reference.split_once(":-") {
            Some((n, d)) => (n, Some(d)),
            None => (reference, None),
        };
        let valid = !name.is_empty()
            && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
            && !name.starts_with(|c: char| c.is_ascii_digit());
        if !valid {
            return Err(Missing::Syntax(format!("${{{reference}}}")));
        }
        match (self.env.get(name), default) {
            // As in the shell, `:-` also stands in for a variable set to nothing: an empty
            // `KAFKA_BROKERS` means "not given", not "no brokers".
            (Some(v), Some(d)) if v.is_empty() => Ok((d.to_string(), Origin::File)),
            (Some(v), _) => Ok((v.clone(), Origin::Outside)),
            (None, Some(d)) => Ok((d.to_string(), Origin::File)),
            (None, None) if self.env_optional => Ok((format!("<{name}>"), Origin::Placeholder)),
            (None, None) => Err(Missing::Variable(name.to_string())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expands_variables_defaults_files_and_escapes() {
        let dir = tempfile::tempdir().unwrap();
        let secret = dir.path().join("pw");
        std::fs::write(&secret, "s3cret\n").unwrap();
        let i = Interpolator::from_pairs(&[("HOST", "k1"), ("EMPTY", "")]);
        let cases = [
            ("${HOST}:9092", "k1:9092"),
            ("${PORT:-9092}", "9092"),
            ("${EMPTY:-x}", "x"),
            ("${EMPTY}", ""),
            ("$${HOST}", "${HOST}"),
            ("cost $5", "cost $5"),
            ("plain", "plain"),
        ];
        for (input, want) in cases {
            assert_eq!(i.expand(input).unwrap(), want, "{input}");
        }
        let file_ref = format!("${{file:{}}}", secret.display());
        assert_eq!(i.expand(&file_ref).unwrap(), "s3cret");
    }

    #[test]
    fn reports_what_is_missing() {
        let i = Interpolator::from_pairs(&[]);
        assert_eq!(i.expand("${NOPE}"), Err(Missing::Variable("NOPE".into())));
        assert!(matches!(i.expand("${a b}"), Err(Missing::Syntax(_))));
        assert!(matches!(i.expand("${OPEN"), Err(Missing::Syntax(_))));
        assert!(matches!(
            i.expand("${file:/does/not/exist}"),
            Err(Missing::File { .. })
        ));
    }

    #[test]
    fn tracks_what_came_from_outside_the_file() {
        let i = Interpolator::from_pairs(&[("PW", "hunter2")]);
        let e = i.expand_tracked("u:${PW}@${HOST:-h}").unwrap();
        assert_eq!(e.text, "u:hunter2@h");
        assert_eq!(e.references, 2);
        assert_eq!(e.fragments, vec![("hunter2".to_string(), "${PW}".to_string())]);
        assert_eq!(i.expand_tracked("plain").unwrap().references, 0);
    }

    #[test]
    fn env_optional_uses_placeholders() {
        let mut i = Interpolator::from_pairs(&[]);
        i.env_optional = true;
        assert_eq!(i.expand("${NOPE}").unwrap(), "<NOPE>");
    }
}
