//! A real Prometheus (Debian's server, unpacked by scripts/install-prometheus) scraping the real
//! `lockstep run --commit` daemon against the emulator's IAM, in real time: the target is up, a
//! guard rollback fires the paused-by-guard alert, and every dashboard expression evaluates to
//! series. The same rollout drives `lockstep wait`, `status --watch` and the offline `status`.

mod common;
mod emulated_cli;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use lockstep::clock::{Clock, SystemClock};
use lockstep_synth::{Faults, Identity, Origin, RecordSpec, write_trail};
use serde_json::Value;

const PROMETHEUS: &str = ".cache/promtool/usr/bin/prometheus";
const TOKEN: &str = "prometheus-test-token";
const ALERT: &str = "LockstepRolloutPausedByGuard";

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A child process killed when the test ends, however it ends.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The rollout's folder, configuration and the environment the binary needs to reach moto.
struct World {
    dir: tempfile::TempDir,
    config: PathBuf,
    metrics_port: u16,
    prefix: String,
    users: [String; 2],
    runtime: tokio::runtime::Runtime,
    iam: aws_sdk_iam::Client,
}

impl World {
    fn new(prefix: &str) -> World {
        let dir = tempfile::tempdir().unwrap();
        let metrics_port = free_port();
        let config_text = std::fs::read_to_string("rollout.yaml")
            .unwrap()
            .replace("group: lockstep-network-perimeter", &format!("group: {prefix}-lockdown"))
            .replace("policy_name: lockstep-network-perimeter", &format!("policy_name: {prefix}-perimeter"))
            .replace("path: ./trail", &format!("path: {}/trail", dir.path().display()))
            .replace("path: ./lockstep.db", &format!("path: {}/lockstep.db", dir.path().display()))
            .replace("poll: 1m", "poll: 1s")
            .replace("admin: 127.0.0.1:9440", &format!("admin: 127.0.0.1:{}", free_port()))
            .replace("metrics: 127.0.0.1:9441", &format!("metrics: 127.0.0.1:{metrics_port}"));
        let config = dir.path().join("rollout.yaml");
        std::fs::write(&config, config_text).unwrap();
        let users = [format!("{prefix}-ann"), format!("{prefix}-ben")];
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let iam =
            runtime.block_on(async { aws_sdk_iam::Client::new(&common::lockstep_sdk(&common::endpoint()).await) });
        let mut records = Vec::new();
        for user in &users {
            runtime.block_on(iam.create_user().user_name(user).path("/engineering/").send()).unwrap();
            // Eight clean days, and calls up to now so the guard's source is not silent.
            let minutes = (10..8 * 24 * 60).step_by(50).chain([1, 3, 5]);
            for ago in minutes {
                records.push(RecordSpec::new(
                    Identity::iam_user(common::ACCOUNT, user),
                    SystemClock.now() - chrono::Duration::minutes(ago),
                    "ec2:DescribeInstances",
                    Origin::ip("203.0.113.9"),
                ));
            }
        }
        write_trail(&dir.path().join("trail"), common::ACCOUNT, &records, Faults::default()).unwrap();
        World { dir, config, metrics_port, prefix: prefix.to_string(), users, runtime, iam }
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut command = emulated_cli::lockstep(args, &self.config, self.dir.path());
        command.env("LOCKSTEP_ADMIN_TOKEN", TOKEN).env_remove("LOCKSTEP_FAILPOINT");
        command
    }

    fn run(&self, args: &[&str]) -> Output {
        self.command(args).output().unwrap()
    }

    fn spawn(&self, args: &[&str]) -> Running {
        Running(self.command(args).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap())
    }

    /// A spike nothing attributes, so that the guard's rollback pauses the rollout: S3's bare
    /// "Access Denied" for `user` on records without a source address (cause `unknown`), in the
    /// last second, far above any expectation. (Denials naming the lockdown policy are fully
    /// attributed: those roll back without a pause.)
    fn spike(&self, user: &str) {
        let records: Vec<RecordSpec> = (0..12)
            .map(|n| {
                RecordSpec::new(
                    Identity::iam_user(common::ACCOUNT, user),
                    SystemClock.now() - chrono::Duration::milliseconds(50 * n),
                    "s3:GetObject",
                    Origin::ip(""),
                )
                .error("AccessDenied", "Access Denied")
            })
            .collect();
        write_trail(&self.dir.path().join("trail"), common::ACCOUNT, &records, Faults::default()).unwrap();
    }
}

/// Prometheus on a free port, scraping the daemon every second and evaluating `rules` every second.
struct Prometheus {
    port: u16,
    _process: Running,
    _dir: tempfile::TempDir,
}

impl Prometheus {
    fn start(target_port: u16, rules: &str) -> Prometheus {
        if !Path::new(PROMETHEUS).exists() {
            let installed = Command::new("bash").arg("scripts/install-prometheus").status().unwrap();
            assert!(installed.success(), "scripts/install-prometheus failed");
        }
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("alerts.yml"), rules).unwrap();
        let config = format!(
            "global: {{scrape_interval: 1s, evaluation_interval: 1s}}\n\
             rule_files: [alerts.yml]\n\
             scrape_configs:\n  - job_name: lockstep\n    static_configs: [{{targets: ['127.0.0.1:{target_port}']}}]\n"
        );
        std::fs::write(dir.path().join("prometheus.yml"), config).unwrap();
        let port = free_port();
        let log = std::fs::File::create(dir.path().join("log")).unwrap();
        let process = Command::new(PROMETHEUS)
            .arg(format!("--config.file={}", dir.path().join("prometheus.yml").display()))
            .arg(format!("--storage.tsdb.path={}", dir.path().join("data").display()))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let prometheus = Prometheus { port, _process: Running(process), _dir: dir };
        eventually("Prometheus ready", Duration::from_secs(20), || {
            matches!(get(port, "/-/ready"), Ok((200, _))).then_some(())
        });
        prometheus
    }

    fn api(&self, path: &str) -> Value {
        let (status, body) = get(self.port, path).unwrap();
        let value: Value = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{path}: {e}: {body}"));
        assert_eq!(value["status"], "success", "{path}: HTTP {status}: {body}");
        value["data"].clone()
    }

    /// An instant query: its result vector, or the error Prometheus gave.
    fn query(&self, expr: &str) -> Result<Vec<Value>, String> {
        let encoded: String = expr
            .bytes()
            .map(|b| if b.is_ascii_alphanumeric() { (b as char).to_string() } else { format!("%{b:02X}") })
            .collect();
        let (_, body) = get(self.port, &format!("/api/v1/query?query={encoded}")).map_err(|e| e.to_string())?;
        let value: Value = serde_json::from_str(&body).map_err(|e| format!("{e}: {body}"))?;
        if value["status"] != "success" {
            return Err(format!("{}: {}", value["errorType"], value["error"]));
        }
        Ok(value["data"]["result"].as_array().cloned().unwrap_or_default())
    }

    fn alert_state(&self, name: &str) -> Option<String> {
        let alerts = self.api("/api/v1/alerts");
        alerts["alerts"]
            .as_array()?
            .iter()
            .find(|a| a["labels"]["alertname"] == name)
            .and_then(|a| a["state"].as_str().map(str::to_string))
    }
}

/// A GET over HTTP/1.0 (so the answer is never chunked): status code and body.
fn get(port: u16, path: &str) -> std::io::Result<(u16, String)> {
    let mut stream = TcpStream::connect(("127.0.0.1", port))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\n\r\n")?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer)?;
    let status = answer.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = answer.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    Ok((status, body))
}

/// Polls `check` until it gives a value, or fails the test after `limit`.
fn eventually<T>(what: &str, limit: Duration, check: impl FnMut() -> Option<T>) -> T {
    within(limit, check).unwrap_or_else(|| panic!("timed out after {limit:?} waiting for {what}"))
}

/// Polls `check` until it gives a value, or gives `None` after `limit`.
fn within<T>(limit: Duration, mut check: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(value) = check() {
            return Some(value);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// The alert rules with every `for:` cut to 1s, so pending alerts fire within the test.
fn rules_with_short_for() -> String {
    let rules = std::fs::read_to_string("dashboards/alerts.yml").unwrap();
    let shortened: Vec<String> = rules
        .lines()
        .map(|line| match line.trim_start().strip_prefix("for:") {
            Some(_) => format!("{}for: 1s", &line[..line.len() - line.trim_start().len()]),
            None => line.to_string(),
        })
        .collect();
    assert!(rules.contains("for: 1m"), "the paused-by-guard rule waits 1m in production");
    shortened.join("\n")
}

/// Every PromQL expression of the dashboard's panels, with Grafana's variables substituted.
fn dashboard_expressions() -> Vec<String> {
    fn walk(value: &Value, out: &mut Vec<String>) {
        match value {
            Value::Object(map) => {
                for (key, value) in map {
                    match value {
                        Value::String(expr) if key == "expr" => out.push(expr.clone()),
                        _ => walk(value, out),
                    }
                }
            }
            Value::Array(items) => items.iter().for_each(|item| walk(item, out)),
            _ => {}
        }
    }
    let dashboard: Value = serde_json::from_str(&std::fs::read_to_string("dashboards/lockstep.json").unwrap()).unwrap();
    let mut exprs = Vec::new();
    walk(&dashboard["panels"], &mut exprs);
    assert!(exprs.len() > 20, "found the panels' expressions");
    exprs
        .into_iter()
        .map(|e| {
            e.replace("$job", "lockstep")
                .replace("$instance", ".*")
                .replace("$account", ".*")
                .replace("$__rate_interval", "1m")
        })
        .collect()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn finished(mut child: Running, limit: Duration) -> (Option<i32>, String, String) {
    let deadline = Instant::now() + limit;
    while child.0.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "still running after {limit:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
    let (mut out, mut err) = (String::new(), String::new());
    child.0.stdout.take().unwrap().read_to_string(&mut out).unwrap();
    child.0.stderr.take().unwrap().read_to_string(&mut err).unwrap();
    (child.0.wait().unwrap().code(), out, err)
}

#[test]
fn prometheus_sees_a_guard_rollback_fire_the_alert_and_every_dashboard_query_answers() {
    let world = World::new("prom");
    let applied = world.run(&["policy", "apply", "--commit"]);
    assert!(applied.status.success(), "{}", text(&applied.stderr));
    let daemon_log = world.dir.path().join("daemon.log");
    let daemon = Running(
        world
            .command(&["run", "--commit"])
            // SDK retries are logged, so a step stalled on a slow emulator shows in the log.
            .env("LOCKSTEP_LOG", "info,aws_smithy_runtime::client::retries=debug")
            .stderr(std::fs::File::create(&daemon_log).unwrap())
            .spawn()
            .unwrap(),
    );
    let daemon_log = || std::fs::read_to_string(&daemon_log).unwrap_or_default();
    let prometheus = Prometheus::start(world.metrics_port, &rules_with_short_for());

    eventually("the lockstep target to be up", Duration::from_secs(20), || {
        let targets = prometheus.api("/api/v1/targets");
        let target = targets["activeTargets"].as_array()?.first()?.clone();
        (target["health"] == "up").then_some(())
    });
    eventually("the canary batch to be locked", Duration::from_secs(20), || {
        let locked = prometheus.query(r#"lockstep_users{state="locked"}"#).ok()?;
        (locked.first()?["value"][1] == "2").then_some(())
    });

    // Nothing is paused yet: waiting for a pause times out (exit 1).
    let timed_out = world.run(&["wait", "--for", "paused", "--timeout", "1s", "--interval", "200ms"]);
    assert_eq!(timed_out.status.code(), Some(1), "{}", text(&timed_out.stderr));
    let waiting = world.spawn(&["wait", "--for", "finished", "--interval", "200ms", "--timeout", "120s"]);
    let watching = world.spawn(&["status", "--watch", "--interval", "300ms"]);
    assert_eq!(prometheus.alert_state(ALERT), None, "no alert before the rollback");

    world.spike(&world.users[0]);
    // Real time on a busy 2-core machine: a step may wait out an emulator's retries.
    let firing = within(Duration::from_secs(60), || prometheus.alert_state(ALERT).filter(|s| s == "firing"));
    assert!(
        firing.is_some(),
        "the paused-by-guard alert did not fire; paused {:?}, rollbacks {:?}, steps {:?}; status:\n{}\nthe daemon's log:\n{}",
        prometheus.query("lockstep_rollout_paused"),
        prometheus.query("lockstep_rollbacks_total"),
        prometheus.query("lockstep_step_duration_seconds_count"),
        text(&world.run(&["status"]).stdout),
        daemon_log()
    );

    // `wait --for finished` gave up with 2 when the guard paused the rollout.
    let (code, _, err) = finished(waiting, Duration::from_secs(10));
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("paused by the guard"), "{err}");
    let paused = world.run(&["wait", "--for", "paused", "--timeout", "5s"]);
    assert_eq!(paused.status.code(), Some(0), "{}", text(&paused.stderr));
    let canary = world.run(&["wait", "--for", "wave=canary", "--timeout", "5s"]);
    assert_eq!(canary.status.code(), Some(0), "the canary wave was reached: {}", text(&canary.stderr));
    let unknown = world.run(&["wait", "--for", "wave=nope", "--timeout", "1s"]);
    assert!(
        !unknown.status.success() && text(&unknown.stderr).contains("no wave \"nope\""),
        "{}",
        text(&unknown.stderr)
    );

    // Series that only exist once something happened: a refresh run counted by the daemon (an
    // operator's refresh by hand), and IAM errors (someone deletes the lockdown group).
    let refreshed = world.run(&["evidence", "refresh", "--since", "1h", "--until", "now"]);
    assert!(refreshed.status.success(), "{}", text(&refreshed.stderr));
    world.runtime.block_on(world.iam.delete_group().group_name(format!("{}-lockdown", world.prefix)).send()).unwrap();

    // Every dashboard expression evaluates and returns series (rates need a few scrapes).
    let exprs = dashboard_expressions();
    let mut failing = Vec::new();
    let answered = within(Duration::from_secs(20), || {
        failing = exprs
            .iter()
            .filter_map(|expr| match prometheus.query(expr) {
                Ok(series) if !series.is_empty() => None,
                Ok(_) => Some(format!("no series: {expr}")),
                Err(error) => Some(format!("{error}: {expr}")),
            })
            .collect();
        failing.is_empty().then_some(())
    });
    assert!(answered.is_some(), "dashboard expressions without an answer:\n{}", failing.join("\n"));

    // Snapshots of `status --watch`, off a terminal: separated by a line, showing the pause.
    std::thread::sleep(Duration::from_millis(700));
    let mut watching = watching;
    watching.0.kill().unwrap();
    let (_, out, _) = finished(watching, Duration::from_secs(5));
    let snapshots: Vec<&str> = out.split("----\n").collect();
    assert!(snapshots.len() >= 2, "{out}");
    assert!(snapshots.iter().all(|s| s.is_empty() || s.starts_with("rollout ")), "whole snapshots: {out}");
    assert!(snapshots.first().unwrap().contains(" soaking "), "{out}");
    assert!(snapshots.iter().any(|s| s.contains(" rolled_back ")), "{out}");

    // With the daemon down, `status` shows the mode it ran with.
    drop(daemon);
    let offline = world.run(&["status"]);
    assert!(offline.status.success(), "{}", text(&offline.stderr));
    assert!(text(&offline.stdout).contains("mode       commit\n"), "{}", text(&offline.stdout));

    // On a terminal (`script` gives it one), `status --watch` clears the screen and redraws.
    let on_terminal = format!("{} status --watch --interval 300ms", env!("CARGO_BIN_EXE_lockstep"));
    let mut terminal = Command::new("timeout");
    terminal.args(["2", "script", "-qec", &on_terminal, "/dev/null"]);
    terminal.envs(world.command(&[]).get_envs().filter_map(|(k, v)| Some((k, v?))));
    let drawn = text(&terminal.output().unwrap().stdout);
    assert!(drawn.matches("\x1b[2J\x1b[H").count() >= 2, "redrawn in place: {drawn:?}");
    assert!(!drawn.contains("----"), "no separators on a terminal: {drawn:?}");
}
