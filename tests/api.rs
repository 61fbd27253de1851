//! The admin API and the metrics listener over real HTTP on 127.0.0.1, with a controller on the
//! emulator's IAM: authentication on every endpoint, each operator command and its audit line,
//! and a clear refusal, with nothing changed, for every transition that does not apply.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::sync::Arc;

use chrono::TimeZone;
use lockstep::api;
use lockstep::clock::{Clock, ManualClock};
use lockstep::config::Config;
use lockstep::controller::{Controller, Mode};
use lockstep::evidence::files::Folder;
use lockstep::evidence::refresh::{self, Source};
use lockstep::feed::TrailFeed;
use lockstep::iam::{AwsIam, Iam};
use lockstep::metrics::{MeteredIam, Metrics};
use lockstep::runtime::{Shared, Status};
use lockstep::store::{Ledger, Store};

const TOKEN: &str = "s3cr3t-admin-token";

/// One HTTP/1.1 request; the status code and body.
fn http(port: u16, method: &str, path: &str, token: Option<&str>, body: &str) -> (u16, String) {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
    let auth = token.map(|t| format!("Authorization: Bearer {t}\r\n")).unwrap_or_default();
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    let status = answer[9..12].parse().unwrap();
    let body = answer.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    (status, body)
}

struct Daemon {
    shared: Shared,
    config: Config,
    clock: Arc<dyn Clock>,
    admin: u16,
    metrics: u16,
    store: Arc<Store>,
    _dir: tempfile::TempDir,
}

async fn daemon(prefix: &str) -> Daemon {
    let dir = tempfile::tempdir().unwrap();
    let text = std::fs::read_to_string("rollout.yaml")
        .unwrap()
        .replace("group: lockstep-network-perimeter", &format!("group: {prefix}-lockdown"))
        .replace("policy_name: lockstep-network-perimeter", &format!("policy_name: {prefix}-perimeter"))
        .replace("path: ./trail", &format!("path: {}/trail", dir.path().display()))
        .replace("path: ./lockstep.db", &format!("path: {}/lockstep.db", dir.path().display()));
    let config = Config::parse(&text, Path::new("api.yaml")).unwrap();
    let sdk = common::lockstep_sdk(&common::endpoint()).await;
    let iam = AwsIam::new(&sdk, common::ACCOUNT);
    iam.apply_policy(
        &config.lockdown.group,
        &config.lockdown.policy_name,
        &config.perimeter.policy().to_json().unwrap(),
    )
    .await
    .unwrap();
    let store = Arc::new(Store::open(&config.store.path).unwrap());
    let clock: Arc<dyn Clock> = Arc::new(ManualClock::new(chrono::Utc.with_ymd_and_hms(2026, 3, 1, 0, 0, 0).unwrap()));
    std::fs::create_dir_all(dir.path().join("trail")).unwrap();
    let feed = TrailFeed::new(
        Arc::new(Folder::new(dir.path().join("trail"))),
        &config.account_id,
        clock.clone(),
        config.guard.window,
    );
    let metrics = Metrics::new();
    let iam = MeteredIam::new(iam, metrics.clone());
    let controller = Controller::new(config.clone(), store.clone(), iam, feed, clock.clone(), Mode::Commit);
    let shared = Shared::new(controller, metrics);
    let admin = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let metrics = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (admin_port, metrics_port) = (admin.local_addr().unwrap().port(), metrics.local_addr().unwrap().port());
    tokio::spawn(
        axum::serve(admin, api::admin_router(lockstep::fleet::Fleet::one(shared.clone()), TOKEN.to_string()))
            .into_future(),
    );
    tokio::spawn(axum::serve(metrics, api::metrics_router(lockstep::fleet::Fleet::one(shared.clone()))).into_future());
    Daemon { shared, config, clock, admin: admin_port, metrics: metrics_port, store, _dir: dir }
}

/// Runs blocking HTTP calls off the async runtime.
async fn call(
    port: u16,
    method: &'static str,
    path: &'static str,
    token: Option<&'static str>,
    body: String,
) -> (u16, String) {
    tokio::task::spawn_blocking(move || http(port, method, path, token, &body)).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_admin_endpoint_rejects_a_missing_or_wrong_token() {
    let d = daemon("api-auth").await;
    let pause = r#"{"command":"pause","operator":"mallory","reason":"x"}"#.to_string();
    for (method, path, body) in
        [("GET", "/v1/status", String::new()), ("GET", "/v1/plan", String::new()), ("POST", "/v1/command", pause)]
    {
        for token in [None, Some("wrong-token"), Some("s3cr3t-admin-token-but-longer"), Some("")] {
            let (status, answer) = call(d.admin, method, path, token, body.clone()).await;
            assert_eq!(status, 401, "{method} {path} with {token:?}: {answer}");
            assert!(!answer.contains(TOKEN), "the token is never echoed");
        }
    }
    assert!(d.store.snapshot().unwrap().paused.is_none(), "nothing changed");
    assert!(d.store.audit_log(10).unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_commands_work_are_audited_and_refuse_undefined_transitions() {
    let d = daemon("api-cmd").await;
    let command = |body: &str| call(d.admin, "POST", "/v1/command", Some(TOKEN), body.to_string());

    let (status, answer) = command(r#"{"command":"pause","operator":"kim","reason":"change freeze"}"#).await;
    assert_eq!(status, 200, "{answer}");
    let (status, answer) = command(r#"{"command":"pause","operator":"lee","reason":"again"}"#).await;
    assert_eq!(status, 409, "{answer}");
    assert!(answer.contains("already paused by kim"), "{answer}");
    let (status, answer) = command(r#"{"command":"promote-next","operator":"lee"}"#).await;
    assert_eq!(status, 409);
    assert!(answer.contains("paused"), "{answer}");
    let (status, _) = command(r#"{"command":"resume","operator":"kim"}"#).await;
    assert_eq!(status, 200);
    let (status, answer) = command(r#"{"command":"resume","operator":"kim"}"#).await;
    assert_eq!((status, answer.contains("not paused")), (409, true), "{answer}");
    let (status, answer) = command(r#"{"command":"rollback","operator":"kim","batch":42,"reason":"x"}"#).await;
    assert_eq!((status, answer.contains("no batch 42")), (409, true), "{answer}");
    let (status, _) =
        command(r#"{"command":"hold","operator":"kim","user":"vendor-bot","reason":"vendor laptop"}"#).await;
    assert_eq!(status, 200);
    let (status, answer) = command(r#"{"command":"hold","operator":"kim","user":"vendor-bot","reason":"again"}"#).await;
    assert_eq!((status, answer.contains("already held")), (409, true), "{answer}");
    let (status, _) = command(r#"{"command":"release","operator":"lee","user":"vendor-bot"}"#).await;
    assert_eq!(status, 200);
    let (status, answer) = command(r#"{"command":"release","operator":"lee","user":"vendor-bot"}"#).await;
    assert_eq!((status, answer.contains("not held")), (409, true), "{answer}");
    let (status, _) = command(r#"{"command":"promote-next","operator":"lee"}"#).await;
    assert_eq!(status, 200);
    let (status, answer) = command(r#"{"command":"pause","operator":"  ","reason":"x"}"#).await;
    assert_eq!((status, answer.contains("operator name is required")), (409, true), "{answer}");
    let (status, _) = command(r#"{"command":"explode","operator":"kim"}"#).await;
    assert!((400..500).contains(&status), "an unknown command is a client error");

    let audit = d.store.audit_log(100).unwrap();
    let lines: Vec<(String, String)> = audit.iter().map(|e| (e.actor.clone(), e.action.clone())).collect();
    let expected = [("kim", "pause"), ("kim", "resume"), ("kim", "hold"), ("lee", "release"), ("lee", "promote_next")];
    assert_eq!(
        lines,
        expected.map(|(a, b)| (a.to_string(), b.to_string())),
        "only what was done is audited, with who did it"
    );
    assert_eq!(audit[0].reason, "change freeze");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_plan_metrics_and_probes() {
    let d = daemon("api-status").await;
    let (ready, _) = call(d.metrics, "GET", "/readyz", None, String::new()).await;
    assert_eq!(ready, 503, "not ready before the first step");
    // A refresh that reads nothing still counts as a run, and the step after it reports it.
    let source = Source::Folder(Arc::new(Folder::new(&d.config.evidence.files_path)));
    let window = refresh::Window { since: d.clock.now() - chrono::Duration::hours(2), until: d.clock.now() };
    refresh::refresh(&*d.store, &source, &d.config, window, d.clock.as_ref(), None, &mut |_| {}).await.unwrap();
    d.shared.step().await.unwrap();
    d.shared.step().await.unwrap();
    let (ready, _) = call(d.metrics, "GET", "/readyz", None, String::new()).await;
    assert_eq!(ready, 200);
    let (health, _) = call(d.metrics, "GET", "/healthz", None, String::new()).await;
    assert_eq!(health, 200);

    let (status, body) = call(d.admin, "GET", "/v1/status", Some(TOKEN), String::new()).await;
    assert_eq!(status, 200, "{body}");
    let parsed: Status = serde_json::from_str(&body).unwrap();
    assert_eq!(parsed.mode, "commit");
    assert!(
        matches!(&parsed.gate, Some(lockstep::planner::Gate::Inconclusive(why)) if why.contains("no calls")),
        "evidence without calls: {:?}",
        parsed.gate
    );

    let (status, body) = call(d.admin, "GET", "/v1/plan", Some(TOKEN), String::new()).await;
    assert_eq!(status, 200, "{body}");
    let plan: lockstep::planner::Plan = serde_json::from_str(&body).unwrap();
    assert!(plan.actions.iter().all(|a| !matches!(a, lockstep::planner::Action::StartBatch { .. })));

    let (status, metrics) = call(d.metrics, "GET", "/metrics", None, String::new()).await;
    assert_eq!(status, 200);
    for series in [
        "lockstep_controller_steps_total 2",
        "lockstep_evidence_refresh_runs_total{source=\"files\",status=\"succeeded\"} 1",
        "lockstep_gate{gate=\"inconclusive\"} 1",
        "lockstep_rollbacks_total{reason=\"guard\"} 0",
        "lockstep_iam_calls_total{operation=\"GetGroup\"}",
    ] {
        assert!(metrics.contains(series), "{series} in:\n{metrics}");
    }
}
