//! History at organisation scale from the CloudTrail table in Athena.
//!
//! One query per window groups the account's IAM-user calls by user, hour and every field the
//! classifier reads, so that Athena returns thousands of rows instead of millions of records;
//! each row becomes a [`CallGroup`] whose representative [`Record`] carries exactly the fields
//! [`crate::perimeter::Perimeter::classify`] and [`Record::denial`] look at. Classification stays
//! in Rust.
//!
//! The query text is deliberately plain SQL that both Athena (Trino) and DuckDB accept, so a test
//! can run the very same text over generated trail files (`tests/athena_duckdb.rs`):
//! `regexp_extract` instead of `json_extract_scalar` (DuckDB has no such function), `substr` on
//! the ISO-8601 `eventtime` instead of date functions. Its `FROM` and partition-constrained
//! `WHERE` are [`crate::athena::sql`]'s; the Athena client is [`crate::athena::client`].

use std::time::Duration;

use aws_sdk_athena::Client;
use chrono::{DateTime, Utc};

use crate::athena::client::{QueryRows, parse_rows, run_query};
use crate::athena::sql::{from_window, sql_string};
use crate::config;
use crate::evidence::{CallGroup, SourceError};
use crate::trail::{Record, UserIdentity};

/// What one windowed query produced and cost.
#[derive(Debug, Clone, PartialEq)]
pub struct AthenaRun {
    /// The rows, each a group of identical calls.
    pub groups: Vec<CallGroup>,
    /// `Statistics.DataScannedInBytes`: what Athena bills for.
    pub bytes_scanned: u64,
    /// Wall time from starting the query to the last result page.
    pub elapsed: Duration,
    /// Result rows that did not parse (logged), not in `groups`.
    pub skipped_rows: u64,
}

/// The phrase IAM puts in a denial caused by a Deny statement in an identity-based policy.
const EXPLICIT_DENY_PHRASE: &str = "explicit deny in an identity-based policy";

/// The result columns. A row's cell `i` is `Col::ALL[i]`; all but the last three are grouping keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Col {
    UserName,
    UserArn,
    IdentityType,
    IdentityAccount,
    InvokedBy,
    RecipientAccount,
    EventSource,
    EventName,
    EventType,
    SourceIp,
    VpcEndpointId,
    VpcEndpointAccount,
    S3AuthMethod,
    ErrorCode,
    /// 1 when the error message shows an explicit identity-based deny (see `explicit_deny`).
    ExplicitDeny,
    Calls,
    FirstTime,
    LastTime,
}

impl Col {
    /// SELECT order, which is declaration order (a test checks).
    const ALL: [Col; 18] = [
        Col::UserName,
        Col::UserArn,
        Col::IdentityType,
        Col::IdentityAccount,
        Col::InvokedBy,
        Col::RecipientAccount,
        Col::EventSource,
        Col::EventName,
        Col::EventType,
        Col::SourceIp,
        Col::VpcEndpointId,
        Col::VpcEndpointAccount,
        Col::S3AuthMethod,
        Col::ErrorCode,
        Col::ExplicitDeny,
        Col::Calls,
        Col::FirstTime,
        Col::LastTime,
    ];

    /// The column's alias in the query and its label in the results.
    fn name(self) -> &'static str {
        match self {
            Col::UserName => "user_name",
            Col::UserArn => "user_arn",
            Col::IdentityType => "identity_type",
            Col::IdentityAccount => "identity_account",
            Col::InvokedBy => "invoked_by",
            Col::RecipientAccount => "recipient_account",
            Col::EventSource => "event_source",
            Col::EventName => "event_name",
            Col::EventType => "event_type",
            Col::SourceIp => "source_ip",
            Col::VpcEndpointId => "vpc_endpoint_id",
            Col::VpcEndpointAccount => "vpc_endpoint_account",
            Col::S3AuthMethod => "s3_auth_method",
            Col::ErrorCode => "error_code",
            Col::ExplicitDeny => "explicit_deny",
            Col::Calls => "calls",
            Col::FirstTime => "first_time",
            Col::LastTime => "last_time",
        }
    }

    /// The column's expression over Athena's CloudTrail table.
    fn expression(self, lockdown_policy: &str) -> String {
        let plain = match self {
            Col::UserName => "useridentity.username",
            Col::UserArn => "useridentity.arn",
            Col::IdentityType => "useridentity.type",
            Col::IdentityAccount => "useridentity.accountid",
            Col::InvokedBy => "useridentity.invokedby",
            Col::RecipientAccount => "recipientaccountid",
            Col::EventSource => "eventsource",
            Col::EventName => "eventname",
            Col::EventType => "eventtype",
            Col::SourceIp => "sourceipaddress",
            Col::VpcEndpointId => "vpcendpointid",
            Col::VpcEndpointAccount => "vpcendpointaccountid",
            // additionaleventdata is JSON text. Trino's regexp_extract gives NULL and DuckDB's ''
            // when nothing matches: nullif makes both NULL.
            Col::S3AuthMethod => {
                r#"nullif(regexp_extract(additionaleventdata, '"AuthenticationMethod"\s*:\s*"([^"]*)"', 1), '')"#
            }
            Col::ErrorCode => "errorcode",
            Col::ExplicitDeny => return explicit_deny(lockdown_policy),
            // CloudTrail delivers at least once: a record in two files is one call. Records
            // without an eventID (real ones always have one) are each counted.
            Col::Calls => "count(DISTINCT eventid) + count(*) - count(eventid)",
            Col::FirstTime => "min(eventtime)",
            Col::LastTime => "max(eventtime)",
        };
        plain.to_string()
    }

    fn is_key(self) -> bool {
        !matches!(self, Col::Calls | Col::FirstTime | Col::LastTime)
    }
}

/// 1 when `errormessage` would make [`Record::denial`] say `ExplicitIdentityDeny` for
/// `lockdown_policy`: the explicit-deny phrase, or the denying policy's ARN after "policy: "
/// ending in `:policy/[path/]<name>` (after trailing `.`, `,`, `)`). The message itself is not a grouping key: it
/// names the resource, which would make every call its own group.
fn explicit_deny(lockdown_policy: &str) -> String {
    // Every character that is not a word character goes in a bracket class, so the name is
    // literal in Trino's and DuckDB's regex dialects alike.
    let name: String = lockdown_policy
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || c == '_' { c.to_string() } else { format!("[{c}]") })
        .collect();
    let pattern = format!(r"policy: arn:\S*:policy/(\S*/)?{name}[.,)]*(\s|$)");
    format!(
        "CASE WHEN strpos(errormessage, {}) > 0 OR coalesce(regexp_extract(errormessage, {}), '') <> '' THEN 1 ELSE 0 END",
        sql_string(EXPLICIT_DENY_PHRASE),
        sql_string(&pattern)
    )
}

/// The query for the account's IAM-user calls in `[since, until)`, grouped per user and hour.
/// `lockdown_policy` must be the name the classifier later passes to [`Record::denial`].
pub fn window_query(
    cfg: &config::Athena,
    account_id: &str,
    lockdown_policy: &str,
    since: DateTime<Utc>,
    until: DateTime<Utc>,
) -> String {
    let select: Vec<String> =
        Col::ALL.iter().map(|col| format!("  {} AS {}", col.expression(lockdown_policy), col.name())).collect();
    let mut group_by: Vec<String> = Col::ALL
        .iter()
        .filter(|col| col.is_key())
        .map(|col| format!("  {}", col.expression(lockdown_policy)))
        .collect();
    group_by.push("  substr(eventtime, 1, 13)".to_string());
    format!(
        "SELECT\n{select}\n{from}\nGROUP BY\n{group_by}",
        select = select.join(",\n"),
        from = from_window(cfg, account_id, since, until),
        group_by = group_by.join(",\n"),
    )
}

/// Runs [`window_query`] in the configured workgroup, waits for it, and reads every result page.
pub async fn run_window(
    client: &Client,
    cfg: &config::Athena,
    account_id: &str,
    lockdown_policy: &str,
    since: DateTime<Utc>,
    until: DateTime<Utc>,
) -> Result<AthenaRun, SourceError> {
    let started = std::time::Instant::now();
    let sql = window_query(cfg, account_id, lockdown_policy, since, until);
    let QueryRows { id, rows, bytes_scanned } = run_query(client, cfg, "evidence", &sql).await?;
    let (groups, skipped_rows) = parse_rows("evidence", &rows, parse_row);
    let elapsed = started.elapsed();
    tracing::info!(query = %id, groups = groups.len(), skipped_rows, bytes_scanned, ?elapsed, "Athena window read");
    Ok(AthenaRun { groups, bytes_scanned, elapsed, skipped_rows })
}

/// One result row as the call group it stands for.
fn parse_row(cells: &[Option<String>]) -> Result<CallGroup, String> {
    if cells.len() != Col::ALL.len() {
        return Err(format!("{} columns instead of {}", cells.len(), Col::ALL.len()));
    }
    let text = |col: Col| cells[col as usize].clone();
    let required = |col: Col| text(col).ok_or_else(|| format!("{} is NULL", col.name()));
    let calls = required(Col::Calls)?;
    let calls: u64 = calls.parse().map_err(|e| format!("calls {calls:?}: {e}"))?;
    let time = |col: Col| -> Result<DateTime<Utc>, String> {
        let value = required(col)?;
        DateTime::parse_from_rfc3339(&value).map(|t| t.to_utc()).map_err(|e| format!("{} {value:?}: {e}", col.name()))
    };
    let (first, last) = (time(Col::FirstTime)?, time(Col::LastTime)?);
    let explicit_deny = match text(Col::ExplicitDeny).as_deref() {
        Some("1") => true,
        Some("0") => false,
        other => return Err(format!("explicit_deny {other:?}: expected 0 or 1")),
    };
    let record = Record {
        event_time: text(Col::FirstTime),
        event_source: text(Col::EventSource),
        event_name: text(Col::EventName),
        event_type: text(Col::EventType),
        recipient_account_id: text(Col::RecipientAccount),
        source_ip_address: text(Col::SourceIp),
        error_code: text(Col::ErrorCode),
        // Stands in for the message: all that `Record::denial` reads from it.
        error_message: explicit_deny.then(|| EXPLICIT_DENY_PHRASE.to_string()),
        user_identity: Some(UserIdentity {
            kind: text(Col::IdentityType),
            arn: text(Col::UserArn),
            user_name: text(Col::UserName),
            account_id: text(Col::IdentityAccount),
            invoked_by: text(Col::InvokedBy),
            access_key_id: None,
        }),
        vpc_endpoint_id: text(Col::VpcEndpointId),
        vpc_endpoint_account_id: text(Col::VpcEndpointAccount),
        s3_auth_method: text(Col::S3AuthMethod),
        ..Record::default()
    };
    Ok(CallGroup { record, calls, first, last })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::athena::client::read_pages;
    use crate::athena::fixtures::{at, cfg};
    use crate::config::Partitioning;
    use crate::trail::Denial;
    use chrono::TimeZone;

    fn query(partitioning: Partitioning, since: DateTime<Utc>, until: DateTime<Utc>) -> String {
        window_query(&cfg(partitioning), "123456789012", "lockstep-deny", since, until)
    }

    #[test]
    fn columns_are_listed_in_declaration_order() {
        assert!(Col::ALL.iter().enumerate().all(|(i, col)| *col as usize == i));
    }

    #[test]
    fn query_groups_by_every_key_and_the_hour() {
        let q = query(Partitioning::Projected, at(2024, 3, 1, 0, 0), at(2024, 3, 2, 0, 0));
        let (select, group_by) = q.split_once("GROUP BY").unwrap();
        for col in Col::ALL {
            assert!(select.contains(&format!(" AS {}", col.name())), "{} missing: {q}", col.name());
        }
        assert_eq!(group_by.matches(",\n").count() + 1, Col::ALL.iter().filter(|c| c.is_key()).count() + 1);
        assert!(group_by.contains("substr(eventtime, 1, 13)"));
        assert!(!group_by.contains("count(") && !group_by.contains("min(") && !group_by.contains(" AS "));
        assert!(!q.contains("json_extract"), "DuckDB has no json_extract_scalar");
    }

    #[test]
    fn policy_name_is_literal_in_the_pattern_and_quotes_are_escaped() {
        let marker = explicit_deny("team.lock+down=x");
        assert!(marker.contains(r"policy: arn:\S*:policy/(\S*/)?team[.]lock[+]down[=]x[.,)]*(\s|$)"), "{marker}");
        assert!(explicit_deny("it's").contains("it['']s"));
    }

    /// A result row built by column name, so the test does not depend on positions.
    fn row(values: &[(Col, Option<&str>)]) -> Vec<Option<String>> {
        Col::ALL
            .iter()
            .map(|col| values.iter().find(|(c, _)| c == col).and_then(|(_, v)| v.map(str::to_string)))
            .collect()
    }

    fn good_row(user: &str, calls: &str) -> Vec<Option<String>> {
        row(&[
            (Col::UserName, Some(user)),
            (Col::UserArn, Some("arn:aws:iam::123456789012:user/alice")),
            (Col::IdentityType, Some("IAMUser")),
            (Col::IdentityAccount, Some("123456789012")),
            (Col::RecipientAccount, Some("123456789012")),
            (Col::EventSource, Some("s3.amazonaws.com")),
            (Col::EventName, Some("GetObject")),
            (Col::EventType, Some("AwsApiCall")),
            (Col::SourceIp, Some("198.51.100.7")),
            (Col::VpcEndpointId, Some("")),
            (Col::S3AuthMethod, Some("QueryString")),
            (Col::ErrorCode, Some("AccessDenied")),
            (Col::ExplicitDeny, Some("1")),
            (Col::Calls, Some(calls)),
            (Col::FirstTime, Some("2024-03-01T10:00:05Z")),
            (Col::LastTime, Some("2024-03-01T10:59:59Z")),
        ])
    }

    #[test]
    fn a_row_becomes_the_record_the_classifier_would_see() {
        let group = parse_row(&good_row("alice", "42")).unwrap();
        assert_eq!(group.calls, 42);
        assert_eq!(group.first, Utc.with_ymd_and_hms(2024, 3, 1, 10, 0, 5).unwrap());
        assert_eq!(group.last, Utc.with_ymd_and_hms(2024, 3, 1, 10, 59, 59).unwrap());
        let r = &group.record;
        assert_eq!(r.user_name(), Some("alice"));
        assert_eq!(r.action().as_deref(), Some("s3:GetObject"));
        assert_eq!(r.event_time(), Some(group.first));
        assert_eq!(r.s3_auth_method.as_deref(), Some("QueryString"));
        // Empty strings and NULLs stay apart, as they are in trail files.
        assert_eq!(r.vpc_endpoint_id.as_deref(), Some(""));
        assert_eq!(r.vpc_endpoint_account_id, None);
        assert_eq!(r.user_identity.as_ref().unwrap().invoked_by, None);
        assert_eq!(r.denial("lockstep-deny"), Some(Denial::ExplicitIdentityDeny));

        let mut other = good_row("bob", "1");
        other[Col::ExplicitDeny as usize] = Some("0".into());
        assert_eq!(parse_row(&other).unwrap().record.denial("lockstep-deny"), Some(Denial::Other));
        other[Col::ErrorCode as usize] = None;
        assert_eq!(parse_row(&other).unwrap().record.denial("lockstep-deny"), None);
    }

    #[test]
    fn bad_rows_are_errors_not_panics() {
        let cases: Vec<(Col, Option<&str>, &str)> = vec![
            (Col::Calls, Some("many"), "calls \"many\""),
            (Col::Calls, Some("-1"), "calls \"-1\""),
            (Col::Calls, None, "calls is NULL"),
            (Col::FirstTime, Some("yesterday"), "first_time \"yesterday\""),
            (Col::LastTime, None, "last_time is NULL"),
            (Col::ExplicitDeny, Some("true"), "explicit_deny"),
        ];
        for (col, value, expected) in cases {
            let mut r = good_row("alice", "1");
            r[col as usize] = value.map(str::to_string);
            let err = parse_row(&r).unwrap_err();
            assert!(err.contains(expected), "{}: {err}", col.name());
        }
        assert!(parse_row(&[Some("x".into())]).unwrap_err().contains("1 columns instead of 18"));
        assert!(parse_row(&[]).is_err());
    }

    fn header() -> Vec<Option<String>> {
        Col::ALL.iter().map(|c| Some(c.name().to_string())).collect()
    }

    #[tokio::test]
    async fn pages_are_followed_and_only_the_first_header_is_skipped() {
        let mut bad = good_row("carol", "1");
        bad[Col::FirstTime as usize] = Some("not a time".into());
        let pages = [
            (None, vec![header(), good_row("alice", "1"), good_row("bob", "2")], Some("t1")),
            (Some("t1"), vec![good_row("carol", "3"), bad], Some("t2")),
            (Some("t2"), vec![good_row("dave", "4")], Some("")),
        ];
        let mut asked = Vec::new();
        let rows = read_pages("evidence query q-1", |token: Option<String>| {
            asked.push(token.clone());
            let (expected, rows, next) = pages[asked.len() - 1].clone();
            assert_eq!(token.as_deref(), expected);
            async move { Ok((rows, next.map(str::to_string))) }
        })
        .await
        .unwrap();
        assert_eq!(asked.len(), 3);
        let (groups, skipped) = parse_rows("evidence", &rows, parse_row);
        let users: Vec<_> = groups.iter().map(|g| (g.record.user_name().unwrap(), g.calls)).collect();
        assert_eq!(users, [("alice", 1), ("bob", 2), ("carol", 3), ("dave", 4)]);
        assert_eq!(skipped, 1);
    }
}
