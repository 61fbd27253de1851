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
        Promoting = "promoting",
        Locked = "locked",
        RollingBack = "rolling_back",
        Held = "held",
        /// Locked by lockstep, then taken out of the group by someone else: not re-added
        /// without an operator.
        RemovedByHand = "removed_by_hand",
    }
);

named_enum!(BatchState {
    Applying = "applying",
    Soaking = "soaking",
    Succeeded = "succeeded",
    RolledBack = "rolled_back",
});

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
    pub name: String,
    pub arn: String,
    pub path: String,
    pub tags: BTreeMap<String, String>,
}

/// One user in the ledger: their state and the batch that promoted them.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Member {
    pub user: String,
    pub state: UserState,
    pub batch: Option<i64>,
    pub since: DateTime<Utc>,
    pub reason: Option<String>,
    /// For held users: when the hold lapses (if the evidence is clean by then).
    pub hold_until: Option<DateTime<Utc>>,
}

/// A group of users promoted together and judged together.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Batch {
    pub id: i64,
    pub wave: String,
    pub state: BatchState,
    pub members: Vec<String>,
    pub created_at: DateTime<Utc>,
    /// How long the batch soaks, recorded when it started (`None` for batches journaled before
    /// lockstep recorded it).
    #[serde(skip)]
    pub soak: Option<chrono::Duration>,
    /// When the last member was added: the soak starts here.
    pub applied_at: Option<DateTime<Utc>>,
    pub soak_until: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    /// The guard's last verdict and why, as shown to operators.
    pub verdict: Option<String>,
    /// The kind of that verdict, for code to match on.
    pub verdict_kind: Option<crate::guard::VerdictKind>,
}

/// Why, by whom and since when the rollout is paused.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
pub struct Pause {
    pub reason: String,
    pub by: String,
    pub at: DateTime<Utc>,
}

/// Everything the ledger holds that decisions depend on.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Snapshot {
    pub paused: Option<Pause>,
    /// Finished waves and when.
    pub waves_done: BTreeMap<String, DateTime<Utc>>,
    pub batches: Vec<Batch>,
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
    pub at: DateTime<Utc>,
    /// `controller`, `dry-run`, or the operator's name.
    pub actor: String,
    pub action: String,
    pub batch: Option<i64>,
    pub user: Option<String>,
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
