//! HTTP delivery (SPEC §3): one request per record over pooled keep-alive connections.

use std::time::{Duration, SystemTime};

use bytes::{Bytes, BytesMut};
use reqwest::header::{HeaderMap, HeaderName, HeaderValue};

use super::template::Template;
use super::{Answer, Attempt, Call, CallError, CallFuture, Status};
use crate::config::{Action, Format, HttpCall};
use crate::record::Record;

/// Bodies above this are not read further; the record is dead-lettered as `too_large`.
pub const MAX_BODY: usize = 16 * 1024 * 1024;

/// The HTTP transport of one route.
pub struct Http {
    client: reqwest::Client,
    url: Template,
    /// The URL parsed once, when it has no placeholders (most routes): parsing it for every
    /// request cost more than building the rest of the request.
    fixed_url: Option<reqwest::Url>,
    method: reqwest::Method,
    timeout: Duration,
    headers: HeaderMap,
    format: Format,
}

impl Http {
    pub fn new(config: &HttpCall) -> Result<Http, String> {
        let url = Template::parse(&config.url)?;
        let method = reqwest::Method::from_bytes(config.method.to_ascii_uppercase().as_bytes())
            .map_err(|_| format!("`{}` is not an HTTP method", config.method))?;
        let mut headers = HeaderMap::new();
        for (k, v) in &config.headers {
            let name = HeaderName::from_bytes(k.as_bytes()).map_err(|e| format!("header `{k}`: {e}"))?;
            let mut value = HeaderValue::from_str(v).map_err(|e| format!("header `{k}`: {e}"))?;
            // Configured headers often carry credentials; keep them out of debug output.
            value.set_sensitive(true);
            headers.insert(name, value);
        }
        let builder = reqwest::Client::builder()
            // The service is co-located: no proxy, no redirects (a 3xx is an answer), and
            // Nagle off because requests are small and latency matters.
            .no_proxy()
            .redirect(reqwest::redirect::Policy::none())
            .tcp_nodelay(true)
            .pool_idle_timeout(Duration::from_secs(60))
            .pool_max_idle_per_host(1024);
        let client = with_tls(builder, config.tls())?
            .build()
            .map_err(|e| format!("cannot build the HTTP client: {e}"))?;
        let fixed_url = if url.is_fixed() {
            Some(reqwest::Url::parse(&config.url).map_err(|e| format!("`{}`: {e}", config.url))?)
        } else {
            None
        };
        Ok(Http {
            client,
            url,
            fixed_url,
            method,
            timeout: config.timeout.0,
            headers,
            format: config.format,
        })
    }

    fn request(&self, record: &Record, attempt: &Attempt) -> reqwest::RequestBuilder {
        // Sized once for the configured headers and the dozen ferry adds: growing the map as
        // they arrive showed in the profile.
        let mut h = HeaderMap::with_capacity(self.headers.len() + 12 + record.headers.len());
        h.extend(self.headers.iter().map(|(k, v)| (k.clone(), v.clone())));
        let content_type = record
            .header("content-type")
            .and_then(|v| HeaderValue::from_bytes(v).ok())
            .unwrap_or(HeaderValue::from_static("application/octet-stream"));
        h.insert(reqwest::header::CONTENT_TYPE, content_type);
        super::describe(record, attempt, |name, value| {
            match (header_name(name), HeaderValue::from_bytes(value)) {
                (Ok(n), Ok(v)) => {
                    // Record headers may repeat; everything else is set once.
                    if name.starts_with("ferry-header-") {
                        h.append(n, v);
                    } else {
                        h.insert(n, v);
                    }
                    true
                }
                _ => false,
            }
        });
        if self.format == Format::CloudEvents {
            for (name, value) in cloud_event(record) {
                if let Ok(v) = HeaderValue::from_str(&value) {
                    h.insert(name, v);
                }
            }
        }
        let body = record.value.clone().unwrap_or_default();
        let request = match &self.fixed_url {
            Some(url) => self.client.request(self.method.clone(), url.clone()),
            None => self.client.request(self.method.clone(), self.url.render(record)),
        };
        request.headers(h).timeout(self.timeout).body(body)
    }

    async fn call_once(&self, record: &Record, attempt: &Attempt) -> Result<Answer, CallError> {
        let classify = |e: reqwest::Error| {
            if e.is_timeout() {
                CallError::Timeout(self.timeout)
            } else {
                // The URL may carry a credential (`?key=${KEY}`); the route names the call.
                CallError::Connect(error_chain(&e.without_url()))
            }
        };
        let mut response = self.request(record, attempt).send().await.map_err(classify)?;
        let status = response.status().as_u16();
        let mut answer = answer_headers(status, response.headers());
        let mut body = BytesMut::new();
        while let Some(chunk) = response.chunk().await.map_err(classify)? {
            if body.len() + chunk.len() > MAX_BODY {
                answer.body_too_large = true;
                break;
            }
            body.extend_from_slice(&chunk);
        }
        answer.body = body.freeze();
        Ok(answer)
    }
}

/// The header names ferry sets on every request, without parsing or allocating them.
fn header_name(name: &str) -> Result<HeaderName, reqwest::header::InvalidHeaderName> {
    Ok(match name {
        "ferry-topic" => HeaderName::from_static("ferry-topic"),
        "ferry-partition" => HeaderName::from_static("ferry-partition"),
        "ferry-offset" => HeaderName::from_static("ferry-offset"),
        "ferry-timestamp" => HeaderName::from_static("ferry-timestamp"),
        "ferry-key" => HeaderName::from_static("ferry-key"),
        "ferry-attempt" => HeaderName::from_static("ferry-attempt"),
        "idempotency-key" => HeaderName::from_static("idempotency-key"),
        "traceparent" => HeaderName::from_static("traceparent"),
        _ => return HeaderName::from_bytes(name.as_bytes()),
    })
}

/// Trusts only the configured CA (no system roots) and presents the client certificate, if any.
pub(crate) fn with_tls(
    builder: reqwest::ClientBuilder,
    files: crate::config::TlsFiles<'_>,
) -> Result<reqwest::ClientBuilder, String> {
    let Some(pem) = super::tls::load(files)? else {
        return Ok(builder);
    };
    let ca = reqwest::Certificate::from_pem_bundle(&pem.ca).map_err(|e| format!("ca_file: {e}"))?;
    let mut builder = builder.tls_certs_only(ca);
    if let Some(bundle) = pem.identity_bundle() {
        builder = builder
            .identity(reqwest::Identity::from_pem(&bundle).map_err(|e| format!("cert_file/key_file: {e}"))?);
    }
    Ok(builder)
}

impl Call for Http {
    fn call<'a>(&'a self, record: &'a Record, attempt: &'a Attempt) -> CallFuture<'a> {
        Box::pin(self.call_once(record, attempt))
    }
}

fn answer_headers(status: u16, headers: &HeaderMap) -> Answer {
    let text = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let mut answer = Answer {
        status: Status::Http(status),
        action: text("ferry-action").map(|raw| {
            Action::from_header(&raw)
                .ok_or_else(|| format!("ferry-action `{raw}` is not one of reply, retry, dead-letter, drop"))
        }),
        reply_topic: text("ferry-reply-topic"),
        reply_key: headers
            .get("ferry-reply-key")
            .map(|v| Bytes::copy_from_slice(v.as_bytes())),
        content_type: text("content-type"),
        retry_after: text("retry-after").and_then(|v| parse_retry_after(&v, SystemTime::now())),
        ..Answer::default()
    };
    for (name, value) in headers {
        if let Some(n) = name.as_str().strip_prefix("ferry-header-") {
            answer
                .headers
                .push((n.to_string(), Bytes::copy_from_slice(value.as_bytes())));
        }
    }
    answer
}

/// `Retry-After` is either delay-seconds or an HTTP date.
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

/// reqwest's top-level message is generic; the cause says what happened.
fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut parts = vec![e.to_string()];
    let mut source = e.source();
    while let Some(s) = source {
        parts.push(s.to_string());
        source = s.source();
    }
    parts.dedup();
    parts.join(": ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_in_seconds_and_as_a_date() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        assert_eq!(parse_retry_after("7", now), Some(Duration::from_secs(7)));
        let later = httpdate::fmt_http_date(now + Duration::from_secs(30));
        assert_eq!(parse_retry_after(&later, now), Some(Duration::from_secs(30)));
        let earlier = httpdate::fmt_http_date(now - Duration::from_secs(30));
        assert_eq!(parse_retry_after(&earlier, now), Some(Duration::ZERO));
        assert_eq!(parse_retry_after("soon", now), None);
    }
}

/// The CloudEvents 1.0 attributes of a record, as HTTP binary-mode headers. A record that is
/// itself a CloudEvent in Kafka binary mode (`ce_*` headers) keeps its attributes; otherwise
/// they are made from the record: `ce-id` is its idempotency key
/// (`{topic}/{partition}/{offset}` of its first consumption, so a retried or re-driven record
/// keeps its id), `ce-source` `kafka:{topic}`, `ce-type` `ferry.record`, `ce-time` its
/// timestamp and `ce-subject` its key.
fn cloud_event(record: &Record) -> Vec<(HeaderName, String)> {
    let text = |v: &Bytes| std::str::from_utf8(v).ok().map(str::to_string);
    let from_record = |attribute: &str| record.header(&format!("ce_{attribute}")).and_then(text);
    let mut out = vec![
        ("specversion", Some("1.0".to_string())),
        ("id", from_record("id").or_else(|| Some(record.idempotency_key()))),
        (
            "source",
            from_record("source").or_else(|| Some(format!("kafka:{}", record.topic))),
        ),
        (
            "type",
            from_record("type").or_else(|| Some("ferry.record".into())),
        ),
        (
            "time",
            from_record("time").or_else(|| record.timestamp_ms.map(rfc3339)),
        ),
        (
            "subject",
            from_record("subject").or_else(|| record.key.as_ref().and_then(text)),
        ),
    ];
    // Other attributes and extensions of a Kafka binary-mode event travel too.
    let mut extra = Vec::new();
    for (k, v) in &record.headers {
        if let Some(attribute) = k.strip_prefix("ce_") {
            if !out.iter().any(|(a, _)| *a == attribute) {
                extra.push((attribute.to_string(), text(v)));
            }
        }
    }
    let mut headers: Vec<(HeaderName, String)> = Vec::new();
    for (attribute, value) in out.drain(..).map(|(a, v)| (a.to_string(), v)).chain(extra) {
        if let (Ok(name), Some(value)) = (
            HeaderName::from_bytes(format!("ce-{attribute}").as_bytes()),
            value,
        ) {
            headers.push((name, value));
        }
    }
    headers
}

/// Milliseconds since the epoch as an RFC 3339 UTC time, `2026-01-31T12:00:00.123Z`.
pub fn rfc3339(ms: i64) -> String {
    let (days, rest) = (ms.div_euclid(86_400_000), ms.rem_euclid(86_400_000));
    // Howard Hinnant's days-to-civil algorithm.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rest / 3_600_000,
        rest / 60_000 % 60,
        rest / 1000 % 60,
        rest % 1000
    )
}

#[cfg(test)]
mod cloud_event_tests {
    use super::rfc3339;

    #[test]
    fn times_are_rfc3339_utc() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(1_769_860_800_123), "2026-01-31T12:00:00.123Z");
        assert_eq!(rfc3339(951_782_400_000), "2000-02-29T00:00:00.000Z");
    }
}
