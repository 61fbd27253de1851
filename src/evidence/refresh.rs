//! One evidence refresh, and the schedule that runs them.
//!
//! A refresh reads what is new in the configured source, aggregates it, and writes it to the
//! store so that nothing is ever counted twice or half-written: trail files are added in
//! batches, each one transaction holding the files' read marks and contributions (a re-run
//! skips files already marked); an Athena window replaces its whole hours for origin "athena"
//! in one transaction. Every run is logged (source, window, start and end, counts, error), which
//! is what [`EvidenceStore::freshness`] answers from; only a successful run moves freshness
//! forward.
//!
//! [`EvidenceStore::freshness`]: crate::evidence::EvidenceStore::freshness

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use chrono::{DateTime, TimeDelta, Utc};
use tokio_cron_scheduler::{Job, JobScheduler};
use tracing::Instrument;

use crate::clock::Clock;
use crate::config::{self, Config, SourceKind};
use crate::evidence::aggregate::{Judge, aggregate, hour_of};
use crate::evidence::files::{self, Folder, TrailFile};
use crate::evidence::s3::S3Trail;
use crate::evidence::{SourceError, TrailObjects, athena};
use crate::store::{ATHENA_ORIGIN, RolloutStore, RunCounts, StoreError, TRAIL_ORIGIN};

/// Where evidence comes from, built once from the configuration.
pub enum Source {
    /// A folder of trail files.
    Folder(Arc<Folder>),
    /// The trail bucket.
    S3(Arc<S3Trail>),
    /// An Athena table, queried per window.
    Athena {
        /// The Athena client.
        client: aws_sdk_athena::Client,
        /// The table and where results go.
        config: config::Athena,
    },
}

impl Source {
    /// The configured source; AWS clients use the standard credential chain and endpoint.
    pub async fn from_config(config: &Config) -> Result<Source, SourceError> {
        Self::of_kind(config, config.evidence.source, "evidence.source").await
    }

    /// The source of `kind` over the evidence section's location for it; `setting` names the
    /// setting that chose the kind, for the error when that section is missing.
    pub(crate) async fn of_kind(config: &Config, kind: SourceKind, setting: &str) -> Result<Source, SourceError> {
        let evidence = &config.evidence;
        let missing = |section: &str| SourceError::Other(format!("{setting} needs the evidence.{section} section"));
        Ok(match kind {
            SourceKind::Files => Source::Folder(Arc::new(Folder::new(&evidence.files_path))),
            SourceKind::S3 => {
                let location = evidence.s3.as_ref().ok_or_else(|| missing("s3"))?;
                let sdk = crate::aws::load(&config.region, None).await;
                Source::S3(Arc::new(S3Trail::new(crate::aws::s3_client(&sdk), location)))
            }
            SourceKind::Athena => {
                let athena = evidence.athena.clone().ok_or_else(|| missing("athena"))?;
                let sdk = crate::aws::load(&config.region, None).await;
                Source::Athena { client: aws_sdk_athena::Client::new(&sdk), config: athena }
            }
        })
    }

    /// Which kind of source this is.
    pub fn kind(&self) -> SourceKind {
        match self {
            Source::Folder(_) => SourceKind::Files,
            Source::S3(_) => SourceKind::S3,
            Source::Athena { .. } => SourceKind::Athena,
        }
    }
}

/// The name a source kind has in the configuration and the refresh log.
pub(crate) fn source_name(kind: SourceKind) -> &'static str {
    match kind {
        SourceKind::Files => "files",
        SourceKind::S3 => "s3",
        SourceKind::Athena => "athena",
    }
}

/// A span of time to refresh, `[since, until)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Window {
    /// The first instant covered.
    pub since: DateTime<Utc>,
    /// The first instant not covered.
    pub until: DateTime<Utc>,
}

/// How a refresh is getting on, for a progress bar.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Progress {
    /// Finding new trail files.
    Listing,
    /// This many new trail files will be read.
    Reading {
        /// How many.
        files: u64,
    },
    /// One more file read and recorded.
    FileDone {
        /// Records the file held.
        records: u64,
        /// Its size as stored.
        bytes: u64,
    },
    /// Waiting for the Athena query.
    Querying,
}

/// What a successful refresh did.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Report {
    /// The source's name in the configuration and the refresh log.
    pub source: &'static str,
    /// What was refreshed.
    pub window: Window,
    /// What the run read and recorded.
    pub counts: RunCounts,
}

/// An evidence refresh (or its schedule) failed.
#[derive(Debug, thiserror::Error)]
pub enum RefreshError {
    #[error(transparent)]
    /// The source could not be read.
    Source(#[from] SourceError),
    #[error(transparent)]
    /// The store could not be read or written.
    Store(#[from] StoreError),
    #[error("the refresh did not finish within {}", crate::duration::format(*.0))]
    /// The run took longer than this and was abandoned.
    TimedOut(Duration),
    #[error("evidence.schedule {schedule:?}: {why}")]
    /// The schedule could not be set up or stopped.
    Schedule {
        /// The configured cron expression.
        schedule: String,
        /// What went wrong.
        why: String,
    },
}

/// Runs one refresh of `window` from the configured source and logs it. Hours older than
/// `evidence.retention` are not written, and are dropped from the store after a successful run.
/// With `timeout`, a run that takes longer is abandoned and logged as failed; what it had
/// recorded stays, whole.
pub async fn refresh(
    store: &dyn RolloutStore,
    source: &Source,
    config: &Config,
    window: Window,
    clock: &dyn Clock,
    timeout: Option<Duration>,
    progress: &mut (dyn FnMut(Progress) + Send),
) -> Result<Report, RefreshError> {
    let name = source_name(source.kind());
    match source {
        Source::Folder(folder) => refresh_trail(store, folder, name, config, window, clock, timeout, progress).await,
        Source::S3(bucket) => refresh_trail(store, bucket, name, config, window, clock, timeout, progress).await,
        Source::Athena { client, config: athena } => {
            // No trail files to read: any `TrailObjects` type will do.
            let reading: Reading<'_, Folder> = Reading::Athena { client, athena };
            LoggedRun { store, name, config, window, clock, timeout }.run(reading, progress).await
        }
    }
}

/// [`refresh`] from any trail-file source, logged under `name`.
#[allow(clippy::too_many_arguments)]
pub async fn refresh_trail<T: TrailObjects + 'static>(
    store: &dyn RolloutStore,
    objects: &Arc<T>,
    name: &'static str,
    config: &Config,
    window: Window,
    clock: &dyn Clock,
    timeout: Option<Duration>,
    progress: &mut (dyn FnMut(Progress) + Send),
) -> Result<Report, RefreshError> {
    LoggedRun { store, name, config, window, clock, timeout }.run(Reading::Trail(objects), progress).await
}

/// What one refresh reads: new trail files from a source of them, or an Athena window.
enum Reading<'a, T> {
    Trail(&'a Arc<T>),
    Athena { client: &'a aws_sdk_athena::Client, athena: &'a config::Athena },
}

/// One refresh run: where it is logged and written, what it covers, how long it may take.
struct LoggedRun<'a> {
    store: &'a dyn RolloutStore,
    name: &'static str,
    config: &'a Config,
    window: Window,
    clock: &'a dyn Clock,
    timeout: Option<Duration>,
}

impl LoggedRun<'_> {
    /// Reads within the timeout, in the run's span, logging the run from its start to its outcome.
    async fn run<T: TrailObjects + 'static>(
        self,
        reading: Reading<'_, T>,
        progress: &mut (dyn FnMut(Progress) + Send),
    ) -> Result<Report, RefreshError> {
        let LoggedRun { store, name, config, window, clock, timeout } = self;
        let origin = match reading {
            Reading::Trail(_) => TRAIL_ORIGIN,
            Reading::Athena { .. } => ATHENA_ORIGIN,
        };
        let log = RunLog::start(store, name, origin, config, window, clock)?;
        let mut counts = RunCounts::default();
        let read = async {
            match reading {
                Reading::Trail(objects) => read_trail(store, objects, config, &log, clock, &mut counts, progress).await,
                Reading::Athena { client, athena } => {
                    progress(Progress::Querying);
                    read_athena(store, client, athena, config, log.window, log.cutoff, &mut counts).await
                }
            }
        };
        let result = within(timeout, read).instrument(log.span.clone()).await;
        log.finish(store, result, counts, clock)
    }
}

/// Re-judges the stored evidence (from its request contexts, reading no CloudTrail) unless it
/// was judged under the configured perimeter already.
pub fn rejudge_if_changed(store: &dyn RolloutStore, config: &Config, now: DateTime<Utc>) -> Result<(), StoreError> {
    if let Some(rejudged) = store.ensure_judged(&Judge::new(config), now)? {
        tracing::info!(
            perimeter = %rejudged.fingerprint,
            hours = rejudged.hours,
            "evidence re-judged under the configured perimeter"
        );
    }
    Ok(())
}

/// A run in the refresh log, from its start to its outcome.
struct RunLog {
    id: i64,
    name: &'static str,
    window: Window,
    /// Hours before this are past retention: not written, and dropped after success.
    cutoff: DateTime<Utc>,
    /// The evidence's origin in the store.
    origin: &'static str,
    /// Hours stored before request contexts were kept are re-read from this hour on (see
    /// [`EvidenceWriter::begin_reread`](crate::store::EvidenceWriter::begin_reread)); the window reaches back to it.
    reread: Option<DateTime<Utc>>,
    /// The run's `evidence_refresh` span: account, source, window, and the batches it feeds.
    span: tracing::Span,
}

impl RunLog {
    fn start(
        store: &dyn RolloutStore,
        name: &'static str,
        origin: &'static str,
        config: &Config,
        mut window: Window,
        clock: &dyn Clock,
    ) -> Result<RunLog, RefreshError> {
        let now = clock.now();
        // New verdicts are derived under the configured perimeter: the stored ones must be too.
        rejudge_if_changed(store, config, now)?;
        // Verdicts that cannot be re-judged are read again, whatever the window asked for.
        let reread = store.begin_reread(origin)?;
        if let Some(from) = reread {
            tracing::info!(%from, origin, "re-reading evidence stored before request contexts were kept");
            window.since = window.since.min(from);
        }
        let id = store.start_run(name, window.since, window.until, now)?;
        // The evidence this run records is what the guard judges the active batches on.
        let batches = store.snapshot()?.active_batch_ids();
        let span = tracing::info_span!(
            "evidence_refresh",
            account = %config.account_id,
            source = name,
            run = id,
            since = %window.since,
            until = %window.until,
            batches = ?batches,
        );
        Ok(RunLog { id, name, window, cutoff: before(now, config.evidence.retention), origin, reread, span })
    }

    fn finish(
        self,
        store: &dyn RolloutStore,
        result: Result<(), RefreshError>,
        counts: RunCounts,
        clock: &dyn Clock,
    ) -> Result<Report, RefreshError> {
        let result = result
            .and_then(|()| Ok(self.reread.map(|from| store.finish_reread(self.origin, from)).transpose()?))
            .and_then(|_| Ok(store.drop_before(self.cutoff)?));
        let error = result.as_ref().err().map(|e| e.to_string());
        store.finish_run(self.id, &counts, error.as_deref(), clock.now())?;
        result.map(|()| Report { source: self.name, window: self.window, counts })
    }
}

async fn within(
    timeout: Option<Duration>,
    work: impl Future<Output = Result<(), RefreshError>>,
) -> Result<(), RefreshError> {
    match timeout {
        Some(limit) => tokio::time::timeout(limit, work).await.unwrap_or(Err(RefreshError::TimedOut(limit))),
        None => work.await,
    }
}

#[allow(clippy::too_many_arguments)]
async fn read_trail<T: TrailObjects + 'static>(
    store: &dyn RolloutStore,
    objects: &Arc<T>,
    config: &Config,
    log: &RunLog,
    clock: &dyn Clock,
    counts: &mut RunCounts,
    progress: &mut (dyn FnMut(Progress) + Send),
) -> Result<(), RefreshError> {
    let window = log.window;
    // Hours before a re-read's start are still stored: a re-read file adds none of them.
    let cutoff = log.cutoff.max(log.reread.unwrap_or(log.cutoff));
    progress(Progress::Listing);
    let mut keys = Vec::new();
    for scan in files::scan_prefixes(&**objects, &config.account_id, window.since, window.until).await? {
        // Files to re-read sort anywhere in their prefix: list it whole.
        let after = match scan.ordered && log.reread.is_none() {
            true => store.last_read(&scan.prefix)?.map(|last| files::resume_after(&last).to_string()),
            false => None,
        };
        let read = store.read_keys(&scan.prefix, after.as_deref())?;
        let listed = objects.list_keys(&scan.prefix, after.as_deref()).await?;
        keys.extend(listed.into_iter().filter(|key| files::is_trail_key(key) && !read.contains(key)));
    }
    progress(Progress::Reading { files: keys.len() as u64 });
    let (dedup_since, dedup_until) = dedup_hours(config, clock.now());
    let seen = files::SeenEvents::new(store.recent_event_ids(dedup_since, dedup_until)?);
    let mut batch = Vec::with_capacity(BATCH);
    let read = files::read_files(
        objects.clone(),
        keys,
        Arc::new(Judge::new(config)),
        config.evidence.max_inflated_size,
        seen,
        |mut file: TrailFile| {
            file.aggregates.retain_hours(|hour| hour >= cutoff);
            file.event_ids.retain(|event| (dedup_since..dedup_until).contains(&event.hour));
            batch.push(file);
            if batch.len() < BATCH && batch.iter().map(|f| f.records).sum::<u64>() < BATCH_RECORDS {
                return Ok(());
            }
            record(store, &mut batch, clock, counts, progress)
        },
    )
    .await;
    // Files read before a failure are whole: keep them.
    let recorded = record(store, &mut batch, clock, counts, progress);
    read.and(recorded)
}

/// The least time the store remembers events by their `eventID` (more when `evidence.overlap`
/// is longer): a record CloudTrail delivers again in a later file within it is counted once.
pub const DEDUP_HORIZON: Duration = Duration::from_secs(24 * 3600);

/// The event hours whose IDs the store keeps: the dedup horizon (or the overlap) before `now`,
/// up to the hour after it (records dated later are clamped, never kept).
fn dedup_hours(config: &Config, now: DateTime<Utc>) -> (DateTime<Utc>, DateTime<Utc>) {
    let since = hour_of(before(now, DEDUP_HORIZON.max(config.evidence.overlap)));
    (since, config::later(hour_of(now), Duration::from_secs(2 * 3600)))
}

/// Trail files recorded per transaction: enough to merge away most rows, few enough that a crash
/// costs little rework.
const BATCH: usize = 256;
/// Records after which a batch is recorded even if it has fewer files: the batch's aggregates
/// are held in memory until then, and their size follows the records (files of a large account
/// hold thousands each), not the file count.
const BATCH_RECORDS: u64 = 50_000;

/// Writes and empties `batch`, counting the files this run added.
fn record(
    store: &dyn RolloutStore,
    batch: &mut Vec<TrailFile>,
    clock: &dyn Clock,
    counts: &mut RunCounts,
    progress: &mut (dyn FnMut(Progress) + Send),
) -> Result<(), RefreshError> {
    if batch.is_empty() {
        return Ok(());
    }
    let added = store.add_trail_files(batch, clock.now())?;
    // A file not added was recorded first by a concurrent refresh: not ours to count.
    for (file, added) in batch.drain(..).zip(added) {
        if added {
            counts.files += 1;
            counts.files_corrupt += u64::from(file.error.is_some());
            counts.records_read += file.records;
            counts.records_skipped += file.skipped;
            counts.bytes_scanned += file.bytes;
        }
        progress(Progress::FileDone { records: file.records, bytes: file.bytes });
    }
    Ok(())
}

/// Queries whole hours, so that replacing the window's hours never drops calls a query did not
/// cover.
async fn read_athena(
    store: &dyn RolloutStore,
    client: &aws_sdk_athena::Client,
    athena: &config::Athena,
    config: &Config,
    window: Window,
    cutoff: DateTime<Utc>,
    counts: &mut RunCounts,
) -> Result<(), RefreshError> {
    let Window { since, until } = whole_hours(window);
    let judge = Judge::new(config);
    let run = athena::run_window(client, athena, &config.account_id, &judge.lockdown_policy, since, until).await?;
    counts.records_read = run.groups.iter().map(|g| g.calls).sum();
    counts.records_skipped = run.skipped_rows;
    counts.bytes_scanned = run.bytes_scanned;
    let mut aggregates = aggregate(&run.groups, &judge);
    aggregates.retain_hours(|hour| hour >= cutoff);
    store.replace_hours(ATHENA_ORIGIN, since, until, &aggregates)?;
    Ok(())
}

/// `window` widened to whole hours.
fn whole_hours(window: Window) -> Window {
    let until = hour_of(window.until);
    Window {
        since: hour_of(window.since),
        until: if until == window.until { until } else { until + TimeDelta::hours(1) },
    }
}

/// The window a scheduled refresh covers: from where the evidence already reaches, or the
/// previous hour if that is earlier, less `overlap` for late deliveries, up to `now`. Never
/// further back than `lookback`, which is also what the first run (nothing covered yet) reads,
/// and what a run after a long outage catches up from.
pub fn scheduled_window(
    freshness: &crate::evidence::Freshness,
    now: DateTime<Utc>,
    evidence: &config::Evidence,
) -> Window {
    let oldest = before(now, evidence.lookback);
    let since = match freshness.covered_until {
        None => oldest,
        Some(covered) => before(covered.min(hour_of(now) - TimeDelta::hours(1)), evidence.overlap).max(oldest),
    };
    Window { since, until: now }
}

/// `at - span`, saturating instead of overflowing.
pub fn before(at: DateTime<Utc>, span: Duration) -> DateTime<Utc> {
    TimeDelta::from_std(span).ok().and_then(|span| at.checked_sub_signed(span)).unwrap_or(DateTime::<Utc>::MIN_UTC)
}

/// Outcomes of scheduled refreshes, for logs and metrics.
#[derive(Debug, Default)]
pub struct RefreshStats {
    /// Runs that finished successfully.
    pub succeeded: AtomicU64,
    /// Runs that failed or timed out.
    pub failed: AtomicU64,
    /// Ticks skipped because the previous refresh was still running.
    pub skipped: AtomicU64,
}

/// Scheduled refreshes; dropping it does not stop them, [`Schedule::shutdown`] does.
pub struct Schedule {
    scheduler: JobScheduler,
    schedule: String,
    /// How the scheduled runs went so far.
    pub stats: Arc<RefreshStats>,
}

impl Schedule {
    /// Stops the schedule; a run under way finishes first.
    pub async fn shutdown(mut self) -> Result<(), RefreshError> {
        self.scheduler.shutdown().await.map_err(|e| RefreshError::Schedule {
            schedule: self.schedule,
            why: format!("stopping the scheduler: {e}"),
        })
    }
}

struct Runner {
    store: Arc<dyn RolloutStore>,
    source: Source,
    config: Arc<Config>,
    clock: Arc<dyn Clock>,
    /// At most one refresh at a time; a tick that finds one running is skipped.
    busy: tokio::sync::Mutex<()>,
    /// Shared by every account's schedule: how many refreshes may run at once in the daemon.
    turns: Arc<tokio::sync::Semaphore>,
    /// A run may take one schedule period, then it is abandoned for the next tick.
    timeout: Duration,
    stats: Arc<RefreshStats>,
}

/// Starts refreshing on `evidence.schedule` (six-field cron, seconds first, UTC), plus one run
/// right away: on a new store that is the `lookback` backfill, after a restart it catches up. A
/// failed or timed-out run is logged and counted, and the next tick retries it. A run waits for
/// one of `turns` (shared by the daemon's accounts) before it starts.
pub async fn start_schedule(
    store: Arc<dyn RolloutStore>,
    source: Source,
    config: Arc<Config>,
    clock: Arc<dyn Clock>,
    turns: Arc<tokio::sync::Semaphore>,
) -> Result<Schedule, RefreshError> {
    let schedule = config.evidence.schedule.clone();
    let failed = |why: String| RefreshError::Schedule { schedule: schedule.clone(), why };
    let runner = Arc::new(Runner {
        timeout: schedule_period(&schedule, clock.now()).map_err(failed)?,
        store,
        source,
        config,
        clock,
        busy: tokio::sync::Mutex::new(()),
        turns,
        stats: Arc::new(RefreshStats::default()),
    });
    let stats = runner.stats.clone();
    tokio::spawn({
        let runner = runner.clone();
        async move { runner.tick().await }
    });
    let job = Job::new_async(schedule.as_str(), move |_, _| {
        let runner = runner.clone();
        Box::pin(async move { runner.tick().await })
    })
    .map_err(|e| failed(e.to_string()))?;
    let scheduler = JobScheduler::new().await.map_err(|e| failed(e.to_string()))?;
    scheduler.add(job).await.map_err(|e| failed(e.to_string()))?;
    scheduler.start().await.map_err(|e| failed(e.to_string()))?;
    Ok(Schedule { scheduler, schedule, stats })
}

impl Runner {
    async fn tick(&self) {
        let Ok(_running) = self.busy.try_lock() else {
            tracing::warn!("evidence refresh still running; skipping this tick");
            self.stats.skipped.fetch_add(1, Ordering::Relaxed);
            return;
        };
        // Every account's schedule fires at the same time: their refreshes take turns, so a
        // daemon of 50 accounts reads one account's trail at a time, in one account's memory.
        let Ok(_turn) = self.turns.acquire().await else { return };
        let outcome = match self.store.freshness() {
            Ok(freshness) => {
                let window = scheduled_window(&freshness, self.clock.now(), &self.config.evidence);
                let mut logger = ProgressLog::default();
                refresh(&*self.store, &self.source, &self.config, window, &*self.clock, Some(self.timeout), &mut |p| {
                    logger.record(&p)
                })
                .await
            }
            Err(e) => Err(e.into()),
        };
        match outcome {
            Ok(report) => {
                self.stats.succeeded.fetch_add(1, Ordering::Relaxed);
                tracing::info!(
                    source = report.source,
                    since = %report.window.since,
                    until = %report.window.until,
                    files = report.counts.files,
                    records = report.counts.records_read,
                    skipped = report.counts.records_skipped,
                    bytes = report.counts.bytes_scanned,
                    "evidence refreshed"
                );
            }
            Err(error) => {
                self.stats.failed.fetch_add(1, Ordering::Relaxed);
                tracing::error!("evidence refresh failed; the next tick retries: {error}");
            }
        }
    }
}

/// Progress of a scheduled run (a first-start backfill can read days of trail) as log lines:
/// the plan, then one line per tenth of the files.
#[derive(Default)]
struct ProgressLog {
    files: u64,
    done: u64,
    records: u64,
}

impl ProgressLog {
    fn record(&mut self, progress: &Progress) {
        match progress {
            Progress::Reading { files } => {
                self.files = *files;
                tracing::info!(files, "evidence refresh: reading new trail files");
            }
            Progress::FileDone { records, .. } => {
                self.done += 1;
                self.records += records;
                let step = (self.files / 10).max(1);
                if self.done.is_multiple_of(step) || self.done == self.files {
                    tracing::info!(
                        done = self.done,
                        of = self.files,
                        records = self.records,
                        "evidence refresh progress"
                    );
                }
            }
            Progress::Querying => tracing::info!("evidence refresh: waiting for the Athena query"),
            Progress::Listing => {}
        }
    }
}

/// The time between two ticks of `schedule`: the longest a scheduled run may take.
fn schedule_period(schedule: &str, now: DateTime<Utc>) -> Result<Duration, String> {
    let cron = config::parse_cron(schedule)?;
    let first = cron.find_next_occurrence(&now, false).map_err(|e| e.to_string())?;
    let second = cron.find_next_occurrence(&first, false).map_err(|e| e.to_string())?;
    (second - first).to_std().map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::evidence::{EvidenceStore, Freshness};
    use crate::store::{RefreshLog, Store};

    fn one_turn() -> Arc<tokio::sync::Semaphore> {
        Arc::new(tokio::sync::Semaphore::new(1))
    }

    fn at(text: &str) -> DateTime<Utc> {
        text.parse().unwrap()
    }

    fn evidence() -> config::Evidence {
        config::Evidence {
            source: SourceKind::Files,
            files_path: "trail".into(),
            s3: None,
            athena: None,
            schedule: "0 5 * * * *".into(),
            overlap: Duration::from_secs(2 * 3600),
            lookback: Duration::from_secs(14 * 86_400),
            retention: Duration::from_secs(90 * 86_400),
            max_inflated_size: config::DEFAULT_MAX_INFLATED_SIZE,
        }
    }

    #[test]
    fn first_run_backfills_lookback() {
        let now = at("2024-03-20T10:05:00Z");
        let w = scheduled_window(&Freshness::default(), now, &evidence());
        assert_eq!(w, Window { since: at("2024-03-06T10:05:00Z"), until: now });
    }

    #[test]
    fn regular_run_reads_the_previous_hour_plus_overlap() {
        let now = at("2024-03-20T10:05:00Z");
        let fresh = Freshness {
            last_success: Some(at("2024-03-20T09:05:30Z")),
            covered_until: Some(at("2024-03-20T09:05:00Z")),
            ..Freshness::default()
        };
        assert_eq!(scheduled_window(&fresh, now, &evidence()).since, at("2024-03-20T07:00:00Z"));
    }

    #[test]
    fn after_an_outage_the_gap_is_caught_up_but_not_beyond_lookback() {
        let now = at("2024-03-20T10:05:00Z");
        let days_ago = |d: i64| Freshness { covered_until: Some(now - TimeDelta::days(d)), ..Freshness::default() };
        assert_eq!(scheduled_window(&days_ago(3), now, &evidence()).since, at("2024-03-17T08:05:00Z"));
        assert_eq!(scheduled_window(&days_ago(30), now, &evidence()).since, at("2024-03-06T10:05:00Z"));
    }

    async fn wait_for(what: &str, done: impl Fn() -> bool) {
        let started = std::time::Instant::now();
        while !done() {
            assert!(started.elapsed() < Duration::from_secs(20), "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_schedule_backfills_at_once_then_refreshes_each_tick_and_retries_failures() {
        let dir = tempfile::tempdir().unwrap();
        let mut config =
            Config::parse(include_str!("../../rollout.yaml"), std::path::Path::new("rollout.yaml")).unwrap();
        config.evidence.schedule = "* * * * * *".into();
        let now = at("2024-03-20T10:05:00Z");
        // The generator links the library built without `cfg(test)`, so it takes its own perimeter.
        let org = lockstep_synth::Org::new(1, 5, &lockstep_synth::example_perimeter().unwrap());
        let generated = org.generate(now - TimeDelta::hours(3), now - TimeDelta::hours(1));
        lockstep_synth::write_trail(dir.path(), &org.account_id, &generated.records, Default::default()).unwrap();
        let store = Arc::new(Store::open_in_memory().unwrap());
        let clock: Arc<dyn Clock> = Arc::new(crate::clock::ManualClock::new(now));

        let source = Source::Folder(Arc::new(Folder::new(dir.path())));
        let schedule =
            start_schedule(store.clone(), source, Arc::new(config.clone()), clock.clone(), one_turn()).await.unwrap();
        wait_for("two successful runs", || schedule.stats.succeeded.load(Ordering::Relaxed) >= 2).await;
        schedule.shutdown().await.unwrap();
        let runs = store.recent_runs(100).unwrap();
        let first = runs.last().unwrap();
        assert_eq!(first.since, now - TimeDelta::days(14), "the first run backfills the lookback");
        assert_eq!(first.counts.records_read, generated.records.len() as u64);
        assert_eq!(runs[0].since, at("2024-03-20T07:00:00Z"), "later runs: the previous hour less the overlap");
        assert_eq!(store.freshness().unwrap().covered_until, Some(now));

        let failing = Arc::new(Store::open_in_memory().unwrap());
        let missing = Source::Folder(Arc::new(Folder::new(dir.path().join("missing"))));
        let schedule = start_schedule(failing.clone(), missing, Arc::new(config), clock, one_turn()).await.unwrap();
        wait_for("two failed runs", || schedule.stats.failed.load(Ordering::Relaxed) >= 2).await;
        schedule.shutdown().await.unwrap();
        assert!(failing.recent_runs(100).unwrap().iter().all(|r| r.status == "failed"));
        let failed = failing.freshness().unwrap();
        assert_eq!((failed.last_success, failed.covered_until), (None, None));
    }

    #[test]
    fn athena_windows_are_whole_hours() {
        let w = |since: &str, until: &str| Window { since: at(since), until: at(until) };
        assert_eq!(
            whole_hours(w("2024-03-20T07:05:00Z", "2024-03-20T10:05:00Z")),
            w("2024-03-20T07:00:00Z", "2024-03-20T11:00:00Z")
        );
        let aligned = w("2024-03-20T07:00:00Z", "2024-03-20T10:00:00Z");
        assert_eq!(whole_hours(aligned), aligned);
    }

    #[test]
    fn schedule_period_and_saturating_arithmetic() {
        assert_eq!(schedule_period("0 5 * * * *", at("2026-01-01T00:00:00Z")), Ok(Duration::from_secs(3600)));
        assert_eq!(schedule_period("*/20 * * * * *", at("2026-01-01T00:00:00Z")), Ok(Duration::from_secs(20)));
        assert!(schedule_period("every hour", at("2026-01-01T00:00:00Z")).is_err());
        assert_eq!(before(at("2024-01-01T00:00:00Z"), Duration::MAX), DateTime::<Utc>::MIN_UTC);
    }
}
