//! `lockstep backtest` end to end on generated history: a synthetic organisation's trail files,
//! read by `lockstep evidence refresh`, with two scripted engineers who call from an untrusted
//! network late. The replay shows the guard's rollback (and, with an operator resuming, a
//! breakage after soak) in the table, the JSON and the HTML report, whose figures a real
//! headless browser (Debian's `chromium`) renders equal to the JSON.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use chrono::{DateTime, TimeDelta, Utc};
use lockstep::clock::{Clock, SystemClock};
use lockstep_synth::{Faults, Identity, Org, Origin, RecordSpec, write_trail};
use serde_json::Value;

const ACCOUNT: &str = "123456789012";
const OUTSIDE: &str = "198.18.0.7";

fn lockstep(args: &[&str], config: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_lockstep"))
        .args(args)
        .env("LOCKSTEP_CONFIG", config)
        .env("LOCKSTEP_LOG", "warn")
        .output()
        .expect("run lockstep")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn engineer(name: &str) -> Identity {
    Identity::IamUser {
        account: ACCOUNT.to_string(),
        name: name.to_string(),
        arn: format!("arn:aws:iam::{ACCOUNT}:user/engineering/{name}"),
        access_key: format!("AKIA{:0>16}", name.to_uppercase()),
    }
}

/// `calls_per_hour` office calls every hour of `[start, end)`, and from `outside_from` on, three
/// calls an hour from an untrusted address as well.
fn scripted(
    name: &str,
    calls_per_hour: usize,
    start: DateTime<Utc>,
    end: DateTime<Utc>,
    outside_from: DateTime<Utc>,
) -> Vec<RecordSpec> {
    let mut records = Vec::new();
    let mut hour = start;
    while hour < end {
        for i in 0..calls_per_hour {
            let at = hour + TimeDelta::seconds((i * 3600 / calls_per_hour) as i64);
            records.push(RecordSpec::new(engineer(name), at, "s3:GetObject", Origin::ip("203.0.113.40")));
        }
        if hour >= outside_from {
            for minute in [10, 11, 12] {
                let at = hour + TimeDelta::minutes(minute);
                records.push(RecordSpec::new(engineer(name), at, "ec2:DescribeInstances", Origin::ip(OUTSIDE)));
            }
        }
        hour += TimeDelta::hours(1);
    }
    records
}

/// A folder with 16 days of generated trail up to the last full hour, read into a store by
/// `lockstep evidence refresh`; returns the folder, the configuration file and the rollout's
/// start (8 days ago, at an hour).
fn generated_store() -> (tempfile::TempDir, PathBuf, DateTime<Utc>) {
    let dir = tempfile::tempdir().unwrap();
    let shipped = std::fs::read_to_string("rollout.yaml").unwrap();
    let config_text = shipped
        .replace("path: ./trail", &format!("path: {}/trail", dir.path().display()))
        .replace("path: ./lockstep.db", &format!("path: {}/lockstep.db", dir.path().display()));
    let config = dir.path().join("rollout.yaml");
    std::fs::write(&config, config_text).unwrap();

    let end = lockstep::evidence::aggregate::hour_of(SystemClock.now());
    let start = end - TimeDelta::days(16);
    let since = end - TimeDelta::days(8);
    let org = Org::new(5, 8, &lockstep_synth::example_perimeter().unwrap());
    let mut records = org.generate(start, end).records;
    // The two best-known engineers: the canary takes them. Mallory calls from outside three
    // hours into its soak; Oscar only five days in, long after his batch would have succeeded.
    records.extend(scripted("mallory", 60, start, end, since + TimeDelta::hours(3)));
    records.extend(scripted("oscar", 50, start, end, since + TimeDelta::days(5)));
    write_trail(&dir.path().join("trail"), ACCOUNT, &records, Faults::default()).unwrap();
    let out = lockstep(&["evidence", "refresh", "--since", "17d", "--until", "now"], &config);
    assert!(out.status.success(), "{}", text(&out.stderr));
    (dir, config, since)
}

fn json_report(config: &Path, since: DateTime<Utc>, extra: &[&str]) -> Value {
    let since = since.to_rfc3339();
    let mut args = vec!["backtest", "--since", &since, "--json"];
    args.extend_from_slice(extra);
    let out = lockstep(&args, config);
    assert!(out.status.success(), "{}", text(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// The opening tag that contains `needle`.
fn tag_with<'d>(dom: &'d str, needle: &str) -> &'d str {
    let at = dom.find(needle).unwrap_or_else(|| panic!("the rendered page has no {needle}"));
    let open = dom[..at].rfind('<').unwrap();
    let close = at + dom[at..].find('>').unwrap();
    &dom[open..=close]
}

/// The value of `name` in an opening tag.
fn attr<'t>(tag: &'t str, name: &str) -> &'t str {
    let key = format!(" {name}=\"");
    let from = tag.find(&key).unwrap_or_else(|| panic!("{tag} has no {name}")) + key.len();
    &tag[from..from + tag[from..].find('"').unwrap()]
}

/// The text right after the opening tag that contains `needle`.
fn text_of<'d>(dom: &'d str, needle: &str) -> &'d str {
    let tag = tag_with(dom, needle);
    let after = dom.find(tag).unwrap() + tag.len();
    &dom[after..after + dom[after..].find('<').unwrap()]
}

/// The page as Debian's chromium renders it, after its scripts ran.
fn rendered(page: &Path) -> String {
    let browser = which("chromium").unwrap_or_else(|| {
        panic!(
            "Debian's `chromium` is needed to check the HTML report in a real browser and is not installed: \
             run scripts/test (it installs it) or `apt-get install -y chromium`"
        )
    });
    let out = Command::new(browser)
        .args(["--headless", "--disable-gpu", "--no-sandbox", "--dump-dom"])
        .arg(format!("file://{}", page.display()))
        .output()
        .expect("run chromium");
    assert!(out.status.success(), "chromium failed: {}", text(&out.stderr));
    text(&out.stdout)
}

fn which(program: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?).map(|dir| dir.join(program)).find(|path| path.is_file())
}

#[test]
fn late_calls_from_outside_roll_the_canary_back_or_break_in_the_table_the_json_and_the_browser() {
    let (dir, config, since) = generated_store();

    let report = json_report(&config, since, &[]);
    assert_eq!(report["since"].as_str().unwrap().parse::<DateTime<Utc>>().unwrap(), since);
    let batch = &report["batches"][0];
    assert_eq!(batch["wave"], "canary");
    assert_eq!(batch["started_at"].as_str().unwrap().parse::<DateTime<Utc>>().unwrap(), since);
    assert_eq!(batch["members"], serde_json::json!(["mallory", "oscar"]));
    assert_eq!(batch["state"], "rolled_back");
    assert_eq!(batch["culprits"], serde_json::json!(["mallory"]));
    let rolled_back_at: DateTime<Utc> = batch["finished_at"].as_str().unwrap().parse().unwrap();
    assert!(
        rolled_back_at > since + TimeDelta::hours(3)
            && rolled_back_at <= since + TimeDelta::hours(3) + TimeDelta::minutes(15),
        "rolled back at {rolled_back_at}"
    );
    // The spike is fully attributed to mallory, so the guard does not pause: oscar, not at fault,
    // is promoted again after the cool-down, and his calls from outside after his soak break him.
    let hits = report["hits"].as_array().unwrap();
    let hit = &hits[0];
    assert_eq!(
        (hit["user"].as_str(), hit["source"].as_str(), hit["calls"].as_u64()),
        (Some("mallory"), Some(OUTSIDE), Some(3))
    );
    assert_eq!(
        (hit["phase"].as_str(), hit["outcome"].as_str(), hit["guard"].as_str()),
        (Some("soak"), Some("rolled_back"), Some("spike"))
    );
    assert_eq!((hit["cause"].as_str(), hit["reason"].as_str()), (Some("lockdown"), Some("untrusted_ip")));
    let later = &hits[1..];
    assert!(!later.is_empty(), "{hits:?}");
    for hit in later {
        assert_eq!(
            (hit["user"].as_str(), hit["phase"].as_str(), hit["outcome"].as_str(), hit["guard"].as_str()),
            (Some("oscar"), Some("after_soak"), Some("breakage"), Some("after_soak_alert")),
            "{hit:?}"
        );
        assert!(hit["at"].as_str().unwrap().parse::<DateTime<Utc>>().unwrap() >= since + TimeDelta::days(5));
    }
    let oscar_locked: Vec<&Value> =
        report["locked"].as_array().unwrap().iter().filter(|l| l["user"] == "oscar").collect();
    assert_eq!(oscar_locked.len(), 2, "locked in the canary, then again after the cool-down: {oscar_locked:?}");
    let totals = &report["totals"];
    assert_eq!(totals["rollbacks"].as_u64(), Some(1));
    assert_eq!(totals["breakages"].as_u64(), Some(later.len() as u64));
    assert!(totals["batches"].as_u64().unwrap() >= 2, "{totals:?}");
    assert!(totals["locked_at_end"].as_u64().unwrap() >= 1, "{totals:?}");
    assert_eq!(
        totals["users"].as_u64(),
        Some(report["coverage"].as_array().unwrap().last().unwrap()["total"].as_u64().unwrap())
    );
    let milestones = report["milestones"].as_array().unwrap();
    assert!(milestones.iter().any(|m| m["what"].as_str().unwrap().contains("rolled back by the guard")));
    assert!(!milestones.iter().any(|m| m["what"].as_str().unwrap().starts_with("paused")), "{milestones:?}");

    // The same run for people.
    let out = lockstep(&["backtest", "--since", &since.to_rfc3339()], &config);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let table = text(&out.stdout);
    let batches = totals["batches"].as_u64().unwrap();
    assert!(table.contains(&format!("{batches} batches (1 rolled back)")), "{table}");
    assert!(table.contains(&format!("mallory (batch 1): 3 x ec2:DescribeInstances from {OUTSIDE}")), "{table}");
    assert!(table.contains("rolled_back in soak; guard: spike"), "{table}");

    // The HTML report, rendered by a real browser, shows the JSON's figures.
    let page = dir.path().join("report.html");
    let out = lockstep(&["backtest", "--since", &since.to_rfc3339(), "--html", page.to_str().unwrap()], &config);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let html = std::fs::read_to_string(&page).unwrap();
    assert!(!html.replace("http://www.w3.org/2000/svg", "").contains("http"), "the report fetches nothing");
    assert!(!html.contains("<link") && !html.contains(" src="), "the report is self-contained");
    let dom = rendered(&page);
    assert_eq!(attr(tag_with(&dom, "<body"), "data-rendered"), "true", "the page's script ran");
    for (id, key) in [
        ("users", "users"),
        ("batches", "batches"),
        ("rollbacks", "rollbacks"),
        ("locked-users", "locked_users"),
        ("locked-at-end", "locked_at_end"),
        ("soak-hits", "soak_hits"),
        ("breakages", "breakages"),
        ("would-deny-calls", "would_deny_calls"),
    ] {
        let needle = format!("id=\"figure-{id}\"");
        let expected = totals[key].as_u64().unwrap().to_string();
        assert_eq!(attr(tag_with(&dom, &needle), "data-value"), expected, "{id}");
        assert_eq!(text_of(&dom, &needle), expected, "{id}");
    }
    let coverage = report["coverage"].as_array().unwrap();
    for day in coverage {
        let row = tag_with(&dom, &format!("<tr data-day=\"{}\"", day["day"].as_str().unwrap()));
        for key in ["locked", "eligible", "total", "would_deny_calls", "rollbacks"] {
            assert_eq!(
                attr(row, &format!("data-{}", key.replace('_', "-"))),
                day[key].as_u64().unwrap().to_string(),
                "{row}"
            );
        }
    }
    let hit_row = tag_with(&dom, "<tr data-user=\"mallory\"");
    assert_eq!((attr(hit_row, "data-calls"), attr(hit_row, "data-outcome")), ("3", "rolled_back"));
    let batch_row = tag_with(&dom, "<tr data-batch=\"1\"");
    assert_eq!(attr(batch_row, "data-state"), "rolled_back");
    // The chart: a point per day, and a bar for the day of the would-deny calls.
    let chart = tag_with(&dom, "id=\"chart\"");
    assert_eq!(attr(chart, "data-days"), coverage.len().to_string());
    let locked_line = tag_with(&dom, "class=\"locked\"");
    let expected: Vec<String> = coverage.iter().map(|d| d["locked"].as_u64().unwrap().to_string()).collect();
    assert_eq!(attr(locked_line, "data-values"), expected.join(","));
    let bar = tag_with(&dom, "class=\"calls\"");
    assert_eq!(attr(bar, "data-value"), "3");

    with_no_pause_an_operator_standing_by_changes_nothing(&config, since);
}

/// A guard pause is what `--resume-after` ends; a rollback fully attributed to its culprits
/// pauses nothing, so the same replay with an operator standing by is the same replay.
fn with_no_pause_an_operator_standing_by_changes_nothing(config: &Path, since: DateTime<Utc>) {
    let without = json_report(config, since, &[]);
    let with = json_report(config, since, &["--resume-after", "1h"]);
    for key in ["batches", "locked", "hits", "coverage", "totals", "milestones"] {
        assert_eq!(with[key], without[key], "{key}");
    }
}
