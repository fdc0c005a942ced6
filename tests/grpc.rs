//! gRPC delivery end to end: real tonic servers on loopback, the native ferry.v1 contract, the
//! status table, deadlines, one multiplexed connection, dynamic methods from a descriptor set
//! and through reflection, and TLS.

mod common;
#[path = "common/pki.rs"]
mod pki;

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use ferry::call::grpc::proto::handler_server::{Handler, HandlerServer};
use ferry::call::grpc::proto::{Action, Event, Header, Reply};
use ferry::outcome::Outcome;
use ferry::sidecar::Sidecar;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::{Request, Response, Status};

mod inventory {
    tonic::include_proto!("inventory.v1");
}
use inventory::inventory_server::{Inventory, InventoryServer};
use inventory::{CheckReply, CheckRequest};

const INVENTORY_DESCRIPTORS: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/inventory_v1.binpb"));
const WAIT: Duration = Duration::from_secs(30);

type Behaviour = Arc<dyn Fn(&Event) -> Result<Reply, Status> + Send + Sync>;
/// Each call's event and its ASCII metadata.
type Seen = Arc<Mutex<Vec<(Event, HashMap<String, String>)>>>;

/// A native ferry.v1 handler that records what it saw.
#[derive(Clone)]
struct TestHandler {
    behaviour: Behaviour,
    seen: Seen,
    delay_first: Option<Duration>,
}

#[tonic::async_trait]
impl Handler for TestHandler {
    async fn handle(&self, request: Request<Event>) -> Result<Response<Reply>, Status> {
        let metadata = request
            .metadata()
            .iter()
            .filter_map(|kv| match kv {
                tonic::metadata::KeyAndValueRef::Ascii(k, v) => {
                    Some((k.to_string(), v.to_str().unwrap_or("").to_string()))
                }
                _ => None,
            })
            .collect();
        let event = request.into_inner();
        self.seen.lock().unwrap().push((event.clone(), metadata));
        if let Some(d) = self.delay_first {
            if event.attempt == 1 {
                tokio::time::sleep(d).await;
            }
        }
        (self.behaviour)(&event).map(Response::new)
    }
}

/// Serves `router` on 127.0.0.1:0; returns the address and a count of accepted connections.
async fn serve(router: tonic::transport::server::Router) -> (std::net::SocketAddr, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let connections = Arc::new(AtomicUsize::new(0));
    let counted = connections.clone();
    let incoming = TcpListenerStream::new(listener).map(move |c| {
        if c.is_ok() {
            counted.fetch_add(1, Ordering::SeqCst);
        }
        c
    });
    tokio::spawn(async move {
        let _ = router.serve_with_incoming(incoming).await;
    });
    (addr, connections)
}

async fn native(
    behaviour: impl Fn(&Event) -> Result<Reply, Status> + Send + Sync + 'static,
    delay_first: Option<Duration>,
) -> (TestHandler, std::net::SocketAddr, Arc<AtomicUsize>) {
    let handler = TestHandler {
        behaviour: Arc::new(behaviour),
        seen: Arc::default(),
        delay_first,
    };
    let router = tonic::transport::Server::builder().add_service(HandlerServer::new(handler.clone()));
    let (addr, connections) = serve(router).await;
    (handler, addr, connections)
}

struct Topics {
    source: String,
    reply: String,
    alt: String,
    dlq: String,
    group: String,
}

async fn topics(kafka: &Kafka, partitions: i32) -> Topics {
    Topics {
        source: kafka.topic("in", partitions).await,
        reply: kafka.topic("out", 1).await,
        alt: kafka.topic("alt", 1).await,
        dlq: kafka.topic("dlq", 1).await,
        group: unique("group"),
    }
}

/// A one-route config calling gRPC with the `grpc:` block given (indented by 8).
fn grpc_config(kafka: &Kafka, t: &Topics, grpc: &str, max_attempts: u32) -> String {
    format!(
        r#"kafka:
  brokers: "{brokers}"
  group_id: {group}
  commit_interval: 100ms
  properties:
    session.timeout.ms: 6000
    heartbeat.interval.ms: 500
routes:
  - name: grpc
    from:
      topics: [{source}]
    call:
      grpc:
{grpc}
    reply:
      to: {reply}
      topics: [{alt}]
    dead_letter:
      to: {dlq}
    retry:
      max_attempts: {max_attempts}
      backoff: {{ initial: 10ms, max: 50ms }}
admin:
  listen: 127.0.0.1:0
"#,
        brokers = kafka.brokers,
        group = t.group,
        source = t.source,
        reply = t.reply,
        alt = t.alt,
        dlq = t.dlq,
    )
}

fn action(a: Action) -> Reply {
    Reply {
        action: a as i32,
        ..Reply::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn native_actions_land_where_the_spec_says() {
    let kafka = Kafka::start();
    let t = topics(&kafka, 1).await;
    let alt = t.alt.clone();
    let (handler, addr, _) = native(
        move |e| {
            let v = String::from_utf8_lossy(&e.value).to_string();
            Ok(match v.as_str() {
                "reply" => Reply {
                    payload: Some(format!("r:{v}").into_bytes()),
                    key: Some(b"k2".to_vec()),
                    headers: vec![Header {
                        key: "verdict".into(),
                        value: b"ok".to_vec(),
                    }],
                    ..action(Action::Reply)
                },
                "reply-alt" => Reply {
                    payload: Some(b"alt".to_vec()),
                    topic: Some(alt.clone()),
                    ..action(Action::Reply)
                },
                "done" => action(Action::Reply),
                "retry-once" if e.attempt == 1 => Reply {
                    error: "not yet".into(),
                    ..action(Action::Retry)
                },
                "retry-once" => Reply {
                    payload: Some(b"second time".to_vec()),
                    ..action(Action::Reply)
                },
                "dead" => Reply {
                    error: "cannot ever".into(),
                    ..action(Action::DeadLetter)
                },
                "drop" => action(Action::Drop),
                _ => Reply::default(),
            })
        },
        None,
    )
    .await;
    let text = grpc_config(
        &kafka,
        &t,
        &format!("        endpoint: http://{addr}\n        timeout: 2s"),
        3,
    );
    let sidecar = Sidecar::start(parse(&text)).await.unwrap();
    for v in [
        "reply",
        "reply-alt",
        "done",
        "retry-once",
        "dead",
        "drop",
        "unset",
    ] {
        kafka
            .send(&t.source, None, Some("k"), v, &[("tenant", "acme")])
            .await;
    }
    eventually(WAIT, "all 7 committed", || async {
        (kafka.committed_total(&t.group, &t.source, 1).await == 7).then_some(())
    })
    .await;

    let replies = kafka.read_all(&t.reply).await;
    let values: Vec<_> = replies.iter().map(|r| r.value.clone().unwrap()).collect();
    assert_eq!(values, vec!["r:reply", "second time"]);
    assert_eq!(replies[0].key.as_deref(), Some("k2"));
    assert_eq!(replies[0].header("verdict"), Some("ok"));
    assert_eq!(replies[0].header("ferry.source.offset"), Some("0"));
    let alt = kafka.read_all(&t.alt).await;
    assert_eq!(alt.len(), 1, "the service chose one of reply.topics");
    let dead = kafka.read_all(&t.dlq).await;
    let reasons: Vec<_> = dead
        .iter()
        .map(|d| {
            (
                d.value.clone().unwrap(),
                d.header("ferry.error.reason").unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(
        reasons,
        vec![
            ("dead".into(), "service_said".into()),
            ("unset".into(), "contract".into())
        ]
    );
    assert_eq!(dead[0].header("ferry.error.message"), Some("cannot ever"));
    assert_eq!(dead[0].header("ferry.error.status"), Some("OK"));
    let s = &sidecar.snapshot()[0];
    assert_eq!(s.get(Outcome::Done), 1);
    assert_eq!(s.get(Outcome::Dropped), 1);
    assert_eq!(s.get(Outcome::Replied), 3);

    let seen = handler.seen.lock().unwrap().clone();
    let (event, metadata) = &seen[0];
    assert_eq!(event.topic, t.source);
    assert_eq!(event.key.as_deref(), Some(&b"k"[..]));
    assert_eq!(event.attempt, 1);
    assert_eq!(event.idempotency_key, format!("{}/0/0", t.source));
    assert_eq!(event.headers[0].key, "tenant");
    assert_eq!(metadata.get("ferry-topic"), Some(&t.source));
    assert_eq!(metadata.get("ferry-offset").map(String::as_str), Some("0"));
    assert_eq!(metadata.get("ferry-key").map(String::as_str), Some("k"));
    assert_eq!(metadata.get("ferry-attempt").map(String::as_str), Some("1"));
    assert_eq!(metadata.get("idempotency-key"), Some(&event.idempotency_key));
    assert_eq!(
        metadata.get("ferry-header-tenant").map(String::as_str),
        Some("acme")
    );
    assert!(
        metadata.contains_key("grpc-timeout"),
        "the call carries its deadline"
    );
    sidecar.shutdown();
    sidecar.wait().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_status_codes_decide_retry_or_dead_letter() {
    let kafka = Kafka::start();
    let t = topics(&kafka, 1).await;
    let (_, addr, _) = native(
        |e| {
            let code = match String::from_utf8_lossy(&e.value).as_ref() {
                "UNAVAILABLE" => tonic::Code::Unavailable,
                "DEADLINE_EXCEEDED" => tonic::Code::DeadlineExceeded,
                "RESOURCE_EXHAUSTED" => tonic::Code::ResourceExhausted,
                "ABORTED" => tonic::Code::Aborted,
                "INTERNAL" => tonic::Code::Internal,
                "UNKNOWN" => tonic::Code::Unknown,
                "NOT_FOUND" => tonic::Code::NotFound,
                "INVALID_ARGUMENT" => tonic::Code::InvalidArgument,
                "PERMISSION_DENIED" => tonic::Code::PermissionDenied,
                _ => tonic::Code::FailedPrecondition,
            };
            Err(Status::new(code, "as asked"))
        },
        None,
    )
    .await;
    let text = grpc_config(&kafka, &t, &format!("        endpoint: http://{addr}"), 2);
    let sidecar = Sidecar::start(parse(&text)).await.unwrap();
    let retried = [
        "UNAVAILABLE",
        "DEADLINE_EXCEEDED",
        "RESOURCE_EXHAUSTED",
        "ABORTED",
        "INTERNAL",
        "UNKNOWN",
    ];
    let at_once = [
        "NOT_FOUND",
        "INVALID_ARGUMENT",
        "PERMISSION_DENIED",
        "FAILED_PRECONDITION",
    ];
    for code in retried.iter().chain(&at_once) {
        kafka.send(&t.source, None, Some("k"), code, &[]).await;
    }
    let dead = kafka.read(&t.dlq, 10, WAIT).await;
    assert_eq!(dead.len(), 10);
    for d in dead {
        let code = d.value.clone().unwrap();
        assert_eq!(d.header("ferry.error.status"), Some(code.as_str()));
        assert_eq!(d.header("ferry.error.reason"), Some("status"));
        assert_eq!(d.header("ferry.error.message"), Some("as asked"));
        let attempts = if retried.contains(&code.as_str()) {
            "2"
        } else {
            "1"
        };
        assert_eq!(d.header("ferry.attempts"), Some(attempts), "{code}");
    }
    sidecar.shutdown();
    sidecar.wait().await.unwrap();
}

/// A reply message over 16 MiB is the answer's size, as over HTTP: `too_large`, not a status
/// the service never sent (tonic's own limit was 4 MiB, refused as OUT_OF_RANGE).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_message_too_large_to_read_is_too_large_not_a_service_status() {
    let kafka = Kafka::start();
    let t = topics(&kafka, 1).await;
    let (handler, addr, _) = native(
        |e| {
            let size = if e.value == b"huge" { 17 << 20 } else { 5 << 20 };
            Ok(Reply {
                payload: Some(vec![b'x'; size]),
                ..action(Action::Reply)
            })
        },
        None,
    )
    .await;
    let text = grpc_config(&kafka, &t, &format!("        endpoint: http://{addr}"), 3);
    let sidecar = Sidecar::start(parse(&text)).await.unwrap();
    kafka.send(&t.source, None, Some("k"), "huge", &[]).await;
    kafka.send(&t.source, None, Some("k"), "big", &[]).await;

    let dead = kafka.read(&t.dlq, 2, WAIT).await;
    assert_eq!(dead.len(), 2);
    for d in &dead {
        assert_eq!(d.header("ferry.error.reason"), Some("too_large"), "{d:?}");
        assert_ne!(d.header("ferry.error.status"), Some("OUT_OF_RANGE"), "{d:?}");
        assert_eq!(d.header("ferry.attempts"), Some("1"), "not retried: {d:?}");
    }
    let huge = dead.iter().find(|d| d.value.as_deref() == Some("huge")).unwrap();
    let message = huge.header("ferry.error.message").unwrap();
    assert!(message.contains("larger than 16777216 bytes"), "{message}");
    // 5 MiB is read (tonic's default would refuse it), then too large for the broker.
    let big = dead.iter().find(|d| d.value.as_deref() == Some("big")).unwrap();
    let message = big.header("ferry.error.message").unwrap();
    assert!(message.contains("could not be published"), "{message}");
    assert_eq!(
        big.header("ferry.error.status"),
        Some("OK"),
        "the service's answer"
    );
    assert_eq!(handler.seen.lock().unwrap().len(), 2);
    sidecar.shutdown();
    sidecar.wait().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_past_its_deadline_is_retried() {
    let kafka = Kafka::start();
    let t = topics(&kafka, 1).await;
    let (handler, addr, _) = native(
        |_| {
            Ok(Reply {
                payload: Some(b"in time".to_vec()),
                ..action(Action::Reply)
            })
        },
        Some(Duration::from_secs(3)),
    )
    .await;
    let text = grpc_config(
        &kafka,
        &t,
        &format!("        endpoint: http://{addr}\n        timeout: 300ms"),
        3,
    );
    let sidecar = Sidecar::start(parse(&text)).await.unwrap();
    kafka.send(&t.source, None, Some("k"), "v", &[]).await;
    let replies = kafka.read(&t.reply, 1, WAIT).await;
    assert_eq!(replies[0].value.as_deref(), Some("in time"));
    let attempts: Vec<u32> = handler
        .seen
        .lock()
        .unwrap()
        .iter()
        .map(|(e, _)| e.attempt)
        .collect();
    assert_eq!(attempts, vec![1, 2]);
    sidecar.shutdown();
    sidecar.wait().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_connection_serves_every_in_flight_call() {
    let kafka = Kafka::start();
    let t = topics(&kafka, 3).await;
    let in_flight = Arc::new(AtomicUsize::new(0));
    let most = Arc::new(AtomicUsize::new(0));
    let (i, m) = (in_flight.clone(), most.clone());
    let (_, addr, connections) = native(
        move |_| {
            let now = i.fetch_add(1, Ordering::SeqCst) + 1;
            m.fetch_max(now, Ordering::SeqCst);
            std::thread::sleep(Duration::from_millis(20));
            i.fetch_sub(1, Ordering::SeqCst);
            Ok(Reply {
                payload: Some(b"ok".to_vec()),
                ..action(Action::Reply)
            })
        },
        None,
    )
    .await;
    let text = grpc_config(&kafka, &t, &format!("        endpoint: http://{addr}"), 3);
    let sidecar = Sidecar::start(parse(&text)).await.unwrap();
    for n in 0..30 {
        kafka.send(&t.source, Some(n % 3), Some("k"), "v", &[]).await;
    }
    kafka.read(&t.reply, 30, WAIT).await;
    assert_eq!(
        connections.load(Ordering::SeqCst),
        1,
        "one HTTP/2 connection for all calls"
    );
    assert!(
        most.load(Ordering::SeqCst) >= 2,
        "calls of different partitions overlapped on it"
    );
    sidecar.shutdown();
    sidecar.wait().await.unwrap();
}

/// A service that knows nothing of ferry.
#[derive(Default)]
struct Stock;

#[tonic::async_trait]
impl Inventory for Stock {
    async fn check(&self, request: Request<CheckRequest>) -> Result<Response<CheckReply>, Status> {
        let r = request.into_inner();
        Ok(Response::new(CheckReply {
            sku: r.sku,
            available: r.quantity <= 5,
            warehouse: "north".into(),
        }))
    }
}

#[test]
fn a_descriptor_set_that_does_not_describe_the_method_is_a_config_error() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("inventory.binpb");
    std::fs::write(&good, INVENTORY_DESCRIPTORS).unwrap();
    let garbage = dir.path().join("garbage.binpb");
    std::fs::write(&garbage, b"not a descriptor set").unwrap();
    for (file, method, says) in [
        (&good, "inventory.v1.Inventory/Check", None),
        (
            &garbage,
            "inventory.v1.Inventory/Check",
            Some("is not a protobuf descriptor set"),
        ),
        (
            &good,
            "inventory.v1.Stock/Check",
            Some("service `inventory.v1.Stock` is not in the descriptor set"),
        ),
        (
            &good,
            "inventory.v1.Inventory/Nope",
            Some("service `inventory.v1.Inventory` has no method `Nope`"),
        ),
    ] {
        let text = format!(
            "kafka: {{ brokers: \"127.0.0.1:9092\", group_id: g }}\nroutes:\n  - name: r\n    from: {{ topics: [in] }}\n    call:\n      grpc:\n        endpoint: http://127.0.0.1:50051\n        method: {method}\n        descriptor_set: {}\n    dead_letter: {{ to: dlq }}\n",
            file.display()
        );
        let parsed = ferry::config::parse(
            &text,
            std::path::Path::new("ferry.yaml"),
            &ferry::config::Interpolator::from_pairs(&[]),
        );
        match (parsed, says) {
            (Ok(_), None) => {}
            (Err(e), Some(says)) => {
                let e = e.to_string();
                assert!(
                    e.contains("routes[0].call.grpc.descriptor_set") && e.contains(says),
                    "{method}: {e}"
                );
            }
            (Ok(_), Some(says)) => panic!("{method}: accepted, expected `{says}`"),
            (Err(e), None) => panic!("{method}: {e}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_without_reflection_v1_is_named_in_the_dead_letter() {
    let kafka = Kafka::start();
    let t = topics(&kafka, 1).await;
    let (addr, _) = serve(tonic::transport::Server::builder().add_service(InventoryServer::new(Stock))).await;
    let grpc = format!(
        "        endpoint: http://{addr}\n        method: inventory.v1.Inventory/Check\n        reflection: true"
    );
    let sidecar = Sidecar::start(parse(&grpc_config(&kafka, &t, &grpc, 2)))
        .await
        .unwrap();
    kafka
        .send(&t.source, None, Some("k"), r#"{"sku": "A1"}"#, &[])
        .await;
    let dead = kafka.read(&t.dlq, 1, WAIT).await;
    let message = dead[0].header("ferry.error.message").unwrap_or_default();
    assert!(
        message.contains("the service does not serve gRPC reflection v1")
            && message.contains("give the route a descriptor_set"),
        "{message}"
    );
    sidecar.shutdown();
    sidecar.wait().await.unwrap();
}

async fn dynamic(reflection: bool) {
    let kafka = Kafka::start();
    let t = topics(&kafka, 1).await;
    let mut builder = tonic::transport::Server::builder();
    let router = if reflection {
        let reflection = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(INVENTORY_DESCRIPTORS)
            .build_v1()
            .unwrap();
        builder
            .add_service(InventoryServer::new(Stock))
            .add_service(reflection)
    } else {
        builder.add_service(InventoryServer::new(Stock))
    };
    let (addr, _) = serve(router).await;
    let dir = tempfile::tempdir().unwrap();
    let descriptors = dir.path().join("inventory.binpb");
    std::fs::write(&descriptors, INVENTORY_DESCRIPTORS).unwrap();
    let source = if reflection {
        "        reflection: true".to_string()
    } else {
        format!("        descriptor_set: {}", descriptors.display())
    };
    let grpc =
        format!("        endpoint: http://{addr}\n        method: inventory.v1.Inventory/Check\n{source}");
    let sidecar = Sidecar::start(parse(&grpc_config(&kafka, &t, &grpc, 3)))
        .await
        .unwrap();
    kafka
        .send(&t.source, None, Some("k"), r#"{"sku": "A1", "quantity": 2}"#, &[])
        .await;
    kafka
        .send(
            &t.source,
            None,
            Some("k"),
            r#"{"sku": "B2", "quantity": "many"}"#,
            &[],
        )
        .await;
    kafka
        .send(
            &t.source,
            None,
            Some("k"),
            r#"{"sku": "C3", "colour": "red"}"#,
            &[],
        )
        .await;
    kafka
        .send(&t.source, None, Some("k"), "not json at all", &[])
        .await;

    let replies = kafka.read(&t.reply, 1, WAIT).await;
    let json: serde_json::Value = serde_json::from_str(replies[0].value.as_deref().unwrap()).unwrap();
    assert_eq!(
        json,
        serde_json::json!({"sku": "A1", "available": true, "warehouse": "north"})
    );
    assert_eq!(replies[0].header("content-type"), Some("application/json"));

    let dead = kafka.read(&t.dlq, 3, WAIT).await;
    assert_eq!(dead.len(), 3);
    for d in &dead {
        assert_eq!(d.header("ferry.error.reason"), Some("schema"), "{d:?}");
        assert_eq!(d.header("ferry.attempts"), Some("0"), "never called: {d:?}");
    }
    let message = |i: usize| dead[i].header("ferry.error.message").unwrap().to_string();
    assert!(message(0).contains("quantity"), "names the field: {}", message(0));
    assert!(message(1).contains("colour"), "names the field: {}", message(1));
    assert!(message(2).contains("inventory.v1.CheckRequest"), "{}", message(2));
    sidecar.shutdown();
    sidecar.wait().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dynamic_method_from_a_descriptor_set() {
    dynamic(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dynamic_method_through_reflection() {
    dynamic(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_to_the_service_with_a_ca_file_and_a_client_certificate() {
    let kafka = Kafka::start();
    let service_ca = pki::Ca::new("service CA");
    let client_ca = pki::Ca::new("client CA");
    let server = service_ca.server();
    let client = client_ca.client("ferry");

    // The service requires a client certificate signed by the client CA.
    let identity = tonic::transport::Identity::from_pem(&server.cert, &server.key);
    let handler = TestHandler {
        behaviour: Arc::new(|_| {
            Ok(Reply {
                payload: Some(b"over tls".to_vec()),
                ..action(Action::Reply)
            })
        }),
        seen: Arc::default(),
        delay_first: None,
    };
    let seen = handler.seen.clone();
    let router = tonic::transport::Server::builder()
        .tls_config(
            tonic::transport::ServerTlsConfig::new()
                .identity(identity)
                .client_ca_root(tonic::transport::Certificate::from_pem(&client_ca.pem)),
        )
        .unwrap()
        .add_service(HandlerServer::new(handler));
    let (addr, _) = serve(router).await;
    let dir = tempfile::tempdir().unwrap();
    let ca_file = pki::write(dir.path(), "ca.pem", &service_ca.pem);
    let cert_file = pki::write(dir.path(), "client.pem", &client.cert);
    let key_file = pki::write(dir.path(), "client.key", &client.key);
    let endpoint = format!("        endpoint: https://localhost:{}\n", addr.port());
    let with_certificate = format!(
        "{endpoint}        ca_file: {}\n        cert_file: {}\n        key_file: {}",
        ca_file.display(),
        cert_file.display(),
        key_file.display()
    );
    let t = topics(&kafka, 1).await;
    let sidecar = Sidecar::start(parse(&grpc_config(&kafka, &t, &with_certificate, 3)))
        .await
        .unwrap();
    kafka.send(&t.source, None, Some("k"), "v", &[]).await;
    let replies = kafka.read(&t.reply, 1, WAIT).await;
    assert_eq!(replies[0].value.as_deref(), Some("over tls"));
    sidecar.shutdown();
    sidecar.wait().await.unwrap();

    // Without the client certificate the service refuses the handshake: nothing reaches it.
    let t2 = topics(&kafka, 1).await;
    let without = format!("{endpoint}        ca_file: {}", ca_file.display());
    let sidecar = Sidecar::start(parse(&grpc_config(&kafka, &t2, &without, 2)))
        .await
        .unwrap();
    kafka.send(&t2.source, None, Some("k"), "v", &[]).await;
    let dead = kafka.read(&t2.dlq, 1, WAIT).await;
    assert_eq!(dead[0].header("ferry.error.reason"), Some("connect"), "{dead:?}");
    assert_eq!(
        seen.lock().unwrap().len(),
        1,
        "only the call with a certificate got through"
    );
    sidecar.shutdown();
    sidecar.wait().await.unwrap();

    // A CA that did not sign the service's certificate: nothing gets through.
    let wrong = pki::write(dir.path(), "wrong.pem", &pki::Ca::new("another CA").pem);
    let t3 = topics(&kafka, 1).await;
    let wrong_ca = with_certificate.replace(&ca_file.display().to_string(), &wrong.display().to_string());
    let sidecar = Sidecar::start(parse(&grpc_config(&kafka, &t3, &wrong_ca, 2)))
        .await
        .unwrap();
    kafka.send(&t3.source, None, Some("k"), "v", &[]).await;
    let dead = kafka.read(&t3.dlq, 1, WAIT).await;
    assert_eq!(
        dead[0].header("ferry.error.reason"),
        Some("connect"),
        "a wrong CA is refused: {dead:?}"
    );
    assert!(kafka.read_all(&t3.reply).await.is_empty());
    assert_eq!(seen.lock().unwrap().len(), 1);
    sidecar.shutdown();
    sidecar.wait().await.unwrap();
}

/// A refused connection is the service's absence, not the record's fault: over gRPC as over
/// HTTP (tests/circuit.rs), the record waits for the service rather than spend its attempts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_sent_while_the_grpc_service_is_away_waits_for_it() {
    let kafka = Kafka::start();
    let t = topics(&kafka, 1).await;
    // A port nothing listens on, until the service starts below.
    let addr = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let text = grpc_config(&kafka, &t, &format!("        endpoint: http://{addr}"), 2);
    let sidecar = Sidecar::start(parse(&text)).await.unwrap();
    kafka.send(&t.source, None, Some("k"), "v", &[]).await;
    // Two attempts 10 to 50 ms apart would have dead-lettered it long before this.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(kafka.read_all(&t.dlq).await.is_empty(), "nothing dead-lettered");

    let handler = TestHandler {
        behaviour: Arc::new(|e: &Event| {
            Ok(Reply {
                payload: Some(e.value.clone()),
                ..action(Action::Reply)
            })
        }),
        seen: Arc::default(),
        delay_first: None,
    };
    let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
    let router = tonic::transport::Server::builder().add_service(HandlerServer::new(handler));
    tokio::spawn(router.serve_with_incoming(TcpListenerStream::new(listener)));
    let replies = kafka.read(&t.reply, 1, WAIT).await;
    assert_eq!(replies[0].value.as_deref(), Some("v"));
    assert!(kafka.read_all(&t.dlq).await.is_empty());
    sidecar.shutdown();
    sidecar.wait().await.unwrap();
}
