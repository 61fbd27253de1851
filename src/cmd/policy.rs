//! `lockstep policy [show|apply]`: print each account's rendered policy, or put it in place in
//! IAM, account by account: an account that cannot be reached is reported and the others are
//! still shown or applied.

use std::process::ExitCode;

use aws_config::SdkConfig;
use lockstep::config::{Account, Config};
use lockstep::iam::{AwsIam, Iam, PolicyStatus};

/// Prints the policy document; with several accounts, one section per account.
pub fn show(config: &Config) -> anyhow::Result<ExitCode> {
    if let [only] = config.accounts.as_slice() {
        println!("{}", only.perimeter.policy().to_pretty_json()?);
        return Ok(ExitCode::SUCCESS);
    }
    for account in &config.accounts {
        println!("== {account} ==\n{}\n", account.perimeter.policy().to_pretty_json()?);
    }
    Ok(ExitCode::SUCCESS)
}

/// Without `commit`, says exactly what would change in each account and changes nothing. Fails
/// (after going through every account) if any account could not be reached or changed.
pub async fn apply(config: &Config, commit: bool) -> anyhow::Result<ExitCode> {
    let base = lockstep::aws::load(&config.region, None).await;
    let sections = config.accounts.len() > 1;
    let mut failed = Vec::new();
    for account in &config.accounts {
        if sections {
            println!("== {account} ==");
        }
        match apply_in(config, account, &base, commit).await {
            Ok(lines) => lines.iter().for_each(|line| println!("{line}")),
            Err(error) => {
                if sections {
                    println!("failed, nothing more done here: {error:#}");
                }
                eprintln!("error: {account}: {error:#}");
                failed.push(account.id.as_str());
            }
        }
        if sections {
            println!();
        }
    }
    if failed.is_empty() {
        return Ok(ExitCode::SUCCESS);
    }
    if sections {
        eprintln!("error: {} of {} accounts failed: {}", failed.len(), config.accounts.len(), failed.join(", "));
    }
    Ok(ExitCode::FAILURE)
}

/// One account: its credentials, then its group and policy; the lines to print.
async fn apply_in(config: &Config, account: &Account, base: &SdkConfig, commit: bool) -> anyhow::Result<Vec<String>> {
    let rendered = account.perimeter.policy();
    let document = rendered.to_json()?;
    let sdk = lockstep::aws::account_config(base, &account.access).await?;
    let iam = AwsIam::new(&sdk, &account.id);
    let (group, policy) = (&config.lockdown.group, &config.lockdown.policy_name);
    let in_place = format!("nothing to change: {policy} is attached to {group} and matches rollout.yaml");
    if commit {
        let changes = iam.apply_policy(group, policy, &document).await?;
        return Ok(if changes.is_empty() { vec![in_place] } else { changes });
    }
    let status = iam.policy_status(group, policy, &document).await?;
    let would = planned_changes(&status, group, policy);
    if would.is_empty() {
        return Ok(vec![in_place]);
    }
    let mut lines = vec!["dry run, nothing changed; with --commit lockstep would:".to_string()];
    lines.extend(would.into_iter().map(|change| format!("  - {change}")));
    if let PolicyStatus::Drifted { current } = status {
        lines.push(format!(
            "\ncurrent default version:\n{current}\n\nrendered from rollout.yaml:\n{}",
            rendered.to_pretty_json()?
        ));
    }
    Ok(lines)
}

fn planned_changes(status: &PolicyStatus, group: &str, policy: &str) -> Vec<String> {
    let create_group = format!("create group {group}");
    let create_policy = format!("create managed policy {policy} with the rendered document");
    let attach = format!("attach {policy} to {group}");
    match status {
        PolicyStatus::InPlace => vec![],
        PolicyStatus::GroupMissing => vec![create_group, create_policy, attach],
        PolicyStatus::PolicyMissing => vec![create_policy, attach],
        PolicyStatus::NotAttached => vec![attach],
        PolicyStatus::Drifted { .. } => vec![format!("make the rendered document the default version of {policy}")],
    }
}
