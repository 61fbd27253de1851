//! `lockstep policy [show|apply]`: print the rendered policy, or put it in place in IAM.

use std::process::ExitCode;

use lockstep::config::Config;
use lockstep::iam::{AwsIam, Iam, PolicyStatus};

pub fn show(config: &Config) -> anyhow::Result<ExitCode> {
    println!("{}", config.perimeter.policy().to_pretty_json()?);
    Ok(ExitCode::SUCCESS)
}

/// Without `commit`, says exactly what would change and changes nothing.
pub async fn apply(config: &Config, commit: bool) -> anyhow::Result<ExitCode> {
    let document = config.perimeter.policy().to_json()?;
    let sdk = lockstep::aws::load(&config.region, None).await;
    let iam = AwsIam::new(&sdk, &config.account_id);
    let (group, policy) = (&config.lockdown.group, &config.lockdown.policy_name);
    if commit {
        let changes = iam.apply_policy(group, policy, &document).await?;
        if changes.is_empty() {
            println!("nothing to change: {policy} is attached to {group} and matches rollout.yaml");
        }
        for change in changes {
            println!("{change}");
        }
        return Ok(ExitCode::SUCCESS);
    }
    let status = iam.policy_status(group, policy, &document).await?;
    let would = planned_changes(&status, group, policy);
    if would.is_empty() {
        println!("nothing to change: {policy} is attached to {group} and matches rollout.yaml");
    } else {
        println!("dry run, nothing changed; with --commit lockstep would:");
        for change in would {
            println!("  - {change}");
        }
        if let PolicyStatus::Drifted { current } = status {
            println!(
                "\ncurrent default version:\n{current}\n\nrendered from rollout.yaml:\n{}",
                config.perimeter.policy().to_pretty_json()?
            );
        }
    }
    Ok(ExitCode::SUCCESS)
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
