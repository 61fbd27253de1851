//! The SQLite store: one embedded database (WAL, busy timeout) holding the evidence and, from
//! migration 2 on, the rollout ledger (whose SQL lives in `ledger.rs`).
//!
//! The schema is versioned with `PRAGMA user_version`: [`MIGRATIONS`] is an ordered list applied
//! on open, each in its own transaction, so a database is always at a known version. Append new
//! migrations; never edit one that has shipped.
//!
//! Evidence layout: per user, hour and origin ("trail" for trail files, read additively, each
//! file once; "athena" for query windows, replaced window by window) the first and last applicable
//! call, the denials, and the calls by request context; each distinct context is stored once with
//! its judgement (migration 10), and the calls by verdict and the outside sources are summed from
//! them when read. Reads sum across origins. `trail_file` marks each file read;
//! a file's mark and its contribution are written in one transaction, so a crash leaves either
//! both or neither. Files are written in batches (one transaction each), merged first. Every
//! transaction that writes evidence also moves its generation (migration 11), which readers key
//! what they keep on.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use chrono::{DateTime, Utc};
use rusqlite::{CachedStatement, Connection, OptionalExtension, Transaction, params};

use crate::evidence::aggregate::{Aggregates, Judge, JudgedContext, RequestContext, hour_of};
use crate::evidence::files::TrailFile;
use crate::evidence::{EvidenceStore, Freshness, OutsideCall, OutsideSource, UserEvidence};
use crate::perimeter::{AllowReason, DenyReason, Fingerprint, SkipReason, Verdict};

use super::{Doing, EvidenceWriter, RefreshLog, Rejudged, StoreError};

/// Schema migrations, applied in order; `user_version` is the number applied.
pub(crate) const MIGRATIONS: &[&str] = &[
    // 1: evidence.
    "
    CREATE TABLE trail_file (
        key TEXT PRIMARY KEY,
        read_at INTEGER NOT NULL,
        records INTEGER NOT NULL,
        skipped INTEGER NOT NULL,
        bytes INTEGER NOT NULL,
        newest_hour INTEGER,
        error TEXT
    ) WITHOUT ROWID;

    CREATE TABLE evidence_hour (
        user_name TEXT NOT NULL,
        hour INTEGER NOT NULL,
        origin TEXT NOT NULL,
        arn TEXT,
        first_call INTEGER,
        last_call INTEGER,
        explicit_denials INTEGER NOT NULL,
        other_denials INTEGER NOT NULL,
        PRIMARY KEY (hour, user_name, origin)
    ) WITHOUT ROWID;

    CREATE TABLE evidence_verdict (
        user_name TEXT NOT NULL,
        hour INTEGER NOT NULL,
        origin TEXT NOT NULL,
        verdict TEXT NOT NULL,
        reason TEXT NOT NULL,
        calls INTEGER NOT NULL,
        PRIMARY KEY (hour, user_name, origin, verdict, reason)
    ) WITHOUT ROWID;

    CREATE TABLE evidence_outside (
        user_name TEXT NOT NULL,
        hour INTEGER NOT NULL,
        origin TEXT NOT NULL,
        source TEXT NOT NULL,
        calls INTEGER NOT NULL,
        last_seen INTEGER NOT NULL,
        last_action TEXT NOT NULL,
        last_reason TEXT NOT NULL,
        PRIMARY KEY (hour, user_name, origin, source)
    ) WITHOUT ROWID;

    CREATE TABLE refresh_run (
        id INTEGER PRIMARY KEY,
        source TEXT NOT NULL,
        window_start INTEGER NOT NULL,
        window_end INTEGER NOT NULL,
        started INTEGER NOT NULL,
        finished INTEGER,
        status TEXT NOT NULL CHECK (status IN ('running', 'succeeded', 'failed')),
        files INTEGER NOT NULL DEFAULT 0,
        files_corrupt INTEGER NOT NULL DEFAULT 0,
        records_read INTEGER NOT NULL DEFAULT 0,
        records_skipped INTEGER NOT NULL DEFAULT 0,
        bytes_scanned INTEGER NOT NULL DEFAULT 0,
        error TEXT
    );
    CREATE INDEX refresh_run_by_status ON refresh_run (status, finished);
    ",
    // 2: the rollout ledger (its tables live with the ledger implementation).
    super::ledger::SCHEMA_V2,
    // 3: each batch records its soak when it starts.
    super::ledger::SCHEMA_V3,
    // 4: request contexts, so that verdicts follow the perimeter.
    SCHEMA_V4,
    // 5: members lockstep did not add (ownership as a fact).
    super::ledger::SCHEMA_V5,
    // 6: adds lockstep journaled and has not seen land (a late add is lockstep's own).
    super::ledger::SCHEMA_ADDS_IN_FLIGHT,
    // 7: recent events by hour, so a record delivered again in a later file is counted once.
    SCHEMA_SEEN_EVENTS,
    // 8: guard denials record their source (endpoint or address).
    super::ledger::SCHEMA_DENIAL_SOURCE,
    // 9: exemptions that expire: who granted them, why, until when.
    super::ledger::SCHEMA_EXEMPTIONS,
    // 10: request contexts kept once each with their verdict; calls refer to them.
    SCHEMA_INTERNED_CONTEXTS,
    // 11: a counter every evidence write bumps, so readers can keep what they read; hours
    // waiting for a re-read found without a scan.
    SCHEMA_EVIDENCE_GENERATION,
    // 12: the account the store belongs to.
    SCHEMA_STORE_ACCOUNT,
];

/// The evidence's generation: bumped in the same transaction as every write to the evidence
/// ([`bump_generation`]), so a reader that saw generation N and reads again at N gets the same
/// answer, even when another process wrote it. And the hours waiting for a re-read, indexed
/// alone (there are none once re-read): freshness counts them every step, without a scan.
const SCHEMA_EVIDENCE_GENERATION: &str = "
    CREATE TABLE evidence_generation (
        only INTEGER PRIMARY KEY CHECK (only = 1),
        generation INTEGER NOT NULL
    );
    INSERT INTO evidence_generation (only, generation) VALUES (1, 0);
    CREATE INDEX evidence_hour_needs_reread ON evidence_hour (needs_reread) WHERE needs_reread = 1;
";

/// The account whose users, ledger and evidence the store holds (one row once claimed). A store
/// written before accounts existed has none: the first open for an account claims it, which is
/// how a single-account store becomes its account's store in an organisation, in place.
const SCHEMA_STORE_ACCOUNT: &str = "
    CREATE TABLE store_account (
        only INTEGER PRIMARY KEY CHECK (only = 1),
        account TEXT NOT NULL
    );
";

/// Marks the evidence changed: every transaction that writes evidence calls it before committing.
pub(super) fn bump_generation(tx: &Transaction<'_>) -> rusqlite::Result<()> {
    tx.execute("UPDATE evidence_generation SET generation = generation + 1", []).map(|_| ())
}

/// The events trail refreshes recorded lately ([`crate::evidence::files::EventKey`]; the ID
/// hash bit-cast to SQLite's signed integer), pruned to the dedup horizon by each refresh.
const SCHEMA_SEEN_EVENTS: &str = "
    CREATE TABLE seen_event (hour INTEGER NOT NULL, id INTEGER NOT NULL, PRIMARY KEY (hour, id)) WITHOUT ROWID;
";

/// Each user-hour keeps its calls as the perimeter rule reads them (`evidence_context`); its
/// verdict and outside rows are derived from them under the perimeter `evidence_judged` names.
/// Hours stored before this migration have no contexts: they are marked `needs_reread` rather
/// than trusted under a perimeter nobody recorded.
const SCHEMA_V4: &str = "
    CREATE TABLE evidence_context (
        user_name TEXT NOT NULL,
        hour INTEGER NOT NULL,
        origin TEXT NOT NULL,
        event_source TEXT NOT NULL,
        event_name TEXT NOT NULL,
        event_type TEXT NOT NULL,
        account TEXT NOT NULL,
        source_ip TEXT NOT NULL,
        endpoint TEXT NOT NULL,
        endpoint_account TEXT NOT NULL,
        invoked_by TEXT NOT NULL,
        s3_auth_method TEXT NOT NULL,
        calls INTEGER NOT NULL,
        first_seen INTEGER NOT NULL,
        last_seen INTEGER NOT NULL,
        PRIMARY KEY (hour, user_name, origin, event_source, event_name, event_type, account, source_ip,
                     endpoint, endpoint_account, invoked_by, s3_auth_method)
    ) WITHOUT ROWID;

    ALTER TABLE evidence_hour ADD COLUMN needs_reread INTEGER NOT NULL DEFAULT 0;
    UPDATE evidence_hour SET needs_reread = 1;

    CREATE TABLE evidence_judged (
        only INTEGER PRIMARY KEY CHECK (only = 1),
        fingerprint TEXT NOT NULL,
        judged_at INTEGER NOT NULL
    );
";

/// Each distinct request context is kept once (`request_context`, found by a hash of its columns,
/// [`context_key`]: an index of integers stays small where contexts are many), with what the perimeter rule
/// derives from it (verdict, reason, applicability, outside source, action); a user-hour's calls
/// (`evidence_call`) refer to it by ID. Verdict counts and outside sources are summed from them
/// when read, so a re-judgement rewrites the distinct contexts, not every user-hour.
///
/// Verdicts that were stored rather than derived keep their tables, renamed: those of hours
/// stored before contexts were kept (until re-read), and, until the next re-judgement, those of
/// the hours migrated here, whose contexts wait unjudged in `pending_context` (the former
/// `evidence_context`): they are judged, interned and their stored verdicts dropped by the next
/// re-judgement. Until then they read back exactly as stored.
///
/// Views under the former table names (`evidence_verdict`, `evidence_outside`,
/// `evidence_context`) show the evidence per user-hour as those tables held it.
const SCHEMA_INTERNED_CONTEXTS: &str = "
    ALTER TABLE evidence_verdict RENAME TO stored_verdict;
    ALTER TABLE evidence_outside RENAME TO stored_outside;
    ALTER TABLE evidence_context RENAME TO pending_context;

    CREATE TABLE request_context (
        id INTEGER PRIMARY KEY,
        key INTEGER NOT NULL,
        event_source TEXT NOT NULL,
        event_name TEXT NOT NULL,
        event_type TEXT NOT NULL,
        account TEXT NOT NULL,
        source_ip TEXT NOT NULL,
        endpoint TEXT NOT NULL,
        endpoint_account TEXT NOT NULL,
        invoked_by TEXT NOT NULL,
        s3_auth_method TEXT NOT NULL,
        verdict TEXT NOT NULL,
        reason TEXT NOT NULL,
        applicable INTEGER NOT NULL,
        outside_source TEXT,
        action TEXT NOT NULL
    );
    CREATE INDEX request_context_by_key ON request_context (key);

    CREATE TABLE evidence_call (
        hour INTEGER NOT NULL,
        user_name TEXT NOT NULL,
        origin TEXT NOT NULL,
        context INTEGER NOT NULL,
        calls INTEGER NOT NULL,
        first_seen INTEGER NOT NULL,
        last_seen INTEGER NOT NULL,
        PRIMARY KEY (hour, user_name, origin, context)
    ) WITHOUT ROWID;

    CREATE VIEW evidence_verdict (user_name, hour, origin, verdict, reason, calls) AS
        SELECT user_name, hour, origin, verdict, reason, sum(calls) FROM (
            SELECT user_name, hour, origin, verdict, reason, calls FROM stored_verdict
            UNION ALL
            SELECT e.user_name, e.hour, e.origin, c.verdict, c.reason, e.calls
            FROM evidence_call e JOIN request_context c ON c.id = e.context
        ) GROUP BY hour, user_name, origin, verdict, reason;

    CREATE VIEW evidence_outside (user_name, hour, origin, source, calls, last_seen, last_action, last_reason) AS
        SELECT user_name, hour, origin, source, calls, last_seen,
               substr(latest, 1, instr(latest, char(31)) - 1), substr(latest, instr(latest, char(31)) + 1)
        FROM (
            SELECT user_name, hour, origin, source, sum(calls) AS calls, max(last_seen) AS last_seen,
                   substr(max(printf('%020d', last_seen) || char(31) || last_action || char(31) || last_reason), 22)
                       AS latest
            FROM (
                SELECT user_name, hour, origin, source, calls, last_seen, last_action, last_reason FROM stored_outside
                UNION ALL
                SELECT e.user_name, e.hour, e.origin, c.outside_source, e.calls, e.last_seen, c.action, c.reason
                FROM evidence_call e JOIN request_context c ON c.id = e.context
                WHERE c.verdict = 'would_deny'
            ) GROUP BY hour, user_name, origin, source
        );

    CREATE VIEW evidence_context (user_name, hour, origin, event_source, event_name, event_type, account, source_ip,
                                  endpoint, endpoint_account, invoked_by, s3_auth_method, calls, first_seen, last_seen) AS
        SELECT user_name, hour, origin, event_source, event_name, event_type, account, source_ip, endpoint,
               endpoint_account, invoked_by, s3_auth_method, sum(calls), min(first_seen), max(last_seen)
        FROM (
            SELECT user_name, hour, origin, event_source, event_name, event_type, account, source_ip, endpoint,
                   endpoint_account, invoked_by, s3_auth_method, calls, first_seen, last_seen
            FROM pending_context
            UNION ALL
            SELECT e.user_name, e.hour, e.origin, c.event_source, c.event_name, c.event_type, c.account, c.source_ip,
                   c.endpoint, c.endpoint_account, c.invoked_by, c.s3_auth_method, e.calls, e.first_seen, e.last_seen
            FROM evidence_call e JOIN request_context c ON c.id = e.context
        ) GROUP BY hour, user_name, origin, event_source, event_name, event_type, account, source_ip, endpoint,
                   endpoint_account, invoked_by, s3_auth_method;
";

/// The origin of trail-file contributions (folder or S3).
pub const TRAIL_ORIGIN: &str = "trail";
/// The origin of Athena query windows.
pub const ATHENA_ORIGIN: &str = "athena";

/// The evidence per user-hour, as tables and views (what [`Store::dump_evidence`] compares).
const EVIDENCE_TABLES: &[&str] = &["evidence_hour", "evidence_verdict", "evidence_outside", "evidence_context"];

/// The tables holding rows per user-hour (what replacing and dropping hours deletes from).
pub(super) const HOUR_TABLES: &[&str] =
    &["evidence_hour", "evidence_call", "stored_verdict", "stored_outside", "pending_context"];

/// A store's page cache, in KiB, when it is the only one open ([`Store::share_cache`]).
const CACHE_KIB: i64 = 65_536;

/// The SQLite store: the evidence and the rollout ledger in one database file.
pub struct Store {
    conn: Mutex<Connection>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").finish_non_exhaustive()
    }
}

/// A row of the refresh log, as the refresh fills it in.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct RunCounts {
    /// Trail files added.
    pub files: u64,
    /// Files that could not be read as a whole.
    pub files_corrupt: u64,
    /// Records read.
    pub records_read: u64,
    /// Records that could not be used.
    pub records_skipped: u64,
    /// Bytes read (compressed) or scanned by Athena.
    pub bytes_scanned: u64,
}

impl Store {
    /// Opens (creating if needed) the database at `path` and brings its schema up to date.
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        let doing = format!("opening the store {}", path.display());
        let conn = Connection::open(path).doing(&doing)?;
        Store::init(conn, &doing)
    }

    /// Opens the store of `account` at `path` ([`Store::open`]): a store claimed by no account
    /// (new, or written before accounts existed) is claimed for it; one claimed by another
    /// account is refused, so no account's ledger or evidence is ever read as another's.
    pub fn open_for_account(path: &Path, account: &str) -> Result<Store, StoreError> {
        let store = Store::open(path)?;
        store.claim_account(account, path)?;
        Ok(store)
    }

    fn claim_account(&self, account: &str, path: &Path) -> Result<(), StoreError> {
        let doing = format!("claiming the store {} for account {account}", path.display());
        let conn = self.conn();
        conn.execute("INSERT OR IGNORE INTO store_account (only, account) VALUES (1, ?1)", [account]).doing(&doing)?;
        let owner: String = conn.query_row("SELECT account FROM store_account", [], |row| row.get(0)).doing(&doing)?;
        if owner != account {
            return Err(StoreError::Refused(format!(
                "the store {} holds account {owner}'s rollout, not account {account}'s; check `account_id`, \
                 `accounts` and `store.path`",
                path.display()
            )));
        }
        Ok(())
    }

    /// The account the store belongs to, once claimed.
    pub fn account(&self) -> Result<Option<String>, StoreError> {
        self.conn()
            .query_row("SELECT account FROM store_account", [], |row| row.get(0))
            .optional()
            .doing("reading the store's account")
    }

    /// Opens the database at `path` for reading only: nothing is created, migrated or written.
    /// Refuses a store whose schema is not the current one (an older one needs the migration
    /// that opening it normally applies).
    pub fn open_read_only(path: &Path) -> Result<Store, StoreError> {
        let doing = format!("opening the store {} read-only", path.display());
        let conn = read_only_connection(path, &doing)?;
        let found = schema_version(&conn)?;
        if found != MIGRATIONS.len() as i64 {
            return Err(match usize::try_from(found) {
                Ok(applied) if applied > MIGRATIONS.len() => StoreError::TooNew { found, known: MIGRATIONS.len() },
                _ => StoreError::Refused(format!(
                    "{doing}: schema version {found}, this lockstep reads version {}; open it once with a \
                     command that writes (`lockstep evidence refresh`) to migrate it",
                    MIGRATIONS.len()
                )),
            });
        }
        Ok(Store { conn: Mutex::new(conn) })
    }

    /// A private, migrated copy of the store at `original`, written to the new file `copy`: the
    /// original is opened read-only and never written, so what-if questions change nothing.
    pub fn copy_of(original: &Path, copy: &Path) -> Result<Store, StoreError> {
        let doing = format!("copying the store {} to {}", original.display(), copy.display());
        let target = copy.to_str().ok_or_else(|| StoreError::Refused(format!("{doing}: the path is not UTF-8")))?;
        let conn = read_only_connection(original, &doing)?;
        // A consistent snapshot, even with the daemon writing.
        conn.execute("VACUUM INTO ?1", [target]).doing(&doing)?;
        drop(conn);
        Store::open(copy)
    }

    /// A private database in memory, for tests and dry runs.
    pub fn open_in_memory() -> Result<Store, StoreError> {
        let doing = "opening an in-memory store";
        Store::init(Connection::open_in_memory().doing(doing)?, doing)
    }

    fn init(mut conn: Connection, doing: &str) -> Result<Store, StoreError> {
        // Other processes (the CLI next to the daemon) wait for a lock instead of failing.
        conn.busy_timeout(Duration::from_secs(10)).doing(doing)?;
        conn.pragma_update(None, "journal_mode", "WAL").doing(doing)?;
        // WAL with NORMAL keeps every commit atomic; only the last commits may be lost on power loss.
        conn.pragma_update(None, "synchronous", "NORMAL").doing(doing)?;
        conn.pragma_update(None, "foreign_keys", "ON").doing(doing)?;
        // Up to 64 MiB of pages (2 MiB by default): the index that finds request contexts is
        // written at random places, and stays cached at hundreds of thousands of contexts.
        conn.pragma_update(None, "cache_size", -CACHE_KIB).doing(doing)?;
        migrate(&mut conn)?;
        Ok(Store { conn: Mutex::new(conn) })
    }

    /// Shares the page-cache budget one store has alone (64 MiB) among `stores` stores open in
    /// one process (a daemon of many accounts), at least 1 MiB each: the caches are resident
    /// memory, and a store's pages beyond its share are read from the OS's file cache instead.
    pub fn share_cache(&self, stores: usize) -> Result<(), StoreError> {
        let kib = (CACHE_KIB / stores.max(1) as i64).max(1024);
        self.conn().pragma_update(None, "cache_size", -kib).doing("sizing the store's page cache")
    }

    /// The connection, for other `impl Store` blocks in the crate. A panic while holding it
    /// cannot leave a transaction half-applied (rusqlite rolls back on drop), so a poisoned lock
    /// is still usable.
    pub(super) fn conn(&self) -> MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The schema version (number of migrations applied).
    pub fn schema_version(&self) -> Result<i64, StoreError> {
        schema_version(&self.conn())
    }
}

/// Writing evidence.
impl EvidenceWriter for Store {
    fn rejudge(&self, judge: &Judge, now: DateTime<Utc>) -> Result<Rejudged, StoreError> {
        super::rejudge::rejudge(self, judge, now)
    }

    fn begin_reread(&self, origin: &str) -> Result<Option<DateTime<Utc>>, StoreError> {
        super::rejudge::begin_reread(self, origin)
    }

    fn finish_reread(&self, origin: &str, from: DateTime<Utc>) -> Result<(), StoreError> {
        super::rejudge::finish_reread(self, origin, from)
    }

    /// Adds trail files' contributions and marks them read, all in one transaction. A file
    /// already marked (read by a concurrent refresh) adds nothing. Returns, per file, whether it
    /// was added.
    fn add_trail_files(&self, files: &[TrailFile], now: DateTime<Utc>) -> Result<Vec<bool>, StoreError> {
        let doing = match files {
            [one] => format!("recording trail file {}", one.key),
            _ => format!("recording {} trail files", files.len()),
        };
        let mut conn = self.conn();
        let tx = conn.transaction().doing(&doing)?;
        let mut added = Vec::with_capacity(files.len());
        // Consecutive files share most users and hours: merged, they write far fewer rows.
        let mut merged = Aggregates::default();
        {
            let mut mark = tx
                .prepare_cached(
                    "INSERT OR IGNORE INTO trail_file (key, read_at, records, skipped, bytes, newest_hour, error)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                )
                .doing(&doing)?;
            let mut seen =
                tx.prepare_cached("INSERT OR IGNORE INTO seen_event (hour, id) VALUES (?1, ?2)").doing(&doing)?;
            for file in files {
                let marked = mark
                    .execute(params![
                        file.key,
                        now.timestamp(),
                        file.records as i64,
                        file.skipped as i64,
                        file.bytes as i64,
                        file.aggregates.newest_hour().map(|h| h.timestamp()),
                        file.error,
                    ])
                    .doing(&doing)?
                    == 1;
                if marked {
                    merged.merge(&file.aggregates);
                    for event in &file.event_ids {
                        seen.execute(params![event.hour.timestamp(), event.id as i64]).doing(&doing)?;
                    }
                }
                added.push(marked);
            }
        }
        add_aggregates(&tx, TRAIL_ORIGIN, &merged).doing(&doing)?;
        bump_generation(&tx).doing(&doing)?;
        tx.commit().doing(&doing)?;
        Ok(added)
    }

    /// Replaces everything `origin` holds for the hours overlapping `[since, until)` with
    /// `aggregates` (hours outside that range are ignored), in one transaction.
    fn replace_hours(
        &self,
        origin: &str,
        since: DateTime<Utc>,
        until: DateTime<Utc>,
        aggregates: &Aggregates,
    ) -> Result<(), StoreError> {
        let doing = format!("replacing {origin} evidence from {since} to {until}");
        let (from, to) = (hour_of(since), until);
        let mut within = aggregates.clone();
        within.retain_hours(|h| h >= from && h < to);
        let mut conn = self.conn();
        let tx = conn.transaction().doing(&doing)?;
        for table in HOUR_TABLES {
            tx.execute(
                &format!("DELETE FROM {table} WHERE origin = ?1 AND hour >= ?2 AND hour < ?3"),
                params![origin, from.timestamp(), to.timestamp()],
            )
            .doing(&doing)?;
        }
        add_aggregates(&tx, origin, &within).doing(&doing)?;
        bump_generation(&tx).doing(&doing)?;
        tx.commit().doing(&doing)
    }

    /// The greatest key read under `prefix` (keys are `/`-separated; `prefix` ends with `/` or is
    /// empty).
    fn last_read(&self, prefix: &str) -> Result<Option<String>, StoreError> {
        let (low, high) = key_range(prefix);
        self.conn()
            .query_row(
                "SELECT max(key) FROM trail_file WHERE key >= ?1 AND (?2 IS NULL OR key < ?2)",
                params![low, high],
                |row| row.get(0),
            )
            .doing(&format!("finding the last trail file read under {prefix:?}"))
    }

    /// The keys read under `prefix` that sort after `after` (all of them when `None`).
    fn read_keys(&self, prefix: &str, after: Option<&str>) -> Result<HashSet<String>, StoreError> {
        let doing = format!("listing trail files read under {prefix:?}");
        let (low, high) = key_range(prefix);
        let conn = self.conn();
        let mut stmt = conn
            .prepare_cached(
                "SELECT key FROM trail_file WHERE key >= ?1 AND (?2 IS NULL OR key < ?2) AND (?3 IS NULL OR key > ?3)",
            )
            .doing(&doing)?;
        let keys = stmt
            .query_map(params![low, high, after], |row| row.get::<_, String>(0))
            .doing(&doing)?
            .collect::<Result<HashSet<_>, _>>()
            .doing(&doing)?;
        Ok(keys)
    }

    /// The events recorded with an `eventTime` in `[since, until)`, after dropping the others
    /// (older: past the dedup horizon; later: dated in the future, never to be pruned by age).
    fn recent_event_ids(&self, since: DateTime<Utc>, until: DateTime<Utc>) -> Result<HashSet<u64>, StoreError> {
        let doing = "reading recent event IDs";
        let mut conn = self.conn();
        let tx = conn.transaction().doing(doing)?;
        let (since, until) = (since.timestamp(), until.timestamp());
        tx.execute("DELETE FROM seen_event WHERE hour < ?1 OR hour >= ?2", [since, until]).doing(doing)?;
        let ids = {
            let mut stmt = tx.prepare("SELECT id FROM seen_event").doing(doing)?;
            stmt.query_map([], |r| r.get::<_, i64>(0).map(|id| id as u64))
                .doing(doing)?
                .collect::<Result<HashSet<u64>, _>>()
                .doing(doing)?
        };
        tx.commit().doing(doing)?;
        Ok(ids)
    }

    /// Drops evidence hours, read marks and refresh runs older than `cutoff`.
    fn drop_before(&self, cutoff: DateTime<Utc>) -> Result<(), StoreError> {
        let doing = format!("dropping evidence older than {cutoff}");
        let cutoff = cutoff.timestamp();
        let mut conn = self.conn();
        let tx = conn.transaction().doing(&doing)?;
        for table in HOUR_TABLES {
            tx.execute(&format!("DELETE FROM {table} WHERE hour < ?1"), [cutoff]).doing(&doing)?;
        }
        // A mark may go once all the file contributed is gone: were the file read again, its
        // hours would be dropped on write.
        tx.execute("DELETE FROM trail_file WHERE coalesce(newest_hour, read_at) < ?1", [cutoff]).doing(&doing)?;
        tx.execute("DELETE FROM refresh_run WHERE started < ?1 AND status != 'running'", [cutoff]).doing(&doing)?;
        bump_generation(&tx).doing(&doing)?;
        tx.commit().doing(&doing)
    }
}

/// The refresh log.
impl RefreshLog for Store {
    /// Records the start of a refresh; returns its ID for [`RefreshLog::finish_run`].
    fn start_run(
        &self,
        source: &str,
        since: DateTime<Utc>,
        until: DateTime<Utc>,
        now: DateTime<Utc>,
    ) -> Result<i64, StoreError> {
        let conn = self.conn();
        conn.execute(
            "INSERT INTO refresh_run (source, window_start, window_end, started, status) VALUES (?1, ?2, ?3, ?4, 'running')",
            params![source, since.timestamp(), until.timestamp(), now.timestamp()],
        )
        .doing("recording the start of a refresh")?;
        Ok(conn.last_insert_rowid())
    }

    /// Records how a refresh ended: `error` is `None` for success.
    fn finish_run(
        &self,
        id: i64,
        counts: &RunCounts,
        error: Option<&str>,
        now: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        self.conn()
            .execute(
                "UPDATE refresh_run SET finished = ?2, status = ?3, files = ?4, files_corrupt = ?5,
                 records_read = ?6, records_skipped = ?7, bytes_scanned = ?8, error = ?9 WHERE id = ?1",
                params![
                    id,
                    now.timestamp(),
                    if error.is_none() { "succeeded" } else { "failed" },
                    counts.files as i64,
                    counts.files_corrupt as i64,
                    counts.records_read as i64,
                    counts.records_skipped as i64,
                    counts.bytes_scanned as i64,
                    error,
                ],
            )
            .doing("recording the end of a refresh")?;
        Ok(())
    }

    /// The most recent refresh runs, newest first.
    fn recent_runs(&self, limit: usize) -> Result<Vec<Run>, StoreError> {
        let doing = "reading the refresh log";
        let conn = self.conn();
        let mut stmt = conn
            .prepare_cached(
                "SELECT source, window_start, window_end, started, finished, status, files, files_corrupt,
                        records_read, records_skipped, bytes_scanned, error
                 FROM refresh_run ORDER BY started DESC, id DESC LIMIT ?1",
            )
            .doing(doing)?;
        let rows = stmt
            .query_map([limit as i64], |row| {
                Ok((
                    row.get::<_, String>(0)?,
                    [row.get::<_, i64>(1)?, row.get(2)?, row.get(3)?],
                    row.get::<_, Option<i64>>(4)?,
                    row.get::<_, String>(5)?,
                    RunCounts {
                        files: row.get::<_, i64>(6)? as u64,
                        files_corrupt: row.get::<_, i64>(7)? as u64,
                        records_read: row.get::<_, i64>(8)? as u64,
                        records_skipped: row.get::<_, i64>(9)? as u64,
                        bytes_scanned: row.get::<_, i64>(10)? as u64,
                    },
                    row.get::<_, Option<String>>(11)?,
                ))
            })
            .doing(doing)?;
        rows.map(|row| {
            let (source, [since, until, started], finished, status, counts, error) = row.doing(doing)?;
            Ok(Run {
                source,
                since: time(since, doing)?,
                until: time(until, doing)?,
                started: time(started, doing)?,
                finished: finished.map(|t| time(t, doing)).transpose()?,
                status,
                counts,
                error,
            })
        })
        .collect()
    }
}

/// Reading evidence.
impl Store {
    /// Like [`EvidenceStore::user_evidence`], for one user or all.
    pub fn evidence(
        &self,
        since: DateTime<Utc>,
        until: DateTime<Utc>,
        user: Option<&str>,
    ) -> Result<Vec<UserEvidence>, StoreError> {
        self.read_evidence(since, until, user.as_ref().map(std::slice::from_ref))
    }

    /// Every user's evidence in `[since, until)`, or only that of `users`.
    fn read_evidence(
        &self,
        since: DateTime<Utc>,
        until: DateTime<Utc>,
        users: Option<&[&str]>,
    ) -> Result<Vec<UserEvidence>, StoreError> {
        let doing = format!("reading evidence from {since} to {until}");
        let doing = doing.as_str();
        let conn = self.conn();
        let mut window: Vec<rusqlite::types::Value> = vec![hour_of(since).timestamp().into(), until.timestamp().into()];
        // The evidence tables are keyed by hour, then user. Hours are stored whole (`hour_of`), so
        // some users' evidence is one seek per (hour, user) rather than a scan of everyone's hours.
        let (with, filter) = match users {
            None => ("", "hour >= ?1 AND hour < ?2"),
            Some(users) => {
                window.push(serde_json::Value::from(users.to_vec()).to_string().into());
                (
                    "WITH RECURSIVE window_hour (h) AS
                         (SELECT ?1 WHERE ?1 < ?2 UNION ALL SELECT h + 3600 FROM window_hour WHERE h + 3600 < ?2) ",
                    "hour IN (SELECT h FROM window_hour) AND user_name IN (SELECT value FROM json_each(?3))",
                )
            }
        };

        let mut users: BTreeMap<String, UserEvidence> = BTreeMap::new();
        let mut stmt = conn
            .prepare_cached(&format!(
                "{with}SELECT user_name, max(arn), min(first_call), max(last_call), sum(explicit_denials), sum(other_denials)
                 FROM evidence_hour WHERE {filter} GROUP BY user_name HAVING min(first_call) IS NOT NULL"
            ))
            .doing(doing)?;
        let mut rows = stmt.query(rusqlite::params_from_iter(&window)).doing(doing)?;
        while let Some(row) = rows.next().doing(doing)? {
            let user: String = row.get(0).doing(doing)?;
            users.insert(
                user.clone(),
                UserEvidence {
                    user,
                    arn: row.get(1).doing(doing)?,
                    first_call: time(row.get(2).doing(doing)?, doing)?,
                    last_call: time(row.get(3).doing(doing)?, doing)?,
                    calls: 0,
                    would_deny: 0,
                    last_outside: None,
                    outside_sources: Vec::new(),
                    explicit_denials: count(row.get(4).doing(doing)?),
                    other_denials: count(row.get(5).doing(doing)?),
                },
            );
        }

        // Verdicts stored as such (hours from before contexts were kept, or not re-judged since).
        let mut stmt = conn
            .prepare_cached(&format!(
                "{with}SELECT user_name, verdict, sum(calls) FROM stored_verdict
                 WHERE {filter} AND verdict != 'not_applicable' GROUP BY user_name, verdict"
            ))
            .doing(doing)?;
        let mut rows = stmt.query(rusqlite::params_from_iter(&window)).doing(doing)?;
        while let Some(row) = rows.next().doing(doing)? {
            let user: String = row.get(0).doing(doing)?;
            let verdict: String = row.get(1).doing(doing)?;
            let calls = count(row.get(2).doing(doing)?);
            if let Some(e) = users.get_mut(&user) {
                e.calls += calls;
                if verdict == "would_deny" {
                    e.would_deny += calls;
                }
            }
        }
        let mut sources: BTreeMap<(String, String), OutsideSource> = BTreeMap::new();
        let mut stmt = conn
            .prepare_cached(&format!(
                "{with}SELECT user_name, source, calls, last_seen, last_action, last_reason FROM stored_outside \
                 WHERE {filter}"
            ))
            .doing(doing)?;
        let mut rows = stmt.query(rusqlite::params_from_iter(&window)).doing(doing)?;
        while let Some(row) = rows.next().doing(doing)? {
            let user: String = row.get(0).doing(doing)?;
            let Some(e) = users.get_mut(&user) else { continue };
            let reason: String = row.get(5).doing(doing)?;
            let call = OutsideCall {
                at: time(row.get(3).doing(doing)?, doing)?,
                source: row.get(1).doing(doing)?,
                action: row.get(4).doing(doing)?,
                reason: deny_reason(&reason, doing)?,
            };
            let entry = sources.entry((user, call.source.clone())).or_insert(OutsideSource {
                source: call.source.clone(),
                calls: 0,
                last_seen: call.at,
            });
            entry.calls += count(row.get(2).doing(doing)?);
            entry.last_seen = entry.last_seen.max(call.at);
            keep_latest(&mut e.last_outside, call);
        }

        // Verdicts derived from the calls' contexts.
        let mut derived = Derived::default();
        {
            let mut context = conn
                .prepare_cached("SELECT verdict, reason, outside_source, action FROM request_context WHERE id = ?1")
                .doing(doing)?;
            let mut stmt = conn
                .prepare_cached(&format!(
                    "{with}SELECT user_name, context, calls, last_seen FROM evidence_call WHERE {filter}"
                ))
                .doing(doing)?;
            let mut rows = stmt.query(rusqlite::params_from_iter(&window)).doing(doing)?;
            let mut current: Option<usize> = None;
            let mut current_user = String::new();
            while let Some(row) = rows.next().doing(doing)? {
                let user = text(row, 0).doing(doing)?;
                if current.is_none() || user != current_user {
                    current_user.clear();
                    current_user.push_str(user);
                    current = Some(derived.user(user));
                }
                let id: i64 = row.get(1).doing(doing)?;
                let calls = count(row.get(2).doing(doing)?);
                let last_seen: i64 = row.get(3).doing(doing)?;
                let known = derived.context(id, &mut context).doing(doing)?;
                derived.add(current.unwrap_or_default(), known, calls, last_seen);
            }
        }
        for (user, index) in &derived.users {
            let Some(e) = users.get_mut(user) else { continue };
            let totals = &derived.totals[*index];
            e.calls += totals.calls;
            e.would_deny += totals.would_deny;
            for (source, calls, last_seen) in &totals.sources {
                let source = &derived.sources[*source];
                let last_seen = time(*last_seen, doing)?;
                let entry = sources.entry((user.clone(), source.clone())).or_insert(OutsideSource {
                    source: source.clone(),
                    calls: 0,
                    last_seen,
                });
                entry.calls += calls;
                entry.last_seen = entry.last_seen.max(last_seen);
            }
            if let Some((at, context)) = totals.latest {
                let context = &derived.contexts[context];
                let source = context.source.map(|s| derived.sources[s].clone()).unwrap_or_default();
                let call = OutsideCall {
                    at: time(at, doing)?,
                    source,
                    action: context.action.clone(),
                    reason: deny_reason(&context.reason, doing)?,
                };
                keep_latest(&mut e.last_outside, call);
            }
        }
        for ((user, _), source) in sources {
            if let Some(e) = users.get_mut(&user) {
                e.outside_sources.push(source);
            }
        }
        let mut evidence: Vec<UserEvidence> = users.into_values().filter(|e| e.calls > 0).collect();
        for e in &mut evidence {
            e.outside_sources.sort_by(|a, b| {
                b.calls.cmp(&a.calls).then(b.last_seen.cmp(&a.last_seen)).then(a.source.cmp(&b.source))
            });
        }
        Ok(evidence)
    }

    /// The evidence as canonical text: every evidence row and read mark (without the time it
    /// was read), sorted. Two stores with equal dumps hold the same evidence.
    pub fn dump_evidence(&self) -> Result<String, StoreError> {
        let mut out = String::new();
        for table in EVIDENCE_TABLES {
            out.push_str(&self.dump_query(table, &format!("SELECT * FROM {table}"))?);
        }
        out.push_str(
            &self
                .dump_query("trail_file", "SELECT key, records, skipped, bytes, newest_hour, error FROM trail_file")?,
        );
        Ok(out)
    }

    /// The rows of `query` as sorted lines, under a `[title]` header: for comparing store
    /// contents in tests.
    pub fn dump_query(&self, title: &str, query: &str) -> Result<String, StoreError> {
        let doing = format!("dumping {title}");
        let conn = self.conn();
        let mut stmt = conn.prepare(query).doing(&doing)?;
        let columns = stmt.column_count();
        let mut lines = stmt
            .query_map([], |row| {
                (0..columns)
                    .map(|i| {
                        Ok(match row.get_ref(i)? {
                            rusqlite::types::ValueRef::Null => "NULL".to_string(),
                            rusqlite::types::ValueRef::Integer(n) => n.to_string(),
                            rusqlite::types::ValueRef::Real(x) => x.to_string(),
                            rusqlite::types::ValueRef::Text(t) => format!("{:?}", String::from_utf8_lossy(t)),
                            rusqlite::types::ValueRef::Blob(b) => format!("blob:{}", b.len()),
                        })
                    })
                    .collect::<Result<Vec<_>, rusqlite::Error>>()
                    .map(|cells| cells.join("|"))
            })
            .doing(&doing)?
            .collect::<Result<Vec<_>, _>>()
            .doing(&doing)?;
        lines.sort();
        Ok(format!("[{title}]\n{}\n", lines.join("\n")))
    }
}

/// A refresh as the log recorded it.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Run {
    /// The source's name (`files`, `s3`, `athena`).
    pub source: String,
    /// The first instant of the window.
    pub since: DateTime<Utc>,
    /// The first instant after the window.
    pub until: DateTime<Utc>,
    /// When the run started.
    pub started: DateTime<Utc>,
    /// When it ended, if it did.
    pub finished: Option<DateTime<Utc>>,
    /// `running` (or interrupted), `succeeded` or `failed`.
    pub status: String,
    /// What it read and recorded.
    pub counts: RunCounts,
    /// Why it failed, if it did.
    pub error: Option<String>,
}

impl EvidenceStore for Store {
    type Error = StoreError;

    fn user_evidence(&self, since: DateTime<Utc>, until: DateTime<Utc>) -> Result<Vec<UserEvidence>, StoreError> {
        self.evidence(since, until, None)
    }

    fn evidence_of(
        &self,
        user: &str,
        since: DateTime<Utc>,
        until: DateTime<Utc>,
    ) -> Result<Option<UserEvidence>, StoreError> {
        Ok(self.evidence(since, until, Some(user))?.into_iter().next())
    }

    fn evidence_of_users(
        &self,
        users: &[String],
        since: DateTime<Utc>,
        until: DateTime<Utc>,
    ) -> Result<Vec<UserEvidence>, StoreError> {
        let users: Vec<&str> = users.iter().map(String::as_str).collect();
        self.read_evidence(since, until, Some(&users))
    }

    fn evidence_generation(&self) -> Result<u64, StoreError> {
        let doing = "reading the evidence generation";
        let generation: i64 =
            self.conn().query_row("SELECT generation FROM evidence_generation", [], |row| row.get(0)).doing(doing)?;
        Ok(generation as u64)
    }

    /// One user's calls in `[since, until)` by verdict and reason, most calls first.
    fn verdict_counts(
        &self,
        user: &str,
        since: DateTime<Utc>,
        until: DateTime<Utc>,
    ) -> Result<Vec<(Verdict, u64)>, StoreError> {
        let doing = format!("reading {user}'s calls by verdict");
        let doing = doing.as_str();
        let conn = self.conn();
        let mut stmt = conn
            .prepare_cached(
                "SELECT verdict, reason, sum(calls) AS n FROM (
                     SELECT verdict, reason, calls FROM stored_verdict WHERE user_name = ?1 AND hour >= ?2 AND hour < ?3
                     UNION ALL
                     SELECT c.verdict, c.reason, e.calls FROM evidence_call e JOIN request_context c ON c.id = e.context
                     WHERE e.user_name = ?1 AND e.hour >= ?2 AND e.hour < ?3
                 ) GROUP BY verdict, reason ORDER BY n DESC, verdict, reason",
            )
            .doing(doing)?;
        let mut rows = stmt.query(params![user, hour_of(since).timestamp(), until.timestamp()]).doing(doing)?;
        let mut counts = Vec::new();
        while let Some(row) = rows.next().doing(doing)? {
            let kind: String = row.get(0).doing(doing)?;
            let reason: String = row.get(1).doing(doing)?;
            let verdict = verdict_from_names(&kind, &reason).ok_or_else(|| StoreError::Corrupt {
                doing: doing.to_string(),
                what: format!("verdict {kind}/{reason}"),
            })?;
            counts.push((verdict, count(row.get(2).doing(doing)?)));
        }
        Ok(counts)
    }

    fn freshness(&self) -> Result<Freshness, StoreError> {
        let doing = "reading evidence freshness";
        let (finished, covered): (Option<i64>, Option<i64>) = self
            .conn()
            .query_row("SELECT max(finished), max(window_end) FROM refresh_run WHERE status = 'succeeded'", [], |row| {
                Ok((row.get(0)?, row.get(1)?))
            })
            .doing(doing)?;
        let conn = self.conn();
        let judged_under: Option<String> =
            conn.query_row("SELECT fingerprint FROM evidence_judged", [], |row| row.get(0)).optional().doing(doing)?;
        let judged_under = judged_under
            .map(|text| {
                Fingerprint::try_from(text).map_err(|what| StoreError::Corrupt { doing: doing.to_string(), what })
            })
            .transpose()?;
        let legacy_hours: i64 = conn
            .query_row("SELECT count(*) FROM evidence_hour WHERE needs_reread = 1", [], |row| row.get(0))
            .doing(doing)?;
        Ok(Freshness {
            last_success: finished.map(|t| time(t, doing)).transpose()?,
            covered_until: covered.map(|t| time(t, doing)).transpose()?,
            judged_under,
            legacy_hours: count(Some(legacy_hours)),
        })
    }
}

fn schema_version(conn: &Connection) -> Result<i64, StoreError> {
    conn.query_row("PRAGMA user_version", [], |row| row.get(0)).doing("reading the store's schema version")
}

fn migrate(conn: &mut Connection) -> Result<(), StoreError> {
    let found = schema_version(conn)?;
    let applied = usize::try_from(found).unwrap_or(usize::MAX);
    if applied > MIGRATIONS.len() {
        return Err(StoreError::TooNew { found, known: MIGRATIONS.len() });
    }
    for (index, sql) in MIGRATIONS.iter().enumerate().skip(applied) {
        let version = index + 1;
        let doing = format!("migrating the store to schema version {version}");
        // IMMEDIATE takes the write lock first, so two processes opening a new store do not
        // both apply the same migration.
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate).doing(&doing)?;
        let current: i64 = tx.query_row("PRAGMA user_version", [], |row| row.get(0)).doing(&doing)?;
        if current >= version as i64 {
            continue;
        }
        tx.execute_batch(sql).doing(&doing)?;
        tx.pragma_update(None, "user_version", version as i64).doing(&doing)?;
        tx.commit().doing(&doing)?;
    }
    Ok(())
}

/// Adds `aggregates` to `origin`'s rows, summing counts; each request context is stored once,
/// with its judgement when it is new.
fn add_aggregates(tx: &Transaction<'_>, origin: &str, aggregates: &Aggregates) -> rusqlite::Result<()> {
    let mut hour_stmt = tx.prepare_cached(
        "INSERT INTO evidence_hour (user_name, hour, origin, arn, first_call, last_call, explicit_denials, other_denials)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)
         ON CONFLICT (hour, user_name, origin) DO UPDATE SET
             arn = max(coalesce(arn, excluded.arn), coalesce(excluded.arn, arn)),
             first_call = min(coalesce(first_call, excluded.first_call), coalesce(excluded.first_call, first_call)),
             last_call = max(coalesce(last_call, excluded.last_call), coalesce(excluded.last_call, last_call)),
             explicit_denials = explicit_denials + excluded.explicit_denials,
             other_denials = other_denials + excluded.other_denials",
    )?;
    let mut contexts = Contexts::new(tx)?;
    for (user, hour, agg) in aggregates.iter() {
        let hour = hour.timestamp();
        hour_stmt.execute(params![
            user,
            hour,
            origin,
            agg.arn,
            agg.first_call.map(|t| t.timestamp()),
            agg.last_call.map(|t| t.timestamp()),
            agg.explicit_denials as i64,
            agg.other_denials as i64,
        ])?;
        for (context, seen) in &agg.contexts {
            let id = contexts.id(context, |c| aggregates.judgement(c).cloned())?;
            contexts.add_calls(hour, user, origin, id, seen.calls, seen.first.timestamp(), seen.last.timestamp())?;
        }
    }
    Ok(())
}

/// The stored request contexts (`request_context`) by their columns, and the calls that refer
/// to them (`evidence_call`), within one transaction.
pub(super) struct Contexts<'c> {
    conn: &'c Connection,
    find: CachedStatement<'c>,
    insert: CachedStatement<'c>,
    calls: CachedStatement<'c>,
    ids: HashMap<RequestContext, i64>,
}

impl<'c> Contexts<'c> {
    pub(super) fn new(conn: &'c Connection) -> rusqlite::Result<Contexts<'c>> {
        Ok(Contexts {
            conn,
            find: conn.prepare_cached(
                "SELECT id, event_source, event_name, event_type, account, source_ip, endpoint, endpoint_account,
                        invoked_by, s3_auth_method
                 FROM request_context WHERE key = ?1",
            )?,
            insert: conn.prepare_cached(
                "INSERT INTO request_context (key, event_source, event_name, event_type, account, source_ip, endpoint,
                     endpoint_account, invoked_by, s3_auth_method, verdict, reason, applicable, outside_source, action)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15)",
            )?,
            calls: conn.prepare_cached(
                "INSERT INTO evidence_call (hour, user_name, origin, context, calls, first_seen, last_seen)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
                 ON CONFLICT (hour, user_name, origin, context) DO UPDATE SET
                     calls = calls + excluded.calls,
                     first_seen = min(first_seen, excluded.first_seen),
                     last_seen = max(last_seen, excluded.last_seen)",
            )?,
            ids: HashMap::new(),
        })
    }

    /// The ID of `context`, stored with its judgement (`judge` answers it) when new. A stored
    /// context keeps its judgement: every stored one is judged under the same perimeter, the
    /// one the evidence is stamped with, and a re-judgement changes them all together.
    pub(super) fn id(
        &mut self,
        context: &RequestContext,
        judge: impl FnOnce(&RequestContext) -> Option<JudgedContext>,
    ) -> rusqlite::Result<i64> {
        if let Some(&id) = self.ids.get(context) {
            return Ok(id);
        }
        let c = context;
        let key = context_key(c);
        let mut found = None;
        let mut rows = self.find.query([key])?;
        while let Some(row) = rows.next()? {
            let mut same = true;
            for (i, column) in c.columns().into_iter().enumerate() {
                same &= text(row, i + 1)? == column;
            }
            if same {
                found = Some(row.get(0)?);
                break;
            }
        }
        drop(rows);
        let id = match found {
            Some(id) => id,
            None => {
                let judged = judge(context).ok_or_else(|| {
                    rusqlite::Error::ToSqlConversionFailure(
                        format!("request context {context:?} was not judged").into(),
                    )
                })?;
                self.insert.execute(params![
                    key,
                    c.event_source,
                    c.event_name,
                    c.event_type,
                    c.account,
                    c.source_ip,
                    c.endpoint,
                    c.endpoint_account,
                    c.invoked_by,
                    c.s3_auth_method,
                    judged.verdict.kind_name(),
                    judged.verdict.reason_name(),
                    !matches!(judged.verdict, Verdict::NotApplicable(_)),
                    judged.outside_source,
                    judged.action,
                ])?;
                self.conn.last_insert_rowid()
            }
        };
        self.ids.insert(context.clone(), id);
        Ok(id)
    }

    /// Adds `calls` with the context `context` (an ID) to a user-hour of `origin`.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn add_calls(
        &mut self,
        hour: i64,
        user: &str,
        origin: &str,
        context: i64,
        calls: u64,
        first_seen: i64,
        last_seen: i64,
    ) -> rusqlite::Result<()> {
        self.calls.execute(params![hour, user, origin, context, calls as i64, first_seen, last_seen])?;
        Ok(())
    }
}

/// The latest of two calls from outside: by time, then source, action and reason (so that the
/// answer does not depend on the order rows are read in).
fn keep_latest(latest: &mut Option<OutsideCall>, call: OutsideCall) {
    let key = |c: &OutsideCall| (c.at, c.source.clone(), c.action.clone(), c.reason.as_str());
    if latest.as_ref().is_none_or(|l| key(&call) > key(l)) {
        *latest = Some(call);
    }
}

/// A read-only connection to the store at `path` that waits out a writer's lock (the daemon's).
fn read_only_connection(path: &Path, doing: &str) -> Result<Connection, StoreError> {
    use rusqlite::OpenFlags;
    let flags = OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_URI | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let conn = Connection::open_with_flags(path, flags).doing(doing)?;
    conn.busy_timeout(Duration::from_secs(10)).doing(doing)?;
    Ok(conn)
}

fn deny_reason(name: &str, doing: &str) -> Result<DenyReason, StoreError> {
    DenyReason::from_name(name)
        .ok_or_else(|| StoreError::Corrupt { doing: doing.to_string(), what: format!("deny reason {name:?}") })
}

/// A stable 64-bit hash (FNV-1a) of a request context's columns, each ended by a separator: what
/// `request_context` finds a context by (equal keys are told apart by their columns).
pub(super) fn context_key(c: &RequestContext) -> i64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for column in c.columns() {
        for byte in column.bytes().chain(std::iter::once(0x1f)) {
            hash ^= u64::from(byte);
            hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    hash as i64
}

/// What [`Store::evidence`] sums from the calls that refer to stored contexts, per user.
#[derive(Default)]
struct Derived {
    /// Each user's index in `totals`.
    users: HashMap<String, usize>,
    totals: Vec<DerivedTotals>,
    /// The contexts read so far (by ID: their index in `contexts`).
    known: HashMap<i64, usize>,
    contexts: Vec<KnownContext>,
    /// Outside sources, each once; [`KnownContext::source`] indexes it.
    sources: Vec<String>,
    source_index: HashMap<String, usize>,
}

/// A stored context's judgement, as [`Store::evidence`] needs it.
struct KnownContext {
    applicable: bool,
    would_deny: bool,
    /// Where from, when the policy would deny it (an index in [`Derived::sources`]).
    source: Option<usize>,
    action: String,
    reason: String,
}

/// One user's calls, summed from their contexts.
#[derive(Default)]
struct DerivedTotals {
    calls: u64,
    would_deny: u64,
    /// Per outside source (an index in [`Derived::sources`]): calls and the latest, in seconds.
    sources: Vec<(usize, u64, i64)>,
    /// The latest call from outside: when, in seconds, and its context (an index).
    latest: Option<(i64, usize)>,
}

impl Derived {
    fn user(&mut self, user: &str) -> usize {
        if let Some(&index) = self.users.get(user) {
            return index;
        }
        self.totals.push(DerivedTotals::default());
        self.users.insert(user.to_string(), self.totals.len() - 1);
        self.totals.len() - 1
    }

    /// The context with ID `id`, read with `stmt` the first time.
    fn context(&mut self, id: i64, stmt: &mut CachedStatement<'_>) -> rusqlite::Result<usize> {
        if let Some(&index) = self.known.get(&id) {
            return Ok(index);
        }
        let (verdict, reason, source, action): (String, String, Option<String>, String) =
            stmt.query_row([id], |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?)))?;
        let source = source.map(|source| self.source(&source));
        let would_deny = verdict == "would_deny";
        // A denied call always has a source; were one missing, it is named as the rule names it.
        let source = match source {
            None if would_deny => Some(self.source("(no source)")),
            source => source,
        };
        self.contexts.push(KnownContext {
            applicable: verdict != "not_applicable",
            would_deny,
            source: source.filter(|_| would_deny),
            action,
            reason,
        });
        self.known.insert(id, self.contexts.len() - 1);
        Ok(self.contexts.len() - 1)
    }

    fn source(&mut self, source: &str) -> usize {
        if let Some(&index) = self.source_index.get(source) {
            return index;
        }
        self.sources.push(source.to_string());
        self.source_index.insert(source.to_string(), self.sources.len() - 1);
        self.sources.len() - 1
    }

    fn add(&mut self, user: usize, context: usize, calls: u64, last_seen: i64) {
        let known = &self.contexts[context];
        let Some(totals) = self.totals.get_mut(user) else { return };
        if !known.applicable {
            return;
        }
        totals.calls += calls;
        if !known.would_deny {
            return;
        }
        totals.would_deny += calls;
        let source = known.source.unwrap_or_default();
        match totals.sources.iter_mut().find(|(s, _, _)| *s == source) {
            Some((_, sum, last)) => {
                *sum += calls;
                *last = (*last).max(last_seen);
            }
            None => totals.sources.push((source, calls, last_seen)),
        }
        let later = match totals.latest {
            None => true,
            Some((at, _)) if last_seen != at => last_seen > at,
            Some((_, other)) => {
                fn key<'a>(sources: &'a [String], c: &'a KnownContext) -> (Option<&'a str>, &'a str, &'a str) {
                    (c.source.map(|s| sources[s].as_str()), c.action.as_str(), c.reason.as_str())
                }
                key(&self.sources, known) > key(&self.sources, &self.contexts[other])
            }
        };
        if later {
            totals.latest = Some((last_seen, context));
        }
    }
}

fn verdict_from_names(kind: &str, reason: &str) -> Option<Verdict> {
    match kind {
        "allowed" => AllowReason::from_name(reason).map(Verdict::Allowed),
        "would_deny" => DenyReason::from_name(reason).map(Verdict::WouldDeny),
        "not_applicable" => SkipReason::from_name(reason).map(Verdict::NotApplicable),
        _ => None,
    }
}

/// `[prefix, next prefix)`: the key range under a prefix (unbounded above for "").
fn key_range(prefix: &str) -> (String, Option<String>) {
    let mut chars: Vec<char> = prefix.chars().collect();
    let high = chars.pop().map(|last| {
        let next = char::from_u32(last as u32 + 1).unwrap_or(char::MAX);
        chars.iter().chain(std::iter::once(&next)).collect()
    });
    (prefix.to_string(), high)
}

pub(super) fn time(seconds: i64, doing: &str) -> Result<DateTime<Utc>, StoreError> {
    DateTime::from_timestamp(seconds, 0)
        .ok_or_else(|| StoreError::Corrupt { doing: doing.to_string(), what: format!("timestamp {seconds}") })
}

/// Column `index` of `row` as text, borrowed.
pub(super) fn text<'r>(row: &'r rusqlite::Row<'_>, index: usize) -> rusqlite::Result<&'r str> {
    use rusqlite::types::{Type, ValueRef};
    match row.get_ref(index)? {
        ValueRef::Text(bytes) => std::str::from_utf8(bytes)
            .map_err(|e| rusqlite::Error::FromSqlConversionFailure(index, Type::Text, Box::new(e))),
        other => Err(rusqlite::Error::InvalidColumnType(index, format!("column {index}"), other.data_type())),
    }
}

/// SQLite sums are signed; counts are never negative.
pub(super) fn count(sum: Option<i64>) -> u64 {
    sum.and_then(|n| u64::try_from(n).ok()).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::evidence::CallGroup;
    use crate::evidence::aggregate::{Judge, aggregate};
    use crate::testkit;

    fn judge() -> Judge {
        Judge { perimeter: testkit::perimeter(), lockdown_policy: "lockstep".into() }
    }

    fn at(text: &str) -> DateTime<Utc> {
        text.parse().unwrap()
    }

    /// A call to s3:ListBuckets, refused by an explicit identity-based deny when `denied`.
    fn call(user: &str, time: &str, source: &str, denied: bool) -> CallGroup {
        let mut call = testkit::user_call(user, time, source, "s3:ListBuckets");
        if denied {
            call.record.error_code = Some("AccessDenied".into());
            call.record.error_message = Some("... with an explicit deny in an identity-based policy".into());
        }
        call
    }

    fn file(key: &str, groups: &[CallGroup]) -> TrailFile {
        TrailFile {
            key: key.into(),
            bytes: 100,
            records: groups.len() as u64,
            aggregates: aggregate(groups, &judge()),
            ..TrailFile::default()
        }
    }

    #[test]
    fn a_store_written_before_migration_3_migrates_in_place() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("old.db");
        {
            // The schema as lockstep wrote it before migration 3 (shipped migrations never change).
            let conn = Connection::open(&path).unwrap();
            conn.execute_batch(MIGRATIONS[0]).unwrap();
            conn.execute_batch(MIGRATIONS[1]).unwrap();
            conn.pragma_update(None, "user_version", 2).unwrap();
            conn.execute_batch(
                "INSERT INTO batches (wave, state, created_at, verdict) VALUES ('canary', 'soaking', 0, 'healthy: 0 denials');
                 INSERT INTO batches (wave, state, created_at) VALUES ('canary', 'applying', 0);
                 INSERT INTO batch_members (batch, user) VALUES (1, 'ann');
                 INSERT INTO members (user, state, batch, since) VALUES ('ann', 'locked', 1, 0);",
            )
            .unwrap();
        }
        let store = Store::open(&path).unwrap();
        assert_eq!(store.schema_version().unwrap(), MIGRATIONS.len() as i64);
        let snapshot = crate::store::Ledger::snapshot(&store).unwrap();
        assert_eq!(snapshot.members["ann"].state, crate::rollout::UserState::Locked);
        let kinds: Vec<_> = snapshot.batches.iter().map(|b| (b.soak, b.verdict_kind)).collect();
        assert_eq!(kinds, [(None, Some(crate::guard::VerdictKind::Healthy)), (None, None)]);
    }

    #[test]
    fn a_store_of_the_previous_schema_becomes_its_accounts_store_in_place_and_no_other_accounts() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("lockstep.db");
        {
            // A store as the single-account lockstep wrote it (every migration before accounts).
            let mut conn = Connection::open(&path).unwrap();
            let tx = conn.transaction().unwrap();
            for sql in &MIGRATIONS[..MIGRATIONS.len() - 1] {
                tx.execute_batch(sql).unwrap();
            }
            tx.pragma_update(None, "user_version", MIGRATIONS.len() - 1).unwrap();
            tx.execute_batch(
                "INSERT INTO batches (wave, state, created_at) VALUES ('canary', 'soaking', 0);
                 INSERT INTO batch_members (batch, user) VALUES (1, 'alice');
                 INSERT INTO members (user, state, batch, since) VALUES ('alice', 'locked', 1, 0);",
            )
            .unwrap();
            tx.commit().unwrap();
        }
        let store = Store::open_for_account(&path, "123456789012").unwrap();
        assert_eq!(store.schema_version().unwrap(), MIGRATIONS.len() as i64);
        assert_eq!(store.account().unwrap().as_deref(), Some("123456789012"));
        let snapshot = crate::store::Ledger::snapshot(&store).unwrap();
        assert_eq!(snapshot.members["alice"].state, crate::rollout::UserState::Locked, "the ledger is intact");
        drop(store);
        assert!(Store::open_for_account(&path, "123456789012").is_ok(), "its own account opens it again");
        let refused = Store::open_for_account(&path, "111122223333").unwrap_err().to_string();
        assert!(refused.contains("holds account 123456789012's rollout, not account 111122223333's"), "{refused}");
    }

    #[test]
    fn a_store_written_before_migration_4_keeps_its_evidence_marked_for_a_reread() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v3.db");
        let now = at("2024-01-03T00:00:00Z");
        {
            // A store at schema version 3 holding verdicts, as lockstep wrote them before
            // migration 4 (shipped migrations never change).
            let conn = Connection::open(&path).unwrap();
            for sql in &MIGRATIONS[..3] {
                conn.execute_batch(sql).unwrap();
            }
            conn.pragma_update(None, "user_version", 3).unwrap();
            conn.execute_batch(
                "INSERT INTO evidence_hour VALUES ('alice', 1704189600, 'trail', NULL, 1704189600, 1704189700, 0, 0);
                 INSERT INTO evidence_verdict VALUES ('alice', 1704189600, 'trail', 'allowed', 'trusted_cidr', 25);
                 INSERT INTO refresh_run (source, window_start, window_end, started, finished, status)
                     VALUES ('files', 1704100000, 1704240000, 1704240000, 1704240000, 'succeeded');",
            )
            .unwrap();
        }
        let store = Store::open(&path).unwrap();
        assert_eq!(store.schema_version().unwrap(), MIGRATIONS.len() as i64);
        let fresh = store.freshness().unwrap();
        assert_eq!((fresh.judged_under, fresh.legacy_hours), (None, 1));
        // Its verdicts are kept (nothing is guessed) but cannot be re-judged: they stay marked.
        store
            .add_trail_files(&[file("new", &[call("bob", "2024-01-02T11:00:00Z", "203.0.113.5", false)])], now)
            .unwrap();
        let rejudged = store.rejudge(&judge(), now).unwrap();
        assert_eq!(rejudged.hours, 1, "only bob's hour has contexts");
        let fresh = store.freshness().unwrap();
        assert_eq!((fresh.judged_under, fresh.legacy_hours), (Some(judge().perimeter.fingerprint()), 1));
        let alice = store.evidence(at("2024-01-02T00:00:00Z"), now, Some("alice")).unwrap();
        assert_eq!(alice[0].calls, 25);
        let config =
            crate::config::Config::parse(include_str!("../../rollout.yaml"), Path::new("rollout.yaml")).unwrap();
        let stamped = Freshness { judged_under: Some(config.perimeter.fingerprint()), ..fresh };
        let problem = crate::planner::evidence_problem(&stamped, &config, at("2024-01-03T00:30:00Z")).unwrap();
        assert!(problem.contains("1 user-hours") && problem.contains("re-read"), "{problem}");
    }

    #[test]
    fn migrations_run_once_and_a_newer_store_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.db");
        let store = Store::open(&path).unwrap();
        assert_eq!(store.schema_version().unwrap(), MIGRATIONS.len() as i64);
        let mode: String = store.conn().query_row("PRAGMA journal_mode", [], |r| r.get(0)).unwrap();
        assert_eq!(mode, "wal");
        drop(store);
        let store = Store::open(&path).unwrap();
        assert_eq!(store.schema_version().unwrap(), MIGRATIONS.len() as i64);
        store.conn().pragma_update(None, "user_version", 999).unwrap();
        drop(store);
        let err = Store::open(&path).unwrap_err();
        assert!(matches!(err, StoreError::TooNew { found: 999, .. }), "{err}");
    }

    #[test]
    fn a_file_is_added_once_and_evidence_sums_files() {
        let store = Store::open_in_memory().unwrap();
        let now = at("2024-01-03T00:00:00Z");
        let a = file(
            "AWSLogs/1/a.json.gz",
            &[
                call("alice", "2024-01-02T10:00:00Z", "203.0.113.5", false),
                call("alice", "2024-01-02T10:10:00Z", "198.51.100.7", false),
            ],
        );
        let b = file(
            "AWSLogs/1/b.json.gz",
            &[
                call("alice", "2024-01-02T10:20:00Z", "198.51.100.7", true),
                call("alice", "2024-01-02T11:30:00Z", "198.51.100.8", false),
            ],
        );
        assert_eq!(store.add_trail_files(std::slice::from_ref(&a), now).unwrap(), [true]);
        let once = store.dump_evidence().unwrap();
        assert_eq!(store.add_trail_files(&[a.clone(), b.clone()], now).unwrap(), [false, true], "a is not added twice");
        let both = store.dump_evidence().unwrap();
        let separately = Store::open_in_memory().unwrap();
        separately.add_trail_files(&[b], now).unwrap();
        separately.add_trail_files(&[a], now).unwrap();
        assert_eq!(separately.dump_evidence().unwrap(), both, "batches and order do not matter");
        assert_ne!(once, both);

        let all = store.user_evidence(at("2024-01-02T00:00:00Z"), now).unwrap();
        assert_eq!(all.len(), 1);
        let e = &all[0];
        assert_eq!((e.calls, e.would_deny, e.explicit_denials, e.other_denials), (4, 3, 1, 0));
        assert_eq!(e.first_call, at("2024-01-02T10:00:00Z"));
        assert_eq!(e.last_call, at("2024-01-02T11:30:00Z"));
        let last = e.last_outside.as_ref().unwrap();
        assert_eq!((last.source.as_str(), last.at), ("198.51.100.8", at("2024-01-02T11:30:00Z")));
        let top: Vec<_> = e.outside_sources.iter().map(|s| (s.source.as_str(), s.calls)).collect();
        assert_eq!(top, vec![("198.51.100.7", 2), ("198.51.100.8", 1)]);

        // The window is by hour: 11:00 onwards sees only the last call.
        let late = store.evidence(at("2024-01-02T11:00:00Z"), now, Some("alice")).unwrap();
        assert_eq!(late[0].calls, 1);
        assert!(store.evidence(at("2024-01-02T00:00:00Z"), now, Some("bob")).unwrap().is_empty());
        let verdicts = store.verdict_counts("alice", at("2024-01-02T00:00:00Z"), now).unwrap();
        assert_eq!(verdicts[0], (Verdict::WouldDeny(DenyReason::UntrustedIp), 3));
    }

    #[test]
    fn contexts_whose_keys_collide_are_told_apart_by_their_columns() {
        let store = Store::open_in_memory().unwrap();
        let now = at("2024-01-03T00:00:00Z");
        let office = call("alice", "2024-01-02T10:00:00Z", "203.0.113.5", false);
        let key = context_key(&RequestContext::of(&office.record));
        // Another context already stored under the same key (a hash collision), judged otherwise.
        store
            .conn()
            .execute(
                "INSERT INTO request_context (key, event_source, event_name, event_type, account, source_ip,
                     endpoint, endpoint_account, invoked_by, s3_auth_method, verdict, reason, applicable,
                     outside_source, action)
                 VALUES (?1, 'x', 'x', 'x', 'x', 'x', '', '', '', '', 'would_deny', 'untrusted_ip', 1, 'x', 'x:x')",
                [key],
            )
            .unwrap();
        store.add_trail_files(&[file("f", &[office])], now).unwrap();
        let e = &store.evidence(at("2024-01-02T00:00:00Z"), now, Some("alice")).unwrap()[0];
        assert_eq!((e.calls, e.would_deny), (1, 0));
        let under: i64 = store
            .conn()
            .query_row("SELECT count(*) FROM request_context WHERE key = ?1", [key], |row| row.get(0))
            .unwrap();
        assert_eq!(under, 2);
    }

    #[test]
    fn read_marks_are_found_by_prefix() {
        let store = Store::open_in_memory().unwrap();
        let now = at("2024-01-03T00:00:00Z");
        for key in ["a/2024/01/02/x1", "a/2024/01/02/x2", "a/2024/01/020", "a/2024/01/03/x0", "b/x"] {
            store.add_trail_files(&[file(key, &[])], now).unwrap();
        }
        assert_eq!(store.last_read("a/2024/01/02/").unwrap().as_deref(), Some("a/2024/01/02/x2"));
        assert_eq!(store.last_read("a/2024/01/04/").unwrap(), None);
        assert_eq!(store.last_read("").unwrap().as_deref(), Some("b/x"));
        let after = store.read_keys("a/2024/01/02/", Some("a/2024/01/02/x1")).unwrap();
        assert_eq!(after, HashSet::from(["a/2024/01/02/x2".to_string()]));
        assert_eq!(store.read_keys("a/", None).unwrap().len(), 4);
    }

    #[test]
    fn replacing_hours_touches_only_that_origin_and_window() {
        let store = Store::open_in_memory().unwrap();
        let now = at("2024-01-03T00:00:00Z");
        store
            .add_trail_files(&[file("f", &[call("alice", "2024-01-02T10:00:00Z", "203.0.113.5", false)])], now)
            .unwrap();
        let athena = |n: usize| {
            let groups: Vec<_> = (0..n).map(|_| call("alice", "2024-01-02T10:30:00Z", "203.0.113.5", false)).collect();
            let mut early = groups.clone();
            early.push(call("alice", "2024-01-02T08:00:00Z", "203.0.113.5", false));
            aggregate(&early, &judge())
        };
        let window = (at("2024-01-02T10:15:00Z"), at("2024-01-02T11:00:00Z"));
        store.replace_hours("athena", window.0, window.1, &athena(5)).unwrap();
        store.replace_hours("athena", window.0, window.1, &athena(2)).unwrap();
        let e = store.user_evidence(at("2024-01-02T00:00:00Z"), now).unwrap();
        // 1 from the file + 2 from the last Athena window; the 08:00 call was outside the window.
        assert_eq!(e[0].calls, 3);
    }

    #[test]
    fn runs_and_freshness() {
        let store = Store::open_in_memory().unwrap();
        assert_eq!(store.freshness().unwrap(), Freshness::default());
        let ok = store
            .start_run("files", at("2024-01-02T00:00:00Z"), at("2024-01-02T10:00:00Z"), at("2024-01-02T10:00:00Z"))
            .unwrap();
        let counts = RunCounts { files: 2, records_read: 10, ..RunCounts::default() };
        store.finish_run(ok, &counts, None, at("2024-01-02T10:01:00Z")).unwrap();
        let bad = store
            .start_run("files", at("2024-01-02T08:00:00Z"), at("2024-01-02T11:00:00Z"), at("2024-01-02T11:00:00Z"))
            .unwrap();
        store.finish_run(bad, &RunCounts::default(), Some("boom"), at("2024-01-02T11:01:00Z")).unwrap();
        let fresh = store.freshness().unwrap();
        assert_eq!(fresh.last_success, Some(at("2024-01-02T10:01:00Z")));
        assert_eq!(fresh.covered_until, Some(at("2024-01-02T10:00:00Z")));
        let runs = store.recent_runs(5).unwrap();
        assert_eq!(runs.len(), 2);
        assert_eq!((runs[0].status.as_str(), runs[0].error.as_deref()), ("failed", Some("boom")));
        assert_eq!(runs[1].counts, counts);
    }

    #[test]
    fn retention_drops_old_hours_marks_and_runs() {
        let store = Store::open_in_memory().unwrap();
        let now = at("2024-01-10T00:00:00Z");
        store
            .add_trail_files(
                &[
                    file("old", &[call("alice", "2024-01-01T10:00:00Z", "203.0.113.5", false)]),
                    file("new", &[call("alice", "2024-01-09T10:00:00Z", "203.0.113.5", false)]),
                ],
                now,
            )
            .unwrap();
        let run = store
            .start_run("files", at("2024-01-01T00:00:00Z"), at("2024-01-01T12:00:00Z"), at("2024-01-01T12:00:00Z"))
            .unwrap();
        store.finish_run(run, &RunCounts::default(), None, at("2024-01-01T12:00:00Z")).unwrap();
        store.drop_before(at("2024-01-05T00:00:00Z")).unwrap();
        assert_eq!(store.read_keys("", None).unwrap(), HashSet::from(["new".to_string()]));
        let e = store.user_evidence(at("2024-01-01T00:00:00Z"), now).unwrap();
        assert_eq!(e[0].calls, 1);
        assert!(store.recent_runs(5).unwrap().is_empty());
    }

    #[test]
    fn every_evidence_write_moves_the_generation_and_reads_do_not() {
        let store = Store::open_in_memory().unwrap();
        let now = at("2024-01-10T00:00:00Z");
        let generation = || store.evidence_generation().unwrap();
        let mut last = generation();
        let mut moved = |what: &str| {
            let now = generation();
            assert!(now > last, "{what} wrote evidence but the generation stayed at {last}");
            last = now;
        };
        let hour = [call("alice", "2024-01-09T10:00:00Z", "203.0.113.5", false)];
        store.add_trail_files(&[file("a", &hour)], now).unwrap();
        moved("add_trail_files");
        let (since, until) = (at("2024-01-09T00:00:00Z"), now);
        store.replace_hours(ATHENA_ORIGIN, since, until, &aggregate(&hour, &judge())).unwrap();
        moved("replace_hours");
        store.rejudge(&judge(), now).unwrap();
        moved("rejudge");
        store.finish_reread(TRAIL_ORIGIN, since).unwrap();
        moved("finish_reread");
        store.drop_before(at("2024-01-05T00:00:00Z")).unwrap();
        moved("drop_before");
        store.user_evidence(since, until).unwrap();
        store.freshness().unwrap();
        assert_eq!(generation(), last, "reading changes nothing");
    }

    #[test]
    fn some_users_evidence_is_theirs_from_everyones() {
        let store = Store::open_in_memory().unwrap();
        let now = at("2024-01-03T00:00:00Z");
        let calls = [
            call("alice", "2024-01-01T10:00:00Z", "203.0.113.5", false),
            call("alice", "2024-01-02T11:30:00Z", "198.51.100.8", true),
            call("bob", "2024-01-02T10:00:00Z", "198.51.100.7", false),
            call("carol", "2024-01-02T23:59:00Z", "203.0.113.5", false),
        ];
        store.add_trail_files(&[file("a", &calls)], now).unwrap();
        for since in [at("2024-01-01T00:00:00Z"), at("2024-01-01T10:30:00Z"), at("2024-01-02T11:00:00Z")] {
            let all = store.user_evidence(since, now).unwrap();
            let users = ["alice".to_string(), "carol".to_string(), "nobody".to_string()];
            let some = store.evidence_of_users(&users, since, now).unwrap();
            let expected: Vec<_> = all.into_iter().filter(|e| users.contains(&e.user)).collect();
            assert!(!expected.is_empty());
            assert_eq!(some, expected, "since {since}");
        }
        // The window ends where it says, within an hour too.
        let until = at("2024-01-02T11:00:00Z");
        let all = store.user_evidence(at("2024-01-01T00:00:00Z"), until).unwrap();
        assert_eq!(
            store.evidence_of_users(&["alice".to_string()], at("2024-01-01T00:00:00Z"), until).unwrap(),
            all.into_iter().filter(|e| e.user == "alice").collect::<Vec<_>>()
        );
        assert!(store.evidence_of_users(&[], at("2024-01-01T00:00:00Z"), now).unwrap().is_empty());
    }

    #[test]
    fn key_ranges() {
        assert_eq!(key_range("a/b/"), ("a/b/".into(), Some("a/b0".into())));
        assert_eq!(key_range(""), (String::new(), None));
    }
}
