//! `AthenaFeed`, the guard's event feed from Athena, against the moto emulator: the two queries
//! per poll (denials, activity) read into records, the overlapping windows deduplicated, failures
//! surfaced as errors without moving the window, and the exact query texts run by DuckDB over
//! trail files in CloudTrail's layout (both partition layouts), their rows served back by moto.
//!
//! The Athena result queue is server-wide and each query started takes the next result, so every
//! test that starts a query holds `common::exclusive()`.

mod common;

use std::collections::BTreeSet;
use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, TimeDelta, TimeZone, Utc};
use lockstep::clock::{Clock, ManualClock};
use lockstep::config::{Athena, Partitioning};
use lockstep::feed::athena::{activity_query, denials_query};
use lockstep::feed::{AthenaFeed, EventFeed};
use lockstep::trail::{Denial, Record};
use serde_json::{Value, json};

const ACCOUNT: &str = common::ACCOUNT;
const POLICY: &str = "lockstep-deny";

/// The denial query's result labels, in order (DuckDB's answer is checked against them below).
const DENIAL_COLUMNS: [&str; 12] = [
    "event_id",
    "event_time",
    "event_source",
    "event_name",
    "error_code",
    "error_message",
    "user_name",
    "user_arn",
    "identity_type",
    "identity_account",
    "recipient_account",
    "source_ip",
];
const ACTIVITY_COLUMNS: [&str; 2] = ["user_name", "last_time"];

fn athena_cfg(partitioning: Partitioning) -> Athena {
    Athena {
        database: "cloudtrail".into(),
        table: "cloudtrail_logs".into(),
        workgroup: "primary".into(),
        output_location: "s3://athena-results/lockstep/".into(),
        partitioning,
        account_partition: None,
        poll_interval: Duration::from_millis(5),
        timeout: Duration::from_secs(20),
    }
}

fn athena() -> aws_sdk_athena::Client {
    aws_sdk_athena::Client::new(&common::sdk_config())
}

fn feed(cfg: Athena, clock: &Arc<ManualClock>, lookback: Duration) -> AthenaFeed {
    let clock: Arc<dyn Clock> = clock.clone();
    AthenaFeed::new(athena(), cfg, ACCOUNT, clock, lookback)
}

fn time(y: i32, mo: u32, d: u32, h: u32, mi: u32, s: u32) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(y, mo, d, h, mi, s).unwrap()
}

fn cells(values: &[Option<&str>]) -> Vec<Option<String>> {
    values.iter().map(|v| v.map(str::to_string)).collect()
}

/// A denial result row: event ID, time, user, error code and message; the rest as for an IAM
/// user of the account calling EC2.
fn denial_row(id: &str, at: &str, user: &str, code: &str, message: Option<&str>) -> Vec<Option<String>> {
    let arn = format!("arn:aws:iam::{ACCOUNT}:user/{user}");
    cells(&[
        Some(id),
        Some(at),
        Some("ec2.amazonaws.com"),
        Some("DescribeInstances"),
        Some(code),
        message,
        Some(user),
        Some(&arn),
        Some("IAMUser"),
        Some(ACCOUNT),
        Some(ACCOUNT),
        Some("203.0.113.9"),
    ])
}

fn activity_row(user: &str, last: &str) -> Vec<Option<String>> {
    cells(&[Some(user), Some(last)])
}

fn lockdown_message(user: &str) -> String {
    format!(
        "User: arn:aws:iam::{ACCOUNT}:user/{user} is not authorized to perform: ec2:DescribeInstances with an explicit deny in an identity-based policy: arn:aws:iam::{ACCOUNT}:policy/{POLICY}"
    )
}

/// What the guard reads off one record: its event ID, user, time and denial kind.
fn summary(records: &[Record]) -> Vec<(String, String, DateTime<Utc>, Option<Denial>)> {
    let mut out: Vec<_> = records
        .iter()
        .map(|r| {
            (
                r.event_id.clone().unwrap_or_default(),
                r.user_name().unwrap_or_default().to_string(),
                r.event_time().expect("every record has a time"),
                r.denial(POLICY),
            )
        })
        .collect();
    out.sort();
    out
}

/// Whether moto was asked to run exactly `query`.
async fn was_run(client: &aws_sdk_athena::Client, query: &str) -> bool {
    let ids = client.list_query_executions().work_group("primary").send().await.unwrap();
    for id in ids.query_execution_ids() {
        let execution = client.get_query_execution().query_execution_id(id).send().await.unwrap();
        if execution.query_execution().and_then(|e| e.query()) == Some(query) {
            return true;
        }
    }
    false
}

#[tokio::test]
async fn polls_return_denials_and_activity_once() {
    let _serial = common::exclusive().await;
    let cfg = athena_cfg(Partitioning::Projected);
    let clock = Arc::new(ManualClock::new(time(2024, 5, 1, 12, 0, 0)));
    let mut feed = feed(cfg.clone(), &clock, Duration::from_secs(2 * 3600));

    // First poll: the denials query's result, then the activity query's.
    let alice_message = lockdown_message("alice");
    common::queue_athena_result(
        &DENIAL_COLUMNS,
        &[
            denial_row("e-1", "2024-05-01T11:50:00Z", "alice", "Client.UnauthorizedOperation", Some(&alice_message)),
            denial_row("e-2", "2024-05-01T11:55:00Z", "bob", "AccessDeniedException", None),
            denial_row("e-bad", "eleven fifty", "bob", "AccessDenied", None),
            // NULL ARN, address and message: still a denial.
            cells(&[
                Some("e-3"),
                Some("2024-05-01T11:40:00Z"),
                Some("s3.amazonaws.com"),
                Some("GetObject"),
                Some("AccessDenied"),
                None,
                Some("carol"),
                None,
                Some("IAMUser"),
                None,
                Some(ACCOUNT),
                None,
            ]),
        ],
    );
    common::queue_athena_result(
        &ACTIVITY_COLUMNS,
        &[
            activity_row("alice", "2024-05-01T11:58:00Z"),
            activity_row("dave", "2024-05-01T11:59:30Z"),
            activity_row("carol", "2024-05-01T11:40:00Z"),
            cells(&[None, Some("2024-05-01T11:00:00Z")]),
        ],
    );
    let first = feed.poll().await.unwrap();
    assert_eq!(
        summary(&first),
        [
            ("activity/alice/2024-05-01T11:58:00Z".into(), "alice".into(), time(2024, 5, 1, 11, 58, 0), None),
            ("activity/carol/2024-05-01T11:40:00Z".into(), "carol".into(), time(2024, 5, 1, 11, 40, 0), None),
            ("activity/dave/2024-05-01T11:59:30Z".into(), "dave".into(), time(2024, 5, 1, 11, 59, 30), None),
            ("e-1".into(), "alice".into(), time(2024, 5, 1, 11, 50, 0), Some(Denial::ExplicitIdentityDeny)),
            ("e-2".into(), "bob".into(), time(2024, 5, 1, 11, 55, 0), Some(Denial::Other)),
            ("e-3".into(), "carol".into(), time(2024, 5, 1, 11, 40, 0), Some(Denial::Other)),
        ]
    );
    let e1 = first.iter().find(|r| r.event_id.as_deref() == Some("e-1")).unwrap();
    assert_eq!(e1.action().as_deref(), Some("ec2:DescribeInstances"));
    assert_eq!(e1.error_message.as_deref(), Some(alice_message.as_str()));
    assert_eq!(e1.source_ip_address.as_deref(), Some("203.0.113.9"));
    let client = athena();
    let (since, until) = (time(2024, 5, 1, 10, 0, 0), time(2024, 5, 1, 12, 0, 0));
    assert!(was_run(&client, &denials_query(&cfg, ACCOUNT, since, until)).await, "first denials query");
    assert!(was_run(&client, &activity_query(&cfg, ACCOUNT, since, until)).await, "first activity query");

    // Five minutes later the window reaches back 15 minutes before the last one ended, so Athena
    // returns some of the same records again; only the new ones come out.
    clock.advance(TimeDelta::minutes(5));
    common::queue_athena_result(
        &DENIAL_COLUMNS,
        &[
            denial_row("e-2", "2024-05-01T11:55:00Z", "bob", "AccessDeniedException", None),
            denial_row(
                "e-4",
                "2024-05-01T12:01:00Z",
                "bob",
                "AccessDenied",
                Some("no identity-based policy allows it"),
            ),
        ],
    );
    common::queue_athena_result(
        &ACTIVITY_COLUMNS,
        &[
            // alice made no further call: the same activity record, not returned again.
            activity_row("alice", "2024-05-01T11:58:00Z"),
            activity_row("dave", "2024-05-01T12:04:00Z"),
            activity_row("erin", "2024-05-01T12:02:00Z"),
        ],
    );
    let second = feed.poll().await.unwrap();
    assert_eq!(
        summary(&second),
        [
            ("activity/dave/2024-05-01T12:04:00Z".into(), "dave".into(), time(2024, 5, 1, 12, 4, 0), None),
            ("activity/erin/2024-05-01T12:02:00Z".into(), "erin".into(), time(2024, 5, 1, 12, 2, 0), None),
            ("e-4".into(), "bob".into(), time(2024, 5, 1, 12, 1, 0), Some(Denial::Other)),
        ]
    );
    let (since, until) = (time(2024, 5, 1, 11, 45, 0), time(2024, 5, 1, 12, 5, 0));
    assert!(was_run(&client, &denials_query(&cfg, ACCOUNT, since, until)).await, "second denials query");
    assert!(was_run(&client, &activity_query(&cfg, ACCOUNT, since, until)).await, "second activity query");

    // Nothing new: nothing returned (the queue is empty, so both queries give zero rows).
    clock.advance(TimeDelta::minutes(1));
    assert!(feed.poll().await.unwrap().is_empty());
}

#[tokio::test]
async fn a_query_that_times_out_is_an_error_and_the_window_does_not_move() {
    let _serial = common::exclusive().await;
    let cfg = Athena { timeout: Duration::from_millis(150), ..athena_cfg(Partitioning::Projected) };
    let start = time(2024, 6, 3, 9, 0, 0);
    let clock = Arc::new(ManualClock::new(start));
    let mut feed = feed(cfg.clone(), &clock, Duration::from_secs(3600));

    common::athena_transition(Some(100_000));
    let failed = feed.poll().await;
    common::athena_transition(None);
    let err = failed.unwrap_err().to_string();
    assert!(err.starts_with("Athena denials query "), "{err}");
    assert!(err.ends_with("did not finish within 150ms; stopped it"), "{err}");
    let client = athena();
    let id = err.split_whitespace().nth(3).unwrap();
    let execution = client.get_query_execution().query_execution_id(id).send().await.unwrap();
    let state = execution.query_execution().and_then(|e| e.status()).and_then(|s| s.state());
    assert_eq!(state.map(|s| s.as_str()), Some("CANCELLED"));

    // The next poll still reaches back the whole lookback: the failed one did not count.
    clock.advance(TimeDelta::minutes(1));
    assert!(feed.poll().await.unwrap().is_empty());
    let now = start + TimeDelta::minutes(1);
    assert!(was_run(&client, &activity_query(&cfg, ACCOUNT, now - TimeDelta::hours(1), now)).await);
}

#[tokio::test]
async fn athena_errors_surface_as_source_errors() {
    let _serial = common::exclusive().await;
    let cfg = Athena { workgroup: "no-such-workgroup".into(), ..athena_cfg(Partitioning::Projected) };
    let clock = Arc::new(ManualClock::new(time(2024, 6, 3, 9, 0, 0)));
    let err = feed(cfg, &clock, Duration::from_secs(3600)).poll().await.unwrap_err();
    assert_eq!(
        err.to_string(),
        "athena:StartQueryExecution in workgroup no-such-workgroup: InvalidRequestException: WorkGroup does not exist"
    );
}

/// One CloudTrail record of an EC2 call.
fn record(id: &str, at: &str, identity: Value, error: Option<(&str, Option<&str>)>) -> Value {
    let mut r = json!({
        "eventVersion": "1.09",
        "eventID": id,
        "eventTime": at,
        "eventSource": "ec2.amazonaws.com",
        "eventName": "DescribeInstances",
        "awsRegion": "us-east-1",
        "sourceIPAddress": "203.0.113.9",
        "eventType": "AwsApiCall",
        "recipientAccountId": ACCOUNT,
        "userIdentity": identity,
    });
    if let Some((code, message)) = error {
        r["errorCode"] = json!(code);
        if let Some(message) = message {
            r["errorMessage"] = json!(message);
        }
    }
    r
}

fn iam_user(user: &str) -> Value {
    json!({"type": "IAMUser", "userName": user, "accountId": ACCOUNT, "arn": format!("arn:aws:iam::{ACCOUNT}:user/{user}")})
}

/// Writes `records` as one gzip-compressed trail file delivered on `day` (`YYYY/MM/DD`).
fn deliver(root: &Path, day: &str, name: &str, records: Vec<Value>) {
    let folder = root.join(format!("AWSLogs/{ACCOUNT}/CloudTrail/us-east-1/{day}"));
    std::fs::create_dir_all(&folder).unwrap();
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    encoder.write_all(json!({ "Records": records }).to_string().as_bytes()).unwrap();
    std::fs::write(folder.join(format!("{ACCOUNT}_CloudTrail_us-east-1_{name}.json.gz")), encoder.finish().unwrap())
        .unwrap();
}

#[tokio::test]
async fn the_queries_run_by_duckdb_over_trail_files_give_the_expected_records() {
    let _serial = common::exclusive().await;
    // The first poll at 00:10 covers 22:10 to 00:10 across the new year.
    let now = time(2024, 1, 1, 0, 10, 0);
    let trail = tempfile::tempdir().unwrap();
    let lockdown = lockdown_message("alice");
    let deny = |code: &'static str, message: Option<&'static str>| Some((code, message));
    deliver(
        trail.path(),
        "2023/12/31",
        "20231231T2355Z_a",
        vec![
            record(
                "a-deny",
                "2023-12-31T23:50:00Z",
                iam_user("alice"),
                Some(("AccessDenied", Some(lockdown.as_str()))),
            ),
            record("b-ok", "2023-12-31T22:30:00Z", iam_user("bob"), None),
            record("b-ec2", "2023-12-31T23:00:00Z", iam_user("bob"), deny("Client.UnauthorizedOperation", None)),
            record(
                "d-throttled",
                "2023-12-31T23:30:00Z",
                iam_user("dave"),
                deny("ThrottlingException", Some("Rate exceeded")),
            ),
            // Before the window.
            record("e-early", "2023-12-31T22:00:00Z", iam_user("erin"), deny("AccessDenied", None)),
            // Not IAM users of the account.
            record(
                "role",
                "2023-12-31T23:10:00Z",
                json!({"type": "AssumedRole", "accountId": ACCOUNT, "arn": format!("arn:aws:sts::{ACCOUNT}:assumed-role/deploy/x")}),
                deny("AccessDenied", None),
            ),
            record(
                "other-account",
                "2023-12-31T23:10:00Z",
                json!({"type": "IAMUser", "userName": "olga", "accountId": "210987654321"}),
                deny("AccessDenied", None),
            ),
        ],
    );
    deliver(
        trail.path(),
        "2024/01/01",
        "20240101T0005Z_b",
        vec![
            // Delivered after midnight.
            record("a-late", "2023-12-31T23:58:00Z", iam_user("alice"), None),
            record("a-ok", "2024-01-01T00:05:00Z", iam_user("alice"), None),
            record(
                "c-deny",
                "2024-01-01T00:09:59Z",
                iam_user("carol"),
                deny("AccessDeniedException", Some("no identity-based policy allows the action")),
            ),
            // No accountId: the recipient account decides.
            record(
                "g-deny",
                "2023-12-31T23:20:00Z",
                json!({"type": "IAMUser", "userName": "gina"}),
                deny("AccessDenied", None),
            ),
            // The window's end is exclusive.
            record("f-at-end", "2024-01-01T00:10:00Z", iam_user("frank"), deny("AccessDenied", None)),
        ],
    );
    // Misfiled outside the queried partitions: the partition constraint leaves it out.
    deliver(
        trail.path(),
        "2023/12/29",
        "20231229T0000Z_c",
        vec![record("h-misfiled", "2023-12-31T23:00:00Z", iam_user("hana"), deny("AccessDenied", None))],
    );

    let expected_denials = [
        ("a-deny", "alice", Denial::ExplicitIdentityDeny),
        ("b-ec2", "bob", Denial::Other),
        ("c-deny", "carol", Denial::Other),
        ("g-deny", "gina", Denial::Other),
    ];
    let expected_activity = [
        "activity/alice/2024-01-01T00:05:00Z",
        "activity/bob/2023-12-31T23:00:00Z",
        "activity/carol/2024-01-01T00:09:59Z",
        "activity/dave/2023-12-31T23:30:00Z",
        "activity/gina/2023-12-31T23:20:00Z",
    ];
    for partitioning in [Partitioning::Projected, Partitioning::RegionYearMonthDay] {
        let cfg = athena_cfg(partitioning);
        let (since, until) = (now - TimeDelta::hours(2), now);
        let results = common::duckdb(
            trail.path(),
            &[denials_query(&cfg, ACCOUNT, since, until), activity_query(&cfg, ACCOUNT, since, until)],
        );
        assert_eq!(results[0].columns, DENIAL_COLUMNS, "{partitioning:?}");
        assert_eq!(results[1].columns, ACTIVITY_COLUMNS, "{partitioning:?}");
        for result in &results {
            let columns: Vec<&str> = result.columns.iter().map(String::as_str).collect();
            common::queue_athena_result(&columns, &result.rows);
        }
        let clock = Arc::new(ManualClock::new(now));
        let records = feed(cfg, &clock, Duration::from_secs(2 * 3600)).poll().await.unwrap();

        let denials: BTreeSet<(String, String, Denial)> = records
            .iter()
            .filter_map(|r| Some((r.event_id.clone()?, r.user_name()?.to_string(), r.denial(POLICY)?)))
            .collect();
        let expected: BTreeSet<_> =
            expected_denials.iter().map(|(id, u, d)| (id.to_string(), u.to_string(), *d)).collect();
        assert_eq!(denials, expected, "{partitioning:?}");
        let activity: BTreeSet<&str> =
            records.iter().filter(|r| r.denial(POLICY).is_none()).filter_map(|r| r.event_id.as_deref()).collect();
        assert_eq!(activity, BTreeSet::from(expected_activity), "{partitioning:?}");
        assert_eq!(records.len(), expected_denials.len() + expected_activity.len(), "{partitioning:?}");
    }
}
