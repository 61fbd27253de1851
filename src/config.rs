//! `rollout.yaml`: the file an operator edits, parsed and validated into a typed [`Config`].
//!
//! Parsing happens in two passes. `serde_yaml` reads the document into loosely typed raw structs
//! (strings and integers), so that structural mistakes such as an unknown key stop early with the
//! parser's own location. Validation then checks every value and collects *all* problems, each
//! located by key path and by line and column through a small index built from the YAML events.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::perimeter::{Additions, Perimeter};

/// The actions whose services do not populate the network condition keys; the AWS
/// data-perimeter examples exclude them from the network Deny.
pub const DEFAULT_NOT_ACTIONS: &[&str] =
    &["es:ES*", "dax:*", "neptune-db:*", "kafka-cluster:*", "elasticfilesystem:client*", "rds-db:connect"];

/// A validated configuration. Everything here has been checked; callers never re-validate.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// The account of the default credentials (12 digits); without an `accounts` section, the
    /// one account whose IAM users are rolled out.
    pub account_id: String,
    /// Every account the configuration covers, excluded ones left out, in the file's order;
    /// never empty once discovery (if any) has run. Without an `accounts` section: `account_id`
    /// alone, with [`Config::perimeter`].
    pub accounts: Vec<Account>,
    /// `accounts.discover`: accounts AWS Organizations lists are still to be added
    /// ([`Config::with_discovered`]); `None` once they are, or when nothing is discovered.
    pub discovery: Option<Discovery>,
    /// The region for the IAM, Athena and S3 API calls.
    pub region: String,
    /// The group whose policy locks its members to the perimeter.
    pub lockdown: Lockdown,
    /// The trusted network shared by every account, as it applies to `account_id` (without any
    /// account's own additions): renders the Deny policy and judges every recorded call.
    pub perimeter: Perimeter,
    /// Where CloudTrail evidence comes from and how it is refreshed and kept.
    pub evidence: Evidence,
    /// How much clean history a user needs before promotion.
    pub eligibility: Eligibility,
    /// The waves, in order: a later wave starts when the one before is finished.
    pub waves: Vec<Wave>,
    /// Caps on promotions across waves.
    pub rollout: RolloutLimits,
    /// How soaking batches are watched and when they are rolled back.
    pub guard: Guard,
    /// Where the ledger and the evidence are stored.
    pub store: Store,
    /// The admin API and metrics addresses, the admin token and the webhook.
    pub listeners: Listeners,
}

/// One account the rollout covers (`accounts.list`), and how lockstep reaches it.
#[derive(Debug, Clone, PartialEq)]
pub struct Account {
    /// The 12-digit account ID.
    pub id: String,
    /// The operator's name for it, if given.
    pub name: Option<String>,
    /// Whose credentials act in the account.
    pub access: Access,
    /// The shared perimeter with the account's own VPCs and endpoints: renders the account's
    /// policy and judges the account's calls.
    pub perimeter: Perimeter,
    /// The account's tags as the operator lists them (`accounts.list[].tags`), for wave selectors.
    pub tags: BTreeMap<String, String>,
    /// The organisational unit the account sits in (`accounts.list[].ou`), for wave selectors.
    pub ou: Option<String>,
}

impl fmt::Display for Account {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.name {
            Some(name) => write!(f, "account {} ({name})", self.id),
            None => write!(f, "account {}", self.id),
        }
    }
}

/// How lockstep gets credentials that act in an account.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Access {
    /// The default credentials (the account of `account_id`).
    Default,
    /// Temporary credentials from `sts:AssumeRole` into this role of the account.
    AssumeRole {
        /// The role's ARN (`accounts.role` with the account filled in, or the account's `role`).
        role_arn: String,
        /// The external ID the role's trust policy asks for (`accounts.external_id`).
        external_id: Option<String>,
    },
}

/// A command that handles one account was given a configuration that names several.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "`accounts` names {accounts}: `lockstep {command}` acts in one account; pass --account with one of them, or name the user as <account>/<user> (without an `accounts` section the file means account_id {account_id} alone)"
)]
pub struct MultiAccount {
    /// The command that refused (`run`, `status`, ...).
    pub command: String,
    /// The accounts named, comma-separated.
    pub accounts: String,
    /// The configuration's `account_id`.
    pub account_id: String,
}

/// The lockdown IAM group and the name of the perimeter policy attached to it.
#[derive(Debug, Clone, PartialEq)]
pub struct Lockdown {
    /// The IAM group lockstep adds users to; its only policy is the perimeter Deny.
    pub group: String,
    /// The customer-managed policy attached to the group, named in denial messages.
    pub policy_name: String,
}

/// Where CloudTrail evidence (or the guard's live feed) is read from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SourceKind {
    /// Trail files in a local folder (S3 layout or any folder of trail files).
    Files,
    /// The trail bucket in S3.
    S3,
    /// An Athena table over the trail, queried per window.
    Athena,
}

/// How the Athena CloudTrail table is partitioned (both layouts exist in the wild).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Partitioning {
    /// Partition projection: one string column `timestamp` holding `yyyy/MM/dd`.
    Projected,
    /// Older setups: `region`, `year`, `month`, `day` string columns.
    RegionYearMonthDay,
}

/// `evidence`: where the trail is read from, how often, how far back, and how long it is kept.
#[derive(Debug, Clone, PartialEq)]
pub struct Evidence {
    /// Which kind of source the refresh reads.
    pub source: SourceKind,
    /// The folder read when `source` is `files`.
    pub files_path: PathBuf,
    /// The bucket read when `source` is `s3`.
    pub s3: Option<S3Location>,
    /// The table queried when `source` is `athena`.
    pub athena: Option<Athena>,
    /// Cron expression with a seconds field, as `tokio-cron-scheduler` reads it.
    pub schedule: String,
    /// How far before the covered end each refresh reads again, for late deliveries.
    pub overlap: Duration,
    /// How far back the first refresh (and a catch-up after an outage) reads.
    pub lookback: Duration,
    /// Evidence hours older than this are dropped.
    pub retention: Duration,
    /// The most bytes one trail file may inflate to; larger files are skipped, not read.
    pub max_inflated_size: u64,
}

/// A bucket and key prefix holding CloudTrail files.
#[derive(Debug, Clone, PartialEq)]
pub struct S3Location {
    /// The bucket name.
    pub bucket: String,
    /// The part of the key before `AWSLogs/` (may be empty).
    pub prefix: String,
}

/// `evidence.athena`: the Athena table over the trail and where query results go.
#[derive(Debug, Clone, PartialEq)]
pub struct Athena {
    /// The Glue database holding the table.
    pub database: String,
    /// The CloudTrail table.
    pub table: String,
    /// The workgroup queries run in.
    pub workgroup: String,
    /// The `s3://` location query results are written to.
    pub output_location: String,
    /// How the table is partitioned, which decides the partition filter.
    pub partitioning: Partitioning,
    /// The partition column holding the account, on a table over an organisation trail
    /// (`AWSLogs/<org-id>/<account>/...`, projected with `${account}` or partitioned by account):
    /// every query constrains it too, so it scans only the account's files.
    pub account_partition: Option<String>,
    /// How often a running query is polled.
    pub poll_interval: Duration,
    /// A query running longer is cancelled and the refresh fails.
    pub timeout: Duration,
}

/// `eligibility`: how much clean history a user needs before promotion.
#[derive(Debug, Clone, PartialEq)]
pub struct Eligibility {
    /// How far back the evidence is judged.
    pub window: Duration,
    /// A user's evidence must span at least this long.
    pub min_history: Duration,
    /// Fewer applicable calls than this prove nothing: not eligible.
    pub min_calls: u64,
    /// The most calls in the window the policy would have denied (usually 0).
    pub max_would_deny: u64,
    /// The last call from outside the perimeter must be older than this.
    pub quiet_for: Duration,
    /// No promotions at all while the last refresh covers less recent time than this.
    pub max_evidence_age: Duration,
    /// Users never promoted (break-glass accounts).
    pub exclude_users: Vec<String>,
    /// Held users become candidates again after this, if their evidence is clean.
    pub hold_expiry: Duration,
}

/// One wave of the rollout: which users, in batches of what size, soaking how long.
#[derive(Debug, Clone, PartialEq)]
pub struct Wave {
    /// Unique name: in the ledger, metrics and the audit log.
    pub name: String,
    /// Users per batch.
    pub batch_size: usize,
    /// How long a batch is watched before it succeeds.
    pub soak: Duration,
    /// How many batches the wave runs at most; `None`: until no eligible user is left.
    pub batches: Option<usize>,
    /// Which users the wave may take.
    pub select: Selector,
}

/// Which users a wave may take. Every given criterion must match.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Selector {
    /// The IAM path must start with this.
    pub path_prefix: Option<String>,
    /// The user name must match this glob.
    pub user_glob: Option<glob::Pattern>,
    /// The user must carry this tag key with this value.
    pub tag: Option<(String, String)>,
    /// The user's account must be one of these (empty: any account).
    pub accounts: Vec<String>,
    /// The user's account must carry this tag key with this value (`accounts.list[].tags`).
    pub account_tag: Option<(String, String)>,
    /// The user's account must sit in this organisational unit (`accounts.list[].ou`).
    pub ou: Option<String>,
}

impl Selector {
    /// Whether the selector's account criteria (`accounts`, `account_tag`, `ou`) take users of
    /// `account`; the per-user criteria are the planner's.
    pub fn selects_account(&self, account: &Account) -> bool {
        (self.accounts.is_empty() || self.accounts.contains(&account.id))
            && self.account_tag.as_ref().is_none_or(|(k, v)| account.tags.get(k) == Some(v))
            && self.ou.as_ref().is_none_or(|ou| account.ou.as_ref() == Some(ou))
    }
}

/// `rollout`: rate limits on promotions across waves.
#[derive(Debug, Clone, PartialEq)]
pub struct RolloutLimits {
    /// The most users promoted in any 24 hours, across every account.
    pub max_promotions_per_day: usize,
    /// The most users promoted in any 24 hours in one account (`None`: only the global cap).
    pub max_promotions_per_day_per_account: Option<usize>,
    /// The most batches soaking at once.
    pub max_soaking_batches: usize,
}

/// `guard`: the live feed that watches soaking batches and when it rolls them back.
#[derive(Debug, Clone, PartialEq)]
pub struct Guard {
    /// Where the guard reads denials live.
    pub source: SourceKind,
    /// How often the live feed is polled.
    pub poll: Duration,
    /// How long a batch is still watched after its soak ends.
    pub grace: Duration,
    /// Denials are counted over this sliding window.
    pub window: Duration,
    /// A spike needs at least this many batch members denied...
    pub min_affected_users: usize,
    /// ...and at least this many weighted denials in the window.
    pub min_denials: usize,
    /// No events for this long: the verdict is inconclusive and nothing succeeds.
    pub silence_limit: Duration,
    /// How long members rolled back with a batch but not at fault wait before they are eligible
    /// again; `None` means one soak of their wave.
    pub requeue_after: Option<Duration>,
    /// What to do with a locked user the lockdown policy starts denying after its soak.
    pub after_soak: AfterSoak,
    /// How far past a soak's end the event source must have delivered before the batch succeeds.
    pub delivery_lag: Duration,
    /// Bound on the probability that noise alone makes one spike in one soak (see `guard`).
    pub false_alarm_budget: f64,
    /// Whether the guard keeps attributing denials of locked users after their soak, for as long
    /// as they are locked (`guard.after_soak` says what it does about `lockdown` ones).
    pub watch_locked: bool,
}

/// `guard.after_soak`: report a locked user the lockdown denies, or also release and hold it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AfterSoak {
    /// Report the user (log, metric, webhook) and leave it locked.
    Alert,
    /// Also take the user out of the group and hold it.
    Release,
}

/// `store`: where the SQLite ledger and evidence live.
#[derive(Debug, Clone, PartialEq)]
pub struct Store {
    /// The SQLite database file.
    pub path: PathBuf,
}

/// `listeners`: the admin API and metrics addresses, the token and the webhook.
#[derive(Debug, Clone, PartialEq)]
pub struct Listeners {
    /// The admin API's address (bearer token).
    pub admin: SocketAddr,
    /// The address of `/metrics`, `/healthz` and `/readyz`.
    pub metrics: SocketAddr,
    /// A file holding the admin token (preferred over `token_env`).
    pub token_file: Option<PathBuf>,
    /// The environment variable holding the admin token when no file is given.
    pub token_env: String,
    /// Where rollout events are POSTed, if anywhere.
    pub webhook_url: Option<String>,
    /// The admin API may listen on a non-loopback address (plain HTTP: only behind a TLS proxy).
    pub allow_remote_admin: bool,
}

/// One thing wrong with the file, located as precisely as the YAML allows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// The configuration file.
    pub file: PathBuf,
    /// 1-based line of the offending value, when the YAML locates it.
    pub line: Option<usize>,
    /// 1-based column of the offending value, when the YAML locates it.
    pub column: Option<usize>,
    /// The setting's dotted path (`guard.window`); empty for the file as a whole.
    pub path: String,
    /// What is wrong, with the accepted bounds.
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let (Some(line), Some(column)) = (self.line, self.column) {
            write!(f, ":{line}:{column}")?;
        }
        if self.path.is_empty() {
            write!(f, ": {}", self.message)
        } else {
            write!(f, ": {}: {}", self.path, self.message)
        }
    }
}

/// A configuration file could not be read, or holds located problems.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {}: {source}", path.display())]
    /// The file could not be read.
    Read {
        /// The file that could not be read.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    #[error("{} problem(s) in {}:\n{}", .0.len(), .0.first().map(|p| p.file.display().to_string()).unwrap_or_default(), render_problems(.0))]
    /// The file was read and parsed; these settings are wrong.
    Invalid(Vec<Problem>),
}

fn render_problems(problems: &[Problem]) -> String {
    problems.iter().map(|p| format!("  {p}")).collect::<Vec<_>>().join("\n")
}

impl ConfigError {
    /// Every located problem found (empty when the file could not be read).
    pub fn problems(&self) -> &[Problem] {
        match self {
            ConfigError::Invalid(problems) => problems,
            ConfigError::Read { .. } => &[],
        }
    }
}

impl Config {
    /// Reads and validates `rollout.yaml`, collecting every problem with its line.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        Config::parse(&read_text(path)?, path)
    }

    /// Parses and validates `text`; `file` only names the source in problems.
    pub fn parse(text: &str, file: &Path) -> Result<Config, ConfigError> {
        let raw: RawConfig = deserialize(text, file)?;
        Checker::run(text, file, |check| check.config(raw))
    }

    /// Loads only what reading trail files needs: `account_id`, `perimeter` and `accounts`
    /// (checked as [`Config::load`] checks them); every other section may be missing and is not
    /// checked. For commands that judge records without rolling anything out (`classify`), which
    /// handle one account: `account`'s perimeter; without one, a file naming several is refused
    /// as a problem at `accounts`.
    pub fn load_perimeter(path: &Path, command: &str, account: Option<&str>) -> Result<Perimeter, ConfigError> {
        let text = read_text(path)?;
        let raw: RawPerimeterFile = deserialize(&text, path)?;
        Checker::run(&text, path, |check| {
            check.account_id(&raw.account_id);
            let perimeter = check.perimeter(raw.perimeter, &raw.account_id);
            let (accounts, _) = check.accounts(raw.accounts, &raw.account_id, &perimeter);
            match account {
                Some(id) => match accounts.into_iter().find(|a| a.id == id) {
                    Some(account) => account.perimeter,
                    None => {
                        check
                            .problem("accounts", format!("account {id} (--account) is not one of the file's accounts"));
                        perimeter
                    }
                },
                None => {
                    if let Err(refused) = single_account(command, &raw.account_id, &perimeter, &accounts) {
                        check.problem("accounts", refused.to_string());
                    }
                    perimeter
                }
            }
        })
    }

    /// This configuration, if it means one account exactly as a file without `accounts` does
    /// (`account_id` with the default credentials and the shared perimeter); otherwise the
    /// refusal for `command`, which handles one account only.
    pub fn single_account(&self, command: &str) -> Result<&Config, MultiAccount> {
        match &self.discovery {
            Some(_) => Err(MultiAccount {
                command: command.to_string(),
                accounts: "the accounts AWS Organizations lists (accounts.discover)".to_string(),
                account_id: self.account_id.clone(),
            }),
            None => single_account(command, &self.account_id, &self.perimeter, &self.accounts).map(|()| self),
        }
    }

    /// The configuration with the accounts AWS Organizations listed added after `accounts.list`'s
    /// (in ID order, excluded ones left out): each reached through the role template, judged by
    /// the shared perimeter plus its `accounts.perimeter` additions, with its OU and tags. A
    /// listed account keeps what the file says, taking the OU and tags it does not set.
    pub fn with_discovered(&self, mut found: Vec<Discovered>) -> Result<Config, NothingDiscovered> {
        let Some(discovery) = &self.discovery else { return Ok(self.clone()) };
        found.sort_by(|a, b| a.id.cmp(&b.id));
        found.dedup_by(|a, b| a.id == b.id);
        let mut config = Config { discovery: None, ..self.clone() };
        let mut excluded = 0;
        for account in found.iter() {
            if discovery.exclude.contains(&account.id) {
                excluded += 1;
                continue;
            }
            if let Some(listed) = config.accounts.iter_mut().find(|a| a.id == account.id) {
                listed.ou = listed.ou.take().or_else(|| account.ou.clone());
                for (key, value) in &account.tags {
                    listed.tags.entry(key.clone()).or_insert_with(|| value.clone());
                }
                continue;
            }
            let access = if account.id == self.account_id {
                Access::Default
            } else {
                Access::AssumeRole {
                    role_arn: discovery.role_template.replace(ACCOUNT_PLACEHOLDER, &account.id),
                    external_id: discovery.external_id.clone(),
                }
            };
            let additions = discovery.additions.get(&account.id).cloned().unwrap_or_default();
            config.accounts.push(Account {
                id: account.id.clone(),
                name: account.name.clone(),
                access,
                perimeter: self.perimeter.for_account(&account.id, &additions),
                tags: account.tags.clone(),
                ou: account.ou.clone(),
            });
        }
        if config.accounts.is_empty() {
            return Err(NothingDiscovered { found: found.len(), excluded });
        }
        Ok(config)
    }

    /// Whether the file names any account but `account_id` with the default credentials and the
    /// shared perimeter (an `accounts` section that means more than the file without one).
    pub fn is_multi_account(&self) -> bool {
        self.single_account("").is_err()
    }

    /// The account `id` names among [`Config::accounts`], or the error listing them.
    pub fn account(&self, id: &str) -> Result<&Account, UnknownAccount> {
        self.accounts.iter().find(|a| a.id == id).ok_or_else(|| UnknownAccount {
            given: id.to_string(),
            accounts: self.accounts.iter().map(|a| a.id.as_str()).collect::<Vec<_>>().join(", "),
        })
    }

    /// This configuration as it applies to one of its accounts: `account_id` is the account's,
    /// the perimeter its merged one, `accounts` the account alone (with its access), and the
    /// store the account's own (see [`Config::store_path_for`]). Every single-account path
    /// (controller, evidence, guard, CLI) runs on such a view unchanged.
    pub fn for_account(&self, account: &Account) -> Config {
        Config {
            account_id: account.id.clone(),
            accounts: vec![account.clone()],
            perimeter: account.perimeter.clone(),
            store: Store { path: self.store_path_for(&account.id) },
            discovery: None,
            ..self.clone()
        }
    }

    /// Every account's view ([`Config::for_account`]), in the file's order.
    pub fn account_views(&self) -> Vec<Config> {
        self.accounts.iter().map(|account| self.for_account(account)).collect()
    }

    /// How lockstep acts in this configuration's account: the access of its only account (an
    /// account view, or a file without `accounts`); the default credentials otherwise.
    pub fn access(&self) -> &Access {
        match self.accounts.as_slice() {
            [only] => &only.access,
            _ => &Access::Default,
        }
    }

    /// The store of an account. The account of `account_id` keeps `store.path` itself, so the
    /// store of a single-account rollout becomes that account's store in an organisation
    /// unchanged; every other account's store sits beside it, named with the account
    /// (`lockstep.db` → `lockstep-111122223333.db`).
    pub fn store_path_for(&self, account: &str) -> PathBuf {
        if account == self.account_id {
            return self.store.path.clone();
        }
        let path = &self.store.path;
        let stem = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
        let name = match path.extension() {
            Some(ext) => format!("{stem}-{account}.{}", ext.to_string_lossy()),
            None => format!("{stem}-{account}"),
        };
        path.with_file_name(name)
    }
}

/// `accounts.discover`: which accounts AWS Organizations is asked for, and how a discovered
/// account is reached and judged (the role template, exclusions and perimeter additions).
#[derive(Debug, Clone, PartialEq)]
pub struct Discovery {
    /// Only the accounts directly in these OUs (or roots); empty: every account of the organisation.
    pub ous: Vec<String>,
    role_template: String,
    external_id: Option<String>,
    exclude: HashSet<String>,
    additions: BTreeMap<String, Additions>,
}

/// An active account AWS Organizations listed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Discovered {
    /// The 12-digit account ID.
    pub id: String,
    /// The account's name in the organisation.
    pub name: Option<String>,
    /// The OU it sits in directly, if not the root.
    pub ou: Option<String>,
    /// The account's tags.
    pub tags: BTreeMap<String, String>,
}

/// Discovery found no account to roll out (after `accounts.exclude`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "accounts.discover found no account to roll out ({found} listed by AWS Organizations, {excluded} excluded, none listed in accounts.list)"
)]
pub struct NothingDiscovered {
    /// Active accounts Organizations listed.
    pub found: usize,
    /// Of those, excluded.
    pub excluded: usize,
}

/// An account ID that is not among the configuration's accounts.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("account {given} is not in the configuration's accounts ({accounts})")]
pub struct UnknownAccount {
    /// The ID given.
    pub given: String,
    /// The accounts configured, comma-separated.
    pub accounts: String,
}

fn single_account(
    command: &str,
    account_id: &str,
    shared: &Perimeter,
    accounts: &[Account],
) -> Result<(), MultiAccount> {
    match accounts {
        [only] if only.id == account_id && only.access == Access::Default && only.perimeter == *shared => Ok(()),
        _ => Err(MultiAccount {
            command: command.to_string(),
            accounts: accounts.iter().map(|a| a.id.as_str()).collect::<Vec<_>>().join(", "),
            account_id: account_id.to_string(),
        }),
    }
}

/// The largest configuration file read, and the limits on its YAML shape, checked before the
/// document is deserialized: nesting depth, and nodes counted with every alias expanded (a
/// "billion laughs" document is refused after reading its text once, in bounded memory).
pub(crate) const MAX_CONFIG_BYTES: u64 = 1 << 20;
const MAX_DEPTH: usize = 32;
const MAX_EXPANDED_NODES: u64 = 100_000;

/// Reads at most [`MAX_CONFIG_BYTES`] of a regular file (a FIFO or device would block or never end).
fn read_text(path: &Path) -> Result<String, ConfigError> {
    use std::io::Read;
    let unreadable = |source| ConfigError::Read { path: path.to_path_buf(), source };
    let metadata = std::fs::metadata(path).map_err(unreadable)?;
    if !metadata.is_file() {
        return Err(unreadable(std::io::Error::other("not a regular file")));
    }
    let mut text = String::new();
    std::fs::File::open(path)
        .and_then(|file| file.take(MAX_CONFIG_BYTES + 1).read_to_string(&mut text))
        .map_err(unreadable)?;
    if text.len() as u64 > MAX_CONFIG_BYTES {
        return Err(ConfigError::Invalid(vec![Problem {
            file: path.to_path_buf(),
            line: None,
            column: None,
            path: String::new(),
            message: format!("the file is larger than {MAX_CONFIG_BYTES} bytes; a configuration is a few KiB"),
        }]));
    }
    Ok(text)
}

/// Checks the YAML shape within the limits, then deserializes the raw document.
fn deserialize<T: serde::de::DeserializeOwned>(text: &str, file: &Path) -> Result<T, ConfigError> {
    let problem = |line, column, message| {
        ConfigError::Invalid(vec![Problem { file: file.to_path_buf(), line, column, path: String::new(), message }])
    };
    if text.len() as u64 > MAX_CONFIG_BYTES {
        return Err(problem(None, None, format!("the document is larger than {MAX_CONFIG_BYTES} bytes")));
    }
    if let Err((why, at)) = check_shape(text) {
        return Err(problem(Some(at.line()), Some(at.col() + 1), why));
    }
    serde_yaml::from_str(text).map_err(|e| {
        let location = e.location();
        let message = e.to_string();
        // serde_yaml prefixes the key path ("waves[0]: ...") and appends the location.
        let (path, message) = split_serde_message(&message);
        ConfigError::Invalid(vec![Problem {
            file: file.to_path_buf(),
            line: location.as_ref().map(|l| l.line()),
            column: location.as_ref().map(|l| l.column()),
            path,
            message,
        }])
    })
}

/// Walks the YAML events once, without building anything: refuses nesting deeper than
/// [`MAX_DEPTH`] and more than [`MAX_EXPANDED_NODES`] nodes once aliases are expanded. A
/// document this parser cannot read is refused too, so no shape escapes the count.
fn check_shape(text: &str) -> Result<(), (String, yaml_rust2::scanner::Marker)> {
    use yaml_rust2::Event;
    let mut parser = yaml_rust2::parser::Parser::new_from_str(text);
    // Expanded size of each anchored node, and of each open collection so far.
    let mut anchored: std::collections::HashMap<usize, u64> = std::collections::HashMap::new();
    let mut open: Vec<(usize, u64)> = Vec::new();
    let mut total: u64 = 0;
    loop {
        let (event, at) = parser.next_token().map_err(|e| (format!("not valid YAML: {}", e.info()), *e.marker()))?;
        // A finished node: its anchor and its size with aliases expanded.
        let finished = match event {
            Event::StreamEnd => return Ok(()),
            Event::Scalar(_, _, anchor, _) => {
                total = total.saturating_add(1);
                Some((anchor, 1))
            }
            Event::Alias(id) => {
                let size = anchored.get(&id).copied().unwrap_or(1);
                total = total.saturating_add(size);
                Some((0, size))
            }
            Event::MappingStart(anchor, _) | Event::SequenceStart(anchor, _) => {
                open.push((anchor, 1));
                total = total.saturating_add(1);
                if open.len() > MAX_DEPTH {
                    return Err((format!("nested deeper than {MAX_DEPTH} levels"), at));
                }
                None
            }
            // The collection and its children were counted as they came.
            Event::MappingEnd | Event::SequenceEnd => open.pop(),
            _ => None,
        };
        if let Some((anchor, size)) = finished {
            if anchor != 0 {
                anchored.insert(anchor, size);
            }
            if let Some((_, parent)) = open.last_mut() {
                *parent = parent.saturating_add(size);
            }
        }
        if total > MAX_EXPANDED_NODES {
            return Err((format!("more than {MAX_EXPANDED_NODES} values once aliases are expanded"), at));
        }
    }
}

fn split_serde_message(message: &str) -> (String, String) {
    let message = match message.rfind(" at line ") {
        Some(at) => &message[..at],
        None => message,
    };
    match message.split_once(": ") {
        Some((path, rest)) if !path.contains(' ') => (path.to_string(), rest.to_string()),
        _ => (String::new(), message.to_string()),
    }
}

// ---------------------------------------------------------------------------------------------
// Raw document: what serde reads before validation.

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    account_id: String,
    region: String,
    lockdown: RawLockdown,
    perimeter: RawPerimeter,
    #[serde(default)]
    evidence: RawEvidence,
    #[serde(default)]
    eligibility: RawEligibility,
    #[serde(default)]
    waves: Vec<RawWave>,
    #[serde(default)]
    rollout: RawRollout,
    #[serde(default)]
    guard: RawGuard,
    #[serde(default)]
    store: RawStore,
    #[serde(default)]
    listeners: RawListeners,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    accounts: Option<RawAccounts>,
}

/// The part of the file `load_perimeter` reads; other keys are ignored, not checked.
#[derive(Debug, Deserialize)]
struct RawPerimeterFile {
    account_id: String,
    perimeter: RawPerimeter,
    #[serde(default)]
    accounts: Option<RawAccounts>,
}

/// `accounts`: the accounts rolled out, how to reach them, and their own perimeter additions.
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct RawAccounts {
    /// Role ARN template with `{account}`, assumed in every listed account but `account_id`'s.
    #[serde(default)]
    role: Option<String>,
    #[serde(default)]
    external_id: Option<String>,
    #[serde(default)]
    list: Vec<RawAccount>,
    #[serde(default)]
    exclude: Vec<String>,
    /// Account ID -> its own VPCs and endpoints.
    #[serde(default)]
    perimeter: BTreeMap<String, RawAdditions>,
    /// AWS Organizations discovery.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    discover: Option<RawDiscover>,
}

#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct RawDiscover {
    /// OU (or root) IDs; none: the whole organisation.
    #[serde(default)]
    ous: Vec<String>,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct RawAccount {
    id: String,
    #[serde(default)]
    name: Option<String>,
    /// This account's role, instead of the template's.
    #[serde(default)]
    role: Option<String>,
    /// Tags wave selectors can match (`select.account_tag`).
    #[serde(default)]
    tags: BTreeMap<String, String>,
    /// The organisational unit (`ou-...`) wave selectors can match (`select.ou`).
    #[serde(default)]
    ou: Option<String>,
}

#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct RawAdditions {
    #[serde(default)]
    trusted_vpcs: Vec<String>,
    #[serde(default)]
    trusted_vpc_endpoints: BTreeMap<String, String>,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct RawLockdown {
    group: String,
    policy_name: String,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct RawPerimeter {
    #[serde(default)]
    trusted_vpcs: Vec<String>,
    #[serde(default)]
    trusted_vpc_endpoints: BTreeMap<String, String>,
    #[serde(default)]
    trusted_cidrs: Vec<String>,
    #[serde(default = "yes")]
    allow_aws_service_calls: bool,
    #[serde(default = "default_called_via")]
    called_via_services: Vec<String>,
    #[serde(default = "yes")]
    allow_presigned_s3_reads: bool,
    #[serde(default)]
    exempt_tag_key: Option<String>,
    #[serde(default = "default_not_actions")]
    not_actions: Vec<String>,
    /// The widest trusted IPv4 range accepted (a prefix length); wider ones are refused.
    #[serde(default = "default_widest_ipv4_prefix")]
    widest_ipv4_prefix: i64,
    #[serde(default = "default_widest_ipv6_prefix")]
    widest_ipv6_prefix: i64,
}

fn yes() -> bool {
    true
}
fn default_called_via() -> Vec<String> {
    vec!["athena.amazonaws.com".to_string()]
}
fn default_not_actions() -> Vec<String> {
    DEFAULT_NOT_ACTIONS.iter().map(|s| s.to_string()).collect()
}
fn default_widest_ipv4_prefix() -> i64 {
    8
}
fn default_widest_ipv6_prefix() -> i64 {
    32
}

macro_rules! raw_section {
    ($name:ident { $($field:ident : $ty:ty = $default:expr),* $(,)? }) => {
        #[derive(Debug, Deserialize, Serialize)]
        #[serde(deny_unknown_fields, default)]
        struct $name { $($field: $ty),* }
        impl Default for $name {
            fn default() -> Self { Self { $($field: $default.into()),* } }
        }
    };
}

raw_section!(RawEvidence {
    source: String = "files",
    files: RawFiles = RawFiles::default(),
    s3: Option<RawS3> = None,
    athena: Option<RawAthena> = None,
    schedule: String = "0 5 * * * *",
    overlap: String = "2h",
    lookback: String = "14d",
    retention: String = "90d",
    max_inflated_size: String = "256MiB",
});

raw_section!(RawFiles { path: String = "./trail" });

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct RawS3 {
    bucket: String,
    #[serde(default)]
    prefix: String,
}

raw_section!(RawAthena {
    database: String = "default",
    table: String = "cloudtrail_logs",
    workgroup: String = "primary",
    output_location: String = "",
    partitioning: String = "projected",
    account_partition: Option<String> = None,
    poll_interval: String = "1s",
    timeout: String = "10m",
});

raw_section!(RawEligibility {
    window: String = "14d",
    min_history: String = "7d",
    min_calls: i64 = 20,
    max_would_deny: i64 = 0,
    quiet_for: String = "7d",
    max_evidence_age: String = "3h",
    exclude_users: Vec<String> = Vec::new(),
    hold_expiry: String = "14d",
});

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct RawWave {
    name: String,
    batch_size: i64,
    soak: String,
    #[serde(default)]
    batches: Option<i64>,
    #[serde(default)]
    select: RawSelector,
}

#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct RawSelector {
    path_prefix: Option<String>,
    user_glob: Option<String>,
    tag: Option<RawTag>,
    #[serde(default)]
    accounts: Vec<String>,
    account_tag: Option<RawTag>,
    ou: Option<String>,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct RawTag {
    key: String,
    value: String,
}

raw_section!(RawRollout {
    max_promotions_per_day: i64 = 50,
    max_soaking_batches: i64 = 1,
    max_promotions_per_day_per_account: Option<i64> = None,
});

raw_section!(RawGuard {
    source: String = "files",
    poll: String = "1m",
    grace: String = "1h",
    window: String = "15m",
    min_affected_users: i64 = 1,
    min_denials: i64 = 3,
    silence_limit: String = "30m",
    requeue_after: Option<String> = None,
    after_soak: String = "alert",
    delivery_lag: String = "5m",
    false_alarm_budget: f64 = 0.001,
    watch_locked: bool = true,
});

raw_section!(RawStore { path: String = "./lockstep.db" });

raw_section!(RawListeners {
    admin: String = "127.0.0.1:9440",
    metrics: String = "127.0.0.1:9441",
    token_file: Option<String> = None,
    token_env: String = "LOCKSTEP_ADMIN_TOKEN",
    webhook_url: Option<String> = None,
    allow_remote_admin: bool = false,
});

// ---------------------------------------------------------------------------------------------
// Bounds: every value that validates is safe to run with.

const fn minutes(n: u64) -> Duration {
    Duration::from_secs(n * 60)
}
const fn hours(n: u64) -> Duration {
    Duration::from_secs(n * 3_600)
}
const fn days(n: u64) -> Duration {
    Duration::from_secs(n * 86_400)
}

/// No duration setting may exceed this. With it, `now ± duration` stays far inside chrono's
/// range (about ±262,000 years) for any clock reading, so time arithmetic cannot overflow.
pub(crate) const LONGEST_SPAN: Duration = days(3_650);

/// Inclusive bounds of one duration setting.
#[derive(Debug, Clone, Copy)]
struct Span(Duration, Duration);

/// Inclusive bounds of one count setting.
#[derive(Debug, Clone, Copy)]
struct Count(i64, i64);

const OVERLAP: Span = Span(minutes(1), days(7));
const LOOKBACK: Span = Span(hours(1), days(400));
const RETENTION: Span = Span(days(1), LONGEST_SPAN);
const ATHENA_POLL: Span = Span(Duration::from_secs(1), minutes(5));
const ATHENA_TIMEOUT: Span = Span(Duration::from_secs(10), hours(24));
const ELIGIBILITY_WINDOW: Span = Span(hours(1), days(400));
const MIN_HISTORY: Span = Span(hours(1), days(400));
const QUIET_FOR: Span = Span(minutes(1), days(400));
const MAX_EVIDENCE_AGE: Span = Span(minutes(1), days(30));
const HOLD_EXPIRY: Span = Span(hours(1), LONGEST_SPAN);
// Seconds-long soaks are for tests and demos against an emulator; production soaks are hours.
const SOAK: Span = Span(Duration::from_secs(1), days(365));
const GUARD_POLL: Span = Span(Duration::from_secs(1), hours(1));
const GUARD_GRACE: Span = Span(minutes(1), days(30));
const GUARD_WINDOW: Span = Span(minutes(1), days(7));
const SILENCE_LIMIT: Span = Span(minutes(1), days(7));
const DELIVERY_LAG: Span = Span(Duration::ZERO, hours(6));

const CALLS: Count = Count(0, 1_000_000_000);
const WAVES: Count = Count(1, 1_000);
const BATCH_SIZE: Count = Count(1, 10_000);
const BATCHES: Count = Count(1, 1_000_000);
const PROMOTIONS_PER_DAY: Count = Count(1, 100_000);
const SOAKING_BATCHES: Count = Count(1, 1_000);
const AFFECTED_USERS: Count = Count(1, 100_000);
const DENIALS: Count = Count(1, 1_000_000_000);
const EXCLUDED_USERS: Count = Count(0, 100_000);

/// Bounds of `evidence.max_inflated_size`. The default (256 MiB) is far above real CloudTrail
/// files (a few MiB inflated); the ceiling is also the most a source fetches of one object.
pub(crate) const DEFAULT_MAX_INFLATED_SIZE: u64 = 256 << 20;
pub(crate) const MIN_INFLATED_SIZE: u64 = 1 << 20;
pub(crate) const MAX_INFLATED_SIZE: u64 = 1 << 30;

/// How often the evidence schedule must fire at least: a schedule with no occurrence within
/// this long after 2001-01-01 (a common year), such as February 30th, or February 29th only,
/// never runs in practice.
const SCHEDULE_HORIZON: Duration = days(366);

/// IAM group and managed policy names: `[\w+=,.@-]{1,128}`.
fn is_iam_name(text: &str) -> bool {
    (1..=128).contains(&text.len()) && text.bytes().all(|b| b.is_ascii_alphanumeric() || b"_+=,.@-".contains(&b))
}

/// An IAM path prefix: starts with `/`, printable ASCII without spaces, at most 512 characters.
fn is_iam_path_prefix(text: &str) -> bool {
    text.starts_with('/') && text.len() <= 512 && text.bytes().all(|b| (0x21..=0x7e).contains(&b))
}

/// `at + span`, saturating at the end of chrono's range instead of panicking. Bounded settings
/// never reach the saturation; this guards computed spans too.
pub fn later(at: chrono::DateTime<chrono::Utc>, span: Duration) -> chrono::DateTime<chrono::Utc> {
    chrono::TimeDelta::from_std(span)
        .ok()
        .and_then(|span| at.checked_add_signed(span))
        .unwrap_or(chrono::DateTime::<chrono::Utc>::MAX_UTC)
}

/// `at - span`, saturating at the start of chrono's range instead of panicking (the
/// counterpart of [`later`]).
pub fn earlier(at: chrono::DateTime<chrono::Utc>, span: Duration) -> chrono::DateTime<chrono::Utc> {
    chrono::TimeDelta::from_std(span)
        .ok()
        .and_then(|span| at.checked_sub_signed(span))
        .unwrap_or(chrono::DateTime::<chrono::Utc>::MIN_UTC)
}

/// Sizes as operators write them: `1048576`, `512KiB`, `256MiB`, `1GiB`.
pub(crate) fn parse_size(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let digits = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
    let (number, unit) = text.split_at(digits);
    let number: u64 = number.parse().map_err(|_| format!("expected a size like 256MiB, got {text:?}"))?;
    let shift = match unit.trim() {
        "" | "B" => 0,
        "KiB" => 10,
        "MiB" => 20,
        "GiB" => 30,
        other => return Err(format!("unknown size unit {other:?} (use B, KiB, MiB or GiB)")),
    };
    number.checked_mul(1 << shift).ok_or_else(|| format!("size {text:?} is too large"))
}

/// Shows a bound the way an operator writes it.
fn shown(d: Duration) -> String {
    let secs = d.as_secs();
    match secs {
        0 => format!("{}ms", d.as_millis()),
        _ if secs.is_multiple_of(86_400) => format!("{}d", secs / 86_400),
        _ if secs.is_multiple_of(3_600) => format!("{}h", secs / 3_600),
        _ if secs.is_multiple_of(60) => format!("{}m", secs / 60),
        _ => format!("{secs}s"),
    }
}

// ---------------------------------------------------------------------------------------------
// Validation.

struct Checker<'a> {
    file: &'a Path,
    locator: &'a Locator,
    problems: Vec<Problem>,
}

impl Checker<'_> {
    /// Runs `check` over a deserialized document; its result is valid only if nothing was found.
    fn run<T>(text: &str, file: &Path, check: impl FnOnce(&mut Checker) -> T) -> Result<T, ConfigError> {
        let locator = Locator::index(text);
        let mut checker = Checker { file, locator: &locator, problems: Vec::new() };
        let checked = check(&mut checker);
        if checker.problems.is_empty() { Ok(checked) } else { Err(ConfigError::Invalid(checker.problems)) }
    }

    fn account_id(&mut self, account_id: &str) {
        if !is_account_id(account_id) {
            self.problem("account_id", format!("expected a 12-digit AWS account ID, got {account_id:?}"));
        }
    }

    fn problem(&mut self, path: &str, message: impl Into<String>) {
        let (line, column) = self.locator.find(path);
        self.problems.push(Problem {
            file: self.file.to_path_buf(),
            line,
            column,
            path: path.to_string(),
            message: message.into(),
        });
    }

    fn duration(&mut self, path: &str, text: &str, Span(min, max): Span) -> Duration {
        match parse_duration(text) {
            Ok(d) if d < min || d > max => {
                self.problem(path, format!("expected a duration from {} to {}, got {text:?}", shown(min), shown(max)));
                min
            }
            Ok(d) => d,
            Err(why) => {
                self.problem(path, format!("expected a duration such as 30s, 15m, 24h or 7d: {why}"));
                min
            }
        }
    }

    /// A count within `Count(min, max)`; out-of-range values report the range and read as `min`.
    fn count(&mut self, path: &str, value: i64, Count(min, max): Count) -> usize {
        if value < min || value > max {
            let expected = if min == 0 { format!("from 0 to {max}") } else { format!("from {min} to {max}") };
            self.problem(path, format!("expected a number {expected}, got {value}"));
            return usize::try_from(min).unwrap_or(0);
        }
        usize::try_from(value).unwrap_or(0)
    }

    fn size(&mut self, path: &str, text: &str) -> u64 {
        match parse_size(text) {
            Ok(size) if (MIN_INFLATED_SIZE..=MAX_INFLATED_SIZE).contains(&size) => size,
            Ok(_) => {
                self.problem(path, format!("expected a size from 1MiB to 1GiB, got {text:?}"));
                DEFAULT_MAX_INFLATED_SIZE
            }
            Err(why) => {
                self.problem(path, why);
                DEFAULT_MAX_INFLATED_SIZE
            }
        }
    }

    /// A prefix length from 1 to `bits` (a /0 range is never trusted).
    fn prefix_length(&mut self, path: &str, value: i64, bits: u8) -> u8 {
        match u8::try_from(value) {
            Ok(length) if (1..=bits).contains(&length) => length,
            _ => {
                self.problem(path, format!("expected a prefix length from 1 to {bits}, got {value}"));
                bits
            }
        }
    }

    fn iam_name(&mut self, path: &str, value: &str) {
        if !is_iam_name(value) {
            self.problem(
                path,
                format!("expected an IAM name of 1 to 128 letters, digits and _+=,.@- characters, got {value:?}"),
            );
        }
    }

    fn non_empty(&mut self, path: &str, value: &str) {
        if value.trim().is_empty() {
            self.problem(path, "expected a non-empty value");
        }
    }

    fn source(&mut self, path: &str, text: &str) -> SourceKind {
        match text {
            "files" => SourceKind::Files,
            "s3" => SourceKind::S3,
            "athena" => SourceKind::Athena,
            other => {
                self.problem(path, format!("expected one of files, s3, athena; got {other:?}"));
                SourceKind::Files
            }
        }
    }

    fn config(&mut self, raw: RawConfig) -> Config {
        self.account_id(&raw.account_id);
        self.non_empty("region", &raw.region);
        self.iam_name("lockdown.group", &raw.lockdown.group);
        self.iam_name("lockdown.policy_name", &raw.lockdown.policy_name);
        let perimeter = self.perimeter(raw.perimeter, &raw.account_id);
        let evidence = self.evidence(raw.evidence);
        let eligibility = self.eligibility(raw.eligibility);
        if evidence.retention < eligibility.window {
            self.problem(
                "evidence.retention",
                format!(
                    "retention ({}) is shorter than eligibility.window ({}): evidence would be dropped before it is judged",
                    shown(evidence.retention),
                    shown(eligibility.window)
                ),
            );
        }
        let waves = self.waves(raw.waves);
        let rollout = RolloutLimits {
            max_promotions_per_day: self.count(
                "rollout.max_promotions_per_day",
                raw.rollout.max_promotions_per_day,
                PROMOTIONS_PER_DAY,
            ),
            max_soaking_batches: self.count(
                "rollout.max_soaking_batches",
                raw.rollout.max_soaking_batches,
                SOAKING_BATCHES,
            ),
            max_promotions_per_day_per_account: raw
                .rollout
                .max_promotions_per_day_per_account
                .map(|n| self.count("rollout.max_promotions_per_day_per_account", n, PROMOTIONS_PER_DAY)),
        };
        let guard = self.guard(raw.guard, &evidence);
        let listeners = self.listeners(raw.listeners);
        self.non_empty("store.path", &raw.store.path);
        let (accounts, discovery) = self.accounts(raw.accounts, &raw.account_id, &perimeter);
        if discovery.is_none() {
            // Discovered accounts' IDs, tags and OUs are known at start only.
            self.wave_accounts(&waves, &accounts);
        }
        Config {
            account_id: raw.account_id,
            accounts,
            discovery,
            region: raw.region,
            lockdown: Lockdown { group: raw.lockdown.group, policy_name: raw.lockdown.policy_name },
            perimeter,
            evidence,
            eligibility,
            waves,
            rollout,
            guard,
            store: Store { path: PathBuf::from(raw.store.path) },
            listeners,
        }
    }

    fn perimeter(&mut self, raw: RawPerimeter, account_id: &str) -> Perimeter {
        let Additions { trusted_vpcs, trusted_endpoints } =
            self.vpcs("perimeter", &raw.trusted_vpcs, &raw.trusted_vpc_endpoints, None);
        let widest_v4 = self.prefix_length("perimeter.widest_ipv4_prefix", raw.widest_ipv4_prefix, 32);
        let widest_v6 = self.prefix_length("perimeter.widest_ipv6_prefix", raw.widest_ipv6_prefix, 128);
        let mut trusted_cidrs = Vec::new();
        for (i, cidr) in raw.trusted_cidrs.iter().enumerate() {
            let path = format!("perimeter.trusted_cidrs[{i}]");
            let (widest, setting) = match cidr.parse::<IpNet>() {
                Ok(IpNet::V4(_)) => (widest_v4, "perimeter.widest_ipv4_prefix"),
                _ => (widest_v6, "perimeter.widest_ipv6_prefix"),
            };
            match cidr.parse::<IpNet>() {
                Ok(net) if net.trunc() != net => self.problem(
                    &path,
                    format!("{cidr} has host bits set; did you mean {}?", net.trunc()),
                ),
                Ok(net) if net.prefix_len() == 0 => {
                    self.problem(&path, format!("{cidr} trusts every address: the perimeter would deny nothing"))
                }
                Ok(net) if net.prefix_len() < widest => self.problem(
                    &path,
                    format!("{cidr} is wider than /{widest}; trust narrower ranges, or lower {setting} if this is really meant"),
                ),
                Ok(net) => trusted_cidrs.push(net),
                Err(_) => self.problem(&path, format!("expected an IPv4 or IPv6 CIDR like 203.0.113.0/24, got {cidr:?}")),
            }
        }
        for (i, service) in raw.called_via_services.iter().enumerate() {
            if !service.ends_with(".amazonaws.com") || service.contains(char::is_whitespace) {
                self.problem(
                    &format!("perimeter.called_via_services[{i}]"),
                    format!("expected a service principal like athena.amazonaws.com, got {service:?}"),
                );
            }
        }
        for (i, action) in raw.not_actions.iter().enumerate() {
            if !is_action_pattern(action) {
                self.problem(
                    &format!("perimeter.not_actions[{i}]"),
                    format!("expected an IAM action like service:Action (wildcards * and ? allowed), got {action:?}"),
                );
            }
        }
        if let Some(key) = &raw.exempt_tag_key
            && (key.is_empty() || key.len() > 128 || key.contains(char::is_whitespace))
        {
            self.problem("perimeter.exempt_tag_key", format!("expected an IAM tag key without spaces, got {key:?}"));
        }
        let perimeter = Perimeter {
            account_id: account_id.to_string(),
            trusted_vpcs,
            trusted_endpoints,
            trusted_cidrs,
            allow_aws_service_calls: raw.allow_aws_service_calls,
            called_via_services: raw.called_via_services,
            allow_presigned_s3_reads: raw.allow_presigned_s3_reads,
            exempt_tag_key: raw.exempt_tag_key,
            not_actions: raw.not_actions,
        };
        if let Err(too_large) = perimeter.policy().to_json() {
            self.problem("perimeter", too_large.to_string());
        }
        perimeter
    }

    /// `<section>.trusted_vpcs` and `<section>.trusted_vpc_endpoints`: well-formed IDs, each
    /// endpoint mapped to a VPC trusted here or, for an account's additions, in the `shared`
    /// perimeter, which the additions must not repeat.
    fn vpcs(
        &mut self,
        section: &str,
        vpcs: &[String],
        endpoints: &BTreeMap<String, String>,
        shared: Option<&Perimeter>,
    ) -> Additions {
        let mut trusted = Additions::default();
        for (i, vpc) in vpcs.iter().enumerate() {
            let path = format!("{section}.trusted_vpcs[{i}]");
            if !is_aws_id(vpc, "vpc-") {
                self.problem(&path, format!("expected a VPC ID like vpc-0a1b2c3d (8 or 17 hex digits), got {vpc:?}"));
            } else if shared.is_some_and(|p| p.trusted_vpcs.contains(vpc)) {
                self.problem(&path, format!("{vpc} is already trusted for every account in perimeter.trusted_vpcs"));
            } else {
                trusted.trusted_vpcs.push(vpc.clone());
            }
        }
        let known = |vpc: &String| vpcs.contains(vpc) || shared.is_some_and(|p| p.trusted_vpcs.contains(vpc));
        let where_trusted = match shared {
            Some(_) => format!("perimeter.trusted_vpcs or {section}.trusted_vpcs"),
            None => format!("{section}.trusted_vpcs"),
        };
        for (endpoint, vpc) in endpoints {
            let path = format!("{section}.trusted_vpc_endpoints.{endpoint}");
            if !is_aws_id(endpoint, "vpce-") {
                self.problem(
                    &path,
                    format!("expected a VPC endpoint ID like vpce-0a1b2c3d4e5f60718 as the key, got {endpoint:?}"),
                );
            } else if !is_aws_id(vpc, "vpc-") {
                self.problem(&path, format!("expected the endpoint's VPC ID like vpc-0a1b2c3d, got {vpc:?}"));
            } else if !known(vpc) {
                self.problem(&path, format!("endpoint is mapped to {vpc}, which is not in {where_trusted}"));
            } else if shared.is_some_and(|p| p.trusted_endpoints.contains_key(endpoint)) {
                self.problem(
                    &path,
                    format!("{endpoint} is already trusted for every account in perimeter.trusted_vpc_endpoints"),
                );
            } else {
                trusted.trusted_endpoints.insert(endpoint.clone(), vpc.clone());
            }
        }
        trusted
    }

    /// `accounts`: without it, `account_id` alone with the default credentials and the shared
    /// perimeter, exactly as before the section existed.
    fn accounts(
        &mut self,
        raw: Option<RawAccounts>,
        account_id: &str,
        shared: &Perimeter,
    ) -> (Vec<Account>, Option<Discovery>) {
        let Some(raw) = raw else {
            return (
                vec![Account {
                    id: account_id.to_string(),
                    name: None,
                    access: Access::Default,
                    perimeter: shared.clone(),
                    tags: BTreeMap::new(),
                    ou: None,
                }],
                None,
            );
        };
        let discovering = raw.discover.is_some();
        if let Some(discover) = &raw.discover {
            if raw.role.is_none() {
                self.problem(
                    "accounts.discover",
                    format!("discovered accounts are reached through accounts.role: set it (such as arn:aws:iam::{ACCOUNT_PLACEHOLDER}:role/lockstep-rollout)"),
                );
            }
            for (i, ou) in discover.ous.iter().enumerate() {
                if !is_ou_id(ou) && !is_root_id(ou) {
                    self.problem(
                        &format!("accounts.discover.ous[{i}]"),
                        format!("expected an OU ID (ou-ab12-cd34ef56) or a root ID (r-ab12), got {ou:?}"),
                    );
                }
            }
        } else if raw.list.is_empty() {
            self.problem("accounts.list", "expected at least one account: - id: \"123456789012\"");
        }
        if let Some(template) = &raw.role {
            self.role_template(template);
        }
        if let Some(external_id) = &raw.external_id
            && !is_external_id(external_id)
        {
            self.problem(
                "accounts.external_id",
                "expected 2 to 1224 letters, digits and _+=,.@:/- characters (the role's sts:ExternalId)",
            );
        }
        let listed = self.account_list(&raw.list, account_id);
        let excluded = self.exclusions(&raw.exclude, &listed, discovering);
        let mut additions = BTreeMap::new();
        for (id, add) in &raw.perimeter {
            let section = format!("accounts.perimeter.{id}");
            if discovering && !is_account_id(id) {
                self.problem(&section, format!("expected a 12-digit AWS account ID, got {id:?}"));
            } else if !discovering && !listed.contains_key(id.as_str()) {
                self.problem(&section, format!("no account {id} in accounts.list"));
            }
            let add = self.vpcs(&section, &add.trusted_vpcs, &add.trusted_vpc_endpoints, Some(shared));
            additions.insert(id.as_str(), add);
        }
        let mut accounts = Vec::new();
        for (i, entry) in raw.list.iter().enumerate() {
            if listed.get(entry.id.as_str()) != Some(&i) || excluded.contains(entry.id.as_str()) {
                continue;
            }
            let access = if entry.id == account_id {
                Access::Default
            } else if let Some(role_arn) =
                entry.role.clone().or_else(|| raw.role.as_ref().map(|t| t.replace(ACCOUNT_PLACEHOLDER, &entry.id)))
            {
                Access::AssumeRole { role_arn, external_id: raw.external_id.clone() }
            } else {
                self.problem(
                    &format!("accounts.list[{i}].id"),
                    format!(
                        "no role to assume in {}: set accounts.role (such as arn:aws:iam::{ACCOUNT_PLACEHOLDER}:role/lockstep-rollout) or this account's role",
                        entry.id
                    ),
                );
                continue;
            };
            let perimeter =
                shared.for_account(&entry.id, additions.get(entry.id.as_str()).unwrap_or(&Additions::default()));
            if let Err(too_large) = perimeter.policy().to_json() {
                self.problem(&format!("accounts.perimeter.{}", entry.id), too_large.to_string());
            }
            if let Some(ou) = &entry.ou
                && !is_ou_id(ou)
            {
                self.problem(
                    &format!("accounts.list[{i}].ou"),
                    format!("expected an OU ID such as ou-ab12-cd34ef56, got {ou:?}"),
                );
            }
            accounts.push(Account {
                id: entry.id.clone(),
                name: entry.name.clone(),
                access,
                perimeter,
                tags: entry.tags.clone(),
                ou: entry.ou.clone(),
            });
        }
        if !discovering && !listed.is_empty() && listed.keys().all(|id| excluded.contains(id)) {
            self.problem("accounts.exclude", "every listed account is excluded: nothing would be rolled out");
        }
        let discovery = raw.discover.map(|discover| Discovery {
            ous: discover.ous,
            role_template: raw.role.clone().unwrap_or_default(),
            external_id: raw.external_id.clone(),
            exclude: raw.exclude.iter().cloned().collect(),
            additions: additions.into_iter().map(|(id, add)| (id.to_string(), add)).collect(),
        });
        (accounts, discovery)
    }

    /// `accounts.list`: each well-formed account ID once, names unique, roles in their own
    /// account. Returns each valid ID with the index of its first entry.
    fn account_list<'r>(&mut self, list: &'r [RawAccount], account_id: &str) -> BTreeMap<&'r str, usize> {
        let mut listed = BTreeMap::new();
        let mut names = BTreeMap::new();
        for (i, entry) in list.iter().enumerate() {
            let path = format!("accounts.list[{i}]");
            if !is_account_id(&entry.id) {
                self.problem(&format!("{path}.id"), format!("expected a 12-digit AWS account ID, got {:?}", entry.id));
            } else if let Some(first) = listed.get(entry.id.as_str()) {
                self.problem(
                    &format!("{path}.id"),
                    format!("account {} is listed twice (first as accounts.list[{first}])", entry.id),
                );
            } else {
                listed.insert(entry.id.as_str(), i);
            }
            if let Some(name) = &entry.name {
                if name.trim().is_empty() || name.chars().count() > 50 || name.chars().any(char::is_control) {
                    self.problem(
                        &format!("{path}.name"),
                        format!("expected a name of 1 to 50 printable characters, got {name:?}"),
                    );
                } else if let Some(first) = names.insert(name.as_str(), i) {
                    self.problem(
                        &format!("{path}.name"),
                        format!("name {name:?} is already used by accounts.list[{first}]"),
                    );
                }
            }
            if let Some(role) = &entry.role {
                if entry.id == account_id {
                    self.problem(
                        &format!("{path}.role"),
                        "account_id's account is reached with the default credentials, never through a role; remove this role",
                    );
                } else if role_arn_account(role) != Some(entry.id.as_str()) {
                    self.problem(
                        &format!("{path}.role"),
                        format!("expected the ARN of a role in account {}, such as arn:aws:iam::{}:role/lockstep-rollout, got {role:?}", entry.id, entry.id),
                    );
                }
            }
        }
        listed
    }

    /// `accounts.exclude`: listed accounts, each once.
    fn exclusions<'r>(
        &mut self,
        exclude: &'r [String],
        listed: &BTreeMap<&str, usize>,
        discovering: bool,
    ) -> HashSet<&'r str> {
        let mut excluded = HashSet::new();
        for (i, id) in exclude.iter().enumerate() {
            let path = format!("accounts.exclude[{i}]");
            if !is_account_id(id) {
                self.problem(&path, format!("expected a 12-digit AWS account ID, got {id:?}"));
            } else if !discovering && !listed.contains_key(id.as_str()) {
                self.problem(
                    &path,
                    format!("account {id} is not in accounts.list; only listed accounts can be excluded"),
                );
            } else if !excluded.insert(id.as_str()) {
                self.problem(&path, format!("account {id} is excluded twice"));
            }
        }
        excluded
    }

    /// `accounts.role`: a role ARN whose account is `{account}`.
    fn role_template(&mut self, template: &str) {
        const SAMPLE: &str = "000000000000";
        let example = format!("arn:aws:iam::{ACCOUNT_PLACEHOLDER}:role/lockstep-rollout");
        if !template.contains(ACCOUNT_PLACEHOLDER) {
            self.problem(
                "accounts.role",
                format!("expected a role ARN template with {ACCOUNT_PLACEHOLDER}, such as {example}, got {template:?}"),
            );
        } else if role_arn_account(&template.replace(ACCOUNT_PLACEHOLDER, SAMPLE)) != Some(SAMPLE) {
            self.problem(
                "accounts.role",
                format!(
                    "expected a role ARN with {ACCOUNT_PLACEHOLDER} as its account, such as {example}, got {template:?}"
                ),
            );
        }
    }

    fn evidence(&mut self, raw: RawEvidence) -> Evidence {
        let source = self.source("evidence.source", &raw.source);
        if source == SourceKind::S3 && raw.s3.is_none() {
            self.problem("evidence.source", "source is s3 but the evidence.s3 section (bucket, prefix) is missing");
        }
        if source == SourceKind::Athena && raw.athena.is_none() {
            self.problem("evidence.source", "source is athena but the evidence.athena section is missing");
        }
        if let Some(s3) = &raw.s3 {
            self.non_empty("evidence.s3.bucket", &s3.bucket);
        }
        let athena = raw.athena.map(|a| {
            if !a.output_location.starts_with("s3://") {
                self.problem(
                    "evidence.athena.output_location",
                    format!("expected an s3:// URL, got {:?}", a.output_location),
                );
            }
            let names = [("database", &a.database), ("table", &a.table)]
                .into_iter()
                .chain(a.account_partition.as_ref().map(|column| ("account_partition", column)));
            for (key, value) in names {
                if value.is_empty() || !value.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                    self.problem(
                        &format!("evidence.athena.{key}"),
                        format!("expected letters, digits and underscores, got {value:?}"),
                    );
                }
            }
            let partitioning = match a.partitioning.as_str() {
                "projected" => Partitioning::Projected,
                "region_year_month_day" => Partitioning::RegionYearMonthDay,
                other => {
                    self.problem(
                        "evidence.athena.partitioning",
                        format!("expected projected (timestamp yyyy/MM/dd) or region_year_month_day, got {other:?}"),
                    );
                    Partitioning::Projected
                }
            };
            Athena {
                poll_interval: self.duration("evidence.athena.poll_interval", &a.poll_interval, ATHENA_POLL),
                timeout: self.duration("evidence.athena.timeout", &a.timeout, ATHENA_TIMEOUT),
                database: a.database,
                table: a.table,
                workgroup: a.workgroup,
                output_location: a.output_location,
                partitioning,
                account_partition: a.account_partition,
            }
        });
        match parse_cron(&raw.schedule) {
            Err(why) => self.problem(
                "evidence.schedule",
                format!(
                    "expected a cron expression with seconds, like \"0 5 * * * *\" (sec min hour dom month dow): {why}"
                ),
            ),
            Ok(_) if raw.schedule.split_whitespace().count() > 6 => self.problem(
                "evidence.schedule",
                "expected six fields (sec min hour dom month dow); a year field would stop the refresh for good",
            ),
            Ok(cron) if !fires_within(&cron, SCHEDULE_HORIZON) => self.problem(
                "evidence.schedule",
                format!("{:?} never fires (no occurrence in a year): no refresh would ever run", raw.schedule),
            ),
            Ok(_) => {}
        }
        Evidence {
            source,
            files_path: PathBuf::from(raw.files.path),
            s3: raw.s3.map(|s| S3Location { bucket: s.bucket, prefix: s.prefix }),
            athena,
            schedule: raw.schedule,
            overlap: self.duration("evidence.overlap", &raw.overlap, OVERLAP),
            lookback: self.duration("evidence.lookback", &raw.lookback, LOOKBACK),
            retention: self.duration("evidence.retention", &raw.retention, RETENTION),
            max_inflated_size: self.size("evidence.max_inflated_size", &raw.max_inflated_size),
        }
    }

    fn eligibility(&mut self, raw: RawEligibility) -> Eligibility {
        Eligibility {
            window: self.duration("eligibility.window", &raw.window, ELIGIBILITY_WINDOW),
            min_history: self.duration("eligibility.min_history", &raw.min_history, MIN_HISTORY),
            min_calls: self.count("eligibility.min_calls", raw.min_calls, CALLS) as u64,
            max_would_deny: self.count("eligibility.max_would_deny", raw.max_would_deny, CALLS) as u64,
            quiet_for: self.duration("eligibility.quiet_for", &raw.quiet_for, QUIET_FOR),
            max_evidence_age: self.duration("eligibility.max_evidence_age", &raw.max_evidence_age, MAX_EVIDENCE_AGE),
            exclude_users: {
                let listed = i64::try_from(raw.exclude_users.len()).unwrap_or(i64::MAX);
                self.count("eligibility.exclude_users", listed, EXCLUDED_USERS);
                raw.exclude_users
            },
            hold_expiry: self.duration("eligibility.hold_expiry", &raw.hold_expiry, HOLD_EXPIRY),
        }
    }

    fn waves(&mut self, raw: Vec<RawWave>) -> Vec<Wave> {
        if raw.is_empty() {
            self.problem("waves", "expected at least one wave");
        } else if raw.len() > WAVES.1 as usize {
            self.problem("waves", format!("expected at most {} waves, got {}", WAVES.1, raw.len()));
        }
        let mut seen = HashSet::new();
        let mut waves = Vec::new();
        for (i, wave) in raw.into_iter().enumerate() {
            let at = format!("waves[{i}]");
            if wave.name.trim().is_empty() {
                self.problem(&format!("{at}.name"), "expected a non-empty wave name");
            } else if !seen.insert(wave.name.clone()) {
                self.problem(&format!("{at}.name"), format!("duplicate wave name {:?}", wave.name));
            }
            let user_glob = wave.select.user_glob.as_deref().and_then(|g| match glob::Pattern::new(g) {
                Ok(p) => Some(p),
                Err(e) => {
                    self.problem(&format!("{at}.select.user_glob"), format!("bad glob {g:?}: {e}"));
                    None
                }
            });
            if let Some(prefix) = &wave.select.path_prefix
                && !is_iam_path_prefix(prefix)
            {
                self.problem(
                        &format!("{at}.select.path_prefix"),
                        format!("expected an IAM path starting with / (printable ASCII, no spaces, at most 512 characters), got {prefix:?}"),
                    );
            }
            waves.push(Wave {
                batch_size: self.count(&format!("{at}.batch_size"), wave.batch_size, BATCH_SIZE),
                soak: self.duration(&format!("{at}.soak"), &wave.soak, SOAK),
                batches: wave.batches.map(|n| self.count(&format!("{at}.batches"), n, BATCHES)),
                select: Selector {
                    path_prefix: wave.select.path_prefix,
                    user_glob,
                    tag: wave.select.tag.map(|t| (t.key, t.value)),
                    accounts: wave.select.accounts,
                    account_tag: wave.select.account_tag.map(|t| (t.key, t.value)),
                    ou: wave.select.ou,
                },
                name: wave.name,
            });
        }
        waves
    }

    /// Wave selectors' accounts are configured ones, their OUs well-formed; a selector that
    /// takes no configured account would finish its wave at once, so it is refused.
    fn wave_accounts(&mut self, waves: &[Wave], accounts: &[Account]) {
        for (i, wave) in waves.iter().enumerate() {
            let at = format!("waves[{i}].select");
            for (j, id) in wave.select.accounts.iter().enumerate() {
                if !accounts.iter().any(|a| &a.id == id) {
                    let known = accounts.iter().map(|a| a.id.as_str()).collect::<Vec<_>>().join(", ");
                    self.problem(
                        &format!("{at}.accounts[{j}]"),
                        format!("account {id:?} is not one of the accounts rolled out ({known})"),
                    );
                }
            }
            if let Some(ou) = &wave.select.ou
                && !is_ou_id(ou)
            {
                self.problem(&format!("{at}.ou"), format!("expected an OU ID such as ou-ab12-cd34ef56, got {ou:?}"));
            }
            if !accounts.iter().any(|a| wave.select.selects_account(a)) {
                self.problem(&at, "selects no account of the configuration: the wave could never promote anyone");
            }
        }
    }

    fn guard(&mut self, raw: RawGuard, evidence: &Evidence) -> Guard {
        let source = self.source("guard.source", &raw.source);
        if source == SourceKind::S3 && evidence.s3.is_none() {
            self.problem("guard.source", "source is s3 but the evidence.s3 section (bucket, prefix) is missing");
        }
        if source == SourceKind::Athena && evidence.athena.is_none() {
            self.problem("guard.source", "source is athena but the evidence.athena section is missing");
        }
        Guard {
            source,
            poll: self.duration("guard.poll", &raw.poll, GUARD_POLL),
            grace: self.duration("guard.grace", &raw.grace, GUARD_GRACE),
            window: self.duration("guard.window", &raw.window, GUARD_WINDOW),
            min_affected_users: self.count("guard.min_affected_users", raw.min_affected_users, AFFECTED_USERS),
            min_denials: self.count("guard.min_denials", raw.min_denials, DENIALS),
            silence_limit: self.duration("guard.silence_limit", &raw.silence_limit, SILENCE_LIMIT),
            requeue_after: raw.requeue_after.as_deref().map(|text| self.duration("guard.requeue_after", text, SOAK)),
            after_soak: match raw.after_soak.as_str() {
                "alert" => AfterSoak::Alert,
                "release" => AfterSoak::Release,
                other => {
                    self.problem("guard.after_soak", format!("expected alert or release, got {other:?}"));
                    AfterSoak::Alert
                }
            },
            delivery_lag: self.duration("guard.delivery_lag", &raw.delivery_lag, DELIVERY_LAG),
            false_alarm_budget: if raw.false_alarm_budget > 0.0 && raw.false_alarm_budget < 1.0 {
                raw.false_alarm_budget
            } else {
                let budget = raw.false_alarm_budget;
                self.problem(
                    "guard.false_alarm_budget",
                    format!("expected a probability between 0 and 1 (exclusive), got {budget}"),
                );
                0.001
            },
            watch_locked: raw.watch_locked,
        }
    }

    fn listeners(&mut self, raw: RawListeners) -> Listeners {
        let mut address = |path: &str, text: &str| -> SocketAddr {
            text.parse().unwrap_or_else(|_| {
                self.problem(path, format!("expected an address like 127.0.0.1:9440, got {text:?}"));
                SocketAddr::from(([127, 0, 0, 1], 0))
            })
        };
        let admin = address("listeners.admin", &raw.admin);
        let metrics = address("listeners.metrics", &raw.metrics);
        if !admin.ip().is_loopback() {
            if !raw.allow_remote_admin {
                self.problem(
                    "listeners.admin",
                    format!(
                        "{admin} is reachable from other hosts over plain HTTP; listen on 127.0.0.1 (behind a TLS proxy), \
                         or set listeners.allow_remote_admin: true with a token_file"
                    ),
                );
            } else if raw.token_file.is_none() {
                self.problem(
                    "listeners.token_file",
                    "a remote admin listener needs a token_file, not only an environment variable",
                );
            }
        }
        if let Some(url) = &raw.webhook_url
            && !(url.starts_with("http://") || url.starts_with("https://"))
        {
            self.problem("listeners.webhook_url", format!("expected an http:// or https:// URL, got {url:?}"));
        }
        Listeners {
            admin,
            metrics,
            token_file: raw.token_file.map(PathBuf::from),
            token_env: raw.token_env,
            webhook_url: raw.webhook_url,
            allow_remote_admin: raw.allow_remote_admin,
        }
    }
}

/// What `accounts.role` writes where each account's ID goes.
const ACCOUNT_PLACEHOLDER: &str = "{account}";

/// An AWS Organizations root ID: `r-` then 4 to 32 lowercase letters or digits.
fn is_root_id(text: &str) -> bool {
    text.strip_prefix("r-")
        .is_some_and(|p| (4..=32).contains(&p.len()) && p.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit()))
}

/// An AWS Organizations OU ID: `ou-` then 4 to 32 lowercase letters or digits (the root's
/// ID), `-`, and 8 to 32 more.
fn is_ou_id(text: &str) -> bool {
    let part = |p: &str, min: usize| {
        (min..=32).contains(&p.len()) && p.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
    };
    match text.strip_prefix("ou-").and_then(|rest| rest.split_once('-')) {
        Some((root, unit)) => part(root, 4) && part(unit, 8),
        None => false,
    }
}

/// Twelve digits.
fn is_account_id(text: &str) -> bool {
    text.len() == 12 && text.bytes().all(|b| b.is_ascii_digit())
}

/// The account of an IAM role ARN (`arn:aws:iam::<account>:role/[<path>/]<name>`), if `arn` is one.
fn role_arn_account(arn: &str) -> Option<&str> {
    let rest =
        ["arn:aws:iam::", "arn:aws-cn:iam::", "arn:aws-us-gov:iam::"].iter().find_map(|p| arn.strip_prefix(p))?;
    let (account, resource) = rest.split_once(':')?;
    let role = resource.strip_prefix("role/")?;
    let well_formed = is_account_id(account)
        && (1..=576).contains(&role.len())
        && !role.starts_with('/')
        && !role.ends_with('/')
        && role.bytes().all(|b| b.is_ascii_alphanumeric() || b"_+=,.@-/".contains(&b));
    well_formed.then_some(account)
}

/// `sts:ExternalId`: 2 to 1224 characters of `[\w+=,.@:/-]`.
fn is_external_id(text: &str) -> bool {
    (2..=1224).contains(&text.len()) && text.bytes().all(|b| b.is_ascii_alphanumeric() || b"_+=,.@:/-".contains(&b))
}

/// `vpc-` / `vpce-` followed by 8 or 17 lowercase hex digits, as AWS issues them.
fn is_aws_id(text: &str, prefix: &str) -> bool {
    text.strip_prefix(prefix).is_some_and(|hex| {
        (hex.len() == 8 || hex.len() == 17) && hex.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    })
}

fn is_action_pattern(text: &str) -> bool {
    match text.split_once(':') {
        Some((service, action)) => {
            !service.is_empty()
                && !action.is_empty()
                && service.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && action.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'*' || b == b'?')
        }
        None => false,
    }
}

/// Durations as operators write them: `30s`, `15m`, `24h`, `7d`, `2w`, or combinations (`1h30m`).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text.trim()).map_err(|e| e.to_string())
}

/// Whether `cron` fires within `horizon` after the start of 2001, a common year: a schedule
/// that does not, fires at most every leap year (February 29th) or never (February 30th).
fn fires_within(cron: &croner::Cron, horizon: Duration) -> bool {
    let start = chrono::DateTime::<chrono::Utc>::from_timestamp(978_307_200, 0).unwrap_or_default();
    cron.find_next_occurrence(&start, false).is_ok_and(|next| next <= later(start, horizon))
}

/// Parses a cron expression exactly as the scheduler will (seconds field required).
pub(crate) fn parse_cron(text: &str) -> Result<croner::Cron, String> {
    croner::parser::CronParser::builder()
        .seconds(croner::parser::Seconds::Required)
        .dom_and_dow(true)
        .build()
        .parse(text)
        .map_err(|e| e.to_string())
}

// ---------------------------------------------------------------------------------------------
// Locating key paths in the source text.

/// Maps key paths (`waves[1].soak`, `perimeter.trusted_vpc_endpoints.vpce-1`) to 1-based
/// line and column of the value, from the YAML event stream.
#[derive(Debug, Default)]
struct Locator {
    spots: std::collections::HashMap<String, (usize, usize)>,
}

impl Locator {
    fn index(text: &str) -> Locator {
        let mut builder = LocatorBuilder::default();
        // A document serde_yaml accepted is one yaml-rust2 accepts too; if not, no locations.
        let _ = yaml_rust2::parser::Parser::new_from_str(text).load(&mut builder, false);
        Locator { spots: builder.spots }
    }

    /// The location of `path`, or of its nearest located ancestor.
    fn find(&self, path: &str) -> (Option<usize>, Option<usize>) {
        let mut key = path;
        loop {
            if let Some(&(line, column)) = self.spots.get(key) {
                return (Some(line), Some(column));
            }
            match key.rfind(['.', '[']) {
                Some(cut) => key = &key[..cut],
                None => return (None, None),
            }
        }
    }
}

enum Frame {
    Map { path: String, pending_key: Option<String> },
    Seq { path: String, next: usize },
}

#[derive(Default)]
struct LocatorBuilder {
    stack: Vec<Frame>,
    spots: std::collections::HashMap<String, (usize, usize)>,
}

impl LocatorBuilder {
    /// The path of the node that starts now, advancing the parent's state.
    fn child_path(&mut self) -> Option<String> {
        match self.stack.last_mut() {
            None => Some(String::new()),
            Some(Frame::Seq { path, next }) => {
                let p = format!("{path}[{next}]");
                *next += 1;
                Some(p)
            }
            Some(Frame::Map { path, pending_key }) => {
                pending_key.take().map(|key| if path.is_empty() { key } else { format!("{path}.{key}") })
            }
        }
    }
}

impl yaml_rust2::parser::MarkedEventReceiver for LocatorBuilder {
    fn on_event(&mut self, event: yaml_rust2::Event, mark: yaml_rust2::scanner::Marker) {
        use yaml_rust2::Event;
        let spot = (mark.line(), mark.col() + 1);
        match event {
            Event::Scalar(value, ..) => {
                // A scalar in a mapping with no pending key *is* the key.
                if let Some(Frame::Map { pending_key, .. }) = self.stack.last_mut()
                    && pending_key.is_none()
                {
                    *pending_key = Some(value);
                    return;
                }
                if let Some(path) = self.child_path() {
                    self.spots.insert(path, spot);
                }
            }
            Event::Alias(_) => {
                if let Some(path) = self.child_path() {
                    self.spots.insert(path, spot);
                }
            }
            Event::MappingStart(..) | Event::SequenceStart(..) => {
                let path = self.child_path().unwrap_or_default();
                self.spots.entry(path.clone()).or_insert(spot);
                self.stack.push(if matches!(event, Event::MappingStart(..)) {
                    Frame::Map { path, pending_key: None }
                } else {
                    Frame::Seq { path, next: 0 }
                });
            }
            Event::MappingEnd | Event::SequenceEnd => {
                self.stack.pop();
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = include_str!("../rollout.yaml");

    fn problems(text: &str) -> Vec<Problem> {
        match Config::parse(text, Path::new("rollout.yaml")) {
            Ok(_) => Vec::new(),
            Err(e) => e.problems().to_vec(),
        }
    }

    #[test]
    fn shipped_example_is_valid() {
        let config = Config::parse(EXAMPLE, Path::new("rollout.yaml")).expect("rollout.yaml is valid");
        assert!(!config.waves.is_empty());
        assert!(!config.perimeter.trusted_cidrs.is_empty());
    }

    #[test]
    fn every_problem_is_reported_at_once_with_its_line() {
        let text = "\
account_id: \"123456789012\"
region: us-east-1
lockdown: {group: g, policy_name: p}
perimeter:
  trusted_vpcs: [vpc-0a1b2c3d, vpc-nothex00]
  trusted_vpc_endpoints:
    vpce-0123456789abcdef0: vpc-11111111
  trusted_cidrs:
    - 203.0.113.0/24
    - 10.0.0.300/8
evidence:
  schedule: \"every hour\"
waves:
  - name: canary
    batch_size: 0
    soak: 24x
  - name: canary
    batch_size: -3
    soak: 1d
";
        let found = problems(text);
        let at = |path: &str| {
            found.iter().find(|p| p.path == path).unwrap_or_else(|| panic!("no problem at {path} in {found:#?}")).line
        };
        assert_eq!(at("perimeter.trusted_vpcs[1]"), Some(5));
        assert_eq!(at("perimeter.trusted_vpc_endpoints.vpce-0123456789abcdef0"), Some(7));
        assert_eq!(at("perimeter.trusted_cidrs[1]"), Some(10));
        assert_eq!(at("evidence.schedule"), Some(12));
        assert_eq!(at("waves[0].batch_size"), Some(15));
        assert_eq!(at("waves[0].soak"), Some(16));
        assert_eq!(at("waves[1].name"), Some(17));
        assert_eq!(at("waves[1].batch_size"), Some(18));
        assert_eq!(found.len(), 8, "{found:#?}");
        let shown = found[0].to_string();
        assert!(shown.starts_with("rollout.yaml:5:"), "{shown}");
    }

    /// The `accounts` example shipped commented out in rollout.yaml, uncommented.
    fn accounts_example() -> String {
        let mut lines = EXAMPLE.lines().skip_while(|line| *line != "# accounts:");
        let first = lines.next().expect("rollout.yaml has a commented accounts example");
        std::iter::once(first)
            .chain(lines.take_while(|line| line.starts_with("#  ")))
            .map(|line| &line[2..])
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// The shipped file with `accounts` appended.
    fn with_accounts(accounts: &str) -> String {
        format!("{EXAMPLE}\n{accounts}\n")
    }

    #[test]
    fn the_shipped_accounts_example_is_valid_and_names_two_accounts() {
        let config = Config::parse(&with_accounts(&accounts_example()), Path::new("rollout.yaml")).unwrap();
        let [main, payments] = config.accounts.as_slice() else { panic!("{:#?}", config.accounts) };
        assert_eq!((main.id.as_str(), main.name.as_deref()), ("123456789012", Some("security")));
        assert_eq!(main.access, Access::Default, "account_id's account uses the default credentials");
        assert_eq!(main.perimeter, config.perimeter);
        assert_eq!(payments.to_string(), "account 111122223333 (payments)");
        assert_eq!(
            payments.access,
            Access::AssumeRole {
                role_arn: "arn:aws:iam::111122223333:role/lockstep-rollout".into(),
                external_id: None
            }
        );
        assert_eq!(payments.perimeter.account_id, "111122223333");
        assert!(payments.perimeter.trusted_vpcs.contains(&"vpc-0c1d2e3f".to_string()));
        assert_eq!(payments.perimeter.trusted_endpoints.len(), config.perimeter.trusted_endpoints.len() + 1);
        assert_eq!(payments.perimeter.trusted_cidrs, config.perimeter.trusted_cidrs, "CIDRs stay shared");
        assert!(!main.perimeter.trusted_vpcs.contains(&"vpc-0c1d2e3f".to_string()));
        assert_eq!(
            (main.ou.as_deref(), payments.tags.get("env").map(String::as_str)),
            (Some("ou-ab12-platform1"), Some("prod"))
        );
        let refused = config.single_account("plan").unwrap_err().to_string();
        assert!(refused.contains("`lockstep plan` acts in one account; pass --account"), "{refused}");
        assert!(config.is_multi_account());
    }

    #[test]
    fn an_account_view_is_the_account_with_its_own_store() {
        let config = Config::parse(&with_accounts(&accounts_example()), Path::new("rollout.yaml")).unwrap();
        let views = config.account_views();
        let [main, payments] = views.as_slice() else { panic!("{views:#?}") };
        assert_eq!(main.store.path, config.store.path, "account_id's account keeps the store it always had");
        assert_eq!(main.perimeter, config.perimeter);
        assert!(!main.is_multi_account(), "a view of account_id's account is a single-account configuration");
        assert_eq!(payments.account_id, "111122223333");
        assert_eq!(payments.perimeter, config.accounts[1].perimeter);
        assert_eq!(payments.store.path, config.store.path.with_file_name("lockstep-111122223333.db"));
        assert!(matches!(payments.access(), Access::AssumeRole { .. }));
        assert_eq!(payments.waves, config.waves, "everything else is shared");
        let unknown = config.account("999999999999").unwrap_err().to_string();
        assert_eq!(unknown, "account 999999999999 is not in the configuration's accounts (123456789012, 111122223333)");
    }

    #[test]
    fn discovered_accounts_join_the_listed_ones_through_the_role_template() {
        let text = with_accounts(
            r#"accounts:
  role: "arn:aws:iam::{account}:role/lockstep-rollout"
  external_id: "ext-1"
  discover: {ous: [ou-ab12-cd34ef56]}
  list:
    - id: "123456789012"
      name: security
      tags: {env: prod}
  exclude: ["444455556666"]
  perimeter:
    "555566667777":
      trusted_vpcs: [vpc-0c1d2e3f]"#,
        );
        let config = Config::parse(&text, Path::new("rollout.yaml")).unwrap();
        assert_eq!(config.discovery.as_ref().map(|d| d.ous.clone()), Some(vec!["ou-ab12-cd34ef56".to_string()]));
        assert!(config.is_multi_account(), "nothing acts in one account before discovery");
        let found = |id: &str, ou: Option<&str>, tags: &[(&str, &str)]| Discovered {
            id: id.into(),
            name: Some(format!("n{id}")),
            ou: ou.map(Into::into),
            tags: tags.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        };
        let discovered = config
            .with_discovered(vec![
                found("555566667777", Some("ou-ab12-cd34ef56"), &[("team", "payments")]),
                found("444455556666", None, &[]),
                found("123456789012", Some("ou-ab12-cd34ef56"), &[("env", "dev"), ("owner", "sec")]),
            ])
            .unwrap();
        assert_eq!(discovered.discovery, None);
        let ids: Vec<_> = discovered.accounts.iter().map(|a| a.id.as_str()).collect();
        assert_eq!(ids, ["123456789012", "555566667777"], "listed first, the excluded one left out");
        let (main, found) = (&discovered.accounts[0], &discovered.accounts[1]);
        assert_eq!(main.access, Access::Default);
        assert_eq!(main.tags.get("env").map(String::as_str), Some("prod"), "the file's tags win");
        assert_eq!(main.tags.get("owner").map(String::as_str), Some("sec"), "Organizations' tags fill in");
        assert_eq!(main.ou.as_deref(), Some("ou-ab12-cd34ef56"));
        assert_eq!(
            found.access,
            Access::AssumeRole {
                role_arn: "arn:aws:iam::555566667777:role/lockstep-rollout".into(),
                external_id: Some("ext-1".into())
            }
        );
        assert!(found.perimeter.trusted_vpcs.contains(&"vpc-0c1d2e3f".to_string()), "its own additions");
        assert_eq!(found.name.as_deref(), Some("n555566667777"));
        let nothing = config.with_discovered(vec![found_only("444455556666")]);
        assert!(nothing.is_ok(), "the listed account remains");
    }

    fn found_only(id: &str) -> Discovered {
        Discovered { id: id.into(), name: None, ou: None, tags: BTreeMap::new() }
    }

    #[test]
    fn waves_select_accounts_by_id_tag_and_ou() {
        let text = with_accounts(&accounts_example()).replace(
            "    soak: 48h\n",
            "    soak: 48h\n  - name: payments-prod\n    batch_size: 5\n    soak: 24h\n    select:\n      accounts: [\"111122223333\"]\n      account_tag: {key: env, value: prod}\n  - name: platform\n    batch_size: 5\n    soak: 24h\n    select: {ou: ou-ab12-platform1}\n",
        );
        let config = Config::parse(&text, Path::new("rollout.yaml")).unwrap();
        let by_name = |name: &str| &config.waves.iter().find(|w| w.name == name).unwrap().select;
        let [main, payments] = config.accounts.as_slice() else { panic!() };
        assert!(by_name("payments-prod").selects_account(payments));
        assert!(!by_name("payments-prod").selects_account(main));
        assert!(by_name("platform").selects_account(main));
        assert!(!by_name("platform").selects_account(payments));
        assert!(by_name("everyone").selects_account(main) && by_name("everyone").selects_account(payments));

        let text = with_accounts(&accounts_example()).replace(
            "    soak: 48h\n",
            "    soak: 48h\n  - name: nowhere\n    batch_size: 5\n    soak: 24h\n    select:\n      accounts: [\"444455556666\"]\n      ou: OU-1\n",
        )
        .replace("# max_promotions_per_day_per_account: 20", "max_promotions_per_day_per_account: 0");
        let found = problems(&text);
        let paths: Vec<&str> = found.iter().map(|p| p.path.as_str()).collect();
        for expected in [
            "waves[3].select.accounts[0]",
            "waves[3].select.ou",
            "waves[3].select",
            "rollout.max_promotions_per_day_per_account",
        ] {
            assert!(paths.contains(&expected), "{expected} in {found:#?}");
        }
        let at = |path: &str| found.iter().find(|p| p.path == path).and_then(|p| p.line);
        let line_of = |needle: &str| text.lines().position(|l| l.contains(needle)).map(|i| i + 1);
        assert_eq!(at("waves[3].select.accounts[0]"), line_of("[\"444455556666\"]"));
    }

    #[test]
    fn the_readme_accounts_example_is_valid() {
        let readme = include_str!("../README.md");
        let section = readme.split("## Several accounts").nth(1).expect("README has a Several accounts section");
        let block = section.split("```yaml\n").nth(1).and_then(|b| b.split("```").next()).expect("a yaml block");
        let accounts = block.split_once("accounts:\n").map(|(_, rest)| format!("accounts:\n{rest}")).unwrap();
        let config = Config::parse(&with_accounts(&accounts), Path::new("README.md")).unwrap();
        let ids: Vec<_> = config.accounts.iter().map(|a| a.id.as_str()).collect();
        assert_eq!(ids, ["123456789012", "111122223333"], "444455556666 is excluded");
    }

    #[test]
    fn without_accounts_the_file_means_account_id_alone() {
        let config = Config::parse(EXAMPLE, Path::new("rollout.yaml")).unwrap();
        let [only] = config.accounts.as_slice() else { panic!("{:#?}", config.accounts) };
        assert_eq!(
            (only.id.as_str(), &only.access, &only.perimeter),
            ("123456789012", &Access::Default, &config.perimeter)
        );
        assert!(config.single_account("run").is_ok());
        // An accounts section that leaves account_id alone (the rest excluded) means the same.
        let text = with_accounts(
            "accounts:\n  role: \"arn:aws:iam::{account}:role/r\"\n  list:\n    - id: \"123456789012\"\n    - id: \"111122223333\"\n  exclude: [\"111122223333\"]",
        );
        assert!(Config::parse(&text, Path::new("r.yaml")).unwrap().single_account("run").is_ok());
    }

    #[test]
    fn every_accounts_problem_is_reported_at_once_with_its_line() {
        let accounts = r#"accounts:
  role: "arn:aws:iam::123456789012:role/fixed"
  external_id: "x"
  list:
    - id: "12345"
    - id: "111122223333"
      name: payments
    - id: "111122223333"
    - id: "444455556666"
      name: payments
      role: "arn:aws:iam::999999999999:role/elsewhere"
    - id: "123456789012"
      role: "arn:aws:iam::123456789012:role/default"
  exclude: ["777788889999"]
  perimeter:
    "555566667777":
      trusted_vpcs: [vpc-0c1d2e3f]
    "111122223333":
      trusted_vpcs: [vpc-nothex00, vpc-1b2c3d4e]
      trusted_vpc_endpoints:
        vpce-zz: vpc-0c1d2e3f
        vpce-0c1d2e3f: vpc-99999999
        vpce-0123456789abcdef0: vpc-1b2c3d4e"#;
        let text = with_accounts(accounts);
        let found = problems(&text);
        // (path, text on the problem's line within `accounts`, which occurrence, message)
        let expected = [
            ("accounts.role", "role/fixed", 1, "{account}"),
            ("accounts.external_id", "external_id", 1, "2 to 1224"),
            ("accounts.list[0].id", "\"12345\"", 1, "12-digit"),
            ("accounts.list[2].id", "id: \"111122223333\"", 2, "listed twice (first as accounts.list[1])"),
            ("accounts.list[3].name", "name: payments", 2, "already used by accounts.list[1]"),
            ("accounts.list[3].role", "role/elsewhere", 1, "a role in account 444455556666"),
            ("accounts.list[4].role", "role/default", 1, "default credentials"),
            ("accounts.exclude[0]", "777788889999", 1, "not in accounts.list"),
            ("accounts.perimeter.555566667777", "[vpc-0c1d2e3f]", 1, "no account 555566667777"),
            ("accounts.perimeter.111122223333.trusted_vpcs[0]", "vpc-nothex00", 1, "expected a VPC ID"),
            ("accounts.perimeter.111122223333.trusted_vpcs[1]", "vpc-nothex00", 1, "already trusted for every account"),
            ("accounts.perimeter.111122223333.trusted_vpc_endpoints.vpce-zz", "vpce-zz", 1, "VPC endpoint ID"),
            (
                "accounts.perimeter.111122223333.trusted_vpc_endpoints.vpce-0c1d2e3f",
                "vpc-99999999",
                1,
                "not in perimeter.trusted_vpcs or accounts.perimeter.111122223333.trusted_vpcs",
            ),
            (
                "accounts.perimeter.111122223333.trusted_vpc_endpoints.vpce-0123456789abcdef0",
                "vpce-0123456789abcdef0",
                1,
                "already trusted for every account",
            ),
        ];
        // The section starts on this line of `text`.
        let offset = text.lines().position(|line| line == "accounts:").unwrap();
        for (path, at, nth, message) in expected {
            let problem =
                found.iter().find(|p| p.path == path).unwrap_or_else(|| panic!("no problem at {path}: {found:#?}"));
            let line = accounts.lines().enumerate().filter(|(_, line)| line.contains(at)).nth(nth - 1).unwrap().0;
            assert_eq!(problem.line, Some(offset + line + 1), "{problem}");
            assert!(problem.column.is_some(), "{problem}");
            assert!(problem.message.contains(message), "{problem}");
        }
        assert_eq!(found.len(), expected.len(), "{found:#?}");
    }

    #[test]
    fn roles_templates_and_exclusions_are_checked() {
        let cases = [
            // The template's account field must be {account}.
            (
                "  role: \"arn:aws:iam::123456789012:role/x-{account}\"\n  list: [{id: \"111122223333\"}]",
                "accounts.role",
                "as its account",
            ),
            // No template and no role of its own: nothing to assume.
            ("  list: [{id: \"111122223333\"}]", "accounts.list[0].id", "no role to assume in 111122223333"),
            (
                "  role: \"arn:aws:iam::{account}:role/r\"\n  list: [{id: \"111122223333\"}]\n  exclude: [\"111122223333\"]",
                "accounts.exclude",
                "every listed account is excluded",
            ),
            (
                "  role: \"arn:aws:iam::{account}:role/r\"\n  list: [{id: \"111122223333\"}]\n  exclude: [\"111122223333\", \"111122223333\"]",
                "accounts.exclude[1]",
                "excluded twice",
            ),
            ("  list: []", "accounts.list", "at least one account"),
            ("  discover: {ous: [ou-ab12-cd34ef56]}", "accounts.discover", "reached through accounts.role"),
            (
                "  role: \"arn:aws:iam::{account}:role/r\"\n  discover: {ous: [OU-1]}",
                "accounts.discover.ous[0]",
                "an OU ID (ou-ab12-cd34ef56) or a root ID",
            ),
            (
                "  role: \"arn:aws:iam::{account}:user/r\"\n  list: [{id: \"111122223333\"}]",
                "accounts.role",
                "as its account",
            ),
            (
                "  role: \"arn:aws:iam::{account}:role/r\"\n  list: [{id: \"111122223333\", name: \"\"}]",
                "accounts.list[0].name",
                "1 to 50",
            ),
        ];
        for (section, path, message) in cases {
            let found = problems(&with_accounts(&format!("accounts:\n{section}")));
            assert!(
                found.iter().any(|p| p.path == path && p.message.contains(message) && p.line.is_some()),
                "{section}: {found:#?}"
            );
        }
        let valid = "accounts:\n  role: \"arn:aws:iam::{account}:role/ops/lockstep\"\n  external_id: \"ext-1:2\"\n  list:\n    - id: \"111122223333\"\n    - id: \"444455556666\"\n      role: \"arn:aws:iam::444455556666:role/own\"";
        let config = Config::parse(&with_accounts(valid), Path::new("r.yaml")).unwrap();
        let roles: Vec<_> = config.accounts.iter().map(|a| a.access.clone()).collect();
        let role = |arn: &str| Access::AssumeRole { role_arn: arn.into(), external_id: Some("ext-1:2".into()) };
        assert_eq!(
            roles,
            [role("arn:aws:iam::111122223333:role/ops/lockstep"), role("arn:aws:iam::444455556666:role/own")]
        );
    }

    #[test]
    fn classify_refuses_a_file_naming_several_accounts() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("rollout.yaml");
        std::fs::write(&path, with_accounts(&accounts_example())).unwrap();
        let error = Config::load_perimeter(&path, "classify", None).unwrap_err();
        assert_eq!(error.problems().len(), 1, "{error}");
        assert_eq!(error.problems()[0].path, "accounts");
        assert!(error.to_string().contains("`lockstep classify` acts in one account; pass --account"), "{error}");
        let payments = Config::load_perimeter(&path, "classify", Some("111122223333")).unwrap();
        assert!(payments.trusted_vpcs.contains(&"vpc-0c1d2e3f".to_string()), "the account's own perimeter");
        let unknown = Config::load_perimeter(&path, "classify", Some("999999999999")).unwrap_err();
        assert!(unknown.to_string().contains("account 999999999999 (--account) is not one of the file's accounts"));
    }

    #[test]
    fn a_valid_file_round_trips() {
        let raw: RawConfig = serde_yaml::from_str(EXAMPLE).unwrap();
        let written = serde_yaml::to_string(&raw).unwrap();
        let again = Config::parse(&written, Path::new("written.yaml")).unwrap();
        assert_eq!(again, Config::parse(EXAMPLE, Path::new("rollout.yaml")).unwrap());
    }

    #[test]
    fn unknown_key_is_an_error_with_location() {
        let text = EXAMPLE.replacen("region:", "regoin: x\nregion:", 1);
        let found = problems(&text);
        assert_eq!(found.len(), 1);
        assert!(found[0].message.contains("unknown field `regoin`"), "{:?}", found[0]);
        assert!(found[0].line.is_some());
    }

    #[test]
    fn guard_source_needs_its_evidence_section() {
        let text = EXAMPLE.replace(
            "  source: files                 # where the guard",
            "  source: athena                # where the guard",
        );
        let found = problems(&text);
        assert_eq!(found.len(), 1, "{found:#?}");
        assert_eq!(found[0].path, "guard.source");
        assert!(found[0].message.contains("evidence.athena section is missing"));
    }

    #[test]
    fn an_athena_account_partition_is_a_column_name() {
        let text = EXAMPLE
            .replace("  # athena:\n", "  athena:\n")
            .replace(
                "  #   output_location: s3://my-athena-results/lockstep/",
                "    output_location: s3://my-athena-results/lockstep/",
            )
            .replace("  #   account_partition: account", "    account_partition: \"account; DROP\"");
        let found = problems(&text);
        assert_eq!(found.len(), 1, "{found:#?}");
        assert_eq!(found[0].path, "evidence.athena.account_partition");
        assert!(found[0].line.is_some(), "{:?}", found[0]);
        let fine = text.replace("\"account; DROP\"", "account");
        assert!(problems(&fine).is_empty(), "{:#?}", problems(&fine));
    }

    #[test]
    fn durations_accept_operator_forms() {
        for (text, secs) in [("30s", 30), ("15m", 900), ("24h", 86_400), ("7d", 604_800), ("1h30m", 5_400)] {
            assert_eq!(parse_duration(text), Ok(Duration::from_secs(secs)), "{text}");
        }
        assert!(parse_duration("-1h").is_err());
        assert!(parse_duration("soon").is_err());
    }

    #[test]
    fn ids_and_cidrs() {
        assert!(is_aws_id("vpc-0a1b2c3d", "vpc-"));
        assert!(is_aws_id("vpce-0123456789abcdef0", "vpce-"));
        assert!(!is_aws_id("vpce-0123456789abcdef0", "vpc-"));
        assert!(!is_aws_id("vpc-0A1B2C3D", "vpc-"));
        let text = EXAMPLE.replace("203.0.113.0/24", "203.0.113.7/24");
        let found = problems(&text);
        assert!(found.iter().any(|p| p.message.contains("did you mean 203.0.113.0/24")), "{found:#?}");
    }

    #[test]
    fn every_bound_is_stated_with_its_location() {
        let cases = [
            ("soak: 24h\n    batches: 1", "soak: 300000y\n    batches: 1", "waves[0].soak", "from 1s to 365d"),
            ("poll: 1m", "poll: 1ns", "guard.poll", "from 1s to 1h"),
            ("grace: 1h", "grace: 300000y", "guard.grace", "to 30d"),
            ("window: 15m", "window: 300000y", "guard.window", "to 7d"),
            ("window: 14d", "window: 300000y", "eligibility.window", "to 400d"),
            ("hold_expiry: 14d", "hold_expiry: 300000y", "eligibility.hold_expiry", "to 3650d"),
            ("lookback: 14d", "lookback: 1s", "evidence.lookback", "from 1h"),
            ("batch_size: 25", "batch_size: 100000000", "waves[2].batch_size", "from 1 to 10000"),
            (
                "max_promotions_per_day: 50",
                "max_promotions_per_day: 0",
                "rollout.max_promotions_per_day",
                "from 1 to 100000",
            ),
            ("min_calls: 20", "min_calls: -1", "eligibility.min_calls", "from 0 to 1000000000"),
        ];
        for (from, to, path, bound) in cases {
            assert!(EXAMPLE.contains(from), "{from}");
            let found = problems(&EXAMPLE.replacen(from, to, 1));
            assert_eq!(found.len(), 1, "{to}: {found:#?}");
            assert_eq!(found[0].path, path);
            assert!(found[0].message.contains(bound), "{}", found[0].message);
            assert!(found[0].line.is_some() && found[0].column.is_some(), "{:?}", found[0]);
        }
    }

    #[test]
    fn unsafe_settings_are_refused_unless_allowed() {
        let refused = |from: &str, to: &str, path: &str| {
            let found = problems(&EXAMPLE.replacen(from, to, 1));
            assert!(found.iter().any(|p| p.path == path), "{to}: {found:#?}");
        };
        refused("203.0.113.0/24", "0.0.0.0/0", "perimeter.trusted_cidrs[0]");
        refused("2001:db8:1234::/48", "::/0", "perimeter.trusted_cidrs[2]");
        refused("203.0.113.0/24", "10.0.0.0/7", "perimeter.trusted_cidrs[0]");
        refused("2001:db8:1234::/48", "2001:d00::/24", "perimeter.trusted_cidrs[2]");
        refused("admin: 127.0.0.1:9440", "admin: 0.0.0.0:9440", "listeners.admin");
        refused("admin: 127.0.0.1:9440", "admin: \"[::]:9440\"", "listeners.admin");
        refused("schedule: \"0 5 * * * *\"", "schedule: \"0 0 0 30 2 *\"", "evidence.schedule");
        refused("schedule: \"0 5 * * * *\"", "schedule: \"0 0 0 29 2 *\"", "evidence.schedule");
        refused("schedule: \"0 5 * * * *\"", "schedule: \"0 5 * * * * 2001\"", "evidence.schedule");
        refused("group: lockstep-network-perimeter", "group: \"lock step\"", "lockdown.group");
        refused(
            "policy_name: lockstep-network-perimeter",
            &format!("policy_name: {}", "p".repeat(129)),
            "lockdown.policy_name",
        );
        refused(
            "path_prefix: /engineering/\n  - name: everyone",
            "path_prefix: /eng ineering/\n  - name: everyone",
            "waves[1].select.path_prefix",
        );
        refused("retention: 90d", "retention: 2d", "evidence.retention");
        refused("retention: 90d", "retention: 90d\n  max_inflated_size: 10GiB", "evidence.max_inflated_size");

        // Explicitly allowed: a wider prefix setting, and a remote admin listener with a token file.
        let wide = EXAMPLE.replacen("203.0.113.0/24", "10.0.0.0/7", 1).replacen(
            "  not_actions:",
            "  widest_ipv4_prefix: 7\n  not_actions:",
            1,
        );
        assert_eq!(problems(&wide), Vec::new());
        let remote = EXAMPLE.replacen(
            "admin: 127.0.0.1:9440",
            "admin: 0.0.0.0:9440\n  allow_remote_admin: true\n  token_file: /run/secrets/t",
            1,
        );
        assert_eq!(problems(&remote), Vec::new());
        let no_token = EXAMPLE.replacen("admin: 127.0.0.1:9440", "admin: 0.0.0.0:9440\n  allow_remote_admin: true", 1);
        assert!(problems(&no_token).iter().any(|p| p.path == "listeners.token_file"));
    }

    #[test]
    fn an_oversized_policy_is_refused_on_load() {
        let cidrs: String = (0..400).map(|i| format!("    - 100.{}.{}.0/24\n", i / 200 + 64, i % 200)).collect();
        let text = EXAMPLE.replacen("  trusted_cidrs:\n", &format!("  trusted_cidrs:\n{cidrs}"), 1);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("big.yaml");
        std::fs::write(&path, text).unwrap();
        let error = Config::load(&path).unwrap_err();
        assert!(error.problems().iter().any(|p| p.path == "perimeter" && p.message.contains("6144")), "{error}");
    }

    #[test]
    fn alias_floods_and_deep_nesting_are_refused_quickly() {
        // Each level doubles: 2^40 values once expanded, in a few KiB of text.
        let mut flood = String::from("a0: &a0 [x, x]\n");
        for i in 1..40 {
            flood.push_str(&format!("a{i}: &a{i} [*a{}, *a{}]\n", i - 1, i - 1));
        }
        let started = std::time::Instant::now();
        let found = problems(&flood);
        assert!(found[0].message.contains("aliases are expanded"), "{found:#?}");
        let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
        let found = problems(&deep);
        // The YAML scanner's own flow-nesting limit may stop it first; either way, refused.
        assert!(
            found[0].message.contains("nested deeper than") || found[0].message.contains("recursion limit"),
            "{found:#?}"
        );
        let block: String = (0..40).map(|depth| format!("{}k{depth}:\n", " ".repeat(depth))).collect();
        assert!(problems(&block)[0].message.contains("nested deeper than 32"), "{:#?}", problems(&block));
        assert!(found[0].line.is_some());
        assert!(started.elapsed() < Duration::from_secs(5), "took {:?}", started.elapsed());
        // Anchors and aliases within the budget are fine.
        let anchored =
            EXAMPLE.replacen("  poll: 1m", "  poll: &poll 1m", 1).replacen("  window: 15m", "  window: *poll", 1);
        assert_eq!(problems(&anchored), Vec::new());
    }

    #[test]
    fn load_refuses_large_and_special_files() {
        let dir = tempfile::tempdir().unwrap();
        let big = dir.path().join("big.yaml");
        std::fs::write(&big, format!("{EXAMPLE}\n#{}", "x".repeat(MAX_CONFIG_BYTES as usize))).unwrap();
        assert!(Config::load(&big).unwrap_err().to_string().contains("larger than"));
        assert!(matches!(Config::load(dir.path()), Err(ConfigError::Read { .. })));
    }

    #[test]
    fn perimeter_alone_is_enough_for_classify() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("perimeter.yaml");
        std::fs::write(&path, "account_id: \"123456789012\"\nperimeter:\n  trusted_cidrs: [203.0.113.0/24]\n").unwrap();
        assert!(Config::load(&path).is_err(), "not a rollout configuration");
        let perimeter = Config::load_perimeter(&path, "classify", None).unwrap();
        assert_eq!(perimeter.trusted_cidrs.len(), 1);
        std::fs::write(&path, "account_id: \"123456789012\"\nperimeter:\n  trusted_cidrs: [0.0.0.0/0]\n").unwrap();
        let error = Config::load_perimeter(&path, "classify", None).unwrap_err();
        assert_eq!(error.problems()[0].line, Some(3), "{error}");
    }

    #[test]
    fn sizes_and_later() {
        assert_eq!(parse_size("256MiB"), Ok(256 << 20));
        assert_eq!(parse_size("1048576"), Ok(1 << 20));
        assert!(parse_size("1TB").is_err());
        assert!(parse_size("99999999999999999999GiB").is_err());
        let now = chrono::DateTime::UNIX_EPOCH;
        assert_eq!(later(now, Duration::MAX), chrono::DateTime::<chrono::Utc>::MAX_UTC);
        assert_eq!(later(now, Duration::from_secs(60)), now + chrono::TimeDelta::minutes(1));
    }

    #[test]
    fn odd_yaml_shapes_are_problems_not_panics() {
        for text in [
            "",
            "~",
            "---\n---\n",
            "[]",
            "? [a, b]\n: c\n",
            "&a x: *a\n",
            "a: &a\n  b: *a\n",
            "*unknown\n",
            "!!binary aGVsbG8=\n",
            "account_id: !!int 123456789012\n",
            "\u{feff}account_id: x\n",
            "account_id: \"123456789012\"\nperimeter: {trusted_cidrs: [\"::/0\"]}\n",
            "{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{",
        ] {
            assert!(Config::parse(text, Path::new("odd.yaml")).is_err(), "{text:?}");
        }
    }
}
