//! A generic Athena client: start a query in the configured workgroup, wait for it with capped
//! backoff (stopping one that runs over), and read every page of its results. It knows nothing
//! of what the queries ask; see [`crate::athena::sql`] for the text they share.

use std::future::Future;
use std::time::Duration;

use aws_sdk_athena::Client;
use aws_sdk_athena::types::{QueryExecution, QueryExecutionContext, QueryExecutionState, ResultConfiguration};

use crate::aws::error_message;
use crate::config;
use crate::evidence::SourceError;

/// Longest pause between two `GetQueryExecution` polls.
const MAX_POLL_INTERVAL: Duration = Duration::from_secs(10);

/// `GetQueryResults` page size (Athena's maximum).
const PAGE_SIZE: i32 = 1000;

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
pub(crate) async fn run_query(
    client: &Client,
    cfg: &config::Athena,
    what: &str,
    sql: &str,
) -> Result<QueryRows, SourceError> {
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
    SourceError::Aws { operation: format!("athena:{operation} {id}"), message: error_message(err) }
}

/// What one `GetQueryExecution` said about the query.
#[derive(Debug, Clone, PartialEq)]
enum Progress {
    Pending,
    Succeeded {
        bytes_scanned: u64,
    },
    /// FAILED or CANCELLED, with Athena's reason.
    Ended {
        state: String,
        reason: String,
    },
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
pub(crate) async fn read_pages<F, Fut>(label: &str, mut fetch: F) -> Result<Vec<Vec<Option<String>>>, SourceError>
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

#[cfg(test)]
mod tests {
    use super::*;
    use aws_sdk_athena::types::{AthenaError, QueryExecutionStatistics, QueryExecutionStatus};

    fn header() -> Vec<Option<String>> {
        vec![Some("user_name".to_string()), Some("calls".to_string())]
    }

    #[tokio::test]
    async fn a_header_only_result_is_empty_and_a_stuck_token_or_failed_page_is_an_error() {
        let rows = read_pages("q", |_| async { Ok((vec![header()], None)) }).await.unwrap();
        assert!(rows.is_empty());
        assert!(read_pages("q", |_| async { Ok((Vec::new(), None)) }).await.unwrap().is_empty());

        let err = read_pages("denials query q-1", |_| async { Ok((vec![header()], Some("same".to_string()))) })
            .await
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "Athena denials query q-1 returned the same NextToken twice; results are incomplete"
        );

        let err = read_pages("q", |_| async { Err::<Page, _>(SourceError::Other("boom".into())) }).await.unwrap_err();
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
                    .athena_error(
                        AthenaError::builder().error_message("COLUMN_NOT_FOUND: vpcendpointaccountid").build(),
                    )
                    .build(),
            )
            .build();
        assert_eq!(
            progress(Some(&failed)),
            Progress::Ended { state: "FAILED".into(), reason: "COLUMN_NOT_FOUND: vpcendpointaccountid".into() }
        );
        let cancelled = QueryExecution::builder()
            .status(
                QueryExecutionStatus::builder()
                    .state(QueryExecutionState::Cancelled)
                    .state_change_reason("Query cancelled by user")
                    .build(),
            )
            .build();
        assert!(
            matches!(progress(Some(&cancelled)), Progress::Ended { state, reason } if state == "CANCELLED" && reason == "Query cancelled by user")
        );
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
            Ok(Progress::Ended { state: "FAILED".into(), reason: "why".into() })
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
