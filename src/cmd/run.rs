//! `lockstep run`: the daemon. Wires the edges (IAM, the evidence schedule, the guard's event
//! feed, the store, the clock, the HTTP listeners) around the controller and steps it every
//! guard poll until interrupted.

use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use lockstep::api;
use lockstep::clock::{Clock, SystemClock};
use lockstep::config::Config;
use lockstep::controller::{Controller, Mode};
use lockstep::evidence::EvidenceStore;
use lockstep::evidence::refresh::{self, Source};
use lockstep::feed::{self, AnyFeed};
use lockstep::fleet::{AccountStep, Fleet};
use lockstep::iam::AwsIam;
use lockstep::metrics::{MeteredIam, Metrics};
use lockstep::runtime::Shared;
use lockstep::store::{Ledger, Store, StoreLock};
use tokio::sync::{Notify, Semaphore};

pub struct Options {
    pub commit: bool,
    pub once: bool,
    pub json: bool,
}

/// How long a starting daemon waits for offline commands to release the store lock.
const LOCK_PATIENCE: std::time::Duration = std::time::Duration::from_secs(10);

pub async fn run(config: Config, options: Options) -> anyhow::Result<ExitCode> {
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let mode = if options.commit { Mode::Commit } else { Mode::DryRun };
    if mode == Mode::DryRun {
        tracing::warn!("dry run: nothing will be written to IAM; pass --commit to act");
    }
    let base = lockstep::aws::load(&config.region, None).await;
    let wake = Arc::new(Notify::new());
    let mut accounts = Vec::with_capacity(config.accounts.len());
    let mut schedules = Vec::new();
    let mut locks = Vec::new();
    // One evidence refresh at a time across the accounts (their schedules fire together).
    let turns = Arc::new(Semaphore::new(1));
    let views = config.account_views();
    let stores = views.len();
    for view in views {
        let account = Account::start(view, &base, mode, &options, clock.clone(), turns.clone(), stores).await?;
        locks.push(account.lock);
        schedules.extend(account.schedule);
        accounts.push(Shared::with_wake(account.controller, account.metrics, wake.clone()));
    }
    if accounts.len() > 1 {
        tracing::info!(accounts = accounts.len(), "rolling out every account of the configuration");
    }
    let outcome = drive(Fleet::new(accounts, wake), &config, options).await;
    for schedule in schedules {
        schedule.shutdown().await?;
    }
    drop(locks);
    outcome
}

/// One account's part of the daemon, started: its controller, metrics, evidence schedule and
/// the lock on its store.
struct Account {
    controller: Controller<MeteredIam<AwsIam>, AnyFeed>,
    metrics: Metrics,
    schedule: Option<refresh::Schedule>,
    lock: StoreLock,
}

impl Account {
    /// Opens the account's store (held for the daemon's life: the CLI refuses to act on it
    /// directly meanwhile), reaches its IAM (a role that cannot be assumed is logged here and
    /// blocks the account at every step until it can), and starts its evidence schedule.
    async fn start(
        config: Config,
        base: &aws_config::SdkConfig,
        mode: Mode,
        options: &Options,
        clock: Arc<dyn Clock>,
        turns: Arc<Semaphore>,
        stores: usize,
    ) -> anyhow::Result<Account> {
        let id = config.account_id.clone();
        let path = config.store.path.clone();
        let lock = StoreLock::daemon(&path, LOCK_PATIENCE)
            .with_context(|| format!("account {id}: taking the store lock; is lockstep already running?"))?;
        let store = Arc::new(
            Store::open_for_account(&path, &id)
                .with_context(|| format!("account {id}: opening the store {}", path.display()))?,
        );
        store.share_cache(stores)?;
        let sdk = match lockstep::aws::account_config(base, config.access()).await {
            Ok(sdk) => sdk,
            Err(error) => {
                tracing::error!(account = %id, %error, "account blocked until its role can be assumed; other accounts go on");
                lockstep::aws::lazy_account_config(base, config.access()).await
            }
        };
        let metrics = Metrics::for_account(&id);
        let iam = MeteredIam::new(AwsIam::new(&sdk, &id), metrics.clone());
        // With the daemon down, `lockstep status` reads the mode from the last controller audit line.
        store.note(mode.actor(), "start", &format!("lockstep run started in {mode} mode"), clock.now())?;
        // Stored verdicts follow the perimeter: re-judge them before the first step if it changed
        // (the planner promotes no one until they are).
        refresh::rejudge_if_changed(&*store, &config, clock.now())?;
        let source = Source::from_config(&config).await?;
        let schedule = if options.once {
            // One-shot (cron-style) runs bring the evidence up to date first.
            let window = refresh::scheduled_window(&store.freshness()?, clock.now(), &config.evidence);
            refresh::refresh(&*store, &source, &config, window, clock.as_ref(), None, &mut |_| {}).await?;
            None
        } else {
            Some(refresh::start_schedule(store.clone(), source, Arc::new(config.clone()), clock.clone(), turns).await?)
        };
        let feed = feed::from_config(&config, clock.clone()).await?;
        let controller = Controller::new(config, store, iam, feed, clock, mode);
        Ok(Account { controller, metrics, schedule, lock })
    }
}

/// Steps every account every guard poll (of the clock's time) until Ctrl-C or SIGTERM.
pub async fn drive(fleet: Fleet, config: &Config, options: Options) -> anyhow::Result<ExitCode> {
    // Installed before the first step and kept for the daemon's life: no signal is lost.
    let mut shutdown = Shutdown::install().context("listening for shutdown signals")?;
    let servers = if options.once { None } else { Some(api::serve(fleet.clone(), &config.listeners).await?) };
    let mut ticker = tokio::time::interval(config.guard.poll);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            // A signal that arrived during the last step is seen before anything else.
            biased;
            () = shutdown.requested() => {
                tracing::info!("shutdown signal: the step in flight finished; exiting");
                break;
            }
            _ = ticker.tick() => {}
            _ = fleet.woken() => {}
        }
        // Not raced against the signal: a step finishes its IAM writes and their journal.
        for AccountStep { account, outcome, .. } in fleet.step().await {
            match outcome {
                Ok(report) => {
                    if options.json {
                        let mut line = serde_json::to_value(&report)?;
                        if let Some(fields) = line.as_object_mut() {
                            fields.insert("account".to_string(), account.into());
                        }
                        println!("{line}");
                    }
                }
                Err(error) => tracing::error!(
                    %account,
                    error = %format!("{error:#}"),
                    "controller step failed; the account is blocked until a step succeeds"
                ),
            }
        }
        if options.once {
            break;
        }
    }
    if let Some(servers) = servers {
        servers.abort();
    }
    Ok(ExitCode::SUCCESS)
}

/// SIGTERM and SIGINT, listened for from install on: one that arrives while nobody awaits
/// [`Shutdown::requested`] (during a step) is kept and answers the next call at once.
struct Shutdown {
    terminate: tokio::signal::unix::Signal,
    interrupt: tokio::signal::unix::Signal,
}

impl Shutdown {
    fn install() -> std::io::Result<Shutdown> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Shutdown { terminate: signal(SignalKind::terminate())?, interrupt: signal(SignalKind::interrupt())? })
    }

    async fn requested(&mut self) {
        tokio::select! {
            _ = self.terminate.recv() => {}
            _ = self.interrupt.recv() => {}
        }
    }
}
