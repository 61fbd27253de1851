//! Controller step benchmark: one full step (directory, evidence read, plan, guard) without AWS
//! latency, over a store on disk with 30 days of hourly evidence, at 1,000, 10,000 and 100,000
//! users of one account.
//!
//! Each user is active 2 hours a day with one request context an hour; a third of them call from
//! an address outside the perimeter (not eligible). 10% are locked in finished batches, one batch
//! finished 30 minutes ago is still watched for its grace period and one batch is soaking; the
//! rest are candidates. The feed delivers 200 records a poll (1 in 50 a denial). The step runs in
//! commit mode against the in-memory IAM, the clock advancing one guard poll (1 minute) a step.
//! Targets (on 2 cores): median <= 50 ms, p99 <= 200 ms a step at 100,000 users.
//!
//! The controller keeps the evidence it read until the store's evidence generation or the
//! window's whole hours change, so the first step (nothing kept yet) is timed and reported apart
//! as the cold step; the timed steps after it read the evidence again only when the window slides
//! into another hour, as a running daemon does.
//!
//! Run with `cargo bench --bench step`; `LOCKSTEP_BENCH_USERS` picks the sizes (comma-separated,
//! default `1000,10000,100000`) and `LOCKSTEP_BENCH_STEPS` the steps timed at each (default 120, 30 at
//! 100,000 users).

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, TimeDelta, TimeZone, Utc};
use common::{Density, SOURCES, benching, fill, peak_rss_mib, setting, user_name};
use lockstep::clock::{Clock, ManualClock};
use lockstep::config::{Config, earlier};
use lockstep::controller::{Controller, Mode};
use lockstep::evidence::aggregate::Judge;
use lockstep::evidence::{EvidenceStore, SourceError};
use lockstep::feed::EventFeed;
use lockstep::iam::IamUser;
use lockstep::planner;
use lockstep::rollout::BatchState;
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
}

impl EventFeed for Steady {
    async fn poll(&mut self) -> Result<Vec<Record>, SourceError> {
        let at = self.clock.now() - TimeDelta::minutes(1);
        let records = (self.next..self.next + RECORDS_PER_POLL)
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
        self.next += RECORDS_PER_POLL;
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
    cold: f64,
    median: f64,
    p99: f64,
    max: f64,
    phases: Vec<(&'static str, f64)>,
    peak_rss: Option<f64>,
    fill_rss: Option<f64>,
    fill_seconds: f64,
    user_hours: i64,
    store_mib: f64,
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

async fn measure(users: usize, steps: usize) -> Result<Figures, Failure> {
    reset_peak_rss();
    let config = Config::parse(include_str!("../rollout.yaml"), std::path::Path::new("rollout.yaml"))?;
    let judge = Judge::new(&config);
    let account = config.account_id.clone();
    let now = Utc.with_ymd_and_hms(2026, 3, 31, 0, 0, 0).single().ok_or("bad start time")?;

    let dir = tempfile::tempdir()?;
    let path = dir.path().join("bench.db");
    let store = Store::open(&path)?;
    // Stamp the (empty) evidence with the perimeter, as a first refresh does.
    store.ensure_judged(&judge, now)?;
    let (user_hours, fill_seconds) = fill(&store, &judge, &account, users, DENSITY, &SOURCES, now)?;
    let fill_rss = peak_rss_mib();
    reset_peak_rss();

    // The ledger: the first two waves done, 10% locked in finished batches of the last, one
    // batch finished 30 minutes ago (in its grace period), one soaking for 2 hours.
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
    let snapshot = store.snapshot()?;
    let soaking = snapshot.batches.iter().filter(|b| b.state == BatchState::Soaking).count();
    let candidates = users - locked;

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
    let iam = MemoryIam::new(directory.clone(), &members);
    let clock = Arc::new(ManualClock::new(now));
    let feed = Steady { clock: clock.clone(), users, account: account.clone(), next: 0 };
    let store = Arc::new(store);
    let mut controller = Controller::new(config.clone(), store.clone(), iam, feed, clock.clone(), Mode::Commit);

    // The cold step: the directory, the evidence and the baselines are read for the first time.
    let started = Instant::now();
    controller.step(false).await?;
    let cold = started.elapsed().as_secs_f64() * 1000.0;
    let mut times = Vec::with_capacity(steps);
    for step in 0..steps {
        clock.advance(TimeDelta::minutes(1));
        if step % 60 == 59 {
            // The hourly evidence refresh, outside the timed step.
            fresh_refresh(&store, clock.now())?;
        }
        let started = Instant::now();
        let report = controller.step(false).await?;
        times.push(started.elapsed());
        if step == 0 {
            println!(
                "  first step: gate {:?}, {} actions, {} users planned, {} verdicts ({soaking} soaking)",
                report.plan.gate,
                report.plan.actions.len(),
                report.plan.users.len(),
                report.verdicts.len()
            );
        }
    }
    times.sort();

    // The phases, timed apart with the same calls the step makes (best of 5).
    let at = clock.now();
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
    let window = config.eligibility.window;
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
    best(
        "plan",
        Box::new(|| {
            let plan = planner::plan(&planner::Inputs {
                config: &config,
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
    let store_mib = [path.clone(), path.with_extension("db-wal")]
        .iter()
        .filter_map(|p| std::fs::metadata(p).ok())
        .map(|m| m.len() as f64 / (1024.0 * 1024.0))
        .sum();
    Ok(Figures {
        users,
        cold,
        median: percentile(&times, 50.0),
        p99: percentile(&times, 99.0),
        max: percentile(&times, 100.0),
        phases,
        peak_rss: peak_rss_mib(),
        fill_rss,
        fill_seconds,
        user_hours,
        store_mib,
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
    let sizes: Vec<usize> = match std::env::var("LOCKSTEP_BENCH_USERS") {
        Ok(text) => text.split(',').map(|s| s.trim().parse()).collect::<Result<_, _>>()?,
        Err(_) => vec![1_000, 10_000, 100_000],
    };
    let steps = std::env::var("LOCKSTEP_BENCH_STEPS").ok();
    let mut all: Vec<Figures> = Vec::new();
    for users in sizes {
        println!("{users} users:");
        // 120 steps (two hours), fewer at sizes where a step takes seconds.
        let steps = match &steps {
            Some(_) => setting("LOCKSTEP_BENCH_STEPS", 120)?.max(1),
            None => (3_000_000 / users.max(1)).clamp(20, 120),
        };
        let figures = measure(users, steps).await?;
        println!(
            "  filled {} user-hours in {:.1} s ({:.0} MiB on disk); {} locked, {} candidates",
            figures.user_hours, figures.fill_seconds, figures.store_mib, figures.locked, figures.candidates
        );
        println!("  cold first step (nothing kept yet): {:.1} ms", figures.cold);
        println!(
            "  {} steps: median {:.1} ms, p99 {:.1} ms, max {:.1} ms; peak RSS {} (filling: {})",
            figures.steps,
            figures.median,
            figures.p99,
            figures.max,
            figures.peak_rss.map_or("unknown".to_string(), |m| format!("{m:.0} MiB")),
            figures.fill_rss.map_or("unknown".to_string(), |m| format!("{m:.0} MiB"))
        );
        for (phase, ms) in &figures.phases {
            println!("    {phase:<36} {ms:9.1} ms");
        }
        all.push(figures);
    }
    println!();
    println!(
        "| users | steps | cold step | median | p99 | max | median / target | p99 / target | peak RSS (steps) | peak RSS (fill) | fill | store |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|");
    for f in &all {
        println!(
            "| {} | {} | {:.1} ms | {:.1} ms | {:.1} ms | {:.1} ms | {:.2}x | {:.2}x | {} | {} | {:.1} s | {:.0} MiB |",
            f.users,
            f.steps,
            f.cold,
            f.median,
            f.p99,
            f.max,
            f.median / MEDIAN_TARGET,
            f.p99 / P99_TARGET,
            f.peak_rss.map_or("?".to_string(), |m| format!("{m:.0} MiB")),
            f.fill_rss.map_or("?".to_string(), |m| format!("{m:.0} MiB")),
            f.fill_seconds,
            f.store_mib
        );
    }
    for pair in all.windows(2) {
        println!(
            "{} -> {} users ({}x): cold {:.1}x, median {:.1}x, p99 {:.1}x",
            pair[0].users,
            pair[1].users,
            pair[1].users / pair[0].users.max(1),
            pair[1].cold / pair[0].cold,
            pair[1].median / pair[0].median,
            pair[1].p99 / pair[0].p99
        );
    }
    println!(
        "targets at 100,000 users: median <= {MEDIAN_TARGET} ms, p99 <= {P99_TARGET} ms (ratios above: 1.00x is at the target)"
    );
    Ok(())
}
