//! The real binary's life: killed mid-stream and restarted without loss, SIGTERM drains and
//! exits 0, a second signal exits at once, the start-up code let go, the runtime's threads.

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;

const WAIT: Duration = Duration::from_secs(60);

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct Setup {
    kafka: Kafka,
    source: String,
    reply: String,
    group: String,
    dir: tempfile::TempDir,
    config: std::path::PathBuf,
    admin: u16,
}

async fn setup(partitions: i32, service: &Service) -> Setup {
    let kafka = Kafka::start();
    let RouteTopics {
        source,
        reply,
        dlq,
        group,
    } = kafka.route_topics(partitions).await;
    let admin = free_port();
    let text = config_text(
        &kafka,
        &group,
        &source,
        &service.url("/"),
        &reply,
        &dlq,
        "    ordering: partition\n",
    )
    .replace("listen: 127.0.0.1:0", &format!("listen: 127.0.0.1:{admin}"));
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("ferry.yaml");
    std::fs::write(&config, text).unwrap();
    Setup {
        kafka,
        source,
        reply,
        group,
        dir,
        config,
        admin,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_mid_stream_and_restarted_loses_nothing() {
    let service = Service::start(|req: Req| async move {
        tokio::time::sleep(Duration::from_millis(15)).await;
        Resp::new(200, &req.body)
    })
    .await;
    let s = setup(3, &service).await;
    let mut ends: HashMap<i32, i64> = HashMap::new();
    let mut sent = Vec::new();
    for i in 0..300 {
        let (p, o) = s
            .kafka
            .send(
                &s.source,
                Some(i % 3),
                Some(&format!("k{i}")),
                &format!("v{i}"),
                &[],
            )
            .await;
        ends.insert(p, o + 1);
        sent.push((p, o));
    }

    let mut first = Ferry::spawn(&s.config, &s.dir.path().join("first.log"));
    let before_kill = s.kafka.read(&s.reply, 60, WAIT).await.len();
    assert!(before_kill >= 60, "the first instance made progress");
    let committed_at_kill = s.kafka.committed(&s.group, &s.source, 3).await;
    first.signal(libc::SIGKILL);
    first.exit_code(WAIT).await;
    let replies_at_kill = s
        .kafka
        .read(&s.reply, 300, Duration::from_millis(500))
        .await
        .len();
    assert!(
        replies_at_kill < 300,
        "killed mid-stream, not after the end ({replies_at_kill} replies)"
    );

    let mut second = Ferry::spawn(&s.config, &s.dir.path().join("second.log"));
    let total: i64 = ends.values().sum();
    eventually(WAIT, "every record committed after the restart", || async {
        (s.kafka.committed_total(&s.group, &s.source, 3).await == total).then_some(())
    })
    .await;
    second.signal(libc::SIGTERM);
    assert_eq!(second.exit_code(WAIT).await, Some(0));

    let replies = s.kafka.read_all(&s.reply).await;
    let mut seen: HashMap<(i32, i64), usize> = HashMap::new();
    for r in &replies {
        let p: i32 = r.header("ferry.source.partition").unwrap().parse().unwrap();
        let o: i64 = r.header("ferry.source.offset").unwrap().parse().unwrap();
        *seen.entry((p, o)).or_default() += 1;
    }
    for (p, o) in &sent {
        assert!(seen.contains_key(&(*p, *o)), "record {p}/{o} was lost");
    }
    for ((p, o), n) in &seen {
        if *n > 1 {
            let committed = committed_at_kill[*p as usize].unwrap_or(0);
            assert!(
                *o >= committed,
                "{p}/{o} repeated ({n}x) although it was committed ({committed}) before the kill"
            );
        }
    }
    eprintln!(
        "kill test: {} replies for 300 records; {} before the kill; committed at kill {:?}",
        replies.len(),
        before_kill,
        committed_at_kill
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_in_flight_commits_and_exits_zero() {
    let service = Service::start(|_req: Req| async move {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        Resp::new(200, "finished during the drain")
    })
    .await;
    let s = setup(1, &service).await;
    s.kafka.send(&s.source, None, Some("k"), "v", &[]).await;
    let mut ferry = Ferry::spawn(&s.config, &s.dir.path().join("ferry.log"));
    eventually(WAIT, "the record reached the service", || async {
        (!service.requests().is_empty()).then_some(())
    })
    .await;
    ferry.signal(libc::SIGTERM);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let ready = reqwest::get(format!("http://127.0.0.1:{}/readyz", s.admin))
        .await
        .unwrap();
    assert_eq!(ready.status().as_u16(), 503, "unready while draining");
    let live = reqwest::get(format!("http://127.0.0.1:{}/healthz", s.admin))
        .await
        .unwrap();
    assert_eq!(live.status().as_u16(), 200, "still live while draining");

    assert_eq!(ferry.exit_code(WAIT).await, Some(0));
    let replies = s.kafka.read(&s.reply, 1, Duration::from_secs(5)).await;
    assert_eq!(
        replies.len(),
        1,
        "the in-flight record finished and its reply was flushed"
    );
    assert_eq!(
        s.kafka.committed(&s.group, &s.source, 1).await,
        vec![Some(1)],
        "and it was committed"
    );
    let log = std::fs::read_to_string(s.dir.path().join("ferry.log")).unwrap();
    assert!(log.contains("leaving the consumer group"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_signal_exits_at_once() {
    let release = Arc::new(tokio::sync::Semaphore::new(0));
    let held = release.clone();
    let service = Service::start(move |_req: Req| {
        let held = held.clone();
        async move {
            let _p = held.acquire().await;
            Resp::new(200, "late")
        }
    })
    .await;
    let s = setup(1, &service).await;
    s.kafka.send(&s.source, None, Some("k"), "v", &[]).await;
    let mut ferry = Ferry::spawn(&s.config, &s.dir.path().join("ferry.log"));
    eventually(WAIT, "the record reached the service", || async {
        (!service.requests().is_empty()).then_some(())
    })
    .await;
    ferry.signal(libc::SIGTERM);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = Instant::now();
    ferry.signal(libc::SIGINT);
    assert_eq!(ferry.exit_code(Duration::from_secs(3)).await, Some(1));
    assert!(started.elapsed() < Duration::from_secs(3));
    release.add_permits(1);
    assert_eq!(
        s.kafka.committed(&s.group, &s.source, 1).await,
        vec![None],
        "nothing final, nothing committed"
    );
}

/// `ferry run` lets go of its start-up code's pages once it has run a while (src/memory.rs):
/// it says so, its resident file-backed memory falls, and records still flow through the code
/// it maps back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_up_code_is_let_go_and_records_still_flow() {
    let service = Service::start(|req: Req| async move { Resp::new(200, &req.body) }).await;
    let s = setup(1, &service).await;
    s.kafka.send(&s.source, Some(0), Some("k"), "before", &[]).await;
    let log = s.dir.path().join("ferry.log");
    let mut ferry = Ferry::spawn(&s.config, &log);
    s.kafka.read(&s.reply, 1, WAIT).await;
    let file_kib = || {
        let status = std::fs::read_to_string(format!("/proc/{}/status", ferry.pid())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("RssFile:"))
            .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
            .unwrap()
    };
    let before = file_kib();
    eventually(WAIT, "the start-up code let go", || async {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        text.contains("Let go of the start-up code's pages").then_some(())
    })
    .await;
    let after = file_kib();
    assert!(
        after < before,
        "resident file-backed memory fell: {before} KiB before, {after} KiB after"
    );
    for i in 0..20 {
        s.kafka
            .send(&s.source, Some(0), Some("k"), &format!("after{i}"), &[])
            .await;
    }
    let replies = s.kafka.read(&s.reply, 21, WAIT).await;
    assert_eq!(replies.len(), 21, "records flow after the release");
    ferry.signal(libc::SIGTERM);
    assert_eq!(ferry.exit_code(WAIT).await, Some(0), "and it stops cleanly");
}

/// The runtime's worker threads, as `ferry run` reports them at start (tokio's own count).
async fn runtime_workers(log: &std::path::Path) -> String {
    eventually(WAIT, "the start line", || async {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        let line = text.lines().find(|l| l.contains("ferry started"))?.to_string();
        let at = line.find("runtime_workers")? + "runtime_workers".len();
        let n: String = line[at..]
            .chars()
            .skip_while(|c| !c.is_ascii_digit())
            .take_while(char::is_ascii_digit)
            .collect();
        Some(n)
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn async_work_runs_on_one_thread_unless_ferry_worker_threads_says_otherwise() {
    let service = Service::start(|req: Req| async move { Resp::new(200, &req.body) }).await;
    let s = setup(2, &service).await;
    let log = s.dir.path().join("ferry.log");
    let mut ferry = Ferry::spawn(&s.config, &log);
    for i in 0..10 {
        s.kafka
            .send(
                &s.source,
                Some(i % 2),
                Some(&format!("k{i}")),
                &format!("v{i}"),
                &[],
            )
            .await;
    }
    assert_eq!(
        s.kafka.read(&s.reply, 10, WAIT).await.len(),
        10,
        "records flow on one worker"
    );
    assert_eq!(runtime_workers(&log).await, "1", "one worker by default");
    let said = std::fs::read_to_string(&log).unwrap();
    assert!(
        !said.contains('\u{1b}'),
        "no colour codes in a log that is not a terminal: {said}"
    );
    ferry.signal(libc::SIGTERM);
    assert_eq!(ferry.exit_code(WAIT).await, Some(0));

    let wide = Ferry::spawn_with(&s.config, &log, &[("FERRY_WORKER_THREADS", "3")]);
    assert_eq!(runtime_workers(&log).await, "3", "three when told");
    s.kafka.send(&s.source, Some(0), Some("k"), "wide", &[]).await;
    eventually(WAIT, "records flow on three workers", || async {
        let replies = s.kafka.read_all(&s.reply).await;
        replies
            .iter()
            .any(|r| r.value.as_deref() == Some("wide"))
            .then_some(())
    })
    .await;
    drop(wide);

    let mut bad = Ferry::spawn_with(&s.config, &log, &[("FERRY_WORKER_THREADS", "many")]);
    assert_eq!(bad.exit_code(WAIT).await, Some(78), "a configuration error");
    let said = std::fs::read_to_string(&log).unwrap();
    assert!(
        said.contains("FERRY_WORKER_THREADS=\"many\" is not a number of threads"),
        "the error names the variable and its value: {said}"
    );
}

/// After a restart, a partition with nothing new shows the offset committed before it and no
/// lag (it showed neither until its next record).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_restart_an_idle_partition_shows_its_committed_offset_and_lag() {
    use ferry::sidecar::Sidecar;
    let kafka = Kafka::start();
    let t = kafka.route_topics(1).await;
    let service = Service::start(|r: Req| async move { Resp::new(200, &r.body) }).await;
    let text = route_config(&kafka, &t, &service.url("/h"), "");
    let first = Sidecar::start(parse(&text)).await.unwrap();
    for i in 0..3 {
        kafka
            .send(&t.source, None, Some("k"), &format!("v{i}"), &[])
            .await;
    }
    eventually(WAIT, "3 committed", || async {
        (kafka.committed_total(&t.group, &t.source, 1).await == 3).then_some(())
    })
    .await;
    first.shutdown();
    first.wait().await.unwrap();

    let second = Sidecar::start(parse(&text)).await.unwrap();
    eventually(
        WAIT,
        "the committed offset and lag of the idle partition",
        || async {
            let p = second.partitions().into_iter().next()?;
            (p.committed == Some(3) && p.lag == Some(0)).then_some(())
        },
    )
    .await;
    assert_eq!(service.requests().len(), 3, "nothing handled again");
    second.shutdown();
    second.wait().await.unwrap();
}
