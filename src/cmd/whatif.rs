//! `lockstep whatif`: the stored evidence re-judged under a candidate configuration, changing
//! nothing. The store is copied (opened read-only) into a private file, judged there under the
//! configuration in force and then under the candidate, by the one re-judgement the daemon uses;
//! each user's eligibility is the planner's own decision under each. IAM is only read (users and
//! tags).

use std::collections::BTreeMap;
use std::path::Path;
use std::process::ExitCode;

use anyhow::{Context, bail};
use chrono::{DateTime, Utc};
use lockstep::clock::{Clock, SystemClock};
use lockstep::config::Config;
use lockstep::evidence::UserEvidence;
use lockstep::evidence::aggregate::Judge;
use lockstep::iam::{AwsIam, Iam};
use lockstep::planner::{self, Eligibility};
use lockstep::rollout::{IamUser, Snapshot};
use lockstep::store::{EvidenceWriter, Ledger, Store};
use serde::Serialize;

/// Sources shown per user: the calls that make the difference.
const TOP_SOURCES: usize = 5;

/// What `whatif` reports.
#[derive(Debug, Serialize)]
pub struct WhatIf {
    current: Side,
    candidate: Side,
    policy: PolicyDiff,
    /// Ineligible under the configuration in force, eligible under the candidate.
    becomes_eligible: Vec<Change>,
    /// Eligible under the configuration in force, ineligible under the candidate.
    stops_being_eligible: Vec<Change>,
}

/// One configuration's view.
#[derive(Debug, Serialize)]
struct Side {
    file: String,
    perimeter: String,
    eligible: usize,
}

/// The rendered policies, and their line diff.
#[derive(Debug, Serialize)]
struct PolicyDiff {
    changed: bool,
    /// Every line of the policy, `"  "` unchanged, `"- "` only in force, `"+ "` only in the candidate.
    diff: Vec<String>,
    current: serde_json::Value,
    candidate: serde_json::Value,
}

/// A user whose eligibility changes, with why under each configuration.
#[derive(Debug, Serialize, PartialEq, Eq)]
struct Change {
    user: String,
    now: String,
    candidate: String,
    /// The outside sources (calls the policy denies) that make the difference: under the
    /// candidate for users who stop being eligible, in force for users who become eligible.
    sources: Vec<SourceCount>,
}

#[derive(Debug, Serialize, PartialEq, Eq)]
struct SourceCount {
    source: String,
    calls: u64,
}

/// Compares `candidate` with the configuration in force, `current`, over the store `current`
/// names; prints the report.
pub async fn run(
    candidate_path: &Path,
    candidate: &Config,
    current_path: &Path,
    account: Option<&str>,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let current = super::load(current_path, "whatif", account)?;
    let original = &current.store.path;
    if !original.exists() {
        bail!("no store at {} (store.path): nothing has run yet with this configuration", original.display());
    }
    let scratch = tempfile::tempdir().context("creating a scratch folder for the store copy")?;
    let store = Store::copy_of(original, &scratch.path().join("whatif.db"))?;
    let sdk = lockstep::aws::load(&current.region, None).await;
    let users = AwsIam::new(&sdk, &current.account_id).list_users().await.context("listing IAM users")?.users;
    let now = SystemClock.now();
    let ledger = store.snapshot()?;
    let legacy = lockstep::evidence::EvidenceStore::freshness(&store)?.legacy_hours;
    if legacy > 0 {
        eprintln!(
            "warning: {legacy} user-hours were stored before request contexts were kept and keep their old \
             verdicts here; the next evidence refresh re-reads them"
        );
    }
    let before = judged(&store, &current, now)?;
    let after = judged(&store, candidate, now)?;
    let report = compare((&current, current_path, &before), (candidate, candidate_path, &after), &users, &ledger, now)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", render(&report));
    }
    Ok(ExitCode::SUCCESS)
}

/// The evidence over `config`'s eligibility window, judged under its perimeter.
fn judged(store: &Store, config: &Config, now: DateTime<Utc>) -> anyhow::Result<Vec<UserEvidence>> {
    store.ensure_judged(&Judge::new(config), now)?;
    let since = lockstep::config::earlier(now, config.eligibility.window);
    Ok(store.evidence(since, now, None)?)
}

type View<'a> = (&'a Config, &'a Path, &'a [UserEvidence]);

/// Who changes eligibility between the two views, by the planner's rule.
fn compare(
    current: View,
    candidate: View,
    users: &[IamUser],
    ledger: &Snapshot,
    now: DateTime<Utc>,
) -> anyhow::Result<WhatIf> {
    let decide = |(config, _, evidence): View| -> BTreeMap<&str, (Eligibility, Vec<SourceCount>)> {
        let by_user: BTreeMap<&str, &UserEvidence> = evidence.iter().map(|e| (e.user.as_str(), e)).collect();
        users
            .iter()
            .map(|user| {
                let evidence = by_user.get(user.name.as_str()).copied();
                let sources = evidence
                    .map(|e| {
                        e.outside_sources
                            .iter()
                            .take(TOP_SOURCES)
                            .map(|s| SourceCount { source: s.source.clone(), calls: s.calls })
                            .collect()
                    })
                    .unwrap_or_default();
                (user.name.as_str(), (planner::eligibility(user, evidence, ledger, config, now), sources))
            })
            .collect()
    };
    let (before, after) = (decide(current), decide(candidate));
    let mut report = WhatIf {
        current: side(current, &before),
        candidate: side(candidate, &after),
        policy: policy_diff(current.0, candidate.0)?,
        becomes_eligible: Vec::new(),
        stops_being_eligible: Vec::new(),
    };
    for (user, (now_eligibility, now_sources)) in &before {
        let Some((then, then_sources)) = after.get(user) else { continue };
        let change = |sources: &[SourceCount]| Change {
            user: user.to_string(),
            now: reason(now_eligibility).to_string(),
            candidate: reason(then).to_string(),
            sources: sources.iter().map(|s| SourceCount { source: s.source.clone(), calls: s.calls }).collect(),
        };
        match (now_eligibility, then) {
            (Eligibility::Ineligible(_), Eligibility::Eligible(_)) => report.becomes_eligible.push(change(now_sources)),
            (Eligibility::Eligible(_), Eligibility::Ineligible(_)) => {
                report.stops_being_eligible.push(change(then_sources))
            }
            _ => {}
        }
    }
    Ok(report)
}

fn side((config, path, _): View, decided: &BTreeMap<&str, (Eligibility, Vec<SourceCount>)>) -> Side {
    Side {
        file: path.display().to_string(),
        perimeter: config.perimeter.fingerprint().to_string(),
        eligible: decided.values().filter(|(e, _)| matches!(e, Eligibility::Eligible(_))).count(),
    }
}

fn reason(eligibility: &Eligibility) -> &str {
    match eligibility {
        Eligibility::Eligible(why) | Eligibility::Ineligible(why) => why,
    }
}

fn policy_diff(current: &Config, candidate: &Config) -> anyhow::Result<PolicyDiff> {
    let render = |config: &Config| -> anyhow::Result<String> {
        config.perimeter.policy().to_pretty_json().context("rendering the policy")
    };
    let (before, after) = (render(current)?, render(candidate)?);
    let before_lines: Vec<&str> = before.lines().collect();
    let after_lines: Vec<&str> = after.lines().collect();
    Ok(PolicyDiff {
        changed: before != after,
        diff: line_diff(&before_lines, &after_lines),
        current: serde_json::from_str(&before)?,
        candidate: serde_json::from_str(&after)?,
    })
}

/// Every line of `old` and `new` in order, marked `"  "` (both), `"- "` (old only) or `"+ "`
/// (new only), by their longest common subsequence. Policies are a few hundred lines at most.
fn line_diff(old: &[&str], new: &[&str]) -> Vec<String> {
    // common[i][j]: the longest common subsequence of old[i..] and new[j..].
    let mut common = vec![vec![0usize; new.len() + 1]; old.len() + 1];
    for i in (0..old.len()).rev() {
        for j in (0..new.len()).rev() {
            common[i][j] =
                if old[i] == new[j] { common[i + 1][j + 1] + 1 } else { common[i + 1][j].max(common[i][j + 1]) };
        }
    }
    let (mut i, mut j, mut out) = (0, 0, Vec::new());
    while i < old.len() || j < new.len() {
        if i < old.len() && j < new.len() && old[i] == new[j] {
            out.push(format!("  {}", old[i]));
            (i, j) = (i + 1, j + 1);
        } else if j < new.len() && (i == old.len() || common[i][j + 1] >= common[i + 1][j]) {
            out.push(format!("+ {}", new[j]));
            j += 1;
        } else {
            out.push(format!("- {}", old[i]));
            i += 1;
        }
    }
    out
}

fn render(report: &WhatIf) -> String {
    let mut out = String::new();
    if report.policy.changed {
        out += &format!("policy diff ({} -> {}):\n", report.current.file, report.candidate.file);
        for line in &report.policy.diff {
            out += &format!("  {line}\n");
        }
    } else {
        out += "policy: unchanged\n";
    }
    out += &format!(
        "perimeter {} -> {}; eligible now {}, under the candidate {}\n",
        report.current.perimeter, report.candidate.perimeter, report.current.eligible, report.candidate.eligible
    );
    for (title, changes) in
        [("becomes eligible", &report.becomes_eligible), ("stops being eligible", &report.stops_being_eligible)]
    {
        out += &format!("\n{title}: {}\n", changes.len());
        for change in changes {
            out += &format!("  {:<24} {}\n", change.user, change.candidate);
            out += &format!("  {:<24} now: {}\n", "", change.now);
            if !change.sources.is_empty() {
                let sources: Vec<String> =
                    change.sources.iter().map(|s| format!("{} ({} calls)", s.source, s.calls)).collect();
                out += &format!("  {:<24} calls that make the difference: {}\n", "", sources.join(", "));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_diff_marks_removed_and_added_lines_in_order() {
        let diff = line_diff(&["{", "a", "b", "}"], &["{", "b", "c", "}"]);
        assert_eq!(diff, ["  {", "- a", "  b", "+ c", "  }"]);
        assert_eq!(line_diff(&["x"], &["x"]), ["  x"]);
        assert_eq!(line_diff(&[], &["y"]), ["+ y"]);
    }
}
