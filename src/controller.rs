//! The controller: one idempotent, level-triggered step that converges IAM on the ledger and the
//! ledger on the plan. The daemon calls [`Controller::step`] every guard poll; a restart at any
//! point is safe because every step starts by reconciling what the ledger intends with what the
//! lockdown group really contains.
//!
//! One step gathers, decides, applies:
//! 1. poll the event feed for new trail records (the guard's near-real-time view) and remember
//!    denials of watched batches' members and the unpromoted cohort's denial rate;
//! 2. reconcile: [`reconcile`] (pure) compares the ledger with the group's members and says
//!    which journaled promotions and removals to finish and what drifted (members removed by
//!    hand or added by someone else are left alone and reported); then fully applied batches
//!    start soaking, for the soak recorded when the batch started;
//! 3. judge each watched batch ([`watched`]) with the guard;
//! 4. plan (the lockdown policy's state is one of the planner's inputs), then apply the plan:
//!    journal in the ledger first, then call IAM. A guard rollback pauses the rollout in the
//!    same transaction unless its spike is fully attributed to named culprits
//!    ([`guard::Explanation::fully_attributed`]): then the culprits are held, the bystanders
//!    requeued, and the rollout goes on. In dry run nothing is written to IAM or the ledger's
//!    state; the plan is recorded in the audit log instead;
//! 5. watch locked users past their soak ([`locked_watch`]): count and report their denials, and
//!    with `guard.after_soak: release` take those the lockdown denied out of the group and hold
//!    them (journaled first).

use std::collections::{BTreeMap, BTreeSet, HashSet, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use chrono::{DateTime, Utc};

use crate::clock::Clock;
use crate::config::{AfterSoak, Config, earlier, later};
use crate::duration::chrono_of;
use crate::evidence::UserEvidence;
use crate::evidence::aggregate::hour_of;
use crate::exemption::{self, ExemptionState};
use crate::feed::EventFeed;
use crate::guard::{self, CohortRate, DenialEvent};
use crate::iam::{Iam, IamError, PolicyStatus};
use crate::planner::{self, Action, Gate, Plan};
use crate::rollout::{Batch, BatchState, IamUser, Snapshot, UserState};
use crate::store::{Ledger, NewBatch, Removal, Requeue, RollbackRequest, RolloutStore, StoreError};
use crate::trail::Record;

/// A controller with its edges chosen, as the daemon's runtime sees it.
pub trait Stepper: Send {
    /// Runs one gather/decide/apply step; `promote_now` lifts the soaking-batch cap once.
    fn step(
        &mut self,
        promote_now: bool,
    ) -> Pin<Box<dyn Future<Output = Result<StepReport, ControllerError>> + Send + '_>>;
    /// The plan as it stands, without polling, reconciling or changing anything.
    fn preview(&mut self) -> Pin<Box<dyn Future<Output = Result<Plan, ControllerError>> + Send + '_>>;
    /// The configuration the controller runs with.
    fn config(&self) -> &Config;
    /// The store the controller journals into.
    fn store(&self) -> &Arc<dyn RolloutStore>;
    /// The clock the controller reads `now` from.
    fn clock(&self) -> &Arc<dyn Clock>;
    /// Whether the controller writes to IAM.
    fn mode(&self) -> Mode;
    /// The batches the configuration's other accounts started lately (when, how many users),
    /// which count against the organisation's daily cap from the next step on.
    fn set_promotions_elsewhere(&mut self, batches: Vec<(DateTime<Utc>, usize)>);
}

impl<I: Iam + 'static, F: EventFeed + 'static> Stepper for Controller<I, F> {
    fn step(
        &mut self,
        promote_now: bool,
    ) -> Pin<Box<dyn Future<Output = Result<StepReport, ControllerError>> + Send + '_>> {
        Box::pin(Controller::step(self, promote_now))
    }
    fn preview(&mut self) -> Pin<Box<dyn Future<Output = Result<Plan, ControllerError>> + Send + '_>> {
        Box::pin(Controller::preview(self))
    }
    fn config(&self) -> &Config {
        &self.config
    }
    fn store(&self) -> &Arc<dyn RolloutStore> {
        &self.store
    }
    fn clock(&self) -> &Arc<dyn Clock> {
        &self.clock
    }
    fn mode(&self) -> Mode {
        self.mode
    }
    fn set_promotions_elsewhere(&mut self, batches: Vec<(DateTime<Utc>, usize)>) {
        self.promotions_elsewhere = batches;
    }
}

named_enum!(
    /// Whether the controller writes to IAM.
    Mode {
        /// Plan and report; write nothing to IAM.
        DryRun = "dry-run",
        /// Act: write to IAM.
        Commit = "commit",
    }
);

impl Mode {
    /// Who the audit log names for this controller's entries; also how an offline reader tells
    /// which mode the rollout last ran in.
    pub fn actor(self) -> &'static str {
        match self {
            Mode::Commit => "controller",
            Mode::DryRun => "dry-run",
        }
    }

    /// The mode whose controller writes audit entries as `actor`, if any.
    pub fn of_actor(actor: &str) -> Option<Mode> {
        Mode::ALL.iter().copied().find(|mode| mode.actor() == actor)
    }
}

named_enum!(
    /// What reconcile found different between the ledger and the lockdown group.
    DriftKind {
        /// Locked by lockstep, then taken out of the group by someone else.
        RemovedByHand = "removed_by_hand",
        /// Held (or removed by hand) in the ledger, but back in the group.
        BackInGroupWhileHeld = "back_in_group_while_held",
        /// In the group, but lockstep never added them.
        NotAddedByLockstep = "not_added_by_lockstep",
        /// A member lockstep did not add left the group: a candidate again.
        ForeignLeft = "foreign_left",
        /// Held, but back in the group through lockstep's own add that landed late (sent before
        /// a crash, after which the user was rolled back): taken out again.
        LateAdd = "late_add",
    }
);

/// One difference reconcile found: the kind for code, the message for people.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Drift {
    /// The user whose ledger state and group membership disagree.
    pub user: String,
    /// What differs: what metrics and code match on.
    pub kind: DriftKind,
    /// The difference explained, for logs and people.
    pub message: String,
}

/// Why a controller step failed.
#[derive(Debug, thiserror::Error)]
pub enum ControllerError {
    #[error(transparent)]
    /// The store could not be read or written, or refused the change.
    Store(#[from] StoreError),
    #[error(transparent)]
    /// An IAM call failed; the next step retries.
    Iam(#[from] IamError),
}

named_enum!(
    /// What kind of error stopped a step: the `kind` label of `lockstep_step_failures_total`.
    StepFailureKind {
        /// The store could not be read or written.
        Store = "store",
        /// The store's schema is newer than this lockstep.
        StoreTooNew = "store_too_new",
        /// The store holds a value lockstep cannot read.
        StoreCorrupt = "store_corrupt",
        /// The store refused a change that does not apply in the current state.
        Refused = "refused",
        /// An IAM call failed (its operation and code are in `lockstep_iam_errors_total`).
        Iam = "iam",
    }
);

impl ControllerError {
    /// The kind of failure, for metrics and alerts (never read from the message).
    pub fn kind(&self) -> StepFailureKind {
        match self {
            ControllerError::Store(StoreError::Sqlite { .. }) => StepFailureKind::Store,
            ControllerError::Store(StoreError::TooNew { .. }) => StepFailureKind::StoreTooNew,
            ControllerError::Store(StoreError::Corrupt { .. }) => StepFailureKind::StoreCorrupt,
            ControllerError::Store(StoreError::Refused(_)) => StepFailureKind::Refused,
            ControllerError::Iam(_) => StepFailureKind::Iam,
        }
    }
}

/// What one step saw and did, for logs, metrics and `lockstep plan`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct StepReport {
    /// When the step ran.
    pub at: DateTime<Utc>,
    /// Whether the step wrote to IAM.
    pub mode: Mode,
    /// What the planner decided.
    pub plan: Plan,
    /// The guard's verdict on each watched batch, by batch ID.
    pub verdicts: BTreeMap<i64, guard::Verdict>,
    /// IAM writes made (or, in dry run, that would have been made).
    pub iam_writes: Vec<String>,
    /// Differences between the ledger and the group that reconcile found.
    pub drift: Vec<Drift>,
    /// Errors that did not stop the step (a failed IAM write is retried next step).
    pub errors: Vec<String>,
    /// Why the guard judged each watched batch as it did (counts per cause, expectation,
    /// threshold, samples, culprits and bystanders).
    pub explanations: BTreeMap<i64, guard::Explanation>,
    /// Records the feed delivered dated after `now`: no sign of life for the silence check,
    /// and their denials count as of `now`.
    pub future_events: u64,
    /// The watch over locked users past their soak: their denials in the last guard window per
    /// cause, and a report for each user the lockdown denied (empty with `guard.watch_locked:
    /// false`).
    pub locked: guard::LockedWatch,
    /// Denials of locked users first recorded in this step, per cause (the counter's increments).
    pub locked_denials_new: BTreeMap<guard::Cause, u64>,
    /// Locked users with `lockdown` denials first recorded in this step: the ones to notify.
    pub locked_alerts: Vec<String>,
    /// Exemptions ending within 7 days (`exemption::EXPIRING_SOON`), as the directory shows them.
    pub exemptions_expiring_soon: usize,
}

/// One generic or explicit denial, or a plain call, by a user who is not promoted.
#[derive(Debug, Clone)]
struct CohortEvent {
    at: DateTime<Utc>,
    user: String,
    generic_denial: bool,
}

/// A write reconcile decided on, to converge the group and the ledger.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Fix {
    /// Journaled `promoting` and already in the group: record it locked.
    MarkLocked(String),
    /// Journaled `promoting` but not in the group (never written, or the write failed).
    Add(String),
    /// Locked but gone from the group: record it removed by hand (never re-added).
    MarkRemovedByHand(String),
    /// Journaled `rolling_back`: take the user out (if still in) and record them held.
    Remove { user: String, in_group: bool },
    /// In the group, not put there by lockstep: record it, so that no path plans, rolls back
    /// or removes them (an observation of IAM, recorded in dry run too).
    RecordForeign { user: String, why: String },
    /// A member lockstep did not add is no longer in the group.
    ForgetForeign(String),
    /// Held and back in the group while lockstep's add of them may still have been in flight:
    /// lockstep's own late write; journal `rolling_back` and take them out.
    ReclaimLateAdd { user: String, why: String },
    /// Lockstep's add of the user can no longer land: any later appearance is someone else's.
    SettleAdd(String),
}

/// How long after journaling an add it may still reach IAM: the step's own retries (a few
/// minutes at most) plus the 15 minutes AWS accepts a SigV4 signature after signing, with margin.
/// A user seen outside the group this long after the add was journaled will not be added by it.
pub const LATE_ADD_HORIZON: std::time::Duration = std::time::Duration::from_secs(30 * 60);

/// Whether a held user found in the group is there through lockstep's own add (journaled, never
/// seen to land): then reconcile takes them out again; otherwise someone else put them back.
pub(crate) fn is_late_add(snapshot: &Snapshot, user: &str) -> bool {
    snapshot.adds_in_flight.contains_key(user) && !snapshot.foreign.contains_key(user)
}

/// The reconcile table: what to fix and what drifted, from the ledger and the group's members.
/// In dry run only ownership facts are recorded (they describe IAM, not the rollout); drift is
/// reported once per change: a member lockstep did not add when first seen and when gone.
pub(crate) fn reconcile(
    snapshot: &Snapshot,
    in_group: &HashSet<String>,
    group: &str,
    mode: Mode,
    now: DateTime<Utc>,
) -> (Vec<Fix>, Vec<Drift>) {
    let commit = mode == Mode::Commit;
    let (mut fixes, mut drift) = (Vec::new(), Vec::new());
    // Recorded once: while they stay in the group there is nothing new to say.
    let foreign = |user: String, kind: DriftKind, message: String, fixes: &mut Vec<Fix>, drift: &mut Vec<Drift>| {
        if !snapshot.foreign.contains_key(&user) {
            fixes.push(Fix::RecordForeign { user: user.clone(), why: message.clone() });
            drift.push(Drift { user, kind, message });
        }
    };
    for member in snapshot.members.values() {
        let user = member.user.clone();
        match (member.state, in_group.contains(&member.user)) {
            (UserState::Promoting, true) if commit => fixes.push(Fix::MarkLocked(user)),
            (UserState::Promoting, false) if commit => fixes.push(Fix::Add(user)),
            (UserState::Locked, false) => {
                drift.push(Drift {
                    message: format!("{user} was removed from {group} by someone else"),
                    user: user.clone(),
                    kind: DriftKind::RemovedByHand,
                });
                if commit {
                    fixes.push(Fix::MarkRemovedByHand(user));
                }
            }
            (UserState::RollingBack, in_group) if commit => fixes.push(Fix::Remove { user, in_group }),
            (UserState::Held, true) if is_late_add(snapshot, &user) => {
                let message =
                    format!("{user} is held but back in {group} through lockstep's own add, which landed late");
                if commit {
                    fixes.push(Fix::ReclaimLateAdd { user: user.clone(), why: message.clone() });
                }
                drift.push(Drift { user, kind: DriftKind::LateAdd, message });
            }
            (UserState::Held | UserState::RemovedByHand, true) => {
                let message = format!(
                    "{user} is {} but back in {group}; lockstep did not add them and leaves them alone",
                    member.state
                );
                foreign(user, DriftKind::BackInGroupWhileHeld, message, &mut fixes, &mut drift);
            }
            _ => {}
        }
    }
    let mut strangers: Vec<&String> = in_group.iter().filter(|u| !snapshot.members.contains_key(*u)).collect();
    strangers.sort();
    for user in strangers {
        let message = format!("{user} is in {group} but lockstep did not add them; left alone");
        foreign(user.clone(), DriftKind::NotAddedByLockstep, message, &mut fixes, &mut drift);
    }
    if commit {
        // Seen outside the group past the horizon: the add will not land any more. A user still
        // promoting is added again (and settled when seen in the group).
        let settled = snapshot.adds_in_flight.iter().filter(|(user, since)| {
            !in_group.contains(*user)
                && snapshot.members.get(*user).is_none_or(|m| m.state != UserState::Promoting)
                && now >= crate::config::later(**since, LATE_ADD_HORIZON)
        });
        fixes.extend(settled.map(|(user, _)| Fix::SettleAdd(user.clone())));
    }
    for user in snapshot.foreign.keys().filter(|u| !in_group.contains(*u)) {
        fixes.push(Fix::ForgetForeign(user.clone()));
        drift.push(Drift {
            user: user.clone(),
            kind: DriftKind::ForeignLeft,
            message: format!("{user}, whom lockstep did not add, is no longer in {group}; a candidate again"),
        });
    }
    (fixes, drift)
}

/// Applying batches whose members are all locked start soaking: each with its end.
pub(crate) fn soaks_to_start(snapshot: &Snapshot, config: &Config, now: DateTime<Utc>) -> Vec<(i64, DateTime<Utc>)> {
    snapshot
        .batches
        .iter()
        .filter(|b| b.state == BatchState::Applying)
        .filter(|batch| {
            !batch.members.iter().any(|u| {
                snapshot.members.get(u).is_some_and(|m| m.state == UserState::Promoting && m.batch == Some(batch.id))
            })
        })
        .map(|batch| (batch.id, later(now, soak_of(batch, config).to_std().unwrap_or_default())))
        .collect()
}

/// A batch's soak: the one recorded when it started; for batches journaled before lockstep
/// recorded it, its wave's, or (the wave since removed from the configuration) the longest
/// configured soak, so that a batch never soaks shorter than any wave would.
pub(crate) fn soak_of(batch: &Batch, config: &Config) -> chrono::Duration {
    if let Some(soak) = batch.soak {
        return soak;
    }
    let configured = config.waves.iter().find(|w| w.name == batch.wave).map(|w| w.soak);
    chrono_of(configured.or_else(|| config.waves.iter().map(|w| w.soak).max()).unwrap_or(config.guard.window))
}

/// The soak a new batch of `wave` records.
pub(crate) fn wave_soak(config: &Config, wave: &str) -> chrono::Duration {
    chrono_of(config.waves.iter().find(|w| w.name == wave).map_or(config.guard.window, |w| w.soak))
}

/// Batches the guard watches: applying and soaking ones, and finished ones for `grace`.
pub(crate) fn watched(
    snapshot: &Snapshot,
    grace: chrono::Duration,
    now: DateTime<Utc>,
) -> impl Iterator<Item = &Batch> {
    snapshot.batches.iter().filter(move |b| is_watched(b.state, b.finished_at, grace, now))
}

/// The reason a guard rollback journals: the planner's reason and the offending calls.
pub(crate) fn rollback_reason(reason: &str, verdict: Option<&guard::Verdict>) -> String {
    let offending = match verdict {
        Some(guard::Verdict::Spike { offending, .. }) => describe_calls(offending),
        _ => String::new(),
    };
    format!("{reason}{offending}")
}

/// A rolled-back batch's members who are not at fault: all but the guard's culprits. Without a
/// spike that names culprits (an operator's rollback, a spike on no one in particular) every
/// member is held.
pub(crate) fn not_at_fault(judgement: Option<&guard::Judgement>) -> Vec<String> {
    judgement
        .filter(|j| j.verdict.kind() == guard::VerdictKind::Spike)
        .map(|j| j.explanation.not_at_fault().to_vec())
        .unwrap_or_default()
}

/// A guard rollback as journaled: the users to take out of the group, the bystanders requeued,
/// and the reason recorded.
pub(crate) struct JournaledRollback {
    pub(crate) users: Vec<String>,
    pub(crate) bystanders: Vec<String>,
    pub(crate) reason: String,
    /// Whether the rollout was paused with it (not when fully attributed to its culprits).
    pub(crate) paused: bool,
}

/// Journals the planner's rollback of a batch (its id and the plan's reason) on the guard's
/// judgement: the culprits held for `eligibility.hold_expiry`, the bystanders requeued after
/// `guard.requeue_after` (default: the batch's soak), the rollout paused unless the spike is
/// fully attributed to named culprits (then nothing is left for an operator to decide).
pub(crate) fn journal_guard_rollback(
    ledger: &dyn Ledger,
    config: &Config,
    snapshot: &Snapshot,
    (batch, reason): (i64, &str),
    judgement: Option<&guard::Judgement>,
    actor: &str,
    now: DateTime<Utc>,
) -> Result<JournaledRollback, StoreError> {
    let reason = rollback_reason(reason, judgement.map(|j| &j.verdict));
    let pause = format!("batch {batch} rolled back by the guard");
    let pause = (!judgement.is_some_and(|j| j.explanation.fully_attributed())).then_some(pause);
    let bystanders = not_at_fault(judgement);
    let requeue_after = config
        .guard
        .requeue_after
        .map(chrono_of)
        .or_else(|| snapshot.batch(batch).map(|b| soak_of(b, config)))
        .unwrap_or_else(|| chrono_of(config.guard.window));
    let users = ledger.begin_rollback(
        &RollbackRequest {
            batch,
            actor,
            reason: &reason,
            hold_until: later(now, config.eligibility.hold_expiry),
            pause: pause.as_deref(),
            requeue: Some(Requeue { users: &bystanders, until: now + requeue_after }),
        },
        now,
    )?;
    Ok(JournaledRollback { users, bystanders, reason, paused: pause.is_some() })
}

/// A healthy batch whose soak is over succeeds only once the event source has delivered events
/// past soak end + `guard.delivery_lag`; until then its verdict is inconclusive, saying until when.
pub(crate) fn await_delivery(
    mut judgement: guard::Judgement,
    batch: &Batch,
    health: &guard::SourceHealth,
    lag: std::time::Duration,
    now: DateTime<Utc>,
) -> guard::Judgement {
    let Some(soak_until) = batch.soak_until.filter(|until| *until <= now) else {
        return judgement;
    };
    if judgement.verdict.kind() != guard::VerdictKind::Healthy {
        return judgement;
    }
    if let Some(pending) = guard::delivery_pending(health, soak_until, lag) {
        judgement.verdict = guard::Verdict::Inconclusive {
            why: format!("waiting for delivery until {}", pending.need_events_after.format("%H:%MZ")),
        };
    }
    judgement
}

/// Locked users whose batch has succeeded (their soak is over), with that batch: the users the
/// guard keeps watching for as long as they are locked.
pub(crate) fn locked_after_soak(snapshot: &Snapshot) -> BTreeMap<String, i64> {
    snapshot
        .members
        .values()
        .filter(|m| m.state == UserState::Locked && !snapshot.foreign.contains_key(&m.user))
        .filter_map(|m| {
            let batch = m.batch.filter(|b| snapshot.batch(*b).is_some_and(|b| b.state == BatchState::Succeeded))?;
            Some((m.user.clone(), batch))
        })
        .collect()
}

/// The watch over locked users past their soak, from the ledger: their denials in the last
/// `guard.window` per cause, and a report for each user the lockdown denied. The daemon's step
/// and the offline `status` both read it here.
pub fn locked_watch(
    ledger: &dyn Ledger,
    config: &Config,
    now: DateTime<Utc>,
) -> Result<guard::LockedWatch, StoreError> {
    let locked: BTreeSet<String> = locked_after_soak(&ledger.snapshot()?).into_keys().collect();
    if !config.guard.watch_locked || locked.is_empty() {
        return Ok(guard::LockedWatch::default());
    }
    let since = earlier(now, config.guard.window);
    let events = ledger.denials_since(since)?;
    Ok(guard::watch_locked(&events, &locked, since, now, config.guard.after_soak))
}

/// Why a locked user is taken out of the group after its soak: its lockdown denials and sources.
pub(crate) fn release_reason(report: &guard::LockedUserReport) -> String {
    let sources: Vec<String> = report.sources.iter().map(|(source, n)| format!("{source} ({n})")).collect();
    format!(
        "after its soak the lockdown policy denied {} call(s) from {}{} (guard.after_soak: release)",
        report.denied,
        sources.join(", "),
        describe_calls(&report.lockdown_denials)
    )
}

/// The IAM writes a dry-run plan would make.
pub(crate) fn dry_run_writes(plan: &Plan, snapshot: &Snapshot, group: &str) -> Vec<String> {
    let mut writes = Vec::new();
    for action in &plan.actions {
        match action {
            Action::StartBatch { users, .. } => {
                writes.extend(users.iter().map(|c| format!("AddUserToGroup {group} {}", c.user)))
            }
            Action::RollBack { batch, .. } => {
                if let Some(b) = snapshot.batch(*batch) {
                    let owned = |u: &&String| {
                        !snapshot.foreign.contains_key(*u)
                            && snapshot.members.get(*u).is_none_or(|m| m.state.wants_membership())
                    };
                    writes.extend(b.members.iter().filter(owned).map(|u| format!("RemoveUserFromGroup {group} {u}")));
                }
            }
            _ => {}
        }
    }
    writes
}

/// What reading the evidence in `[since, until)` depends on: the store's evidence generation
/// and the whole hours the window covers (evidence is stored by whole hour). Two reads with the
/// same key give the same answer, so the controller keeps what it read until the key changes:
/// on an evidence write, or when the window slides into another hour.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct WindowKey {
    generation: u64,
    first_hour: DateTime<Utc>,
    end_hour: DateTime<Utc>,
}

/// The key of a read of `[since, until)` at evidence generation `generation`.
pub(crate) fn window_key(generation: u64, since: DateTime<Utc>, until: DateTime<Utc>) -> WindowKey {
    let end = hour_of(until);
    // Hours before `until`: up to the one it falls in, unless it falls on the hour.
    let end_hour = if end < until { end + chrono::Duration::hours(1) } else { end };
    WindowKey { generation, first_hour: hour_of(since), end_hour }
}

/// A watched batch's members' denial baselines, with what they were read under.
struct Baselines {
    key: WindowKey,
    members: Vec<String>,
    rates: Arc<BTreeMap<String, f64>>,
}

/// The controller: the edges (store, IAM, event feed, clock) and what it keeps between steps.
pub struct Controller<I, F> {
    config: Config,
    store: Arc<dyn RolloutStore>,
    iam: I,
    feed: F,
    clock: Arc<dyn Clock>,
    mode: Mode,
    directory: Option<(DateTime<Utc>, Arc<Vec<IamUser>>)>,
    /// The eligibility window's evidence as last read (see [`WindowKey`]).
    evidence: Option<(WindowKey, Arc<Vec<UserEvidence>>)>,
    /// Each watched batch's baselines as last read.
    baselines: BTreeMap<i64, Baselines>,
    cohort: VecDeque<CohortEvent>,
    last_dry_plan: Option<Vec<Action>>,
    /// The other accounts' recent batches (when, how many users), from the daemon's fleet.
    promotions_elsewhere: Vec<(DateTime<Utc>, usize)>,
}

/// How long the IAM user directory (names, paths, tags) is reused before it is listed again.
const DIRECTORY_TTL: chrono::Duration = chrono::Duration::hours(1);

impl<I: Iam, F: EventFeed> Controller<I, F> {
    /// A controller over these edges; `mode` says whether it may write to IAM.
    pub fn new(
        config: Config,
        store: Arc<dyn RolloutStore>,
        iam: I,
        feed: F,
        clock: Arc<dyn Clock>,
        mode: Mode,
    ) -> Self {
        Controller {
            config,
            store,
            iam,
            feed,
            clock,
            mode,
            directory: None,
            evidence: None,
            baselines: BTreeMap::new(),
            cohort: VecDeque::new(),
            last_dry_plan: None,
            promotions_elsewhere: Vec::new(),
        }
    }

    /// The configuration the controller runs with.
    pub fn config(&self) -> &Config {
        &self.config
    }

    fn actor(&self) -> &'static str {
        self.mode.actor()
    }

    /// Runs one step. `promote_now` is the operator's "start the next batch now".
    pub async fn step(&mut self, promote_now: bool) -> Result<StepReport, ControllerError> {
        let now = self.clock.now();
        let mut report = StepReport {
            at: now,
            mode: self.mode,
            plan: Plan {
                gate: Gate::Open,
                current_wave: None,
                actions: Vec::new(),
                waiting: Vec::new(),
                users: BTreeMap::new(),
                forecast: Default::default(),
            },
            verdicts: BTreeMap::new(),
            iam_writes: Vec::new(),
            drift: Vec::new(),
            errors: Vec::new(),
            explanations: BTreeMap::new(),
            future_events: 0,
            locked: guard::LockedWatch::default(),
            locked_denials_new: BTreeMap::new(),
            locked_alerts: Vec::new(),
            exemptions_expiring_soon: 0,
        };

        let snapshot = self.store.snapshot()?;
        let (future, locked_new) = self.observe_events(&snapshot, now).await?;
        report.future_events = future;
        self.reconcile(&mut report, now).await?;
        self.expire_exemptions(&mut report, now).await?;

        let (plan, judgements) = self.plan(now, promote_now, self.mode == Mode::Commit).await?;
        match self.mode {
            Mode::Commit => self.apply(&plan, &judgements, &mut report, now).await?,
            Mode::DryRun => self.record_dry_run(&plan, &mut report, now)?,
        }
        self.watch_locked(&locked_new, &mut report, now).await?;
        for (batch, judgement) in judgements {
            report.verdicts.insert(batch, judgement.verdict);
            report.explanations.insert(batch, judgement.explanation);
        }
        report.plan = plan;
        Ok(report)
    }

    /// The plan as it stands now, changing nothing.
    pub async fn preview(&mut self) -> Result<Plan, ControllerError> {
        let now = self.clock.now();
        Ok(self.plan(now, false, false).await?.0)
    }

    /// Gathers the planner's inputs, judges watched batches and plans; `record` keeps the
    /// verdicts in the ledger.
    async fn plan(
        &mut self,
        now: DateTime<Utc>,
        promote_now: bool,
        record: bool,
    ) -> Result<(Plan, BTreeMap<i64, guard::Judgement>), ControllerError> {
        let snapshot = self.store.snapshot()?;
        // Read before the evidence: a write in between makes what is kept newer than its key
        // says, so it is read again next step, never kept stale.
        let generation = self.store.evidence_generation()?;
        let judgements = self.judge_batches(&snapshot, generation, now, record)?;
        let verdicts: BTreeMap<i64, guard::Verdict> =
            judgements.iter().map(|(id, j)| (*id, j.verdict.clone())).collect();
        let evidence = self.window_evidence(generation, now)?;
        let freshness = self.store.freshness()?;
        let users = self.directory(now).await?;
        let blocked = self.policy_problem().await?;
        let plan = planner::plan(&planner::Inputs {
            config: &self.config,
            ledger: &snapshot,
            users: &users,
            evidence: &evidence,
            freshness,
            verdicts: &verdicts,
            blocked: blocked.as_deref(),
            now,
            promote_now,
            promoted_elsewhere: {
                let day_ago = crate::config::earlier(now, std::time::Duration::from_secs(86_400));
                self.promotions_elsewhere.iter().filter(|(at, _)| *at >= day_ago).map(|(_, users)| users).sum()
            },
        });
        Ok((plan, judgements))
    }

    /// Reads new trail records: denials of watched batches' members go to the ledger, the
    /// unpromoted cohort's activity to the in-memory window.
    /// Returns how many records were dated after `now`, and the denials of locked users (past
    /// their soak) recorded for the first time.
    async fn observe_events(
        &mut self,
        snapshot: &Snapshot,
        now: DateTime<Utc>,
    ) -> Result<(u64, Vec<DenialEvent>), ControllerError> {
        let ledger_health = self.store.source_health()?;
        let mut health = ledger_health.clone().as_of(now);
        let mut future = 0;
        let mut locked_new = Vec::new();
        match self.feed.poll().await {
            Ok(records) => {
                health.last_ok_poll = Some(now);
                health.error = None;
                future = records.iter().filter_map(Record::event_time).filter(|at| *at > now).count() as u64;
                if future > 0 {
                    tracing::warn!(
                        records = future,
                        "trail records dated in the future: not taken as signs of life; their denials count as of now"
                    );
                }
                // A record from the future proves nothing about the source being alive.
                if let Some(newest) = records.iter().filter_map(Record::event_time).filter(|at| *at <= now).max() {
                    health.last_event_at = Some(health.last_event_at.map_or(newest, |t| t.max(newest)));
                }
                locked_new = self.remember(snapshot, &records, now)?;
            }
            Err(error) => {
                tracing::warn!(%error, "guard event source poll failed");
                health.error = Some(error.to_string());
            }
        }
        if health != ledger_health {
            self.store.set_source_health(&health)?;
        }
        Ok((future, locked_new))
    }

    /// Stores denials of watched batches' members and of locked users past their soak; returns
    /// the latter's first recorded.
    fn remember(
        &mut self,
        snapshot: &Snapshot,
        records: &[Record],
        now: DateTime<Utc>,
    ) -> Result<Vec<DenialEvent>, ControllerError> {
        let policy = &self.config.lockdown.policy_name;
        let watched: Vec<_> = watched(snapshot, chrono_of(self.config.guard.grace), now).collect();
        let promoted: HashSet<&str> = snapshot
            .members
            .values()
            .filter(|m| m.state.wants_membership())
            .map(|m| m.user.as_str())
            .chain(snapshot.foreign.keys().map(String::as_str))
            .collect();
        let exempt: HashSet<String> = match (&self.config.perimeter.exempt_tag_key, &self.directory) {
            (Some(key), Some((_, users))) => {
                users.iter().filter(|u| u.tags.get(key).is_some_and(|v| v == "true")).map(|u| u.name.clone()).collect()
            }
            _ => HashSet::new(),
        };
        let locked = if self.config.guard.watch_locked { locked_after_soak(snapshot) } else { BTreeMap::new() };
        let mut denials: BTreeMap<i64, Vec<(String, DenialEvent)>> = BTreeMap::new();
        let mut locked_denials = Vec::new();
        for record in records {
            let (Some(user), Some(at)) = (record.user_name(), record.event_time()) else {
                continue;
            };
            let at = at.min(now);
            let denial = guard::attribute(record, &self.config.perimeter, &exempt, policy);
            if !promoted.contains(user) {
                self.cohort.push_back(CohortEvent {
                    at,
                    user: user.to_string(),
                    generic_denial: denial.as_ref().is_some_and(|d| d.cause == guard::Cause::Unknown),
                });
            }
            let Some(kind) = denial else { continue };
            let event = DenialEvent {
                user: user.to_string(),
                at,
                action: record.action().unwrap_or_default(),
                kind,
                code: record.error_code.clone().unwrap_or_default(),
                message: record.error_message.clone().unwrap_or_default(),
                source: record.vpc_endpoint_id.clone().or_else(|| record.source_ip_address.clone()),
            };
            let id = record.event_id.clone().unwrap_or_else(|| format!("{}/{}/{}", at.timestamp(), event.action, user));
            if let Some(batch) = locked.get(user) {
                locked_denials.push((*batch, id.clone(), event.clone()));
            }
            for batch in &watched {
                let since = batch.applied_at.unwrap_or(batch.created_at);
                if at >= since && batch.members.iter().any(|m| m == user) {
                    denials.entry(batch.id).or_default().push((id.clone(), event.clone()));
                }
            }
        }
        // Locked users' denials first: one also seen by its batch's grace is stored once, and
        // counted as new here.
        let locked_new = self.store.record_locked_denials(&locked_denials)?;
        for (batch, events) in denials {
            self.store.record_denials(batch, &events)?;
        }
        let horizon = earlier(now, self.config.guard.window);
        while self.cohort.front().is_some_and(|e| e.at < horizon) {
            self.cohort.pop_front();
        }
        Ok(locked_new)
    }

    fn cohort_rate(&self, now: DateTime<Utc>) -> CohortRate {
        let horizon = earlier(now, self.config.guard.window);
        let recent = self.cohort.iter().filter(|e| e.at >= horizon && e.at <= now);
        let users: BTreeSet<&str> = recent.clone().map(|e| e.user.as_str()).collect();
        CohortRate {
            denials: recent.filter(|e| e.generic_denial).count() as u64,
            users: users.len() as u64,
            hours: self.config.guard.window.as_secs_f64() / 3600.0,
        }
    }

    /// Converges the group on the ledger's intent and the ledger on what the group shows.
    async fn reconcile(&mut self, report: &mut StepReport, now: DateTime<Utc>) -> Result<(), ControllerError> {
        let group = self.config.lockdown.group.clone();
        let members: HashSet<String> = match self.iam.group_members(&group).await {
            Ok(members) => members.into_iter().collect(),
            Err(e) if e.is_no_such_entity() => HashSet::new(),
            Err(e) => return Err(e.into()),
        };
        let snapshot = self.store.snapshot()?;
        let (fixes, drift) = reconcile(&snapshot, &members, &group, self.mode, now);
        for fix in fixes {
            match fix {
                Fix::MarkLocked(user) => self.store.mark_locked(&user, "controller", now)?,
                Fix::Add(user) => self.add_member(&group, &user, report, now).await?,
                Fix::MarkRemovedByHand(user) => self.store.mark_removed_by_hand(&user, now)?,
                Fix::Remove { user, in_group } => self.remove_member(&group, &user, in_group, report, now).await?,
                Fix::RecordForeign { user, why } => self.store.record_foreign(&user, &why, now)?,
                Fix::ForgetForeign(user) => self.store.forget_foreign(&user, now)?,
                Fix::ReclaimLateAdd { user, why } => {
                    self.store.reclaim_late_add(&user, &why, now)?;
                    self.remove_member(&group, &user, true, report, now).await?;
                }
                Fix::SettleAdd(user) => self.store.settle_add(&user)?,
            }
        }
        if self.mode == Mode::Commit {
            self.start_soaks(now)?;
        }
        for drift in &drift {
            tracing::warn!(drift = %drift.message, kind = %drift.kind, "reconcile");
        }
        report.drift = drift;
        Ok(())
    }

    async fn add_member(
        &self,
        group: &str,
        user: &str,
        report: &mut StepReport,
        now: DateTime<Utc>,
    ) -> Result<(), ControllerError> {
        match self.iam.add_to_group(group, user).await {
            Ok(()) => {
                failpoint("after-iam-write");
                report.iam_writes.push(format!("AddUserToGroup {group} {user}"));
                self.store.mark_locked(user, "controller", now)?;
            }
            Err(e) => report.errors.push(e.to_string()),
        }
        Ok(())
    }

    async fn remove_member(
        &self,
        group: &str,
        user: &str,
        in_group: bool,
        report: &mut StepReport,
        now: DateTime<Utc>,
    ) -> Result<(), ControllerError> {
        match remove_and_hold(&self.iam, self.store.as_ref(), group, user, in_group, "controller", now).await {
            Ok(true) => {
                report.iam_writes.push(format!("RemoveUserFromGroup {group} {user}"));
                // Seen in the group (not assumed, as an offline rollback does): any add landed.
                self.store.settle_add(user)?;
            }
            Ok(false) => {}
            // Rollbacks keep retrying, step after step, until the user is out.
            Err(ControllerError::Iam(e)) => report.errors.push(e.to_string()),
            Err(e) => return Err(e),
        }
        Ok(())
    }

    /// Batches whose members are all in the group start soaking (decided on the ledger as the
    /// writes just made left it).
    fn start_soaks(&self, now: DateTime<Utc>) -> Result<(), ControllerError> {
        for (batch, soak_until) in soaks_to_start(&self.store.snapshot()?, &self.config, now) {
            self.store.start_soak(batch, soak_until, now)?;
        }
        Ok(())
    }

    fn judge_batches(
        &mut self,
        snapshot: &Snapshot,
        generation: u64,
        now: DateTime<Utc>,
        record: bool,
    ) -> Result<BTreeMap<i64, guard::Judgement>, ControllerError> {
        let health = self.store.source_health()?.as_of(now);
        let cohort = self.cohort_rate(now);
        let mut verdicts = BTreeMap::new();
        for batch in watched(snapshot, chrono_of(self.config.guard.grace), now) {
            let Some(applied_at) = batch.applied_at else { continue };
            let baselines = self.baselines(batch, applied_at, generation)?;
            let events = self.store.denials(batch.id)?;
            let judgement = guard::assess(&guard::Input {
                batch,
                events: &events,
                baselines: &baselines,
                cohort,
                source: &health,
                config: &self.config.guard,
                now,
            });
            let judgement = await_delivery(judgement, batch, &health, self.config.guard.delivery_lag, now);
            let verdict = &judgement.verdict;
            let summary = verdict.summary();
            if record
                && (batch.verdict.as_deref() != Some(summary.as_str()) || batch.verdict_kind != Some(verdict.kind()))
            {
                self.store.set_verdict(batch.id, verdict.kind(), &summary)?;
            }
            verdicts.insert(batch.id, judgement);
        }
        self.baselines.retain(|batch, _| verdicts.contains_key(batch));
        Ok(verdicts)
    }

    /// The batch members' rates of denials other than the lockdown's per hour over the
    /// eligibility window before it was applied, read for its members alone, again only when the
    /// evidence changed.
    fn baselines(
        &mut self,
        batch: &Batch,
        applied_at: DateTime<Utc>,
        generation: u64,
    ) -> Result<Arc<BTreeMap<String, f64>>, ControllerError> {
        let since = earlier(applied_at, self.config.eligibility.window);
        let key = window_key(generation, since, applied_at);
        if let Some(kept) = self.baselines.get(&batch.id)
            && kept.key == key
            && kept.members == batch.members
        {
            return Ok(kept.rates.clone());
        }
        let hours = (chrono_of(self.config.eligibility.window).num_seconds() as f64 / 3600.0).max(1.0);
        let before = self.store.evidence_of_users(&batch.members, since, applied_at)?;
        let rates: Arc<BTreeMap<String, f64>> =
            Arc::new(before.into_iter().map(|e| (e.user, e.other_denials as f64 / hours)).collect());
        let kept = Baselines { key, members: batch.members.clone(), rates: rates.clone() };
        self.baselines.insert(batch.id, kept);
        Ok(rates)
    }

    /// The evidence over the eligibility window ending at `now`, read again only when the
    /// evidence changed or the window reaches another hour.
    fn window_evidence(
        &mut self,
        generation: u64,
        now: DateTime<Utc>,
    ) -> Result<Arc<Vec<UserEvidence>>, ControllerError> {
        let since = earlier(now, self.config.eligibility.window);
        let key = window_key(generation, since, now);
        if let Some((kept, evidence)) = &self.evidence
            && *kept == key
        {
            return Ok(evidence.clone());
        }
        let evidence = Arc::new(self.store.user_evidence(since, now)?);
        self.evidence = Some((key, evidence.clone()));
        Ok(evidence)
    }

    /// The cached IAM user directory, listed again once older than [`DIRECTORY_TTL`]; shared,
    /// not copied, with each step's readers.
    async fn directory(&mut self, now: DateTime<Utc>) -> Result<Arc<Vec<IamUser>>, ControllerError> {
        if let Some((at, users)) = &self.directory
            && now - *at < DIRECTORY_TTL
        {
            return Ok(users.clone());
        }
        let users = Arc::new(self.iam.list_users().await?.users);
        self.directory = Some((now, users.clone()));
        Ok(users)
    }

    /// Ends the exemptions whose time is up (commit mode): journal, remove the tags, record.
    /// The cached directory forgets the tags at once, so the plan below judges those users like
    /// anyone else. A failed write is retried next step; in dry run the writes are only reported.
    async fn expire_exemptions(&mut self, report: &mut StepReport, now: DateTime<Utc>) -> Result<(), ControllerError> {
        let Some(key) = self.config.perimeter.exempt_tag_key.clone() else {
            return Ok(());
        };
        let due = exemption::due(&self.directory(now).await?, &key, now);
        let keys = exemption::tag_keys(&key);
        let mut ended = Vec::new();
        for user in due {
            let write = format!("UntagUser {user} {}", keys.join(" "));
            if self.mode == Mode::DryRun {
                report.iam_writes.push(write);
                continue;
            }
            self.store.mark_exemption(&user, ExemptionState::Expiring, self.actor(), now)?;
            match self.iam.untag_user(&user, &keys).await {
                Ok(()) => {
                    report.iam_writes.push(write);
                    self.store.mark_exemption(&user, ExemptionState::Expired, self.actor(), now)?;
                    tracing::info!(%user, "exemption expired; tags removed");
                    ended.push(user);
                }
                Err(e) => report.errors.push(e.to_string()),
            }
        }
        if let Some((_, cached)) = &mut self.directory {
            let cached = Arc::make_mut(cached);
            for user in cached.iter_mut().filter(|u| ended.contains(&u.name)) {
                user.tags.retain(|k, _| !keys.contains(k));
            }
            report.exemptions_expiring_soon = exemption::expiring_soon(cached, &key, now);
        }
        Ok(())
    }

    async fn policy_problem(&self) -> Result<Option<String>, ControllerError> {
        let lockdown = &self.config.lockdown;
        let document = match self.config.perimeter.policy().to_json() {
            Ok(document) => document,
            Err(too_large) => return Ok(Some(too_large.to_string())),
        };
        let status = self.iam.policy_status(&lockdown.group, &lockdown.policy_name, &document).await?;
        Ok(status.problem(&lockdown.group, &lockdown.policy_name).filter(|_| status != PolicyStatus::InPlace))
    }

    async fn apply(
        &mut self,
        plan: &Plan,
        judgements: &BTreeMap<i64, guard::Judgement>,
        report: &mut StepReport,
        now: DateTime<Utc>,
    ) -> Result<(), ControllerError> {
        let group = self.config.lockdown.group.clone();
        let snapshot = self.store.snapshot()?;
        for action in &plan.actions {
            match action {
                Action::RollBack { batch, reason } => {
                    let judgement = judgements.get(batch);
                    let JournaledRollback { users, bystanders, reason, .. } = journal_guard_rollback(
                        self.store.as_ref(),
                        &self.config,
                        &snapshot,
                        (*batch, reason),
                        judgement,
                        "controller",
                        now,
                    )?;
                    self.note_explanation(*batch, judgement, now)?;
                    tracing::warn!(batch, users = ?users, bystanders = ?bystanders, %reason, "rolling back batch");
                    for user in users {
                        self.remove_member(&group, &user, true, report, now).await?;
                    }
                }
                Action::Succeed { batch, detail } => {
                    self.store.succeed(*batch, detail, now)?;
                    // "Why did it not roll back?" has its answer in the audit log too.
                    self.note_explanation(*batch, judgements.get(batch), now)?;
                    tracing::info!(batch, %detail, "batch succeeded");
                }
                Action::FinishWave { wave, why } => {
                    self.store.finish_wave(wave, why, now)?;
                    tracing::info!(%wave, %why, "wave finished");
                }
                Action::StartBatch { wave, users } => {
                    let journal: Vec<(String, String)> =
                        users.iter().map(|c| (c.user.clone(), c.why.clone())).collect();
                    let new = NewBatch { wave, users: &journal, soak: wave_soak(&self.config, wave) };
                    let batch = self.store.start_batch(&new, "controller", now)?;
                    failpoint("after-journal");
                    tracing::info!(batch, %wave, users = ?journal.iter().map(|(u, _)| u).collect::<Vec<_>>(), "batch started");
                    for (user, _) in &journal {
                        self.add_member(&group, user, report, now).await?;
                    }
                    self.start_soaks(now)?;
                }
            }
        }
        Ok(())
    }

    /// Writes the guard's explanation of a batch's judgement to the audit log (`guard_explanation`:
    /// counts per cause, expectation, thresholds, culprits, bystanders, samples, as JSON).
    fn note_explanation(
        &self,
        batch: i64,
        judgement: Option<&guard::Judgement>,
        now: DateTime<Utc>,
    ) -> Result<(), ControllerError> {
        if let Some(judgement) = judgement {
            let explanation = serde_json::to_string(&judgement.explanation).unwrap_or_default();
            self.store.note("controller", "guard_explanation", &format!("batch {batch}: {explanation}"), now)?;
        }
        Ok(())
    }

    /// Watches locked users past their soak: fills the report's watch, counts and alerts, and
    /// with `guard.after_soak: release` (committing) takes each user the lockdown denied out of
    /// the group and holds it: journaled first, then the IAM write, as a rollback is.
    async fn watch_locked(
        &self,
        new: &[DenialEvent],
        report: &mut StepReport,
        now: DateTime<Utc>,
    ) -> Result<(), ControllerError> {
        let watch = locked_watch(self.store.as_ref(), &self.config, now)?;
        for event in new {
            *report.locked_denials_new.entry(event.kind.cause).or_default() += 1;
        }
        let alerted: BTreeSet<&str> =
            new.iter().filter(|e| e.kind.cause == guard::Cause::Lockdown).map(|e| e.user.as_str()).collect();
        report.locked_alerts =
            watch.reports.iter().filter(|r| alerted.contains(r.user.as_str())).map(|r| r.user.clone()).collect();
        if self.mode == Mode::Commit {
            let group = self.config.lockdown.group.clone();
            for locked in watch.reports.iter().filter(|r| r.action == AfterSoak::Release) {
                let reason = release_reason(locked);
                let hold_until = later(now, self.config.eligibility.hold_expiry);
                let removal = Removal { user: &locked.user, actor: "controller", reason: &reason, hold_until };
                self.store.begin_removal(&removal, now)?;
                tracing::warn!(user = %locked.user, %reason, "taking a locked user out of the group");
                self.remove_member(&group, &locked.user, true, report, now).await?;
            }
        }
        report.locked = watch;
        Ok(())
    }

    /// Dry run: records what `--commit` would do, once per change of plan.
    fn record_dry_run(
        &mut self,
        plan: &Plan,
        report: &mut StepReport,
        now: DateTime<Utc>,
    ) -> Result<(), ControllerError> {
        report.iam_writes.extend(dry_run_writes(plan, &self.store.snapshot()?, &self.config.lockdown.group));
        if self.last_dry_plan.as_ref() != Some(&plan.actions) {
            for action in &plan.actions {
                let line = serde_json::to_string(action).unwrap_or_default();
                self.store.note(self.actor(), "would", &line, now)?;
            }
            self.last_dry_plan = Some(plan.actions.clone());
        }
        Ok(())
    }
}

/// Takes a journaled `rolling_back` user out of the group (when still in) and records them
/// held: the one removal path of the daemon and of the offline rollback. Returns whether IAM
/// was written; on an IAM error the ledger is unchanged, so a rerun retries.
pub async fn remove_and_hold<I: Iam>(
    iam: &I,
    ledger: &dyn Ledger,
    group: &str,
    user: &str,
    in_group: bool,
    actor: &str,
    now: DateTime<Utc>,
) -> Result<bool, ControllerError> {
    if in_group {
        iam.remove_from_group(group, user).await?;
    }
    ledger.mark_held(user, actor, now)?;
    Ok(in_group)
}

/// Crash-test hook: with `LOCKSTEP_FAILPOINT=<name>` the process aborts at that point, as a
/// crash or `kill -9` there would leave it. Points: `after-journal`, `after-iam-write`.
fn failpoint(name: &str) {
    if std::env::var("LOCKSTEP_FAILPOINT").is_ok_and(|point| point == name) {
        tracing::error!(failpoint = name, "aborting at failpoint");
        std::process::abort();
    }
}

/// Soaking and applying batches are watched, and finished ones for `grace` after they ended.
fn is_watched(
    state: BatchState,
    finished_at: Option<DateTime<Utc>>,
    grace: chrono::Duration,
    now: DateTime<Utc>,
) -> bool {
    match state {
        BatchState::Applying | BatchState::Soaking => true,
        BatchState::Succeeded => finished_at.is_some_and(|at| now - at <= grace),
        _ => false,
    }
}

fn describe_calls(calls: &[DenialEvent]) -> String {
    const SHOWN: usize = 5;
    let mut text: String = calls
        .iter()
        .take(SHOWN)
        .map(|c| format!("; {} {} {} at {}", c.user, c.action, c.code, c.at.format("%H:%M:%SZ")))
        .collect();
    if calls.len() > SHOWN {
        text.push_str(&format!("; and {} more", calls.len() - SHOWN));
    }
    text
}

#[cfg(test)]
mod tests {
    //! The controller's decisions, pure, over hand-built ledgers; and the removal path over an
    //! in-memory IAM (test support only: the emulator tests prove the AWS path).
    use std::path::Path;

    use chrono::TimeZone;

    use super::*;
    use crate::planner::Candidate;
    use crate::rollout::Member;
    use crate::store::Store;
    use crate::testkit::MemoryIam;

    fn t(h: i64) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 3, 1, 0, 0, 0).unwrap() + chrono::Duration::hours(h)
    }

    fn config() -> Config {
        Config::parse(include_str!("../rollout.yaml"), Path::new("rollout.yaml")).unwrap()
    }

    fn member(user: &str, state: UserState, batch: Option<i64>) -> (String, Member) {
        let member = Member { user: user.into(), state, batch, since: t(0), reason: None, hold_until: None };
        (user.to_string(), member)
    }

    fn batch(id: i64, wave: &str, state: BatchState, members: &[&str]) -> Batch {
        Batch {
            id,
            wave: wave.into(),
            state,
            members: members.iter().map(|m| m.to_string()).collect(),
            created_at: t(0),
            soak: None,
            applied_at: None,
            soak_until: None,
            finished_at: None,
            verdict: None,
            verdict_kind: None,
        }
    }

    fn group(users: &[&str]) -> HashSet<String> {
        users.iter().map(|u| u.to_string()).collect()
    }

    #[test]
    fn reconcile_finishes_journaled_work_and_reports_drift_by_kind() {
        let snapshot = Snapshot {
            members: [
                member("ann", UserState::Promoting, Some(1)),
                member("ben", UserState::Promoting, Some(1)),
                member("cat", UserState::Locked, Some(1)),
                member("dan", UserState::RollingBack, Some(1)),
                member("eve", UserState::Held, None),
                member("fay", UserState::Locked, Some(1)),
            ]
            .into(),
            ..Snapshot::default()
        };
        let in_group = group(&["ann", "dan", "eve", "fay", "zed"]);
        let (fixes, drift) = reconcile(&snapshot, &in_group, "lockdown", Mode::Commit, t(1));
        assert_eq!(
            fixes,
            [
                Fix::MarkLocked("ann".into()),
                Fix::Add("ben".into()),
                Fix::MarkRemovedByHand("cat".into()),
                Fix::Remove { user: "dan".into(), in_group: true },
                Fix::RecordForeign { user: "eve".into(), why: drift[1].message.clone() },
                Fix::RecordForeign { user: "zed".into(), why: drift[2].message.clone() },
            ]
        );
        let kinds: Vec<_> = drift.iter().map(|d| (d.user.as_str(), d.kind)).collect();
        assert_eq!(
            kinds,
            [
                ("cat", DriftKind::RemovedByHand),
                ("eve", DriftKind::BackInGroupWhileHeld),
                ("zed", DriftKind::NotAddedByLockstep)
            ]
        );
        // A dry run reports the same drift and records only who lockstep did not add.
        let (fixes, dry_drift) = reconcile(&snapshot, &in_group, "lockdown", Mode::DryRun, t(1));
        assert!(fixes.iter().all(|f| matches!(f, Fix::RecordForeign { .. })), "{fixes:?}");
        assert_eq!(dry_drift, drift);
    }

    #[test]
    fn a_member_lockstep_did_not_add_is_reported_once_per_change() {
        let mut snapshot = Snapshot { members: [member("eve", UserState::Held, None)].into(), ..Snapshot::default() };
        snapshot.foreign = [("eve".to_string(), t(0)), ("zed".to_string(), t(0))].into();
        // Recorded already: nothing to say while they stay.
        let (fixes, drift) = reconcile(&snapshot, &group(&["eve", "zed"]), "lockdown", Mode::Commit, t(1));
        assert!(fixes.is_empty() && drift.is_empty(), "{fixes:?} {drift:?}");
        // Gone from the group: forgotten, reported once.
        let (fixes, drift) = reconcile(&snapshot, &group(&["eve"]), "lockdown", Mode::Commit, t(1));
        assert_eq!(fixes, [Fix::ForgetForeign("zed".into())]);
        assert_eq!(drift.iter().map(|d| d.kind).collect::<Vec<_>>(), [DriftKind::ForeignLeft]);
    }

    #[test]
    fn a_late_add_of_lockstep_is_its_own_and_a_hand_add_is_not() {
        // ann: rolled back while her add was in flight, which then landed. kim: held after a
        // confirmed removal (no add in flight), put back by hand. ben: held, out, add in flight.
        let mut snapshot = Snapshot {
            members: [
                member("ann", UserState::Held, Some(1)),
                member("ben", UserState::Held, Some(1)),
                member("kim", UserState::Held, Some(1)),
                member("liv", UserState::Promoting, Some(2)),
            ]
            .into(),
            ..Snapshot::default()
        };
        snapshot.adds_in_flight =
            [("ann", t(0)), ("ben", t(0)), ("liv", t(0))].map(|(u, at)| (u.to_string(), at)).into();
        let in_group = group(&["ann", "kim"]);
        let (fixes, drift) = reconcile(&snapshot, &in_group, "lockdown", Mode::Commit, t(0));
        assert_eq!(
            fixes,
            [
                Fix::ReclaimLateAdd { user: "ann".into(), why: drift[0].message.clone() },
                Fix::RecordForeign { user: "kim".into(), why: drift[1].message.clone() },
                Fix::Add("liv".into()),
            ]
        );
        let kinds: Vec<_> = drift.iter().map(|d| (d.user.as_str(), d.kind)).collect();
        assert_eq!(kinds, [("ann", DriftKind::LateAdd), ("kim", DriftKind::BackInGroupWhileHeld)]);
        // A dry run reports the late add and changes nothing.
        let (fixes, _) = reconcile(&snapshot, &in_group, "lockdown", Mode::DryRun, t(0));
        assert_eq!(fixes, [Fix::RecordForeign { user: "kim".into(), why: drift[1].message.clone() }]);
        // Past the horizon, a user seen outside the group is settled (still promoting: not yet).
        let later = crate::config::later(t(0), LATE_ADD_HORIZON);
        let (fixes, _) = reconcile(&snapshot, &group(&[]), "lockdown", Mode::Commit, later);
        assert_eq!(fixes, [Fix::Add("liv".into()), Fix::SettleAdd("ann".into()), Fix::SettleAdd("ben".into())]);
        let just_before = later - chrono::Duration::seconds(1);
        let (fixes, _) = reconcile(&snapshot, &group(&[]), "lockdown", Mode::Commit, just_before);
        assert_eq!(fixes, [Fix::Add("liv".into())]);
        // Once settled, the same appearance is someone else's.
        snapshot.adds_in_flight.remove("ann");
        let (fixes, drift) = reconcile(&snapshot, &group(&["ann"]), "lockdown", Mode::Commit, later);
        assert_eq!(drift[0].kind, DriftKind::BackInGroupWhileHeld);
        assert!(matches!(&fixes[..], [Fix::RecordForeign { .. }, Fix::Add(_), Fix::SettleAdd(_)]), "{fixes:?}");
    }

    #[test]
    fn a_dry_run_rollback_never_lists_a_member_lockstep_did_not_add() {
        let mut snapshot = Snapshot {
            batches: vec![batch(4, "x", BatchState::Soaking, &["cat", "zed"])],
            members: [member("cat", UserState::Locked, Some(4)), member("zed", UserState::Locked, Some(4))].into(),
            ..Snapshot::default()
        };
        snapshot.foreign = [("zed".to_string(), t(0))].into();
        let plan = Plan {
            gate: Gate::Open,
            current_wave: None,
            actions: vec![Action::RollBack { batch: 4, reason: "spike".into() }],
            waiting: vec![],
            users: BTreeMap::new(),
            forecast: Default::default(),
        };
        assert_eq!(dry_run_writes(&plan, &snapshot, "lockdown"), ["RemoveUserFromGroup lockdown cat"]);
    }

    #[test]
    fn a_batch_whose_wave_left_the_config_keeps_its_recorded_soak_or_the_longest() {
        let config = config();
        let longest = config.waves.iter().map(|w| w.soak).max().unwrap();
        let mut gone = batch(1, "wave-since-removed", BatchState::Applying, &["ann"]);
        assert_eq!(soak_of(&gone, &config), chrono_of(longest));
        gone.soak = Some(chrono::Duration::hours(5));
        assert_eq!(soak_of(&gone, &config), chrono::Duration::hours(5));
        let first = &config.waves[0];
        let legacy = batch(2, &first.name, BatchState::Applying, &["ben"]);
        assert_eq!(soak_of(&legacy, &config), chrono_of(first.soak));
    }

    #[test]
    fn only_fully_locked_applying_batches_start_soaking() {
        let mut done = batch(1, "x", BatchState::Applying, &["ann"]);
        done.soak = Some(chrono::Duration::hours(24));
        let pending = batch(2, "x", BatchState::Applying, &["ben"]);
        let soaking = batch(3, "x", BatchState::Soaking, &["cat"]);
        let snapshot = Snapshot {
            batches: vec![done, pending, soaking],
            members: [
                member("ann", UserState::Locked, Some(1)),
                member("ben", UserState::Promoting, Some(2)),
                member("cat", UserState::Locked, Some(3)),
            ]
            .into(),
            ..Snapshot::default()
        };
        assert_eq!(soaks_to_start(&snapshot, &config(), t(1)), [(1, t(25))]);
    }

    #[test]
    fn finished_batches_are_watched_for_the_grace_period_only() {
        let mut recent = batch(1, "x", BatchState::Succeeded, &[]);
        recent.finished_at = Some(t(10));
        let mut old = batch(2, "x", BatchState::Succeeded, &[]);
        old.finished_at = Some(t(0));
        let rolled_back = batch(3, "x", BatchState::RolledBack, &[]);
        let soaking = batch(4, "x", BatchState::Soaking, &[]);
        let snapshot = Snapshot { batches: vec![recent, old, rolled_back, soaking], ..Snapshot::default() };
        let ids: Vec<i64> = watched(&snapshot, chrono::Duration::hours(2), t(11)).map(|b| b.id).collect();
        assert_eq!(ids, [1, 4]);
    }

    #[test]
    fn a_guard_rollback_names_the_offending_calls() {
        let call = |user: &str| DenialEvent {
            user: user.into(),
            at: t(1),
            action: "s3:ListBuckets".into(),
            kind: guard::Attribution::from_stored("lockdown"),
            code: "AccessDenied".into(),
            message: String::new(),
            source: None,
        };
        let spike = guard::Verdict::Spike {
            affected: vec![],
            weighted_denials: 7,
            offending: (0..7).map(|i| call(&format!("u{i}"))).collect(),
            detail: "7 denials".into(),
        };
        let reason = rollback_reason("guard: spike", Some(&spike));
        assert!(reason.starts_with("guard: spike; u0 s3:ListBuckets AccessDenied at 01:00:00Z"), "{reason}");
        assert!(reason.ends_with("; and 2 more"), "{reason}");
        assert_eq!(rollback_reason("manual", None), "manual");
    }

    fn explanation(culprits: &[&str], bystanders: &[&str]) -> guard::Explanation {
        guard::Explanation {
            batch: 1,
            since: t(0),
            until: t(1),
            cohort_unknown_per_user_hour: 0.0,
            false_alarm_budget: 0.001,
            tests_per_soak: 1,
            significance: 0.001,
            min_affected_users: 1,
            min_denials: 1,
            weighted_denials: 0,
            members: vec![],
            culprits: culprits.iter().map(|u| guard::Culprit { user: u.to_string(), offending: vec![] }).collect(),
            bystanders: bystanders.iter().map(|u| u.to_string()).collect(),
            samples: vec![],
        }
    }

    #[test]
    fn only_a_spike_with_culprits_clears_the_bystanders() {
        let explanation = |culprits: &[&str]| explanation(culprits, &["ben", "cat"]);
        let spike = guard::Verdict::Spike {
            affected: vec!["ann".into()],
            weighted_denials: 5,
            offending: vec![],
            detail: "5 denials".into(),
        };
        let judged = |verdict: &guard::Verdict, culprits: &[&str]| guard::Judgement {
            verdict: verdict.clone(),
            explanation: explanation(culprits),
        };
        assert_eq!(not_at_fault(Some(&judged(&spike, &["ann"]))), ["ben", "cat"]);
        assert!(not_at_fault(Some(&judged(&spike, &[]))).is_empty(), "no culprit named: everyone is held");
        let healthy = guard::Verdict::Healthy { detail: "0 denials".into() };
        assert!(not_at_fault(Some(&judged(&healthy, &["ann"]))).is_empty(), "not the guard's rollback");
        assert!(not_at_fault(None).is_empty());
    }

    #[test]
    fn a_healthy_batch_past_its_soak_waits_for_delivery_past_soak_end_plus_lag() {
        let mut soaked = batch(1, "x", BatchState::Soaking, &["ann"]);
        soaked.soak_until = Some(t(2));
        let healthy = || guard::Judgement {
            verdict: guard::Verdict::Healthy { detail: "0 denials".into() },
            explanation: explanation(&[], &["ann"]),
        };
        let lag = std::time::Duration::from_secs(300);
        let delivered_until =
            |at| guard::SourceHealth { last_event_at: Some(at), last_ok_poll: Some(t(3)), error: None };
        let waiting = await_delivery(healthy(), &soaked, &delivered_until(t(2)), lag, t(3)).verdict;
        assert!(
            matches!(&waiting, guard::Verdict::Inconclusive { why } if why == "waiting for delivery until 02:05Z"),
            "{waiting:?}"
        );
        let delivered =
            await_delivery(healthy(), &soaked, &delivered_until(t(2) + chrono::Duration::minutes(6)), lag, t(3))
                .verdict;
        assert_eq!(delivered.kind(), guard::VerdictKind::Healthy);
        let still_soaking = await_delivery(healthy(), &soaked, &delivered_until(t(0)), lag, t(1)).verdict;
        assert_eq!(still_soaking.kind(), guard::VerdictKind::Healthy, "only a finished soak waits");
    }

    #[test]
    fn a_dry_run_lists_the_writes_it_would_make() {
        let snapshot =
            Snapshot { batches: vec![batch(4, "x", BatchState::Soaking, &["cat", "dan"])], ..Snapshot::default() };
        let plan = Plan {
            gate: Gate::Open,
            current_wave: None,
            actions: vec![
                Action::RollBack { batch: 4, reason: "spike".into() },
                Action::StartBatch {
                    wave: "x".into(),
                    users: vec![Candidate { user: "ann".into(), why: "clean".into() }],
                },
            ],
            waiting: vec![],
            users: BTreeMap::new(),
            forecast: Default::default(),
        };
        assert_eq!(
            dry_run_writes(&plan, &snapshot, "lockdown"),
            ["RemoveUserFromGroup lockdown cat", "RemoveUserFromGroup lockdown dan", "AddUserToGroup lockdown ann"]
        );
    }

    #[test]
    fn a_window_read_is_keyed_by_generation_and_whole_hours() {
        let key = |generation, minutes| {
            let until = t(24) + chrono::Duration::minutes(minutes);
            window_key(generation, until - chrono::Duration::days(14), until)
        };
        assert_eq!(key(1, 1), key(1, 59), "within one hour the window covers the same hours");
        assert_ne!(key(1, 59), key(1, 60), "the window slid into another hour");
        assert_ne!(key(1, 1), key(2, 1), "the evidence changed");
        // Its end: the hours that start before it.
        let end = |minutes| window_key(1, t(0), t(24) + chrono::Duration::minutes(minutes));
        assert_ne!(end(0), end(1), "on the hour the hour that starts is not covered yet");
        assert_eq!(end(1), end(60), "up to and including the next hour's start");
        assert_ne!(end(60), end(61));
    }

    /// A feed that never delivers anything.
    struct Silent;

    impl EventFeed for Silent {
        async fn poll(&mut self) -> Result<Vec<Record>, crate::evidence::SourceError> {
            Ok(Vec::new())
        }
    }

    #[tokio::test]
    async fn the_kept_evidence_is_read_again_after_an_evidence_write() {
        use crate::clock::ManualClock;
        use crate::evidence::aggregate::Judge;
        use crate::evidence::files::TrailFile;
        use crate::store::EvidenceWriter;

        let config = config();
        let judge = Judge::new(&config);
        let store = Arc::new(Store::open_in_memory().unwrap());
        let now = t(24 * 20);
        let alice = IamUser { name: "alice".into(), arn: String::new(), path: "/".into(), tags: BTreeMap::new() };
        let iam = MemoryIam::new(vec![alice], &[]);
        let clock = Arc::new(ManualClock::new(now));
        let mut controller = Controller::new(config, store.clone(), iam, Silent, clock.clone(), Mode::DryRun);
        let calls_on = |day: i64| {
            let time = (t(24 * day) + chrono::Duration::hours(10)).to_rfc3339();
            let call = crate::testkit::user_call("alice", &time, "203.0.113.7", "s3:ListBuckets");
            let aggregates = crate::evidence::aggregate::aggregate(&[call], &judge);
            TrailFile { key: format!("day-{day}"), aggregates, ..TrailFile::default() }
        };
        let alice = |plan: Plan| plan.users["alice"].clone();

        let before = alice(controller.preview().await.unwrap());
        assert!(matches!(&before, planner::Eligibility::Ineligible(why) if why.starts_with("no recorded calls")));
        store.add_trail_files(&[calls_on(15)], now).unwrap();
        clock.advance(chrono::Duration::minutes(1));
        let one = alice(controller.preview().await.unwrap());
        assert_ne!(one, before, "the write within the same hour is seen");
        store.add_trail_files(&[calls_on(10)], now).unwrap();
        let two = alice(controller.preview().await.unwrap());
        assert_ne!(two, one, "and the next write too: {two:?}");
        clock.advance(chrono::Duration::minutes(1));
        assert_eq!(alice(controller.preview().await.unwrap()), two, "nothing written, nothing changed");
    }

    #[tokio::test]
    async fn removal_holds_the_user_only_once_they_are_out_of_the_group() {
        let store = Store::open_in_memory().unwrap();
        let users = [("ann".to_string(), "clean".to_string())];
        let id = store
            .start_batch(&NewBatch { wave: "x", users: &users, soak: chrono::Duration::hours(1) }, "controller", t(0))
            .unwrap();
        store.mark_locked("ann", "controller", t(0)).unwrap();
        let request = RollbackRequest {
            batch: id,
            actor: "ops",
            reason: "manual",
            hold_until: t(48),
            pause: Some("rolled back"),
            requeue: None,
        };
        assert_eq!(store.begin_rollback(&request, t(1)).unwrap(), ["ann"]);
        assert!(store.snapshot().unwrap().paused.is_some(), "the rollback paused the rollout in the same transaction");

        let failing = MemoryIam::new(Vec::new(), &["ann"]).failing();
        let error = remove_and_hold(&failing, &store, "lockdown", "ann", true, "ops", t(2)).await.unwrap_err();
        assert!(matches!(error, ControllerError::Iam(_)), "{error}");
        assert_eq!(store.snapshot().unwrap().members["ann"].state, UserState::RollingBack, "unchanged, retried later");

        let iam = MemoryIam::new(Vec::new(), &["ann"]);
        assert!(remove_and_hold(&iam, &store, "lockdown", "ann", true, "ops", t(2)).await.unwrap());
        assert!(iam.members().is_empty());
        assert_eq!(store.snapshot().unwrap().members["ann"].state, UserState::Held);
    }
}
