//! Re-judging the stored evidence from its request contexts, without reading CloudTrail again.
//!
//! A verdict depends on the request context alone, and contexts repeat massively across hours and
//! users, so each distinct context is judged once (by the one classifier, [`Judge`]) and cached.
//! The contexts are then streamed once in primary-key order, one user-hour after another, and
//! each hour's derived rows (verdict counts, outside sources with their latest call, first and
//! last applicable call) are rebuilt in memory as [`Aggregates`] derives them, then written in
//! key order with prepared statements. Everything happens in one transaction; per row, nothing
//! is allocated but the cache entry of a context seen for the first time.
//!
//! [`Aggregates`]: crate::evidence::aggregate::Aggregates

use std::collections::HashMap;
use std::path::Path;

use chrono::{DateTime, Utc};
use rusqlite::types::{Type, ValueRef};
use rusqlite::{Connection, Row, Statement, params};

use crate::evidence::aggregate::{Judge, JudgedContext, RequestContext};
use crate::perimeter::{Fingerprint, Verdict};

use super::{Doing, Store, StoreError};

/// What a re-judgement did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Rejudged {
    /// The perimeter the evidence is now judged under.
    pub fingerprint: Fingerprint,
    /// User-hours whose verdicts were derived again.
    pub hours: u64,
}

/// Derives every user-hour's verdicts again under `judge` from the stored request contexts (no
/// CloudTrail read) and stamps the evidence with its perimeter's fingerprint, in one transaction.
/// Hours stored before contexts were kept (no contexts) are left alone: freshness counts them.
pub(super) fn rejudge(store: &Store, judge: &Judge, now: DateTime<Utc>) -> Result<Rejudged, StoreError> {
    let fingerprint = judge.perimeter.fingerprint();
    let doing = format!("re-judging the stored evidence under perimeter {fingerprint}");
    let mut conn = store.conn();
    let tx = conn.transaction().doing(&doing)?;
    let hours = rebuild(&tx, judge).doing(&doing)?;
    tx.execute(
        "INSERT INTO evidence_judged (only, fingerprint, judged_at) VALUES (1, ?1, ?2)
         ON CONFLICT (only) DO UPDATE SET fingerprint = excluded.fingerprint, judged_at = excluded.judged_at",
        params![fingerprint.to_string(), now.timestamp()],
    )
    .doing(&doing)?;
    tx.commit().doing(&doing)?;
    Ok(Rejudged { fingerprint, hours })
}

/// The primary key of a user-hour, in the order the tables sort it.
const HOUR_KEY: &str = "hour, user_name, origin";

/// Replaces the derived rows of every hour that has contexts; returns how many hours that is.
fn rebuild(conn: &Connection, judge: &Judge) -> rusqlite::Result<u64> {
    let without_contexts: i64 = conn.query_row(
        "SELECT count(*) FROM evidence_hour h WHERE NOT EXISTS (SELECT 1 FROM evidence_context c
             WHERE c.hour = h.hour AND c.user_name = h.user_name AND c.origin = h.origin)",
        [],
        |row| row.get(0),
    )?;
    for table in ["evidence_verdict", "evidence_outside"] {
        if without_contexts == 0 {
            // Every row is rebuilt: emptying the table whole is far cheaper than row by row.
            conn.execute(&format!("DELETE FROM {table}"), [])?;
        } else {
            conn.execute(
                &format!(
                    "DELETE FROM {table} WHERE ({HOUR_KEY}) IN (SELECT DISTINCT {HOUR_KEY} FROM evidence_context)"
                ),
                [],
            )?;
        }
    }
    let mut writer = Writer {
        verdict: conn.prepare(
            "INSERT INTO evidence_verdict (user_name, hour, origin, verdict, reason, calls) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        )?,
        outside: conn.prepare(
            "INSERT INTO evidence_outside (user_name, hour, origin, source, calls, last_seen, last_action, last_reason)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
        )?,
        span: conn.prepare(
            "UPDATE evidence_hour SET first_call = ?4, last_call = ?5 WHERE hour = ?1 AND user_name = ?2 AND origin = ?3",
        )?,
    };
    let mut spans =
        conn.prepare(&format!("SELECT {HOUR_KEY}, first_call, last_call FROM evidence_hour ORDER BY {HOUR_KEY}"))?;
    let mut spans = spans.query([])?;
    // The hour row read last and not yet matched: both streams are in key order (a merge join).
    let mut stored = StoredSpan::default();
    let mut hours = 0;
    derive_hours(conn, judge, |derived| {
        hours += 1;
        let key = (derived.hour, derived.user, derived.origin);
        while stored.key() < key {
            let Some(row) = spans.next()? else { break };
            stored.read(row)?;
        }
        if stored.key() == key && stored.span != derived.span() {
            let (first, last) = derived.span();
            writer.span.execute(params![derived.hour, derived.user, derived.origin, first, last])?;
        }
        writer.write(&derived)
    })?;
    Ok(hours)
}

/// A row of `evidence_hour`: its key and its first and last applicable call.
#[derive(Default)]
struct StoredSpan {
    hour: i64,
    user: String,
    origin: String,
    span: (Option<i64>, Option<i64>),
}

impl StoredSpan {
    fn key(&self) -> (i64, &str, &str) {
        (self.hour, &self.user, &self.origin)
    }

    fn read(&mut self, row: &Row<'_>) -> rusqlite::Result<()> {
        self.hour = row.get(0)?;
        self.user.clear();
        self.user.push_str(text(row, 1)?);
        self.origin.clear();
        self.origin.push_str(text(row, 2)?);
        self.span = (row.get(3)?, row.get(4)?);
        Ok(())
    }
}

struct Writer<'c> {
    verdict: Statement<'c>,
    outside: Statement<'c>,
    span: Statement<'c>,
}

impl Writer<'_> {
    fn write(&mut self, hour: &DerivedHour) -> rusqlite::Result<()> {
        for (verdict, calls) in hour.verdicts {
            self.verdict.execute(params![
                hour.user,
                hour.hour,
                hour.origin,
                verdict.kind_name(),
                verdict.reason_name(),
                *calls as i64
            ])?;
        }
        for outside in hour.outside {
            let judged = &hour.judged[outside.latest];
            self.outside.execute(params![
                hour.user,
                hour.hour,
                hour.origin,
                judged.outside_source,
                outside.calls as i64,
                outside.last_seen,
                judged.action,
                judged.verdict.reason_name(),
            ])?;
        }
        Ok(())
    }
}

/// One user-hour's verdicts, derived from its contexts under a judge.
struct DerivedHour<'a> {
    /// The hour's start, in seconds.
    hour: i64,
    user: &'a str,
    origin: &'a str,
    /// Calls by verdict, not-applicable ones included.
    verdicts: &'a [(Verdict, u64)],
    /// Calls the policy would deny, by source (each source once).
    outside: &'a [OutsideDerived],
    /// Every distinct context judged so far; [`OutsideDerived::latest`] indexes it.
    judged: &'a [JudgedContext],
    /// First and last applicable call, in seconds.
    first_call: Option<i64>,
    last_call: Option<i64>,
}

impl DerivedHour<'_> {
    fn span(&self) -> (Option<i64>, Option<i64>) {
        (self.first_call, self.last_call)
    }
}

/// Calls from one outside source in an hour.
struct OutsideDerived {
    calls: u64,
    /// The latest call's time, in seconds.
    last_seen: i64,
    /// The judged context of the latest call (ties: the greater action, then reason).
    latest: usize,
}

/// Streams every user-hour that has contexts, in key order, derived under `judge`, to `each`.
fn derive_hours(
    conn: &Connection,
    judge: &Judge,
    mut each: impl FnMut(DerivedHour<'_>) -> rusqlite::Result<()>,
) -> rusqlite::Result<()> {
    let mut contexts = conn.prepare(&format!(
        "SELECT {HOUR_KEY}, event_source, event_name, event_type, account, source_ip, endpoint, endpoint_account,
                invoked_by, s3_auth_method, calls, first_seen, last_seen
         FROM evidence_context ORDER BY {HOUR_KEY}"
    ))?;
    let mut rows = contexts.query([])?;
    let mut cache = JudgeCache { judge, index: HashMap::new(), judged: Vec::new(), key: String::new() };
    let mut current = HourBuffer::default();
    while let Some(row) = rows.next()? {
        let hour: i64 = row.get(0)?;
        let (user, origin) = (text(row, 1)?, text(row, 2)?);
        if current.started && (current.hour, current.user.as_str(), current.origin.as_str()) != (hour, user, origin) {
            each(current.derived(&cache.judged))?;
            current.clear();
        }
        if !current.started {
            current.start(hour, user, origin);
        }
        let judged = cache.judge(row)?;
        let (calls, first, last) = (row.get::<_, i64>(12)?, row.get::<_, i64>(13)?, row.get::<_, i64>(14)?);
        current.add(judged, &cache.judged, u64::try_from(calls).unwrap_or(0), first, last);
    }
    if current.started {
        each(current.derived(&cache.judged))?;
    }
    Ok(())
}

/// The judgement of every distinct context seen, by its columns joined with a separator.
struct JudgeCache<'j> {
    judge: &'j Judge,
    index: HashMap<String, usize>,
    judged: Vec<JudgedContext>,
    /// Reused for every lookup.
    key: String,
}

/// Columns 3..12 of a context row: the request context.
const CONTEXT_COLUMNS: std::ops::Range<usize> = 3..12;

impl JudgeCache<'_> {
    fn judge(&mut self, row: &Row<'_>) -> rusqlite::Result<usize> {
        self.key.clear();
        for column in CONTEXT_COLUMNS {
            self.key.push_str(text(row, column)?);
            self.key.push('\u{1f}');
        }
        if let Some(&known) = self.index.get(self.key.as_str()) {
            return Ok(known);
        }
        let field = |i: usize| text(row, CONTEXT_COLUMNS.start + i).map(str::to_string);
        let context = RequestContext {
            event_source: field(0)?,
            event_name: field(1)?,
            event_type: field(2)?,
            account: field(3)?,
            source_ip: field(4)?,
            endpoint: field(5)?,
            endpoint_account: field(6)?,
            invoked_by: field(7)?,
            s3_auth_method: field(8)?,
        };
        self.judged.push(self.judge.judge_context(&context));
        self.index.insert(self.key.clone(), self.judged.len() - 1);
        Ok(self.judged.len() - 1)
    }
}

/// The hour being derived; its buffers are reused from hour to hour.
#[derive(Default)]
struct HourBuffer {
    started: bool,
    hour: i64,
    user: String,
    origin: String,
    verdicts: Vec<(Verdict, u64)>,
    outside: Vec<OutsideDerived>,
    first_call: Option<i64>,
    last_call: Option<i64>,
}

impl HourBuffer {
    fn start(&mut self, hour: i64, user: &str, origin: &str) {
        self.started = true;
        self.hour = hour;
        self.user.push_str(user);
        self.origin.push_str(origin);
    }

    fn clear(&mut self) {
        self.started = false;
        self.user.clear();
        self.origin.clear();
        self.verdicts.clear();
        self.outside.clear();
        (self.first_call, self.last_call) = (None, None);
    }

    fn add(&mut self, index: usize, judged: &[JudgedContext], calls: u64, first: i64, last: i64) {
        let context = &judged[index];
        match self.verdicts.iter_mut().find(|(verdict, _)| *verdict == context.verdict) {
            Some((_, sum)) => *sum += calls,
            None => self.verdicts.push((context.verdict, calls)),
        }
        if matches!(context.verdict, Verdict::NotApplicable(_)) {
            return;
        }
        self.first_call = Some(self.first_call.map_or(first, |f| f.min(first)));
        self.last_call = Some(self.last_call.map_or(last, |l| l.max(last)));
        let Verdict::WouldDeny(reason) = context.verdict else { return };
        let source = context.outside_source.as_deref();
        let latest = |seen: i64, i: usize| (seen, judged[i].action.as_str(), judged[i].verdict.reason_name());
        match self.outside.iter_mut().find(|o| judged[o.latest].outside_source.as_deref() == source) {
            Some(outside) => {
                outside.calls += calls;
                if (last, context.action.as_str(), reason.as_str()) > latest(outside.last_seen, outside.latest) {
                    (outside.last_seen, outside.latest) = (last, index);
                }
            }
            None => self.outside.push(OutsideDerived { calls, last_seen: last, latest: index }),
        }
    }

    fn derived<'a>(&'a self, judged: &'a [JudgedContext]) -> DerivedHour<'a> {
        DerivedHour {
            hour: self.hour,
            user: &self.user,
            origin: &self.origin,
            verdicts: &self.verdicts,
            outside: &self.outside,
            judged,
            first_call: self.first_call,
            last_call: self.last_call,
        }
    }
}

/// Column `index` of `row` as text, borrowed.
fn text<'r>(row: &'r Row<'_>, index: usize) -> rusqlite::Result<&'r str> {
    match row.get_ref(index)? {
        ValueRef::Text(bytes) => std::str::from_utf8(bytes)
            .map_err(|e| rusqlite::Error::FromSqlConversionFailure(index, Type::Text, Box::new(e))),
        other => Err(rusqlite::Error::InvalidColumnType(index, format!("column {index}"), other.data_type())),
    }
}

impl Store {
    /// A private, migrated copy of the store at `original`, written to the new file `copy`: the
    /// original is opened read-only and never written, so what-if questions change nothing.
    pub fn copy_of(original: &Path, copy: &Path) -> Result<Store, StoreError> {
        use rusqlite::OpenFlags;
        let doing = format!("copying the store {} to {}", original.display(), copy.display());
        let target = copy.to_str().ok_or_else(|| StoreError::Refused(format!("{doing}: the path is not UTF-8")))?;
        let conn = Connection::open_with_flags(original, OpenFlags::SQLITE_OPEN_READ_ONLY).doing(&doing)?;
        conn.busy_timeout(std::time::Duration::from_secs(10)).doing(&doing)?;
        // A consistent snapshot, even with the daemon writing.
        conn.execute("VACUUM INTO ?1", [target]).doing(&doing)?;
        drop(conn);
        Store::open(copy)
    }
}

/// The tables derived from (or holding) an hour's calls, emptied when the hour is read again.
const CALL_TABLES: &[&str] = &["evidence_verdict", "evidence_outside", "evidence_context"];

/// Prepares re-reading `origin`'s hours stored before request contexts were kept: from the
/// oldest such hour on, every hour of `origin` is emptied and marked `needs_reread` (so the
/// gate stays closed until the re-read is done), and the read marks of trail files that
/// contributed to those hours are dropped, all in one transaction. Returns that oldest hour:
/// the refresh reads from there and writes no hour before it (those are still stored). A
/// re-read cut short leaves the marks in place, and the next refresh starts it over.
pub(super) fn begin_reread(store: &Store, origin: &str) -> Result<Option<DateTime<Utc>>, StoreError> {
    let doing = format!("preparing to re-read {origin} evidence stored before request contexts were kept");
    let mut conn = store.conn();
    let tx = conn.transaction().doing(&doing)?;
    let oldest: Option<i64> = tx
        .query_row("SELECT min(hour) FROM evidence_hour WHERE needs_reread = 1 AND origin = ?1", [origin], |row| {
            row.get(0)
        })
        .doing(&doing)?;
    let Some(oldest) = oldest else { return Ok(None) };
    for table in CALL_TABLES {
        tx.execute(&format!("DELETE FROM {table} WHERE origin = ?1 AND hour >= ?2"), params![origin, oldest])
            .doing(&doing)?;
    }
    tx.execute(
        "UPDATE evidence_hour SET needs_reread = 1, first_call = NULL, last_call = NULL, explicit_denials = 0,
             other_denials = 0
         WHERE origin = ?1 AND hour >= ?2",
        params![origin, oldest],
    )
    .doing(&doing)?;
    if origin == super::TRAIL_ORIGIN {
        // A file's calls are no later than its newest hour.
        tx.execute("DELETE FROM trail_file WHERE coalesce(newest_hour, read_at) >= ?1", [oldest]).doing(&doing)?;
    }
    tx.commit().doing(&doing)?;
    Ok(DateTime::from_timestamp(oldest, 0))
}

/// Ends a successful re-read begun by [`begin_reread`] at `from`: hours that got their
/// calls back are judged like any other; hours nothing was found for again are dropped.
pub(super) fn finish_reread(store: &Store, origin: &str, from: DateTime<Utc>) -> Result<(), StoreError> {
    let doing = format!("finishing the re-read of {origin} evidence from {from}");
    let mut conn = store.conn();
    let tx = conn.transaction().doing(&doing)?;
    tx.execute(
        "DELETE FROM evidence_hour AS h WHERE origin = ?1 AND hour >= ?2 AND needs_reread = 1 AND NOT EXISTS
             (SELECT 1 FROM evidence_context c WHERE c.hour = h.hour AND c.user_name = h.user_name AND c.origin = h.origin)",
        params![origin, from.timestamp()],
    )
    .doing(&doing)?;
    tx.execute(
        "UPDATE evidence_hour SET needs_reread = 0 WHERE origin = ?1 AND hour >= ?2",
        params![origin, from.timestamp()],
    )
    .doing(&doing)?;
    tx.commit().doing(&doing)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use chrono::TimeDelta;

    use super::*;
    use crate::clock::ManualClock;
    use crate::config::Config;
    use crate::evidence::EvidenceStore;
    use crate::evidence::files::Folder;
    use crate::evidence::refresh::{self, Source, Window};
    use crate::store::EvidenceWriter;
    use crate::store::sqlite::MIGRATIONS;

    fn at(text: &str) -> DateTime<Utc> {
        text.parse().unwrap()
    }

    const START: &str = "2024-03-01T00:00:00Z";
    const NOW: &str = "2024-03-15T00:00:00Z";

    /// Ten days of calls, one every eight hours, from the office NAT (trusted) and from home.
    fn write_history(trail: &Path, account: &str) {
        use lockstep_synth::{Faults, Identity, Origin, RecordSpec};
        let mut records = Vec::new();
        for step in 0..30 {
            for (user, ip) in [("office", "198.51.100.40"), ("home", "192.0.2.10")] {
                let when = at(START) + TimeDelta::hours(8 * step);
                records.push(RecordSpec::new(
                    Identity::iam_user(account, user),
                    when,
                    "s3:ListBuckets",
                    Origin::ip(ip),
                ));
            }
        }
        lockstep_synth::write_trail(trail, account, &records, Faults::default()).unwrap();
    }

    async fn refresh(store: &Store, config: &Config, since: DateTime<Utc>) {
        let source = Source::Folder(Arc::new(Folder::new(&config.evidence.files_path)));
        let window = Window { since, until: at(NOW) };
        refresh::refresh(store, &source, config, window, &ManualClock::new(at(NOW)), None, &mut |_| {}).await.unwrap();
    }

    /// A store as lockstep wrote it at schema version `version` (the first `version` migrations,
    /// which never change once shipped), holding the rows of `from` that its tables had.
    fn older_store(path: &Path, version: usize, from: &Path) {
        let conn = Connection::open(path).unwrap();
        for sql in &MIGRATIONS[..version] {
            conn.execute_batch(sql).unwrap();
        }
        conn.pragma_update(None, "user_version", version as i64).unwrap();
        conn.execute("ATTACH ?1 AS current", [from.to_str().unwrap()]).unwrap();
        let tables: Vec<String> = conn
            .prepare("SELECT name FROM main.sqlite_master WHERE type = 'table'")
            .unwrap()
            .query_map([], |row| row.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        for table in tables {
            let columns: Vec<String> = conn
                .prepare(&format!("SELECT name FROM pragma_table_info('{table}', 'main')"))
                .unwrap()
                .query_map([], |row| row.get(0))
                .unwrap()
                .collect::<Result<_, _>>()
                .unwrap();
            let columns = columns.join(", ");
            conn.execute(
                &format!("INSERT OR REPLACE INTO main.{table} ({columns}) SELECT {columns} FROM current.{table}"),
                [],
            )
            .unwrap();
        }
    }

    /// The shipped configuration reading the history written under `dir/trail` into the
    /// reference store `dir/reference.db`: what lockstep stores today.
    async fn reference(dir: &Path) -> (Config, std::path::PathBuf, Store) {
        let mut config = Config::parse(include_str!("../../rollout.yaml"), Path::new("rollout.yaml")).unwrap();
        config.evidence.files_path = dir.join("trail");
        write_history(&config.evidence.files_path, &config.account_id);
        let path = dir.join("reference.db");
        let store = Store::open(&path).unwrap();
        refresh(&store, &config, at(START)).await;
        (config, path, store)
    }

    fn dump(store: &Store) -> String {
        ["evidence_hour", "evidence_verdict", "evidence_outside", "evidence_context"]
            .iter()
            .map(|table| store.dump_query(table, &format!("SELECT * FROM {table}")).unwrap())
            .collect()
    }

    #[tokio::test]
    async fn hours_stored_before_contexts_were_kept_are_re_read_by_the_next_refresh() {
        let dir = tempfile::tempdir().unwrap();
        let (config, reference_path, reference) = reference(dir.path()).await;

        // The same evidence as lockstep stored it before request contexts were kept (version 3).
        let path = dir.path().join("v3.db");
        older_store(&path, 3, &reference_path);
        let store = Store::open(&path).unwrap();
        assert_eq!(store.schema_version().unwrap(), MIGRATIONS.len() as i64);
        let legacy = store.freshness().unwrap().legacy_hours;
        assert_eq!(legacy, 60, "30 hours of each user, none re-judgeable");
        store.ensure_judged(&Judge::new(&config), at(NOW)).unwrap();
        let problem = crate::planner::evidence_problem(&store.freshness().unwrap(), &config, at(NOW));
        assert!(problem.as_deref().is_some_and(|p| p.contains("re-read")), "nobody is promoted: {problem:?}");

        // The next refresh asks for the last two hours only; it re-reads from the oldest old hour.
        refresh(&store, &config, at(NOW) - TimeDelta::hours(2)).await;
        let fresh = store.freshness().unwrap();
        assert_eq!(fresh.legacy_hours, 0);
        assert_eq!(crate::planner::evidence_problem(&fresh, &config, at(NOW)), None);
        assert_eq!(dump(&store), dump(&reference), "the re-read stores exactly what a first reading does");

        // A later refresh reads nothing twice.
        refresh(&store, &config, at(START)).await;
        assert_eq!(dump(&store), dump(&reference));
    }

    #[tokio::test]
    async fn a_store_at_the_current_schema_migrates_and_its_evidence_is_re_judged() {
        let dir = tempfile::tempdir().unwrap();
        let (config, reference_path, reference) = reference(dir.path()).await;

        // The schema as of this writing: migrations 1 to 5 (request contexts and foreign members).
        let path = dir.path().join("v5.db");
        older_store(&path, 5, &reference_path);
        let store = Store::open(&path).unwrap();
        assert_eq!(store.schema_version().unwrap(), MIGRATIONS.len() as i64);
        assert_eq!(store.freshness().unwrap().legacy_hours, 0);
        assert_eq!(dump(&store), dump(&reference));
        // Its evidence follows the perimeter: home's network trusted, home's calls are allowed.
        let mut wider = config.clone();
        wider.perimeter.trusted_cidrs.push("192.0.2.0/24".parse().unwrap());
        assert_eq!(store.rejudge(&Judge::new(&wider), at(NOW)).unwrap().hours, 60);
        let home = &store.evidence(at(START), at(NOW), Some("home")).unwrap()[0];
        assert_eq!((home.calls, home.would_deny), (30, 0));
    }
}
