//! Operator commands: `status`, `plan`, `pause`, `resume`, `rollback`, `hold`, `release`,
//! `promote-next`. They talk to the daemon's admin API; when the daemon is down, they act on the
//! store (and, for a rollback with `--commit`, on IAM) directly, because that is when an operator
//! needs them most. "Down" is proven, not guessed: an offline command holds the store lock
//! ([`StoreLock::offline`]), which a running daemon never lets it take.

use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, bail};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::{Method, Request, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use lockstep::api::{self, Answer};
use lockstep::clock::{Clock, SystemClock};
use lockstep::config::{AfterSoak, Config};
use lockstep::controller::{Controller, Mode, remove_and_hold};
use lockstep::duration::elapsed as ago;
use lockstep::evidence::{EvidenceStore, SourceError};
use lockstep::feed::EventFeed;
use lockstep::fleet::{self, AccountSummary};
use lockstep::guard::{Explanation, LockedUserReport, VerdictKind};
use lockstep::iam::AwsIam;
use lockstep::metrics::{MeteredIam, Metrics};
use lockstep::planner::{Action, Eligibility, Forecast, Gate, Plan};
use lockstep::rollout::UserState;
use lockstep::runtime::{self, Command, Status};
use lockstep::store::{Ledger, LockError, Store, StoreError, StoreLock};
use lockstep::trail::Record;

use crate::WaitTarget;

/// Why the daemon could not be asked.
enum Reach {
    Down(String),
    Failed(anyhow::Error),
}

struct AdminClient {
    base: String,
    token: String,
}

impl AdminClient {
    fn new(config: &Config) -> anyhow::Result<Option<AdminClient>> {
        let token = api::admin_token(&config.listeners).context("reading the admin token")?;
        Ok(token.map(|token| AdminClient { base: format!("http://{}", config.listeners.admin), token }))
    }

    async fn call(&self, method: Method, path: &str, body: Option<String>) -> Result<(StatusCode, Bytes), Reach> {
        let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
        let request = Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.base))
            .header("authorization", format!("Bearer {}", self.token))
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|e| Reach::Failed(e.into()))?;
        let response = match client.request(request).await {
            Ok(response) => response,
            Err(e) if e.is_connect() => return Err(Reach::Down(format!("daemon not reachable at {}", self.base))),
            Err(e) => return Err(Reach::Failed(anyhow::Error::new(e).context(format!("calling {}{path}", self.base)))),
        };
        let status = response.status();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|e| Reach::Failed(anyhow::Error::new(e).context("reading the daemon's answer")))?
            .to_bytes();
        Ok((status, body))
    }
}

/// Asks the daemon, or says why it could not.
async fn ask(
    config: &Config,
    method: Method,
    path: &str,
    body: Option<String>,
) -> anyhow::Result<Result<(StatusCode, Bytes), String>> {
    let Some(client) = AdminClient::new(config)? else {
        return Ok(Err(format!("no admin token configured (listeners.token_file or ${})", config.listeners.token_env)));
    };
    // The daemon may roll out several accounts: every call names the one it is about.
    let path = format!("{path}?account={}", config.account_id);
    match client.call(method, &path, body).await {
        Ok(answer) => Ok(Ok(answer)),
        Err(Reach::Down(why)) => Ok(Err(why)),
        Err(Reach::Failed(error)) => Err(error),
    }
}

pub async fn status(config: &Config, json: bool) -> anyhow::Result<ExitCode> {
    let status = current_status(config, true).await?;
    print!("{}", format_status(&status, json)?);
    Ok(ExitCode::SUCCESS)
}

/// The daemon's status, or the ledger's when the daemon is down (`announce`: say so on stderr).
async fn current_status(config: &Config, announce: bool) -> anyhow::Result<Status> {
    Ok(match ask(config, Method::GET, "/v1/status", None).await? {
        Ok((code, body)) if code.is_success() => {
            serde_json::from_slice::<Status>(&body).context("the daemon's status answer")?
        }
        Ok((code, body)) => bail!("daemon answered {code}: {}", answer_text(&body)),
        Err(why) => {
            if announce {
                eprintln!("{why}; showing the ledger from {}", config.store.path.display());
            }
            offline_status(config)?
        }
    })
}

/// `lockstep status` of a configuration naming several accounts: one line per account, from the
/// daemon, or from each account's store when it is down.
pub async fn accounts(config: &Config, json: bool) -> anyhow::Result<ExitCode> {
    let mut daemon_down = false;
    let summary = match ask(config, Method::GET, "/v1/accounts", None).await? {
        Ok((code, body)) if code.is_success() => {
            serde_json::from_slice::<Vec<AccountSummary>>(&body).context("the daemon's accounts answer")?
        }
        Ok((code, body)) => bail!("daemon answered {code}: {}", answer_text(&body)),
        Err(why) => {
            eprintln!("{why}; showing each account's ledger");
            daemon_down = true;
            let mut summary = Vec::new();
            for view in config.account_views() {
                match offline_status(&view) {
                    Ok(status) => summary.push(fleet::summarize(status)),
                    Err(error) => summary.push(AccountSummary {
                        account: view.account_id.clone(),
                        blocked: Some(runtime::Blocked {
                            since: SystemClock.now(),
                            kind: "store".to_string(),
                            reason: format!("{error:#}"),
                        }),
                        gate: None,
                        current_wave: None,
                        users: Default::default(),
                        active_batches: 0,
                        evidence_last_success: None,
                        last_step: None,
                    }),
                }
            }
            summary
        }
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
    } else {
        print!("{}", render_accounts(config, &summary, daemon_down, SystemClock.now()));
    }
    Ok(ExitCode::SUCCESS)
}

/// One line per account: its state (blocked, or the gate), wave, users and evidence age; then
/// each blocked account's reason. With the daemon down (`daemon_down`) there is no gate: the
/// ledgers say what was done, not what the next step would do.
fn render_accounts(
    config: &Config,
    summary: &[AccountSummary],
    daemon_down: bool,
    now: chrono::DateTime<chrono::Utc>,
) -> String {
    let mut out = String::new();
    let name = |id: &str| config.accounts.iter().find(|a| a.id == id).and_then(|a| a.name.clone()).unwrap_or_default();
    out += &format!(
        "{:<12}  {:<14}  {:<12}  {:<14}  {:>6}  {:>4}  {:>9}  {:>7}  evidence\n",
        "account", "name", "state", "wave", "locked", "held", "candidate", "batches"
    );
    for account in summary {
        let state = match (&account.blocked, &account.gate) {
            (Some(_), _) => "BLOCKED",
            (None, Some(Gate::Open)) => "open",
            (None, Some(Gate::Finished)) => "finished",
            (None, Some(Gate::Paused(_))) => "paused",
            (None, Some(Gate::Inconclusive(_))) => "inconclusive",
            (None, Some(Gate::Blocked(_))) => "gate closed",
            (None, None) if daemon_down => "daemon down",
            (None, None) => "no step yet",
        };
        let count = |state: &str| account.users.get(state).copied().unwrap_or(0);
        let evidence = match account.evidence_last_success {
            Some(at) => format!("{} ago", ago(now - at)),
            None => "never refreshed".to_string(),
        };
        out += &format!(
            "{:<12}  {:<14}  {:<12}  {:<14}  {:>6}  {:>4}  {:>9}  {:>7}  {evidence}\n",
            account.account,
            name(&account.account),
            state,
            account.current_wave.as_deref().unwrap_or("-"),
            count(UserState::Locked.as_str()),
            count(UserState::Held.as_str()),
            count("candidate"),
            account.active_batches,
        );
    }
    for account in summary {
        if let Some(blocked) = &account.blocked {
            out += &format!(
                "\n{} blocked since {} ({}): {}\n",
                account.account,
                blocked.since.format("%Y-%m-%d %H:%MZ"),
                blocked.kind,
                blocked.reason
            );
        } else if let Some(Gate::Blocked(why) | Gate::Paused(why) | Gate::Inconclusive(why)) = &account.gate {
            out += &format!("\n{}: {why}\n", account.account);
        }
    }
    out += "\n(lockstep --account <id> status shows one account in full)\n";
    out
}

fn format_status(status: &Status, json: bool) -> anyhow::Result<String> {
    Ok(if json { serde_json::to_string_pretty(status)? + "\n" } else { render_status(status) })
}

fn render_status(status: &Status) -> String {
    let mut out = String::new();
    let gate = match &status.gate {
        Some(Gate::Open) => "open".to_string(),
        Some(Gate::Finished) => "finished: every wave is done".to_string(),
        Some(Gate::Paused(why)) => format!("paused: {why}"),
        Some(Gate::Inconclusive(why)) => format!("inconclusive: {why}"),
        Some(Gate::Blocked(why)) => format!("blocked: {why}"),
        None => match &status.paused {
            Some(p) => format!("paused by {}: {}", p.by, p.reason),
            None => "unknown (daemon not running)".to_string(),
        },
    };
    out += &format!("rollout    {gate}\n");
    out += &format!("mode       {}\n", status.mode);
    out += &format!("wave       {}\n", status.current_wave.as_deref().unwrap_or("-"));
    let evidence = match status.evidence.last_success {
        Some(at) => format!("last refresh {} ({} ago)", at.format("%Y-%m-%d %H:%MZ"), ago(status.at - at)),
        None => "never refreshed".to_string(),
    };
    out += &format!("evidence   {evidence}\n");
    let users: Vec<String> = status.users.iter().map(|(state, n)| format!("{n} {state}")).collect();
    out += &format!("users      {}\n", if users.is_empty() { "-".to_string() } else { users.join(", ") });
    for why in &status.waiting {
        out += &format!("waiting    {why}\n");
    }
    if !status.batches.is_empty() {
        out += &format!(
            "\n{:>5}  {:<14} {:<12} {:>12}  {:<40} {}\n",
            "BATCH", "WAVE", "STATE", "SOAK LEFT", "MEMBERS", "GUARD"
        );
        for b in &status.batches {
            let soak =
                b.soak_remaining_seconds.map(|s| ago(chrono::Duration::seconds(s))).unwrap_or_else(|| "-".to_string());
            let mut members = b.members.join(",");
            if members.chars().count() > 40 {
                let count = format!("… ({})", b.members.len());
                let keep = 40 - count.chars().count();
                members = format!("{}{count}", members.chars().take(keep).collect::<String>());
            }
            out += &format!(
                "{:>5}  {:<14} {:<12} {:>12}  {:<40} {}\n",
                b.id,
                b.wave,
                b.state,
                soak,
                members,
                guard_column(b.verdict.as_deref(), b.verdict_kind)
            );
            if let Some(explanation) = &b.explanation {
                out += &explanation_lines(explanation);
            }
        }
    }
    out += &locked_denied_lines(&status.locked_denied);
    out + &forecast_lines(&status.forecast)
}

/// Locked users the lockdown policy denied after their soak: breakage, or the lock doing its job.
/// Each with its blocked calls per source and its most recent denied calls.
fn locked_denied_lines(reports: &[LockedUserReport]) -> String {
    const SHOWN: usize = 5;
    if reports.is_empty() {
        return String::new();
    }
    let mut out =
        "\nlocked users the lockdown denied in the last guard window (a workflow moved, or the lock at work):\n"
            .to_string();
    for report in reports {
        let sources: Vec<String> = report.sources.iter().map(|(source, n)| format!("{source} ({n})")).collect();
        let action = match report.action {
            AfterSoak::Alert => "reported (guard.after_soak: alert)",
            AfterSoak::Release => "taken out and held (guard.after_soak: release)",
        };
        out += &format!("  {}: {} denied call(s) from {}; {action}\n", report.user, report.denied, sources.join(", "));
        let recent = report.lockdown_denials.len().saturating_sub(SHOWN);
        for call in &report.lockdown_denials[recent..] {
            out += &format!(
                "    {} {} {} from {}\n",
                call.at.format("%Y-%m-%d %H:%M:%SZ"),
                call.action,
                call.code,
                call.source.as_deref().unwrap_or("unrecorded")
            );
        }
    }
    out
}

/// The waves still to come, as a table; nothing when there are none.
fn forecast_lines(forecast: &Forecast) -> String {
    if forecast.waves.is_empty() {
        return String::new();
    }
    let mut out = format!(
        "\nforecast at the current pace if the gate stays open ({:.1} promoted a day over the last {} days):\n",
        forecast.recent_per_day,
        lockstep::planner::RECENT_DAYS
    );
    out += &format!(
        "  {:<14} {:>6} {:>8} {:>9}  {:<17}  {}\n",
        "WAVE", "USERS", "BATCHES", "USERS/DAY", "STARTS", "DONE BY"
    );
    for w in &forecast.waves {
        let date = |at: chrono::DateTime<chrono::Utc>| at.format("%Y-%m-%d %H:%MZ").to_string();
        out += &format!(
            "  {:<14} {:>6} {:>8} {:>9.1}  {:<17}  {}\n",
            w.wave,
            w.users,
            w.batches,
            w.users_per_day,
            date(w.starts),
            date(w.finishes)
        );
    }
    out
}

/// Why the guard judged a batch as it did, under its row: denials per cause and how they were
/// weighed, the culprits and the members not at fault.
fn explanation_lines(e: &Explanation) -> String {
    let mut out = format!(
        "       guard: {} weighted denials (threshold {} users, {} denials; false-alarm budget {} over {} tests)\n",
        e.weighted_denials, e.min_affected_users, e.min_denials, e.false_alarm_budget, e.tests_per_soak
    );
    for m in e.members.iter().filter(|m| m.lockdown + m.other + m.unknown > 0) {
        out += &format!(
            "       {}: {} lockdown, {} unknown (expected {:.1}, allowed {}), {} other not counted\n",
            m.user, m.lockdown, m.unknown, m.unknown_expected, m.unknown_allowance, m.other
        );
    }
    if !e.culprits.is_empty() {
        let culprits: Vec<String> =
            e.culprits.iter().map(|c| format!("{} ({} calls)", c.user, c.offending.len())).collect();
        out += &format!("       at fault: {}\n", culprits.join(", "));
        out += &format!(
            "       not at fault: {}\n",
            if e.bystanders.is_empty() { "-".to_string() } else { e.bystanders.join(", ") }
        );
    }
    out
}

/// The guard's verdict in a table cell: the verdict alone when healthy, else a short why.
fn guard_column(verdict: Option<&str>, kind: Option<VerdictKind>) -> String {
    const WIDTH: usize = 60;
    match verdict {
        None => "-".to_string(),
        Some(_) if kind == Some(VerdictKind::Healthy) => VerdictKind::Healthy.to_string(),
        Some(v) if v.chars().count() > WIDTH => format!("{}…", v.chars().take(WIDTH - 1).collect::<String>()),
        Some(v) => v.to_string(),
    }
}

fn answer_text(body: &[u8]) -> String {
    serde_json::from_slice::<Answer>(body)
        .map(|a| a.message)
        .unwrap_or_else(|_| String::from_utf8_lossy(body).into_owned())
}

/// Sends an operator command to the daemon, or applies it to the store when the daemon is down.
pub async fn command(config: &Config, command: Command, commit: bool) -> anyhow::Result<ExitCode> {
    match ask(config, Method::POST, "/v1/command", Some(serde_json::to_string(&command)?)).await? {
        Ok((code, body)) if code.is_success() => {
            println!("{}", answer_text(&body));
            Ok(ExitCode::SUCCESS)
        }
        Ok((code, body)) if code == StatusCode::CONFLICT => {
            eprintln!("refused, nothing changed: {}", answer_text(&body));
            Ok(ExitCode::FAILURE)
        }
        Ok((code, body)) => bail!("daemon answered {code}: {}", answer_text(&body)),
        Err(why) => {
            eprintln!("{why}; acting on the store {} directly if the daemon is down", config.store.path.display());
            offline(config, command, commit).await
        }
    }
}

async fn offline(config: &Config, command: Command, commit: bool) -> anyhow::Result<ExitCode> {
    if matches!(command, Command::PromoteNext { .. }) {
        bail!("promote-next needs the running daemon (start it with `lockstep run --commit`)");
    }
    if !config.store.path.exists() {
        existing_store(config)?; // says why
    }
    let _lock = match StoreLock::offline(&config.store.path) {
        Ok(lock) => lock,
        Err(LockError::Held { .. }) => {
            eprintln!(
                "refused, nothing changed: the lockstep daemon is running on {}; the command must go through its admin API (give it the admin token: listeners.token_file or ${})",
                config.store.path.display(),
                config.listeners.token_env
            );
            return Ok(ExitCode::FAILURE);
        }
        Err(error) => return Err(error.into()),
    };
    let store = existing_store(config)?;
    let now = SystemClock.now();
    if let Command::Rollback { batch, .. } = &command
        && !commit
    {
        let snapshot = store.snapshot()?;
        let Some(found) = snapshot.batch(*batch) else {
            bail!("there is no batch {batch}");
        };
        println!(
            "dry run, nothing changed; with --commit lockstep would roll back batch {batch} ({}) and remove from {}: {}",
            found.state,
            config.lockdown.group,
            found.members.join(", ")
        );
        return Ok(ExitCode::SUCCESS);
    }
    let message = match runtime::apply_command(&store, &command, config, now) {
        Ok(message) => message,
        Err(StoreError::Refused(why)) => {
            eprintln!("refused, nothing changed: {why}");
            return Ok(ExitCode::FAILURE);
        }
        Err(error) => return Err(error.into()),
    };
    println!("{message}");
    if let Command::Rollback { operator, .. } = &command {
        remove_rolled_back(config, &store, operator).await?;
    }
    Ok(ExitCode::SUCCESS)
}

/// Takes every `rolling_back` user out of the group and marks them held, through the daemon's
/// removal path and its metered IAM client.
async fn remove_rolled_back(config: &Config, store: &dyn Ledger, operator: &str) -> anyhow::Result<()> {
    let sdk = lockstep::aws::for_config(config).await?;
    let iam = MeteredIam::new(AwsIam::new(&sdk, &config.account_id), Metrics::new());
    let group = &config.lockdown.group;
    let snapshot = store.snapshot()?;
    for member in snapshot.members.values().filter(|m| m.state == lockstep::rollout::UserState::RollingBack) {
        remove_and_hold(&iam, store, group, &member.user, true, operator, SystemClock.now()).await.with_context(
            || format!("removing {} from {group} (the rollback is journaled; rerun to retry)", member.user),
        )?;
        println!("removed {} from {group}", member.user);
    }
    Ok(())
}

/// The store, which must already exist: an operator command never starts a new ledger.
fn existing_store(config: &Config) -> anyhow::Result<Store> {
    let path = &config.store.path;
    if !path.exists() {
        bail!("no store at {} (store.path): nothing has run yet with this configuration", path.display());
    }
    Store::open_for_account(path, &config.account_id).with_context(|| format!("opening the store {}", path.display()))
}

/// A feed that is never polled: `plan` only previews.
struct NoFeed;

impl EventFeed for NoFeed {
    async fn poll(&mut self) -> Result<Vec<Record>, SourceError> {
        Ok(Vec::new())
    }
}

pub async fn plan(config: &Config, json: bool) -> anyhow::Result<ExitCode> {
    let plan = match ask(config, Method::GET, "/v1/plan", None).await? {
        Ok((code, body)) if code.is_success() => {
            serde_json::from_slice::<Plan>(&body).context("the daemon's plan answer")?
        }
        Ok((code, body)) => bail!("daemon answered {code}: {}", answer_text(&body)),
        Err(why) => {
            eprintln!("{why}; planning from the store and IAM directly");
            let store = Arc::new(existing_store(config)?);
            let sdk = lockstep::aws::for_config(config).await?;
            let clock: Arc<dyn Clock> = Arc::new(SystemClock);
            let mut controller = Controller::new(
                config.clone(),
                store,
                AwsIam::new(&sdk, &config.account_id),
                NoFeed,
                clock,
                Mode::DryRun,
            );
            controller.preview().await?
        }
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&plan)?);
    } else {
        print!("{}", render_plan(&plan));
    }
    Ok(ExitCode::SUCCESS)
}

fn render_plan(plan: &Plan) -> String {
    let mut out = format!("gate: {}\n", serde_json::to_value(&plan.gate).map(|v| v.to_string()).unwrap_or_default());
    if plan.actions.is_empty() {
        out += "next: nothing to do now\n";
    }
    for action in &plan.actions {
        out += &match action {
            Action::StartBatch { wave, users } => {
                let mut text = format!("next: start a batch of {} in wave {wave}\n", users.len());
                for c in users {
                    text += &format!("  {:<24} {}\n", c.user, c.why);
                }
                text
            }
            Action::Succeed { batch, detail } => format!("next: batch {batch} succeeds ({detail})\n"),
            Action::RollBack { batch, reason } => format!("next: roll back batch {batch}: {reason}\n"),
            Action::FinishWave { wave, why } => format!("next: wave {wave} finishes: {why}\n"),
        };
    }
    for why in &plan.waiting {
        out += &format!("waiting: {why}\n");
    }
    let ineligible: Vec<_> = plan
        .users
        .iter()
        .filter_map(|(u, e)| match e {
            Eligibility::Ineligible(why) => Some((u, why)),
            Eligibility::Eligible(_) => None,
        })
        .collect();
    if !ineligible.is_empty() {
        out += "\nnot eligible:\n";
        for (user, why) in ineligible {
            out += &format!("  {user:<24} {why}\n");
        }
    }
    out + &forecast_lines(&plan.forecast)
}

/// The status from the store alone, with the mode of the last run that recorded anything.
fn offline_status(config: &Config) -> anyhow::Result<Status> {
    let store = existing_store(config)?;
    let snapshot = store.snapshot()?;
    let mode = store.audit_log(LAST_MODE_HORIZON)?.iter().rev().find_map(|entry| Mode::of_actor(&entry.actor));
    let mut status =
        runtime::status(&snapshot, None, store.freshness()?, mode.unwrap_or(Mode::DryRun), SystemClock.now());
    if mode.is_none() {
        status.mode = "unknown (no run recorded)".to_string();
    }
    status.locked_denied = lockstep::controller::locked_watch(&store, config, status.at)?.reports;
    status.account = config.account_id.clone();
    Ok(status)
}

/// How many recent audit lines to search for the last run's mode.
const LAST_MODE_HORIZON: usize = 5_000;

/// `status --watch`: redraws every `interval` until Ctrl-C. On a terminal the screen is cleared
/// and redrawn in place; otherwise snapshots follow each other, separated by a line.
pub async fn watch(config: &Config, json: bool, interval: std::time::Duration) -> anyhow::Result<ExitCode> {
    use std::io::{IsTerminal, Write};
    let terminal = std::io::stdout().is_terminal();
    let mut first = true;
    loop {
        let snapshot = format_status(&current_status(config, first).await?, json)?;
        let mut out = std::io::stdout().lock();
        if terminal {
            // Clear the screen and move home, then draw.
            write!(out, "\x1b[2J\x1b[H{snapshot}")?;
        } else {
            if !first {
                writeln!(out, "{WATCH_SEPARATOR}")?;
            }
            write!(out, "{snapshot}")?;
        }
        out.flush()?;
        drop(out);
        first = false;
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = tokio::signal::ctrl_c() => return Ok(ExitCode::SUCCESS),
        }
    }
}

/// Between two `status --watch` snapshots when stdout is not a terminal.
const WATCH_SEPARATOR: &str = "----";

/// Where the rollout stands with respect to what `lockstep wait` waits for.
#[derive(Debug, PartialEq, Eq)]
enum Progress {
    Reached,
    PausedByGuard,
    NotYet,
}

/// Exit codes of `lockstep wait`.
const WAIT_TIMED_OUT: u8 = 1;
const WAIT_PAUSED_BY_GUARD: u8 = 2;

fn progress(target: &WaitTarget, status: &Status, waves: &[String]) -> Progress {
    let finished = matches!(status.gate, Some(Gate::Finished));
    let reached = match target {
        WaitTarget::Finished => finished,
        WaitTarget::Paused => status.paused.is_some(),
        WaitTarget::Wave(name) => {
            let position = |wave: &str| waves.iter().position(|w| w == wave);
            let current = status.current_wave.as_deref().and_then(position);
            finished || matches!((current, position(name)), (Some(current), Some(wanted)) if current >= wanted)
        }
    };
    let by_guard = status.paused.as_ref().is_some_and(|p| p.by == Mode::Commit.actor());
    match (reached, by_guard) {
        (true, _) => Progress::Reached,
        (false, true) => Progress::PausedByGuard,
        (false, false) => Progress::NotYet,
    }
}

/// `lockstep wait`: looks at the rollout every `interval` until `target` is reached (exit 0),
/// the guard pauses it (exit 2) or `timeout` passes (exit 1).
pub async fn wait(
    config: &Config,
    target: &WaitTarget,
    timeout: std::time::Duration,
    interval: std::time::Duration,
) -> anyhow::Result<ExitCode> {
    let waves: Vec<String> = config.waves.iter().map(|w| w.name.clone()).collect();
    if let WaitTarget::Wave(name) = target
        && !waves.contains(name)
    {
        bail!("there is no wave {name:?} in the configuration (waves: {})", waves.join(", "));
    }
    let deadline = tokio::time::Instant::now() + timeout;
    let mut first = true;
    loop {
        let status = current_status(config, first).await?;
        first = false;
        match progress(target, &status, &waves) {
            Progress::Reached => {
                println!("reached: {}", describe(target));
                return Ok(ExitCode::SUCCESS);
            }
            Progress::PausedByGuard => {
                let why = status.paused.map(|p| p.reason).unwrap_or_default();
                eprintln!("paused by the guard while waiting for {}: {why}", describe(target));
                return Ok(ExitCode::from(WAIT_PAUSED_BY_GUARD));
            }
            Progress::NotYet => {}
        }
        let now = tokio::time::Instant::now();
        if now >= deadline {
            eprintln!("timed out after {} waiting for {}", lockstep::duration::format(timeout), describe(target));
            return Ok(ExitCode::from(WAIT_TIMED_OUT));
        }
        // The last look is at the deadline itself.
        tokio::time::sleep_until(deadline.min(now + interval)).await;
    }
}

fn describe(target: &WaitTarget) -> String {
    match target {
        WaitTarget::Finished => "the rollout to finish".to_string(),
        WaitTarget::Paused => "the rollout to pause".to_string(),
        WaitTarget::Wave(name) => format!("wave {name}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lockstep::rollout::Pause;

    fn status(gate: Option<Gate>, wave: Option<&str>, paused_by: Option<&str>) -> Status {
        let at = chrono::DateTime::UNIX_EPOCH;
        Status {
            account: String::new(),
            blocked: None,
            at,
            mode: "commit".to_string(),
            paused: paused_by.map(|by| Pause { reason: "why".to_string(), by: by.to_string(), at }),
            gate,
            current_wave: wave.map(str::to_string),
            waiting: Vec::new(),
            batches: Vec::new(),
            users: Default::default(),
            evidence: Default::default(),
            last_step: None,
            locked_denied: Vec::new(),
            forecast: Default::default(),
        }
    }

    #[test]
    fn status_shows_the_forecast_of_each_wave_to_come() {
        let mut shown = status(Some(Gate::Open), Some("canary"), None);
        assert!(!render_status(&shown).contains("forecast"), "no waves to come, no table");
        let at = |hours: i64| chrono::DateTime::UNIX_EPOCH + chrono::Duration::hours(hours);
        shown.forecast = Forecast {
            recent_per_day: 1.5,
            waves: vec![lockstep::planner::WaveForecast {
                wave: "everyone".into(),
                users: 31,
                batches: 2,
                users_per_day: 12.5,
                starts: at(24),
                finishes: at(96),
            }],
        };
        let text = render_status(&shown);
        assert!(text.contains("(1.5 promoted a day over the last 7 days)"), "{text}");
        let row = text.lines().find(|l| l.trim_start().starts_with("everyone")).unwrap();
        let cells: Vec<&str> = row.split_whitespace().collect();
        assert_eq!(cells, ["everyone", "31", "2", "12.5", "1970-01-02", "00:00Z", "1970-01-05", "00:00Z"], "{text}");
    }

    #[test]
    fn wait_reaches_a_wave_when_it_or_a_later_one_is_current_or_all_are_done() {
        let waves = ["canary", "engineering", "everyone"].map(String::from);
        let wave = |name: &str| WaitTarget::Wave(name.to_string());
        assert_eq!(
            progress(&wave("engineering"), &status(Some(Gate::Open), Some("canary"), None), &waves),
            Progress::NotYet
        );
        assert_eq!(
            progress(&wave("engineering"), &status(Some(Gate::Open), Some("engineering"), None), &waves),
            Progress::Reached
        );
        assert_eq!(
            progress(&wave("engineering"), &status(Some(Gate::Open), Some("everyone"), None), &waves),
            Progress::Reached
        );
        assert_eq!(progress(&wave("everyone"), &status(Some(Gate::Finished), None, None), &waves), Progress::Reached);
        assert_eq!(
            progress(&wave("canary"), &status(None, None, None), &waves),
            Progress::NotYet,
            "offline: no current wave"
        );
    }

    #[test]
    fn only_a_guard_pause_ends_a_wait_for_something_else() {
        let waves = ["canary".to_string()];
        let by_guard =
            status(Some(Gate::Paused("batch 1 rolled back".into())), Some("canary"), Some(Mode::Commit.actor()));
        let by_operator = status(Some(Gate::Paused("incident".into())), Some("canary"), Some("alice"));
        assert_eq!(progress(&WaitTarget::Finished, &by_guard, &waves), Progress::PausedByGuard);
        assert_eq!(progress(&WaitTarget::Finished, &by_operator, &waves), Progress::NotYet);
        assert_eq!(progress(&WaitTarget::Paused, &by_guard, &waves), Progress::Reached);
        assert_eq!(progress(&WaitTarget::Paused, &by_operator, &waves), Progress::Reached);
        assert_eq!(progress(&WaitTarget::Paused, &status(Some(Gate::Open), None, None), &waves), Progress::NotYet);
    }

    #[test]
    fn offline_mode_comes_from_the_controller_actor() {
        assert_eq!(Mode::of_actor("controller"), Some(Mode::Commit));
        assert_eq!(Mode::of_actor("dry-run"), Some(Mode::DryRun));
        assert_eq!(Mode::of_actor("alice"), None);
    }
}
