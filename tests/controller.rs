//! Scenario tests for the controller against moto's IAM and generated trail files, in virtual
//! time: each asserts on real group membership (read back from the emulator) and on the ledger.
//!
//! Every scenario builds its own world: IAM users and a lockdown group named after the test (the
//! emulator is shared by the binary), a trail folder, a store, and a manual clock. Users call
//! from a trusted CIDR every few minutes; scenarios add what they are about.

mod common;
mod faults;

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;

use aws_config::SdkConfig;
use chrono::{DateTime, TimeZone, Utc};
use lockstep::clock::{Clock, ManualClock};
use lockstep::config::Config;
use lockstep::controller::{Controller, DriftKind, Mode, StepReport};
use lockstep::evidence::EvidenceStore;
use lockstep::evidence::files::Folder;
use lockstep::evidence::refresh::{self, Source};
use lockstep::feed::TrailFeed;
use lockstep::iam::{AwsIam, Directory, Iam, IamError, PolicyStatus};
use lockstep::planner::{Action, Gate};
use lockstep::rollout::{BatchState, Snapshot, UserState};
use lockstep::store::{Ledger, RollbackRequest, Store};

/// Alice's rollback of batch 1.
fn rollback(reason: &str, hold_until: chrono::DateTime<chrono::Utc>) -> RollbackRequest<'_> {
    RollbackRequest { batch: 1, actor: "alice", reason, hold_until, pause: None, requeue: None }
}
use lockstep_synth::{Faults, Identity, Origin, RecordSpec, write_trail};

const TRUSTED_IP: &str = "203.0.113.20";
const UNTRUSTED_IP: &str = "198.51.100.77";

fn t0() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 3, 10, 0, 0, 0).unwrap()
}

fn config_text(prefix: &str, dir: &Path) -> String {
    format!(
        r#"
account_id: "{account}"
region: us-east-1
lockdown: {{group: {prefix}-lockdown, policy_name: {prefix}-perimeter}}
perimeter:
  trusted_vpcs: [vpc-0a1b2c3d]
  trusted_vpc_endpoints: {{vpce-0123456789abcdef0: vpc-0a1b2c3d}}
  trusted_cidrs: [203.0.113.0/24]
  exempt_tag_key: lockstep-exempt
evidence:
  source: files
  files: {{path: "{dir}/trail"}}
  lookback: 10d
  overlap: 1h
eligibility:
  window: 7d
  min_history: 3d
  min_calls: 10
  quiet_for: 2d
  max_evidence_age: 3h
  hold_expiry: 7d
  exclude_users: [{prefix}-excluded]
waves:
  - {{name: canary, batch_size: 2, soak: 6h, batches: 1}}
  - {{name: rest, batch_size: 3, soak: 6h}}
rollout: {{max_promotions_per_day: 50, max_soaking_batches: 1}}
guard: {{source: files, poll: 10m, grace: 1h, window: 30m, min_affected_users: 1, min_denials: 3, silence_limit: 1h}}
store: {{path: "{dir}/lockstep.db"}}
"#,
        account = common::ACCOUNT,
        dir = dir.display()
    )
}

/// How each user behaves in the background.
#[derive(Clone, Copy, PartialEq)]
enum Habit {
    /// A call from the trusted CIDR every 10 minutes.
    Trusted,
    /// Like `Trusted`, plus a generic "no identity-based policy allows" denial every 10 minutes.
    TrustedWithDenials,
    /// Like `Trusted`, plus S3's bare "Access Denied" every 10 minutes on a record without a
    /// source address: a denial nothing attributes (cause `unknown`).
    TrustedWithBareDenials,
    /// Calls from an untrusted address now and then: never eligible.
    Outside,
    /// Silent.
    Quiet,
}

struct World {
    prefix: String,
    _dir: tempfile::TempDir,
    root: std::path::PathBuf,
    clock: Arc<ManualClock>,
    config: Config,
    store: Arc<Store>,
    sdk: SdkConfig,
    client: aws_sdk_iam::Client,
    habits: Vec<(String, Habit)>,
    controller: Controller<AwsIam, TrailFeed<Folder>>,
    last_refresh: DateTime<Utc>,
    /// Trail records are written up to here.
    written_until: DateTime<Utc>,
}

impl World {
    /// Users get `<prefix>-<name>`; history of `history` days of their habits ends at `t0()`.
    async fn new(prefix: &str, users: &[(&str, Habit)], history_days: i64) -> World {
        World::with_config(prefix, users, history_days, str::to_string).await
    }

    /// Like [`World::new`], with the configuration text edited by `edit`.
    async fn with_config(
        prefix: &str,
        users: &[(&str, Habit)],
        history_days: i64,
        edit: impl Fn(&str) -> String,
    ) -> World {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().to_path_buf();
        let config = Config::parse(&edit(&config_text(prefix, &root)), Path::new("test.yaml")).unwrap();
        let sdk = common::lockstep_sdk(&common::endpoint()).await;
        let client = aws_sdk_iam::Client::new(&sdk);
        let mut habits = Vec::new();
        for (name, habit) in users {
            let user = format!("{prefix}-{name}");
            client.create_user().user_name(&user).path("/engineering/").send().await.unwrap();
            habits.push((user, *habit));
        }
        let iam = AwsIam::new(&sdk, common::ACCOUNT);
        let document = config.perimeter.policy().to_json().unwrap();
        iam.apply_policy(&config.lockdown.group, &config.lockdown.policy_name, &document).await.unwrap();
        let clock = Arc::new(ManualClock::new(t0()));
        let store = Arc::new(Store::open(&config.store.path).unwrap());
        let controller = controller(&config, &store, &clock, iam, Mode::Commit);
        let mut world = World {
            prefix: prefix.to_string(),
            _dir: dir,
            root,
            clock,
            config,
            store,
            sdk,
            client,
            habits,
            controller,
            last_refresh: t0(),
            written_until: t0() - chrono::Duration::days(history_days),
        };
        world.write_habits_until(t0());
        world.refresh().await;
        world
    }

    fn user(&self, name: &str) -> String {
        format!("{}-{name}", self.prefix)
    }

    fn identity(&self, user: &str) -> Identity {
        Identity::iam_user(common::ACCOUNT, user)
    }

    fn write(&self, records: &[RecordSpec]) {
        write_trail(&self.root.join("trail"), common::ACCOUNT, records, Faults::default()).unwrap();
    }

    /// Background traffic for `(written_until, until]`, every 10 minutes.
    fn write_habits_until(&mut self, until: DateTime<Utc>) {
        let mut records = Vec::new();
        let mut at = self.written_until + chrono::Duration::minutes(10);
        while at <= until {
            for (user, habit) in &self.habits {
                let call = |ip: &str| RecordSpec::new(self.identity(user), at, "ec2:DescribeInstances", Origin::ip(ip));
                match habit {
                    Habit::Trusted => records.push(call(TRUSTED_IP)),
                    Habit::TrustedWithDenials => {
                        records.push(call(TRUSTED_IP));
                        records.push(
                            RecordSpec::new(
                                self.identity(user),
                                at + chrono::Duration::minutes(1),
                                "iam:ListRoles",
                                Origin::ip(TRUSTED_IP),
                            )
                            .denied_no_allow(),
                        );
                    }
                    Habit::TrustedWithBareDenials => {
                        records.push(call(TRUSTED_IP));
                        records.push(bare_denial(self.identity(user), at + chrono::Duration::minutes(1)));
                    }
                    Habit::Outside => {
                        records.push(call(if at.timestamp() % 7200 == 0 { UNTRUSTED_IP } else { TRUSTED_IP }))
                    }
                    Habit::Quiet => {}
                }
            }
            at += chrono::Duration::minutes(10);
        }
        self.written_until = until;
        self.write(&records);
    }

    async fn refresh(&mut self) {
        let source = Source::Folder(Arc::new(Folder::new(&self.config.evidence.files_path)));
        let freshness = self.store.freshness().unwrap();
        let window = refresh::scheduled_window(&freshness, self.clock.now(), &self.config.evidence);
        refresh::refresh(&*self.store, &source, &self.config, window, self.clock.as_ref(), None, &mut |_| {})
            .await
            .unwrap();
        self.last_refresh = self.clock.now();
    }

    /// Moves time on by `by`: writes the habits' traffic, refreshes evidence hourly, steps.
    async fn advance(&mut self, by: chrono::Duration, traffic: bool) -> StepReport {
        self.pass(by, traffic).await;
        self.step().await
    }

    /// Moves time on by `by`: writes the habits' traffic (when `traffic`), refreshes evidence
    /// hourly; steps nothing.
    async fn pass(&mut self, by: chrono::Duration, traffic: bool) {
        let until = self.clock.now() + by;
        if traffic {
            self.write_habits_until(until);
        } else {
            self.written_until = until;
        }
        self.clock.set(until);
        if until - self.last_refresh >= chrono::Duration::hours(1) {
            self.refresh().await;
        }
    }

    async fn step(&mut self) -> StepReport {
        let report = self.controller.step(false).await.unwrap();
        assert!(report.errors.is_empty(), "step errors: {:?}", report.errors);
        report
    }

    async fn group(&self) -> BTreeSet<String> {
        let iam = AwsIam::new(&self.sdk, common::ACCOUNT);
        iam.group_members(&self.config.lockdown.group).await.unwrap().into_iter().collect()
    }

    fn ledger(&self) -> Snapshot {
        self.store.snapshot().unwrap()
    }

    fn users_in(&self, state: UserState) -> BTreeSet<String> {
        self.ledger().members.values().filter(|m| m.state == state).map(|m| m.user.clone()).collect()
    }

    fn audit_actions(&self, user: &str) -> Vec<String> {
        self.store
            .audit_log(10_000)
            .unwrap()
            .into_iter()
            .filter(|e| e.user.as_deref() == Some(user))
            .map(|e| e.action)
            .collect()
    }

    fn restart_with<I: Iam + 'static>(&self, iam: I, mode: Mode) -> Controller<I, TrailFeed<Folder>> {
        let store = Arc::new(Store::open(&self.config.store.path).unwrap());
        controller(&self.config, &store, &self.clock, iam, mode)
    }

    /// `count` calls by `user` from an untrusted network over the next minutes, each denied by
    /// the lockdown policy.
    fn lockdown_denials(&self, user: &str, count: i64) -> Vec<RecordSpec> {
        let now = self.clock.now();
        (1..=count)
            .map(|m| {
                RecordSpec::new(
                    self.identity(user),
                    now + chrono::Duration::minutes(m),
                    "s3:PutObject",
                    Origin::ip(UNTRUSTED_IP),
                )
                .denied_explicitly(&self.config.lockdown.policy_name)
            })
            .collect()
    }

    fn names(&self, names: &[&str]) -> BTreeSet<String> {
        names.iter().map(|n| self.user(n)).collect()
    }
}

fn controller<I: Iam>(
    config: &Config,
    store: &Arc<Store>,
    clock: &Arc<ManualClock>,
    iam: I,
    mode: Mode,
) -> Controller<I, TrailFeed<Folder>> {
    let clock: Arc<dyn Clock> = clock.clone();
    let folder = Arc::new(Folder::new(&config.evidence.files_path));
    let feed = TrailFeed::new(folder, &config.account_id, clock.clone(), config.guard.window + config.guard.grace);
    Controller::new(config.clone(), store.clone(), iam, feed, clock, mode)
}

/// S3's bare "Access Denied" (no cause stated) on a record without a source address: neither the
/// message nor the classifier can say what denied it.
fn bare_denial(identity: Identity, at: DateTime<Utc>) -> RecordSpec {
    RecordSpec::new(identity, at, "s3:GetObject", Origin::ip("")).error("AccessDenied", "Access Denied")
}

fn started_batch(report: &StepReport) -> Option<Vec<String>> {
    report.plan.actions.iter().find_map(|a| match a {
        Action::StartBatch { users, .. } => Some(users.iter().map(|c| c.user.clone()).collect()),
        _ => None,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clean_rollout_locks_every_eligible_user_and_nobody_else() {
    let mut world = World::new(
        "clean",
        &[
            ("ann", Habit::Trusted),
            ("ben", Habit::Trusted),
            ("cat", Habit::Trusted),
            ("dan", Habit::Trusted),
            ("eve", Habit::Trusted),
            ("fay", Habit::Outside),
            ("gus", Habit::Trusted),
            ("excluded", Habit::Trusted),
            ("quiet", Habit::Quiet),
        ],
        8,
    )
    .await;
    // gus is exempt by tag; hal was put in the group by hand before lockstep ran.
    world
        .client
        .tag_user()
        .user_name(world.user("gus"))
        .tags(aws_sdk_iam::types::Tag::builder().key("lockstep-exempt").value("true").build().unwrap())
        .send()
        .await
        .unwrap();
    world.client.create_user().user_name(world.user("hal")).send().await.unwrap();
    world
        .client
        .add_user_to_group()
        .group_name(&world.config.lockdown.group)
        .user_name(world.user("hal"))
        .send()
        .await
        .unwrap();

    let mut finished = false;
    for _ in 0..24 * 4 {
        let report = world.advance(chrono::Duration::minutes(30), true).await;
        assert!(
            !report.plan.actions.iter().any(|a| matches!(a, Action::RollBack { .. })),
            "no rollback in a clean rollout: {:?}",
            report.plan.actions
        );
        if report.plan.gate == Gate::Finished {
            finished = true;
            break;
        }
    }
    assert!(finished, "rollout did not finish: {:?}", world.ledger());
    let eligible = world.names(&["ann", "ben", "cat", "dan", "eve"]);
    let mut expected_group = eligible.clone();
    expected_group.insert(world.user("hal"));
    assert_eq!(
        world.group().await,
        expected_group,
        "the group holds every eligible user, plus the hand-added one left alone"
    );
    assert_eq!(world.users_in(UserState::Locked), eligible);
    let ledger = world.ledger();
    assert!(ledger.batches.iter().all(|b| b.state == BatchState::Succeeded), "{:?}", ledger.batches);
    assert_eq!(ledger.batches[0].members.len(), 2, "canary batch size");
    assert!(ledger.waves_done.contains_key("canary"));
    assert!(!ledger.waves_done.contains_key("rest"), "the last wave stays open for users who become eligible later");
    for user in &eligible {
        assert_eq!(world.audit_actions(user), ["promote", "locked"], "{user}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn denials_after_promotion_roll_the_batch_back_within_one_poll() {
    let mut world =
        World::new("spike", &[("ann", Habit::Trusted), ("ben", Habit::Trusted), ("cat", Habit::Trusted)], 8).await;
    let report = world.advance(chrono::Duration::minutes(10), true).await;
    let batch = started_batch(&report).expect("canary batch started");
    assert_eq!(world.group().await, batch.iter().cloned().collect());
    world.advance(chrono::Duration::minutes(30), true).await;

    // One member starts working from an untrusted network: the lockdown policy denies it.
    let culprit = batch[0].clone();
    world.write(&world.lockdown_denials(&culprit, 4));
    let report = world.advance(chrono::Duration::minutes(10), true).await;
    assert!(
        report.plan.actions.iter().any(|a| matches!(a, Action::RollBack { .. })),
        "rollback within one poll: {:?} {:?}",
        report.plan.actions,
        report.verdicts
    );
    assert!(world.group().await.is_empty(), "every member of the batch is out of the group");
    let held = world.users_in(UserState::Held);
    assert_eq!(held, batch.iter().cloned().collect::<BTreeSet<_>>());
    let ledger = world.ledger();
    assert!(ledger.paused.is_none(), "a spike fully attributed to a named culprit needs no operator pause");
    assert_eq!(ledger.batches[0].state, BatchState::RolledBack);
    let reason = ledger.members[&culprit].reason.clone().unwrap_or_default();
    assert!(
        reason.contains("spike") && reason.contains("s3:PutObject"),
        "hold reason names the offending calls: {reason}"
    );

    // The culprit stays held and out of the group, hours later, while the rollout goes on.
    for _ in 0..6 {
        let report = world.advance(chrono::Duration::hours(1), true).await;
        assert!(!matches!(report.plan.gate, Gate::Paused(_)), "{:?}", report.plan.gate);
        assert!(!world.group().await.contains(&culprit));
    }
    assert_eq!(world.ledger().members[&culprit].state, UserState::Held);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn background_denials_and_an_incident_for_everyone_cause_no_rollback() {
    let users: Vec<(&str, Habit)> =
        ["ann", "ben", "cat", "dan", "eve", "fay"].iter().map(|n| (*n, Habit::TrustedWithDenials)).collect();
    let mut world = World::new("noise", &users, 8).await;
    let report = world.advance(chrono::Duration::minutes(10), true).await;
    let batch = started_batch(&report).expect("canary batch started");
    world.advance(chrono::Duration::hours(1), true).await;

    // An incident: everyone, promoted or not, gets a burst of generic denials.
    let now = world.clock.now();
    let mut incident = Vec::new();
    for (user, _) in &world.habits {
        for s in 0..8 {
            incident.push(
                RecordSpec::new(
                    world.identity(user),
                    now + chrono::Duration::seconds(30 + s * 40),
                    "dynamodb:Scan",
                    Origin::ip(TRUSTED_IP),
                )
                .denied_no_allow(),
            );
        }
    }
    world.write(&incident);
    let mut rolled_back = false;
    let mut done = false;
    for _ in 0..24 * 3 {
        let report = world.advance(chrono::Duration::minutes(20), true).await;
        rolled_back |= report.plan.actions.iter().any(|a| matches!(a, Action::RollBack { .. }));
        if report.plan.gate == Gate::Finished {
            done = true;
            break;
        }
    }
    assert!(!rolled_back, "no rollback: {:?}", world.ledger().batches);
    assert!(done, "rollout completed: {:?}", world.ledger().batches);
    assert!(world.group().await.is_superset(&batch.iter().cloned().collect()));
    assert_eq!(world.group().await.len(), 6);
    let guard_saw_denials = world.store.denials(1).unwrap();
    assert!(guard_saw_denials.len() > 8, "the guard did see the canary's denials: {}", guard_saw_denials.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_event_source_is_inconclusive_and_nothing_succeeds() {
    let mut world =
        World::new("silent", &[("ann", Habit::Trusted), ("ben", Habit::Trusted), ("cat", Habit::Trusted)], 8).await;
    let report = world.advance(chrono::Duration::minutes(10), true).await;
    assert!(started_batch(&report).is_some());
    // The trail stops arriving. Evidence refreshes still succeed (there is just nothing new).
    let mut last = None;
    for _ in 0..10 {
        last = Some(world.advance(chrono::Duration::hours(1), false).await);
    }
    let report = last.unwrap();
    assert!(matches!(&report.plan.gate, Gate::Inconclusive(why) if why.contains("silent")), "{:?}", report.plan.gate);
    assert!(report.verdicts.values().all(|v| v.name() == "inconclusive"), "{:?}", report.verdicts);
    let ledger = world.ledger();
    assert_eq!(ledger.batches.len(), 1, "no further batch");
    assert_eq!(ledger.batches[0].state, BatchState::Soaking, "soak is long over but the batch cannot succeed");
    assert!(ledger.batches[0].verdict.as_deref().unwrap_or("").contains("silent"));
    // Traffic returns: the batch succeeds and the rollout moves on.
    let report = world.advance(chrono::Duration::minutes(10), true).await;
    assert!(report.plan.actions.iter().any(|a| matches!(a, Action::Succeed { batch: 1, .. })), "{:?}", report.plan);
}

/// An IAM that fails at a chosen point of `add_to_group`, as a crash there would leave things.
struct CrashingIam {
    inner: AwsIam,
    write_before_failing: bool,
}

impl Iam for CrashingIam {
    async fn list_users(&self) -> Result<Directory, IamError> {
        self.inner.list_users().await
    }
    async fn group_members(&self, group: &str) -> Result<Vec<String>, IamError> {
        self.inner.group_members(group).await
    }
    async fn add_to_group(&self, group: &str, user: &str) -> Result<(), IamError> {
        if self.write_before_failing {
            self.inner.add_to_group(group, user).await?;
        }
        Err(IamError { operation: "AddUserToGroup", code: "Crash".into(), message: "the process died here".into() })
    }
    async fn remove_from_group(&self, group: &str, user: &str) -> Result<(), IamError> {
        self.inner.remove_from_group(group, user).await
    }
    async fn policy_status(&self, group: &str, policy: &str, document: &str) -> Result<PolicyStatus, IamError> {
        self.inner.policy_status(group, policy, document).await
    }
    async fn apply_policy(&self, group: &str, policy: &str, document: &str) -> Result<Vec<String>, IamError> {
        self.inner.apply_policy(group, policy, document).await
    }
    async fn tag_user(&self, user: &str, tags: &[(String, String)]) -> Result<(), IamError> {
        self.inner.tag_user(user, tags).await
    }
    async fn untag_user(&self, user: &str, keys: &[String]) -> Result<(), IamError> {
        self.inner.untag_user(user, keys).await
    }
}

async fn crash_and_restart(prefix: &str, write_before_failing: bool) {
    let mut world = World::new(prefix, &[("ann", Habit::Trusted), ("ben", Habit::Trusted)], 8).await;
    let iam = CrashingIam { inner: AwsIam::new(&world.sdk, common::ACCOUNT), write_before_failing };
    let mut crashing = world.restart_with(iam, Mode::Commit);
    world.clock.advance(chrono::Duration::minutes(10));
    let report = crashing.step(false).await.unwrap();
    let batch = started_batch(&report).expect("a batch was journaled");
    drop(crashing);
    assert_eq!(world.users_in(UserState::Promoting), batch.iter().cloned().collect(), "intent is journaled");
    let in_group_after_crash = world.group().await;
    assert_eq!(in_group_after_crash.is_empty(), !write_before_failing);

    // Restart with a healthy IAM: reconcile finishes the promotion.
    world.controller = world.restart_with(AwsIam::new(&world.sdk, common::ACCOUNT), Mode::Commit);
    let report = world.advance(chrono::Duration::minutes(10), true).await;
    let expected_writes = if write_before_failing { 0 } else { batch.len() };
    assert_eq!(report.iam_writes.len(), expected_writes, "{:?}", report.iam_writes);
    assert_eq!(started_batch(&report), None, "nobody promoted twice");
    assert_eq!(world.group().await, batch.iter().cloned().collect());
    assert_eq!(world.users_in(UserState::Locked), batch.iter().cloned().collect());
    let ledger = world.ledger();
    assert_eq!(ledger.batches.len(), 1);
    assert_eq!(ledger.batches[0].state, BatchState::Soaking);
    for user in &batch {
        assert_eq!(world.audit_actions(user), ["promote", "locked"], "audit complete for {user}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_between_journal_and_iam_write_is_finished_on_restart() {
    crash_and_restart("crash-before", false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_between_iam_write_and_ledger_update_is_recorded_on_restart() {
    crash_and_restart("crash-after", true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dry_run_writes_nothing_and_plans_exactly_what_commit_does() {
    let mut world =
        World::new("dry", &[("ann", Habit::Trusted), ("ben", Habit::Trusted), ("cat", Habit::Trusted)], 8).await;
    world.clock.advance(chrono::Duration::minutes(10));
    let mut dry = world.restart_with(AwsIam::new(&world.sdk, common::ACCOUNT), Mode::DryRun);
    let report = dry.step(false).await.unwrap();
    let planned = started_batch(&report).expect("a plan");
    assert_eq!(
        report.iam_writes,
        planned.iter().map(|u| format!("AddUserToGroup {}-lockdown {u}", world.prefix)).collect::<Vec<_>>()
    );
    // A second dry step shows the same and still writes nothing.
    let again = dry.step(false).await.unwrap();
    assert_eq!(started_batch(&again), Some(planned.clone()));
    assert!(world.group().await.is_empty(), "dry run wrote nothing to IAM");
    let ledger = world.ledger();
    assert!(ledger.batches.is_empty() && ledger.members.is_empty(), "dry run changed no rollout state");
    let notes = world.store.audit_log(100).unwrap();
    assert_eq!(notes.iter().filter(|e| e.actor == "dry-run").count(), 1, "the plan is recorded once: {notes:?}");

    let report = world.step().await;
    assert_eq!(started_batch(&report), Some(planned.clone()));
    assert_eq!(world.group().await, planned.into_iter().collect());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_or_drifted_policy_blocks_promotions() {
    let mut world = World::new("drift", &[("ann", Habit::Trusted), ("ben", Habit::Trusted)], 8).await;
    let arn = format!("arn:aws:iam::{}:policy/{}", common::ACCOUNT, world.config.lockdown.policy_name);
    world.client.detach_group_policy().group_name(&world.config.lockdown.group).policy_arn(&arn).send().await.unwrap();
    let report = world.advance(chrono::Duration::minutes(10), true).await;
    assert!(matches!(&report.plan.gate, Gate::Blocked(why) if why.contains("not attached")), "{:?}", report.plan.gate);
    assert_eq!(started_batch(&report), None);
    assert!(world.group().await.is_empty());

    let iam = AwsIam::new(&world.sdk, common::ACCOUNT);
    let (group, policy) = (&world.config.lockdown.group, &world.config.lockdown.policy_name);
    let changes = iam.apply_policy(group, policy, &world.config.perimeter.policy().to_json().unwrap()).await.unwrap();
    assert_eq!(changes, [format!("attached {arn} to group {group}")]);
    // A different document is drift, and apply makes it the default version again.
    let mut looser = world.config.perimeter.clone();
    looser.trusted_cidrs.push("0.0.0.0/0".parse().unwrap());
    iam.apply_policy(group, policy, &looser.policy().to_json().unwrap()).await.unwrap();
    let status = iam.policy_status(group, policy, &world.config.perimeter.policy().to_json().unwrap()).await.unwrap();
    assert!(matches!(status, PolicyStatus::Drifted { .. }), "{status:?}");
    iam.apply_policy(group, policy, &world.config.perimeter.policy().to_json().unwrap()).await.unwrap();
    let report = world.advance(chrono::Duration::minutes(10), true).await;
    assert!(started_batch(&report).is_some(), "{:?}", report.plan.gate);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn throttled_iam_calls_are_retried_and_paging_reads_every_member() {
    let proxy = faults::Proxy::start(&common::endpoint(), faults::Fault::Throttle { times: 3 }).await;
    let throttled = common::lockstep_sdk(&proxy.url()).await;
    let group = "throttle-lockdown";
    // Set up directly against moto, then read through the throttling proxy.
    let direct = aws_sdk_iam::Client::new(&common::lockstep_sdk(&common::endpoint()).await);
    direct.create_group().group_name(group).send().await.unwrap();
    for i in 0..5 {
        let user = format!("throttle-u{i}");
        direct.create_user().user_name(&user).send().await.unwrap();
        direct.add_user_to_group().group_name(group).user_name(&user).send().await.unwrap();
    }
    let members = AwsIam::new(&throttled, common::ACCOUNT).group_members(group).await.unwrap();
    assert_eq!(members.len(), 5);
    assert_eq!(proxy.faults_served(), 3, "three throttled answers were retried through");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_rollback_of_a_succeeded_batch_removes_and_holds_its_members() {
    let mut world =
        World::new("manual", &[("ann", Habit::Trusted), ("ben", Habit::Trusted), ("cat", Habit::Trusted)], 8).await;
    world.advance(chrono::Duration::minutes(10), true).await;
    for _ in 0..14 {
        world.advance(chrono::Duration::minutes(30), true).await;
    }
    assert_eq!(world.ledger().batches[0].state, BatchState::Succeeded);
    let now = world.clock.now();
    let users =
        world.store.begin_rollback(&rollback("customer escalation", now + chrono::Duration::days(7)), now).unwrap();
    assert_eq!(users.len(), 2);
    world.advance(chrono::Duration::minutes(10), true).await;
    for user in &users {
        assert!(!world.group().await.contains(user));
        assert_eq!(world.ledger().members[user].state, UserState::Held);
        assert_eq!(world.audit_actions(user), ["promote", "locked", "rolling_back", "held"]);
    }
    let refused = world.store.begin_rollback(&rollback("again", now), now).unwrap_err();
    assert!(refused.to_string().contains("already rolled back"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_removed_by_hand_is_recorded_and_not_re_added() {
    let mut world =
        World::new("by-hand", &[("ann", Habit::Trusted), ("ben", Habit::Trusted), ("cat", Habit::Trusted)], 8).await;
    let report = world.advance(chrono::Duration::minutes(10), true).await;
    let batch = started_batch(&report).expect("canary batch");
    let removed = batch[0].clone();
    world
        .client
        .remove_user_from_group()
        .group_name(&world.config.lockdown.group)
        .user_name(&removed)
        .send()
        .await
        .unwrap();
    let report = world.advance(chrono::Duration::minutes(10), true).await;
    assert!(report.drift.iter().any(|d| d.user == removed && d.kind == DriftKind::RemovedByHand), "{:?}", report.drift);
    assert_eq!(world.ledger().members[&removed].state, UserState::RemovedByHand);
    for _ in 0..30 {
        world.advance(chrono::Duration::hours(1), true).await;
    }
    assert!(!world.group().await.contains(&removed), "never re-added without an operator");
    assert!(matches!(&world.controller.preview().await.unwrap().users[&removed],
        lockstep::planner::Eligibility::Ineligible(why) if why.contains("removed from the group by hand")));
    // An operator releases the user: eligible again, and promoted by a later batch.
    let now = world.clock.now();
    world.store.release(&removed, "ops", now).unwrap();
    for _ in 0..24 {
        world.advance(chrono::Duration::hours(1), true).await;
    }
    assert!(world.group().await.contains(&removed), "promoted again after the release");
    assert_eq!(world.audit_actions(&removed), ["promote", "locked", "removed_by_hand", "release", "promote", "locked"]);
}

/// Scenario (e): a batch of 6 where one member misbehaves: all 6 leave the group, only the
/// culprit is held, and the 5 bystanders are promoted again after the cool-down (one soak).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spike_holds_only_the_culprit_and_requeues_the_bystanders() {
    let names = ["ann", "ben", "cat", "dan", "eve", "fay"];
    let users: Vec<(&str, Habit)> = names.iter().map(|n| (*n, Habit::Trusted)).collect();
    let mut world = World::with_config("bystand", &users, 8, |text| {
        text.replace("batch_size: 2", "batch_size: 6").replace("batch_size: 3", "batch_size: 6")
    })
    .await;
    let report = world.advance(chrono::Duration::minutes(10), true).await;
    let batch = started_batch(&report).expect("batch started");
    assert_eq!(batch.len(), 6);
    world.advance(chrono::Duration::minutes(30), true).await;

    let culprit = batch[0].clone();
    world.write(&world.lockdown_denials(&culprit, 4));
    let report = world.advance(chrono::Duration::minutes(10), true).await;
    assert!(report.plan.actions.iter().any(|a| matches!(a, Action::RollBack { .. })), "{:?}", report.verdicts);
    let explanation = &report.explanations[&world.ledger().batches[0].id];
    assert_eq!(explanation.culprits.iter().map(|c| c.user.clone()).collect::<Vec<_>>(), std::slice::from_ref(&culprit));
    assert!(world.group().await.is_empty(), "the whole batch leaves the group");

    let ledger = world.ledger();
    let bystanders: BTreeSet<String> = batch[1..].iter().cloned().collect();
    let culprit_hold = ledger.members[&culprit].hold_until.unwrap();
    assert!(culprit_hold - world.clock.now() >= chrono::Duration::days(6), "the culprit is held for hold_expiry");
    assert!(ledger.members[&culprit].reason.as_deref().unwrap_or_default().contains("s3:PutObject"));
    for user in &bystanders {
        let member = &ledger.members[user];
        assert_eq!(
            member.reason.as_deref(),
            Some(format!("rolled back with batch {}, not at fault", ledger.batches[0].id).as_str())
        );
        assert!(
            member.hold_until.unwrap() - world.clock.now() <= chrono::Duration::hours(6),
            "requeued after one soak"
        );
        assert!(world.audit_actions(user).iter().any(|a| a == "rolling_back"));
    }

    // Fully attributed to the culprit: the rollout is not paused, so no operator is needed.
    // After the cool-down the bystanders are promoted again by themselves, the culprit never.
    assert!(ledger.paused.is_none(), "no pause: {:?}", ledger.paused);
    for _ in 0..12 {
        world.advance(chrono::Duration::hours(1), true).await;
    }
    let group = world.group().await;
    assert_eq!(group, bystanders, "the 5 bystanders are back in the group, the culprit is not");
    assert_eq!(world.ledger().members[&culprit].state, UserState::Held);
}

/// Scenario (f): an explicit identity-based deny from another policy, for calls the perimeter
/// allows (trusted address): counted as `other`, never a spike.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_explicit_deny_from_another_policy_is_not_a_spike() {
    let mut world = World::new("otherdeny", &[("ann", Habit::Trusted), ("ben", Habit::Trusted)], 8).await;
    let report = world.advance(chrono::Duration::minutes(10), true).await;
    let batch = started_batch(&report).expect("canary batch started");
    world.advance(chrono::Duration::minutes(30), true).await;

    let now = world.clock.now();
    let denied: Vec<RecordSpec> = batch
        .iter()
        .flat_map(|user| (1..=5).map(move |m| (user.clone(), m)))
        .map(|(user, m)| {
            RecordSpec::new(
                world.identity(&user),
                now + chrono::Duration::minutes(m),
                "s3:PutObject",
                Origin::ip(TRUSTED_IP),
            )
            .denied_explicitly("team-data-guardrail")
        })
        .collect();
    world.write(&denied);
    let report = world.advance(chrono::Duration::minutes(10), true).await;
    assert!(!report.plan.actions.iter().any(|a| matches!(a, Action::RollBack { .. })), "{:?}", report.verdicts);
    let id = world.ledger().batches[0].id;
    let explanation = &report.explanations[&id];
    assert!(explanation.culprits.is_empty(), "{explanation:?}");
    assert_eq!(explanation.members.iter().map(|m| m.other).sum::<u64>(), 10, "counted as other: {explanation:?}");
    assert_eq!(world.group().await, batch.iter().cloned().collect());
    assert!(world.users_in(UserState::Held).is_empty());
}

/// Ownership is a fact: users put in the group by hand (before lockstep ran, or back after a
/// rollback) are recorded once, never planned, and left in the group by the guard's rollback and
/// an operator's rollback through the daemon's command path.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_added_by_hand_are_never_planned_rolled_back_or_removed() {
    let users = [
        ("ann", Habit::Trusted),
        ("ben", Habit::Trusted),
        ("cat", Habit::Trusted),
        ("dan", Habit::Trusted),
        ("eve", Habit::Trusted),
    ];
    let mut world = World::new("owned", &users, 8).await;
    let (client, group) = (world.client.clone(), world.config.lockdown.group.clone());
    let add_by_hand = |user: String| {
        let request = client.add_user_to_group().group_name(&group).user_name(user);
        async move { request.send().await.unwrap() }
    };
    // ben is eligible like the others, but an operator put him in the group first.
    let ben = world.user("ben");
    add_by_hand(ben.clone()).await;
    let mut ben_reported = 0;
    let report = world.advance(chrono::Duration::minutes(10), true).await;
    ben_reported += report.drift.iter().filter(|d| d.user == ben && d.kind == DriftKind::NotAddedByLockstep).count();
    let first = started_batch(&report).expect("canary batch");
    assert!(!first.contains(&ben), "{first:?}");
    assert!(
        matches!(&report.plan.users[&ben], lockstep::planner::Eligibility::Ineligible(why) if why.contains("someone else"))
    );

    // Batch 1 soaks and succeeds; batch 2 starts in the next wave, still without ben.
    let mut second = None;
    for _ in 0..30 {
        let report = world.advance(chrono::Duration::minutes(30), true).await;
        ben_reported += report.drift.iter().filter(|d| d.user == ben).count();
        if let Some(batch) = started_batch(&report) {
            second = Some(batch);
            break;
        }
    }
    let second = second.expect("a second batch");
    assert!(!second.contains(&ben), "{second:?}");
    assert_eq!(ben_reported, 1, "reported once, not every step");

    // An operator rollback of batch 1 through the daemon's command path.
    let command =
        lockstep::runtime::Command::Rollback { operator: "alice".into(), batch: 1, reason: "escalation".into() };
    lockstep::runtime::apply_command(world.store.as_ref(), &command, &world.config, world.clock.now()).unwrap();
    world.advance(chrono::Duration::minutes(10), true).await;
    for user in &first {
        assert_eq!(world.ledger().members[user].state, UserState::Held, "{user}");
    }
    // One of them is put back by hand: recorded, and from now on left alone too.
    add_by_hand(first[0].clone()).await;
    let report = world.advance(chrono::Duration::minutes(10), true).await;
    assert!(
        report.drift.iter().any(|d| d.user == first[0] && d.kind == DriftKind::BackInGroupWhileHeld),
        "{:?}",
        report.drift
    );

    // The guard rolls batch 2 back on a spike of its first member's denials.
    let now = world.clock.now();
    let denied: Vec<RecordSpec> = (1..=4)
        .map(|m| {
            RecordSpec::new(
                world.identity(&second[0]),
                now + chrono::Duration::minutes(m),
                "s3:PutObject",
                Origin::ip(UNTRUSTED_IP),
            )
            .denied_explicitly(&world.config.lockdown.policy_name)
        })
        .collect();
    world.write(&denied);
    let report = world.advance(chrono::Duration::minutes(10), true).await;
    assert!(
        report.plan.actions.iter().any(|a| matches!(a, Action::RollBack { batch: 2, .. })),
        "{:?}",
        report.plan.actions
    );
    assert!(report.drift.is_empty(), "nothing new to report: {:?}", report.drift);
    assert_eq!(
        world.group().await,
        [ben.clone(), first[0].clone()].into_iter().collect(),
        "only the hand-added members remain"
    );
    let ledger = world.ledger();
    assert!(ledger.batches.iter().all(|b| !b.members.contains(&ben)), "never planned");
    assert_eq!(
        ledger.foreign.keys().cloned().collect::<BTreeSet<_>>(),
        [ben.clone(), first[0].clone()].into_iter().collect()
    );
    assert_eq!(world.audit_actions(&ben), ["foreign"]);
    assert_eq!(world.audit_actions(&first[0]), ["promote", "locked", "rolling_back", "held", "foreign"]);
}

/// A record dated 2099 in the trail folder: counted, but no sign of life; a high-water mark
/// stored in the future (by an older lockstep) is clamped on read; deleting the file leaves
/// nothing behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_future_dated_record_never_makes_a_silent_source_healthy() {
    let mut world =
        World::new("future", &[("ann", Habit::Trusted), ("ben", Habit::Trusted), ("cat", Habit::Trusted)], 8).await;
    let report = world.advance(chrono::Duration::minutes(10), true).await;
    assert!(started_batch(&report).is_some());
    for _ in 0..3 {
        world.advance(chrono::Duration::hours(1), false).await;
    }
    let silent = |report: &StepReport| matches!(&report.plan.gate, Gate::Inconclusive(why) if why.contains("silent"));
    let report = world.step().await;
    assert!(silent(&report), "{:?}", report.plan.gate);

    // Someone drops a record dated 2099 into today's folder.
    let far = Utc.with_ymd_and_hms(2099, 1, 1, 0, 0, 0).unwrap();
    let before: BTreeSet<_> = walk(&world.root.join("trail"));
    let forged = RecordSpec::new(world.identity(&world.user("ann")), far, "s3:ListBuckets", Origin::ip(TRUSTED_IP));
    write_trail(&world.root.join("trail"), common::ACCOUNT, &[forged], Faults::default()).unwrap();
    let forged_files: Vec<_> = walk(&world.root.join("trail")).difference(&before).cloned().collect();
    assert!(!forged_files.is_empty());
    // Its day folder is in 2099, out of the feed's window: put it where the feed looks today.
    let today = world.root.join("trail").join(format!(
        "AWSLogs/{}/CloudTrail/us-east-1/{}",
        common::ACCOUNT,
        world.clock.now().format("%Y/%m/%d")
    ));
    std::fs::create_dir_all(&today).unwrap();
    let planted = today.join("123456789012_CloudTrail_us-east-1_20990101T0000Z_forged.json.gz");
    std::fs::rename(&forged_files[0], &planted).unwrap();
    let report = world.advance(chrono::Duration::minutes(10), false).await;
    assert_eq!(report.future_events, 1, "the forged record was read and counted");
    assert!(silent(&report), "still silent: {:?}", report.plan.gate);
    assert!(world.store.source_health().unwrap().last_event_at.unwrap() <= world.clock.now());

    // A future high-water mark stored earlier (by an older lockstep) is not trusted on read.
    let mut health = world.store.source_health().unwrap();
    health.last_event_at = Some(far);
    world.store.set_source_health(&health).unwrap();
    std::fs::remove_file(&planted).unwrap();
    let report = world.advance(chrono::Duration::minutes(10), false).await;
    assert_eq!(report.future_events, 0);
    assert!(matches!(&report.plan.gate, Gate::Inconclusive(_)), "{:?}", report.plan.gate);
    assert_eq!(world.store.source_health().unwrap().last_event_at, None, "the stored future mark is dropped");
    // Traffic returns: healthy again, nothing lasting from the forged file.
    let report = world.advance(chrono::Duration::minutes(10), true).await;
    assert!(!matches!(&report.plan.gate, Gate::Inconclusive(_)), "{:?}", report.plan.gate);
}

fn walk(dir: &Path) -> BTreeSet<std::path::PathBuf> {
    let mut files = BTreeSet::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(dir) = pending.pop() {
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.is_dir() {
                pending.push(path)
            } else {
                files.insert(path);
            }
        }
    }
    files
}

/// Steps until the first batch has succeeded (its soak and the delivery lag over); returns its
/// members.
async fn first_batch_succeeds(world: &mut World) -> Vec<String> {
    let report = world.advance(chrono::Duration::minutes(10), true).await;
    let batch = started_batch(&report).expect("canary batch started");
    for _ in 0..30 {
        let report = world.advance(chrono::Duration::minutes(30), true).await;
        assert!(!report.plan.actions.iter().any(|a| matches!(a, Action::RollBack { .. })), "{:?}", report.verdicts);
        if world.ledger().batches[0].state == BatchState::Succeeded {
            return batch;
        }
    }
    panic!("the first batch never succeeded: {:?}", world.ledger().batches);
}

/// Steps on until the guard no longer watches the succeeded batch (`guard.grace` is 1h): from
/// then on only the watch over locked users sees its members.
async fn past_grace(world: &mut World) {
    for _ in 0..7 {
        world.advance(chrono::Duration::minutes(10), true).await;
    }
}

/// Whether the step rolled a batch back.
fn rolls_back(report: &StepReport) -> bool {
    report.plan.actions.iter().any(|a| matches!(a, Action::RollBack { .. }))
}

/// `count` generic "no identity-based policy allows" denials of `user`, evenly over `(from, until]`.
fn generic_denials(
    world: &World,
    user: &str,
    from: DateTime<Utc>,
    until: DateTime<Utc>,
    count: i64,
) -> Vec<RecordSpec> {
    let step = (until - from) / count.max(1) as i32;
    (1..=count)
        .map(|i| {
            RecordSpec::new(world.identity(user), from + step * i as i32, "dynamodb:Scan", Origin::ip(TRUSTED_IP))
                .denied_no_allow()
        })
        .collect()
}

/// Scenario (a): an incident at soak start gives every user, promoted or not, a burst of
/// "no identity-based policy allows" denials within five seconds. Nobody is rolled back: the
/// batch succeeds and stays in the group, and the guard counted the burst as `other`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scenario_a_an_incident_at_soak_start_rolls_nobody_back() {
    let names = ["ann", "ben", "cat", "dan", "eve", "fay"];
    let users: Vec<(&str, Habit)> = names.iter().map(|n| (*n, Habit::Trusted)).collect();
    let mut world = World::new("incident", &users, 8).await;
    let report = world.advance(chrono::Duration::minutes(10), true).await;
    let batch = started_batch(&report).expect("canary batch started");
    assert_eq!(world.ledger().batches[0].state, BatchState::Soaking, "the soak has just started");

    let now = world.clock.now();
    let incident: Vec<RecordSpec> = world
        .habits
        .iter()
        .flat_map(|(user, _)| (0..5).map(move |s| (user.clone(), s)))
        .map(|(user, s)| {
            RecordSpec::new(
                world.identity(&user),
                now + chrono::Duration::seconds(s),
                "dynamodb:Scan",
                Origin::ip(TRUSTED_IP),
            )
            .denied_no_allow()
        })
        .collect();
    world.write(&incident);
    let report = world.advance(chrono::Duration::minutes(10), true).await;
    let explanation = &report.explanations[&world.ledger().batches[0].id];
    assert_eq!(explanation.members.iter().map(|m| m.other).sum::<u64>(), 10, "counted as other: {explanation:?}");
    assert_eq!(explanation.weighted_denials, 0);
    assert!(!rolls_back(&report));

    for _ in 0..30 {
        let report = world.advance(chrono::Duration::minutes(30), true).await;
        assert!(!rolls_back(&report), "{:?}", report.verdicts);
        if world.ledger().batches[0].state == BatchState::Succeeded {
            break;
        }
    }
    let ledger = world.ledger();
    assert_eq!(ledger.batches[0].state, BatchState::Succeeded, "{:?}", ledger.batches);
    assert!(world.group().await.is_superset(&batch.iter().cloned().collect()));
    assert!(world.users_in(UserState::Held).is_empty());
    for user in &batch {
        assert_eq!(ledger.members[user].state, UserState::Locked);
    }
}

/// Scenario (b): a member with 60 generic denials a minute, before and after promotion, is not
/// rolled back: the batch succeeds with both members in the group.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scenario_b_a_member_with_steady_generic_denials_is_not_rolled_back() {
    let mut world = World::with_config("noisy", &[("ann", Habit::Trusted), ("ben", Habit::Trusted)], 8, |text| {
        text.replace("soak: 6h", "soak: 1h")
    })
    .await;
    let noisy = world.user("ann");
    // The hour before promotion, at 60 a minute.
    let now = world.clock.now();
    world.write(&generic_denials(&world, &noisy, now - chrono::Duration::hours(1), now, 3_600));
    let mut batch = None;
    let mut explanations = Vec::new();
    for _ in 0..12 {
        let now = world.clock.now();
        let by = chrono::Duration::minutes(10);
        world.write(&generic_denials(&world, &noisy, now, now + by, 600));
        let report = world.advance(by, true).await;
        assert!(!rolls_back(&report), "{:?}", report.verdicts);
        batch = batch.or_else(|| started_batch(&report));
        explanations.extend(report.explanations.into_values());
        if world.ledger().batches.first().is_some_and(|b| b.state == BatchState::Succeeded) {
            break;
        }
    }
    let batch = batch.expect("batch started");
    assert!(batch.contains(&noisy), "{batch:?}");
    let ledger = world.ledger();
    assert_eq!(ledger.batches[0].state, BatchState::Succeeded, "{:?}", ledger.batches);
    assert_eq!(world.group().await, batch.iter().cloned().collect());
    let seen: u64 =
        explanations.iter().flat_map(|e| &e.members).filter(|m| m.user == noisy).map(|m| m.other).max().unwrap();
    assert!(seen >= 600, "the guard saw the member's denials as other: {seen}");
}

/// Scenario (c): bare "Access Denied" with no source (cause `unknown`) at a member's usual rate
/// is no spike; at ten times that rate it is, and since nothing attributes it the rollout pauses.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scenario_c_bare_access_denied_spikes_only_well_above_the_members_rate() {
    // Records without a source count as outside calls for eligibility: relaxed here so that the
    // member is promoted at all (eligibility is not what this scenario is about).
    let relaxed = |text: &str| {
        text.replace("quiet_for: 2d", "quiet_for: 1m")
            .replace("min_calls: 10", "min_calls: 10\n  max_would_deny: 1000000")
    };
    let users = [("ann", Habit::TrustedWithBareDenials), ("ben", Habit::Trusted)];

    // At the usual rate (one every 10 minutes, as in the 8 days before): the batch succeeds.
    let mut usual = World::with_config("bareusual", &users, 8, relaxed).await;
    let batch = first_batch_succeeds(&mut usual).await;
    assert!(batch.contains(&usual.user("ann")), "{batch:?}");
    assert_eq!(usual.group().await, batch.iter().cloned().collect());

    // Ten times the rate after promotion: a spike on the member, and a pause for an operator.
    let mut loud = World::with_config("bareloud", &users, 8, relaxed).await;
    let report = loud.advance(chrono::Duration::minutes(10), true).await;
    let batch = started_batch(&report).expect("canary batch started");
    let member = loud.user("ann");
    let mut spiked = None;
    for _ in 0..6 {
        let now = loud.clock.now();
        let extra: Vec<RecordSpec> =
            (1..=9).map(|s| bare_denial(loud.identity(&member), now + chrono::Duration::seconds(60 * s))).collect();
        loud.write(&extra);
        let report = loud.advance(chrono::Duration::minutes(10), true).await;
        if rolls_back(&report) {
            spiked = Some(report);
            break;
        }
    }
    let report = spiked.expect("a spike at ten times the member's rate");
    let explanation = &report.explanations[&loud.ledger().batches[0].id];
    assert_eq!(explanation.culprits.iter().map(|c| c.user.as_str()).collect::<Vec<_>>(), [member.as_str()]);
    let counts = explanation.members.iter().find(|m| m.user == member).unwrap();
    assert!(counts.unknown > counts.unknown_allowance && counts.lockdown == 0, "{counts:?}");
    assert!(loud.group().await.is_empty(), "the batch leaves the group");
    let ledger = loud.ledger();
    assert_eq!(ledger.members[&member].state, UserState::Held);
    assert!(ledger.paused.is_some(), "an unknown-cause spike waits for an operator");
    let bystander = batch.iter().find(|u| **u != member).unwrap();
    assert_eq!(
        ledger.members[bystander].reason.as_deref(),
        Some(format!("rolled back with batch {}, not at fault", ledger.batches[0].id).as_str())
    );
}

/// A webhook receiver on 127.0.0.1: collects every POST body it is sent.
struct Receiver {
    url: String,
    bodies: Arc<std::sync::Mutex<Vec<String>>>,
}

impl Receiver {
    async fn start() -> Receiver {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/hook", listener.local_addr().unwrap());
        let bodies = Arc::new(std::sync::Mutex::new(Vec::new()));
        let received = bodies.clone();
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                let received = received.clone();
                tokio::spawn(async move {
                    let mut raw = Vec::new();
                    let mut chunk = [0u8; 8192];
                    loop {
                        let text = String::from_utf8_lossy(&raw).into_owned();
                        if let Some((head, body)) = text.split_once("\r\n\r\n") {
                            let length = head
                                .lines()
                                .find_map(|l| {
                                    l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().to_string())
                                })
                                .and_then(|v| v.parse::<usize>().ok())
                                .unwrap_or(0);
                            if body.len() >= length {
                                received.lock().unwrap().push(body.to_string());
                                break;
                            }
                        }
                        match socket.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => raw.extend_from_slice(&chunk[..n]),
                        }
                    }
                    let _ = socket.write_all(b"HTTP/1.1 204 No Content\r\ncontent-length: 0\r\n\r\n").await;
                });
            }
        });
        Receiver { url, bodies }
    }

    /// The bodies received so far that contain `needle`, waiting up to 10 s for one.
    async fn wait_for(&self, needle: &str) -> Vec<String> {
        for _ in 0..100 {
            let found: Vec<String> =
                self.bodies.lock().unwrap().iter().filter(|b| b.contains(needle)).cloned().collect();
            if !found.is_empty() {
                return found;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        Vec::new()
    }
}

/// Scenario (d): a member of a succeeded batch calls from an untrusted address. Within one poll
/// the metric, `status` and the webhook report it with the source address; by default it stays
/// in the group; with `guard.after_soak: release` it is taken out and held (journaled, audited).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scenario_d_a_locked_user_denied_after_its_soak_is_reported_or_released() {
    use lockstep::metrics::Metrics;
    use lockstep::runtime::Shared;

    let receiver = Receiver::start().await;
    let hook = receiver.url.clone();
    let users = [("ann", Habit::Trusted), ("ben", Habit::Trusted)];
    let mut world =
        World::with_config("afteralert", &users, 8, |text| format!("{text}listeners: {{webhook_url: \"{hook}\"}}\n"))
            .await;
    let batch = first_batch_succeeds(&mut world).await;
    past_grace(&mut world).await;
    let shared =
        Shared::new(world.restart_with(AwsIam::new(&world.sdk, common::ACCOUNT), Mode::Commit), Metrics::new());
    world.pass(chrono::Duration::minutes(10), true).await;
    shared.step().await.unwrap();

    let leaked = batch[0].clone();
    world.write(&world.lockdown_denials(&leaked, 4));
    world.pass(chrono::Duration::minutes(10), true).await;
    let report = shared.step().await.unwrap();
    assert!(report.errors.is_empty(), "{:?}", report.errors);

    // Metric: counted by cause, the gauge names no one.
    let metrics = shared.metrics().render();
    assert!(metrics.contains("lockstep_locked_user_denials_total{cause=\"lockdown\"} 4"), "{metrics}");
    assert!(metrics.contains("lockstep_locked_users_denied 1"), "{metrics}");
    assert!(!metrics.contains(&leaked), "no user label on metrics");
    // Status: the user's recent denied calls with their source address.
    let status = shared.status().await.unwrap();
    let shown = status.locked_denied.iter().find(|r| r.user == leaked).expect("status lists the user");
    assert_eq!((shown.denied, shown.sources.get(UNTRUSTED_IP)), (4, Some(&4)));
    assert!(
        shown.lockdown_denials.iter().all(|d| d.source.as_deref() == Some(UNTRUSTED_IP) && d.action == "s3:PutObject")
    );
    let json = serde_json::to_string(&status).unwrap();
    assert!(json.contains("locked_denied") && json.contains(UNTRUSTED_IP), "{json}");
    // Webhook: one notification naming the user and the source.
    let hooks = receiver.wait_for("locked_user_denied").await;
    assert_eq!(hooks.len(), 1, "{hooks:?}");
    assert!(hooks[0].contains(&leaked) && hooks[0].contains(UNTRUSTED_IP), "{}", hooks[0]);
    // By default it stays in the group, locked.
    assert!(world.group().await.contains(&leaked));
    assert_eq!(world.ledger().members[&leaked].state, UserState::Locked);
    // The next poll sees nothing new: no second notification, the counter stays.
    world.pass(chrono::Duration::minutes(10), true).await;
    shared.step().await.unwrap();
    assert!(shared.metrics().render().contains("lockstep_locked_user_denials_total{cause=\"lockdown\"} 4"));
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert_eq!(receiver.wait_for("locked_user_denied").await.len(), 1);

    // With `guard.after_soak: release`: out of the group and held within one poll.
    let mut world = World::with_config("afterrelease", &users, 8, |text| {
        text.replace("silence_limit: 1h}", "silence_limit: 1h, after_soak: release}")
    })
    .await;
    let batch = first_batch_succeeds(&mut world).await;
    past_grace(&mut world).await;
    let leaked = batch[0].clone();
    world.write(&world.lockdown_denials(&leaked, 4));
    let report = world.advance(chrono::Duration::minutes(10), true).await;
    assert_eq!(report.locked_alerts, std::slice::from_ref(&leaked));
    assert_eq!(world.group().await, batch[1..].iter().cloned().collect(), "only that user leaves the group");
    let member = &world.ledger().members[&leaked];
    assert_eq!(member.state, UserState::Held);
    assert!(member.hold_until.unwrap() - world.clock.now() >= chrono::Duration::days(6), "held for hold_expiry");
    let reason = member.reason.clone().unwrap_or_default();
    assert!(reason.contains(UNTRUSTED_IP) && reason.contains("after_soak: release"), "{reason}");
    assert_eq!(world.audit_actions(&leaked), ["promote", "locked", "rolling_back", "held"]);
    assert_eq!(world.ledger().batches[0].state, BatchState::Succeeded, "the batch itself stays succeeded");
}
