//! Storage: the evidence store and the rollout ledger, each a trait the controller, the evidence
//! refresh and the runtime depend on, with one SQLite implementation ([`Store`]).
//!
//! No SQL connection leaves this module. Ledger methods say what they mean (`begin_rollback`,
//! `pause`), each one transaction inside the implementation that checks the current state,
//! changes it and writes its audit line, so a server database can implement the same trait.

mod history;
mod ledger;
mod lock;
mod sqlite;

use chrono::{DateTime, Utc};

pub use crate::evidence::EvidenceStore;
use crate::guard::{DenialEvent, SourceHealth, VerdictKind};
use crate::rollout::{AuditEntry, Snapshot};
pub use lock::{LockError, StoreLock, lock_path};
pub use sqlite::{ATHENA_ORIGIN, Rejudged, Run, RunCounts, Store, TRAIL_ORIGIN};

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{doing}: {source}")]
    Sqlite { doing: String, source: rusqlite::Error },
    #[error("the store is at schema version {found}, newer than this lockstep knows ({known}); use a newer lockstep")]
    TooNew { found: i64, known: usize },
    #[error("{doing}: the store holds an unexpected value: {what}")]
    Corrupt { doing: String, what: String },
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
    pub batch: i64,
    pub actor: &'a str,
    pub reason: &'a str,
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
    pub users: &'a [String],
    pub until: DateTime<Utc>,
}

/// The rollout ledger: users' states, batches, the pause switch, finished waves, the guard's
/// observations and the append-only audit log. Every change writes its audit line in the same
/// transaction; operator commands refuse undefined transitions with [`StoreError::Refused`].
pub trait Ledger: Send + Sync {
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
    fn finish_wave(&self, wave: &str, why: &str, now: DateTime<Utc>) -> Result<(), StoreError>;
    /// Journals a rollback; returns the users to remove from the group.
    fn begin_rollback(&self, rollback: &RollbackRequest<'_>, now: DateTime<Utc>) -> Result<Vec<String>, StoreError>;
    fn pause(&self, by: &str, reason: &str, now: DateTime<Utc>) -> Result<(), StoreError>;
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
    fn denials(&self, batch: i64) -> Result<Vec<DenialEvent>, StoreError>;
    fn source_health(&self) -> Result<SourceHealth, StoreError>;
    fn set_source_health(&self, health: &SourceHealth) -> Result<(), StoreError>;
    /// Records a member of the lockdown group that lockstep did not add (or no longer wants
    /// there): from now on never planned, rolled back or removed. Once per change: an audit line
    /// only when newly recorded.
    fn record_foreign(&self, user: &str, why: &str, now: DateTime<Utc>) -> Result<(), StoreError>;
    /// The member lockstep did not add has left the group: a candidate like any other again.
    fn forget_foreign(&self, user: &str, now: DateTime<Utc>) -> Result<(), StoreError>;
}

/// The log of evidence refreshes (scheduled or run by hand).
pub trait RefreshLog: Send + Sync {
    /// The most recent refresh runs, newest first.
    fn recent_runs(&self, limit: usize) -> Result<Vec<Run>, StoreError>;
}

/// What the controller and the runtime need from storage: the ledger, the evidence and the
/// refresh log.
pub trait RolloutStore: Ledger + RefreshLog + EvidenceStore<Error = StoreError> {}

impl<T: Ledger + RefreshLog + EvidenceStore<Error = StoreError>> RolloutStore for T {}
