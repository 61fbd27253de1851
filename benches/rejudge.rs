//! Re-judgement benchmark: 30 days of evidence for 10,000 users, each active 8 hours a day
//! with 3 distinct request contexts an hour (2.4 million user-hours), re-judged from the stored
//! contexts under a perimeter with one trusted CIDR removed, then under the original again.
//! Target: <= 10 s on 2 cores (release; met, see the README). It also times reading every user's
//! evidence over the 30 days, before and after. Run with `cargo bench --bench rejudge`;
//! `LOCKSTEP_BENCH_USERS` and `LOCKSTEP_BENCH_DAYS` scale it down.

mod common;

use std::time::Instant;

use chrono::{TimeDelta, TimeZone, Utc};
use common::{Density, SOURCES, benching, fill, peak_rss_mib, setting};
use lockstep::config::Config;
use lockstep::evidence::aggregate::Judge;
use lockstep::store::{EvidenceWriter, Store};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    if !benching() {
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
    let density = Density { days, hours_per_day: 8, contexts: 3 };
    let (user_hours, seconds) =
        fill(&store, &original, account, users, density, &SOURCES, start + TimeDelta::days(days))?;
    println!(
        "filled {days} days x {users} users ({user_hours} user-hours, {} contexts) in {seconds:.1} s",
        user_hours * 3
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
    if let Some(mib) = peak_rss_mib() {
        println!("peak RSS {mib:.0} MiB");
    }
    Ok(())
}
