//! `lockstep whatif`: the shipped configuration against itself changes nothing; an edited copy
//! with a trusted CIDR removed lists its users as stopping, one with a CIDR added lists its users
//! as becoming eligible, each with the calls that make the difference. The store and IAM are
//! left as they were.

mod common;
mod emulated_cli;

use std::path::PathBuf;

use chrono::TimeDelta;
use lockstep::clock::{Clock, SystemClock};
use lockstep::evidence::EvidenceStore;
use lockstep::store::Store;
use lockstep_synth::{Faults, Identity, Origin, RecordSpec, write_trail};
use serde_json::Value;

/// The example's office NAT range, and an address in it.
const OFFICE_CIDR: &str = "198.51.100.32/28";
const OFFICE_IP: &str = "198.51.100.40";
/// A home network, outside the example's perimeter.
const HOME_CIDR: &str = "192.0.2.0/24";
const HOME_IP: &str = "192.0.2.10";

struct World {
    dir: tempfile::TempDir,
    current: PathBuf,
    shipped: String,
}

impl World {
    /// Three IAM users with ten days of calls, one every eight hours (30 calls): from the office
    /// NAT, from home and through the VPN; read into the store under the shipped perimeter.
    fn new() -> World {
        let dir = tempfile::tempdir().unwrap();
        let shipped = std::fs::read_to_string("rollout.yaml")
            .unwrap()
            .replace("path: ./trail", &format!("path: {}/trail", dir.path().display()))
            .replace("path: ./lockstep.db", &format!("path: {}/lockstep.db", dir.path().display()));
        let current = dir.path().join("rollout.yaml");
        std::fs::write(&current, &shipped).unwrap();
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let iam = runtime.block_on(async {
            let sdk = common::lockstep_sdk(&common::endpoint()).await;
            aws_sdk_iam::Client::new(&sdk)
        });
        let now = SystemClock.now();
        let mut records = Vec::new();
        for (user, ip) in [("wi-office", OFFICE_IP), ("wi-home", HOME_IP), ("wi-vpn", "203.0.113.9")] {
            runtime.block_on(iam.create_user().user_name(user).path("/engineering/").send()).unwrap();
            for step in 1..=30 {
                records.push(RecordSpec::new(
                    Identity::iam_user(common::ACCOUNT, user),
                    now - TimeDelta::hours(8 * step),
                    "ec2:DescribeInstances",
                    Origin::ip(ip),
                ));
            }
        }
        write_trail(&dir.path().join("trail"), common::ACCOUNT, &records, Faults::default()).unwrap();
        let world = World { dir, current, shipped };
        let refreshed = world.lockstep(&["evidence", "refresh"]);
        assert!(refreshed.status.success(), "{}", String::from_utf8_lossy(&refreshed.stderr));
        world
    }

    fn lockstep(&self, args: &[&str]) -> std::process::Output {
        emulated_cli::lockstep(args, &self.current, self.dir.path()).output().unwrap()
    }

    /// `whatif --json` of an edited copy of the configuration in force.
    fn whatif(&self, edit: impl FnOnce(&str) -> String) -> Value {
        let candidate = self.dir.path().join("edited.yaml");
        std::fs::write(&candidate, edit(&self.shipped)).unwrap();
        let args = ["whatif", "--config", candidate.to_str().unwrap(), "--against", self.current.to_str().unwrap()];
        let out = self.lockstep(&[&args[..], &["--json"]].concat());
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice(&out.stdout).unwrap()
    }

    fn store(&self) -> Store {
        Store::open(&self.dir.path().join("lockstep.db")).unwrap()
    }
}

fn users(changes: &Value) -> Vec<&str> {
    changes.as_array().unwrap().iter().map(|c| c["user"].as_str().unwrap()).collect()
}

fn sources(change: &Value) -> Vec<(&str, u64)> {
    change["sources"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| (s["source"].as_str().unwrap(), s["calls"].as_u64().unwrap()))
        .collect()
}

fn changed_lines(report: &Value) -> Vec<&str> {
    report["policy"]["diff"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .filter(|l| !l.starts_with("  "))
        .collect()
}

#[test]
fn whatif_on_the_shipped_file_changes_nothing_and_an_edited_copy_lists_who_changes_and_why() {
    let world = World::new();
    let before = world.store();
    let (dump, judged) = (before.dump_evidence().unwrap(), before.freshness().unwrap().judged_under);
    drop(before);

    let same = world.whatif(str::to_string);
    assert_eq!(same["policy"]["changed"], false);
    assert!(changed_lines(&same).is_empty(), "{same:#}");
    assert_eq!(same["current"]["perimeter"], same["candidate"]["perimeter"]);
    assert_eq!(same["current"]["eligible"], 2, "office and VPN users are eligible: {same:#}");
    assert_eq!(same["candidate"]["eligible"], 2);
    assert!(users(&same["becomes_eligible"]).is_empty() && users(&same["stops_being_eligible"]).is_empty());

    let removed = world.whatif(|text| text.replace(&format!("    - {OFFICE_CIDR}\n"), ""));
    assert_eq!(removed["policy"]["changed"], true);
    // Both statements of the policy (with and without the presigned-read split) list the CIDRs.
    let line = |mark: &str, cidr: &str| format!("{mark} {}\"{cidr}\",", " ".repeat(12));
    assert_eq!(changed_lines(&removed), [line("-", OFFICE_CIDR), line("-", OFFICE_CIDR)], "{removed:#}");
    assert_ne!(removed["current"]["perimeter"], removed["candidate"]["perimeter"]);
    assert_eq!(users(&removed["stops_being_eligible"]), ["wi-office"]);
    assert!(users(&removed["becomes_eligible"]).is_empty());
    let office = &removed["stops_being_eligible"][0];
    assert_eq!(sources(office), [(OFFICE_IP, 30)], "the calls the candidate denies: {office:#}");
    assert!(office["candidate"].as_str().unwrap().contains("would have been denied"), "{office:#}");
    assert_eq!(removed["candidate"]["eligible"], 1);

    let added = world.whatif(|text| {
        text.replace(&format!("    - {OFFICE_CIDR}\n"), &format!("    - {OFFICE_CIDR}\n    - {HOME_CIDR}\n"))
    });
    assert_eq!(changed_lines(&added), [line("+", HOME_CIDR), line("+", HOME_CIDR)], "{added:#}");
    assert_eq!(users(&added["becomes_eligible"]), ["wi-home"]);
    assert!(users(&added["stops_being_eligible"]).is_empty());
    let home = &added["becomes_eligible"][0];
    assert_eq!(sources(home), [(HOME_IP, 30)], "the calls denied today that the candidate allows: {home:#}");
    assert!(home["now"].as_str().unwrap().contains("would have been denied"), "{home:#}");
    assert_eq!(added["candidate"]["eligible"], 3);

    // The text report says the same for people.
    let candidate = world.dir.path().join("edited.yaml");
    let text = world.lockstep(&[
        "whatif",
        "--config",
        candidate.to_str().unwrap(),
        "--against",
        world.current.to_str().unwrap(),
    ]);
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(text.contains("becomes eligible: 1") && text.contains(&format!("{HOME_IP} (30 calls)")), "{text}");

    // Nothing changed: the store holds the same evidence, judged under the same perimeter.
    let after = world.store();
    assert_eq!(after.dump_evidence().unwrap(), dump);
    assert_eq!(after.freshness().unwrap().judged_under, judged);
}
