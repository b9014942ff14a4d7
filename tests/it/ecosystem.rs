//! The files an SRE loads next to the service (config/grafana-dashboard.json,
//! config/prometheus-alerts.yml) stay in step with the metrics the binary exports: a renamed
//! metric, a typo or a rule missing its severity fails here.

use std::collections::BTreeSet;

/// Every metric family the service exports (the constants the code records them under).
fn exported() -> BTreeSet<&'static str> {
    use pendo_sync::metrics::*;
    [
        RECORDS_PULLED,
        CHANGES_DETECTED,
        VALUES_PUSHED,
        REQUESTS,
        OUTBOX_VALUES,
        OLDEST_PENDING,
        CYCLE_DURATION,
        LAST_SUCCESS,
        INVALID_RECORDS,
        HOLDS_OPEN,
        HELD_VALUES,
        HISTORY_EVENTS,
        pendo_sync::metrics::WRITER_PAUSED,
        pendo_sync::metrics::LEADER,
        pendo_sync::schedule::RECONCILE_FAILURES,
        pendo_sync::notify::NOTIFICATIONS,
    ]
    .into_iter()
    .collect()
}

/// The `pendo_sync_*` names an expression uses.
fn metrics_in(expr: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = expr;
    while let Some(at) = rest.find("pendo_sync_") {
        let name: String = rest[at..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        rest = &rest[at + name.len()..];
        out.push(name);
    }
    out
}

fn file(path: &str) -> String {
    std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/").to_owned() + path)
        .unwrap_or_else(|e| panic!("{path}: {e}"))
}

#[test]
fn the_grafana_dashboard_queries_only_exported_metrics() {
    let dash: serde_json::Value = serde_json::from_str(&file("config/grafana-dashboard.json"))
        .expect("the dashboard is JSON");
    let panels = dash["panels"].as_array().expect("panels");
    let mut ids = BTreeSet::new();
    let mut used = BTreeSet::new();
    for p in panels {
        assert!(
            ids.insert(p["id"].as_i64().unwrap()),
            "duplicate panel id in {p}"
        );
        assert!(p["gridPos"]["w"].as_i64().is_some(), "{p}");
        let targets = p["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "{}", p["title"]);
        for t in targets {
            let expr = t["expr"].as_str().expect("expr");
            let names = metrics_in(expr);
            assert!(!names.is_empty(), "{expr}");
            for n in names {
                assert!(
                    exported().contains(n.as_str()),
                    "{expr}: {n} is not exported"
                );
                used.insert(n);
            }
        }
    }
    // What the console issue asks the dashboard to show.
    for m in [
        "pendo_sync_last_success_timestamp_seconds",
        "pendo_sync_outbox_values",
        "pendo_sync_holds_open",
        "pendo_sync_requests_total",
        "pendo_sync_cycle_duration_seconds",
    ] {
        assert!(used.contains(m), "the dashboard does not show {m}");
    }
}

#[test]
fn the_alert_rules_are_complete_and_query_only_exported_metrics() {
    let text = file("config/prometheus-alerts.yml");
    assert!(text.lines().any(|l| l.trim() == "groups:"), "{text}");
    // One block per rule: from `- alert:` to the next.
    let mut rules: Vec<Vec<&str>> = Vec::new();
    for line in text.lines() {
        let t = line.trim();
        if t.starts_with("- alert:") {
            rules.push(vec![t]);
        } else if let Some(rule) = rules.last_mut()
            && !t.is_empty()
            && !t.starts_with('#')
        {
            rule.push(t);
        }
        assert!(!line.contains('\t'), "YAML has no tabs: {line:?}");
    }
    let names: Vec<&str> = rules
        .iter()
        .map(|r| r[0].trim_start_matches("- alert:").trim())
        .collect();
    assert_eq!(
        names,
        [
            "PendoSyncNoSuccessfulCycle",
            "PendoSyncWriterPaused",
            "PendoSyncHoldOpen",
            "PendoSyncDeadValues",
            "PendoSyncOldestPendingTooOld",
            "PendoSyncNoLeader"
        ]
    );
    for rule in &rules {
        let field = |key: &str| {
            rule.iter()
                .find_map(|l| l.strip_prefix(key).map(str::trim))
                .unwrap_or_else(|| panic!("{} has no {key}", rule[0]))
        };
        let expr = field("expr:");
        assert!(!metrics_in(expr).is_empty(), "{expr}");
        for n in metrics_in(expr) {
            assert!(
                exported().contains(n.as_str()),
                "{expr}: {n} is not exported"
            );
        }
        humantime::parse_duration(field("for:")).expect("a duration");
        assert!(["warning", "critical"].contains(&field("severity:")));
        assert!(field("summary:").len() > 10);
    }
}
