//! The rollout ledger in SQLite: users' states, batches, the pause switch, finished waves, the
//! guard's observations, and the append-only audit log.
//!
//! Each operation is one transaction that changes state *and* writes its audit line, so the log
//! is complete whatever happens afterwards. Intent (`promoting`, `rolling_back`) is written
//! before the IAM call it announces; the controller's reconcile step finishes the job after a
//! crash. Operator commands check the current state and refuse undefined transitions with a
//! clear answer instead of half-applying them.

use chrono::{DateTime, TimeZone, Utc};
use rusqlite::{Connection, OptionalExtension, Row, params};

use crate::guard::{Attribution, DenialEvent, SourceHealth};
use crate::rollout::{AuditEntry, Batch, BatchState, Member, Pause, Snapshot, UserState};

/// Ledger tables; appended to the store's migrations.
pub const SCHEMA: &str = "
CREATE TABLE rollout_state (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    paused INTEGER NOT NULL DEFAULT 0,
    pause_reason TEXT, paused_by TEXT, paused_at INTEGER
);
INSERT INTO rollout_state (id) VALUES (1);
CREATE TABLE waves_done (wave TEXT PRIMARY KEY, finished_at INTEGER NOT NULL, why TEXT NOT NULL);
CREATE TABLE batches (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    wave TEXT NOT NULL,
    state TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    applied_at INTEGER, soak_until INTEGER, finished_at INTEGER,
    verdict TEXT
);
CREATE TABLE batch_members (
    batch INTEGER NOT NULL REFERENCES batches(id),
    user TEXT NOT NULL,
    PRIMARY KEY (batch, user)
);
CREATE TABLE members (
    user TEXT PRIMARY KEY,
    state TEXT NOT NULL,
    batch INTEGER REFERENCES batches(id),
    since INTEGER NOT NULL,
    reason TEXT,
    hold_until INTEGER
);
CREATE TABLE audit (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    at INTEGER NOT NULL,
    actor TEXT NOT NULL,
    action TEXT NOT NULL,
    batch INTEGER,
    user TEXT,
    reason TEXT NOT NULL
);
CREATE TRIGGER audit_no_update BEFORE UPDATE ON audit BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
CREATE TRIGGER audit_no_delete BEFORE DELETE ON audit BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
CREATE TABLE guard_denials (
    batch INTEGER NOT NULL,
    user TEXT NOT NULL,
    at INTEGER NOT NULL,
    action TEXT NOT NULL,
    kind TEXT NOT NULL,
    code TEXT NOT NULL,
    message TEXT NOT NULL,
    event_id TEXT NOT NULL,
    PRIMARY KEY (batch, user, event_id)
);
CREATE TABLE guard_source (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    last_event_at INTEGER, last_ok_poll INTEGER, error TEXT
);
INSERT INTO guard_source (id) VALUES (1);
";

#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    #[error("ledger: cannot {what}: {source}")]
    Sql {
        what: &'static str,
        source: rusqlite::Error,
    },
    #[error("ledger: {0}")]
    Corrupt(String),
    /// The command does not apply in the current state; nothing was changed.
    #[error("{0}")]
    Refused(String),
}

trait Context<T> {
    fn doing(self, what: &'static str) -> Result<T, LedgerError>;
}

impl<T> Context<T> for rusqlite::Result<T> {
    fn doing(self, what: &'static str) -> Result<T, LedgerError> {
        self.map_err(|source| LedgerError::Sql { what, source })
    }
}

fn secs(t: DateTime<Utc>) -> i64 {
    t.timestamp()
}

fn time(secs: i64) -> DateTime<Utc> {
    Utc.timestamp_opt(secs, 0).single().unwrap_or_default()
}

fn fmt_time(t: DateTime<Utc>) -> String {
    t.format("%Y-%m-%d %H:%M:%SZ").to_string()
}

impl crate::store::Store {
    /// Runs `f` with the ledger, holding the store's connection for the duration.
    pub fn with_ledger<R>(&self, f: impl FnOnce(&Ledger) -> R) -> R {
        let conn = self.conn();
        f(&Ledger::new(&conn))
    }
}

/// The ledger over one connection (the store's).
pub struct Ledger<'c> {
    conn: &'c Connection,
}

impl<'c> Ledger<'c> {
    pub fn new(conn: &'c Connection) -> Ledger<'c> {
        Ledger { conn }
    }

    fn tx(&self) -> Result<rusqlite::Transaction<'c>, LedgerError> {
        self.conn.unchecked_transaction().doing("begin a transaction")
    }

    pub fn snapshot(&self) -> Result<Snapshot, LedgerError> {
        let paused = self
            .conn
            .query_row(
                "SELECT paused, pause_reason, paused_by, paused_at FROM rollout_state WHERE id = 1",
                [],
                |r| {
                    Ok((r.get::<_, bool>(0)?, r.get::<_, Option<String>>(1)?, r.get::<_, Option<String>>(2)?, r.get::<_, Option<i64>>(3)?))
                },
            )
            .doing("read the pause switch")?;
        let paused = paused.0.then(|| Pause {
            reason: paused.1.unwrap_or_default(),
            by: paused.2.unwrap_or_default(),
            at: time(paused.3.unwrap_or(0)),
        });
        let mut stmt = self.conn.prepare("SELECT wave, finished_at FROM waves_done").doing("read finished waves")?;
        let waves_done = stmt
            .query_map([], |r| Ok((r.get::<_, String>(0)?, time(r.get(1)?))))
            .doing("read finished waves")?
            .collect::<Result<_, _>>()
            .doing("read finished waves")?;
        let batches = self.batches()?;
        let mut stmt = self
            .conn
            .prepare("SELECT user, state, batch, since, reason, hold_until FROM members ORDER BY user")
            .doing("read members")?;
        let members = stmt
            .query_map([], member)
            .doing("read members")?
            .collect::<Result<Vec<_>, _>>()
            .doing("read members")?
            .into_iter()
            .map(|m| m.map(|m| (m.user.clone(), m)))
            .collect::<Result<_, _>>()?;
        Ok(Snapshot {
            paused,
            waves_done,
            batches,
            members,
        })
    }

    fn batches(&self) -> Result<Vec<Batch>, LedgerError> {
        let mut stmt = self
            .conn
            .prepare("SELECT id, wave, state, created_at, applied_at, soak_until, finished_at, verdict FROM batches ORDER BY id")
            .doing("read batches")?;
        let rows = stmt
            .query_map([], |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, i64>(3)?,
                    r.get::<_, Option<i64>>(4)?,
                    r.get::<_, Option<i64>>(5)?,
                    r.get::<_, Option<i64>>(6)?,
                    r.get::<_, Option<String>>(7)?,
                ))
            })
            .doing("read batches")?
            .collect::<Result<Vec<_>, _>>()
            .doing("read batches")?;
        let mut members = self.conn.prepare("SELECT user FROM batch_members WHERE batch = ?1 ORDER BY user").doing("read batch members")?;
        rows.into_iter()
            .map(|(id, wave, state, created, applied, soak, finished, verdict)| {
                let state = BatchState::from_name(&state).ok_or_else(|| LedgerError::Corrupt(format!("batch {id} has unknown state {state:?}")))?;
                let users = members
                    .query_map([id], |r| r.get::<_, String>(0))
                    .doing("read batch members")?
                    .collect::<Result<Vec<_>, _>>()
                    .doing("read batch members")?;
                Ok(Batch {
                    id,
                    wave,
                    state,
                    members: users,
                    created_at: time(created),
                    applied_at: applied.map(time),
                    soak_until: soak.map(time),
                    finished_at: finished.map(time),
                    verdict,
                })
            })
            .collect()
    }

    pub fn audit_log(&self, limit: usize) -> Result<Vec<AuditEntry>, LedgerError> {
        let mut stmt = self
            .conn
            .prepare("SELECT at, actor, action, batch, user, reason FROM (SELECT * FROM audit ORDER BY id DESC LIMIT ?1) ORDER BY id")
            .doing("read the audit log")?;
        stmt.query_map([limit as i64], |r| {
            Ok(AuditEntry {
                at: time(r.get(0)?),
                actor: r.get(1)?,
                action: r.get(2)?,
                batch: r.get(3)?,
                user: r.get(4)?,
                reason: r.get(5)?,
            })
        })
        .doing("read the audit log")?
        .collect::<Result<_, _>>()
        .doing("read the audit log")
    }

    /// Journals a new batch: the batch (`applying`), its members (`promoting`), one audit line
    /// each. Written before any IAM call.
    pub fn start_batch(&self, wave: &str, users: &[(String, String)], actor: &str, now: DateTime<Utc>) -> Result<i64, LedgerError> {
        let tx = self.tx()?;
        tx.execute("INSERT INTO batches (wave, state, created_at) VALUES (?1, 'applying', ?2)", params![wave, secs(now)])
            .doing("record a batch")?;
        let id = tx.last_insert_rowid();
        for (user, why) in users {
            tx.execute("INSERT INTO batch_members (batch, user) VALUES (?1, ?2)", params![id, user]).doing("record a batch member")?;
            tx.execute(
                "INSERT INTO members (user, state, batch, since, reason, hold_until) VALUES (?1, 'promoting', ?2, ?3, ?4, NULL)
                 ON CONFLICT(user) DO UPDATE SET state = 'promoting', batch = ?2, since = ?3, reason = ?4, hold_until = NULL",
                params![user, id, secs(now), why],
            )
            .doing("journal a promotion")?;
            audit(&tx, now, actor, "promote", Some(id), Some(user), &format!("wave {wave}: {why}"))?;
        }
        tx.commit().doing("commit a batch")?;
        Ok(id)
    }

    /// `promoting -> locked`: the user is in the group.
    pub fn mark_locked(&self, user: &str, actor: &str, now: DateTime<Utc>) -> Result<(), LedgerError> {
        self.move_user(user, UserState::Promoting, UserState::Locked, actor, "added to the lockdown group", now)
    }

    /// `rolling_back -> held`: the user is out of the group.
    pub fn mark_held(&self, user: &str, actor: &str, now: DateTime<Utc>) -> Result<(), LedgerError> {
        self.move_user(user, UserState::RollingBack, UserState::Held, actor, "removed from the lockdown group", now)
    }

    /// `locked -> removed_by_hand`: found missing from the group.
    pub fn mark_removed_by_hand(&self, user: &str, now: DateTime<Utc>) -> Result<(), LedgerError> {
        self.move_user(
            user,
            UserState::Locked,
            UserState::RemovedByHand,
            "controller",
            "found removed from the lockdown group by someone else; not re-added without an operator",
            now,
        )
    }

    fn move_user(&self, user: &str, from: UserState, to: UserState, actor: &str, why: &str, now: DateTime<Utc>) -> Result<(), LedgerError> {
        let tx = self.tx()?;
        let batch: Option<Option<i64>> = tx
            .query_row("SELECT batch FROM members WHERE user = ?1 AND state = ?2", params![user, from.as_str()], |r| r.get(0))
            .optional()
            .doing("read a member")?;
        let Some(batch) = batch else {
            return Err(LedgerError::Refused(format!("{user} is not {from}")));
        };
        tx.execute("UPDATE members SET state = ?2, since = ?3 WHERE user = ?1", params![user, to.as_str(), secs(now)])
            .doing("update a member")?;
        audit(&tx, now, actor, to.as_str(), batch, Some(user), why)?;
        tx.commit().doing("commit a member update")
    }

    /// `applying -> soaking` once every member is locked.
    pub fn start_soak(&self, batch: i64, soak_until: DateTime<Utc>, now: DateTime<Utc>) -> Result<(), LedgerError> {
        let tx = self.tx()?;
        let changed = tx
            .execute(
                "UPDATE batches SET state = 'soaking', applied_at = ?2, soak_until = ?3 WHERE id = ?1 AND state = 'applying'",
                params![batch, secs(now), secs(soak_until)],
            )
            .doing("start a soak")?;
        if changed == 1 {
            audit(&tx, now, "controller", "soak", Some(batch), None, &format!("all members locked; soaking until {}", fmt_time(soak_until)))?;
        }
        tx.commit().doing("commit a soak")
    }

    pub fn succeed(&self, batch: i64, detail: &str, now: DateTime<Utc>) -> Result<(), LedgerError> {
        let tx = self.tx()?;
        let changed = tx
            .execute(
                "UPDATE batches SET state = 'succeeded', finished_at = ?2 WHERE id = ?1 AND state = 'soaking'",
                params![batch, secs(now)],
            )
            .doing("finish a batch")?;
        if changed == 1 {
            audit(&tx, now, "controller", "succeed", Some(batch), None, detail)?;
        }
        tx.commit().doing("commit a batch success")
    }

    pub fn finish_wave(&self, wave: &str, why: &str, now: DateTime<Utc>) -> Result<(), LedgerError> {
        let tx = self.tx()?;
        let added = tx
            .execute("INSERT OR IGNORE INTO waves_done (wave, finished_at, why) VALUES (?1, ?2, ?3)", params![wave, secs(now), why])
            .doing("finish a wave")?;
        if added == 1 {
            audit(&tx, now, "controller", "finish_wave", None, None, &format!("wave {wave}: {why}"))?;
        }
        tx.commit().doing("commit a wave")
    }

    /// Journals a rollback: the batch ends `rolled_back`, its locked or promoting members become
    /// `rolling_back` (to be removed, then held until `hold_until`). Refuses batches lockstep
    /// never applied or already rolled back.
    pub fn begin_rollback(&self, batch: i64, actor: &str, reason: &str, hold_until: DateTime<Utc>, now: DateTime<Utc>) -> Result<Vec<String>, LedgerError> {
        let tx = self.tx()?;
        let state: Option<(String, Option<i64>)> = tx
            .query_row("SELECT state, finished_at FROM batches WHERE id = ?1", [batch], |r| Ok((r.get(0)?, r.get(1)?)))
            .optional()
            .doing("read a batch")?;
        let Some((state, finished)) = state else {
            return Err(LedgerError::Refused(format!("there is no batch {batch}")));
        };
        match BatchState::from_name(&state) {
            Some(BatchState::Applying | BatchState::Soaking | BatchState::Succeeded) => {}
            Some(BatchState::RolledBack) => {
                return Err(LedgerError::Refused(format!(
                    "batch {batch} was already rolled back at {}",
                    finished.map(time).map(fmt_time).unwrap_or_default()
                )));
            }
            _ => return Err(LedgerError::Refused(format!("batch {batch} is {state}: lockstep never applied it, so there is nothing to roll back"))),
        }
        tx.execute("UPDATE batches SET state = 'rolled_back', finished_at = ?2 WHERE id = ?1", params![batch, secs(now)])
            .doing("roll back a batch")?;
        audit(&tx, now, actor, "rollback", Some(batch), None, reason)?;
        let mut stmt = tx
            .prepare("SELECT user FROM members WHERE batch = ?1 AND state IN ('promoting', 'locked') ORDER BY user")
            .doing("read batch members")?;
        let users = stmt
            .query_map([batch], |r| r.get::<_, String>(0))
            .doing("read batch members")?
            .collect::<Result<Vec<_>, _>>()
            .doing("read batch members")?;
        drop(stmt);
        for user in &users {
            tx.execute(
                "UPDATE members SET state = 'rolling_back', since = ?2, reason = ?3, hold_until = ?4 WHERE user = ?1",
                params![user, secs(now), reason, secs(hold_until)],
            )
            .doing("journal a removal")?;
            audit(&tx, now, actor, "rolling_back", Some(batch), Some(user), reason)?;
        }
        tx.commit().doing("commit a rollback")?;
        Ok(users)
    }

    pub fn pause(&self, by: &str, reason: &str, now: DateTime<Utc>) -> Result<(), LedgerError> {
        if let Some(pause) = self.snapshot()?.paused {
            return Err(LedgerError::Refused(format!(
                "already paused by {} since {}: {}",
                pause.by,
                fmt_time(pause.at),
                pause.reason
            )));
        }
        let tx = self.tx()?;
        tx.execute(
            "UPDATE rollout_state SET paused = 1, pause_reason = ?1, paused_by = ?2, paused_at = ?3 WHERE id = 1",
            params![reason, by, secs(now)],
        )
        .doing("pause")?;
        audit(&tx, now, by, "pause", None, None, reason)?;
        tx.commit().doing("commit a pause")
    }

    pub fn resume(&self, by: &str, now: DateTime<Utc>) -> Result<(), LedgerError> {
        let snapshot = self.snapshot()?;
        let Some(pause) = snapshot.paused else {
            return Err(LedgerError::Refused("the rollout is not paused".to_string()));
        };
        if let Some(m) = snapshot.members.values().find(|m| m.state == UserState::RollingBack) {
            return Err(LedgerError::Refused(format!(
                "batch {} is still being rolled back ({} not yet removed); resume once it is done",
                m.batch.unwrap_or_default(),
                m.user
            )));
        }
        let tx = self.tx()?;
        tx.execute("UPDATE rollout_state SET paused = 0, pause_reason = NULL, paused_by = NULL, paused_at = NULL WHERE id = 1", [])
            .doing("resume")?;
        audit(&tx, now, by, "resume", None, None, &format!("was paused by {}: {}", pause.by, pause.reason))?;
        tx.commit().doing("commit a resume")
    }

    /// An operator keeps a candidate out of the rollout until released.
    pub fn hold(&self, user: &str, by: &str, reason: &str, now: DateTime<Utc>) -> Result<(), LedgerError> {
        if let Some(m) = self.snapshot()?.members.get(user) {
            let refusal = match m.state {
                UserState::Held => format!("{user} is already held: {}", m.reason.clone().unwrap_or_default()),
                UserState::Promoting | UserState::Locked => format!(
                    "{user} is {} in batch {}; roll that batch back to take them out",
                    m.state,
                    m.batch.unwrap_or_default()
                ),
                UserState::RollingBack => format!("{user} is being rolled back and will be held when that is done"),
                UserState::RemovedByHand => format!("{user} was removed from the group by hand and is not promoted until released"),
            };
            return Err(LedgerError::Refused(refusal));
        }
        let tx = self.tx()?;
        tx.execute(
            "INSERT INTO members (user, state, batch, since, reason, hold_until) VALUES (?1, 'held', NULL, ?2, ?3, NULL)",
            params![user, secs(now), reason],
        )
        .doing("hold a user")?;
        audit(&tx, now, by, "hold", None, Some(user), reason)?;
        tx.commit().doing("commit a hold")
    }

    /// Makes a held (or removed-by-hand) user a candidate again.
    pub fn release(&self, user: &str, by: &str, now: DateTime<Utc>) -> Result<(), LedgerError> {
        match self.snapshot()?.members.get(user).map(|m| m.state) {
            Some(UserState::Held | UserState::RemovedByHand) => {}
            Some(state) => return Err(LedgerError::Refused(format!("{user} is {state}, not held"))),
            None => return Err(LedgerError::Refused(format!("{user} is not held"))),
        }
        let tx = self.tx()?;
        tx.execute("DELETE FROM members WHERE user = ?1", [user]).doing("release a user")?;
        audit(&tx, now, by, "release", None, Some(user), "released by an operator")?;
        tx.commit().doing("commit a release")
    }

    pub fn set_verdict(&self, batch: i64, verdict: &str) -> Result<(), LedgerError> {
        self.conn
            .execute("UPDATE batches SET verdict = ?2 WHERE id = ?1", params![batch, verdict])
            .doing("record a guard verdict")?;
        Ok(())
    }

    /// Records a dry-run plan line, so the audit log shows what `--commit` would have done.
    pub fn note(&self, actor: &str, action: &str, batch: Option<i64>, user: Option<&str>, reason: &str, now: DateTime<Utc>) -> Result<(), LedgerError> {
        audit(self.conn, now, actor, action, batch, user, reason)
    }

    /// Stores denials of batch members (duplicates by event ID are ignored).
    pub fn record_denials(&self, batch: i64, events: &[(String, DenialEvent)]) -> Result<(), LedgerError> {
        let tx = self.tx()?;
        for (event_id, e) in events {
            tx.execute(
                "INSERT OR IGNORE INTO guard_denials (batch, user, at, action, kind, code, message, event_id) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                params![batch, e.user, secs(e.at), e.action, e.kind.to_stored(), e.code, e.message, event_id],
            )
            .doing("record a denial")?;
        }
        tx.commit().doing("commit denials")
    }

    pub fn denials(&self, batch: i64) -> Result<Vec<DenialEvent>, LedgerError> {
        let mut stmt = self
            .conn
            .prepare("SELECT user, at, action, kind, code, message FROM guard_denials WHERE batch = ?1 ORDER BY at, user")
            .doing("read denials")?;
        stmt.query_map([batch], |r| {
            Ok(DenialEvent {
                user: r.get(0)?,
                at: time(r.get(1)?),
                action: r.get(2)?,
                kind: Attribution::from_stored(&r.get::<_, String>(3)?),
                code: r.get(4)?,
                message: r.get(5)?,
                source: None,
            })
        })
        .doing("read denials")?
        .collect::<Result<_, _>>()
        .doing("read denials")
    }

    pub fn source_health(&self) -> Result<SourceHealth, LedgerError> {
        self.conn
            .query_row("SELECT last_event_at, last_ok_poll, error FROM guard_source WHERE id = 1", [], |r| {
                Ok(SourceHealth {
                    last_event_at: r.get::<_, Option<i64>>(0)?.map(time),
                    last_ok_poll: r.get::<_, Option<i64>>(1)?.map(time),
                    error: r.get(2)?,
                })
            })
            .doing("read the event source's health")
    }

    pub fn set_source_health(&self, health: &SourceHealth) -> Result<(), LedgerError> {
        self.conn
            .execute(
                "UPDATE guard_source SET last_event_at = ?1, last_ok_poll = ?2, error = ?3 WHERE id = 1",
                params![health.last_event_at.map(secs), health.last_ok_poll.map(secs), health.error],
            )
            .doing("record the event source's health")?;
        Ok(())
    }
}

fn member(r: &Row) -> rusqlite::Result<Result<Member, LedgerError>> {
    let user: String = r.get(0)?;
    let state: String = r.get(1)?;
    let Some(state) = UserState::from_name(&state) else {
        return Ok(Err(LedgerError::Corrupt(format!("user {user} has unknown state {state:?}"))));
    };
    Ok(Ok(Member {
        user,
        state,
        batch: r.get(2)?,
        since: time(r.get(3)?),
        reason: r.get(4)?,
        hold_until: r.get::<_, Option<i64>>(5)?.map(time),
    }))
}

fn audit(conn: &Connection, at: DateTime<Utc>, actor: &str, action: &str, batch: Option<i64>, user: Option<&str>, reason: &str) -> Result<(), LedgerError> {
    conn.execute(
        "INSERT INTO audit (at, actor, action, batch, user, reason) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        params![secs(at), actor, action, batch, user, reason],
    )
    .doing("write the audit log")?;
    tracing::info!(actor, action, batch, user, reason, "audit");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conn() -> Connection {
        let conn = Connection::open_in_memory().unwrap();
        conn.execute_batch(SCHEMA).unwrap();
        conn
    }

    fn t(h: i64) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 3, 1, 0, 0, 0).unwrap() + chrono::Duration::hours(h)
    }

    fn users(names: &[&str]) -> Vec<(String, String)> {
        names.iter().map(|n| (n.to_string(), "clean".to_string())).collect()
    }

    #[test]
    fn a_batch_goes_from_journal_to_success_with_a_complete_audit() {
        let conn = conn();
        let ledger = Ledger::new(&conn);
        let id = ledger.start_batch("canary", &users(&["ann", "ben"]), "controller", t(0)).unwrap();
        let s = ledger.snapshot().unwrap();
        assert_eq!(s.batch(id).unwrap().state, BatchState::Applying);
        assert_eq!(s.members["ann"].state, UserState::Promoting);
        ledger.mark_locked("ann", "controller", t(0)).unwrap();
        ledger.mark_locked("ben", "controller", t(0)).unwrap();
        assert!(matches!(ledger.mark_locked("ben", "controller", t(0)), Err(LedgerError::Refused(_))));
        ledger.start_soak(id, t(24), t(0)).unwrap();
        ledger.succeed(id, "healthy", t(24)).unwrap();
        let s = ledger.snapshot().unwrap();
        assert_eq!(s.batch(id).unwrap().state, BatchState::Succeeded);
        assert_eq!(s.batch(id).unwrap().members, ["ann", "ben"]);
        let actions: Vec<_> = ledger.audit_log(100).unwrap().into_iter().map(|e| e.action).collect();
        assert_eq!(actions, ["promote", "promote", "locked", "locked", "soak", "succeed"]);
    }

    #[test]
    fn rollback_holds_members_and_refuses_twice() {
        let conn = conn();
        let ledger = Ledger::new(&conn);
        let id = ledger.start_batch("canary", &users(&["ann"]), "controller", t(0)).unwrap();
        ledger.mark_locked("ann", "controller", t(0)).unwrap();
        let users = ledger.begin_rollback(id, "ops", "manual", t(48), t(1)).unwrap();
        assert_eq!(users, ["ann"]);
        assert_eq!(ledger.snapshot().unwrap().members["ann"].state, UserState::RollingBack);
        let again = ledger.begin_rollback(id, "ops", "manual", t(48), t(2)).unwrap_err();
        assert!(again.to_string().contains("already rolled back"), "{again}");
        assert!(ledger.begin_rollback(99, "ops", "x", t(48), t(2)).unwrap_err().to_string().contains("no batch 99"));
        // Resume is refused until the removal finished.
        ledger.pause("controller", "guard spike", t(1)).unwrap();
        assert!(ledger.resume("ops", t(2)).unwrap_err().to_string().contains("still being rolled back"));
        ledger.mark_held("ann", "controller", t(1)).unwrap();
        let member = &ledger.snapshot().unwrap().members["ann"];
        assert_eq!((member.state, member.hold_until), (UserState::Held, Some(t(48))));
        ledger.resume("ops", t(2)).unwrap();
    }

    #[test]
    fn undefined_operator_transitions_answer_and_change_nothing() {
        let conn = conn();
        let ledger = Ledger::new(&conn);
        assert!(ledger.resume("ops", t(0)).unwrap_err().to_string().contains("not paused"));
        ledger.pause("ops", "holiday freeze", t(0)).unwrap();
        let before = ledger.snapshot().unwrap();
        assert!(ledger.pause("bob", "again", t(1)).unwrap_err().to_string().contains("already paused by ops"));
        assert_eq!(ledger.snapshot().unwrap(), before);
        assert!(ledger.release("zed", "ops", t(1)).unwrap_err().to_string().contains("not held"));
        ledger.hold("zed", "ops", "vendor laptop", t(1)).unwrap();
        assert!(ledger.hold("zed", "ops", "again", t(1)).unwrap_err().to_string().contains("already held"));
        ledger.release("zed", "ops", t(2)).unwrap();
        assert!(!ledger.snapshot().unwrap().members.contains_key("zed"));
    }

    #[test]
    fn the_audit_log_is_append_only() {
        let conn = conn();
        Ledger::new(&conn).pause("ops", "x", t(0)).unwrap();
        assert!(conn.execute("UPDATE audit SET actor = 'someone else'", []).is_err());
        assert!(conn.execute("DELETE FROM audit", []).is_err());
    }
}
