//! `lockstep sandbox`: the whole loop on one machine, no AWS account. A generated organisation of
//! several accounts writes CloudTrail files into one organisation trail as virtual time passes;
//! the daemon's fleet (one controller per account) ingests each account's evidence, promotes
//! waves, and guards them; in the first account one user misbehaves after promotion and the guard
//! rolls the batch back. `/metrics` and the admin API (`lockstep status`) are live while it runs.
//!
//! Each account's IAM group is a LOCAL STAND-IN kept in memory ([`LocalIam`]), clearly labelled
//! as such: the real AWS path is the one the integration tests prove against the emulator.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
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
use lockstep::fleet::Fleet;
use lockstep::iam::{Directory, Iam, IamError, IamUser, PolicyStatus};
use lockstep::metrics::Metrics;
use lockstep::planner::{Action, Gate};
use lockstep::rollout::UserState;
use lockstep::store::{Ledger, RolloutStore, Store};
use lockstep_synth::{Faults, Org, Origin, RecordSpec, write_org_trail};

pub struct Options {
    pub dir: PathBuf,
    /// Generated IAM users in all, shared out between the accounts.
    pub users: usize,
    /// Accounts in the organisation, 1 to [`MAX_ACCOUNTS`].
    pub accounts: usize,
    pub seed: u64,
    /// Real time to wait between steps, so a person can watch.
    pub pace: Duration,
    pub admin_port: u16,
    pub metrics_port: u16,
    pub json: bool,
}

/// The organisation's accounts (IDs from the AWS documentation) and their names, in order; the
/// first is `account_id`, the one with the default credentials, and has the scripted story.
const ACCOUNTS: [(&str, &str); 10] = [
    ("123456789012", "platform"),
    ("111122223333", "payments"),
    ("444455556666", "analytics"),
    ("777788889999", "retail"),
    ("111111111111", "research"),
    ("222222222222", "mobile"),
    ("333333333333", "billing"),
    ("444444444444", "support"),
    ("555555555555", "identity"),
    ("666666666666", "media"),
];

/// The most accounts a sandbox organisation has.
pub const MAX_ACCOUNTS: usize = ACCOUNTS.len();

/// The organisation trail's organisation: files land under `AWSLogs/<organisation>/<account>/`.
const ORGANIZATION: &str = "o-a1b2c3d4e5";

/// LOCAL STAND-IN for one account's IAM, for the sandbox only: an in-memory lockdown group and
/// policy. Like IAM, it refuses to add a user the account does not have. Nothing here talks to
/// AWS.
#[derive(Clone)]
struct LocalIam {
    users: Arc<Mutex<Vec<IamUser>>>,
    group: Arc<Mutex<BTreeSet<String>>>,
    policy: Arc<Mutex<Option<String>>>,
}

impl LocalIam {
    fn new(users: Vec<IamUser>) -> LocalIam {
        LocalIam { users: Arc::new(Mutex::new(users)), group: Arc::default(), policy: Arc::default() }
    }

    fn members(&self) -> BTreeSet<String> {
        self.group.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The group members' ARNs (a name the directory does not know is shown as it is).
    fn member_arns(&self) -> Vec<String> {
        let users = self.users.lock().unwrap_or_else(|e| e.into_inner());
        self.members()
            .into_iter()
            .map(|name| users.iter().find(|u| u.name == name).map_or(name, |u| u.arn.clone()))
            .collect()
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
        if !self.users.lock().unwrap_or_else(|e| e.into_inner()).iter().any(|u| u.name == user) {
            return Err(IamError {
                operation: "AddUserToGroup",
                code: "NoSuchEntity".to_string(),
                message: format!("stand-in: the user with name {user} cannot be found"),
            });
        }
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

/// The `accounts` section: the first `count` accounts, the second with a VPC and an endpoint of
/// its own (so its policy and its classifier differ from the others'). Every account but the
/// first needs a role in the file; with stand-in IAM groups it is never assumed.
fn accounts_section(count: usize) -> String {
    let mut section = String::from(
        "# The organisation. Every account's IAM group is a LOCAL STAND-IN held in memory: the role\n\
         # below (needed for every account but account_id's) is never assumed.\n\
         accounts:\n  role: \"arn:aws:iam::{account}:role/lockstep-sandbox\"\n  list:\n",
    );
    for (id, name) in &ACCOUNTS[..count] {
        // Writing into a String cannot fail.
        let _ = writeln!(section, "    - {{id: \"{id}\", name: {name}}}");
    }
    if count > 1 {
        let (id, _) = ACCOUNTS[1];
        let _ = write!(
            section,
            "  perimeter:\n    \"{id}\":\n      trusted_vpcs: [vpc-0c1d2e3f]\n      trusted_vpc_endpoints: {{vpce-0c1d2e3f: vpc-0c1d2e3f}}\n"
        );
    }
    section
}

fn sandbox_config(dir: &Path, accounts: usize, admin_port: u16, metrics_port: u16) -> String {
    format!(
        r#"# Written by `lockstep sandbox`: a rollout on generated data and LOCAL STAND-IN IAM groups.
account_id: "{account_id}"
region: us-east-1
{accounts}lockdown: {{group: lockstep-sandbox, policy_name: lockstep-sandbox-perimeter}}
perimeter:
  trusted_vpcs: [vpc-0a1b2c3d4e5f60718, vpc-1b2c3d4e]
  trusted_vpc_endpoints:
    vpce-0123456789abcdef0: vpc-0a1b2c3d4e5f60718
    vpce-0fedcba9876543210: vpc-1b2c3d4e
  trusted_cidrs: [203.0.113.0/24, 198.51.100.32/28, "2001:db8:1234::/48"]
  exempt_tag_key: lockstep-exempt
evidence:
  source: files
  files: {{path: "{dir}/trail"}}  # an organisation trail: AWSLogs/{ORGANIZATION}/<account>/CloudTrail/...
  lookback: 10d
  overlap: 1h
eligibility: {{window: 7d, min_history: 3d, min_calls: 20, quiet_for: 2d, max_evidence_age: 2h, hold_expiry: 14d}}
waves:
  - {{name: canary, batch_size: 2, soak: 6h, batches: 1, select: {{path_prefix: /automation/}}}}
  - {{name: engineering, batch_size: 4, soak: 6h, select: {{path_prefix: /engineering/}}}}
  - {{name: everyone, batch_size: 8, soak: 6h}}
rollout: {{max_promotions_per_day: 40, max_soaking_batches: 1}}
guard: {{source: files, poll: 10m, grace: 1h, window: 30m, min_affected_users: 1, min_denials: 3, silence_limit: 1h}}
store: {{path: "{dir}/lockstep.db"}}  # account_id's; every other account's beside it, lockstep-<account>.db
listeners:
  admin: 127.0.0.1:{admin_port}
  metrics: 127.0.0.1:{metrics_port}
  token_file: "{dir}/admin-token"
"#,
        account_id = ACCOUNTS[0].0,
        accounts = accounts_section(accounts),
        dir = dir.display()
    )
}

const STEP: chrono::Duration = chrono::Duration::minutes(10);
const HISTORY_DAYS: i64 = 8;
const MAX_DAYS: i64 = 8;
const OPERATOR: &str = "sandbox-operator";

/// What happened, for the closing summary: every account's, and the totals.
#[derive(Debug, Default, serde::Serialize)]
struct Summary {
    virtual_days: f64,
    /// Every account finished.
    finished: bool,
    totals: Totals,
    accounts: Vec<AccountSummary>,
}

/// The organisation's numbers, summed over its accounts.
#[derive(Debug, Default, serde::Serialize)]
struct Totals {
    users: usize,
    locked: usize,
    held: usize,
    batches: BTreeMap<String, usize>,
    rollbacks: usize,
}

/// What happened in one account.
#[derive(Debug, Default, serde::Serialize)]
struct AccountSummary {
    account: String,
    name: String,
    finished: bool,
    users: usize,
    locked: Vec<String>,
    held: Vec<String>,
    batches: BTreeMap<String, usize>,
    rollbacks: Vec<String>,
    /// The members of the account's stand-in group, by name and by ARN.
    stand_in_group: Vec<String>,
    stand_in_group_arns: Vec<String>,
}

impl AccountSummary {
    /// The stand-in group holds exactly the ledger's locked users.
    fn consistent(&self) -> bool {
        self.stand_in_group == self.locked
    }
}

/// One account of the sandbox organisation: its configuration view, generated users, stand-in
/// IAM, store and runtime.
struct Account {
    config: Config,
    name: String,
    org: Org,
    iam: LocalIam,
    store: Arc<Store>,
    finished: bool,
    rollbacks: Vec<String>,
}

pub async fn run(options: Options) -> anyhow::Result<ExitCode> {
    if !(1..=MAX_ACCOUNTS).contains(&options.accounts) {
        anyhow::bail!("--accounts {}: the sandbox organisation has 1 to {MAX_ACCOUNTS} accounts", options.accounts);
    }
    let dir = &options.dir;
    if dir.join("lockstep.db").exists() {
        anyhow::bail!("{} holds an earlier sandbox run; remove it or pass --dir elsewhere", dir.display());
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let dir = dir.canonicalize()?;
    let config_path = dir.join("rollout.yaml");
    std::fs::write(&config_path, sandbox_config(&dir, options.accounts, options.admin_port, options.metrics_port))?;
    std::fs::write(dir.join("admin-token"), format!("sandbox-{:016x}\n", options.seed ^ 0x5eed_7011_0c57_e900))?;
    let config = Config::load(&config_path).with_context(|| format!("loading {}", config_path.display()))?;

    let start = Utc.with_ymd_and_hms(2026, 3, 2, 8, 0, 0).single().context("sandbox start time")?;
    let clock = Arc::new(ManualClock::new(start));
    let views = config.account_views();
    let count = views.len();
    let orgs: Vec<Org> = views
        .iter()
        .enumerate()
        .map(|(i, view)| {
            // The first account's users are the single-account sandbox's first users.
            let users = options.users / count + usize::from(i < options.users % count);
            Org::new(options.seed.wrapping_add(i as u64), users, &view.perimeter)
        })
        .collect();
    let trail = dir.join("trail");
    eprintln!(
        "sandbox: {} generated users in {} ({}), {HISTORY_DAYS} days of history, virtual time from {start}",
        orgs.iter().map(|o| o.users.len()).sum::<usize>(),
        accounts_phrase(count),
        views
            .iter()
            .zip(&orgs)
            .map(|(v, o)| format!("{}: {}", v.account_id, o.users.len()))
            .collect::<Vec<_>>()
            .join(", ")
    );
    eprintln!("sandbox: each account's IAM group is a LOCAL STAND-IN held in memory; nothing talks to AWS");
    // A day at a time: the whole history of a large organisation does not fit in memory at once.
    let mut day = start - chrono::Duration::days(HISTORY_DAYS);
    while day < start {
        let until = (day + chrono::Duration::days(1)).min(start);
        for org in &orgs {
            deliver(&trail, &org.account_id, &org.generate(day, until).records)?;
        }
        day = until;
    }

    let source = Source::Folder(Arc::new(Folder::new(&config.evidence.files_path)));
    let dyn_clock: Arc<dyn Clock> = clock.clone();
    let wake = Arc::new(tokio::sync::Notify::new());
    let mut accounts = Vec::with_capacity(count);
    let mut runtimes = Vec::with_capacity(count);
    for (view, org) in views.into_iter().zip(orgs) {
        let (account, runtime) = Account::start(view, org, &source, dyn_clock.clone(), wake.clone()).await?;
        accounts.push(account);
        runtimes.push(runtime);
    }
    let fleet = Fleet::new(runtimes, wake);
    let servers = api::serve(fleet.clone(), &config.listeners).await?;
    eprintln!(
        "sandbox: live at http://{}/metrics; in another shell: LOCKSTEP_CONFIG={} lockstep status",
        config.listeners.metrics,
        config_path.display()
    );

    let mut story = Story::default();
    let mut written_until = start;
    let mut last_refresh = start;
    while clock.now() - start < chrono::Duration::days(MAX_DAYS) {
        let now = clock.now() + STEP;
        for (i, account) in accounts.iter().enumerate() {
            let mut records = account.org.generate(written_until, now).records;
            if i == 0 {
                records.extend(story.misbehaviour(written_until, now, &account.config));
            }
            deliver(&trail, &account.config.account_id, &records)?;
        }
        written_until = now;
        clock.set(now);
        if now - last_refresh >= chrono::Duration::hours(1) {
            for account in &accounts {
                refresh_evidence(&*account.store, &source, &account.config, clock.as_ref()).await?;
            }
            last_refresh = now;
        }
        let outcomes = fleet.step().await;
        for (i, ((step, shared), account)) in outcomes.into_iter().zip(fleet.accounts()).zip(&mut accounts).enumerate()
        {
            let report = step.outcome.with_context(|| format!("account {}: controller step", step.account))?;
            narrate(&account.label(), &report);
            account.observe(&report);
            if i == 0 {
                story.react(&report, shared, now)?;
            }
        }
        if accounts.iter().all(|a| a.finished) {
            break;
        }
        if !options.pace.is_zero() {
            tokio::time::sleep(options.pace).await;
        }
    }
    servers.abort();

    let mut summary =
        Summary { virtual_days: (clock.now() - start).num_minutes() as f64 / (24.0 * 60.0), ..Summary::default() };
    for account in &accounts {
        summary.accounts.push(account.summary()?);
    }
    summary.finished = summary.accounts.iter().all(|a| a.finished);
    for account in &summary.accounts {
        let totals = &mut summary.totals;
        totals.users += account.users;
        totals.locked += account.locked.len();
        totals.held += account.held.len();
        totals.rollbacks += account.rollbacks.len();
        for (state, n) in &account.batches {
            *totals.batches.entry(state.clone()).or_default() += n;
        }
    }
    if options.json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
    } else {
        print_summary(&summary);
    }
    let consistent = summary.accounts.iter().all(AccountSummary::consistent);
    Ok(if summary.finished && consistent { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

impl Account {
    /// Sets up an account on its configuration view: its store with the history's evidence, its
    /// stand-in IAM with the lockdown policy in place, its feed and controller; and the runtime
    /// that steps it in the fleet.
    async fn start(
        config: Config,
        org: Org,
        source: &Source,
        clock: Arc<dyn Clock>,
        wake: Arc<tokio::sync::Notify>,
    ) -> anyhow::Result<(Account, Shared)> {
        let id = config.account_id.clone();
        let path = &config.store.path;
        let store = Arc::new(
            Store::open_for_account(path, &id)
                .with_context(|| format!("account {id}: opening the store {}", path.display()))?,
        );
        refresh_evidence(&*store, source, &config, clock.as_ref()).await?;
        let users = org
            .users
            .iter()
            .map(|u| IamUser {
                name: u.name.clone(),
                arn: u.arn.clone(),
                path: u.path.clone(),
                tags: u.tags.iter().cloned().collect(),
            })
            .collect();
        let iam = LocalIam::new(users);
        let policy = config.perimeter.policy().to_json().with_context(|| format!("account {id}: the policy"))?;
        iam.apply_policy(&config.lockdown.group, &config.lockdown.policy_name, &policy).await?;
        // The sandbox's guard tails the generated trail folder (`guard.source: files`).
        let feed = feed::from_config(&config, clock.clone())
            .await
            .with_context(|| format!("account {id}: the guard's feed"))?;
        let controller = Controller::new(config.clone(), store.clone(), iam.clone(), feed, clock, Mode::Commit);
        let runtime = Shared::with_wake(controller, Metrics::for_account(&id), wake);
        let name = config.accounts.first().and_then(|a| a.name.clone()).unwrap_or_default();
        Ok((Account { config, name, org, iam, store, finished: false, rollbacks: Vec::new() }, runtime))
    }

    /// `123456789012 platform`: how narration and the summary name the account.
    fn label(&self) -> String {
        format!("{} {}", self.config.account_id, self.name)
    }

    /// Notes a step's rollbacks and whether the account has finished.
    fn observe(&mut self, report: &StepReport) {
        for action in &report.plan.actions {
            if let Action::RollBack { batch, reason } = action {
                self.rollbacks.push(format!("batch {batch}: {reason}"));
            }
        }
        self.finished |= report.plan.gate == Gate::Finished;
    }

    /// The account's part of the closing summary, from its ledger and its stand-in group.
    fn summary(&self) -> anyhow::Result<AccountSummary> {
        let snapshot = self.store.snapshot().with_context(|| format!("account {}", self.config.account_id))?;
        let mut summary = AccountSummary {
            account: self.config.account_id.clone(),
            name: self.name.clone(),
            finished: self.finished,
            users: self.org.users.len(),
            rollbacks: self.rollbacks.clone(),
            stand_in_group: self.iam.members().into_iter().collect(),
            stand_in_group_arns: self.iam.member_arns(),
            ..AccountSummary::default()
        };
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
        Ok(summary)
    }
}

/// Brings an account's evidence up to date, as the daemon's schedule would.
async fn refresh_evidence(
    store: &dyn RolloutStore,
    source: &Source,
    config: &Config,
    clock: &dyn Clock,
) -> anyhow::Result<()> {
    let account = &config.account_id;
    let freshness = store.freshness().with_context(|| format!("account {account}: reading evidence freshness"))?;
    let window = refresh::scheduled_window(&freshness, clock.now(), &config.evidence);
    refresh::refresh(store, source, config, window, clock, None, &mut |_| {})
        .await
        .with_context(|| format!("account {account}: refreshing evidence"))?;
    Ok(())
}

/// Writes an account's records into the organisation trail, as CloudTrail delivers them.
fn deliver(trail: &Path, account: &str, records: &[RecordSpec]) -> anyhow::Result<()> {
    write_org_trail(trail, ORGANIZATION, account, records, Faults::default())
        .with_context(|| format!("account {account}: writing trail files under {}", trail.display()))?;
    Ok(())
}

/// The scripted part, in the first account: one member of its first engineering batch starts
/// working from an untrusted network after promotion; once the guard has rolled the batch back,
/// an operator resumes the account's rollout if the rollback paused it.
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

    fn react(&mut self, report: &StepReport, shared: &Shared, now: DateTime<Utc>) -> anyhow::Result<()> {
        for action in &report.plan.actions {
            match action {
                Action::StartBatch { wave, users } if wave == "engineering" && self.misbehaving.is_none() => {
                    let Some(first) = users.first() else { continue };
                    let user = first.user.clone();
                    eprintln!(
                        "sandbox: {} {user} will start calling from an untrusted network in 30 minutes",
                        shared.account()
                    );
                    self.misbehaving = Some((user, now + chrono::Duration::minutes(30)));
                }
                Action::RollBack { .. } => self.rolled_back_at = Some(now),
                _ => {}
            }
        }
        // A rollback fully attributed to its culprit does not pause: nothing to resume then.
        if let Some(at) = self.rolled_back_at
            && !self.resumed
            && now - at >= chrono::Duration::hours(2)
            && matches!(report.plan.gate, Gate::Paused(_))
        {
            let answer = shared.command(&Command::Resume { operator: OPERATOR.to_string() })?;
            eprintln!(
                "sandbox: {} {OPERATOR} looked at the held users and resumed the rollout: {answer}",
                shared.account()
            );
            self.resumed = true;
        }
        Ok(())
    }
}

fn narrate(account: &str, report: &StepReport) {
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
        eprintln!("[{stamp}] {account}: {line}");
    }
}

fn print_summary(summary: &Summary) {
    println!(
        "\nlockstep sandbox summary ({:.1} virtual days, {})",
        summary.virtual_days,
        accounts_phrase(summary.accounts.len())
    );
    println!(
        "  {:<24} {:<9} {:>5} {:>6} {:>4}  {:<27} stand-in group",
        "account", "rollout", "users", "locked", "held", "batches"
    );
    let finished = |yes: bool| if yes { "finished" } else { "NOT DONE" };
    for account in &summary.accounts {
        println!(
            "  {:<24} {:<9} {:>5} {:>6} {:>4}  {:<27} {} members, {} locked",
            format!("{} {}", account.account, account.name),
            finished(account.finished),
            account.users,
            account.locked.len(),
            account.held.len(),
            batches(&account.batches),
            account.stand_in_group.len(),
            if account.consistent() { "same as" } else { "DIFFERENT FROM" },
        );
    }
    let totals = &summary.totals;
    println!(
        "  {:<24} {:<9} {:>5} {:>6} {:>4}  {}",
        "total",
        finished(summary.finished),
        totals.users,
        totals.locked,
        totals.held,
        batches(&totals.batches),
    );
    println!("  rollbacks: {}", totals.rollbacks);
    for account in &summary.accounts {
        for rollback in &account.rollbacks {
            println!("    - {} {rollback}", account.account);
        }
    }
    for account in &summary.accounts {
        if !account.held.is_empty() {
            println!("  held in {}: {}", account.account, account.held.join(", "));
        }
    }
}

/// `1 account`, `3 accounts`.
fn accounts_phrase(count: usize) -> String {
    match count {
        1 => "1 account".to_string(),
        n => format!("{n} accounts"),
    }
}

/// `4 succeeded, 1 rolled_back`: batches by state.
fn batches(batches: &BTreeMap<String, usize>) -> String {
    batches.iter().map(|(state, n)| format!("{n} {state}")).collect::<Vec<_>>().join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_generated_configuration_is_an_organisation_whose_second_account_has_its_own_endpoint() {
        for count in 1..=MAX_ACCOUNTS {
            let text = sandbox_config(Path::new("/tmp/sbx"), count, 0, 0);
            let config = Config::parse(&text, Path::new("rollout.yaml")).unwrap();
            let ids: Vec<&str> = config.accounts.iter().map(|a| a.id.as_str()).collect();
            let expected: Vec<&str> = ACCOUNTS[..count].iter().map(|(id, _)| *id).collect();
            assert_eq!(ids, expected);
            let views = config.account_views();
            let stores: BTreeSet<_> = views.iter().map(|v| v.store.path.clone()).collect();
            assert_eq!(stores.len(), count, "a store per account");
            for (i, view) in views.iter().enumerate() {
                let own = view.perimeter.trusted_endpoints.contains_key("vpce-0c1d2e3f");
                assert_eq!(own, i == 1, "only the second account trusts its own endpoint");
                assert_eq!(view.perimeter.account_id, view.account_id);
            }
        }
    }
}
