//! Guard benchmark: attribution + judgement for 1,000 watched users and 100,000 denials an hour.
//!
//! One hour of denials (a mix of every cause: untrusted addresses, trusted addresses with an
//! implicit deny, bare "Access Denied" without a source) spread over 1,000 users in 100 batches
//! of 10, then, best of three: attribute every record, judge every batch on the last 15 minutes,
//! and watch all users as locked. Run with `cargo bench --bench guard`.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::time::{Duration, Instant};

use chrono::{DateTime, TimeZone, Utc};
use lockstep::config::{AfterSoak, Guard, SourceKind};
use lockstep::guard::{self, CohortRate, DenialEvent, SourceHealth};
use lockstep::perimeter::Perimeter;
use lockstep::rollout::{Batch, BatchState};
use lockstep::trail::{Record, UserIdentity};

const USERS: usize = 1_000;
const DENIALS_PER_HOUR: usize = 100_000;
const BATCH_SIZE: usize = 10;
const RUNS: usize = 3;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // `cargo test --all-targets` runs bench binaries too, without `--bench`.
    if !std::env::args().any(|arg| arg == "--bench") {
        println!("guard benchmark: skipped (run it with `cargo bench --bench guard`)");
        return Ok(());
    }
    let start = Utc.with_ymd_and_hms(2026, 3, 1, 12, 0, 0).single().ok_or("bad start time")?;
    let now = start + chrono::Duration::hours(1);
    let perimeter = Perimeter {
        account_id: "123456789012".into(),
        trusted_vpcs: vec![],
        trusted_endpoints: BTreeMap::new(),
        trusted_cidrs: vec!["203.0.113.0/24".parse()?],
        allow_aws_service_calls: true,
        called_via_services: vec![],
        allow_presigned_s3_reads: false,
        exempt_tag_key: None,
        not_actions: vec![],
    };
    let users: Vec<String> = (0..USERS).map(|i| format!("user{i:04}")).collect();
    let records: Vec<Record> = (0..DENIALS_PER_HOUR).map(|i| denied(&users[i % USERS], i, start)).collect();
    let config = Guard {
        source: SourceKind::Files,
        poll: Duration::from_secs(60),
        grace: Duration::from_secs(3600),
        window: Duration::from_secs(15 * 60),
        min_affected_users: 1,
        min_denials: 3,
        silence_limit: Duration::from_secs(1800),
        requeue_after: None,
        after_soak: AfterSoak::Alert,
        delivery_lag: Duration::from_secs(300),
        false_alarm_budget: 0.001,
        watch_locked: true,
    };
    let batches: Vec<Batch> = users
        .chunks(BATCH_SIZE)
        .enumerate()
        .map(|(i, members)| Batch {
            id: i as i64,
            wave: "all".into(),
            state: BatchState::Soaking,
            members: members.to_vec(),
            created_at: start,
            applied_at: Some(start),
            soak_until: Some(start + chrono::Duration::hours(2)),
            finished_at: None,
            verdict: None,
            soak: None,
            verdict_kind: None,
        })
        .collect();
    let source = SourceHealth { last_event_at: Some(now), last_ok_poll: Some(now), error: None };
    let baselines: BTreeMap<String, f64> = users.iter().map(|u| (u.clone(), 20.0)).collect();
    let locked: BTreeSet<String> = users.iter().cloned().collect();

    let (mut attribute_best, mut judge_best, mut watch_best) = (Duration::MAX, Duration::MAX, Duration::MAX);
    let mut spikes = 0;
    for _ in 0..RUNS {
        let clock = Instant::now();
        let exempt = HashSet::new();
        let mut by_batch: BTreeMap<usize, Vec<DenialEvent>> = BTreeMap::new();
        let mut all = Vec::with_capacity(records.len());
        for (i, record) in records.iter().enumerate() {
            let Some(kind) = guard::attribute(record, &perimeter, &exempt, "lockstep-deny") else { continue };
            let user = &users[i % USERS];
            let event = DenialEvent {
                user: user.clone(),
                at: record.event_time().unwrap_or(start),
                action: record.action().unwrap_or_default(),
                kind,
                code: record.error_code.clone().unwrap_or_default(),
                message: String::new(),
                source: record.source_ip_address.clone(),
            };
            by_batch.entry((i % USERS) / BATCH_SIZE).or_default().push(event.clone());
            all.push(event);
        }
        attribute_best = attribute_best.min(clock.elapsed());

        let clock = Instant::now();
        spikes = 0;
        for (i, batch) in batches.iter().enumerate() {
            let events = by_batch.get(&i).map(Vec::as_slice).unwrap_or(&[]);
            let judgement = guard::assess(&guard::Input {
                batch,
                events,
                baselines: &baselines,
                cohort: CohortRate { denials: 0, users: 0, hours: 0.25 },
                source: &source,
                config: &config,
                now,
            });
            spikes += usize::from(judgement.verdict.name() == "spike");
        }
        judge_best = judge_best.min(clock.elapsed());

        let clock = Instant::now();
        let watch = guard::watch_locked(&all, &locked, now - chrono::Duration::minutes(15), now, AfterSoak::Alert);
        watch_best = watch_best.min(clock.elapsed());
        std::hint::black_box(watch);
    }
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!("guard benchmark: {USERS} watched users, {DENIALS_PER_HOUR} denials in one hour, best of {RUNS}");
    println!(
        "  attribute {DENIALS_PER_HOUR} records: {:8.1} ms ({:.2} µs/record)",
        ms(attribute_best),
        ms(attribute_best) * 1000.0 / DENIALS_PER_HOUR as f64
    );
    println!("  judge {} batches of {BATCH_SIZE}:        {:8.1} ms ({spikes} spikes)", batches.len(), ms(judge_best));
    println!("  watch {USERS} locked users:       {:8.1} ms", ms(watch_best));
    println!("  attribution + judgement:        {:8.1} ms", ms(attribute_best + judge_best));
    Ok(())
}

/// The `i`th denial of the hour: every 10th from an untrusted address (lockdown), every 10th
/// plus one a bare "Access Denied" without a source (unknown), the rest implicit denies from a
/// trusted address (other).
fn denied(user: &str, i: usize, start: DateTime<Utc>) -> Record {
    let at = start + chrono::Duration::milliseconds((i as i64) * 3_600_000 / DENIALS_PER_HOUR as i64);
    let (message, source) = match i % 10 {
        0 => ("Access Denied".to_string(), Some("198.51.100.9")),
        1 => ("Access Denied".to_string(), None),
        _ => (
            format!(
                "User: arn:aws:iam::123456789012:user/{user} is not authorized to perform: s3:GetObject because no identity-based policy allows the s3:GetObject action"
            ),
            Some("203.0.113.7"),
        ),
    };
    Record {
        event_time: Some(at.to_rfc3339()),
        event_source: Some("s3.amazonaws.com".into()),
        event_name: Some("GetObject".into()),
        event_type: Some("AwsApiCall".into()),
        recipient_account_id: Some("123456789012".into()),
        source_ip_address: source.map(str::to_string),
        error_code: Some("AccessDenied".into()),
        error_message: Some(message),
        user_identity: Some(UserIdentity {
            kind: Some("IAMUser".into()),
            user_name: Some(user.to_string()),
            account_id: Some("123456789012".into()),
            ..UserIdentity::default()
        }),
        ..Record::default()
    }
}
