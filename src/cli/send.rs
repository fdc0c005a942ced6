//! `ferry send`: produce test records, one or many, at a rate, or one per JSON line.

use std::io::Read;
use std::time::{Duration, Instant};

use base64::Engine;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};

use super::client::{KafkaArgs, Refused, metadata_of, progress};

#[derive(clap::Args, Debug)]
pub struct SendArgs {
    #[command(flatten)]
    pub kafka: KafkaArgs,
    /// The topic to write to.
    #[arg(short = 't', long)]
    pub topic: String,
    /// The record key; `{i}` is replaced by the record's number (0, 1, …).
    #[arg(short = 'k', long)]
    pub key: Option<String>,
    /// A header, `name=value`; repeatable.
    #[arg(short = 'H', long = "header", value_name = "NAME=VALUE")]
    pub headers: Vec<String>,
    /// Write to this partition (default: by key).
    #[arg(short = 'p', long)]
    pub partition: Option<i32>,
    /// The value: text (`{i}` is replaced by the record's number), `@FILE`, or `-` for stdin.
    /// With `--json-lines`: where the lines come from (default stdin).
    pub value: Option<String>,
    /// Send a tombstone (no value).
    #[arg(long, conflicts_with = "value")]
    pub tombstone: bool,
    /// How many records to send.
    #[arg(long, default_value_t = 1)]
    pub count: u64,
    /// Records per second (0: as fast as the broker takes them).
    #[arg(long, default_value_t = 0.0)]
    pub rate: f64,
    /// One record per input line: `{"key": …, "value": …, "headers": {…}, "partition": …}`; a
    /// value that is not a string is sent as its JSON text. What `ferry tail --json` prints is
    /// taken as it is: bytes that are not text as `key_base64`, `value_base64` and headers
    /// `NAME_base64`; its `topic`, `offset` and `timestamp` are left out (the record goes to
    /// `-t`, and the broker gives it an offset and a time).
    #[arg(long)]
    pub json_lines: bool,
}

/// One record to write.
struct Outgoing {
    key: Option<Vec<u8>>,
    value: Option<Vec<u8>>,
    headers: Headers,
    partition: Option<i32>,
}

/// A record's headers; one may have no value (`null`), as Kafka allows.
type Headers = Vec<(String, Option<Vec<u8>>)>;

pub async fn send(args: SendArgs) -> i32 {
    match run(args).await {
        Ok(code) => code,
        Err(r) => {
            eprintln!("error: {}", r.message);
            r.code
        }
    }
}

fn refused(code: i32, message: String) -> Refused {
    Refused { code, message }
}

fn read_source(source: Option<&str>) -> Result<Vec<u8>, Refused> {
    match source {
        None | Some("-") => {
            let mut buf = Vec::new();
            std::io::stdin()
                .read_to_end(&mut buf)
                .map_err(|e| refused(1, format!("cannot read stdin: {e}")))?;
            Ok(buf)
        }
        Some(s) => match s.strip_prefix('@') {
            Some(path) => std::fs::read(path).map_err(|e| refused(1, format!("cannot read {path}: {e}"))),
            None => Ok(s.as_bytes().to_vec()),
        },
    }
}

fn parse_headers(raw: &[String]) -> Result<Headers, Refused> {
    raw.iter()
        .map(|h| {
            h.split_once('=')
                .map(|(k, v)| (k.to_string(), Some(v.as_bytes().to_vec())))
                .ok_or_else(|| refused(2, format!("-H {h}: write a header as name=value")))
        })
        .collect()
}

/// The records of `--json-lines` input; a bad line is an error naming its line number.
fn json_lines(input: &[u8]) -> Result<Vec<Outgoing>, Refused> {
    let text = std::str::from_utf8(input).map_err(|e| refused(1, format!("the input is not UTF-8: {e}")))?;
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        // Every line is read before the first is sent: a bad one stops the whole input.
        let bad = |why: String| refused(1, format!("line {}: {why}; nothing was sent", n + 1));
        let v: serde_json::Value = serde_json::from_str(line).map_err(|e| bad(format!("not JSON: {e}")))?;
        let obj = v
            .as_object()
            .ok_or_else(|| bad("expected an object with key, value, headers".into()))?;
        for k in obj.keys() {
            if !matches!(
                k.as_str(),
                "key" | "key_base64" | "value" | "value_base64" | "headers" | "partition"
                    // What `ferry tail --json` prints besides, and `send` leaves to the broker.
                    | "topic" | "offset" | "timestamp"
            ) {
                return Err(bad(format!(
                    "unknown field `{k}`; expected key, value, headers, partition (or key_base64, value_base64)"
                )));
            }
        }
        let text_of = |v: &serde_json::Value| match v {
            serde_json::Value::String(s) => s.clone().into_bytes(),
            other => other.to_string().into_bytes(),
        };
        let base64 = |field: &str, v: &serde_json::Value| {
            v.as_str()
                .and_then(|t| base64::engine::general_purpose::STANDARD.decode(t).ok())
                .ok_or_else(|| bad(format!("`{field}` must be a base64 string")))
        };
        // `name` as text, or `name_base64` as bytes; not both.
        let bytes = |o: &serde_json::Map<String, serde_json::Value>, name: &str| {
            let encoded = format!("{name}_base64");
            match (
                o.get(name).filter(|v| !v.is_null()),
                o.get(&encoded).filter(|v| !v.is_null()),
            ) {
                (Some(_), Some(_)) => Err(bad(format!("give `{name}` or `{encoded}`, not both"))),
                (Some(v), None) => Ok(Some(text_of(v))),
                (None, Some(v)) => base64(&encoded, v).map(Some),
                (None, None) => Ok(None),
            }
        };
        let headers = match obj.get("headers") {
            None | Some(serde_json::Value::Null) => Vec::new(),
            Some(serde_json::Value::Object(h)) => h
                .iter()
                .map(|(k, v)| match (k.strip_suffix("_base64"), v) {
                    // A header without a value, as `tail --json` prints it.
                    (_, serde_json::Value::Null) => Ok((k.clone(), None)),
                    (Some(name), v) => Ok((name.to_string(), Some(base64(&format!("headers.{k}"), v)?))),
                    (None, v) => Ok((k.clone(), Some(text_of(v)))),
                })
                .collect::<Result<_, Refused>>()?,
            Some(_) => return Err(bad("`headers` must be an object of name: value".into())),
        };
        out.push(Outgoing {
            key: bytes(obj, "key")?,
            value: bytes(obj, "value")?,
            headers,
            partition: match obj.get("partition") {
                None | Some(serde_json::Value::Null) => None,
                Some(p) => Some(
                    p.as_i64()
                        .and_then(|p| i32::try_from(p).ok())
                        .ok_or_else(|| bad("`partition` must be a number".into()))?,
                ),
            },
        });
    }
    Ok(out)
}

async fn run(args: SendArgs) -> Result<i32, Refused> {
    let config = args.kafka.load()?;
    let mut client = args.kafka.client(config.as_ref())?;
    client.set("enable.idempotence", "true").set("acks", "all");
    let producer: FutureProducer = client
        .create()
        .map_err(|e| refused(1, format!("cannot create the producer: {e}")))?;
    // librdkafka waits up to its message timeout (five minutes) for a broker it cannot reach
    // or a topic that is not there, saying nothing meanwhile: ask first, briefly, as tail does.
    let metadata = metadata_of(producer.client(), &client, &args.topic)?;
    // Only what will not change by itself: a broker that creates topics on first use answers
    // a new one's first request with LEADER_NOT_AVAILABLE, and then takes the record.
    use rdkafka::error::RDKafkaErrorCode::{TopicAuthorizationFailed, UnknownTopicOrPartition};
    if let Some(e) = metadata
        .topics()
        .iter()
        .find(|t| t.name() == args.topic)
        .and_then(|t| t.error())
        .map(rdkafka::error::RDKafkaErrorCode::from)
        .filter(|e| matches!(e, UnknownTopicOrPartition | TopicAuthorizationFailed))
    {
        return Err(refused(1, format!("cannot write to topic `{}`: {e}", args.topic)));
    }
    // A partition the topic does not have fails each record with librdkafka's bare
    // `UnknownPartition`: said once, before anything is sent.
    let partitions = metadata
        .topics()
        .iter()
        .find(|t| t.name() == args.topic && t.error().is_none())
        .map(|t| t.partitions().len())
        .filter(|n| *n > 0);
    let check_partition = |p: Option<i32>, what: &str| match (p, partitions) {
        (Some(p), Some(n)) if p < 0 || p as usize >= n => Err(refused(
            2,
            format!(
                "{what}: topic `{}` has {n} partition{} (0 to {}); nothing was sent",
                args.topic,
                if n == 1 { "" } else { "s" },
                n - 1
            ),
        )),
        _ => Ok(()),
    };
    check_partition(
        args.partition,
        &format!("-p {}", args.partition.unwrap_or_default()),
    )?;
    let headers = parse_headers(&args.headers)?;
    let records: Box<dyn Iterator<Item = Outgoing>> = if args.json_lines {
        let lines = json_lines(&read_source(args.value.as_deref())?).map_err(|e| {
            // `--json-lines batch.jsonl` sends the name itself, as any value without `@` is.
            match args.value.as_deref() {
                Some(v) if !v.starts_with('@') && v != "-" && std::path::Path::new(v).is_file() => refused(
                    e.code,
                    format!("{}; to read the file `{v}`, write @{v}", e.message),
                ),
                _ => e,
            }
        })?;
        for (n, r) in lines.iter().enumerate() {
            check_partition(
                r.partition,
                &format!(
                    "record {} asks for partition {}",
                    n + 1,
                    r.partition.unwrap_or_default()
                ),
            )?;
        }
        Box::new(lines.into_iter().map(move |mut r| {
            r.headers.extend(headers.clone());
            r.partition = r.partition.or(args.partition);
            r
        }))
    } else {
        let template = match (&args.value, args.tombstone) {
            (_, true) => None,
            (Some(v), false) => Some(read_source(Some(v))?),
            (None, false) => {
                return Err(refused(
                    2,
                    "give a VALUE, @FILE or - (stdin), or --tombstone, or --json-lines".into(),
                ));
            }
        };
        let numbered = |text: &[u8], i: u64| -> Vec<u8> {
            match std::str::from_utf8(text) {
                Ok(t) if t.contains("{i}") => t.replace("{i}", &i.to_string()).into_bytes(),
                _ => text.to_vec(),
            }
        };
        let key = args.key.clone();
        let partition = args.partition;
        Box::new((0..args.count).map(move |i| {
            Outgoing {
                key: key
                    .as_ref()
                    .map(|k| k.replace("{i}", &i.to_string()).into_bytes()),
                value: template.as_ref().map(|t| numbered(t, i)),
                headers: headers.clone(),
                partition,
            }
        }))
    };

    let total = if args.json_lines { None } else { Some(args.count) };
    let bar = progress(total.unwrap_or(0), "records");
    let started = Instant::now();
    let interval = (args.rate > 0.0).then(|| Duration::from_secs_f64(1.0 / args.rate));
    let mut in_flight = futures::stream::FuturesUnordered::new();
    let mut tally = Tally::default();
    use futures::StreamExt;
    for (i, r) in records.enumerate() {
        if let Some(every) = interval {
            let due = tokio::time::Instant::from_std(started + every.mul_f64(i as f64));
            // A send reaches librdkafka when its future is first polled: the ones outstanding
            // are polled while the next is not yet due, or they would all leave in a burst at
            // the end (or every 1 000 records).
            loop {
                tokio::select! {
                    () = tokio::time::sleep_until(due) => break,
                    Some(result) = in_flight.next(), if !in_flight.is_empty() => {
                        tally.settle(result, &bar)
                    }
                }
            }
        }
        let mut hs = OwnedHeaders::new();
        for (k, v) in &r.headers {
            hs = hs.insert(Header {
                key: k,
                value: v.as_deref(),
            });
        }
        let topic = args.topic.clone();
        let producer = producer.clone();
        in_flight.push(async move {
            let mut record: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(&topic).headers(hs);
            if let Some(k) = &r.key {
                record = record.key(k.as_slice());
            }
            if let Some(v) = &r.value {
                record = record.payload(v.as_slice());
            }
            if let Some(p) = r.partition {
                record = record.partition(p);
            }
            let size = r.key.as_ref().map_or(0, Vec::len) + r.value.as_ref().map_or(0, Vec::len);
            producer
                .send(record, Duration::from_secs(30))
                .await
                .map_err(|(e, _)| too_large_hint(e, size))
        });
        // Keep a bounded number of sends outstanding.
        while in_flight.len() >= 1000 {
            if let Some(result) = in_flight.next().await {
                tally.settle(result, &bar);
            }
        }
    }
    while let Some(result) = in_flight.next().await {
        tally.settle(result, &bar);
    }
    let Tally {
        sent,
        failed,
        last,
        first_error,
    } = tally;
    let _ = producer.flush(Duration::from_secs(30));
    bar.finish_and_clear();
    let took = started.elapsed().as_secs_f64();
    match (sent, last) {
        (1, Some((p, o))) if failed == 0 => println!("sent 1 record to {}/{p}@{o}", args.topic),
        _ => println!(
            "sent {sent} records to {} in {took:.2}s ({:.0}/s){}",
            args.topic,
            sent as f64 / took.max(1e-9),
            if failed > 0 {
                format!("; {failed} failed")
            } else {
                String::new()
            }
        ),
    }
    if let Some(e) = first_error {
        eprintln!("error: {failed} records were not written; the first error: {e}");
        return Ok(1);
    }
    Ok(0)
}

/// The error of one send; a record too large says which limit and how to raise it, since
/// librdkafka's text blames the broker for its own `message.max.bytes` (1 000 000 by default).
fn too_large_hint(e: rdkafka::error::KafkaError, size: usize) -> String {
    if e.rdkafka_error_code() == Some(rdkafka::error::RDKafkaErrorCode::MessageSizeTooLarge) {
        format!(
            "{e}: the record is {size} bytes; the producer's limit is message.max.bytes (1000000 unless -X sets it), the broker's and the topic's are their own (max.message.bytes); to raise ferry's, add -X message.max.bytes={}",
            size + 1024
        )
    } else {
        e.to_string()
    }
}

/// What the sends came to.
#[derive(Default)]
struct Tally {
    sent: u64,
    failed: u64,
    /// Where the last record written went (partition, offset).
    last: Option<(i32, i64)>,
    first_error: Option<String>,
}

impl Tally {
    fn settle(
        &mut self,
        result: Result<rdkafka::producer::future_producer::Delivery, String>,
        bar: &indicatif::ProgressBar,
    ) {
        match result {
            Ok(d) => {
                self.sent += 1;
                self.last = Some((d.partition, d.offset));
            }
            Err(e) => {
                self.failed += 1;
                self.first_error.get_or_insert(e);
            }
        }
        bar.inc(1);
    }
}
