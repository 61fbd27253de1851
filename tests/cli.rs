//! The `lockstep` binary as people and scripts use it: `validate`, `policy`, `classify`, the
//! offline operator commands against the emulator's IAM with the daemon down, and the sandbox.

mod common;
mod emulated_cli;
mod faults;

use std::path::Path;
use std::process::{Command, Output};

use lockstep::clock::{Clock, SystemClock};
use lockstep::config::{Access, Config};
use lockstep::store::{Ledger, NewBatch, Store};

fn lockstep(args: &[&str], config: Option<&Path>) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_lockstep"));
    command.args(args).env_remove("LOCKSTEP_ADMIN_TOKEN").env("LOCKSTEP_LOG", "warn");
    if let Some(config) = config {
        command.env("LOCKSTEP_CONFIG", config);
    }
    command.output().expect("run lockstep")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn validate_accepts_the_shipped_file_and_reports_every_problem_with_its_line() {
    let ok = lockstep(&["--config", "rollout.yaml", "validate"], None);
    assert!(ok.status.success(), "{}", text(&ok.stderr));
    assert!(text(&ok.stdout).contains("valid"));

    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.yaml");
    let shipped = std::fs::read_to_string("rollout.yaml").unwrap();
    let broken = shipped
        .replace("203.0.113.0/24", "203.0.113.0/33")
        .replace("soak: 24h\n    batches: 1", "soak: 24 hours please\n    batches: 1")
        .replace("batch_size: 10", "batch_size: -10");
    std::fs::write(&bad, &broken).unwrap();
    let out = lockstep(&["--config", bad.to_str().unwrap(), "validate"], None);
    assert!(!out.status.success());
    let err = text(&out.stderr);
    let line_of = |needle: &str| broken.lines().position(|l| l.contains(needle)).unwrap() + 1;
    for (path, needle) in [
        ("perimeter.trusted_cidrs[0]", "203.0.113.0/33"),
        ("waves[0].soak", "24 hours please"),
        ("waves[1].batch_size", "batch_size: -10"),
    ] {
        let expected = format!("bad.yaml:{}:", line_of(needle));
        assert!(err.lines().any(|l| l.contains(&expected) && l.contains(path)), "{path} at {expected} in:\n{err}");
    }
    assert!(err.contains("3 problem(s)"), "{err}");
}

#[test]
fn a_bad_config_never_replaces_a_good_one_and_policy_output_is_stable() {
    let first = lockstep(&["--config", "rollout.yaml", "policy"], None);
    let second = lockstep(&["--config", "rollout.yaml", "policy"], None);
    assert!(first.status.success());
    assert_eq!(first.stdout, second.stdout, "deterministic");
    let policy: serde_json::Value = serde_json::from_slice(&first.stdout).unwrap();
    assert_eq!(policy["Version"], "2012-10-17");
}

#[test]
fn classify_prints_a_line_per_record_and_skips_what_it_cannot_read() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.json");
    std::fs::write(
        &good,
        r#"{"Records": [
          {"eventID": "e1", "eventTime": "2026-03-01T10:00:00Z", "eventSource": "s3.amazonaws.com", "eventName": "GetObject",
           "sourceIPAddress": "203.0.113.9", "recipientAccountId": "123456789012",
           "userIdentity": {"type": "IAMUser", "userName": "ann", "accountId": "123456789012", "arn": "arn:aws:iam::123456789012:user/ann"}},
          {"eventID": "e2", "eventTime": 7},
          {"eventID": "e3", "eventTime": "2026-03-01T10:01:00Z", "eventSource": "ec2.amazonaws.com", "eventName": "RunInstances",
           "sourceIPAddress": "035.249.253.232", "recipientAccountId": "123456789012",
           "userIdentity": {"type": "IAMUser", "userName": "ann", "accountId": "123456789012"}}
        ]}"#,
    )
    .unwrap();
    let broken = dir.path().join("broken.json.gz");
    std::fs::write(&broken, [0x1f, 0x8b, 8, 0, 1, 2, 3]).unwrap();
    let out =
        lockstep(&["--config", "rollout.yaml", "classify", good.to_str().unwrap(), broken.to_str().unwrap()], None);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let lines: Vec<serde_json::Value> = text(&out.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 2);
    assert_eq!((lines[0]["verdict"].as_str(), lines[0]["reason"].as_str()), (Some("allowed"), Some("trusted_cidr")));
    assert_eq!(lines[0]["user"], "arn:aws:iam::123456789012:user/ann");
    assert_eq!(
        (lines[1]["verdict"].as_str(), lines[1]["reason"].as_str()),
        (Some("would_deny"), Some("unrecognized_source"))
    );
    let err = text(&out.stderr);
    assert!(err.contains("good.json: record 1:"), "{err}");
    assert!(err.contains("broken.json.gz"), "{err}");
    assert!(err.contains("skipped 1 malformed record(s) and 1 unreadable file(s)"), "{err}");

    let none = lockstep(&["--config", "rollout.yaml", "classify", broken.to_str().unwrap()], None);
    assert!(!none.status.success(), "no input could be read");
}

#[test]
fn offline_pause_and_rollback_work_against_the_store_and_iam() {
    let dir = tempfile::tempdir().unwrap();
    let group = "offline-lockdown";
    let shipped = std::fs::read_to_string("rollout.yaml").unwrap();
    let free_port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let config_text = shipped
        .replace("group: lockstep-network-perimeter", &format!("group: {group}"))
        .replace("path: ./lockstep.db", &format!("path: {}/lockstep.db", dir.path().display()))
        .replace("admin: 127.0.0.1:9440", &format!("admin: 127.0.0.1:{free_port}"));
    let config_path = dir.path().join("rollout.yaml");
    std::fs::write(&config_path, &config_text).unwrap();
    let config = Config::parse(&config_text, &config_path).unwrap();

    // A batch lockstep applied earlier: the ledger says locked, the group has them.
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let iam = runtime.block_on(async {
        let sdk = common::lockstep_sdk(&common::endpoint()).await;
        aws_sdk_iam::Client::new(&sdk)
    });
    runtime.block_on(async {
        iam.create_group().group_name(group).send().await.unwrap();
        for user in ["off-ann", "off-ben"] {
            iam.create_user().user_name(user).send().await.unwrap();
            iam.add_user_to_group().group_name(group).user_name(user).send().await.unwrap();
        }
    });
    let store = Store::open(&config.store.path).unwrap();
    let now = SystemClock.now();
    let users = [("off-ann".into(), "clean".into()), ("off-ben".into(), "clean".into())];
    let batch = store
        .start_batch(&NewBatch { wave: "canary", users: &users, soak: chrono::Duration::hours(24) }, "controller", now)
        .unwrap();
    store.mark_locked("off-ann", "controller", now).unwrap();
    store.mark_locked("off-ben", "controller", now).unwrap();
    store.start_soak(batch, now + chrono::Duration::hours(24), now).unwrap();
    drop(store);

    let run = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_lockstep"))
            .args(args)
            .env("LOCKSTEP_CONFIG", &config_path)
            .env("LOCKSTEP_ADMIN_TOKEN", "some-token")
            .env("LOCKSTEP_LOG", "warn")
            .env("AWS_ENDPOINT_URL", common::endpoint())
            .env("AWS_ACCESS_KEY_ID", "AKIDLOCKSTEPTESTS")
            .env("AWS_SECRET_ACCESS_KEY", "secret")
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .env("AWS_CONFIG_FILE", dir.path().join("none"))
            .env("AWS_SHARED_CREDENTIALS_FILE", dir.path().join("none"))
            .output()
            .unwrap()
    };
    let members = || {
        runtime.block_on(async {
            let got = iam.get_group().group_name(group).send().await.unwrap();
            got.users().iter().map(|u| u.user_name().to_string()).collect::<Vec<_>>()
        })
    };

    let paused = run(&["pause", "--reason", "incident 4711", "--operator", "oncall-kim"]);
    assert!(paused.status.success(), "{}", text(&paused.stderr));
    assert!(text(&paused.stderr).contains("daemon not reachable"), "{}", text(&paused.stderr));
    let again = run(&["pause", "--operator", "oncall-kim"]);
    assert!(!again.status.success());
    assert!(text(&again.stderr).contains("already paused by oncall-kim"), "{}", text(&again.stderr));

    let dry = run(&["rollback", "1", "--operator", "oncall-kim"]);
    assert!(dry.status.success(), "{}", text(&dry.stderr));
    assert!(text(&dry.stdout).contains("dry run"), "{}", text(&dry.stdout));
    assert_eq!(members().len(), 2, "no IAM change without --commit");

    let done = run(&["rollback", "1", "--commit", "--reason", "bad canary", "--operator", "oncall-kim"]);
    assert!(done.status.success(), "{}", text(&done.stderr));
    assert!(members().is_empty(), "both removed from the group");
    let store = Store::open(&config.store.path).unwrap();
    let snapshot = store.snapshot().unwrap();
    assert!(snapshot.members.values().all(|m| m.state == lockstep::rollout::UserState::Held));
    let audit = store.audit_log(100).unwrap();
    assert!(audit.iter().any(|e| e.action == "pause" && e.actor == "oncall-kim" && e.reason == "incident 4711"));
    assert!(audit.iter().any(|e| e.action == "rollback" && e.actor == "oncall-kim" && e.reason == "bad canary"));
    assert_eq!(audit.iter().filter(|e| e.action == "held" && e.actor == "oncall-kim").count(), 2);

    let twice = run(&["rollback", "1", "--commit", "--operator", "oncall-kim"]);
    assert!(!twice.status.success());
    assert!(text(&twice.stderr).contains("already rolled back"), "{}", text(&twice.stderr));

    let status = run(&["status", "--json"]);
    assert!(status.status.success(), "{}", text(&status.stderr));
    let status: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(status["paused"]["by"], "oncall-kim");
    assert_eq!(status["batches"][0]["state"], "rolled_back");
}

#[test]
fn the_sandbox_rolls_out_every_account_and_its_summary_shows_the_rollback() {
    let dir = tempfile::tempdir().unwrap();
    let port = |_| std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port().to_string();
    let (admin, metrics) = (port(0), port(1));
    let run_dir = dir.path().join("run");
    let out = lockstep(
        &[
            "sandbox",
            "--dir",
            run_dir.to_str().unwrap(),
            "--pace",
            "0",
            "--users",
            "30",
            "--admin-port",
            &admin,
            "--metrics-port",
            &metrics,
            "--json",
        ],
        None,
    );
    assert!(out.status.success(), "{}\n{}", text(&out.stdout), text(&out.stderr));
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(summary["finished"], true);
    let accounts = summary["accounts"].as_array().unwrap();
    let ids: Vec<&str> = accounts.iter().map(|a| a["account"].as_str().unwrap()).collect();
    assert_eq!(ids, ["123456789012", "111122223333", "444455556666"], "three accounts by default");
    let users: Vec<u64> = accounts.iter().map(|a| a["users"].as_u64().unwrap()).collect();
    assert_eq!(users, [10, 10, 10], "--users is the organisation's total");
    assert_eq!(summary["totals"]["users"], 30);
    for account in accounts {
        let id = account["account"].as_str().unwrap();
        assert_eq!(account["finished"], true, "{account}");
        assert!(!account["locked"].as_array().unwrap().is_empty(), "{account}");
        assert_eq!(account["locked"], account["stand_in_group"], "{account}");
        // Each account's users ended in its own stand-in group, and no other account's.
        for arn in account["stand_in_group_arns"].as_array().unwrap() {
            let arn = arn.as_str().unwrap();
            assert!(arn.starts_with(&format!("arn:aws:iam::{id}:user/")), "{arn} in the group of {id}");
        }
        // One organisation trail, one store per account.
        assert!(run_dir.join("trail/AWSLogs/o-a1b2c3d4e5").join(id).join("CloudTrail").is_dir(), "{id}");
        let store = if id == "123456789012" { "lockstep.db".to_string() } else { format!("lockstep-{id}.db") };
        assert!(run_dir.join(store).is_file(), "{id}");
    }
    // The story plays in the first account alone.
    let rollbacks: Vec<usize> = accounts.iter().map(|a| a["rollbacks"].as_array().unwrap().len()).collect();
    assert_eq!(rollbacks, [1, 0, 0], "{summary}");
    assert!(accounts[0]["rollbacks"][0].as_str().unwrap().contains("AccessDenied spike"));
    assert_eq!(summary["totals"]["rollbacks"], 1);
    assert!(text(&out.stderr).contains("LOCAL STAND-IN"), "the stand-in is labelled");
    assert!(text(&out.stderr).contains("] 111122223333 payments: wave canary"), "narration names the account");
}

/// The README shows what `cargo run -- sandbox` prints, exactly.
#[test]
fn the_readme_shows_the_sandbox_summary_as_printed() {
    let dir = tempfile::tempdir().unwrap();
    let port = |_| std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port().to_string();
    let (admin, metrics) = (port(0), port(1));
    let run_dir = dir.path().join("run");
    let args = ["sandbox", "--dir", run_dir.to_str().unwrap(), "--pace", "0", "--admin-port", &admin];
    let out = lockstep(&[&args[..], &["--metrics-port", &metrics]].concat(), None);
    assert!(out.status.success(), "{}\n{}", text(&out.stdout), text(&out.stderr));
    let readme = std::fs::read_to_string("README.md").unwrap();
    let shown = readme
        .split("cargo run -- sandbox\n```\n\n```text\n")
        .nth(1)
        .and_then(|rest| rest.split("```\n").next())
        .expect("the README shows the sandbox's summary after `cargo run -- sandbox`");
    assert_eq!(shown, text(&out.stdout).trim_start_matches('\n'), "README.md, On a fresh machine");
}

/// A rollout against the emulator: config, two users with eight clean days of trail, and a CLI
/// runner with the environment the binary needs to reach moto (and nothing else).
struct EmulatedRollout {
    dir: tempfile::TempDir,
    prefix: String,
    config_path: std::path::PathBuf,
    runtime: tokio::runtime::Runtime,
    iam: aws_sdk_iam::Client,
    users: [String; 2],
}

impl EmulatedRollout {
    fn new(prefix: &str) -> EmulatedRollout {
        let dir = tempfile::tempdir().unwrap();
        let config_text = std::fs::read_to_string("rollout.yaml")
            .unwrap()
            .replace("group: lockstep-network-perimeter", &format!("group: {prefix}-lockdown"))
            .replace("policy_name: lockstep-network-perimeter", &format!("policy_name: {prefix}-perimeter"))
            .replace("path: ./trail", &format!("path: {}/trail", dir.path().display()))
            .replace("path: ./lockstep.db", &format!("path: {}/lockstep.db", dir.path().display()));
        let config_path = dir.path().join("rollout.yaml");
        std::fs::write(&config_path, &config_text).unwrap();
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let iam = runtime.block_on(async {
            let sdk = common::lockstep_sdk(&common::endpoint()).await;
            aws_sdk_iam::Client::new(&sdk)
        });
        let users = [format!("{prefix}-ann"), format!("{prefix}-ben")];
        for user in &users {
            runtime.block_on(iam.create_user().user_name(user).path("/engineering/").send()).unwrap();
        }
        let now = SystemClock.now();
        let times: Vec<_> = (1..(8 * 24)).map(|hour| now - chrono::Duration::hours(hour)).collect();
        common::write_office_trail(&dir.path().join("trail"), &users, &times).unwrap();
        EmulatedRollout { dir, prefix: prefix.to_string(), config_path, runtime, iam, users }
    }

    fn run(&self, args: &[&str], failpoint: Option<&str>) -> Output {
        let mut command = emulated_cli::lockstep(args, &self.config_path, self.dir.path());
        match failpoint {
            Some(point) => command.env("LOCKSTEP_FAILPOINT", point),
            None => command.env_remove("LOCKSTEP_FAILPOINT"),
        };
        command.output().unwrap()
    }

    fn group(&self) -> Vec<String> {
        let got =
            self.runtime.block_on(self.iam.get_group().group_name(format!("{}-lockdown", self.prefix)).send()).unwrap();
        let mut users: Vec<String> = got.users().iter().map(|u| u.user_name().to_string()).collect();
        users.sort();
        users
    }

    fn store(&self) -> Store {
        Store::open(&self.dir.path().join("lockstep.db")).unwrap()
    }
}

#[test]
fn policy_apply_and_a_dry_run_of_the_daemon_against_the_emulator() {
    let world = EmulatedRollout::new("cli-run");
    let prefix = &world.prefix;
    let dry = world.run(&["policy", "apply"], None);
    assert!(dry.status.success(), "{}", text(&dry.stderr));
    assert!(text(&dry.stdout).contains(&format!("create group {prefix}-lockdown")), "{}", text(&dry.stdout));
    let applied = world.run(&["policy", "apply", "--commit"], None);
    assert!(applied.status.success(), "{}", text(&applied.stderr));
    assert!(text(&applied.stdout).contains("created managed policy"), "{}", text(&applied.stdout));
    let again = world.run(&["policy", "apply", "--commit"], None);
    assert!(text(&again.stdout).contains("nothing to change"), "{}", text(&again.stdout));

    let once = world.run(&["run", "--once", "--json"], None);
    assert!(once.status.success(), "{}", text(&once.stderr));
    let report: serde_json::Value = serde_json::from_str(text(&once.stdout).lines().last().unwrap()).unwrap();
    assert_eq!(report["mode"], "dry-run");
    let writes: Vec<String> =
        report["iam_writes"].as_array().unwrap().iter().map(|w| w.as_str().unwrap().to_string()).collect();
    assert_eq!(writes, world.users.iter().map(|u| format!("AddUserToGroup {prefix}-lockdown {u}")).collect::<Vec<_>>());
    assert!(world.group().is_empty(), "a dry run writes nothing to IAM");
}

/// Kills the daemon (abort, as `kill -9` would) at `point`, restarts it, and checks that ledger
/// and group agree, nobody was promoted twice, and the audit is complete.
fn killed_and_restarted(prefix: &str, point: &str, in_group_after_kill: usize) {
    let world = EmulatedRollout::new(prefix);
    assert!(world.run(&["policy", "apply", "--commit"], None).status.success());
    let killed = world.run(&["run", "--once", "--commit"], Some(point));
    assert!(!killed.status.success(), "the process died at {point}");
    assert_eq!(world.group().len(), in_group_after_kill);
    let store = world.store();
    let promoting = store
        .snapshot()
        .unwrap()
        .members
        .values()
        .filter(|m| m.state == lockstep::rollout::UserState::Promoting)
        .count();
    assert_eq!(promoting, 2, "the intent was journaled before the process died");
    drop(store);

    let restarted = world.run(&["run", "--once", "--commit"], None);
    assert!(restarted.status.success(), "{}", text(&restarted.stderr));
    assert_eq!(world.group(), world.users.to_vec());
    let store = world.store();
    let snapshot = store.snapshot().unwrap();
    assert_eq!(snapshot.batches.len(), 1, "nobody promoted twice");
    assert!(snapshot.members.values().all(|m| m.state == lockstep::rollout::UserState::Locked));
    let audit = store.audit_log(100).unwrap();
    for user in &world.users {
        let actions: Vec<&str> =
            audit.iter().filter(|e| e.user.as_ref() == Some(user)).map(|e| e.action.as_str()).collect();
        assert_eq!(actions, ["promote", "locked"], "audit for {user}");
    }
}

#[test]
fn a_daemon_killed_between_journal_and_iam_write_finishes_the_promotion_on_restart() {
    killed_and_restarted("kill-journal", "after-journal", 0);
}

#[test]
fn a_daemon_killed_between_iam_write_and_ledger_update_records_it_on_restart() {
    killed_and_restarted("kill-write", "after-iam-write", 1);
}

#[test]
fn completions_and_the_man_page_come_from_the_cli_definition() {
    for shell in ["bash", "zsh", "fish"] {
        let out = lockstep(&["completions", shell], None);
        assert!(out.status.success(), "{shell}: {}", text(&out.stderr));
        let script = text(&out.stdout);
        for word in ["promote-next", "wait", "--watch", "--commit"] {
            assert!(script.contains(word), "{shell} completes {word}");
        }
    }
    let bash = lockstep(&["completions", "bash"], None);
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("lockstep.bash");
    std::fs::write(&script, &bash.stdout).unwrap();
    let syntax = Command::new("bash").arg("-n").arg(&script).output().unwrap();
    assert!(syntax.status.success(), "bash accepts the script: {}", text(&syntax.stderr));
    assert!(!lockstep(&["completions", "tcsh"], None).status.success());
    let bad_wait = lockstep(&["wait", "--for", "soon"], None);
    assert!(text(&bad_wait.stderr).contains("expected finished, paused or wave=NAME"), "{}", text(&bad_wait.stderr));

    let man = lockstep(&["man"], None);
    assert!(man.status.success(), "{}", text(&man.stderr));
    let page = text(&man.stdout);
    assert!(page.starts_with(".ie") || page.contains(".TH lockstep"), "{page}");
    for section in [".SH NAME", ".SH SYNOPSIS", ".SH SUBCOMMANDS", "lockstep\\-wait", "lockstep\\-completions"] {
        assert!(page.contains(section), "the man page has {section}: {page}");
    }
}

#[test]
fn evidence_refresh_takes_the_window_as_the_readme_shows_it() {
    let dir = tempfile::tempdir().unwrap();
    let config_text = std::fs::read_to_string("rollout.yaml")
        .unwrap()
        .replace("path: ./trail", &format!("path: {}/trail", dir.path().display()))
        .replace("path: ./lockstep.db", &format!("path: {}/lockstep.db", dir.path().display()));
    let config = dir.path().join("rollout.yaml");
    std::fs::write(&config, config_text).unwrap();
    let now = SystemClock.now();
    let times: Vec<_> = (1..30).map(|hour| now - chrono::Duration::hours(hour)).collect();
    common::write_office_trail(&dir.path().join("trail"), &["ann".to_string()], &times).unwrap();

    let out = lockstep(&["evidence", "refresh", "--since", "36h", "--until", "now"], Some(&config));
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("29 records"), "{}", text(&out.stdout));
    let bad = lockstep(&["evidence", "refresh", "--until", "later"], Some(&config));
    assert!(!bad.status.success());
    assert!(text(&bad.stderr).contains("or `now`"), "{}", text(&bad.stderr));
}

#[test]
fn every_command_the_readme_shows_exists_with_its_flags() {
    let readme = std::fs::read_to_string("README.md").unwrap();
    let mut in_shell = false;
    let mut checked = 0;
    for line in readme.lines() {
        if line.starts_with("```") {
            in_shell = line == "```sh";
            continue;
        }
        if !in_shell {
            continue;
        }
        let command = line.split(" #").next().unwrap();
        for shown in command.split(" / ").filter_map(|c| c.trim().strip_prefix("lockstep ")) {
            let words: Vec<String> =
                shown.split_whitespace().map(|w| w.trim_matches(|c| c == '[' || c == ']').to_string()).collect();
            let path: Vec<&str> = words
                .iter()
                .map(String::as_str)
                .take_while(|w| w.chars().all(|c| c.is_ascii_lowercase() || c == '-') && !w.starts_with('-'))
                .collect();
            // The longest leading run of words that is a (sub)command.
            let help = (1..=path.len())
                .rev()
                .map(|n| lockstep(&[&path[..n], &["--help"]].concat(), None))
                .find(|out| out.status.success())
                .unwrap_or_else(|| panic!("README shows an unknown command: lockstep {shown}"));
            let help = text(&help.stdout);
            for flag in words.iter().filter(|w| w.starts_with("--")) {
                let flag = flag.split('=').next().unwrap();
                assert!(help.contains(flag), "README shows `lockstep {shown}`, whose help has no {flag}");
            }
            checked += 1;
        }
    }
    assert!(checked > 25, "checked {checked} commands");
}

impl EmulatedRollout {
    /// Moves the listeners to free ports (tests run in parallel) for a daemon that keeps running.
    fn free_listeners(&self) {
        let port = || std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let text = std::fs::read_to_string(&self.config_path)
            .unwrap()
            .replace("admin: 127.0.0.1:9440", &format!("admin: 127.0.0.1:{}", port()))
            .replace("metrics: 127.0.0.1:9441", &format!("metrics: 127.0.0.1:{}", port()));
        std::fs::write(&self.config_path, text).unwrap();
    }

    /// An operator command as someone without the admin token runs it.
    fn operator(&self, args: &[&str]) -> Output {
        emulated_cli::lockstep(args, &self.config_path, self.dir.path())
            .env_remove("LOCKSTEP_ADMIN_TOKEN")
            .output()
            .unwrap()
    }

    /// The same command from `n` processes at once.
    fn in_parallel(&self, n: usize, args: &[&str]) -> Vec<Output> {
        std::thread::scope(|scope| {
            let runs: Vec<_> = (0..n).map(|_| scope.spawn(|| self.operator(args))).collect();
            runs.into_iter().map(|r| r.join().unwrap()).collect()
        })
    }

    fn add_by_hand(&self, user: &str) {
        let request = self.iam.add_user_to_group().group_name(format!("{}-lockdown", self.prefix)).user_name(user);
        self.runtime.block_on(request.send()).unwrap();
    }
}

#[test]
fn with_the_daemon_running_the_cli_without_its_token_refuses_and_changes_nothing() {
    let world = EmulatedRollout::new("cli-lock");
    world.free_listeners();
    assert!(world.run(&["policy", "apply", "--commit"], None).status.success());
    let mut daemon = emulated_cli::lockstep(&["run"], &world.config_path, world.dir.path())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let store_path = world.dir.path().join("lockstep.db");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !store_path.exists() || lockstep::store::StoreLock::offline(&store_path).is_ok() {
        assert!(std::time::Instant::now() < deadline, "the daemon never took the store lock");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }

    let refused = world.operator(&["pause", "--operator", "kim", "--reason", "incident"]);
    assert!(!refused.status.success());
    assert!(
        text(&refused.stderr).contains("refused, nothing changed: the lockstep daemon is running"),
        "{}",
        text(&refused.stderr)
    );
    let rollback = world.operator(&["rollback", "1", "--commit", "--operator", "kim"]);
    assert!(!rollback.status.success(), "{}", text(&rollback.stdout));
    let store = world.store();
    assert!(store.snapshot().unwrap().paused.is_none());
    assert!(
        !store.audit_log(1000).unwrap().iter().any(|e| e.actor == "kim"),
        "nothing written by the refused commands"
    );

    daemon.kill().unwrap();
    daemon.wait().unwrap();
    let paused = world.operator(&["pause", "--operator", "kim", "--reason", "incident"]);
    assert!(paused.status.success(), "offline once the daemon is down: {}", text(&paused.stderr));
    assert_eq!(store.snapshot().unwrap().paused.map(|p| p.by).as_deref(), Some("kim"));
}

#[test]
fn parallel_offline_commands_make_one_change_and_refuse_the_rest_cleanly() {
    let world = EmulatedRollout::new("cli-race");
    assert!(world.run(&["policy", "apply", "--commit"], None).status.success());
    assert!(world.run(&["run", "--once", "--commit"], None).status.success());
    assert_eq!(world.group(), world.users.to_vec());
    assert!(world.operator(&["pause", "--operator", "kim", "--reason", "freeze"]).status.success());

    let clean = |outputs: &[Output]| {
        for output in outputs.iter().filter(|o| !o.status.success()) {
            let stderr = text(&output.stderr);
            assert!(stderr.contains("refused, nothing changed"), "{stderr}");
            assert!(!stderr.contains("locked") && !stderr.contains("error:"), "{stderr}");
        }
        outputs.iter().filter(|o| o.status.success()).count()
    };
    let resumed = world.in_parallel(20, &["resume", "--operator", "kim"]);
    assert_eq!(clean(&resumed), 1, "exactly one resume");
    let rolled_back = world.in_parallel(10, &["rollback", "1", "--commit", "--operator", "kim"]);
    assert_eq!(clean(&rolled_back), 1, "exactly one rollback");

    assert!(world.group().is_empty(), "the batch is out of the group");
    let audit = world.store().audit_log(1000).unwrap();
    assert_eq!(audit.iter().filter(|e| e.action == "resume").count(), 1);
    assert_eq!(audit.iter().filter(|e| e.action == "rollback").count(), 1);
    assert_eq!(audit.iter().filter(|e| e.action == "held").count(), 2);
}

#[test]
fn an_offline_rollback_leaves_a_member_added_by_hand_in_the_group() {
    let world = EmulatedRollout::new("cli-own");
    assert!(world.run(&["policy", "apply", "--commit"], None).status.success());
    let [ann, ben] = world.users.clone();
    world.add_by_hand(&ben);
    let once = world.run(&["run", "--once", "--commit"], None);
    assert!(once.status.success(), "{}", text(&once.stderr));
    let store = world.store();
    let snapshot = store.snapshot().unwrap();
    assert_eq!(snapshot.batches[0].members, std::slice::from_ref(&ann), "the hand-added member is never planned");
    assert!(snapshot.foreign.contains_key(&ben));
    assert_eq!(world.group(), [ann.clone(), ben.clone()]);

    let done = world.operator(&["rollback", "1", "--commit", "--operator", "kim"]);
    assert!(done.status.success(), "{}", text(&done.stderr));
    assert_eq!(world.group(), std::slice::from_ref(&ben), "only what lockstep added was removed");
    let actions: Vec<String> = store
        .audit_log(1000)
        .unwrap()
        .into_iter()
        .filter(|e| e.user.as_ref() == Some(&ben))
        .map(|e| e.action)
        .collect();
    assert_eq!(actions, ["foreign"]);
    let status = world.operator(&["status", "--json"]);
    let status: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(status["users"]["not_added_by_lockstep"], 1, "{status}");
}

/// SIGTERM while a step's IAM writes are in flight behind 150 ms of AWS latency: the step
/// finishes its writes and their journal, then the daemon exits cleanly within the bound the
/// README states.
#[test]
fn sigterm_during_a_step_finishes_it_and_exits_cleanly() {
    const EXIT_BOUND: std::time::Duration = std::time::Duration::from_secs(30);
    let world = EmulatedRollout::new("cli-term");
    world.free_listeners();
    assert!(world.run(&["policy", "apply", "--commit"], None).status.success());
    assert!(world.run(&["evidence", "refresh"], None).status.success());
    let proxy = world.runtime.block_on(faults::Proxy::start(
        &common::endpoint(),
        faults::Fault::Slow(std::time::Duration::from_millis(150)),
    ));
    let mut daemon = emulated_cli::lockstep(&["run", "--commit"], &world.config_path, world.dir.path())
        .env("AWS_ENDPOINT_URL", proxy.url())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // The batch is journaled: its IAM writes are under way.
    let store_path = world.dir.path().join("lockstep.db");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        assert!(std::time::Instant::now() < deadline, "no batch was journaled");
        let promoting = store_path.exists()
            && Store::open(&store_path)
                .and_then(|s| s.snapshot())
                .is_ok_and(|s| s.members.values().any(|m| m.state == lockstep::rollout::UserState::Promoting));
        if promoting {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let sent = std::time::Instant::now();
    let killed = Command::new("kill").args(["-TERM", &daemon.id().to_string()]).status().unwrap();
    assert!(killed.success());
    let status = loop {
        if let Some(status) = daemon.try_wait().unwrap() {
            break status;
        }
        assert!(sent.elapsed() < EXIT_BOUND, "the daemon did not exit within {EXIT_BOUND:?}");
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(daemon.stderr.as_mut().unwrap(), &mut stderr).unwrap();
    assert!(status.success(), "clean exit, not killed by the signal: {status:?}\n{stderr}");
    println!("exited {:?} after SIGTERM", sent.elapsed());
    // The ledger and the group agree: the step in flight finished its writes and journal.
    let snapshot = world.store().snapshot().unwrap();
    assert!(
        snapshot.members.values().all(|m| m.state == lockstep::rollout::UserState::Locked),
        "{:?}",
        snapshot.members
    );
    assert_eq!(world.group(), world.users.to_vec());
}

#[test]
fn run_refuses_a_policy_over_the_size_limit_before_writing_the_store() {
    let dir = tempfile::tempdir().unwrap();
    let many: String = (0..400).map(|i| format!("    - 10.{}.{}.0/24\n", i / 256, i % 256)).collect();
    let oversized = std::fs::read_to_string("rollout.yaml")
        .unwrap()
        .replace("    - 203.0.113.0/24\n", &format!("    - 203.0.113.0/24\n{many}"))
        .replace("path: ./lockstep.db", &format!("path: {}/lockstep.db", dir.path().display()));
    let config = dir.path().join("rollout.yaml");
    std::fs::write(&config, oversized).unwrap();
    for args in [&["run", "--once"][..], &["run", "--commit"][..]] {
        let refused = lockstep(args, Some(&config));
        assert!(!refused.status.success());
        assert!(text(&refused.stderr).contains("limit for a managed policy"), "{}", text(&refused.stderr));
    }
    assert!(!dir.path().join("lockstep.db").exists(), "nothing written");
}

/// `accounts.discover` against the emulator's AWS Organizations: the accounts directly in one OU
/// join account_id's listed one (an excluded one left out, one outside the OU not asked for), each
/// reached through the role template, with its tags; `policy apply --commit` acts in each.
#[test]
fn discovered_accounts_are_rolled_out_through_the_role_template() {
    use aws_sdk_organizations::types::Tag;
    let dir = tempfile::tempdir().unwrap();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let base = runtime.block_on(common::lockstep_sdk(&common::endpoint()));
    let org = aws_sdk_organizations::Client::new(&base);
    let (in_ou, excluded, elsewhere, ou) = runtime.block_on(async {
        // One organisation per emulator: another run of this test may have made it already.
        let _ = org.create_organization().send().await;
        let mut ids = Vec::new();
        for name in ["discover-a", "discover-b", "discover-c"] {
            let created =
                org.create_account().account_name(name).email(format!("{name}@example.com")).send().await.unwrap();
            ids.push(created.create_account_status().and_then(|s| s.account_id()).unwrap().to_string());
        }
        let root = org.list_roots().send().await.unwrap().roots()[0].id().unwrap().to_string();
        let ou = org.create_organizational_unit().parent_id(&root).name("rollout").send().await.unwrap();
        let ou = ou.organizational_unit().and_then(|u| u.id()).unwrap().to_string();
        for id in &ids[..2] {
            org.move_account().account_id(id).source_parent_id(&root).destination_parent_id(&ou).send().await.unwrap();
        }
        let tag = Tag::builder().key("env").value("prod").build().unwrap();
        org.tag_resource().resource_id(&ids[0]).tags(tag).send().await.unwrap();
        (ids[0].clone(), ids[1].clone(), ids[2].clone(), ou)
    });
    let shipped = std::fs::read_to_string("rollout.yaml")
        .unwrap()
        .replace("group: lockstep-network-perimeter", "group: discovered-lockdown")
        .replace("policy_name: lockstep-network-perimeter", "policy_name: discovered-perimeter")
        .replace("path: ./lockstep.db", &format!("path: {}/lockstep.db", dir.path().display()));
    let accounts = format!(
        "accounts:\n  role: \"arn:aws:iam::{{account}}:role/lockstep-rollout\"\n  discover: {{ous: [{ou}]}}\n  list:\n    - id: \"{}\"\n      name: security\n  exclude: [\"{excluded}\"]\n",
        common::ACCOUNT
    );
    let config = dir.path().join("rollout.yaml");
    std::fs::write(&config, format!("{shipped}\n{accounts}")).unwrap();
    let lockstep = |args: &[&str]| emulated_cli::lockstep(args, &config, dir.path()).output().unwrap();

    let valid = lockstep(&["validate"]);
    assert!(valid.status.success(), "{}", text(&valid.stdout));
    assert!(text(&valid.stdout).contains(&format!("accounts.discover: the active accounts in {ou}")));

    let shown = lockstep(&["policy"]);
    assert!(shown.status.success(), "{}", text(&shown.stderr));
    let shown = text(&shown.stdout);
    let headers: Vec<&str> = shown.lines().filter(|l| l.starts_with("== ")).collect();
    assert_eq!(
        headers,
        [format!("== account {} (security) ==", common::ACCOUNT), format!("== account {in_ou} (discover-a) ==")],
        "{shown}"
    );
    assert!(!shown.contains(&excluded) && !shown.contains(&elsewhere));

    let applied = lockstep(&["policy", "apply", "--commit"]);
    assert!(applied.status.success(), "{}{}", text(&applied.stdout), text(&applied.stderr));
    let access =
        Access::AssumeRole { role_arn: format!("arn:aws:iam::{in_ou}:role/lockstep-rollout"), external_id: None };
    let sdk = runtime.block_on(lockstep::aws::account_config(&base, &access)).unwrap();
    let group = runtime
        .block_on(
            aws_sdk_iam::Client::new(&sdk).list_attached_group_policies().group_name("discovered-lockdown").send(),
        )
        .unwrap();
    let arn = group.attached_policies().first().and_then(|p| p.policy_arn()).unwrap();
    assert_eq!(arn, format!("arn:aws:iam::{in_ou}:policy/discovered-perimeter"));

    // An account the file does not list is reached once discovered.
    let planned = lockstep(&["--account", &in_ou, "plan"]);
    assert!(!text(&planned.stderr).contains("not in the configuration's accounts"), "{}", text(&planned.stderr));
}

/// Three accounts: account_id's own (default credentials), one reached through its role with a
/// VPC and endpoint of its own, and one whose role STS refuses (the proxy answers AccessDenied).
#[test]
fn policy_apply_puts_the_policy_in_place_in_every_account_it_can_reach() {
    const PAYMENTS: &str = "111122223333";
    const BLOCKED: &str = "444455556666";
    let dir = tempfile::tempdir().unwrap();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let proxy = runtime
        .block_on(faults::Proxy::start(&common::endpoint(), faults::Fault::RefuseAssumeRole { account: BLOCKED }));
    let accounts = format!(
        r#"
accounts:
  role: "arn:aws:iam::{{account}}:role/lockstep-rollout"
  external_id: "lockstep-tests"
  list:
    - id: "{account}"
      name: security
    - id: "{PAYMENTS}"
      name: payments
    - id: "{BLOCKED}"
      name: blocked
  perimeter:
    "{PAYMENTS}":
      trusted_vpcs: [vpc-0c1d2e3f]
      trusted_vpc_endpoints: {{vpce-0c1d2e3f: vpc-0c1d2e3f}}
"#,
        account = common::ACCOUNT
    );
    let shipped = std::fs::read_to_string("rollout.yaml")
        .unwrap()
        .replace("group: lockstep-network-perimeter", "group: accounts-lockdown")
        .replace("policy_name: lockstep-network-perimeter", "policy_name: accounts-perimeter")
        .replace("path: ./lockstep.db", &format!("path: {}/lockstep.db", dir.path().display()));
    let config = dir.path().join("rollout.yaml");
    std::fs::write(&config, format!("{shipped}{accounts}")).unwrap();
    let reachable = dir.path().join("reachable.yaml");
    std::fs::write(&reachable, format!("{shipped}{accounts}  exclude: [\"{BLOCKED}\"]\n")).unwrap();
    let lockstep = |args: &[&str], config: &Path| {
        emulated_cli::lockstep(args, config, dir.path()).env("AWS_ENDPOINT_URL", proxy.url()).output().unwrap()
    };

    // IAM in each account, read through credentials acting in it (moto itself grants any role).
    let base = runtime.block_on(common::lockstep_sdk(&common::endpoint()));
    let iam_in = |account: &str| {
        let access = match account {
            common::ACCOUNT => Access::Default,
            _ => Access::AssumeRole {
                role_arn: format!("arn:aws:iam::{account}:role/lockstep-rollout"),
                external_id: None,
            },
        };
        let sdk = runtime.block_on(lockstep::aws::account_config(&base, &access)).unwrap();
        aws_sdk_iam::Client::new(&sdk)
    };
    let attached = |account: &str| -> Option<String> {
        let iam = iam_in(account);
        let listed =
            runtime.block_on(iam.list_attached_group_policies().group_name("accounts-lockdown").send()).ok()?;
        let arn = listed.attached_policies().first()?.policy_arn()?.to_string();
        assert_eq!(arn, format!("arn:aws:iam::{account}:policy/accounts-perimeter"));
        let version = runtime.block_on(iam.get_policy_version().policy_arn(&arn).version_id("v1").send()).unwrap();
        version.policy_version().and_then(|v| v.document()).map(str::to_string)
    };

    let shown = lockstep(&["policy"], &config);
    assert!(shown.status.success(), "{}", text(&shown.stderr));
    let shown = text(&shown.stdout);
    let sections: Vec<&str> = shown.split("== ").skip(1).collect();
    assert_eq!(sections.len(), 3, "{shown}");
    assert!(sections[1].starts_with("account 111122223333 (payments) ==") && sections[1].contains("vpc-0c1d2e3f"));
    assert!(!sections[0].contains("vpc-0c1d2e3f"), "another account's VPC is not trusted here");

    // A dry run writes nothing, in any account.
    let dry = lockstep(&["policy", "apply"], &config);
    assert!(!dry.status.success(), "the blocked account fails the command");
    assert_eq!(text(&dry.stdout).matches("create group accounts-lockdown").count(), 2, "{}", text(&dry.stdout));
    assert!(attached(common::ACCOUNT).is_none() && attached(PAYMENTS).is_none());

    let applied = lockstep(&["policy", "apply", "--commit"], &config);
    let (out, err) = (text(&applied.stdout), text(&applied.stderr));
    assert!(!applied.status.success(), "{out}");
    assert_eq!(out.matches("created managed policy arn:aws:iam::").count(), 2, "{out}");
    let refused = format!("cannot assume role arn:aws:iam::{BLOCKED}:role/lockstep-rollout");
    assert!(out.contains(&format!("{refused}: AccessDenied: User is not authorized")), "{out}");
    assert!(err.contains(&format!("1 of 3 accounts failed: {BLOCKED}")), "{err}");
    let payments = attached(PAYMENTS).expect("the payments account has its policy");
    assert!(payments.contains("vpc-0c1d2e3f"), "{payments}");
    let security = attached(common::ACCOUNT).expect("account_id's account has its policy");
    assert!(!security.contains("vpc-0c1d2e3f"), "{security}");
    assert!(attached(BLOCKED).is_none(), "nothing was written in the account that could not be reached");

    let again = lockstep(&["policy", "apply"], &reachable);
    assert!(again.status.success(), "{}", text(&again.stderr));
    assert_eq!(text(&again.stdout).matches("nothing to change").count(), 2, "{}", text(&again.stdout));

    // A command that acts in one account refuses a file naming several unless told which.
    let plan = lockstep(&["plan"], &config);
    assert!(!plan.status.success());
    let expected = "`lockstep plan` acts in one account; pass --account with one of them";
    assert!(text(&plan.stderr).contains(expected), "{}", text(&plan.stderr));
    assert!(!dir.path().join("lockstep.db").exists(), "refused before opening the store");
    let unknown = lockstep(&["--account", "999999999999", "plan"], &config);
    assert!(!unknown.status.success());
    assert!(
        text(&unknown.stderr).contains("account 999999999999 is not in the configuration's accounts"),
        "{}",
        text(&unknown.stderr)
    );
}

/// The second account of [`two_account_rollout`], beside `common::ACCOUNT` (account_id's own).
const PAYMENTS: &str = "111122223333";

/// A configuration naming two accounts (account_id's, "security", and [`PAYMENTS`]), each with
/// its evidence refreshed from its own trail: `alice` calls in both (from outside the perimeter
/// in PAYMENTS alone), `bob` only in PAYMENTS, `carol` only in account_id's.
fn two_account_rollout() -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let free_port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let config_text = std::fs::read_to_string("rollout.yaml")
        .unwrap()
        .replace("path: ./trail", &format!("path: {}/trail", dir.path().display()))
        .replace("path: ./lockstep.db", &format!("path: {}/lockstep.db", dir.path().display()))
        .replace("admin: 127.0.0.1:9440", &format!("admin: 127.0.0.1:{free_port}"));
    let accounts = format!(
        "\naccounts:\n  role: \"arn:aws:iam::{{account}}:role/lockstep-rollout\"\n  list:\n    - id: \"{}\"\n      name: security\n    - id: \"{PAYMENTS}\"\n      name: payments\n",
        common::ACCOUNT
    );
    let config = dir.path().join("rollout.yaml");
    std::fs::write(&config, format!("{config_text}{accounts}")).unwrap();

    let now = SystemClock.now();
    let calls = |account: &'static str, user: &'static str, from: &'static str, hours: std::ops::Range<i64>| {
        hours.map(move |hour| {
            lockstep_synth::RecordSpec::new(
                lockstep_synth::Identity::iam_user(account, user),
                now - chrono::Duration::hours(hour),
                "ec2:DescribeInstances",
                lockstep_synth::Origin::ip(from),
            )
        })
    };
    let trail = dir.path().join("trail");
    let security: Vec<_> = calls(common::ACCOUNT, "alice", "203.0.113.9", 1..11)
        .chain(calls(common::ACCOUNT, "carol", "203.0.113.9", 1..4))
        .collect();
    lockstep_synth::write_trail(&trail, common::ACCOUNT, &security, Default::default()).unwrap();
    let payments: Vec<_> = calls(PAYMENTS, "alice", "203.0.113.9", 1..21)
        .chain(calls(PAYMENTS, "alice", "192.0.2.77", 2..4))
        .chain(calls(PAYMENTS, "bob", "203.0.113.9", 1..6))
        .collect();
    lockstep_synth::write_trail(&trail, PAYMENTS, &payments, Default::default()).unwrap();
    for account in [common::ACCOUNT, PAYMENTS] {
        let out = lockstep(&["--account", account, "evidence", "refresh", "--since", "36h"], Some(&config));
        assert!(out.status.success(), "{}", text(&out.stderr));
    }
    (dir, config)
}

#[test]
fn evidence_show_names_a_user_of_several_accounts_with_its_account() {
    let (_dir, config) = two_account_rollout();
    let show = |args: &[&str]| lockstep(&[&["evidence", "show"], args].concat(), Some(&config));

    let ambiguous = show(&["alice"]);
    assert!(!ambiguous.status.success());
    let err = text(&ambiguous.stderr);
    assert!(err.contains("alice is in 2 accounts: 123456789012/alice, 111122223333/alice"), "{err}");
    assert!(err.contains("lockstep evidence show 123456789012/alice"), "{err}");
    assert!(ambiguous.stdout.is_empty());

    let payments = show(&["111122223333/alice"]);
    assert!(payments.status.success(), "{}", text(&payments.stderr));
    let out = text(&payments.stdout);
    assert!(out.lines().nth(1).unwrap().starts_with("111122223333/alice"), "{out}");
    assert!(out.contains("no: 2 of 22 calls"), "{out}");
    assert!(out.contains("from 192.0.2.77"), "{out}");
    let security = show(&["123456789012/alice"]);
    let out = text(&security.stdout);
    assert!(security.status.success() && out.contains("yes: all 10 calls"), "{out}");

    let bob = show(&["bob", "--json"]);
    assert!(bob.status.success(), "{}", text(&bob.stderr));
    assert!(text(&bob.stderr).contains("bob is known in account 111122223333 (payments) alone"));
    let doc: serde_json::Value = serde_json::from_slice(&bob.stdout).unwrap();
    assert_eq!((doc["account"].as_str(), doc["user"].as_str()), (Some(PAYMENTS), Some("bob")));
    assert_eq!(doc["evidence"]["calls"], 5);
    let flagged = lockstep(&["--account", PAYMENTS, "evidence", "show", "alice"], Some(&config));
    assert!(text(&flagged.stdout).contains("no: 2 of 22 calls"), "{}", text(&flagged.stdout));

    for (args, why) in [
        (
            vec!["dave"],
            "no account knows dave: neither the ledger nor the evidence of accounts 123456789012, 111122223333 has it; name the account: `lockstep evidence show <account>/dave`",
        ),
        (
            vec!["--account", common::ACCOUNT, "evidence", "show", "111122223333/alice"],
            "--account 123456789012 and the user 111122223333/alice name different accounts",
        ),
        (
            vec!["444455556666/alice"],
            "account 444455556666 is not in the configuration's accounts (123456789012, 111122223333)",
        ),
        (vec!["payments/alice"], "must be a 12-digit account ID"),
    ] {
        let out = match args[0] {
            "--account" => lockstep(&args, Some(&config)),
            _ => show(&args),
        };
        assert!(!out.status.success(), "{args:?}");
        assert!(text(&out.stderr).contains(why), "{args:?}: {}", text(&out.stderr));
    }
}

#[test]
fn hold_and_release_of_account_slash_name_act_in_that_account_alone() {
    let (dir, config) = two_account_rollout();
    let members = |path: &str| Store::open_read_only(&dir.path().join(path)).unwrap().snapshot().unwrap().members;

    let ambiguous = lockstep(&["hold", "alice"], Some(&config));
    assert!(!ambiguous.status.success());
    assert!(text(&ambiguous.stderr).contains("123456789012/alice, 111122223333/alice"), "{}", text(&ambiguous.stderr));

    let held = lockstep(&["hold", "111122223333/alice", "--reason", "contractor laptop"], Some(&config));
    assert!(held.status.success(), "{}", text(&held.stderr));
    assert_eq!(text(&held.stdout), "alice held\n");
    let payments = members("lockstep-111122223333.db");
    assert_eq!(payments["alice"].state, lockstep::rollout::UserState::Held);
    assert_eq!(payments["alice"].reason.as_deref(), Some("contractor laptop"));
    assert!(members("lockstep.db").is_empty(), "the other account's alice is untouched");

    // carol is in account_id's store alone: no prefix needed.
    let carol = lockstep(&["hold", "carol"], Some(&config));
    assert!(carol.status.success(), "{}", text(&carol.stderr));
    assert!(members("lockstep.db").contains_key("carol") && !members("lockstep-111122223333.db").contains_key("carol"));

    let released = lockstep(&["release", "111122223333/alice"], Some(&config));
    assert!(released.status.success(), "{}", text(&released.stderr));
    assert!(!members("lockstep-111122223333.db").contains_key("alice"));
}

#[test]
fn evidence_list_of_several_accounts_has_an_account_column() {
    let (_dir, config) = two_account_rollout();
    let listed = lockstep(&["evidence", "list"], Some(&config));
    assert!(listed.status.success(), "{}", text(&listed.stderr));
    let out = text(&listed.stdout);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], "Evidence by account:");
    assert!(lines[1].starts_with("  account 123456789012 (security): current to "), "{out}");
    assert!(lines[2].starts_with("  account 111122223333 (payments): current to "), "{out}");
    assert!(lines[3].starts_with("4 user(s) with calls in the last "), "{out}");
    assert!(lines[3].ends_with(", in 2 accounts."), "{out}");
    assert!(lines[5].starts_with("ACCOUNT       USER   "), "{out}");
    let rows: Vec<(&str, &str)> = lines[6..]
        .iter()
        .map(|l| {
            let mut words = l.split_whitespace();
            (words.next().unwrap(), words.next().unwrap())
        })
        .collect();
    assert_eq!(rows, [(common::ACCOUNT, "alice"), (common::ACCOUNT, "carol"), (PAYMENTS, "alice"), (PAYMENTS, "bob")]);

    let json = lockstep(&["evidence", "list", "--json", "--sort", "calls"], Some(&config));
    assert!(json.status.success(), "{}", text(&json.stderr));
    let doc: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    let accounts: Vec<_> = doc["accounts"].as_array().unwrap().iter().map(|a| a["account"].as_str().unwrap()).collect();
    assert_eq!(accounts, [common::ACCOUNT, PAYMENTS]);
    assert_eq!(doc["accounts"][1]["name"], "payments");
    assert_eq!(doc["accounts"][1]["evidence_currency"]["stale"], false);
    let users: Vec<_> = doc["users"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| (u["account"].as_str().unwrap(), u["user"].as_str().unwrap(), u["calls"].as_u64().unwrap()))
        .collect();
    assert_eq!(
        users,
        [(common::ACCOUNT, "alice", 10), (common::ACCOUNT, "carol", 3), (PAYMENTS, "alice", 22), (PAYMENTS, "bob", 5)]
    );

    // One account, as before: no account column or field.
    let one = lockstep(&["--account", PAYMENTS, "evidence", "list"], Some(&config));
    let out = text(&one.stdout);
    assert!(one.status.success() && out.starts_with("Evidence: current to "), "{out}");
    assert!(out.contains("\nUSER   ") && !out.contains("ACCOUNT"), "{out}");
    let one = lockstep(&["--account", PAYMENTS, "evidence", "list", "--json"], Some(&config));
    let doc: serde_json::Value = serde_json::from_slice(&one.stdout).unwrap();
    assert!(doc.get("accounts").is_none() && doc["users"][0].get("account").is_none(), "{doc}");
}

#[test]
fn an_account_without_a_store_has_no_users_and_is_never_given_one_by_a_reading_command() {
    const NEW: &str = "444455556666";
    let (dir, config) = two_account_rollout();
    let text_before = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&config, format!("{text_before}    - id: \"{NEW}\"\n      name: new\n")).unwrap();
    let new_store = dir.path().join(format!("lockstep-{NEW}.db"));

    let listed = lockstep(&["evidence", "list"], Some(&config));
    assert!(!listed.status.success(), "no evidence at all in one account");
    let out = text(&listed.stdout);
    let expected = format!(
        "  account {NEW} (new): NONE - no refresh has succeeded yet; run `lockstep --account {NEW} evidence refresh`."
    );
    assert!(out.lines().any(|l| l == expected), "{out}");
    assert!(out.contains("4 user(s) with calls") && out.contains("in 3 accounts."), "{out}");

    let bob = lockstep(&["evidence", "show", "bob"], Some(&config));
    assert!(bob.status.success(), "{}", text(&bob.stderr));
    let none = lockstep(&["hold", "dave"], Some(&config));
    let err = text(&none.stderr);
    assert!(!none.status.success());
    assert!(err.contains(&format!("accounts 123456789012, 111122223333, {NEW} has it")), "{err}");
    assert!(err.contains("`lockstep hold <account>/dave`"), "{err}");
    assert!(!new_store.exists(), "listing and searching created no store");
}

/// `exempt` tags the user in the account the user names (through that account's role) and
/// records it in that account's ledger alone.
#[test]
fn exempt_of_account_slash_name_tags_the_user_in_that_account() {
    let (dir, config) = two_account_rollout();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let base = runtime.block_on(common::lockstep_sdk(&common::endpoint()));
    let iam_in = |access: &Access| {
        let sdk = runtime.block_on(lockstep::aws::account_config(&base, access)).unwrap();
        aws_sdk_iam::Client::new(&sdk)
    };
    let payments = iam_in(&Access::AssumeRole {
        role_arn: format!("arn:aws:iam::{PAYMENTS}:role/lockstep-rollout"),
        external_id: None,
    });
    // Only PAYMENTS has an IAM user alice: the default account is shared with the other tests.
    runtime.block_on(payments.create_user().user_name("alice").send()).unwrap();
    let exempt = |args: &[&str]| emulated_cli::lockstep(args, &config, dir.path()).output().unwrap();
    let args = ["exempt", "111122223333/alice", "--until", "30d", "--reason", "vendor VPN", "--operator", "ops"];

    let dry = exempt(&args);
    assert!(dry.status.success(), "{}", text(&dry.stderr));
    let out = text(&dry.stdout);
    assert!(
        out.starts_with(
            "dry run, nothing changed; with --commit lockstep would tag IAM user alice in account 111122223333:"
        ),
        "{out}"
    );
    assert!(out.contains("lockstep-111122223333.db"), "{out}");
    let ambiguous = exempt(&args.map(|a| if a.ends_with("/alice") { "alice" } else { a }));
    assert!(text(&ambiguous.stderr).contains("123456789012/alice, 111122223333/alice"), "{}", text(&ambiguous.stderr));

    let done = exempt(&[&args[..], &["--commit"]].concat());
    assert!(done.status.success(), "{}", text(&done.stderr));
    assert!(text(&done.stdout).starts_with("exempted alice in account 111122223333 until "), "{}", text(&done.stdout));
    let tags = |iam: &aws_sdk_iam::Client| {
        let listed = runtime.block_on(iam.list_user_tags().user_name("alice").send()).unwrap();
        listed.tags().iter().map(|t| t.key().to_string()).collect::<Vec<_>>()
    };
    assert!(tags(&payments).contains(&"lockstep-exempt".to_string()), "{:?}", tags(&payments));
    let security = iam_in(&Access::Default);
    assert!(runtime.block_on(security.get_user().user_name("alice").send()).is_err(), "nothing done in account_id's");
    let records = |path: &str| Store::open_read_only(&dir.path().join(path)).unwrap().exemption_records().unwrap();
    assert_eq!(records("lockstep-111122223333.db").len(), 1);
    assert!(records("lockstep.db").is_empty());
}
