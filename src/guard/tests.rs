use super::*;
use crate::perimeter::Perimeter;
use crate::rollout::BatchState;
use crate::trail::{Record, UserIdentity};
use chrono::TimeZone;
use std::collections::HashSet;
use std::time::Duration;

const POLICY: &str = "lockstep-deny";

fn t(minutes: i64) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 3, 1, 12, 0, 0).unwrap() + chrono::Duration::minutes(minutes)
}

fn config() -> Guard {
    Guard {
        source: crate::config::SourceKind::Files,
        poll: Duration::from_secs(60),
        grace: Duration::from_secs(3600),
        window: Duration::from_secs(15 * 60),
        min_affected_users: 1,
        min_denials: 3,
        silence_limit: Duration::from_secs(30 * 60),
        requeue_after: None,
        after_soak: AfterSoak::Alert,
        delivery_lag: Duration::from_secs(300),
        false_alarm_budget: 0.001,
        watch_locked: true,
    }
}

fn batch_of(members: &[&str], soak_minutes: i64) -> Batch {
    Batch {
        id: 7,
        wave: "canary".into(),
        state: BatchState::Soaking,
        members: members.iter().map(|m| m.to_string()).collect(),
        created_at: t(0),
        applied_at: Some(t(0)),
        soak_until: Some(t(soak_minutes)),
        finished_at: None,
        verdict: None,
        soak: None,
        verdict_kind: None,
    }
}

fn batch() -> Batch {
    batch_of(&["alice", "bob"], 24 * 60)
}

fn perimeter() -> Perimeter {
    Perimeter {
        account_id: "123456789012".into(),
        trusted_vpcs: vec!["vpc-1".into()],
        trusted_endpoints: BTreeMap::from([("vpce-1".to_string(), "vpc-1".to_string())]),
        trusted_cidrs: vec!["203.0.113.0/24".parse().unwrap()],
        allow_aws_service_calls: true,
        called_via_services: vec![],
        allow_presigned_s3_reads: false,
        exempt_tag_key: Some("lockstep-exempt".into()),
        not_actions: vec![],
    }
}

const TRUSTED: &str = "203.0.113.7";
const OUTSIDE: &str = "198.51.100.9";

/// A call by IAM user alice, refused with `code` and `message`, from `source` (`None`: no
/// source recorded).
fn refused(code: &str, message: &str, source: Option<&str>) -> Record {
    Record {
        event_time: Some("2026-03-01T12:05:00Z".into()),
        event_source: Some("s3.amazonaws.com".into()),
        event_name: Some("GetObject".into()),
        event_type: Some("AwsApiCall".into()),
        recipient_account_id: Some("123456789012".into()),
        source_ip_address: source.map(str::to_string),
        error_code: Some(code.into()),
        error_message: (!message.is_empty()).then(|| message.to_string()),
        user_identity: Some(UserIdentity {
            kind: Some("IAMUser".into()),
            arn: Some("arn:aws:iam::123456789012:user/alice".into()),
            user_name: Some("alice".into()),
            account_id: Some("123456789012".into()),
            ..UserIdentity::default()
        }),
        ..Record::default()
    }
}

fn attributed(user: &str, minute: i64, cause: Cause) -> DenialEvent {
    DenialEvent {
        user: user.into(),
        at: t(minute),
        action: "s3:ListBucket".into(),
        kind: Attribution { cause, evidence: Evidence::Legacy { kind: "test".into() } },
        code: "AccessDenied".into(),
        message: String::new(),
        source: None,
    }
}

fn healthy_source(now: DateTime<Utc>) -> SourceHealth {
    SourceHealth { last_event_at: Some(now - chrono::Duration::minutes(2)), last_ok_poll: Some(now), error: None }
}

fn assess_at(now: i64, events: &[DenialEvent], baselines: &BTreeMap<String, f64>, cohort: CohortRate) -> Judgement {
    let source = healthy_source(t(now));
    let config = config();
    let batch = batch();
    assess(&Input { batch: &batch, events, baselines, cohort, source: &source, config: &config, now: t(now) })
}

fn judge_at(now: i64, events: &[DenialEvent], baselines: &BTreeMap<String, f64>, cohort: CohortRate) -> Verdict {
    assess_at(now, events, baselines, cohort).verdict
}

const ALICE: &str = "User: arn:aws:iam::123456789012:user/alice is not authorized to perform:";

/// Real message shapes (IAM user guide, service answers) and where they come from; each row's
/// expected cause and the rule that decides it.
#[test]
fn every_denial_shape_gets_its_cause() {
    #[allow(clippy::type_complexity)] // one case per row reads best inline
    let rows: Vec<(&str, String, Option<&str>, Option<(Cause, &str)>)> = vec![
        // Implicit denies: the lockdown can never cause them, wherever the call came from.
        ("AccessDenied", format!("{ALICE} s3:GetObject on resource: \"arn:aws:s3:::reports/q3.csv\" because no identity-based policy allows the s3:GetObject action"), Some(OUTSIDE), Some((Cause::Other, "states_other_cause"))),
        ("AccessDeniedException", format!("{ALICE} kms:Decrypt on resource: arn:aws:kms:us-east-1:123456789012:key/1234abcd because no resource-based policy allows the kms:Decrypt action"), Some(OUTSIDE), Some((Cause::Other, "states_other_cause"))),
        ("AccessDenied", format!("{ALICE} iam:CreateUser on resource: arn:aws:iam::123456789012:user/x because no permissions boundary allows the iam:CreateUser action"), Some(OUTSIDE), Some((Cause::Other, "states_other_cause"))),
        ("AccessDenied", format!("{ALICE} s3:PutObject because no session policy allows the s3:PutObject action"), None, Some((Cause::Other, "states_other_cause"))),
        ("AccessDenied", format!("{ALICE} s3:GetObject because no service control policy allows the s3:GetObject action"), None, Some((Cause::Other, "states_other_cause"))),
        ("AccessDenied", format!("{ALICE} s3:GetObject because no VPC endpoint policy allows the s3:GetObject action"), None, Some((Cause::Other, "states_other_cause"))),
        // Explicit denies in policy types a group policy is not.
        ("AccessDenied", format!("{ALICE} s3:DeleteBucket on resource: arn:aws:s3:::logs with an explicit deny in a service control policy"), Some(OUTSIDE), Some((Cause::Other, "states_other_cause"))),
        ("AccessDenied", format!("{ALICE} s3:DeleteBucket with an explicit deny in a service control policy: arn:aws:organizations::111111111111:policy/o-abc123/service_control_policy/p-def456"), Some(OUTSIDE), Some((Cause::Other, "states_other_cause"))),
        ("AccessDenied", format!("{ALICE} s3:GetObject on resource: arn:aws:s3:::vault/k with an explicit deny in a resource control policy"), Some(OUTSIDE), Some((Cause::Other, "states_other_cause"))),
        ("AccessDenied", format!("{ALICE} s3:GetObject on resource: arn:aws:s3:::vault/k with an explicit deny in a resource-based policy"), Some(OUTSIDE), Some((Cause::Other, "states_other_cause"))),
        ("AccessDenied", format!("{ALICE} iam:CreateRole with an explicit deny in a permissions boundary"), Some(OUTSIDE), Some((Cause::Other, "states_other_cause"))),
        ("AccessDenied", format!("{ALICE} s3:GetObject with an explicit deny in a session policy"), Some(OUTSIDE), Some((Cause::Other, "states_other_cause"))),
        ("AccessDenied", format!("{ALICE} s3:GetObject with an explicit deny in a VPC endpoint policy"), Some(OUTSIDE), Some((Cause::Other, "states_other_cause"))),
        ("VpceAccessDenied", "The request was denied by the VPC endpoint policy".to_string(), Some("10.0.1.5"), Some((Cause::Other, "states_other_cause"))),
        // An explicit identity-based deny: the message names the lockdown policy (wins even
        // where the classifier disagrees), names another policy, or names none.
        ("AccessDenied", format!("{ALICE} s3:GetObject on resource: arn:aws:s3:::r/x with an explicit deny in an identity-based policy: arn:aws:iam::123456789012:policy/lockstep-deny"), Some(TRUSTED), Some((Cause::Lockdown, "names_lockdown_policy"))),
        ("AccessDeniedException", format!("{ALICE} dynamodb:GetItem with an explicit deny in an identity-based policy: arn:aws:iam::123456789012:policy/team/lockstep-deny."), None, Some((Cause::Lockdown, "names_lockdown_policy"))),
        ("AccessDenied", format!("{ALICE} s3:PutObject with an explicit deny in an identity-based policy: arn:aws:iam::123456789012:policy/DenyProdWrites"), Some(OUTSIDE), Some((Cause::Other, "states_other_cause"))),
        ("AccessDeniedException", format!("{ALICE} dynamodb:GetItem on resource: arn:aws:dynamodb:us-east-1:123456789012:table/orders with an explicit deny in an identity-based policy"), Some(OUTSIDE), Some((Cause::Lockdown, "perimeter_denies"))),
        ("AccessDeniedException", format!("{ALICE} dynamodb:GetItem on resource: arn:aws:dynamodb:us-east-1:123456789012:table/orders with an explicit deny in an identity-based policy"), Some(TRUSTED), Some((Cause::Other, "perimeter_allows"))),
        ("AccessDeniedException", format!("{ALICE} dynamodb:GetItem with an explicit deny in an identity-based policy"), None, Some((Cause::Unknown, "undecidable"))),
        // Asking for the lockdown policy itself and being refused is not the policy denying.
        ("AccessDenied", format!("{ALICE} iam:GetPolicy on resource: arn:aws:iam::123456789012:policy/lockstep-deny because no identity-based policy allows the iam:GetPolicy action"), Some(OUTSIDE), Some((Cause::Other, "states_other_cause"))),
        // No cause stated: the classifier decides, or nothing can.
        ("AccessDenied", "Access Denied".to_string(), Some(OUTSIDE), Some((Cause::Lockdown, "perimeter_denies"))),
        ("AccessDenied", "Access Denied".to_string(), Some(TRUSTED), Some((Cause::Other, "perimeter_allows"))),
        ("AccessDenied", "Access Denied".to_string(), None, Some((Cause::Unknown, "undecidable"))),
        ("AccessDenied", "Access Denied".to_string(), Some("035.249.253.232"), Some((Cause::Unknown, "undecidable"))),
        ("Client.UnauthorizedOperation", "You are not authorized to perform this operation. Encoded authorization failure message: 4GIOHlTkIaWHQD0Q0m6XSnuUMCm-abc_xyz".to_string(), Some(OUTSIDE), Some((Cause::Lockdown, "perimeter_denies"))),
        ("Client.UnauthorizedOperation", "You are not authorized to perform this operation. Encoded authorization failure message: 4GIOHlTkIaWHQD0Q0m6XSnuUMCm-abc_xyz".to_string(), None, Some((Cause::Unknown, "undecidable"))),
        ("UnauthorizedOperation", format!("You are not authorized to perform this operation. {ALICE} ec2:RunInstances on resource: arn:aws:ec2:us-east-1:123456789012:instance/* with an explicit deny in a service control policy. Encoded authorization failure message: Zm9v"), Some(OUTSIDE), Some((Cause::Other, "states_other_cause"))),
        ("UnauthorizedOperation", format!("You are not authorized to perform this operation. {ALICE} ec2:RunInstances on resource: arn:aws:ec2:us-east-1:123456789012:instance/* with an explicit deny in an identity-based policy. Encoded authorization failure message: Zm9v"), Some(OUTSIDE), Some((Cause::Lockdown, "perimeter_denies"))),
        ("Forbidden", "Forbidden".to_string(), None, Some((Cause::Unknown, "undecidable"))),
        ("Forbidden", String::new(), Some(TRUSTED), Some((Cause::Other, "perimeter_allows"))),
        ("AccessDenied", format!("{ALICE} iam:ListUsers on resource: arn:aws:iam::123456789012:user/"), Some(OUTSIDE), Some((Cause::Lockdown, "perimeter_denies"))),
        // Not denials.
        ("ThrottlingException", "Rate exceeded".to_string(), Some(OUTSIDE), None),
        ("NoSuchBucket", "The specified bucket does not exist".to_string(), Some(OUTSIDE), None),
    ];
    let (perimeter, exempt) = (perimeter(), HashSet::new());
    for (code, message, source, expected) in rows {
        let record = refused(code, &message, source);
        let got = attribute(&record, &perimeter, &exempt, POLICY)
            .map(|a| (a.cause, serde_json::to_value(&a.evidence).unwrap()["rule"].as_str().unwrap_or("").to_string()));
        let expected = expected.map(|(cause, rule)| (cause, rule.to_string()));
        assert_eq!(got, expected, "{code} {message:?} from {source:?}");
    }
}

#[test]
fn records_the_lockdown_cannot_apply_to_are_other() {
    let (perimeter, exempt) = (perimeter(), HashSet::from(["alice".to_string()]));
    let bare = |source| refused("AccessDenied", "Access Denied", source);
    // An exempt user is allowed by the perimeter, even from outside.
    assert_eq!(attribute(&bare(Some(OUTSIDE)), &perimeter, &exempt, POLICY).unwrap().cause, Cause::Other);
    let none = HashSet::new();
    let mut role = bare(Some(OUTSIDE));
    role.user_identity.as_mut().unwrap().kind = Some("AssumedRole".into());
    let mut service_event = bare(None);
    service_event.event_type = Some("AwsServiceEvent".into());
    let mut caller_identity = bare(None);
    (caller_identity.event_source, caller_identity.event_name) =
        (Some("sts.amazonaws.com".into()), Some("GetCallerIdentity".into()));
    for record in [role, service_event, caller_identity] {
        let a = attribute(&record, &perimeter, &none, POLICY).unwrap();
        assert!(matches!(a.evidence, Evidence::LockdownDoesNotApply { .. }) && a.cause == Cause::Other, "{a:?}");
    }
    // No identity at all, or no action: nothing to classify.
    let mut anonymous = bare(Some(OUTSIDE));
    anonymous.user_identity = None;
    assert_eq!(attribute(&anonymous, &perimeter, &none, POLICY).unwrap().cause, Cause::Unknown);
}

#[test]
fn attributions_survive_the_ledger_text_and_old_rows_still_read() {
    let a = attribute(&refused("AccessDenied", "Access Denied", Some(OUTSIDE)), &perimeter(), &HashSet::new(), POLICY)
        .unwrap();
    assert_eq!(Attribution::from_stored(&a.to_stored()), a);
    assert_eq!(Attribution::from_stored("explicit_identity_deny").cause, Cause::Lockdown);
    assert_eq!(Attribution::from_stored("other").cause, Cause::Other);
    assert_eq!(Attribution::from_stored("{garbage").cause, Cause::Unknown);
}

#[test]
fn lockdown_denials_make_a_spike_naming_the_culprit() {
    let mut events: Vec<_> = (0..3).map(|m| attributed("alice", 30 + m, Cause::Lockdown)).collect();
    events.extend((0..10).map(|m| attributed("bob", 30 + m, Cause::Other)));
    let judgement = assess_at(35, &events, &BTreeMap::new(), CohortRate::default());
    match &judgement.verdict {
        Verdict::Spike { affected, weighted_denials, offending, .. } => {
            assert_eq!(affected, &["alice"]);
            assert_eq!(*weighted_denials, 3);
            assert_eq!(offending.len(), 3);
        }
        other => panic!("expected spike, got {other:?}"),
    }
    let e = &judgement.explanation;
    assert_eq!(e.culprits.iter().map(|c| (c.user.as_str(), c.offending.len())).collect::<Vec<_>>(), [("alice", 3)]);
    assert_eq!(e.bystanders, ["bob"]);
    assert_eq!((e.members[1].user.as_str(), e.members[1].other, e.members[1].weight), ("bob", 6, 0));
    assert_eq!(e.samples.iter().filter(|s| s.kind.cause == Cause::Other).count(), SAMPLES_PER_CAUSE);
    let json = serde_json::to_value(&judgement).unwrap();
    assert_eq!(json["verdict"]["verdict"], "spike");
    assert_eq!(json["explanation"]["culprits"][0]["user"], "alice");
    assert!(json["explanation"]["significance"].as_f64().unwrap() > 0.0);
}

#[test]
fn below_threshold_is_healthy() {
    let events = [attributed("alice", 30, Cause::Lockdown)];
    assert_eq!(judge_at(35, &events, &BTreeMap::new(), CohortRate::default()).name(), "healthy");
}

#[test]
fn denials_before_promotion_or_outside_the_window_do_not_count() {
    let events: Vec<_> = [-10, -5, -1, 1, 2, 3].map(|m| attributed("alice", m, Cause::Lockdown)).to_vec();
    // At minute 60 the window is 45..60: none of these are in it.
    assert_eq!(judge_at(60, &events, &BTreeMap::new(), CohortRate::default()).name(), "healthy");
    // At minute 5 the window starts at promotion (0): three count.
    assert_eq!(judge_at(5, &events, &BTreeMap::new(), CohortRate::default()).name(), "spike");
}

#[test]
fn other_denials_never_weigh_however_many() {
    // 60 a minute for 15 minutes, an incident hitting both members: counted, not acted on.
    let events: Vec<_> =
        (0..900).map(|i| attributed(if i % 2 == 0 { "alice" } else { "bob" }, 45 + i / 60, Cause::Other)).collect();
    let judgement = assess_at(60, &events, &BTreeMap::new(), CohortRate::default());
    assert_eq!(judgement.verdict.name(), "healthy");
    assert_eq!(judgement.explanation.members.iter().map(|m| m.other).sum::<u64>(), 900);
    assert_eq!(judgement.explanation.bystanders, ["alice", "bob"]);
}

#[test]
fn unknown_denials_at_the_members_own_baseline_are_not_a_spike() {
    // Alice is denied ~40 times an hour anyway; 10 in 15 minutes is her normal.
    let events: Vec<_> = (0..10).map(|m| attributed("alice", 45 + m, Cause::Unknown)).collect();
    let baselines = BTreeMap::from([("alice".to_string(), 40.0)]);
    assert_eq!(judge_at(60, &events, &baselines, CohortRate::default()).name(), "healthy");
    // Without the baseline the same denials are a spike.
    assert_eq!(judge_at(60, &events, &BTreeMap::new(), CohortRate::default()).name(), "spike");
}

#[test]
fn an_incident_that_hits_everyone_is_not_the_batchs_fault() {
    let events: Vec<_> =
        (0..12).map(|m| attributed(if m % 2 == 0 { "alice" } else { "bob" }, 45 + m, Cause::Unknown)).collect();
    // The unpromoted cohort sees 30 unknown denials per user-hour right now.
    let cohort = CohortRate { denials: 75, users: 10, hours: 0.25 };
    assert_eq!(judge_at(60, &events, &BTreeMap::new(), cohort).name(), "healthy");
}

/// Bare "Access Denied" with no source recorded, `per_hour` evenly over the window.
fn bare_access_denied(user: &str, per_hour: f64, from: i64, to: i64) -> Vec<DenialEvent> {
    let record = refused("AccessDenied", "Access Denied", None);
    let kind = attribute(&record, &perimeter(), &HashSet::new(), POLICY).unwrap();
    assert_eq!(kind.cause, Cause::Unknown);
    let count = (per_hour * (to - from) as f64 / 60.0).round() as i64;
    (0..count)
        .map(|i| DenialEvent {
            at: t(from) + chrono::Duration::seconds(i * (to - from) * 60 / count.max(1)),
            kind: kind.clone(),
            ..attributed(user, 0, Cause::Unknown)
        })
        .collect()
}

#[test]
fn bare_access_denied_at_the_usual_rate_is_noise_and_at_ten_times_a_spike() {
    let baselines = BTreeMap::from([("alice".to_string(), 20.0)]);
    let usual = bare_access_denied("alice", 20.0, 45, 60);
    assert_eq!(judge_at(60, &usual, &baselines, CohortRate::default()).name(), "healthy");
    let tenfold = bare_access_denied("alice", 200.0, 45, 60);
    let judgement = assess_at(60, &tenfold, &baselines, CohortRate::default());
    assert_eq!(judgement.verdict.name(), "spike", "{:?}", judgement.explanation.members);
    assert_eq!(judgement.explanation.culprits[0].offending.len(), 50);
    assert!(!judgement.explanation.fully_attributed(), "an unknown-cause spike is for an operator to resume");
}

#[test]
fn only_a_spike_of_lockdown_denials_is_fully_attributed() {
    let lockdown: Vec<_> = (0..3).map(|m| attributed("bob", 95 + m, Cause::Lockdown)).collect();
    let judgement = assess_at(100, &lockdown, &BTreeMap::new(), CohortRate::default());
    assert_eq!(judgement.verdict.name(), "spike");
    assert!(judgement.explanation.fully_attributed());
    let quiet = assess_at(100, &[], &BTreeMap::new(), CohortRate::default());
    assert!(!quiet.explanation.fully_attributed(), "no culprit named");
}

#[test]
fn silence_is_inconclusive_but_a_seen_spike_still_wins() {
    let (config, batch, baselines) = (config(), batch(), BTreeMap::new());
    let silent = SourceHealth { last_event_at: Some(t(0)), last_ok_poll: Some(t(100)), error: None };
    let spike: Vec<_> = (0..3).map(|m| attributed("bob", 95 + m, Cause::Lockdown)).collect();
    let verdicts: Vec<Verdict> = [&[][..], &spike[..]]
        .into_iter()
        .map(|events| {
            judge(&Input {
                batch: &batch,
                events,
                baselines: &baselines,
                cohort: CohortRate::default(),
                source: &silent,
                config: &config,
                now: t(100),
            })
        })
        .collect();
    assert!(matches!(&verdicts[0], Verdict::Inconclusive { why } if why.contains("silent for 1h40m")), "{verdicts:?}");
    assert_eq!(verdicts[1].name(), "spike");
}

#[test]
fn failing_source_is_inconclusive() {
    let config = config();
    let failing = SourceHealth {
        last_event_at: Some(t(50)),
        last_ok_poll: Some(t(10)),
        error: Some("ListObjectsV2: throttled".into()),
    };
    let why = source_problem(&failing, &config, t(60)).unwrap();
    assert!(why.contains("failing for 50m") && why.contains("throttled"), "{why}");
    assert!(source_problem(&healthy_source(t(60)), &config, t(60)).is_none());
    assert!(source_problem(&SourceHealth::default(), &config, t(60)).is_some());
}

#[test]
fn a_batch_waits_for_delivery_past_its_soak_plus_the_lag() {
    let lag = Duration::from_secs(300);
    let seen = |minute| SourceHealth { last_event_at: Some(t(minute)), ..healthy_source(t(minute)) };
    let pending = delivery_pending(&seen(33), t(30), lag).unwrap();
    assert_eq!((pending.need_events_after, pending.newest_event), (t(35), Some(t(33))));
    assert!(delivery_pending(&seen(35), t(30), lag).is_some());
    assert!(delivery_pending(&seen(36), t(30), lag).is_none());
    assert!(delivery_pending(&SourceHealth::default(), t(30), lag).is_some());
}

#[test]
fn locked_users_denied_by_the_lockdown_are_reported_with_sources() {
    let with_source = |user, minute, cause, source: &str| DenialEvent {
        source: Some(source.into()),
        ..attributed(user, minute, cause)
    };
    let events = vec![
        with_source("carol", 10, Cause::Lockdown, OUTSIDE),
        with_source("carol", 11, Cause::Lockdown, OUTSIDE),
        with_source("carol", 12, Cause::Lockdown, "vpce-0abc"),
        with_source("carol", 12, Cause::Other, TRUSTED),
        with_source("dave", 12, Cause::Other, TRUSTED),
        with_source("erin", 12, Cause::Lockdown, OUTSIDE),
        with_source("carol", 2, Cause::Lockdown, OUTSIDE),
    ];
    let locked = BTreeSet::from(["carol".to_string(), "dave".to_string()]);
    let watch = watch_locked(&events, &locked, t(5), t(15), AfterSoak::Release);
    assert_eq!(watch.denials_by_cause, BTreeMap::from([(Cause::Lockdown, 3), (Cause::Other, 2)]));
    assert_eq!(watch.reports.len(), 1, "erin is not locked, dave has no lockdown denials");
    let carol = &watch.reports[0];
    assert_eq!((carol.user.as_str(), carol.lockdown_denials.len(), carol.action), ("carol", 3, AfterSoak::Release));
    assert_eq!(carol.sources, BTreeMap::from([(OUTSIDE.to_string(), 2), ("vpce-0abc".to_string(), 1)]));
}

/// A seeded generator (SplitMix64): the simulation must be reproducible.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> f64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Times of a Poisson process at `per_hour` over `from..to` (seconds after t(0)).
    fn arrivals(&mut self, per_hour: f64, from: f64, to: f64) -> Vec<i64> {
        let mut times = Vec::new();
        let mut at = from;
        if per_hour <= 0.0 {
            return times;
        }
        loop {
            at += -(1.0 - self.next()).ln() * 3600.0 / per_hour;
            if at >= to {
                return times;
            }
            times.push(at as i64);
        }
    }

    fn poisson(&mut self, mean: f64) -> u64 {
        self.arrivals(mean, 0.0, 3600.0).len() as u64
    }
}

/// One soak of 10 members judged every poll through soak and grace. Every member gets `unknown`
/// denials at its own usual rate (times `boost` for the first member); member 1 also has 60
/// `other` denials a minute throughout; everyone gets a 5-second incident of `other` denials
/// at soak start. Returns whether any poll saw a spike.
fn simulated_soak(rng: &mut Rng, boost: f64) -> bool {
    const USUAL: [f64; 10] = [6.0, 0.0, 0.5, 2.0, 5.0, 10.0, 20.0, 40.0, 120.0, 240.0];
    const COHORT_USERS: u64 = 50;
    const COHORT_RATE: f64 = 8.0;
    let names: Vec<String> = (0..USUAL.len()).map(|i| format!("user{i}")).collect();
    let members: Vec<&str> = names.iter().map(String::as_str).collect();
    let mut config = config();
    config.grace = Duration::from_secs(10 * 60);
    let batch = batch_of(&members, 30);
    let end = (30.0 + 10.0) * 60.0;
    let event = |user: &str, second: i64, cause| DenialEvent {
        at: t(0) + chrono::Duration::seconds(second),
        ..attributed(user, 0, cause)
    };
    let mut events = Vec::new();
    for (i, user) in members.iter().enumerate() {
        let rate = if i == 0 { USUAL[i] * boost } else { USUAL[i] };
        events.extend(rng.arrivals(rate, 0.0, end).into_iter().map(|s| event(user, s, Cause::Unknown)));
        events.extend((0..5).map(|s| event(user, s, Cause::Other)));
    }
    events.extend(rng.arrivals(3600.0, 0.0, end).into_iter().map(|s| event(members[1], s, Cause::Other)));
    events.sort_by_key(|e| e.at);
    let baselines: BTreeMap<String, f64> = names.iter().cloned().zip(USUAL).collect();
    (1..=40).any(|minute| {
        let now = t(minute);
        let hours = (minute.min(15) as f64) / 60.0;
        let cohort =
            CohortRate { denials: rng.poisson(COHORT_RATE * COHORT_USERS as f64 * hours), users: COHORT_USERS, hours };
        let source = healthy_source(now);
        judge(&Input {
            batch: &batch,
            events: &events,
            baselines: &baselines,
            cohort,
            source: &source,
            config: &config,
            now,
        })
        .name()
            == "spike"
    })
}

/// The false-alarm bound in practice: pure noise (every member at its usual `unknown` rate, a
/// member with 60 `other` denials a minute, an incident of `other` denials for everyone) makes
/// at most one spike in 1,000 soaks, while one member at ten times its usual rate is caught.
#[test]
fn pure_noise_makes_at_most_one_false_spike_in_a_thousand_soaks() {
    let mut rng = Rng(0x5EED_0008);
    let false_spikes = (0..1000).filter(|_| simulated_soak(&mut rng, 1.0)).count();
    assert!(false_spikes <= 1, "{false_spikes} false spikes in 1,000 soaks of pure noise");
    let caught = (0..100).filter(|_| simulated_soak(&mut rng, 10.0)).count();
    assert!(caught >= 90, "a member at 10x its usual rate was caught in only {caught} of 100 soaks");
}
