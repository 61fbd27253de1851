//! `exempt` and `exemptions`: exemptions that expire. `exempt` sets the perimeter's exemption tag
//! with its end and reason in IAM and records the operator in the ledger and the audit log (the
//! intent journaled before the tag write); `exemptions` lists what IAM says with the ledger's
//! record beside it. The daemon removes the tags when an exemption ends.

use std::process::ExitCode;

use anyhow::{Context, anyhow};
use chrono::{DateTime, SecondsFormat, Utc};
use lockstep::clock::{Clock, SystemClock};
use lockstep::config::Config;
use lockstep::duration::elapsed;
use lockstep::exemption::{self, ExemptionState, Expiry, Grant};
use lockstep::iam::{AwsIam, Iam};
use lockstep::metrics::{MeteredIam, Metrics};
use lockstep::store::{Ledger, Store};

/// What `lockstep exempt` was asked to do.
pub struct Request {
    /// The IAM user name.
    pub user: String,
    /// The user's account, when the configuration names several (output then says which).
    pub account: Option<String>,
    /// `--until` as typed: a date, an RFC 3339 time or a duration.
    pub until: String,
    /// Why (also the reason tag).
    pub reason: String,
    /// Who, for the ledger and the audit log.
    pub operator: String,
    /// Write the tags and the record (otherwise print what would change).
    pub commit: bool,
}

fn exemption_key(config: &Config) -> anyhow::Result<&str> {
    config.perimeter.exempt_tag_key.as_deref().ok_or_else(|| {
        anyhow!("rollout.yaml sets no perimeter.exempt_tag_key: there is no exemption tag to set or read")
    })
}

async fn iam(config: &Config) -> anyhow::Result<MeteredIam<AwsIam>> {
    let sdk = lockstep::aws::for_config(config).await?;
    Ok(MeteredIam::new(AwsIam::new(&sdk, &config.account_id), Metrics::new()))
}

fn rfc3339(at: DateTime<Utc>) -> String {
    at.to_rfc3339_opts(SecondsFormat::Secs, true)
}

/// `lockstep exempt`: prints the change, or (with `--commit`) journals it, tags the user and
/// records it as granted.
pub async fn exempt(config: &Config, request: Request) -> anyhow::Result<ExitCode> {
    let key = exemption_key(config)?;
    let now = SystemClock.now();
    let until = exemption::parse_until(&request.until, now).map_err(|why| anyhow!("--until: {why}"))?;
    exemption::check_reason(&request.reason).map_err(|why| anyhow!("--reason: {why}"))?;
    let tags = exemption::grant_tags(key, until, &request.reason);
    let user = &request.user;
    let in_account = request.account.as_deref().map(|id| format!(" in account {id}")).unwrap_or_default();
    let store_path = config.store.path.display();
    if !request.commit {
        println!("dry run, nothing changed; with --commit lockstep would tag IAM user {user}{in_account}:");
        for (key, value) in &tags {
            println!("  {key}={value}");
        }
        println!(
            "and record in the ledger ({store_path}) and the audit log: exempt by {} until {} ({} from now): {}",
            request.operator,
            rfc3339(until),
            elapsed(until - now),
            request.reason
        );
        return Ok(ExitCode::SUCCESS);
    }
    let store = Store::open_for_account(&config.store.path, &config.account_id)
        .with_context(|| format!("opening the store {store_path}"))?;
    let grant = Grant { user, until, reason: &request.reason, by: &request.operator };
    store.begin_exemption(&grant, now)?;
    iam(config)
        .await?
        .tag_user(user, &tags)
        .await
        .with_context(|| format!("tagging IAM user {user}{in_account} (the exemption is journaled; rerun to retry)"))?;
    store.mark_exemption(user, ExemptionState::Granted, &request.operator, now)?;
    println!(
        "exempted {user}{in_account} until {} ({} from now): tags {} set in IAM; recorded by {}",
        rfc3339(until),
        elapsed(until - now),
        exemption::tag_keys(key).join(", "),
        request.operator
    );
    Ok(ExitCode::SUCCESS)
}

/// One exemption as `lockstep exemptions` shows it.
#[derive(Debug, serde::Serialize)]
struct Listed {
    user: String,
    /// When it ends, as the tag says.
    expiry: Expiry,
    /// Seconds left (negative: ended, the daemon removes the tags at its next step in commit mode).
    seconds_left: Option<i64>,
    /// No `<key>-until` tag: set by hand, never reviewed.
    no_expiry: bool,
    reason: Option<String>,
    /// The operator who granted it and when, from the ledger.
    granted_by: Option<String>,
    granted_at: Option<DateTime<Utc>>,
}

/// `lockstep exemptions`: exempt users as IAM shows them, with the ledger's record of who granted
/// each; flags those with no expiry.
pub async fn list(config: &Config, json: bool) -> anyhow::Result<ExitCode> {
    let key = exemption_key(config)?;
    let now = SystemClock.now();
    let directory = iam(config).await?.list_users().await.context("reading the IAM user directory")?;
    // The store is optional here: exemptions set by hand are in IAM only.
    let records = match config.store.path.exists() {
        true => Store::open_for_account(&config.store.path, &config.account_id)
            .with_context(|| format!("opening the store {}", config.store.path.display()))?
            .exemption_records()?,
        false => Vec::new(),
    };
    let listed: Vec<Listed> = exemption::exemptions(&directory.users, key)
        .into_iter()
        .map(|e| {
            let record = records.iter().find(|r| r.user == e.user && r.state == ExemptionState::Granted);
            Listed {
                seconds_left: match e.expiry {
                    Expiry::At(until) => Some((until - now).num_seconds()),
                    _ => None,
                },
                no_expiry: e.expiry == Expiry::Never,
                user: e.user,
                expiry: e.expiry,
                reason: e.reason,
                granted_by: record.map(|r| r.by.clone()),
                granted_at: record.map(|r| r.at),
            }
        })
        .collect();
    if json {
        println!("{}", serde_json::to_string_pretty(&listed)?);
        return Ok(ExitCode::SUCCESS);
    }
    if listed.is_empty() {
        println!("no user carries {key}=true");
        return Ok(ExitCode::SUCCESS);
    }
    for entry in &listed {
        let ends = match &entry.expiry {
            Expiry::At(until) if *until > now => format!("until {} ({} left)", rfc3339(*until), elapsed(*until - now)),
            Expiry::At(until) => format!("ended {}; the daemon removes the tags (commit mode)", rfc3339(*until)),
            Expiry::Never => "NO EXPIRY (set by hand): review it, or give it an end with `lockstep exempt`".to_string(),
            Expiry::Unreadable(text) => {
                format!("UNREADABLE END {text:?} in {}: never expires", exemption::until_key(key))
            }
        };
        let reason = entry.reason.as_deref().unwrap_or("no reason given");
        let granted = match (&entry.granted_by, entry.granted_at) {
            (Some(by), Some(at)) => format!("; by {by} on {}", at.format("%Y-%m-%d")),
            _ => String::new(),
        };
        println!("{}  {ends}  {reason}{granted}", entry.user);
    }
    let by_hand = listed.iter().filter(|e| e.no_expiry).count();
    if by_hand > 0 {
        println!("{by_hand} exemption(s) with no expiry");
    }
    Ok(ExitCode::SUCCESS)
}
