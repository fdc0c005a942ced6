//! The owned record that travels from the consumer through the call to its outcome.

use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use rdkafka::Message;
use rdkafka::message::{BorrowedMessage, Headers};

use crate::offsets::Lease;

/// The record header that carries the idempotency key through retry topics and re-drive.
pub const IDEMPOTENCY_KEY_HEADER: &str = "ferry.idempotency_key";

/// On a record in a retry topic: how many retry topics it has passed through (1 in the first).
pub const RETRY_HOP_HEADER: &str = "ferry.retry.hop";

/// Lineage: the topic a record first arrived on.
pub const SOURCE_TOPIC_HEADER: &str = "ferry.source.topic";

/// Lineage: the timestamp a record first arrived with (milliseconds since the epoch).
pub const SOURCE_TIMESTAMP_HEADER: &str = "ferry.source.timestamp";

/// On a record in a retry topic: not to be tried before this time (milliseconds since the epoch).
pub const NOT_BEFORE_HEADER: &str = "ferry.retry.not_before";

/// One consumed record, owned, with the lease of the partition it came from.
#[derive(Debug, Clone)]
pub struct Record {
    pub topic: Arc<str>,
    pub partition: i32,
    pub offset: i64,
    /// Milliseconds since the epoch, when the broker gave one.
    pub timestamp_ms: Option<i64>,
    pub key: Option<Bytes>,
    /// `None` for a tombstone.
    pub value: Option<Bytes>,
    pub headers: Vec<(String, Bytes)>,
    /// Index of the route that reads this record's topic.
    pub route: usize,
    /// When ferry took it from Kafka.
    pub taken: std::time::SystemTime,
    /// Ties the record to one assignment of its partition; a late result after a revoke is
    /// recognised by it and discarded.
    pub lease: Lease,
}

impl Record {
    pub fn from_message(msg: &BorrowedMessage<'_>, topic: Arc<str>, route: usize, lease: Lease) -> Self {
        // The key, value and header values are copied into one buffer and share it: each
        // `Bytes` of its own was an allocation, and another at its first clone (a key lane, the
        // call's body, the reply each clone one) to share it.
        let size = msg.key_len()
            + msg.payload_len()
            + msg
                .headers()
                .map_or(0, |hs| hs.iter().map(|h| h.value.map_or(0, <[u8]>::len)).sum());
        let mut bytes = BytesMut::with_capacity(size);
        let mut copy = |b: &[u8]| {
            bytes.extend_from_slice(b);
            bytes.split().freeze()
        };
        let key = msg.key().map(&mut copy);
        let value = msg.payload().map(&mut copy);
        let headers = msg
            .headers()
            .map(|hs| {
                hs.iter()
                    .map(|h| (h.key.to_string(), h.value.map(&mut copy).unwrap_or_default()))
                    .collect()
            })
            .unwrap_or_default();
        Record {
            topic,
            partition: msg.partition(),
            offset: msg.offset(),
            timestamp_ms: msg.timestamp().to_millis(),
            key,
            value,
            headers,
            route,
            taken: std::time::SystemTime::now(),
            lease,
        }
    }

    /// The first header of that name (case-sensitive, as Kafka header names are).
    pub fn header(&self, name: &str) -> Option<&Bytes> {
        self.headers.iter().find(|(k, _)| k == name).map(|(_, v)| v)
    }

    /// `{topic}/{partition}/{offset}` of the record's first consumption: taken from the
    /// `ferry.idempotency_key` header when an earlier hop set it.
    pub fn idempotency_key(&self) -> String {
        self.with_idempotency_key(str::to_string)
    }

    /// [`Record::idempotency_key`] lent to `f`, formatted on the stack when it fits: a call
    /// sends it with every attempt.
    pub fn with_idempotency_key<R>(&self, f: impl FnOnce(&str) -> R) -> R {
        if let Some(k) = self
            .header(IDEMPOTENCY_KEY_HEADER)
            .and_then(|v| std::str::from_utf8(v).ok())
            .filter(|k| !k.is_empty())
        {
            return f(k);
        }
        formatted(
            format_args!("{}/{}/{}", self.topic, self.partition, self.offset),
            f,
        )
    }

    fn number(&self, header: &str) -> Option<i64> {
        std::str::from_utf8(self.header(header)?)
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// The topic the record first arrived on: for a record from a retry topic, the one its
    /// lineage names (`ferry.source.topic`).
    pub fn origin_topic(&self) -> &str {
        self.lineage(SOURCE_TOPIC_HEADER)
            .and_then(|v| std::str::from_utf8(v).ok())
            .unwrap_or(&self.topic)
    }

    /// The timestamp of the record as it first arrived: for a record from a retry topic, the
    /// one its lineage carries (`ferry.source.timestamp`), not the retry topic's.
    pub fn origin_timestamp_ms(&self) -> Option<i64> {
        if self.retry_hop() > 0 {
            if let Some(ts) = self.number(SOURCE_TIMESTAMP_HEADER) {
                return Some(ts);
            }
        }
        self.timestamp_ms
    }

    /// A lineage header, which only a record from a retry topic carries as ferry's own.
    fn lineage(&self, name: &str) -> Option<&Bytes> {
        (self.retry_hop() > 0).then(|| self.header(name)).flatten()
    }

    /// How many retry topics this record has passed through; 0 for a record from a source topic.
    pub fn retry_hop(&self) -> usize {
        self.number(RETRY_HOP_HEADER).map_or(0, |h| h.max(0) as usize)
    }

    /// When a record from a retry topic may be tried again.
    pub fn not_before_ms(&self) -> Option<i64> {
        if self.retry_hop() == 0 {
            return None;
        }
        self.number(NOT_BEFORE_HEADER)
    }

    /// The attempts made before this record reached its retry topic, and when the first was
    /// (milliseconds since the epoch); none for a record from a source topic.
    pub fn earlier_attempts(&self) -> Option<(u32, i64)> {
        if self.retry_hop() == 0 {
            return None;
        }
        let count = self.number("ferry.attempts")?.clamp(0, i64::from(u32::MAX)) as u32;
        Some((count, self.number("ferry.first_attempt_at")?))
    }

    /// Bytes this record holds in memory.
    pub fn size(&self) -> usize {
        self.key.as_ref().map_or(0, |k| k.len())
            + self.value.as_ref().map_or(0, |v| v.len())
            + self.headers.iter().map(|(k, v)| k.len() + v.len()).sum::<usize>()
    }
}

/// `args` formatted and lent to `f`: on the stack when they fit in 128 bytes (a topic name may
/// take 249), else in a string. For the text ferry makes for every record (idempotency keys,
/// header values), where a string of its own was an allocation each time.
pub(crate) fn formatted<R>(args: std::fmt::Arguments<'_>, f: impl FnOnce(&str) -> R) -> R {
    let mut stack = [0u8; 128];
    let written = {
        let mut rest = &mut stack[..];
        std::io::Write::write_fmt(&mut rest, args)
            .ok()
            .map(|()| 128 - rest.len())
    };
    match written.and_then(|n| std::str::from_utf8(&stack[..n]).ok()) {
        Some(text) => f(text),
        None => f(&std::fmt::format(args)),
    }
}

#[cfg(test)]
impl Record {
    /// Offset 42 of `topic`/3 with `headers`, no key and no value, leased from a tracker of
    /// its own: for unit tests.
    pub(crate) fn for_test(topic: &str, headers: Vec<(String, Bytes)>) -> Record {
        let tracker = crate::offsets::Tracker::new();
        let tp: crate::offsets::Tp = (topic.into(), 3);
        tracker.assign(&[(tp.clone(), 0)]);
        let lease = tracker.track(&tp, 42, 0).expect("assigned");
        Record {
            topic: topic.into(),
            partition: 3,
            offset: 42,
            timestamp_ms: None,
            key: None,
            value: None,
            headers,
            route: 0,
            taken: std::time::SystemTime::now(),
            lease,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(topic: &str, headers: Vec<(String, Bytes)>) -> Record {
        Record::for_test(topic, headers)
    }

    #[test]
    fn the_idempotency_key_is_the_first_consumption_or_the_header_an_earlier_hop_set() {
        assert_eq!(record("orders", vec![]).idempotency_key(), "orders/3/42");
        // Kafka allows topic names of 249 characters: too long for the stack buffer.
        let long = "t".repeat(249);
        assert_eq!(record(&long, vec![]).idempotency_key(), format!("{long}/3/42"));
        let hop = vec![(
            IDEMPOTENCY_KEY_HEADER.to_string(),
            Bytes::from_static(b"orders/1/7"),
        )];
        assert_eq!(record("orders.retry.1", hop).idempotency_key(), "orders/1/7");
        let empty = vec![(IDEMPOTENCY_KEY_HEADER.to_string(), Bytes::new())];
        assert_eq!(record("orders", empty).idempotency_key(), "orders/3/42");
    }
}
