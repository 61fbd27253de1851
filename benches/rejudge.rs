//! Re-judgement benchmark: 30 days of evidence for 10,000 users, each active 8 hours a day
//! with 3 distinct request contexts an hour (2.4 million user-hours), re-judged from the stored
//! contexts under a perimeter with one trusted CIDR removed, then under the original again.
//! Target: <= 10 s on 2 cores (release; met, see the README). It also times reading every user's
//! evidence over the 30 days, before and after. Run with `cargo bench --bench rejudge`;
//! `LOCKSTEP_BENCH_USERS` and `LOCKSTEP_BENCH_DAYS` scale it down.

use std::time::Instant;

use chrono::{DateTime, TimeDelta, TimeZone, Utc};
use lockstep::config::Config;
use lockstep::evidence::CallGroup;
use lockstep::evidence::aggregate::{Judge, aggregate};
use lockstep::store::{ATHENA_ORIGIN, EvidenceWriter, Store};
use lockstep::trail::{Record, UserIdentity};

const ACTIVE_HOURS_PER_DAY: i64 = 8;
const SOURCES: [&str; 3] = ["203.0.113.7", "198.51.100.40", "192.0.2.10"];
const ACTIONS: [(&str, &str); 3] = [
    ("s3.amazonaws.com", "GetObject"),
    ("ec2.amazonaws.com", "DescribeInstances"),
    ("sts.amazonaws.com", "AssumeRole"),
];

fn setting(name: &str, default: usize) -> Result<usize, Box<dyn std::error::Error>> {
    match std::env::var(name) {
        Ok(text) => Ok(text.parse().map_err(|e| format!("{name}={text:?}: {e}"))?),
        Err(_) => Ok(default),
    }
}

/// One user's calls in one hour: one group per context.
fn hour_of_calls(account: &str, user: usize, hour: DateTime<Utc>) -> impl Iterator<Item = CallGroup> + '_ {
    (0..3).map(move |i| {
        let (source, name) = ACTIONS[(user + i) % ACTIONS.len()];
        let record = Record {
            event_source: Some(source.into()),
            event_name: Some(name.into()),
            event_type: Some("AwsApiCall".into()),
            source_ip_address: Some(SOURCES[(user / 7 + i) % SOURCES.len()].into()),
            recipient_account_id: Some(account.into()),
            user_identity: Some(UserIdentity {
                kind: Some("IAMUser".into()),
                user_name: Some(format!("user{user:05}")),
                arn: Some(format!("arn:aws:iam::{account}:user/user{user:05}")),
                account_id: Some(account.into()),
                ..UserIdentity::default()
            }),
            ..Record::default()
        };
        CallGroup { record, calls: 5 + i as u64, first: hour, last: hour + TimeDelta::minutes(50) }
    })
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // `cargo test --all-targets` runs bench binaries too, without `--bench`.
    if !std::env::args().any(|arg| arg == "--bench") {
        println!("rejudge benchmark: skipped (run it with `cargo bench --bench rejudge`)");
        return Ok(());
    }
    let users = setting("LOCKSTEP_BENCH_USERS", 10_000)?;
    let days = setting("LOCKSTEP_BENCH_DAYS", 30)? as i64;
    let config = Config::parse(include_str!("../rollout.yaml"), std::path::Path::new("rollout.yaml"))?;
    let original = Judge::new(&config);
    let mut narrower = original.clone();
    let office: std::net::IpAddr = SOURCES[1].parse()?;
    narrower.perimeter.trusted_cidrs.retain(|net| !net.contains(&office));

    let dir = tempfile::tempdir()?;
    let store = Store::open(&dir.path().join("bench.db"))?;
    let start = Utc.with_ymd_and_hms(2026, 3, 1, 0, 0, 0).single().ok_or("bad start time")?;
    let account = config.account_id.as_str();
    let filling = Instant::now();
    for day in 0..days {
        let midnight = start + TimeDelta::days(day);
        let groups: Vec<CallGroup> = (0..users)
            .flat_map(|user| {
                // Each user works a different 8-hour stretch.
                let first = (user % (24 - ACTIVE_HOURS_PER_DAY as usize)) as i64;
                (first..first + ACTIVE_HOURS_PER_DAY)
                    .flat_map(move |h| hour_of_calls(account, user, midnight + TimeDelta::hours(h)))
            })
            .collect();
        store.replace_hours(ATHENA_ORIGIN, midnight, midnight + TimeDelta::days(1), &aggregate(&groups, &original))?;
    }
    let user_hours = users as i64 * days * ACTIVE_HOURS_PER_DAY;
    println!(
        "filled {days} days x {users} users ({user_hours} user-hours, {} contexts) in {:.1} s",
        user_hours * 3,
        filling.elapsed().as_secs_f64()
    );
    let (since, until) = (start, start + TimeDelta::days(days));
    let reading = Instant::now();
    let read = store.evidence(since, until, None)?;
    println!("read the evidence of {} users over {days} days in {:.2} s", read.len(), reading.elapsed().as_secs_f64());
    for (name, judge) in [("one CIDR removed", &narrower), ("back to the original", &original)] {
        let started = Instant::now();
        let rejudged = store.rejudge(judge, start + TimeDelta::days(days))?;
        let seconds = started.elapsed().as_secs_f64();
        println!(
            "re-judged {} user-hours ({name}) in {seconds:.2} s ({:.0} user-hours/s; target <= 10 s)",
            rejudged.hours,
            rejudged.hours as f64 / seconds
        );
    }
    let reading = Instant::now();
    let again = store.evidence(since, until, None)?;
    println!("read it again in {:.2} s", reading.elapsed().as_secs_f64());
    if again != read {
        return Err("the evidence read back differs after re-judging there and back".into());
    }
    Ok(())
}
