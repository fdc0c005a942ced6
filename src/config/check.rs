//! Checks that span fields, run once the config is typed. Each problem is a path and a message.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use super::types::*;

/// Properties ferry sets itself because its guarantees depend on them.
const RESERVED: &[(&str, &str)] = &[
    ("bootstrap.servers", "use kafka.brokers"),
    ("group.id", "use kafka.group_id"),
    ("enable.auto.commit", "ferry commits only what is final"),
    ("enable.auto.offset.store", "ferry commits only what is final"),
    ("auto.offset.reset", "use routes[].from.start"),
    ("enable.idempotence", "ferry's producer is always idempotent"),
    ("acks", "ferry always produces with acks=all"),
    ("isolation.level", "ferry reads committed records only"),
    (
        "transactional.id",
        "use kafka.transactional_id with delivery: exactly_once",
    ),
];

fn check_grpc(g: &GrpcCall, at: &str, absent_ok: bool, say: &mut impl FnMut(String, String)) {
    match reqwest::Url::parse(&g.endpoint) {
        Ok(u) if matches!(u.scheme(), "http" | "https") => {
            check_tls(g.tls(), u.scheme() == "https", at, absent_ok, say);
        }
        Ok(u) => say(
            format!("{at}.endpoint"),
            format!(
                "scheme `{}` is not supported: use http:// (h2c) or https://",
                u.scheme()
            ),
        ),
        Err(e) => say(
            format!("{at}.endpoint"),
            format!("`{}` is not a URL: {e}", g.endpoint),
        ),
    }
    if g.timeout.0.is_zero() {
        say(format!("{at}.timeout"), "must be above zero, e.g. 5s".into());
    }
    match (&g.method, &g.descriptor_set, g.reflection) {
        (None, None, false) => {}
        (None, _, _) => say(
            format!("{at}.method"),
            "`descriptor_set` and `reflection` describe a `method`: name it (package.Service/Method)".into(),
        ),
        (Some(_), Some(_), true) => say(
            format!("{at}.reflection"),
            "give either `descriptor_set` or `reflection: true`, not both".into(),
        ),
        (Some(_), None, false) => say(
            format!("{at}.method"),
            "say where the method's schema comes from: `descriptor_set: FILE` or `reflection: true`".into(),
        ),
        (Some(m), _, _) => {
            let valid = m
                .split_once('/')
                .is_some_and(|(s, n)| s.contains('.') && !n.is_empty() && !n.contains('/'));
            if !valid {
                say(
                    format!("{at}.method"),
                    format!("`{m}` is not a method: write package.Service/Method"),
                );
            }
        }
    }
    if let Some(f) = &g.descriptor_set {
        if !f.is_file() {
            say(
                format!("{at}.descriptor_set"),
                format!("{} does not exist", f.display()),
            );
        } else if let Some(m) = g.method.as_ref().filter(|m| m.contains('/')) {
            if let Err(e) = crate::call::grpc::check_descriptor_set(f, m) {
                say(format!("{at}.descriptor_set"), e);
            }
        }
    }
}

/// `absent_ok`: a file that does not exist here is no problem (`ferry validate --env-optional`
/// checks a production config, whose certificates are mounted only in production).
fn check_tls(
    files: TlsFiles<'_>,
    https: bool,
    at: &str,
    absent_ok: bool,
    say: &mut impl FnMut(String, String),
) {
    for (field, message) in crate::call::tls::check(files, https) {
        let file = match field {
            "ca_file" => files.ca,
            "cert_file" => files.cert,
            _ => files.key,
        };
        if absent_ok && file.is_some_and(|f| !f.exists()) {
            continue;
        }
        say(format!("{at}.{field}"), message);
    }
}

/// librdkafka properties that name a file it reads when the client is created.
pub(super) const FILE_PROPERTIES: &[&str] = &[
    "ssl.ca.location",
    "ssl.certificate.location",
    "ssl.key.location",
    "ssl.crl.location",
    "ssl.keystore.location",
];

/// Whether a key holds a credential: its value is never quoted back.
pub fn is_secret_key(key: &str) -> bool {
    let key = key.to_ascii_lowercase();
    key.contains("password")
        || key.contains("secret")
        || key.ends_with("token")
        || matches!(
            key.as_str(),
            "sasl.jaas.config"
                | "sasl.oauthbearer.config"
                | "ssl.key.pem"
                | "authorization"
                | "proxy-authorization"
                | "x-api-key"
                | "api-key"
                | "cookie"
        )
}

/// What is wrong with one entry of `kafka.brokers`, as librdkafka reads it:
/// `[PROTOCOL://]host[:port]`, an IPv6 host in brackets, 9092 when no port is given.
fn broker_problem(entry: &str) -> Option<String> {
    const HOW: &str = "write host:port[,host:port…], e.g. kafka-0.kafka:9092";
    let address = match entry.split_once("://") {
        Some((protocol, rest))
            if ["plaintext", "ssl", "sasl_plaintext", "sasl_ssl"]
                .contains(&protocol.to_ascii_lowercase().as_str()) =>
        {
            rest
        }
        Some((protocol, _)) => {
            return Some(format!(
                "`{entry}`: Kafka is not reached over `{protocol}://`; {HOW} (TLS and SASL go in kafka.properties, `security.protocol`)"
            ));
        }
        None => entry,
    };
    let (host, port) = match address.strip_prefix('[') {
        Some(v6) => match v6.split_once(']') {
            Some((host, "")) => (host, None),
            Some((host, rest)) => match rest.strip_prefix(':') {
                Some(port) => (host, Some(port)),
                None => return Some(format!("`{entry}`: {HOW}")),
            },
            None => {
                return Some(format!(
                    "`{entry}`: an IPv6 address ends with `]`, e.g. [::1]:9092"
                ));
            }
        },
        None => match address.split_once(':') {
            Some((_, rest)) if rest.contains(':') => {
                return Some(format!(
                    "`{entry}`: an IPv6 address goes in brackets, e.g. [::1]:9092"
                ));
            }
            Some((host, port)) => (host, Some(port)),
            None => (address, None),
        },
    };
    let host_ok = !host.is_empty()
        && host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | ':'));
    if !host_ok {
        return Some(format!("`{entry}` is not host:port; {HOW}"));
    }
    match port.map(str::parse::<u16>) {
        Some(Ok(0) | Err(_)) => Some(format!("`{entry}`: the port must be a number from 1 to 65535")),
        _ => None,
    }
}

/// Why a header configured for every request would be replaced: ferry sets it per record
/// (SPEC §3), or hyper frames the body by it.
fn set_by_ferry(name: &str, format: Format) -> Option<&'static str> {
    let name = name.to_ascii_lowercase();
    Some(match name.as_str() {
        "content-length" | "transfer-encoding" => "the body's framing",
        "idempotency-key" => "the record's idempotency key",
        "traceparent" | "tracestate" => "the record's trace context",
        n if n.starts_with("ferry-") => "the `ferry-*` headers are ferry's own",
        "ce-specversion" | "ce-id" | "ce-source" | "ce-type" | "ce-time" | "ce-subject"
            if format == Format::CloudEvents =>
        {
            "the record's CloudEvents attributes"
        }
        _ => return None,
    })
}

/// What Kafka refuses in a topic name, if anything: the broker would refuse to create or serve
/// it, at the first record rather than at load.
pub fn topic_name_problem(name: &str) -> Option<String> {
    if name.is_empty() {
        return Some("a topic name cannot be empty".into());
    }
    if name == "." || name == ".." {
        return Some(format!("`{name}` is not a topic name Kafka accepts"));
    }
    if name.len() > 249 {
        return Some(format!(
            "the topic name is {} characters long; Kafka takes at most 249",
            name.len()
        ));
    }
    if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
    {
        return Some(format!(
            "`{name}` is not a topic name Kafka accepts: use letters, digits, `.`, `_` and `-`"
        ));
    }
    None
}

/// `kafka.properties` as librdkafka sees them: a known property with a valid value, and the
/// files the TLS properties name. librdkafka's own check runs here so that a mistake is a config
/// error at its key instead of a failure to start (whose message would quote the value).
fn check_properties(
    config: &Config,
    absent_ok: bool,
    placeholders: &HashSet<String>,
    say: &mut impl FnMut(String, String),
) {
    let kafka = &config.kafka;
    // Whether every property is known and valid on its own, so that the set can be judged.
    let mut each_fine = true;
    for (key, value) in &kafka.properties {
        let at = format!("kafka.properties.{key}");
        if placeholders.contains(&at) {
            each_fine = false;
            continue;
        }
        let mut one = rdkafka::ClientConfig::new();
        one.set(key, &value.0);
        if let Err(rdkafka::error::KafkaError::ClientConfig(_, description, _, _)) =
            one.create_native_config()
        {
            // librdkafka quotes a rejected value; a credential must not be.
            let description = if is_secret_key(key) && !value.0.is_empty() {
                description.replace(&value.0, "…")
            } else {
                description
            };
            say(at.clone(), format!("librdkafka: {description}"));
            each_fine = false;
            continue;
        }
        if FILE_PROPERTIES.contains(&key.as_str()) && !(key == "ssl.ca.location" && value.0 == "probe") {
            let path = std::path::Path::new(&value.0);
            // librdkafka reads it when it makes a client: not here.
            each_fine &= path.exists();
            if !path.exists() && !absent_ok {
                say(
                    at,
                    format!(
                        "`{}` does not exist (librdkafka reads it when ferry starts)",
                        path.display()
                    ),
                );
            }
        }
    }
    if each_fine {
        if let Some(why) = refused_together(config) {
            say("kafka.properties".into(), why);
        }
    }
    let has = |k: &str| kafka.properties.contains_key(k);
    let value = |k: &str| kafka.properties.get(k).map(|v| v.0.as_str());
    // ferry has no token callback, so librdkafka must make OAUTHBEARER tokens itself (OIDC, or
    // unsecured test tokens); otherwise it waits for a token forever, silently.
    let mechanism = value("sasl.mechanism").or(value("sasl.mechanisms"));
    if mechanism.is_some_and(|m| m.eq_ignore_ascii_case("OAUTHBEARER"))
        && !value("sasl.oauthbearer.method").is_some_and(|m| m.eq_ignore_ascii_case("oidc"))
        && value("enable.sasl.oauthbearer.unsecure.jwt") != Some("true")
    {
        let key = if has("sasl.mechanism") {
            "sasl.mechanism"
        } else {
            "sasl.mechanisms"
        };
        say(
            format!("kafka.properties.{key}"),
            "OAUTHBEARER needs librdkafka to make the tokens (ferry has no token callback): with `sasl.oauthbearer.method: oidc`, which needs a librdkafka built with libcurl (this build has none, and refuses it), or, for tests only, with `enable.sasl.oauthbearer.unsecure.jwt: true`".into(),
        );
    }
    if has("ssl.certificate.location") != has("ssl.key.location") {
        let (missing, given) = if has("ssl.key.location") {
            ("ssl.certificate.location", "ssl.key.location")
        } else {
            ("ssl.key.location", "ssl.certificate.location")
        };
        say(
            format!("kafka.properties.{given}"),
            format!("a client certificate needs its certificate and its key: give `{missing}` too"),
        );
    }
}

/// What librdkafka says of the properties together when it makes ferry's consumer and producer,
/// with ferry's own settings over them (`max.poll.interval.ms` below `session.timeout.ms`, a SASL
/// mechanism this build cannot do, more requests in flight than the idempotent producer allows):
/// otherwise a failure to start that `ferry validate` passed. The clients are made and dropped at
/// once: the consumer has no group, the producer nothing to send, and librdkafka connects to a
/// broker only when something needs it.
fn refused_together(config: &Config) -> Option<String> {
    use rdkafka::consumer::BaseConsumer;
    use rdkafka::producer::BaseProducer;
    let mut c = crate::sidecar::client_config(config);
    // Nothing listens on the discard port, and nothing is sent there. Set over the properties:
    // a `bootstrap.servers` among them is refused as reserved.
    c.set("bootstrap.servers", "127.0.0.1:9");
    let mut consumer = c.clone();
    let all_latest = config.routes.iter().all(|r| r.from.start == Start::Latest);
    crate::consume::settings(&mut consumer, all_latest);
    let mut producer = c;
    crate::produce::settings(&mut producer);
    if config.delivery == Delivery::ExactlyOnce {
        let id = config.kafka.transactional_id.clone();
        producer.set(
            "transactional.id",
            id.unwrap_or_else(|| crate::transaction::default_id(&config.kafka.group_id)),
        );
    }
    let refused = |client: &str, e: rdkafka::error::KafkaError| {
        let why = match e {
            rdkafka::error::KafkaError::ClientCreation(why) => why,
            e => e.to_string(),
        };
        format!("librdkafka refuses these properties together for ferry's {client}: {why}")
    };
    if let Err(e) = consumer.create::<BaseConsumer>() {
        return Some(refused("consumer", e));
    }
    producer
        .create::<BaseProducer>()
        .err()
        .map(|e| refused("producer", e))
}

/// Every problem found, as a path and a message. `absent_ok`: TLS files that do not exist here
/// are no problem (`ferry validate --env-optional`).
/// `placeholders`: the paths of values that are missing variables' placeholders
/// (`ferry validate --env-optional`), which only a check of the whole value could judge.
pub fn check(config: &Config, absent_ok: bool, placeholders: &HashSet<String>) -> Vec<(String, String)> {
    let mut problems = Vec::new();
    let mut say = |path: String, message: String| problems.push((path, message));

    if config.kafka.brokers.trim().is_empty() {
        say(
            "kafka.brokers".into(),
            "no brokers given: write host:port[,host:port…]".into(),
        );
    } else if !placeholders.contains("kafka.brokers") {
        // librdkafka takes a bad address without a word and retries it forever: ferry would
        // sit unready, checking topics, with the reason only in librdkafka's log.
        // librdkafka skips empty entries (a trailing comma).
        for entry in config
            .kafka
            .brokers
            .split(',')
            .map(str::trim)
            .filter(|e| !e.is_empty())
        {
            if let Some(why) = broker_problem(entry) {
                say("kafka.brokers".into(), why);
            }
        }
    }
    if config.admin.prestop && config.admin.listen.is_none() {
        say(
            "admin.prestop".into(),
            "`GET /prestop` is served by the admin endpoint, which `listen: null` turns off: give `admin.listen`, or leave `prestop` out".into(),
        );
    }
    if config.kafka.group_id.trim().is_empty() {
        say(
            "kafka.group_id".into(),
            "the consumer group id must not be empty".into(),
        );
    }
    for key in config.kafka.properties.keys() {
        if let Some((_, why)) = RESERVED.iter().find(|(k, _)| k == key) {
            say(
                format!("kafka.properties.{key}"),
                format!("`{key}` is set by ferry and cannot be overridden: {why}"),
            );
        }
    }
    if config.kafka.transaction_max_records == 0 {
        say(
            "kafka.transaction_max_records".into(),
            "must be at least 1, e.g. 1000".into(),
        );
    }
    if config.kafka.transactional_id.is_some() && config.delivery != Delivery::ExactlyOnce {
        say(
            "kafka.transactional_id".into(),
            "is used only with `delivery: exactly_once`: set that, or remove this".into(),
        );
    }
    check_properties(config, absent_ok, placeholders, &mut say);
    if config.kafka.commit_interval.0.is_zero() {
        say(
            "kafka.commit_interval".into(),
            "must be above zero, e.g. 1s".into(),
        );
    }
    // A revoke holds the poll loop for up to the drain timeout; past max.poll.interval.ms the
    // group evicts the member mid-drain and its partitions are handled twice.
    let property_ms = |key: &str, default: u64| {
        config
            .kafka
            .properties
            .get(key)
            .and_then(|v| v.0.parse::<u64>().ok())
            .unwrap_or(default)
    };
    let max_poll = Duration::from_millis(property_ms("max.poll.interval.ms", 300_000));
    let drain = config.shutdown.drain_timeout;
    if drain.0 >= max_poll {
        const WHY: &str = "a drain on revoke that long gets this member evicted from the group";
        // Said where the file sets it: a drain timeout left at its default is not in the file.
        let default_drain = drain == super::types::Shutdown::default().drain_timeout;
        if default_drain && config.kafka.properties.contains_key("max.poll.interval.ms") {
            say(
                "kafka.properties.max.poll.interval.ms".into(),
                format!(
                    "must be above shutdown.drain_timeout ({drain}, its default): {WHY}; raise it, or set a shorter drain_timeout"
                ),
            );
        } else {
            say(
                "shutdown.drain_timeout".into(),
                format!("must be below max.poll.interval.ms ({}): {WHY}", Dur(max_poll)),
            );
        }
    }
    let traces = &config.telemetry.traces;
    if !(0.0..=1.0).contains(&traces.sample_ratio) {
        say(
            "telemetry.traces.sample_ratio".into(),
            "must be between 0 and 1 (0.1 traces one record in ten)".into(),
        );
    }
    if let Some(e) = &traces.otlp_endpoint {
        match reqwest::Url::parse(e) {
            Ok(u) if u.scheme() == "http" => {}
            Ok(u) if u.scheme() == "https" => say(
                "telemetry.traces.otlp_endpoint".into(),
                "TLS to the collector is not supported yet: send to an OpenTelemetry Collector agent on the node or in the pod over http://".into(),
            ),
            _ => say(
                "telemetry.traces.otlp_endpoint".into(),
                format!("`{e}` is not the http:// URL of an OTLP/gRPC collector (e.g. http://127.0.0.1:4317)"),
            ),
        }
    }
    if let Err(e) = crate::telemetry::log_filter(&config.telemetry.log.level) {
        say(
            "telemetry.log.level".into(),
            format!(
                "`{}` is not a level (error, warn, info, debug, trace) or a filter such as `info,ferry=debug`: {e}",
                config.telemetry.log.level
            ),
        );
    }
    if let Some(r) = &config.service.ready {
        match (&r.http, &r.grpc) {
            (Some(_), Some(_)) => say(
                "service.ready".into(),
                "give either `http` or `grpc`, not both".into(),
            ),
            (None, None) => say(
                "service.ready".into(),
                "say how to probe: `http: URL` or `grpc: URL`".into(),
            ),
            (Some(u), None) | (None, Some(u)) => match reqwest::Url::parse(u) {
                Ok(url) if matches!(url.scheme(), "http" | "https") => {
                    check_tls(
                        r.tls(),
                        url.scheme() == "https",
                        "service.ready",
                        absent_ok,
                        &mut say,
                    );
                }
                _ => {
                    let key = if r.http.is_some() {
                        "service.ready.http"
                    } else {
                        "service.ready.grpc"
                    };
                    say(key.into(), format!("`{u}` is not an http:// or https:// URL"));
                }
            },
        }
        if r.failure_threshold == 0 {
            say(
                "service.ready.failure_threshold".into(),
                "must be at least 1".into(),
            );
        }
        if r.interval.0.is_zero() {
            say(
                "service.ready.interval".into(),
                "must be above zero, e.g. 2s".into(),
            );
        }
    }
    if config.routes.is_empty() {
        say("routes".into(), "at least one route is needed".into());
    }

    let mut names: HashMap<&str, usize> = HashMap::new();
    let mut readers: HashMap<&str, usize> = HashMap::new();
    for (i, route) in config.routes.iter().enumerate() {
        let at = |field: &str| format!("routes[{i}].{field}");
        let valid_name = !route.name.is_empty()
            && route
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
        if !valid_name {
            say(
                at("name"),
                "a route name is made of letters, digits, `-`, `_` and `.`".into(),
            );
        }
        if let Some(first) = names.insert(&route.name, i) {
            say(
                at("name"),
                format!(
                    "route `{}` is already defined at routes[{first}]; names must be unique",
                    route.name
                ),
            );
        }

        match (&route.from.pattern, route.from.topics.is_empty()) {
            (Some(_), false) => say(at("from"), "give either `topics` or `pattern`, not both".into()),
            (None, true) => say(
                at("from.topics"),
                "name at least one topic to read (or give a `pattern`)".into(),
            ),
            (Some(p), true) => {
                if let Err(e) = regex::Regex::new(p) {
                    say(at("from.pattern"), format!("not a valid regular expression: {e}"));
                }
            }
            (None, false) => {}
        }
        if !route.retry.topics.is_empty() && route.ordering != Ordering::None {
            say(
                at("retry.topics"),
                "retry topics reorder a record's retries after later records: they need `ordering: none`"
                    .into(),
            );
        }
        for (t, topic) in route.retry.topics.iter().enumerate() {
            if route.from.topics.contains(topic) || *topic == route.dead_letter.to {
                say(
                    format!("routes[{i}].retry.topics[{t}]"),
                    format!(
                        "`{topic}` is a source or the dead-letter topic of this route; a retry topic must be its own"
                    ),
                );
            }
            if let Some(other) = readers.insert(topic, i) {
                say(
                    format!("routes[{i}].retry.topics[{t}]"),
                    format!(
                        "topic `{topic}` is already read by route `{}`; a topic belongs to one route",
                        config.routes[other].name
                    ),
                );
            }
        }
        for (t, topic) in route.from.topics.iter().enumerate() {
            if let Some(other) = readers.insert(topic, i) {
                say(
                    format!("routes[{i}].from.topics[{t}]"),
                    format!(
                        "topic `{topic}` is already read by route `{}`; a topic belongs to one route",
                        config.routes[other].name
                    ),
                );
            }
        }

        if let Some(grpc) = &route.call.grpc {
            check_grpc(grpc, &at("call.grpc"), absent_ok, &mut say);
        }
        match &route.call.http {
            None if route.call.grpc.is_some() => {}
            None => say(at("call"), "say how to call the service: `call: { http: { url: … } }` or `call: { grpc: { endpoint: … } }`".into()),
            Some(_) if route.call.grpc.is_some() => say(at("call"), "give either `http` or `grpc`, not both".into()),
            Some(http) => {
                let probe = crate::call::template::sample(&http.url);
                match reqwest::Url::parse(&probe) {
                    Ok(u) if !u.username().is_empty() || u.password().is_some() => {
                        say(at("call.http.url"), crate::call::http::URL_CREDENTIALS.into())
                    }
                    Ok(u) if matches!(u.scheme(), "http" | "https") => {
                        check_tls(http.tls(), u.scheme() == "https", &at("call.http"), absent_ok, &mut say);
                    }
                    Ok(u) => say(
                        at("call.http.url"),
                        format!(
                            "scheme `{}` is not supported: use http:// or https://",
                            u.scheme()
                        ),
                    ),
                    Err(e) => say(at("call.http.url"), format!("`{}` is not a URL: {e}", http.url)),
                }
                if let Err(e) = crate::call::template::Template::parse(&http.url) {
                    say(at("call.http.url"), e);
                }
                if reqwest::Method::from_bytes(http.method.to_ascii_uppercase().as_bytes()).is_err() {
                    say(
                        at("call.http.method"),
                        format!("`{}` is not an HTTP method", http.method),
                    );
                }
                if http.timeout.0.is_zero() {
                    say(at("call.http.timeout"), "must be above zero, e.g. 5s".into());
                }
                for name in http.headers.keys() {
                    let path = format!("routes[{i}].call.http.headers.{name}");
                    if reqwest::header::HeaderName::from_bytes(name.as_bytes()).is_err() {
                        say(path, "not a valid HTTP header name".into());
                    } else if let Some(why) = set_by_ferry(name, http.format) {
                        say(path, format!("ferry sets `{name}` itself, per request ({why}): remove it"));
                    }
                }
            }
        }

        if let Some(f) = &route.freshness {
            if f.conflate && route.ordering != Ordering::Key {
                say(
                    at("freshness.conflate"),
                    "conflating keeps the newest record of a key: it needs `ordering: key`".into(),
                );
            }
            if f.max_age.is_some_and(|a| a.0.is_zero()) {
                say(at("freshness.max_age"), "must be above zero, e.g. 5s".into());
            }
        }
        let cb = &route.circuit;
        if !(cb.failure_ratio > 0.0 && cb.failure_ratio <= 1.0) {
            say(
                at("circuit.failure_ratio"),
                "a share of calls: above 0 and at most 1, e.g. 0.5".into(),
            );
        }
        if cb.min_calls == 0 {
            say(at("circuit.min_calls"), "must be at least 1".into());
        }
        if cb.window.0.is_zero() || cb.probe_every.0.is_zero() {
            say(
                at("circuit"),
                "`window` and `probe_every` must be above zero".into(),
            );
        }
        let c = &route.concurrency;
        if c.per_partition == 0 {
            say(at("concurrency.per_partition"), "must be at least 1".into());
        }
        if c.total < c.per_partition {
            say(
                at("concurrency.total"),
                format!("is below concurrency.per_partition ({})", c.per_partition),
            );
        }
        if c.max_bytes.0 == 0 {
            say(
                at("concurrency.max_bytes"),
                "must be above zero, e.g. 16MiB".into(),
            );
        }
        if !(c.rate >= 0.0 && c.rate.is_finite()) {
            say(
                at("concurrency.rate"),
                "calls per second: 0 (unlimited) or more".into(),
            );
        }
        let r = &route.retry;
        if r.max_attempts == 0 {
            say(
                at("retry.max_attempts"),
                "must be at least 1 (the first attempt counts)".into(),
            );
        }
        if r.backoff.initial > r.backoff.max {
            say(
                at("retry.backoff.initial"),
                format!("is above retry.backoff.max ({})", r.backoff.max),
            );
        }
        if !(r.backoff.multiplier >= 1.0 && r.backoff.multiplier.is_finite()) {
            say(at("retry.backoff.multiplier"), "must be 1.0 or more".into());
        }

        let mut named: Vec<(String, &String)> = Vec::new();
        for (field, list) in [
            ("from.topics", &route.from.topics),
            ("retry.topics", &route.retry.topics),
            ("reply.topics", &route.reply.topics),
        ] {
            named.extend(
                list.iter()
                    .enumerate()
                    .map(|(t, name)| (format!("routes[{i}].{field}[{t}]"), name)),
            );
        }
        named.extend(route.reply.to.iter().map(|name| (at("reply.to"), name)));
        if !route.dead_letter.to.trim().is_empty() {
            named.push((at("dead_letter.to"), &route.dead_letter.to));
        }
        for (path, name) in named {
            if let Some(why) = topic_name_problem(name) {
                say(path, why);
            }
        }

        let sources = &route.from.topics;
        // A retry topic is read by the route as much as a source is; the dead-letter topic is
        // read by `ferry redrive`, as dead letters.
        let not_for_replies = |topic: &String| {
            if sources.contains(topic) {
                Some("this route's source: replies would be consumed again, forever")
            } else if route.retry.topics.contains(topic) {
                Some("one of this route's retry topics: replies would be consumed again, forever")
            } else if *topic == route.dead_letter.to {
                Some("this route's dead-letter topic: replies would read as dead letters")
            } else {
                None
            }
        };
        if let Some(to) = &route.reply.to {
            if let Some(why) = not_for_replies(to) {
                say(at("reply.to"), format!("`{to}` is also {why}"));
            }
        }
        for (t, topic) in route.reply.topics.iter().enumerate() {
            if let Some(why) = not_for_replies(topic) {
                say(
                    format!("routes[{i}].reply.topics[{t}]"),
                    format!("`{topic}` is also {why}"),
                );
            }
        }
        if route.dead_letter.to.trim().is_empty() {
            say(at("dead_letter.to"), "name the dead-letter topic".into());
        } else if sources.contains(&route.dead_letter.to) {
            say(
                at("dead_letter.to"),
                "the dead-letter topic cannot be a source of the same route".into(),
            );
        }
        for (n, rule) in route.rules.iter().enumerate() {
            let w = &rule.when;
            let conditions = [w.status.is_some(), w.grpc.is_some(), w.error.is_some()]
                .iter()
                .filter(|c| **c)
                .count();
            if conditions == 0 {
                say(
                    format!("routes[{i}].rules[{n}].when"),
                    "give one condition: `status`, `grpc` or `error`".into(),
                );
            }
            if conditions > 1 {
                say(
                    format!("routes[{i}].rules[{n}].when"),
                    "`status`, `grpc` and `error` never hold together; write one rule for each".into(),
                );
            }
            if let Some(code) = &w.grpc {
                if crate::call::grpc::code_from_name(code).is_none() {
                    say(
                        format!("routes[{i}].rules[{n}].when.grpc"),
                        format!(
                            "`{code}` is not a gRPC status code: use a name such as NOT_FOUND or UNAVAILABLE"
                        ),
                    );
                }
            }
        }
    }
    problems
}
