//! One trace per record, exported over OTLP to a real collector on loopback: the spans arrive
//! with the record's context as parent, and the service and the written records carry the
//! context on.

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use ferry::sidecar::Sidecar;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::trace::v1::Span;

const WAIT: Duration = Duration::from_secs(30);

/// An OTLP/gRPC trace collector that keeps every span it receives.
#[derive(Clone, Default)]
struct Collector {
    spans: Arc<Mutex<Vec<Span>>>,
    services: Arc<Mutex<Vec<String>>>,
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        for rs in request.into_inner().resource_spans {
            let service = rs
                .resource
                .iter()
                .flat_map(|r| &r.attributes)
                .find(|a| a.key == "service.name")
                .and_then(|a| text(a.value.as_ref()?.value.as_ref()?));
            if let Some(s) = service {
                self.services.lock().unwrap().push(s);
            }
            for ss in rs.scope_spans {
                self.spans.lock().unwrap().extend(ss.spans);
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

fn text(v: &Value) -> Option<String> {
    match v {
        Value::StringValue(s) => Some(s.clone()),
        Value::IntValue(i) => Some(i.to_string()),
        Value::BoolValue(b) => Some(b.to_string()),
        _ => None,
    }
}

impl Collector {
    async fn start() -> (Collector, String) {
        let c = Collector::default();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(c.clone()))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener));
        tokio::spawn(server);
        (c, format!("http://{addr}"))
    }

    fn of_trace(&self, trace_id: &str) -> Vec<Span> {
        self.spans
            .lock()
            .unwrap()
            .iter()
            .filter(|s| hex(&s.trace_id) == trace_id)
            .cloned()
            .collect()
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn attr(s: &Span, key: &str) -> Option<String> {
    s.attributes
        .iter()
        .find(|a| a.key == key)
        .and_then(|a| text(a.value.as_ref()?.value.as_ref()?))
}

/// `00-<trace>-<span>-<flags>` split into its parts.
fn parts(traceparent: &str) -> (String, String, String) {
    let p: Vec<&str> = traceparent.split('-').collect();
    assert_eq!(p.len(), 4, "{traceparent}");
    (p[1].to_string(), p[2].to_string(), p[3].to_string())
}

const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const PARENT: &str = "00f067aa0ba902b7";

#[tokio::test]
async fn a_record_trace_runs_from_its_traceparent_through_the_call_to_the_reply_and_commit() {
    let kafka = Kafka::start();
    let t = kafka.route_topics(1).await;
    let (collector, endpoint) = Collector::start().await;
    let service = Service::start(|r: Req| async move {
        if r.body.starts_with("bad") {
            Resp::new(400, "no")
        } else {
            Resp::new(200, &r.body)
        }
    })
    .await;
    let text = route_config(&kafka, &t, &service.url("/h"), "")
        + &format!(
            "telemetry:\n  traces:\n    otlp_endpoint: \"{endpoint}\"\n    sample_ratio: 0.0\n    service_name: payments-ferry\n"
        );
    let sidecar = Sidecar::start(parse(&text)).await.expect("sidecar starts");

    // Sampled by its parent although the ratio is 0: the caller's decision is followed.
    let incoming = format!("00-{TRACE}-{PARENT}-01");
    kafka
        .send(
            &t.source,
            None,
            Some("k1"),
            "hello",
            &[("traceparent", &incoming), ("tracestate", "vendor=x")],
        )
        .await;
    let bad_trace = "0af7651916cd43dd8448eb211c80319c";
    kafka
        .send(
            &t.source,
            None,
            Some("k2"),
            "bad",
            &[("traceparent", &format!("00-{bad_trace}-b7ad6b7169203331-01"))],
        )
        .await;
    // Not sampled by its parent, and the ratio is 0: no spans, but the context still travels.
    let quiet_trace = "11111111111111111111111111111111";
    kafka
        .send(
            &t.source,
            None,
            Some("k3"),
            "quiet",
            &[("traceparent", &format!("00-{quiet_trace}-2222222222222222-00"))],
        )
        .await;

    let spans = eventually(WAIT, "the five spans of the first record", || async {
        let s = collector.of_trace(TRACE);
        (s.iter().any(|s| s.name == "commit") && s.len() >= 5).then_some(s)
    })
    .await;
    let by_name: HashMap<&str, &Span> = spans.iter().map(|s| (s.name.as_str(), s)).collect();
    let process = by_name[format!("{} process", t.source).as_str()];
    assert_eq!(
        hex(&process.parent_span_id),
        PARENT,
        "the record's span continues its traceparent"
    );
    assert_eq!(attr(process, "messaging.system").as_deref(), Some("kafka"));
    assert_eq!(
        attr(process, "messaging.destination.name").as_deref(),
        Some(t.source.as_str())
    );
    assert_eq!(attr(process, "messaging.kafka.offset").as_deref(), Some("0"));
    assert_eq!(
        attr(process, "messaging.consumer.group.name").as_deref(),
        Some(t.group.as_str())
    );
    assert_eq!(attr(process, "ferry.route").as_deref(), Some("test"));
    assert_eq!(attr(process, "ferry.outcome").as_deref(), Some("replied"));
    assert_eq!(attr(process, "ferry.committed").as_deref(), Some("true"));
    for child in ["consume", "call", "commit"] {
        let s = by_name
            .get(child)
            .unwrap_or_else(|| panic!("no `{child}` span in {spans:?}"));
        assert_eq!(
            s.parent_span_id, process.span_id,
            "{child} is a child of the record's span"
        );
    }
    let publish = by_name[format!("{} publish", t.reply).as_str()];
    assert_eq!(publish.parent_span_id, process.span_id);
    let call = by_name["call"];
    assert_eq!(attr(call, "ferry.attempt").as_deref(), Some("1"));
    assert_eq!(attr(call, "ferry.result").as_deref(), Some("2xx"));
    assert!(process.end_time_unix_nano >= by_name["commit"].end_time_unix_nano);
    assert!(
        collector
            .services
            .lock()
            .unwrap()
            .iter()
            .all(|s| s == "payments-ferry")
    );

    // The service saw the call's span as its parent, with the trace state kept.
    let requests = service.requests();
    let req = requests.iter().find(|r| r.body == "hello").unwrap();
    let (trace, span, flags) = parts(req.header("traceparent").unwrap());
    assert_eq!(
        (trace.as_str(), span, flags.as_str()),
        (TRACE, hex(&call.span_id), "01")
    );
    assert_eq!(req.header("tracestate"), Some("vendor=x"));

    // The reply carries the publish span's context.
    let reply = &kafka.read(&t.reply, 2, WAIT).await[0];
    let (trace, span, _) = parts(reply.header("traceparent").unwrap());
    assert_eq!((trace.as_str(), span), (TRACE, hex(&publish.span_id)));

    // The dead letter too, and its trace says why.
    let dead = &kafka.read(&t.dlq, 1, WAIT).await[0];
    let (trace, _, _) = parts(dead.header("traceparent").unwrap());
    assert_eq!(trace, bad_trace);
    let bad = eventually(WAIT, "the dead letter's spans", || async {
        let s = collector.of_trace(bad_trace);
        s.iter().any(|s| s.name == "commit").then_some(s)
    })
    .await;
    let process = bad.iter().find(|s| s.name.ends_with(" process")).unwrap();
    assert_eq!(attr(process, "ferry.outcome").as_deref(), Some("dead_lettered"));
    assert_eq!(attr(process, "ferry.reason").as_deref(), Some("status"));
    let call = bad.iter().find(|s| s.name == "call").unwrap();
    assert_eq!(attr(call, "ferry.result").as_deref(), Some("4xx"));
    assert_eq!(
        call.status.as_ref().map(|s| s.code),
        Some(2),
        "a failed call is an error span"
    );
    let dl_publish = bad
        .iter()
        .find(|s| s.name == format!("{} publish", t.dlq))
        .unwrap();
    assert_eq!(
        parts(dead.header("traceparent").unwrap()).1,
        hex(&dl_publish.span_id)
    );

    // The unsampled record: same trace id onwards, nothing exported.
    let quiet = requests.iter().find(|r| r.body == "quiet").unwrap();
    let (trace, span, flags) = parts(quiet.header("traceparent").unwrap());
    assert_eq!((trace.as_str(), flags.as_str()), (quiet_trace, "00"));
    assert_ne!(
        span, "2222222222222222",
        "ferry's own (unsampled) span is the parent"
    );
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(
        collector.of_trace(quiet_trace).is_empty(),
        "unsampled records export nothing"
    );
    sidecar.shutdown();
    sidecar.wait().await.unwrap();
}

#[tokio::test]
async fn without_a_collector_the_records_own_traceparent_travels_unchanged() {
    let kafka = Kafka::start();
    let t = kafka.route_topics(1).await;
    let service = Service::start(|r: Req| async move { Resp::new(200, &r.body) }).await;
    let text = route_config(&kafka, &t, &service.url("/h"), "");
    let _sidecar = Sidecar::start(parse(&text)).await.expect("sidecar starts");
    let incoming = format!("00-{TRACE}-{PARENT}-01");
    kafka
        .send(&t.source, None, Some("k"), "v", &[("traceparent", &incoming)])
        .await;
    let reply = &kafka.read(&t.reply, 1, WAIT).await[0];
    assert_eq!(reply.header("traceparent"), Some(incoming.as_str()));
    assert_eq!(
        service.requests()[0].header("traceparent"),
        Some(incoming.as_str())
    );
}

#[tokio::test]
async fn the_standard_environment_variable_turns_export_on() {
    let kafka = Kafka::start();
    let t = kafka.route_topics(1).await;
    let (collector, endpoint) = Collector::start().await;
    let service = Service::start(|r: Req| async move { Resp::new(200, &r.body) }).await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("ferry.yaml");
    std::fs::write(&config, route_config(&kafka, &t, &service.url("/h"), "")).unwrap();
    let _ferry = Ferry::spawn_with(
        &config,
        &dir.path().join("ferry.log"),
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
            ("FERRY_LOG", "info"),
        ],
    );
    let trace = "5bf92f3577b34da6a3ce929d0e0e4736";
    kafka
        .send(
            &t.source,
            None,
            Some("k"),
            "v",
            &[("traceparent", &format!("00-{trace}-{PARENT}-01"))],
        )
        .await;
    let spans = eventually(WAIT, "the record's spans", || async {
        let s = collector.of_trace(trace);
        s.iter().any(|s| s.name == "commit").then_some(s)
    })
    .await;
    assert!(spans.iter().any(|s| hex(&s.parent_span_id) == PARENT));
    assert!(collector.services.lock().unwrap().iter().all(|s| s == "ferry"));
}
