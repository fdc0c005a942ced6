//! URL templates: `{topic}`, `{partition}`, `{offset}`, `{key}` and `{header.NAME}`, each
//! percent-encoded as one path segment (or query value).

use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};

use crate::record::Record;

/// Everything but unreserved characters (RFC 3986) is encoded, so a key like `a/b?c` stays one
/// segment.
const SEGMENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Text(String),
    Topic,
    Partition,
    Offset,
    Key,
    Header(String),
}

/// A parsed URL template.
#[derive(Debug, Clone)]
pub struct Template {
    parts: Vec<Part>,
}

impl Template {
    pub fn parse(text: &str) -> Result<Template, String> {
        let mut parts = Vec::new();
        let mut rest = text;
        while let Some(open) = rest.find('{') {
            if open > 0 {
                parts.push(Part::Text(rest[..open].to_string()));
            }
            let after = &rest[open + 1..];
            let close = after
                .find('}')
                .ok_or_else(|| format!("unclosed `{{` in `{text}`"))?;
            let name = &after[..close];
            parts.push(match name {
                "topic" => Part::Topic,
                "partition" => Part::Partition,
                "offset" => Part::Offset,
                "key" => Part::Key,
                _ => match name.strip_prefix("header.") {
                    Some(h) if !h.is_empty() => Part::Header(h.to_string()),
                    _ => {
                        return Err(format!(
                            "`{{{name}}}` is not a placeholder: use {{topic}}, {{partition}}, {{offset}}, {{key}} or {{header.NAME}}"
                        ));
                    }
                },
            });
            rest = &after[close + 1..];
        }
        if !rest.is_empty() {
            parts.push(Part::Text(rest.to_string()));
        }
        Ok(Template { parts })
    }

    /// True when the URL is the same for every record.
    pub fn is_fixed(&self) -> bool {
        self.parts.iter().all(|p| matches!(p, Part::Text(_)))
    }

    pub fn render(&self, record: &Record) -> String {
        let mut out = String::new();
        let lossy = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
        for part in &self.parts {
            let value = match part {
                Part::Text(t) => {
                    out.push_str(t);
                    continue;
                }
                Part::Topic => record.topic.to_string(),
                Part::Partition => record.partition.to_string(),
                Part::Offset => record.offset.to_string(),
                Part::Key => record.key.as_deref().map(lossy).unwrap_or_default(),
                Part::Header(h) => record.header(h).map(|v| lossy(v)).unwrap_or_default(),
            };
            out.extend(utf8_percent_encode(&value, SEGMENT));
        }
        out
    }
}

/// The template with sample values, to check at load time that it makes a valid URL.
pub fn sample(text: &str) -> String {
    match Template::parse(text) {
        Ok(t) => t
            .parts
            .iter()
            .map(|p| match p {
                Part::Text(t) => t.as_str(),
                _ => "x",
            })
            .collect(),
        Err(_) => text.to_string(),
    }
}
