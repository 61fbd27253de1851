//! Controller step benchmark: one full step (directory, evidence read, plan, guard) without AWS
//! latency, over stores on disk with 30 days of hourly evidence, at 1,000, 10,000 and 100,000
//! users spread evenly over an organisation of 50 accounts (one store, controller and runtime
//! each, stepped in one round by the daemon's `Fleet`, as `lockstep run` does).
//!
//! Each user is active 2 hours a day with one request context an hour; a third of them call from
//! an address outside the perimeter (not eligible). 10% are locked in finished batches, one batch
//! finished 30 minutes ago is still watched for its grace period and one batch is soaking; the
//! rest are candidates. The feeds deliver 200 records a poll across the organisation (1 in 50 a
//! denial). The steps run in commit mode against the in-memory IAM, the clock advancing one guard
//! poll (1 minute) a round. Targets (on 2 cores): median <= 50 ms, p99 <= 200 ms a step at 100,000
//! users; the round (every account's step) is reported beside the account's step. Resident memory
//! after the rounds (`VmRSS` once `malloc_trim` has run, as the daemon's trimmer does every 30 s)
//! is the steady state; its target at 100,000 users is 200 MiB.
//!
//! The controller keeps the evidence it read until the store's evidence generation or the
//! window's whole hours change, so the first step (nothing kept yet) is timed and reported apart
//! as the cold step; the timed steps after it read the evidence again only when the window slides
//! into another hour, as a running daemon does.
//!
//! Run with `cargo bench --bench step`; `LOCKSTEP_BENCH_USERS` picks the sizes (comma-separated,
//! default `1000,10000,100000`), `LOCKSTEP_BENCH_ACCOUNTS` the accounts (default 50; 1 is the
//! single-account daemon) and `LOCKSTEP_BENCH_STEPS` the rounds timed at each (default 120, 30 at
//! 100,000 users).

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, TimeDelta, Utc};
use common::{Density, SOURCES, benching, fill, peak_rss_mib, setting, status_mib, user_name};
use lockstep::clock::{Clock, ManualClock, SystemClock};
use lockstep::config::{Config, earlier};
use lockstep::controller::{Controller, Mode};
use lockstep::evidence::aggregate::Judge;
use lockstep::evidence::{EvidenceStore, SourceError};
use lockstep::feed::EventFeed;
use lockstep::fleet::Fleet;
use lockstep::iam::IamUser;
use lockstep::metrics::Metrics;
use lockstep::planner;
use lockstep::runtime::Shared;
use lockstep::store::{EvidenceWriter, Ledger, NewBatch, RefreshLog, RunCounts, Store};
use lockstep::testkit::MemoryIam;
use lockstep::trail::{Record, UserIdentity};

const DENSITY: Density = Density { days: 30, hours_per_day: 2, contexts: 1 };
const LOCKED_PERCENT: usize = 10;
const BATCH: usize = 25;
const RECORDS_PER_POLL: usize = 200;

type Failure = Box<dyn std::error::Error>;

/// A feed that delivers `RECORDS_PER_POLL` fresh records a poll, dated a minute before the clock.
struct Steady {
    clock: Arc<ManualClock>,
    users: usize,
    account: String,
    next: usize,
    per_poll: usize,
}

impl EventFeed for Steady {
    async fn poll(&mut self) -> Result<Vec<Record>, SourceError> {
        let at = self.clock.now() - TimeDelta::minutes(1);
        let records = (self.next..self.next + self.per_poll)
            .map(|i| {
                let user = user_name((i * 7919) % self.users);
                let denied = i % 50 == 0;
                Record {
                    event_id: Some(format!("bench-{i}")),
                    event_time: Some(at.to_rfc3339()),
                    event_source: Some("s3.amazonaws.com".into()),
                    event_name: Some("GetObject".into()),
                    event_type: Some("AwsApiCall".into()),
                    source_ip_address: Some(SOURCES[0].into()),
                    recipient_account_id: Some(self.account.clone()),
                    error_code: denied.then(|| "AccessDenied".into()),
                    error_message: denied.then(|| {
                        format!(
                            "User: arn:aws:iam::{}:user/{user} is not authorized to perform: s3:GetObject because no identity-based policy allows the s3:GetObject action",
                            self.account
                        )
                    }),
                    user_identity: Some(UserIdentity {
                        kind: Some("IAMUser".into()),
                        user_name: Some(user),
                        account_id: Some(self.account.clone()),
                        ..UserIdentity::default()
                    }),
                    ..Record::default()
                }
            })
            .collect();
        self.next += self.per_poll;
        Ok(records)
    }
}

/// Percentile `p` (0..=100) of sorted durations, in milliseconds.
fn percentile(sorted: &[Duration], p: f64) -> f64 {
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1].as_secs_f64() * 1000.0
}

/// Forgets the peak RSS so far, so that each size reports its own (Linux 4.0+; best effort).
fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// Targets at 100,000 users, in milliseconds.
const MEDIAN_TARGET: f64 = 50.0;
const P99_TARGET: f64 = 200.0;

/// What one size measured.
struct Figures {
    users: usize,
    accounts: usize,
    /// The first round (nothing kept yet), the slowest account's step in it.
    cold: f64,
    /// One account's step.
    median: f64,
    p99: f64,
    max: f64,
    /// A round: every account's step, one after another.
    round_median: f64,
    round_p99: f64,
    phases: Vec<(&'static str, f64)>,
    peak_rss: Option<f64>,
    steady_rss: Option<f64>,
    fill_rss: Option<f64>,
    fill_seconds: f64,
    user_hours: i64,
    store_mib: f64,
    evidence_list: f64,
    directory_pages: usize,
    steps: usize,
    locked: usize,
    candidates: usize,
}

/// Journals `members` as a batch of `wave` at `at` and locks them; it soaks from `at`.
fn locked_batch(store: &Store, wave: &str, members: &[String], at: DateTime<Utc>) -> Result<i64, Failure> {
    let users: Vec<(String, String)> = members.iter().map(|u| (u.clone(), "clean".into())).collect();
    let soak = TimeDelta::hours(48);
    let id = store.start_batch(&NewBatch { wave, users: &users, soak }, "bench", at)?;
    for user in members {
        store.mark_locked(user, "bench", at)?;
    }
    store.start_soak(id, at + soak, at)?;
    Ok(id)
}

fn fresh_refresh(store: &Store, now: DateTime<Utc>) -> Result<(), Failure> {
    let run = store.start_run("athena", now - TimeDelta::hours(2), now, now)?;
    store.finish_run(run, &RunCounts::default(), None, now)?;
    Ok(())
}

/// The shipped rollout.yaml over `accounts` accounts: account_id's own and the others through a
/// role, with its store in `dir`, where the file is written too (for the CLI).
fn organisation(accounts: usize, dir: &std::path::Path) -> Result<Config, Failure> {
    let store = format!("path: {}", dir.join("lockstep.db").display());
    let mut text = include_str!("../rollout.yaml").replace("path: ./lockstep.db", &store);
    if accounts > 1 {
        text += "\naccounts:\n  role: \"arn:aws:iam::{account}:role/lockstep-rollout\"\n  list:\n";
        text += "    - id: \"123456789012\"\n";
        for i in 1..accounts {
            text += &format!("    - id: \"{}\"\n", 200_000_000_000u64 + i as u64);
        }
    }
    let path = dir.join("rollout.yaml");
    std::fs::write(&path, &text)?;
    Ok(Config::parse(&text, &path)?)
}

/// Fills one account's store: 30 days of evidence, and the ledger (the first two waves done,
/// 10% locked in finished batches of the last, one batch finished 30 minutes ago, in its grace
/// period, one soaking for 2 hours). Returns the user-hours written, the seconds the evidence
/// took, and the users locked.
fn fill_account(view: &Config, users: usize, now: DateTime<Utc>) -> Result<(i64, f64, usize), Failure> {
    let judge = Judge::new(view);
    let account = &view.account_id;
    let store = Store::open_for_account(&view.store.path, account)?;
    // Stamp the (empty) evidence with the perimeter, as a first refresh does.
    store.ensure_judged(&judge, now)?;
    let (user_hours, fill_seconds) = fill(&store, &judge, account, users, DENSITY, &SOURCES, now)?;
    let names: Vec<String> = (0..users).map(user_name).collect();
    let locked = users * LOCKED_PERCENT / 100;
    store.finish_wave("canary", "bench", now - TimeDelta::days(20))?;
    store.finish_wave("engineering", "bench", now - TimeDelta::days(20))?;
    let batches: Vec<&[String]> = names[..locked].chunks(BATCH).collect();
    for (i, members) in batches.iter().enumerate() {
        let soaking = i + 1 == batches.len();
        let applied = if soaking {
            now - TimeDelta::hours(2)
        } else if i + 2 == batches.len() {
            now - TimeDelta::minutes(30) - TimeDelta::hours(48)
        } else {
            now - TimeDelta::days(19) + TimeDelta::minutes(i as i64)
        };
        let id = locked_batch(&store, "everyone", members, applied)?;
        if !soaking {
            store.succeed(id, "bench", applied + TimeDelta::hours(48))?;
        }
    }
    fresh_refresh(&store, now)?;
    Ok((user_hours, fill_seconds, locked))
}

/// The environment variable that makes the benchmark a filler: it fills the stores of
/// `<dir>|<users>|<accounts>|<now>` and exits, so that the measuring process never holds what
/// filling allocated (a daemon does not fill its stores itself).
const FILL: &str = "LOCKSTEP_BENCH_FILL";

/// Fills every account's store in a child process; the user-hours, the seconds and the users
/// locked, and the child's peak RSS.
fn fill_in_child(
    dir: &std::path::Path,
    users: usize,
    accounts: usize,
    now: DateTime<Utc>,
) -> Result<(i64, f64, usize, Option<f64>), Failure> {
    let job = format!("{}|{users}|{accounts}|{}", dir.display(), now.to_rfc3339());
    let child = std::process::Command::new(std::env::current_exe()?).arg("--bench").env(FILL, job).output()?;
    let out = String::from_utf8_lossy(&child.stdout);
    if !child.status.success() {
        return Err(format!("the filler failed: {out}{}", String::from_utf8_lossy(&child.stderr)).into());
    }
    let fields: Vec<&str> = out.trim().split(' ').collect();
    let [hours, seconds, locked, peak] = fields.as_slice() else {
        return Err(format!("the filler said {out:?}").into());
    };
    Ok((hours.parse()?, seconds.parse()?, locked.parse()?, peak.parse().ok()))
}

/// The filler's side of [`fill_in_child`].
fn fill_here(job: &str) -> Result<(), Failure> {
    let [dir, users, accounts, now] = job.split('|').collect::<Vec<_>>()[..] else {
        return Err(format!("{FILL}={job:?}").into());
    };
    let config = organisation(accounts.parse()?, std::path::Path::new(dir))?;
    let now: DateTime<Utc> = now.parse()?;
    let (mut hours, mut seconds, mut locked) = (0, 0.0, 0);
    for view in config.account_views() {
        let (h, s, l) = fill_account(&view, users.parse()?, now)?;
        (hours, seconds, locked) = (hours + h, seconds + s, locked + l);
    }
    println!("{hours} {seconds} {locked} {}", peak_rss_mib().unwrap_or(f64::NAN));
    Ok(())
}

/// One account's runtime over its filled store, as the daemon builds it.
fn runtime(
    view: Config,
    accounts: usize,
    users: usize,
    per_poll: usize,
    clock: &Arc<ManualClock>,
    wake: &Arc<tokio::sync::Notify>,
) -> Result<(Arc<Store>, Shared), Failure> {
    let account = view.account_id.clone();
    let store = Store::open_for_account(&view.store.path, &account)?;
    // As the daemon does: the accounts' stores share one page-cache budget.
    store.share_cache(accounts)?;
    let names: Vec<String> = (0..users).map(user_name).collect();
    let locked = users * LOCKED_PERCENT / 100;
    let directory: Vec<IamUser> = names
        .iter()
        .enumerate()
        .map(|(i, name)| IamUser {
            name: name.clone(),
            arn: format!("arn:aws:iam::{account}:user/{name}"),
            path: if i % 10 == 0 { "/engineering/".into() } else { "/".into() },
            tags: BTreeMap::new(),
        })
        .collect();
    let members: Vec<&str> = names[..locked].iter().map(String::as_str).collect();
    let iam = MemoryIam::new(directory, &members);
    let feed = Steady { clock: clock.clone(), users, account: account.clone(), next: 0, per_poll };
    let store = Arc::new(store);
    let dyn_clock: Arc<dyn Clock> = clock.clone();
    let controller = Controller::new(view, store.clone(), iam, feed, dyn_clock, Mode::Commit);
    let shared = Shared::with_wake(controller, Metrics::for_account(&account), wake.clone());
    Ok((store, shared))
}

/// Gives freed memory back to the system, as the daemon's trimmer does every 30 s.
fn trim() {
    // SAFETY: malloc_trim only walks glibc's own free lists; it is safe to call at any time.
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    unsafe {
        libc::malloc_trim(0);
    }
}

async fn measure(users: usize, accounts: usize, steps: usize) -> Result<Figures, Failure> {
    reset_peak_rss();
    let dir = tempfile::tempdir()?;
    let config = organisation(accounts, dir.path())?;
    // Today's midnight: `lockstep evidence list`, timed below, reads the window ending now.
    let now = SystemClock.now().date_naive().and_hms_opt(0, 0, 0).ok_or("bad start time")?.and_utc();
    let clock = Arc::new(ManualClock::new(now));
    let wake = Arc::new(tokio::sync::Notify::new());
    let views = config.account_views();
    let count = views.len();
    let per_account = users.div_ceil(count);
    let per_poll = RECORDS_PER_POLL.div_ceil(views.len());
    let (user_hours, fill_seconds, locked, fill_rss) = fill_in_child(dir.path(), per_account, accounts, now)?;
    let (mut stores, mut runtimes) = (Vec::new(), Vec::new());
    for view in views {
        let (store, shared) = runtime(view, count, per_account, per_poll, &clock, &wake)?;
        stores.push(store);
        runtimes.push(shared);
    }
    let users = per_account * stores.len();
    let candidates = users - locked;
    let fleet = Fleet::new(runtimes, wake);

    // The cold round: every account's directory, evidence and baselines read for the first time.
    let mut cold = Duration::ZERO;
    for step in fleet.step().await {
        step.outcome?;
        cold = cold.max(step.took);
    }
    let (mut times, mut rounds) = (Vec::with_capacity(steps * stores.len()), Vec::with_capacity(steps));
    for round in 0..steps {
        clock.advance(TimeDelta::minutes(1));
        if round % 60 == 59 {
            // The hourly evidence refresh, outside the timed round.
            for store in &stores {
                fresh_refresh(store, clock.now())?;
            }
        }
        let started = Instant::now();
        let outcomes = fleet.step().await;
        rounds.push(started.elapsed());
        for (i, step) in outcomes.into_iter().enumerate() {
            times.push(step.took);
            let report = step.outcome?;
            if round == 0 && i == 0 {
                println!(
                    "  first round, {}: gate {:?}, {} actions, {} users planned, {} verdicts",
                    step.account,
                    report.plan.gate,
                    report.plan.actions.len(),
                    report.plan.users.len(),
                    report.verdicts.len()
                );
            }
        }
    }
    times.sort();
    rounds.sort();
    trim();
    let steady_rss = status_mib("VmRSS:");
    let peak_rss = peak_rss_mib();

    // `lockstep evidence list --json` of every user, the command itself, over every account's store.
    let at = clock.now();
    let window = config.eligibility.window;
    let listing = Instant::now();
    let listed = std::process::Command::new(env!("CARGO_BIN_EXE_lockstep"))
        .args(["--config", &dir.path().join("rollout.yaml").to_string_lossy(), "evidence", "list", "--json"])
        .stderr(std::process::Stdio::null())
        .output()?;
    let evidence_list = listing.elapsed().as_secs_f64() * 1000.0;
    let listed: serde_json::Value = serde_json::from_slice(&listed.stdout)?;
    let listed = listed["users"].as_array().map_or(0, Vec::len);
    println!("  `lockstep evidence list --json`: {listed} users from {} stores in {evidence_list:.0} ms", stores.len());
    if listed != users {
        return Err(format!("evidence list showed {listed} users of {users}").into());
    }

    // The phases of one account's step, timed apart with the same calls the step makes (best of 5).
    let store = &stores[0];
    let view = fleet.accounts()[0].config().clone();
    let snapshot = store.snapshot()?;
    let mut phases = Vec::new();
    let mut best =
        |name: &'static str, mut phase: Box<dyn FnMut() -> Result<(), Failure> + '_>| -> Result<(), Failure> {
            let mut fastest = Duration::MAX;
            for _ in 0..5 {
                let started = Instant::now();
                phase()?;
                fastest = fastest.min(started.elapsed());
            }
            phases.push((name, fastest.as_secs_f64() * 1000.0));
            Ok(())
        };
    best(
        "ledger snapshot",
        Box::new(|| {
            std::hint::black_box(store.snapshot()?);
            Ok(())
        }),
    )?;
    best(
        "evidence read (eligibility window)",
        Box::new(|| {
            std::hint::black_box(store.user_evidence(earlier(at, window), at)?);
            Ok(())
        }),
    )?;
    let watched: Vec<_> =
        snapshot.batches.iter().filter(|b| b.finished_at.is_none_or(|f| at - f < TimeDelta::hours(1))).collect();
    best(
        "guard reads (members' baselines, denials)",
        Box::new(|| {
            for batch in &watched {
                let applied = batch.applied_at.ok_or("not applied")?;
                // As the controller reads a batch's baselines when the evidence changed: its members'.
                std::hint::black_box(store.evidence_of_users(&batch.members, earlier(applied, window), applied)?);
                std::hint::black_box(store.denials(batch.id)?);
            }
            Ok(())
        }),
    )?;
    let evidence = store.user_evidence(earlier(at, window), at)?;
    let freshness = store.freshness()?;
    let verdicts = BTreeMap::new();
    let directory: Vec<IamUser> = (0..per_account)
        .map(|i| IamUser {
            name: user_name(i),
            arn: format!("arn:aws:iam::{}:user/{}", view.account_id, user_name(i)),
            path: if i % 10 == 0 { "/engineering/".into() } else { "/".into() },
            tags: BTreeMap::new(),
        })
        .collect();
    best(
        "plan",
        Box::new(|| {
            let plan = planner::plan(&planner::Inputs {
                config: &view,
                ledger: &snapshot,
                users: &directory,
                evidence: &evidence,
                freshness,
                verdicts: &verdicts,
                blocked: None,
                now: at,
                promote_now: false,
                promoted_elsewhere: 0,
            });
            std::hint::black_box(plan);
            Ok(())
        }),
    )?;
    let store_mib = std::fs::read_dir(dir.path())?
        .filter_map(Result::ok)
        .filter_map(|entry| entry.metadata().ok())
        .map(|m| m.len() as f64 / (1024.0 * 1024.0))
        .sum();
    let account_count = stores.len();
    Ok(Figures {
        users,
        accounts: account_count,
        cold: cold.as_secs_f64() * 1000.0,
        median: percentile(&times, 50.0),
        p99: percentile(&times, 99.0),
        max: percentile(&times, 100.0),
        round_median: percentile(&rounds, 50.0),
        round_p99: percentile(&rounds, 99.0),
        phases,
        peak_rss,
        steady_rss,
        fill_rss,
        fill_seconds,
        user_hours,
        store_mib,
        evidence_list,
        // GetAccountAuthorizationDetails pages of IAM's maximum, 1,000 users (tests/directory.rs).
        directory_pages: account_count * per_account.div_ceil(1_000),
        steps,
        locked,
        candidates,
    })
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Failure> {
    if !benching() {
        println!("step benchmark: skipped (run it with `cargo bench --bench step`)");
        return Ok(());
    }
    if let Ok(job) = std::env::var(FILL) {
        return fill_here(&job);
    }
    let sizes: Vec<usize> = match std::env::var("LOCKSTEP_BENCH_USERS") {
        Ok(text) => text.split(',').map(|s| s.trim().parse()).collect::<Result<_, _>>()?,
        Err(_) => vec![1_000, 10_000, 100_000],
    };
    let accounts = setting("LOCKSTEP_BENCH_ACCOUNTS", 50)?.clamp(1, 1_000);
    let steps = std::env::var("LOCKSTEP_BENCH_STEPS").ok();
    let mut all: Vec<Figures> = Vec::new();
    for users in sizes {
        println!("{users} users in {accounts} account(s):");
        // 120 rounds (two hours), fewer at sizes where a round takes seconds.
        let steps = match &steps {
            Some(_) => setting("LOCKSTEP_BENCH_STEPS", 120)?.max(1),
            None => (3_000_000 / users.max(1)).clamp(20, 120),
        };
        let f = measure(users, accounts, steps).await?;
        let mib = |m: Option<f64>| m.map_or("unknown".to_string(), |m| format!("{m:.0} MiB"));
        println!(
            "  filled {} user-hours in {:.1} s ({:.0} MiB on disk, {:.1} KiB per user-day); {} locked, {} candidates",
            f.user_hours,
            f.fill_seconds,
            f.store_mib,
            f.store_mib * 1024.0 / (f.users as f64 * DENSITY.days as f64),
            f.locked,
            f.candidates
        );
        println!("  cold first round (nothing kept yet): slowest account step {:.1} ms", f.cold);
        println!(
            "  {} rounds: account step median {:.1} ms, p99 {:.1} ms, max {:.1} ms; round median {:.1} ms, p99 {:.1} ms",
            f.steps, f.median, f.p99, f.max, f.round_median, f.round_p99
        );
        println!(
            "  RSS after the rounds {} (peak {}; filling {}); directory: {} IAM calls",
            mib(f.steady_rss),
            mib(f.peak_rss),
            mib(f.fill_rss),
            f.directory_pages
        );
        for (phase, ms) in &f.phases {
            println!("    {phase:<36} {ms:9.1} ms (one account)");
        }
        all.push(f);
    }
    println!();
    println!(
        "| users | accounts | rounds | cold step | step median | step p99 | median / target | p99 / target | round median | round p99 | RSS steady (peak) | evidence list | store (per user-day) | directory calls |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    for f in &all {
        println!(
            "| {} | {} | {} | {:.1} ms | {:.1} ms | {:.1} ms | {:.2}x | {:.2}x | {:.1} ms | {:.1} ms | {} ({}) | {:.0} ms | {:.0} MiB ({:.1} KiB) | {} |",
            f.users,
            f.accounts,
            f.steps,
            f.cold,
            f.median,
            f.p99,
            f.median / MEDIAN_TARGET,
            f.p99 / P99_TARGET,
            f.round_median,
            f.round_p99,
            f.steady_rss.map_or("?".to_string(), |m| format!("{m:.0} MiB")),
            f.peak_rss.map_or("?".to_string(), |m| format!("{m:.0} MiB")),
            f.evidence_list,
            f.store_mib,
            f.store_mib * 1024.0 / (f.users as f64 * DENSITY.days as f64),
            f.directory_pages
        );
    }
    for pair in all.windows(2) {
        println!(
            "{} -> {} users ({}x): step median {:.1}x, p99 {:.1}x; round median {:.1}x, p99 {:.1}x",
            pair[0].users,
            pair[1].users,
            pair[1].users / pair[0].users.max(1),
            pair[1].median / pair[0].median,
            pair[1].p99 / pair[0].p99,
            pair[1].round_median / pair[0].round_median,
            pair[1].round_p99 / pair[0].round_p99
        );
    }
    println!(
        "targets at 100,000 users: step median <= {MEDIAN_TARGET} ms, p99 <= {P99_TARGET} ms (1.00x is at the target); RSS <= 200 MiB; evidence list <= 2 s"
    );
    Ok(())
}
