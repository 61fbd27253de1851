//! The file source end to end on synthetic trail data: the store's counts match what the
//! generator meant, malformed data is skipped and counted, refreshes are incremental and
//! idempotent, and a crash mid-refresh (an error after some files, or SIGKILL of a real
//! `lockstep evidence refresh`) leaves a store that a clean run completes exactly.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use chrono::{DateTime, TimeDelta, Utc};
use lockstep::clock::{Clock, ManualClock, SystemClock};
use lockstep::config::Config;
use lockstep::evidence::files::Folder;
use lockstep::evidence::refresh::{self, RefreshError, Report, Source, Window};
use lockstep::evidence::{EvidenceStore, SourceError, TrailObjects};
use lockstep::store::{EvidenceWriter, RefreshLog, Store};
use lockstep_synth::{Faults, Org, Written, write_trail};

const EXAMPLE: &str = include_str!("../rollout.yaml");

fn config(trail: &Path) -> Config {
    let mut config = Config::parse(EXAMPLE, Path::new("rollout.yaml")).unwrap();
    config.evidence.files_path = trail.to_path_buf();
    config
}

fn at(text: &str) -> DateTime<Utc> {
    text.parse().unwrap()
}

fn window(since: &str, until: &str) -> Window {
    Window { since: at(since), until: at(until) }
}

async fn run(store: &Store, source: &Source, config: &Config, window: Window) -> Result<Report, RefreshError> {
    let clock = ManualClock::new(window.until + TimeDelta::minutes(10));
    refresh::refresh(store, source, config, window, &clock, None, &mut |_| {}).await
}

fn folder(config: &Config) -> Source {
    Source::Folder(Arc::new(Folder::new(&config.evidence.files_path)))
}

fn write_day(org: &Org, root: &Path, day: &str, faults: Faults) -> (Written, lockstep_synth::Tally) {
    let start = at(&format!("{day}T00:00:00Z"));
    let generated = org.generate(start, start + TimeDelta::days(1));
    let written = write_trail(root, &org.account_id, &generated.records, faults).unwrap();
    (written, generated.tally)
}

#[tokio::test]
async fn counts_match_what_was_written_and_bad_data_is_skipped_and_counted() {
    let dir = tempfile::tempdir().unwrap();
    let config = config(dir.path());
    let org = Org::new(11, 40, &config.perimeter);
    let faults = Faults { bad_records: 3, corrupt_files: 2 };
    let (written, tally) = write_day(&org, dir.path(), "2024-03-18", faults);
    let store = Store::open_in_memory().unwrap();
    let report =
        run(&store, &folder(&config), &config, window("2024-03-18T00:00:00Z", "2024-03-19T01:00:00Z")).await.unwrap();

    let c = report.counts;
    assert_eq!(c.files, written.files.len() as u64);
    assert_eq!(c.files_corrupt, written.corrupt_files);
    assert_eq!(c.records_read, written.records);
    assert_eq!(c.records_skipped, written.bad_records);
    assert_eq!(c.bytes_scanned, written.bytes);

    let evidence = store.user_evidence(at("2024-03-18T00:00:00Z"), at("2024-03-19T00:00:00Z")).unwrap();
    let expected: Vec<_> = tally.users.iter().filter(|(_, t)| t.calls > 0).collect();
    assert_eq!(evidence.len(), expected.len());
    for (e, (user, t)) in evidence.iter().zip(expected) {
        assert_eq!(&e.user, user);
        assert_eq!(
            (e.calls, e.would_deny, e.other_denials, e.explicit_denials),
            (t.calls, t.outside, t.other_denials, 0),
            "{user}"
        );
        let sources: u64 = e.outside_sources.iter().map(|s| s.calls).sum();
        assert_eq!(sources, t.outside, "{user}: outside sources add up");
    }
    assert!(evidence.iter().any(|e| e.would_deny > 0) && evidence.iter().any(|e| e.would_deny == 0));
    let freshness = store.freshness().unwrap();
    assert_eq!(freshness.covered_until, Some(at("2024-03-19T01:00:00Z")));
}

#[tokio::test]
async fn refresh_is_incremental_and_matches_one_pass_over_everything() {
    let dir = tempfile::tempdir().unwrap();
    let config = config(dir.path());
    let org = Org::new(12, 25, &config.perimeter);
    let source = folder(&config);

    let store = Store::open_in_memory().unwrap();
    let (first, _) = write_day(&org, dir.path(), "2024-03-18", Faults::default());
    let report = run(&store, &source, &config, window("2024-03-18T00:00:00Z", "2024-03-19T00:10:00Z")).await.unwrap();
    assert_eq!(report.counts.files, first.files.len() as u64);
    let (second, _) = write_day(&org, dir.path(), "2024-03-19", Faults::default());
    // The scheduled window: back to where the evidence reaches, less overlap.
    let now = at("2024-03-20T00:10:00Z");
    let next = refresh::scheduled_window(&store.freshness().unwrap(), now, &config.evidence);
    assert!(next.since < at("2024-03-19T00:00:00Z"));
    let report = run(&store, &source, &config, next).await.unwrap();
    assert_eq!(report.counts.files, second.files.len() as u64, "only the new files are read");
    assert_eq!(report.counts.records_read, second.records);

    let once = Store::open_in_memory().unwrap();
    run(&once, &source, &config, window("2024-03-18T00:00:00Z", "2024-03-20T00:10:00Z")).await.unwrap();
    assert_eq!(store.dump_evidence().unwrap(), once.dump_evidence().unwrap());
}

#[tokio::test]
async fn a_file_delivered_in_the_minute_last_read_is_not_skipped() {
    let dir = tempfile::tempdir().unwrap();
    let config = config(dir.path());
    let org = Org::new(13, 10, &config.perimeter);
    let source = folder(&config);
    let start = at("2024-03-18T10:00:00Z");
    let last_window = start + TimeDelta::minutes(55);
    let generated = org.generate(start, start + TimeDelta::hours(1));
    let (last, earlier): (Vec<_>, Vec<_>) =
        generated.records.into_iter().partition(|r| r.at >= last_window && r.region == "us-east-1");
    write_trail(dir.path(), &org.account_id, &earlier, Faults::default()).unwrap();
    // Two files delivered in the same minute; the one sorting first arrives after a refresh.
    let (a, b) = last.split_at(last.len() / 2);
    let mut pair = [
        write_trail(dir.path(), &org.account_id, a, Faults::default()).unwrap().files,
        write_trail(dir.path(), &org.account_id, b, Faults::default()).unwrap().files,
    ]
    .concat();
    pair.sort();
    let (first, second) = (&pair[0], &pair[1]);
    assert_eq!(first.parent(), second.parent());
    let held = dir.path().join("held.json.gz.tmp");
    std::fs::rename(first, &held).unwrap();

    let w = window("2024-03-18T10:00:00Z", "2024-03-18T11:30:00Z");
    let store = Store::open_in_memory().unwrap();
    run(&store, &source, &config, w).await.unwrap();
    std::fs::rename(&held, first).unwrap();
    let report = run(&store, &source, &config, w).await.unwrap();
    assert_eq!(report.counts.files, 1, "the late file is read, nothing else");

    let once = Store::open_in_memory().unwrap();
    run(&once, &source, &config, w).await.unwrap();
    assert_eq!(store.dump_evidence().unwrap(), once.dump_evidence().unwrap());
}

#[tokio::test]
async fn refreshing_the_same_window_twice_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let config = config(dir.path());
    let org = Org::new(14, 20, &config.perimeter);
    write_day(&org, dir.path(), "2024-03-18", Faults { bad_records: 1, corrupt_files: 1 });
    let store = Store::open_in_memory().unwrap();
    let w = window("2024-03-18T00:00:00Z", "2024-03-19T01:00:00Z");
    run(&store, &folder(&config), &config, w).await.unwrap();
    let first = store.dump_evidence().unwrap();
    let again = run(&store, &folder(&config), &config, w).await.unwrap();
    assert_eq!(again.counts.files, 0);
    assert_eq!(store.dump_evidence().unwrap(), first);
    assert_eq!(store.recent_runs(10).unwrap().len(), 2, "both runs are logged");
}

/// A folder whose fetches start failing after `ok` of them, like a bucket that goes away.
struct Failing {
    folder: Folder,
    ok: usize,
    fetched: AtomicUsize,
}

impl TrailObjects for Failing {
    async fn list_prefixes(&self, prefix: &str) -> Result<Vec<String>, SourceError> {
        self.folder.list_prefixes(prefix).await
    }
    async fn list_keys(&self, prefix: &str, start_after: Option<&str>) -> Result<Vec<String>, SourceError> {
        self.folder.list_keys(prefix, start_after).await
    }
    async fn fetch(&self, key: &str) -> Result<Vec<u8>, SourceError> {
        if self.fetched.fetch_add(1, Ordering::SeqCst) >= self.ok {
            return Err(SourceError::Other(format!("injected failure fetching {key}")));
        }
        self.folder.fetch(key).await
    }
}

#[tokio::test]
async fn a_refresh_that_fails_midway_leaves_whole_files_and_a_clean_run_completes_it() {
    let dir = tempfile::tempdir().unwrap();
    let config = config(dir.path());
    let org = Org::new(15, 20, &config.perimeter);
    let (written, _) = write_day(&org, dir.path(), "2024-03-18", Faults::default());
    let w = window("2024-03-18T00:00:00Z", "2024-03-19T01:00:00Z");

    let store = Store::open_in_memory().unwrap();
    let failing = Arc::new(Failing { folder: Folder::new(dir.path()), ok: 40, fetched: AtomicUsize::new(0) });
    let clock = ManualClock::new(w.until);
    let error =
        refresh::refresh_trail(&store, &failing, "files", &config, w, &clock, None, &mut |_| {}).await.unwrap_err();
    assert!(error.to_string().contains("injected failure"), "{error}");
    assert_eq!(
        store.read_keys("", None).unwrap().len(),
        40,
        "every file before the failure is recorded whole, none after"
    );
    assert_eq!(store.recent_runs(1).unwrap()[0].status, "failed");
    assert!(matches!(
        store.freshness().unwrap(),
        lockstep::evidence::Freshness { last_success: None, covered_until: None, .. }
    ));

    let rest = run(&store, &folder(&config), &config, w).await.unwrap();
    assert_eq!(rest.counts.files, written.files.len() as u64 - 40);
    let once = Store::open_in_memory().unwrap();
    run(&once, &folder(&config), &config, w).await.unwrap();
    assert_eq!(store.dump_evidence().unwrap(), once.dump_evidence().unwrap());
}

#[tokio::test]
async fn a_failed_run_is_logged_and_does_not_move_freshness() {
    let dir = tempfile::tempdir().unwrap();
    let config = config(dir.path());
    let store = Store::open_in_memory().unwrap();
    // The trail folder does not exist.
    let missing = Source::Folder(Arc::new(Folder::new(dir.path().join("nowhere"))));
    let error =
        run(&store, &missing, &config, window("2024-03-18T00:00:00Z", "2024-03-19T00:00:00Z")).await.unwrap_err();
    assert!(error.to_string().contains("nowhere"), "{error}");
    assert!(matches!(
        store.freshness().unwrap(),
        lockstep::evidence::Freshness { last_success: None, covered_until: None, .. }
    ));
    let runs = store.recent_runs(1).unwrap();
    assert_eq!(runs[0].status, "failed");
    assert!(runs[0].error.as_deref().unwrap_or("").contains("nowhere"));
}

#[test]
fn killing_a_refresh_mid_run_loses_nothing_a_clean_run_cannot_complete() {
    let dir = tempfile::tempdir().unwrap();
    let trail = dir.path().join("trail");
    let db = dir.path().join("lockstep.db");
    let config_path = dir.path().join("rollout.yaml");
    let yaml = EXAMPLE
        .replace("path: ./trail", &format!("path: {}", trail.display()))
        .replace("path: ./lockstep.db", &format!("path: {}", db.display()));
    std::fs::write(&config_path, yaml).unwrap();
    let config = Config::load(&config_path).unwrap();

    // Recent data: the command refreshes relative to the wall clock.
    let day = SystemClock.now().date_naive() - chrono::Days::new(2);
    let org = Org::new(16, 60, &config.perimeter);
    let (written, _) = write_day(&org, &trail, &day.to_string(), Faults::default());
    let total = written.files.len();
    let since = format!("{day}T00:00:00Z");
    let until = (at(&since) + TimeDelta::days(1) + TimeDelta::hours(1)).to_rfc3339();

    let store = Store::open(&db).unwrap();
    let refresh_command = || {
        std::process::Command::new(env!("CARGO_BIN_EXE_lockstep"))
            .args([
                "--config",
                config_path.to_str().unwrap(),
                "evidence",
                "refresh",
                "--since",
                &since,
                "--until",
                &until,
            ])
            .env("LOCKSTEP_LOG", "error")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap()
    };
    let mut child = refresh_command();
    let started = std::time::Instant::now();
    while store.read_keys("", None).unwrap().is_empty() {
        assert!(started.elapsed().as_secs() < 60, "the refresh never recorded a file");
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let at_kill = store.read_keys("", None).unwrap().len();
    assert!(at_kill < total, "the kill landed after the refresh finished ({at_kill} of {total} files); use more data");
    let runs = store.recent_runs(1).unwrap();
    assert_eq!(runs[0].status, "running", "the killed run never finished");
    assert!(matches!(
        store.freshness().unwrap(),
        lockstep::evidence::Freshness { last_success: None, covered_until: None, .. }
    ));

    let mut clean = refresh_command();
    assert!(clean.wait().unwrap().success());
    let once = Store::open_in_memory().unwrap();
    let w = Window { since: at(&since), until: at(&until) };
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(run(&once, &folder(&config), &config, w)).unwrap();
    assert_eq!(store.dump_evidence().unwrap(), once.dump_evidence().unwrap());
}
