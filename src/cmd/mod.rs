//! Command bodies: each loads what it needs, calls into the library, and prints.

use std::process::ExitCode;

use anyhow::Context;
use lockstep::api::Command as OpCommand;
use lockstep::config::{Access, Config};

use crate::{Cli, Command, LogFormat, PolicyAction};

mod backtest;
mod classify;
pub mod evidence;
mod exempt;
mod ops;
mod policy;
mod run;
pub(crate) mod sandbox;
mod user;
mod whatif;

/// Logs go to stderr; `LOCKSTEP_LOG` (an `EnvFilter` directive) overrides `default_level`, except
/// that the AWS SDK and its HTTP stack never log below info (see [`sdk_ceiling`]).
pub fn init_logging(format: LogFormat, default_level: &str) {
    use tracing_subscriber::Layer;
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let filter = tracing_subscriber::EnvFilter::try_from_env("LOCKSTEP_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    let layer = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let layer = match format {
        LogFormat::Text => layer.boxed(),
        LogFormat::Json => layer.json().boxed(),
    };
    tracing_subscriber::registry().with(layer.with_filter(filter).with_filter(sdk_ceiling())).init();
}

/// At debug and trace level the AWS SDK (`aws_*` targets: signing, the orchestrator, credential
/// providers) logs its resolved identity and whole requests, with the access key ID and the
/// session token, and its HTTP stack (`hyper*`, `h2`) the headers: those targets are capped at
/// info whatever `LOCKSTEP_LOG` asks.
fn sdk_ceiling() -> tracing_subscriber::filter::Targets {
    use tracing_subscriber::filter::LevelFilter;
    tracing_subscriber::filter::Targets::new()
        .with_default(LevelFilter::TRACE)
        .with_target("aws", LevelFilter::INFO)
        .with_target("hyper", LevelFilter::INFO)
        .with_target("h2", LevelFilter::INFO)
}

pub fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let account = cli.account.as_deref();
    match cli.command {
        Command::Validate => validate(&cli.config),
        Command::Policy { action } => {
            let config = load_accounts(&cli.config)?;
            match action.unwrap_or(PolicyAction::Show) {
                PolicyAction::Show => policy::show(&config),
                PolicyAction::Apply { commit } => block_on(policy::apply(&config, commit)),
            }
        }
        Command::Sandbox { dir, users, accounts, seed, pace, admin_port, metrics_port, json } => {
            let accounts = usize::from(accounts);
            block_on(sandbox::run(sandbox::Options {
                dir,
                users,
                accounts,
                seed,
                pace,
                admin_port,
                metrics_port,
                json,
            }))
        }
        Command::Status { json, watch: false, .. } if account.is_none() => {
            let config = load_accounts(&cli.config)?;
            match config.is_multi_account() {
                true => block_on(ops::accounts(&config, json)),
                false => block_on(ops::status(&config, json)),
            }
        }
        Command::Status { json, watch: false, .. } => {
            block_on(ops::status(&load(&cli.config, "status", account)?, json))
        }
        Command::Status { json, watch: true, interval } => {
            block_on(ops::watch(&load(&cli.config, "status", account)?, json, interval))
        }
        Command::Wait { target, timeout, interval } => {
            block_on(ops::wait(&load(&cli.config, "wait", account)?, &target, timeout, interval))
        }
        Command::Completions { shell } => crate::print_completions(shell),
        Command::Man => crate::print_man(),
        Command::Plan { json } => block_on(ops::plan(&load(&cli.config, "plan", account)?, json)),
        Command::Pause { reason, operator } => {
            brake(&cli.config, account, "pause", OpCommand::Pause { operator: operator.operator, reason })
        }
        Command::Resume { operator } => {
            brake(&cli.config, account, "resume", OpCommand::Resume { operator: operator.operator })
        }
        Command::Rollback { batch, reason, commit, operator } => operator_command(
            &cli.config,
            account,
            "rollback",
            OpCommand::Rollback { operator: operator.operator, batch, reason },
            commit,
        ),
        Command::Hold { user, reason, operator } => user_command(&cli.config, account, "hold", &user, |user| {
            OpCommand::Hold { operator: operator.operator, user, reason }
        }),
        Command::Release { user, operator } => user_command(&cli.config, account, "release", &user, |user| {
            OpCommand::Release { operator: operator.operator, user }
        }),
        Command::PromoteNext { operator } => operator_command(
            &cli.config,
            account,
            "promote-next",
            OpCommand::PromoteNext { operator: operator.operator },
            false,
        ),
        Command::Run { commit, once, json } => {
            let config = match account {
                Some(_) => load(&cli.config, "run", account)?,
                None => load_accounts(&cli.config)?,
            };
            block_on(run::run(config, run::Options { commit, once, json }))
        }
        Command::Exempt { user, until, reason, commit, operator } => {
            let user = user::resolve(&load_accounts(&cli.config)?, account, &user, "exempt")?;
            let account = user.qualified.then(|| user.config.account_id.clone());
            let request =
                exempt::Request { user: user.name, account, until, reason, operator: operator.operator, commit };
            block_on(exempt::exempt(&user.config, request))
        }
        Command::Exemptions { json } => block_on(exempt::list(&load(&cli.config, "exemptions", account)?, json)),
        Command::Backtest { since, until, resume_after, json, html } => backtest::run(
            &load(&cli.config, "backtest", account)?,
            backtest::Options { since, until, resume_after, json, html },
        ),
        Command::Evidence { command } => evidence::run(&load_accounts(&cli.config)?, account, command),
        Command::Whatif { against, json } => {
            block_on(whatif::run(&cli.config, &load(&cli.config, "whatif", account)?, &against, account, json))
        }
        Command::Classify { files, exempt } => {
            // Only the perimeter matters here: a file without waves (or a full one) will do.
            let perimeter = Config::load_perimeter(&cli.config, "classify", account)
                .with_context(|| format!("configuration {} is not usable", cli.config.display()))?;
            classify::run(&perimeter, &files, exempt.into_iter().collect())
        }
    }
}

fn operator_command(
    config: &std::path::Path,
    account: Option<&str>,
    name: &str,
    command: OpCommand,
    commit: bool,
) -> anyhow::Result<ExitCode> {
    let config = load(config, name, account)?;
    block_on(ops::command(&config, command, commit))
}

/// `pause` and `resume`: in the account `--account` names, or, for a file naming several and no
/// `--account`, in every account (the brake an operator reaches for first), each account's answer
/// under its ID; fails if any account refused or failed.
fn brake(path: &std::path::Path, account: Option<&str>, name: &str, command: OpCommand) -> anyhow::Result<ExitCode> {
    let config = load_accounts(path)?;
    if account.is_some() || !config.is_multi_account() {
        return block_on(ops::command(&view(&config, name, account)?, command, false));
    }
    let mut outcome = ExitCode::SUCCESS;
    for view in config.account_views() {
        println!("{}:", view.account_id);
        match block_on(ops::command(&view, command.clone(), false)) {
            Ok(code) if code == ExitCode::SUCCESS => {}
            Ok(_) => outcome = ExitCode::FAILURE,
            Err(error) => {
                eprintln!("error: account {}: {error:#}", view.account_id);
                outcome = ExitCode::FAILURE;
            }
        }
    }
    Ok(outcome)
}

/// An operator command about one user (`<account>/<name>` or a plain name), in that user's
/// account.
fn user_command(
    config: &std::path::Path,
    account: Option<&str>,
    name: &str,
    user: &str,
    command: impl FnOnce(String) -> OpCommand,
) -> anyhow::Result<ExitCode> {
    let user = user::resolve(&load_accounts(config)?, account, user, name)?;
    block_on(ops::command(&user.config, command(user.name), false))
}

/// Runs an async command body on a multi-threaded runtime.
pub fn block_on<T>(work: impl std::future::Future<Output = anyhow::Result<T>>) -> anyhow::Result<T> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?
        .block_on(work)
}

/// Loads and validates the configuration for `command`, which handles one account: every
/// problem is in the error, and so is the refusal of a configuration naming several accounts.
pub fn load(path: &std::path::Path, command: &str, account: Option<&str>) -> anyhow::Result<Config> {
    view(&load_accounts(path)?, command, account)
}

/// The view of `config` for `command`, which handles one account: `account`'s, or the
/// configuration itself when it names one account (otherwise the refusal).
pub fn view(config: &Config, command: &str, account: Option<&str>) -> anyhow::Result<Config> {
    match account {
        Some(id) => Ok(config.for_account(config.account(id)?)),
        None => Ok(config.single_account(command)?.clone()),
    }
}

/// Loads and validates the configuration, however many accounts it names (`run`, `policy`,
/// `status`), with the accounts `accounts.discover` asks AWS Organizations for added.
fn load_accounts(path: &std::path::Path) -> anyhow::Result<Config> {
    let config = Config::load(path).with_context(|| format!("configuration {} is not usable", path.display()))?;
    match config.discovery {
        None => Ok(config),
        // On a thread of its own: a runtime cannot be started inside another.
        Some(_) => std::thread::scope(|scope| {
            scope
                .spawn(|| block_on(discover(&config)))
                .join()
                .unwrap_or_else(|_| Err(anyhow::anyhow!("account discovery stopped unexpectedly")))
        }),
    }
}

/// `config` with the accounts AWS Organizations lists (`accounts.discover`), read with the default
/// credentials.
async fn discover(config: &Config) -> anyhow::Result<Config> {
    let Some(discovery) = &config.discovery else { return Ok(config.clone()) };
    let sdk = lockstep::aws::load(&config.region, None).await;
    let found = lockstep::organizations::discover(&sdk, &discovery.ous)
        .await
        .context("discovering the accounts (accounts.discover); the default credentials need organizations:ListAccounts, ListAccountsForParent, ListParents and ListTagsForResource")?;
    let discovered = config.with_discovered(found)?;
    tracing::info!(
        accounts = discovered.accounts.len(),
        ids = %discovered.accounts.iter().map(|a| a.id.as_str()).collect::<Vec<_>>().join(","),
        "accounts discovered through AWS Organizations"
    );
    Ok(discovered)
}

fn validate(path: &std::path::Path) -> anyhow::Result<ExitCode> {
    match Config::load(path) {
        Ok(config) => {
            // Loading refuses a policy over the size limit, so this always renders.
            let size = config.perimeter.policy().to_json().map(|json| json.len()).unwrap_or(0);
            println!(
                "{}: valid ({} waves, {} trusted CIDRs, {} trusted VPCs, {} endpoints; policy {size} characters)",
                path.display(),
                config.waves.len(),
                config.perimeter.trusted_cidrs.len(),
                config.perimeter.trusted_vpcs.len(),
                config.perimeter.trusted_endpoints.len(),
            );
            if let Some(discovery) = &config.discovery {
                let scope = match discovery.ous.as_slice() {
                    [] => "every active account of the organisation".to_string(),
                    ous => format!("the active accounts in {}", ous.join(", ")),
                };
                println!("  accounts.discover: {scope}, listed through AWS Organizations when a command starts");
            }
            if config.single_account("validate").is_err() {
                for account in &config.accounts {
                    let size = account.perimeter.policy().to_json().map(|json| json.len()).unwrap_or(0);
                    let access = match &account.access {
                        Access::Default => "default credentials".to_string(),
                        Access::AssumeRole { role_arn, .. } => format!("role {role_arn}"),
                    };
                    println!("  {account}: {access}; policy {size} characters");
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Err(error) => {
            eprintln!("{error}");
            Ok(ExitCode::FAILURE)
        }
    }
}
