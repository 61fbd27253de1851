//! Backtest: what the configured rollout would have done over the stored evidence, had it started
//! at `since`. Changes nothing: it reads the evidence and drives a scratch ledger.
//!
//! Virtual time steps through every hour of the history, and through every guard poll that
//! follows a call a lockdown would have denied. At each step the replay does what a controller
//! step does, with the same functions: the guard judges the watched batches ([`guard::assess`],
//! delivery included), the planner plans ([`planner::plan`], eligibility included) on the
//! evidence of `eligibility.window` up to the step's hour, and the plan is applied to the
//! scratch ledger through the [`Ledger`] trait (start, lock, soak, succeed, roll back, hold), as
//! the controller applies it, with the IAM writes taken as done.
//!
//! The calls the lockdown would have denied are the stored calls from outside the perimeter:
//! each becomes the denial a locked user would have met (an explicit deny in an identity-based
//! policy), attributed by [`guard::attribute_stated`] on its stored verdict. Recorded denials
//! count as the guard would weigh a record with no cause it can check: explicit identity-based
//! ones `unknown`, the rest `other`.
//!
//! What history cannot say: the IAM directory is not read, so the users are those with calls in
//! the evidence, without tags (exemption tags and tag selectors never apply); a call is timed at
//! the last call from its source in its hour; `guard.after_soak` is reported, not applied (the
//! daemon does not apply it yet either); a rollout paused by the guard stays paused unless
//! [`Options::resume_after`] says when an operator would resume it.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use chrono::{DateTime, NaiveDate, TimeDelta, Utc};
use serde::Serialize;

use crate::config::Config;
use crate::controller::{await_delivery, journal_guard_rollback, soaks_to_start, watched, wave_soak};
use crate::duration::chrono_of;
use crate::evidence::aggregate::hour_of;
use crate::evidence::{EvidenceStore, Freshness, OutsideCalls, RecordedDenials, UserEvidence};
use crate::guard::{self, Attribution, Cause, CohortRate, DenialEvent, SourceHealth, VerdictKind};
use crate::perimeter;
use crate::planner::{self, Action, Eligibility};
use crate::rollout::{BatchState, IamUser, Snapshot};
use crate::store::{Ledger, NewBatch, StoreError};
use crate::trail::{PolicyType, StatedCause};

/// The actor the scratch ledger's audit lines name.
const ACTOR: &str = "backtest";

/// A stored row stands for at most this many denial events in the guard's counts: far above
/// any spike threshold, and it keeps memory bounded for sources that call thousands of times.
const MAX_EVENTS_PER_ROW: u64 = 1_000;

/// The stored history the replay reads besides the per-step evidence.
#[derive(Debug, Clone, Default)]
pub struct History {
    /// Calls from outside the perimeter, per user-hour and source, in `last_seen` order.
    pub outside: Vec<OutsideCalls>,
    /// Recorded denials per user-hour.
    pub denials: Vec<RecordedDenials>,
}

/// What to replay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Options {
    /// The rollout starts here.
    pub since: DateTime<Utc>,
    /// The replay ends here.
    pub until: DateTime<Utc>,
    /// How long after a guard pause an operator would resume; `None`: never.
    pub resume_after: Option<TimeDelta>,
}

/// Why a backtest could not run.
#[derive(Debug, thiserror::Error)]
pub enum BacktestError {
    /// Reading the evidence or writing the scratch ledger failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The evidence cannot be replayed as it is (judged under another perimeter, say).
    #[error("{0}")]
    Refused(String),
}

named_enum!(
    /// Where a would-be denial of a locked user falls.
    Phase {
        /// The user's batch is soaking (or in its grace): the guard judges it.
        Soak = "soak",
        /// The user's batch succeeded: the lock is for good.
        AfterSoak = "after_soak",
    }
);

named_enum!(
    /// What a would-be denial of a locked user led to.
    Outcome {
        /// The guard called a spike: the batch is rolled back.
        RolledBack = "rolled_back",
        /// The user stayed locked and the call failed: something broke.
        Breakage = "breakage",
    }
);

/// Calls from one source a lockdown would have denied to a locked user, in one hour.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Hit {
    /// When (the last such call in the hour).
    pub at: DateTime<Utc>,
    /// The locked user.
    pub user: String,
    /// The batch that locked the user.
    pub batch: Option<i64>,
    /// The action of the last call.
    pub action: String,
    /// Where the calls came from.
    pub source: String,
    /// How many calls.
    pub calls: u64,
    /// Why the perimeter denies them.
    pub reason: perimeter::DenyReason,
    /// The guard's cause for such a denial.
    pub cause: Cause,
    /// Soak or after.
    pub phase: Phase,
    /// Rolled back or broken.
    pub outcome: Outcome,
    /// The guard's verdict on the batch (in soak) or its `after_soak` action (after).
    pub guard: String,
    /// The guard's explanation, for people.
    pub detail: String,
}

/// One batch the replay started, and how it ended.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BatchOutcome {
    /// The batch number in the replay.
    pub id: i64,
    /// Its wave.
    pub wave: String,
    /// Where it ended up.
    pub state: BatchState,
    /// Who it promoted.
    pub members: Vec<String>,
    /// When it would have started.
    pub started_at: DateTime<Utc>,
    /// When its soak would have ended.
    pub soak_until: Option<DateTime<Utc>>,
    /// When it succeeded or was rolled back.
    pub finished_at: Option<DateTime<Utc>>,
    /// The guard's last verdict on it.
    pub verdict: Option<String>,
    /// The members the guard found at fault, for a rolled-back batch.
    pub culprits: Vec<String>,
}

/// A span during which a user would have been locked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Locked {
    /// The user.
    pub user: String,
    /// The batch that locked them.
    pub batch: i64,
    /// When they were locked.
    pub from: DateTime<Utc>,
    /// When a rollback took them out, if one did.
    pub until: Option<DateTime<Utc>>,
}

/// Coverage at the end of one day (or of the replay).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Coverage {
    /// The day (UTC).
    pub day: NaiveDate,
    /// Users locked at its end.
    pub locked: usize,
    /// Users eligible at its last step.
    pub eligible: usize,
    /// Users with calls in the history so far.
    pub total: usize,
    /// Calls a lockdown denied to locked users that day.
    pub would_deny_calls: u64,
    /// Batches rolled back that day.
    pub rollbacks: usize,
}

/// Something that changed the course of the rollout: a pause, a resume, a finished wave.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Milestone {
    /// When.
    pub at: DateTime<Utc>,
    /// What, for people.
    pub what: String,
}

/// The figures at a glance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct Totals {
    /// Users with calls in the history.
    pub users: usize,
    /// Batches started.
    pub batches: usize,
    /// Batches rolled back.
    pub rollbacks: usize,
    /// Different users locked at some point.
    pub locked_users: usize,
    /// Users locked at the end.
    pub locked_at_end: usize,
    /// Would-deny calls that hit a locked user in a watched batch.
    pub soak_hits: usize,
    /// Would-deny calls that hit a locked user and were not rolled back.
    pub breakages: usize,
    /// Calls a lockdown would have denied to locked users.
    pub would_deny_calls: u64,
}

/// What the rollout would have done.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Report {
    /// The rollout starts here.
    pub since: DateTime<Utc>,
    /// The replay ends here.
    pub until: DateTime<Utc>,
    /// The perimeter the evidence was judged under.
    pub perimeter: perimeter::Fingerprint,
    /// The figures at a glance.
    pub totals: Totals,
    /// Every batch started.
    pub batches: Vec<BatchOutcome>,
    /// Who would have been locked, when.
    pub locked: Vec<Locked>,
    /// Every would-deny call that hit a locked user.
    pub hits: Vec<Hit>,
    /// Coverage per day.
    pub coverage: Vec<Coverage>,
    /// Pauses, resumes and finished waves.
    pub milestones: Vec<Milestone>,
    /// What the replay cannot know from history.
    pub caveats: Vec<String>,
}

/// Replays the rollout over `[options.since, options.until]`: `evidence` is read, `ledger` (a
/// scratch one, empty) is where the replay keeps its state.
pub fn replay<E: EvidenceStore<Error = StoreError>>(
    config: &Config,
    evidence: &E,
    history: &History,
    ledger: &dyn Ledger,
    options: &Options,
) -> Result<Report, BacktestError> {
    let Options { since, until, .. } = *options;
    if until <= since {
        return Err(BacktestError::Refused(format!("nothing to replay: {since} is not before {until}")));
    }
    let stored = evidence.freshness()?;
    if let Some(problem) = planner::evidence_problem(&fresh_at(stored, since), config, since) {
        return Err(BacktestError::Refused(format!("the stored evidence cannot be replayed: {problem}")));
    }
    let window = chrono_of(config.eligibility.window);
    let users = directory(&evidence.user_evidence(since - window, until)?);
    let events = denial_events(history, config);
    let mut state = Replay::new(config, evidence, ledger, &events, stored);
    let mut previous = since;
    for step in steps(history, config, since, until) {
        state.step(history, previous, step, &users, options)?;
        previous = step;
    }
    state.report(options, &users)
}

/// Virtual time's steps: every hour boundary after `since` up to `until`, and the first guard
/// poll at or after each call a lockdown would have denied.
fn steps(history: &History, config: &Config, since: DateTime<Utc>, until: DateTime<Utc>) -> BTreeSet<DateTime<Utc>> {
    let poll = config.guard.poll.as_secs().max(1) as i64;
    let mut steps = BTreeSet::from([since]);
    let mut hour = hour_of(since) + TimeDelta::hours(1);
    while hour <= until {
        steps.insert(hour);
        hour += TimeDelta::hours(1);
    }
    let at_poll = |at: DateTime<Utc>| {
        let seconds = at.timestamp().div_euclid(poll) * poll;
        let tick = DateTime::from_timestamp(seconds, 0).unwrap_or(at);
        if tick < at { tick + TimeDelta::seconds(poll) } else { tick }
    };
    let times = history.outside.iter().map(|o| o.last_seen).chain(history.denials.iter().map(|d| d.last_call));
    steps.extend(times.filter(|at| *at > since && *at <= until).map(at_poll).filter(|at| *at <= until));
    steps
}

/// The evidence as a controller would find it at `now` after an on-time refresh.
fn fresh_at(stored: Freshness, now: DateTime<Utc>) -> Freshness {
    Freshness { last_success: Some(now), covered_until: Some(now), ..stored }
}

/// The users the evidence knows.
struct Users {
    /// As the planner takes them: name, ARN and the path read from it.
    directory: Vec<IamUser>,
    /// Each one's first call.
    first_calls: Vec<DateTime<Utc>>,
}

/// The users the evidence knows, as the planner takes them: name, ARN and the path read from it.
fn directory(evidence: &[UserEvidence]) -> Users {
    let (directory, first_calls) = evidence
        .iter()
        .map(|e| {
            let arn = e.arn.clone().unwrap_or_default();
            let path = arn
                .split_once(":user/")
                .and_then(|(_, rest)| rest.rsplit_once('/'))
                .map_or("/".to_string(), |(path, _)| format!("/{path}/").replace("//", "/"));
            (IamUser { name: e.user.clone(), arn, path, tags: BTreeMap::new() }, e.first_call)
        })
        .unzip();
    Users { directory, first_calls }
}

/// The denials locked users would have met, and the recorded ones, as the guard counts them,
/// in time order.
fn denial_events(history: &History, config: &Config) -> Vec<DenialEvent> {
    let policy = &config.lockdown.policy_name;
    let mut events = Vec::new();
    for row in &history.outside {
        let denial = DenialEvent {
            user: row.user.clone(),
            at: row.last_seen,
            action: row.action.clone(),
            kind: lockdown_denial(row, policy),
            code: "AccessDenied".to_string(),
            message: format!("would be denied by the lockdown policy {policy}: {}", row.reason),
            source: Some(row.source.clone()),
        };
        events.extend(std::iter::repeat_n(denial, row.calls.min(MAX_EVENTS_PER_ROW) as usize));
    }
    for row in &history.denials {
        for (cause, kind, count) in [
            (Cause::Unknown, "recorded_explicit_denial", row.explicit),
            (Cause::Other, "recorded_other_denial", row.other),
        ] {
            let denial = DenialEvent {
                user: row.user.clone(),
                at: row.last_call,
                action: String::new(),
                kind: Attribution { cause, evidence: guard::Evidence::Legacy { kind: kind.to_string() } },
                code: "AccessDenied".to_string(),
                message: "recorded denial (counted, not kept)".to_string(),
                source: None,
            };
            events.extend(std::iter::repeat_n(denial, count.min(MAX_EVENTS_PER_ROW) as usize));
        }
    }
    events.sort_by_key(|e| e.at);
    events
}

/// The guard's attribution of the denial a locked user would meet for these calls: the message
/// of an explicit identity-based deny, and the perimeter's stored verdict.
fn lockdown_denial(row: &OutsideCalls, policy: &str) -> Attribution {
    let stated = StatedCause::ExplicitDeny { policy_type: PolicyType::IdentityBased, policy_arn: None };
    guard::attribute_stated(stated, perimeter::Verdict::WouldDeny(row.reason), policy)
}

/// The replay's running state.
struct Replay<'a, E> {
    config: &'a Config,
    evidence: &'a E,
    ledger: &'a dyn Ledger,
    events: &'a [DenialEvent],
    stored: Freshness,
    /// The evidence of the current hour's window.
    current: Option<(DateTime<Utc>, Vec<UserEvidence>)>,
    /// Each batch's members' denials per hour before it was applied.
    baselines: HashMap<i64, BTreeMap<String, f64>>,
    culprits: HashMap<i64, Vec<String>>,
    locked: Vec<Locked>,
    hits: Vec<Hit>,
    coverage: BTreeMap<NaiveDate, Coverage>,
    milestones: Vec<Milestone>,
}

impl<'a, E: EvidenceStore<Error = StoreError>> Replay<'a, E> {
    fn new(
        config: &'a Config,
        evidence: &'a E,
        ledger: &'a dyn Ledger,
        events: &'a [DenialEvent],
        stored: Freshness,
    ) -> Self {
        Replay {
            config,
            evidence,
            ledger,
            events,
            stored,
            current: None,
            baselines: HashMap::new(),
            culprits: HashMap::new(),
            locked: Vec::new(),
            hits: Vec::new(),
            coverage: BTreeMap::new(),
            milestones: Vec::new(),
        }
    }

    /// The denials in `(after, until]`.
    fn events_between(&self, after: DateTime<Utc>, until: DateTime<Utc>) -> &'a [DenialEvent] {
        let start = self.events.partition_point(|e| e.at <= after);
        let end = self.events.partition_point(|e| e.at <= until);
        &self.events[start..end.max(start)]
    }

    /// One controller step at `now`; `previous` is the step before.
    fn step(
        &mut self,
        history: &History,
        previous: DateTime<Utc>,
        now: DateTime<Utc>,
        users: &Users,
        options: &Options,
    ) -> Result<(), BacktestError> {
        let snapshot = self.ledger.snapshot()?;
        let hourly = hour_of(now) == now || now == options.since;
        // The rows are in time order (see `History::outside`).
        let from = history.outside.partition_point(|o| o.last_seen <= previous);
        let to = history.outside.partition_point(|o| o.last_seen <= now).max(from);
        let new_calls: Vec<&OutsideCalls> =
            history.outside[from..to].iter().filter(|o| is_locked(&snapshot, &o.user)).collect();
        // Between hours only a denial of a promoted user can change anything.
        let promoted_denied = self.events_between(previous, now).iter().any(|e| is_locked(&snapshot, &e.user));
        if !hourly && !promoted_denied {
            return Ok(());
        }
        if let (Some(pause), Some(after)) = (&snapshot.paused, options.resume_after)
            && now >= pause.at + after
        {
            self.ledger.resume(ACTOR, now)?;
            self.milestones.push(Milestone {
                at: now,
                what: format!("resumed by an operator {} after the pause", crate::duration::elapsed(after)),
            });
            return self.step(history, previous, now, users, options);
        }
        let judgements = self.judge(&snapshot, now)?;
        self.record_hits(&snapshot, &judgements, &new_calls, previous, now);

        let hour = hour_of(now);
        if self.current.as_ref().is_none_or(|(at, _)| *at != hour) {
            let evidence = self.evidence.user_evidence(hour - chrono_of(self.config.eligibility.window), hour)?;
            self.current = Some((hour, evidence));
        }
        let evidence = self.current.as_ref().map(|(_, e)| e.as_slice()).unwrap_or_default();
        let verdicts = judgements.iter().map(|(id, j)| (*id, j.verdict.clone())).collect();
        let plan = planner::plan(&planner::Inputs {
            config: self.config,
            ledger: &snapshot,
            users: &users.directory,
            evidence,
            freshness: fresh_at(self.stored, hour),
            verdicts: &verdicts,
            blocked: None,
            now,
            promote_now: false,
            promoted_elsewhere: 0,
        });
        self.apply(&plan.actions, &snapshot, &judgements, now)?;
        if hourly {
            let after = self.ledger.snapshot()?;
            let total = users.first_calls.iter().filter(|first| **first <= now).count();
            let entry = self.day(now);
            entry.locked = after.members.values().filter(|m| m.state.wants_membership()).count();
            entry.eligible = plan.users.values().filter(|e| matches!(e, Eligibility::Eligible(_))).count();
            entry.total = total;
        }
        Ok(())
    }

    /// The guard's judgement of every watched batch at `now`, as the controller makes it.
    fn judge(
        &mut self,
        snapshot: &Snapshot,
        now: DateTime<Utc>,
    ) -> Result<BTreeMap<i64, guard::Judgement>, StoreError> {
        let guard = &self.config.guard;
        let window = chrono_of(guard.window);
        let recent = self.events_between(now - window - TimeDelta::nanoseconds(1), now);
        let health = SourceHealth { last_event_at: Some(now), last_ok_poll: Some(now), error: None };
        let cohort = self.cohort_rate(snapshot, recent);
        let mut judgements = BTreeMap::new();
        for batch in watched(snapshot, chrono_of(guard.grace), now) {
            let Some(applied_at) = batch.applied_at else { continue };
            if !self.baselines.contains_key(&batch.id) {
                let baselines = self.baselines_before(&batch.members, applied_at)?;
                self.baselines.insert(batch.id, baselines);
            }
            let judgement = guard::assess(&guard::Input {
                batch,
                events: recent,
                baselines: &self.baselines[&batch.id],
                cohort,
                source: &health,
                config: guard,
                now,
            });
            let judgement = await_delivery(judgement, batch, &health, guard.delivery_lag, now);
            let summary = judgement.verdict.summary();
            if batch.verdict.as_deref() != Some(summary.as_str()) {
                self.ledger.set_verdict(batch.id, judgement.verdict.kind(), &summary)?;
            }
            judgements.insert(batch.id, judgement);
        }
        Ok(judgements)
    }

    /// Members' other denials per hour over the eligibility window before `applied_at`, as the
    /// controller weighs them.
    fn baselines_before(
        &self,
        members: &[String],
        applied_at: DateTime<Utc>,
    ) -> Result<BTreeMap<String, f64>, StoreError> {
        let window = self.config.eligibility.window;
        let before = self.evidence.user_evidence(crate::config::earlier(applied_at, window), applied_at)?;
        let hours = (window.as_secs_f64() / 3600.0).max(1.0);
        Ok(before
            .iter()
            .filter(|e| members.contains(&e.user))
            .map(|e| (e.user.clone(), e.other_denials as f64 / hours))
            .collect())
    }

    /// `unknown` denials per user-hour among users not promoted, over the guard window.
    fn cohort_rate(&self, snapshot: &Snapshot, recent: &[DenialEvent]) -> CohortRate {
        let active =
            self.current.as_ref().map_or(0, |(_, e)| e.iter().filter(|e| !is_locked(snapshot, &e.user)).count());
        CohortRate {
            denials: recent.iter().filter(|e| e.kind.cause == Cause::Unknown && !is_locked(snapshot, &e.user)).count()
                as u64,
            users: active as u64,
            hours: self.config.guard.window.as_secs_f64() / 3600.0,
        }
    }

    /// Records the calls from outside that hit locked users in `(previous, now]`.
    fn record_hits(
        &mut self,
        snapshot: &Snapshot,
        judgements: &BTreeMap<i64, guard::Judgement>,
        calls: &[&OutsideCalls],
        previous: DateTime<Utc>,
        now: DateTime<Utc>,
    ) {
        let after_soak: BTreeSet<String> = snapshot
            .members
            .values()
            .filter(|m| is_locked(snapshot, &m.user) && m.batch.is_none_or(|b| !judgements.contains_key(&b)))
            .map(|m| m.user.clone())
            .collect();
        let watch = guard::watch_locked(
            self.events_between(previous, now),
            &after_soak,
            previous,
            now,
            self.config.guard.after_soak,
        );
        let policy = &self.config.lockdown.policy_name;
        for row in calls {
            let batch = snapshot.members.get(&row.user).and_then(|m| m.batch);
            let (phase, outcome, guard, detail) = match batch.and_then(|b| judgements.get(&b)) {
                Some(j) if j.verdict.kind() == VerdictKind::Spike => {
                    (Phase::Soak, Outcome::RolledBack, j.verdict.name().to_string(), j.verdict.summary())
                }
                Some(j) => (Phase::Soak, Outcome::Breakage, j.verdict.name().to_string(), j.verdict.summary()),
                None => match watch.reports.iter().find(|r| r.user == row.user) {
                    Some(report) => {
                        let action = serde_json::to_value(report.action)
                            .ok()
                            .and_then(|v| v.as_str().map(str::to_string))
                            .unwrap_or_default();
                        let detail = format!(
                            "locked after soak; guard.after_soak: {action} ({} lockdown denials in this poll)",
                            report.lockdown_denials.len()
                        );
                        (Phase::AfterSoak, Outcome::Breakage, format!("after_soak_{action}"), detail)
                    }
                    None => (
                        Phase::AfterSoak,
                        Outcome::Breakage,
                        "unattributed".to_string(),
                        "locked after soak; the denial names no cause the guard can check".to_string(),
                    ),
                },
            };
            self.hits.push(Hit {
                at: row.last_seen,
                user: row.user.clone(),
                batch,
                action: row.action.clone(),
                source: row.source.clone(),
                calls: row.calls,
                reason: row.reason,
                cause: lockdown_denial(row, policy).cause,
                phase,
                outcome,
                guard,
                detail,
            });
        }
    }

    /// Applies the plan to the scratch ledger as the controller applies it to the real one, with
    /// every IAM write taken as done.
    fn apply(
        &mut self,
        actions: &[Action],
        snapshot: &Snapshot,
        judgements: &BTreeMap<i64, guard::Judgement>,
        now: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        let config = self.config;
        for action in actions {
            match action {
                Action::RollBack { batch, reason } => {
                    let judgement = judgements.get(batch);
                    let rollback =
                        journal_guard_rollback(self.ledger, config, snapshot, (*batch, reason), judgement, ACTOR, now)?;
                    let users = rollback.users;
                    for user in &users {
                        self.ledger.mark_held(user, ACTOR, now)?;
                        if let Some(span) = self.locked.iter_mut().rev().find(|l| &l.user == user && l.until.is_none())
                        {
                            span.until = Some(now);
                        }
                    }
                    let culprits = judgement
                        .map(|j| j.explanation.culprits.iter().map(|c| c.user.clone()).collect())
                        .unwrap_or_default();
                    self.culprits.insert(*batch, culprits);
                    let what = match rollback.paused {
                        true => format!("paused: batch {batch} rolled back by the guard"),
                        false => format!(
                            "batch {batch} rolled back by the guard, fully attributed to its culprits: no pause"
                        ),
                    };
                    self.milestones.push(Milestone { at: now, what });
                    self.day(now).rollbacks += 1;
                }
                Action::Succeed { batch, detail } => self.ledger.succeed(*batch, detail, now)?,
                Action::FinishWave { wave, why } => {
                    self.ledger.finish_wave(wave, why, now)?;
                    self.milestones.push(Milestone { at: now, what: format!("wave {wave} finished: {why}") });
                }
                Action::StartBatch { wave, users } => {
                    let journal: Vec<(String, String)> =
                        users.iter().map(|c| (c.user.clone(), c.why.clone())).collect();
                    let new = NewBatch { wave, users: &journal, soak: wave_soak(config, wave) };
                    let batch = self.ledger.start_batch(&new, ACTOR, now)?;
                    for (user, _) in &journal {
                        self.ledger.mark_locked(user, ACTOR, now)?;
                        self.locked.push(Locked { user: user.clone(), batch, from: now, until: None });
                    }
                    for (batch, soak_until) in soaks_to_start(&self.ledger.snapshot()?, config, now) {
                        self.ledger.start_soak(batch, soak_until, now)?;
                    }
                }
            }
        }
        Ok(())
    }

    /// The coverage entry of `at`'s day.
    fn day(&mut self, at: DateTime<Utc>) -> &mut Coverage {
        let day = at.date_naive();
        self.coverage.entry(day).or_insert(Coverage {
            day,
            locked: 0,
            eligible: 0,
            total: 0,
            would_deny_calls: 0,
            rollbacks: 0,
        })
    }

    fn report(mut self, options: &Options, users: &Users) -> Result<Report, BacktestError> {
        let snapshot = self.ledger.snapshot()?;
        for index in 0..self.hits.len() {
            let (at, calls) = (self.hits[index].at, self.hits[index].calls);
            self.day(at).would_deny_calls += calls;
        }
        let batches: Vec<BatchOutcome> = snapshot
            .batches
            .iter()
            .map(|b| BatchOutcome {
                id: b.id,
                wave: b.wave.clone(),
                state: b.state,
                members: b.members.clone(),
                started_at: b.created_at,
                soak_until: b.soak_until,
                finished_at: b.finished_at,
                verdict: b.verdict.clone(),
                culprits: self.culprits.get(&b.id).cloned().unwrap_or_default(),
            })
            .collect();
        let totals = Totals {
            users: users.directory.len(),
            batches: batches.len(),
            rollbacks: batches.iter().filter(|b| b.state == BatchState::RolledBack).count(),
            locked_users: self.locked.iter().map(|l| l.user.as_str()).collect::<BTreeSet<_>>().len(),
            locked_at_end: snapshot.members.values().filter(|m| m.state.wants_membership()).count(),
            soak_hits: self.hits.iter().filter(|h| h.phase == Phase::Soak).count(),
            breakages: self.hits.iter().filter(|h| h.outcome == Outcome::Breakage).count(),
            would_deny_calls: self.hits.iter().map(|h| h.calls).sum(),
        };
        Ok(Report {
            since: options.since,
            until: options.until,
            perimeter: self.config.perimeter.fingerprint(),
            totals,
            batches,
            locked: self.locked,
            hits: self.hits,
            coverage: self.coverage.into_values().collect(),
            milestones: self.milestones,
            caveats: caveats(options),
        })
    }
}

/// Whether the ledger wants `user` in the lockdown group.
fn is_locked(snapshot: &Snapshot, user: &str) -> bool {
    snapshot.members.get(user).is_some_and(|m| m.state.wants_membership())
}

/// What the replay cannot know from history, for the report.
fn caveats(options: &Options) -> Vec<String> {
    let mut caveats = vec![
        "the IAM directory is not read: users are those with calls in the evidence, without tags \
         (exemption tags and tag selectors do not apply)"
            .to_string(),
        "calls are timed at the last call from their source in their hour".to_string(),
        "guard.after_soak is reported, not applied".to_string(),
    ];
    caveats.push(match options.resume_after {
        Some(after) => format!("an operator resumes a guard pause after {}", crate::duration::elapsed(after)),
        None => "a guard pause is never resumed".to_string(),
    });
    caveats
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::config::{Selector, Wave};
    use crate::evidence::CallGroup;
    use crate::evidence::aggregate::{Aggregates, Judge};
    use crate::store::{ATHENA_ORIGIN, EvidenceWriter, Store};
    use crate::trail::{Record, UserIdentity};

    const TRUSTED: &str = "203.0.113.9";
    const OUTSIDE: &str = "198.18.0.7";

    fn at(text: &str) -> DateTime<Utc> {
        text.parse().unwrap()
    }

    /// The example configuration with one wave taking every user two at a time.
    fn config(soak: &str) -> Config {
        let mut config = Config::parse(include_str!("../rollout.yaml"), Path::new("rollout.yaml")).unwrap();
        config.waves = vec![Wave {
            name: "all".into(),
            batch_size: 2,
            soak: crate::config::parse_duration(soak).unwrap(),
            batches: None,
            select: Selector::default(),
        }];
        config.rollout.max_promotions_per_day = 2;
        config
    }

    fn calls(user: &str, at: DateTime<Utc>, source: &str, calls: u64) -> CallGroup {
        let record = Record {
            event_time: Some(at.to_rfc3339()),
            event_source: Some("s3.amazonaws.com".into()),
            event_name: Some("ListBuckets".into()),
            source_ip_address: Some(source.into()),
            user_identity: Some(UserIdentity {
                kind: Some("IAMUser".into()),
                user_name: Some(user.into()),
                arn: Some(format!("arn:aws:iam::123456789012:user/engineering/{user}")),
                account_id: Some("123456789012".into()),
                ..UserIdentity::default()
            }),
            ..Record::default()
        };
        CallGroup { record, calls, first: at, last: at }
    }

    /// Users calling from the office every hour of the 20 days from 2026-03-01, plus `extra` calls.
    fn store(config: &Config, users: &[&str], extra: &[CallGroup]) -> Store {
        let (start, end) = (at("2026-03-01T00:00:00Z"), at("2026-03-21T00:00:00Z"));
        let judge = Judge::new(config);
        let mut aggregates = Aggregates::default();
        let mut hour = start;
        while hour < end {
            for user in users {
                aggregates.add(&calls(user, hour + TimeDelta::minutes(10), TRUSTED, 5), &judge);
            }
            hour += TimeDelta::hours(1);
        }
        for group in extra {
            aggregates.add(group, &judge);
        }
        let store = Store::open_in_memory().unwrap();
        store.replace_hours(ATHENA_ORIGIN, start, end, &aggregates).unwrap();
        store.ensure_judged(&judge, end).unwrap();
        store
    }

    fn run(config: &Config, store: &Store, since: &str, until: &str) -> Report {
        let options = Options { since: at(since), until: at(until), resume_after: None };
        let history = History {
            outside: store.outside_calls(options.since, options.until).unwrap(),
            denials: store.recorded_denials(options.since, options.until).unwrap(),
        };
        let scratch = Store::open_in_memory().unwrap();
        replay(config, store, &history, &scratch, &options).unwrap()
    }

    fn starts(report: &Report) -> Vec<(DateTime<Utc>, Vec<&str>)> {
        report.batches.iter().map(|b| (b.started_at, b.members.iter().map(String::as_str).collect())).collect()
    }

    #[test]
    fn batches_start_as_soaks_delivery_and_the_daily_cap_allow() {
        let config = config("1h");
        let store = store(&config, &["ann", "ben", "cat", "dan"], &[]);
        let report = run(&config, &store, "2026-03-10T00:00:00Z", "2026-03-12T00:00:00Z");
        // Batch 1 soaks an hour and succeeds at the first step past soak end + delivery lag; the
        // cap (2 a day) holds batch 2 until batch 1 is more than 24h old.
        assert_eq!(
            starts(&report),
            [(at("2026-03-10T00:00:00Z"), vec!["ann", "ben"]), (at("2026-03-11T01:00:00Z"), vec!["cat", "dan"])]
        );
        let first = &report.batches[0];
        assert_eq!(first.soak_until, Some(at("2026-03-10T01:00:00Z")));
        assert_eq!(first.finished_at, Some(at("2026-03-10T02:00:00Z")));
        assert_eq!(first.state, BatchState::Succeeded);
        assert!(report.hits.is_empty(), "{:?}", report.hits);
        assert_eq!(report.totals.locked_at_end, 4);
        let day = |d: &str| report.coverage.iter().find(|c| c.day.to_string() == d).unwrap();
        assert_eq!((day("2026-03-10").locked, day("2026-03-10").total), (2, 4));
        assert_eq!(day("2026-03-10").eligible, 2, "cat and dan, still waiting");
        assert_eq!(day("2026-03-11").locked, 4);
    }

    #[test]
    fn a_late_call_from_outside_in_soak_rolls_the_batch_back_and_holds_the_culprit() {
        let config = config("24h");
        let late = calls("ben", at("2026-03-10T00:30:00Z"), OUTSIDE, 4);
        let store = store(&config, &["ann", "ben"], &[late]);
        let report = run(&config, &store, "2026-03-10T00:00:00Z", "2026-03-11T00:00:00Z");
        assert_eq!(starts(&report), [(at("2026-03-10T00:00:00Z"), vec!["ann", "ben"])]);
        let batch = &report.batches[0];
        assert_eq!(batch.state, BatchState::RolledBack);
        // Rolled back at the guard's first poll after the calls.
        assert_eq!(batch.finished_at, Some(at("2026-03-10T00:30:00Z")));
        assert_eq!(batch.culprits, ["ben"]);
        assert_eq!(report.hits.len(), 1, "{:?}", report.hits);
        let hit = &report.hits[0];
        assert_eq!((hit.user.as_str(), hit.source.as_str(), hit.calls), ("ben", OUTSIDE, 4));
        assert_eq!((hit.phase, hit.outcome, hit.cause), (Phase::Soak, Outcome::RolledBack, Cause::Lockdown));
        assert_eq!(hit.guard, "spike");
        assert!(
            report.milestones.iter().any(|m| m.what.contains("rolled back by the guard")),
            "{:?}",
            report.milestones
        );
        assert_eq!(report.totals.locked_at_end, 0, "paused by the guard: nobody is promoted again");
        assert_eq!(report.locked.iter().map(|l| l.until).collect::<Vec<_>>(), [batch.finished_at, batch.finished_at]);
    }

    #[test]
    fn a_call_from_outside_after_the_soak_is_a_breakage() {
        let config = config("1h");
        let late = calls("ann", at("2026-03-10T05:20:00Z"), OUTSIDE, 2);
        let store = store(&config, &["ann", "ben"], &[late]);
        let report = run(&config, &store, "2026-03-10T00:00:00Z", "2026-03-10T12:00:00Z");
        assert_eq!(report.batches[0].state, BatchState::Succeeded);
        let hit = &report.hits[0];
        assert_eq!((hit.phase, hit.outcome), (Phase::AfterSoak, Outcome::Breakage));
        assert_eq!(hit.guard, "after_soak_alert");
        assert_eq!(report.totals.breakages, 1);
        assert_eq!(report.coverage[0].would_deny_calls, 2);
    }

    #[test]
    fn evidence_judged_under_another_perimeter_is_refused() {
        let config = config("1h");
        let store = store(&config, &["ann"], &[]);
        let mut other = config.clone();
        other.perimeter.trusted_cidrs.pop();
        let options =
            Options { since: at("2026-03-10T00:00:00Z"), until: at("2026-03-11T00:00:00Z"), resume_after: None };
        let scratch = Store::open_in_memory().unwrap();
        let error = replay(&other, &store, &History::default(), &scratch, &options).unwrap_err();
        assert!(error.to_string().contains("re-judged"), "{error}");
    }
}
