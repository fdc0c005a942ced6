//! HTTP delivery (SPEC §3): one request per record over pooled keep-alive connections.

use std::time::{Duration, SystemTime};

use bytes::{Bytes, BytesMut};
use http::header::{HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Uri};
use http_body_util::{BodyExt, Full};

use super::pool::{Pool, SendError, host_header};
use super::template::Template;
use super::{Answer, Attempt, CallError, MAX_BODY, Status};
use crate::config::{Action, Format, HttpCall};
use crate::record::Record;

/// The HTTP transport of one route.
pub struct Http {
    client: Pool,
    url: Template,
    /// The URL parsed once, when it has no placeholders (most routes): parsing it for every
    /// request cost more than building the rest of the request.
    fixed_url: Option<Uri>,
    method: Method,
    timeout: Duration,
    headers: HeaderMap,
    format: Format,
}

/// Why a URL with a user name or password is refused, at load and at start.
pub const URL_CREDENTIALS: &str = "the URL holds a user name or password, which ferry does not send; give the credential as a header instead (`headers: { authorization: \"Basic ${CREDENTIAL}\" }`)";

/// A URL as hyper takes it, after the WHATWG parse (and its normalisation) a browser would apply.
fn uri(text: &str) -> Result<Uri, String> {
    // The messages never repeat the URL: it may hold a credential (`?key=${KEY}`).
    let url = reqwest::Url::parse(text).map_err(|e| format!("the URL is not valid: {e}"))?;
    // hyper sends no credentials from the URL; silently calling without them would be worse.
    if !url.username().is_empty() || url.password().is_some() {
        return Err(URL_CREDENTIALS.into());
    }
    Uri::try_from(url.as_str()).map_err(|e| format!("the URL is not valid: {e}"))
}

impl Http {
    pub fn new(config: &HttpCall) -> Result<Http, String> {
        let url = Template::parse(&config.url)?;
        let method = Method::from_bytes(config.method.to_ascii_uppercase().as_bytes())
            .map_err(|_| format!("`{}` is not an HTTP method", config.method))?;
        let mut headers = HeaderMap::new();
        for (k, v) in &config.headers {
            let name = HeaderName::from_bytes(k.as_bytes()).map_err(|e| format!("header `{k}`: {e}"))?;
            let mut value = HeaderValue::from_str(v).map_err(|e| format!("header `{k}`: {e}"))?;
            // Configured headers often carry credentials; keep them out of debug output.
            value.set_sensitive(true);
            headers.insert(name, value);
        }
        // What every client sends; some frameworks answer 406 without it.
        if !headers.contains_key(http::header::ACCEPT) {
            headers.insert(http::header::ACCEPT, HeaderValue::from_static("*/*"));
        }
        // A record's own `content-type` header says what its bytes are; a configured one is the
        // route's word for records that say nothing.
        if !headers.contains_key(http::header::CONTENT_TYPE) {
            headers.insert(
                http::header::CONTENT_TYPE,
                HeaderValue::from_static("application/octet-stream"),
            );
        }
        let tls = super::tls::client_config(config.tls())?;
        let fixed_url = if url.is_fixed() {
            Some(uri(&config.url)?)
        } else {
            None
        };
        // hyper adds the Host header to each request that has none, formatting it each time;
        // for a fixed URL it is made once here, as hyper would make it.
        if let Some(host) = fixed_url.as_ref().and_then(host_header) {
            headers.entry(http::header::HOST).or_insert(host);
        }
        Ok(Http {
            client: Pool::new(tls),
            url,
            fixed_url,
            method,
            timeout: config.timeout.0,
            headers,
            format: config.format,
        })
    }

    fn request(&self, record: &Record, attempt: &Attempt) -> Result<Request<Full<Bytes>>, CallError> {
        // Sized once for the configured headers and the dozen ferry adds: growing the map as
        // they arrive showed in the profile.
        let mut h = HeaderMap::with_capacity(self.headers.len() + 12 + record.headers.len());
        h.extend(self.headers.iter().map(|(k, v)| (k.clone(), v.clone())));
        if let Some(own) = record
            .header("content-type")
            .and_then(|v| HeaderValue::from_bytes(v).ok())
        {
            h.insert(http::header::CONTENT_TYPE, own);
        }
        // The values are copied into one buffer, each header's value a slice of it: a header
        // value of its own was an allocation per header, and a request has a dozen.
        let room = DESCRIBED_BYTES
            + 2 * (record.topic.len() + record.key.as_ref().map_or(0, |k| k.len()))
            + record.headers.iter().map(|(_, v)| v.len()).sum::<usize>();
        let mut values = BytesMut::with_capacity(room);
        let mut described = Vec::with_capacity(12 + record.headers.len());
        super::describe(record, attempt, |name, value| {
            if !value.iter().all(|&b| is_valid_value_byte(b)) {
                return false;
            }
            let Ok(n) = header_name(name) else {
                return false;
            };
            let at = values.len();
            values.extend_from_slice(value);
            // Record headers may repeat; everything else is set once.
            described.push((n, at..values.len(), name.starts_with("ferry-header-")));
            true
        });
        // hyper would format the body's length into a header of its own; it takes one that is
        // there (and frames the body by it), so it goes into the buffer too. An empty body
        // has none, as hyper sends it.
        let body = record.value.clone().unwrap_or_default();
        if !body.is_empty() {
            let at = values.len();
            values.extend_from_slice(itoa::Buffer::new().format(body.len()).as_bytes());
            described.push((http::header::CONTENT_LENGTH, at..values.len(), false));
        }
        let values = values.freeze();
        for (name, range, repeats) in described {
            // Checked byte by byte above, as `HeaderValue::from_bytes` does.
            let Ok(v) = HeaderValue::from_maybe_shared(values.slice(range)) else {
                continue;
            };
            if repeats {
                h.append(name, v);
            } else {
                h.insert(name, v);
            }
        }
        if self.format == Format::CloudEvents {
            for (name, value) in cloud_event(record) {
                if let Ok(v) = HeaderValue::from_str(&value) {
                    h.insert(name, v);
                }
            }
        }
        let uri = match &self.fixed_url {
            Some(uri) => uri.clone(),
            // A record whose key or header makes no URL cannot be called, now or later.
            None => self
                .url
                .render(record)
                .and_then(|url| uri(&url))
                .map_err(CallError::Encode)?,
        };
        let mut request = Request::new(Full::new(body));
        *request.method_mut() = self.method.clone();
        *request.uri_mut() = uri;
        *request.headers_mut() = h;
        Ok(request)
    }

    /// The request and its whole answer, within the route's timeout.
    pub async fn call(&self, record: &Record, attempt: &Attempt) -> Result<Answer, CallError> {
        let request = self.request(record, attempt)?;
        tokio::time::timeout(self.timeout, self.exchange(request))
            .await
            .map_err(|_| CallError::Timeout(self.timeout))?
    }

    async fn exchange(&self, request: Request<Full<Bytes>>) -> Result<Answer, CallError> {
        // The URL may carry a credential (`?key=${KEY}`), and hyper's errors never name it.
        let (response, connection) = self.client.send(request).await.map_err(|e| match e {
            SendError::Connect { .. } if super::never_reached(&e) => {
                CallError::Unreachable(super::error_chain(&e))
            }
            e => CallError::Connect(super::error_chain(&e)),
        })?;
        let mut answer = answer_headers(response.status().as_u16(), response.headers());
        let mut incoming = response.into_body();
        let mut body = BytesMut::new();
        while let Some(frame) = incoming.frame().await {
            let frame = frame.map_err(|e| CallError::Connect(super::error_chain(&e)))?;
            let Ok(chunk) = frame.into_data() else {
                // Trailers: nothing ferry reads.
                continue;
            };
            if body.len() + chunk.len() > MAX_BODY {
                // The rest stays unread: the connection goes with it.
                answer.body_too_large = true;
                answer.body = body.freeze();
                return Ok(answer);
            }
            body.extend_from_slice(&chunk);
        }
        connection.give_back();
        answer.body = body.freeze();
        Ok(answer)
    }
}

/// Room for the values ferry describes a record with (numbers, trace context) besides the
/// topic and key (each twice, as itself and in the idempotency key or base64) and the record's
/// headers, so that the buffer seldom grows.
const DESCRIBED_BYTES: usize = 256;

/// What `HeaderValue::from_bytes` accepts: visible ASCII, obs-text, space and tab.
fn is_valid_value_byte(b: u8) -> bool {
    (b >= 32 && b != 127) || b == b'\t'
}

/// The header names ferry sets on every request, without parsing or allocating them: made at
/// compile time (`from_static` checks its text byte by byte when it runs).
fn header_name(name: &str) -> Result<HeaderName, http::header::InvalidHeaderName> {
    Ok(match name {
        "ferry-topic" => const { HeaderName::from_static("ferry-topic") },
        "ferry-partition" => const { HeaderName::from_static("ferry-partition") },
        "ferry-offset" => const { HeaderName::from_static("ferry-offset") },
        "ferry-timestamp" => const { HeaderName::from_static("ferry-timestamp") },
        "ferry-key" => const { HeaderName::from_static("ferry-key") },
        "ferry-attempt" => const { HeaderName::from_static("ferry-attempt") },
        "idempotency-key" => const { HeaderName::from_static("idempotency-key") },
        "ferry-key-base64" => const { HeaderName::from_static("ferry-key-base64") },
        "traceparent" => const { HeaderName::from_static("traceparent") },
        "tracestate" => const { HeaderName::from_static("tracestate") },
        _ => return HeaderName::from_bytes(name.as_bytes()),
    })
}

fn answer_headers(status: u16, headers: &HeaderMap) -> Answer {
    let text = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    // What the service says about the outcome is never dropped for its bytes: a value that is
    // not UTF-8 names no action and no topic, so it is a contract error, not ignored.
    let said = |name: &str| {
        headers
            .get(name)
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
    };
    let mut answer = Answer {
        status: Status::Http(status),
        action: said("ferry-action").map(|raw| {
            Action::from_header(&raw)
                .ok_or_else(|| format!("ferry-action `{raw}` is not one of reply, retry, dead-letter, drop"))
        }),
        reply_topic: said("ferry-reply-topic"),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_action_or_reply_topic_that_is_not_utf8_is_a_contract_error_not_ignored() {
        let mut headers = HeaderMap::new();
        headers.insert("ferry-action", HeaderValue::from_bytes(b"dr\xffop").unwrap());
        headers.insert("ferry-reply-topic", HeaderValue::from_bytes(b"out\xff").unwrap());
        let answer = answer_headers(200, &headers);
        let refused = answer.action.expect("the action is seen").unwrap_err();
        assert!(
            refused.contains("is not one of reply, retry, dead-letter, drop"),
            "{refused}"
        );
        assert_eq!(answer.reply_topic.as_deref(), Some("out\u{fffd}"));

        headers.insert("ferry-action", HeaderValue::from_static("drop"));
        assert!(matches!(
            answer_headers(200, &headers).action,
            Some(Ok(Action::Drop))
        ));
    }

    #[tokio::test]
    async fn an_answer_too_long_to_read_closes_its_connection_and_the_next_call_opens_another() {
        use std::sync::atomic::Ordering;

        use crate::call::pool::tests::{answering, eventually};

        let service = answering(vec![b'x'; MAX_BODY + 1], Duration::ZERO, false).await;
        let config: HttpCall = serde_json::from_value(serde_json::json!({ "url": service.url })).unwrap();
        let http = Http::new(&config).unwrap();
        let record = record(Vec::new());
        let answer = http.call(&record, &ATTEMPT).await.unwrap();
        assert!(answer.body_too_large);
        assert!(answer.body.len() <= MAX_BODY);
        eventually("the service sees the connection closed", || {
            service.closed.load(Ordering::SeqCst) == 1
        })
        .await;
        assert!(http.call(&record, &ATTEMPT).await.unwrap().body_too_large);
        assert_eq!(service.accepted.load(Ordering::SeqCst), 2);
    }

    const ATTEMPT: Attempt = Attempt {
        number: 1,
        trace: None,
    };

    /// A record of `in` with the value `hello` and `headers`.
    fn record(headers: Vec<(String, Bytes)>) -> Record {
        Record {
            value: Some(Bytes::from_static(b"hello")),
            ..Record::for_test("in", headers)
        }
    }

    #[tokio::test]
    async fn a_record_s_content_type_wins_over_the_configured_one_and_that_over_octet_stream() {
        let content_type = |configured: serde_json::Value, own: Option<&'static str>| {
            let config: HttpCall = serde_json::from_value(
                serde_json::json!({ "url": "http://127.0.0.1:1/", "headers": configured }),
            )
            .unwrap();
            let headers = own
                .map(|v| ("content-type".to_string(), Bytes::from_static(v.as_bytes())))
                .into_iter()
                .collect();
            let request = Http::new(&config)
                .unwrap()
                .request(&record(headers), &ATTEMPT)
                .unwrap();
            assert_eq!(
                request.headers()["x-api"],
                "1",
                "the other configured headers go too"
            );
            request.headers()[http::header::CONTENT_TYPE].clone()
        };
        let json = serde_json::json!({ "content-type": "application/json", "x-api": "1" });
        assert_eq!(content_type(json.clone(), None), "application/json");
        assert_eq!(content_type(json, Some("text/plain")), "text/plain");
        let none = serde_json::json!({ "x-api": "1" });
        assert_eq!(content_type(none.clone(), None), "application/octet-stream");
        assert_eq!(content_type(none, Some("text/plain")), "text/plain");
    }

    #[test]
    fn the_host_header_is_made_as_hyper_makes_it() {
        let host = |u: &str| host_header(&uri(u).unwrap()).unwrap();
        assert_eq!(host("http://127.0.0.1:8080/x"), "127.0.0.1:8080");
        assert_eq!(host("http://svc/x"), "svc");
        assert_eq!(host("http://svc:80/x"), "svc");
        assert_eq!(host("https://svc:443/x"), "svc");
        assert_eq!(host("https://svc:80/x"), "svc:80");
        assert_eq!(host("http://[::1]:9000/x"), "[::1]:9000");
    }

    #[test]
    fn urls_are_taken_as_a_browser_would_and_credentials_in_them_are_refused() {
        assert_eq!(
            uri("http://127.0.0.1:8080/a b?q=1").unwrap(),
            "http://127.0.0.1:8080/a%20b?q=1"
        );
        assert_eq!(uri("HTTP://Svc:80/x").unwrap(), "http://svc/x");
        let refused = uri("http://user:secret@svc/x").unwrap_err();
        assert!(refused.contains("as a header"), "{refused}");
        assert!(
            !refused.contains("secret"),
            "the credential is not repeated: {refused}"
        );
        assert!(uri("not a url").is_err());
    }

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
            // Where the record first arrived, through every retry topic: (source, id) is a
            // CloudEvent's identity, and a retry is the same event.
            from_record("source").or_else(|| Some(format!("kafka:{}", record.origin_topic()))),
        ),
        (
            "type",
            from_record("type").or_else(|| Some("ferry.record".into())),
        ),
        (
            "time",
            from_record("time").or_else(|| record.origin_timestamp_ms().map(rfc3339)),
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
