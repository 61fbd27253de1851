//! `lockstep backtest`: what the configured rollout would have done over the stored evidence,
//! had it started at `--since`. Reads the store (opened read-only), never IAM; prints a table,
//! JSON, and writes a self-contained HTML report.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use chrono::{DateTime, Utc};
use lockstep::backtest::{self, History, Report};
use lockstep::clock::{Clock, SystemClock};
use lockstep::config::Config;
use lockstep::store::Store;

use super::evidence::{TimeArg, emit, thousands};

/// The HTML report's page; `/*REPORT*/` is replaced by the report as JSON.
const PAGE: &str = include_str!("backtest.html");

/// What `lockstep backtest` was asked for.
pub struct Options {
    pub since: TimeArg,
    pub until: TimeArg,
    pub resume_after: Option<std::time::Duration>,
    pub json: bool,
    pub html: Option<PathBuf>,
}

pub fn run(config: &Config, options: Options) -> anyhow::Result<ExitCode> {
    let now = SystemClock.now();
    let (since, until) = (options.since.resolve(now), options.until.resolve(now));
    let path = &config.store.path;
    let store = Store::open_read_only(path).with_context(|| format!("cannot read the store {}", path.display()))?;
    let history =
        History { outside: store.outside_calls(since, until)?, denials: store.recorded_denials(since, until)? };
    let scratch = Store::open_in_memory().context("cannot open a scratch ledger in memory")?;
    let resume_after = options.resume_after.map(lockstep::duration::chrono_of);
    let report =
        backtest::replay(config, &store, &history, &scratch, &backtest::Options { since, until, resume_after })
            .context("the backtest failed")?;
    if let Some(file) = &options.html {
        std::fs::write(file, html(&report)?).with_context(|| format!("cannot write {}", file.display()))?;
    }
    if options.json {
        emit(serde_json::to_string_pretty(&report)? + "\n")?;
    } else {
        emit(table(&report))?;
    }
    Ok(ExitCode::SUCCESS)
}

/// The self-contained HTML report: the page with the report inlined as JSON (safe inside a
/// `<script>` element: `<`, `>` and `&` are escaped, which JSON allows in strings).
pub fn html(report: &Report) -> anyhow::Result<String> {
    let json = serde_json::to_string(report)?.replace('<', "\\u003c").replace('>', "\\u003e").replace('&', "\\u0026");
    Ok(PAGE.replace("/*REPORT*/", &json))
}

fn when(at: DateTime<Utc>) -> String {
    at.format("%Y-%m-%d %H:%MZ").to_string()
}

fn maybe(at: Option<DateTime<Utc>>) -> String {
    at.map_or("-".to_string(), when)
}

/// The report for people.
fn table(report: &Report) -> String {
    let t = &report.totals;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "Backtest: the rollout as configured, started {} and replayed to {} (perimeter {}).",
        when(report.since),
        when(report.until),
        report.perimeter
    );
    let _ = writeln!(
        out,
        "{} users; {} batches ({} rolled back); {} users locked ({} at the end); {} would-deny calls hit locked users \
         ({} rows in soak, {} breakages).",
        t.users,
        t.batches,
        t.rollbacks,
        t.locked_users,
        t.locked_at_end,
        thousands(t.would_deny_calls),
        t.soak_hits,
        t.breakages
    );
    let _ = writeln!(
        out,
        "\nBATCHES\n{:>5}  {:<14} {:<17}  {:<17}  {:<17}  {:<11}  MEMBERS",
        "BATCH", "WAVE", "STARTED", "SOAK UNTIL", "FINISHED", "STATE"
    );
    for b in &report.batches {
        let _ = writeln!(
            out,
            "{:>5}  {:<14} {:<17}  {:<17}  {:<17}  {:<11}  {}",
            b.id,
            b.wave,
            when(b.started_at),
            maybe(b.soak_until),
            maybe(b.finished_at),
            b.state,
            b.members.join(", ")
        );
        if !b.culprits.is_empty() {
            let _ = writeln!(out, "{:>5}  culprits: {}", "", b.culprits.join(", "));
        }
    }
    let _ = writeln!(out, "\nWOULD-DENY CALLS TO LOCKED USERS");
    if report.hits.is_empty() {
        let _ = writeln!(out, "none");
    }
    for h in &report.hits {
        let _ = writeln!(
            out,
            "{}  {} (batch {}): {} x {} from {} ({}), {} in {}; guard: {}",
            when(h.at),
            h.user,
            h.batch.map_or("-".to_string(), |b| b.to_string()),
            thousands(h.calls),
            h.action,
            h.source,
            h.cause,
            h.outcome,
            h.phase,
            h.detail
        );
    }
    let _ = writeln!(
        out,
        "\nCOVERAGE\n{:<10}  {:>7}  {:>8}  {:>6}  {:>12}  {:>9}",
        "DAY", "LOCKED", "ELIGIBLE", "TOTAL", "DENIED CALLS", "ROLLBACKS"
    );
    for c in &report.coverage {
        let _ = writeln!(
            out,
            "{:<10}  {:>7}  {:>8}  {:>6}  {:>12}  {:>9}",
            c.day.to_string(),
            c.locked,
            c.eligible,
            c.total,
            thousands(c.would_deny_calls),
            c.rollbacks
        );
    }
    if !report.milestones.is_empty() {
        let _ = writeln!(out, "\nMILESTONES");
        for m in &report.milestones {
            let _ = writeln!(out, "{}  {}", when(m.at), m.what);
        }
    }
    let _ = writeln!(out, "\nNot known from history: {}.", report.caveats.join("; "));
    out
}
