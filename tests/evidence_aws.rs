//! The AWS evidence sources against the moto emulator: the trail bucket through `S3Trail`
//! (CloudTrail's layout, prefixes, `start_after`, pagination past 1000 keys, errors) and the
//! Athena window through `run_window` (polling through QUEUED and RUNNING, the header row, a bad
//! row, errors, the timeout). What moto cannot do (NextToken paging, FAILED queries, non-zero
//! bytes scanned) is unit-tested in `src/evidence/athena.rs`.

mod common;

use std::io::Write;
use std::time::Duration;

use chrono::{TimeZone, Utc};
use lockstep::clock::{Clock, SystemClock};
use lockstep::config::{Athena, Partitioning, S3Location};
use lockstep::evidence::athena::{run_window, window_query};
use lockstep::evidence::s3::S3Trail;
use lockstep::evidence::{SourceError, TrailObjects};
use tokio::task::JoinSet;

fn s3() -> aws_sdk_s3::Client {
    lockstep::aws::s3_client(&common::sdk_config())
}

async fn bucket(name: &str) -> aws_sdk_s3::Client {
    let client = s3();
    client.create_bucket().bucket(name).send().await.unwrap();
    client
}

/// Puts `objects` concurrently (moto answers each put in a few milliseconds).
async fn put_all(client: &aws_sdk_s3::Client, bucket: &str, objects: Vec<(String, Vec<u8>)>) {
    let mut puts = JoinSet::new();
    for chunk in objects.chunks(objects.len().div_ceil(16).max(1)) {
        let (client, bucket, chunk) = (client.clone(), bucket.to_string(), chunk.to_vec());
        puts.spawn(async move {
            for (key, body) in chunk {
                client.put_object().bucket(&bucket).key(key).body(body.into()).send().await.unwrap();
            }
        });
    }
    puts.join_all().await;
}

fn gzip(text: &str) -> Vec<u8> {
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    encoder.write_all(text.as_bytes()).unwrap();
    encoder.finish().unwrap()
}

fn trail_file(user: &str, at: &str) -> String {
    format!(
        r#"{{"Records":[{{"eventTime":"{at}","eventSource":"ec2.amazonaws.com","eventName":"DescribeInstances",
        "eventType":"AwsApiCall","sourceIPAddress":"203.0.113.5","recipientAccountId":"{acct}",
        "userIdentity":{{"type":"IAMUser","userName":"{user}","accountId":"{acct}","arn":"arn:aws:iam::{acct}:user/{user}"}}}}]}}"#,
        acct = common::ACCOUNT
    )
}

/// `AWSLogs/<account>/CloudTrail/<region>/YYYY/MM/DD/<account>_CloudTrail_<region>_<stamp>_<id>.json.gz`
fn trail_key(region: &str, day: &str, stamp: &str, id: &str) -> String {
    let acct = common::ACCOUNT;
    format!("AWSLogs/{acct}/CloudTrail/{region}/{day}/{acct}_CloudTrail_{region}_{stamp}_{id}.json.gz")
}

#[tokio::test]
async fn sdk_config_from_lockstep_reaches_the_emulator_with_path_style() {
    // lockstep's own loader, as the daemon builds it, with the test endpoint and static keys.
    let config = lockstep::aws::loader(common::REGION, Some(&common::endpoint()))
        .credentials_provider(aws_sdk_s3::config::Credentials::new("AKIDTEST", "secret", None, None, "test"))
        .load()
        .await;
    let client = lockstep::aws::s3_client(&config);
    client.create_bucket().bucket("path-style-check").send().await.unwrap();
    client.put_object().bucket("path-style-check").key("k").body(b"v".to_vec().into()).send().await.unwrap();
    // Seen from another client: the object really is in the emulator.
    let got = s3().get_object().bucket("path-style-check").key("k").send().await.unwrap();
    assert_eq!(got.body.collect().await.unwrap().into_bytes().as_ref(), b"v");
}

#[tokio::test]
async fn s3_trail_walks_the_cloudtrail_layout() {
    let name = "trail-layout";
    let client = bucket(name).await;
    let files = [
        trail_key("us-east-1", "2024/01/31", "20240131T2355Z", "a1"),
        trail_key("us-east-1", "2024/02/01", "20240201T0005Z", "b2"),
        trail_key("us-east-1", "2024/02/01", "20240201T0010Z", "c3"),
        trail_key("us-east-1", "2024/02/01", "20240201T0015Z", "d4"),
        trail_key("eu-west-1", "2024/02/01", "20240201T0005Z", "e5"),
    ];
    let mut objects: Vec<(String, Vec<u8>)> = files
        .iter()
        .enumerate()
        .map(|(i, key)| (format!("org/logs/{key}"), gzip(&trail_file(&format!("user{i}"), "2024-02-01T00:00:00Z"))))
        .collect();
    // Outside the configured prefix, and a console "folder" inside it: neither is a trail file.
    objects.push((format!("other/{}", files[0]), b"{}".to_vec()));
    objects.push(("org/logs/AWSLogs/folder/".to_string(), Vec::new()));
    put_all(&client, name, objects).await;

    let trail = S3Trail::new(client, &S3Location { bucket: name.into(), prefix: "/org/logs/".into() });
    let acct = common::ACCOUNT;
    assert_eq!(trail.list_prefixes("").await.unwrap(), ["AWSLogs/"]);
    assert_eq!(trail.list_prefixes("AWSLogs/").await.unwrap(), [format!("AWSLogs/{acct}/"), "AWSLogs/folder/".into()]);
    let regions = trail.list_prefixes(&format!("AWSLogs/{acct}/CloudTrail/")).await.unwrap();
    assert_eq!(
        regions,
        [format!("AWSLogs/{acct}/CloudTrail/eu-west-1/"), format!("AWSLogs/{acct}/CloudTrail/us-east-1/")]
    );
    let days = trail.list_prefixes(&format!("{}2024/", regions[1])).await.unwrap();
    assert_eq!(days, [format!("{}2024/01/", regions[1]), format!("{}2024/02/", regions[1])]);

    let region = &regions[1];
    assert_eq!(trail.list_keys(region, None).await.unwrap(), files[..4]);
    // start_after: only what was delivered after the last key read, across day folders too.
    assert_eq!(trail.list_keys(region, Some(&files[1])).await.unwrap(), files[2..4]);
    assert_eq!(trail.list_keys(&format!("{region}2024/02/01/"), Some(&files[0])).await.unwrap(), files[1..4]);
    assert!(trail.list_keys(region, Some(&files[3])).await.unwrap().is_empty());
    assert!(trail.list_keys("AWSLogs/folder/", None).await.unwrap().is_empty());

    let parsed = lockstep::trail::parse_bytes(&trail.fetch(&files[2]).await.unwrap()).unwrap();
    assert_eq!(parsed.records.len(), 1);
    assert_eq!(parsed.records[0].user_name(), Some("user2"));
}

#[tokio::test]
async fn s3_listing_follows_continuation_tokens_past_1000() {
    // moto pages ListObjectsV2 at 1000 keys, common prefixes included, as S3 does.
    let name = "trail-many";
    let client = bucket(name).await;
    let day = format!("AWSLogs/{}/CloudTrail/us-east-1/2024/03/05/", common::ACCOUNT);
    let keys: Vec<String> = (0..1205).map(|i| format!("{day}h{i:04}/f.json.gz")).collect();
    put_all(&client, name, keys.iter().map(|k| (k.clone(), b"x".to_vec())).collect()).await;
    let trail = S3Trail::new(client, &S3Location { bucket: name.into(), prefix: String::new() });
    assert_eq!(trail.list_keys(&day, None).await.unwrap(), keys);
    assert_eq!(trail.list_keys(&day, Some(&keys[99])).await.unwrap(), keys[100..]);
    let prefixes = trail.list_prefixes(&day).await.unwrap();
    assert_eq!(prefixes.len(), 1205);
    assert_eq!(prefixes[1204], format!("{day}h1204/"));
}

#[tokio::test]
async fn s3_errors_name_the_operation_and_carry_the_service_message() {
    let name = "trail-errors";
    let trail = S3Trail::new(bucket(name).await, &S3Location { bucket: name.into(), prefix: "p".into() });
    match trail.fetch("missing.json.gz").await {
        Err(SourceError::Aws { operation, message }) => {
            assert_eq!(operation, "s3:GetObject s3://trail-errors/p/missing.json.gz");
            assert!(message.starts_with("NoSuchKey"), "{message}");
        }
        other => panic!("{other:?}"),
    }
    let gone = S3Trail::new(s3(), &S3Location { bucket: "no-such-trail-bucket".into(), prefix: String::new() });
    let err = gone.list_keys("AWSLogs/", None).await.unwrap_err();
    let text = err.to_string();
    assert!(text.starts_with("s3:ListObjectsV2 s3://no-such-trail-bucket/AWSLogs/: NoSuchBucket"), "{text}");
}

fn athena_cfg() -> Athena {
    Athena {
        database: "cloudtrail".into(),
        table: "cloudtrail_logs".into(),
        workgroup: "primary".into(),
        output_location: "s3://athena-results/lockstep/".into(),
        partitioning: Partitioning::Projected,
        account_partition: None,
        poll_interval: Duration::from_millis(5),
        timeout: Duration::from_secs(20),
    }
}

fn athena() -> aws_sdk_athena::Client {
    aws_sdk_athena::Client::new(&common::sdk_config())
}

/// Result columns as `window_query` names them, read off its SELECT list.
fn result_columns() -> Vec<String> {
    let q = window_query(&athena_cfg(), common::ACCOUNT, "p", SystemClock.now(), SystemClock.now());
    let select = q.split("\nFROM ").next().unwrap();
    select
        .lines()
        .filter_map(|l| l.rsplit_once(" AS "))
        .map(|(_, alias)| alias.trim_end_matches(',').to_string())
        .collect()
}

/// One result row in `result_columns` order.
fn athena_row(user: &str, source_ip: &str, calls: &str, first: &str, explicit: &str) -> Vec<Option<String>> {
    let acct = common::ACCOUNT;
    let arn = format!("arn:aws:iam::{acct}:user/{user}");
    result_columns()
        .iter()
        .map(|col| {
            let value = match col.as_str() {
                "user_name" => user,
                "user_arn" => &arn,
                "identity_type" => "IAMUser",
                "identity_account" | "recipient_account" => acct,
                "event_source" => "ec2.amazonaws.com",
                "event_name" => "DescribeInstances",
                "event_type" => "AwsApiCall",
                "source_ip" => source_ip,
                "error_code" => "Client.UnauthorizedOperation",
                "explicit_deny" => explicit,
                "calls" => calls,
                "first_time" => first,
                "last_time" => "2024-05-01T10:59:00Z",
                _ => return None,
            };
            Some(value.to_string())
        })
        .collect()
}

#[tokio::test]
async fn athena_window_polls_pages_and_skips_the_header_and_bad_rows() {
    let _serial = common::exclusive().await;
    let columns = result_columns();
    let names: Vec<&str> = columns.iter().map(String::as_str).collect();
    common::queue_athena_result(
        &names,
        &[
            athena_row("alice", "203.0.113.9", "17", "2024-05-01T10:02:03Z", "0"),
            athena_row("bob", "198.51.100.4", "3", "2024-05-01T10:30:00Z", "1"),
            athena_row("carol", "198.51.100.5", "lots", "2024-05-01T10:30:00Z", "0"),
        ],
    );
    // Two polls per step: QUEUED, QUEUED, RUNNING, RUNNING, SUCCEEDED. Reading results before
    // SUCCEEDED is an error in moto, so success here means the run waited.
    common::athena_transition(Some(2));
    let cfg = athena_cfg();
    let (since, until) =
        (Utc.with_ymd_and_hms(2024, 5, 1, 0, 0, 0).unwrap(), Utc.with_ymd_and_hms(2024, 5, 2, 0, 0, 0).unwrap());
    let client = athena();
    let run = run_window(&client, &cfg, common::ACCOUNT, "lockstep-deny", since, until).await;
    common::athena_transition(None);
    let run = run.unwrap();

    assert_eq!(run.skipped_rows, 1, "carol's count does not parse");
    assert_eq!(run.bytes_scanned, 0, "moto reports no bytes scanned");
    assert!(run.elapsed > Duration::ZERO);
    let got: Vec<_> =
        run.groups.iter().map(|g| (g.record.user_name().unwrap(), g.calls, g.record.denial("lockstep-deny"))).collect();
    use lockstep::trail::Denial;
    assert_eq!(got, [("alice", 17, Some(Denial::Other)), ("bob", 3, Some(Denial::ExplicitIdentityDeny))]);
    assert_eq!(run.groups[0].first, Utc.with_ymd_and_hms(2024, 5, 1, 10, 2, 3).unwrap());

    // The query moto received is window_query's, in the configured workgroup and output location.
    let ids = client.list_query_executions().work_group("primary").send().await.unwrap();
    let mut found = false;
    for id in ids.query_execution_ids() {
        let execution = client.get_query_execution().query_execution_id(id).send().await.unwrap();
        let execution = execution.query_execution().unwrap();
        if execution.query() == Some(window_query(&cfg, common::ACCOUNT, "lockstep-deny", since, until).as_str()) {
            let output = execution.result_configuration().and_then(|r| r.output_location()).unwrap();
            assert!(output.starts_with("s3://athena-results/lockstep/"), "{output}");
            assert_eq!(execution.query_execution_context().and_then(|c| c.database()), Some("cloudtrail"));
            found = true;
        }
    }
    assert!(found, "window query not among moto's executions");
}

#[tokio::test]
async fn athena_timeout_stops_the_query() {
    let _serial = common::exclusive().await;
    common::athena_transition(Some(100_000));
    let cfg = Athena { timeout: Duration::from_millis(150), ..athena_cfg() };
    let client = athena();
    let result = run_window(
        &client,
        &cfg,
        common::ACCOUNT,
        "p",
        SystemClock.now() - chrono::TimeDelta::hours(1),
        SystemClock.now(),
    )
    .await;
    common::athena_transition(None);
    let err = result.unwrap_err().to_string();
    assert!(err.contains("did not finish within 150ms; stopped it"), "{err}");
    let words: Vec<&str> = err.split_whitespace().collect();
    let id = words[words.iter().position(|w| *w == "query").unwrap() + 1];
    let execution = client.get_query_execution().query_execution_id(id).send().await.unwrap();
    let state = execution.query_execution().and_then(|e| e.status()).and_then(|s| s.state());
    assert_eq!(state.map(|s| s.as_str()), Some("CANCELLED"));
}

#[tokio::test]
async fn athena_errors_name_the_operation_and_carry_the_service_message() {
    let cfg = Athena { workgroup: "no-such-workgroup".into(), ..athena_cfg() };
    let err = run_window(
        &athena(),
        &cfg,
        common::ACCOUNT,
        "p",
        SystemClock.now() - chrono::TimeDelta::hours(1),
        SystemClock.now(),
    )
    .await
    .unwrap_err();
    assert_eq!(
        err.to_string(),
        "athena:StartQueryExecution in workgroup no-such-workgroup: InvalidRequestException: WorkGroup does not exist"
    );
}
