//! Shared benchmark code: settings from the environment, and a store filled with hourly evidence
//! through the real write path (`aggregate` with the real classifier, then `replace_hours`).

use std::time::Instant;

use chrono::{DateTime, TimeDelta, Utc};
use lockstep::evidence::CallGroup;
use lockstep::evidence::aggregate::{Judge, aggregate};
use lockstep::store::{ATHENA_ORIGIN, EvidenceWriter, Store};
use lockstep::trail::{Record, UserIdentity};

/// Public egress addresses the shipped rollout.yaml trusts (203.0.113.0/24, 198.51.100.32/28).
pub const SOURCES: [&str; 3] = ["203.0.113.7", "198.51.100.40", "192.0.2.10"];
const ACTIONS: [(&str, &str); 3] = [
    ("s3.amazonaws.com", "GetObject"),
    ("ec2.amazonaws.com", "DescribeInstances"),
    ("sts.amazonaws.com", "AssumeRole"),
];

/// `name` from the environment as a number, or `default`.
pub fn setting(name: &str, default: usize) -> Result<usize, Box<dyn std::error::Error>> {
    match std::env::var(name) {
        Ok(text) => Ok(text.parse().map_err(|e| format!("{name}={text:?}: {e}"))?),
        Err(_) => Ok(default),
    }
}

/// Whether the binary was started by `cargo bench`: `cargo test --all-targets` runs bench
/// binaries too, without `--bench`.
pub fn benching() -> bool {
    std::env::args().any(|arg| arg == "--bench")
}

/// The name of the `user`th benchmark user.
pub fn user_name(user: usize) -> String {
    format!("user{user:06}")
}

/// How dense the filled evidence is.
#[derive(Debug, Clone, Copy)]
pub struct Density {
    /// Days of evidence, ending at the fill's `end`.
    pub days: i64,
    /// Hours a day each user is active (a different stretch for different users).
    pub hours_per_day: i64,
    /// Distinct request contexts each active hour (at most 3).
    pub contexts: usize,
}

/// One user's calls in one hour: one group per context. With `sources` the first three
/// [`SOURCES`], the third (192.0.2.10) is outside the shipped perimeter.
pub fn hour_of_calls<'a>(
    account: &'a str,
    user: usize,
    contexts: usize,
    sources: &'a [&'a str],
    hour: DateTime<Utc>,
) -> impl Iterator<Item = CallGroup> + 'a {
    (0..contexts).map(move |i| {
        let (source, name) = ACTIONS[(user + i) % ACTIONS.len()];
        let record = Record {
            event_source: Some(source.into()),
            event_name: Some(name.into()),
            event_type: Some("AwsApiCall".into()),
            source_ip_address: Some(sources[(user / 7 + i) % sources.len()].into()),
            recipient_account_id: Some(account.into()),
            user_identity: Some(UserIdentity {
                kind: Some("IAMUser".into()),
                user_name: Some(user_name(user)),
                arn: Some(format!("arn:aws:iam::{account}:user/{}", user_name(user))),
                account_id: Some(account.into()),
                ..UserIdentity::default()
            }),
            ..Record::default()
        };
        CallGroup { record, calls: 5 + i as u64, first: hour, last: hour + TimeDelta::minutes(50) }
    })
}

/// Fills `store` with `density` of evidence for `users` users, a day per transaction, ending at
/// `end` (a midnight); `sources` picks each user's addresses. Returns the user-hours written and
/// the seconds it took.
pub fn fill(
    store: &Store,
    judge: &Judge,
    account: &str,
    users: usize,
    density: Density,
    sources: &[&str],
    end: DateTime<Utc>,
) -> Result<(i64, f64), Box<dyn std::error::Error>> {
    let start = end - TimeDelta::days(density.days);
    let filling = Instant::now();
    for day in 0..density.days {
        let midnight = start + TimeDelta::days(day);
        let groups: Vec<CallGroup> = (0..users)
            .flat_map(|user| {
                // Each user works a different stretch of the day.
                let first = (user % (24 - density.hours_per_day as usize)) as i64;
                (first..first + density.hours_per_day).flat_map(move |h| {
                    hour_of_calls(account, user, density.contexts, sources, midnight + TimeDelta::hours(h))
                })
            })
            .collect();
        store.replace_hours(ATHENA_ORIGIN, midnight, midnight + TimeDelta::days(1), &aggregate(&groups, judge))?;
    }
    Ok((users as i64 * density.days * density.hours_per_day, filling.elapsed().as_secs_f64()))
}

/// Peak resident set size of this process so far, in MiB (`VmHWM`), when Linux tells.
pub fn peak_rss_mib() -> Option<f64> {
    status_mib("VmHWM:")
}

/// A memory figure of this process from `/proc/self/status` (`VmHWM:`, `VmRSS:`), in MiB.
pub fn status_mib(field: &str) -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}
