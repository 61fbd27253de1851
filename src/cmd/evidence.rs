//! `lockstep evidence`: refresh the evidence now, and say what it shows about users.
//!
//! `show` and `list` judge the window `eligibility.window` ending now, and never present stale
//! or missing evidence as good: they say how old it is and exit non-zero.

use std::cmp::Reverse;
use std::fmt::Write as _;
use std::io::Write as _;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use chrono::{DateTime, Utc};
use clap::{Subcommand, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use lockstep::clock::{Clock, SystemClock};
use lockstep::config::Config;
use lockstep::duration;
use lockstep::evidence::refresh::{self, Progress, Source, Window};
use lockstep::evidence::{EvidenceStore, Freshness, UserEvidence};
use lockstep::guard::DenialEvent;
use lockstep::perimeter::Verdict;
use lockstep::store::{RolloutStore, Store};
use rayon::iter::{IntoParallelRefIterator, ParallelIterator};
use serde::Serialize;

use super::user::Resolved;

#[derive(Debug, Subcommand)]
pub enum EvidenceCommand {
    /// Read new CloudTrail data from the configured source into the store now.
    ///
    /// Without --since, the window starts where the evidence already reaches (less
    /// evidence.overlap), or evidence.lookback ago on an empty store. Shows a progress bar on a
    /// terminal; prints a summary when done.
    Refresh {
        /// Start of the window: an RFC 3339 time (2024-05-01T00:00:00Z), a duration ago (36h, 7d),
        /// or `now`.
        #[arg(long, value_name = "TIME", value_parser = parse_time)]
        since: Option<TimeArg>,
        /// End of the window (default: now), same forms as --since.
        #[arg(long, value_name = "TIME", value_parser = parse_time)]
        until: Option<TimeArg>,
    },
    /// What the evidence says about one user: do they call only from trusted networks, when
    /// and what was their last call from outside, and from where.
    ///
    /// Exits non-zero when the evidence is stale or missing, or the user has no calls in the window.
    Show {
        #[arg(help = crate::USER_HELP, long_help = crate::USER_LONG_HELP)]
        user: String,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Every user with calls in the window: volume, calls from outside, last outside call.
    ///
    /// With several accounts and no --account: every account's users, account by account (in
    /// the configuration's order), with an ACCOUNT column (`account` in --json). Exits non-zero
    /// when the evidence (of any account) is stale or missing.
    List {
        /// Order of the rows (counts and times: largest and latest first), within each account.
        #[arg(long, value_enum, default_value_t = SortBy::Name)]
        sort: SortBy,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum SortBy {
    Name,
    Calls,
    Outside,
    LastOutside,
}

/// A point in time on the command line: absolute, or a duration before now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimeArg {
    At(DateTime<Utc>),
    Ago(Duration),
}

pub(crate) fn parse_time(text: &str) -> Result<TimeArg, String> {
    if text == "now" {
        return Ok(TimeArg::Ago(Duration::ZERO));
    }
    if let Ok(at) = DateTime::parse_from_rfc3339(text) {
        return Ok(TimeArg::At(at.to_utc()));
    }
    lockstep::config::parse_duration(text).map(TimeArg::Ago).map_err(|_| {
        format!("expected an RFC 3339 time (2024-05-01T00:00:00Z), a duration ago (36h, 7d) or `now`, got {text:?}")
    })
}

impl TimeArg {
    pub(crate) fn resolve(self, now: DateTime<Utc>) -> DateTime<Utc> {
        match self {
            TimeArg::At(at) => at,
            TimeArg::Ago(span) => refresh::before(now, span),
        }
    }
}

/// Runs an `evidence` command on `config` (every account it names); `account` is `--account`.
pub fn run(config: &Config, account: Option<&str>, command: EvidenceCommand) -> anyhow::Result<ExitCode> {
    let clock = SystemClock;
    match command {
        EvidenceCommand::Refresh { since, until } => {
            let view = super::view(config, "evidence refresh", account)?;
            super::block_on(refresh_now(&view, &clock, since, until))
        }
        EvidenceCommand::Show { user, json } => {
            let user = super::user::resolve(config, account, &user, "evidence show")?;
            show(&user, &open(&user.config)?, clock.now(), json)
        }
        EvidenceCommand::List { sort, json } if account.is_none() && config.is_multi_account() => {
            list_accounts(config, clock.now(), sort, json)
        }
        EvidenceCommand::List { sort, json } => {
            let view = super::view(config, "evidence list", account)?;
            list(&view, config.is_multi_account(), &open(&view)?, clock.now(), sort, json)
        }
    }
}

fn open(config: &Config) -> anyhow::Result<Store> {
    Store::open_for_account(&config.store.path, &config.account_id)
        .with_context(|| format!("cannot open the store {}", config.store.path.display()))
}

/// The command that refreshes the evidence, as `show` and `list` suggest it: of `account`, when
/// the configuration names several.
fn refresh_command(account: Option<&str>) -> String {
    match account {
        Some(id) => format!("lockstep --account {id} evidence refresh"),
        None => "lockstep evidence refresh".to_string(),
    }
}

async fn refresh_now(
    config: &Config,
    clock: &dyn Clock,
    since: Option<TimeArg>,
    until: Option<TimeArg>,
) -> anyhow::Result<ExitCode> {
    let store = open(config)?;
    let now = clock.now();
    let until = until.map_or(now, |t| t.resolve(now));
    let since = match since {
        Some(t) => t.resolve(now),
        None => refresh::scheduled_window(&store.freshness()?, until, &config.evidence).since,
    };
    anyhow::ensure!(since < until, "--since ({}) must be before --until ({})", day_time(since), day_time(until));
    let source = Source::from_config(config).await.context("cannot set up the evidence source")?;

    let bar = ProgressBar::new_spinner();
    bar.set_message("listing new trail files");
    bar.enable_steady_tick(Duration::from_millis(120));
    let mut records = 0u64;
    let mut on_progress = |progress: Progress| match progress {
        Progress::Listing => bar.set_message("listing new trail files"),
        Progress::Querying => bar.set_message("waiting for the Athena query"),
        Progress::Reading { files } => {
            bar.set_length(files);
            bar.set_style(
                ProgressStyle::with_template("{bar:30} {pos}/{len} files  {msg}  {elapsed} (eta {eta})")
                    .unwrap_or_else(|_| ProgressStyle::default_bar()),
            );
        }
        Progress::FileDone { records: n, .. } => {
            records += n;
            bar.inc(1);
            bar.set_message(format!("{} records", thousands(records)));
        }
    };
    let started = std::time::Instant::now();
    let outcome =
        refresh::refresh(&store, &source, config, Window { since, until }, clock, None, &mut on_progress).await;
    bar.finish_and_clear();
    let report =
        outcome.with_context(|| format!("evidence refresh from {} to {} failed", day_time(since), day_time(until)))?;
    let c = &report.counts;
    let corrupt = match c.files_corrupt {
        0 => String::new(),
        n => format!(" ({n} unreadable, skipped)"),
    };
    emit(format!(
        "Refreshed evidence from {} for {} to {} in {:.1}s: {} new file(s){corrupt}, {} records ({} malformed, skipped), {} read.\n",
        report.source,
        day_time(since),
        day_time(until),
        started.elapsed().as_secs_f64(),
        thousands(c.files),
        thousands(c.records_read),
        thousands(c.records_skipped),
        bytes(c.bytes_scanned),
    ))?;
    Ok(ExitCode::SUCCESS)
}

/// How current the evidence is, as `show` and `list` report it.
#[derive(Debug, Serialize)]
struct Currency {
    #[serde(flatten)]
    freshness: Freshness,
    /// Seconds between the end of the evidence and now.
    age_seconds: Option<i64>,
    max_age_seconds: u64,
    stale: bool,
    /// Why the planner would not act on this evidence (judged under another perimeter, hours
    /// stored without request contexts), stale or not.
    unusable: Option<String>,
}

impl Currency {
    fn new(store: &dyn RolloutStore, config: &Config, now: DateTime<Utc>) -> anyhow::Result<Currency> {
        let freshness = store.freshness()?;
        let age = freshness.covered_until.map(|until| now - until);
        let limit = config.eligibility.max_evidence_age;
        Ok(Currency {
            age_seconds: age.map(|a| a.num_seconds()),
            max_age_seconds: limit.as_secs(),
            stale: age.is_none_or(|a| a.to_std().is_ok_and(|a| a > limit)),
            unusable: lockstep::planner::evidence_problem(&freshness, config, now),
            freshness,
        })
    }

    /// One line for people; says plainly when the evidence cannot be trusted, and that `refresh`
    /// (the command) brings it up to date.
    fn line(&self, now: DateTime<Utc>, refresh: &str) -> String {
        format!("Evidence: {}", self.state(now, refresh))
    }

    /// [`Currency::line`] without its `Evidence: ` label.
    fn state(&self, now: DateTime<Utc>, refresh: &str) -> String {
        let limit = duration::format(Duration::from_secs(self.max_age_seconds));
        match self.freshness.covered_until {
            None => format!("NONE - no refresh has succeeded yet; run `{refresh}`."),
            Some(until) if self.stale => format!(
                "STALE - it ends {} ago ({}), over the {limit} limit; nothing below can be relied on.",
                duration::elapsed(now - until),
                day_time(until)
            ),
            Some(until) => {
                let current = format!("current to {} ({} ago)", day_time(until), duration::elapsed(now - until));
                match &self.unusable {
                    Some(why) => format!("{current}, but NOT USABLE - {why}."),
                    None => format!("{current}."),
                }
            }
        }
    }
}

#[derive(Serialize)]
struct ShowJson<'a> {
    /// The user's account.
    account: &'a str,
    user: &'a str,
    window: Window,
    evidence_currency: &'a Currency,
    /// Whether every call in the window came from trusted networks; null when the evidence is
    /// stale or the user has no calls.
    trusted_only: Option<bool>,
    evidence: Option<&'a UserEvidence>,
    calls_by_verdict: Vec<VerdictCount>,
    /// The user's most recent denials the guard recorded in the window (while it watched the
    /// user's batch or the user was locked), each with its cause and source.
    guard_denials: Vec<DenialEvent>,
}

#[derive(Serialize)]
struct VerdictCount {
    #[serde(flatten)]
    verdict: Verdict,
    calls: u64,
}

fn show(resolved: &Resolved, store: &dyn RolloutStore, now: DateTime<Utc>, json: bool) -> anyhow::Result<ExitCode> {
    let (config, user, label) = (&resolved.config, resolved.name.as_str(), resolved.label());
    let user_account = config.account_id.as_str();
    let window = Window { since: refresh::before(now, config.eligibility.window), until: now };
    let currency = Currency::new(store, config, now)?;
    let evidence = store.evidence_of(user, window.since, window.until)?;
    let verdicts = store.verdict_counts(user, window.since, window.until)?;
    let code = if !currency.stale && evidence.is_some() { ExitCode::SUCCESS } else { ExitCode::FAILURE };
    let trusted_only =
        evidence.as_ref().filter(|_| !currency.stale && currency.unusable.is_none()).map(|e| e.would_deny == 0);
    let guard_denials = recent_guard_denials(store, user, window.since)?;
    if json {
        let doc = ShowJson {
            account: user_account,
            user,
            window,
            evidence_currency: &currency,
            trusted_only,
            evidence: evidence.as_ref(),
            calls_by_verdict: verdicts.into_iter().map(|(verdict, calls)| VerdictCount { verdict, calls }).collect(),
            guard_denials,
        };
        emit(serde_json::to_string_pretty(&doc)? + "\n")?;
        return Ok(code);
    }

    let mut out = String::new();
    writeln!(out, "{}", currency.line(now, &refresh_command(resolved.qualified.then_some(user_account))))?;
    let window_span = duration::format(config.eligibility.window);
    let Some(e) = evidence else {
        writeln!(out, "{label}: no calls recorded in the last {window_span} (since {}).", day_time(window.since))?;
        out += &guard_denial_lines(&guard_denials);
        emit(out)?;
        return Ok(code);
    };
    let arn = e.arn.as_deref().map(|a| format!("  ({a})")).unwrap_or_default();
    writeln!(out, "{label}{arn}")?;
    let answer = match trusted_only {
        None => "unknown: the evidence is stale".to_string(),
        Some(true) => format!("yes: all {} in the last {window_span} came from trusted networks", calls(e.calls)),
        Some(false) => format!(
            "no: {} of {} in the last {window_span} would have been denied",
            thousands(e.would_deny),
            calls(e.calls)
        ),
    };
    writeln!(out, "  Trusted networks only?  {answer}")?;
    match &e.last_outside {
        Some(last) => writeln!(
            out,
            "  Last outside call:      {} ({} ago): {} from {} ({})",
            day_time(last.at),
            duration::elapsed(now - last.at),
            last.action,
            last.source,
            last.reason
        )?,
        None => writeln!(out, "  Last outside call:      none in the window")?,
    }
    let days = ((e.last_call - e.first_call).num_seconds() as f64 / 86_400.0).max(1.0 / 24.0);
    writeln!(
        out,
        "  History:                {} to {} ({}), {}, about {}/day",
        day_time(e.first_call),
        day_time(e.last_call),
        duration::elapsed(e.last_call - e.first_call),
        calls(e.calls),
        thousands((e.calls as f64 / days).round() as u64)
    )?;
    writeln!(
        out,
        "  Denials:                {} explicit identity-based deny (what the lockdown policy causes), {} other",
        thousands(e.explicit_denials),
        thousands(e.other_denials)
    )?;
    if !e.outside_sources.is_empty() {
        writeln!(out, "  Top outside sources:")?;
        let width = e.outside_sources.iter().take(TOP).map(|s| s.source.len()).max().unwrap_or(0);
        for s in e.outside_sources.iter().take(TOP) {
            writeln!(out, "    {:<width$}  {:>12}  last {}", s.source, calls(s.calls), day_time(s.last_seen))?;
        }
        if e.outside_sources.len() > TOP {
            writeln!(out, "    ... and {} more", e.outside_sources.len() - TOP)?;
        }
    }
    writeln!(out, "  Calls by verdict:")?;
    for (verdict, n) in &verdicts {
        writeln!(out, "    {:<15} {:<20} {:>9}", verdict.kind_name(), verdict.reason_name(), thousands(*n))?;
    }
    out += &guard_denial_lines(&guard_denials);
    emit(out)?;
    Ok(code)
}

/// How many of a user's recent guard denials `show` lists.
const RECENT_DENIALS: usize = 10;

/// The user's most recent denials the guard recorded since `since`, oldest first.
fn recent_guard_denials(
    store: &dyn RolloutStore,
    user: &str,
    since: DateTime<Utc>,
) -> anyhow::Result<Vec<DenialEvent>> {
    let mut denials: Vec<DenialEvent> = store.denials_since(since)?.into_iter().filter(|d| d.user == user).collect();
    denials.drain(..denials.len().saturating_sub(RECENT_DENIALS));
    Ok(denials)
}

/// The guard's recent denials of the user, with cause and source: what the lock blocked.
fn guard_denial_lines(denials: &[DenialEvent]) -> String {
    if denials.is_empty() {
        return String::new();
    }
    let mut out = "  Recent denials the guard recorded (cause, source):\n".to_string();
    for d in denials {
        out += &format!(
            "    {}  {:<8} {} {} from {}\n",
            day_time(d.at),
            d.kind.cause,
            d.action,
            d.code,
            d.source.as_deref().unwrap_or("unrecorded")
        );
    }
    out
}

/// Outside sources `show` lists.
const TOP: usize = 5;

#[derive(Serialize)]
struct ListJson<'a> {
    window: Window,
    evidence_currency: &'a Currency,
    users: &'a [UserEvidence],
}

/// `evidence list` of one account; `qualified` when the configuration names several.
fn list(
    config: &Config,
    qualified: bool,
    store: &dyn RolloutStore,
    now: DateTime<Utc>,
    sort: SortBy,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let window = list_window(config, now);
    let currency = Currency::new(store, config, now)?;
    let users = sorted_users(store, window, sort)?;
    let code = if currency.stale { ExitCode::FAILURE } else { ExitCode::SUCCESS };
    if json {
        let doc = ListJson { window, evidence_currency: &currency, users: &users };
        emit(serde_json::to_string_pretty(&doc)? + "\n")?;
        return Ok(code);
    }
    let mut out = String::new();
    writeln!(out, "{}", currency.line(now, &refresh_command(qualified.then_some(config.account_id.as_str()))))?;
    writeln!(out, "{} user(s) with calls in {}.", users.len(), window_text(config, window))?;
    let rows: Vec<(Option<&str>, &UserEvidence)> = users.iter().map(|u| (None, u)).collect();
    out += &user_table(&rows, now);
    emit(out)?;
    Ok(code)
}

/// One account's evidence currency in `evidence list` across accounts.
#[derive(Serialize)]
struct AccountCurrency<'a> {
    account: &'a str,
    /// The operator's name for the account, if the configuration gives one.
    name: Option<&'a str>,
    evidence_currency: Currency,
}

/// One user of one account in `evidence list` across accounts.
#[derive(Serialize)]
struct AccountUser<'a> {
    account: &'a str,
    #[serde(flatten)]
    evidence: &'a UserEvidence,
}

#[derive(Serialize)]
struct AccountsListJson<'a> {
    window: Window,
    accounts: &'a [AccountCurrency<'a>],
    users: Vec<AccountUser<'a>>,
}

/// `evidence list` of a configuration naming several accounts (no `--account`): every account's
/// users, account by account in the configuration's order, each account's rows in `sort` order.
/// A missing store has no users (and is not created). Fails when any account's evidence is stale.
fn list_accounts(config: &Config, now: DateTime<Utc>, sort: SortBy, json: bool) -> anyhow::Result<ExitCode> {
    let window = list_window(config, now);
    let views = config.account_views();
    // The accounts' stores are separate reads: on every core (rayon keeps the accounts' order).
    let read: Vec<anyhow::Result<(Currency, Vec<UserEvidence>)>> = views
        .par_iter()
        .map(|view| {
            let account = &view.account_id;
            let store = match view.store.path.exists() {
                true => open(view)?,
                false => Store::open_in_memory().context("opening an empty store in memory")?,
            };
            let currency = Currency::new(&store, view, now)
                .with_context(|| format!("reading the evidence currency of account {account}"))?;
            let users = sorted_users(&store, window, sort)
                .with_context(|| format!("reading the evidence of account {account}"))?;
            Ok((currency, users))
        })
        .collect();
    let mut currencies = Vec::new();
    let mut users = Vec::new();
    for (account, result) in config.accounts.iter().zip(read) {
        let (currency, these) = result?;
        users.push(these);
        currencies.push(AccountCurrency {
            account: &account.id,
            name: account.name.as_deref(),
            evidence_currency: currency,
        });
    }
    let rows: Vec<(&str, &UserEvidence)> =
        currencies.iter().zip(&users).flat_map(|(c, users)| users.iter().map(move |u| (c.account, u))).collect();
    let code = match currencies.iter().any(|c| c.evidence_currency.stale) {
        true => ExitCode::FAILURE,
        false => ExitCode::SUCCESS,
    };
    if json {
        let users = rows.iter().map(|&(account, evidence)| AccountUser { account, evidence }).collect();
        let doc = AccountsListJson { window, accounts: &currencies, users };
        emit(serde_json::to_string_pretty(&doc)? + "\n")?;
        return Ok(code);
    }
    let mut out = "Evidence by account:\n".to_string();
    for (account, c) in config.accounts.iter().zip(&currencies) {
        writeln!(out, "  {account}: {}", c.evidence_currency.state(now, &refresh_command(Some(&account.id))))?;
    }
    writeln!(
        out,
        "{} user(s) with calls in {}, in {} accounts.",
        rows.len(),
        window_text(config, window),
        currencies.len()
    )?;
    let rows: Vec<(Option<&str>, &UserEvidence)> = rows.into_iter().map(|(account, u)| (Some(account), u)).collect();
    out += &user_table(&rows, now);
    emit(out)?;
    Ok(code)
}

/// The window `list` judges: `eligibility.window` ending now.
fn list_window(config: &Config, now: DateTime<Utc>) -> Window {
    Window { since: refresh::before(now, config.eligibility.window), until: now }
}

/// `the last 30d (since ...)`.
fn window_text(config: &Config, window: Window) -> String {
    format!("the last {} (since {})", duration::format(config.eligibility.window), day_time(window.since))
}

/// Every user with calls in `window`, in `sort` order.
fn sorted_users(store: &dyn RolloutStore, window: Window, sort: SortBy) -> anyhow::Result<Vec<UserEvidence>> {
    let mut users = store.user_evidence(window.since, window.until)?;
    match sort {
        SortBy::Name => {}
        SortBy::Calls => users.sort_by_key(|u| Reverse(u.calls)),
        SortBy::Outside => users.sort_by_key(|u| Reverse(u.would_deny)),
        SortBy::LastOutside => users.sort_by_key(|u| Reverse(u.last_outside.as_ref().map(|o| o.at))),
    }
    Ok(users)
}

/// The users' table, after a blank line (nothing without rows); an ACCOUNT column first when
/// the rows carry their account.
fn user_table(rows: &[(Option<&str>, &UserEvidence)], now: DateTime<Utc>) -> String {
    if rows.is_empty() {
        return String::new();
    }
    let width = rows.iter().map(|(_, u)| u.user.len()).max().unwrap_or(4).max(4);
    let account = |a: Option<&str>| a.map(|a| format!("{a:<12}  ")).unwrap_or_default();
    let heading = account(rows[0].0.map(|_| "ACCOUNT"));
    let mut out = format!("\n{heading}{:<width$}  {:>9}  {:>8}  LAST OUTSIDE CALL\n", "USER", "CALLS", "OUTSIDE");
    for (a, u) in rows {
        let last = match &u.last_outside {
            Some(o) => format!("{:>4} ago  {} from {}", duration::elapsed(now - o.at), o.action, o.source),
            None => "-".to_string(),
        };
        out += &format!(
            "{}{:<width$}  {:>9}  {:>8}  {last}\n",
            account(*a),
            u.user,
            thousands(u.calls),
            thousands(u.would_deny)
        );
    }
    out
}

/// Writes a command's output in one go; a closed pipe is an error, not a panic.
pub(crate) fn emit(text: String) -> anyhow::Result<()> {
    let mut stdout = std::io::stdout().lock();
    stdout.write_all(text.as_bytes()).and_then(|()| stdout.flush()).context("cannot write the output")
}

fn calls(n: u64) -> String {
    format!("{} call{}", thousands(n), if n == 1 { "" } else { "s" })
}

fn day_time(at: DateTime<Utc>) -> String {
    at.format("%Y-%m-%d %H:%M UTC").to_string()
}

pub(crate) fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn bytes(n: u64) -> String {
    match n {
        0..1_000_000 => format!("{:.1} kB", n as f64 / 1e3),
        1_000_000..1_000_000_000 => format!("{:.1} MB", n as f64 / 1e6),
        _ => format!("{:.2} GB", n as f64 / 1e9),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_and_numbers_read_well() {
        let now: DateTime<Utc> = "2024-03-20T10:00:00Z".parse().unwrap();
        assert_eq!(parse_time("36h").unwrap().resolve(now), "2024-03-18T22:00:00Z".parse::<DateTime<Utc>>().unwrap());
        assert_eq!(
            parse_time("2024-03-01T00:00:00+01:00").unwrap().resolve(now),
            "2024-02-29T23:00:00Z".parse::<DateTime<Utc>>().unwrap()
        );
        assert!(parse_time("yesterday").is_err());
        assert_eq!(thousands(1_234_567), "1,234,567");
        assert_eq!(thousands(999), "999");
        assert_eq!(bytes(2_500_000), "2.5 MB");
    }
}
