//! `ferry ctl status|pause|resume|drain`: a client of a running sidecar's admin endpoint.

use std::time::Duration;

use crate::admin::{Done, Status};

/// What to ask the sidecar.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Verb {
    Status,
    Pause,
    Resume,
    Drain,
}

pub struct Target<'a> {
    pub admin: &'a str,
    pub token: Option<&'a str>,
    pub route: Option<&'a str>,
    pub json: bool,
}

/// "1 record", "3 records".
fn records(n: u64) -> String {
    if n == 1 {
        "1 record".into()
    } else {
        format!("{n} records")
    }
}

pub async fn ctl(verb: Verb, t: Target<'_>) -> i32 {
    crate::sidecar::install_crypto();
    match run(verb, &t).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e}");
            1
        }
    }
}

async fn run(verb: Verb, t: &Target<'_>) -> Result<i32, String> {
    let base = t.admin.trim_end_matches('/');
    // A drain answers only when it is over, which may take the whole drain timeout.
    let client = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(600))
        .build()
        .map_err(|e| format!("cannot build the HTTP client: {e}"))?;
    let path = match verb {
        Verb::Status => "status",
        Verb::Pause => "pause",
        Verb::Resume => "resume",
        Verb::Drain => "drain",
    };
    let mut url = match reqwest::Url::parse(&format!("{base}/{path}")) {
        Ok(url) => url,
        // A usage error, as any other bad argument.
        Err(e) => {
            eprintln!(
                "error: --admin `{}` is not a URL: {e} (e.g. http://127.0.0.1:9464)",
                t.admin
            );
            return Ok(2);
        }
    };
    if let Some(r) = t.route.filter(|_| verb != Verb::Status) {
        url.query_pairs_mut().append_pair("route", r);
    }
    let mut request = if verb == Verb::Status {
        client.get(url)
    } else {
        client.post(url)
    };
    if let Some(token) = t.token.filter(|t| !t.is_empty()) {
        request = request.bearer_auth(token);
    }
    let response = request.send().await.map_err(|e| {
        format!("cannot reach the admin endpoint at {base}: {e} (is ferry running? pass --admin URL or set FERRY_ADMIN_URL)")
    })?;
    let code = response.status();
    let body = response
        .text()
        .await
        .map_err(|e| format!("the admin endpoint's answer broke off: {e}"))?;
    if !(code.is_success()) {
        let why = serde_json::from_str::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_string))
            .unwrap_or(body);
        let hint = match code.as_u16() {
            401 => " (pass the admin token with --token or FERRY_ADMIN_TOKEN)",
            403 => " (set admin.token in the sidecar's config, or reach it on loopback)",
            _ => "",
        };
        return Err(format!("{path} refused ({code}): {why}{hint}"));
    }
    if verb == Verb::Status {
        let status: Status = serde_json::from_str(&body)
            .map_err(|e| format!("the admin endpoint answered something that is not a status: {e}"))?;
        // As the verbs do (the sidecar answers them 404): an empty table would say "no route
        // has anything", not "no such route".
        if let Some(route) = t.route.filter(|r| !status.routes.iter().any(|s| s.name == *r)) {
            let known: Vec<&str> = status.routes.iter().map(|r| r.name.as_str()).collect();
            return Err(format!(
                "no route named `{route}`; routes are: {}",
                known.join(", ")
            ));
        }
        if t.json {
            println!("{body}");
        } else {
            print!("{}", table(&status, t.route));
        }
        return Ok(0);
    }
    let done: Done =
        serde_json::from_str(&body).map_err(|e| format!("unexpected answer from {path}: {e}"))?;
    if t.json {
        println!("{body}");
        // The same exit code as the text: a script reads that before it reads the JSON.
        return Ok(i32::from(verb == Verb::Drain && done.drained == Some(false)));
    }
    let routes = done.routes.join(", ");
    match (verb, done.drained) {
        (Verb::Drain, Some(false)) => {
            eprintln!(
                "drain of {routes} timed out: {} still in flight; they go on, and the drain stays in force",
                records(done.in_flight)
            );
            Ok(1)
        }
        (Verb::Drain, _) => {
            println!("drained {routes}: nothing in flight, everything final is committed");
            Ok(0)
        }
        (Verb::Pause, _) => {
            println!("paused {routes} ({} still finishing)", records(done.in_flight));
            Ok(0)
        }
        _ => {
            println!("resumed {routes}");
            Ok(0)
        }
    }
}

/// The status as a table: one line per route, one indented line per partition.
pub fn table(s: &Status, only: Option<&str>) -> String {
    let mut out = format!(
        "ferry {}: {}, {}{}\n\n",
        s.version,
        if s.live { "live" } else { "STUCK" },
        if s.ready {
            "ready".to_string()
        } else {
            format!("not ready ({})", s.not_ready.as_deref().unwrap_or("unknown"))
        },
        if s.service_ready {
            ""
        } else {
            ", service not ready"
        }
    );
    let mut rows = vec![vec![
        "ROUTE".to_string(),
        "STATE".into(),
        "CIRCUIT".into(),
        "IN FLIGHT".into(),
        "OLDEST".into(),
        "LAG".into(),
        "RECEIVED".into(),
        "OUTCOMES".into(),
    ]];
    let mut parts = Vec::new();
    for r in s.routes.iter().filter(|r| only.is_none_or(|o| o == r.name)) {
        let state = match (r.draining || s.draining, r.paused) {
            (true, _) => "draining",
            (false, true) => "paused",
            // Nothing is taken while ferry's gate is shut (see `ready::Gate`): its partitions
            // say `unready`, or it has none yet. (Not ready for a broker refusing ferry's writes
            // does not stop the intake.)
            _ if !s.ready
                && r.partitions
                    .iter()
                    .all(|p| p.paused.iter().any(|why| why == "unready")) =>
            {
                "waiting"
            }
            _ => "running",
        };
        let outcomes: Vec<String> = r
            .outcomes
            .iter()
            .filter(|(_, n)| **n > 0)
            .map(|(o, n)| format!("{o}={n}"))
            .chain((r.abandoned > 0).then(|| format!("abandoned={}", r.abandoned)))
            .collect();
        rows.push(vec![
            r.name.clone(),
            state.into(),
            r.circuit.clone(),
            r.in_flight.to_string(),
            r.oldest_in_flight_seconds
                .map_or("-".into(), |s| format!("{s:.1}s")),
            // Lag is known only of partitions this instance owns: with none, it says nothing.
            if r.partitions.is_empty() {
                "-".into()
            } else {
                r.lag.to_string()
            },
            r.received.to_string(),
            if outcomes.is_empty() {
                "-".into()
            } else {
                outcomes.join(" ")
            },
        ]);
        for p in &r.partitions {
            parts.push(vec![
                format!("{}/{}", p.topic, p.partition),
                r.name.clone(),
                p.committed.map_or("-".into(), |c| c.to_string()),
                p.high_watermark.map_or("-".into(), |c| c.to_string()),
                p.lag.map_or("-".into(), |c| c.to_string()),
                p.in_flight.to_string(),
                if p.paused.is_empty() {
                    "-".into()
                } else {
                    p.paused.join(",")
                },
            ]);
        }
    }
    out.push_str(&align(&rows));
    if !parts.is_empty() {
        out.push('\n');
        parts.insert(
            0,
            vec![
                "PARTITION".into(),
                "ROUTE".into(),
                "COMMITTED".into(),
                "HIGH WATERMARK".into(),
                "LAG".into(),
                "IN FLIGHT".into(),
                "PAUSED".into(),
            ],
        );
        out.push_str(&align(&parts));
    }
    out
}

fn align(rows: &[Vec<String>]) -> String {
    let columns = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..columns)
        .map(|c| {
            rows.iter()
                .filter_map(|r| r.get(c))
                .map(|s| s.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for row in rows {
        let line: Vec<String> = row
            .iter()
            .enumerate()
            .map(|(c, cell)| format!("{cell:<w$}", w = widths[c]))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(ready: bool, draining: bool, paused: bool) -> Status {
        status_with(ready, draining, paused, &[])
    }

    /// One route with one partition per list of pause reasons.
    fn status_with(ready: bool, draining: bool, paused: bool, partitions: &[&[&str]]) -> Status {
        let partitions: Vec<serde_json::Value> = partitions
            .iter()
            .enumerate()
            .map(|(i, why)| serde_json::json!({"topic": "in", "partition": i, "committed": null,
                "high_watermark": null, "lag": null, "in_flight": 0, "oldest_in_flight_seconds": null, "paused": why}))
            .collect();
        serde_json::from_value(serde_json::json!({
            "version": "0", "live": true, "ready": ready, "not_ready": (!ready).then_some("topic `out` is missing"),
            "draining": draining, "service_ready": true,
            "routes": [{"name": "r", "paused": paused, "draining": false, "circuit": "closed", "in_flight": 0,
                "oldest_in_flight_seconds": null, "lag": 0, "received": 0, "outcomes": {}, "dead_letters": {},
                "retries": 0, "abandoned": 0, "partitions": partitions}]
        }))
        .unwrap()
    }

    #[test]
    fn a_route_s_state_says_whether_it_takes_records() {
        let state = |s: &Status| {
            table(s, None)
                .lines()
                .nth(3)
                .unwrap()
                .split_whitespace()
                .nth(1)
                .unwrap()
                .to_string()
        };
        assert_eq!(state(&status(true, false, false)), "running");
        assert_eq!(
            state(&status(false, false, false)),
            "waiting",
            "not ready, nothing assigned"
        );
        assert_eq!(
            state(&status_with(false, false, false, &[&["unready"]])),
            "waiting"
        );
        assert_eq!(
            state(&status_with(false, false, false, &[&[]])),
            "running",
            "not ready for a broker refusing writes: records are still taken"
        );
        assert_eq!(state(&status(true, false, true)), "paused");
        assert_eq!(state(&status(true, true, false)), "draining", "ferry is stopping");
    }
}
