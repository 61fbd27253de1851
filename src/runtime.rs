//! The daemon's runtime, apart from HTTP: the step loop's state shared with the handlers, metrics
//! and notifications after each step, and operator commands.
//!
//! Operator commands change the ledger (each refused, unchanged, when it does not apply in the
//! current state) and wake the controller, whose next step carries out any IAM change.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use tokio::sync::{Mutex, Notify, RwLock};
use tracing::Instrument;

use crate::clock::Clock;
use crate::config::Config;
use crate::controller::{ControllerError, Mode, StepReport, Stepper};
use crate::evidence::Freshness;
use crate::guard::{Cause, Explanation, LockedUserReport, VerdictKind};
use crate::metrics::Metrics;
use crate::notify::{self, Webhook};
use crate::planner::{Gate, Plan};
use crate::rollout::{BatchState, Pause, Snapshot};
use crate::store::{Ledger, RollbackRequest, RolloutStore, StoreError};

/// A refresh run's identity in the run log: source, start and end (microseconds).
type RunKey = (String, i64, i64);

/// What the controller loop and the HTTP handlers share.
#[derive(Clone)]
pub struct Shared {
    inner: Arc<Inner>,
}

struct Inner {
    controller: Mutex<Box<dyn Stepper>>,
    metrics: Metrics,
    store: Arc<dyn RolloutStore>,
    config: Config,
    clock: Arc<dyn Clock>,
    mode: Mode,
    /// The last step's report without the plan's reason for every user (100,000 users are
    /// tens of megabytes a copy), and how many of those users were candidates.
    last_report: RwLock<Option<(StepReport, usize)>>,
    promote_now: AtomicBool,
    wake: Arc<Notify>,
    ready: AtomicBool,
    /// Why the account's last step failed, since its first failure in a row; `None` after a
    /// step that succeeded.
    blocked: RwLock<Option<Blocked>>,
    /// The account's batches of the last day (when, how many users), as of its last step: what
    /// the other accounts count against the organisation's daily cap.
    recent_batches: RwLock<Vec<(DateTime<Utc>, usize)>>,
    webhook: Option<Webhook>,
    /// When the daemon started (earlier refresh runs are not counted) and the runs counted since.
    runs_counted: Mutex<(DateTime<Utc>, HashSet<RunKey>)>,
}

/// An account whose controller step fails: it makes no progress, and says why, until a step
/// succeeds. Other accounts are not affected.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Blocked {
    /// The first failed step of the run of failures.
    pub since: DateTime<Utc>,
    /// The last failure's kind (the `kind` label of `lockstep_step_failures_total`).
    pub kind: String,
    /// The last failure, for people (a role that cannot be assumed says so, with STS's reason).
    pub reason: String,
}

impl Shared {
    /// The runtime around `controller`, publishing into `metrics`.
    pub fn new(controller: impl Stepper + 'static, metrics: Metrics) -> Shared {
        Shared::with_wake(controller, metrics, Arc::new(Notify::new()))
    }

    /// [`Shared::new`], woken by `wake` (one [`Notify`] shared by every account of a daemon, so
    /// an operator command for any of them wakes the step loop).
    pub fn with_wake(controller: impl Stepper + 'static, metrics: Metrics, wake: Arc<Notify>) -> Shared {
        let config = controller.config().clone();
        let store = controller.store().clone();
        let clock = controller.clock().clone();
        let started = clock.now();
        let mode = controller.mode();
        let recent = match store.snapshot() {
            Ok(snapshot) => recent_batches(&snapshot, started),
            Err(error) => {
                tracing::error!(%error, "cannot read the ledger's recent batches; the first step reads them");
                Vec::new()
            }
        };
        let webhook = config.listeners.webhook_url.as_deref().and_then(|url| match Webhook::new(url) {
            Ok(webhook) => Some(webhook.for_account(&config.account_id)),
            Err(error) => {
                tracing::error!(%error, "webhook notifications disabled");
                None
            }
        });
        Shared {
            inner: Arc::new(Inner {
                controller: Mutex::new(Box::new(controller)),
                metrics,
                store,
                config,
                clock,
                mode,
                last_report: RwLock::new(None),
                promote_now: AtomicBool::new(false),
                wake,
                ready: AtomicBool::new(false),
                blocked: RwLock::new(None),
                recent_batches: RwLock::new(recent),
                webhook,
                runs_counted: Mutex::new((started, HashSet::new())),
            }),
        }
    }

    /// Whether a controller step has completed.
    pub(crate) fn is_ready(&self) -> bool {
        self.inner.ready.load(Ordering::SeqCst)
    }

    /// What wakes the step loop (shared by every account of a daemon).
    pub(crate) fn wake_handle(&self) -> Arc<Notify> {
        self.inner.wake.clone()
    }

    /// The account this runtime rolls out.
    pub fn account(&self) -> &str {
        &self.inner.config.account_id
    }

    /// The account's configuration view.
    pub fn config(&self) -> &Config {
        &self.inner.config
    }

    /// The account's batches of the last day (when, how many users), as of its last step.
    pub async fn recent_batches(&self) -> Vec<(DateTime<Utc>, usize)> {
        self.inner.recent_batches.read().await.clone()
    }

    /// Tells the controller what the other accounts promoted lately (see
    /// [`Stepper::set_promotions_elsewhere`]).
    pub async fn set_promotions_elsewhere(&self, batches: Vec<(DateTime<Utc>, usize)>) {
        self.inner.controller.lock().await.set_promotions_elsewhere(batches);
    }

    /// Why the account is blocked, while its steps fail.
    pub async fn blocked(&self) -> Option<Blocked> {
        self.inner.blocked.read().await.clone()
    }

    /// The daemon's metrics.
    pub fn metrics(&self) -> &Metrics {
        &self.inner.metrics
    }

    /// Resolves when an operator command wants a step now.
    pub async fn woken(&self) {
        self.inner.wake.notified().await;
    }

    /// Runs one controller step in a `step` span and publishes its report and metrics. The span
    /// names the account, the batches active when the step began (those it watches and may roll
    /// back or succeed) and any batch it started.
    pub async fn step(&self) -> Result<StepReport, ControllerError> {
        let span = tracing::info_span!(
            "step",
            account = %self.inner.config.account_id,
            batches = tracing::field::Empty,
            started_batches = tracing::field::Empty,
        );
        let started = std::time::Instant::now();
        let result = self.publish_step().instrument(span).await;
        self.inner.metrics.observe_step_outcome(started.elapsed(), result.as_ref().err().map(ControllerError::kind));
        let mut blocked = self.inner.blocked.write().await;
        *blocked = match &result {
            Ok(_) => None,
            Err(error) => Some(Blocked {
                since: blocked.as_ref().map(|b| b.since).unwrap_or_else(|| self.inner.clock.now()),
                kind: error.kind().to_string(),
                reason: format!("{error:#}"),
            }),
        };
        self.inner.metrics.account_blocked.set(i64::from(blocked.is_some()));
        result
    }

    async fn publish_step(&self) -> Result<StepReport, ControllerError> {
        let promote_now = self.inner.promote_now.swap(false, Ordering::SeqCst);
        let mut controller = self.inner.controller.lock().await;
        let before = self.inner.store.snapshot()?;
        tracing::Span::current().record("batches", tracing::field::debug(before.active_batch_ids()));
        let mut report = controller.step(promote_now).await?;
        let snapshot = self.inner.store.snapshot()?;
        *self.inner.recent_batches.write().await = recent_batches(&snapshot, report.at);
        let new: Vec<i64> = snapshot.batches.iter().map(|b| b.id).filter(|id| before.batch(*id).is_none()).collect();
        if !new.is_empty() {
            tracing::Span::current().record("started_batches", tracing::field::debug(&new));
        }
        if let Some(webhook) = &self.inner.webhook {
            for event in notify::events(&report, &before) {
                webhook.send(event);
            }
        }
        let waves: Vec<String> = self.inner.config.waves.iter().map(|w| w.name.clone()).collect();
        let directory = report.plan.users.len();
        drop(controller);
        let metrics = &self.inner.metrics;
        metrics.observe_step(&report, &snapshot, directory, &waves);
        let (mut explicit, mut other) = (0, 0);
        for batch in report.verdicts.keys() {
            for denial in self.inner.store.denials(*batch)? {
                match denial.kind.cause {
                    Cause::Lockdown => explicit += 1,
                    Cause::Other | Cause::Unknown => other += 1,
                }
            }
        }
        metrics.observe_denials(explicit, other);
        let freshness = self.inner.store.freshness()?;
        if let Some(at) = freshness.last_success {
            metrics.refresh_last_success.set(at.timestamp() as f64);
        }
        self.count_refresh_runs().await?;
        log_report(&report);
        let mut last = self.inner.last_report.write().await;
        if last.as_ref().map(|(r, _)| &r.plan.gate) != Some(&report.plan.gate) {
            // The gate says whether the rollout can move; operators want to hear when that changes.
            tracing::info!(gate = %serde_json::to_string(&report.plan.gate).unwrap_or_default(), "rollout gate changed");
        }
        let candidates = candidates(&snapshot, &report);
        let users = std::mem::take(&mut report.plan.users);
        *last = Some((report.clone(), candidates));
        report.plan.users = users;
        drop(last);
        self.inner.ready.store(true, Ordering::SeqCst);
        Ok(report)
    }

    /// Counts refresh runs (scheduled or run by hand) that finished since the last step.
    async fn count_refresh_runs(&self) -> Result<(), ControllerError> {
        let mut counted = self.inner.runs_counted.lock().await;
        let (started, seen) = &mut *counted;
        let mut recent = HashSet::new();
        for run in self.inner.store.recent_runs(100)? {
            let Some(finished) = run.finished.filter(|f| f >= started) else { continue };
            let key = (run.source.clone(), run.started.timestamp_micros(), finished.timestamp_micros());
            if !seen.contains(&key) {
                self.inner.metrics.observe_refresh(&run);
            }
            recent.insert(key);
        }
        *seen = recent;
        Ok(())
    }

    /// What the next step would plan, without changing anything.
    pub async fn preview(&self) -> Result<Plan, ControllerError> {
        self.inner.controller.lock().await.preview().await
    }

    /// How long to really wait between steps (the clock may run faster than the wall).
    pub fn real_poll_interval(&self) -> std::time::Duration {
        self.inner.config.guard.poll
    }

    /// The rollout's status from the ledger and the last step.
    pub async fn status(&self) -> Result<Status, ControllerError> {
        let snapshot = self.inner.store.snapshot()?;
        let freshness = self.inner.store.freshness()?;
        let last = self.inner.last_report.read().await.clone();
        let last = last.as_ref().map(|(report, candidates)| (report, *candidates));
        let mut status = status(&snapshot, last, freshness, self.inner.mode, self.inner.clock.now());
        status.account = self.inner.config.account_id.clone();
        status.blocked = self.blocked().await;
        Ok(status)
    }

    /// Applies an operator command to the ledger, then wakes the controller.
    pub fn command(&self, command: &Command) -> Result<String, StoreError> {
        let now = self.inner.clock.now();
        let message = apply_command(self.inner.store.as_ref(), command, &self.inner.config, now)?;
        match command {
            Command::PromoteNext { .. } => self.inner.promote_now.store(true, Ordering::SeqCst),
            Command::Rollback { .. } => self.inner.metrics.rollbacks.with_label_values(&["manual"]).inc(),
            _ => {}
        }
        let event = match command {
            Command::Pause { operator, reason } => {
                Some(notify::Event::Pause { at: now, by: operator.clone(), reason: reason.clone() })
            }
            Command::Rollback { batch, reason, .. } => Some(notify::Event::Rollback {
                at: now,
                batch: *batch,
                users: Vec::new(),
                reason: reason.clone(),
                not_at_fault: Vec::new(),
                explanation: None,
            }),
            _ => None,
        };
        if let (Some(webhook), Some(event)) = (&self.inner.webhook, event) {
            webhook.send(event);
        }
        self.inner.wake.notify_one();
        Ok(message)
    }
}

/// The directory's users the ledger does not hold (nor found in the group unasked).
fn candidates(snapshot: &Snapshot, report: &StepReport) -> usize {
    report
        .plan
        .users
        .keys()
        .filter(|u| !snapshot.members.contains_key(*u) && !snapshot.foreign.contains_key(*u))
        .count()
}

/// The batches started in the day before `now`: when, and how many users.
fn recent_batches(snapshot: &Snapshot, now: DateTime<Utc>) -> Vec<(DateTime<Utc>, usize)> {
    let day_ago = crate::config::earlier(now, std::time::Duration::from_secs(86_400));
    snapshot.batches.iter().filter(|b| b.created_at >= day_ago).map(|b| (b.created_at, b.members.len())).collect()
}

fn log_report(report: &StepReport) {
    for write in &report.iam_writes {
        tracing::info!(mode = %report.mode, %write, "iam");
    }
    for error in &report.errors {
        tracing::warn!(%error, "step error; retried next step");
    }
    tracing::debug!(gate = ?report.plan.gate, waiting = ?report.plan.waiting, "step");
}

/// An operator command, as the admin API and the offline CLI take it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "kebab-case")]
pub enum Command {
    /// Stop starting batches.
    Pause {
        /// Who.
        operator: String,
        /// Why.
        reason: String,
    },
    /// Start batches again.
    Resume {
        /// Who.
        operator: String,
    },
    /// Roll a batch back: its members leave the group and are held.
    Rollback {
        /// Who.
        operator: String,
        /// The batch.
        batch: i64,
        /// Why.
        reason: String,
    },
    /// Keep a user out of the rollout until released.
    Hold {
        /// Who.
        operator: String,
        /// The user.
        user: String,
        /// Why.
        reason: String,
    },
    /// Make a held user a candidate again.
    Release {
        /// Who.
        operator: String,
        /// The user.
        user: String,
    },
    /// Start the next batch now, beyond the soaking-batch cap.
    PromoteNext {
        /// Who.
        operator: String,
    },
}

impl Command {
    /// Who gave the command, for the audit log.
    pub fn operator(&self) -> &str {
        match self {
            Command::Pause { operator, .. }
            | Command::Resume { operator }
            | Command::Rollback { operator, .. }
            | Command::Hold { operator, .. }
            | Command::Release { operator, .. }
            | Command::PromoteNext { operator } => operator,
        }
    }
}

/// The ledger side of an operator command: refused with a reason, or done with a message.
pub fn apply_command(
    ledger: &dyn Ledger,
    command: &Command,
    config: &Config,
    now: DateTime<Utc>,
) -> Result<String, StoreError> {
    let operator = command.operator();
    if operator.trim().is_empty() {
        return Err(StoreError::Refused("an operator name is required".to_string()));
    }
    match command {
        Command::Pause { reason, .. } => ledger.pause(operator, reason, now).map(|_| "rollout paused".to_string()),
        Command::Resume { .. } => ledger.resume(operator, now).map(|_| "rollout resumed".to_string()),
        Command::Rollback { batch, reason, .. } => {
            let hold_until = crate::config::later(now, config.eligibility.hold_expiry);
            let users = ledger.begin_rollback(
                &RollbackRequest { batch: *batch, actor: operator, reason, hold_until, pause: None, requeue: None },
                now,
            )?;
            Ok(format!(
                "batch {batch} rolled back; {} user(s) to be removed from the group and held: {}",
                users.len(),
                users.join(", ")
            ))
        }
        Command::Hold { user, reason, .. } => ledger.hold(user, operator, reason, now).map(|_| format!("{user} held")),
        Command::Release { user, .. } => ledger.release(user, operator, now).map(|_| format!("{user} released")),
        Command::PromoteNext { .. } => ledger
            .request_promotion(operator, now)
            .map(|_| "the next batch starts on the next step if eligible users remain".to_string()),
    }
}

/// One batch as `status` shows it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BatchView {
    /// The batch's ID.
    pub id: i64,
    /// Its wave.
    pub wave: String,
    /// Its state's name.
    pub state: String,
    /// Its users.
    pub members: Vec<String>,
    /// Seconds until the soak ends, while soaking.
    pub soak_remaining_seconds: Option<i64>,
    /// The guard's last verdict, for people.
    pub verdict: Option<String>,
    /// The verdict's kind (absent from daemons that predate it).
    #[serde(default)]
    pub verdict_kind: Option<VerdictKind>,
    /// Why the guard judged the batch as it did at the last step (per member counts per cause,
    /// expectation, threshold, samples, culprits and bystanders); absent when it was not judged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub explanation: Option<Explanation>,
}

/// The rollout at a glance: what `lockstep status` prints.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Status {
    /// The account (absent from daemons that predate accounts).
    #[serde(default)]
    pub account: String,
    /// Why the account's steps fail, while they do: it is blocked, others go on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blocked: Option<Blocked>,
    /// When the status was taken.
    pub at: DateTime<Utc>,
    /// `commit` or `dry-run`.
    pub mode: String,
    /// Why, by whom and since when the rollout is paused.
    pub paused: Option<Pause>,
    /// The planner's gate at the last step (`open`, `paused`, `inconclusive`, ...), with why.
    pub gate: Option<Gate>,
    /// The wave in progress.
    pub current_wave: Option<String>,
    /// Why nothing (more) happens right now.
    pub waiting: Vec<String>,
    /// The batches, oldest first.
    pub batches: Vec<BatchView>,
    /// How many users are in each state.
    pub users: BTreeMap<String, usize>,
    /// How current the evidence is.
    pub evidence: Freshness,
    /// When the last step ran.
    pub last_step: Option<DateTime<Utc>>,
    /// Locked users past their soak the lockdown denied in the last guard window, each with its
    /// recent denied calls and their sources (the protection figure: outside calls blocked).
    #[serde(default)]
    pub locked_denied: Vec<LockedUserReport>,
    /// The last step's forecast of the waves still to come (empty without one).
    #[serde(default)]
    pub forecast: crate::planner::Forecast,
}

/// The status from a ledger snapshot, the last step's report and its candidate count (if any), and
/// evidence freshness.
pub fn status(
    snapshot: &Snapshot,
    last: Option<(&StepReport, usize)>,
    evidence: Freshness,
    mode: Mode,
    now: DateTime<Utc>,
) -> Status {
    let mut users: BTreeMap<String, usize> = BTreeMap::new();
    for member in snapshot.members.values() {
        *users.entry(member.state.to_string()).or_default() += 1;
    }
    if !snapshot.foreign.is_empty() {
        users.insert("not_added_by_lockstep".to_string(), snapshot.foreign.len());
    }
    let report = last.map(|(report, _)| report);
    if let Some((_, candidates)) = last {
        users.insert("candidate".to_string(), candidates);
    }
    Status {
        account: String::new(),
        blocked: None,
        at: now,
        mode: mode.to_string(),
        paused: snapshot.paused.clone(),
        gate: report.map(|r| r.plan.gate.clone()),
        current_wave: report.and_then(|r| r.plan.current_wave.clone()),
        waiting: report.map(|r| r.plan.waiting.clone()).unwrap_or_default(),
        batches: snapshot
            .batches
            .iter()
            .map(|b| BatchView {
                id: b.id,
                wave: b.wave.clone(),
                state: b.state.to_string(),
                members: b.members.clone(),
                soak_remaining_seconds: (b.state == BatchState::Soaking)
                    .then(|| b.soak_until.map(|t| (t - now).num_seconds().max(0)))
                    .flatten(),
                verdict: b.verdict.clone(),
                verdict_kind: b.verdict_kind,
                explanation: report.and_then(|r| r.explanations.get(&b.id).cloned()),
            })
            .collect(),
        users,
        evidence,
        last_step: report.map(|r| r.at),
        locked_denied: report.map(|r| r.locked.reports.clone()).unwrap_or_default(),
        forecast: report.map(|r| r.plan.forecast.clone()).unwrap_or_default(),
    }
}
