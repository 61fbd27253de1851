//! The Grafana dashboard and the Prometheus alert rules query only metrics the daemon exports.
//!
//! Neither fails loudly when a metric is renamed or dropped: the panel shows "No data" and the
//! alert simply never fires, which for the guard-pause alert means nobody is paged. So every
//! PromQL expression in `dashboards/lockstep.json` and `dashboards/alerts.yml` is checked
//! against `Metrics::names()`, and the dashboard must keep charting the metrics an operator
//! needs most. promtool checks the rules' syntax and behaviour (`scripts/lint-ops`).

use std::collections::BTreeSet;

use lockstep::metrics::Metrics;
use serde_json::Value as Json;
use serde_yaml::Value as Yaml;

const DASHBOARD: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/dashboards/lockstep.json");
const ALERTS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/dashboards/alerts.yml");

/// What the dashboard must chart whatever else it does: progress, batches, rollbacks, the
/// guard, evidence freshness, AWS errors and drift.
const REQUIRED_ON_DASHBOARD: &[&str] = &[
    "lockstep_users",
    "lockstep_batches",
    "lockstep_rollout_paused",
    "lockstep_rollbacks_total",
    "lockstep_guard_verdicts_total",
    "lockstep_evidence_last_success_timestamp_seconds",
    "lockstep_iam_errors_total",
    "lockstep_reconcile_drift_total",
];

/// The metric families the daemon exports.
struct Exported {
    names: BTreeSet<String>,
    histograms: BTreeSet<String>,
}

impl Exported {
    fn new() -> Exported {
        let metrics = Metrics::new();
        // Histograms are queried through their `_bucket`, `_sum` and `_count` series. The text
        // exposition's TYPE lines say which families are histograms (an unlabelled histogram is
        // always rendered, samples or not).
        let histograms = metrics
            .render()
            .lines()
            .filter_map(|line| line.strip_prefix("# TYPE ")?.strip_suffix(" histogram"))
            .map(String::from)
            .collect();
        Exported { names: metrics.names().into_iter().collect(), histograms }
    }

    /// The family a series name belongs to, if the daemon exports it.
    fn family<'a>(&self, series: &'a str) -> Option<&'a str> {
        if self.names.contains(series) {
            return Some(series);
        }
        ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|suffix| series.strip_suffix(suffix))
            .filter(|base| self.histograms.contains(*base))
    }

    /// The `lockstep_*` names in `expr` that are not exported series.
    fn unknown<'a>(&self, expr: &'a str) -> Vec<&'a str> {
        metric_names(expr).into_iter().filter(|name| self.family(name).is_none()).collect()
    }
}

/// Every identifier matching `lockstep_[a-z0-9_]+` in a PromQL expression, as a whole word (not
/// the tail of `my_lockstep_x`).
fn metric_names(expr: &str) -> Vec<&str> {
    const PREFIX: &str = "lockstep_";
    let bytes = expr.as_bytes();
    let mut names = Vec::new();
    let mut from = 0;
    while let Some(offset) = expr[from..].find(PREFIX) {
        let start = from + offset;
        let mut end = start + PREFIX.len();
        while end < bytes.len() && matches!(bytes[end], b'a'..=b'z' | b'0'..=b'9' | b'_') {
            end += 1;
        }
        let inside_word =
            start > 0 && matches!(bytes[start - 1], b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'_' | b':');
        if !inside_word && end > start + PREFIX.len() {
            names.push(&expr[start..end]);
        }
        from = end;
    }
    names
}

/// A PromQL expression and where it was found, for the failure message.
struct Query {
    place: String,
    expr: String,
}

fn load_dashboard() -> Json {
    let text = std::fs::read_to_string(DASHBOARD).unwrap_or_else(|e| panic!("reading {DASHBOARD}: {e}"));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("parsing {DASHBOARD}: {e}"))
}

fn load_alerts() -> Yaml {
    let text = std::fs::read_to_string(ALERTS).unwrap_or_else(|e| panic!("reading {ALERTS}: {e}"));
    serde_yaml::from_str(&text).unwrap_or_else(|e| panic!("parsing {ALERTS}: {e}"))
}

/// Every panel, rows' nested panels included (a collapsed row holds its panels itself).
fn panels(dashboard: &Json) -> Vec<&Json> {
    fn walk<'a>(list: &'a Json, out: &mut Vec<&'a Json>) {
        for panel in list.as_array().into_iter().flatten() {
            out.push(panel);
            walk(&panel["panels"], out);
        }
    }
    let mut out = Vec::new();
    walk(&dashboard["panels"], &mut out);
    out
}

/// Every PromQL expression in the dashboard: panel targets, annotation queries and template
/// variable queries (a plain string, or an object with a `query` in newer Grafana).
fn dashboard_queries(dashboard: &Json) -> Vec<Query> {
    let mut queries = Vec::new();
    for panel in panels(dashboard) {
        for target in panel["targets"].as_array().into_iter().flatten() {
            if let Some(expr) = target["expr"].as_str() {
                queries.push(Query { place: format!("panel {}", panel["title"]), expr: expr.to_string() });
            }
        }
    }
    for annotation in dashboard["annotations"]["list"].as_array().into_iter().flatten() {
        if let Some(expr) = annotation["expr"].as_str() {
            queries.push(Query { place: format!("annotation {}", annotation["name"]), expr: expr.to_string() });
        }
    }
    for variable in dashboard["templating"]["list"].as_array().into_iter().flatten() {
        let query = &variable["query"];
        if let Some(expr) = query.as_str().or_else(|| query["query"].as_str()) {
            queries.push(Query { place: format!("variable {}", variable["name"]), expr: expr.to_string() });
        }
    }
    queries
}

/// Every alerting rule in the file, with its group.
fn alert_rules(alerts: &Yaml) -> Vec<&Yaml> {
    let groups = alerts["groups"].as_sequence().expect("alerts.yml has groups");
    groups.iter().flat_map(|group| group["rules"].as_sequence().into_iter().flatten()).collect()
}

fn unknown_metrics(exported: &Exported, queries: &[Query]) -> Vec<String> {
    queries
        .iter()
        .flat_map(|q| {
            exported.unknown(&q.expr).into_iter().map(move |name| format!("{}: {name} in `{}`", q.place, q.expr))
        })
        .collect()
}

#[test]
fn the_check_reports_names_the_daemon_does_not_export() {
    let exported = Exported::new();
    assert_eq!(
        exported.unknown("sum(rate(lockstep_not_a_metric[5m])) / sum(lockstep_users)"),
        ["lockstep_not_a_metric"]
    );
    // Histogram series are accepted for histograms only.
    assert!(exported.unknown("rate(lockstep_evidence_refresh_duration_seconds_bucket[1h])").is_empty());
    assert_eq!(exported.unknown("lockstep_users_count"), ["lockstep_users_count"]);
    // Whole identifiers only, and label values are not metrics.
    assert_eq!(metric_names(r#"my_lockstep_users + lockstep_gate{gate="open", job="lockstep"}"#), ["lockstep_gate"]);

    let queries = [Query { place: "panel \"made up\"".into(), expr: "increase(lockstep_not_a_metric[1h])".into() }];
    assert_eq!(
        unknown_metrics(&exported, &queries),
        ["panel \"made up\": lockstep_not_a_metric in `increase(lockstep_not_a_metric[1h])`"]
    );
}

#[test]
fn the_dashboard_queries_only_exported_metrics() {
    let queries = dashboard_queries(&load_dashboard());
    let unknown = unknown_metrics(&Exported::new(), &queries);
    assert!(unknown.is_empty(), "the dashboard queries metrics the daemon does not export:\n{}", unknown.join("\n"));
}

#[test]
fn the_dashboard_covers_the_essential_metrics() {
    let exported = Exported::new();
    let queries = dashboard_queries(&load_dashboard());
    let charted: BTreeSet<&str> =
        queries.iter().flat_map(|q| metric_names(&q.expr)).filter_map(|name| exported.family(name)).collect();
    let missing: Vec<&&str> = REQUIRED_ON_DASHBOARD.iter().filter(|name| !charted.contains(**name)).collect();
    assert!(missing.is_empty(), "the dashboard no longer charts {missing:?}");
}

#[test]
fn every_dashboard_panel_queries_through_the_datasource_variable() {
    let dashboard = load_dashboard();
    let variables = dashboard["templating"]["list"].as_array().expect("templating variables");
    assert!(
        variables.iter().any(|v| v["name"] == "datasource" && v["type"] == "datasource" && v["query"] == "prometheus"),
        "the dashboard needs a Prometheus `datasource` variable"
    );
    let mut charts = 0;
    for panel in panels(&dashboard) {
        let title = &panel["title"];
        assert!(panel["gridPos"]["w"].is_u64() && panel["gridPos"]["h"].is_u64(), "panel {title} has no gridPos");
        if panel["type"] == "row" {
            continue;
        }
        charts += 1;
        assert_eq!(panel["datasource"]["uid"], "${datasource}", "panel {title} must use the datasource variable");
        let exprs: Vec<&str> =
            panel["targets"].as_array().into_iter().flatten().filter_map(|t| t["expr"].as_str()).collect();
        assert!(!exprs.is_empty() && exprs.iter().all(|e| !e.trim().is_empty()), "panel {title} has no query");
    }
    assert!(charts >= 10, "only {charts} panels");
}

#[test]
fn the_alert_rules_query_only_exported_metrics() {
    let alerts = load_alerts();
    let rules = alert_rules(&alerts);
    let queries: Vec<Query> = rules
        .iter()
        .map(|rule| Query {
            place: format!("alert {}", rule["alert"].as_str().unwrap_or("(unnamed)")),
            expr: rule["expr"].as_str().expect("every rule has an expr").to_string(),
        })
        .collect();
    assert!(!queries.is_empty(), "no alert rules in {ALERTS}");
    let unknown = unknown_metrics(&Exported::new(), &queries);
    assert!(unknown.is_empty(), "the alert rules query metrics the daemon does not export:\n{}", unknown.join("\n"));
}

#[test]
fn every_alert_has_a_for_a_severity_and_tells_the_operator_what_to_run() {
    let alerts = load_alerts();
    for rule in alert_rules(&alerts) {
        let name = rule["alert"].as_str().expect("only alerting rules in alerts.yml");
        assert!(rule["for"].as_str().is_some(), "{name} has no `for`");
        assert!(matches!(rule["labels"]["severity"].as_str(), Some("critical" | "warning")), "{name} has no severity");
        assert!(rule["annotations"]["summary"].as_str().is_some(), "{name} has no summary");
        let description = rule["annotations"]["description"].as_str().unwrap_or_default();
        assert!(description.contains('`'), "{name}'s description names no command or setting to look at");
    }
}
