//! Webhook notifications: a JSON POST to `listeners.webhook_url` when a batch is rolled back,
//! the rollout is paused, a wave finishes, or a locked user gets new lockdown denials. Sent in
//! the background with a timeout; a receiver that is down is logged and never holds up the
//! controller.

use std::time::Duration;

use chrono::{DateTime, Utc};
use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Request, Uri};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde::Serialize;

use crate::controller::{Mode, StepReport};
use crate::guard::{Explanation, LockedUserReport};
use crate::planner::Action;
use crate::rollout::Snapshot;

const TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    Rollback {
        at: DateTime<Utc>,
        batch: i64,
        /// Every member: all leave the group.
        users: Vec<String>,
        reason: String,
        /// Members not at fault: back in the eligible pool after `guard.requeue_after`.
        #[serde(default)]
        not_at_fault: Vec<String>,
        /// The guard's explanation (counts per cause, expectation, threshold, samples,
        /// culprits with their offending calls); none for an operator's rollback.
        #[serde(skip_serializing_if = "Option::is_none")]
        explanation: Option<Box<Explanation>>,
    },
    Pause {
        at: DateTime<Utc>,
        by: String,
        reason: String,
    },
    WaveFinished {
        at: DateTime<Utc>,
        wave: String,
        why: String,
    },
    /// A locked user past its soak got new `lockdown` denials: breakage, or the lock doing its
    /// job. Its recent denied calls with their sources, and what `guard.after_soak` does.
    LockedUserDenied {
        /// When the step saw the new denials.
        at: DateTime<Utc>,
        /// The user, its recent denied calls with sources, and the `guard.after_soak` action.
        #[serde(flatten)]
        report: LockedUserReport,
    },
}

/// What a committed step did that people want to hear about. `before` is the ledger before the
/// step, for the members of rolled-back batches.
pub fn events(report: &StepReport, before: &Snapshot) -> Vec<Event> {
    if report.mode != Mode::Commit {
        return Vec::new();
    }
    let mut events = Vec::new();
    for action in &report.plan.actions {
        match action {
            Action::RollBack { batch, reason } => {
                let users = before.batch(*batch).map(|b| b.members.clone()).unwrap_or_default();
                let explanation = report.explanations.get(batch).cloned();
                let not_at_fault = explanation.as_ref().map(|e| e.not_at_fault().to_vec()).unwrap_or_default();
                events.push(Event::Rollback {
                    at: report.at,
                    batch: *batch,
                    users,
                    reason: reason.clone(),
                    not_at_fault,
                    explanation: explanation.map(Box::new),
                });
                let pauses = explanation_pauses(report.explanations.get(batch));
                if pauses && before.paused.is_none() {
                    events.push(Event::Pause {
                        at: report.at,
                        by: "controller".to_string(),
                        reason: format!("batch {batch} rolled back by the guard"),
                    });
                }
            }
            Action::FinishWave { wave, why } => {
                events.push(Event::WaveFinished { at: report.at, wave: wave.clone(), why: why.clone() })
            }
            _ => {}
        }
    }
    for locked in report.locked.reports.iter().filter(|r| report.locked_alerts.contains(&r.user)) {
        events.push(Event::LockedUserDenied { at: report.at, report: locked.clone() });
    }
    events
}

/// Whether a guard rollback on this explanation pauses the rollout (see
/// [`Explanation::fully_attributed`]).
fn explanation_pauses(explanation: Option<&Explanation>) -> bool {
    explanation.is_none_or(|e| !e.fully_attributed())
}

/// An event as posted: the event's fields, and the account it happened in.
#[derive(Serialize)]
struct Posted<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    account: Option<&'a str>,
    #[serde(flatten)]
    event: &'a Event,
}

#[derive(Clone)]
pub struct Webhook {
    url: Uri,
    /// The account every event is about, posted beside the event's own fields.
    account: Option<String>,
    client: Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>,
}

#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    #[error("webhook URL {url:?}: {why}")]
    Url { url: String, why: String },
    #[error("webhook: no TLS roots: {0}")]
    Tls(std::io::Error),
}

impl Webhook {
    pub fn new(url: &str) -> Result<Webhook, WebhookError> {
        let parsed: Uri = url.parse().map_err(|e: hyper::http::uri::InvalidUri| WebhookError::Url {
            url: url.to_string(),
            why: e.to_string(),
        })?;
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_native_roots()
            .map_err(WebhookError::Tls)?
            .https_or_http()
            .enable_http1()
            .build();
        Ok(Webhook { url: parsed, account: None, client: Client::builder(TokioExecutor::new()).build(connector) })
    }

    /// The webhook of one account's runtime: every event it posts names the account.
    pub fn for_account(self, account: &str) -> Webhook {
        Webhook { account: Some(account.to_string()), ..self }
    }

    /// Posts `event` in the background.
    pub fn send(&self, event: Event) {
        let this = self.clone();
        tokio::spawn(async move {
            if let Err(why) = this.post(&event).await {
                tracing::warn!(%why, url = %this.url, "webhook notification failed");
            }
        });
    }

    pub async fn post(&self, event: &Event) -> Result<(), String> {
        let body =
            serde_json::to_vec(&Posted { account: self.account.as_deref(), event }).map_err(|e| e.to_string())?;
        let request = Request::post(self.url.clone())
            .header("content-type", "application/json")
            .header("user-agent", concat!("lockstep/", env!("CARGO_PKG_VERSION")))
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| e.to_string())?;
        let response = tokio::time::timeout(TIMEOUT, self.client.request(request))
            .await
            .map_err(|_| format!("no answer within {}s", TIMEOUT.as_secs()))?
            .map_err(|e| e.to_string())?;
        if response.status().is_success() { Ok(()) } else { Err(format!("receiver answered {}", response.status())) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn posts_the_event_as_json() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/hook", listener.local_addr().unwrap());
        let received = tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.unwrap();
            let mut raw = Vec::new();
            let mut chunk = [0u8; 4096];
            while !String::from_utf8_lossy(&raw).contains("\"wave\":\"canary\"") {
                let n = socket.read(&mut chunk).await.unwrap();
                raw.extend_from_slice(&chunk[..n]);
            }
            socket.write_all(b"HTTP/1.1 204 No Content\r\ncontent-length: 0\r\n\r\n").await.unwrap();
            String::from_utf8_lossy(&raw).into_owned()
        });
        let event = Event::WaveFinished {
            at: chrono::DateTime::UNIX_EPOCH,
            wave: "canary".into(),
            why: "all 1 batches done".into(),
        };
        Webhook::new(&url).unwrap().for_account("111122223333").post(&event).await.unwrap();
        let request = received.await.unwrap();
        assert!(request.starts_with("POST /hook HTTP/1.1"), "{request}");
        assert!(request.contains("\"event\":\"wave_finished\""), "{request}");
        assert!(request.contains("\"account\":\"111122223333\""), "{request}");
    }

    /// A step report at the epoch with these actions and nothing else.
    fn step_report(mode: Mode, actions: Vec<Action>) -> StepReport {
        use crate::planner::{Gate, Plan};
        StepReport {
            at: chrono::DateTime::UNIX_EPOCH,
            mode,
            plan: Plan {
                gate: Gate::Open,
                current_wave: None,
                actions,
                waiting: vec![],
                users: Default::default(),
                forecast: Default::default(),
            },
            verdicts: Default::default(),
            iam_writes: vec![],
            drift: vec![],
            errors: vec![],
            explanations: Default::default(),
            future_events: 0,
            locked: Default::default(),
            locked_denials_new: Default::default(),
            locked_alerts: vec![],
            exemptions_expiring_soon: 0,
        }
    }

    #[test]
    fn committed_rollbacks_and_finished_waves_become_events() {
        use crate::rollout::{Batch, BatchState};
        let at = chrono::DateTime::UNIX_EPOCH;
        let actions = vec![
            Action::RollBack { batch: 3, reason: "guard: spike".into() },
            Action::FinishWave { wave: "canary".into(), why: "done".into() },
            Action::Succeed { batch: 2, detail: "healthy".into() },
        ];
        let report = |mode: Mode| step_report(mode, actions.clone());
        let mut before = Snapshot::default();
        before.batches.push(Batch {
            id: 3,
            wave: "canary".into(),
            state: BatchState::Soaking,
            members: vec!["ann".into()],
            created_at: at,
            applied_at: Some(at),
            soak_until: None,
            finished_at: None,
            verdict: None,
            soak: None,
            verdict_kind: None,
        });
        let events = events(&report(Mode::Commit), &before);
        assert_eq!(events.len(), 3);
        assert!(matches!(&events[0], Event::Rollback { batch: 3, users, .. } if users == &["ann"]));
        assert!(matches!(&events[1], Event::Pause { by, .. } if by == "controller"));
        assert!(matches!(&events[2], Event::WaveFinished { wave, .. } if wave == "canary"));
        assert!(super::events(&report(Mode::DryRun), &before).is_empty(), "a dry run notifies nobody");
    }

    #[test]
    fn a_locked_user_with_new_lockdown_denials_is_one_event_with_its_sources() {
        use crate::config::AfterSoak;
        use crate::guard::{LockedUserReport, LockedWatch};
        let at = chrono::DateTime::UNIX_EPOCH;
        let locked = |user: &str| LockedUserReport {
            user: user.into(),
            lockdown_denials: vec![],
            sources: [("198.51.100.77".to_string(), 4)].into(),
            action: AfterSoak::Alert,
            denied: 4,
        };
        let report = StepReport {
            locked: LockedWatch { denials_by_cause: Default::default(), reports: vec![locked("ann"), locked("ben")] },
            // ben's denials were all seen before: already notified.
            locked_alerts: vec!["ann".into()],
            ..step_report(Mode::Commit, vec![])
        };
        let events = events(&report, &Snapshot::default());
        assert_eq!(events, [Event::LockedUserDenied { at, report: locked("ann") }]);
        let json = serde_json::to_string(&events[0]).unwrap();
        assert!(json.contains("\"event\":\"locked_user_denied\"") && json.contains("198.51.100.77"), "{json}");
    }

    #[tokio::test]
    async fn a_receiver_that_is_down_is_an_error_not_a_hang() {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let event = Event::Pause { at: chrono::DateTime::UNIX_EPOCH, by: "ops".into(), reason: "x".into() };
        assert!(Webhook::new(&format!("http://127.0.0.1:{port}/")).unwrap().post(&event).await.is_err());
        assert!(Webhook::new("not a url").is_err());
    }
}
