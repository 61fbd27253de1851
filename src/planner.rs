//! The planner: a pure function from configuration, ledger, evidence, guard verdicts and `now`
//! to the next actions, with a readable reason for everything it does and does not do.
//!
//! It never guesses. Missing or stale evidence closes the gate (`inconclusive`): no promotions
//! at all until a refresh succeeds. A batch succeeds only when its soak is over *and* the guard
//! calls it healthy. Users are chosen deterministically: most applicable calls first (the users
//! the evidence knows best), then by name.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;

use rayon::prelude::*;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::config::{Config, Selector, Wave};
use crate::duration::{Elapsed, chrono_of, elapsed as human};
use crate::evidence::{Freshness, UserEvidence};
use crate::guard;
use crate::rollout::IamUser;
use crate::rollout::{BatchState, Snapshot, UserState};

/// Everything one planning decision reads: config, ledger, directory, evidence and `now`.
pub struct Inputs<'a> {
    /// The validated configuration.
    pub config: &'a Config,
    /// The ledger as read at the start of the step.
    pub ledger: &'a Snapshot,
    /// The IAM users, with paths and tags.
    pub users: &'a [IamUser],
    /// Evidence over `eligibility.window` ending at `now`.
    pub evidence: &'a [UserEvidence],
    /// How current the evidence is.
    pub freshness: Freshness,
    /// The guard's latest verdict for each batch it watches.
    pub verdicts: &'a BTreeMap<i64, guard::Verdict>,
    /// Why promotions cannot start (the lockdown policy is missing or drifted: adding users
    /// would not lock them, or lock them with something else); rollbacks and successes still
    /// proceed.
    pub blocked: Option<&'a str>,
    /// The time of the decision.
    pub now: DateTime<Utc>,
    /// An operator asked for the next batch now: skip the soaking-batch cap, nothing else.
    pub promote_now: bool,
    /// Users the configuration's other accounts promoted in the last 24 hours: they count
    /// against `rollout.max_promotions_per_day`, which caps the whole organisation.
    pub promoted_elsewhere: usize,
}

/// Whether new batches may start.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "gate", content = "why", rename_all = "snake_case")]
pub enum Gate {
    /// Batches may start.
    Open,
    /// An operator or the guard paused the rollout, with why.
    Paused(String),
    /// Evidence missing or stale, or the guard cannot see: nothing is promoted.
    Inconclusive(String),
    /// Promotions are stopped by something outside the plan (the lockdown policy is missing
    /// or drifted); rollbacks and successes still proceed.
    Blocked(String),
    /// Every wave is finished.
    Finished,
}

/// A change the planner wants the controller to make.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "action", rename_all = "snake_case")]
pub enum Action {
    /// Take the batch's members back out of the group and hold them; pause the rollout.
    RollBack {
        /// The batch to roll back.
        batch: i64,
        /// Why, for the audit log and the webhook.
        reason: String,
    },
    /// The batch soaked without a spike: it succeeds.
    Succeed {
        /// The batch.
        batch: i64,
        /// The guard's verdict, for the audit log.
        detail: String,
    },
    /// The wave is done: later waves may start.
    FinishWave {
        /// The wave.
        wave: String,
        /// Why it is done (batch limit reached, no eligible user left).
        why: String,
    },
    /// Journal a new batch of the wave and add its users to the group.
    StartBatch {
        /// The wave.
        wave: String,
        /// The users, each with why they are eligible.
        users: Vec<Candidate>,
    },
}

/// A user chosen for a new batch, and why they are eligible.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Candidate {
    /// The IAM user name.
    pub user: String,
    /// Why they are eligible, for the audit log.
    pub why: String,
}

/// Whether a user may be promoted, with the reason for people.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "status", content = "reason", rename_all = "snake_case")]
pub enum Eligibility {
    /// May be promoted, with the evidence that says so.
    Eligible(String),
    /// May not be promoted, with why.
    Ineligible(String),
}

/// The planner's decision: the gate, the current wave, the actions and each user's eligibility.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Plan {
    /// Whether new batches may start.
    pub gate: Gate,
    /// The wave new batches come from.
    pub current_wave: Option<String>,
    /// The changes to make, in order.
    pub actions: Vec<Action>,
    /// Why nothing (more) happens right now.
    pub waiting: Vec<String>,
    /// Each known user's eligibility.
    pub users: BTreeMap<String, Eligibility>,
    /// Each wave still to come at today's eligibility and the current pace (absent from
    /// answers of daemons older than the forecast).
    #[serde(default)]
    pub forecast: Forecast,
}

/// Why the evidence cannot be acted on now (stale, missing, judged under another perimeter), if it cannot.
pub fn evidence_problem(freshness: &Freshness, config: &Config, now: DateTime<Utc>) -> Option<String> {
    let configured = config.perimeter.fingerprint();
    if freshness.last_success.is_some() && freshness.judged_under != Some(configured) {
        let stored = freshness.judged_under.map_or("no recorded perimeter".to_string(), |f| format!("perimeter {f}"));
        return Some(format!(
            "the evidence was judged under {stored}, not the configured perimeter {configured}; nobody is promoted \
             until it is re-judged (on daemon start, or by the next evidence refresh)"
        ));
    }
    if freshness.legacy_hours > 0 {
        return Some(format!(
            "{} user-hours of evidence were stored before request contexts were kept and cannot be re-judged; \
             nobody is promoted until the next evidence refresh has re-read them from CloudTrail",
            freshness.legacy_hours
        ));
    }
    let limit = chrono_of(config.eligibility.max_evidence_age);
    match freshness.last_success {
        None => Some("no successful evidence refresh yet; run `lockstep evidence refresh`".to_string()),
        Some(at) if now - at > limit => {
            Some(format!("evidence is stale: last successful refresh {} ago (limit {})", human(now - at), human(limit)))
        }
        Some(_) => None,
    }
}

/// Whether one user may be promoted, and why (not).
pub fn eligibility(
    user: &IamUser,
    evidence: Option<&UserEvidence>,
    ledger: &Snapshot,
    config: &Config,
    now: DateTime<Utc>,
) -> Eligibility {
    use Eligibility::*;
    let rules = &config.eligibility;
    if let Some(since) = ledger.foreign.get(&user.name) {
        return Ineligible(format!(
            "in the lockdown group since {} by someone else's hand; lockstep never plans or removes them",
            since.format("%Y-%m-%d %H:%MZ")
        ));
    }
    if let Some(member) = ledger.members.get(&user.name) {
        match member.state {
            UserState::Promoting | UserState::Locked => return Ineligible(format!("already {}", member.state)),
            UserState::RollingBack => return Ineligible("being rolled back".to_string()),
            UserState::RemovedByHand => {
                return Ineligible("removed from the group by hand; an operator must release the user".to_string());
            }
            UserState::Held => {
                let why = member.reason.clone().unwrap_or_default();
                match member.hold_until {
                    Some(until) if until <= now => {} // lapsed: clean evidence decides below
                    Some(until) => return Ineligible(format!("held until {}: {why}", until.format("%Y-%m-%d %H:%MZ"))),
                    None => return Ineligible(format!("held: {why}")),
                }
            }
        }
    }
    if rules.exclude_users.contains(&user.name) {
        return Ineligible("excluded in rollout.yaml".to_string());
    }
    if let Some(key) = &config.perimeter.exempt_tag_key
        && user.tags.get(key).is_some_and(|v| v == "true")
    {
        return Ineligible(format!("exempt (tag {key}=true)"));
    }
    let Some(ev) = evidence else {
        return Ineligible(format!("no recorded calls in the last {}", Elapsed(chrono_of(rules.window))));
    };
    let span = now - ev.first_call;
    if span < chrono_of(rules.min_history) {
        return Ineligible(format!(
            "evidence spans only {} (needs {})",
            Elapsed(span),
            Elapsed(chrono_of(rules.min_history))
        ));
    }
    if ev.calls < rules.min_calls {
        return Ineligible(format!("only {} calls in the window (needs {})", ev.calls, rules.min_calls));
    }
    let last_outside = ev.last_outside.as_ref();
    if ev.would_deny > rules.max_would_deny {
        let last = last_outside
            .map(|o| format!("; last {} from {} {} ago", o.action, o.source, Elapsed(now - o.at)))
            .unwrap_or_default();
        return Ineligible(format!(
            "{} calls in the window would have been denied (allowed: {}){last}",
            ev.would_deny, rules.max_would_deny
        ));
    }
    if let Some(outside) = last_outside.filter(|o| now - o.at < chrono_of(rules.quiet_for)) {
        return Ineligible(format!(
            "last outside call {} ago ({} from {}; needs {} quiet)",
            Elapsed(now - outside.at),
            outside.action,
            outside.source,
            Elapsed(chrono_of(rules.quiet_for))
        ));
    }
    let mut why = format!("{} calls over {}, ", ev.calls, Elapsed(span));
    let _ = match last_outside {
        None => why.write_str("all from trusted networks"),
        Some(o) => write!(why, "last outside call {} ago", Elapsed(now - o.at)),
    };
    Eligible(why)
}

pub(crate) fn selects(selector: &Selector, user: &IamUser) -> bool {
    selector.path_prefix.as_ref().is_none_or(|p| user.path.starts_with(p.as_str()))
        && selector.user_glob.as_ref().is_none_or(|g| g.matches(&user.name))
        && selector.tag.as_ref().is_none_or(|(k, v)| user.tags.get(k) == Some(v))
}

/// Decides the next actions from the inputs alone (pure: no I/O, no clock).
pub fn plan(inputs: &Inputs) -> Plan {
    let Inputs { config, ledger, now, .. } = *inputs;
    let evidence: HashMap<&str, &UserEvidence> = inputs.evidence.iter().map(|e| (e.user.as_str(), e)).collect();
    // Each user's eligibility depends on that user alone: judged on every core (100,000 users a step).
    let judged: Vec<Eligibility> = inputs
        .users
        .par_iter()
        .map(|u| eligibility(u, evidence.get(u.name.as_str()).copied(), ledger, config, now))
        .collect();
    // The eligible users ranked once, best-known first (most applicable calls, then name): every
    // wave's candidates are this order filtered, never sorted again.
    let mut ranked: Vec<(u64, &IamUser)> = inputs
        .users
        .iter()
        .zip(&judged)
        .filter(|(_, e)| matches!(e, Eligibility::Eligible(_)))
        .map(|(u, _)| (evidence.get(u.name.as_str()).map_or(0, |e| e.calls), u))
        .collect();
    ranked.par_sort_by(|(a_calls, a), (b_calls, b)| b_calls.cmp(a_calls).then_with(|| a.name.cmp(&b.name)));
    let users: BTreeMap<String, Eligibility> =
        inputs.users.iter().zip(judged).map(|(u, e)| (u.name.clone(), e)).collect();
    let judged = Judged { eligible: ranked.into_iter().map(|(_, u)| u).collect() };
    let mut plan = Plan {
        gate: Gate::Open,
        current_wave: None,
        actions: Vec::new(),
        waiting: Vec::new(),
        users,
        forecast: Forecast::default(),
    };

    // Batches under watch: roll back on a spike, succeed when soaked and healthy.
    let mut guard_blind = None;
    for batch in &ledger.batches {
        let verdict = inputs.verdicts.get(&batch.id);
        match (batch.state, verdict) {
            (BatchState::Soaking | BatchState::Succeeded, Some(guard::Verdict::Spike { detail, .. })) => {
                plan.actions
                    .push(Action::RollBack { batch: batch.id, reason: format!("guard: AccessDenied spike: {detail}") });
            }
            (BatchState::Soaking, verdict) => {
                let soaked = batch.soak_until.is_some_and(|until| until <= now);
                match verdict {
                    Some(guard::Verdict::Inconclusive { why }) => {
                        guard_blind = Some(format!("batch {} cannot be judged: {why}", batch.id));
                    }
                    Some(guard::Verdict::Healthy { detail }) if soaked => {
                        plan.actions.push(Action::Succeed { batch: batch.id, detail: detail.clone() })
                    }
                    Some(_) => plan.waiting.push(format!(
                        "batch {} ({}) soaking until {}",
                        batch.id,
                        batch.wave,
                        batch.soak_until.map(|t| t.format("%Y-%m-%d %H:%MZ").to_string()).unwrap_or_default()
                    )),
                    None => guard_blind = Some(format!("batch {} has no guard verdict yet", batch.id)),
                }
            }
            _ => {}
        }
    }
    let rolling_back = plan.actions.iter().any(|a| matches!(a, Action::RollBack { .. }));

    plan.gate = if let Some(pause) = &ledger.paused {
        Gate::Paused(format!("paused by {}: {}", pause.by, pause.reason))
    } else if rolling_back {
        Gate::Paused("rolling back a batch".to_string())
    } else if let Some(problem) = evidence_problem(&inputs.freshness, config, now) {
        Gate::Inconclusive(problem)
    } else if inputs.evidence.is_empty() {
        // Nobody called AWS at all: more likely a wrong evidence source than a quiet account.
        // Finishing waves on that would end the rollout for good.
        Gate::Inconclusive(format!(
            "the evidence holds no calls in the last {}; check evidence.source",
            human(chrono_of(config.eligibility.window))
        ))
    } else if let Some(why) = guard_blind.clone() {
        Gate::Inconclusive(why)
    } else {
        Gate::Open
    };
    if let Some(why) = guard_blind {
        plan.waiting.push(why);
    }

    let finished = plan_waves(inputs, &judged, &mut plan);
    if finished && plan.gate == Gate::Open {
        plan.gate = Gate::Finished;
    }
    if let Some(problem) = inputs.blocked {
        plan.gate = Gate::Blocked(problem.to_string());
    }
    plan.forecast = forecast(inputs, &judged);
    plan
}

/// The waves still to come, at today's eligibility and the current pace.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Forecast {
    /// Users promoted per day in the last [`RECENT_DAYS`] days (the recent promotion rate).
    pub recent_per_day: f64,
    /// One entry per wave not yet done, in order.
    pub waves: Vec<WaveForecast>,
}

/// One wave still to come: how many users it would take today and, roughly, when.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WaveForecast {
    /// The wave's name.
    pub wave: String,
    /// Eligible users it would take today; a user selected by several waves counts in the first.
    pub users: usize,
    /// The batches those users make.
    pub batches: usize,
    /// The pace assumed for it, users a day: what its caps and soak allow, or the recent
    /// promotion rate when that is slower.
    pub users_per_day: f64,
    /// Roughly when it starts (now for the current wave), if the gate is open from now on.
    pub starts: DateTime<Utc>,
    /// Roughly when its last batch has soaked and the next wave can start.
    pub finishes: DateTime<Utc>,
}

/// What planning the waves reads besides the inputs: the eligible users, best-known first.
pub struct Judged<'a> {
    /// The users eligible now, most applicable calls in the window first, then by name.
    pub eligible: Vec<&'a IamUser>,
}

/// The days over which the recent promotion rate is measured.
pub const RECENT_DAYS: u32 = 7;

/// Forecasts the waves not yet done (pure). Each takes the eligible users it selects that no
/// earlier wave took, up to the batches it has left; batches follow each other at the pace its
/// caps allow (`max_soaking_batches` per soak, `max_promotions_per_day`), or at the recent
/// promotion rate when that is slower; a wave finishes once its last batch has soaked.
pub fn forecast(inputs: &Inputs, judged: &Judged) -> Forecast {
    let Inputs { config, ledger, now, .. } = *inputs;
    let day = std::time::Duration::from_secs(86_400);
    let recent_since = crate::config::earlier(now, day * RECENT_DAYS);
    let recent_per_day = ledger.promoted_since(recent_since) as f64 / f64::from(RECENT_DAYS);
    let mut taken: std::collections::HashSet<&str> = std::collections::HashSet::new();
    let mut at = now;
    let mut waves = Vec::new();
    for wave in config.waves.iter().filter(|w| !ledger.waves_done.contains_key(&w.name)) {
        let run = ledger.batches.iter().filter(|b| b.wave == wave.name).count();
        let room = wave.batches.map(|n| n.saturating_sub(run).saturating_mul(wave.batch_size));
        let mut users: Vec<&IamUser> = candidates(wave, judged, config);
        users.retain(|u| !taken.contains(u.name.as_str()));
        users.truncate(room.unwrap_or(usize::MAX));
        taken.extend(users.iter().map(|u| u.name.as_str()));
        let batches = users.len().div_ceil(wave.batch_size.max(1));
        let soaks_per_day = day.as_secs_f64() / wave.soak.as_secs_f64().max(1.0);
        let daily = config
            .rollout
            .max_promotions_per_day_per_account
            .map_or(config.rollout.max_promotions_per_day, |own| own.min(config.rollout.max_promotions_per_day));
        let capacity =
            (daily as f64).min((wave.batch_size * config.rollout.max_soaking_batches) as f64 * soaks_per_day);
        let users_per_day = if recent_per_day > 0.0 { capacity.min(recent_per_day) } else { capacity };
        let starts = at;
        if batches > 0 {
            // The last batch starts once the others are promoted, then soaks.
            let promoting = ((batches - 1) * wave.batch_size) as f64 / users_per_day.max(f64::MIN_POSITIVE);
            let promoting = std::time::Duration::try_from_secs_f64(promoting * day.as_secs_f64())
                .unwrap_or(std::time::Duration::MAX);
            at = crate::config::later(crate::config::later(at, promoting), wave.soak);
        }
        waves.push(WaveForecast {
            wave: wave.name.clone(),
            users: users.len(),
            batches,
            users_per_day,
            starts,
            finishes: at,
        });
    }
    Forecast { recent_per_day, waves }
}

/// Walks the waves in order: finishes the ones that are done and starts the next batch of the
/// first one that is not. The last wave stays open when it merely runs out of eligible users, so
/// users who become eligible later (released, new) are still promoted. Returns whether every
/// wave is done (the last one possibly idle).
fn plan_waves(inputs: &Inputs, judged: &Judged, plan: &mut Plan) -> bool {
    let Inputs { config, ledger, now, .. } = *inputs;
    for (index, wave) in config.waves.iter().enumerate() {
        if ledger.waves_done.contains_key(&wave.name) {
            continue;
        }
        let last = index + 1 == config.waves.len();
        let batches: Vec<_> = ledger.batches.iter().filter(|b| b.wave == wave.name).collect();
        let active = batches.iter().any(|b| b.state.is_active());
        let candidates = candidates(wave, judged, config);
        let all_batches_run = wave.batches.is_some_and(|n| batches.len() >= n);
        let out_of_users = candidates.is_empty() && plan.gate == Gate::Open;
        if !active && last && out_of_users && !all_batches_run {
            plan.current_wave = Some(wave.name.clone());
            plan.waiting
                .push(format!("wave {}: every eligible user is locked; newly eligible users join it", wave.name));
            return true;
        }
        if !active && (all_batches_run || out_of_users) {
            let why = if all_batches_run {
                format!("all {} batches done", batches.len())
            } else {
                "no eligible user matches it".to_string()
            };
            plan.actions.push(Action::FinishWave { wave: wave.name.clone(), why });
            continue;
        }
        plan.current_wave = Some(wave.name.clone());
        if plan.gate != Gate::Open {
            return false;
        }
        if all_batches_run {
            plan.waiting.push(format!("wave {}: all batches started; waiting for them to finish", wave.name));
            return false;
        }
        let soaking = ledger.active_batches().count();
        if soaking >= config.rollout.max_soaking_batches && !inputs.promote_now {
            plan.waiting.push(format!(
                "{soaking} batch(es) soaking (max {}); the next batch starts when one succeeds",
                config.rollout.max_soaking_batches
            ));
            return false;
        }
        let promoted_today = ledger.promoted_since(crate::config::earlier(now, std::time::Duration::from_secs(86_400)));
        let room = match daily_room(config, promoted_today, inputs.promoted_elsewhere) {
            Ok(room) => room,
            Err(why) => {
                plan.waiting.push(why);
                return false;
            }
        };
        let take = wave.batch_size.min(room);
        let users = candidates
            .into_iter()
            .take(take)
            .map(|u| Candidate {
                user: u.name.clone(),
                why: match plan.users.get(&u.name) {
                    Some(Eligibility::Eligible(why)) => why.clone(),
                    _ => String::new(),
                },
            })
            .collect();
        if inputs.blocked.is_none() {
            plan.actions.push(Action::StartBatch { wave: wave.name.clone(), users });
        }
        return false;
    }
    true
}

/// Eligible users the wave selects, best-known first.
/// None when the wave's account criteria do not take this configuration's account: there the
/// wave is done as soon as it comes up.
fn candidates<'u>(wave: &Wave, judged: &Judged<'u>, config: &Config) -> Vec<&'u IamUser> {
    let here = config.accounts.iter().find(|a| a.id == config.account_id);
    if !here.is_some_and(|account| wave.select.selects_account(account)) {
        return Vec::new();
    }
    // Already ranked: filtering keeps the order.
    judged.eligible.iter().copied().filter(|u| selects(&wave.select, u)).collect()
}

/// How many more users may be promoted now under the daily caps, or why none: the
/// organisation's (`max_promotions_per_day`, counting every account's promotions) and the
/// account's own (`max_promotions_per_day_per_account`).
fn daily_room(config: &Config, promoted_here: usize, promoted_elsewhere: usize) -> Result<usize, String> {
    let limits = &config.rollout;
    let everywhere = promoted_here + promoted_elsewhere;
    let global = limits.max_promotions_per_day.saturating_sub(everywhere);
    let own = limits.max_promotions_per_day_per_account.map_or(usize::MAX, |max| max.saturating_sub(promoted_here));
    match (global, own) {
        (0, _) if promoted_elsewhere > 0 => Err(format!(
            "daily cap reached: {everywhere} users promoted in the last 24h across accounts, {promoted_here} of them here (max {})",
            limits.max_promotions_per_day
        )),
        (0, _) => Err(format!(
            "daily cap reached: {everywhere} users promoted in the last 24h (max {})",
            limits.max_promotions_per_day
        )),
        (_, 0) => Err(format!(
            "account daily cap reached: {promoted_here} users promoted here in the last 24h (max_promotions_per_day_per_account {})",
            limits.max_promotions_per_day_per_account.unwrap_or_default()
        )),
        (global, own) => Ok(global.min(own)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::evidence::OutsideCall;
    use crate::perimeter::DenyReason;
    use crate::rollout::{Batch, Member, Pause};
    use chrono::TimeZone;
    use std::path::Path;

    fn now() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 3, 20, 12, 0, 0).unwrap()
    }

    fn config() -> Config {
        Config::parse(include_str!("../rollout.yaml"), Path::new("rollout.yaml")).unwrap()
    }

    fn user(name: &str, path: &str) -> IamUser {
        IamUser {
            name: name.into(),
            arn: format!("arn:aws:iam::123456789012:user{path}{name}"),
            path: path.into(),
            tags: BTreeMap::new(),
        }
    }

    fn clean(name: &str, calls: u64) -> UserEvidence {
        UserEvidence {
            user: name.into(),
            arn: None,
            first_call: now() - chrono::Duration::days(13),
            last_call: now() - chrono::Duration::hours(1),
            calls,
            would_deny: 0,
            last_outside: None,
            outside_sources: vec![],
            explicit_denials: 0,
            other_denials: 0,
        }
    }

    fn fresh() -> Freshness {
        Freshness {
            last_success: Some(now() - chrono::Duration::minutes(30)),
            covered_until: Some(now() - chrono::Duration::minutes(30)),
            judged_under: Some(config().perimeter.fingerprint()),
            legacy_hours: 0,
        }
    }

    struct World {
        config: Config,
        ledger: Snapshot,
        users: Vec<IamUser>,
        evidence: Vec<UserEvidence>,
        freshness: Freshness,
        verdicts: BTreeMap<i64, guard::Verdict>,
        promoted_elsewhere: usize,
    }

    impl World {
        fn new() -> World {
            World {
                config: config(),
                ledger: Snapshot::default(),
                users: vec![
                    user("ann", "/engineering/"),
                    user("ben", "/engineering/"),
                    user("cat", "/engineering/"),
                    user("dan", "/data/"),
                ],
                evidence: vec![clean("ann", 50), clean("ben", 500), clean("cat", 100), clean("dan", 80)],
                freshness: fresh(),
                verdicts: BTreeMap::new(),
                promoted_elsewhere: 0,
            }
        }

        fn plan(&self) -> Plan {
            plan(&Inputs {
                config: &self.config,
                ledger: &self.ledger,
                users: &self.users,
                evidence: &self.evidence,
                freshness: self.freshness,
                verdicts: &self.verdicts,
                blocked: None,
                now: now(),
                promote_now: false,
                promoted_elsewhere: self.promoted_elsewhere,
            })
        }
    }

    fn started(plan: &Plan) -> Option<(&str, Vec<&str>)> {
        plan.actions.iter().find_map(|a| match a {
            Action::StartBatch { wave, users } => {
                Some((wave.as_str(), users.iter().map(|c| c.user.as_str()).collect()))
            }
            _ => None,
        })
    }

    fn soaking_batch(id: i64, wave: &str, members: &[&str], soak_left_hours: i64) -> Batch {
        Batch {
            id,
            wave: wave.into(),
            state: BatchState::Soaking,
            members: members.iter().map(|m| m.to_string()).collect(),
            created_at: now() - chrono::Duration::hours(2),
            applied_at: Some(now() - chrono::Duration::hours(2)),
            soak_until: Some(now() + chrono::Duration::hours(soak_left_hours)),
            finished_at: None,
            verdict: None,
            soak: None,
            verdict_kind: None,
        }
    }

    #[test]
    fn a_missing_or_drifted_policy_blocks_new_batches_only() {
        let world = World::new();
        let plan = plan(&Inputs {
            config: &world.config,
            ledger: &world.ledger,
            users: &world.users,
            evidence: &world.evidence,
            freshness: world.freshness,
            verdicts: &world.verdicts,
            blocked: Some("managed policy drifted"),
            now: now(),
            promote_now: false,
            promoted_elsewhere: 0,
        });
        assert_eq!(plan.gate, Gate::Blocked("managed policy drifted".into()));
        assert_eq!(started(&plan), None);
        assert_eq!(plan.current_wave.as_deref(), Some("canary"));
    }

    #[test]
    fn first_batch_takes_the_best_known_matching_users() {
        let plan = World::new().plan();
        assert_eq!(plan.gate, Gate::Open);
        assert_eq!(started(&plan), Some(("canary", vec!["ben", "cat"])));
        assert_eq!(plan.current_wave.as_deref(), Some("canary"));
    }

    #[test]
    fn a_member_lockstep_did_not_add_is_never_planned() {
        let mut world = World::new();
        world.ledger.foreign = [("ben".to_string(), now()), ("cat".to_string(), now())].into();
        let plan = world.plan();
        assert_eq!(started(&plan), Some(("canary", vec!["ann"])));
        assert!(
            matches!(&plan.users["ben"], Eligibility::Ineligible(why) if why.contains("someone else")),
            "{:?}",
            plan.users["ben"]
        );
    }

    #[test]
    fn stale_or_missing_evidence_promotes_nobody() {
        let mut world = World::new();
        world.freshness.last_success = Some(now() - chrono::Duration::hours(5));
        let plan = world.plan();
        assert!(matches!(&plan.gate, Gate::Inconclusive(why) if why.contains("stale")), "{:?}", plan.gate);
        assert_eq!(started(&plan), None);
        world.freshness = Freshness::default();
        assert!(matches!(world.plan().gate, Gate::Inconclusive(_)));
        assert_eq!(started(&world.plan()), None);
    }

    #[test]
    fn evidence_without_any_calls_is_inconclusive_and_finishes_no_wave() {
        let mut world = World::new();
        world.evidence.clear();
        let plan = world.plan();
        assert!(matches!(&plan.gate, Gate::Inconclusive(why) if why.contains("no calls")), "{:?}", plan.gate);
        assert!(plan.actions.is_empty(), "{:?}", plan.actions);
    }

    #[test]
    fn each_ineligible_user_has_a_reason() {
        let mut world = World::new();
        world.config.eligibility.exclude_users.push("dan".into());
        world.users.push(user("eve", "/x/"));
        world.users.push(user("fay", "/x/"));
        world.users.push(user("gus", "/x/"));
        world.users.push(user("hal", "/x/"));
        world.users[0].tags.insert("lockstep-exempt".into(), "true".into());
        let mut recent = clean("fay", 100);
        recent.first_call = now() - chrono::Duration::days(2);
        let mut few = clean("gus", 3);
        few.first_call = now() - chrono::Duration::days(10);
        let mut outside = clean("hal", 100);
        outside.would_deny = 2;
        outside.last_outside = Some(OutsideCall {
            at: now() - chrono::Duration::hours(3),
            source: "198.51.100.7".into(),
            action: "s3:PutObject".into(),
            reason: DenyReason::UntrustedIp,
        });
        world.evidence.extend([recent, few, outside]);
        let plan = world.plan();
        let reason = |u: &str| match &plan.users[u] {
            Eligibility::Ineligible(r) => r.clone(),
            Eligibility::Eligible(r) => panic!("{u} eligible: {r}"),
        };
        assert_eq!(reason("ann"), "exempt (tag lockstep-exempt=true)");
        assert_eq!(reason("dan"), "excluded in rollout.yaml");
        assert_eq!(reason("eve"), "no recorded calls in the last 14d");
        assert!(reason("fay").starts_with("evidence spans only 2d"), "{}", reason("fay"));
        assert_eq!(reason("gus"), "only 3 calls in the window (needs 20)");
        assert!(
            reason("hal").contains("2 calls in the window would have been denied")
                && reason("hal").contains("198.51.100.7")
        );
        assert!(matches!(&plan.users["ben"], Eligibility::Eligible(why) if why.contains("all from trusted networks")));
    }

    #[test]
    fn quiet_period_counts_from_the_last_outside_call() {
        let mut world = World::new();
        world.config.eligibility.max_would_deny = 5;
        world.evidence[1].would_deny = 1;
        world.evidence[1].last_outside = Some(OutsideCall {
            at: now() - chrono::Duration::days(2),
            source: "vpce-0aaaaaaaaaaaaaaaa".into(),
            action: "s3:GetObject".into(),
            reason: DenyReason::UntrustedEndpoint,
        });
        let plan = world.plan();
        assert!(matches!(&plan.users["ben"], Eligibility::Ineligible(r) if r.starts_with("last outside call 2d ago")));
        assert_eq!(started(&plan), Some(("canary", vec!["cat", "ann"])));
    }

    #[test]
    fn soaking_batch_blocks_the_next_until_it_succeeds() {
        let mut world = World::new();
        world.ledger.batches.push(soaking_batch(1, "canary", &["ben", "cat"], 3));
        for user in ["ben", "cat"] {
            world.ledger.members.insert(
                user.into(),
                Member {
                    user: user.into(),
                    state: UserState::Locked,
                    batch: Some(1),
                    since: now(),
                    reason: None,
                    hold_until: None,
                },
            );
        }
        world.verdicts.insert(1, guard::Verdict::Healthy { detail: "0 denials".into() });
        let plan = world.plan();
        assert_eq!(started(&plan), None);
        assert!(plan.waiting.iter().any(|w| w.contains("soaking until")), "{:?}", plan.waiting);

        // Soak over and healthy: succeed; the canary wave (1 batch) finishes; engineering starts.
        world.ledger.batches[0].soak_until = Some(now() - chrono::Duration::minutes(1));
        let plan = world.plan();
        assert!(plan.actions.contains(&Action::Succeed { batch: 1, detail: "0 denials".into() }));
        assert_eq!(started(&plan), None, "the succeeding batch still counts as soaking this step");

        world.ledger.batches[0].state = BatchState::Succeeded;
        let plan = world.plan();
        assert!(plan.actions.contains(&Action::FinishWave { wave: "canary".into(), why: "all 1 batches done".into() }));
        assert_eq!(started(&plan), Some(("engineering", vec!["ann"])));
    }

    #[test]
    fn inconclusive_guard_blocks_success_and_promotion() {
        let mut world = World::new();
        world.ledger.batches.push(soaking_batch(1, "canary", &["ben"], -1));
        world.verdicts.insert(1, guard::Verdict::Inconclusive { why: "event source silent for 45m".into() });
        let plan = world.plan();
        assert!(matches!(&plan.gate, Gate::Inconclusive(why) if why.contains("silent")));
        assert!(!plan.actions.iter().any(|a| matches!(a, Action::Succeed { .. } | Action::StartBatch { .. })));
    }

    #[test]
    fn spike_rolls_back_even_a_succeeded_batch_and_even_when_paused() {
        let mut world = World::new();
        let mut batch = soaking_batch(4, "canary", &["ben"], -1);
        batch.state = BatchState::Succeeded;
        world.ledger.batches.push(batch);
        world.ledger.paused = Some(Pause { reason: "checking".into(), by: "ops".into(), at: now() });
        world.verdicts.insert(
            4,
            guard::Verdict::Spike {
                affected: vec!["ben".into()],
                weighted_denials: 5,
                offending: vec![],
                detail: "1 of 1 members denied".into(),
            },
        );
        let plan = world.plan();
        assert!(matches!(&plan.actions[0], Action::RollBack { batch: 4, reason } if reason.contains("spike")));
        assert!(matches!(plan.gate, Gate::Paused(_)));
        assert_eq!(started(&plan), None);
    }

    #[test]
    fn daily_cap_limits_the_batch() {
        let mut world = World::new();
        world.config.rollout.max_promotions_per_day = 1;
        assert_eq!(started(&world.plan()), Some(("canary", vec!["ben"])));
        let mut done = soaking_batch(1, "x", &["zed"], -1);
        done.state = BatchState::Succeeded;
        world.ledger.batches.push(done);
        let plan = world.plan();
        assert_eq!(started(&plan), None);
        assert!(plan.waiting.iter().any(|w| w.starts_with("daily cap reached")));
    }

    #[test]
    fn the_daily_cap_counts_every_account_and_the_account_cap_this_one() {
        let mut world = World::new();
        world.config.rollout.max_promotions_per_day = 5;
        world.promoted_elsewhere = 5;
        let plan = world.plan();
        assert_eq!(started(&plan), None);
        assert!(
            plan.waiting.iter().any(|w| w.contains("5 users promoted in the last 24h across accounts, 0 of them here")),
            "{:?}",
            plan.waiting
        );
        world.promoted_elsewhere = 4;
        assert_eq!(started(&world.plan()), Some(("canary", vec!["ben"])), "one user of room left");
        world.promoted_elsewhere = 0;
        world.config.rollout.max_promotions_per_day_per_account = Some(1);
        assert_eq!(started(&world.plan()), Some(("canary", vec!["ben"])), "the account's own cap is lower");
        let mut done = soaking_batch(1, "x", &["zed"], -1);
        done.state = BatchState::Succeeded;
        world.ledger.batches.push(done);
        let plan = world.plan();
        assert_eq!(started(&plan), None);
        assert!(plan.waiting.iter().any(|w| w.starts_with("account daily cap reached")), "{:?}", plan.waiting);
    }

    #[test]
    fn a_wave_selecting_other_accounts_finishes_here_without_promoting() {
        let mut world = World::new();
        for wave in &mut world.config.waves {
            wave.select.accounts = vec!["111122223333".to_string()];
        }
        let plan = world.plan();
        assert_eq!(started(&plan), None);
        assert!(plan.actions.iter().all(|a| matches!(a, Action::FinishWave { .. })), "{:?}", plan.actions);
        // The same waves in the account they select promote as usual.
        world.config.account_id = "111122223333".to_string();
        world.config.accounts[0].id = "111122223333".to_string();
        assert_eq!(started(&world.plan()), Some(("canary", vec!["ben", "cat"])));
    }

    #[test]
    fn waves_without_matching_users_finish_and_the_rollout_ends() {
        let mut world = World::new();
        world.users.retain(|u| u.name == "dan");
        let plan = world.plan();
        assert!(
            plan.actions
                .contains(&Action::FinishWave { wave: "canary".into(), why: "no eligible user matches it".into() })
        );
        assert_eq!(started(&plan), Some(("everyone", vec!["dan"])));
        world.users.clear();
        let plan = world.plan();
        assert_eq!(plan.gate, Gate::Finished);
    }

    #[test]
    fn held_users_wait_for_expiry_and_clean_evidence() {
        let mut world = World::new();
        world.users.retain(|u| u.name == "ben");
        world.ledger.members.insert(
            "ben".into(),
            Member {
                user: "ben".into(),
                state: UserState::Held,
                batch: Some(1),
                since: now() - chrono::Duration::days(1),
                reason: Some("guard spike".into()),
                hold_until: Some(now() + chrono::Duration::days(1)),
            },
        );
        assert!(matches!(&world.plan().users["ben"], Eligibility::Ineligible(r) if r.starts_with("held until")));
        world.ledger.members.get_mut("ben").unwrap().hold_until = Some(now() - chrono::Duration::hours(1));
        assert!(matches!(&world.plan().users["ben"], Eligibility::Eligible(_)));
    }

    #[test]
    fn selectors() {
        let mut u = user("ci-deploy", "/engineering/bots/");
        u.tags.insert("team".into(), "platform".into());
        let sel = |p: Option<&str>, g: Option<&str>, t: Option<(&str, &str)>| Selector {
            path_prefix: p.map(Into::into),
            user_glob: g.map(|g| glob::Pattern::new(g).unwrap()),
            tag: t.map(|(k, v)| (k.into(), v.into())),
            ..Selector::default()
        };
        assert!(selects(&sel(None, None, None), &u));
        assert!(selects(&sel(Some("/engineering/"), Some("ci-*"), Some(("team", "platform"))), &u));
        assert!(!selects(&sel(Some("/data/"), None, None), &u));
        assert!(!selects(&sel(None, Some("human-*"), None), &u));
        assert!(!selects(&sel(None, None, Some(("team", "data"))), &u));
    }

    fn hours(n: i64) -> chrono::Duration {
        chrono::Duration::hours(n)
    }

    #[test]
    fn the_forecast_takes_each_user_in_the_first_wave_that_selects_them_at_the_pace_of_caps_and_soak() {
        let plan = World::new().plan();
        let waves: Vec<_> = plan.forecast.waves.iter().map(|w| (w.wave.as_str(), w.users, w.batches)).collect();
        // The canary takes its one batch of two; engineering the third engineer; everyone dan.
        assert_eq!(waves, [("canary", 2, 1), ("engineering", 1, 1), ("everyone", 1, 1)]);
        let dates: Vec<_> = plan.forecast.waves.iter().map(|w| (w.starts - now(), w.finishes - now())).collect();
        // Each wave waits for the previous one's last soak (24h, 24h, 48h).
        assert_eq!(dates, [(hours(0), hours(24)), (hours(24), hours(48)), (hours(48), hours(96))]);
        // Caps and soak: 2 users per 24h soak for the canary, one batch of 10 at a time for engineering.
        assert_eq!(plan.forecast.waves[0].users_per_day, 2.0);
        assert_eq!(plan.forecast.waves[1].users_per_day, 10.0);
        assert_eq!(plan.forecast.recent_per_day, 0.0);
        let json = serde_json::to_value(&plan).unwrap();
        assert_eq!(json["forecast"]["waves"][2]["wave"], "everyone");
        assert_eq!(json["forecast"]["waves"][2]["users"], 1);
        assert!(json["forecast"]["waves"][2]["finishes"].is_string(), "{json}");
    }

    #[test]
    fn the_forecast_follows_a_slower_recent_pace_and_skips_finished_waves_and_batches() {
        let mut world = World::new();
        for i in 0..30 {
            let name = format!("u{i:02}");
            world.users.push(user(&name, "/data/"));
            world.evidence.push(clean(&name, 40));
        }
        // Seven promotions over the last week (the canary's one batch, done): one a day.
        let mut canary = soaking_batch(1, "canary", &["x1", "x2", "x3", "x4", "x5", "x6", "x7"], -100);
        canary.state = BatchState::Succeeded;
        canary.created_at = now() - hours(48);
        world.ledger.batches.push(canary);
        world.ledger.waves_done.insert("canary".into(), now() - hours(24));
        let forecast = world.plan().forecast;
        assert_eq!(forecast.recent_per_day, 1.0);
        let waves: Vec<_> = forecast.waves.iter().map(|w| (w.wave.as_str(), w.users, w.batches)).collect();
        assert_eq!(waves, [("engineering", 3, 1), ("everyone", 31, 2)]);
        let everyone = &forecast.waves[1];
        assert_eq!(everyone.users_per_day, 1.0, "slower than the caps allow (12.5 a day)");
        assert_eq!(everyone.starts, now() + hours(24));
        // The first batch of 25 at one a day takes 25 days before the last starts, then 48h soak.
        assert_eq!(everyone.finishes, now() + hours(24) + chrono::Duration::days(25) + hours(48));
    }
}
