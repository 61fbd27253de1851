//! A user on the command line: `<account>/<name>`, or a plain name that one account's store
//! knows. IAM user names cannot contain `/`, so the split is never ambiguous.

use anyhow::{Context, bail};
use chrono::{DateTime, Utc};
use lockstep::clock::{Clock, SystemClock};
use lockstep::config::Config;
use lockstep::evidence::EvidenceStore;
use lockstep::store::{Ledger, Store};

/// A user as typed: the account, when the text names one, and the IAM user name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UserArg<'a> {
    /// The 12-digit account ID before the `/`, if any.
    pub account: Option<&'a str>,
    /// The IAM user name.
    pub name: &'a str,
}

/// Splits `<account>/<name>` (or takes a plain name); refuses an account that is not 12 digits,
/// an empty name, and a second `/`.
pub fn parse(text: &str) -> Result<UserArg<'_>, String> {
    let Some((account, name)) = text.split_once('/') else {
        return match text.is_empty() {
            true => Err("the user name is empty".to_string()),
            false => Ok(UserArg { account: None, name: text }),
        };
    };
    if account.len() != 12 || !account.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!(
            "user {text:?}: the part before `/` must be a 12-digit account ID (IAM user names cannot contain `/`)"
        ));
    }
    if name.is_empty() {
        return Err(format!("user {text:?} names no user after the account: write <account>/<name>"));
    }
    if name.contains('/') {
        return Err(format!("user {text:?}: an IAM user name cannot contain `/`; write <account>/<name>"));
    }
    Ok(UserArg { account: Some(account), name })
}

/// A user resolved to one account: that account's configuration view and the plain name.
#[derive(Debug)]
pub struct Resolved {
    /// The account's view ([`Config::for_account`]), or the configuration itself when it names
    /// one account.
    pub config: Config,
    /// The IAM user name, without the account.
    pub name: String,
    /// Whether the configuration names several accounts (output then names the account).
    pub qualified: bool,
}

impl Resolved {
    /// The user as output shows it: `<account>/<name>` when the configuration names several
    /// accounts, the plain name otherwise.
    pub fn label(&self) -> String {
        match self.qualified {
            true => format!("{}/{}", self.config.account_id, self.name),
            false => self.name.clone(),
        }
    }
}

/// The account `user` (as typed) is in, for `command`: the one it names, else `--account`
/// (`flag`), else the configuration's only account, else the one account whose store knows the
/// name (its ledger or its evidence); several or none is an error naming them.
pub fn resolve(config: &Config, flag: Option<&str>, user: &str, command: &str) -> anyhow::Result<Resolved> {
    let wanted = parse(user).map_err(anyhow::Error::msg)?;
    let qualified = config.is_multi_account();
    let name = wanted.name.to_string();
    let account = match (flag, wanted.account) {
        (Some(flag), Some(named)) if flag != named => {
            bail!("--account {flag} and the user {user} name different accounts: give the account once")
        }
        (_, Some(id)) | (Some(id), None) => id,
        (None, None) if !qualified => return Ok(Resolved { config: config.clone(), name, qualified }),
        (None, None) => return search(config, &name, command, SystemClock.now()),
    };
    Ok(Resolved { config: config.for_account(config.account(account)?), name, qualified })
}

/// The one account whose store knows `name`, searching every account's store.
fn search(config: &Config, name: &str, command: &str, now: DateTime<Utc>) -> anyhow::Result<Resolved> {
    let views = config.account_views();
    let mut found = Vec::new();
    for view in views.iter() {
        if knows(view, name, now)? {
            found.push(view);
        }
    }
    match found.as_slice() {
        [only] => {
            let account = config.account(&only.account_id)?;
            eprintln!("{name} is known in {account} alone: acting there");
            Ok(Resolved { config: (*only).clone(), name: name.to_string(), qualified: true })
        }
        [] => {
            let searched = views.iter().map(|v| v.account_id.as_str()).collect::<Vec<_>>().join(", ");
            bail!(
                "no account knows {name}: neither the ledger nor the evidence of accounts {searched} has it; name the account: `lockstep {command} <account>/{name}`"
            )
        }
        several => {
            let matches: Vec<String> = several.iter().map(|v| format!("{}/{name}", v.account_id)).collect();
            bail!(
                "{name} is in {} accounts: {}; name one, e.g. `lockstep {command} {}`",
                matches.len(),
                matches.join(", "),
                matches[0]
            )
        }
    }
}

/// Whether an account's store has `name` in its ledger or any of its evidence; a missing store
/// knows nobody (and is not created).
fn knows(view: &Config, name: &str, now: DateTime<Utc>) -> anyhow::Result<bool> {
    let path = &view.store.path;
    if !path.exists() {
        return Ok(false);
    }
    let store = Store::open_for_account(path, &view.account_id)
        .with_context(|| format!("opening the store {} of account {}", path.display(), view.account_id))?;
    if store.snapshot()?.members.contains_key(name) {
        return Ok(true);
    }
    Ok(store.evidence_of(name, DateTime::UNIX_EPOCH, now)?.is_some())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_user_may_name_its_account() {
        assert_eq!(parse("alice"), Ok(UserArg { account: None, name: "alice" }));
        assert_eq!(parse("111122223333/alice"), Ok(UserArg { account: Some("111122223333"), name: "alice" }));
        assert_eq!(
            parse("123456789012/svc+deploy=ci@x.y"),
            Ok(UserArg { account: Some("123456789012"), name: "svc+deploy=ci@x.y" })
        );
    }

    #[test]
    fn a_malformed_account_or_name_is_refused_with_why() {
        for (text, why) in [
            ("", "empty"),
            ("11112222333/alice", "12-digit account ID"),
            ("1111222233334/alice", "12-digit account ID"),
            ("payments/alice", "12-digit account ID"),
            ("11112222333x/alice", "12-digit account ID"),
            ("/alice", "12-digit account ID"),
            ("111122223333/", "names no user"),
            ("111122223333/team/alice", "cannot contain `/`"),
        ] {
            let error = parse(text).expect_err(text);
            assert!(error.contains(why), "{text}: {error}");
        }
    }
}
