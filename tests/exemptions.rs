//! Exemptions that expire, against the emulator: `lockstep exempt` (the real binary) tags the
//! user in IAM and records the operator; `lockstep exemptions` lists them; the controller, in
//! virtual time, removes the tags at the end and the user is promoted like anyone else.
//!
//! The binary reads the system clock, so virtual time starts at the real "now" (rounded down to
//! ten minutes) and the trail history ends there.

mod common;
mod emulated_cli;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::Arc;

use chrono::{DateTime, DurationRound, Utc};
use lockstep::clock::{Clock, ManualClock, SystemClock};
use lockstep::config::Config;
use lockstep::controller::{Controller, Mode, StepReport};
use lockstep::evidence::EvidenceStore;
use lockstep::evidence::files::Folder;
use lockstep::evidence::refresh::{self, Source};
use lockstep::exemption::ExemptionState;
use lockstep::feed::TrailFeed;
use lockstep::iam::{AwsIam, Iam};
use lockstep::planner::{Action, Eligibility};
use lockstep::store::{Ledger, Store};
use lockstep_synth::{Faults, Identity, Origin, RecordSpec, write_trail};

const ANN: &str = "exm-ann";
/// Exempt by hand: the tag without an end.
const BOB: &str = "exm-bob";

fn config_text(dir: &Path) -> String {
    format!(
        r#"
account_id: "{account}"
region: us-east-1
lockdown: {{group: exm-lockdown, policy_name: exm-perimeter}}
perimeter:
  trusted_cidrs: [203.0.113.0/24]
  exempt_tag_key: lockstep-exempt
evidence:
  source: files
  files: {{path: "{dir}/trail"}}
  lookback: 10d
  overlap: 1h
eligibility: {{window: 7d, min_history: 3d, min_calls: 10, quiet_for: 2d, max_evidence_age: 3h, hold_expiry: 7d}}
waves:
  - {{name: everyone, batch_size: 5, soak: 6h}}
rollout: {{max_promotions_per_day: 50, max_soaking_batches: 1}}
guard: {{source: files, poll: 10m, grace: 1h, window: 30m, min_affected_users: 1, min_denials: 3, silence_limit: 1h}}
store: {{path: "{dir}/lockstep.db"}}
"#,
        account = common::ACCOUNT,
        dir = dir.display()
    )
}

struct World {
    dir: tempfile::TempDir,
    config_path: PathBuf,
    config: Config,
    clock: Arc<ManualClock>,
    store: Arc<Store>,
    client: aws_sdk_iam::Client,
    /// Trail records are written up to here.
    written_until: DateTime<Utc>,
}

impl World {
    /// Ann and Bob call from the trusted CIDR every 10 minutes for the 8 days up to now.
    async fn new() -> World {
        let dir = tempfile::tempdir().unwrap();
        let config_path = dir.path().join("rollout.yaml");
        std::fs::write(&config_path, config_text(dir.path())).unwrap();
        let config = Config::load(&config_path).unwrap();
        let client = aws_sdk_iam::Client::new(&common::sdk_config());
        for user in [ANN, BOB] {
            client.create_user().user_name(user).send().await.unwrap();
        }
        let hand_set = aws_sdk_iam::types::Tag::builder().key("lockstep-exempt").value("true").build().unwrap();
        client.tag_user().user_name(BOB).tags(hand_set).send().await.unwrap();
        let iam = AwsIam::new(&common::sdk_config(), common::ACCOUNT);
        let document = config.perimeter.policy().to_json().unwrap();
        iam.apply_policy(&config.lockdown.group, &config.lockdown.policy_name, &document).await.unwrap();
        let now = SystemClock.now().duration_trunc(chrono::Duration::minutes(10)).unwrap();
        let store = Arc::new(Store::open(&config.store.path).unwrap());
        let mut world = World {
            dir,
            config_path,
            config,
            clock: Arc::new(ManualClock::new(now)),
            store,
            client,
            written_until: now - chrono::Duration::days(8),
        };
        world.traffic_until(now).await;
        world
    }

    /// Trusted calls by both users every 10 minutes up to `until`, then an evidence refresh.
    async fn traffic_until(&mut self, until: DateTime<Utc>) {
        let mut records = Vec::new();
        let mut at = self.written_until + chrono::Duration::minutes(10);
        while at <= until {
            for user in [ANN, BOB] {
                let identity = Identity::iam_user(common::ACCOUNT, user);
                records.push(RecordSpec::new(identity, at, "ec2:DescribeInstances", Origin::ip("203.0.113.20")));
            }
            at += chrono::Duration::minutes(10);
        }
        write_trail(&self.dir.path().join("trail"), common::ACCOUNT, &records, Faults::default()).unwrap();
        self.written_until = until;
        self.clock.set(until);
        let source = Source::Folder(Arc::new(Folder::new(&self.config.evidence.files_path)));
        let window = refresh::scheduled_window(&self.store.freshness().unwrap(), until, &self.config.evidence);
        refresh::refresh(self.store.as_ref(), &source, &self.config, window, self.clock.as_ref(), None, &mut |_| {})
            .await
            .unwrap();
    }

    fn controller(&self, mode: Mode) -> Controller<AwsIam, TrailFeed<Folder>> {
        let clock: Arc<dyn Clock> = self.clock.clone();
        let folder = Arc::new(Folder::new(&self.config.evidence.files_path));
        let feed = TrailFeed::new(folder, &self.config.account_id, clock.clone(), self.config.guard.window);
        let iam = AwsIam::new(&common::sdk_config(), common::ACCOUNT);
        Controller::new(self.config.clone(), self.store.clone(), iam, feed, clock, mode)
    }

    fn lockstep(&self, args: &[&str]) -> Output {
        let out = emulated_cli::lockstep(args, &self.config_path, self.dir.path()).output().unwrap();
        assert!(out.status.success(), "lockstep {args:?} failed:\n{}", String::from_utf8_lossy(&out.stderr));
        out
    }

    async fn tags(&self, user: &str) -> BTreeMap<String, String> {
        let listed = self.client.list_user_tags().user_name(user).send().await.unwrap();
        listed.tags().iter().map(|t| (t.key().to_string(), t.value().to_string())).collect()
    }
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn eligibility<'a>(report: &'a StepReport, user: &str) -> &'a Eligibility {
    &report.plan.users[user]
}

fn promoted(report: &StepReport) -> Vec<String> {
    report
        .plan
        .actions
        .iter()
        .flat_map(|a| match a {
            Action::StartBatch { users, .. } => users.iter().map(|c| c.user.clone()).collect(),
            _ => Vec::new(),
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exemption_set_with_an_end_is_removed_at_the_end_and_the_user_is_promoted() {
    let mut world = World::new().await;
    let start = world.clock.now();

    // Without --commit: exactly what would change, and nothing changes.
    let until = (start + chrono::Duration::days(2)).to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let args = ["exempt", ANN, "--until", &until, "--reason", "vendor VPN: INC-42", "--operator", "maria"];
    let dry = stdout(&world.lockstep(&args));
    assert_eq!(
        dry.lines().take(4).collect::<Vec<_>>(),
        [
            format!("dry run, nothing changed; with --commit lockstep would tag IAM user {ANN}:").as_str(),
            "  lockstep-exempt=true",
            &format!("  lockstep-exempt-until={until}"),
            "  lockstep-exempt-reason=vendor VPN: INC-42",
        ]
    );
    assert!(world.tags(ANN).await.is_empty(), "a dry run writes no tag");
    assert!(world.store.exemption_records().unwrap().is_empty(), "a dry run records nothing");

    // With --commit: the tags in IAM, the operator in the ledger and the audit log.
    let mut commit = args.to_vec();
    commit.push("--commit");
    let done = stdout(&world.lockstep(&commit));
    assert!(done.starts_with(&format!("exempted {ANN} until {until}")), "{done}");
    let tags = world.tags(ANN).await;
    assert_eq!(tags.get("lockstep-exempt").map(String::as_str), Some("true"));
    assert_eq!(tags.get("lockstep-exempt-until"), Some(&until));
    assert_eq!(tags.get("lockstep-exempt-reason").map(String::as_str), Some("vendor VPN: INC-42"));
    let records = world.store.exemption_records().unwrap();
    assert_eq!(records.len(), 1);
    assert_eq!((records[0].user.as_str(), records[0].by.as_str()), (ANN, "maria"));
    assert_eq!(records[0].state, ExemptionState::Granted);
    assert_eq!(records[0].reason, "vendor VPN: INC-42");
    let audit: Vec<_> =
        world.store.audit_log(50).unwrap().into_iter().filter(|e| e.user.as_deref() == Some(ANN)).collect();
    let lines: Vec<_> = audit.iter().map(|e| (e.actor.as_str(), e.action.as_str())).collect();
    assert_eq!(lines, [("maria", "exempt"), ("maria", "exemption_granted")]);

    // The listing: Ann with her end, Bob flagged as set by hand.
    let listed: serde_json::Value = serde_json::from_str(&stdout(&world.lockstep(&["exemptions", "--json"]))).unwrap();
    let listed = listed.as_array().unwrap();
    assert_eq!(listed.len(), 2, "{listed:?}");
    assert_eq!(listed[0]["user"], ANN);
    assert_eq!(listed[0]["no_expiry"], false);
    assert_eq!(listed[0]["granted_by"], "maria");
    let left = listed[0]["seconds_left"].as_i64().unwrap();
    assert!((2 * 86_400 - 600..=2 * 86_400).contains(&left), "{left}");
    assert_eq!((listed[1]["user"].as_str(), listed[1]["no_expiry"].as_bool()), (Some(BOB), Some(true)));
    let text = stdout(&world.lockstep(&["exemptions"]));
    assert!(text.contains(&format!("{BOB}  NO EXPIRY (set by hand)")), "{text}");
    assert!(text.contains("1 exemption(s) with no expiry"), "{text}");

    // While exempt, neither is promoted; Ann's exemption ends within 7 days.
    let mut controller = world.controller(Mode::Commit);
    world.traffic_until(start + chrono::Duration::minutes(10)).await;
    let report = controller.step(false).await.unwrap();
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    assert!(promoted(&report).is_empty(), "{:?}", report.plan);
    assert!(matches!(eligibility(&report, ANN), Eligibility::Ineligible(why) if why.starts_with("exempt")));
    assert_eq!(report.exemptions_expiring_soon, 1);

    // Just before the end: still exempt.
    world.traffic_until(start + chrono::Duration::days(2) - chrono::Duration::minutes(10)).await;
    let report = controller.step(false).await.unwrap();
    assert!(report.iam_writes.is_empty() && promoted(&report).is_empty(), "{report:?}");

    // At the end: the tags go (journaled first, then recorded), and Ann is promoted in the same
    // step; Bob's hand-set exemption stays.
    world.traffic_until(start + chrono::Duration::days(2)).await;
    // A dry run only reports the removal.
    let dry = world.controller(Mode::DryRun).step(false).await.unwrap();
    assert!(dry.iam_writes.iter().any(|w| w.starts_with(&format!("UntagUser {ANN} "))), "{:?}", dry.iam_writes);
    assert_eq!(world.tags(ANN).await.len(), 3, "a dry run leaves the tags");
    assert_eq!(world.store.exemption_records().unwrap()[0].state, ExemptionState::Granted);
    let report = controller.step(false).await.unwrap();
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    assert_eq!(
        report.iam_writes.first().map(String::as_str),
        Some(format!("UntagUser {ANN} lockstep-exempt lockstep-exempt-until lockstep-exempt-reason").as_str())
    );
    assert!(world.tags(ANN).await.is_empty(), "{:?}", world.tags(ANN).await);
    assert_eq!(world.tags(BOB).await.get("lockstep-exempt").map(String::as_str), Some("true"));
    assert_eq!(promoted(&report), [ANN], "{:?}", report.plan);
    assert_eq!(report.exemptions_expiring_soon, 0);
    assert_eq!(world.store.exemption_records().unwrap()[0].state, ExemptionState::Expired);
    let audit: Vec<_> =
        world.store.audit_log(50).unwrap().into_iter().filter(|e| e.user.as_deref() == Some(ANN)).collect();
    let lines: Vec<_> = audit.iter().map(|e| (e.actor.as_str(), e.action.as_str())).collect();
    assert_eq!(
        lines,
        [
            ("maria", "exempt"),
            ("maria", "exemption_granted"),
            ("controller", "exemption_expiring"),
            ("controller", "exemption_expired"),
            ("controller", "promote"),
            ("controller", "locked"),
        ]
    );
    let in_group = AwsIam::new(&common::sdk_config(), common::ACCOUNT).group_members("exm-lockdown").await.unwrap();
    assert_eq!(in_group, [ANN]);
}

/// The README's `lockstep exempt` dry run, run exactly as written against the shipped
/// rollout.yaml: it needs neither AWS nor a store, and prints the tags it would set.
#[test]
fn the_readme_exempt_dry_run_works_as_written() {
    let readme = std::fs::read_to_string("README.md").unwrap();
    let line = readme
        .lines()
        .find(|l| l.starts_with("lockstep exempt ") && !l.contains("--commit"))
        .expect("the README shows an `exempt` dry run");
    let command = line.split(" #").next().unwrap();
    // Words, with "double-quoted" ones kept whole as the shell would.
    let args: Vec<String> = command
        .split('"')
        .enumerate()
        .flat_map(|(i, part)| match i % 2 {
            1 => vec![part.to_string()],
            _ => part.split_whitespace().map(str::to_string).collect(),
        })
        .collect();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_lockstep"))
        .args(&args[1..])
        .env("LOCKSTEP_CONFIG", "rollout.yaml")
        .env("LOCKSTEP_LOG", "warn")
        .output()
        .unwrap();
    let text = stdout(&out);
    assert!(out.status.success(), "{command}: {}", String::from_utf8_lossy(&out.stderr));
    assert!(text.starts_with("dry run, nothing changed; with --commit lockstep would tag IAM user alice:"), "{text}");
    assert!(text.contains("  lockstep-exempt-reason=vendor VPN migration INC-42\n"), "{text}");
}
