//! `lockstep sandbox`: the whole loop on one machine, no AWS account. A generated organisation
//! writes CloudTrail files as virtual time passes; the real controller ingests evidence,
//! promotes waves, and guards them; one user misbehaves after promotion and the guard rolls the
//! batch back. `/metrics` and the admin API (`lockstep status`) are live while it runs.
//!
//! The IAM group is a LOCAL STAND-IN kept in memory ([`LocalIam`]), clearly labelled as such:
//! the real AWS path is the one the integration tests prove against the emulator.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use chrono::{DateTime, TimeZone, Utc};
use lockstep::api::{self, Command, Shared};
use lockstep::clock::{Clock, ManualClock};
use lockstep::config::Config;
use lockstep::controller::{Controller, Mode, StepReport};
use lockstep::evidence::files::Folder;
use lockstep::evidence::refresh::{self, Source};
use lockstep::feed;
use lockstep::iam::{Directory, Iam, IamError, IamUser, PolicyStatus};
use lockstep::metrics::Metrics;
use lockstep::planner::{Action, Gate};
use lockstep::rollout::UserState;
use lockstep::store::{Ledger, RolloutStore, Store};
use lockstep_synth::{Faults, Org, Origin, RecordSpec, write_trail};

pub struct Options {
    pub dir: PathBuf,
    pub users: usize,
    pub seed: u64,
    /// Real time to wait between steps, so a person can watch.
    pub pace: Duration,
    pub admin_port: u16,
    pub metrics_port: u16,
    pub json: bool,
}

/// LOCAL STAND-IN for IAM, for the sandbox only: an in-memory lockdown group and policy.
/// Nothing here talks to AWS.
#[derive(Clone)]
struct LocalIam {
    users: Arc<Mutex<Vec<IamUser>>>,
    group: Arc<Mutex<BTreeSet<String>>>,
    policy: Arc<Mutex<Option<String>>>,
}

impl LocalIam {
    fn members(&self) -> BTreeSet<String> {
        self.group.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

impl Iam for LocalIam {
    async fn list_users(&self) -> Result<Directory, IamError> {
        Ok(Directory { users: self.users.lock().unwrap_or_else(|e| e.into_inner()).clone(), iam_calls: 0 })
    }
    async fn group_members(&self, _group: &str) -> Result<Vec<String>, IamError> {
        Ok(self.members().into_iter().collect())
    }
    async fn add_to_group(&self, _group: &str, user: &str) -> Result<(), IamError> {
        self.group.lock().unwrap_or_else(|e| e.into_inner()).insert(user.to_string());
        Ok(())
    }
    async fn remove_from_group(&self, _group: &str, user: &str) -> Result<(), IamError> {
        self.group.lock().unwrap_or_else(|e| e.into_inner()).remove(user);
        Ok(())
    }
    async fn policy_status(&self, _group: &str, _policy: &str, document: &str) -> Result<PolicyStatus, IamError> {
        Ok(match self.policy.lock().unwrap_or_else(|e| e.into_inner()).as_deref() {
            Some(current) if current == document => PolicyStatus::InPlace,
            Some(current) => PolicyStatus::Drifted { current: current.to_string() },
            None => PolicyStatus::PolicyMissing,
        })
    }
    async fn apply_policy(&self, group: &str, policy: &str, document: &str) -> Result<Vec<String>, IamError> {
        *self.policy.lock().unwrap_or_else(|e| e.into_inner()) = Some(document.to_string());
        Ok(vec![format!("stand-in: attached {policy} to {group}")])
    }
    async fn tag_user(&self, user: &str, tags: &[(String, String)]) -> Result<(), IamError> {
        let mut users = self.users.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(found) = users.iter_mut().find(|u| u.name == user) {
            found.tags.extend(tags.iter().cloned());
        }
        Ok(())
    }
    async fn untag_user(&self, user: &str, keys: &[String]) -> Result<(), IamError> {
        let mut users = self.users.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(found) = users.iter_mut().find(|u| u.name == user) {
            found.tags.retain(|key, _| !keys.contains(key));
        }
        Ok(())
    }
}

fn sandbox_config(dir: &Path, admin_port: u16, metrics_port: u16) -> String {
    format!(
        r#"# Written by `lockstep sandbox`: a rollout on generated data and a LOCAL STAND-IN IAM group.
account_id: "123456789012"
region: us-east-1
lockdown: {{group: lockstep-sandbox, policy_name: lockstep-sandbox-perimeter}}
perimeter:
  trusted_vpcs: [vpc-0a1b2c3d4e5f60718, vpc-1b2c3d4e]
  trusted_vpc_endpoints:
    vpce-0123456789abcdef0: vpc-0a1b2c3d4e5f60718
    vpce-0fedcba9876543210: vpc-1b2c3d4e
  trusted_cidrs: [203.0.113.0/24, 198.51.100.32/28, "2001:db8:1234::/48"]
  exempt_tag_key: lockstep-exempt
evidence:
  source: files
  files: {{path: "{dir}/trail"}}
  lookback: 10d
  overlap: 1h
eligibility: {{window: 7d, min_history: 3d, min_calls: 20, quiet_for: 2d, max_evidence_age: 2h, hold_expiry: 14d}}
waves:
  - {{name: canary, batch_size: 2, soak: 6h, batches: 1, select: {{path_prefix: /automation/}}}}
  - {{name: engineering, batch_size: 4, soak: 6h, select: {{path_prefix: /engineering/}}}}
  - {{name: everyone, batch_size: 8, soak: 6h}}
rollout: {{max_promotions_per_day: 40, max_soaking_batches: 1}}
guard: {{source: files, poll: 10m, grace: 1h, window: 30m, min_affected_users: 1, min_denials: 3, silence_limit: 1h}}
store: {{path: "{dir}/lockstep.db"}}
listeners:
  admin: 127.0.0.1:{admin_port}
  metrics: 127.0.0.1:{metrics_port}
  token_file: "{dir}/admin-token"
"#,
        dir = dir.display()
    )
}

const STEP: chrono::Duration = chrono::Duration::minutes(10);
const HISTORY_DAYS: i64 = 8;
const MAX_DAYS: i64 = 8;
const OPERATOR: &str = "sandbox-operator";

/// What happened, for the closing summary.
#[derive(Debug, Default, serde::Serialize)]
struct Summary {
    virtual_days: f64,
    users: usize,
    locked: Vec<String>,
    held: Vec<String>,
    batches: BTreeMap<String, usize>,
    rollbacks: Vec<String>,
    finished: bool,
    stand_in_group: Vec<String>,
}

pub async fn run(options: Options) -> anyhow::Result<ExitCode> {
    let dir = &options.dir;
    if dir.join("lockstep.db").exists() {
        anyhow::bail!("{} holds an earlier sandbox run; remove it or pass --dir elsewhere", dir.display());
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let dir = dir.canonicalize()?;
    let config_path = dir.join("rollout.yaml");
    std::fs::write(&config_path, sandbox_config(&dir, options.admin_port, options.metrics_port))?;
    std::fs::write(dir.join("admin-token"), format!("sandbox-{:016x}\n", options.seed ^ 0x5eed_7011_0c57_e900))?;
    let config = Config::load(&config_path)?;

    let start = Utc.with_ymd_and_hms(2026, 3, 2, 8, 0, 0).single().context("sandbox start time")?;
    let clock = Arc::new(ManualClock::new(start));
    let org = Org::new(options.seed, options.users, &config.perimeter);
    let trail = dir.join("trail");
    eprintln!(
        "sandbox: {} generated users, {HISTORY_DAYS} days of history, virtual time from {start}",
        org.users.len()
    );
    eprintln!("sandbox: the IAM group is a LOCAL STAND-IN held in memory; nothing talks to AWS");
    // A day at a time: the whole history of a large organisation does not fit in memory at once.
    let mut day = start - chrono::Duration::days(HISTORY_DAYS);
    while day < start {
        let until = (day + chrono::Duration::days(1)).min(start);
        write_trail(&trail, &config.account_id, &org.generate(day, until).records, Faults::default())?;
        day = until;
    }

    let store = Arc::new(Store::open_for_account(&config.store.path, &config.account_id)?);
    let source = Source::Folder(Arc::new(Folder::new(&config.evidence.files_path)));
    refresh_evidence(&*store, &source, &config, clock.as_ref()).await?;

    let users: Vec<IamUser> = org
        .users
        .iter()
        .map(|u| IamUser {
            name: u.name.clone(),
            arn: u.arn.clone(),
            path: u.path.clone(),
            tags: u.tags.iter().cloned().collect(),
        })
        .collect();
    let iam = LocalIam { users: Arc::new(Mutex::new(users)), group: Arc::default(), policy: Arc::default() };
    iam.apply_policy(&config.lockdown.group, &config.lockdown.policy_name, &config.perimeter.policy().to_json()?)
        .await?;
    let dyn_clock: Arc<dyn Clock> = clock.clone();
    // The sandbox's guard tails the generated trail folder (`guard.source: files`).
    let feed = feed::from_config(&config, dyn_clock.clone()).await?;
    let controller = Controller::new(config.clone(), store.clone(), iam.clone(), feed, dyn_clock, Mode::Commit);
    let shared = Shared::new(controller, Metrics::new());
    let servers = api::serve(lockstep::fleet::Fleet::one(shared.clone()), &config.listeners).await?;
    eprintln!(
        "sandbox: live at http://{}/metrics; in another shell: LOCKSTEP_CONFIG={} lockstep status",
        config.listeners.metrics,
        config_path.display()
    );

    let mut story = Story::default();
    let mut written_until = start;
    let mut last_refresh = start;
    let mut summary = Summary { users: org.users.len(), ..Summary::default() };
    while clock.now() - start < chrono::Duration::days(MAX_DAYS) {
        let now = clock.now() + STEP;
        let mut records = org.generate(written_until, now).records;
        records.extend(story.misbehaviour(written_until, now, &config));
        write_trail(&trail, &config.account_id, &records, Faults::default())?;
        written_until = now;
        clock.set(now);
        if now - last_refresh >= chrono::Duration::hours(1) {
            refresh_evidence(&*store, &source, &config, clock.as_ref()).await?;
            last_refresh = now;
        }
        let report = shared.step().await?;
        narrate(&report);
        story.react(&report, &shared, now, &mut summary)?;
        if report.plan.gate == Gate::Finished {
            summary.finished = true;
            break;
        }
        if !options.pace.is_zero() {
            tokio::time::sleep(options.pace).await;
        }
    }
    servers.abort();

    let snapshot = store.snapshot()?;
    summary.virtual_days = (clock.now() - start).num_minutes() as f64 / (24.0 * 60.0);
    for member in snapshot.members.values() {
        match member.state {
            UserState::Locked => summary.locked.push(member.user.clone()),
            UserState::Held => {
                let batch =
                    member.batch.map(|b| format!("batch {b} rolled back")).unwrap_or_else(|| "held".to_string());
                summary.held.push(format!("{} ({batch})", member.user));
            }
            _ => {}
        }
    }
    for batch in &snapshot.batches {
        *summary.batches.entry(batch.state.to_string()).or_default() += 1;
    }
    summary.stand_in_group = iam.members().into_iter().collect();
    if options.json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
    } else {
        print_summary(&summary);
    }
    let consistent = summary.stand_in_group == summary.locked;
    Ok(if summary.finished && consistent { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

async fn refresh_evidence(
    store: &dyn RolloutStore,
    source: &Source,
    config: &Config,
    clock: &dyn Clock,
) -> anyhow::Result<()> {
    let window = refresh::scheduled_window(&store.freshness()?, clock.now(), &config.evidence);
    refresh::refresh(store, source, config, window, clock, None, &mut |_| {}).await?;
    Ok(())
}

/// The scripted part: one member of the first engineering batch starts working from an
/// untrusted network after promotion; once the guard has rolled the batch back, an operator
/// resumes the rollout if the rollback paused it.
#[derive(Default)]
struct Story {
    misbehaving: Option<(String, DateTime<Utc>)>,
    rolled_back_at: Option<DateTime<Utc>>,
    resumed: bool,
}

impl Story {
    fn misbehaviour(&self, from: DateTime<Utc>, to: DateTime<Utc>, config: &Config) -> Vec<RecordSpec> {
        let Some((user, since)) = &self.misbehaving else { return Vec::new() };
        if self.rolled_back_at.is_some() {
            return Vec::new();
        }
        let mut at = from.max(*since) + chrono::Duration::minutes(1);
        let mut records = Vec::new();
        while at < to {
            records.push(
                RecordSpec::new(
                    lockstep_synth::Identity::iam_user(&config.account_id, user),
                    at,
                    "s3:PutObject",
                    Origin::ip("192.0.2.44"),
                )
                .denied_explicitly(&config.lockdown.policy_name),
            );
            at += chrono::Duration::minutes(2);
        }
        records
    }

    fn react(
        &mut self,
        report: &StepReport,
        shared: &Shared,
        now: DateTime<Utc>,
        summary: &mut Summary,
    ) -> anyhow::Result<()> {
        for action in &report.plan.actions {
            match action {
                Action::StartBatch { wave, users } if wave == "engineering" && self.misbehaving.is_none() => {
                    let Some(first) = users.first() else { continue };
                    let user = first.user.clone();
                    eprintln!("sandbox: {user} will start calling from an untrusted network in 30 minutes");
                    self.misbehaving = Some((user, now + chrono::Duration::minutes(30)));
                }
                Action::RollBack { batch, reason } => {
                    summary.rollbacks.push(format!("batch {batch}: {reason}"));
                    self.rolled_back_at = Some(now);
                }
                _ => {}
            }
        }
        // A rollback fully attributed to its culprit does not pause: nothing to resume then.
        if let Some(at) = self.rolled_back_at
            && !self.resumed
            && now - at >= chrono::Duration::hours(2)
            && matches!(report.plan.gate, lockstep::planner::Gate::Paused(_))
        {
            let answer = shared.command(&Command::Resume { operator: OPERATOR.to_string() })?;
            eprintln!("sandbox: {OPERATOR} looked at the held users and resumed the rollout: {answer}");
            self.resumed = true;
        }
        Ok(())
    }
}

fn narrate(report: &StepReport) {
    let stamp = report.at.format("%a %d %b %H:%M");
    for action in &report.plan.actions {
        let line = match action {
            Action::StartBatch { wave, users } => format!(
                "wave {wave}: batch started: {}",
                users.iter().map(|c| c.user.as_str()).collect::<Vec<_>>().join(", ")
            ),
            Action::Succeed { batch, .. } => format!("batch {batch} soaked clean: succeeded"),
            Action::FinishWave { wave, why } => format!("wave {wave} finished: {why}"),
            Action::RollBack { batch, reason } => format!("batch {batch} ROLLED BACK: {reason}"),
        };
        eprintln!("[{stamp}] {line}");
    }
}

fn print_summary(summary: &Summary) {
    println!("\nlockstep sandbox summary ({:.1} virtual days)", summary.virtual_days);
    println!("  rollout finished:  {}", if summary.finished { "yes" } else { "no" });
    println!(
        "  users:             {} generated, {} locked, {} held",
        summary.users,
        summary.locked.len(),
        summary.held.len()
    );
    let batches: Vec<String> = summary.batches.iter().map(|(state, n)| format!("{n} {state}")).collect();
    println!("  batches:           {}", batches.join(", "));
    println!("  rollbacks:         {}", summary.rollbacks.len());
    for rollback in &summary.rollbacks {
        println!("    - {rollback}");
    }
    if !summary.held.is_empty() {
        println!("  held:              {}", summary.held.join(", "));
    }
    println!(
        "  stand-in group:    {} members, {} the ledger's locked users",
        summary.stand_in_group.len(),
        if summary.stand_in_group == summary.locked { "same as" } else { "DIFFERENT FROM" }
    );
}
