//! The guard's judgement: did a freshly promoted batch start getting denied *because of the
//! lockdown*? Pure functions of the batch, its members' attributed denials, baselines, the
//! event source's health and `now`.
//!
//! # Wiring (what the controller calls)
//! 1. For every recorded call of a watched user: [`attribute`]`(record, perimeter, exempt,
//!    policy_name)` gives `None` (not a denial) or an [`Attribution`]: a [`Cause`] (`lockdown`,
//!    `other`, `unknown`) with its [`Evidence`]. Store it in [`DenialEvent::kind`]
//!    ([`Attribution::to_stored`] / [`Attribution::from_stored`] for a text column).
//! 2. Count `unknown` denials of unpromoted users per user-hour over the guard window:
//!    [`CohortRate`]. Give each member's pre-promotion `unknown` (or, as an upper bound,
//!    cause-less generic) denials per hour in [`Input::baselines`].
//! 3. Per watched batch: [`assess`] gives a [`Judgement`]: the [`Verdict`] the planner acts on
//!    and the [`Explanation`] (serde) for the audit log, `status --json` and the webhook, which
//!    names the culprits (members with weighing denials, each with its offending calls) and the
//!    bystanders. [`judge`] returns the verdict alone.
//! 4. Before a batch succeeds: [`delivery_pending`] must be `None` (events delivered past soak
//!    end + `guard.delivery_lag`).
//! 5. For locked users after their soak: [`watch_locked`] gives one [`LockedUserReport`] per
//!    user the lockdown denied, with sources, and the `guard.after_soak` action to take.
//!
//! # The rule
//! See [`attribute_stated`]: a message naming the lockdown policy is `lockdown`; a message
//! stating a cause the lockdown cannot produce (implicit deny; explicit deny in an SCP, RCP,
//! resource-based policy, permissions boundary, session policy, VPC endpoint policy or another
//! named policy) is `other`; otherwise the perimeter classifier on the call's own request
//! context decides (allowed or not applicable: `other`; denied: `lockdown`), and where the
//! record lacks what it needs, the cause is `unknown`.
//!
//! # Weighing and the false-alarm bound
//! A member's `lockdown` denials weigh fully. Its `unknown` denials are tested against their
//! expectation on one time base: `λ = max(own baseline, cohort rate, 1) per user-hour × hours
//! judged`, where the hours judged are the window this poll looks at. Only the excess over the
//! Poisson allowance weighs: `allowance = min { k : P(X ≥ k+1 | λ) ≤ α } `, with
//! `α = guard.false_alarm_budget / (members × polls)` and `polls = ⌈(soak + grace) / poll⌉`
//! (every poll of the soak and of the grace after it).
//!
//! **Bound.** If each member's `unknown` denials follow a Poisson process whose rate is at most
//! the expectation above (no member is at fault), the probability that `unknown` denials weigh
//! in *any* judgement of a batch during its soak and grace is at most
//! `members × polls × α = guard.false_alarm_budget` (Bonferroni: a union bound, valid however
//! the polls' overlapping windows depend on one another). With the default budget of 0.001, at
//! most one soak in a thousand sees a false spike from noise. `other` denials never weigh, so
//! their rate (an incident, a noisy member) cannot cause one; `lockdown` denials are not noise.
//! The bound does not cover a baseline that underestimates a member's true rate; the floor of
//! one `unknown` denial per user-hour and the cohort rate guard against an empty baseline.

mod attribution;
mod poisson;

use std::collections::{BTreeMap, BTreeSet};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

pub use self::attribution::{Attribution, Cause, Evidence, attribute, attribute_stated};
use crate::config::{AfterSoak, Guard};
use crate::rollout::Batch;

/// Expected `unknown` denials per user-hour never go below this: an empty baseline is not a
/// promise of silence.
pub(crate) const MIN_UNKNOWN_PER_USER_HOUR: f64 = 1.0;

/// How many sample denials per cause an explanation carries.
pub(crate) const SAMPLES_PER_CAUSE: usize = 3;

/// One recorded denial of one user, attributed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DenialEvent {
    /// The batch member who was denied.
    pub user: String,
    /// When the call was made.
    pub at: DateTime<Utc>,
    /// The IAM action, `service:Name`.
    pub action: String,
    /// What caused the denial, and the evidence for it.
    pub kind: Attribution,
    /// The `errorCode`.
    pub code: String,
    /// The `errorMessage`.
    pub message: String,
    /// Where the call came from: the VPC endpoint ID, else `sourceIPAddress`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
}

/// `unknown` denial rate among users who are not promoted, over the guard window.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct CohortRate {
    /// `unknown` denials among them.
    pub denials: u64,
    /// How many unpromoted users were watched.
    pub users: u64,
    /// Over how many hours.
    pub hours: f64,
}

impl CohortRate {
    /// Denials per user per hour.
    pub(crate) fn per_user_hour(&self) -> f64 {
        if self.users == 0 || self.hours <= 0.0 { 0.0 } else { self.denials as f64 / (self.users as f64 * self.hours) }
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

impl SourceHealth {
    /// The health as of `now`: a time beyond `now` (stored before future records were
    /// refused, or with the clock since set back) is not known at all, so a future date never
    /// proves the source alive.
    pub fn as_of(mut self, now: DateTime<Utc>) -> SourceHealth {
        self.last_event_at = self.last_event_at.filter(|t| *t <= now);
        self.last_ok_poll = self.last_ok_poll.filter(|t| *t <= now);
        self
    }
}

/// The guard's judgement of one watched batch.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "verdict", rename_all = "snake_case")]
pub enum Verdict {
    /// No spike: the batch may succeed once its soak and delivery are done.
    Healthy {
        /// What was seen, for people.
        detail: String,
    },
    /// Denials above noise: the batch is rolled back.
    Spike {
        /// The culprits: members with weighing denials.
        affected: Vec<String>,
        /// The culprits' denials as weighed: `lockdown` plus `unknown` above noise.
        weighted_denials: u64,
        /// The culprits' offending calls.
        offending: Vec<DenialEvent>,
        /// What was seen, for people.
        detail: String,
    },
    /// The guard cannot judge: nothing succeeds or is rolled back on it.
    Inconclusive {
        /// Why the guard cannot tell (stale source, no events yet, waiting for delivery).
        why: String,
    },
}

named_enum!(
    /// A verdict's kind: what metrics, the CLI and the ledger match on.
    VerdictKind {
        /// No spike.
        Healthy = "healthy",
        /// Denials above noise: roll back.
        Spike = "spike",
        /// The guard cannot judge.
        Inconclusive = "inconclusive",
    }
);

impl Verdict {
    /// The verdict's kind, for metrics, the CLI and notifications.
    pub fn kind(&self) -> VerdictKind {
        match self {
            Verdict::Healthy { .. } => VerdictKind::Healthy,
            Verdict::Spike { .. } => VerdictKind::Spike,
            Verdict::Inconclusive { .. } => VerdictKind::Inconclusive,
        }
    }

    /// The verdict's name as people read it.
    pub fn name(&self) -> &'static str {
        match self {
            Verdict::Healthy { .. } => "healthy",
            Verdict::Spike { .. } => "spike",
            Verdict::Inconclusive { .. } => "inconclusive",
        }
    }

    /// One line for people: the verdict and why.
    pub fn summary(&self) -> String {
        match self {
            Verdict::Healthy { detail } | Verdict::Spike { detail, .. } => format!("{}: {detail}", self.name()),
            Verdict::Inconclusive { why } => format!("inconclusive: {why}"),
        }
    }
}

/// Everything one judgement needs.
pub struct Input<'a> {
    /// The batch being judged.
    pub batch: &'a Batch,
    /// Denials of this batch's members; older ones and other users' are ignored.
    pub events: &'a [DenialEvent],
    /// Each member's `unknown` denials per hour before promotion.
    pub baselines: &'a BTreeMap<String, f64>,
    /// The `unknown` denial rate among unpromoted users.
    pub cohort: CohortRate,
    /// Whether the event stream can be trusted to show denials.
    pub source: &'a SourceHealth,
    /// The guard's thresholds.
    pub config: &'a Guard,
    /// The time of the judgement.
    pub now: DateTime<Utc>,
}

/// A verdict and why.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Judgement {
    /// What the guard decided.
    pub verdict: Verdict,
    /// Why.
    pub explanation: Explanation,
}

/// Why the guard decided what it did: serializable for the audit log, `status --json` and the
/// webhook.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Explanation {
    /// The batch judged.
    pub batch: i64,
    /// The denials judged are those in `since..=until`.
    pub since: DateTime<Utc>,
    /// The end of the judged span.
    pub until: DateTime<Utc>,
    /// `unknown` denials per user-hour among unpromoted users.
    pub cohort_unknown_per_user_hour: f64,
    /// The configured bound on false alarms per soak.
    pub false_alarm_budget: f64,
    /// Tests one soak makes (members × polls): the Bonferroni divisor.
    pub tests_per_soak: u64,
    /// `α` for one member in one poll.
    pub significance: f64,
    /// A spike needs at least this many members with weighing denials...
    pub min_affected_users: usize,
    /// ...and at least this many weighted denials.
    pub min_denials: usize,
    /// The weighted denials of all members.
    pub weighted_denials: u64,
    /// Each member's counts.
    pub members: Vec<MemberCounts>,
    /// Members with weighing denials, whom a rollback holds.
    pub culprits: Vec<Culprit>,
    /// Members not at fault.
    pub bystanders: Vec<String>,
    /// A few denials of each cause, `lockdown` first.
    pub samples: Vec<DenialEvent>,
}

impl Explanation {
    /// Whether a spike on this judgement is fully attributed: it names culprits and every
    /// weighing denial is a `lockdown` one (none is an `unknown` excess). Such a rollback holds
    /// the culprits and requeues the bystanders without pausing the rollout; any other needs
    /// an operator.
    pub fn fully_attributed(&self) -> bool {
        !self.culprits.is_empty() && self.members.iter().all(|m| m.weight == m.lockdown)
    }

    /// The members a rollback on this judgement need not hold: the bystanders, when the
    /// judgement names culprits (without culprits no one is cleared).
    pub fn not_at_fault(&self) -> &[String] {
        if self.culprits.is_empty() { &[] } else { &self.bystanders }
    }
}

/// One member's denials in the judged window, per cause, and how they were weighed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MemberCounts {
    /// The member.
    pub user: String,
    /// Denials the lockdown policy caused.
    pub lockdown: u64,
    /// Denials something else caused; never acted on.
    pub other: u64,
    /// Denials of no known cause.
    pub unknown: u64,
    /// `λ`: `unknown` denials expected in the window.
    pub unknown_expected: f64,
    /// The most `unknown` denials that are still noise at `significance`.
    pub unknown_allowance: u64,
    /// `lockdown` + `unknown` above the allowance.
    pub weight: u64,
}

/// A member with weighing denials, and those denials.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Culprit {
    /// The member.
    pub user: String,
    /// Its weighing denials.
    pub offending: Vec<DenialEvent>,
}

/// The verdict alone; see [`assess`].
pub fn judge(input: &Input) -> Verdict {
    assess(input).verdict
}

/// Judges one batch: counts each member's denials per cause in the window, weighs `lockdown`
/// ones fully and `unknown` ones above their Poisson allowance, and calls a spike when enough
/// members and weight pass `guard.min_affected_users` and `guard.min_denials`. A spike seen
/// wins over a silent source; otherwise a silent or failing source is inconclusive.
pub fn assess(input: &Input) -> Judgement {
    let config = input.config;
    let members: BTreeSet<&str> = input.batch.members.iter().map(String::as_str).collect();
    let applied_at = input.batch.applied_at;
    let window = chrono::Duration::from_std(config.window).unwrap_or(chrono::Duration::zero());
    let since = applied_at.unwrap_or(input.now).max(input.now - window);
    let hours = ((input.now - since).num_milliseconds().max(0) as f64) / 3_600_000.0;
    let tests = tests_per_soak(input.batch, config, members.len());
    let significance = config.false_alarm_budget / tests as f64;
    let cohort_rate = input.cohort.per_user_hour();

    let mut by_member: BTreeMap<&str, Vec<&DenialEvent>> = members.iter().map(|m| (*m, Vec::new())).collect();
    for event in input.events.iter().filter(|e| e.at >= since && e.at <= input.now) {
        if let Some(list) = by_member.get_mut(event.user.as_str()) {
            list.push(event);
        }
    }

    let mut counts = Vec::new();
    let mut culprits = Vec::new();
    let mut bystanders = Vec::new();
    for (user, events) in &by_member {
        let count = |cause| events.iter().filter(|e| e.kind.cause == cause).count() as u64;
        let (lockdown, other, unknown) = (count(Cause::Lockdown), count(Cause::Other), count(Cause::Unknown));
        let baseline = input.baselines.get(*user).copied().unwrap_or(0.0);
        let unknown_expected = baseline.max(cohort_rate).max(MIN_UNKNOWN_PER_USER_HOUR) * hours;
        let unknown_allowance = poisson::allowance(unknown_expected, significance);
        let unknown_excess = unknown.saturating_sub(unknown_allowance);
        let weight = lockdown + unknown_excess;
        if weight > 0 {
            let offending = events
                .iter()
                .filter(|e| e.kind.cause == Cause::Lockdown || (unknown_excess > 0 && e.kind.cause == Cause::Unknown))
                .map(|e| (*e).clone())
                .collect();
            culprits.push(Culprit { user: user.to_string(), offending });
        } else {
            bystanders.push(user.to_string());
        }
        counts.push(MemberCounts {
            user: user.to_string(),
            lockdown,
            other,
            unknown,
            unknown_expected,
            unknown_allowance,
            weight,
        });
    }
    let weighted: u64 = counts.iter().map(|c| c.weight).sum();
    let samples = [Cause::Lockdown, Cause::Unknown, Cause::Other]
        .into_iter()
        .flat_map(|cause| {
            by_member
                .values()
                .flatten()
                .filter(move |e| e.kind.cause == cause)
                .take(SAMPLES_PER_CAUSE)
                .map(|e| (*e).clone())
        })
        .collect();
    let explanation = Explanation {
        batch: input.batch.id,
        since,
        until: input.now,
        cohort_unknown_per_user_hour: cohort_rate,
        false_alarm_budget: config.false_alarm_budget,
        tests_per_soak: tests,
        significance,
        min_affected_users: config.min_affected_users,
        min_denials: config.min_denials,
        weighted_denials: weighted,
        members: counts,
        culprits,
        bystanders,
        samples,
    };
    let verdict = verdict_of(input, &explanation, applied_at);
    Judgement { verdict, explanation }
}

fn verdict_of(input: &Input, explanation: &Explanation, applied_at: Option<DateTime<Utc>>) -> Verdict {
    if applied_at.is_none() {
        return Verdict::Inconclusive { why: "batch not applied yet".to_string() };
    }
    let config = input.config;
    let total = |cause: fn(&MemberCounts) -> u64| explanation.members.iter().map(cause).sum::<u64>();
    let (lockdown, other, unknown) = (total(|c| c.lockdown), total(|c| c.other), total(|c| c.unknown));
    let since = explanation.since.format("%Y-%m-%d %H:%M:%SZ");
    let weighted = explanation.weighted_denials;
    let culprits = &explanation.culprits;
    if culprits.len() >= config.min_affected_users && weighted >= config.min_denials as u64 {
        return Verdict::Spike {
            detail: format!(
                "{} of {} members at fault ({}), {weighted} weighted denials since {since} \
                 ({lockdown} lockdown, {unknown} unknown, {other} other not counted; thresholds: {} users, {} denials)",
                culprits.len(),
                explanation.members.len(),
                culprits.iter().map(|c| c.user.as_str()).collect::<Vec<_>>().join(", "),
                config.min_affected_users,
                config.min_denials
            ),
            affected: culprits.iter().map(|c| c.user.clone()).collect(),
            weighted_denials: weighted,
            offending: culprits.iter().flat_map(|c| c.offending.iter().cloned()).collect(),
        };
    }
    if let Some(why) = source_problem(input.source, config, input.now) {
        return Verdict::Inconclusive { why };
    }
    Verdict::Healthy {
        detail: format!(
            "{weighted} weighted denials among {} members since {since} ({lockdown} lockdown, {unknown} unknown, \
             {other} other; cohort unknown rate {:.2}/user-hour)",
            explanation.members.len(),
            explanation.cohort_unknown_per_user_hour
        ),
    }
}

/// Members × polls over the soak and the grace after it: every test a batch's soak makes.
fn tests_per_soak(batch: &Batch, config: &Guard, members: usize) -> u64 {
    let soak = match (batch.applied_at, batch.soak_until) {
        (Some(from), Some(until)) if until > from => (until - from).to_std().unwrap_or_default(),
        _ => config.window,
    };
    let poll = config.poll.as_secs_f64().max(1.0);
    let polls = ((soak + config.grace).as_secs_f64() / poll).ceil().max(1.0) as u64;
    polls.saturating_mul(members.max(1) as u64)
}

/// What a batch still waits for before it may succeed: the event source must have delivered
/// events past the end of its soak plus `delivery_lag`. `None` when it has.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeliveryPending {
    /// Events must be seen past this time.
    pub need_events_after: DateTime<Utc>,
    /// The newest event seen so far.
    pub newest_event: Option<DateTime<Utc>>,
}

/// Whether the event source has not yet delivered past `soak_until` + `delivery_lag`; `None` once it has.
pub fn delivery_pending(
    source: &SourceHealth,
    soak_until: DateTime<Utc>,
    delivery_lag: std::time::Duration,
) -> Option<DeliveryPending> {
    let lag = chrono::Duration::from_std(delivery_lag).unwrap_or(chrono::Duration::MAX);
    let need = soak_until.checked_add_signed(lag).unwrap_or(DateTime::<Utc>::MAX_UTC);
    match source.last_event_at {
        Some(newest) if newest > need => None,
        newest => Some(DeliveryPending { need_events_after: need, newest_event: newest }),
    }
}

/// How many of a locked user's most recent `lockdown` denials a report carries (the count
/// covers them all): bounded whatever the flood.
pub const RECENT_LOCKED_DENIALS: usize = 20;

/// One locked user the lockdown denied after its soak: breakage, or the lock doing its job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LockedUserReport {
    /// The locked user.
    pub user: String,
    /// Its most recent `lockdown` denials in the window (at most [`RECENT_LOCKED_DENIALS`]),
    /// newest last, each with its source.
    pub lockdown_denials: Vec<DenialEvent>,
    /// Denied calls per source (endpoint or address; `unrecorded` when the record had none).
    pub sources: BTreeMap<String, u64>,
    /// What `guard.after_soak` says to do: report, or also take out of the group and hold.
    pub action: AfterSoak,
    /// All its `lockdown` denials in the window: the outside calls the lock blocked.
    #[serde(default)]
    pub denied: u64,
}

/// Watching locked users over one window.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct LockedWatch {
    /// Denials of locked users in the window per cause.
    pub denials_by_cause: BTreeMap<Cause, u64>,
    /// Users with `lockdown` denials in the window (the gauge is its length).
    pub reports: Vec<LockedUserReport>,
}

/// Attributed denials of locked users (past their soak) in `since..=now`, per user.
pub fn watch_locked(
    events: &[DenialEvent],
    locked: &BTreeSet<String>,
    since: DateTime<Utc>,
    now: DateTime<Utc>,
    after_soak: AfterSoak,
) -> LockedWatch {
    let mut watch = LockedWatch::default();
    let mut by_user: BTreeMap<&str, Vec<&DenialEvent>> = BTreeMap::new();
    for event in events.iter().filter(|e| e.at >= since && e.at <= now && locked.contains(&e.user)) {
        *watch.denials_by_cause.entry(event.kind.cause).or_default() += 1;
        if event.kind.cause == Cause::Lockdown {
            by_user.entry(event.user.as_str()).or_default().push(event);
        }
    }
    for (user, mut denials) in by_user {
        denials.sort_by_key(|e| e.at);
        let mut sources = BTreeMap::new();
        for event in &denials {
            *sources.entry(event.source.clone().unwrap_or_else(|| "unrecorded".to_string())).or_default() += 1;
        }
        let denied = denials.len() as u64;
        let recent = denials.len().saturating_sub(RECENT_LOCKED_DENIALS);
        watch.reports.push(LockedUserReport {
            user: user.to_string(),
            lockdown_denials: denials[recent..].iter().map(|e| (*e).clone()).collect(),
            sources,
            action: after_soak,
            denied,
        });
    }
    watch
}

/// Why the event source cannot be relied on right now, if it cannot.
pub(crate) fn source_problem(source: &SourceHealth, config: &Guard, now: DateTime<Utc>) -> Option<String> {
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
        Some(last) if now - last > limit => {
            Some(format!("event source silent for {} (limit {})", human(now - last), human(limit)))
        }
        Some(_) => None,
    }
}

#[cfg(test)]
mod tests;
