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
        if !text.contains('$') {
            return Ok(text.to_string());
        }
        let mut out = String::with_capacity(text.len());
        let mut rest = text;
        while let Some(i) = rest.find('$') {
            out.push_str(&rest[..i]);
            let tail = &rest[i..];
            if let Some(after) = tail.strip_prefix("$${") {
                out.push_str("${");
                rest = after;
            } else if let Some(body) = tail.strip_prefix("${") {
                let Some(end) = body.find('}') else {
                    return Err(Missing::Syntax(tail.to_string()));
                };
                out.push_str(&self.resolve(&body[..end])?);
                rest = &body[end + 1..];
            } else {
                out.push('$');
                rest = &tail[1..];
            }
        }
        out.push_str(rest);
        Ok(out)
    }

    fn resolve(&self, reference: &str) -> Result<String, Missing> {
        if let Some(path) = reference.strip_prefix("file:") {
            return match std::fs::read_to_string(path) {
                // Secret files usually end with a newline that is not part of the secret.
                Ok(s) => Ok(s.strip_suffix('\n').unwrap_or(&s).to_string()),
                Err(_) if self.env_optional => Ok(format!("<file:{path}>")),
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
            (Some(v), _) => Ok(v.clone()),
            (None, Some(d)) => Ok(d.to_string()),
            (None, None) if self.env_optional => Ok(format!("<{name}>")),
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
            ("${EMPTY:-x}", ""),
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
    fn env_optional_uses_placeholders() {
        let mut i = Interpolator::from_pairs(&[]);
        i.env_optional = true;
        assert_eq!(i.expand("${NOPE}").unwrap(), "<NOPE>");
    }
}
