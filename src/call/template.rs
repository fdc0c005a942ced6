//! URL templates: `{topic}`, `{partition}`, `{offset}`, `{key}` and `{header.NAME}`, each
//! percent-encoded as one path segment (or query value).

use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, percent_encode};

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

    /// The URL for `record`; `Err` says why it has none: a key or header the URL takes that
    /// the record does not have (an empty segment in its place would call another endpoint).
    pub fn render(&self, record: &Record) -> Result<String, String> {
        let mut out = String::new();
        for part in &self.parts {
            let number;
            let value: &[u8] = match part {
                Part::Text(t) => {
                    out.push_str(t);
                    continue;
                }
                Part::Topic => record.topic.as_bytes(),
                Part::Partition => {
                    number = record.partition.to_string();
                    number.as_bytes()
                }
                Part::Offset => {
                    number = record.offset.to_string();
                    number.as_bytes()
                }
                // An empty value is none: its empty segment would call another endpoint too.
                Part::Key => record
                    .key
                    .as_deref()
                    .filter(|k| !k.is_empty())
                    .ok_or("the URL takes the record's key (`{key}`), and the record has none")?,
                Part::Header(h) => record.header(h).filter(|v| !v.is_empty()).ok_or_else(|| {
                    format!(
                        "the URL takes the record's header `{h}` (`{{header.{h}}}`), and the record has none"
                    )
                })?,
            };
            // Bytes as they are, not UTF-8 made of them: a key that is not text stays itself.
            out.extend(percent_encode(value, SEGMENT));
        }
        Ok(out)
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

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;

    #[test]
    fn placeholders_are_filled_as_one_segment_each_or_the_record_has_no_url() {
        let record = |key: Option<&'static [u8]>, headers| Record {
            key: key.map(Bytes::from_static),
            ..Record::for_test("in/x", headers)
        };
        let t = Template::parse("http://s/{topic}/{partition}/{offset}/{key}?t={header.tenant}").unwrap();
        let tenant = vec![("tenant".to_string(), Bytes::from_static(b"a b"))];
        assert_eq!(
            t.render(&record(Some(b"k/1?\xff"), tenant.clone())).unwrap(),
            "http://s/in%2Fx/3/42/k%2F1%3F%FF?t=a%20b"
        );
        for key in [None, Some(&b""[..])] {
            assert_eq!(
                t.render(&record(key, tenant.clone())).unwrap_err(),
                "the URL takes the record's key (`{key}`), and the record has none"
            );
        }
        assert_eq!(
            t.render(&record(Some(b"k"), Vec::new())).unwrap_err(),
            "the URL takes the record's header `tenant` (`{header.tenant}`), and the record has none"
        );
    }
}
