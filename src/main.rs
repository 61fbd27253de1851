//! The `lockstep` command line: parses arguments and hands each command to `cmd`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

mod cmd;

/// Lock leaked-credential risk out of AWS: a staged rollout of a network-perimeter Deny policy
/// to IAM users, driven by their CloudTrail evidence.
#[derive(Debug, Parser)]
#[command(name = "lockstep", version, about, long_about = None, propagate_version = true)]
pub struct Cli {
    /// Rollout configuration file.
    #[arg(short, long, global = true, default_value = "rollout.yaml", env = "LOCKSTEP_CONFIG")]
    pub config: PathBuf,

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
    let cli = Cli::parse();
    cmd::init_logging(cli.log_format);
    match cmd::run(cli) {
        Ok(code) => code,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}
