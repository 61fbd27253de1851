//! Storage: the rollout ledger ([`Ledger`]), the evidence ([`EvidenceStore`] to read it,
//! [`EvidenceWriter`] to write it) and the refresh log ([`RefreshLog`]), each a trait the
//! controller, the evidence refresh and the runtime depend on (together [`RolloutStore`]), with
//! one SQLite implementation ([`Store`]).
//!
//! No SQL connection leaves this module. Ledger methods say what they mean (`begin_rollback`,
//! `pause`), each one transaction inside the implementation that checks the current state,
//! changes it and writes its audit line, so a server database can implement the same trait.

mod history;
mod ledger;
mod lock;
mod rejudge;
mod sqlite;

use std::collections::HashSet;

use chrono::{DateTime, Utc};

pub use crate::evidence::EvidenceStore;
use crate::evidence::aggregate::{Aggregates, Judge};
use crate::evidence::files::TrailFile;
use crate::exemption::{ExemptionState, Grant, Record as ExemptionRecord};
use crate::guard::{DenialEvent, SourceHealth, VerdictKind};
use crate::rollout::{AuditEntry, Snapshot};
pub use lock::{LockError, StoreLock, lock_path};
pub use rejudge::Rejudged;
pub use sqlite::{ATHENA_ORIGIN, Run, RunCounts, Store, TRAIL_ORIGIN};

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{doing}: {source}")]
    /// SQLite failed while doing something.
    Sqlite {
        /// What was being done.
        doing: String,
        /// Why it failed.
        source: rusqlite::Error,
    },
    #[error("the store is at schema version {found}, newer than this lockstep knows ({known}); use a newer lockstep")]
    /// The store was written by a newer lockstep.
    TooNew {
        /// The store's schema version.
        found: i64,
        /// The newest version this lockstep knows.
        known: usize,
    },
    #[error("{doing}: the store holds an unexpected value: {what}")]
    /// A value in the store cannot be read back.
    Corrupt {
        /// What was being done.
        doing: String,
        /// The value.
        what: String,
    },
    /// The command does not apply in the current state; nothing was changed.
    #[error("{0}")]
    Refused(String),
}

/// Adds what was being done to a SQLite error.
trait Doing<T> {
    fn doing(self, what: &str) -> Result<T, StoreError>;
}

impl<T> Doing<T> for rusqlite::Result<T> {
    fn doing(self, what: &str) -> Result<T, StoreError> {
        self.map_err(|source| StoreError::Sqlite { doing: what.to_string(), source })
    }
}

/// A new batch as the controller journals it, before any IAM call.
#[derive(Debug, Clone)]
pub struct NewBatch<'a> {
    /// The wave the batch belongs to.
    pub wave: &'a str,
    /// Each user with why they were chosen.
    pub users: &'a [(String, String)],
    /// How long the batch soaks once applied, fixed when it starts (the wave may later leave
    /// the configuration).
    pub soak: chrono::Duration,
}

/// A rollback to journal: the batch ends `rolled_back`, its members are to be removed and held.
#[derive(Debug, Clone)]
pub struct RollbackRequest<'a> {
    /// The batch to roll back.
    pub batch: i64,
    /// Who: an operator or the guard.
    pub actor: &'a str,
    /// Why, for the audit log.
    pub reason: &'a str,
    /// Members are held until then.
    pub hold_until: DateTime<Utc>,
    /// Also pause the rollout (unless already paused), with this reason: the guard does.
    pub pause: Option<&'a str>,
    /// Members not at fault (a guard rollback's bystanders): held only until `until`, with the
    /// reason "rolled back with batch N, not at fault", then eligible again.
    pub requeue: Option<Requeue<'a>>,
}

/// The bystanders of a rollback and when they return to the eligible pool.
#[derive(Debug, Clone, Copy)]
pub struct Requeue<'a> {
    /// The bystanders.
    pub users: &'a [String],
    /// When they are eligible again.
    pub until: DateTime<Utc>,
}

/// One locked user to take out of the group and hold, whatever its batch does.
#[derive(Debug, Clone, Copy)]
pub struct Removal<'a> {
    /// The locked user.
    pub user: &'a str,
    /// Who decided it, for the audit log.
    pub actor: &'a str,
    /// Why, for the audit log and the hold.
    pub reason: &'a str,
    /// Held until then, then eligible again.
    pub hold_until: DateTime<Utc>,
}

/// The rollout ledger: users' states, batches, the pause switch, finished waves, the guard's
/// observations and the append-only audit log. Every change writes its audit line in the same
/// transaction; operator commands refuse undefined transitions with [`StoreError::Refused`].
pub trait Ledger: Send + Sync {
    /// Everything the ledger holds that decisions depend on, read in one transaction.
    fn snapshot(&self) -> Result<Snapshot, StoreError>;
    /// The last `limit` audit lines, oldest first.
    fn audit_log(&self, limit: usize) -> Result<Vec<AuditEntry>, StoreError>;
    /// Journals a new batch (`applying`) and its members (`promoting`); returns its ID.
    fn start_batch(&self, batch: &NewBatch<'_>, actor: &str, now: DateTime<Utc>) -> Result<i64, StoreError>;
    /// `promoting -> locked`: the user is in the group.
    fn mark_locked(&self, user: &str, actor: &str, now: DateTime<Utc>) -> Result<(), StoreError>;
    /// `rolling_back -> held`: the user is out of the group.
    fn mark_held(&self, user: &str, actor: &str, now: DateTime<Utc>) -> Result<(), StoreError>;
    /// `locked -> removed_by_hand`: found missing from the group.
    fn mark_removed_by_hand(&self, user: &str, now: DateTime<Utc>) -> Result<(), StoreError>;
    /// `applying -> soaking` until `soak_until` (nothing when not applying).
    fn start_soak(&self, batch: i64, soak_until: DateTime<Utc>, now: DateTime<Utc>) -> Result<(), StoreError>;
    /// `soaking -> succeeded`.
    fn succeed(&self, batch: i64, detail: &str, now: DateTime<Utc>) -> Result<(), StoreError>;
    /// Records that a wave is done, with why.
    fn finish_wave(&self, wave: &str, why: &str, now: DateTime<Utc>) -> Result<(), StoreError>;
    /// Journals a rollback; returns the users to remove from the group.
    fn begin_rollback(&self, rollback: &RollbackRequest<'_>, now: DateTime<Utc>) -> Result<Vec<String>, StoreError>;
    /// Stops batches from starting (refused when already paused).
    fn pause(&self, by: &str, reason: &str, now: DateTime<Utc>) -> Result<(), StoreError>;
    /// Lets batches start again (refused when not paused).
    fn resume(&self, by: &str, now: DateTime<Utc>) -> Result<(), StoreError>;
    /// An operator keeps a candidate out of the rollout until released.
    fn hold(&self, user: &str, by: &str, reason: &str, now: DateTime<Utc>) -> Result<(), StoreError>;
    /// Makes a held (or removed-by-hand) user a candidate again.
    fn release(&self, user: &str, by: &str, now: DateTime<Utc>) -> Result<(), StoreError>;
    /// Records an operator's "start the next batch now" (refused while paused).
    fn request_promotion(&self, by: &str, now: DateTime<Utc>) -> Result<(), StoreError>;
    /// Records the guard's verdict on a batch: its stable kind and the summary for people.
    fn set_verdict(&self, batch: i64, kind: VerdictKind, summary: &str) -> Result<(), StoreError>;
    /// Writes an audit line that changes no state (a dry run's plan).
    fn note(&self, actor: &str, action: &str, reason: &str, now: DateTime<Utc>) -> Result<(), StoreError>;
    /// Stores denials of batch members (duplicates by event ID are ignored).
    fn record_denials(&self, batch: i64, events: &[(String, DenialEvent)]) -> Result<(), StoreError>;
    /// Denials recorded for a batch's members, oldest first.
    fn denials(&self, batch: i64) -> Result<Vec<DenialEvent>, StoreError>;
    /// How the guard's event stream last looked.
    fn source_health(&self) -> Result<SourceHealth, StoreError>;
    /// Records how the guard's event stream looks now.
    fn set_source_health(&self, health: &SourceHealth) -> Result<(), StoreError>;
    /// Records a member of the lockdown group that lockstep did not add (or no longer wants
    /// there): from now on never planned, rolled back or removed. Once per change: an audit line
    /// only when newly recorded.
    fn record_foreign(&self, user: &str, why: &str, now: DateTime<Utc>) -> Result<(), StoreError>;
    /// `held -> rolling_back` for a user whose add lockstep journaled and never saw land, found
    /// back in the group: lockstep's own late write, to be taken out again. Refused when no add of
    /// theirs is in flight.
    fn reclaim_late_add(&self, user: &str, why: &str, now: DateTime<Utc>) -> Result<(), StoreError>;
    /// Lockstep's add of `user` can no longer land (it was seen in the group, or the horizon passed).
    fn settle_add(&self, user: &str) -> Result<(), StoreError>;
    /// The member lockstep did not add has left the group: a candidate like any other again.
    fn forget_foreign(&self, user: &str, now: DateTime<Utc>) -> Result<(), StoreError>;
    /// Stores denials of locked users, each under the batch that locked them (`(batch, event
    /// ID, denial)`); returns those not stored before (duplicates by event ID are ignored).
    fn record_locked_denials(&self, events: &[(i64, String, DenialEvent)]) -> Result<Vec<DenialEvent>, StoreError>;
    /// Every recorded denial at or after `since`, once each, oldest first.
    fn denials_since(&self, since: DateTime<Utc>) -> Result<Vec<DenialEvent>, StoreError>;
    /// `locked -> rolling_back`: journals taking one locked user out of the group, to be held
    /// until `hold_until` (`guard.after_soak: release`). Refused unless the user is locked.
    fn begin_removal(&self, removal: &Removal<'_>, now: DateTime<Utc>) -> Result<(), StoreError>;
    /// Journals an operator's exemption (`granting`) before its tags are written in IAM.
    fn begin_exemption(&self, grant: &Grant<'_>, now: DateTime<Utc>) -> Result<(), StoreError>;
    /// Moves an exemption to `state` with its audit line (`granted` once tagged; `expiring`
    /// before the daemon removes the tags, `expired` after). One the ledger never saw (set by
    /// hand) is recorded as found.
    fn mark_exemption(
        &self,
        user: &str,
        state: ExemptionState,
        actor: &str,
        now: DateTime<Utc>,
    ) -> Result<(), StoreError>;
    /// Every exemption the ledger recorded, by user name.
    fn exemption_records(&self) -> Result<Vec<ExemptionRecord>, StoreError>;
}

/// The log of evidence refreshes (scheduled or run by hand): what freshness is answered from.
pub trait RefreshLog: Send + Sync {
    /// The most recent refresh runs, newest first.
    fn recent_runs(&self, limit: usize) -> Result<Vec<Run>, StoreError>;
    /// Records the start of a refresh of `[since, until)` from `source`; returns its ID for
    /// [`RefreshLog::finish_run`].
    fn start_run(
        &self,
        source: &str,
        since: DateTime<Utc>,
        until: DateTime<Utc>,
        now: DateTime<Utc>,
    ) -> Result<i64, StoreError>;
    /// Records how a refresh ended (`error` is `None` for success); only a success moves
    /// freshness forward.
    fn finish_run(
        &self,
        id: i64,
        counts: &RunCounts,
        error: Option<&str>,
        now: DateTime<Utc>,
    ) -> Result<(), StoreError>;
}

/// What an evidence refresh writes: aggregated calls, the read marks that keep a trail file from
/// being counted twice, verdicts re-derived under a new perimeter, and retention. Each method is
/// one transaction, so a crash leaves a file's mark and its contribution both or neither.
pub trait EvidenceWriter: EvidenceStore<Error = StoreError> + Send + Sync {
    /// Adds trail files' contributions and marks them read; a file already marked (by a
    /// concurrent refresh) adds nothing. Returns, per file, whether it was added.
    fn add_trail_files(&self, files: &[TrailFile], now: DateTime<Utc>) -> Result<Vec<bool>, StoreError>;
    /// Replaces everything `origin` holds for the hours overlapping `[since, until)` with
    /// `aggregates` (hours outside that range are ignored).
    fn replace_hours(
        &self,
        origin: &str,
        since: DateTime<Utc>,
        until: DateTime<Utc>,
        aggregates: &Aggregates,
    ) -> Result<(), StoreError>;
    /// Derives every stored verdict again under `judge` from the stored request contexts (no
    /// CloudTrail read) and stamps the evidence with its perimeter's fingerprint.
    fn rejudge(&self, judge: &Judge, now: DateTime<Utc>) -> Result<Rejudged, StoreError>;
    /// Prepares re-reading `origin`'s hours stored before request contexts were kept: from the
    /// oldest such hour on, every hour of `origin` is emptied and marked for a re-read (the gate
    /// stays closed until it is done) and the read marks of the files behind them are dropped.
    /// Returns that oldest hour (`None`: nothing to re-read); a re-read cut short starts over.
    fn begin_reread(&self, origin: &str) -> Result<Option<DateTime<Utc>>, StoreError>;
    /// Ends a successful re-read begun at `from`: hours that got their calls back are judged like
    /// any other; hours nothing was found for again are dropped.
    fn finish_reread(&self, origin: &str, from: DateTime<Utc>) -> Result<(), StoreError>;
    /// The greatest key read under `prefix` (`/`-separated; `prefix` ends with `/` or is empty).
    fn last_read(&self, prefix: &str) -> Result<Option<String>, StoreError>;
    /// The keys read under `prefix` that sort after `after` (all of them when `None`).
    fn read_keys(&self, prefix: &str, after: Option<&str>) -> Result<HashSet<String>, StoreError>;
    /// The event IDs recorded with an `eventTime` in `[since, until)`, after dropping the others
    /// (older: past the dedup horizon; later: dated in the future, never to be pruned by age).
    fn recent_event_ids(&self, since: DateTime<Utc>, until: DateTime<Utc>) -> Result<HashSet<u64>, StoreError>;
    /// Drops evidence hours, read marks and finished refresh runs older than `cutoff`.
    fn drop_before(&self, cutoff: DateTime<Utc>) -> Result<(), StoreError>;

    /// Re-judges the evidence unless it is already stamped with `judge`'s perimeter; `None` when
    /// nothing needed doing.
    fn ensure_judged(&self, judge: &Judge, now: DateTime<Utc>) -> Result<Option<Rejudged>, StoreError> {
        if self.freshness()?.judged_under == Some(judge.perimeter.fingerprint()) {
            return Ok(None);
        }
        self.rejudge(judge, now).map(Some)
    }
}

/// What the controller, the evidence refresh and the runtime need from storage: the ledger, the
/// evidence (read and written) and the refresh log.
pub trait RolloutStore: Ledger + RefreshLog + EvidenceWriter {}

impl<T: Ledger + RefreshLog + EvidenceWriter> RolloutStore for T {}
