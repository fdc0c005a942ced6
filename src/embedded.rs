//! The embedded broker: librdkafka's mock cluster, for `ferry dev broker`, `ferry demo` and tests.
//!
//! It speaks the Kafka protocol on loopback, supports consumer groups, commits and idempotent
//! produce, and keeps everything in memory for as long as this value lives.

use rdkafka::ClientConfig;
use rdkafka::error::KafkaError;
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{BaseProducer, DefaultProducerContext, Producer};

/// A running embedded broker.
pub struct EmbeddedBroker {
    /// The mock cluster lives inside this client's librdkafka instance.
    host: BaseProducer,
    bootstrap: String,
}

impl EmbeddedBroker {
    /// Starts a cluster of `brokers` brokers on random loopback ports.
    pub fn start(brokers: u32) -> Result<Self, KafkaError> {
        let host: BaseProducer = ClientConfig::new()
            .set("test.mock.num.brokers", brokers.to_string())
            .set("log_level", "3")
            .create()?;
        let bootstrap = host
            .client()
            .mock_cluster()
            .map(|m| m.bootstrap_servers())
            .ok_or_else(|| KafkaError::MockCluster(rdkafka::types::RDKafkaErrorCode::Fail))?;
        // The mock waits 3 s before the first rebalance of a group, like a real broker's
        // group.initial.rebalance.delay.ms; local work wants it at once.
        unsafe {
            let cluster = rdkafka_sys::rd_kafka_handle_mock_cluster(host.client().native_ptr());
            if !cluster.is_null() {
                rdkafka_sys::rd_kafka_mock_group_initial_rebalance_delay_ms(cluster, 0);
            }
        }
        Ok(EmbeddedBroker { host, bootstrap })
    }

    /// The `bootstrap.servers` string.
    pub fn bootstrap_servers(&self) -> &str {
        &self.bootstrap
    }

    pub fn create_topic(&self, name: &str, partitions: i32) -> Result<(), KafkaError> {
        self.mock()?.create_topic(name, partitions, 1)
    }

    /// The mock cluster, for error injection in tests.
    pub fn mock(&self) -> Result<MockCluster<'_, DefaultProducerContext>, KafkaError> {
        self.host
            .client()
            .mock_cluster()
            .ok_or(KafkaError::MockCluster(rdkafka::types::RDKafkaErrorCode::Fail))
    }
}

#[cfg(test)]
mod tests {
    //! The protocol spoken by hand, to drive the mock cluster where librdkafka's client only
    //! goes by accident (a request sent again on a new connection while the first waits), and to
    //! see its answers as they are.

    use std::io::{Read, Write};
    use std::net::TcpStream;
    use std::time::Duration;

    use rdkafka::ClientConfig;
    use rdkafka::producer::{BaseProducer, BaseRecord, Producer};

    use super::EmbeddedBroker;

    const FETCH: i16 = 1;
    const JOIN_GROUP: i16 = 11;
    const SYNC_GROUP: i16 = 14;
    const API_VERSIONS: i16 = 18;

    fn string(buf: &mut Vec<u8>, s: &str) {
        buf.extend_from_slice(&(s.len() as i16).to_be_bytes());
        buf.extend_from_slice(s.as_bytes());
    }

    fn bytes(buf: &mut Vec<u8>, b: &[u8]) {
        buf.extend_from_slice(&(b.len() as i32).to_be_bytes());
        buf.extend_from_slice(b);
    }

    /// Sends a version 0 request and leaves the answer to `answer`.
    fn send(conn: &mut TcpStream, api_key: i16, body: &[u8]) {
        send_version(conn, api_key, 0, body);
    }

    fn send_version(conn: &mut TcpStream, api_key: i16, version: i16, body: &[u8]) {
        let mut request = Vec::new();
        request.extend_from_slice(&api_key.to_be_bytes());
        request.extend_from_slice(&version.to_be_bytes());
        request.extend_from_slice(&1i32.to_be_bytes());
        string(&mut request, "by-hand");
        request.extend_from_slice(body);
        conn.write_all(&(request.len() as i32).to_be_bytes()).unwrap();
        conn.write_all(&request).unwrap();
    }

    /// The answer's body, after its size and correlation id.
    fn answer(conn: &mut TcpStream) -> Vec<u8> {
        let mut size = [0u8; 4];
        conn.read_exact(&mut size).unwrap();
        let mut body = vec![0u8; i32::from_be_bytes(size) as usize];
        conn.read_exact(&mut body).unwrap();
        body.split_off(4)
    }

    /// The first answer on any of `conns` (which one, and its body), for requests whose order the
    /// broker may not read them in: it reads its connections in its own order.
    fn first_answer(conns: &mut [&mut TcpStream]) -> (usize, Vec<u8>) {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            for (i, conn) in conns.iter_mut().enumerate() {
                conn.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
                let ready = conn.peek(&mut [0u8; 1]).is_ok_and(|n| n > 0);
                conn.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
                if ready {
                    return (i, answer(conn));
                }
            }
            assert!(std::time::Instant::now() < deadline, "no answer in 20 s");
        }
    }

    struct Reader<'a>(&'a [u8]);

    impl<'a> Reader<'a> {
        fn slice(&mut self, n: usize) -> &'a [u8] {
            let (v, rest) = self.0.split_at(n);
            self.0 = rest;
            v
        }
        fn array<const N: usize>(&mut self) -> [u8; N] {
            self.slice(N).try_into().unwrap()
        }
        fn i16(&mut self) -> i16 {
            i16::from_be_bytes(self.array())
        }
        fn i32(&mut self) -> i32 {
            i32::from_be_bytes(self.array())
        }
        fn i64(&mut self) -> i64 {
            i64::from_be_bytes(self.array())
        }
        fn string(&mut self) -> String {
            let n = self.i16() as usize;
            String::from_utf8(self.slice(n).to_vec()).unwrap()
        }
        fn bytes(&mut self) -> &'a [u8] {
            let n = self.i32() as usize;
            self.slice(n)
        }
    }

    fn connect(broker: &EmbeddedBroker) -> TcpStream {
        let conn = TcpStream::connect(broker.bootstrap_servers()).unwrap();
        conn.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        conn
    }

    fn join(conn: &mut TcpStream, group: &str, member: &str) {
        join_for(conn, group, member, 6000);
    }

    fn join_for(conn: &mut TcpStream, group: &str, member: &str, session_timeout_ms: i32) {
        let mut body = Vec::new();
        string(&mut body, group);
        body.extend_from_slice(&session_timeout_ms.to_be_bytes());
        string(&mut body, member);
        string(&mut body, "consumer");
        body.extend_from_slice(&1i32.to_be_bytes());
        string(&mut body, "range");
        bytes(&mut body, b"");
        send(conn, JOIN_GROUP, &body);
    }

    /// (generation, leader, member) from a JoinGroup answer.
    fn joined(conn: &mut TcpStream) -> (i32, String, String) {
        let body = answer(conn);
        let mut r = Reader(&body);
        assert_eq!(r.i16(), 0, "JoinGroup answered an error");
        let generation = r.i32();
        let _protocol = r.string();
        (generation, r.string(), r.string())
    }

    fn sync(conn: &mut TcpStream, group: &str, generation: i32, member: &str, assignments: &[&str]) {
        let mut body = Vec::new();
        string(&mut body, group);
        body.extend_from_slice(&generation.to_be_bytes());
        string(&mut body, member);
        body.extend_from_slice(&(assignments.len() as i32).to_be_bytes());
        for m in assignments {
            string(&mut body, m);
            bytes(&mut body, b"assignment");
        }
        send(conn, SYNC_GROUP, &body);
    }

    /// A client that gave up on its connection while its SyncGroup waited for the leader (a
    /// request on it timed out, say) sends it again on a new one before the broker saw the old
    /// one close: librdkafka's mock cluster asserted and took the whole process down.
    #[test]
    fn a_member_that_syncs_again_on_a_new_connection_is_answered_once() {
        let broker = EmbeddedBroker::start(1).unwrap();
        let group = "synced-twice";
        let (mut a, mut b) = (connect(&broker), connect(&broker));
        // `a` forms the group alone; `b` joining makes it rejoin, into one generation with `b`.
        join(&mut a, group, "");
        let (_, _, me_a) = joined(&mut a);
        join(&mut b, group, "");
        join(&mut a, group, &me_a);
        let (generation, leader, _) = joined(&mut a);
        let (_, _, me_b) = joined(&mut b);
        let (mut leader_conn, follower, mut follower_conn) = if leader == me_a {
            (a, me_b, b)
        } else {
            (b, me_a, a)
        };

        // The follower's SyncGroup waits for the leader's; it sends it again meanwhile.
        sync(&mut follower_conn, group, generation, &follower, &[]);
        let mut again = connect(&broker);
        sync(&mut again, group, generation, &follower, &[]);
        // Both are in before the leader's completes the sync.
        std::thread::sleep(Duration::from_millis(500));
        sync(
            &mut leader_conn,
            group,
            generation,
            &leader,
            &[&leader, &follower],
        );

        assert_eq!(Reader(&answer(&mut leader_conn)).i16(), 0, "the leader is synced");
        let (answered, body) = first_answer(&mut [&mut follower_conn, &mut again]);
        assert_eq!(Reader(&body).i16(), 0, "the follower is synced");
        // The connection given up on is read again: its close is seen, and so is anything sent.
        let old = if answered == 0 {
            &mut again
        } else {
            &mut follower_conn
        };
        send(old, API_VERSIONS, &[]);
        assert_eq!(Reader(&answer(old)).i16(), 0, "the old connection is answered");
    }

    /// The same for JoinGroup: a member joining again on a new connection while its first join
    /// waits for the others.
    #[test]
    fn a_member_that_joins_again_on_a_new_connection_is_answered_once() {
        let broker = EmbeddedBroker::start(1).unwrap();
        let group = "joined-twice";
        let (mut a, mut b, mut c) = (connect(&broker), connect(&broker), connect(&broker));
        join(&mut a, group, "");
        let (_, _, me_a) = joined(&mut a);
        join(&mut c, group, "");
        join(&mut a, group, &me_a);
        let (generation, _, _) = joined(&mut a);
        let (_, _, me_c) = joined(&mut c);

        // `b` joining starts a rebalance that waits for `a` and `c` to join again; `a` does,
        // twice, before `c` does. The broker reads its connections in its own order: a pause
        // keeps the requests in the order they are sent.
        let pause = || std::thread::sleep(Duration::from_millis(300));
        join(&mut b, group, "");
        pause();
        join(&mut a, group, &me_a);
        pause();
        let mut again = connect(&broker);
        join(&mut again, group, &me_a);
        pause();
        join(&mut c, group, &me_c);

        let (next, _, me) = joined(&mut again);
        assert_eq!(me, me_a);
        assert!(next > generation, "a new generation: {next} after {generation}");
        joined(&mut b);
        joined(&mut c);
        // The connection given up on is read again (a blocked one never is: its close would
        // never be seen, nor anything sent on it).
        send(&mut a, API_VERSIONS, &[]);
        assert_eq!(Reader(&answer(&mut a)).i16(), 0, "the old connection is answered");
    }

    /// A Fetch (version 4) of `topic`'s partition 0 from offset 0, waiting at most `max_wait_ms`
    /// for `min_bytes`, with at most `partition_max_bytes` of batches but the first.
    fn send_fetch(
        conn: &mut TcpStream,
        topic: &str,
        max_wait_ms: i32,
        min_bytes: i32,
        partition_max_bytes: i32,
    ) {
        let mut body = Vec::new();
        body.extend_from_slice(&(-1i32).to_be_bytes()); // replica
        body.extend_from_slice(&max_wait_ms.to_be_bytes());
        body.extend_from_slice(&min_bytes.to_be_bytes());
        body.extend_from_slice(&(50i32 << 20).to_be_bytes()); // max bytes
        body.push(0); // read uncommitted
        body.extend_from_slice(&1i32.to_be_bytes());
        string(&mut body, topic);
        body.extend_from_slice(&1i32.to_be_bytes());
        body.extend_from_slice(&0i32.to_be_bytes()); // partition
        body.extend_from_slice(&0i64.to_be_bytes()); // fetch offset
        body.extend_from_slice(&partition_max_bytes.to_be_bytes());
        send_version(conn, FETCH, 4, &body);
    }

    /// The record batches a Fetch's answer holds, each as (its first offset, its size).
    fn fetched_batches(conn: &mut TcpStream, topic: &str) -> Vec<(i64, usize)> {
        let answer = answer(conn);
        let mut r = Reader(&answer);
        let _throttle = r.i32();
        assert_eq!(r.i32(), 1, "one topic");
        assert_eq!(r.string(), topic);
        assert_eq!(r.i32(), 1, "one partition");
        assert_eq!(r.i32(), 0);
        assert_eq!(r.i16(), 0, "Fetch answered an error");
        let (_high_watermark, _last_stable, _aborted) = (r.i64(), r.i64(), r.i32());
        let mut records = Reader(r.bytes());
        let mut batches = Vec::new();
        while !records.0.is_empty() {
            let first = records.i64();
            let size = records.i32() as usize;
            records.slice(size);
            batches.push((first, 12 + size));
        }
        batches
    }

    /// What a Fetch that waits for nothing answers.
    fn fetch(broker: &EmbeddedBroker, topic: &str, partition_max_bytes: i32) -> Vec<(i64, usize)> {
        let mut conn = connect(broker);
        send_fetch(&mut conn, topic, 0, 0, partition_max_bytes);
        fetched_batches(&mut conn, topic)
    }

    /// A producer that writes each record as a batch of its own.
    fn batch_per_record(broker: &EmbeddedBroker) -> BaseProducer {
        ClientConfig::new()
            .set("bootstrap.servers", broker.bootstrap_servers())
            .set("linger.ms", "0")
            .create()
            .unwrap()
    }

    fn write(producer: &BaseProducer, topic: &str, value: &str) {
        producer
            .send(BaseRecord::<(), _>::to(topic).payload(value))
            .unwrap();
        producer.flush(Duration::from_secs(10)).unwrap();
    }

    /// A consumer catching up is answered, as by Kafka, every batch from its offset on up to
    /// the fetch's byte limits, the first whatever its size: the mock answered one batch a
    /// fetch, so catching up took a fetch per batch its producers wrote.
    #[test]
    fn a_fetch_is_answered_every_batch_the_partition_s_byte_limit_allows() {
        let broker = EmbeddedBroker::start(1).unwrap();
        broker.create_topic("batches", 1).unwrap();
        let producer = batch_per_record(&broker);
        for i in 0..5 {
            write(&producer, "batches", &format!("record {i}"));
        }

        let all = fetch(&broker, "batches", 1 << 20);
        assert_eq!(firsts(&all), [0, 1, 2, 3, 4]);
        // The limit counts whole batches: two fit, not the third.
        let two = all[0].1 + all[1].1;
        assert_eq!(fetch(&broker, "batches", two as i32 + 1).len(), 2);
        // The first batch comes whatever the limit, so that a consumer always gets on.
        assert_eq!(fetch(&broker, "batches", 1).len(), 1);
    }

    /// A broker with `topic` (and `others`), a producer, and a connection whose Fetch of `topic`
    /// has been waiting a moment when this returns: what is written from then on comes after
    /// it. (Written first, it would be answered at once by any broker, and a test would show
    /// nothing; the pause orders them and cannot fail a test.)
    fn waiting_fetch(
        topic: &str,
        others: &[&str],
        max_wait_ms: i32,
        min_bytes: i32,
    ) -> (EmbeddedBroker, BaseProducer, TcpStream) {
        let broker = EmbeddedBroker::start(1).unwrap();
        for t in std::iter::once(&topic).chain(others) {
            broker.create_topic(t, 1).unwrap();
        }
        let producer = batch_per_record(&broker);
        let mut conn = connect(&broker);
        send_fetch(&mut conn, topic, max_wait_ms, min_bytes, 1 << 20);
        std::thread::sleep(Duration::from_millis(200));
        (broker, producer, conn)
    }

    fn firsts(batches: &[(i64, usize)]) -> Vec<i64> {
        batches.iter().map(|(first, _)| *first).collect()
    }

    /// A Fetch with nothing to answer waits, as on Kafka, until records arrive, not for its whole
    /// wait: the mock answered only when the wait ended, so the records written meanwhile came
    /// with the next fetch, up to 500 ms (librdkafka's default wait) after they were written.
    #[test]
    fn a_waiting_fetch_is_answered_as_soon_as_records_arrive() {
        let (_broker, producer, mut conn) = waiting_fetch("waiting", &[], 15_000, 1);
        write(&producer, "waiting", "late");
        assert_eq!(firsts(&fetched_batches(&mut conn, "waiting")), [0]);
    }

    /// A waiting Fetch is answered once its minimum of bytes has arrived, not with less.
    #[test]
    fn a_waiting_fetch_is_answered_when_its_minimum_has_arrived() {
        const MIN_BYTES: usize = 120;
        let (_broker, producer, mut conn) = waiting_fetch("minimum", &[], 15_000, MIN_BYTES as i32);
        write(&producer, "minimum", "first");
        write(&producer, "minimum", "second");
        let batches = fetched_batches(&mut conn, "minimum");
        assert!(
            batches[0].1 < MIN_BYTES,
            "one batch alone must not be enough: {batches:?}"
        );
        assert_eq!(firsts(&batches), [0, 1]);
    }

    /// A waiting Fetch whose minimum does not arrive is answered, when its wait ends, with what
    /// did.
    #[test]
    fn a_waiting_fetch_is_answered_with_what_arrived_when_its_wait_ends() {
        let (_broker, producer, mut conn) = waiting_fetch("short", &[], 1_000, 1 << 20);
        write(&producer, "short", "too little");
        assert_eq!(firsts(&fetched_batches(&mut conn, "short")), [0]);
    }

    /// A waiting Fetch whose partition gets nothing is answered, empty, when its wait ends,
    /// however much other partitions get meanwhile.
    #[test]
    fn a_waiting_fetch_of_a_partition_that_gets_nothing_is_answered_empty_when_its_wait_ends() {
        let (_broker, producer, mut conn) = waiting_fetch("quiet", &["busy"], 1_000, 1);
        write(&producer, "busy", "elsewhere");
        assert_eq!(fetched_batches(&mut conn, "quiet"), []);
        // The connection goes on: its next Fetch sees what arrived since.
        write(&producer, "quiet", "now");
        send_fetch(&mut conn, "quiet", 1_000, 1, 1 << 20);
        assert_eq!(firsts(&fetched_batches(&mut conn, "quiet")), [0]);
    }
}
