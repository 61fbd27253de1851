//! The guard's judgement: did a freshly promoted batch start getting denied? A pure function of
//! the batch, the denials seen since its promotion, baselines, the event source's health and
//! `now`.
//!
//! Denials are weighed rather than counted. One that says "explicit deny in an identity-based
//! policy" (or names the lockdown policy) is what the lockdown produces and counts fully. Generic
//! "no policy allows" denials happen all the time, so they count only above what was expected
//! anyway: the higher of the member's own pre-promotion rate and the current rate among users not
//! yet promoted (an incident that hits everyone is not the batch's fault), plus Poisson noise.

use std::collections::{BTreeMap, BTreeSet};

use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::config::Guard;
use crate::rollout::Batch;
use crate::trail::Denial;

/// One recorded denial of one user.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DenialEvent {
    pub user: String,
    pub at: DateTime<Utc>,
    pub action: String,
    pub kind: Denial,
    pub code: String,
    pub message: String,
}

/// Generic-denial rate among users who are not promoted, over the guard window.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct CohortRate {
    pub denials: u64,
    pub users: u64,
    pub hours: f64,
}

impl CohortRate {
    /// Denials per user per hour.
    pub fn per_user_hour(&self) -> f64 {
        if self.users == 0 || self.hours <= 0.0 {
            0.0
        } else {
            self.denials as f64 / (self.users as f64 * self.hours)
        }
    }
}

/// Whether the event stream the guard reads can be trusted to show denials.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SourceHealth {
    /// The newest event time seen in the stream.
    pub last_event_at: Option<DateTime<Utc>>,
    /// When a poll last succeeded.
    pub last_ok_poll: Option<DateTime<Utc>>,
    /// The last poll's error, if it failed.
    pub error: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "verdict", rename_all = "snake_case")]
pub enum Verdict {
    Healthy {
        detail: String,
    },
    Spike {
        affected: Vec<String>,
        weighted_denials: u64,
        offending: Vec<DenialEvent>,
        detail: String,
    },
    Inconclusive {
        why: String,
    },
}

named_enum!(
    /// A verdict's kind: what metrics, the CLI and the ledger match on.
    VerdictKind {
        Healthy = "healthy",
        Spike = "spike",
        Inconclusive = "inconclusive",
    }
);

impl Verdict {
    pub fn kind(&self) -> VerdictKind {
        match self {
            Verdict::Healthy { .. } => VerdictKind::Healthy,
            Verdict::Spike { .. } => VerdictKind::Spike,
            Verdict::Inconclusive { .. } => VerdictKind::Inconclusive,
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Verdict::Healthy { .. } => "healthy",
            Verdict::Spike { .. } => "spike",
            Verdict::Inconclusive { .. } => "inconclusive",
        }
    }

    pub fn summary(&self) -> String {
        match self {
            Verdict::Healthy { detail } | Verdict::Spike { detail, .. } => format!("{}: {detail}", self.name()),
            Verdict::Inconclusive { why } => format!("inconclusive: {why}"),
        }
    }
}

/// Everything one judgement needs.
pub struct Input<'a> {
    pub batch: &'a Batch,
    /// Denials of this batch's members; older ones and other users' are ignored.
    pub events: &'a [DenialEvent],
    /// Each member's generic denials per hour before promotion.
    pub baselines: &'a BTreeMap<String, f64>,
    pub cohort: CohortRate,
    pub source: &'a SourceHealth,
    pub config: &'a Guard,
    pub now: DateTime<Utc>,
}

/// How many of `observed` generic denials exceed what `expected` explains, allowing three
/// standard deviations of Poisson noise.
fn excess_over_expected(observed: u64, expected: f64) -> u64 {
    let allowance = (expected + 3.0 * expected.sqrt()).ceil() as u64;
    observed.saturating_sub(allowance)
}

pub fn judge(input: &Input) -> Verdict {
    let Some(applied_at) = input.batch.applied_at else {
        return Verdict::Inconclusive {
            why: "batch not applied yet".to_string(),
        };
    };
    let window = chrono::Duration::from_std(input.config.window).unwrap_or(chrono::Duration::zero());
    let since = applied_at.max(input.now - window);
    let hours = ((input.now - since).num_seconds().max(0) as f64) / 3600.0;
    let members: BTreeSet<&str> = input.batch.members.iter().map(String::as_str).collect();
    let recent: Vec<&DenialEvent> = input
        .events
        .iter()
        .filter(|e| members.contains(e.user.as_str()) && e.at >= since && e.at <= input.now)
        .collect();

    let cohort_rate = input.cohort.per_user_hour();
    let mut affected = Vec::new();
    let mut weighted = 0u64;
    for member in &members {
        let mine = recent.iter().filter(|e| e.user == *member);
        let explicit = mine.clone().filter(|e| e.kind == Denial::ExplicitIdentityDeny).count() as u64;
        let other = mine.filter(|e| e.kind == Denial::Other).count() as u64;
        let baseline = input.baselines.get(*member).copied().unwrap_or(0.0);
        let expected = baseline.max(cohort_rate) * hours;
        let weight = explicit + excess_over_expected(other, expected);
        if weight > 0 {
            affected.push(member.to_string());
            weighted += weight;
        }
    }

    let thresholds_met =
        affected.len() >= input.config.min_affected_users && weighted >= input.config.min_denials as u64;
    if thresholds_met {
        let offending = recent
            .iter()
            .filter(|e| affected.contains(&e.user))
            .map(|e| (*e).clone())
            .collect();
        return Verdict::Spike {
            detail: format!(
                "{} of {} members denied, {weighted} weighted denials since {} (thresholds: {} users, {} denials)",
                affected.len(),
                members.len(),
                since.format("%Y-%m-%d %H:%M:%SZ"),
                input.config.min_affected_users,
                input.config.min_denials
            ),
            affected,
            weighted_denials: weighted,
            offending,
        };
    }

    if let Some(why) = source_problem(input.source, input.config, input.now) {
        return Verdict::Inconclusive { why };
    }
    Verdict::Healthy {
        detail: format!(
            "{weighted} weighted denials among {} members since {} (cohort rate {cohort_rate:.2}/user-hour)",
            members.len(),
            since.format("%Y-%m-%d %H:%M:%SZ")
        ),
    }
}

/// Why the event source cannot be relied on right now, if it cannot.
pub fn source_problem(source: &SourceHealth, config: &Guard, now: DateTime<Utc>) -> Option<String> {
    let limit = chrono::Duration::from_std(config.silence_limit).unwrap_or(chrono::Duration::zero());
    let human = crate::duration::elapsed;
    match (source.last_ok_poll, &source.error) {
        (None, Some(error)) => return Some(format!("event source has never been read successfully: {error}")),
        (None, None) => return Some("event source not read yet".to_string()),
        (Some(ok), error) if now - ok > limit => {
            return Some(format!(
                "event source failing for {} (limit {}){}",
                human(now - ok),
                human(limit),
                error.as_ref().map(|e| format!(": {e}")).unwrap_or_default()
            ));
        }
        _ => {}
    }
    match source.last_event_at {
        None => Some("event source has delivered no events yet".to_string()),
        Some(last) if now - last > limit => Some(format!(
            "event source silent for {} (limit {})",
            human(now - last),
            human(limit)
        )),
        Some(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rollout::BatchState;
    use chrono::TimeZone;
    use std::time::Duration;

    fn t(minutes: i64) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 3, 1, 12, 0, 0).unwrap() + chrono::Duration::minutes(minutes)
    }

    fn config() -> Guard {
        Guard {
            source: crate::config::SourceKind::Files,
            poll: Duration::from_secs(60),
            grace: Duration::from_secs(3600),
            window: Duration::from_secs(15 * 60),
            min_affected_users: 1,
            min_denials: 3,
            silence_limit: Duration::from_secs(30 * 60),
        }
    }

    fn batch() -> Batch {
        Batch {
            id: 7,
            wave: "canary".into(),
            state: BatchState::Soaking,
            members: vec!["alice".into(), "bob".into()],
            created_at: t(0),
            applied_at: Some(t(0)),
            soak_until: Some(t(24 * 60)),
            finished_at: None,
            verdict: None,
            soak: None,
            verdict_kind: None,
        }
    }

    fn denial(user: &str, minute: i64, kind: Denial) -> DenialEvent {
        DenialEvent {
            user: user.into(),
            at: t(minute),
            action: "s3:ListBucket".into(),
            kind,
            code: "AccessDenied".into(),
            message: String::new(),
        }
    }

    fn healthy_source(now: DateTime<Utc>) -> SourceHealth {
        SourceHealth {
            last_event_at: Some(now - chrono::Duration::minutes(2)),
            last_ok_poll: Some(now),
            error: None,
        }
    }

    fn judge_at(now: i64, events: &[DenialEvent], baselines: &BTreeMap<String, f64>, cohort: CohortRate) -> Verdict {
        let source = healthy_source(t(now));
        let config = config();
        let batch = batch();
        judge(&Input {
            batch: &batch,
            events,
            baselines,
            cohort,
            source: &source,
            config: &config,
            now: t(now),
        })
    }

    #[test]
    fn explicit_denials_make_a_spike() {
        let events: Vec<_> = (0..3).map(|m| denial("alice", 30 + m, Denial::ExplicitIdentityDeny)).collect();
        match judge_at(35, &events, &BTreeMap::new(), CohortRate::default()) {
            Verdict::Spike { affected, weighted_denials, offending, .. } => {
                assert_eq!(affected, ["alice"]);
                assert_eq!(weighted_denials, 3);
                assert_eq!(offending.len(), 3);
            }
            other => panic!("expected spike, got {other:?}"),
        }
    }

    #[test]
    fn below_threshold_is_healthy() {
        let events = [denial("alice", 30, Denial::ExplicitIdentityDeny)];
        assert_eq!(judge_at(35, &events, &BTreeMap::new(), CohortRate::default()).name(), "healthy");
    }

    #[test]
    fn denials_before_promotion_or_outside_the_window_do_not_count() {
        let events: Vec<_> = [-10, -5, -1, 1, 2, 3].map(|m| denial("alice", m, Denial::ExplicitIdentityDeny)).to_vec();
        // At minute 60 the window is 45..60: none of these are in it.
        assert_eq!(judge_at(60, &events, &BTreeMap::new(), CohortRate::default()).name(), "healthy");
        // At minute 5 the window starts at promotion (0): three count.
        assert_eq!(judge_at(5, &events, &BTreeMap::new(), CohortRate::default()).name(), "spike");
    }

    #[test]
    fn generic_denials_at_the_members_own_baseline_are_not_a_spike() {
        // Alice is denied ~40 times an hour anyway; 10 in 15 minutes is her normal.
        let events: Vec<_> = (0..10).map(|m| denial("alice", 45 + m, Denial::Other)).collect();
        let baselines = BTreeMap::from([("alice".to_string(), 40.0)]);
        assert_eq!(judge_at(60, &events, &baselines, CohortRate::default()).name(), "healthy");
        // Without the baseline the same denials are a spike.
        assert_eq!(judge_at(60, &events, &BTreeMap::new(), CohortRate::default()).name(), "spike");
    }

    #[test]
    fn an_incident_that_hits_everyone_is_not_the_batchs_fault() {
        let events: Vec<_> = (0..12).map(|m| denial(if m % 2 == 0 { "alice" } else { "bob" }, 45 + m, Denial::Other)).collect();
        // The unpromoted cohort sees 30 denials per user-hour right now.
        let cohort = CohortRate { denials: 75, users: 10, hours: 0.25 };
        assert_eq!(judge_at(60, &events, &BTreeMap::new(), cohort).name(), "healthy");
    }

    #[test]
    fn silence_is_inconclusive_but_a_seen_spike_still_wins() {
        let (config, batch, baselines) = (config(), batch(), BTreeMap::new());
        let silent = SourceHealth {
            last_event_at: Some(t(0)),
            last_ok_poll: Some(t(100)),
            error: None,
        };
        let spike: Vec<_> = (0..3).map(|m| denial("bob", 95 + m, Denial::ExplicitIdentityDeny)).collect();
        let verdicts: Vec<Verdict> = [&[][..], &spike[..]]
            .into_iter()
            .map(|events| {
                judge(&Input {
                    batch: &batch,
                    events,
                    baselines: &baselines,
                    cohort: CohortRate::default(),
                    source: &silent,
                    config: &config,
                    now: t(100),
                })
            })
            .collect();
        assert!(matches!(&verdicts[0], Verdict::Inconclusive { why } if why.contains("silent for 1h40m")), "{verdicts:?}");
        assert_eq!(verdicts[1].name(), "spike");
    }

    #[test]
    fn failing_source_is_inconclusive() {
        let config = config();
        let failing = SourceHealth {
            last_event_at: Some(t(50)),
            last_ok_poll: Some(t(10)),
            error: Some("ListObjectsV2: throttled".into()),
        };
        let why = source_problem(&failing, &config, t(60)).unwrap();
        assert!(why.contains("failing for 50m") && why.contains("throttled"), "{why}");
        assert!(source_problem(&healthy_source(t(60)), &config, t(60)).is_none());
        assert!(source_problem(&SourceHealth::default(), &config, t(60)).is_some());
    }
}
