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
//! `regexp_extract` instead of `json_extract_scalar` (DuckDB has no such function), string
//! comparisons and `substr` on the ISO-8601 `eventtime` instead of date functions. Every query
//! constrains the partition column(s), since Athena bills by bytes scanned.

use std::future::Future;
use std::time::Duration;

use aws_sdk_athena::Client;
use aws_sdk_athena::types::{QueryExecution, QueryExecutionContext, QueryExecutionState, ResultConfiguration};
use chrono::{DateTime, Datelike, NaiveDate, Timelike, Utc};

use crate::aws::error_message;
use crate::config::{self, Partitioning};
use crate::evidence::{CallGroup, SourceError};
use crate::trail::{Record, UserIdentity};

/// What one windowed query produced and cost.
#[derive(Debug, Clone, PartialEq)]
pub struct AthenaRun {
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

/// Trail files land in the day folder of their delivery, typically minutes after the call, so a
/// call just before midnight sits in the next day's partition; the partition range reaches this
/// far past the window's end.
pub(crate) const DELIVERY_SLACK: chrono::TimeDelta = chrono::TimeDelta::hours(1);

/// Longest pause between two `GetQueryExecution` polls.
const MAX_POLL_INTERVAL: Duration = Duration::from_secs(10);

/// `GetQueryResults` page size (Athena's maximum).
const PAGE_SIZE: i32 = 1000;

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
            Col::Calls => "count(*)",
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
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' {
                c.to_string()
            } else {
                format!("[{c}]")
            }
        })
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
    let select: Vec<String> = Col::ALL
        .iter()
        .map(|col| format!("  {} AS {}", col.expression(lockdown_policy), col.name()))
        .collect();
    let mut group_by: Vec<String> = Col::ALL
        .iter()
        .filter(|col| col.is_key())
        .map(|col| format!("  {}", col.expression(lockdown_policy)))
        .collect();
    group_by.push("  substr(eventtime, 1, 13)".to_string());
    let first_day = since.date_naive();
    let last_day = (until + DELIVERY_SLACK).date_naive().max(first_day);
    format!(
        "SELECT\n{select}\nFROM {db}.{table}\nWHERE {partitions}\n  AND eventtime >= {since}\n  AND eventtime < {until}\n  AND useridentity.type = 'IAMUser'\n  AND coalesce(useridentity.accountid, recipientaccountid) = {account}\nGROUP BY\n{group_by}",
        select = select.join(",\n"),
        db = sql_identifier(&cfg.database),
        table = sql_identifier(&cfg.table),
        partitions = partition_filter(cfg.partitioning, first_day, last_day),
        since = sql_string(&trail_time(since)),
        until = sql_string(&trail_time(until)),
        account = sql_string(account_id),
        group_by = group_by.join(",\n"),
    )
}

/// The partition predicate for the days `first..=last`. Partition values are zero-padded strings,
/// so string ranges order like dates.
pub(crate) fn partition_filter(partitioning: Partitioning, first: NaiveDate, last: NaiveDate) -> String {
    match partitioning {
        Partitioning::Projected => format!(
            "\"timestamp\" BETWEEN '{}' AND '{}'",
            first.format("%Y/%m/%d"),
            last.format("%Y/%m/%d")
        ),
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
pub(crate) fn trail_time(t: DateTime<Utc>) -> String {
    let t = match t.with_nanosecond(0) {
        Some(whole) if whole != t => whole + chrono::TimeDelta::seconds(1),
        _ => t,
    };
    t.format("%Y-%m-%dT%H:%M:%SZ").to_string()
}

pub(crate) fn sql_string(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

pub(crate) fn sql_identifier(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
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
    Ok(AthenaRun {
        groups,
        bytes_scanned,
        elapsed,
        skipped_rows,
    })
}

/// One finished query: its ID, its rows without the header (`None` cells are SQL NULL), and
/// the bytes it scanned.
pub(crate) struct QueryRows {
    pub id: String,
    pub rows: Vec<Vec<Option<String>>>,
    pub bytes_scanned: u64,
}

/// Runs `sql` in the configured workgroup: starts it, waits with capped backoff until
/// `cfg.timeout` (stopping a query that runs over, which would go on scanning and billing for
/// nothing), and reads every page of results. `what` names the query in errors.
pub(crate) async fn run_query(client: &Client, cfg: &config::Athena, what: &str, sql: &str) -> Result<QueryRows, SourceError> {
    let id = start(client, cfg, sql).await?;
    let poll = || async {
        let out = client
            .get_query_execution()
            .query_execution_id(&id)
            .send()
            .await
            .map_err(|e| aws_failure("GetQueryExecution", &id, &e))?;
        Ok(progress(out.query_execution()))
    };
    let bytes_scanned = match wait(cfg.poll_interval, cfg.timeout, poll).await? {
        Waited::Succeeded { bytes_scanned } => bytes_scanned,
        Waited::Ended { state, reason } => {
            return Err(SourceError::Aws {
                operation: format!("Athena {what} query {id} in workgroup {}", cfg.workgroup),
                message: format!("{state}: {reason}"),
            });
        }
        Waited::TimedOut => {
            let stopped = match client.stop_query_execution().query_execution_id(&id).send().await {
                Ok(_) => "stopped it".to_string(),
                Err(e) => format!("could not stop it: {}", error_message(&e)),
            };
            return Err(SourceError::Other(format!(
                "Athena {what} query {id} did not finish within {}; {stopped}",
                crate::duration::format(cfg.timeout)
            )));
        }
    };
    let fetch = |token: Option<String>| async {
        let out = client
            .get_query_results()
            .query_execution_id(&id)
            .max_results(PAGE_SIZE)
            .set_next_token(token)
            .send()
            .await
            .map_err(|e| aws_failure("GetQueryResults", &id, &e))?;
        let rows = out
            .result_set()
            .map(|set| set.rows())
            .unwrap_or_default()
            .iter()
            .map(|row| row.data().iter().map(|d| d.var_char_value().map(str::to_string)).collect())
            .collect();
        Ok((rows, out.next_token().map(str::to_string)))
    };
    let rows = read_pages(&format!("{what} query {id}"), fetch).await?;
    Ok(QueryRows { id, rows, bytes_scanned })
}

async fn start(client: &Client, cfg: &config::Athena, query: &str) -> Result<String, SourceError> {
    let mut request = client
        .start_query_execution()
        .query_string(query)
        .work_group(&cfg.workgroup)
        .query_execution_context(QueryExecutionContext::builder().database(&cfg.database).build());
    // An empty location leaves it to the workgroup's own setting.
    if !cfg.output_location.is_empty() {
        request =
            request.result_configuration(ResultConfiguration::builder().output_location(&cfg.output_location).build());
    }
    let out = request.send().await.map_err(|e| SourceError::Aws {
        operation: format!("athena:StartQueryExecution in workgroup {}", cfg.workgroup),
        message: error_message(&e),
    })?;
    out.query_execution_id().map(str::to_string).ok_or_else(|| SourceError::Aws {
        operation: "athena:StartQueryExecution".to_string(),
        message: "the answer carried no QueryExecutionId".to_string(),
    })
}

fn aws_failure<E, R>(operation: &str, id: &str, err: &aws_sdk_athena::error::SdkError<E, R>) -> SourceError
where
    E: aws_sdk_athena::error::ProvideErrorMetadata + std::error::Error + 'static,
    R: std::fmt::Debug,
{
    SourceError::Aws {
        operation: format!("athena:{operation} {id}"),
        message: error_message(err),
    }
}

/// What one `GetQueryExecution` said about the query.
#[derive(Debug, Clone, PartialEq)]
enum Progress {
    Pending,
    Succeeded { bytes_scanned: u64 },
    /// FAILED or CANCELLED, with Athena's reason.
    Ended { state: String, reason: String },
}

fn progress(execution: Option<&QueryExecution>) -> Progress {
    let status = execution.and_then(|e| e.status());
    match status.and_then(|s| s.state()) {
        Some(QueryExecutionState::Succeeded) => Progress::Succeeded {
            bytes_scanned: execution
                .and_then(|e| e.statistics())
                .and_then(|s| s.data_scanned_in_bytes())
                .and_then(|b| u64::try_from(b).ok())
                .unwrap_or(0),
        },
        Some(state @ (QueryExecutionState::Failed | QueryExecutionState::Cancelled)) => Progress::Ended {
            state: state.as_str().to_string(),
            reason: status
                .and_then(|s| s.state_change_reason().or(s.athena_error().and_then(|e| e.error_message())))
                .unwrap_or("Athena gave no reason")
                .to_string(),
        },
        // QUEUED, RUNNING, or a state this SDK does not know yet: keep waiting.
        _ => Progress::Pending,
    }
}

#[derive(Debug, PartialEq)]
enum Waited {
    Succeeded { bytes_scanned: u64 },
    Ended { state: String, reason: String },
    TimedOut,
}

/// Polls until the query ends or `timeout` passes, pausing `interval`, then twice as long each
/// time, up to [`MAX_POLL_INTERVAL`].
async fn wait<P, F>(interval: Duration, timeout: Duration, mut poll: P) -> Result<Waited, SourceError>
where
    P: FnMut() -> F,
    F: Future<Output = Result<Progress, SourceError>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    let mut delay = interval;
    loop {
        match poll().await? {
            Progress::Succeeded { bytes_scanned } => return Ok(Waited::Succeeded { bytes_scanned }),
            Progress::Ended { state, reason } => return Ok(Waited::Ended { state, reason }),
            Progress::Pending => {}
        }
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        if left.is_zero() {
            return Ok(Waited::TimedOut);
        }
        tokio::time::sleep(delay.min(left)).await;
        delay = (delay * 2).min(MAX_POLL_INTERVAL).max(interval);
    }
}

/// One page of `GetQueryResults`: each row's cells (`None` for SQL NULL) and the `NextToken`.
type Page = (Vec<Vec<Option<String>>>, Option<String>);

/// Reads every page of the query `label` through `fetch` (given the previous page's `NextToken`)
/// and returns the rows without the header, which Athena puts in the first row of the first
/// page only.
async fn read_pages<F, Fut>(label: &str, mut fetch: F) -> Result<Vec<Vec<Option<String>>>, SourceError>
where
    F: FnMut(Option<String>) -> Fut,
    Fut: Future<Output = Result<Page, SourceError>>,
{
    let mut rows = Vec::new();
    let mut token: Option<String> = None;
    loop {
        let (page, next) = fetch(token.clone()).await?;
        let header = usize::from(token.is_none());
        rows.extend(page.into_iter().skip(header));
        match next.filter(|t| !t.is_empty()) {
            None => return Ok(rows),
            // A token that does not move on would loop for ever.
            Some(next) if token.as_ref() == Some(&next) => {
                return Err(SourceError::Other(format!(
                    "Athena {label} returned the same NextToken twice; results are incomplete"
                )));
            }
            Some(next) => token = Some(next),
        }
    }
}

/// Parses every row of the query `what` with `parse`; rows that do not parse are skipped and
/// logged once. Returns the parsed rows and how many were skipped.
pub(crate) fn parse_rows<T>(
    what: &str,
    rows: &[Vec<Option<String>>],
    parse: impl Fn(&[Option<String>]) -> Result<T, String>,
) -> (Vec<T>, u64) {
    let mut parsed = Vec::with_capacity(rows.len());
    let mut skipped = 0u64;
    let mut first_problem = None;
    for (index, row) in rows.iter().enumerate() {
        match parse(row) {
            Ok(value) => parsed.push(value),
            Err(why) => {
                skipped += 1;
                first_problem.get_or_insert_with(|| format!("row {}: {why}", index + 1));
            }
        }
    }
    if let Some(first) = first_problem {
        tracing::warn!(query = what, skipped, first = %first, "skipped Athena result rows that did not parse");
    }
    (parsed, skipped)
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
        DateTime::parse_from_rfc3339(&value)
            .map(|t| t.to_utc())
            .map_err(|e| format!("{} {value:?}: {e}", col.name()))
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
    Ok(CallGroup {
        record,
        calls,
        first,
        last,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::trail::Denial;
    use aws_sdk_athena::types::{AthenaError, QueryExecutionStatistics, QueryExecutionStatus};
    use chrono::TimeZone;

    fn cfg(partitioning: Partitioning) -> config::Athena {
        config::Athena {
            database: "trail db".into(),
            table: "cloudtrail_logs".into(),
            workgroup: "primary".into(),
            output_location: "s3://results/".into(),
            partitioning,
            poll_interval: Duration::from_millis(1),
            timeout: Duration::from_secs(5),
        }
    }

    fn at(y: i32, mo: u32, d: u32, h: u32, mi: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(y, mo, d, h, mi, 0).unwrap()
    }

    fn query(partitioning: Partitioning, since: DateTime<Utc>, until: DateTime<Utc>) -> String {
        window_query(&cfg(partitioning), "123456789012", "lockstep-deny", since, until)
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
    fn event_time_bounds_round_up_to_whole_seconds() {
        let t = at(2024, 3, 1, 10, 0) + chrono::TimeDelta::milliseconds(1500);
        assert_eq!(trail_time(t), "2024-03-01T10:00:02Z");
        assert_eq!(trail_time(at(2024, 12, 31, 23, 59) + chrono::TimeDelta::nanoseconds(59_000_000_001)), "2025-01-01T00:00:00Z");
        assert_eq!(trail_time(at(2024, 3, 1, 10, 0)), "2024-03-01T10:00:00Z");
    }

    #[test]
    fn policy_name_is_literal_in_the_pattern_and_quotes_are_escaped() {
        let marker = explicit_deny("team.lock+down=x");
        assert!(marker.contains(r"policy: arn:\S*:policy/(\S*/)?team[.]lock[+]down[=]x[.,)]*(\s|$)"), "{marker}");
        assert!(explicit_deny("it's").contains("it['']s"));
        assert_eq!(sql_identifier("a\"b"), "\"a\"\"b\"");
    }

    /// A result row built by column name, so the test does not depend on positions.
    fn row(values: &[(Col, Option<&str>)]) -> Vec<Option<String>> {
        Col::ALL
            .iter()
            .map(|col| {
                values
                    .iter()
                    .find(|(c, _)| c == col)
                    .and_then(|(_, v)| v.map(str::to_string))
            })
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

    #[tokio::test]
    async fn a_header_only_result_is_empty_and_a_stuck_token_or_failed_page_is_an_error() {
        let rows = read_pages("q", |_| async { Ok((vec![header()], None)) }).await.unwrap();
        assert!(rows.is_empty());
        assert!(read_pages("q", |_| async { Ok((Vec::new(), None)) }).await.unwrap().is_empty());

        let err = read_pages("denials query q-1", |_| async { Ok((vec![header()], Some("same".to_string()))) })
            .await
            .unwrap_err();
        assert_eq!(err.to_string(), "Athena denials query q-1 returned the same NextToken twice; results are incomplete");

        let err = read_pages("q", |_| async { Err::<Page, _>(SourceError::Other("boom".into())) })
            .await
            .unwrap_err();
        assert_eq!(err.to_string(), "boom");
    }

    fn execution(state: QueryExecutionState) -> QueryExecution {
        QueryExecution::builder()
            .status(QueryExecutionStatus::builder().state(state).build())
            .statistics(QueryExecutionStatistics::builder().data_scanned_in_bytes(123_456).build())
            .build()
    }

    #[test]
    fn progress_reads_state_bytes_and_reason() {
        assert_eq!(progress(None), Progress::Pending);
        assert_eq!(progress(Some(&execution(QueryExecutionState::Queued))), Progress::Pending);
        assert_eq!(progress(Some(&execution(QueryExecutionState::Running))), Progress::Pending);
        assert_eq!(
            progress(Some(&execution(QueryExecutionState::Succeeded))),
            Progress::Succeeded { bytes_scanned: 123_456 }
        );
        let failed = QueryExecution::builder()
            .status(
                QueryExecutionStatus::builder()
                    .state(QueryExecutionState::Failed)
                    .athena_error(AthenaError::builder().error_message("COLUMN_NOT_FOUND: vpcendpointaccountid").build())
                    .build(),
            )
            .build();
        assert_eq!(
            progress(Some(&failed)),
            Progress::Ended {
                state: "FAILED".into(),
                reason: "COLUMN_NOT_FOUND: vpcendpointaccountid".into()
            }
        );
        let cancelled = QueryExecution::builder()
            .status(
                QueryExecutionStatus::builder()
                    .state(QueryExecutionState::Cancelled)
                    .state_change_reason("Query cancelled by user")
                    .build(),
            )
            .build();
        assert!(matches!(progress(Some(&cancelled)), Progress::Ended { state, reason } if state == "CANCELLED" && reason == "Query cancelled by user"));
    }

    #[tokio::test]
    async fn wait_polls_until_done_and_gives_up_at_the_timeout() {
        let mut polls = 0;
        let waited = wait(Duration::from_millis(1), Duration::from_secs(5), || {
            polls += 1;
            let answer = if polls < 4 { Progress::Pending } else { Progress::Succeeded { bytes_scanned: 7 } };
            async move { Ok(answer) }
        })
        .await
        .unwrap();
        assert_eq!(waited, Waited::Succeeded { bytes_scanned: 7 });
        assert_eq!(polls, 4);

        let ended = wait(Duration::from_millis(1), Duration::from_secs(5), || async {
            Ok(Progress::Ended {
                state: "FAILED".into(),
                reason: "why".into(),
            })
        })
        .await
        .unwrap();
        assert_eq!(ended, Waited::Ended { state: "FAILED".into(), reason: "why".into() });

        // 1 + 2 + 4 + 8 + 16 ms of backoff overshoot a 20 ms timeout: at most 6 polls.
        let mut polls = 0;
        let started = std::time::Instant::now();
        let waited = wait(Duration::from_millis(1), Duration::from_millis(20), || {
            polls += 1;
            async { Ok(Progress::Pending) }
        })
        .await
        .unwrap();
        assert_eq!(waited, Waited::TimedOut);
        assert!((2..=6).contains(&polls), "{polls} polls");
        assert!(started.elapsed() >= Duration::from_millis(20));
    }
}
