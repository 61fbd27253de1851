//! AWS Organizations (edge): the active accounts `accounts.discover` asks for, with the OU each
//! sits in and its tags. Called with the default credentials (the management account, or a
//! delegated administrator) once, when a command that covers every account starts.

use std::collections::BTreeMap;

use aws_config::SdkConfig;
use aws_sdk_organizations::Client;
use aws_sdk_organizations::types::{Account, AccountStatus};

use crate::aws::error_message;
use crate::config::Discovered;

/// An Organizations call failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("AWS Organizations {operation} failed: {message}")]
pub struct DiscoveryError {
    /// The operation (`ListAccounts`, ...).
    pub operation: &'static str,
    /// The service's code and message, or why no answer came.
    pub message: String,
}

/// The active accounts directly in `ous` (`ListAccountsForParent`; OU or root IDs), or in the
/// whole organisation when `ous` is empty (`ListAccounts`, then `ListParents` for each account's
/// OU); each with its tags (`ListTagsForResource`). Every list is read to its last page.
pub async fn discover(sdk: &SdkConfig, ous: &[String]) -> Result<Vec<Discovered>, DiscoveryError> {
    let client = Client::new(sdk);
    let mut found = Vec::new();
    if ous.is_empty() {
        for account in list_accounts(&client, None).await? {
            let ou = parent_ou(&client, &account).await?;
            found.push((account, ou));
        }
    } else {
        for ou in ous {
            let direct = ou.starts_with("ou-").then(|| ou.clone());
            for account in list_accounts(&client, Some(ou)).await? {
                found.push((account, direct.clone()));
            }
        }
    }
    let mut discovered = Vec::with_capacity(found.len());
    for (account, ou) in found {
        let (Some(id), true) = (account.id(), account.status() == Some(&AccountStatus::Active)) else { continue };
        discovered.push(Discovered {
            id: id.to_string(),
            name: account.name().map(str::to_string),
            ou,
            tags: tags(&client, id).await?,
        });
    }
    Ok(discovered)
}

/// Every account of the organisation, or of one parent, page by page.
async fn list_accounts(client: &Client, parent: Option<&String>) -> Result<Vec<Account>, DiscoveryError> {
    let mut accounts = Vec::new();
    let mut token: Option<String> = None;
    loop {
        let page = match parent {
            None => client
                .list_accounts()
                .set_next_token(token.clone())
                .send()
                .await
                .map(|out| (out.accounts.unwrap_or_default(), out.next_token))
                .map_err(|e| DiscoveryError { operation: "ListAccounts", message: error_message(&e) })?,
            Some(parent) => client
                .list_accounts_for_parent()
                .parent_id(parent)
                .set_next_token(token.clone())
                .send()
                .await
                .map(|out| (out.accounts.unwrap_or_default(), out.next_token))
                .map_err(|e| DiscoveryError { operation: "ListAccountsForParent", message: error_message(&e) })?,
        };
        accounts.extend(page.0);
        token = page.1;
        if token.is_none() {
            return Ok(accounts);
        }
    }
}

/// The OU an account sits in directly (`None` under the root).
async fn parent_ou(client: &Client, account: &Account) -> Result<Option<String>, DiscoveryError> {
    let Some(id) = account.id() else { return Ok(None) };
    let parents = client
        .list_parents()
        .child_id(id)
        .send()
        .await
        .map_err(|e| DiscoveryError { operation: "ListParents", message: error_message(&e) })?;
    Ok(parents.parents().iter().filter_map(|p| p.id()).find(|p| p.starts_with("ou-")).map(str::to_string))
}

/// An account's tags, page by page.
async fn tags(client: &Client, account: &str) -> Result<BTreeMap<String, String>, DiscoveryError> {
    let mut tags = BTreeMap::new();
    let mut token: Option<String> = None;
    loop {
        let page = client
            .list_tags_for_resource()
            .resource_id(account)
            .set_next_token(token.clone())
            .send()
            .await
            .map_err(|e| DiscoveryError { operation: "ListTagsForResource", message: error_message(&e) })?;
        tags.extend(page.tags().iter().map(|t| (t.key().to_string(), t.value().to_string())));
        token = page.next_token;
        if token.is_none() {
            return Ok(tags);
        }
    }
}
