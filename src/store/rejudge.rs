//! Re-judging the stored evidence from its request contexts, without reading CloudTrail again.
//!
//! A verdict depends on the request context alone, and contexts repeat massively across hours and
//! users, so the store keeps each distinct context once (`request_context`) with its judgement,
//! and a user-hour's calls refer to it; verdict counts and outside sources are summed from them
//! when read. A re-judgement therefore judges each stored context again (by the one classifier,
//! [`Judge`]) and rewrites those whose judgement changed. What else depends on the perimeter is
//! redone only where it changed: an hour's first and last applicable call, for the hours with a
//! call whose applicability changed. Contexts waiting unjudged since the migration that interned
//! them are judged and interned, their hours' stored verdicts dropped. One transaction.

use std::collections::{HashMap, HashSet};

use chrono::{DateTime, Utc};
use rusqlite::{Connection, params};

use crate::evidence::aggregate::{Judge, RequestContext};
use crate::perimeter::{Fingerprint, Verdict};

use super::sqlite::{Contexts, bump_generation, text};
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
    bump_generation(&tx).doing(&doing)?;
    tx.commit().doing(&doing)?;
    Ok(Rejudged { fingerprint, hours })
}

/// Scratch tables of one re-judgement: contexts whose applicability changed, hours whose first
/// and last applicable call are derived again.
const SCRATCH: &str = "
    CREATE TEMP TABLE IF NOT EXISTS rejudged_context (id INTEGER PRIMARY KEY);
    CREATE TEMP TABLE IF NOT EXISTS rejudged_hour (
        hour INTEGER NOT NULL, user_name TEXT NOT NULL, origin TEXT NOT NULL, PRIMARY KEY (hour, user_name, origin)
    ) WITHOUT ROWID;
    DELETE FROM temp.rejudged_context;
    DELETE FROM temp.rejudged_hour;
";

/// Judges every stored context again and folds in those waiting unjudged; returns how many
/// user-hours have calls (all of them are judged under `judge` now).
fn rebuild(conn: &Connection, judge: &Judge) -> rusqlite::Result<u64> {
    conn.execute_batch(SCRATCH)?;
    let stored = judge_stored(conn, judge)?;
    fold_pending(conn, judge)?;
    derive_spans(conn)?;
    // Verdicts stored as such give way to the derived ones wherever an hour has calls.
    for table in ["stored_verdict", "stored_outside"] {
        let any: bool = conn.query_row(&format!("SELECT EXISTS (SELECT 1 FROM {table})"), [], |row| row.get(0))?;
        if any {
            conn.execute(
                &format!(
                    "DELETE FROM {table} AS s WHERE EXISTS (SELECT 1 FROM evidence_call e
                         WHERE e.hour = s.hour AND e.user_name = s.user_name AND e.origin = s.origin)"
                ),
                [],
            )?;
        }
    }
    let (hours, referenced) = scan_calls(conn)?;
    // Contexts no call refers to any more (their hours dropped or replaced) go.
    let mut forget = conn.prepare("DELETE FROM request_context WHERE id = ?1")?;
    for id in stored.difference(&referenced) {
        forget.execute([id])?;
    }
    conn.execute_batch("DELETE FROM temp.rejudged_context; DELETE FROM temp.rejudged_hour;")?;
    Ok(hours)
}

/// Judges every stored context under `judge`, rewrites those whose judgement changed and notes
/// those whose applicability did; returns the IDs of all of them.
fn judge_stored(conn: &Connection, judge: &Judge) -> rusqlite::Result<HashSet<i64>> {
    let mut ids = HashSet::new();
    let mut changed = Vec::new();
    {
        let mut stmt = conn.prepare(
            "SELECT id, event_source, event_name, event_type, account, source_ip, endpoint, endpoint_account,
                    invoked_by, s3_auth_method, verdict, reason, applicable, outside_source, action
             FROM request_context",
        )?;
        let mut rows = stmt.query([])?;
        while let Some(row) = rows.next()? {
            let id: i64 = row.get(0)?;
            ids.insert(id);
            let context = context_of(row, 1)?;
            let judged = judge.judge_context(&context);
            let stored = (text(row, 10)?, text(row, 11)?, row.get_ref(13)?.as_str_or_null()?, text(row, 14)?);
            let now = (
                judged.verdict.kind_name(),
                judged.verdict.reason_name(),
                judged.outside_source.as_deref(),
                judged.action.as_str(),
            );
            if stored != now {
                let applicable = !matches!(judged.verdict, Verdict::NotApplicable(_));
                let was_applicable: bool = row.get(12)?;
                changed.push((id, judged, applicable, applicable != was_applicable));
            }
        }
    }
    let mut update = conn.prepare(
        "UPDATE request_context SET verdict = ?2, reason = ?3, applicable = ?4, outside_source = ?5, action = ?6
         WHERE id = ?1",
    )?;
    let mut note = conn.prepare("INSERT INTO temp.rejudged_context (id) VALUES (?1)")?;
    for (id, judged, applicable, applicability_changed) in changed {
        update.execute(params![
            id,
            judged.verdict.kind_name(),
            judged.verdict.reason_name(),
            applicable,
            judged.outside_source,
            judged.action
        ])?;
        if applicability_changed {
            note.execute([id])?;
        }
    }
    Ok(ids)
}

/// The request context in the nine columns from `first` on.
fn context_of(row: &rusqlite::Row<'_>, first: usize) -> rusqlite::Result<RequestContext> {
    let field = |i: usize| text(row, first + i).map(str::to_string);
    Ok(RequestContext {
        event_source: field(0)?,
        event_name: field(1)?,
        event_type: field(2)?,
        account: field(3)?,
        source_ip: field(4)?,
        endpoint: field(5)?,
        endpoint_account: field(6)?,
        invoked_by: field(7)?,
        s3_auth_method: field(8)?,
    })
}

/// Judges and interns the contexts the migration to interned contexts left waiting (their
/// hours read as their stored verdicts until now); their hours' spans are derived again.
fn fold_pending(conn: &Connection, judge: &Judge) -> rusqlite::Result<()> {
    let any: bool = conn.query_row("SELECT EXISTS (SELECT 1 FROM pending_context)", [], |row| row.get(0))?;
    if !any {
        return Ok(());
    }
    conn.execute(
        "INSERT OR IGNORE INTO temp.rejudged_hour (hour, user_name, origin)
         SELECT DISTINCT hour, user_name, origin FROM pending_context",
        [],
    )?;
    let mut contexts = Contexts::new(conn)?;
    let mut stmt = conn.prepare(
        "SELECT hour, user_name, origin, event_source, event_name, event_type, account, source_ip, endpoint,
                endpoint_account, invoked_by, s3_auth_method, calls, first_seen, last_seen
         FROM pending_context",
    )?;
    let mut rows = stmt.query([])?;
    // Contexts repeat across rows: they are looked up by their columns joined, in one buffer.
    let (mut ids, mut key) = (HashMap::<String, i64>::new(), String::new());
    while let Some(row) = rows.next()? {
        key.clear();
        for column in 3..12 {
            key.push_str(text(row, column)?);
            key.push('\u{1f}');
        }
        let id = match ids.get(key.as_str()) {
            Some(&id) => id,
            None => {
                let id = contexts.id(&context_of(row, 3)?, |c| Some(judge.judge_context(c)))?;
                ids.insert(key.clone(), id);
                id
            }
        };
        let calls: i64 = row.get(12)?;
        contexts.add_calls(
            row.get(0)?,
            text(row, 1)?,
            text(row, 2)?,
            id,
            u64::try_from(calls).unwrap_or(0),
            row.get(13)?,
            row.get(14)?,
        )?;
    }
    drop(rows);
    conn.execute("DELETE FROM pending_context", [])?;
    Ok(())
}

/// Derives again the first and last applicable call of the hours noted, and of those with a
/// call whose context's applicability changed.
fn derive_spans(conn: &Connection) -> rusqlite::Result<()> {
    conn.execute(
        "INSERT OR IGNORE INTO temp.rejudged_hour (hour, user_name, origin)
         SELECT DISTINCT hour, user_name, origin FROM evidence_call
         WHERE EXISTS (SELECT 1 FROM temp.rejudged_context) AND context IN (SELECT id FROM temp.rejudged_context)",
        [],
    )?;
    conn.execute(
        "UPDATE evidence_hour AS h SET (first_call, last_call) = (
             SELECT min(e.first_seen), max(e.last_seen) FROM evidence_call e JOIN request_context c ON c.id = e.context
             WHERE e.hour = h.hour AND e.user_name = h.user_name AND e.origin = h.origin AND c.applicable = 1)
         WHERE (hour, user_name, origin) IN (SELECT hour, user_name, origin FROM temp.rejudged_hour)",
        [],
    )?;
    Ok(())
}

/// How many user-hours have calls, and the contexts their calls refer to: one pass in key order.
fn scan_calls(conn: &Connection) -> rusqlite::Result<(u64, HashSet<i64>)> {
    let mut stmt =
        conn.prepare("SELECT hour, user_name, origin, context FROM evidence_call ORDER BY hour, user_name, origin")?;
    let mut rows = stmt.query([])?;
    let (mut hours, mut referenced) = (0, HashSet::new());
    let (mut hour, mut user, mut origin) = (None, String::new(), String::new());
    while let Some(row) = rows.next()? {
        let (h, u, o): (i64, &str, &str) = (row.get(0)?, text(row, 1)?, text(row, 2)?);
        if hour != Some(h) || user != u || origin != o {
            hours += 1;
            hour = Some(h);
            user.clear();
            user.push_str(u);
            origin.clear();
            origin.push_str(o);
        }
        referenced.insert(row.get(3)?);
    }
    Ok((hours, referenced))
}

/// The tables holding an hour's calls or verdicts, emptied when the hour is read again.
const CALL_TABLES: &[&str] = &["evidence_call", "stored_verdict", "stored_outside", "pending_context"];

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
    bump_generation(&tx).doing(&doing)?;
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
        "DELETE FROM evidence_hour AS h WHERE origin = ?1 AND hour >= ?2 AND needs_reread = 1
             AND NOT EXISTS (SELECT 1 FROM evidence_call c
                 WHERE c.hour = h.hour AND c.user_name = h.user_name AND c.origin = h.origin)
             AND NOT EXISTS (SELECT 1 FROM pending_context c
                 WHERE c.hour = h.hour AND c.user_name = h.user_name AND c.origin = h.origin)",
        params![origin, from.timestamp()],
    )
    .doing(&doing)?;
    tx.execute(
        "UPDATE evidence_hour SET needs_reread = 0 WHERE origin = ?1 AND hour >= ?2",
        params![origin, from.timestamp()],
    )
    .doing(&doing)?;
    bump_generation(&tx).doing(&doing)?;
    tx.commit().doing(&doing)
}

#[cfg(test)]
mod tests {
    use std::path::Path;
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

    /// Everything the evidence read paths answer over the history, for every user.
    fn readings(store: &Store) -> String {
        let (since, until) = (at(START), at(NOW));
        let mut out = format!("{:?}\n", store.evidence(since, until, None).unwrap());
        for user in ["office", "home"] {
            out.push_str(&format!("{user}: {:?}\n", store.verdict_counts(user, since, until).unwrap()));
        }
        out.push_str(&format!(
            "{:?}\n{:?}\n",
            store.outside_calls(since, until).unwrap(),
            store.recorded_denials(since, until).unwrap()
        ));
        out
    }

    #[tokio::test]
    async fn a_store_from_before_contexts_were_interned_reads_back_the_same_and_re_judges() {
        let dir = tempfile::tempdir().unwrap();
        let (config, reference_path, reference) = reference(dir.path()).await;
        let (dumped, read) = (dump(&reference), readings(&reference));

        // The schema before request contexts were interned: migrations 1 to 9.
        let path = dir.path().join("v9.db");
        older_store(&path, 9, &reference_path);
        let store = Store::open(&path).unwrap();
        assert_eq!(store.schema_version().unwrap(), MIGRATIONS.len() as i64);
        let pending = store.dump_query("pending", "SELECT count(*) FROM pending_context").unwrap();
        assert_eq!(pending, "[pending]\n60\n", "contexts wait unjudged, one per user-hour");
        assert_eq!(store.freshness().unwrap(), reference.freshness().unwrap());
        assert_eq!(dump(&store), dumped, "the migrated evidence reads back as stored");
        assert_eq!(readings(&store), read);

        // Calls added before the re-judgement, to an hour whose contexts still wait and to a new
        // context, add to what was stored.
        let calls = [
            crate::testkit::user_call("home", "2024-03-02T08:20:00Z", "192.0.2.10", "s3:ListBuckets"),
            crate::testkit::user_call("home", "2024-03-02T08:30:00Z", "192.0.2.11", "s3:ListBuckets"),
        ];
        let late = crate::evidence::files::TrailFile {
            key: "late".into(),
            records: 2,
            aggregates: crate::evidence::aggregate::aggregate(&calls, &Judge::new(&config)),
            ..Default::default()
        };
        for target in [&store, &reference] {
            target.add_trail_files(std::slice::from_ref(&late), at(NOW)).unwrap();
        }
        assert_eq!(dump(&store), dump(&reference));
        assert_eq!(readings(&store), readings(&reference));
        let read = readings(&reference);

        // Re-judged, it follows the perimeter like a store written at this schema.
        let mut wider = config.clone();
        wider.perimeter.trusted_cidrs.push("192.0.2.0/24".parse().unwrap());
        for judge in [Judge::new(&wider), Judge::new(&config)] {
            assert_eq!(store.rejudge(&judge, at(NOW)).unwrap().hours, 60);
            assert_eq!(reference.rejudge(&judge, at(NOW)).unwrap().hours, 60);
            assert_eq!(dump(&store), dump(&reference));
            assert_eq!(readings(&store), readings(&reference));
        }
        assert_eq!(readings(&store), read, "back under the first perimeter");
        let left = store.dump_query("left", "SELECT (SELECT count(*) FROM pending_context) + (SELECT count(*) FROM stored_verdict) + (SELECT count(*) FROM stored_outside)").unwrap();
        assert_eq!(left, "[left]\n0\n", "every verdict is derived now");
    }

    #[tokio::test]
    async fn calls_that_stop_being_applicable_leave_their_hours_span() {
        let dir = tempfile::tempdir().unwrap();
        let (config, _, store) = reference(dir.path()).await;
        let (dumped, read) = (dump(&store), readings(&store));
        // Under another account's perimeter none of these calls is one the policy applies to.
        let mut elsewhere = config.clone();
        elsewhere.perimeter.account_id = "999999999999".into();
        assert_eq!(store.rejudge(&Judge::new(&elsewhere), at(NOW)).unwrap().hours, 60);
        assert!(store.evidence(at(START), at(NOW), None).unwrap().is_empty());
        let spans = store.dump_query("spans", "SELECT DISTINCT first_call, last_call FROM evidence_hour").unwrap();
        assert_eq!(spans, "[spans]\nNULL|NULL\n");
        // And back: every span and verdict as first read.
        store.rejudge(&Judge::new(&config), at(NOW)).unwrap();
        assert_eq!(dump(&store), dumped);
        assert_eq!(readings(&store), read);
    }

    #[tokio::test]
    async fn contexts_no_call_refers_to_are_forgotten_by_the_next_re_judgement() {
        let dir = tempfile::tempdir().unwrap();
        let (config, _, store) = reference(dir.path()).await;
        let contexts = || store.dump_query("n", "SELECT count(*) FROM request_context").unwrap();
        assert_eq!(contexts(), "[n]\n2\n");
        store.drop_before(at(NOW)).unwrap();
        assert_eq!(store.rejudge(&Judge::new(&config), at(NOW)).unwrap().hours, 0);
        assert_eq!(contexts(), "[n]\n0\n");
    }
}
