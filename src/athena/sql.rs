//! SQL text over the CloudTrail table, shared by the evidence query
//! ([`crate::evidence::athena`]) and the guard's queries ([`crate::feed::athena`]): quoting,
//! CloudTrail's time format, and the one `FROM` + partition-constrained `WHERE` every query
//! starts from.
//!
//! The text is deliberately plain SQL that both Athena (Trino) and DuckDB accept, so tests run
//! the very same text over generated trail files (`tests/athena_duckdb.rs`,
//! `tests/athena_feed.rs`): string comparisons on the ISO-8601 `eventtime` instead of date
//! functions. Every query constrains the partition column(s), since Athena bills by bytes
//! scanned.

use chrono::{DateTime, Datelike, NaiveDate, Timelike, Utc};

use crate::config::{self, Partitioning};

/// Trail files land in the day folder of their delivery, typically minutes after the call, so a
/// call just before midnight sits in the next day's partition; the partition range reaches this
/// far past the window's end.
const DELIVERY_SLACK: chrono::TimeDelta = chrono::TimeDelta::hours(1);

/// The `FROM` and `WHERE` every query over the table shares: the account's IAM-user records
/// with `eventTime` in `[since, until)`, constrained to the partitions that can hold them (the
/// account's own, on an organisation trail's table partitioned by account).
/// Callers append further `AND` conditions and any `GROUP BY`.
pub(crate) fn from_window(
    cfg: &config::Athena,
    account_id: &str,
    since: DateTime<Utc>,
    until: DateTime<Utc>,
) -> String {
    let first_day = since.date_naive();
    let last_day = (until + DELIVERY_SLACK).date_naive().max(first_day);
    let days = partition_filter(cfg.partitioning, first_day, last_day);
    let partitions = match &cfg.account_partition {
        Some(column) => format!("{} = {}\n  AND {days}", sql_identifier(column), sql_string(account_id)),
        None => days,
    };
    format!(
        "FROM {db}.{table}\nWHERE {partitions}\n  AND eventtime >= {since}\n  AND eventtime < {until}\n  AND useridentity.type = 'IAMUser'\n  AND coalesce(useridentity.accountid, recipientaccountid) = {account}",
        db = sql_identifier(&cfg.database),
        table = sql_identifier(&cfg.table),
        since = sql_string(&trail_time(since)),
        until = sql_string(&trail_time(until)),
        account = sql_string(account_id),
    )
}

/// The partition predicate for the days `first..=last`. Partition values are zero-padded strings,
/// so string ranges order like dates.
fn partition_filter(partitioning: Partitioning, first: NaiveDate, last: NaiveDate) -> String {
    match partitioning {
        Partitioning::Projected => {
            format!("\"timestamp\" BETWEEN '{}' AND '{}'", first.format("%Y/%m/%d"), last.format("%Y/%m/%d"))
        }
        Partitioning::RegionYearMonthDay => {
            // One range of days per calendar month, so windows across month and year ends work.
            let mut months: Vec<(NaiveDate, NaiveDate)> = Vec::new();
            for day in first.iter_days().take_while(|d| *d <= last) {
                match months.last_mut() {
                    Some((start, end)) if (start.year(), start.month()) == (day.year(), day.month()) => *end = day,
                    _ => months.push((day, day)),
                }
            }
            let ranges: Vec<String> = months
                .iter()
                .map(|(start, end)| {
                    format!(
                        "(\"year\" = '{}' AND \"month\" = '{}' AND \"day\" BETWEEN '{}' AND '{}')",
                        start.format("%Y"),
                        start.format("%m"),
                        start.format("%d"),
                        end.format("%d")
                    )
                })
                .collect();
            format!("({})", ranges.join(" OR "))
        }
    }
}

/// `t` as CloudTrail writes `eventTime` (whole seconds), rounded up so that string comparison
/// with `eventtime` agrees with comparing instants.
fn trail_time(t: DateTime<Utc>) -> String {
    let t = match t.with_nanosecond(0) {
        Some(whole) if whole != t => whole + chrono::TimeDelta::seconds(1),
        _ => t,
    };
    t.format("%Y-%m-%dT%H:%M:%SZ").to_string()
}

/// `text` as an SQL string literal.
pub(crate) fn sql_string(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

/// `name` as a quoted SQL identifier.
fn sql_identifier(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::athena::fixtures::{at, cfg};

    #[test]
    fn an_organisation_table_is_constrained_to_the_accounts_partition_too() {
        let mut config = cfg(Partitioning::Projected);
        config.account_partition = Some("account".into());
        let text = from_window(&config, "123456789012", at(2024, 1, 2, 0, 0), at(2024, 1, 3, 0, 0));
        assert!(
            text.contains(
                "WHERE \"account\" = '123456789012'\n  AND \"timestamp\" BETWEEN '2024/01/02' AND '2024/01/03'"
            ),
            "{text}"
        );
        assert!(
            !from_window(&cfg(Partitioning::Projected), "123456789012", at(2024, 1, 2, 0, 0), at(2024, 1, 3, 0, 0))
                .contains("\"account\"")
        );
    }

    fn query(partitioning: Partitioning, since: DateTime<Utc>, until: DateTime<Utc>) -> String {
        from_window(&cfg(partitioning), "123456789012", since, until)
    }

    #[test]
    fn projected_layout_constrains_timestamp_with_delivery_slack() {
        let q = query(Partitioning::Projected, at(2024, 3, 1, 10, 0), at(2024, 3, 2, 23, 30));
        // The window ends at 23:30; calls just before are delivered after midnight.
        assert!(q.contains(r#"WHERE "timestamp" BETWEEN '2024/03/01' AND '2024/03/03'"#), "{q}");
        assert!(q.contains("AND eventtime >= '2024-03-01T10:00:00Z'\n  AND eventtime < '2024-03-02T23:30:00Z'"), "{q}");
        assert!(q.contains(r#"FROM "trail db"."cloudtrail_logs""#), "{q}");
        assert!(q.contains("= '123456789012'"), "{q}");
        assert!(!q.contains("\"year\""), "{q}");
        let q = query(Partitioning::Projected, at(2024, 3, 1, 10, 0), at(2024, 3, 2, 12, 0));
        assert!(q.contains(r#""timestamp" BETWEEN '2024/03/01' AND '2024/03/02'"#), "{q}");
    }

    #[test]
    fn year_month_day_layout_splits_ranges_at_month_and_year_ends() {
        let q = query(Partitioning::RegionYearMonthDay, at(2023, 12, 30, 22, 0), at(2024, 1, 2, 0, 0));
        let expected = r#"WHERE (("year" = '2023' AND "month" = '12' AND "day" BETWEEN '30' AND '31') OR ("year" = '2024' AND "month" = '01' AND "day" BETWEEN '01' AND '02'))"#;
        assert!(q.contains(expected), "{q}");
        assert!(!q.contains("\"timestamp\""), "{q}");
        // A non-leap February.
        let q = query(Partitioning::RegionYearMonthDay, at(2023, 2, 27, 0, 0), at(2023, 3, 1, 12, 0));
        let expected = r#"(("year" = '2023' AND "month" = '02' AND "day" BETWEEN '27' AND '28') OR ("year" = '2023' AND "month" = '03' AND "day" BETWEEN '01' AND '01'))"#;
        assert!(q.contains(expected), "{q}");
        // An empty window still yields valid SQL.
        let q = query(Partitioning::RegionYearMonthDay, at(2023, 2, 27, 0, 0), at(2023, 2, 20, 0, 0));
        assert!(q.contains(r#"(("year" = '2023' AND "month" = '02' AND "day" BETWEEN '27' AND '27'))"#), "{q}");
    }

    #[test]
    fn event_time_bounds_round_up_to_whole_seconds() {
        let t = at(2024, 3, 1, 10, 0) + chrono::TimeDelta::milliseconds(1500);
        assert_eq!(trail_time(t), "2024-03-01T10:00:02Z");
        assert_eq!(
            trail_time(at(2024, 12, 31, 23, 59) + chrono::TimeDelta::nanoseconds(59_000_000_001)),
            "2025-01-01T00:00:00Z"
        );
        assert_eq!(trail_time(at(2024, 3, 1, 10, 0)), "2024-03-01T10:00:00Z");
    }

    #[test]
    fn quotes_are_escaped() {
        assert_eq!(sql_identifier("a\"b"), "\"a\"\"b\"");
        assert_eq!(sql_string("o'brien"), "'o''brien'");
    }
}
