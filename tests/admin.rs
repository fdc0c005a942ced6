//! The admin endpoint against a running sidecar: status, metrics and their reconciliation,
//! the control verbs and who may use them, the OpenAPI document, and `ferry ctl`.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use ferry::admin::{self, Access, Admin, Status};
use ferry::config::Secret;
use ferry::sidecar::Sidecar;
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(30);

struct Bench {
    kafka: Kafka,
    topics: RouteTopics,
    service: Service,
    sidecar: Sidecar,
    base: String,
}

/// A sidecar whose service answers 200 with the body, 400 for values starting with `bad`, and
/// 409 (dropped by a rule) for values starting with `old`; each call takes `delay`.
async fn bench(partitions: i32, delay: Duration) -> Bench {
    let kafka = Kafka::start();
    let topics = kafka.route_topics(partitions).await;
    let service = Service::start(move |r: Req| async move {
        tokio::time::sleep(delay).await;
        let body = r.body.clone();
        if body.starts_with("bad") {
            Resp::new(400, "rejected")
        } else if body.starts_with("old") {
            Resp::new(409, "")
        } else {
            Resp::new(200, &body)
        }
    })
    .await;
    let text = config_text(
        &kafka,
        &topics.group,
        &topics.source,
        &service.url("/handle"),
        &topics.reply,
        &topics.dlq,
        "    rules:\n      - when: { status: 409 }\n        then: drop\n",
    );
    let sidecar = Sidecar::start(parse(&text)).await.expect("sidecar starts");
    let base = format!("http://{}", sidecar.admin_addr.expect("admin listens"));
    eventually(WAIT, "ready", || async {
        (admin_call("GET", &format!("{base}/readyz"), None).await.0 == 200).then_some(())
    })
    .await;
    Bench {
        kafka,
        topics,
        service,
        sidecar,
        base,
    }
}

impl Bench {
    async fn status(&self) -> Status {
        let (code, _, body) = admin_call("GET", &format!("{}/status", self.base), None).await;
        assert_eq!(code, 200, "{body}");
        serde_json::from_str(&body).expect("status is JSON of the documented shape")
    }

    async fn metrics(&self) -> String {
        let (code, content_type, body) = admin_call("GET", &format!("{}/metrics", self.base), None).await;
        assert_eq!(code, 200);
        assert!(content_type.starts_with("text/plain"), "{content_type}");
        body
    }

    async fn send_values(&self, values: &[&str]) {
        for (i, v) in values.iter().enumerate() {
            let key = format!("k{i}");
            self.kafka
                .send(&self.topics.source, None, Some(&key), v, &[])
                .await;
        }
    }

    async fn committed_total(&self, partitions: i32) -> i64 {
        self.kafka
            .committed_total(&self.topics.group, &self.topics.source, partitions)
            .await
    }
}

#[tokio::test]
async fn status_shows_partitions_with_committed_offsets_lag_and_counts() {
    let b = bench(2, Duration::ZERO).await;
    b.send_values(&["a", "b", "bad", "old", "c", "d"]).await;
    eventually(WAIT, "all six committed", || async {
        (b.committed_total(2).await == 6).then_some(())
    })
    .await;
    let s = eventually(WAIT, "status catches up with the commits", || async {
        let s = b.status().await;
        let r = &s.routes[0];
        let caught_up = r.partitions.len() == 2
            && r.partitions
                .iter()
                .all(|p| p.committed.is_some() && p.lag == Some(0));
        caught_up.then_some(s)
    })
    .await;
    assert!(s.live && s.ready && s.service_ready && !s.draining);
    assert_eq!(s.not_ready, None);
    let r = &s.routes[0];
    assert_eq!(r.name, "test");
    assert_eq!(
        (r.paused, r.draining, r.circuit.as_str()),
        (false, false, "closed")
    );
    assert_eq!((r.received, r.in_flight, r.lag), (6, 0, 0));
    assert_eq!(r.outcomes.get("replied"), Some(&4));
    assert_eq!(r.outcomes.get("dead_lettered"), Some(&1));
    assert_eq!(r.outcomes.get("dropped"), Some(&1));
    assert_eq!(r.dead_letters.get("status"), Some(&1));
    let committed: i64 = r.partitions.iter().filter_map(|p| p.committed).sum();
    let high: i64 = r.partitions.iter().filter_map(|p| p.high_watermark).sum();
    assert_eq!((committed, high), (6, 6));
    assert!(
        r.partitions
            .iter()
            .all(|p| p.topic == b.topics.source && p.paused.is_empty())
    );
}

#[tokio::test]
async fn metrics_reconcile_and_cover_the_spec() {
    let b = bench(2, Duration::from_millis(2)).await;
    let values: Vec<String> = (0..60)
        .map(|i| match i % 10 {
            3 => format!("bad-{i}"),
            7 => format!("old-{i}"),
            _ => format!("ok-{i}"),
        })
        .collect();
    let refs: Vec<&str> = values.iter().map(String::as_str).collect();
    b.send_values(&refs).await;
    // Mid-stream, no record reaches an outcome without having been received.
    let text = b.metrics().await;
    let received = metric_sum(&text, "ferry_records_received_total", &[]);
    let ended = metric_sum(&text, "ferry_outcomes_total", &[])
        + metric_sum(&text, "ferry_records_abandoned_total", &[]);
    assert!(ended <= received, "{ended} ended of {received} received");
    eventually(WAIT, "sixty committed", || async {
        (b.committed_total(2).await == 60).then_some(())
    })
    .await;
    let text = eventually(WAIT, "lag reaches zero", || async {
        let t = b.metrics().await;
        // Lag is known once the high watermarks are (read once a second).
        (metric_sum(&t, "ferry_high_watermark_offset", &[]) == 60.0
            && t.contains("ferry_consumer_lag_records{")
            && metric_sum(&t, "ferry_consumer_lag_records", &[]) == 0.0
            && metric_sum(&t, "ferry_committed_offset", &[]) == 60.0)
            .then_some(t)
    })
    .await;
    let received = metric_sum(&text, "ferry_records_received_total", &["route=\"test\""]);
    let outcomes = metric_sum(&text, "ferry_outcomes_total", &["route=\"test\""]);
    let in_flight = metric_sum(&text, "ferry_records_in_flight", &["route=\"test\""]);
    let abandoned = metric_sum(&text, "ferry_records_abandoned_total", &["route=\"test\""]);
    assert_eq!(received, 60.0);
    assert_eq!(received, outcomes + in_flight + abandoned, "{text}");
    assert_eq!(
        metric_sum(&text, "ferry_outcomes_total", &["outcome=\"replied\""]),
        48.0
    );
    assert_eq!(
        metric_sum(
            &text,
            "ferry_outcomes_total",
            &["outcome=\"dead_lettered\"", "reason=\"status\""]
        ),
        6.0
    );
    assert_eq!(
        metric_sum(&text, "ferry_outcomes_total", &["outcome=\"dropped\""]),
        6.0
    );
    assert_eq!(
        metric_sum(
            &text,
            "ferry_call_duration_seconds_count",
            &["transport=\"http\"", "result=\"2xx\""]
        ),
        48.0
    );
    assert_eq!(
        metric_sum(&text, "ferry_call_duration_seconds_count", &["result=\"4xx\""]),
        12.0
    );
    assert!(metric_sum(&text, "ferry_call_duration_seconds_bucket", &["le=\"0.0005\""]) >= 0.0);
    assert_eq!(
        metric_sum(&text, "ferry_end_to_end_latency_seconds_count", &[]),
        60.0,
        "every record had a timestamp\n{text}"
    );
    assert_eq!(metric_sum(&text, "ferry_high_watermark_offset", &[]), 60.0);
    assert_eq!(
        metric_sum(&text, "ferry_assigned_partitions", &["route=\"test\""]),
        2.0,
        "both partitions of the source"
    );
    assert_eq!(
        metric_sum(&text, "ferry_circuit_state", &["state=\"closed\""]),
        1.0
    );
    assert_eq!(metric_sum(&text, "ferry_ready", &[]), 1.0);
    assert!(metric_sum(&text, "ferry_commits_total", &["result=\"ok\""]) >= 1.0);
    // Only while something is paused or in flight; only with delivery: exactly_once.
    let sometimes = [
        ferry::telemetry::names::PAUSED_PARTITIONS,
        ferry::telemetry::names::OLDEST_IN_FLIGHT,
        ferry::telemetry::names::TRANSACTIONS,
    ];
    for name in ferry::telemetry::names::ALL
        .iter()
        .filter(|n| !sometimes.contains(n))
    {
        assert!(
            text.contains(&format!("# TYPE {name} ")),
            "{name} is not exported"
        );
    }
    // The snapshot the tests and the demo read is the same data.
    let snapshot = &b.sidecar.snapshot()[0];
    assert_eq!(snapshot.received, 60);
    assert_eq!(snapshot.finished() + snapshot.in_flight + snapshot.abandoned, 60);
    promtool_check(&text);
}

/// `promtool check metrics` on a scrape, when promtool is installed (CI installs it and sets
/// FERRY_REQUIRE_TOOLS so that a missing tool fails instead of skipping).
fn promtool_check(text: &str) {
    use std::io::Write;
    let child = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) => {
            assert!(
                std::env::var("FERRY_REQUIRE_TOOLS").is_err(),
                "promtool is required: {e}"
            );
            eprintln!("skipping promtool check: promtool not found ({e})");
            return;
        }
    };
    child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "promtool check metrics failed:\n{report}");
    assert!(report.trim().is_empty(), "promtool has remarks:\n{report}");
}

#[tokio::test]
async fn pause_stops_taking_records_until_resume() {
    let b = bench(1, Duration::ZERO).await;
    // A first record gives the group a committed offset to measure lag from.
    b.send_values(&["first"]).await;
    eventually(WAIT, "the first record committed", || async {
        (b.committed_total(1).await == 1).then_some(())
    })
    .await;
    let (code, _, body) = admin_call("POST", &format!("{}/pause?route=test", b.base), None).await;
    assert_eq!(code, 200, "{body}");
    let done: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(done["paused"], true);
    assert_eq!(done["routes"][0], "test");
    b.send_values(&["a", "b", "c", "d", "e"]).await;
    let s = eventually(WAIT, "the paused partition shows its reason and lag", || async {
        let s = b.status().await;
        let p = s.routes[0].partitions.first()?;
        (p.paused.contains(&"operator".to_string()) && p.lag == Some(5)).then_some(s)
    })
    .await;
    assert!(s.routes[0].paused);
    assert!(s.ready, "a pause is not a drain: the pod stays ready");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(b.service.requests().len(), 1, "nothing is called while paused");
    let text = b.metrics().await;
    assert_eq!(
        metric_sum(&text, "ferry_paused_partitions", &["reason=\"operator\""]),
        1.0
    );
    assert_eq!(metric_sum(&text, "ferry_consumer_lag_records", &[]), 5.0);

    let (code, _, _) = admin_call("POST", &format!("{}/resume", b.base), None).await;
    assert_eq!(code, 200);
    let replies = b.kafka.read(&b.topics.reply, 6, WAIT).await;
    assert_eq!(replies.len(), 6);
    assert!(!b.status().await.routes[0].paused);
}

#[tokio::test]
async fn drain_finishes_in_flight_commits_and_turns_unready_until_resume() {
    let b = bench(1, Duration::from_millis(300)).await;
    b.send_values(&["a", "b", "c"]).await;
    eventually(WAIT, "a call under way", || async {
        (!b.service.requests().is_empty()).then_some(())
    })
    .await;
    let (code, _, body) = admin_call("POST", &format!("{}/drain", b.base), None).await;
    assert_eq!(code, 200, "{body}");
    let done: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(done["drained"], true, "{body}");
    assert_eq!(done["in_flight"], 0);
    // Drained means: what was taken is final and committed.
    let s = b.status().await;
    let p = &s.routes[0].partitions[0];
    assert_eq!(p.in_flight, 0);
    let handled = b.service.requests().len() as i64;
    assert_eq!(p.committed, Some(handled), "everything handled is committed");
    assert_eq!(b.committed_total(1).await, handled);
    assert!(s.draining && !s.ready && s.routes[0].draining);
    let (code, _, body) = admin_call("GET", &format!("{}/readyz", b.base), None).await;
    assert_eq!((code, body.as_str()), (503, "not ready: draining\n"));
    // Nothing new is taken while drained.
    b.send_values(&["late"]).await;
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(b.service.requests().len() as i64, handled);

    let (code, _, _) = admin_call("POST", &format!("{}/resume", b.base), None).await;
    assert_eq!(code, 200);
    eventually(WAIT, "ready again", || async {
        (admin_call("GET", &format!("{}/readyz", b.base), None).await.0 == 200).then_some(())
    })
    .await;
    eventually(WAIT, "the rest committed after resume", || async {
        (b.committed_total(1).await == 4).then_some(())
    })
    .await;
}

/// SPEC §1: pauses have reasons, and a partition resumes only when every reason has cleared.
/// An operator's pause and a drain on top of it are two reasons, both shown.
#[tokio::test]
async fn a_pause_and_a_drain_are_two_reasons_until_resume() {
    let b = bench(1, Duration::ZERO).await;
    let reasons = || async {
        let s = b.status().await;
        s.routes[0].partitions.first().map(|p| p.paused.clone())
    };
    assert_eq!(
        admin_call("POST", &format!("{}/pause", b.base), None).await.0,
        200
    );
    eventually(WAIT, "paused by the operator", || async {
        (reasons().await? == ["operator"]).then_some(())
    })
    .await;
    assert_eq!(
        admin_call("POST", &format!("{}/drain", b.base), None).await.0,
        200
    );
    eventually(WAIT, "paused and drained", || async {
        (reasons().await? == ["operator", "drain"]).then_some(())
    })
    .await;
    assert_eq!(
        admin_call("POST", &format!("{}/resume", b.base), None).await.0,
        200
    );
    eventually(WAIT, "both cleared", || async {
        reasons().await?.is_empty().then_some(())
    })
    .await;
}

#[tokio::test]
async fn unknown_route_is_refused_with_the_known_ones() {
    let b = bench(1, Duration::ZERO).await;
    let (code, content_type, body) = admin_call("POST", &format!("{}/pause?route=nope", b.base), None).await;
    assert_eq!(code, 404);
    assert!(content_type.starts_with("application/json"));
    assert!(
        body.contains("no route named `nope`") && body.contains("test"),
        "{body}"
    );
    let (code, _, body) = admin_call("GET", &format!("{}/status?route=nope", b.base), None).await;
    assert_eq!(code, 404, "{body}");
    let (code, _, body) = admin_call("GET", &format!("{}/status?route=test", b.base), None).await;
    assert_eq!(code, 200, "{body}");
    let one: Status = serde_json::from_str(&body).unwrap();
    assert_eq!(one.routes.len(), 1);
}

/// A whole drain holds readiness until no route is drained, resumed all at once or one by one.
#[tokio::test]
async fn after_a_whole_drain_resuming_each_route_makes_ferry_ready_again() {
    let kafka = Kafka::start();
    let t = kafka.route_topics(1).await;
    let other = kafka.topic("other", 1).await;
    let service = Service::start(|r: Req| async move { Resp::new(200, &r.body) }).await;
    let second = format!(
        "  - name: second\n    from: {{ topics: [{other}] }}\n    call: {{ http: {{ url: \"{}\" }} }}\n    dead_letter: {{ to: {} }}\n",
        service.url("/second"),
        t.dlq
    );
    let sidecar = Sidecar::start(parse(&route_config(&kafka, &t, &service.url("/h"), &second)))
        .await
        .expect("sidecar starts");
    let base = format!("http://{}", sidecar.admin_addr.expect("admin listens"));
    let readyz = || async { admin_call("GET", &format!("{base}/readyz"), None).await };
    eventually(WAIT, "ready", || async {
        (readyz().await.0 == 200).then_some(())
    })
    .await;
    assert_eq!(admin_call("POST", &format!("{base}/drain"), None).await.0, 200);
    assert_eq!(
        readyz().await,
        (
            503,
            "text/plain; charset=utf-8".into(),
            "not ready: draining\n".into()
        )
    );
    assert_eq!(
        admin_call("POST", &format!("{base}/resume?route=test"), None)
            .await
            .0,
        200
    );
    assert_eq!(readyz().await.0, 503, "the other route is still drained");
    assert_eq!(
        admin_call("POST", &format!("{base}/resume?route=second"), None)
            .await
            .0,
        200
    );
    eventually(WAIT, "ready again", || async {
        (readyz().await.0 == 200).then_some(())
    })
    .await;
    sidecar.shutdown();
}

/// While ferry stops (SIGTERM) it takes nothing new, and a resume says so rather than seem to
/// undo it.
#[tokio::test]
async fn a_resume_while_ferry_stops_is_refused() {
    let b = bench(1, Duration::from_millis(1500)).await;
    b.send_values(&["slow"]).await;
    eventually(WAIT, "a call under way", || async {
        (!b.service.requests().is_empty()).then_some(())
    })
    .await;
    b.sidecar.shutdown();
    eventually(WAIT, "stopping", || async {
        (admin_call("GET", &format!("{}/readyz", b.base), None).await.0 == 503).then_some(())
    })
    .await;
    let (code, _, body) = admin_call("POST", &format!("{}/resume", b.base), None).await;
    assert_eq!(code, 409, "{body}");
    assert!(body.contains("ferry is stopping"), "{body}");
}

/// The sidecar's real admin state served again under another access rule: the verbs' code is
/// the same, only who may call them changes (tests listen on loopback only).
async fn serve_with(b: &Bench, access: Access) -> String {
    let a = &b.sidecar.admin;
    let copy = Arc::new(Admin {
        health: a.health.clone(),
        control: a.control.clone(),
        tracker: a.tracker.clone(),
        metrics: a.metrics.clone(),
        routes: a.routes.clone(),
        access,
        drain_timeout: a.drain_timeout,
        prestop: a.prestop,
        scrape: std::sync::Mutex::new(()),
    });
    let addr = admin::serve("127.0.0.1:0".parse().unwrap(), copy, CancellationToken::new())
        .await
        .unwrap();
    format!("http://{addr}")
}

#[tokio::test]
async fn off_loopback_the_verbs_need_the_token_and_without_one_are_disabled() {
    let b = bench(1, Duration::ZERO).await;
    let off_loopback: std::net::SocketAddr = "0.0.0.0:9464".parse().unwrap();
    assert!(matches!(Access::new(off_loopback, None), Access::Disabled));
    assert!(matches!(
        Access::new("127.0.0.1:9464".parse().unwrap(), None),
        Access::Loopback
    ));
    assert!(matches!(
        Access::new("[::1]:9464".parse().unwrap(), Some(Secret::new("t"))),
        Access::Loopback
    ));

    let token = "s3cr3t-admin-token";
    let guarded = serve_with(&b, Access::new(off_loopback, Some(Secret::new(token)))).await;
    for path in ["healthz", "readyz", "metrics", "status"] {
        let (code, _, _) = admin_call("GET", &format!("{guarded}/{path}"), None).await;
        assert_eq!(code, 200, "GET /{path} is open");
    }
    // A guess says what there is.
    let (code, _, body) = admin_call("GET", &format!("{guarded}/ready"), None).await;
    assert_eq!(code, 404);
    assert!(
        body.starts_with("no GET /ready: ferry's admin endpoint serves GET /healthz, /readyz"),
        "{body}"
    );
    let (code, _, body) = admin_call("GET", &format!("{guarded}/drain"), None).await;
    assert_eq!(code, 405);
    assert!(body.starts_with("no GET /drain: "), "{body}");
    for verb in ["pause", "resume", "drain"] {
        let url = format!("{guarded}/{verb}");
        let (code, _, body) = admin_call("POST", &url, None).await;
        assert_eq!(code, 401, "{verb} without a token: {body}");
        let (code, _, _) = admin_call("POST", &url, Some("s3cr3t-admin-tokeN")).await;
        assert_eq!(code, 401, "{verb} with a wrong token");
        let (code, _, _) = admin_call("POST", &url, Some(token)).await;
        assert_eq!(code, 200, "{verb} with the token");
        // The scheme's name is case-insensitive.
        let lower = reqwest::Client::builder().no_proxy().build().unwrap();
        let code = lower
            .post(&url)
            .header("authorization", format!("bearer {token}"))
            .send()
            .await
            .unwrap()
            .status();
        assert_eq!(code, 200, "{verb} with `bearer`");
    }
    let text = b.metrics().await;
    assert_eq!(metric_sum(&text, "ferry_admin_unauthorized_total", &[]), 6.0);

    let disabled = serve_with(&b, Access::new(off_loopback, None)).await;
    for verb in ["pause", "resume", "drain"] {
        let (code, _, body) = admin_call("POST", &format!("{disabled}/{verb}"), Some(token)).await;
        assert_eq!(code, 403, "{verb}: {body}");
        assert!(body.contains("admin.token is not set"), "{body}");
    }
    let (code, _, _) = admin_call("GET", &format!("{disabled}/status"), None).await;
    assert_eq!(code, 200);
    assert!(!b.status().await.routes[0].paused, "no refused verb took effect");
}

/// Every path and method of `docs/admin-api.yaml` answers as documented: a documented status,
/// the documented content type, and a JSON body that fits the documented schema.
#[tokio::test]
async fn openapi_document_matches_the_server() {
    let b = bench(1, Duration::ZERO).await;
    b.send_values(&["a", "bad"]).await;
    eventually(WAIT, "both committed", || async {
        (b.committed_total(1).await == 2).then_some(())
    })
    .await;
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/admin-api.yaml")).unwrap();
    let doc = ferry::config::Document::parse(&text, &ferry::config::Interpolator::from_pairs(&[]))
        .expect("the OpenAPI document is valid YAML")
        .value;
    assert_eq!(doc["openapi"], "3.1.0");
    let paths = doc["paths"].as_object().expect("paths");
    let mut checked = 0;
    // `pause` before `resume` and `drain` last, so every verb finds the state it expects.
    let order = [
        "/healthz", "/readyz", "/metrics", "/status", "/pause", "/resume", "/prestop", "/drain",
    ];
    assert_eq!(
        paths.len(),
        order.len(),
        "a path is documented but not tested here"
    );
    for path in order {
        let item = paths
            .get(path)
            .unwrap_or_else(|| panic!("{path} is not documented"));
        for (method, op) in item.as_object().unwrap() {
            let url = format!("{}{path}", b.base);
            let (code, content_type, body) = admin_call(&method.to_uppercase(), &url, None).await;
            let response = &op["responses"][code.to_string()];
            assert!(
                response.is_object(),
                "{method} {path} answered {code}, which is not documented"
            );
            let response = resolve(&doc, response);
            let media = content_type.split(';').next().unwrap().trim();
            let schema = &response["content"][media]["schema"];
            assert!(
                schema.is_object(),
                "{method} {path} answered {media}, documented: {}",
                response["content"]
            );
            if media == "application/json" {
                let mut root = schema.clone();
                root["components"] = doc["components"].clone();
                let validator = jsonschema::validator_for(&root).expect("the documented schema compiles");
                let value: serde_json::Value = serde_json::from_str(&body).unwrap();
                let errors: Vec<String> = validator
                    .iter_errors(&value)
                    .map(|e| format!("{} at {}", e, e.instance_path()))
                    .collect();
                assert!(errors.is_empty(), "{method} {path}: {errors:?}\n{body}");
            }
            checked += 1;
        }
    }
    assert_eq!(checked, 8);
    // The error answers are documented too.
    let (code, _, body) = admin_call("POST", &format!("{}/pause?route=nope", b.base), None).await;
    let documented = resolve(
        &doc,
        &doc["paths"]["/pause"]["post"]["responses"][code.to_string()],
    );
    let mut root = documented["content"]["application/json"]["schema"].clone();
    root["components"] = doc["components"].clone();
    let value: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert!(
        jsonschema::validator_for(&root).unwrap().is_valid(&value),
        "{body}"
    );
}

/// Follows a `$ref` to `#/components/...`.
fn resolve<'a>(doc: &'a serde_json::Value, v: &'a serde_json::Value) -> &'a serde_json::Value {
    match v["$ref"].as_str() {
        Some(r) => doc.pointer(r.trim_start_matches('#')).expect("the $ref resolves"),
        None => v,
    }
}

fn ctl(args: &[&str]) -> (i32, String, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ferry"))
        .arg("ctl")
        .args(args)
        .env_remove("FERRY_ADMIN_TOKEN")
        .env_remove("FERRY_ADMIN_URL")
        .output()
        .expect("ferry runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

#[test]
fn ctl_with_an_admin_url_that_is_none_is_a_usage_error() {
    let (code, _, err) = ctl(&["status", "--admin", "notaurl"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--admin `notaurl` is not a URL"), "{err}");
}

#[tokio::test]
async fn a_drain_that_times_out_exits_1_with_json_as_without() {
    // A call that lasts longer than the drain timeout (5 s), with a call timeout longer still.
    let kafka = Kafka::start();
    let t = kafka.route_topics(1).await;
    let service = Service::start(|_r: Req| async {
        tokio::time::sleep(Duration::from_secs(60)).await;
        Resp::new(200, "late")
    })
    .await;
    let text = route_config(&kafka, &t, &service.url("/h"), "").replace("timeout: 2s", "timeout: 30s");
    let sidecar = Sidecar::start(parse(&text)).await.unwrap();
    let base = format!("http://{}", sidecar.admin_addr.unwrap());
    kafka.send(&t.source, None, Some("k"), "slow", &[]).await;
    eventually(WAIT, "the call under way", || async {
        (!service.requests().is_empty()).then_some(())
    })
    .await;
    let (code, out, err) =
        tokio::task::spawn_blocking(move || ctl(&["drain", "--json", "--admin", base.as_str()]))
            .await
            .unwrap();
    assert_eq!(code, 1, "{out}{err}");
    let done: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(done["drained"], false, "{out}");
}

#[tokio::test]
async fn ctl_shows_a_table_and_steers_the_sidecar() {
    let b = bench(2, Duration::ZERO).await;
    b.send_values(&["a", "b", "bad"]).await;
    eventually(WAIT, "three committed", || async {
        (b.committed_total(2).await == 3).then_some(())
    })
    .await;
    let base = b.base.clone();
    let run = move |args: Vec<String>| {
        tokio::task::spawn_blocking(move || ctl(&args.iter().map(String::as_str).collect::<Vec<_>>()))
    };
    let (code, out, err) = run(vec!["status".into(), "--admin".into(), base.clone()])
        .await
        .unwrap();
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("ready"), "{out}");
    let header = out
        .lines()
        .find(|l| l.starts_with("ROUTE"))
        .expect("a route table");
    for column in ["STATE", "CIRCUIT", "IN FLIGHT", "LAG", "RECEIVED", "OUTCOMES"] {
        assert!(header.contains(column), "{header}");
    }
    let row = out
        .lines()
        .find(|l| l.starts_with("test "))
        .expect("a row for the route");
    assert!(
        row.contains("running")
            && row.contains("closed")
            && row.contains("replied=2")
            && row.contains("dead_lettered=1"),
        "{row}"
    );
    let partitions = out
        .lines()
        .filter(|l| l.starts_with(&format!("{}/", b.topics.source)))
        .count();
    assert_eq!(partitions, 2, "{out}");

    let (code, out, err) = run(vec![
        "pause".into(),
        "--admin".into(),
        base.clone(),
        "--route".into(),
        "test".into(),
    ])
    .await
    .unwrap();
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("paused test"), "{out}");
    assert!(b.status().await.routes[0].paused);
    let (_, out, _) = run(vec!["status".into(), "--admin".into(), base.clone()])
        .await
        .unwrap();
    assert!(
        out.lines()
            .any(|l| l.starts_with("test ") && l.contains("paused")),
        "{out}"
    );
    let (code, out, _) = run(vec!["resume".into(), "--admin".into(), base.clone()])
        .await
        .unwrap();
    assert_eq!((code, out.trim()), (0, "resumed test"));
    let (code, out, _) = run(vec!["drain".into(), "--admin".into(), base.clone()])
        .await
        .unwrap();
    assert_eq!(code, 0);
    assert!(out.contains("drained test"), "{out}");
    let (code, out, _) = run(vec![
        "status".into(),
        "--json".into(),
        "--admin".into(),
        base.clone(),
    ])
    .await
    .unwrap();
    assert_eq!(code, 0);
    let s: Status = serde_json::from_str(&out).unwrap();
    assert!(s.draining);

    // Failures say what went wrong and what to do.
    let (code, _, err) = run(vec![
        "pause".into(),
        "--admin".into(),
        base.clone(),
        "--route".into(),
        "nope".into(),
    ])
    .await
    .unwrap();
    assert_eq!(code, 1);
    assert!(err.contains("no route named `nope`"), "{err}");
    for json in [false, true] {
        let mut args = vec![
            "status".to_string(),
            "--admin".into(),
            base.clone(),
            "--route".into(),
            "nope".into(),
        ];
        if json {
            args.push("--json".into());
        }
        let (code, out, err) = run(args).await.unwrap();
        assert_eq!(
            code, 1,
            "status of an unknown route is an error, not an empty table: {out}"
        );
        assert!(err.contains("no route named `nope`; routes are: test"), "{err}");
    }
    let guarded = serve_with(
        &b,
        Access::new("0.0.0.0:1".parse().unwrap(), Some(Secret::new("tok"))),
    )
    .await;
    let (code, _, err) = run(vec!["pause".into(), "--admin".into(), guarded.clone()])
        .await
        .unwrap();
    assert_eq!(code, 1);
    assert!(err.contains("401") && err.contains("--token"), "{err}");
    let (code, _, err) = run(vec![
        "pause".into(),
        "--admin".into(),
        guarded,
        "--token".into(),
        "tok".into(),
    ])
    .await
    .unwrap();
    assert_eq!(code, 0, "{err}");
    let port = free_port();
    let (code, _, err) = run(vec![
        "status".into(),
        "--admin".into(),
        format!("http://127.0.0.1:{port}"),
    ])
    .await
    .unwrap();
    assert_eq!(code, 1);
    assert!(err.contains("cannot reach the admin endpoint"), "{err}");
}

#[tokio::test]
async fn prestop_drains_only_when_the_config_allows_it() {
    let b = bench(1, Duration::from_millis(200)).await;
    let (code, _, body) = admin_call("GET", &format!("{}/prestop", b.base), None).await;
    assert_eq!(code, 404, "off by default: {body}");
    assert!(body.contains("admin.prestop"), "{body}");

    let kafka = &b.kafka;
    let t = kafka.route_topics(1).await;
    let text = route_config(kafka, &t, &b.service.url("/h"), "").replace(
        "admin:\n  listen: 127.0.0.1:0\n",
        "admin:\n  listen: 127.0.0.1:0\n  prestop: true\n",
    );
    let sidecar = Sidecar::start(parse(&text)).await.unwrap();
    let base = format!("http://{}", sidecar.admin_addr.unwrap());
    for i in 0..3 {
        kafka
            .send(&t.source, None, Some(&format!("k{i}")), "v", &[])
            .await;
    }
    eventually(WAIT, "a call under way", || async {
        (!b.service.requests().is_empty()).then_some(())
    })
    .await;
    let (code, _, body) = admin_call("GET", &format!("{base}/prestop"), None).await;
    assert_eq!(code, 200, "{body}");
    let done: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        (done["drained"].as_bool(), done["in_flight"].as_u64()),
        (Some(true), Some(0))
    );
    let (code, _, _) = admin_call("GET", &format!("{base}/readyz"), None).await;
    assert_eq!(code, 503, "a drained pod leaves the Service's endpoints");
    let p = &sidecar.partitions()[0];
    assert_eq!(p.in_flight, 0);
    assert_eq!(
        p.committed,
        p.committable.or(p.committed),
        "what finished is committed"
    );

    // A preStop hook that no stop follows (the container restarted, the pod stays): with
    // resume_after, ferry takes records again by itself, once the drain could have ended (the
    // drain timeout, 5 s here)...
    let prestop = |query: &'static str| {
        let url = format!("{base}/prestop{query}");
        async move { admin_call("GET", &url, None).await }
    };
    // ...unless a verb came after it: here another preStop drain, which has no resume_after.
    assert_eq!(prestop("?resume_after=1").await.0, 200);
    assert_eq!(prestop("").await.0, 200);
    tokio::time::sleep(Duration::from_secs(7)).await;
    let (code, _, _) = admin_call("GET", &format!("{base}/readyz"), None).await;
    assert_eq!(code, 503, "a later drain is not undone by an earlier one's timer");
    let (code, _, body) = prestop("?resume_after=1").await;
    assert_eq!(code, 200, "{body}");
    eventually(WAIT, "ready again", || async {
        (admin_call("GET", &format!("{base}/readyz"), None).await.0 == 200).then_some(())
    })
    .await;
    let called = b.service.requests().len();
    kafka.send(&t.source, None, Some("after"), "v", &[]).await;
    eventually(WAIT, "the record after it called", || async {
        (b.service.requests().len() > called).then_some(())
    })
    .await;
}
