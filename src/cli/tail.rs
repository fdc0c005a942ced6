//! `ferry tail`: print a topic's records with key, headers, partition and offset.
//!
//! Reads every partition directly (no consumer group, nothing committed), from the end or from
//! the beginning, until `-n` records or Ctrl-C.

use std::time::Duration;

use base64::Engine;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{BorrowedMessage, Headers, Message};
use rdkafka::{Offset, TopicPartitionList};

use super::client::{KafkaArgs, Refused};

#[derive(clap::Args, Debug)]
pub struct TailArgs {
    #[command(flatten)]
    pub kafka: KafkaArgs,
    /// The topic to read.
    #[arg(short = 't', long)]
    pub topic: String,
    /// Start at the oldest record instead of waiting for new ones.
    #[arg(long)]
    pub from_beginning: bool,
    /// Stop after this many records.
    #[arg(short = 'n', long)]
    pub count: Option<u64>,
    /// One JSON object per line instead of the readable form.
    #[arg(long)]
    pub json: bool,
}

pub async fn tail(args: TailArgs) -> i32 {
    let result = tokio::task::spawn_blocking(move || run(&args)).await;
    match result {
        Ok(Ok(())) => 0,
        Ok(Err(r)) => {
            eprintln!("error: {}", r.message);
            r.code
        }
        Err(e) => {
            eprintln!("error: {e}");
            1
        }
    }
}

fn run(args: &TailArgs) -> Result<(), Refused> {
    let config = args.kafka.load()?;
    let mut client = args.kafka.client(config.as_ref())?;
    // A group id is required by librdkafka's consumer; nothing is ever committed with it.
    client
        .set("group.id", "ferry-tail")
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false");
    let consumer: BaseConsumer = client.create().map_err(|e| Refused {
        code: 1,
        message: format!("cannot create the consumer: {e}"),
    })?;
    let metadata = super::client::metadata_of(consumer.client(), &client, &args.topic)?;
    let partitions: Vec<i32> = metadata
        .topics()
        .iter()
        .filter(|t| t.name() == args.topic && t.error().is_none())
        .flat_map(|t| t.partitions().iter().map(|p| p.id()))
        .collect();
    if partitions.is_empty() {
        return Err(Refused {
            code: 1,
            message: format!("topic `{}` does not exist or has no partitions", args.topic),
        });
    }
    let start = if args.from_beginning {
        Offset::Beginning
    } else {
        Offset::End
    };
    let mut tpl = TopicPartitionList::new();
    for p in &partitions {
        let _ = tpl.add_partition_offset(&args.topic, *p, start);
    }
    consumer.assign(&tpl).map_err(|e| Refused {
        code: 1,
        message: format!("cannot read `{}`: {e}", args.topic),
    })?;
    let mut printed = 0;
    while args.count.is_none_or(|n| printed < n) {
        match consumer.poll(Duration::from_millis(200)) {
            Some(Ok(m)) => {
                println!("{}", if args.json { json(&m) } else { pretty(&m) });
                printed += 1;
            }
            Some(Err(e)) => eprintln!("warning: {e}"),
            None => {}
        }
    }
    Ok(())
}

fn text(bytes: &[u8]) -> Option<&str> {
    std::str::from_utf8(bytes).ok()
}

fn headers(m: &BorrowedMessage<'_>) -> Vec<(String, Option<Vec<u8>>)> {
    m.headers()
        .map(|hs| {
            hs.iter()
                .map(|h| (h.key.to_string(), h.value.map(<[u8]>::to_vec)))
                .collect()
        })
        .unwrap_or_default()
}

/// `topic/partition@offset  key=…  time`, then the headers and the value, indented.
fn pretty(m: &BorrowedMessage<'_>) -> String {
    let b64 = |b: &[u8]| base64::engine::general_purpose::STANDARD.encode(b);
    let shown = |b: &[u8]| text(b).map_or_else(|| format!("base64:{}", b64(b)), str::to_string);
    let mut out = format!("{}/{}@{}", m.topic(), m.partition(), m.offset());
    match m.key() {
        Some(k) => out.push_str(&format!("  key={}", shown(k))),
        None => out.push_str("  key=null"),
    }
    if let Some(ms) = m.timestamp().to_millis() {
        out.push_str(&format!("  {}", crate::call::http::rfc3339(ms)));
    }
    for (k, v) in headers(m) {
        out.push_str(&format!("\n  {k}: {}", v.as_deref().map_or("null".into(), shown)));
    }
    match m.payload() {
        Some(v) => out.push_str(&format!("\n  {}", shown(v))),
        None => out.push_str("\n  (tombstone)"),
    }
    out
}

/// One JSON object: text as strings, anything else as `*_base64`.
fn json(m: &BorrowedMessage<'_>) -> String {
    let mut o = serde_json::Map::new();
    o.insert("topic".into(), m.topic().into());
    o.insert("partition".into(), m.partition().into());
    o.insert("offset".into(), m.offset().into());
    o.insert("timestamp".into(), m.timestamp().to_millis().into());
    let put =
        |o: &mut serde_json::Map<String, serde_json::Value>, name: &str, bytes: Option<&[u8]>| match bytes {
            None => {
                o.insert(name.into(), serde_json::Value::Null);
            }
            Some(b) => match text(b) {
                Some(t) => {
                    o.insert(name.into(), t.into());
                }
                None => {
                    o.insert(
                        format!("{name}_base64"),
                        base64::engine::general_purpose::STANDARD.encode(b).into(),
                    );
                }
            },
        };
    put(&mut o, "key", m.key());
    let mut hs = serde_json::Map::new();
    for (k, v) in headers(m) {
        put(&mut hs, &k, v.as_deref());
    }
    o.insert("headers".into(), hs.into());
    put(&mut o, "value", m.payload());
    serde_json::Value::Object(o).to_string()
}
