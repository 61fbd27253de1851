//! One `lockstep run --commit` daemon rolling out several accounts against the emulator, in real
//! time: account_id's own account with the default credentials and others reached through
//! `sts:AssumeRole` (moto keys IAM by the assumed role's account), each with its own trail in
//! the organisation-trail layout, its own store, group and metrics. A role STS refuses (the
//! fault proxy answers `AccessDenied`, as AWS does) blocks its account alone; a user name in two
//! accounts is two users; a single-account store stays its account's store once the file lists
//! several accounts, and a store is never opened for another account.

mod common;
mod emulated_cli;
mod faults;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use lockstep::clock::{Clock, SystemClock};
use lockstep::config::Access;
use lockstep::fleet::AccountSummary;
use lockstep::planner::Gate;
use lockstep::runtime::Status;
use lockstep_synth::{Faults, Identity, Origin, RecordSpec, write_trail};

const TOKEN: &str = "accounts-test-token";
/// The organisation whose trail delivers every account's files.
const ORG: &str = "o-a1b2c3d4e5";
/// The office: trusted by the perimeter.
const OFFICE: &str = "203.0.113.9";
/// Outside the perimeter.
const CAFE: &str = "192.0.2.77";

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// A child process killed when the test ends, however it ends.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Polls `check` until it gives a value, or fails the test after `limit` with `why()`.
fn eventually<T>(what: &str, limit: Duration, mut check: impl FnMut() -> Option<T>, why: impl Fn() -> String) -> T {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(value) = check() {
            return value;
        }
        assert!(Instant::now() < deadline, "timed out after {limit:?} waiting for {what}; {}", why());
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// One HTTP/1.0 request (never chunked), with the admin token: status code and body.
fn http(port: u16, method: &str, path: &str, body: &str) -> std::io::Result<(u16, String)> {
    let mut stream = TcpStream::connect(("127.0.0.1", port))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        stream,
        "{method} {path} HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\nAuthorization: Bearer {TOKEN}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer)?;
    let status = answer.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = answer.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    Ok((status, body))
}

/// Writes `records` of `account` under `root` as an organisation trail delivers them:
/// `AWSLogs/<org>/<account>/CloudTrail/<region>/YYYY/MM/DD/...`. Each file is written beside
/// the tree first and renamed into place, so a reader never sees half a file.
fn write_org_trail(root: &Path, account: &str, records: &[RecordSpec]) {
    let scratch = tempfile::tempdir_in(root.parent().unwrap()).unwrap();
    let written = write_trail(scratch.path(), account, records, Faults::default()).unwrap();
    for file in written.files {
        let relative = file.strip_prefix(scratch.path().join("AWSLogs")).unwrap();
        assert!(relative.starts_with(account), "{}", relative.display());
        let target = root.join("AWSLogs").join(ORG).join(relative);
        std::fs::create_dir_all(target.parent().unwrap()).unwrap();
        std::fs::rename(&file, &target).unwrap();
    }
}

/// Six clean days of calls from the office (every 6 hours), and calls minutes ago.
fn clean_history(account: &str, user: &str, now: DateTime<Utc>) -> Vec<RecordSpec> {
    let ago = (0..24).map(|i| chrono::Duration::hours(6 * i + 1)).chain([3, 2].map(chrono::Duration::minutes));
    ago.map(|ago| {
        RecordSpec::new(Identity::iam_user(account, user), now - ago, "ec2:DescribeInstances", Origin::ip(OFFICE))
    })
    .collect()
}

/// One user's place in an account: its name, and whether its history has a call from outside
/// the perimeter (which makes it ineligible).
#[derive(Clone)]
struct Member {
    account: &'static str,
    user: String,
    outside: bool,
}

impl Member {
    fn clean(account: &'static str, user: impl Into<String>) -> Member {
        Member { account, user: user.into(), outside: false }
    }

    fn outside(account: &'static str, user: impl Into<String>) -> Member {
        Member { account, user: user.into(), outside: true }
    }
}

/// Which accounts the file lists (none: a file without `accounts`).
fn accounts_section(accounts: &[&str]) -> String {
    if accounts.is_empty() {
        return String::new();
    }
    let list: String = accounts.iter().map(|id| format!("    - id: \"{id}\"\n")).collect();
    format!("accounts:\n  role: \"arn:aws:iam::{{account}}:role/lockstep-rollout\"\n  list:\n{list}")
}

/// An organisation's rollout: its folder, configuration, listeners, the emulator (through a
/// fault proxy) and IAM clients acting in each account.
struct Org {
    dir: tempfile::TempDir,
    prefix: String,
    config: PathBuf,
    admin: u16,
    metrics: u16,
    runtime: tokio::runtime::Runtime,
    proxy: faults::Proxy,
    base: aws_config::SdkConfig,
    heartbeat: Option<(Arc<AtomicBool>, std::thread::JoinHandle<()>)>,
}

impl Org {
    /// `refuse`: the account whose role STS refuses (through the proxy the daemon talks to).
    fn new(prefix: &str, refuse: Option<&'static str>) -> Org {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("trail")).unwrap();
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let fault = match refuse {
            Some(account) => faults::Fault::RefuseAssumeRole { account },
            None => faults::Fault::Throttle { times: 0 },
        };
        let proxy = runtime.block_on(faults::Proxy::start(&common::endpoint(), fault));
        let base = runtime.block_on(common::lockstep_sdk(&common::endpoint()));
        let config = dir.path().join("rollout.yaml");
        Org {
            dir,
            prefix: prefix.to_string(),
            config,
            admin: free_port(),
            metrics: free_port(),
            runtime,
            proxy,
            base,
            heartbeat: None,
        }
    }

    fn group(&self) -> String {
        format!("{}-lockdown", self.prefix)
    }

    /// Writes the configuration for `account_id`, listing `accounts` (none: no `accounts`).
    fn configure(&self, account_id: &str, accounts: &[&str]) {
        let dir = self.dir.path().display();
        let text = format!(
            r#"
account_id: "{account_id}"
region: us-east-1
{accounts}
lockdown: {{group: {group}, policy_name: {prefix}-perimeter}}
perimeter:
  trusted_vpcs: [vpc-0a1b2c3d]
  trusted_vpc_endpoints: {{vpce-0123456789abcdef0: vpc-0a1b2c3d}}
  trusted_cidrs: [203.0.113.0/24]
  exempt_tag_key: lockstep-exempt
evidence:
  source: files
  files: {{path: "{dir}/trail"}}
  schedule: "0 5 * * * *"
  lookback: 10d
  overlap: 1h
eligibility:
  window: 7d
  min_history: 3d
  min_calls: 10
  quiet_for: 2d
  max_evidence_age: 3h
  hold_expiry: 7d
waves:
  - {{name: canary, batch_size: 1, soak: 1s, batches: 1}}
  - {{name: rest, batch_size: 10, soak: 1s}}
rollout: {{max_promotions_per_day: 50, max_soaking_batches: 1}}
guard: {{source: files, poll: 1s, grace: 1m, window: 15m, min_affected_users: 1, min_denials: 3, silence_limit: 6h, delivery_lag: 0s}}
store: {{path: "{dir}/lockstep.db"}}
listeners: {{admin: "127.0.0.1:{admin}", metrics: "127.0.0.1:{metrics}", token_env: LOCKSTEP_ADMIN_TOKEN}}
"#,
            accounts = accounts_section(accounts),
            group = self.group(),
            prefix = self.prefix,
            admin = self.admin,
            metrics = self.metrics,
        );
        std::fs::write(&self.config, text).unwrap();
    }

    /// IAM acting in `account`: the default credentials in moto's own account, the account's
    /// role otherwise (straight to the emulator, which grants any role).
    fn iam(&self, account: &str) -> aws_sdk_iam::Client {
        let access = match account {
            common::ACCOUNT => Access::Default,
            _ => Access::AssumeRole {
                role_arn: format!("arn:aws:iam::{account}:role/lockstep-rollout"),
                external_id: None,
            },
        };
        let sdk = self.runtime.block_on(lockstep::aws::account_config(&self.base, &access)).unwrap();
        aws_sdk_iam::Client::new(&sdk)
    }

    /// Creates each member in its account's IAM and writes its history to the trail.
    fn populate(&self, members: &[Member]) {
        let now = SystemClock.now();
        for member in members {
            let iam = self.iam(member.account);
            self.runtime.block_on(iam.create_user().user_name(&member.user).path("/engineering/").send()).unwrap();
            let mut records = clean_history(member.account, &member.user, now);
            if member.outside {
                records.push(RecordSpec::new(
                    Identity::iam_user(member.account, &member.user),
                    now - chrono::Duration::hours(30),
                    "s3:ListBuckets",
                    Origin::ip(CAFE),
                ));
            }
            write_org_trail(&self.dir.path().join("trail"), member.account, &records);
        }
    }

    /// Keeps delivering a call every second in each of `accounts`, so the guard sees its
    /// source alive past every soak (a batch succeeds only once events past its soak arrived).
    fn start_heartbeat(&mut self, accounts: &[&'static str]) {
        let stop = Arc::new(AtomicBool::new(false));
        let (root, accounts, user) =
            (self.dir.path().join("trail"), accounts.to_vec(), format!("{}-heartbeat", self.prefix));
        let stopping = stop.clone();
        let thread = std::thread::spawn(move || {
            while !stopping.load(Ordering::SeqCst) {
                let now = SystemClock.now();
                for account in &accounts {
                    let record = RecordSpec::new(
                        Identity::iam_user(account, &user),
                        now,
                        "sts:GetCallerIdentity",
                        Origin::ip(OFFICE),
                    );
                    write_org_trail(&root, account, &[record]);
                }
                std::thread::sleep(Duration::from_secs(1));
            }
        });
        self.heartbeat = Some((stop, thread));
    }

    fn command(&self, args: &[&str], config: &Path) -> Command {
        let mut command = emulated_cli::lockstep(args, config, self.dir.path());
        command.env("AWS_ENDPOINT_URL", self.proxy.url()).env("LOCKSTEP_ADMIN_TOKEN", TOKEN);
        command
    }

    fn run(&self, args: &[&str]) -> Output {
        self.command(args, &self.config).output().unwrap()
    }

    fn daemon(&self) -> Running {
        let log = std::fs::File::create(self.dir.path().join("daemon.log")).unwrap();
        Running(
            self.command(&["run", "--commit"], &self.config)
                .env("LOCKSTEP_LOG", "info")
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .unwrap(),
        )
    }

    fn daemon_log(&self) -> String {
        let log = std::fs::read_to_string(self.dir.path().join("daemon.log")).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(40).collect();
        tail.into_iter().rev().collect::<Vec<_>>().join("\n")
    }

    /// `GET /v1/accounts`, once the daemon answers.
    fn accounts(&self) -> Option<Vec<AccountSummary>> {
        let (status, body) = http(self.admin, "GET", "/v1/accounts", "").ok()?;
        (status == 200).then(|| serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}")))
    }

    fn metrics_text(&self) -> String {
        http(self.metrics, "GET", "/metrics", "").map(|(_, body)| body).unwrap_or_default()
    }

    /// The members of the lockdown group in `account`'s IAM, sorted.
    fn group_members(&self, account: &str) -> Vec<String> {
        let iam = self.iam(account);
        let group = self.runtime.block_on(iam.get_group().group_name(self.group()).send()).unwrap();
        let mut users: Vec<String> = group.users().iter().map(|u| u.user_name().to_string()).collect();
        users.sort();
        users
    }

    /// `lockstep --account <account> status --json`.
    fn status_of(&self, account: &str) -> Status {
        let out = self.run(&["--account", account, "status", "--json"]);
        assert!(out.status.success(), "status of {account}: {}", text(&out.stderr));
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(&out.stdout)))
    }

    /// Waits until every account in `finished` has finished its rollout, and each in `blocked`
    /// is blocked; the summary then.
    fn wait_for(&self, finished: &[&str], blocked: &[&str], limit: Duration) -> Vec<AccountSummary> {
        let last = std::cell::RefCell::new(String::from("no answer yet"));
        eventually(
            "every account to finish or block",
            limit,
            || {
                let summary = self.accounts()?;
                *last.borrow_mut() = format!("{summary:#?}");
                let done = |id: &str| summary.iter().any(|a| a.account == id && a.gate == Some(Gate::Finished));
                let stuck = |id: &str| summary.iter().any(|a| a.account == id && a.blocked.is_some());
                (finished.iter().all(|id| done(id)) && blocked.iter().all(|id| stuck(id))).then_some(summary)
            },
            || format!("last /v1/accounts: {}\ndaemon log:\n{}", last.borrow(), self.daemon_log()),
        )
    }

    /// Policy in place in every reachable account (the refused one fails the command).
    fn apply_policy(&self) -> Output {
        self.run(&["policy", "apply", "--commit"])
    }
}

impl Drop for Org {
    fn drop(&mut self) {
        if let Some((stop, thread)) = self.heartbeat.take() {
            stop.store(true, Ordering::SeqCst);
            let _ = thread.join();
        }
    }
}

/// Runs `sql` on the SQLite file at `path` (Python's sqlite3: the tests do not link SQLite);
/// what it prints, one value a line.
fn sqlite(path: &Path, sql: &str) -> String {
    let script = "import sqlite3, sys\nc = sqlite3.connect(sys.argv[1])\n\
                  rows = c.execute(sys.argv[2]).fetchall()\nc.commit()\n\
                  print('\\n'.join(str(v) for r in rows for v in r))";
    let out = Command::new(common::python()).args(["-c", script]).arg(path).arg(sql).output().unwrap();
    assert!(out.status.success(), "{sql}: {}", text(&out.stderr));
    text(&out.stdout).trim().to_string()
}

/// The account a store is claimed by, if any.
fn store_owner(path: &Path) -> Option<String> {
    Some(sqlite(path, "SELECT account FROM store_account")).filter(|owner| !owner.is_empty())
}

fn summary_of<'a>(summary: &'a [AccountSummary], account: &str) -> &'a AccountSummary {
    summary.iter().find(|a| a.account == account).unwrap_or_else(|| panic!("no {account} in {summary:#?}"))
}

/// The line of `lockstep status` (of an organisation) for `account`.
fn line_of<'a>(table: &'a str, account: &str) -> &'a str {
    table.lines().find(|l| l.starts_with(account)).unwrap_or_else(|| panic!("no line for {account} in:\n{table}"))
}

#[test]
fn one_daemon_rolls_out_three_accounts_each_into_its_own_group() {
    const PAYMENTS: &str = "210987654321";
    const DATA: &str = "555566667777";
    let mut org = Org::new("acc3", None);
    let accounts = [common::ACCOUNT, PAYMENTS, DATA];
    org.configure(common::ACCOUNT, &accounts);
    let members: Vec<Member> = accounts
        .iter()
        .flat_map(|&account| {
            let tag = &account[..4];
            [Member::clean(account, format!("acc3-ann-{tag}")), Member::clean(account, format!("acc3-ben-{tag}"))]
        })
        .collect();
    org.populate(&members);
    let applied = org.apply_policy();
    assert!(applied.status.success(), "{}{}", text(&applied.stdout), text(&applied.stderr));
    org.start_heartbeat(&accounts);

    let _daemon = org.daemon();
    let summary = org.wait_for(&accounts, &[], Duration::from_secs(60));

    // Each account's users, and only they, are in that account's lockdown group.
    for account in accounts {
        let tag = &account[..4];
        let expected = vec![format!("acc3-ann-{tag}"), format!("acc3-ben-{tag}")];
        assert_eq!(org.group_members(account), expected, "the lockdown group of {account}");
        let line = summary_of(&summary, account);
        assert!(line.blocked.is_none(), "{line:?}");
        assert_eq!(line.users.get("locked"), Some(&2), "{line:?}");
        let status = org.status_of(account);
        assert_eq!(status.account, account);
        assert_eq!(status.gate, Some(Gate::Finished));
        let mut locked: Vec<String> = status.batches.iter().flat_map(|b| b.members.clone()).collect();
        locked.sort();
        assert_eq!(locked, expected, "{account}'s batches hold its own users");
        assert!(status.batches.iter().all(|b| b.state == "succeeded"), "{:?}", status.batches);
    }

    // `lockstep status` of the organisation: one line per account, each finished.
    let out = org.run(&["status"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let table = text(&out.stdout);
    for account in accounts {
        let line = line_of(&table, account);
        assert!(line.contains(" finished "), "{line}");
        // ... locked, soaking, candidate, batches (active), then the evidence's age ("4s ago").
        let columns: Vec<&str> = line.split_whitespace().collect();
        let n = columns.len();
        assert_eq!((columns[n - 6], columns[n - 3], columns[n - 1]), ("2", "0", "ago"), "two locked users: {line}");
    }
    assert!(!table.contains("BLOCKED"), "{table}");
    // Every account's own stores, beside account_id's.
    for account in [PAYMENTS, DATA] {
        assert!(org.dir.path().join(format!("lockstep-{account}.db")).exists(), "{account}'s store");
    }
    let metrics = org.metrics_text();
    for account in accounts {
        let series = format!("lockstep_account_blocked{{account=\"{account}\"}} 0");
        assert!(metrics.contains(&series), "{series} in:\n{metrics}");
    }

    // A call about one account must name it; pause and resume without one act in every account.
    let (code, answer) = http(org.admin, "GET", "/v1/status", "").unwrap();
    assert_eq!(code, 400, "{answer}");
    assert!(answer.contains("name one"), "{answer}");
    let (code, answer) =
        http(org.admin, "POST", "/v1/command", r#"{"command":"pause","operator":"kim","reason":"freeze"}"#).unwrap();
    assert_eq!(code, 200, "{answer}");
    assert_eq!(answer.matches("rollout paused").count(), 3, "{answer}");
    eventually(
        "every account paused",
        Duration::from_secs(20),
        || {
            let summary = org.accounts()?;
            summary.iter().all(|a| matches!(&a.gate, Some(Gate::Paused(why)) if why.contains("freeze"))).then_some(())
        },
        || format!("{:#?}", org.accounts()),
    );
    // `lockstep resume` without --account resumes every account, each answer under its ID.
    let resumed = org.run(&["resume", "--operator", "kim"]);
    let out = String::from_utf8_lossy(&resumed.stdout);
    assert!(resumed.status.success(), "{out}{}", String::from_utf8_lossy(&resumed.stderr));
    assert_eq!(out.matches("rollout resumed").count(), 3, "{out}");
    for account in accounts {
        assert!(out.contains(&format!("{account}:\n")), "{out}");
    }
    for account in accounts {
        assert!(org.status_of(account).paused.is_none(), "{account} resumed");
    }
}

#[test]
fn a_refused_role_blocks_its_account_alone_and_says_why() {
    const PAYMENTS: &str = "333344445555";
    const REFUSED: &str = "444455556666";
    let mut org = Org::new("accb", Some(REFUSED));
    let accounts = [common::ACCOUNT, PAYMENTS, REFUSED];
    org.configure(common::ACCOUNT, &accounts);
    let members: Vec<Member> = accounts
        .iter()
        .flat_map(|&account| {
            let tag = &account[..4];
            [Member::clean(account, format!("accb-ann-{tag}")), Member::clean(account, format!("accb-ben-{tag}"))]
        })
        .collect();
    org.populate(&members);
    let applied = org.apply_policy();
    assert!(!applied.status.success(), "the refused account fails policy apply");
    assert!(text(&applied.stderr).contains(&format!("1 of 3 accounts failed: {REFUSED}")), "{}", text(&applied.stderr));
    org.start_heartbeat(&accounts);

    let _daemon = org.daemon();
    let summary = org.wait_for(&[common::ACCOUNT, PAYMENTS], &[REFUSED], Duration::from_secs(60));

    let refused = summary_of(&summary, REFUSED);
    let blocked = refused.blocked.as_ref().unwrap();
    // STS's answer, as the proxy gave it (real STS names the caller and the role in it).
    assert!(blocked.reason.contains("AccessDenied"), "STS's reason: {blocked:?}");
    assert!(
        blocked.reason.contains("User is not authorized to perform: sts:AssumeRole (refused by the test proxy)"),
        "{blocked:?}"
    );
    assert_eq!(refused.users.get("locked").copied().unwrap_or(0), 0, "{refused:?}");
    for account in [common::ACCOUNT, PAYMENTS] {
        let tag = &account[..4];
        assert_eq!(org.group_members(account), vec![format!("accb-ann-{tag}"), format!("accb-ben-{tag}")]);
        assert!(summary_of(&summary, account).blocked.is_none());
    }

    // The same, per account and for the organisation.
    let status = org.status_of(REFUSED);
    assert_eq!(status.blocked.as_ref().map(|b| b.reason.clone()), Some(blocked.reason.clone()));
    let out = org.run(&["status"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let table = text(&out.stdout);
    println!("{table}");
    assert!(line_of(&table, REFUSED).contains("BLOCKED"), "{table}");
    assert!(line_of(&table, PAYMENTS).contains(" finished "), "{table}");
    assert!(line_of(&table, common::ACCOUNT).contains(" finished "), "{table}");
    assert!(
        table.lines().any(|l| l.starts_with(&format!("{REFUSED} blocked since")) && l.contains("AccessDenied")),
        "the reason, under the table:\n{table}"
    );

    let metrics = org.metrics_text();
    for (account, value) in [(REFUSED, 1), (PAYMENTS, 0), (common::ACCOUNT, 0)] {
        let series = format!("lockstep_account_blocked{{account=\"{account}\"}} {value}");
        assert!(metrics.contains(&series), "{series} in:\n{metrics}");
    }
    // Nothing was ever written to the refused account's IAM (its group was never even made).
    let iam = org.iam(REFUSED);
    assert!(org.runtime.block_on(iam.get_group().group_name(org.group()).send()).is_err());
}

#[test]
fn a_user_name_in_two_accounts_is_two_users() {
    const PAYMENTS: &str = "111122223333";
    const DATA: &str = "777788889999";
    let mut org = Org::new("acca", None);
    let accounts = [common::ACCOUNT, PAYMENTS, DATA];
    org.configure(common::ACCOUNT, &accounts);
    // alice is clean in account_id's account and in DATA; in PAYMENTS she called from outside.
    org.populate(&[
        Member::clean(common::ACCOUNT, "alice"),
        Member::outside(PAYMENTS, "alice"),
        Member::clean(PAYMENTS, "acca-bob"),
        Member::clean(DATA, "alice"),
    ]);
    let applied = org.apply_policy();
    assert!(applied.status.success(), "{}{}", text(&applied.stdout), text(&applied.stderr));
    org.start_heartbeat(&accounts);

    let _daemon = org.daemon();
    org.wait_for(&accounts, &[], Duration::from_secs(60));

    assert_eq!(org.group_members(common::ACCOUNT), vec!["alice"]);
    assert_eq!(org.group_members(DATA), vec!["alice"]);
    assert_eq!(org.group_members(PAYMENTS), vec!["acca-bob"], "PAYMENTS' alice is judged by her own calls");
    let (code, plan) = http(org.admin, "GET", &format!("/v1/plan?account={PAYMENTS}"), "").unwrap();
    assert_eq!(code, 200, "{plan}");
    let plan: lockstep::planner::Plan = serde_json::from_str(&plan).unwrap();
    let alice = format!("{:?}", plan.users.get("alice"));
    assert!(alice.contains(CAFE), "ineligible for her call from {CAFE}: {alice}");

    // Holding PAYMENTS' alice holds her there alone.
    let held = org.run(&["hold", &format!("{PAYMENTS}/alice"), "--reason", "laptop", "--operator", "kim"]);
    assert!(held.status.success(), "{}{}", text(&held.stdout), text(&held.stderr));
    assert_eq!(org.status_of(PAYMENTS).users.get("held"), Some(&1));
    let held = org.run(&["--account", DATA, "hold", &format!("{PAYMENTS}/alice")]);
    assert!(!held.status.success(), "two accounts named");
    assert!(
        text(&held.stderr).contains(&format!("--account {DATA} and the user {PAYMENTS}/alice name different accounts")),
        "{}",
        text(&held.stderr)
    );
    for account in [common::ACCOUNT, DATA] {
        let status = org.status_of(account);
        assert_eq!(status.users.get("held"), None, "{account}: {:?}", status.users);
        assert_eq!(status.users.get("locked"), Some(&1), "{account}: {:?}", status.users);
    }
    // Through the API, the account named in the user decides: account_id's alice is locked.
    let body = r#"{"command":"hold","operator":"kim","user":"123456789012/alice","reason":"x"}"#;
    let (code, answer) = http(org.admin, "POST", "/v1/command", body).unwrap();
    assert_eq!(code, 409, "{answer}");
    assert!(answer.contains("alice is locked in batch"), "{answer}");
    let body = format!(r#"{{"command":"release","operator":"kim","user":"{PAYMENTS}/alice"}}"#);
    let (code, answer) = http(org.admin, "POST", "/v1/command", &body).unwrap();
    assert_eq!(code, 200, "{answer}");
    assert_eq!(org.status_of(PAYMENTS).users.get("held"), None);
    assert_eq!(org.group_members(PAYMENTS), vec!["acca-bob"], "released, still ineligible");
    let body = r#"{"command":"hold","operator":"kim","user":"payments/alice","reason":"x"}"#;
    let (code, answer) = http(org.admin, "POST", "/v1/command", body).unwrap();
    assert_eq!(code, 400, "{answer}");
    assert!(answer.contains("write <12-digit account ID>/<IAM user name>"), "{answer}");
}

#[test]
fn a_single_account_store_stays_its_accounts_store_and_no_other_account_opens_it() {
    const PAYMENTS: &str = "666677778888";
    let org = Org::new("accm", None);
    // First the file without `accounts`: account_id's rollout, one step.
    org.configure(common::ACCOUNT, &[]);
    org.populate(&[Member::clean(common::ACCOUNT, "accm-ann"), Member::clean(PAYMENTS, "accm-pat")]);
    let applied = org.apply_policy();
    assert!(applied.status.success(), "{}", text(&applied.stderr));
    let once = org.run(&["run", "--once", "--commit"]);
    assert!(once.status.success(), "{}", text(&once.stderr));
    let before = org.status_of(common::ACCOUNT);
    assert_eq!(before.batches.len(), 1, "{:?}", before.batches);
    assert_eq!(before.batches[0].members, vec!["accm-ann"]);
    assert_eq!(org.group_members(common::ACCOUNT), vec!["accm-ann"]);
    let store = org.dir.path().join("lockstep.db");
    assert_eq!(store_owner(&store), Some(common::ACCOUNT.to_string()), "claimed by its first run");
    // As a store written before stores had owners (migrated, unclaimed): the next open claims it.
    sqlite(&store, "DELETE FROM store_account");
    assert_eq!(store_owner(&store), None);

    // Then the same file listing account_id and another account.
    org.configure(common::ACCOUNT, &[common::ACCOUNT, PAYMENTS]);
    let applied = org.apply_policy();
    assert!(applied.status.success(), "{}", text(&applied.stderr));
    let once = org.run(&["run", "--once", "--commit"]);
    assert!(once.status.success(), "{}", text(&once.stderr));
    let payments_store = org.dir.path().join(format!("lockstep-{PAYMENTS}.db"));
    assert_eq!(store_owner(&payments_store), Some(PAYMENTS.to_string()), "a new store for {PAYMENTS}");
    assert_eq!(store_owner(&store), Some(common::ACCOUNT.to_string()), "account_id keeps store.path");

    let after = org.status_of(common::ACCOUNT);
    assert_eq!(after.account, common::ACCOUNT);
    assert_eq!(
        after.batches.first().map(|b| (b.id, b.members.clone())),
        Some((before.batches[0].id, vec!["accm-ann".to_string()]))
    );
    let payments = org.status_of(PAYMENTS);
    assert_eq!(payments.batches.len(), 1, "{:?}", payments.batches);
    assert_eq!(payments.batches[0].members, vec!["accm-pat"], "its own users only");
    assert_eq!(org.group_members(PAYMENTS), vec!["accm-pat"]);
    let out = org.run(&["status"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let table = text(&out.stdout);
    // With the daemon down, each account's line is read from its own store: one batch each,
    // one locked user each.
    for account in [common::ACCOUNT, PAYMENTS] {
        let line: Vec<&str> = line_of(&table, account).split_whitespace().collect();
        assert_eq!(line[1..4], ["daemon", "down", "-"], "{table}");
        assert_eq!((line[4], line[7]), ("1", "1"), "locked users and batches: {table}");
    }

    // account_id changed, store.path not: the store is account_id's old account's, refused.
    let moved = org.dir.path().join("moved.yaml");
    let text_now = std::fs::read_to_string(&org.config).unwrap();
    let accounts_at = text_now.find("accounts:").unwrap();
    let lockdown_at = text_now.find("lockdown:").unwrap();
    let single = format!("{}{}", &text_now[..accounts_at], &text_now[lockdown_at..])
        .replace(&format!("account_id: \"{}\"", common::ACCOUNT), "account_id: \"999988887777\"");
    std::fs::write(&moved, single).unwrap();
    let refused = org.command(&["status"], &moved).output().unwrap();
    assert!(!refused.status.success(), "{}", text(&refused.stdout));
    let err = text(&refused.stderr);
    assert!(err.contains(&format!("holds account {}'s rollout, not account 999988887777's", common::ACCOUNT)), "{err}");
    let refused = org.command(&["run", "--once"], &moved).output().unwrap();
    assert!(!refused.status.success());
    assert!(text(&refused.stderr).contains("not account 999988887777's"), "{}", text(&refused.stderr));
    // And the store is untouched: still account_id's, with its batch.
    let again = org.status_of(common::ACCOUNT);
    assert_eq!(again.batches.first().map(|b| b.id), Some(before.batches[0].id));
}
