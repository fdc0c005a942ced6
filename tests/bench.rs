//! The local bench through the real binary, against a broker on loopback: `ferry send`,
//! `ferry tail` and `ferry redrive`.

mod common;

use std::io::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::*;

const WAIT: Duration = Duration::from_secs(30);

/// Runs `ferry ARGS` with `stdin`, off the async runtime; exit code, stdout, stderr.
async fn ferry(args: Vec<String>, stdin: &str) -> (i32, String, String) {
    let stdin = stdin.to_string();
    tokio::task::spawn_blocking(move || {
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_ferry"))
            .args(&args)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(stdin.as_bytes()).unwrap();
        let out = child.wait_with_output().unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    })
    .await
    .unwrap()
}

fn args(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

#[tokio::test]
async fn send_writes_values_files_stdin_counts_and_json_lines_and_tail_shows_them() {
    let kafka = Kafka::start();
    let topic = kafka.topic("bench", 2).await;
    let b = kafka.brokers.as_str();
    let (code, out, err) = ferry(
        args(&[
            "send",
            "-b",
            b,
            "-t",
            &topic,
            "-k",
            "k1",
            "-H",
            "source=cli",
            "-H",
            "n=1",
            "hello",
        ]),
        "",
    )
    .await;
    assert_eq!(code, 0, "{err}");
    assert!(out.starts_with(&format!("sent 1 record to {topic}/")), "{out}");
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("value.json");
    std::fs::write(&file, r#"{"from":"file"}"#).unwrap();
    let (code, _, err) = ferry(
        args(&[
            "send",
            "-b",
            b,
            "-t",
            &topic,
            "-k",
            "k2",
            &format!("@{}", file.display()),
        ]),
        "",
    )
    .await;
    assert_eq!(code, 0, "{err}");
    let (code, _, err) = ferry(
        args(&["send", "-b", b, "-t", &topic, "-k", "k3", "-"]),
        "from stdin",
    )
    .await;
    assert_eq!(code, 0, "{err}");
    let (code, out, err) = ferry(
        args(&[
            "send", "-b", b, "-t", &topic, "-k", "load-{i}", "--count", "40", "--rate", "400", "v{i}",
        ]),
        "",
    )
    .await;
    assert_eq!(code, 0, "{err}");
    assert!(
        out.starts_with(&format!("sent 40 records to {topic} in ")),
        "{out}"
    );
    let lines = concat!(
        r#"{"key":"j1","value":{"amount":5},"headers":{"type":"order"}}"#,
        "\n",
        r#"{"key":"j2","value":"text","partition":1}"#,
        "\n\n",
        r#"{"value":null}"#,
        "\n"
    );
    let (code, out, err) = ferry(args(&["send", "-b", b, "-t", &topic, "--json-lines"]), lines).await;
    assert_eq!(code, 0, "{err}");
    assert!(out.starts_with("sent 3 records"), "{out}");

    let records = kafka.read_all(&topic).await;
    assert_eq!(records.len(), 46);
    // At 400/s the 40 records take 97.5 ms from the first to the last, and leave as they are
    // due: they went out all at once at the end, stamped within a millisecond.
    let stamps: Vec<i64> = records
        .iter()
        .filter(|r| r.key.as_deref().is_some_and(|k| k.starts_with("load-")))
        .filter_map(|r| r.timestamp)
        .collect();
    let spread = stamps.iter().max().unwrap() - stamps.iter().min().unwrap();
    assert!(
        spread >= 50,
        "40 records at 400/s were stamped within {spread} ms: they left in a burst"
    );
    let by_key = |k: &str| {
        records
            .iter()
            .find(|r| r.key.as_deref() == Some(k))
            .unwrap_or_else(|| panic!("no {k}"))
    };
    assert_eq!(by_key("k1").value.as_deref(), Some("hello"));
    assert_eq!(by_key("k1").header("source"), Some("cli"));
    assert_eq!(by_key("k1").header("n"), Some("1"));
    assert_eq!(by_key("k2").value.as_deref(), Some(r#"{"from":"file"}"#));
    assert_eq!(by_key("k3").value.as_deref(), Some("from stdin"));
    assert_eq!(by_key("load-39").value.as_deref(), Some("v39"));
    assert_eq!(by_key("j1").value.as_deref(), Some(r#"{"amount":5}"#));
    assert_eq!(by_key("j1").header("type"), Some("order"));
    assert_eq!(by_key("j2").partition, 1);
    assert!(
        records.iter().any(|r| r.key.is_none() && r.value.is_none()),
        "a tombstone"
    );

    // A bad line is refused with its number, and nothing is half-sent silently.
    let (code, _, err) = ferry(
        args(&["send", "-b", b, "-t", &topic, "--json-lines"]),
        "{\"key\":\"a\"}\n{oops\n",
    )
    .await;
    assert_eq!(code, 1);
    assert!(err.contains("line 2: not JSON"), "{err}");
    // A file named without `@` is its name as data: said so.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("batch.jsonl");
    std::fs::write(&file, "{\"key\":\"a\"}\n").unwrap();
    let name = file.to_str().unwrap();
    let (code, _, err) = ferry(args(&["send", "-b", b, "-t", &topic, "--json-lines", name]), "").await;
    assert_eq!(code, 1);
    assert!(
        err.contains(&format!("to read the file `{name}`, write @{name}")),
        "{err}"
    );
    // A record above the producer's own limit says which limit, and how to raise it.
    let big = dir.path().join("big.bin");
    std::fs::write(&big, vec![b'x'; 1_100_000]).unwrap();
    let big = format!("@{}", big.to_str().unwrap());
    let (code, _, err) = ferry(args(&["send", "-b", b, "-t", &topic, &big]), "").await;
    assert_eq!(code, 1);
    assert!(err.contains("add -X message.max.bytes=1101024"), "{err}");
    let (code, _, err) = ferry(
        args(&[
            "send",
            "-b",
            b,
            "-t",
            &topic,
            "-X",
            "message.max.bytes=1101024",
            &big,
        ]),
        "",
    )
    .await;
    assert_eq!(code, 0, "{err}");
    let (code, _, err) = ferry(args(&["send", "-t", &topic, "x"]), "").await;
    assert_eq!(code, 2);
    assert!(err.contains("-b HOST:PORT"), "{err}");
    // A partition the topic does not have, said before anything is sent.
    let (code, _, err) = ferry(args(&["send", "-b", b, "-t", &topic, "-p", "7", "x"]), "").await;
    assert_eq!(code, 2);
    assert!(
        err.contains(&format!(
            "-p 7: topic `{topic}` has 2 partitions (0 to 1); nothing was sent"
        )),
        "{err}"
    );
    let (code, _, err) = ferry(
        args(&["send", "-b", b, "-t", &topic, "--json-lines"]),
        "{\"value\":\"a\"}\n{\"value\":\"b\",\"partition\":2}\n",
    )
    .await;
    assert_eq!(code, 2);
    assert!(err.contains("record 2 asks for partition 2"), "{err}");

    // tail: readable and JSON, headers shown, stops after -n.
    let (code, out, err) = ferry(
        args(&[
            "tail",
            "-b",
            b,
            "-t",
            &topic,
            "--from-beginning",
            "-n",
            "47",
            "--json",
        ]),
        "",
    )
    .await;
    assert_eq!(code, 0, "{err}");
    // The 46 above and the large one: every record, so that which partition tail reads first
    // cannot leave one out.
    let lines: Vec<serde_json::Value> = out.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 47);
    let k1 = lines.iter().find(|l| l["key"] == "k1").unwrap();
    assert_eq!(k1["value"], "hello");
    assert_eq!(k1["headers"]["source"], "cli");
    assert_eq!(k1["topic"], topic.as_str());
    assert!(k1["offset"].is_i64() && k1["partition"].is_i64() && k1["timestamp"].is_i64());
    let (code, out, _) = ferry(
        args(&["tail", "-b", b, "-t", &topic, "--from-beginning", "-n", "47"]),
        "",
    )
    .await;
    assert_eq!(code, 0);
    let k1 = out
        .split(&format!("{topic}/"))
        .find(|block| block.contains("key=k1"))
        .unwrap();
    assert!(
        k1.contains("\n  source: cli\n") && k1.contains("\n  hello"),
        "{k1}"
    );
    assert!(out.contains("(tombstone)"));
}

#[tokio::test]
async fn what_tail_json_prints_send_json_lines_writes_again_byte_for_byte() {
    let kafka = Kafka::start();
    let dump = kafka.topic("dump", 1).await;
    let replay = kafka.topic("replay", 1).await;
    let b = kafka.brokers.as_str();
    kafka
        .send_raw(
            &dump,
            Some(b"k\xff"),
            Some(b"\x00\x01v"),
            &[("bin", b"\xfe"), ("text", b"t")],
        )
        .await;
    kafka
        .send(&dump, None, Some("plain"), "text value", &[("h", "1")])
        .await;
    let tail = |topic: &str| {
        ferry(
            args(&[
                "tail",
                "-b",
                b,
                "-t",
                topic,
                "--from-beginning",
                "-n",
                "2",
                "--json",
            ]),
            "",
        )
    };
    let (code, printed, err) = tail(&dump).await;
    assert_eq!(code, 0, "{err}");
    assert!(printed.contains("\"key_base64\""), "{printed}");
    let (code, out, err) = ferry(args(&["send", "-b", b, "-t", &replay, "--json-lines"]), &printed).await;
    assert_eq!(code, 0, "{err}");
    assert!(out.starts_with("sent 2 records"), "{out}");
    let (code, again, err) = tail(&replay).await;
    assert_eq!(code, 0, "{err}");
    // The same records but for where and when they were written.
    let records = |text: &str| -> Vec<serde_json::Value> {
        text.lines()
            .map(|l| {
                let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
                for k in ["topic", "offset", "timestamp"] {
                    v.as_object_mut().unwrap().remove(k);
                }
                v
            })
            .collect()
    };
    assert_eq!(records(&printed), records(&again));
    // A bad line stops the whole input, and says that nothing was sent.
    let (code, _, err) = ferry(
        args(&["send", "-b", b, "-t", &replay, "--json-lines"]),
        "{\"key\":\"a\"}\n{\"value_base64\":\"not base64!\"}\n",
    )
    .await;
    assert_eq!(code, 1);
    assert!(
        err.contains("line 2: `value_base64` must be a base64 string; nothing was sent"),
        "{err}"
    );
}

#[tokio::test]
async fn a_config_file_supplies_the_connection_and_x_overrides_it() {
    let kafka = Kafka::start();
    let topic = kafka.topic("bench", 1).await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("ferry.yaml");
    let good = config_text(&kafka, "g", "in", "http://127.0.0.1:1/", "out", "dlq", "");
    std::fs::write(&config, &good).unwrap();
    let c = config.to_str().unwrap();
    let (code, _, err) = ferry(
        args(&["send", "-c", c, "-t", &topic, "-k", "a", "via config"]),
        "",
    )
    .await;
    assert_eq!(code, 0, "{err}");
    // A config pointing nowhere, corrected by -X.
    let nowhere = dir.path().join("nowhere.yaml");
    std::fs::write(&nowhere, good.replace(&kafka.brokers, "127.0.0.1:1")).unwrap();
    let n = nowhere.to_str().unwrap();
    let fix = format!("bootstrap.servers={}", kafka.brokers);
    let (code, _, err) = ferry(
        args(&[
            "send",
            "-c",
            n,
            "-X",
            &fix,
            "-X",
            "message.timeout.ms=10000",
            "-t",
            &topic,
            "-k",
            "b",
            "via -X",
        ]),
        "",
    )
    .await;
    assert_eq!(code, 0, "{err}");
    let (code, out, err) = ferry(
        args(&[
            "tail",
            "-c",
            n,
            "-X",
            &fix,
            "-t",
            &topic,
            "--from-beginning",
            "-n",
            "2",
        ]),
        "",
    )
    .await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("via config") && out.contains("via -X"), "{out}");
    let (code, _, err) = ferry(args(&["send", "-c", n, "-X", "nonsense", "-t", &topic, "x"]), "").await;
    assert_eq!(code, 2);
    assert!(err.contains("key=value"), "{err}");
    std::fs::write(dir.path().join("bad.yaml"), "kafka: {}\n").unwrap();
    let (code, _, err) = ferry(
        args(&[
            "tail",
            "-c",
            dir.path().join("bad.yaml").to_str().unwrap(),
            "-t",
            &topic,
        ]),
        "",
    )
    .await;
    assert_eq!(code, 78, "{err}");
}

#[tokio::test]
async fn redrive_sends_dead_letters_back_once_each_and_they_end_as_replies_once_fixed() {
    let kafka = Kafka::start();
    let t = kafka.route_topics(1).await;
    let other = kafka.topic("other", 1).await;
    // Broken for "poison" values until fixed; "refuse" values are refused explicitly.
    let fixed = Arc::new(AtomicBool::new(false));
    let flag = fixed.clone();
    let service = Service::start(move |r: Req| {
        let fixed = flag.load(Ordering::SeqCst);
        async move {
            if r.body.starts_with("poison") && !fixed {
                Resp::new(422, "cannot parse")
            } else if r.body.starts_with("refuse") && !fixed {
                Resp::new(200, "").header("ferry-action", "dead-letter")
            } else {
                Resp::new(200, &format!("ok:{}", r.body))
            }
        }
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("ferry.yaml");
    std::fs::write(
        &config,
        config_text(
            &kafka,
            &t.group,
            &t.source,
            &service.url("/h"),
            &t.reply,
            &t.dlq,
            // In partition order the dead letters are, in this order: status, service_said,
            // status; the reason-filtered run leaves a gap the commit metadata must remember.
            "    ordering: partition\n",
        ),
    )
    .unwrap();
    let c = config.to_str().unwrap().to_string();
    let _ferry = Ferry::spawn(&config, &dir.path().join("ferry.log"));
    for (k, v) in [
        ("a", "good"),
        ("b", "poison-1"),
        ("c", "refuse-1"),
        ("d", "poison-2"),
    ] {
        kafka.send(&t.source, None, Some(k), v, &[]).await;
    }
    let dead = kafka.read(&t.dlq, 3, WAIT).await;
    assert_eq!(dead.len(), 3);
    let original_key = dead
        .iter()
        .find(|r| r.key.as_deref() == Some("b"))
        .unwrap()
        .header("ferry.idempotency_key")
        .unwrap()
        .to_string();
    fixed.store(true, Ordering::SeqCst);

    // Checks come first: a route that does not exist, a topic the route does not read.
    let (code, _, err) = ferry(args(&["redrive", "-c", &c, "--route", "nope"]), "").await;
    assert_eq!((code, err.contains("no route named `nope`")), (2, true), "{err}");
    let (code, _, err) = ferry(
        args(&["redrive", "-c", &c, "--route", "test", "--to", &other]),
        "",
    )
    .await;
    assert_eq!(code, 2);
    assert!(err.contains("does not read"), "{err}");

    // A record ferry did not write, in the same topic: never sent.
    kafka.send(&t.dlq, None, Some("x"), "foreign", &[]).await;

    // A dry run says what it would do and does nothing.
    let (code, out, err) = ferry(
        args(&[
            "redrive",
            "-c",
            &c,
            "--route",
            "test",
            "--reason",
            "status",
            "--dry-run",
        ]),
        "",
    )
    .await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.matches("would send ").count(), 3, "{out}");
    assert!(out.contains("would send 2 dead letters"), "{out}");
    assert!(
        out.contains("skipped 1 not written by ferry (no `ferry.route` header)"),
        "{out}"
    );

    // Only one reason first: the others are left for later.
    let (code, out, err) = ferry(
        args(&["redrive", "-c", &c, "--route", "test", "--reason", "status"]),
        "",
    )
    .await;
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains(&format!(
            "sent 2 dead letters from {} back to {}",
            t.dlq, t.source
        )),
        "{out}"
    );
    assert!(out.contains("skipped 1 of other reasons"), "{out}");
    let replies = kafka.read(&t.reply, 3, WAIT).await;
    assert_eq!(replies.len(), 3, "the good one and the two re-driven ones");
    assert!(replies.iter().any(|r| r.value.as_deref() == Some("ok:poison-1")));

    // The re-driven record kept its idempotency key and lost the error headers.
    let source = kafka.read_all(&t.source).await;
    let again = source
        .iter()
        .find(|r| {
            r.value.as_deref() == Some("poison-1")
                && r.offset > 0
                && r.header("ferry.redriven_from").is_some()
        })
        .unwrap();
    assert_eq!(again.header("ferry.idempotency_key"), Some(original_key.as_str()));
    assert!(
        again.headers.keys().all(|k| !k.starts_with("ferry.error.")),
        "{:?}",
        again.headers
    );
    let seen_by_service: Vec<String> = service
        .requests()
        .iter()
        .filter(|r| r.body == "poison-1")
        .map(|r| r.header("idempotency-key").unwrap().to_string())
        .collect();
    assert_eq!(seen_by_service.len(), 2);
    assert!(
        seen_by_service.iter().all(|k| *k == original_key),
        "same idempotency key both times"
    );

    // The rest, then nothing: once each.
    let (code, out, err) = ferry(args(&["redrive", "-c", &c, "--route", "test"]), "").await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("sent 1 dead letter from"), "{out}");
    assert!(out.contains("skipped 2 sent by an earlier run"), "{out}");
    let (code, out, err) = ferry(args(&["redrive", "-c", &c, "--route", "test"]), "").await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("sent 0 dead letters"), "{out}");
    // A filtered run after all that has nothing left to send.
    let (code, out, err) = ferry(
        args(&["redrive", "-c", &c, "--route", "test", "--reason", "status"]),
        "",
    )
    .await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("sent 0 dead letters"), "{out}");
    let (code, _, err) = ferry(
        args(&["redrive", "-c", &c, "--route", "test", "--reason", "nonsense"]),
        "",
    )
    .await;
    assert_eq!(code, 2);
    assert!(err.contains("reasons are: status"), "{err}");
    let replies = kafka.read(&t.reply, 4, WAIT).await;
    assert_eq!(replies.len(), 4);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        kafka.read_all(&t.reply).await.len(),
        4,
        "no record was sent back twice"
    );
    assert_eq!(
        kafka.read_all(&t.dlq).await.len(),
        4,
        "nothing failed again: the three dead letters and the foreign record"
    );

    // Sent back before the cause is fixed, a record fails again: the next run says so.
    fixed.store(false, Ordering::SeqCst);
    kafka.send(&t.source, None, Some("e"), "poison-3", &[]).await;
    kafka.read(&t.dlq, 5, WAIT).await;
    let redrive = || ferry(args(&["redrive", "-c", &c, "--route", "test"]), "");
    let (code, out, err) = redrive().await;
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("sent 1 dead letter from") && !out.contains("sent back before"),
        "{out}"
    );
    kafka.read(&t.dlq, 6, WAIT).await;
    let (code, out, err) = redrive().await;
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("1 of them had been sent back before and failed again (`ferry.redriven_from`)"),
        "{out}"
    );
}

/// Two runs of one route's redrive at once (a Job run again, two operators, one with `--reason`)
/// send each dead letter once between them: one run holds the route's lock, and the other
/// refuses, or stops where it was when the other took over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redrive_runs_at_the_same_time_send_each_dead_letter_once() {
    const DEAD: usize = 3000;
    let kafka = Kafka::start();
    let t = kafka.route_topics(1).await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("ferry.yaml");
    std::fs::write(&config, route_config(&kafka, &t, "http://127.0.0.1:9/unused", "")).unwrap();
    let c = config.to_str().unwrap().to_string();
    let count = DEAD.to_string();
    let (code, _, err) = ferry(
        args(&[
            "send",
            "-b",
            &kafka.brokers,
            "-t",
            &t.dlq,
            "--count",
            &count,
            "-H",
            "ferry.route=test",
            "-H",
            "ferry.error.reason=status",
            "dead",
        ]),
        "",
    )
    .await;
    assert_eq!(code, 0, "{err}");

    let all = ferry(args(&["redrive", "-c", &c, "--route", "test"]), "");
    let status = ferry(
        args(&["redrive", "-c", &c, "--route", "test", "--reason", "status"]),
        "",
    );
    let ((a, a_out, a_err), (b, b_out, b_err)) = tokio::join!(all, status);
    let runs = format!("unfiltered: {a} {a_out} {a_err}\nstatus: {b} {b_out} {b_err}");
    for (code, err) in [(a, &a_err), (b, &b_err)] {
        assert!(
            code == 0 || err.contains("another `ferry redrive` of route `test`"),
            "{runs}"
        );
    }
    assert!(a == 0 || b == 0, "{runs}");
    // Whatever one run left, a run after both sends, and nothing is sent twice.
    let (code, _, err) = ferry(args(&["redrive", "-c", &c, "--route", "test"]), "").await;
    assert_eq!(code, 0, "{err}");
    let back = kafka.read(&t.source, DEAD, WAIT).await;
    let mut from: Vec<&str> = back
        .iter()
        .filter_map(|r| r.header("ferry.redriven_from"))
        .collect();
    from.sort_unstable();
    from.dedup();
    assert_eq!((back.len(), from.len()), (DEAD, DEAD), "{runs}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(kafka.read_all(&t.source).await.len(), DEAD, "{runs}");
}

/// A dead-letter topic that does not exist is said at once, not after waiting for the lock's group
/// (which never forms for a topic that is not there).
#[tokio::test]
async fn redrive_of_a_dead_letter_topic_that_does_not_exist_says_so_at_once() {
    let kafka = Kafka::start();
    let t = kafka.route_topics(1).await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("ferry.yaml");
    let missing = unique("no-such-dlq");
    let text = config_text(
        &kafka,
        &t.group,
        &t.source,
        "http://127.0.0.1:9/",
        &t.reply,
        &missing,
        "",
    );
    std::fs::write(&config, text).unwrap();
    let c = config.to_str().unwrap().to_string();
    let started = std::time::Instant::now();
    let (code, _, err) = ferry(args(&["redrive", "-c", &c, "--route", "test"]), "").await;
    assert_eq!(code, 1, "{err}");
    assert!(err.contains(&format!("`{missing}` does not exist")), "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "{:?}",
        started.elapsed()
    );
}

/// `ferry tail … | head -1`: once the reader is gone, tail ends as Unix tools do (SIGPIPE),
/// rather than panicking at the next record it prints.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tail_into_a_closed_pipe_ends_without_a_panic() {
    use std::io::{BufRead, BufReader};
    use std::os::unix::process::ExitStatusExt;
    let kafka = Kafka::start();
    let topic = kafka.topic("piped", 1).await;
    kafka.send(&topic, None, Some("k"), "first", &[]).await;
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args(["tail", "-b", &kafka.brokers, "-t", &topic, "--from-beginning"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let first = tokio::task::spawn_blocking(move || {
        let mut lines = BufReader::new(stdout).lines();
        let mut seen = String::new();
        while !seen.contains("first") {
            seen.push_str(&lines.next().unwrap().unwrap());
        }
        seen
        // The reader goes here, as `head` would.
    })
    .await
    .unwrap();
    assert!(first.contains("first"), "{first}");
    for i in 0..3 {
        kafka
            .send(&topic, None, Some("k"), &format!("after {i}"), &[])
            .await;
    }
    let status = eventually(WAIT, "tail ended", || {
        let done = child.try_wait().unwrap();
        async move { done }
    })
    .await;
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    assert!(!err.contains("panicked"), "{err}");
    assert_eq!(status.signal(), Some(libc::SIGPIPE), "{status:?}: {err}");
}

/// A broker that cannot be reached is an error that says so, after the metadata request's 10 s,
/// not five minutes of silence and a "message timed out".
#[tokio::test]
async fn send_and_tail_to_a_broker_that_cannot_be_reached_say_so() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .to_string();
    for command in [
        &["send", "-b", &closed, "-t", "x", "v"][..],
        &["tail", "-b", &closed, "-t", "x"],
    ] {
        let (code, _, err) = ferry(args(command), "").await;
        assert_eq!(code, 1, "{command:?}: {err}");
        assert!(
            err.contains(&format!("cannot reach the broker at {closed}")) && err.contains("check -b"),
            "{command:?}: {err}"
        );
    }
}
