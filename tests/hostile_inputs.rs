//! Hostile input: trail folders with entries that cannot be read, duplicate deliveries,
//! decompression bombs and configuration bombs. Every bad entry is skipped, counted and named,
//! the rest is read, and memory stays bounded (measured as peak RSS in a child process).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, TimeDelta, Utc};
use lockstep::clock::ManualClock;
use lockstep::config::Config;
use lockstep::evidence::EvidenceStore;
use lockstep::evidence::files::Folder;
use lockstep::evidence::refresh::{self, Source, Window};
use lockstep::store::Store;

const EXAMPLE: &str = include_str!("../rollout.yaml");
const ACCOUNT: &str = "123456789012";

fn at(text: &str) -> DateTime<Utc> {
    text.parse().unwrap()
}

/// One CloudTrail record of `user` calling S3 from a trusted address.
fn record(id: &str, user: &str, minute: u32) -> String {
    format!(
        r#"{{"eventID":"{id}","eventTime":"2024-03-18T10:{minute:02}:00Z","eventSource":"s3.amazonaws.com","eventName":"GetObject","awsRegion":"us-east-1","recipientAccountId":"{ACCOUNT}","sourceIPAddress":"203.0.113.9","userIdentity":{{"type":"IAMUser","userName":"{user}","accountId":"{ACCOUNT}","arn":"arn:aws:iam::{ACCOUNT}:user/{user}"}}}}"#
    )
}

fn trail_file(records: &[String]) -> String {
    format!("{{\"Records\": [{}]}}", records.join(","))
}

/// `members` gzip members of `member_bytes` zero bytes each: a small file that inflates to
/// `members * member_bytes` bytes.
fn gzip_bomb(members: usize, member_bytes: usize) -> Vec<u8> {
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    encoder.write_all(&vec![0u8; member_bytes]).unwrap();
    encoder.finish().unwrap().repeat(members)
}

fn mkfifo(path: &Path) {
    let status = Command::new("mkfifo").arg(path).status().expect("run mkfifo");
    assert!(status.success(), "mkfifo {}", path.display());
}

fn running_as_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .is_some_and(|uids| uids.split_whitespace().next() == Some("0"))
}

#[tokio::test]
async fn bad_entries_are_skipped_counted_and_the_rest_is_read_once() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let first = record("e-1", "alice", 1);
    std::fs::write(root.join("g1.json"), trail_file(&[first.clone(), record("e-2", "alice", 2)])).unwrap();
    std::fs::write(root.join("g2.json"), trail_file(&[record("e-3", "alice", 3)])).unwrap();
    // CloudTrail delivers at least once: e-1 again, in another file, next to a new event.
    std::fs::write(root.join("g3-redelivered.json"), trail_file(&[first, record("e-4", "alice", 4)])).unwrap();
    std::os::unix::fs::symlink(root.join("nowhere.json"), root.join("dangling.json")).unwrap();
    std::os::unix::fs::symlink(root.join("self.json"), root.join("self.json")).unwrap();
    std::os::unix::fs::symlink(root, root.join("again.json")).unwrap();
    mkfifo(&root.join("pipe.json"));
    std::fs::write(root.join("bomb.json.gz"), gzip_bomb(3, 1 << 20)).unwrap();
    let locked = root.join("locked.json");
    std::fs::write(&locked, trail_file(&[record("e-5", "locked-user", 5)])).unwrap();
    std::fs::set_permissions(&locked, std::os::unix::fs::PermissionsExt::from_mode(0o000)).unwrap();
    // Root reads a mode-000 file anyway: then it is a good file, and the other unreadable
    // entries (links, loops, the FIFO, the bomb) carry the test.
    let permissions_bite = !running_as_root();

    let mut config = Config::parse(EXAMPLE, Path::new("rollout.yaml")).unwrap();
    config.evidence.files_path = root.to_path_buf();
    config.evidence.max_inflated_size = 2 << 20;
    let store = Store::open_in_memory().unwrap();
    let source = Source::Folder(Arc::new(Folder::new(root)));
    let window = Window { since: at("2024-03-18T00:00:00Z"), until: at("2024-03-19T00:00:00Z") };
    let clock = ManualClock::new(window.until + TimeDelta::minutes(10));
    let report = tokio::time::timeout(
        Duration::from_secs(60),
        refresh::refresh(&store, &source, &config, window, &clock, None, &mut |_| {}),
    )
    .await
    .expect("a FIFO must not block the refresh")
    .expect("bad entries do not fail the refresh");

    let c = report.counts;
    assert_eq!(c.files, 9, "every trail-named entry is accounted for: {c:?}");
    assert_eq!(c.files_corrupt, 5 + u64::from(permissions_bite), "{c:?}");
    let evidence = store.user_evidence(window.since, window.until).unwrap();
    let alice = evidence.iter().find(|e| e.user == "alice").expect("good files were read");
    assert_eq!(alice.calls, 4, "e-1 is counted once although two files carry it");
    assert_eq!(evidence.iter().any(|e| e.user == "locked-user"), !permissions_bite);
}

#[tokio::test]
async fn a_record_delivered_again_after_a_refresh_is_counted_once_by_the_next() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let first = record("e-1", "alice", 1);
    std::fs::write(root.join("g1.json"), trail_file(&[first.clone(), record("e-2", "alice", 2)])).unwrap();
    let mut config = Config::parse(EXAMPLE, Path::new("rollout.yaml")).unwrap();
    config.evidence.files_path = root.to_path_buf();
    let path = dir.path().join("store.db");
    let source = Source::Folder(Arc::new(Folder::new(root)));
    let window = Window { since: at("2024-03-18T00:00:00Z"), until: at("2024-03-19T00:00:00Z") };
    let clock = ManualClock::new(window.until + TimeDelta::minutes(10));
    let refresh = |store: Store| {
        let (source, config, clock) = (&source, &config, &clock);
        async move {
            refresh::refresh(&store, source, config, window, clock, None, &mut |_| {}).await.unwrap();
            store.user_evidence(window.since, window.until).unwrap()
        }
    };
    let calls = |evidence: Vec<lockstep::evidence::UserEvidence>| evidence.iter().map(|e| e.calls).sum::<u64>();
    assert_eq!(calls(refresh(Store::open(&path).unwrap()).await), 2);
    // Delivered again, in a later file, next to a new event: read by a separate refresh (and
    // process: the store is opened afresh).
    std::fs::write(root.join("g2-redelivered.json"), trail_file(&[first, record("e-3", "alice", 3)])).unwrap();
    assert_eq!(calls(refresh(Store::open(&path).unwrap()).await), 3, "e-1 is counted once across refreshes");
}

#[test]
fn classify_reads_a_perimeter_only_file_and_skips_a_fifo_named_on_the_command_line() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("perimeter.yaml");
    std::fs::write(&config, format!("account_id: \"{ACCOUNT}\"\nperimeter:\n  trusted_cidrs: [203.0.113.0/24]\n"))
        .unwrap();
    let good = dir.path().join("good.json");
    std::fs::write(&good, trail_file(&[record("e-1", "alice", 1)])).unwrap();
    let pipe = dir.path().join("pipe.json");
    mkfifo(&pipe);
    let mut child = Command::new(env!("CARGO_BIN_EXE_lockstep"))
        .args(["--config", config.to_str().unwrap(), "classify", pipe.to_str().unwrap(), good.to_str().unwrap()])
        .env("LOCKSTEP_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let started = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if started.elapsed() > Duration::from_secs(30) {
            child.kill().unwrap();
            panic!("classify hangs on a FIFO");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output().unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{stderr}");
    assert!(stdout.contains("\"verdict\":\"allowed\""), "{stdout}");
    assert!(stderr.contains("pipe.json") && stderr.contains("not a regular file"), "{stderr}");
    assert!(stderr.contains("1 unreadable file(s)"), "{stderr}");
}

// ---------------------------------------------------------------------------------------------
// Bombs, each run in a child process (this test binary again) that reports its peak RSS.

const CHILD: &str = "LOCKSTEP_HOSTILE_CHILD";

/// Peak resident memory of this process so far, in bytes.
fn peak_rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM in /proc/self/status");
    kib * 1024
}

/// Runs `child_runs_one_bomb` in a fresh process on `input`; returns its outcome line and peak RSS.
fn in_child(bomb: &str, input: &Path) -> (String, u64) {
    let out = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "child_runs_one_bomb", "--nocapture", "--test-threads=1"])
        .env(CHILD, format!("{bomb}:{}", input.display()))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    // The harness may print the test's name on the same line first.
    let line = stdout
        .lines()
        .find_map(|l| l.split_once("outcome=").map(|(_, rest)| rest.to_string()))
        .unwrap_or_else(|| panic!("{stdout}"));
    let peak = line.rsplit("peak=").next().and_then(|p| p.parse().ok()).unwrap();
    eprintln!("{bomb} bomb: peak RSS {} KiB", peak / 1024);
    (line, peak)
}

/// Does nothing unless started by [`in_child`].
#[test]
fn child_runs_one_bomb() {
    let Ok(task) = std::env::var(CHILD) else { return };
    let (bomb, input) = task.split_once(':').unwrap();
    let input = PathBuf::from(input);
    let outcome = match bomb {
        "gzip" => match lockstep::trail::read_file_within(&input, 32 << 20) {
            Ok(parsed) => format!("read {} records", parsed.records.len()),
            Err(e) => format!("refused: {e}"),
        },
        "config" => match Config::load(&input) {
            Ok(_) => "valid".to_string(),
            Err(e) => format!("refused: {e}"),
        },
        other => panic!("unknown bomb {other}"),
    };
    println!("outcome={} peak={}", outcome.replace('\n', " "), peak_rss());
}

const MIB: u64 = 1 << 20;

#[test]
fn a_gzip_bomb_is_refused_within_its_inflate_limit() {
    let dir = tempfile::tempdir().unwrap();
    let bomb = dir.path().join("bomb.json.gz");
    // About 1 MiB on disk, 1 GiB inflated.
    std::fs::write(&bomb, gzip_bomb(1024, 1 << 20)).unwrap();
    let (outcome, peak) = in_child("gzip", &bomb);
    assert!(outcome.contains("refused") && outcome.contains("max_inflated_size"), "{outcome}");
    // The limit is 32 MiB; the buffer may double once while growing past it.
    assert!(peak < 160 * MIB, "peak RSS {} MiB: {outcome}", peak / MIB);
}

#[test]
fn yaml_alias_floods_and_deep_nesting_are_refused_quickly_in_bounded_memory() {
    let dir = tempfile::tempdir().unwrap();
    // 1 MiB of aliases to a list of 1,000 aliases to a list of 1,000 values.
    let mut flood = String::from("account_id: &v \"123456789012\"\nbase: &a [");
    flood.push_str(&vec!["*v"; 1000].join(","));
    flood.push_str("]\nmid: &b [");
    flood.push_str(&vec!["*a"; 1000].join(","));
    flood.push_str("]\nflood: [");
    while flood.len() < (1 << 20) - 16 {
        flood.push_str("*b,");
    }
    flood.push_str("*b]\n");
    let flood_path = dir.path().join("flood.yaml");
    std::fs::write(&flood_path, &flood).unwrap();
    let deep_path = dir.path().join("deep.yaml");
    std::fs::write(&deep_path, format!("{}{}", "[".repeat(100_000), "]".repeat(100_000))).unwrap();
    for path in [flood_path, deep_path] {
        let started = Instant::now();
        let (outcome, peak) = in_child("config", &path);
        assert!(outcome.contains("refused"), "{outcome}");
        assert!(started.elapsed() < Duration::from_secs(20), "{:?}", started.elapsed());
        assert!(peak < 96 * MIB, "peak RSS {} MiB: {outcome}", peak / MIB);
    }
}
