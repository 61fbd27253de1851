//! A fault-injecting HTTP proxy between the SDK and the emulator (which injects no faults of
//! its own): it answers the first requests with an error, then relays the rest to moto. Each
//! request is relayed on a fresh upstream connection and the client connection is closed after
//! the answer, which keeps the relay to a few lines.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

#[derive(Debug, Clone, Copy)]
pub enum Fault {
    /// Answer the first `times` requests with IAM's `Throttling` error (HTTP 400).
    Throttle { times: usize },
}

pub struct Proxy {
    address: SocketAddr,
    served: Arc<AtomicUsize>,
}

impl Proxy {
    pub async fn start(upstream: &str, fault: Fault) -> Proxy {
        let upstream = upstream.trim_start_matches("http://").to_string();
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind the proxy");
        let address = listener.local_addr().expect("proxy address");
        let served = Arc::new(AtomicUsize::new(0));
        let Fault::Throttle { times } = fault;
        let budget = Arc::new(AtomicUsize::new(times));
        let counter = served.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let (upstream, budget, counter) = (upstream.clone(), budget.clone(), counter.clone());
                tokio::spawn(async move {
                    let _ = relay(client, &upstream, &budget, &counter).await;
                });
            }
        });
        Proxy { address, served }
    }

    /// Relays every request to the emulator after `latency`, as a slow AWS answers.
    #[allow(dead_code)] // each test binary compiles this module; not all of them use every fault
    pub async fn start_slow(upstream: &str, latency: std::time::Duration) -> Proxy {
        let upstream = upstream.trim_start_matches("http://").to_string();
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind the proxy");
        let address = listener.local_addr().expect("proxy address");
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let upstream = upstream.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(latency).await;
                    let _ = relay(client, &upstream, &AtomicUsize::new(0), &AtomicUsize::new(0)).await;
                });
            }
        });
        Proxy { address, served: Arc::new(AtomicUsize::new(0)) }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.address)
    }

    pub fn faults_served(&self) -> usize {
        self.served.load(Ordering::SeqCst)
    }
}

async fn relay(mut client: TcpStream, upstream: &str, budget: &AtomicUsize, served: &AtomicUsize) -> std::io::Result<()> {
    let Some(request) = read_request(&mut client).await? else {
        return Ok(());
    };
    let take_fault = budget.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |left| left.checked_sub(1)).is_ok();
    if take_fault {
        served.fetch_add(1, Ordering::SeqCst);
        let body = "<ErrorResponse xmlns=\"https://iam.amazonaws.com/doc/2010-05-08/\"><Error><Type>Sender</Type>\
                    <Code>Throttling</Code><Message>Rate exceeded</Message></Error><RequestId>fault-proxy</RequestId></ErrorResponse>";
        let answer = format!(
            "HTTP/1.1 400 Bad Request\r\nContent-Type: text/xml\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        return client.write_all(answer.as_bytes()).await;
    }
    let mut server = TcpStream::connect(upstream).await?;
    server.write_all(&request).await?;
    let mut answer = Vec::new();
    server.read_to_end(&mut answer).await?;
    client.write_all(&answer).await
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
