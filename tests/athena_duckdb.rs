//! The Athena query, checked end to end against the trail files themselves.
//!
//! Generated trail files are loaded by DuckDB into a table shaped like Athena's CloudTrail
//! table; the *exact* text of `window_query` runs there, for both partition layouts; DuckDB's
//! rows are served by moto as Athena results and read by the real `run_window`. The aggregates of
//! what it returns must equal the aggregates of the same files parsed directly.
//!
//! The files: the project's synthetic organisation (`lockstep_synth`, realistic behaviours and
//! volumes), plus a compact mix generated here at the JSON level for what a record builder does
//! not express and the query must still get right: missing `accountId`, null `eventSource`,
//! padded, empty, junk and missing addresses, empty endpoint IDs, denial messages that name the
//! lockdown policy under a path or a look-alike policy, late deliveries across midnight and the
//! new year, and one misfiled file outside the queried partitions.

mod common;

use std::collections::{BTreeMap, HashSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use chrono::{DateTime, TimeDelta, TimeZone, Utc};
use lockstep::config::{Athena, Partitioning};
use lockstep::evidence::CallGroup;
use lockstep::evidence::aggregate::{Aggregates, Judge, UserHour, aggregate};
use lockstep::evidence::athena::{run_window, window_query};
use lockstep::perimeter::{Perimeter, SkipReason, Verdict};
use serde_json::{Value, json};

const ACCOUNT: &str = common::ACCOUNT;
const OTHER_ACCOUNT: &str = "210987654321";
const POLICY: &str = "lockstep-deny";
const TRUSTED_ENDPOINT: &str = "vpce-0123456789abcdef0";

/// A small deterministic generator (xorshift64*), so failures reproduce.
struct Dice(u64);

impl Dice {
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 33) as usize % n
    }

    fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.below(items.len())]
    }

    fn chance(&mut self, percent: usize) -> bool {
        self.below(100) < percent
    }
}

fn window() -> (DateTime<Utc>, DateTime<Utc>) {
    // Across the new year, starting and ending off the hour (and off the second).
    let since = Utc.with_ymd_and_hms(2023, 12, 30, 6, 17, 42).unwrap() + TimeDelta::milliseconds(250);
    (since, Utc.with_ymd_and_hms(2024, 1, 1, 23, 52, 7).unwrap())
}

fn user_identity(dice: &mut Dice, user: &str) -> Option<Value> {
    let arn = format!("arn:aws:iam::{ACCOUNT}:user/{user}");
    Some(match dice.below(100) {
        0..=79 => json!({"type": "IAMUser", "principalId": "AIDAEXAMPLE", "arn": arn, "accountId": ACCOUNT,
                         "accessKeyId": "AKIAEXAMPLE", "userName": user}),
        // No accountId: the recipient account decides.
        80..=84 => json!({"type": "IAMUser", "arn": arn, "userName": user}),
        // Console session of an IAM user.
        85..=87 => {
            json!({"type": "IAMUser", "arn": arn, "accountId": ACCOUNT, "userName": user, "accessKeyId": "ASIAEXAMPLE",
                          "sessionContext": {"attributes": {"mfaAuthenticated": "true", "creationDate": "2023-12-30T00:00:00Z"}}})
        }
        88..=90 => json!({"type": "IAMUser", "arn": format!("arn:aws:iam::{OTHER_ACCOUNT}:user/{user}"),
                          "accountId": OTHER_ACCOUNT, "userName": user}),
        91..=95 => json!({"type": "AssumedRole", "arn": format!("arn:aws:sts::{ACCOUNT}:assumed-role/deploy/{user}"),
                          "accountId": ACCOUNT, "sessionContext": {"sessionIssuer": {"type": "Role", "userName": "deploy"}}}),
        96..=97 => json!({"type": "AWSService", "invokedBy": "cloudtrail.amazonaws.com"}),
        _ => return None,
    })
}

/// One call by `user` at `at`: where from, what, and how it ended, drawn from the mix above.
fn call(dice: &mut Dice, user: &str, at: DateTime<Utc>) -> Value {
    let mut r = json!({
        "eventVersion": "1.09",
        "eventTime": at.format("%Y-%m-%dT%H:%M:%SZ").to_string(),
        "awsRegion": "us-east-1",
        "userAgent": "aws-cli/2.15.0",
        "requestID": format!("req-{}", dice.below(1_000_000)),
        "eventID": format!("evt-{}", dice.below(1_000_000_000)),
        "readOnly": dice.chance(70),
        "eventType": "AwsApiCall",
        "managementEvent": true,
        "recipientAccountId": ACCOUNT,
        "eventCategory": "Management",
    });
    if let Some(identity) = user_identity(dice, user) {
        r["userIdentity"] = identity;
    }
    let (source, name) = dice.pick(&[
        ("ec2.amazonaws.com", "DescribeInstances"),
        ("s3.amazonaws.com", "GetObject"),
        ("s3.amazonaws.com", "GetObject"),
        ("s3.amazonaws.com", "PutObject"),
        ("iam.amazonaws.com", "GetUser"),
        ("sts.amazonaws.com", "GetCallerIdentity"),
        ("kms.amazonaws.com", "Decrypt"),
        ("es.amazonaws.com", "ESHttpGet"),
        ("monitoring.amazonaws.com", "GetMetricData"),
    ]);
    r["eventSource"] = json!(source);
    r["eventName"] = json!(name);
    if source == "s3.amazonaws.com" {
        let method = if dice.chance(40) { "QueryString" } else { "AuthHeader" };
        r["additionalEventData"] = json!({"SignatureVersion": "SigV4", "CipherSuite": "TLS_AES_128_GCM_SHA256",
                                          "bytesTransferredIn": 0, "AuthenticationMethod": method, "x-amz-id-2": "abc"});
        r["resources"] = json!([{"ARN": "arn:aws:s3:::data/key", "type": "AWS::S3::Object"}]);
        r["eventCategory"] = json!("Data");
    } else if dice.chance(10) {
        r["additionalEventData"] = json!({"MFAUsed": "No"});
    }
    match dice.below(100) {
        0..=34 => r["sourceIPAddress"] = json!(format!("203.0.113.{}", dice.below(250))),
        35..=39 => r["sourceIPAddress"] = json!("2001:db8:1234::17"),
        40..=54 => r["sourceIPAddress"] = json!(format!("198.51.100.{}", dice.below(250))),
        55..=56 => r["sourceIPAddress"] = json!("2001:db8:ffff::9"),
        57..=58 => r["sourceIPAddress"] = json!("035.249.253.232"),
        59 => r["sourceIPAddress"] = json!(" 203.0.113.77 "),
        60 => r["sourceIPAddress"] = json!(""),
        61 => {}
        62..=71 => {
            r["sourceIPAddress"] = json!(format!("10.0.{}.{}", dice.below(4), dice.below(250)));
            r["vpcEndpointId"] = json!(TRUSTED_ENDPOINT);
            match dice.below(3) {
                0 => r["vpcEndpointAccountId"] = json!(ACCOUNT),
                1 => r["vpcEndpointAccountId"] = json!(OTHER_ACCOUNT),
                _ => {}
            }
        }
        72..=76 => {
            // AWS-owned endpoint, as S3 console calls arrive.
            r["sourceIPAddress"] = json!("10.200.1.1");
            r["vpcEndpointId"] = json!("vpce-0fffffffffffffff0");
        }
        77..=79 => {
            r["sourceIPAddress"] = json!("203.0.113.8");
            r["vpcEndpointId"] = json!("");
        }
        80..=87 => {
            r["sourceIPAddress"] = json!("athena.amazonaws.com");
            if let Some(identity) = r.get_mut("userIdentity").and_then(Value::as_object_mut) {
                identity.insert("invokedBy".into(), json!("athena.amazonaws.com"));
            }
        }
        88..=92 => r["sourceIPAddress"] = json!("AWS Internal"),
        _ => r["sourceIPAddress"] = json!("kms.amazonaws.com"),
    }
    let action = format!("{}:{name}", source.split('.').next().unwrap_or(source));
    let arn = format!("arn:aws:iam::{ACCOUNT}:user/{user}");
    let denied = |why: &str| {
        format!("User: {arn} is not authorized to perform: {action} on resource: arn:aws:s3:::data/key {why}")
    };
    let (code, message) = match dice.below(100) {
        0..=69 => (None, None),
        70..=74 => (
            Some("AccessDenied"),
            Some(denied(&format!(
                "with an explicit deny in an identity-based policy: arn:aws:iam::{ACCOUNT}:policy/{POLICY}"
            ))),
        ),
        75..=76 => (Some("AccessDenied"), Some(denied("with an explicit deny in an identity-based policy"))),
        // The lockdown policy under a path, the ARN followed by a full stop.
        77..=78 => (
            Some("AccessDeniedException"),
            Some(denied(&format!("because arn:aws:iam::{ACCOUNT}:policy/security/{POLICY}. denies it"))),
        ),
        // A policy whose name merely starts with the lockdown policy's.
        79..=80 => (
            Some("AccessDenied"),
            Some(denied(&format!(
                "because no identity-based policy allows: arn:aws:iam::{ACCOUNT}:policy/{POLICY}-old"
            ))),
        ),
        81..=86 => (
            Some("AccessDenied"),
            Some(denied(&format!("because no identity-based policy allows the {action} action"))),
        ),
        87..=88 => (Some("AccessDenied"), None),
        89..=91 => (
            Some("Client.UnauthorizedOperation"),
            Some("You are not authorized to perform this operation.".to_string()),
        ),
        92..=95 => (Some("ThrottlingException"), Some("Rate exceeded".to_string())),
        _ => (Some("NoSuchKey"), Some("The specified key does not exist.".to_string())),
    };
    if let Some(code) = code {
        r["errorCode"] = json!(code);
    }
    if let Some(message) = message {
        r["errorMessage"] = json!(message);
    }
    match dice.below(100) {
        0..=1 => {
            r["eventType"] = json!("AwsConsoleSignIn");
            r["eventSource"] = json!("signin.amazonaws.com");
            r["eventName"] = json!("ConsoleLogin");
        }
        2 => r["eventType"] = json!("AwsServiceEvent"),
        3 => r["eventSource"] = Value::Null,
        _ => {}
    }
    r
}

/// A generated trail: the files that belong to it, and one misfiled file (in-window calls in a
/// day folder far outside the window) that a partition-constrained query must not read.
struct Trail {
    root: tempfile::TempDir,
    files: Vec<PathBuf>,
}

fn generate() -> Trail {
    let (since, until) = window();
    let (start, end) = (since - TimeDelta::hours(8), until + TimeDelta::hours(6));
    let span = (end - start).num_seconds() as usize;
    let mut dice = Dice(0x5eed_1234_abcd_0001);
    // Distinct times per user, so "the latest call from a source" never depends on input order.
    let mut taken = HashSet::new();
    // (region, delivery slot) -> records delivered in that file.
    let mut files: BTreeMap<(&str, DateTime<Utc>), Vec<Value>> = BTreeMap::new();
    let mut made = 0;
    while made < 2500 {
        let number = dice.below(40);
        let user = format!("user{number:02}");
        let at = start + TimeDelta::seconds(dice.below(span) as i64);
        if !taken.insert((user.clone(), at)) {
            continue;
        }
        made += 1;
        // Most calls repeat one of the user's habits (same call, same place), which Athena
        // groups; the rest are one-offs.
        let mut record = if dice.chance(70) {
            let habit = (number * 3 + dice.below(3)) as u64;
            call(&mut Dice(0x9e37_79b9_7f4a_7c15 ^ habit), &user, at)
        } else {
            call(&mut dice, &user, at)
        };
        // Every call its own event (a habit repeats the call, not its ID).
        record["eventID"] = json!(format!("evt-{made:05}"));
        // Usually minutes; now and then hours late (never past the query's delivery slack).
        let mut delay = TimeDelta::minutes(2 + dice.below(20) as i64);
        if dice.chance(3) && at + TimeDelta::hours(4) < until {
            delay = TimeDelta::hours(3);
        }
        let delivered = at + delay;
        let slot = delivered - TimeDelta::seconds(delivered.timestamp() % 900);
        let region = dice.pick(&["us-east-1", "eu-west-1"]);
        // CloudTrail delivers at least once: now and then the record again, in a later file.
        if dice.chance(2) {
            let again = slot + TimeDelta::minutes(15);
            files.entry((region, again)).or_default().push(record.clone());
        }
        files.entry((region, slot)).or_default().push(record);
    }
    let root = tempfile::tempdir().unwrap();
    let mut written = Vec::new();
    for (n, ((region, slot), records)) in files.into_iter().enumerate() {
        written.push(write_trail_file(root.path(), region, slot, n, &records));
    }
    // The project's realistic organisation on top (behaviours and volumes as users have them),
    // from the evening before the new year to past the window's end, to keep the test quick.
    let org = lockstep_synth::Org::new(7, 8, &judge().perimeter);
    let generated = org.generate(Utc.with_ymd_and_hms(2023, 12, 31, 20, 0, 0).unwrap(), end);
    let synth = lockstep_synth::write_trail(root.path(), ACCOUNT, &generated.records, Default::default()).unwrap();
    written.extend(synth.files);
    // In-window calls misfiled under a November day: outside every partition range we query.
    let misfiled: Vec<Value> =
        (0..5).map(|i| call(&mut Dice(99 + i), "misfiled", since + TimeDelta::hours(1))).collect();
    write_trail_file(root.path(), "us-east-1", Utc.with_ymd_and_hms(2023, 11, 15, 0, 0, 0).unwrap(), 0, &misfiled);
    Trail { root, files: written }
}

fn write_trail_file(root: &Path, region: &str, slot: DateTime<Utc>, n: usize, records: &[Value]) -> PathBuf {
    write_file_under(root, &format!("AWSLogs/{ACCOUNT}"), region, slot, n, records)
}

/// Writes a trail file of `records` under `<root>/<logs>/CloudTrail/<region>/<day>/`.
fn write_file_under(
    root: &Path,
    logs: &str,
    region: &str,
    slot: DateTime<Utc>,
    n: usize,
    records: &[Value],
) -> PathBuf {
    let dir = root.join(format!("{logs}/CloudTrail/{region}/{}", slot.format("%Y/%m/%d")));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(format!("{ACCOUNT}_CloudTrail_{region}_{}_{n:05}.json.gz", slot.format("%Y%m%dT%H%MZ")));
    let mut gz = flate2::write::GzEncoder::new(std::fs::File::create(&path).unwrap(), flate2::Compression::fast());
    gz.write_all(json!({ "Records": records }).to_string().as_bytes()).unwrap();
    gz.finish().unwrap();
    path
}

fn judge() -> Judge {
    Judge {
        perimeter: Perimeter {
            account_id: ACCOUNT.into(),
            trusted_vpcs: vec!["vpc-0a1b2c3d".into()],
            trusted_endpoints: BTreeMap::from([(TRUSTED_ENDPOINT.into(), "vpc-0a1b2c3d".into())]),
            trusted_cidrs: vec!["203.0.113.0/24".parse().unwrap(), "2001:db8:1234::/48".parse().unwrap()],
            allow_aws_service_calls: false,
            called_via_services: vec!["athena.amazonaws.com".into()],
            allow_presigned_s3_reads: true,
            exempt_tag_key: None,
            not_actions: lockstep::config::DEFAULT_NOT_ACTIONS.iter().map(|s| s.to_string()).collect(),
        },
        lockdown_policy: POLICY.into(),
    }
}

/// The files parsed directly, one group per event (by `eventID`) in the window, as the file
/// source does.
fn direct_groups(files: &[PathBuf]) -> Vec<CallGroup> {
    let (since, until) = window();
    let mut groups = Vec::new();
    let mut seen = HashSet::new();
    for path in files {
        let parsed = lockstep::trail::read_file(path).unwrap();
        assert!(parsed.bad.is_empty(), "{}: {:?}", path.display(), parsed.bad);
        groups.extend(
            parsed
                .records
                .into_iter()
                .filter(|r| r.event_id.clone().is_none_or(|id| seen.insert(id)))
                .filter_map(CallGroup::single)
                .filter(|g| since <= g.first && g.first < until),
        );
    }
    groups
}

fn athena_cfg(partitioning: Partitioning, account_partition: Option<&str>) -> Athena {
    Athena {
        database: "cloudtrail".into(),
        table: "cloudtrail_logs".into(),
        workgroup: "primary".into(),
        output_location: "s3://athena-results/".into(),
        partitioning,
        account_partition: account_partition.map(str::to_string),
        poll_interval: Duration::from_millis(5),
        timeout: Duration::from_secs(20),
    }
}

/// Every (user, hour) aggregate, so a mismatch can be reported precisely.
fn by_user_hour(aggregates: &Aggregates) -> BTreeMap<(String, DateTime<Utc>), UserHour> {
    aggregates.iter().map(|(user, hour, agg)| ((user.to_string(), hour), agg.clone())).collect()
}

fn assert_same(label: &str, athena: &Aggregates, direct: &Aggregates) {
    let (a, d) = (by_user_hour(athena), by_user_hour(direct));
    let keys: HashSet<_> = a.keys().chain(d.keys()).collect();
    let mut differences: Vec<String> = keys
        .into_iter()
        .filter(|k| a.get(k) != d.get(k))
        .map(|k| format!("{k:?}:\n  athena: {:?}\n  direct: {:?}", a.get(k), d.get(k)))
        .collect();
    differences.sort();
    assert!(
        differences.is_empty(),
        "{label}: {} of {} user-hours differ, e.g.\n{}",
        differences.len(),
        d.len(),
        differences.iter().take(3).cloned().collect::<Vec<_>>().join("\n")
    );
}

#[tokio::test]
async fn athena_query_run_by_duckdb_matches_the_files() {
    let trail = generate();
    let (since, until) = window();
    let judge = judge();
    let direct = aggregate(&direct_groups(&trail.files), &judge);

    // The data must exercise what the query has to get right, or equality proves little.
    let mut verdicts: BTreeMap<&str, u64> = BTreeMap::new();
    let (mut explicit, mut other) = (0, 0);
    for (_, _, hour) in direct.iter() {
        for (verdict, calls) in &hour.verdicts {
            *verdicts.entry(verdict.reason_name()).or_default() += calls;
        }
        explicit += hour.explicit_denials;
        other += hour.other_denials;
    }
    for reason in [
        "not_action",
        "called_via",
        "presigned_read",
        "trusted_endpoint",
        "trusted_cidr",
        "untrusted_ip",
        "untrusted_endpoint",
        "untrusted_service",
        "unrecognized_source",
        "no_source",
        "not_api_call",
        "no_action",
        "never_denied",
    ] {
        assert!(verdicts.get(reason).copied().unwrap_or(0) > 0, "no {reason} calls in {verdicts:?}");
    }
    assert!(explicit > 0 && other > 0, "explicit {explicit}, other {other}");

    let layouts = [Partitioning::Projected, Partitioning::RegionYearMonthDay];
    let queries: Vec<String> =
        layouts.iter().map(|p| window_query(&athena_cfg(*p, None), ACCOUNT, POLICY, since, until)).collect();
    let results = common::duckdb(trail.root.path(), &queries);
    let client = aws_sdk_athena::Client::new(&common::sdk_config());
    let _serial = common::exclusive().await;
    for (layout, result) in layouts.iter().zip(results) {
        let label = format!("{layout:?}");
        let columns: Vec<&str> = result.columns.iter().map(String::as_str).collect();
        common::queue_athena_result(&columns, &result.rows);
        let run = run_window(&client, &athena_cfg(*layout, None), ACCOUNT, POLICY, since, until).await.unwrap();
        assert_eq!(run.skipped_rows, 0, "{label}");
        assert_eq!(run.groups.len(), result.rows.len(), "{label}");
        let calls: u64 = run.groups.iter().map(|g| g.calls).sum();
        assert!(calls > run.groups.len() as u64, "{label}: grouping merged nothing");
        let misfiled = run.groups.iter().any(|g| g.record.user_name() == Some("misfiled"));
        assert!(!misfiled, "{label} read outside its partitions");
        let foreign = |g: &CallGroup| {
            matches!(
                judge.perimeter.classify(&g.record, &HashSet::new()),
                Verdict::NotApplicable(SkipReason::NoUserIdentity | SkipReason::NotIamUser | SkipReason::OtherAccount)
            )
        };
        assert!(!run.groups.iter().any(foreign), "{label}: the query let through calls that are not our IAM users'");
        assert_same(&label, &aggregate(&run.groups, &judge), &direct);
    }
}

/// An organisation trail's table partitioned by account: the query constrains the account
/// column, so calls filed under another account's folder are not read even where their records
/// name this account (and, unconstrained, the same query would read them).
#[tokio::test]
async fn athena_query_over_an_organisation_table_reads_only_the_accounts_partition() {
    let trail = generate();
    let (since, until) = window();
    let judge = judge();
    let direct = aggregate(&direct_groups(&trail.files), &judge);
    let elsewhere: Vec<Value> =
        (0..5).map(|i| call(&mut Dice(7 + i), "filed-elsewhere", since + TimeDelta::hours(2))).collect();
    let slot = since + TimeDelta::hours(2) + TimeDelta::minutes(15);
    write_file_under(
        trail.root.path(),
        &format!("AWSLogs/o-exampleorgid/{OTHER_ACCOUNT}"),
        "us-east-1",
        slot,
        0,
        &elsewhere,
    );

    let constrained = athena_cfg(Partitioning::Projected, Some("account"));
    let queries = [
        window_query(&constrained, ACCOUNT, POLICY, since, until),
        window_query(&athena_cfg(Partitioning::Projected, None), ACCOUNT, POLICY, since, until),
    ];
    assert!(queries[0].contains(&format!("\"account\" = '{ACCOUNT}'")), "{}", queries[0]);
    let results = common::duckdb(trail.root.path(), &queries);
    let user_column = |result: &common::DuckResult| result.columns.iter().position(|c| c == "user_name");
    let names = |result: &common::DuckResult| -> HashSet<String> {
        let Some(column) = user_column(result) else { return HashSet::new() };
        result.rows.iter().filter_map(|row| row[column].clone()).collect()
    };
    assert!(names(&results[1]).contains("filed-elsewhere"), "unconstrained, the other folder's file is read");
    assert!(!names(&results[0]).contains("filed-elsewhere"), "constrained to the account's partition, it is not");

    let client = aws_sdk_athena::Client::new(&common::sdk_config());
    let _serial = common::exclusive().await;
    let columns: Vec<&str> = results[0].columns.iter().map(String::as_str).collect();
    common::queue_athena_result(&columns, &results[0].rows);
    let run = run_window(&client, &constrained, ACCOUNT, POLICY, since, until).await.unwrap();
    assert_same("account partition", &aggregate(&run.groups, &judge), &direct);
}
