//! Reading the stored evidence as history, hour by hour: the calls from outside the perimeter
//! and the recorded denials, for replaying a rollout over them (`lockstep backtest`).

use chrono::{DateTime, Utc};
use rusqlite::params;

use super::sqlite::{count, time};
use super::{Doing, Store, StoreError};
use crate::evidence::aggregate::hour_of;
use crate::evidence::{OutsideCalls, RecordedDenials};
use crate::perimeter::DenyReason;

impl Store {
    /// Every user-hour's calls from outside the perimeter in the hours overlapping
    /// `[since, until)`, summed across origins, in time order.
    pub fn outside_calls(&self, since: DateTime<Utc>, until: DateTime<Utc>) -> Result<Vec<OutsideCalls>, StoreError> {
        let doing = format!("reading calls from outside the perimeter from {since} to {until}");
        let doing = doing.as_str();
        let conn = self.conn();
        // The latest call wins within a user-hour and source, as the outside rows are kept.
        let mut stmt = conn
            .prepare_cached(
                "SELECT user_name, hour, source, sum(calls), max(last_seen),
                        substr(max(printf('%020d', last_seen) || char(31) || last_action || char(31) || last_reason), 22)
                 FROM (
                     SELECT user_name, hour, source, calls, last_seen, last_action, last_reason FROM stored_outside
                     WHERE hour >= ?1 AND hour < ?2
                     UNION ALL
                     SELECT e.user_name, e.hour, c.outside_source, e.calls, e.last_seen, c.action, c.reason
                     FROM evidence_call e JOIN request_context c ON c.id = e.context
                     WHERE e.hour >= ?1 AND e.hour < ?2 AND c.verdict = 'would_deny'
                 )
                 GROUP BY hour, user_name, source ORDER BY max(last_seen), user_name, source",
            )
            .doing(doing)?;
        let mut rows = stmt.query(params![hour_of(since).timestamp(), until.timestamp()]).doing(doing)?;
        let mut found = Vec::new();
        while let Some(row) = rows.next().doing(doing)? {
            let latest: String = row.get(5).doing(doing)?;
            let (action, reason) = latest.split_once('\u{1f}').unwrap_or((latest.as_str(), ""));
            found.push(OutsideCalls {
                user: row.get(0).doing(doing)?,
                hour: time(row.get(1).doing(doing)?, doing)?,
                source: row.get(2).doing(doing)?,
                calls: count(row.get(3).doing(doing)?),
                last_seen: time(row.get(4).doing(doing)?, doing)?,
                action: action.to_string(),
                reason: DenyReason::from_name(reason).ok_or_else(|| StoreError::Corrupt {
                    doing: doing.to_string(),
                    what: format!("deny reason {reason:?}"),
                })?,
            });
        }
        Ok(found)
    }

    /// Every user-hour with recorded denials in the hours overlapping `[since, until)`, summed
    /// across origins, in time order.
    pub fn recorded_denials(
        &self,
        since: DateTime<Utc>,
        until: DateTime<Utc>,
    ) -> Result<Vec<RecordedDenials>, StoreError> {
        let doing = format!("reading recorded denials from {since} to {until}");
        let doing = doing.as_str();
        let conn = self.conn();
        let mut stmt = conn
            .prepare_cached(
                "SELECT user_name, hour, coalesce(max(last_call), hour), sum(explicit_denials), sum(other_denials)
                 FROM evidence_hour WHERE hour >= ?1 AND hour < ?2
                 GROUP BY hour, user_name HAVING sum(explicit_denials) + sum(other_denials) > 0
                 ORDER BY hour, user_name",
            )
            .doing(doing)?;
        let mut rows = stmt.query(params![hour_of(since).timestamp(), until.timestamp()]).doing(doing)?;
        let mut found = Vec::new();
        while let Some(row) = rows.next().doing(doing)? {
            found.push(RecordedDenials {
                user: row.get(0).doing(doing)?,
                hour: time(row.get(1).doing(doing)?, doing)?,
                last_call: time(row.get(2).doing(doing)?, doing)?,
                explicit: count(row.get(3).doing(doing)?),
                other: count(row.get(4).doing(doing)?),
            });
        }
        Ok(found)
    }
}
