//! What operators install beside ferry: the Grafana dashboard, the Prometheus alert rules and the
//! runbook. They must only name metrics ferry exports, cover what SPEC §6 and §7 list, and pass
//! promtool's checks and unit tests.

use std::collections::BTreeSet;
use std::path::Path;

use ferry::config::{Document, Interpolator};
use ferry::telemetry::names;

fn read(path: &str) -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(path))
        .unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// Every `ferry_*` metric an expression names, histogram suffixes removed.
fn metrics_in(expr: &str) -> BTreeSet<String> {
    let re = regex::Regex::new(r"ferry_[a-z_]+").unwrap();
    re.find_iter(expr)
        .map(|m| {
            let n = m.as_str();
            ["_bucket", "_count", "_sum"]
                .iter()
                .find_map(|s| n.strip_suffix(s).filter(|base| names::ALL.contains(base)))
                .unwrap_or(n)
                .to_string()
        })
        .collect()
}

#[test]
fn dashboard_shows_every_figure_from_exported_metrics() {
    let dashboard: serde_json::Value =
        serde_json::from_str(&read("helm/ferry/files/grafana-dashboard.json")).unwrap();
    let panels = dashboard["panels"].as_array().unwrap();
    let mut used = BTreeSet::new();
    let mut titles = Vec::new();
    for p in panels.iter().filter(|p| p["type"] != "row") {
        titles.push(p["title"].as_str().unwrap().to_string());
        assert!(p["gridPos"]["w"].as_u64().unwrap() > 0);
        let targets = p["targets"].as_array().unwrap();
        assert!(!targets.is_empty(), "{} has no query", p["title"]);
        for t in targets {
            used.extend(metrics_in(t["expr"].as_str().unwrap()));
        }
    }
    for m in &used {
        assert!(
            names::ALL.contains(&m.as_str()),
            "the dashboard queries `{m}`, which ferry does not export"
        );
    }
    for figure in [
        "Throughput",
        "Outcomes",
        "Consumer lag",
        "In flight",
        "Call latency",
        "End-to-end latency",
        "Retries",
        "Dead letters",
        "Pause reasons",
        "Circuit state",
    ] {
        assert!(titles.iter().any(|t| t == figure), "no `{figure}` panel");
    }
    for m in [
        names::RECORDS_RECEIVED,
        names::OUTCOMES,
        names::CONSUMER_LAG,
        names::IN_FLIGHT,
        names::OLDEST_IN_FLIGHT,
        names::CALL_DURATION,
        names::END_TO_END,
        names::RETRIES,
        names::PAUSED_PARTITIONS,
        names::CIRCUIT_STATE,
    ] {
        assert!(used.contains(m), "the dashboard does not show `{m}`");
    }
}

#[test]
fn alert_rules_use_exported_metrics_and_each_has_a_runbook_entry() {
    let text = read("helm/ferry/files/alerts.yaml");
    let rules = Document::parse(&text, &Interpolator::from_pairs(&[]))
        .unwrap()
        .value;
    let runbook = read("docs/runbook.md");
    let mut alerts = Vec::new();
    for rule in rules["groups"][0]["rules"].as_array().unwrap() {
        let name = rule["alert"].as_str().unwrap();
        alerts.push(name.to_string());
        for m in metrics_in(rule["expr"].as_str().unwrap()) {
            assert!(
                names::ALL.contains(&m.as_str()),
                "{name} uses `{m}`, which ferry does not export"
            );
        }
        assert!(
            runbook.contains(&format!("\n## {name}\n")),
            "no runbook entry for {name}"
        );
        let url = rule["annotations"]["runbook_url"].as_str().unwrap();
        assert_eq!(url, format!("docs/runbook.md#{}", name.to_lowercase()));
    }
    for wanted in [
        "FerryConsumerLagGrowing",
        "FerryOldestInFlightTooOld",
        "FerryDeadLetterRate",
        "FerryPausedTooLong",
        "FerryCircuitOpen",
    ] {
        assert!(alerts.iter().any(|a| a == wanted), "no {wanted} alert");
    }
}

/// Runs promtool, when installed (CI installs it and sets FERRY_REQUIRE_TOOLS, so that a missing
/// tool fails instead of skipping).
fn promtool(args: &[&str]) {
    let out = match std::process::Command::new("promtool")
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
    {
        Ok(o) => o,
        Err(e) => {
            assert!(
                std::env::var("FERRY_REQUIRE_TOOLS").is_err(),
                "promtool is required: {e}"
            );
            eprintln!("skipping `promtool {}`: promtool not found ({e})", args.join(" "));
            return;
        }
    };
    assert!(
        out.status.success(),
        "promtool {}:\n{}{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn alert_rules_pass_promtool_check_and_unit_tests() {
    promtool(&["check", "rules", "helm/ferry/files/alerts.yaml"]);
    promtool(&["test", "rules", "tests/promtool/alerts.test.yaml"]);
}
