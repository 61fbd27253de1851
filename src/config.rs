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

use crate::perimeter::Perimeter;

/// The actions whose services do not populate the network condition keys; the AWS
/// data-perimeter examples exclude them from the network Deny.
pub const DEFAULT_NOT_ACTIONS: &[&str] = &[
    "es:ES*",
    "dax:*",
    "neptune-db:*",
    "kafka-cluster:*",
    "elasticfilesystem:client*",
    "rds-db:connect",
];

/// A validated configuration. Everything here has been checked; callers never re-validate.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub account_id: String,
    pub region: String,
    pub lockdown: Lockdown,
    pub perimeter: Perimeter,
    pub evidence: Evidence,
    pub eligibility: Eligibility,
    pub waves: Vec<Wave>,
    pub rollout: RolloutLimits,
    pub guard: Guard,
    pub store: Store,
    pub listeners: Listeners,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Lockdown {
    pub group: String,
    pub policy_name: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SourceKind {
    Files,
    S3,
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

#[derive(Debug, Clone, PartialEq)]
pub struct Evidence {
    pub source: SourceKind,
    pub files_path: PathBuf,
    pub s3: Option<S3Location>,
    pub athena: Option<Athena>,
    /// Cron expression with a seconds field, as `tokio-cron-scheduler` reads it.
    pub schedule: String,
    pub overlap: Duration,
    pub lookback: Duration,
    pub retention: Duration,
}

#[derive(Debug, Clone, PartialEq)]
pub struct S3Location {
    pub bucket: String,
    pub prefix: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Athena {
    pub database: String,
    pub table: String,
    pub workgroup: String,
    pub output_location: String,
    pub partitioning: Partitioning,
    pub poll_interval: Duration,
    pub timeout: Duration,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Eligibility {
    pub window: Duration,
    pub min_history: Duration,
    pub min_calls: u64,
    pub max_would_deny: u64,
    pub quiet_for: Duration,
    pub max_evidence_age: Duration,
    pub exclude_users: Vec<String>,
    pub hold_expiry: Duration,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Wave {
    pub name: String,
    pub batch_size: usize,
    pub soak: Duration,
    pub batches: Option<usize>,
    pub select: Selector,
}

/// Which users a wave may take. Every given criterion must match.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Selector {
    pub path_prefix: Option<String>,
    pub user_glob: Option<glob::Pattern>,
    pub tag: Option<(String, String)>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct RolloutLimits {
    pub max_promotions_per_day: usize,
    pub max_soaking_batches: usize,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Guard {
    pub source: SourceKind,
    pub poll: Duration,
    pub grace: Duration,
    pub window: Duration,
    pub min_affected_users: usize,
    pub min_denials: usize,
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
}

/// `guard.after_soak`: report a locked user the lockdown denies, or also release and hold it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AfterSoak {
    Alert,
    Release,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Store {
    pub path: PathBuf,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Listeners {
    pub admin: SocketAddr,
    pub metrics: SocketAddr,
    pub token_file: Option<PathBuf>,
    pub token_env: String,
    pub webhook_url: Option<String>,
}

/// One thing wrong with the file, located as precisely as the YAML allows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub file: PathBuf,
    pub line: Option<usize>,
    pub column: Option<usize>,
    pub path: String,
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

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{} problem(s) in {}:\n{}", .0.len(), .0.first().map(|p| p.file.display().to_string()).unwrap_or_default(), render_problems(.0))]
    Invalid(Vec<Problem>),
}

fn render_problems(problems: &[Problem]) -> String {
    problems
        .iter()
        .map(|p| format!("  {p}"))
        .collect::<Vec<_>>()
        .join("\n")
}

impl ConfigError {
    pub fn problems(&self) -> &[Problem] {
        match self {
            ConfigError::Invalid(problems) => problems,
            ConfigError::Read { .. } => &[],
        }
    }
}

impl Config {
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Config::parse(&text, path)
    }

    /// Parses and validates `text`; `file` only names the source in problems.
    pub fn parse(text: &str, file: &Path) -> Result<Config, ConfigError> {
        let raw: RawConfig = serde_yaml::from_str(text).map_err(|e| {
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
        })?;
        let locator = Locator::index(text);
        let mut check = Checker {
            file,
            locator: &locator,
            problems: Vec::new(),
        };
        let config = check.config(raw);
        if check.problems.is_empty() {
            Ok(config)
        } else {
            Err(ConfigError::Invalid(check.problems))
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
});

raw_section!(RawStore { path: String = "./lockstep.db" });

raw_section!(RawListeners {
    admin: String = "127.0.0.1:9440",
    metrics: String = "127.0.0.1:9441",
    token_file: Option<String> = None,
    token_env: String = "LOCKSTEP_ADMIN_TOKEN",
    webhook_url: Option<String> = None,
});

// ---------------------------------------------------------------------------------------------
// Validation.

struct Checker<'a> {
    file: &'a Path,
    locator: &'a Locator,
    problems: Vec<Problem>,
}

impl Checker<'_> {
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

    fn duration(&mut self, path: &str, text: &str) -> Duration {
        match parse_duration(text) {
            Ok(d) if d.is_zero() => {
                self.problem(path, format!("expected a duration above zero, got {text:?}"));
                Duration::ZERO
            }
            Ok(d) => d,
            Err(why) => {
                self.problem(path, format!("expected a duration such as 30s, 15m, 24h or 7d: {why}"));
                Duration::ZERO
            }
        }
    }

    fn positive(&mut self, path: &str, value: i64) -> usize {
        if value <= 0 {
            self.problem(path, format!("expected a number above zero, got {value}"));
            return 0;
        }
        usize::try_from(value).unwrap_or(usize::MAX)
    }

    fn non_negative(&mut self, path: &str, value: i64) -> u64 {
        u64::try_from(value).unwrap_or_else(|_| {
            self.problem(path, format!("expected zero or more, got {value}"));
            0
        })
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
        if !(raw.account_id.len() == 12 && raw.account_id.bytes().all(|b| b.is_ascii_digit())) {
            self.problem("account_id", format!("expected a 12-digit AWS account ID, got {:?}", raw.account_id));
        }
        self.non_empty("region", &raw.region);
        self.non_empty("lockdown.group", &raw.lockdown.group);
        self.non_empty("lockdown.policy_name", &raw.lockdown.policy_name);
        let perimeter = self.perimeter(raw.perimeter, &raw.account_id);
        let evidence = self.evidence(raw.evidence);
        let eligibility = self.eligibility(raw.eligibility);
        let waves = self.waves(raw.waves);
        let rollout = RolloutLimits {
            max_promotions_per_day: self.positive("rollout.max_promotions_per_day", raw.rollout.max_promotions_per_day),
            max_soaking_batches: self.positive("rollout.max_soaking_batches", raw.rollout.max_soaking_batches),
        };
        let guard = self.guard(raw.guard, &evidence);
        let listeners = self.listeners(raw.listeners);
        self.non_empty("store.path", &raw.store.path);
        Config {
            account_id: raw.account_id,
            region: raw.region,
            lockdown: Lockdown {
                group: raw.lockdown.group,
                policy_name: raw.lockdown.policy_name,
            },
            perimeter,
            evidence,
            eligibility,
            waves,
            rollout,
            guard,
            store: Store {
                path: PathBuf::from(raw.store.path),
            },
            listeners,
        }
    }

    fn perimeter(&mut self, raw: RawPerimeter, account_id: &str) -> Perimeter {
        let mut trusted_vpcs = Vec::new();
        for (i, vpc) in raw.trusted_vpcs.iter().enumerate() {
            let path = format!("perimeter.trusted_vpcs[{i}]");
            if is_aws_id(vpc, "vpc-") {
                trusted_vpcs.push(vpc.clone());
            } else {
                self.problem(&path, format!("expected a VPC ID like vpc-0a1b2c3d (8 or 17 hex digits), got {vpc:?}"));
            }
        }
        let mut trusted_endpoints = BTreeMap::new();
        for (endpoint, vpc) in &raw.trusted_vpc_endpoints {
            let path = format!("perimeter.trusted_vpc_endpoints.{endpoint}");
            if !is_aws_id(endpoint, "vpce-") {
                self.problem(&path, format!("expected a VPC endpoint ID like vpce-0a1b2c3d4e5f60718 as the key, got {endpoint:?}"));
            } else if !is_aws_id(vpc, "vpc-") {
                self.problem(&path, format!("expected the endpoint's VPC ID like vpc-0a1b2c3d, got {vpc:?}"));
            } else if !raw.trusted_vpcs.contains(vpc) {
                self.problem(&path, format!("endpoint is mapped to {vpc}, which is not in perimeter.trusted_vpcs"));
            } else {
                trusted_endpoints.insert(endpoint.clone(), vpc.clone());
            }
        }
        let mut trusted_cidrs = Vec::new();
        for (i, cidr) in raw.trusted_cidrs.iter().enumerate() {
            let path = format!("perimeter.trusted_cidrs[{i}]");
            match cidr.parse::<IpNet>() {
                Ok(net) if net.trunc() != net => self.problem(
                    &path,
                    format!("{cidr} has host bits set; did you mean {}?", net.trunc()),
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
        if let Some(key) = &raw.exempt_tag_key {
            if key.is_empty() || key.len() > 128 || key.contains(char::is_whitespace) {
                self.problem("perimeter.exempt_tag_key", format!("expected an IAM tag key without spaces, got {key:?}"));
            }
        }
        Perimeter {
            account_id: account_id.to_string(),
            trusted_vpcs,
            trusted_endpoints,
            trusted_cidrs,
            allow_aws_service_calls: raw.allow_aws_service_calls,
            called_via_services: raw.called_via_services,
            allow_presigned_s3_reads: raw.allow_presigned_s3_reads,
            exempt_tag_key: raw.exempt_tag_key,
            not_actions: raw.not_actions,
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
                self.problem("evidence.athena.output_location", format!("expected an s3:// URL, got {:?}", a.output_location));
            }
            for (key, value) in [("database", &a.database), ("table", &a.table)] {
                if value.is_empty() || !value.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                    self.problem(&format!("evidence.athena.{key}"), format!("expected letters, digits and underscores, got {value:?}"));
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
                poll_interval: self.duration("evidence.athena.poll_interval", &a.poll_interval),
                timeout: self.duration("evidence.athena.timeout", &a.timeout),
                database: a.database,
                table: a.table,
                workgroup: a.workgroup,
                output_location: a.output_location,
                partitioning,
            }
        });
        if let Err(why) = parse_cron(&raw.schedule) {
            self.problem(
                "evidence.schedule",
                format!("expected a cron expression with seconds, like \"0 5 * * * *\" (sec min hour dom month dow): {why}"),
            );
        }
        Evidence {
            source,
            files_path: PathBuf::from(raw.files.path),
            s3: raw.s3.map(|s| S3Location {
                bucket: s.bucket,
                prefix: s.prefix,
            }),
            athena,
            schedule: raw.schedule,
            overlap: self.duration("evidence.overlap", &raw.overlap),
            lookback: self.duration("evidence.lookback", &raw.lookback),
            retention: self.duration("evidence.retention", &raw.retention),
        }
    }

    fn eligibility(&mut self, raw: RawEligibility) -> Eligibility {
        Eligibility {
            window: self.duration("eligibility.window", &raw.window),
            min_history: self.duration("eligibility.min_history", &raw.min_history),
            min_calls: self.non_negative("eligibility.min_calls", raw.min_calls),
            max_would_deny: self.non_negative("eligibility.max_would_deny", raw.max_would_deny),
            quiet_for: self.duration("eligibility.quiet_for", &raw.quiet_for),
            max_evidence_age: self.duration("eligibility.max_evidence_age", &raw.max_evidence_age),
            exclude_users: raw.exclude_users,
            hold_expiry: self.duration("eligibility.hold_expiry", &raw.hold_expiry),
        }
    }

    fn waves(&mut self, raw: Vec<RawWave>) -> Vec<Wave> {
        if raw.is_empty() {
            self.problem("waves", "expected at least one wave");
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
            if let Some(prefix) = &wave.select.path_prefix {
                if !prefix.starts_with('/') {
                    self.problem(&format!("{at}.select.path_prefix"), format!("expected an IAM path starting with /, got {prefix:?}"));
                }
            }
            waves.push(Wave {
                batch_size: self.positive(&format!("{at}.batch_size"), wave.batch_size),
                soak: self.duration(&format!("{at}.soak"), &wave.soak),
                batches: wave.batches.map(|n| self.positive(&format!("{at}.batches"), n)),
                select: Selector {
                    path_prefix: wave.select.path_prefix,
                    user_glob,
                    tag: wave.select.tag.map(|t| (t.key, t.value)),
                },
                name: wave.name,
            });
        }
        waves
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
            poll: self.duration("guard.poll", &raw.poll),
            grace: self.duration("guard.grace", &raw.grace),
            window: self.duration("guard.window", &raw.window),
            min_affected_users: self.positive("guard.min_affected_users", raw.min_affected_users),
            min_denials: self.positive("guard.min_denials", raw.min_denials),
            silence_limit: self.duration("guard.silence_limit", &raw.silence_limit),
            requeue_after: raw.requeue_after.as_deref().map(|text| self.duration("guard.requeue_after", text)),
            after_soak: match raw.after_soak.as_str() {
                "alert" => AfterSoak::Alert,
                "release" => AfterSoak::Release,
                other => {
                    self.problem("guard.after_soak", format!("expected alert or release, got {other:?}"));
                    AfterSoak::Alert
                }
            },
            delivery_lag: self.duration("guard.delivery_lag", &raw.delivery_lag),
            false_alarm_budget: if raw.false_alarm_budget > 0.0 && raw.false_alarm_budget < 1.0 {
                raw.false_alarm_budget
            } else {
                let budget = raw.false_alarm_budget;
                self.problem("guard.false_alarm_budget", format!("expected a probability between 0 and 1 (exclusive), got {budget}"));
                0.001
            },
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
        if let Some(url) = &raw.webhook_url {
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                self.problem("listeners.webhook_url", format!("expected an http:// or https:// URL, got {url:?}"));
            }
        }
        Listeners {
            admin,
            metrics,
            token_file: raw.token_file.map(PathBuf::from),
            token_env: raw.token_env,
            webhook_url: raw.webhook_url,
        }
    }
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

/// Parses a cron expression exactly as the scheduler will (seconds field required).
pub fn parse_cron(text: &str) -> Result<croner::Cron, String> {
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
            Some(Frame::Map { path, pending_key }) => pending_key.take().map(|key| {
                if path.is_empty() { key } else { format!("{path}.{key}") }
            }),
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
                if let Some(Frame::Map { pending_key, .. }) = self.stack.last_mut() {
                    if pending_key.is_none() {
                        *pending_key = Some(value);
                        return;
                    }
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
            found
                .iter()
                .find(|p| p.path == path)
                .unwrap_or_else(|| panic!("no problem at {path} in {found:#?}"))
                .line
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
        let text = EXAMPLE.replace("  source: files                 # where the guard", "  source: athena                # where the guard");
        let found = problems(&text);
        assert_eq!(found.len(), 1, "{found:#?}");
        assert_eq!(found[0].path, "guard.source");
        assert!(found[0].message.contains("evidence.athena section is missing"));
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
}
