//! The guard's event feed from the CloudTrail table in Athena, for `guard.source: athena`.
//!
//! Each poll covers the window from the end of the previous poll's window minus
//! [`LATE_DELIVERY`] to now (the first poll, and the first after a long outage, reach back
//! `lookback` at most) and runs two queries over it, one after the other:
//!
//! 1. *denials*: every record of the account's IAM users whose error code is a denial
//!    (`AccessDenied*` or `*UnauthorizedOperation`, as [`Record::denial`] decides), with the
//!    fields the controller reads, the full error message included;
//! 2. *activity*: one row per IAM user active in the window with the time of their last call,
//!    returned as one synthetic successful record (event ID `activity/<user>/<time>`), so the
//!    controller counts the unpromoted cohort's active users without pulling every call.
//!
//! The windows overlap by [`LATE_DELIVERY`] because CloudTrail delivers records about five
//! minutes after the call (not guaranteed): a record that reaches the table later than that
//! after its `eventTime` is never seen by this feed. Records already returned are recognised by
//! event ID (an activity record's ID changes only when the user makes a newer call) and not
//! returned again; the IDs are kept while the window can still return them. The window only
//! advances when both queries succeed, so a failed poll is covered by the next one; its error
//! is a [`SourceError`], which the controller records as the source's health (the guard's
//! verdicts turn inconclusive when the source keeps failing, or stays silent, for longer than
//! `guard.silence_limit`). Like `TrailFeed`, nothing is persisted: after a restart the first
//! poll reaches back `lookback` again.
//!
//! Cost: two Athena queries per guard poll, each waiting for Athena (seconds), so this source
//! adds query latency to CloudTrail's delivery delay. Athena bills bytes scanned, at least
//! 10 MB per query. Both queries constrain the partition column(s) exactly as the evidence
//! queries do ([`crate::athena::sql`]), but partitions are whole days of delivery: each
//! query scans the account's trail data delivered so far today (and yesterday's around
//! midnight or on a first poll), however short the window. With the default one-minute
//! `guard.poll` that is 2,880 queries a day, each scanning up to a day of trail; choose a
//! `guard.poll` of several minutes for this source, or tail the files (`files`, `s3`:
//! [`crate::feed::TrailFeed`]) where latency and cost matter.

use std::collections::HashMap;
use std::sync::Arc;

use chrono::{DateTime, TimeDelta, Utc};

use crate::athena::client::{parse_rows, run_query};
use crate::athena::sql::from_window;
use crate::clock::Clock;
use crate::config;
use crate::evidence::SourceError;
use crate::feed::EventFeed;
use crate::trail::{Record, UserIdentity};

/// How far each [`AthenaFeed`] window reaches back before the previous window's end, for
/// records that reach the table late (CloudTrail typically delivers about 5 minutes after the
/// call). Records delivered later than this after their `eventTime` are missed.
pub const LATE_DELIVERY: TimeDelta = TimeDelta::minutes(15);

/// The guard's event feed from Athena's CloudTrail table (see the module documentation).
pub struct AthenaFeed {
    client: aws_sdk_athena::Client,
    athena: config::Athena,
    account_id: String,
    clock: Arc<dyn Clock>,
    /// How far back a fresh feed starts reading, and the most any window covers.
    lookback: TimeDelta,
    /// Where the last successful poll's window ended.
    window_end: Option<DateTime<Utc>>,
    seen: Seen,
}

impl AthenaFeed {
    /// A feed that polls Athena for the account's recent records.
    pub fn new(
        client: aws_sdk_athena::Client,
        athena: config::Athena,
        account_id: &str,
        clock: Arc<dyn Clock>,
        lookback: std::time::Duration,
    ) -> Self {
        AthenaFeed {
            client,
            athena,
            account_id: account_id.to_string(),
            clock,
            lookback: TimeDelta::from_std(lookback).unwrap_or(TimeDelta::hours(1)),
            window_end: None,
            seen: Seen::default(),
        }
    }

    async fn new_records(&mut self) -> Result<Vec<Record>, SourceError> {
        let (since, until) = poll_window(self.window_end, self.clock.now(), self.lookback);
        let denials = self.rows("denials", &denials_query(&self.athena, &self.account_id, since, until)).await?;
        let activity = self.rows("activity", &activity_query(&self.athena, &self.account_id, since, until)).await?;
        let (mut records, _) = parse_rows("denials", &denials, denial_record);
        records.extend(parse_rows("activity", &activity, |row| activity_record(row, &self.account_id)).0);
        self.window_end = Some(until);
        self.seen.forget_before(since);
        Ok(self.seen.fresh(records))
    }

    /// The rows of `sql` (header removed); `what` names the query in errors.
    async fn rows(&self, what: &str, sql: &str) -> Result<Vec<Vec<Option<String>>>, SourceError> {
        let result = run_query(&self.client, &self.athena, what, sql).await?;
        tracing::debug!(query = %result.id, what, rows = result.rows.len(), bytes_scanned = result.bytes_scanned, "Athena guard query read");
        Ok(result.rows)
    }
}

impl EventFeed for AthenaFeed {
    async fn poll(&mut self) -> Result<Vec<Record>, SourceError> {
        self.new_records().await
    }
}

/// The window `[since, until)` one poll covers: from `LATE_DELIVERY` before the previous
/// window's end (or `lookback` ago on the first poll, and never further back) to `now`.
fn poll_window(
    previous_end: Option<DateTime<Utc>>,
    now: DateTime<Utc>,
    lookback: TimeDelta,
) -> (DateTime<Utc>, DateTime<Utc>) {
    let earliest = now - lookback;
    let since = previous_end.map_or(earliest, |end| (end - LATE_DELIVERY).max(earliest));
    // A clock that went back must not make the window run backwards.
    (since.min(now), now)
}

/// What the denial query selects: result label and expression, in SELECT order
/// ([`denial_record`] reads the cells in this order).
const DENIAL_COLUMNS: [(&str, &str); 12] = [
    ("event_id", "eventid"),
    ("event_time", "eventtime"),
    ("event_source", "eventsource"),
    ("event_name", "eventname"),
    ("error_code", "errorcode"),
    ("error_message", "errormessage"),
    ("user_name", "useridentity.username"),
    ("user_arn", "useridentity.arn"),
    ("identity_type", "useridentity.type"),
    ("identity_account", "useridentity.accountid"),
    ("recipient_account", "recipientaccountid"),
    ("source_ip", "sourceipaddress"),
];

/// The guard's first query: every denial of the account's IAM users in `[since, until)`, one
/// row per record, with the fields a [`Record`] needs (`event_id`, `event_time`, ...,
/// `source_ip`). Plain SQL that Athena and DuckDB both accept.
pub fn denials_query(athena: &config::Athena, account_id: &str, since: DateTime<Utc>, until: DateTime<Utc>) -> String {
    let select: Vec<String> =
        DENIAL_COLUMNS.iter().map(|(label, expression)| format!("  {expression} AS {label}")).collect();
    format!(
        "SELECT\n{}\n{}\n  AND (errorcode LIKE 'AccessDenied%' OR errorcode LIKE '%UnauthorizedOperation')",
        select.join(",\n"),
        from_window(athena, account_id, since, until)
    )
}

/// The guard's second query: each IAM user of the account active in `[since, until)` and the
/// time of their last call (columns `user_name`, `last_time`).
pub fn activity_query(athena: &config::Athena, account_id: &str, since: DateTime<Utc>, until: DateTime<Utc>) -> String {
    format!(
        "SELECT\n  useridentity.username AS user_name,\n  max(eventtime) AS last_time\n{}\n  AND useridentity.username IS NOT NULL\nGROUP BY useridentity.username",
        from_window(athena, account_id, since, until)
    )
}

/// A record with its (validated) event time.
type Timed = (DateTime<Utc>, Record);

/// A time cell, as CloudTrail writes `eventTime`.
fn time_cell(label: &str, cell: &Option<String>) -> Result<(DateTime<Utc>, String), String> {
    let text = cell.as_deref().ok_or_else(|| format!("{label} is NULL"))?;
    let at = DateTime::parse_from_rfc3339(text).map_err(|e| format!("{label} {text:?}: {e}"))?;
    Ok((at.to_utc(), text.to_string()))
}

/// One row of [`denials_query`] as the record it came from. Any cell but the time and the user
/// name may be NULL.
fn denial_record(cells: &[Option<String>]) -> Result<Timed, String> {
    let [id, time, source, name, code, message, user, arn, kind, account, recipient, ip] = cells else {
        return Err(format!("{} columns instead of {}", cells.len(), DENIAL_COLUMNS.len()));
    };
    let (at, time) = time_cell("event_time", time)?;
    if user.is_none() {
        return Err("user_name is NULL".to_string());
    }
    let record = Record {
        event_id: id.clone(),
        event_time: Some(time),
        event_source: source.clone(),
        event_name: name.clone(),
        error_code: code.clone(),
        error_message: message.clone(),
        recipient_account_id: recipient.clone(),
        source_ip_address: ip.clone(),
        user_identity: Some(UserIdentity {
            kind: kind.clone(),
            arn: arn.clone(),
            user_name: user.clone(),
            account_id: account.clone(),
            ..UserIdentity::default()
        }),
        ..Record::default()
    };
    Ok((at, record))
}

/// One row of [`activity_query`] as a synthetic successful call by the user at their last
/// call's time, with an event ID that is new whenever that time is.
fn activity_record(cells: &[Option<String>], account_id: &str) -> Result<Timed, String> {
    let [user, last] = cells else {
        return Err(format!("{} columns instead of 2", cells.len()));
    };
    let user = user.as_deref().ok_or("user_name is NULL")?;
    let (at, last) = time_cell("last_time", last)?;
    let record = Record {
        event_id: Some(format!("activity/{user}/{last}")),
        event_time: Some(last),
        recipient_account_id: Some(account_id.to_string()),
        user_identity: Some(UserIdentity {
            kind: Some("IAMUser".to_string()),
            user_name: Some(user.to_string()),
            account_id: Some(account_id.to_string()),
            ..UserIdentity::default()
        }),
        ..Record::default()
    };
    Ok((at, record))
}

/// Records already returned, by event ID, with their event times.
#[derive(Debug, Default)]
struct Seen(HashMap<String, DateTime<Utc>>);

impl Seen {
    /// Forgets records older than `since`: a window starting there cannot return them again.
    fn forget_before(&mut self, since: DateTime<Utc>) {
        self.0.retain(|_, at| *at >= since);
    }

    /// The records not returned before (nor earlier in `records`), now remembered. A record
    /// without an event ID (CloudTrail always sets one) is known by its time, action and user.
    fn fresh(&mut self, records: Vec<Timed>) -> Vec<Record> {
        records
            .into_iter()
            .filter(|(at, record)| {
                let key = record.event_id.clone().unwrap_or_else(|| {
                    let action = record.action().unwrap_or_default();
                    format!("{}/{action}/{}", at.to_rfc3339(), record.user_name().unwrap_or_default())
                });
                self.0.insert(key, *at).is_none()
            })
            .map(|(_, record)| record)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::athena::fixtures::{at, cfg};
    use crate::config::Partitioning;
    use crate::trail::Denial;
    use chrono::TimeZone;

    #[test]
    fn windows_start_at_the_lookback_then_overlap_by_the_late_delivery_slack() {
        let lookback = TimeDelta::hours(2);
        let now = at(2024, 3, 1, 12, 0);
        assert_eq!(poll_window(None, now, lookback), (at(2024, 3, 1, 10, 0), now));
        // The next poll a minute later reaches back 15 minutes before the previous end.
        let next = now + TimeDelta::minutes(1);
        assert_eq!(poll_window(Some(now), next, lookback), (at(2024, 3, 1, 11, 45), next));
        // After a long outage the window is capped at the lookback.
        let much_later = at(2024, 3, 1, 18, 0);
        assert_eq!(poll_window(Some(now), much_later, lookback), (at(2024, 3, 1, 16, 0), much_later));
        // A clock that went back gives an empty window, not a reversed one.
        let earlier = at(2024, 3, 1, 11, 0);
        assert_eq!(poll_window(Some(now), earlier, lookback), (earlier, earlier));
    }

    fn timed(id: Option<&str>, time: &str, user: &str) -> Timed {
        let record = Record {
            event_id: id.map(str::to_string),
            event_time: Some(time.to_string()),
            event_source: Some("s3.amazonaws.com".into()),
            event_name: Some("GetObject".into()),
            user_identity: Some(UserIdentity { user_name: Some(user.into()), ..UserIdentity::default() }),
            ..Record::default()
        };
        (record.event_time().unwrap(), record)
    }

    fn ids(records: &[Record]) -> Vec<Option<&str>> {
        records.iter().map(|r| r.event_id.as_deref()).collect()
    }

    #[test]
    fn records_are_returned_once_and_forgotten_when_out_of_reach() {
        let mut seen = Seen::default();
        let first = seen.fresh(vec![
            timed(Some("e1"), "2024-03-01T10:00:00Z", "alice"),
            timed(Some("e2"), "2024-03-01T10:05:00Z", "bob"),
            timed(Some("e2"), "2024-03-01T10:05:00Z", "bob"),
            timed(None, "2024-03-01T10:06:00Z", "carol"),
        ]);
        assert_eq!(ids(&first), [Some("e1"), Some("e2"), None]);
        // The overlapping next window returns them again with one new record.
        seen.forget_before(at(2024, 3, 1, 9, 50));
        let second = seen.fresh(vec![
            timed(Some("e1"), "2024-03-01T10:00:00Z", "alice"),
            timed(Some("e2"), "2024-03-01T10:05:00Z", "bob"),
            timed(None, "2024-03-01T10:06:00Z", "carol"),
            timed(None, "2024-03-01T10:06:00Z", "dave"),
            timed(Some("e3"), "2024-03-01T10:10:00Z", "alice"),
        ]);
        assert_eq!(ids(&second), [None, Some("e3")]);
        assert_eq!(second[0].user_name(), Some("dave"));
        // Once a window starts after them, they are forgotten: the set stays bounded.
        seen.forget_before(at(2024, 3, 1, 10, 6));
        assert_eq!(seen.0.len(), 3, "{:?}", seen.0);
        assert!(!seen.0.contains_key("e1") && !seen.0.contains_key("e2"));
        seen.forget_before(at(2024, 3, 1, 10, 7));
        assert_eq!(seen.0.keys().collect::<Vec<_>>(), ["e3"]);
    }

    /// A denial result row built by label, so the test does not depend on positions.
    fn denial_row(values: &[(&str, Option<&str>)]) -> Vec<Option<String>> {
        DENIAL_COLUMNS
            .iter()
            .map(|(label, _)| values.iter().find(|(l, _)| l == label).and_then(|(_, v)| v.map(str::to_string)))
            .collect()
    }

    fn full_denial_row() -> Vec<Option<String>> {
        denial_row(&[
            ("event_id", Some("6f1c2b7e-0000-4000-8000-000000000001")),
            ("event_time", Some("2024-03-01T10:00:05Z")),
            ("event_source", Some("s3.amazonaws.com")),
            ("event_name", Some("GetObject")),
            ("error_code", Some("AccessDenied")),
            (
                "error_message",
                Some(
                    "User: arn:aws:iam::123456789012:user/alice is not authorized to perform: s3:GetObject with an explicit deny in an identity-based policy: arn:aws:iam::123456789012:policy/lockstep-deny",
                ),
            ),
            ("user_name", Some("alice")),
            ("user_arn", Some("arn:aws:iam::123456789012:user/alice")),
            ("identity_type", Some("IAMUser")),
            ("identity_account", Some("123456789012")),
            ("recipient_account", Some("123456789012")),
            ("source_ip", Some("198.51.100.7")),
        ])
    }

    #[test]
    fn a_denial_row_becomes_its_record() {
        let (when, r) = denial_record(&full_denial_row()).unwrap();
        assert_eq!(when, Utc.with_ymd_and_hms(2024, 3, 1, 10, 0, 5).unwrap());
        assert_eq!(r.event_id.as_deref(), Some("6f1c2b7e-0000-4000-8000-000000000001"));
        assert_eq!(r.event_time(), Some(when));
        assert_eq!(r.action().as_deref(), Some("s3:GetObject"));
        assert_eq!(r.user_name(), Some("alice"));
        assert_eq!(r.user_arn(), Some("arn:aws:iam::123456789012:user/alice"));
        let identity = r.user_identity.as_ref().unwrap();
        assert_eq!((identity.kind.as_deref(), identity.account_id.as_deref()), (Some("IAMUser"), Some("123456789012")));
        assert_eq!(r.recipient_account_id.as_deref(), Some("123456789012"));
        assert_eq!(r.source_ip_address.as_deref(), Some("198.51.100.7"));
        assert_eq!(r.error_code.as_deref(), Some("AccessDenied"));
        assert_eq!(r.denial("lockstep-deny"), Some(Denial::ExplicitIdentityDeny));

        // NULLs stay None; without a message the denial is not the lockdown policy's.
        let mut row = full_denial_row();
        for label in ["event_id", "error_message", "user_arn", "identity_account", "source_ip", "event_source"] {
            let i = DENIAL_COLUMNS.iter().position(|(l, _)| *l == label).unwrap();
            row[i] = None;
        }
        let (_, r) = denial_record(&row).unwrap();
        assert_eq!((r.event_id.as_deref(), r.error_message.as_deref(), r.user_arn()), (None, None, None));
        assert_eq!((r.source_ip_address.as_deref(), r.action()), (None, None));
        assert_eq!(r.user_identity.as_ref().unwrap().account_id, None);
        assert_eq!(r.denial("lockstep-deny"), Some(Denial::Other));
        row[4] = Some("Client.UnauthorizedOperation".into());
        assert_eq!(denial_record(&row).unwrap().1.denial("lockstep-deny"), Some(Denial::Other));
    }

    #[test]
    fn bad_denial_rows_are_errors_not_panics() {
        let cases = [
            ("event_time", None, "event_time is NULL"),
            ("event_time", Some("yesterday"), "event_time \"yesterday\""),
            ("user_name", None, "user_name is NULL"),
        ];
        for (label, value, expected) in cases {
            let mut row = full_denial_row();
            let i = DENIAL_COLUMNS.iter().position(|(l, _)| *l == label).unwrap();
            row[i] = value.map(str::to_string);
            let err = denial_record(&row).unwrap_err();
            assert!(err.contains(expected), "{label}: {err}");
        }
        assert_eq!(denial_record(&[Some("x".into())]).unwrap_err(), "1 columns instead of 12");
        assert!(denial_record(&[]).is_err());
    }

    #[test]
    fn an_activity_row_becomes_a_synthetic_successful_call() {
        let row = [Some("carol".to_string()), Some("2024-03-01T10:59:59Z".to_string())];
        let (when, r) = activity_record(&row, "123456789012").unwrap();
        assert_eq!(when, Utc.with_ymd_and_hms(2024, 3, 1, 10, 59, 59).unwrap());
        assert_eq!(r.event_id.as_deref(), Some("activity/carol/2024-03-01T10:59:59Z"));
        assert_eq!(r.event_time(), Some(when));
        assert_eq!(r.user_name(), Some("carol"));
        assert_eq!(r.user_identity.as_ref().unwrap().kind.as_deref(), Some("IAMUser"));
        assert_eq!((r.error_code.as_deref(), r.denial("lockstep-deny")), (None, None));

        let err = |row: &[Option<String>]| activity_record(row, "123456789012").unwrap_err();
        assert_eq!(err(&[None, Some("2024-03-01T10:59:59Z".into())]), "user_name is NULL");
        assert_eq!(err(&[Some("carol".into()), None]), "last_time is NULL");
        assert!(err(&[Some("carol".into()), Some("soon".into())]).contains("last_time \"soon\""));
        assert_eq!(err(&[Some("carol".into())]), "1 columns instead of 2");
    }

    #[test]
    fn rows_that_do_not_parse_are_skipped() {
        let mut bad = full_denial_row();
        bad[1] = Some("not a time".into());
        let rows = vec![full_denial_row(), bad, vec![None; 3], full_denial_row()];
        let (records, skipped) = parse_rows("denials", &rows, denial_record);
        assert_eq!((records.len(), skipped), (2, 2));
        assert!(parse_rows("activity", &[], |row| activity_record(row, "1")).0.is_empty());
    }

    #[test]
    fn queries_constrain_partitions_like_evidence_queries() {
        let (since, until) = (at(2024, 3, 1, 23, 40), at(2024, 3, 2, 0, 10));
        for query in [
            denials_query(&cfg(Partitioning::Projected), "123456789012", since, until),
            activity_query(&cfg(Partitioning::Projected), "123456789012", since, until),
        ] {
            assert!(query.contains(r#"FROM "trail db"."cloudtrail_logs""#), "{query}");
            assert!(query.contains(r#"WHERE "timestamp" BETWEEN '2024/03/01' AND '2024/03/02'"#), "{query}");
            assert!(
                query.contains("AND eventtime >= '2024-03-01T23:40:00Z'\n  AND eventtime < '2024-03-02T00:10:00Z'"),
                "{query}"
            );
            assert!(query.contains("useridentity.type = 'IAMUser'"), "{query}");
            assert!(query.contains("coalesce(useridentity.accountid, recipientaccountid) = '123456789012'"), "{query}");
        }
        let (since, until) = (at(2024, 2, 29, 23, 50), at(2024, 3, 1, 0, 5));
        let expected = r#"WHERE (("year" = '2024' AND "month" = '02' AND "day" BETWEEN '29' AND '29') OR ("year" = '2024' AND "month" = '03' AND "day" BETWEEN '01' AND '01'))"#;
        for query in [
            denials_query(&cfg(Partitioning::RegionYearMonthDay), "123456789012", since, until),
            activity_query(&cfg(Partitioning::RegionYearMonthDay), "123456789012", since, until),
        ] {
            assert!(query.contains(expected), "{query}");
            assert!(!query.contains("\"timestamp\""), "{query}");
        }
    }

    #[test]
    fn the_denial_query_selects_every_column_in_order_and_only_denials() {
        let query = denials_query(&cfg(Partitioning::Projected), "o'brien", at(2024, 3, 1, 0, 0), at(2024, 3, 1, 1, 0));
        let select = query.split("\nFROM ").next().unwrap();
        let labels: Vec<&str> =
            select.lines().filter_map(|l| l.rsplit_once(" AS ")).map(|(_, a)| a.trim_end_matches(',')).collect();
        assert_eq!(labels, DENIAL_COLUMNS.map(|(label, _)| label));
        assert!(
            query.ends_with("AND (errorcode LIKE 'AccessDenied%' OR errorcode LIKE '%UnauthorizedOperation')"),
            "{query}"
        );
        assert!(query.contains("= 'o''brien'"), "{query}");
        assert!(!query.contains("GROUP BY"));

        let query = activity_query(&cfg(Partitioning::Projected), "1", at(2024, 3, 1, 0, 0), at(2024, 3, 1, 1, 0));
        assert!(
            query.starts_with("SELECT\n  useridentity.username AS user_name,\n  max(eventtime) AS last_time\nFROM "),
            "{query}"
        );
        assert!(query.ends_with("AND useridentity.username IS NOT NULL\nGROUP BY useridentity.username"), "{query}");
        assert!(!query.contains("errorcode"), "{query}");
    }
}
