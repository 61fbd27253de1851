//! The rollout ledger in SQLite: users' states, batches, the pause switch, finished waves, the
//! guard's observations, and the append-only audit log.
//!
//! Each operation is one transaction that changes state *and* writes its audit line, so the log
//! is complete whatever happens afterwards. Intent (`promoting`, `rolling_back`) is written
//! before the IAM call it announces; the controller's reconcile step finishes the job after a
//! crash. Operator commands check the current state and refuse undefined transitions with a
//! clear answer instead of half-applying them.

use std::collections::BTreeMap;

use chrono::{DateTime, TimeZone, Utc};
use rusqlite::{Connection, OptionalExtension, Row, TransactionBehavior, params};

use super::{Doing, Ledger, NewBatch, Removal, RollbackRequest, Store, StoreError};
use crate::exemption::{ExemptionState, Grant, Record as ExemptionRecord};
use crate::guard::{Attribution, DenialEvent, SourceHealth, VerdictKind};
use crate::rollout::{AuditEntry, Batch, BatchState, Member, Pause, Snapshot, UserState};

/// Store migration 2: the ledger tables.
pub(super) const SCHEMA_V2: &str = "
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

/// Store migration 3: a batch records its soak when it starts (so removing its wave from the
/// configuration later does not change it) and its verdict's kind (what code matches on; the
/// verdict text is for people). Verdicts written before keep their kind from their text.
pub(super) const SCHEMA_V3: &str = "
ALTER TABLE batches ADD COLUMN soak_seconds INTEGER;
ALTER TABLE batches ADD COLUMN verdict_kind TEXT;
UPDATE batches SET verdict_kind = CASE
    WHEN verdict LIKE 'healthy%' THEN 'healthy'
    WHEN verdict LIKE 'spike%' THEN 'spike'
    WHEN verdict LIKE 'inconclusive%' THEN 'inconclusive'
END WHERE verdict IS NOT NULL;
";

/// Store migration 5: ownership as a fact. Users found in the lockdown group whom lockstep did not
/// add (or no longer wants there) are recorded here: never planned, never rolled back, never
/// removed, by any path, until they leave the group.
pub(super) const SCHEMA_V5: &str = "
CREATE TABLE foreign_members (user TEXT PRIMARY KEY, since INTEGER NOT NULL);
";

/// Store migration (appended after 5): adds lockstep journaled and has not yet seen land. Such an
/// add may still reach IAM after a crash and a rollback, so a held user found back in the group
/// is lockstep's own late write, not a hand-added member. Promoting users get their mark.
pub(super) const SCHEMA_ADDS_IN_FLIGHT: &str = "
CREATE TABLE adds_in_flight (user TEXT PRIMARY KEY, since INTEGER NOT NULL);
INSERT INTO adds_in_flight (user, since) SELECT user, since FROM members WHERE state = 'promoting';
";

/// Store migration (appended after 7): each guard denial records where the call came from (the
/// VPC endpoint or the source address), so that reports on locked users can name it; denials
/// are read by time for the watch over locked users.
pub(super) const SCHEMA_DENIAL_SOURCE: &str = "
ALTER TABLE guard_denials ADD COLUMN source TEXT;
CREATE INDEX guard_denials_by_time ON guard_denials (at, user);
";

/// Store migration (appended after 8): exemptions with who granted them, why, until when, and where
/// they stand (`granting`/`expiring` are intents journaled before the IAM tag write).
pub(super) const SCHEMA_EXEMPTIONS: &str = "
CREATE TABLE exemptions (
    user TEXT PRIMARY KEY,
    state TEXT NOT NULL,
    until INTEGER,
    reason TEXT NOT NULL,
    by TEXT NOT NULL,
    at INTEGER NOT NULL,
    changed_at INTEGER NOT NULL
);
";

fn secs(t: DateTime<Utc>) -> i64 {
    t.timestamp()
}

fn time(secs: i64) -> DateTime<Utc> {
    Utc.timestamp_opt(secs, 0).single().unwrap_or_default()
}

fn fmt_time(t: DateTime<Utc>) -> String {
    t.format("%Y-%m-%d %H:%M:%SZ").to_string()
}

impl Store {
    /// Runs `f` in one IMMEDIATE transaction: the write lock is taken first, so a check and the
    /// write that follows it see the same state whichever process runs concurrently.
    fn write<R>(&self, what: &str, f: impl FnOnce(&Connection) -> Result<R, StoreError>) -> Result<R, StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate).doing(what)?;
        let result = f(&tx)?;
        tx.commit().doing(what)?;
        Ok(result)
    }
}

impl Ledger for Store {
    fn snapshot(&self) -> Result<Snapshot, StoreError> {
        snapshot(&self.conn())
    }

    fn audit_log(&self, limit: usize) -> Result<Vec<AuditEntry>, StoreError> {
        let doing = "reading the audit log";
        let conn = self.conn();
        let mut stmt = conn
            .prepare("SELECT at, actor, action, batch, user, reason FROM (SELECT * FROM audit ORDER BY id DESC LIMIT ?1) ORDER BY id")
            .doing(doing)?;
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
        .doing(doing)?
        .collect::<Result<_, _>>()
        .doing(doing)
    }

    /// Written before any IAM call: the batch, its members, one audit line each.
    fn start_batch(&self, batch: &NewBatch<'_>, actor: &str, now: DateTime<Utc>) -> Result<i64, StoreError> {
        self.write("recording a batch", |tx| {
            tx.execute(
                "INSERT INTO batches (wave, state, created_at, soak_seconds) VALUES (?1, 'applying', ?2, ?3)",
                params![batch.wave, secs(now), batch.soak.num_seconds()],
            )
            .doing("recording a batch")?;
            let id = tx.last_insert_rowid();
            for (user, why) in batch.users {
                if is_foreign(tx, user)? {
                    return Err(StoreError::Refused(format!("{user} is in the lockdown group by someone else's hand; lockstep never plans them")));
                }
                tx.execute("INSERT INTO batch_members (batch, user) VALUES (?1, ?2)", params![id, user])
                    .doing("recording a batch member")?;
                tx.execute(
                    "INSERT INTO members (user, state, batch, since, reason, hold_until) VALUES (?1, 'promoting', ?2, ?3, ?4, NULL)
                     ON CONFLICT(user) DO UPDATE SET state = 'promoting', batch = ?2, since = ?3, reason = ?4, hold_until = NULL",
                    params![user, id, secs(now), why],
                )
                .doing("journaling a promotion")?;
                tx.execute(
                    "INSERT INTO adds_in_flight (user, since) VALUES (?1, ?2) ON CONFLICT(user) DO UPDATE SET since = ?2",
                    params![user, secs(now)],
                )
                .doing("journaling a promotion")?;
                audit(tx, now, actor, "promote", Some(id), Some(user), &format!("wave {}: {why}", batch.wave))?;
            }
            Ok(id)
        })
    }

    fn mark_locked(&self, user: &str, actor: &str, now: DateTime<Utc>) -> Result<(), StoreError> {
        self.write("updating a member", |tx| {
            move_user(tx, user, UserState::Promoting, UserState::Locked, actor, "added to the lockdown group", now)
        })
    }

    fn mark_held(&self, user: &str, actor: &str, now: DateTime<Utc>) -> Result<(), StoreError> {
        self.write("updating a member", |tx| {
            move_user(tx, user, UserState::RollingBack, UserState::Held, actor, "removed from the lockdown group", now)
        })
    }

    fn mark_removed_by_hand(&self, user: &str, now: DateTime<Utc>) -> Result<(), StoreError> {
        self.write("updating a member", |tx| {
            move_user(
                tx,
                user,
                UserState::Locked,
                UserState::RemovedByHand,
                "controller",
                "found removed from the lockdown group by someone else; not re-added without an operator",
                now,
            )
        })
    }

    fn start_soak(&self, batch: i64, soak_until: DateTime<Utc>, now: DateTime<Utc>) -> Result<(), StoreError> {
        self.write("starting a soak", |tx| {
            let changed = tx
                .execute(
                    "UPDATE batches SET state = 'soaking', applied_at = ?2, soak_until = ?3 WHERE id = ?1 AND state = 'applying'",
                    params![batch, secs(now), secs(soak_until)],
                )
                .doing("starting a soak")?;
            if changed == 1 {
                audit(tx, now, "controller", "soak", Some(batch), None, &format!("all members locked; soaking until {}", fmt_time(soak_until)))?;
            }
            Ok(())
        })
    }

    fn succeed(&self, batch: i64, detail: &str, now: DateTime<Utc>) -> Result<(), StoreError> {
        self.write("finishing a batch", |tx| {
            let changed = tx
                .execute(
                    "UPDATE batches SET state = 'succeeded', finished_at = ?2 WHERE id = ?1 AND state = 'soaking'",
                    params![batch, secs(now)],
                )
                .doing("finishing a batch")?;
            if changed == 1 {
                audit(tx, now, "controller", "succeed", Some(batch), None, detail)?;
            }
            Ok(())
        })
    }

    fn finish_wave(&self, wave: &str, why: &str, now: DateTime<Utc>) -> Result<(), StoreError> {
        self.write("finishing a wave", |tx| {
            let added = tx
                .execute(
                    "INSERT OR IGNORE INTO waves_done (wave, finished_at, why) VALUES (?1, ?2, ?3)",
                    params![wave, secs(now), why],
                )
                .doing("finishing a wave")?;
            if added == 1 {
                audit(tx, now, "controller", "finish_wave", None, None, &format!("wave {wave}: {why}"))?;
            }
            Ok(())
        })
    }

    /// The batch ends `rolled_back`, its locked or promoting members become `rolling_back` (to
    /// be removed, then held until `hold_until`). Refuses batches lockstep never applied or
    /// already rolled back.
    fn begin_rollback(&self, rollback: &RollbackRequest<'_>, now: DateTime<Utc>) -> Result<Vec<String>, StoreError> {
        let RollbackRequest { batch, actor, reason, hold_until, pause, requeue } = *rollback;
        let bystander_reason = format!("rolled back with batch {batch}, not at fault");
        self.write("journaling a rollback", |tx| {
            let state: Option<(String, Option<i64>)> = tx
                .query_row("SELECT state, finished_at FROM batches WHERE id = ?1", [batch], |r| Ok((r.get(0)?, r.get(1)?)))
                .optional()
                .doing("reading a batch")?;
            let Some((state, finished)) = state else {
                return Err(StoreError::Refused(format!("there is no batch {batch}")));
            };
            match BatchState::from_name(&state) {
                Some(BatchState::Applying | BatchState::Soaking | BatchState::Succeeded) => {}
                Some(BatchState::RolledBack) => {
                    return Err(StoreError::Refused(format!(
                        "batch {batch} was already rolled back at {}",
                        finished.map(time).map(fmt_time).unwrap_or_default()
                    )));
                }
                None => return Err(StoreError::Refused(format!("batch {batch} is {state}: lockstep never applied it, so there is nothing to roll back"))),
            }
            tx.execute("UPDATE batches SET state = 'rolled_back', finished_at = ?2 WHERE id = ?1", params![batch, secs(now)])
                .doing("rolling back a batch")?;
            audit(tx, now, actor, "rollback", Some(batch), None, reason)?;
            let mut stmt = tx
                .prepare("SELECT user FROM members WHERE batch = ?1 AND state IN ('promoting', 'locked')
                     AND user NOT IN (SELECT user FROM foreign_members) ORDER BY user")
                .doing("reading batch members")?;
            let users = stmt
                .query_map([batch], |r| r.get::<_, String>(0))
                .doing("reading batch members")?
                .collect::<Result<Vec<_>, _>>()
                .doing("reading batch members")?;
            for user in &users {
                let (reason, hold_until) = match requeue {
                    Some(requeue) if requeue.users.contains(user) => (bystander_reason.as_str(), requeue.until),
                    _ => (reason, hold_until),
                };
                tx.execute(
                    "UPDATE members SET state = 'rolling_back', since = ?2, reason = ?3, hold_until = ?4 WHERE user = ?1",
                    params![user, secs(now), reason, secs(hold_until)],
                )
                .doing("journaling a removal")?;
                audit(tx, now, actor, "rolling_back", Some(batch), Some(user), reason)?;
            }
            if let Some(why) = pause
                && read_pause(tx)?.is_none() {
                    set_pause(tx, actor, why, now)?;
                }
            Ok(users)
        })
    }

    fn pause(&self, by: &str, reason: &str, now: DateTime<Utc>) -> Result<(), StoreError> {
        self.write("pausing", |tx| {
            if let Some(pause) = read_pause(tx)? {
                return Err(StoreError::Refused(format!(
                    "already paused by {} since {}: {}",
                    pause.by,
                    fmt_time(pause.at),
                    pause.reason
                )));
            }
            set_pause(tx, by, reason, now)
        })
    }

    fn resume(&self, by: &str, now: DateTime<Utc>) -> Result<(), StoreError> {
        self.write("resuming", |tx| {
            let Some(pause) = read_pause(tx)? else {
                return Err(StoreError::Refused("the rollout is not paused".to_string()));
            };
            if let Some(m) = members(tx)?.into_values().find(|m| m.state == UserState::RollingBack) {
                return Err(StoreError::Refused(format!(
                    "batch {} is still being rolled back ({} not yet removed); resume once it is done",
                    m.batch.unwrap_or_default(),
                    m.user
                )));
            }
            tx.execute("UPDATE rollout_state SET paused = 0, pause_reason = NULL, paused_by = NULL, paused_at = NULL WHERE id = 1", [])
                .doing("resuming")?;
            audit(tx, now, by, "resume", None, None, &format!("was paused by {}: {}", pause.by, pause.reason))
        })
    }

    fn hold(&self, user: &str, by: &str, reason: &str, now: DateTime<Utc>) -> Result<(), StoreError> {
        self.write("holding a user", |tx| {
            if let Some(m) = member_by_name(tx, user)? {
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
                return Err(StoreError::Refused(refusal));
            }
            tx.execute(
                "INSERT INTO members (user, state, batch, since, reason, hold_until) VALUES (?1, 'held', NULL, ?2, ?3, NULL)",
                params![user, secs(now), reason],
            )
            .doing("holding a user")?;
            audit(tx, now, by, "hold", None, Some(user), reason)
        })
    }

    fn release(&self, user: &str, by: &str, now: DateTime<Utc>) -> Result<(), StoreError> {
        self.write("releasing a user", |tx| {
            match member_by_name(tx, user)?.map(|m| m.state) {
                Some(UserState::Held | UserState::RemovedByHand) => {}
                Some(state) => return Err(StoreError::Refused(format!("{user} is {state}, not held"))),
                None => return Err(StoreError::Refused(format!("{user} is not held"))),
            }
            tx.execute("DELETE FROM members WHERE user = ?1", [user]).doing("releasing a user")?;
            audit(tx, now, by, "release", None, Some(user), "released by an operator")
        })
    }

    fn request_promotion(&self, by: &str, now: DateTime<Utc>) -> Result<(), StoreError> {
        self.write("requesting a promotion", |tx| {
            if let Some(pause) = read_pause(tx)? {
                return Err(StoreError::Refused(format!("the rollout is paused ({}); resume it first", pause.reason)));
            }
            audit(tx, now, by, "promote_next", None, None, "start the next batch now (eligibility still applies)")
        })
    }

    fn set_verdict(&self, batch: i64, kind: VerdictKind, summary: &str) -> Result<(), StoreError> {
        self.conn()
            .execute(
                "UPDATE batches SET verdict = ?2, verdict_kind = ?3 WHERE id = ?1",
                params![batch, summary, kind.as_str()],
            )
            .doing("recording a guard verdict")?;
        Ok(())
    }

    fn note(&self, actor: &str, action: &str, reason: &str, now: DateTime<Utc>) -> Result<(), StoreError> {
        audit(&self.conn(), now, actor, action, None, None, reason)
    }

    fn record_denials(&self, batch: i64, events: &[(String, DenialEvent)]) -> Result<(), StoreError> {
        self.write("recording denials", |tx| {
            for (event_id, event) in events {
                insert_denial(tx, batch, event_id, event)?;
            }
            Ok(())
        })
    }

    fn record_locked_denials(&self, events: &[(i64, String, DenialEvent)]) -> Result<Vec<DenialEvent>, StoreError> {
        self.write("recording denials of locked users", |tx| {
            let mut new = Vec::new();
            for (batch, event_id, event) in events {
                if insert_denial(tx, *batch, event_id, event)? {
                    new.push(event.clone());
                }
            }
            Ok(new)
        })
    }

    fn denials(&self, batch: i64) -> Result<Vec<DenialEvent>, StoreError> {
        read_denials(
            &self.conn(),
            "SELECT user, at, action, kind, code, message, source FROM guard_denials WHERE batch = ?1 ORDER BY at, user",
            batch,
        )
    }

    fn denials_since(&self, since: DateTime<Utc>) -> Result<Vec<DenialEvent>, StoreError> {
        // A user's denial recorded under two batches (rolled back, promoted again) is one denial.
        read_denials(
            &self.conn(),
            "SELECT user, at, action, kind, code, message, source FROM guard_denials WHERE at >= ?1
             GROUP BY user, event_id ORDER BY at, user",
            secs(since),
        )
    }

    fn begin_removal(&self, removal: &Removal<'_>, now: DateTime<Utc>) -> Result<(), StoreError> {
        let Removal { user, actor, reason, hold_until } = *removal;
        self.write("journaling a removal", |tx| {
            let Some(member) = member_by_name(tx, user)? else {
                return Err(StoreError::Refused(format!("{user} is not in the rollout")));
            };
            if member.state != UserState::Locked {
                return Err(StoreError::Refused(format!("{user} is {}, not locked", member.state)));
            }
            tx.execute(
                "UPDATE members SET state = 'rolling_back', since = ?2, reason = ?3, hold_until = ?4 WHERE user = ?1",
                params![user, secs(now), reason, secs(hold_until)],
            )
            .doing("journaling a removal")?;
            audit(tx, now, actor, "rolling_back", member.batch, Some(user), reason)
        })
    }

    fn source_health(&self) -> Result<SourceHealth, StoreError> {
        self.conn()
            .query_row("SELECT last_event_at, last_ok_poll, error FROM guard_source WHERE id = 1", [], |r| {
                Ok(SourceHealth {
                    last_event_at: r.get::<_, Option<i64>>(0)?.map(time),
                    last_ok_poll: r.get::<_, Option<i64>>(1)?.map(time),
                    error: r.get(2)?,
                })
            })
            .doing("reading the event source's health")
    }

    fn set_source_health(&self, health: &SourceHealth) -> Result<(), StoreError> {
        self.conn()
            .execute(
                "UPDATE guard_source SET last_event_at = ?1, last_ok_poll = ?2, error = ?3 WHERE id = 1",
                params![health.last_event_at.map(secs), health.last_ok_poll.map(secs), health.error],
            )
            .doing("recording the event source's health")?;
        Ok(())
    }

    fn record_foreign(&self, user: &str, why: &str, now: DateTime<Utc>) -> Result<(), StoreError> {
        self.write("recording a member lockstep did not add", |tx| {
            let added = tx
                .execute(
                    "INSERT OR IGNORE INTO foreign_members (user, since) VALUES (?1, ?2)",
                    params![user, secs(now)],
                )
                .doing("recording a member lockstep did not add")?;
            if added == 1 {
                audit(tx, now, "controller", "foreign", None, Some(user), why)?;
            }
            Ok(())
        })
    }

    fn reclaim_late_add(&self, user: &str, why: &str, now: DateTime<Utc>) -> Result<(), StoreError> {
        self.write("reclaiming a late add", |tx| {
            if tx
                .query_row("SELECT 1 FROM adds_in_flight WHERE user = ?1", [user], |_| Ok(()))
                .optional()
                .doing("reading adds in flight")?
                .is_none()
            {
                return Err(StoreError::Refused(format!("lockstep has no add of {user} in flight")));
            }
            move_user(tx, user, UserState::Held, UserState::RollingBack, "controller", why, now)
        })
    }

    fn settle_add(&self, user: &str) -> Result<(), StoreError> {
        self.write("settling an add", |tx| {
            tx.execute("DELETE FROM adds_in_flight WHERE user = ?1", [user]).doing("settling an add")?;
            Ok(())
        })
    }

    fn forget_foreign(&self, user: &str, now: DateTime<Utc>) -> Result<(), StoreError> {
        self.write("forgetting a member lockstep did not add", |tx| {
            let gone = tx
                .execute("DELETE FROM foreign_members WHERE user = ?1", [user])
                .doing("forgetting a member lockstep did not add")?;
            if gone == 1 {
                audit(
                    tx,
                    now,
                    "controller",
                    "foreign_left",
                    None,
                    Some(user),
                    "no longer in the lockdown group; lockstep may plan them again",
                )?;
            }
            Ok(())
        })
    }

    fn begin_exemption(&self, grant: &Grant<'_>, now: DateTime<Utc>) -> Result<(), StoreError> {
        let doing = "journaling an exemption";
        self.write(doing, |tx| {
            tx.execute(
                "INSERT INTO exemptions (user, state, until, reason, by, at, changed_at) VALUES (?1, 'granting', ?2, ?3, ?4, ?5, ?5)
                 ON CONFLICT (user) DO UPDATE SET state = 'granting', until = ?2, reason = ?3, by = ?4, at = ?5, changed_at = ?5",
                params![grant.user, secs(grant.until), grant.reason, grant.by, secs(now)],
            )
            .doing(doing)?;
            let why = format!("until {}: {}", fmt_time(grant.until), grant.reason);
            audit(tx, now, grant.by, "exempt", None, Some(grant.user), &why)
        })
    }

    fn mark_exemption(
        &self,
        user: &str,
        state: ExemptionState,
        actor: &str,
        now: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        let doing = "recording an exemption's state";
        self.write(doing, |tx| {
            // An exemption set by hand is recorded as the daemon finds it.
            tx.execute(
                "INSERT INTO exemptions (user, state, until, reason, by, at, changed_at) VALUES (?1, ?2, NULL, '', '', ?3, ?3)
                 ON CONFLICT (user) DO UPDATE SET state = ?2, changed_at = ?3",
                params![user, state.as_str(), secs(now)],
            )
            .doing(doing)?;
            let why = match state {
                ExemptionState::Granting => "tags to be written",
                ExemptionState::Granted => "exemption tags set in IAM",
                ExemptionState::Expiring => "expired; removing the exemption tags",
                ExemptionState::Expired => "exemption tags removed; judged like anyone else",
            };
            audit(tx, now, actor, &format!("exemption_{state}"), None, Some(user), why)
        })
    }

    fn exemption_records(&self) -> Result<Vec<ExemptionRecord>, StoreError> {
        let doing = "reading exemptions";
        let conn = self.conn();
        let mut stmt = conn
            .prepare("SELECT user, state, until, reason, by, at, changed_at FROM exemptions ORDER BY user")
            .doing(doing)?;
        let rows = stmt
            .query_map([], |r| {
                let state: String = r.get(1)?;
                Ok((
                    ExemptionRecord {
                        user: r.get(0)?,
                        state: ExemptionState::Granting,
                        until: r.get::<_, Option<i64>>(2)?.map(time),
                        reason: r.get(3)?,
                        by: r.get(4)?,
                        at: time(r.get(5)?),
                        changed_at: time(r.get(6)?),
                    },
                    state,
                ))
            })
            .doing(doing)?;
        let mut records = Vec::new();
        for row in rows {
            let (mut record, state) = row.doing(doing)?;
            record.state = ExemptionState::from_name(&state).ok_or_else(|| StoreError::Corrupt {
                doing: doing.to_string(),
                what: format!("exemption of {} has unknown state {state:?}", record.user),
            })?;
            records.push(record);
        }
        Ok(records)
    }
}

/// `from -> to` for `user` with its audit line, refused when the user is not `from`. A user
/// recorded `locked` was seen in the group: lockstep's add has landed.
fn move_user(
    tx: &Connection,
    user: &str,
    from: UserState,
    to: UserState,
    actor: &str,
    why: &str,
    now: DateTime<Utc>,
) -> Result<(), StoreError> {
    let batch: Option<Option<i64>> = tx
        .query_row("SELECT batch FROM members WHERE user = ?1 AND state = ?2", params![user, from.as_str()], |r| {
            r.get(0)
        })
        .optional()
        .doing("reading a member")?;
    let Some(batch) = batch else {
        return Err(StoreError::Refused(format!("{user} is not {from}")));
    };
    tx.execute("UPDATE members SET state = ?2, since = ?3 WHERE user = ?1", params![user, to.as_str(), secs(now)])
        .doing("updating a member")?;
    if to == UserState::Locked {
        tx.execute("DELETE FROM adds_in_flight WHERE user = ?1", [user]).doing("settling an add")?;
    }
    audit(tx, now, actor, to.as_str(), batch, Some(user), why)
}

fn snapshot(conn: &Connection) -> Result<Snapshot, StoreError> {
    let paused = read_pause(conn)?;
    let mut stmt = conn.prepare("SELECT wave, finished_at FROM waves_done").doing("reading finished waves")?;
    let waves_done = stmt
        .query_map([], |r| Ok((r.get::<_, String>(0)?, time(r.get(1)?))))
        .doing("reading finished waves")?
        .collect::<Result<_, _>>()
        .doing("reading finished waves")?;
    let foreign = users_since(conn, "foreign_members")?;
    let adds_in_flight = users_since(conn, "adds_in_flight")?;
    Ok(Snapshot { paused, waves_done, batches: batches(conn)?, members: members(conn)?, foreign, adds_in_flight })
}

/// A `(user, since)` table (members lockstep did not add, adds in flight) by user.
fn users_since(conn: &Connection, table: &str) -> Result<BTreeMap<String, DateTime<Utc>>, StoreError> {
    let doing = format!("reading {table}");
    let mut stmt = conn.prepare(&format!("SELECT user, since FROM {table}")).doing(&doing)?;
    stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, time(r.get(1)?))))
        .doing(&doing)?
        .collect::<Result<_, _>>()
        .doing(&doing)
}

/// Records one denial under `batch`; whether it was new (duplicates by event ID are ignored).
fn insert_denial(tx: &Connection, batch: i64, event_id: &str, e: &DenialEvent) -> Result<bool, StoreError> {
    let added = tx
        .execute(
            "INSERT OR IGNORE INTO guard_denials (batch, user, at, action, kind, code, message, event_id, source)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
            params![batch, e.user, secs(e.at), e.action, e.kind.to_stored(), e.code, e.message, event_id, e.source],
        )
        .doing("recording a denial")?;
    Ok(added == 1)
}

/// Reads denials with `query`, whose one parameter is `param` and whose columns are user, at,
/// action, kind, code, message, source.
fn read_denials(conn: &Connection, query: &str, param: i64) -> Result<Vec<DenialEvent>, StoreError> {
    let doing = "reading denials";
    let mut stmt = conn.prepare(query).doing(doing)?;
    stmt.query_map([param], |r| {
        Ok(DenialEvent {
            user: r.get(0)?,
            at: time(r.get(1)?),
            action: r.get(2)?,
            kind: Attribution::from_stored(&r.get::<_, String>(3)?),
            code: r.get(4)?,
            message: r.get(5)?,
            source: r.get(6)?,
        })
    })
    .doing(doing)?
    .collect::<Result<_, _>>()
    .doing(doing)
}

fn is_foreign(conn: &Connection, user: &str) -> Result<bool, StoreError> {
    conn.query_row("SELECT 1 FROM foreign_members WHERE user = ?1", [user], |_| Ok(()))
        .optional()
        .doing("reading foreign members")
        .map(|found| found.is_some())
}

fn read_pause(conn: &Connection) -> Result<Option<Pause>, StoreError> {
    let (paused, reason, by, at) = conn
        .query_row("SELECT paused, pause_reason, paused_by, paused_at FROM rollout_state WHERE id = 1", [], |r| {
            Ok((
                r.get::<_, bool>(0)?,
                r.get::<_, Option<String>>(1)?,
                r.get::<_, Option<String>>(2)?,
                r.get::<_, Option<i64>>(3)?,
            ))
        })
        .doing("reading the pause switch")?;
    Ok(paused.then(|| Pause {
        reason: reason.unwrap_or_default(),
        by: by.unwrap_or_default(),
        at: time(at.unwrap_or(0)),
    }))
}

fn set_pause(conn: &Connection, by: &str, reason: &str, now: DateTime<Utc>) -> Result<(), StoreError> {
    conn.execute(
        "UPDATE rollout_state SET paused = 1, pause_reason = ?1, paused_by = ?2, paused_at = ?3 WHERE id = 1",
        params![reason, by, secs(now)],
    )
    .doing("pausing")?;
    audit(conn, now, by, "pause", None, None, reason)
}

const MEMBER_COLUMNS: &str = "SELECT user, state, batch, since, reason, hold_until FROM members";

fn members(conn: &Connection) -> Result<BTreeMap<String, Member>, StoreError> {
    let doing = "reading members";
    let mut stmt = conn.prepare(&format!("{MEMBER_COLUMNS} ORDER BY user")).doing(doing)?;
    stmt.query_map([], member)
        .doing(doing)?
        .collect::<Result<Vec<_>, _>>()
        .doing(doing)?
        .into_iter()
        .map(|m| m.map(|m| (m.user.clone(), m)))
        .collect()
}

fn member_by_name(conn: &Connection, user: &str) -> Result<Option<Member>, StoreError> {
    conn.query_row(&format!("{MEMBER_COLUMNS} WHERE user = ?1"), [user], member)
        .optional()
        .doing("reading a member")?
        .transpose()
}

fn batches(conn: &Connection) -> Result<Vec<Batch>, StoreError> {
    let doing = "reading batches";
    let mut stmt = conn
        .prepare("SELECT id, wave, state, created_at, applied_at, soak_until, finished_at, verdict, verdict_kind, soak_seconds FROM batches ORDER BY id")
        .doing(doing)?;
    let rows = stmt
        .query_map([], |r| {
            Ok((
                (r.get::<_, i64>(0)?, r.get::<_, String>(1)?, r.get::<_, String>(2)?, r.get::<_, i64>(3)?),
                (r.get::<_, Option<i64>>(4)?, r.get::<_, Option<i64>>(5)?, r.get::<_, Option<i64>>(6)?),
                (r.get::<_, Option<String>>(7)?, r.get::<_, Option<String>>(8)?, r.get::<_, Option<i64>>(9)?),
            ))
        })
        .doing(doing)?
        .collect::<Result<Vec<_>, _>>()
        .doing(doing)?;
    let mut members =
        conn.prepare("SELECT user FROM batch_members WHERE batch = ?1 ORDER BY user").doing("reading batch members")?;
    rows.into_iter()
        .map(|((id, wave, state, created), (applied, soak_until, finished), (verdict, verdict_kind, soak))| {
            let corrupt = |what: String| StoreError::Corrupt { doing: doing.to_string(), what };
            let state = BatchState::from_name(&state)
                .ok_or_else(|| corrupt(format!("batch {id} has unknown state {state:?}")))?;
            let verdict_kind = verdict_kind
                .map(|kind| {
                    VerdictKind::from_name(&kind)
                        .ok_or_else(|| corrupt(format!("batch {id} has unknown verdict kind {kind:?}")))
                })
                .transpose()?;
            let users = members
                .query_map([id], |r| r.get::<_, String>(0))
                .doing("reading batch members")?
                .collect::<Result<Vec<_>, _>>()
                .doing("reading batch members")?;
            Ok(Batch {
                id,
                wave,
                state,
                members: users,
                created_at: time(created),
                soak: soak.map(chrono::Duration::seconds),
                applied_at: applied.map(time),
                soak_until: soak_until.map(time),
                finished_at: finished.map(time),
                verdict,
                verdict_kind,
            })
        })
        .collect()
}

fn member(r: &Row) -> rusqlite::Result<Result<Member, StoreError>> {
    let user: String = r.get(0)?;
    let state: String = r.get(1)?;
    let Some(state) = UserState::from_name(&state) else {
        return Ok(Err(StoreError::Corrupt {
            doing: "reading members".to_string(),
            what: format!("user {user} has unknown state {state:?}"),
        }));
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

fn audit(
    conn: &Connection,
    at: DateTime<Utc>,
    actor: &str,
    action: &str,
    batch: Option<i64>,
    user: Option<&str>,
    reason: &str,
) -> Result<(), StoreError> {
    conn.execute(
        "INSERT INTO audit (at, actor, action, batch, user, reason) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        params![secs(at), actor, action, batch, user, reason],
    )
    .doing("writing the audit log")?;
    tracing::info!(actor, action, batch, user, reason, "audit");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> Store {
        Store::open_in_memory().unwrap()
    }

    fn batch<'a>(users: &'a [(String, String)]) -> NewBatch<'a> {
        NewBatch { wave: "canary", users, soak: chrono::Duration::hours(24) }
    }

    fn rollback(batch: i64, reason: &str, hold_until: DateTime<Utc>) -> RollbackRequest<'_> {
        RollbackRequest { batch, actor: "ops", reason, hold_until, pause: None, requeue: None }
    }

    fn t(h: i64) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 3, 1, 0, 0, 0).unwrap() + chrono::Duration::hours(h)
    }

    fn users(names: &[&str]) -> Vec<(String, String)> {
        names.iter().map(|n| (n.to_string(), "clean".to_string())).collect()
    }

    #[test]
    fn an_exemption_is_journaled_with_its_operator_and_each_step_audited() {
        let ledger = store();
        let grant = Grant { user: "ann", until: t(48), reason: "vendor VPN", by: "maria" };
        ledger.begin_exemption(&grant, t(0)).unwrap();
        ledger.mark_exemption("ann", ExemptionState::Granted, "maria", t(0)).unwrap();
        ledger.mark_exemption("ann", ExemptionState::Expiring, "controller", t(48)).unwrap();
        ledger.mark_exemption("ann", ExemptionState::Expired, "controller", t(48)).unwrap();
        // Found set by hand with an end: recorded as found.
        ledger.mark_exemption("bob", ExemptionState::Expiring, "controller", t(50)).unwrap();
        let records = ledger.exemption_records().unwrap();
        assert_eq!(records.len(), 2);
        let ann = &records[0];
        assert_eq!(
            (ann.state, ann.until, ann.by.as_str(), ann.reason.as_str()),
            (ExemptionState::Expired, Some(t(48)), "maria", "vendor VPN")
        );
        assert_eq!((ann.at, ann.changed_at), (t(0), t(48)));
        assert_eq!((records[1].state, records[1].until, records[1].by.as_str()), (ExemptionState::Expiring, None, ""));
        let lines: Vec<_> = ledger.audit_log(10).unwrap().into_iter().map(|e| (e.actor, e.action, e.reason)).collect();
        assert_eq!(lines[0], ("maria".into(), "exempt".into(), "until 2026-03-03 00:00:00Z: vendor VPN".into()));
        let actions: Vec<_> = lines.iter().map(|(_, action, _)| action.as_str()).collect();
        assert_eq!(
            actions,
            ["exempt", "exemption_granted", "exemption_expiring", "exemption_expired", "exemption_expiring"]
        );
    }

    #[test]
    fn a_guard_rollback_holds_culprits_and_requeues_bystanders() {
        let ledger = store();
        let id = ledger.start_batch(&batch(&users(&["ann", "ben", "cat"])), "controller", t(0)).unwrap();
        for user in ["ann", "ben", "cat"] {
            ledger.mark_locked(user, "controller", t(0)).unwrap();
        }
        let bystanders = ["ben".to_string(), "cat".to_string()];
        let request = RollbackRequest {
            requeue: Some(super::super::Requeue { users: &bystanders, until: t(3) }),
            ..rollback(id, "guard: spike", t(48))
        };
        assert_eq!(
            ledger.begin_rollback(&request, t(1)).unwrap(),
            ["ann", "ben", "cat"],
            "the whole batch leaves the group"
        );
        let members = ledger.snapshot().unwrap().members;
        assert_eq!((members["ann"].hold_until, members["ann"].reason.as_deref()), (Some(t(48)), Some("guard: spike")));
        for user in bystanders {
            assert_eq!(members[&user].hold_until, Some(t(3)));
            assert_eq!(
                members[&user].reason.as_deref(),
                Some(format!("rolled back with batch {id}, not at fault").as_str())
            );
        }
        let audit = ledger.audit_log(100).unwrap();
        assert!(
            audit.iter().any(|e| e.user.as_deref() == Some("ben") && e.reason.contains("not at fault")),
            "{audit:?}"
        );
    }

    #[test]
    fn a_batch_goes_from_journal_to_success_with_a_complete_audit() {
        let ledger = store();
        let id = ledger.start_batch(&batch(&users(&["ann", "ben"])), "controller", t(0)).unwrap();
        let s = ledger.snapshot().unwrap();
        assert_eq!(s.batch(id).unwrap().state, BatchState::Applying);
        assert_eq!(s.members["ann"].state, UserState::Promoting);
        ledger.mark_locked("ann", "controller", t(0)).unwrap();
        ledger.mark_locked("ben", "controller", t(0)).unwrap();
        assert!(matches!(ledger.mark_locked("ben", "controller", t(0)), Err(StoreError::Refused(_))));
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
        let ledger = store();
        let id = ledger.start_batch(&batch(&users(&["ann"])), "controller", t(0)).unwrap();
        ledger.mark_locked("ann", "controller", t(0)).unwrap();
        let users = ledger.begin_rollback(&rollback(id, "manual", t(48)), t(1)).unwrap();
        assert_eq!(users, ["ann"]);
        assert_eq!(ledger.snapshot().unwrap().members["ann"].state, UserState::RollingBack);
        let again = ledger.begin_rollback(&rollback(id, "manual", t(48)), t(2)).unwrap_err();
        assert!(again.to_string().contains("already rolled back"), "{again}");
        assert!(
            ledger.begin_rollback(&rollback(99, "x", t(48)), t(2)).unwrap_err().to_string().contains("no batch 99")
        );
        // Resume is refused until the removal finished.
        ledger.pause("controller", "guard spike", t(1)).unwrap();
        assert!(ledger.resume("ops", t(2)).unwrap_err().to_string().contains("still being rolled back"));
        ledger.mark_held("ann", "controller", t(1)).unwrap();
        let member = &ledger.snapshot().unwrap().members["ann"];
        assert_eq!((member.state, member.hold_until), (UserState::Held, Some(t(48))));
        ledger.resume("ops", t(2)).unwrap();
    }

    #[test]
    fn a_locked_user_is_taken_out_alone_and_its_denials_keep_their_source() {
        use crate::guard::{Cause, Evidence};
        let ledger = store();
        let id = ledger.start_batch(&batch(&users(&["ann", "ben"])), "controller", t(0)).unwrap();
        ledger.mark_locked("ann", "controller", t(0)).unwrap();
        ledger.mark_locked("ben", "controller", t(0)).unwrap();
        let denial = |at: i64| DenialEvent {
            user: "ann".into(),
            at: t(at),
            action: "s3:PutObject".into(),
            kind: Attribution { cause: Cause::Lockdown, evidence: Evidence::Legacy { kind: "lockdown".into() } },
            code: "AccessDenied".into(),
            message: "denied".into(),
            source: Some("198.51.100.77".into()),
        };
        let events = [(id, "e1".to_string(), denial(2)), (id, "e2".to_string(), denial(3))];
        assert_eq!(ledger.record_locked_denials(&events).unwrap().len(), 2);
        assert!(ledger.record_locked_denials(&events).unwrap().is_empty(), "stored once, counted once");
        ledger.record_denials(id, &[("e2".to_string(), denial(3))]).unwrap();
        let since = ledger.denials_since(t(3)).unwrap();
        assert_eq!(since, [denial(3)], "one denial per event, with its source");
        assert_eq!(ledger.denials(id).unwrap()[0].source.as_deref(), Some("198.51.100.77"));

        let removal = Removal { user: "ann", actor: "controller", reason: "after its soak", hold_until: t(48) };
        ledger.begin_removal(&removal, t(4)).unwrap();
        let members = ledger.snapshot().unwrap().members;
        assert_eq!((members["ann"].state, members["ann"].hold_until), (UserState::RollingBack, Some(t(48))));
        assert_eq!(members["ben"].state, UserState::Locked, "the rest of the batch stays");
        assert!(ledger.begin_removal(&removal, t(5)).unwrap_err().to_string().contains("not locked"));
        let audit = ledger.audit_log(100).unwrap();
        assert!(audit.iter().any(|e| e.user.as_deref() == Some("ann") && e.reason == "after its soak"), "{audit:?}");
    }

    #[test]
    fn undefined_operator_transitions_answer_and_change_nothing() {
        let ledger = store();
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
    fn parallel_identical_commands_make_one_change_and_one_audit_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.db");
        Store::open(&path).unwrap();
        let outcomes: Vec<bool> = std::thread::scope(|scope| {
            let runs: Vec<_> = (0..6)
                .map(|_| scope.spawn(|| Store::open(&path).unwrap().pause("ops", "freeze", t(0)).is_ok()))
                .collect();
            runs.into_iter().map(|r| r.join().unwrap()).collect()
        });
        assert_eq!(outcomes.iter().filter(|ok| **ok).count(), 1, "{outcomes:?}");
        let audit = Store::open(&path).unwrap().audit_log(100).unwrap();
        assert_eq!(audit.iter().filter(|e| e.action == "pause").count(), 1);
    }

    #[test]
    fn a_member_lockstep_did_not_add_is_never_journaled_or_rolled_back() {
        let ledger = store();
        let id = ledger.start_batch(&batch(&users(&["ann", "zed"])), "controller", t(0)).unwrap();
        ledger.mark_locked("ann", "controller", t(0)).unwrap();
        ledger.mark_locked("zed", "controller", t(0)).unwrap();
        ledger.record_foreign("zed", "found in the group", t(1)).unwrap();
        ledger.record_foreign("zed", "again", t(2)).unwrap();
        ledger.record_foreign("kim", "found in the group", t(1)).unwrap();
        let refused = ledger.start_batch(&batch(&users(&["bob", "kim"])), "controller", t(2)).unwrap_err();
        assert!(matches!(refused, StoreError::Refused(_)), "{refused}");
        assert!(!ledger.snapshot().unwrap().members.contains_key("bob"), "the refused batch wrote nothing");
        assert_eq!(ledger.begin_rollback(&rollback(id, "manual", t(48)), t(3)).unwrap(), ["ann"]);
        let snapshot = ledger.snapshot().unwrap();
        assert_eq!(snapshot.members["zed"].state, UserState::Locked);
        assert_eq!(snapshot.foreign.keys().collect::<Vec<_>>(), ["kim", "zed"]);
        let foreign_lines = ledger.audit_log(100).unwrap().into_iter().filter(|e| e.action == "foreign").count();
        assert_eq!(foreign_lines, 2, "once per change");
        ledger.forget_foreign("kim", t(4)).unwrap();
        ledger.forget_foreign("kim", t(5)).unwrap();
        assert!(!ledger.snapshot().unwrap().foreign.contains_key("kim"));
        assert_eq!(ledger.audit_log(100).unwrap().into_iter().filter(|e| e.action == "foreign_left").count(), 1);
    }

    #[test]
    fn an_add_is_in_flight_from_its_journal_until_seen_in_the_group() {
        let ledger = store();
        let id = ledger.start_batch(&batch(&users(&["ann", "ben"])), "controller", t(0)).unwrap();
        ledger.mark_locked("ann", "controller", t(0)).unwrap();
        let in_flight = |ledger: &Store| ledger.snapshot().unwrap().adds_in_flight.into_keys().collect::<Vec<_>>();
        assert_eq!(in_flight(&ledger), ["ben"], "ann was seen in the group");
        // Rolled back before ben's add was seen: held, and his add still in flight.
        assert_eq!(ledger.begin_rollback(&rollback(id, "manual", t(48)), t(1)).unwrap(), ["ann", "ben"]);
        ledger.mark_held("ben", "controller", t(1)).unwrap();
        assert_eq!(in_flight(&ledger), ["ben"]);
        // The late add landed: back to rolling_back with an audit line, then out and settled.
        let refused = ledger.reclaim_late_add("ann", "late", t(2)).unwrap_err();
        assert!(matches!(refused, StoreError::Refused(_)), "{refused}");
        ledger.reclaim_late_add("ben", "late", t(2)).unwrap();
        assert_eq!(ledger.snapshot().unwrap().members["ben"].state, UserState::RollingBack);
        ledger.settle_add("ben").unwrap();
        ledger.mark_held("ben", "controller", t(2)).unwrap();
        assert!(in_flight(&ledger).is_empty());
        let ben: Vec<_> = ledger
            .audit_log(100)
            .unwrap()
            .into_iter()
            .filter(|e| e.user.as_deref() == Some("ben"))
            .map(|e| e.action)
            .collect();
        assert_eq!(ben, ["promote", "rolling_back", "held", "rolling_back", "held"]);
    }

    #[test]
    fn the_audit_log_is_append_only() {
        let store = store();
        store.pause("ops", "x", t(0)).unwrap();
        let conn = store.conn();
        assert!(conn.execute("UPDATE audit SET actor = 'someone else'", []).is_err());
        assert!(conn.execute("DELETE FROM audit", []).is_err());
    }
}
