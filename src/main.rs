//! The `lockstep` command line: parses arguments and hands each command to `cmd`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand, ValueEnum};

mod cmd;

/// Lock leaked-credential risk out of AWS: a staged rollout of a network-perimeter Deny policy
/// to IAM users, driven by their CloudTrail evidence.
#[derive(Debug, Parser)]
#[command(name = "lockstep", version, about, long_about = None, propagate_version = true)]
pub struct Cli {
    /// Rollout configuration file.
    #[arg(short, long, global = true, default_value = "rollout.yaml", env = "LOCKSTEP_CONFIG")]
    pub config: PathBuf,

    /// The account a command acts in (its 12-digit ID), when the configuration names several.
    ///
    /// `run` and `policy` always cover every account (`accounts`); `status` and `evidence list`
    /// without it show every account; a command naming a user may name the account in the user
    /// instead (`111122223333/alice`).
    #[arg(long, global = true, env = "LOCKSTEP_ACCOUNT", value_name = "ID")]
    pub account: Option<String>,

    /// Log line format on stderr.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Check the configuration and report every problem with its file, line and column.
    Validate,
    /// Print the IAM policy rendered from the perimeter, or put it in place.
    Policy {
        #[command(subcommand)]
        action: Option<PolicyAction>,
    },
    /// Run the rollout controller: promote eligible users in waves, guard, roll back.
    ///
    /// Without --commit this is a dry run: every step plans and reports (and records in the
    /// audit log) what it would do, and nothing is written to IAM.
    Run {
        /// Make IAM changes.
        #[arg(long)]
        commit: bool,
        /// Run one step and exit.
        #[arg(long)]
        once: bool,
        /// Print each step's report as a JSON line on stdout.
        #[arg(long)]
        json: bool,
    },
    /// Run the whole loop on one machine with no AWS account: a generated organisation of
    /// several accounts, real evidence from one organisation trail, a rollout per account with
    /// waves, the guard and a rollback, against a LOCAL STAND-IN for each account's IAM group.
    ///
    /// Writes its configuration, trail files and one store per account under --dir; /metrics
    /// and the admin API are live while it runs. Ends with a summary, one line per account.
    Sandbox {
        /// Where to put the run (must not hold an earlier run).
        #[arg(long, default_value = "sandbox-run")]
        dir: PathBuf,
        /// Generated IAM users in all, shared out between the accounts.
        #[arg(long, default_value_t = 40)]
        users: usize,
        /// Accounts in the generated organisation, each rolled out by its own controller.
        #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u16).range(1..=cmd::sandbox::MAX_ACCOUNTS as i64))]
        accounts: u16,
        /// Seed for the generated organisation.
        #[arg(long, default_value_t = 7)]
        seed: u64,
        /// Real time between 10-minute steps of virtual time (e.g. 50ms to watch, 0 to race).
        #[arg(long, default_value = "20ms", value_parser = humantime::parse_duration)]
        pace: std::time::Duration,
        #[arg(long, default_value_t = 9440)]
        admin_port: u16,
        #[arg(long, default_value_t = 9441)]
        metrics_port: u16,
        /// Print the summary as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show the rollout: state, current wave, batches with soak left and guard verdict, users.
    ///
    /// Asks the daemon; when it is down, shows the ledger from the store.
    Status {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
        /// Redraw every --interval until interrupted (on a terminal, in place; otherwise one
        /// snapshot after another, separated by a line).
        #[arg(short, long)]
        watch: bool,
        /// Time between redraws with --watch.
        #[arg(long, default_value = "2s", value_parser = lockstep::config::parse_duration, requires = "watch")]
        interval: std::time::Duration,
    },
    /// Block until the rollout reaches a state: a gate for CI jobs and scripts.
    ///
    /// Exits 0 when the state is reached, 1 on timeout, 2 when the guard pauses the rollout
    /// while waiting for something else.
    Wait {
        /// `finished` (every wave done), `paused` (by anyone), or `wave=NAME` (NAME is the
        /// current wave, or a later one, or the rollout is finished).
        #[arg(long = "for", value_name = "STATE", value_parser = parse_wait_target)]
        target: WaitTarget,
        /// Give up (exit 1) after this long.
        #[arg(long, default_value = "2h", value_parser = lockstep::config::parse_duration)]
        timeout: std::time::Duration,
        /// Time between looks at the rollout.
        #[arg(long, default_value = "2s", value_parser = lockstep::config::parse_duration)]
        interval: std::time::Duration,
    },
    /// Show what the next batch would be and why each user is or is not eligible. Changes nothing.
    Plan {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Pause the rollout: no new batches; the guard keeps watching soaking batches.
    Pause {
        /// Why, for the audit log.
        #[arg(long, default_value = "paused by an operator")]
        reason: String,
        #[command(flatten)]
        operator: Operator,
    },
    /// Resume a paused rollout.
    Resume {
        #[command(flatten)]
        operator: Operator,
    },
    /// Roll a batch back: remove its members from the group and hold them.
    ///
    /// Works on any batch lockstep applied, soaking or succeeded. When the daemon is down the
    /// rollback is done directly against the store and IAM, and then needs --commit.
    Rollback {
        /// The batch number (see `lockstep status`).
        batch: i64,
        /// Why, for the audit log.
        #[arg(long, default_value = "rolled back by an operator")]
        reason: String,
        /// With the daemon down: make the IAM changes (otherwise shows what would change).
        #[arg(long)]
        commit: bool,
        #[command(flatten)]
        operator: Operator,
    },
    /// Keep a user out of the rollout until released.
    Hold {
        #[arg(help = USER_HELP, long_help = USER_LONG_HELP)]
        user: String,
        /// Why, for the audit log.
        #[arg(long, default_value = "held by an operator")]
        reason: String,
        #[command(flatten)]
        operator: Operator,
    },
    /// Make a held (or removed-by-hand) user a candidate again.
    Release {
        #[arg(help = USER_HELP, long_help = USER_LONG_HELP)]
        user: String,
        #[command(flatten)]
        operator: Operator,
    },
    /// Start the next batch now, without waiting for soaking batches; eligibility still applies.
    PromoteNext {
        #[command(flatten)]
        operator: Operator,
    },
    /// Exempt a user from the perimeter until a given end: sets the exemption tag with its end
    /// and reason in IAM and records who did it in the ledger and the audit log.
    ///
    /// Without --commit, prints exactly what would change. When the exemption ends, the daemon
    /// (with --commit) removes the tags and the user is judged like anyone else.
    Exempt {
        #[arg(help = USER_HELP, long_help = USER_LONG_HELP)]
        user: String,
        /// When it ends: a date (00:00 UTC that day), an RFC 3339 time, or a duration from now (`30d`).
        #[arg(long)]
        until: String,
        /// Why (also a tag: letters, digits, spaces and `_.:/=+-@`, at most 256 characters).
        #[arg(long)]
        reason: String,
        /// Write the tags in IAM and the record in the ledger.
        #[arg(long)]
        commit: bool,
        #[command(flatten)]
        operator: Operator,
    },
    /// List exempt users with their end, time left, reason and who granted it; flags exemptions
    /// with no expiry (set by hand).
    Exemptions {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Refresh the evidence now, and show what it says about users' networks.
    Evidence {
        #[command(subcommand)]
        command: cmd::evidence::EvidenceCommand,
    },
    /// Judge CloudTrail records against the perimeter; prints one JSON line per record.
    ///
    /// Reads `{"Records": [...]}` trail files, bare JSON arrays of records, and one record per
    /// line, plain or gzip-compressed; directories are read recursively. Malformed files and
    /// records are reported on stderr and skipped.
    Classify {
        /// Trail files or directories.
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// Treat this user as carrying the exemption tag (repeatable): trail records carry no tags.
        #[arg(long = "exempt", value_name = "USER")]
        exempt: Vec<String>,
    },
    /// Show what a candidate configuration would change, changing nothing: the policy diff, who
    /// becomes eligible and who stops being eligible, and the calls that make the difference.
    ///
    /// --config names the CANDIDATE file; --against names the configuration in force, whose
    /// store is copied (opened read-only) and re-judged under each. IAM is only read.
    Whatif {
        /// The configuration in force.
        #[arg(long, default_value = "rollout.yaml")]
        against: PathBuf,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Replay the configured rollout over the stored evidence in virtual time, as if it had
    /// started at --since. Changes nothing: reads the store, never IAM.
    ///
    /// Reports when each batch would have started, who would have been locked, every call from
    /// outside the perimeter that would then have hit a locked user (a rollback during soak or a
    /// breakage after, with the guard's verdict), and coverage per day.
    Backtest {
        /// When the replayed rollout starts: an RFC 3339 time, a duration ago (60d), or `now`.
        #[arg(long, value_name = "TIME", default_value = "60d", value_parser = cmd::evidence::parse_time)]
        since: cmd::evidence::TimeArg,
        /// When the replay ends, same forms as --since.
        #[arg(long, value_name = "TIME", default_value = "now", value_parser = cmd::evidence::parse_time)]
        until: cmd::evidence::TimeArg,
        /// After the guard pauses the rollout, resume it as an operator would after this long
        /// (default: never).
        #[arg(long, value_name = "DURATION", value_parser = lockstep::config::parse_duration)]
        resume_after: Option<std::time::Duration>,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
        /// Also write a self-contained HTML report (chart and figures) to FILE.
        #[arg(long, value_name = "FILE")]
        html: Option<PathBuf>,
    },
    /// Print a shell completion script (e.g. `lockstep completions bash > /etc/bash_completion.d/lockstep`).
    Completions {
        #[arg(value_enum)]
        shell: CompletionShell,
    },
    /// Print the manual page in roff (e.g. `lockstep man | man -l -`).
    Man,
}

/// The short help of every command's user argument.
pub const USER_HELP: &str = "The IAM user: NAME, or ACCOUNT/NAME (its 12-digit account ID first)";

/// The long help (`--help`) of every command's user argument.
pub const USER_LONG_HELP: &str = "The IAM user: NAME, or ACCOUNT/NAME (its 12-digit account ID first) when the \
configuration names several accounts. A plain NAME acts in --account, or else in the one account whose store \
knows the user (its ledger or its evidence); when several do, the error lists them as ACCOUNT/NAME.";

/// What `lockstep wait` waits for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WaitTarget {
    Finished,
    Paused,
    Wave(String),
}

fn parse_wait_target(text: &str) -> Result<WaitTarget, String> {
    match text {
        "finished" => Ok(WaitTarget::Finished),
        "paused" => Ok(WaitTarget::Paused),
        _ => match text.strip_prefix("wave=") {
            Some(name) if !name.is_empty() => Ok(WaitTarget::Wave(name.to_string())),
            _ => Err(format!("expected finished, paused or wave=NAME, got {text:?}")),
        },
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum CompletionShell {
    Bash,
    Zsh,
    Fish,
}

/// Writes the completion script for `shell`, generated from the clap definition, to stdout.
pub fn print_completions(shell: CompletionShell) -> anyhow::Result<ExitCode> {
    use clap_complete::Shell;
    let shell = match shell {
        CompletionShell::Bash => Shell::Bash,
        CompletionShell::Zsh => Shell::Zsh,
        CompletionShell::Fish => Shell::Fish,
    };
    clap_complete::generate(shell, &mut Cli::command(), "lockstep", &mut std::io::stdout());
    Ok(ExitCode::SUCCESS)
}

/// Writes the man page, generated from the clap definition, to stdout.
pub fn print_man() -> anyhow::Result<ExitCode> {
    clap_mangen::Man::new(Cli::command()).render(&mut std::io::stdout())?;
    Ok(ExitCode::SUCCESS)
}

/// Who is acting, for the audit log.
#[derive(Debug, Clone, clap::Args)]
pub struct Operator {
    /// Your name, recorded in the audit log.
    #[arg(long, env = "LOCKSTEP_OPERATOR", default_value_t = default_operator())]
    pub operator: String,
}

fn default_operator() -> String {
    std::env::var("USER").unwrap_or_else(|_| "operator".to_string())
}

#[derive(Debug, Subcommand)]
pub enum PolicyAction {
    /// Print the policy document (the default).
    Show,
    /// Create the lockdown group and managed policy, make the rendered document its default
    /// version, attach it. Without --commit, shows what would change.
    Apply {
        /// Make the changes.
        #[arg(long)]
        commit: bool,
    },
}

fn main() -> ExitCode {
    bound_allocator_retention();
    let cli = Cli::parse();
    if matches!(cli.command, Command::Run { .. } | Command::Sandbox { .. }) {
        give_back_freed_memory_periodically();
    }
    // The sandbox narrates on its own; its per-user audit lines would drown that.
    let default_level = if matches!(cli.command, Command::Sandbox { .. }) { "warn" } else { "info" };
    cmd::init_logging(cli.log_format, default_level);
    match cmd::run(cli) {
        Ok(code) => code,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// glibc raises its mmap and trim thresholds as large blocks are freed, after which the
/// multi-megabyte buffers of trail files stay resident in the worker threads' heaps: a 60-user
/// sandbox peaked at 1.1 GB instead of about 150 MB (README, Memory). A fixed trim threshold gives
/// freed memory back and keeps the thresholds from moving. An operator's `MALLOC_TRIM_THRESHOLD_`
/// wins.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn bound_allocator_retention() {
    const TRIM_THRESHOLD: libc::c_int = 128 * 1024;
    if std::env::var_os("MALLOC_TRIM_THRESHOLD_").is_none() {
        // SAFETY: `mallopt` only sets allocator parameters; it runs before any other thread exists.
        unsafe {
            libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD);
        }
    }
}

/// How often a long-running command gives freed heap memory back to the system.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const TRIM_EVERY: std::time::Duration = std::time::Duration::from_secs(30);

/// The trim threshold only shortens a heap at its top. Free pages between live blocks (most of
/// a worker thread's heap after a refresh freed its batch) stay resident until `malloc_trim`
/// gives every free page back, which a background thread does every [`TRIM_EVERY`].
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn give_back_freed_memory_periodically() {
    let spawned = std::thread::Builder::new().name("malloc-trim".to_string()).spawn(|| {
        loop {
            std::thread::sleep(TRIM_EVERY);
            // SAFETY: `malloc_trim` takes the allocator's own locks; any thread may call it.
            unsafe {
                libc::malloc_trim(0);
            }
        }
    });
    if let Err(error) = spawned {
        eprintln!("warning: freed memory is not given back periodically: {error}");
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn bound_allocator_retention() {}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn give_back_freed_memory_periodically() {}
