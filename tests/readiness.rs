//! The service's readiness gate: ferry subscribes only once the service is ready, stops taking
//! records after failed probes and resumes when the service recovers; HTTP and gRPC health.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::*;
use ferry::sidecar::Sidecar;

const WAIT: Duration = Duration::from_secs(30);

async fn readyz(addr: std::net::SocketAddr) -> u16 {
    readyz_says(addr).await.0
}

async fn readyz_says(addr: std::net::SocketAddr) -> (u16, String) {
    let r = reqwest::get(format!("http://{addr}/readyz")).await.unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_probe_gates_subscription_and_pauses_while_the_service_is_unready() {
    let kafka = Kafka::start();
    let RouteTopics {
        source,
        reply,
        dlq,
        group,
    } = kafka.route_topics(1).await;
    let healthy = Arc::new(AtomicBool::new(false));
    let flag = healthy.clone();
    let service = Service::start(move |req: Req| {
        let up = flag.load(Ordering::SeqCst);
        async move {
            match (req.path.as_str(), up) {
                ("/healthz", true) => Resp::new(200, "ok"),
                ("/healthz", false) => Resp::new(503, "starting"),
                _ => Resp::new(200, &req.body),
            }
        }
    })
    .await;
    let text = config_text(&kafka, &group, &source, &service.url("/work"), &reply, &dlq, "").replace(
        "routes:\n",
        &format!(
            "service:\n  ready:\n    http: {}\n    interval: 100ms\n    failure_threshold: 2\nroutes:\n",
            service.url("/healthz")
        ),
    );
    kafka.send(&source, None, Some("k"), "early", &[]).await;
    let sidecar = Sidecar::start(parse(&text)).await.unwrap();
    let admin = sidecar.admin_addr.unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let work = |s: &Service| s.requests().iter().filter(|r| r.path == "/work").count();
    assert_eq!(work(&service), 0, "no record reaches a service that is not ready");
    assert!(sidecar.partitions().is_empty(), "not even subscribed");
    // What the probe got, where an operator looks first.
    let probe_said = format!("{} answered 503 Service Unavailable", service.url("/healthz"));
    let (code, body) = readyz_says(admin).await;
    assert_eq!(code, 503);
    assert!(body.contains(&probe_said), "{body}");

    healthy.store(true, Ordering::SeqCst);
    kafka.read(&reply, 1, WAIT).await;
    eventually(WAIT, "ready", || async {
        (readyz(admin).await == 200).then_some(())
    })
    .await;

    // The service becomes unready: after two failed probes, no new records are taken.
    healthy.store(false, Ordering::SeqCst);
    let body = eventually(WAIT, "unready", || async {
        let (code, body) = readyz_says(admin).await;
        (code == 503).then_some(body)
    })
    .await;
    assert!(body.contains(&probe_said), "{body}");
    kafka.send(&source, None, Some("k"), "while-down", &[]).await;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(work(&service), 1, "no call while the service is unready");
    assert!(
        sidecar.partitions()[0]
            .paused
            .contains(&ferry::offsets::PauseReason::Unready),
        "{:?}",
        sidecar.partitions()
    );

    healthy.store(true, Ordering::SeqCst);
    kafka.read(&reply, 2, WAIT).await;
    assert_eq!(work(&service), 2);
    sidecar.shutdown();
    sidecar.wait().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_health_probe_gates_subscription() {
    let kafka = Kafka::start();
    let RouteTopics {
        source,
        reply,
        dlq,
        group,
    } = kafka.route_topics(1).await;
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter
        .set_service_status("", tonic_health::ServingStatus::NotServing)
        .await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let grpc_addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let _ = tonic::transport::Server::builder()
            .add_service(health)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
            .await;
    });
    let service = Service::start(|req: Req| async move { Resp::new(200, &req.body) }).await;
    let text = config_text(&kafka, &group, &source, &service.url("/"), &reply, &dlq, "").replace(
        "routes:\n",
        &format!("service:\n  ready:\n    grpc: http://{grpc_addr}\n    interval: 100ms\nroutes:\n"),
    );
    kafka.send(&source, None, Some("k"), "v", &[]).await;
    let sidecar = Sidecar::start(parse(&text)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert!(service.requests().is_empty(), "NOT_SERVING holds ferry back");
    let (code, body) = readyz_says(sidecar.admin_addr.unwrap()).await;
    assert_eq!(code, 503);
    assert!(
        body.contains(&format!(
            "http://{grpc_addr}'s health service answered NOT_SERVING"
        )),
        "{body}"
    );
    reporter
        .set_service_status("", tonic_health::ServingStatus::Serving)
        .await;
    let replies = kafka.read(&reply, 1, WAIT).await;
    assert_eq!(replies.len(), 1);
    sidecar.shutdown();
    sidecar.wait().await.unwrap();
}
