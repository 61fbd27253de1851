//! Command bodies: each loads what it needs, calls into the library, and prints.

use std::process::ExitCode;

use anyhow::Context;
use lockstep::config::Config;

use crate::{Cli, Command, LogFormat, PolicyAction};

mod classify;
pub mod evidence;
mod policy;
mod run;

pub fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("LOCKSTEP_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

pub fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Validate => validate(&cli.config),
        Command::Policy { action } => {
            let config = load(&cli.config)?;
            match action.unwrap_or(PolicyAction::Show) {
                PolicyAction::Show => policy::show(&config),
                PolicyAction::Apply { commit } => block_on(policy::apply(&config, commit)),
            }
        }
        Command::Run { commit, once, json } => {
            let config = load(&cli.config)?;
            block_on(run::run(config, run::Options { commit, once, json }))
        }
        Command::Evidence { command } => evidence::run(&load(&cli.config)?, command),
        Command::Classify { files, exempt } => {
            let config = load(&cli.config)?;
            classify::run(&config, &files, exempt.into_iter().collect())
        }
    }
}

/// Runs an async command body on a multi-threaded runtime.
pub fn block_on<T>(work: impl std::future::Future<Output = anyhow::Result<T>>) -> anyhow::Result<T> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?
        .block_on(work)
}

/// Loads and validates the configuration; every problem is in the error.
pub fn load(path: &std::path::Path) -> anyhow::Result<Config> {
    Config::load(path).with_context(|| format!("configuration {} is not usable", path.display()))
}

fn validate(path: &std::path::Path) -> anyhow::Result<ExitCode> {
    match Config::load(path) {
        Ok(config) => {
            let policy = config.perimeter.policy().to_json().map(|json| json.len());
            match policy {
                Ok(size) => {
                    println!(
                        "{}: valid ({} waves, {} trusted CIDRs, {} trusted VPCs, {} endpoints; policy {size} characters)",
                        path.display(),
                        config.waves.len(),
                        config.perimeter.trusted_cidrs.len(),
                        config.perimeter.trusted_vpcs.len(),
                        config.perimeter.trusted_endpoints.len(),
                    );
                    Ok(ExitCode::SUCCESS)
                }
                Err(too_large) => {
                    eprintln!("{}: perimeter: {too_large}", path.display());
                    Ok(ExitCode::FAILURE)
                }
            }
        }
        Err(error) => {
            eprintln!("{error}");
            Ok(ExitCode::FAILURE)
        }
    }
}
