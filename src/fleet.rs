//! Every account of one daemon: one runtime ([`Shared`]) per account, each with its own
//! controller, store, IAM credentials and metrics, stepped one after another by one loop.
//!
//! Accounts share nothing but the loop, the HTTP listeners and the wake-up: a step that fails in
//! one account (a role that cannot be assumed, throttling, a store error) blocks that account
//! alone, with its reason in its status and `lockstep_account_blocked`, and the next account's
//! step runs as if nothing happened.

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

use crate::controller::{ControllerError, StepReport};
use crate::metrics;
use crate::planner::Gate;
use crate::rollout::BatchState;
use crate::runtime::{Blocked, Shared};

/// The daemon's accounts, in the configuration's order; never empty.
#[derive(Clone)]
pub struct Fleet {
    accounts: Arc<Vec<Shared>>,
    wake: Arc<Notify>,
}

/// An API or CLI call named no account, or one the daemon does not roll out.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AccountChoice {
    /// Several accounts, and the call did not say which.
    #[error("this daemon rolls out {0}: name one (?account=<id>, or --account)")]
    Needed(String),
    /// The account named is not one of the daemon's.
    #[error("account {given} is not one this daemon rolls out ({accounts})")]
    Unknown {
        /// The account named.
        given: String,
        /// The daemon's accounts, comma-separated.
        accounts: String,
    },
}

/// One account's step in a round of [`Fleet::step`].
#[derive(Debug)]
pub struct AccountStep {
    /// The account.
    pub account: String,
    /// How long its step took.
    pub took: std::time::Duration,
    /// Its report, or why it failed (the account is blocked until a step succeeds).
    pub outcome: Result<StepReport, ControllerError>,
}

/// One account in `lockstep status` of an organisation: the one-line summary's numbers.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AccountSummary {
    /// The account's ID.
    pub account: String,
    /// Why its steps fail, while they do.
    pub blocked: Option<Blocked>,
    /// The planner's gate at its last step.
    pub gate: Option<Gate>,
    /// The wave in progress.
    pub current_wave: Option<String>,
    /// Users by state (`locked`, `soaking`, `held`, `candidate`, ...).
    pub users: std::collections::BTreeMap<String, usize>,
    /// Batches soaking or being applied.
    pub active_batches: usize,
    /// When its evidence last refreshed successfully.
    pub evidence_last_success: Option<chrono::DateTime<chrono::Utc>>,
    /// When its last step ran.
    pub last_step: Option<chrono::DateTime<chrono::Utc>>,
}

impl Fleet {
    /// The fleet of `accounts` (built with [`Fleet::wake`] as their wake-up).
    pub fn new(accounts: Vec<Shared>, wake: Arc<Notify>) -> Fleet {
        Fleet { accounts: Arc::new(accounts), wake }
    }

    /// A fleet of one account (the single-account daemon, the sandbox of one account).
    pub fn one(shared: Shared) -> Fleet {
        let wake = shared.wake_handle();
        Fleet::new(vec![shared], wake)
    }

    /// The accounts' runtimes, in the configuration's order.
    pub fn accounts(&self) -> &[Shared] {
        &self.accounts
    }

    /// The account `account` names; with none named, the only one.
    pub fn account(&self, account: Option<&str>) -> Result<&Shared, AccountChoice> {
        let ids = || self.accounts.iter().map(Shared::account).collect::<Vec<_>>().join(", ");
        match account {
            Some(id) => self
                .accounts
                .iter()
                .find(|s| s.account() == id)
                .ok_or_else(|| AccountChoice::Unknown { given: id.to_string(), accounts: ids() }),
            None => match self.accounts.as_slice() {
                [only] => Ok(only),
                _ => Err(AccountChoice::Needed(ids())),
            },
        }
    }

    /// Resolves when an operator command for any account wants a step now.
    pub async fn woken(&self) {
        self.wake.notified().await;
    }

    /// One step of every account, one after another, each told what the others promoted in
    /// the last day (so `max_promotions_per_day` caps the organisation exactly: no two steps
    /// race for the same room); each account's outcome, in order. A failure is its account's
    /// alone.
    pub async fn step(&self) -> Vec<AccountStep> {
        let mut outcomes = Vec::with_capacity(self.accounts.len());
        for (i, shared) in self.accounts.iter().enumerate() {
            if self.accounts.len() > 1 {
                let mut elsewhere = Vec::new();
                for (j, other) in self.accounts.iter().enumerate() {
                    if j != i {
                        elsewhere.extend(other.recent_batches().await);
                    }
                }
                shared.set_promotions_elsewhere(elsewhere).await;
            }
            let started = std::time::Instant::now();
            let outcome = shared.step().await;
            outcomes.push(AccountStep { account: shared.account().to_string(), took: started.elapsed(), outcome });
        }
        outcomes
    }

    /// Ready once every account has tried a step and one has completed (a blocked account is
    /// an alert, not a reason to take the daemon out of service).
    pub async fn is_ready(&self) -> bool {
        let mut any = false;
        for shared in self.accounts.iter() {
            let done = shared.is_ready();
            if !done && shared.blocked().await.is_none() {
                return false;
            }
            any |= done;
        }
        any
    }

    /// Every account's series, each labelled with its account.
    pub fn render_metrics(&self) -> String {
        let all: Vec<_> = self.accounts.iter().map(|s| s.metrics().clone()).collect();
        metrics::render_accounts(&all)
    }

    /// The one-line summary of every account.
    pub async fn summary(&self) -> Result<Vec<AccountSummary>, ControllerError> {
        let mut out = Vec::with_capacity(self.accounts.len());
        for shared in self.accounts.iter() {
            out.push(summarize(shared.status().await?));
        }
        Ok(out)
    }
}

/// The summary line's numbers from an account's status.
pub fn summarize(status: crate::runtime::Status) -> AccountSummary {
    AccountSummary {
        active_batches: status
            .batches
            .iter()
            .filter(|b| [BatchState::Soaking.as_str(), BatchState::Applying.as_str()].contains(&b.state.as_str()))
            .count(),
        account: status.account,
        blocked: status.blocked,
        gate: status.gate,
        current_wave: status.current_wave,
        users: status.users,
        evidence_last_success: status.evidence.last_success,
        last_step: status.last_step,
    }
}
