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
use lockstep::feed::{self, EventFeed};
use lockstep::iam::AwsIam;
use lockstep::metrics::{MeteredIam, Metrics};
use lockstep::runtime::Shared;
use lockstep::store::{Ledger, Store, StoreLock};

pub struct Options {
    pub commit: bool,
    pub once: bool,
    pub json: bool,
}

/// How long a starting daemon waits for offline commands to release the store lock.
const LOCK_PATIENCE: std::time::Duration = std::time::Duration::from_secs(10);

pub async fn run(config: Config, options: Options) -> anyhow::Result<ExitCode> {
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    // Held for the daemon's life: while it is, the CLI refuses to act on the store directly.
    let _lock = StoreLock::daemon(&config.store.path, LOCK_PATIENCE)
        .context("taking the store lock; is lockstep already running?")?;
    let store = Arc::new(
        Store::open(&config.store.path)
            .with_context(|| format!("opening the store {}", config.store.path.display()))?,
    );
    let sdk = lockstep::aws::load(&config.region, None).await;
    let metrics = Metrics::new();
    let iam = MeteredIam::new(AwsIam::new(&sdk, &config.account_id), metrics.clone());
    let mode = if options.commit { Mode::Commit } else { Mode::DryRun };
    if mode == Mode::DryRun {
        tracing::warn!("dry run: nothing will be written to IAM; pass --commit to act");
    }
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
        Some(refresh::start_schedule(store.clone(), source, Arc::new(config.clone()), clock.clone()).await?)
    };
    let feed = feed::from_config(&config, clock.clone()).await?;
    let outcome = drive(Controller::new(config, store, iam, feed, clock, mode), metrics, options).await;
    if let Some(schedule) = schedule {
        schedule.shutdown().await?;
    }
    outcome
}

/// Steps the controller every guard poll (of the clock's time) until Ctrl-C or SIGTERM.
pub async fn drive<F: EventFeed + 'static>(
    controller: Controller<MeteredIam<AwsIam>, F>,
    metrics: Metrics,
    options: Options,
) -> anyhow::Result<ExitCode> {
    // Installed before the first step and kept for the daemon's life: no signal is lost.
    let mut shutdown = Shutdown::install().context("listening for shutdown signals")?;
    let config = controller.config().clone();
    let shared = Shared::new(controller, metrics);
    let servers = if options.once { None } else { Some(api::serve(shared.clone(), &config.listeners).await?) };
    let poll = shared.real_poll_interval();
    let mut ticker = tokio::time::interval(poll);
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
            _ = shared.woken() => {}
        }
        // Not raced against the signal: a step finishes its IAM writes and their journal.
        match shared.step().await {
            Ok(report) => {
                if options.json {
                    println!("{}", serde_json::to_string(&report)?);
                }
            }
            Err(error) => tracing::error!(error = %format!("{error:#}"), "controller step failed; retrying next poll"),
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
