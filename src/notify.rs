//! Webhook notifications: a JSON POST to `listeners.webhook_url` when a batch is rolled back,
//! the rollout is paused, or a wave finishes. Sent in the background with a timeout; a receiver
//! that is down is logged and never holds up the controller.

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
use crate::guard::Explanation;
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
                if before.paused.is_none() {
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
    events
}

#[derive(Clone)]
pub struct Webhook {
    url: Uri,
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
        Ok(Webhook { url: parsed, client: Client::builder(TokioExecutor::new()).build(connector) })
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
        let body = serde_json::to_vec(event).map_err(|e| e.to_string())?;
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
        Webhook::new(&url).unwrap().post(&event).await.unwrap();
        let request = received.await.unwrap();
        assert!(request.starts_with("POST /hook HTTP/1.1"), "{request}");
        assert!(request.contains("\"event\":\"wave_finished\""), "{request}");
    }

    #[test]
    fn committed_rollbacks_and_finished_waves_become_events() {
        use crate::planner::{Gate, Plan};
        use crate::rollout::{Batch, BatchState};
        let at = chrono::DateTime::UNIX_EPOCH;
        let report = |mode: Mode| StepReport {
            at,
            mode,
            plan: Plan {
                gate: Gate::Open,
                current_wave: None,
                actions: vec![
                    Action::RollBack { batch: 3, reason: "guard: spike".into() },
                    Action::FinishWave { wave: "canary".into(), why: "done".into() },
                    Action::Succeed { batch: 2, detail: "healthy".into() },
                ],
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
        };
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

    #[tokio::test]
    async fn a_receiver_that_is_down_is_an_error_not_a_hang() {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let event = Event::Pause { at: chrono::DateTime::UNIX_EPOCH, by: "ops".into(), reason: "x".into() };
        assert!(Webhook::new(&format!("http://127.0.0.1:{port}/")).unwrap().post(&event).await.is_err());
        assert!(Webhook::new("not a url").is_err());
    }
}
