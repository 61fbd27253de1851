//! Prometheus metrics: one registry with every series the daemon exports, named by Prometheus
//! conventions (`lockstep_` prefix, `_total` counters, `_seconds` durations). The dashboard in
//! `dashboards/` and the alert rules query only these names (a test checks that).

use prometheus::{
    Encoder, Gauge, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
    TextEncoder,
};

use crate::controller::{DriftKind, Mode, StepFailureKind, StepReport};
use crate::guard::{Cause, VerdictKind};
use crate::iam::{Directory, Iam, IamError, PolicyStatus};
use crate::planner::{Action, Gate};
use crate::rollout::{BatchState, Snapshot, UserState};
use crate::store::Run;

/// Every Prometheus series the daemon exports, in one registry.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    /// `lockstep_users`: users by ledger state.
    pub users: IntGaugeVec,
    /// `lockstep_batches`: batches by state.
    pub batches: IntGaugeVec,
    /// `lockstep_promotions_total`: users added to the lockdown group.
    pub promotions: IntCounter,
    /// `lockstep_rollbacks_total`: rollbacks, by reason.
    pub rollbacks: IntCounterVec,
    /// `lockstep_watched_batch_denials`: denials of watched batches' members, by batch.
    pub soaking_denials: IntGaugeVec,
    /// `lockstep_guard_verdicts_total`: guard verdicts, by kind.
    pub guard_verdicts: IntCounterVec,
    /// `lockstep_rollout_paused`: 1 while the rollout is paused.
    pub rollout_paused: IntGauge,
    /// `lockstep_gate`: 1 for the planner's current gate.
    pub gate: IntGaugeVec,
    /// `lockstep_current_wave`: 1 for the wave in progress.
    pub current_wave: IntGaugeVec,
    /// `lockstep_evidence_refresh_runs_total`: refresh runs, by source and outcome.
    pub refresh_runs: IntCounterVec,
    /// `lockstep_evidence_refresh_failures_total`: failed refresh runs.
    pub refresh_failures: IntCounter,
    /// `lockstep_evidence_refresh_duration_seconds`: refresh run time.
    pub refresh_duration: Histogram,
    /// `lockstep_evidence_last_success_timestamp_seconds`: when a refresh last succeeded.
    pub refresh_last_success: Gauge,
    /// `lockstep_evidence_records_read_total`: CloudTrail records read.
    pub records_read: IntCounter,
    /// `lockstep_evidence_records_skipped_total`: records that could not be used.
    pub records_skipped: IntCounter,
    /// `lockstep_athena_bytes_scanned_total`: what Athena billed for.
    pub athena_bytes_scanned: IntCounter,
    /// `lockstep_iam_calls_total`: IAM calls, by operation.
    pub iam_calls: IntCounterVec,
    /// `lockstep_iam_errors_total`: failed IAM calls, by operation and code.
    pub iam_errors: IntCounterVec,
    /// `lockstep_reconcile_drift_total`: differences reconcile found, by kind.
    pub reconcile_drift: IntCounterVec,
    /// `lockstep_controller_steps_total`: controller steps run.
    pub steps: IntCounter,
    /// `lockstep_future_events_total`: records dated after now, refused.
    pub future_events: IntCounter,
    /// `lockstep_step_duration_seconds`: how long steps take.
    pub step_duration: Histogram,
    /// `lockstep_step_failures_total`: failed steps, by error kind.
    pub step_failures: IntCounterVec,
    /// Denials of locked users after their soak, by cause (never by user: bounded cardinality).
    pub locked_user_denials: IntCounterVec,
    /// Locked users the lockdown policy denied in the last guard window.
    pub locked_users_denied: IntGauge,
    /// IAM calls the last read of the user directory made (one per page).
    pub directory_iam_calls: IntGauge,
    /// Exemptions ending within 7 days.
    pub exemptions_expiring_soon: IntGauge,
    /// 1 while the account's last step failed (its reason is in `status`): the account is
    /// blocked, and every other account goes on.
    pub account_blocked: IntGauge,
}

fn register<T: prometheus::core::Collector + Clone + 'static>(registry: &Registry, metric: T) -> T {
    // Names are fixed and unique below, so registration cannot collide.
    if let Err(error) = registry.register(Box::new(metric.clone())) {
        tracing::error!(%error, "metric registration failed");
    }
    metric
}

macro_rules! metric {
    ($registry:expr, IntGaugeVec, $name:literal, $help:literal, $labels:expr) => {
        register($registry, IntGaugeVec::new(Opts::new($name, $help), $labels).expect("valid metric"))
    };
    ($registry:expr, IntCounterVec, $name:literal, $help:literal, $labels:expr) => {
        register($registry, IntCounterVec::new(Opts::new($name, $help), $labels).expect("valid metric"))
    };
    ($registry:expr, $kind:ident, $name:literal, $help:literal) => {
        register($registry, $kind::new($name, $help).expect("valid metric"))
    };
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    /// A fresh registry with every series registered (known labels start at zero), without an
    /// `account` label: for the CLI's own IAM clients and tests.
    pub fn new() -> Metrics {
        Metrics::with_registry(Registry::new())
    }

    /// The series of one account's controller: every one carries `account="<id>"` (accounts
    /// are bounded by the configuration; users never become labels). The daemon renders every
    /// account's registry together ([`render_accounts`]).
    pub fn for_account(account: &str) -> Metrics {
        let labels = std::collections::HashMap::from([("account".to_string(), account.to_string())]);
        match Registry::new_custom(None, Some(labels)) {
            Ok(registry) => Metrics::with_registry(registry),
            Err(error) => {
                // Only an invalid label name fails here, and "account" is valid.
                tracing::error!(%error, "account metric label refused; exporting without it");
                Metrics::new()
            }
        }
    }

    fn with_registry(r: Registry) -> Metrics {
        let metrics = Metrics {
            users: metric!(
                &r,
                IntGaugeVec,
                "lockstep_users",
                "IAM users by rollout state (candidate = not in the ledger).",
                &["state"]
            ),
            batches: metric!(&r, IntGaugeVec, "lockstep_batches", "Batches by state.", &["state"]),
            promotions: metric!(
                &r,
                IntCounter,
                "lockstep_promotions_total",
                "Users journaled for promotion into the lockdown group."
            ),
            rollbacks: metric!(
                &r,
                IntCounterVec,
                "lockstep_rollbacks_total",
                "Batches rolled back, by reason (guard, manual).",
                &["reason"]
            ),
            soaking_denials: metric!(
                &r,
                IntGaugeVec,
                "lockstep_watched_batch_denials",
                "Denials recorded for members of batches the guard watches, by kind (explicit_identity_deny, other).",
                &["kind"]
            ),
            guard_verdicts: metric!(
                &r,
                IntCounterVec,
                "lockstep_guard_verdicts_total",
                "Guard verdicts on watched batches, by verdict.",
                &["verdict"]
            ),
            rollout_paused: metric!(&r, IntGauge, "lockstep_rollout_paused", "1 while the rollout is paused."),
            gate: metric!(
                &r,
                IntGaugeVec,
                "lockstep_gate",
                "1 for the planner's current gate (open, paused, inconclusive, blocked, finished).",
                &["gate"]
            ),
            current_wave: metric!(
                &r,
                IntGaugeVec,
                "lockstep_current_wave",
                "1 for the wave the rollout is in.",
                &["wave"]
            ),
            refresh_runs: metric!(
                &r,
                IntCounterVec,
                "lockstep_evidence_refresh_runs_total",
                "Evidence refresh runs, by source and outcome.",
                &["source", "status"]
            ),
            refresh_failures: metric!(
                &r,
                IntCounter,
                "lockstep_evidence_refresh_failures_total",
                "Evidence refresh runs that failed or timed out."
            ),
            refresh_duration: register(
                &r,
                Histogram::with_opts(
                    HistogramOpts::new("lockstep_evidence_refresh_duration_seconds", "Evidence refresh run time.")
                        .buckets(vec![0.1, 0.5, 1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 3600.0]),
                )
                .expect("valid metric"),
            ),
            refresh_last_success: metric!(
                &r,
                Gauge,
                "lockstep_evidence_last_success_timestamp_seconds",
                "Unix time of the last successful evidence refresh."
            ),
            records_read: metric!(
                &r,
                IntCounter,
                "lockstep_evidence_records_read_total",
                "CloudTrail records read by evidence refreshes."
            ),
            records_skipped: metric!(
                &r,
                IntCounter,
                "lockstep_evidence_records_skipped_total",
                "Malformed or unusable CloudTrail records skipped."
            ),
            athena_bytes_scanned: metric!(
                &r,
                IntCounter,
                "lockstep_athena_bytes_scanned_total",
                "Bytes scanned by Athena evidence queries."
            ),
            iam_calls: metric!(
                &r,
                IntCounterVec,
                "lockstep_iam_calls_total",
                "IAM API calls, by operation.",
                &["operation"]
            ),
            iam_errors: metric!(
                &r,
                IntCounterVec,
                "lockstep_iam_errors_total",
                "IAM API errors, by operation and error code.",
                &["operation", "code"]
            ),
            reconcile_drift: metric!(
                &r,
                IntCounterVec,
                "lockstep_reconcile_drift_total",
                "Differences between the ledger and the lockdown group found by reconcile.",
                &["kind"]
            ),
            steps: metric!(&r, IntCounter, "lockstep_controller_steps_total", "Controller steps run."),
            future_events: metric!(
                &r,
                IntCounter,
                "lockstep_future_events_total",
                "Trail records the guard's feed delivered dated after now (clamped to now: never trusted to prove the source alive)."
            ),
            step_duration: register(
                &r,
                Histogram::with_opts(
                    HistogramOpts::new(
                        "lockstep_step_duration_seconds",
                        "Controller step run time, failed steps included.",
                    )
                    .buckets(vec![0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0]),
                )
                .expect("valid metric"),
            ),
            step_failures: metric!(
                &r,
                IntCounterVec,
                "lockstep_step_failures_total",
                "Controller steps that failed, by error kind (store, store_too_new, store_corrupt, refused, iam).",
                &["kind"]
            ),
            locked_user_denials: metric!(
                &r,
                IntCounterVec,
                "lockstep_locked_user_denials_total",
                "Denials of locked users after their soak, by cause (lockdown, other, unknown).",
                &["cause"]
            ),
            locked_users_denied: metric!(
                &r,
                IntGauge,
                "lockstep_locked_users_denied",
                "Locked users the lockdown policy denied in the last guard window."
            ),
            directory_iam_calls: metric!(
                &r,
                IntGauge,
                "lockstep_directory_iam_calls",
                "IAM API calls the last read of the user directory made (one per page of up to 1,000 users)."
            ),
            exemptions_expiring_soon: metric!(
                &r,
                IntGauge,
                "lockstep_exemptions_expiring_soon",
                "Exemptions (the perimeter's exemption tag) that end within 7 days; review or extend them."
            ),
            account_blocked: metric!(
                &r,
                IntGauge,
                "lockstep_account_blocked",
                "1 while the account's last controller step failed (its reason is in status); other accounts go on"
            ),
            registry: r,
        };
        // Labelled series appear on first use; start the known ones at zero so that rate()
        // and increase() see their first event (and alerts on it fire).
        for reason in ["guard", "manual"] {
            metrics.rollbacks.with_label_values(&[reason]);
        }
        for kind in DriftKind::ALL {
            metrics.reconcile_drift.with_label_values(&[kind.as_str()]);
        }
        for verdict in VerdictKind::ALL {
            metrics.guard_verdicts.with_label_values(&[verdict.as_str()]);
        }
        for kind in StepFailureKind::ALL {
            metrics.step_failures.with_label_values(&[kind.as_str()]);
        }
        for cause in Cause::ALL {
            metrics.locked_user_denials.with_label_values(&[cause.as_str()]);
        }
        metrics
    }

    /// Every metric family name the daemon exports, whether or not it has samples yet.
    pub fn names(&self) -> Vec<String> {
        let collectors: [&dyn prometheus::core::Collector; 28] = [
            &self.users,
            &self.batches,
            &self.promotions,
            &self.rollbacks,
            &self.soaking_denials,
            &self.guard_verdicts,
            &self.rollout_paused,
            &self.gate,
            &self.current_wave,
            &self.refresh_runs,
            &self.refresh_failures,
            &self.refresh_duration,
            &self.refresh_last_success,
            &self.records_read,
            &self.records_skipped,
            &self.athena_bytes_scanned,
            &self.iam_calls,
            &self.iam_errors,
            &self.reconcile_drift,
            &self.steps,
            &self.future_events,
            &self.step_duration,
            &self.step_failures,
            &self.locked_user_denials,
            &self.locked_users_denied,
            &self.directory_iam_calls,
            &self.exemptions_expiring_soon,
            &self.account_blocked,
        ];
        let mut names: Vec<String> = collectors.iter().flat_map(|c| c.desc()).map(|d| d.fq_name.clone()).collect();
        names.sort();
        names.dedup();
        names
    }

    /// The Prometheus text exposition of every series.
    pub fn render(&self) -> String {
        render_accounts(std::slice::from_ref(self))
    }

    /// Updates the gauges from the ledger and counts what one step did.
    pub(crate) fn observe_step(
        &self,
        report: &StepReport,
        snapshot: &Snapshot,
        directory_size: usize,
        wave_names: &[String],
    ) {
        self.steps.inc();
        self.future_events.inc_by(report.future_events);
        self.exemptions_expiring_soon.set(report.exemptions_expiring_soon as i64);
        for state in UserState::ALL {
            let count = snapshot.members.values().filter(|m| m.state == *state).count();
            self.users.with_label_values(&[state.as_str()]).set(count as i64);
        }
        let candidates = directory_size.saturating_sub(snapshot.members.len());
        self.users.with_label_values(&["candidate"]).set(candidates as i64);
        for state in BatchState::ALL {
            let count = snapshot.batches.iter().filter(|b| b.state == *state).count();
            self.batches.with_label_values(&[state.as_str()]).set(count as i64);
        }
        self.rollout_paused.set(i64::from(snapshot.paused.is_some()));
        let gate = match &report.plan.gate {
            Gate::Open => "open",
            Gate::Paused(_) => "paused",
            Gate::Inconclusive(_) => "inconclusive",
            Gate::Blocked(_) => "blocked",
            Gate::Finished => "finished",
        };
        for name in ["open", "paused", "inconclusive", "blocked", "finished"] {
            self.gate.with_label_values(&[name]).set(i64::from(name == gate));
        }
        for wave in wave_names {
            let current = report.plan.current_wave.as_deref() == Some(wave.as_str());
            self.current_wave.with_label_values(&[wave]).set(i64::from(current));
        }
        for verdict in report.verdicts.values() {
            self.guard_verdicts.with_label_values(&[verdict.kind().as_str()]).inc();
        }
        if report.mode == Mode::Commit {
            for action in &report.plan.actions {
                match action {
                    Action::StartBatch { users, .. } => self.promotions.inc_by(users.len() as u64),
                    Action::RollBack { .. } => self.rollbacks.with_label_values(&["guard"]).inc(),
                    _ => {}
                }
            }
        }
        for drift in &report.drift {
            self.reconcile_drift.with_label_values(&[drift.kind.as_str()]).inc();
        }
        for (cause, count) in &report.locked_denials_new {
            self.locked_user_denials.with_label_values(&[cause.as_str()]).inc_by(*count);
        }
        self.locked_users_denied.set(report.locked.reports.len() as i64);
    }

    /// Counts one finished evidence refresh run.
    pub(crate) fn observe_refresh(&self, run: &Run) {
        self.refresh_runs.with_label_values(&[&run.source, &run.status]).inc();
        if run.status != "succeeded" {
            self.refresh_failures.inc();
        }
        if let Some(finished) = run.finished {
            self.refresh_duration.observe((finished - run.started).num_milliseconds().max(0) as f64 / 1000.0);
        }
        self.records_read.inc_by(run.counts.records_read);
        self.records_skipped.inc_by(run.counts.records_skipped);
        self.athena_bytes_scanned.inc_by(run.counts.bytes_scanned);
    }

    /// Times one controller step and, if it failed, counts it by kind.
    pub(crate) fn observe_step_outcome(&self, elapsed: std::time::Duration, failure: Option<StepFailureKind>) {
        self.step_duration.observe(elapsed.as_secs_f64());
        if let Some(kind) = failure {
            self.step_failures.with_label_values(&[kind.as_str()]).inc();
        }
    }

    pub(crate) fn observe_denials(&self, explicit: usize, other: usize) {
        self.soaking_denials.with_label_values(&["explicit_identity_deny"]).set(explicit as i64);
        self.soaking_denials.with_label_values(&["other"]).set(other as i64);
    }
}

/// An [`Iam`] that counts calls and errors by operation.
pub struct MeteredIam<I> {
    inner: I,
    metrics: Metrics,
}

impl<I> MeteredIam<I> {
    /// Counts the calls `inner` makes into `metrics`.
    pub fn new(inner: I, metrics: Metrics) -> Self {
        MeteredIam { inner, metrics }
    }

    fn count<T>(&self, operation: &str, result: Result<T, IamError>) -> Result<T, IamError> {
        self.metrics.iam_calls.with_label_values(&[operation]).inc();
        if let Err(e) = &result {
            self.metrics.iam_errors.with_label_values(&[e.operation, &e.code]).inc();
        }
        result
    }
}

impl<I: Iam> Iam for MeteredIam<I> {
    async fn list_users(&self) -> Result<Directory, IamError> {
        const OPERATION: &str = "GetAccountAuthorizationDetails";
        match self.inner.list_users().await {
            Ok(directory) => {
                self.metrics.iam_calls.with_label_values(&[OPERATION]).inc_by(directory.iam_calls);
                self.metrics.directory_iam_calls.set(directory.iam_calls as i64);
                Ok(directory)
            }
            failed => self.count(OPERATION, failed),
        }
    }
    async fn group_members(&self, group: &str) -> Result<Vec<String>, IamError> {
        self.count("GetGroup", self.inner.group_members(group).await)
    }
    async fn add_to_group(&self, group: &str, user: &str) -> Result<(), IamError> {
        self.count("AddUserToGroup", self.inner.add_to_group(group, user).await)
    }
    async fn remove_from_group(&self, group: &str, user: &str) -> Result<(), IamError> {
        self.count("RemoveUserFromGroup", self.inner.remove_from_group(group, user).await)
    }
    async fn policy_status(&self, group: &str, policy: &str, document: &str) -> Result<PolicyStatus, IamError> {
        self.count("GetPolicy", self.inner.policy_status(group, policy, document).await)
    }
    async fn apply_policy(&self, group: &str, policy: &str, document: &str) -> Result<Vec<String>, IamError> {
        self.count("ApplyPolicy", self.inner.apply_policy(group, policy, document).await)
    }
    async fn tag_user(&self, user: &str, tags: &[(String, String)]) -> Result<(), IamError> {
        self.count("TagUser", self.inner.tag_user(user, tags).await)
    }
    async fn untag_user(&self, user: &str, keys: &[String]) -> Result<(), IamError> {
        self.count("UntagUser", self.inner.untag_user(user, keys).await)
    }
}

/// The Prometheus text exposition of several accounts' series: each family once, with every
/// account's samples (the exposition format allows one `# TYPE` line per name).
pub fn render_accounts(accounts: &[Metrics]) -> String {
    let mut families: Vec<prometheus::proto::MetricFamily> = Vec::new();
    let mut index: std::collections::HashMap<String, usize> = std::collections::HashMap::new();
    for metrics in accounts {
        for mut family in metrics.registry.gather() {
            match index.get(family.name()) {
                Some(&at) => families[at].mut_metric().extend(family.take_metric()),
                None => {
                    index.insert(family.name().to_string(), families.len());
                    families.push(family);
                }
            }
        }
    }
    let mut out = Vec::new();
    if let Err(error) = TextEncoder::new().encode(&families, &mut out) {
        tracing::error!(%error, "metrics encoding failed");
    }
    String::from_utf8(out).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_series_follows_the_naming_conventions() {
        let metrics = Metrics::new();
        let names = metrics.names();
        assert_eq!(names.len(), 28, "{names:?}");
        assert!(names.iter().all(|n| n.starts_with("lockstep_")), "{names:?}");
        metrics.rollbacks.with_label_values(&["manual"]).inc();
        metrics.iam_errors.with_label_values(&["GetGroup", "Throttling"]).inc();
        for family in metrics.registry.gather() {
            let name = family.name();
            assert!(names.contains(&name.to_string()), "{name} is registered but not listed");
            let counter = family.get_field_type() == prometheus::proto::MetricType::COUNTER;
            assert_eq!(counter, name.ends_with("_total"), "{name}: counters and only counters end in _total");
        }
        let text = metrics.render();
        assert!(text.contains("lockstep_rollbacks_total{reason=\"manual\"} 1"), "{text}");
    }

    #[test]
    fn every_account_series_is_rendered_once_per_family_with_its_account() {
        let (main, payments) = (Metrics::for_account("123456789012"), Metrics::for_account("111122223333"));
        main.promotions.inc_by(3);
        payments.account_blocked.set(1);
        let text = render_accounts(&[main, payments]);
        assert_eq!(text.matches("# TYPE lockstep_promotions_total counter").count(), 1, "{text}");
        assert!(text.contains("lockstep_promotions_total{account=\"123456789012\"} 3"), "{text}");
        assert!(text.contains("lockstep_promotions_total{account=\"111122223333\"} 0"), "{text}");
        assert!(text.contains("lockstep_account_blocked{account=\"111122223333\"} 1"), "{text}");
        assert!(text.contains("lockstep_rollbacks_total{reason=\"manual\",account=\"123456789012\"} 0"), "{text}");
    }

    #[test]
    fn steps_are_timed_and_failures_counted_by_the_error_kind() {
        use crate::controller::ControllerError;
        use crate::store::StoreError;
        let metrics = Metrics::new();
        let throttled = IamError { operation: "GetGroup", code: "Throttling".into(), message: "slow down".into() };
        let too_new = StoreError::TooNew { found: 99, known: 1 };
        metrics
            .observe_step_outcome(std::time::Duration::from_millis(250), Some(ControllerError::from(throttled).kind()));
        metrics.observe_step_outcome(std::time::Duration::from_millis(20), Some(ControllerError::from(too_new).kind()));
        metrics.observe_step_outcome(std::time::Duration::from_millis(50), None);
        let text = metrics.render();
        for line in [
            "lockstep_step_failures_total{kind=\"iam\"} 1",
            "lockstep_step_failures_total{kind=\"store_too_new\"} 1",
            "lockstep_step_failures_total{kind=\"store\"} 0",
            "lockstep_step_duration_seconds_count 3",
            "lockstep_step_duration_seconds_bucket{le=\"0.05\"} 2",
        ] {
            assert!(text.contains(line), "{line} missing from\n{text}");
        }
    }
}
