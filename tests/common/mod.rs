//! The AWS emulator harness for integration tests: one `moto_server` per test binary, on
//! 127.0.0.1 at a free port, started on first use and gone when the binary exits.
//!
//! - [`endpoint`], [`sdk_config`]: point an SDK client at it (static dummy credentials, so the
//!   credential chain never probes instance metadata; nothing ever leaves 127.0.0.1).
//! - [`exclusive`]: serialises tests that touch server-wide state ([`reset`], the Athena result
//!   queue, state transitions). Tests that only use their own buckets or users need not take it.
//! - [`queue_athena_result`], [`athena_transition`]: moto's Athena test controls.
//! - [`python`]: the project venv's interpreter (it also carries `duckdb`).
//!
//! The emulator comes from `$LOCKSTEP_MOTO_SERVER` or `<crate>/.venv/bin/moto_server`; when it is
//! missing the tests fail (never skip) and say how to install it.

// Each test binary uses part of this module.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use aws_config::{BehaviorVersion, Region, SdkConfig};
use aws_sdk_s3::config::{Credentials, SharedCredentialsProvider};

/// moto's default account and the region every test uses.
pub const ACCOUNT: &str = "123456789012";
pub const REGION: &str = "us-east-1";

const INSTALL_HINT: &str = "run the tests with scripts/test (the README's test command), which installs \
    moto[server] and duckdb into .venv, or point LOCKSTEP_MOTO_SERVER / LOCKSTEP_PYTHON at existing ones";

/// Runs moto (argv[1:]) and stops it when its own stdin reaches end of file, which happens when
/// the test binary exits and the kernel closes the pipe's write end (statics are never dropped).
/// It exits with moto, so a crash during start-up is seen.
const WRAPPER: &str = r#"
import subprocess, sys, threading
moto = subprocess.Popen(sys.argv[1:], stdin=subprocess.DEVNULL)
def stop_at_eof():
    sys.stdin.buffer.read()
    moto.terminate()
    try:
        moto.wait(timeout=5)
    except subprocess.TimeoutExpired:
        moto.kill()
threading.Thread(target=stop_at_eof, daemon=True).start()
sys.exit(moto.wait())
"#;

struct Server {
    port: u16,
    /// Held for the life of the process: closing it stops moto.
    _lifeline: ChildStdin,
    /// The wrapper; it exits on its own once the lifeline closes.
    _wrapper: Child,
}

static SERVER: OnceLock<Server> = OnceLock::new();
static EXCLUSIVE: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn manifest_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn tool(variable: &str, default: &str) -> PathBuf {
    let path = std::env::var_os(variable).map(PathBuf::from).unwrap_or_else(|| manifest_dir().join(default));
    assert!(path.is_file(), "{} not found: {INSTALL_HINT}", path.display());
    path
}

/// The Python interpreter with duckdb: `$LOCKSTEP_PYTHON` or `<crate>/.venv/bin/python`.
pub fn python() -> PathBuf {
    tool("LOCKSTEP_PYTHON", ".venv/bin/python")
}

fn server() -> &'static Server {
    SERVER.get_or_init(start)
}

fn start() -> Server {
    let moto = tool("LOCKSTEP_MOTO_SERVER", ".venv/bin/moto_server");
    // Port 0 makes the kernel pick a free port; release it for moto to take.
    let port = TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("a free local port").port();
    let binary = std::env::current_exe()
        .ok()
        .and_then(|p| p.file_stem().map(|s| s.to_string_lossy().into_owned()))
        .unwrap_or_else(|| "tests".into());
    let log_path = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("moto-{binary}.log"));
    let log = std::fs::File::create(&log_path).expect("moto log file");
    let mut child = Command::new(python())
        .arg("-c")
        .arg(WRAPPER)
        .arg(&moto)
        .args(["-H", "127.0.0.1", "-p", &port.to_string()])
        .stdin(Stdio::piped())
        .stdout(log.try_clone().expect("moto log file"))
        .stderr(log)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {}: {e}; {INSTALL_HINT}", moto.display()));
    let lifeline = child.stdin.take().expect("piped stdin");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if matches!(request(port, "GET", "/moto-api/", ""), Ok((200, _))) {
            return Server { port, _lifeline: lifeline, _wrapper: child };
        }
        let log = || std::fs::read_to_string(&log_path).unwrap_or_default();
        if let Ok(Some(status)) = child.try_wait() {
            panic!("moto_server exited ({status}) while starting; its log:\n{}", log());
        }
        assert!(Instant::now() < deadline, "moto_server did not answer within 30 s; its log:\n{}", log());
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// One HTTP/1.1 request to 127.0.0.1:`port`; the status code and body.
fn request(port: u16, method: &str, path: &str, body: &str) -> std::io::Result<(u16, String)> {
    let mut stream = TcpStream::connect(("127.0.0.1", port))?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer)?;
    let status = answer
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("not an HTTP answer: {answer:.200}")))?;
    let body = answer.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    Ok((status, body))
}

/// POSTs a moto control call and insists on success.
fn control(path: &str, body: &serde_json::Value) {
    let (status, answer) =
        request(server().port, "POST", path, &body.to_string()).unwrap_or_else(|e| panic!("POST {path}: {e}"));
    assert!((200..300).contains(&status), "POST {path}: HTTP {status}: {answer}");
}

/// `http://127.0.0.1:<port>`, starting the emulator on first use.
pub fn endpoint() -> String {
    format!("http://127.0.0.1:{}", server().port)
}

/// SDK configuration for the emulator: region us-east-1, static dummy credentials, endpoint
/// override. Build S3 clients with `lockstep::aws::s3_client` (path-style addressing).
pub fn sdk_config() -> SdkConfig {
    SdkConfig::builder()
        .behavior_version(BehaviorVersion::latest())
        .region(Region::new(REGION))
        .credentials_provider(SharedCredentialsProvider::new(Credentials::new(
            "AKIDLOCKSTEPTESTS",
            "lockstep-test-secret",
            None,
            None,
            "lockstep-tests",
        )))
        .endpoint_url(endpoint())
        .build()
}

/// Serialises tests that use server-wide state. Hold the guard for the whole test.
pub async fn exclusive() -> tokio::sync::MutexGuard<'static, ()> {
    EXCLUSIVE.lock().await
}

/// Forgets every resource in every service (take [`exclusive`] first).
pub fn reset() {
    control("/moto-api/reset", &serde_json::json!({}));
}

/// Queues the result of the next Athena query started: a header row of `columns`, then `rows`
/// (`None` is SQL NULL, a cell without `VarCharValue` as Athena sends it).
pub fn queue_athena_result(columns: &[&str], rows: &[Vec<Option<String>>]) {
    let cell = |value: Option<&str>| match value {
        Some(text) => serde_json::json!({ "VarCharValue": text }),
        None => serde_json::json!({}),
    };
    let header = serde_json::json!({ "Data": columns.iter().map(|c| cell(Some(c))).collect::<Vec<_>>() });
    let rows = std::iter::once(header).chain(
        rows.iter()
            .map(|row| serde_json::json!({ "Data": row.iter().map(|v| cell(v.as_deref())).collect::<Vec<_>>() })),
    );
    let column_info: Vec<_> =
        columns.iter().map(|name| serde_json::json!({ "Name": name, "Label": name, "Type": "varchar" })).collect();
    control(
        "/moto-api/static/athena/query-results",
        &serde_json::json!({
            "account_id": ACCOUNT,
            "region": REGION,
            "results": [{ "rows": rows.collect::<Vec<_>>(), "column_info": column_info }],
        }),
    );
}

/// With `Some(n)`, each Athena query moves QUEUED -> RUNNING -> SUCCEEDED one step per `n`
/// `GetQueryExecution` calls; `None` restores the default (immediately SUCCEEDED).
pub fn athena_transition(polls_per_step: Option<u32>) {
    match polls_per_step {
        Some(times) => control(
            "/moto-api/state-manager/set-transition",
            &serde_json::json!({
                "model_name": "athena::execution",
                "transition": { "progression": "manual", "times": times },
            }),
        ),
        None => control(
            "/moto-api/state-manager/unset-transition",
            &serde_json::json!({ "model_name": "athena::execution" }),
        ),
    }
}

/// SDK configuration with lockstep's own settings (`lockstep::aws::loader`: standard retry with
/// extra attempts), static dummy credentials, pointed at `endpoint` (the emulator or a proxy).
pub async fn lockstep_sdk(endpoint: &str) -> SdkConfig {
    lockstep::aws::loader(REGION, Some(endpoint))
        .credentials_provider(Credentials::new(
            "AKIDLOCKSTEPTESTS",
            "lockstep-test-secret",
            None,
            None,
            "lockstep-tests",
        ))
        .load()
        .await
}

/// The result of one query, as tests/duckdb_run.py prints it.
#[derive(serde::Deserialize)]
pub struct DuckResult {
    pub columns: Vec<String>,
    pub rows: Vec<Vec<Option<String>>>,
}

/// Runs each query with DuckDB (tests/duckdb_run.py) over the trail files under `root`, exposed
/// as the Athena table `cloudtrail.cloudtrail_logs`.
pub fn duckdb(root: &std::path::Path, queries: &[String]) -> Vec<DuckResult> {
    let scratch = tempfile::tempdir().unwrap();
    let mut command = Command::new(python());
    command
        .arg(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/duckdb_run.py"))
        .arg(root)
        .args(["cloudtrail", "cloudtrail_logs"]);
    for (i, query) in queries.iter().enumerate() {
        let path = scratch.path().join(format!("query{i}.sql"));
        std::fs::write(&path, query).unwrap();
        command.arg(path);
    }
    let out = command.output().unwrap();
    assert!(out.status.success(), "duckdb_run.py failed:\n{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Writes trail files under `root` in which each of `users` calls ec2:DescribeInstances from the
/// trusted office address 203.0.113.9 at each of `times`: a clean history that makes them
/// eligible.
pub fn write_office_trail(
    root: &std::path::Path,
    users: &[String],
    times: &[chrono::DateTime<chrono::Utc>],
) -> std::io::Result<()> {
    let records: Vec<_> = users
        .iter()
        .flat_map(|user| {
            times.iter().map(move |&at| {
                lockstep_synth::RecordSpec::new(
                    lockstep_synth::Identity::iam_user(ACCOUNT, user),
                    at,
                    "ec2:DescribeInstances",
                    lockstep_synth::Origin::ip("203.0.113.9"),
                )
            })
        })
        .collect();
    lockstep_synth::write_trail(root, ACCOUNT, &records, lockstep_synth::Faults::default()).map(drop)
}
