//! A fault-injecting HTTP proxy between the SDK and the emulator (which injects no faults of
//! its own). It answers a request with IAM's `Throttling` error, a 5xx, or no answer at all
//! (the connection dropped before or after relaying it), or relays it after a delay; either the
//! first `times` requests are throttled, or every request draws its fate from a seeded
//! generator, or STS refuses every `AssumeRole` into one account (moto grants any role). It records every IAM group write moto accepted, so a test can compare what
//! really reached IAM with what the daemon's audit log says. Each request is relayed on a fresh
//! upstream connection and the client connection is closed after the answer, which keeps the
//! relay to a few lines.

// Each test binary uses part of this module.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use lockstep::clock::{Clock, SystemClock};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

#[derive(Debug, Clone, Copy)]
pub enum Fault {
    /// Answer the first `times` requests with IAM's `Throttling` error (HTTP 400).
    Throttle { times: usize },
    /// Every request draws its faults from a generator seeded with `seed`.
    Random { seed: u64, rates: Rates },
    /// Every request is relayed after this delay, as a slow AWS answers.
    Slow(std::time::Duration),
    /// `sts:AssumeRole` into a role of this account is answered `AccessDenied` (HTTP 403), as
    /// when the role's trust policy does not name the caller; everything else is relayed.
    RefuseAssumeRole { account: &'static str },
}

/// Per-request probabilities of each fault (the error faults are exclusive; latency adds to
/// whatever else happens).
#[derive(Debug, Clone, Copy)]
pub struct Rates {
    pub throttle: f64,
    pub server_error: f64,
    pub drop_before_relay: f64,
    pub drop_after_relay: f64,
    pub latency: f64,
    pub max_latency: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    /// HTTP 400 `Throttling`.
    Throttle,
    /// HTTP 500 `InternalFailure` or 503 `ServiceUnavailable`.
    ServerError,
    /// The connection closed without relaying the request: nothing reached IAM.
    DropBeforeRelay,
    /// Relayed, then the connection closed without the answer: IAM acted, the caller cannot know.
    DropAfterRelay,
    /// Relayed after a delay of up to `max_latency`.
    Latency,
    /// HTTP 403 `AccessDenied` for an `AssumeRole`.
    AccessDenied,
}

/// An IAM group write that moto accepted (HTTP 200).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupWrite {
    /// `AddUserToGroup` or `RemoveUserFromGroup`.
    pub action: String,
    pub group: String,
    pub user: String,
    pub at: DateTime<Utc>,
}

/// splitmix64: a small seeded generator, enough to make fault schedules reproducible.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (`n` > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    /// True with probability `p`.
    pub fn chance(&mut self, p: f64) -> bool {
        ((self.next_u64() >> 11) as f64 / (1u64 << 53) as f64) < p
    }

    pub fn duration_below(&mut self, max: Duration) -> Duration {
        Duration::from_millis(self.below(max.as_millis().max(1) as u64))
    }
}

/// What happens to one request.
#[derive(Debug, Default)]
struct Fate {
    delay: Option<Duration>,
    fault: Option<Kind>,
    /// A server error is a 503 rather than a 500.
    unavailable: bool,
}

enum Schedule {
    Budget(usize),
    Random { rng: Rng, rates: Rates },
    Slow(std::time::Duration),
    RefuseAssumeRole(&'static str),
}

impl Schedule {
    fn draw(&mut self, request: &[u8]) -> Fate {
        match self {
            Schedule::RefuseAssumeRole(account) => {
                let body = String::from_utf8_lossy(request);
                let role_in = [format!("%3A{account}%3Arole"), format!(":{account}:role")];
                let refused = body.contains("Action=AssumeRole") && role_in.iter().any(|r| body.contains(r.as_str()));
                Fate { fault: refused.then_some(Kind::AccessDenied), ..Fate::default() }
            }
            Schedule::Budget(0) => Fate::default(),
            Schedule::Budget(left) => {
                *left -= 1;
                Fate { fault: Some(Kind::Throttle), ..Fate::default() }
            }
            Schedule::Slow(delay) => Fate { delay: Some(*delay), ..Fate::default() },
            Schedule::Random { rng, rates } => {
                let delay = rng.chance(rates.latency).then(|| rng.duration_below(rates.max_latency));
                let roll = (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
                let bands = [
                    (rates.throttle, Kind::Throttle),
                    (rates.server_error, Kind::ServerError),
                    (rates.drop_before_relay, Kind::DropBeforeRelay),
                    (rates.drop_after_relay, Kind::DropAfterRelay),
                ];
                let mut edge = 0.0;
                let fault = bands.into_iter().find_map(|(p, kind)| {
                    edge += p;
                    (roll < edge).then_some(kind)
                });
                Fate { delay, fault, unavailable: rng.chance(0.5) }
            }
        }
    }
}

struct State {
    schedule: Mutex<Schedule>,
    served: Mutex<BTreeMap<Kind, usize>>,
    writes: Mutex<Vec<GroupWrite>>,
}

impl State {
    fn count(&self, kind: Kind) {
        *lock(&self.served).entry(kind).or_default() += 1;
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

pub struct Proxy {
    address: SocketAddr,
    state: Arc<State>,
}

impl Proxy {
    pub async fn start(upstream: &str, fault: Fault) -> Proxy {
        let upstream = upstream.trim_start_matches("http://").to_string();
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind the proxy");
        let address = listener.local_addr().expect("proxy address");
        let schedule = match fault {
            Fault::Throttle { times } => Schedule::Budget(times),
            Fault::Random { seed, rates } => Schedule::Random { rng: Rng::new(seed), rates },
            Fault::Slow(delay) => Schedule::Slow(delay),
            Fault::RefuseAssumeRole { account } => Schedule::RefuseAssumeRole(account),
        };
        let state = Arc::new(State {
            schedule: Mutex::new(schedule),
            served: Mutex::new(BTreeMap::new()),
            writes: Mutex::new(Vec::new()),
        });
        let shared = state.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let (upstream, state) = (upstream.clone(), shared.clone());
                tokio::spawn(async move {
                    let _ = relay(client, &upstream, &state).await;
                });
            }
        });
        Proxy { address, state }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.address)
    }

    /// Error answers and dropped connections served (latency not counted).
    pub fn faults_served(&self) -> usize {
        lock(&self.state.served).iter().filter(|(kind, _)| **kind != Kind::Latency).map(|(_, n)| n).sum()
    }

    /// Every fault served so far, by kind.
    pub fn served_by_kind(&self) -> BTreeMap<Kind, usize> {
        lock(&self.state.served).clone()
    }

    /// The group writes moto accepted, in the order it answered them.
    pub fn group_writes(&self) -> Vec<GroupWrite> {
        lock(&self.state.writes).clone()
    }
}

async fn relay(mut client: TcpStream, upstream: &str, state: &State) -> std::io::Result<()> {
    let Some(request) = read_request(&mut client).await? else {
        return Ok(());
    };
    let fate = lock(&state.schedule).draw(&request);
    if let Some(delay) = fate.delay {
        state.count(Kind::Latency);
        tokio::time::sleep(delay).await;
    }
    if let Some(kind) = fate.fault {
        state.count(kind);
    }
    match fate.fault {
        Some(Kind::Throttle) => {
            return answer_error(&mut client, "400 Bad Request", "Sender", "Throttling", "Rate exceeded").await;
        }
        Some(Kind::ServerError) if !fate.unavailable => {
            return answer_error(&mut client, "500 Internal Server Error", "Receiver", "InternalFailure", "injected")
                .await;
        }
        Some(Kind::ServerError) => {
            return answer_error(&mut client, "503 Service Unavailable", "Receiver", "ServiceUnavailable", "injected")
                .await;
        }
        Some(Kind::AccessDenied) => {
            let message = "User is not authorized to perform: sts:AssumeRole (refused by the test proxy)";
            return answer_error(&mut client, "403 Forbidden", "Sender", "AccessDenied", message).await;
        }
        Some(Kind::DropBeforeRelay) => return Ok(()),
        _ => {}
    }
    let mut server = TcpStream::connect(upstream).await?;
    server.write_all(&request).await?;
    let mut answer = Vec::new();
    server.read_to_end(&mut answer).await?;
    if answer.starts_with(b"HTTP/1.1 200")
        && let Some(write) = group_write(&request)
    {
        lock(&state.writes).push(write);
    }
    if fate.fault == Some(Kind::DropAfterRelay) {
        return Ok(());
    }
    client.write_all(&answer).await
}

async fn answer_error(
    client: &mut TcpStream,
    status: &str,
    kind: &str,
    code: &str,
    message: &str,
) -> std::io::Result<()> {
    let body = format!(
        "<ErrorResponse xmlns=\"https://iam.amazonaws.com/doc/2010-05-08/\"><Error><Type>{kind}</Type>\
         <Code>{code}</Code><Message>{message}</Message></Error><RequestId>fault-proxy</RequestId></ErrorResponse>"
    );
    let answer = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/xml\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    client.write_all(answer.as_bytes()).await
}

/// The group write an IAM query-protocol request makes, if it makes one. Names are taken as
/// sent: the tests use names that need no URL encoding.
fn group_write(request: &[u8]) -> Option<GroupWrite> {
    let at = request.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
    let body = String::from_utf8_lossy(&request[at..]);
    let field =
        |name: &str| body.split('&').find_map(|pair| pair.strip_prefix(name)?.strip_prefix('=')).map(str::to_string);
    let action = field("Action").filter(|a| a == "AddUserToGroup" || a == "RemoveUserFromGroup")?;
    Some(GroupWrite { action, group: field("GroupName")?, user: field("UserName")?, at: SystemClock.now() })
}

/// One request with its `Connection` header replaced by `close`, or `None` at end of stream.
async fn read_request(client: &mut TcpStream) -> std::io::Result<Option<Vec<u8>>> {
    let mut raw = Vec::new();
    let mut chunk = [0u8; 8192];
    let head_end = loop {
        if let Some(at) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
            break at + 4;
        }
        let n = client.read(&mut chunk).await?;
        if n == 0 {
            return Ok(None);
        }
        raw.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&raw[..head_end]).to_string();
    let length: usize = head
        .lines()
        .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().parse().unwrap_or(0)))
        .unwrap_or(0);
    while raw.len() < head_end + length {
        let n = client.read(&mut chunk).await?;
        if n == 0 {
            break;
        }
        raw.extend_from_slice(&chunk[..n]);
    }
    let mut request: Vec<u8> = head
        .trim_end()
        .lines()
        .filter(|l| !l.to_ascii_lowercase().starts_with("connection:"))
        .flat_map(|l| [l.as_bytes(), b"\r\n"].concat())
        .collect();
    request.extend_from_slice(b"Connection: close\r\n\r\n");
    request.extend_from_slice(&raw[head_end..]);
    Ok(Some(request))
}
