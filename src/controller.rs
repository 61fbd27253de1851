//! The controller: one idempotent, level-triggered step that converges IAM on the ledger and the
//! ledger on the plan. The daemon calls [`Controller::step`] every guard poll; a restart at any
//! point is safe because every step starts by reconciling what the ledger intends with what the
//! lockdown group really contains.
//!
//! One step:
//! 1. poll the event feed for new trail records (the guard's near-real-time view) and remember
//!    denials of watched batches' members and the unpromoted cohort's denial rate;
//! 2. reconcile: finish journaled promotions and removals, notice members removed by hand or
//!    added by someone else (left alone and reported), start soaks of fully applied batches;
//! 3. judge each watched batch with the guard;
//! 4. plan, then apply the plan: journal in the ledger first, then call IAM. In dry run nothing
//!    is written to IAM or the ledger's state; the plan is recorded in the audit log instead.

use std::collections::{BTreeMap, BTreeSet, HashSet, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use chrono::{DateTime, Utc};

use crate::clock::Clock;
use crate::config::Config;
use crate::evidence::{EvidenceStore, SourceError};
use crate::guard::{self, CohortRate, DenialEvent, SourceHealth};
use crate::iam::{Iam, IamError, IamUser, PolicyStatus};
use crate::ledger::{Ledger, LedgerError};
use crate::planner::{self, Action, Gate, Plan};
use crate::rollout::{BatchState, Snapshot, UserState};
use crate::store::{Store, StoreError};
use crate::trail::Record;

/// A controller with its edges chosen, as the daemon's HTTP side sees it.
pub trait Stepper: Send {
    fn step(&mut self, promote_now: bool) -> Pin<Box<dyn Future<Output = Result<StepReport, ControllerError>> + Send + '_>>;
    /// The plan as it stands, without polling, reconciling or changing anything.
    fn preview(&mut self) -> Pin<Box<dyn Future<Output = Result<Plan, ControllerError>> + Send + '_>>;
    fn config(&self) -> &Config;
    fn store(&self) -> &Arc<Store>;
    fn clock(&self) -> &Arc<dyn Clock>;
    fn mode(&self) -> Mode;
}

impl<I: Iam + 'static, F: EventFeed + 'static> Stepper for Controller<I, F> {
    fn step(&mut self, promote_now: bool) -> Pin<Box<dyn Future<Output = Result<StepReport, ControllerError>> + Send + '_>> {
        Box::pin(Controller::step(self, promote_now))
    }
    fn preview(&mut self) -> Pin<Box<dyn Future<Output = Result<Plan, ControllerError>> + Send + '_>> {
        Box::pin(Controller::preview(self))
    }
    fn config(&self) -> &Config {
        &self.config
    }
    fn store(&self) -> &Arc<Store> {
        &self.store
    }
    fn clock(&self) -> &Arc<dyn Clock> {
        &self.clock
    }
    fn mode(&self) -> Mode {
        self.mode
    }
}

/// New trail records since the last poll.
pub trait EventFeed: Send + Sync {
    fn poll(&mut self) -> impl Future<Output = Result<Vec<Record>, SourceError>> + Send;
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Plan and report; write nothing to IAM.
    DryRun,
    Commit,
}

#[derive(Debug, thiserror::Error)]
pub enum ControllerError {
    #[error(transparent)]
    Ledger(#[from] LedgerError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Iam(#[from] IamError),
}

/// What one step saw and did, for logs, metrics and `lockstep plan`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct StepReport {
    pub at: DateTime<Utc>,
    pub mode: &'static str,
    pub plan: Plan,
    pub verdicts: BTreeMap<i64, guard::Verdict>,
    /// IAM writes made (or, in dry run, that would have been made).
    pub iam_writes: Vec<String>,
    /// Differences between the ledger and the group that reconcile found.
    pub drift: Vec<String>,
    /// Errors that did not stop the step (a failed IAM write is retried next step).
    pub errors: Vec<String>,
}

/// One generic or explicit denial, or a plain call, by a user who is not promoted.
#[derive(Debug, Clone)]
struct CohortEvent {
    at: DateTime<Utc>,
    user: String,
    generic_denial: bool,
}

pub struct Controller<I, F> {
    config: Config,
    store: Arc<Store>,
    iam: I,
    feed: F,
    clock: Arc<dyn Clock>,
    mode: Mode,
    directory: Option<(DateTime<Utc>, Vec<IamUser>)>,
    cohort: VecDeque<CohortEvent>,
    last_dry_plan: Option<Vec<Action>>,
}

/// How long the IAM user directory (names, paths, tags) is reused before it is listed again.
const DIRECTORY_TTL: chrono::Duration = chrono::Duration::hours(1);

impl<I: Iam, F: EventFeed> Controller<I, F> {
    pub fn new(config: Config, store: Arc<Store>, iam: I, feed: F, clock: Arc<dyn Clock>, mode: Mode) -> Self {
        Controller {
            config,
            store,
            iam,
            feed,
            clock,
            mode,
            directory: None,
            cohort: VecDeque::new(),
            last_dry_plan: None,
        }
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    fn actor(&self) -> &'static str {
        match self.mode {
            Mode::Commit => "controller",
            Mode::DryRun => "dry-run",
        }
    }

    /// Runs one step. `promote_now` is the operator's "start the next batch now".
    pub async fn step(&mut self, promote_now: bool) -> Result<StepReport, ControllerError> {
        let now = self.clock.now();
        let mut report = StepReport {
            at: now,
            mode: match self.mode {
                Mode::Commit => "commit",
                Mode::DryRun => "dry-run",
            },
            plan: Plan {
                gate: Gate::Open,
                current_wave: None,
                actions: Vec::new(),
                waiting: Vec::new(),
                users: BTreeMap::new(),
            },
            verdicts: BTreeMap::new(),
            iam_writes: Vec::new(),
            drift: Vec::new(),
            errors: Vec::new(),
        };

        let snapshot = self.ledger_snapshot()?;
        self.observe_events(&snapshot, now).await?;
        self.reconcile(&mut report, now).await?;

        let (plan, verdicts) = self.plan(now, promote_now, self.mode == Mode::Commit).await?;
        match self.mode {
            Mode::Commit => self.apply(&plan, &verdicts, &mut report, now).await?,
            Mode::DryRun => self.record_dry_run(&plan, &mut report, now)?,
        }
        report.verdicts = verdicts;
        report.plan = plan;
        Ok(report)
    }

    /// The plan as it stands now, changing nothing.
    pub async fn preview(&mut self) -> Result<Plan, ControllerError> {
        let now = self.clock.now();
        Ok(self.plan(now, false, false).await?.0)
    }

    /// Judges watched batches and plans; `record` keeps the verdicts in the ledger.
    async fn plan(&mut self, now: DateTime<Utc>, promote_now: bool, record: bool) -> Result<(Plan, BTreeMap<i64, guard::Verdict>), ControllerError> {
        let snapshot = self.ledger_snapshot()?;
        let verdicts = self.judge_batches(&snapshot, now, record)?;
        let evidence = self
            .store
            .user_evidence(now - chrono_of(self.config.eligibility.window), now)?;
        let freshness = self.store.freshness()?;
        let users = self.directory(now).await?;
        let policy_problem = self.policy_problem().await?;
        let mut plan = planner::plan(&planner::Inputs {
            config: &self.config,
            ledger: &snapshot,
            users: &users,
            evidence: &evidence,
            freshness,
            verdicts: &verdicts,
            now,
            promote_now,
        });
        if let Some(problem) = policy_problem {
            // The lockdown policy is missing or drifted: adding users would not lock them, or
            // lock them with something else. Rollbacks and successes still proceed.
            plan.actions.retain(|a| !matches!(a, Action::StartBatch { .. }));
            plan.gate = Gate::Blocked(problem);
        }
        Ok((plan, verdicts))
    }

    fn ledger_snapshot(&self) -> Result<Snapshot, LedgerError> {
        Ledger::new(&self.store.conn()).snapshot()
    }

    /// Reads new trail records: denials of watched batches' members go to the ledger, the
    /// unpromoted cohort's activity to the in-memory window.
    async fn observe_events(&mut self, snapshot: &Snapshot, now: DateTime<Utc>) -> Result<(), ControllerError> {
        let ledger_health = Ledger::new(&self.store.conn()).source_health()?;
        let mut health = ledger_health.clone();
        match self.feed.poll().await {
            Ok(records) => {
                health.last_ok_poll = Some(now);
                health.error = None;
                if let Some(newest) = records.iter().filter_map(Record::event_time).max() {
                    health.last_event_at = Some(health.last_event_at.map_or(newest, |t| t.max(newest)));
                }
                self.remember(snapshot, &records, now)?;
            }
            Err(error) => {
                tracing::warn!(%error, "guard event source poll failed");
                health.error = Some(error.to_string());
            }
        }
        if health != ledger_health {
            Ledger::new(&self.store.conn()).set_source_health(&health)?;
        }
        Ok(())
    }

    fn remember(&mut self, snapshot: &Snapshot, records: &[Record], now: DateTime<Utc>) -> Result<(), ControllerError> {
        let policy = &self.config.lockdown.policy_name;
        let grace = chrono_of(self.config.guard.grace);
        let watched: Vec<_> = snapshot
            .batches
            .iter()
            .filter(|b| is_watched(b.state, b.finished_at, grace, now))
            .collect();
        let promoted: HashSet<&str> = snapshot
            .members
            .values()
            .filter(|m| m.state.wants_membership())
            .map(|m| m.user.as_str())
            .collect();
        let exempt: HashSet<String> = match (&self.config.perimeter.exempt_tag_key, &self.directory) {
            (Some(key), Some((_, users))) => users.iter().filter(|u| u.tags.get(key).is_some_and(|v| v == "true")).map(|u| u.name.clone()).collect(),
            _ => HashSet::new(),
        };
        let mut denials: BTreeMap<i64, Vec<(String, DenialEvent)>> = BTreeMap::new();
        for record in records {
            let (Some(user), Some(at)) = (record.user_name(), record.event_time()) else {
                continue;
            };
            let denial = guard::attribute(record, &self.config.perimeter, &exempt, policy);
            if !promoted.contains(user) {
                self.cohort.push_back(CohortEvent {
                    at,
                    user: user.to_string(),
                    generic_denial: denial.as_ref().is_some_and(|d| d.cause == guard::Cause::Unknown),
                });
            }
            let Some(kind) = denial else { continue };
            for batch in &watched {
                let since = batch.applied_at.unwrap_or(batch.created_at);
                if at >= since && batch.members.iter().any(|m| m == user) {
                    let event = DenialEvent {
                        user: user.to_string(),
                        at,
                        action: record.action().unwrap_or_default(),
                        kind: kind.clone(),
                        code: record.error_code.clone().unwrap_or_default(),
                        message: record.error_message.clone().unwrap_or_default(),
                        source: record.vpc_endpoint_id.clone().or_else(|| record.source_ip_address.clone()),
                    };
                    let id = record
                        .event_id
                        .clone()
                        .unwrap_or_else(|| format!("{}/{}/{}", at.timestamp(), event.action, user));
                    denials.entry(batch.id).or_default().push((id, event));
                }
            }
        }
        let conn = self.store.conn();
        let ledger = Ledger::new(&conn);
        for (batch, events) in denials {
            ledger.record_denials(batch, &events)?;
        }
        let horizon = now - chrono_of(self.config.guard.window);
        while self.cohort.front().is_some_and(|e| e.at < horizon) {
            self.cohort.pop_front();
        }
        Ok(())
    }

    fn cohort_rate(&self, now: DateTime<Utc>) -> CohortRate {
        let horizon = now - chrono_of(self.config.guard.window);
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
        let snapshot = self.ledger_snapshot()?;
        let commit = self.mode == Mode::Commit;
        for member in snapshot.members.values() {
            let in_group = members.contains(&member.user);
            match (member.state, in_group) {
                (UserState::Promoting, true) if commit => {
                    Ledger::new(&self.store.conn()).mark_locked(&member.user, "controller", now)?;
                }
                (UserState::Promoting, false) if commit => {
                    // Journaled but never written (or the write failed): finish it.
                    self.add_member(&group, &member.user, report, now).await?;
                }
                (UserState::Locked, false) => {
                    report.drift.push(format!("{} was removed from {group} by someone else", member.user));
                    if commit {
                        Ledger::new(&self.store.conn()).mark_removed_by_hand(&member.user, now)?;
                    }
                }
                (UserState::RollingBack, _) if commit => {
                    self.remove_member(&group, &member.user, in_group, report, now).await?;
                }
                (UserState::Held | UserState::RemovedByHand, true) => {
                    report.drift.push(format!(
                        "{} is {} but back in {group}; lockstep did not add them and leaves them alone",
                        member.user, member.state
                    ));
                }
                _ => {}
            }
        }
        for user in &members {
            let ours = snapshot.members.get(user).is_some_and(|m| m.state.wants_membership() || m.state == UserState::RollingBack);
            if !ours && !snapshot.members.contains_key(user) {
                report.drift.push(format!("{user} is in {group} but lockstep did not add them; left alone"));
            }
        }
        if commit {
            self.start_soaks(now)?;
        }
        for line in &report.drift {
            tracing::warn!(drift = %line, "reconcile");
        }
        Ok(())
    }

    async fn add_member(&self, group: &str, user: &str, report: &mut StepReport, now: DateTime<Utc>) -> Result<(), ControllerError> {
        match self.iam.add_to_group(group, user).await {
            Ok(()) => {
                failpoint("after-iam-write");
                report.iam_writes.push(format!("AddUserToGroup {group} {user}"));
                Ledger::new(&self.store.conn()).mark_locked(user, "controller", now)?;
            }
            Err(e) => report.errors.push(e.to_string()),
        }
        Ok(())
    }

    async fn remove_member(&self, group: &str, user: &str, in_group: bool, report: &mut StepReport, now: DateTime<Utc>) -> Result<(), ControllerError> {
        if in_group {
            if let Err(e) = self.iam.remove_from_group(group, user).await {
                // Rollbacks keep retrying, step after step, until the user is out.
                report.errors.push(e.to_string());
                return Ok(());
            }
            report.iam_writes.push(format!("RemoveUserFromGroup {group} {user}"));
        }
        Ledger::new(&self.store.conn()).mark_held(user, "controller", now)?;
        Ok(())
    }

    /// Batches whose members are all in the group start soaking.
    fn start_soaks(&self, now: DateTime<Utc>) -> Result<(), ControllerError> {
        let snapshot = self.ledger_snapshot()?;
        for batch in snapshot.batches.iter().filter(|b| b.state == BatchState::Applying) {
            let pending = batch
                .members
                .iter()
                .any(|u| snapshot.members.get(u).is_some_and(|m| m.state == UserState::Promoting && m.batch == Some(batch.id)));
            if !pending {
                let soak = self
                    .config
                    .waves
                    .iter()
                    .find(|w| w.name == batch.wave)
                    .map(|w| w.soak)
                    .unwrap_or(self.config.guard.window);
                Ledger::new(&self.store.conn()).start_soak(batch.id, now + chrono_of(soak), now)?;
            }
        }
        Ok(())
    }

    fn judge_batches(&self, snapshot: &Snapshot, now: DateTime<Utc>, record: bool) -> Result<BTreeMap<i64, guard::Verdict>, ControllerError> {
        let grace = chrono_of(self.config.guard.grace);
        let window = chrono_of(self.config.eligibility.window);
        let health: SourceHealth = Ledger::new(&self.store.conn()).source_health()?;
        let cohort = self.cohort_rate(now);
        let mut verdicts = BTreeMap::new();
        for batch in snapshot.batches.iter().filter(|b| is_watched(b.state, b.finished_at, grace, now)) {
            let Some(applied_at) = batch.applied_at else { continue };
            let before = self.store.user_evidence(applied_at - window, applied_at)?;
            let hours = (window.num_seconds() as f64 / 3600.0).max(1.0);
            let baselines = before
                .iter()
                .filter(|e| batch.members.contains(&e.user))
                .map(|e| (e.user.clone(), e.other_denials as f64 / hours))
                .collect();
            let events = Ledger::new(&self.store.conn()).denials(batch.id)?;
            let verdict = guard::judge(&guard::Input {
                batch,
                events: &events,
                baselines: &baselines,
                cohort,
                source: &health,
                config: &self.config.guard,
                now,
            });
            if record && batch.verdict.as_deref() != Some(verdict.summary().as_str()) {
                Ledger::new(&self.store.conn()).set_verdict(batch.id, &verdict.summary())?;
            }
            verdicts.insert(batch.id, verdict);
        }
        Ok(verdicts)
    }

    async fn directory(&mut self, now: DateTime<Utc>) -> Result<Vec<IamUser>, ControllerError> {
        if let Some((at, users)) = &self.directory {
            if now - *at < DIRECTORY_TTL {
                return Ok(users.clone());
            }
        }
        let users = self.iam.list_users().await?;
        self.directory = Some((now, users.clone()));
        Ok(users)
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

    async fn apply(&mut self, plan: &Plan, verdicts: &BTreeMap<i64, guard::Verdict>, report: &mut StepReport, now: DateTime<Utc>) -> Result<(), ControllerError> {
        let group = self.config.lockdown.group.clone();
        for action in &plan.actions {
            match action {
                Action::RollBack { batch, reason } => {
                    let offending = match verdicts.get(batch) {
                        Some(guard::Verdict::Spike { offending, .. }) => describe_calls(offending),
                        _ => String::new(),
                    };
                    let reason = format!("{reason}{offending}");
                    let hold_until = now + chrono_of(self.config.eligibility.hold_expiry);
                    let users = {
                        let conn = self.store.conn();
                        let ledger = Ledger::new(&conn);
                        let users = ledger.begin_rollback(*batch, "controller", &reason, hold_until, now)?;
                        if ledger.snapshot()?.paused.is_none() {
                            ledger.pause("controller", &format!("batch {batch} rolled back by the guard"), now)?;
                        }
                        users
                    };
                    tracing::warn!(batch, users = ?users, %reason, "rolling back batch");
                    for user in users {
                        self.remove_member(&group, &user, true, report, now).await?;
                    }
                }
                Action::Succeed { batch, detail } => {
                    Ledger::new(&self.store.conn()).succeed(*batch, detail, now)?;
                    tracing::info!(batch, %detail, "batch succeeded");
                }
                Action::FinishWave { wave, why } => {
                    Ledger::new(&self.store.conn()).finish_wave(wave, why, now)?;
                    tracing::info!(%wave, %why, "wave finished");
                }
                Action::StartBatch { wave, users } => {
                    let journal: Vec<(String, String)> = users.iter().map(|c| (c.user.clone(), c.why.clone())).collect();
                    let batch = Ledger::new(&self.store.conn()).start_batch(wave, &journal, "controller", now)?;
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

    /// Dry run: records what `--commit` would do, once per change of plan.
    fn record_dry_run(&mut self, plan: &Plan, report: &mut StepReport, now: DateTime<Utc>) -> Result<(), ControllerError> {
        let group = &self.config.lockdown.group;
        for action in &plan.actions {
            match action {
                Action::StartBatch { users, .. } => {
                    report.iam_writes.extend(users.iter().map(|c| format!("AddUserToGroup {group} {}", c.user)));
                }
                Action::RollBack { batch, .. } => {
                    if let Some(b) = self.ledger_snapshot()?.batch(*batch) {
                        report.iam_writes.extend(b.members.iter().map(|u| format!("RemoveUserFromGroup {group} {u}")));
                    }
                }
                _ => {}
            }
        }
        if self.last_dry_plan.as_ref() != Some(&plan.actions) {
            let ledger_conn = self.store.conn();
            let ledger = Ledger::new(&ledger_conn);
            for action in &plan.actions {
                let line = serde_json::to_string(action).unwrap_or_default();
                ledger.note(self.actor(), "would", None, None, &line, now)?;
            }
            self.last_dry_plan = Some(plan.actions.clone());
        }
        Ok(())
    }
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
fn is_watched(state: BatchState, finished_at: Option<DateTime<Utc>>, grace: chrono::Duration, now: DateTime<Utc>) -> bool {
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

fn chrono_of(d: std::time::Duration) -> chrono::Duration {
    chrono::Duration::from_std(d).unwrap_or(chrono::Duration::MAX)
}
