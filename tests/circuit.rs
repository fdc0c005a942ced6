//! The service is down, not the record: an outage under load opens the route's circuit, and
//! afterwards nothing was dead-lettered and every record ended as a reply.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::*;
use ferry::outcome::Outcome;
use ferry::sidecar::Sidecar;

const WAIT: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_under_load_dead_letters_nothing() {
    let kafka = Kafka::start();
    let RouteTopics {
        source,
        reply,
        dlq,
        group,
    } = kafka.route_topics(2).await;
    let down = Arc::new(AtomicBool::new(true));
    let flag = down.clone();
    let service = Service::start(move |req: Req| {
        let down = flag.load(Ordering::SeqCst);
        async move {
            if down {
                Resp::new(503, "restarting")
            } else {
                Resp::new(200, &req.body)
            }
        }
    })
    .await;
    let extra = "    circuit: { failure_ratio: 0.5, min_calls: 5, window: 5s, probe_every: 200ms }\n";
    let text = config_text(&kafka, &group, &source, &service.url("/"), &reply, &dlq, extra);
    for i in 0..200 {
        kafka
            .send(
                &source,
                Some(i % 2),
                Some(&format!("k{i}")),
                &format!("v{i}"),
                &[],
            )
            .await;
    }
    let sidecar = Sidecar::start(parse(&text)).await.unwrap();
    // Without the circuit, three failed attempts 10-50 ms apart would dead-letter every record.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let during = service.requests().len();
    // An open circuit stops taking records; it lets one through when a probe is due, so a
    // single look may catch a partition between probes.
    eventually(WAIT, "every partition paused by the circuit", || async {
        sidecar
            .partitions()
            .iter()
            .all(|p| p.paused.contains(&ferry::offsets::PauseReason::Circuit))
            .then_some(())
    })
    .await;
    down.store(false, Ordering::SeqCst);
    eventually(WAIT, "all 200 committed", || async {
        (kafka.committed_total(&group, &source, 2).await == 200).then_some(())
    })
    .await;
    let s = sidecar.snapshot().remove(0);
    assert_eq!(s.get(Outcome::DeadLettered), 0, "{s:?}");
    assert_eq!(s.get(Outcome::Replied), 200, "{s:?}");
    assert!(kafka.read_all(&dlq).await.is_empty());
    assert_eq!(kafka.read_all(&reply).await.len(), 200);
    // While open, the service saw probes, not a storm: a few calls per probe interval.
    assert!(during < 150, "{during} calls during a 3 s outage");
    sidecar.shutdown();
    sidecar.wait().await.unwrap();
}

/// An HTTP service that can be stopped (connections refused) and started again on its port.
struct Restartable {
    addr: std::net::SocketAddr,
    stop: Option<tokio_util::sync::CancellationToken>,
    calls: Arc<std::sync::atomic::AtomicUsize>,
}

impl Restartable {
    async fn start(addr: &str) -> Restartable {
        let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut r = Restartable {
            addr,
            stop: None,
            calls: Arc::default(),
        };
        r.serve(listener);
        r
    }

    fn serve(&mut self, listener: tokio::net::TcpListener) {
        let calls = self.calls.clone();
        let app = axum::Router::new().fallback(move |body: String| {
            calls.fetch_add(1, Ordering::SeqCst);
            async move { body }
        });
        let stop = tokio_util::sync::CancellationToken::new();
        let token = stop.clone();
        tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(async move { token.cancelled().await })
                .await;
        });
        self.stop = Some(stop);
    }

    fn stop(&mut self) {
        if let Some(s) = self.stop.take() {
            s.cancel();
        }
    }

    async fn restart(&mut self) {
        let listener = tokio::net::TcpListener::bind(self.addr).await.unwrap();
        self.serve(listener);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_that_stops_for_20_seconds_under_load_dead_letters_nothing() {
    let kafka = Kafka::start();
    let RouteTopics {
        source,
        reply,
        dlq,
        group,
    } = kafka.route_topics(2).await;
    let mut service = Restartable::start("127.0.0.1:0").await;
    let url = format!("http://{}/", service.addr);
    let extra = "    circuit: { failure_ratio: 0.5, min_calls: 5, window: 5s, probe_every: 500ms }\n";
    let text = config_text(&kafka, &group, &source, &url, &reply, &dlq, extra);
    let sidecar = Sidecar::start(parse(&text)).await.unwrap();
    // Load before, during and after the outage.
    for i in 0..100 {
        kafka
            .send(
                &source,
                Some(i % 2),
                Some(&format!("k{i}")),
                &format!("v{i}"),
                &[],
            )
            .await;
    }
    kafka.read(&reply, 50, WAIT).await;
    service.stop();
    for i in 100..300 {
        kafka
            .send(
                &source,
                Some(i % 2),
                Some(&format!("k{i}")),
                &format!("v{i}"),
                &[],
            )
            .await;
    }
    tokio::time::sleep(Duration::from_secs(20)).await;
    service.restart().await;
    eventually(WAIT, "all 300 committed", || async {
        (kafka.committed_total(&group, &source, 2).await == 300).then_some(())
    })
    .await;
    let s = sidecar.snapshot().remove(0);
    assert_eq!(s.get(Outcome::DeadLettered), 0, "{s:?}");
    assert_eq!(s.get(Outcome::Replied), 300, "{s:?}");
    assert!(kafka.read_all(&dlq).await.is_empty());
    sidecar.shutdown();
    sidecar.wait().await.unwrap();
}

/// A quiet route makes too few calls for the window of recent calls to open the circuit: the
/// records sent while the service restarts would spend their attempts on refused connections and
/// be dead-lettered. A refused connection opens the circuit at once instead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_sent_while_the_service_restarts_waits_for_it() {
    let kafka = Kafka::start();
    let t = kafka.route_topics(1).await;
    let mut service = Restartable::start("127.0.0.1:0").await;
    let url = format!("http://{}/", service.addr);
    // The default window (20 calls), far above the few calls three records make; probes often,
    // to keep the test short.
    let extra = "    circuit: { failure_ratio: 0.5, min_calls: 20, window: 10s, probe_every: 200ms }\n";
    let sidecar = Sidecar::start(parse(&route_config(&kafka, &t, &url, extra)))
        .await
        .unwrap();
    kafka.send(&t.source, None, Some("k0"), "before", &[]).await;
    kafka.read(&t.reply, 1, WAIT).await;

    service.stop();
    for i in 1..=3 {
        kafka
            .send(
                &t.source,
                None,
                Some(&format!("k{i}")),
                &format!("during {i}"),
                &[],
            )
            .await;
    }
    // Three attempts 10 to 50 ms apart would have dead-lettered them long before this.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        kafka.read_all(&t.dlq).await.is_empty(),
        "nothing dead-lettered while the service is away"
    );
    // Open, the circuit lets a record through when a probe is due: a single look may catch
    // the partition between probes.
    eventually(WAIT, "the circuit holds the partition", || async {
        sidecar
            .partitions()
            .iter()
            .all(|p| p.paused.contains(&ferry::offsets::PauseReason::Circuit))
            .then_some(())
    })
    .await;
    service.restart().await;
    eventually(WAIT, "all 4 committed", || async {
        (kafka.committed_total(&t.group, &t.source, 1).await == 4).then_some(())
    })
    .await;
    let s = sidecar.snapshot().remove(0);
    assert_eq!(s.get(Outcome::DeadLettered), 0, "{s:?}");
    assert_eq!(s.get(Outcome::Replied), 4, "{s:?}");
    assert_eq!(kafka.read_all(&t.reply).await.len(), 4);
    sidecar.shutdown();
    sidecar.wait().await.unwrap();
}

/// A record that crashes the service: its call's connection breaks, and the service is away
/// (refused) while it restarts, which opens the circuit. The calls that reached the service count
/// towards the record's attempts, probes too, so it is dead-lettered after them rather than
/// probed for ever, one crash per probe.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_that_crashes_the_service_is_dead_lettered_after_its_attempts() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let kafka = Kafka::start();
    let t = kafka.route_topics(1).await;
    let addr = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    // An HTTP service that dies on "poison": the connection closes without an answer, and
    // nothing listens for 300 ms while it restarts.
    tokio::spawn(async move {
        loop {
            let Ok(listener) = tokio::net::TcpListener::bind(addr).await else {
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            };
            loop {
                let Ok((mut conn, _)) = listener.accept().await else {
                    break;
                };
                let mut request = Vec::new();
                let mut buf = [0u8; 4096];
                while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                    match conn.read(&mut buf).await {
                        Ok(n) if n > 0 => request.extend_from_slice(&buf[..n]),
                        _ => break,
                    }
                }
                let mut text = String::from_utf8_lossy(&request).to_string();
                if !text.ends_with("poison") && text.contains("content-length: 6") {
                    // The body, when it came apart from the head.
                    if let Ok(n) = conn.read(&mut buf).await {
                        text.push_str(&String::from_utf8_lossy(&buf[..n]));
                    }
                }
                if text.ends_with("poison") {
                    drop(conn);
                    break;
                }
                let _ = conn
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok")
                    .await;
            }
            // Nothing listens while it restarts.
            drop(listener);
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    });
    let extra = "    circuit: { failure_ratio: 0.5, min_calls: 20, window: 10s, probe_every: 200ms }\n";
    let url = format!("http://{addr}/");
    let sidecar = Sidecar::start(parse(&route_config(&kafka, &t, &url, extra)))
        .await
        .unwrap();
    kafka.send(&t.source, None, Some("k"), "poison", &[]).await;
    let dead = kafka.read(&t.dlq, 1, WAIT).await;
    assert_eq!(dead[0].header("ferry.error.reason"), Some("connect"), "{dead:?}");
    sidecar.shutdown();
    sidecar.wait().await.unwrap();
}
