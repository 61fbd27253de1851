//! The rollout's state as the ledger records it: users, batches, the pause switch, finished
//! waves. Plain data with the few transitions that are legal; no I/O.
//!
//! A user lockstep promotes goes `promoting -> locked`; a rollback goes `rolling_back -> held`.
//! `promoting` and `rolling_back` are journaled intents: they are written before the IAM call,
//! so a restart knows what was under way. A batch goes `applying -> soaking -> succeeded`, or
//! ends `rolled_back`.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::Serialize;

named_enum!(
    /// Where one user stands. Users with no ledger row are candidates.
    UserState {
        /// Journaled into a batch; being added to the group.
        Promoting = "promoting",
        /// In the group: locked to the perimeter.
        Locked = "locked",
        /// Journaled for removal from the group by a rollback.
        RollingBack = "rolling_back",
        /// Out of the group and kept out until released or the hold lapses.
        Held = "held",
        /// Locked by lockstep, then taken out of the group by someone else: not re-added
        /// without an operator.
        RemovedByHand = "removed_by_hand",
    }
);

named_enum!(
    /// Where one batch stands.
    BatchState {
        /// Journaled; its members are being added to the group.
        Applying = "applying",
        /// Every member is in the group; the guard watches until the soak ends.
        Soaking = "soaking",
        /// Soaked without a spike.
        Succeeded = "succeeded",
        /// Taken back out of the group.
        RolledBack = "rolled_back",
    }
);

impl UserState {
    /// States in which lockstep wants the user in the lockdown group.
    pub fn wants_membership(self) -> bool {
        matches!(self, UserState::Promoting | UserState::Locked)
    }
}

impl BatchState {
    pub(crate) fn is_active(self) -> bool {
        matches!(self, BatchState::Applying | BatchState::Soaking)
    }
}

/// An IAM user as the planner needs it: the name, where it lives, and its tags.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct IamUser {
    /// The user name.
    pub name: String,
    /// The user's ARN.
    pub arn: String,
    /// The IAM path, for wave selection (`/engineering/`).
    pub path: String,
    /// The user's tags, for exemptions and wave selection.
    pub tags: BTreeMap<String, String>,
}

/// One user in the ledger: their state and the batch that promoted them.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Member {
    /// The user name.
    pub user: String,
    /// Where the user stands in the rollout.
    pub state: UserState,
    /// The batch that promoted them, if any.
    pub batch: Option<i64>,
    /// When the user entered this state.
    pub since: DateTime<Utc>,
    /// Why (a hold's or rollback's reason).
    pub reason: Option<String>,
    /// For held users: when the hold lapses (if the evidence is clean by then).
    pub hold_until: Option<DateTime<Utc>>,
}

/// A group of users promoted together and judged together.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Batch {
    /// The batch's ID, increasing.
    pub id: i64,
    /// The wave it belongs to.
    pub wave: String,
    /// Where the batch stands.
    pub state: BatchState,
    /// The users in the batch.
    pub members: Vec<String>,
    /// When the batch was journaled.
    pub created_at: DateTime<Utc>,
    /// How long the batch soaks, recorded when it started (`None` for batches journaled before
    /// lockstep recorded it).
    #[serde(skip)]
    pub soak: Option<chrono::Duration>,
    /// When the last member was added: the soak starts here.
    pub applied_at: Option<DateTime<Utc>>,
    /// When the soak ends and the batch may succeed.
    pub soak_until: Option<DateTime<Utc>>,
    /// When it succeeded or was rolled back.
    pub finished_at: Option<DateTime<Utc>>,
    /// The guard's last verdict and why, as shown to operators.
    pub verdict: Option<String>,
    /// The kind of that verdict, for code to match on.
    pub verdict_kind: Option<crate::guard::VerdictKind>,
}

/// Why, by whom and since when the rollout is paused.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
pub struct Pause {
    /// Why it was paused.
    pub reason: String,
    /// Who paused it: an operator or the guard.
    pub by: String,
    /// When.
    pub at: DateTime<Utc>,
}

/// Everything the ledger holds that decisions depend on.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Snapshot {
    /// Set while the rollout is paused: no batch starts.
    pub paused: Option<Pause>,
    /// Finished waves and when.
    pub waves_done: BTreeMap<String, DateTime<Utc>>,
    /// Every batch, oldest first.
    pub batches: Vec<Batch>,
    /// Every user the ledger knows, by name.
    pub members: BTreeMap<String, Member>,
    /// Members of the lockdown group lockstep did not add, since when it saw them: never
    /// planned, rolled back or removed.
    pub foreign: BTreeMap<String, DateTime<Utc>>,
    /// Users whose add lockstep journaled (since when) and has not yet seen land: the add may
    /// still reach IAM, so their presence in the group is lockstep's doing, never a hand's.
    pub adds_in_flight: BTreeMap<String, DateTime<Utc>>,
}

impl Snapshot {
    /// The batch with this id, if the ledger has it.
    pub fn batch(&self, id: i64) -> Option<&Batch> {
        self.batches.iter().find(|b| b.id == id)
    }

    pub(crate) fn active_batches(&self) -> impl Iterator<Item = &Batch> {
        self.batches.iter().filter(|b| b.state.is_active())
    }

    /// The ids of the applying and soaking batches: what a step or a refresh works for (logged
    /// in their spans).
    pub(crate) fn active_batch_ids(&self) -> Vec<i64> {
        self.active_batches().map(|b| b.id).collect()
    }

    /// Users promoted (journaled) in `[since, now]`, for the daily cap.
    pub(crate) fn promoted_since(&self, since: DateTime<Utc>) -> usize {
        self.batches.iter().filter(|b| b.created_at >= since).map(|b| b.members.len()).sum()
    }
}

/// One line of the append-only audit log.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AuditEntry {
    /// When it happened.
    pub at: DateTime<Utc>,
    /// `controller`, `dry-run`, or the operator's name.
    pub actor: String,
    /// What happened (`start_batch`, `rollback`, `hold`, ...).
    pub action: String,
    /// The batch it concerns, if any.
    pub batch: Option<i64>,
    /// The user it concerns, if any.
    pub user: Option<String>,
    /// Why.
    pub reason: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_names_round_trip() {
        for s in UserState::ALL {
            assert_eq!(UserState::from_name(s.as_str()), Some(*s));
        }
        for s in BatchState::ALL {
            assert_eq!(BatchState::from_name(s.as_str()), Some(*s));
        }
        assert_eq!(UserState::from_name("nonsense"), None);
    }

    #[test]
    fn only_promoting_and_locked_want_membership() {
        let wanted: Vec<_> = UserState::ALL.iter().filter(|s| s.wants_membership()).collect();
        assert_eq!(wanted, [&UserState::Promoting, &UserState::Locked]);
    }
}
