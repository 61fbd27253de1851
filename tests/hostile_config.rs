//! Every configuration that validates is safe to run: generated configurations (every duration
//! and count at, inside and beyond its bounds, from a fixed seed) go through validation, and each
//! that passes drives controller steps over a batch being applied, soaking and past its soak,
//! in virtual time. Nothing that validates may panic.
//!
//! IAM here is an in-memory stand-in: this proves the pure logic and the time arithmetic, not
//! the AWS path (tests/controller.rs does that against the emulator).

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::{Arc, Mutex};

use chrono::{TimeZone, Utc};
use lockstep::clock::{Clock, ManualClock};
use lockstep::config::Config;
use lockstep::controller::{Controller, Mode};
use lockstep::evidence::SourceError;
use lockstep::feed::EventFeed;
use lockstep::iam::{Directory, Iam, IamError, IamUser, PolicyStatus};
use lockstep::store::{Ledger, NewBatch, Store};
use lockstep::trail::Record;

const EXAMPLE: &str = include_str!("../rollout.yaml");

/// Duration settings as they appear in rollout.yaml (the first match is replaced).
const DURATIONS: &[&str] = &[
    "overlap: 2h",
    "lookback: 14d",
    "retention: 90d",
    "window: 14d",
    "min_history: 7d",
    "quiet_for: 7d",
    "max_evidence_age: 3h",
    "hold_expiry: 14d",
    "soak: 24h",
    "poll: 1m",
    "grace: 1h",
    "window: 15m",
    "silence_limit: 30m",
];

const COUNTS: &[&str] = &[
    "min_calls: 20",
    "max_would_deny: 0",
    "batch_size: 2",
    "batches: 1",
    "max_promotions_per_day: 50",
    "max_soaking_batches: 1",
    "min_affected_users: 1",
    "min_denials: 3",
];

/// Values at, around and far beyond every bound the configuration has, or should have.
const DURATION_VALUES: &[&str] = &[
    "1ns", "999ms", "1s", "59s", "1m", "59m", "1h", "23h", "1d", "2d", "7d", "8d", "30d", "31d", "365d", "366d",
    "400d", "401d", "3650d", "3651d", "300000y", "0s", "-1s", "soon",
];
const COUNT_VALUES: &[i64] = &[
    -1,
    0,
    1,
    2,
    3,
    1_000,
    1_001,
    10_000,
    10_001,
    100_000,
    100_001,
    1_000_000,
    1_000_001,
    1_000_000_000,
    1_000_000_001,
    i64::MAX,
];

/// xorshift64*: a fixed seed, so a failure reproduces.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 33) as usize % n
    }
}

/// `setting` (`key: shipped`) set to `value`.
fn with(text: &str, setting: &str, value: &str) -> String {
    let key = setting.split(':').next().unwrap_or(setting);
    text.replacen(setting, &format!("{key}: {value}"), 1)
}

/// Every setting alone at every value, then random combinations.
fn generated() -> Vec<String> {
    let mut configs = Vec::new();
    for setting in DURATIONS {
        configs.extend(DURATION_VALUES.iter().map(|value| with(EXAMPLE, setting, value)));
    }
    for setting in COUNTS {
        configs.extend(COUNT_VALUES.iter().map(|value| with(EXAMPLE, setting, &value.to_string())));
    }
    let mut rng = Rng(0x5eed_1ab5_0c0f_fee5);
    for _ in 0..200 {
        let mut text = EXAMPLE.to_string();
        // About one setting in six changes, so that a fair share of combinations passes.
        for setting in DURATIONS {
            if rng.below(6) == 0 {
                text = with(&text, setting, DURATION_VALUES[rng.below(DURATION_VALUES.len())]);
            }
        }
        for setting in COUNTS {
            if rng.below(6) == 0 {
                text = with(&text, setting, &COUNT_VALUES[rng.below(COUNT_VALUES.len())].to_string());
            }
        }
        configs.push(text);
    }
    configs
}

/// IAM in memory: a few users, the policy in place, group membership in a set.
#[derive(Clone, Default)]
struct MemoryIam {
    members: Arc<Mutex<BTreeSet<String>>>,
}

fn users() -> Vec<IamUser> {
    ["ann", "ben", "cat", "dan"]
        .iter()
        .map(|name| IamUser {
            name: name.to_string(),
            arn: format!("arn:aws:iam::123456789012:user/engineering/{name}"),
            path: "/engineering/".into(),
            tags: BTreeMap::new(),
        })
        .collect()
}

impl Iam for MemoryIam {
    async fn list_users(&self) -> Result<Directory, IamError> {
        Ok(Directory { users: users(), iam_calls: 0 })
    }
    async fn group_members(&self, _group: &str) -> Result<Vec<String>, IamError> {
        Ok(self.members.lock().unwrap().iter().cloned().collect())
    }
    async fn add_to_group(&self, _group: &str, user: &str) -> Result<(), IamError> {
        self.members.lock().unwrap().insert(user.to_string());
        Ok(())
    }
    async fn remove_from_group(&self, _group: &str, user: &str) -> Result<(), IamError> {
        self.members.lock().unwrap().remove(user);
        Ok(())
    }
    async fn policy_status(&self, _group: &str, _policy: &str, _document: &str) -> Result<PolicyStatus, IamError> {
        Ok(PolicyStatus::InPlace)
    }
    async fn apply_policy(&self, _group: &str, _policy: &str, _document: &str) -> Result<Vec<String>, IamError> {
        Ok(Vec::new())
    }
    // These users carry no exemption tags, so no tag is ever written.
    async fn tag_user(&self, _user: &str, _tags: &[(String, String)]) -> Result<(), IamError> {
        Ok(())
    }
    async fn untag_user(&self, _user: &str, _keys: &[String]) -> Result<(), IamError> {
        Ok(())
    }
}

/// A trail with nothing new.
struct Quiet;

impl EventFeed for Quiet {
    async fn poll(&mut self) -> Result<Vec<Record>, SourceError> {
        Ok(Vec::new())
    }
}

/// A dry-run step, then commit steps: a batch being applied (its soak starts now), soaking, and
/// at each configured span later (past soak, grace, hold expiry, windows).
async fn steps(config: Config) {
    let start = Utc.with_ymd_and_hms(2026, 3, 10, 0, 0, 0).unwrap();
    let clock = Arc::new(ManualClock::new(start));
    let store = Arc::new(Store::open_in_memory().unwrap());
    let canary = config.waves[0].name.clone();
    let users = [("ann".to_string(), "clean".to_string()), ("ben".to_string(), "clean".to_string())];
    let soak = lockstep::duration::chrono_of(config.waves[0].soak);
    store.start_batch(&NewBatch { wave: &canary, users: &users, soak }, "test", start).unwrap();
    let spans = [
        config.waves[0].soak,
        config.guard.grace,
        config.guard.window,
        config.eligibility.hold_expiry,
        config.eligibility.window,
        config.evidence.lookback,
    ];
    let mut dry =
        Controller::new(config.clone(), store.clone(), MemoryIam::default(), Quiet, clock.clone(), Mode::DryRun);
    let _ = dry.step(true).await;
    let mut live = Controller::new(config, store, MemoryIam::default(), Quiet, clock.clone(), Mode::Commit);
    let _ = live.step(true).await;
    for span in spans {
        clock.set(lockstep::config::later(clock.now(), span));
        let _ = live.step(true).await;
        let _ = live.preview().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_that_validates_panics() {
    let (mut valid, mut refused) = (0, 0);
    for text in generated() {
        let config = match Config::parse(&text, Path::new("generated.yaml")) {
            Ok(config) => config,
            Err(error) => {
                // Every refusal says where, and why with the bound.
                for problem in error.problems() {
                    assert!(problem.line.is_some(), "{problem}");
                }
                refused += 1;
                continue;
            }
        };
        valid += 1;
        if let Err(panic) = tokio::spawn(steps(config)).await {
            panic!("a valid configuration panicked ({panic}):\n{text}");
        }
    }
    assert!(valid >= 100 && refused >= 100, "the generator covers both sides: {valid} valid, {refused} refused");
}

#[test]
fn extremes_that_used_to_crash_are_refused_with_their_bounds() {
    for (from, to) in [
        ("soak: 24h", "soak: 300000y"),
        ("window: 14d", "window: 300000y"),
        ("grace: 1h", "grace: 300000y"),
        ("window: 15m", "window: 300000y"),
        ("poll: 1m", "poll: 1ns"),
    ] {
        let error = Config::parse(&EXAMPLE.replacen(from, to, 1), Path::new("rollout.yaml")).unwrap_err();
        let shown = error.to_string();
        assert!(shown.contains("expected a duration from"), "{to}: {shown}");
        assert!(shown.contains("rollout.yaml:"), "{shown}");
    }
}
