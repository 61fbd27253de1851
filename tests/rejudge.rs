//! Verdicts follow the perimeter: evidence read under one perimeter is re-judged from its stored
//! request contexts when the configured perimeter changes (the daemon does it on start), without
//! reading CloudTrail again, and the planner promotes no one until that is done.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use chrono::{DateTime, TimeDelta, Utc};
use lockstep::clock::ManualClock;
use lockstep::config::Config;
use lockstep::evidence::EvidenceStore;
use lockstep::evidence::files::Folder;
use lockstep::evidence::refresh::{self, Source, Window};
use lockstep::planner::{self, Action, Gate, Inputs};
use lockstep::rollout::{IamUser, Snapshot};
use lockstep::store::{EvidenceWriter, Store};
use lockstep_synth::{Faults, Identity, Origin, RecordSpec, write_trail};

const EXAMPLE: &str = include_str!("../rollout.yaml");
/// One of the example's trusted CIDRs (198.51.100.32/28), the office NAT in these tests.
const OFFICE_CIDR: &str = "198.51.100.32/28";

fn at(text: &str) -> DateTime<Utc> {
    text.parse().unwrap()
}

fn config(trail: &Path, edit: impl FnOnce(&mut Config)) -> Config {
    let mut config = Config::parse(EXAMPLE, Path::new("rollout.yaml")).unwrap();
    config.evidence.files_path = trail.to_path_buf();
    edit(&mut config);
    config
}

const START: &str = "2024-03-01T00:00:00Z";
const NOW: &str = "2024-03-15T00:00:00Z";

/// Ten days of calls, one every eight hours, for a user calling from the office NAT, one from
/// home (untrusted in the example) and one through the trusted VPN range.
fn write_history(root: &Path, account: &str) {
    let sources = [("office", "198.51.100.40"), ("home", "192.0.2.10"), ("vpn", "203.0.113.9")];
    let mut records = Vec::new();
    for step in 0..30 {
        let when = at(START) + TimeDelta::hours(8 * step);
        for (user, ip) in sources {
            records.push(RecordSpec::new(
                Identity::iam_user(account, user),
                when,
                "s3:ListBuckets",
                Origin::Ip(ip.to_string()),
            ));
        }
    }
    write_trail(root, account, &records, Faults::default()).unwrap();
}

fn users(account: &str) -> Vec<IamUser> {
    ["home", "office", "vpn"]
        .iter()
        .map(|name| IamUser {
            name: name.to_string(),
            arn: format!("arn:aws:iam::{account}:user/{name}"),
            path: "/".to_string(),
            tags: BTreeMap::new(),
        })
        .collect()
}

async fn refresh(store: &Store, config: &Config) {
    let window = Window { since: at(START), until: at(NOW) };
    let source = Source::Folder(Arc::new(Folder::new(&config.evidence.files_path)));
    refresh::refresh(store, &source, config, window, &ManualClock::new(at(NOW)), None, &mut |_| {}).await.unwrap();
}

/// What the planner decides from the store as it is, under `config`: the gate and the users it
/// would promote now.
fn plan(store: &Store, config: &Config) -> (Gate, Vec<String>) {
    let now = at(NOW);
    let since = now - TimeDelta::from_std(config.eligibility.window).unwrap();
    let evidence = store.user_evidence(since, now).unwrap();
    let users = users(&config.account_id);
    let plan = planner::plan(&Inputs {
        config,
        ledger: &Snapshot::default(),
        users: &users,
        evidence: &evidence,
        freshness: store.freshness().unwrap(),
        verdicts: &BTreeMap::new(),
        blocked: None,
        now,
        promote_now: false,
        promoted_elsewhere: 0,
    });
    let promoted = plan
        .actions
        .iter()
        .flat_map(|action| match action {
            Action::StartBatch { users, .. } => users.iter().map(|c| c.user.clone()).collect(),
            _ => Vec::new(),
        })
        .collect();
    (plan.gate, promoted)
}

fn eligible(store: &Store, config: &Config, user: &str) -> bool {
    let now = at(NOW);
    let since = now - TimeDelta::from_std(config.eligibility.window).unwrap();
    let evidence = store.evidence(since, now, Some(user)).unwrap();
    let iam_user = users(&config.account_id).into_iter().find(|u| u.name == user).unwrap();
    matches!(
        planner::eligibility(&iam_user, evidence.first(), &Snapshot::default(), config, now),
        planner::Eligibility::Eligible(_)
    )
}

/// The history written under `dir/trail` and read into `dir/store.db` under the example's
/// perimeter.
async fn read_history(dir: &Path) -> (std::path::PathBuf, Config, Store) {
    let trail = dir.join("trail");
    let config = config(&trail, |_| {});
    write_history(&trail, &config.account_id);
    let store = Store::open(&dir.join("store.db")).unwrap();
    refresh(&store, &config).await;
    (trail, config, store)
}

#[tokio::test]
async fn a_removed_cidr_makes_its_users_ineligible_at_restart_and_nobody_is_promoted_on_old_verdicts() {
    let dir = tempfile::tempdir().unwrap();
    let (trail, before, store) = read_history(dir.path()).await;
    let path = dir.path().join("store.db");
    assert!(eligible(&store, &before, "office"));
    assert!(!eligible(&store, &before, "home"));
    let (gate, promoted) = plan(&store, &before);
    assert_eq!(gate, Gate::Open);
    assert!(!promoted.is_empty(), "the first wave starts: {promoted:?}");
    drop(store);

    // The office NAT leaves the perimeter; the daemon restarts with the new file.
    let after = config(&trail, |c| c.perimeter.trusted_cidrs.retain(|net| net.to_string() != OFFICE_CIDR));
    let store = Store::open(&path).unwrap();
    let (gate, promoted) = plan(&store, &after);
    assert!(
        matches!(&gate, Gate::Inconclusive(why) if why.contains("until it is re-judged")),
        "old verdicts close the gate until re-judged: {gate:?}"
    );
    assert!(promoted.is_empty(), "nobody is promoted on old verdicts: {promoted:?}");

    refresh::rejudge_if_changed(&store, &after, at(NOW)).unwrap();
    assert_eq!(store.freshness().unwrap().judged_under, Some(after.perimeter.fingerprint()));
    assert!(!eligible(&store, &after, "office"), "the office user relied on the removed CIDR");
    assert!(eligible(&store, &after, "vpn"));
    let (gate, promoted) = plan(&store, &after);
    assert_eq!(gate, Gate::Open);
    assert!(!promoted.contains(&"office".to_string()), "{promoted:?}");
    let office = &store.evidence(at(START), at(NOW), Some("office")).unwrap()[0];
    assert_eq!((office.calls, office.would_deny), (30, 30));
    assert_eq!(office.outside_sources[0].source, "198.51.100.40");
}

#[tokio::test]
async fn an_added_cidr_makes_its_users_eligible_without_reading_cloudtrail_again() {
    let dir = tempfile::tempdir().unwrap();
    let (trail, before, store) = read_history(dir.path()).await;
    assert!(!eligible(&store, &before, "home"));
    let read_before = store.dump_query("trail_file", "SELECT key FROM trail_file").unwrap();

    // The trail is gone: whatever follows can only come from the store.
    std::fs::remove_dir_all(&trail).unwrap();
    let after = config(&trail, |c| c.perimeter.trusted_cidrs.push("192.0.2.0/24".parse().unwrap()));
    let rejudged = store.rejudge(&lockstep::evidence::aggregate::Judge::new(&after), at(NOW)).unwrap();
    assert_eq!(rejudged.fingerprint, after.perimeter.fingerprint());
    assert_eq!(rejudged.hours, 90, "30 hours with calls for each of 3 users");
    assert!(eligible(&store, &after, "home"));
    assert!(eligible(&store, &after, "office"));
    let home = &store.evidence(at(START), at(NOW), Some("home")).unwrap()[0];
    assert_eq!((home.calls, home.would_deny), (30, 0));
    assert!(home.outside_sources.is_empty() && home.last_outside.is_none());
    assert_eq!(store.dump_query("trail_file", "SELECT key FROM trail_file").unwrap(), read_before);

    // Back to the first perimeter: the derived rows are exactly those of the first reading.
    let fresh = tempfile::tempdir().unwrap();
    let again = config(&fresh.path().join("trail"), |_| {});
    write_history(&again.evidence.files_path, &again.account_id);
    let once = Store::open_in_memory().unwrap();
    refresh(&once, &again).await;
    store.rejudge(&lockstep::evidence::aggregate::Judge::new(&before), at(NOW)).unwrap();
    for table in ["evidence_hour", "evidence_verdict", "evidence_outside", "evidence_context"] {
        let query = format!("SELECT * FROM {table}");
        assert_eq!(store.dump_query(table, &query).unwrap(), once.dump_query(table, &query).unwrap(), "{table}");
    }
}
