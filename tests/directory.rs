//! The IAM user directory read in bulk with `GetAccountAuthorizationDetails` against the
//! emulator: users with their paths and tags, a page at a time, and the calls counted in
//! `lockstep_directory_iam_calls`.
//!
//! moto answers every `GetAccountAuthorizationDetails` in one page (it ignores `MaxItems` and
//! `Marker`), so the tests read it through [`Pager`], a relay that cuts moto's own answer into
//! pages the way IAM does (IAM may return fewer users than `MaxItems` and says `IsTruncated`).
//! Users, paths and tags all come from moto; only the paging is the relay's.

mod common;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use lockstep::iam::{AwsIam, Iam};
use lockstep::metrics::{MeteredIam, Metrics};

/// A relay to moto that pages `GetAccountAuthorizationDetails` answers by `page` users.
#[derive(Clone)]
struct Pager {
    upstream: String,
    page: usize,
    /// Drop the `UserName` of the first user of the second page (a malformed answer).
    corrupt: bool,
    /// `MaxItems` of every paged request, in order.
    asked: Arc<Mutex<Vec<String>>>,
}

impl Pager {
    async fn start(page: usize, corrupt: bool) -> (String, Pager) {
        let pager = Pager { upstream: common::endpoint(), page, corrupt, asked: Arc::default() };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let app = axum::Router::new().fallback(relay).with_state(pager.clone());
        tokio::spawn(async move { axum::serve(listener, app).await });
        (url, pager)
    }

    fn requests(&self) -> Vec<String> {
        self.asked.lock().unwrap().clone()
    }
}

/// Relays the request to moto; pages a `GetAccountAuthorizationDetails` answer.
async fn relay(State(pager): State<Pager>, headers: HeaderMap, body: Bytes) -> (StatusCode, HeaderMap, Bytes) {
    let form: BTreeMap<String, String> = String::from_utf8_lossy(&body)
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let mut request = hyper::Request::post(format!("{}/", pager.upstream));
    for (name, value) in headers.iter().filter(|(name, _)| *name != "host" && *name != "connection") {
        request = request.header(name, value);
    }
    // One connection per request, closed after it: nothing lingers between tests.
    request = request.header("connection", "close");
    let client = Client::builder(TokioExecutor::new()).pool_max_idle_per_host(0).build_http::<Full<Bytes>>();
    let answer = client.request(request.body(Full::new(body.clone())).unwrap()).await.unwrap();
    let (parts, answer) = answer.into_parts();
    let answer = answer.collect().await.unwrap().to_bytes();
    let mut headers = parts.headers;
    headers.remove("content-length");
    if form.get("Action").map(String::as_str) != Some("GetAccountAuthorizationDetails") {
        return (parts.status, headers, answer);
    }
    pager.asked.lock().unwrap().push(form.get("MaxItems").cloned().unwrap_or_default());
    let offset: usize = form.get("Marker").map_or(0, |m| m.parse().unwrap());
    let paged = page_of(&String::from_utf8_lossy(&answer), offset, pager.page, pager.corrupt);
    (parts.status, headers, Bytes::from(paged))
}

/// moto's answer with only users `offset..offset + size` and, if more follow, `IsTruncated`
/// and the next offset as the marker.
fn page_of(xml: &str, offset: usize, size: usize, corrupt: bool) -> String {
    let (open, close) = ("<UserDetailList>", "</UserDetailList>");
    let start = xml.find(open).expect("a user list") + open.len();
    let end = xml.find(close).expect("a user list");
    let users = top_level_members(&xml[start..end]);
    let mut page: Vec<String> = users.iter().skip(offset).take(size).cloned().collect();
    if corrupt && offset == size {
        page[0] = page[0].replacen("<UserName>", "<Nickname>", 1).replacen("</UserName>", "</Nickname>", 1);
    }
    let more = offset + size < users.len();
    let tail =
        if more { format!("<IsTruncated>true</IsTruncated><Marker>{}</Marker>", offset + size) } else { String::new() };
    let rest = xml[end..].replacen("<IsTruncated>false</IsTruncated>", &tail, 1);
    format!("{}{}{rest}", &xml[..start], page.concat())
}

/// The `<member>` elements of a list, not those nested in them (a user's groups and tags).
fn top_level_members(list: &str) -> Vec<String> {
    let (mut members, mut depth, mut from, mut at) = (Vec::new(), 0, 0, 0);
    while at < list.len() {
        let rest = &list[at..];
        if rest.starts_with("<member>") {
            if depth == 0 {
                from = at;
            }
            depth += 1;
            at += "<member>".len();
        } else if rest.starts_with("</member>") {
            depth -= 1;
            at += "</member>".len();
            if depth == 0 {
                members.push(list[from..at].to_string());
            }
        } else {
            at += rest.chars().next().map_or(1, char::len_utf8);
        }
    }
    members
}

/// `count` users `<prefix>-NNNN` under `/<prefix>/`, each tagged with its team (and every third
/// one exempt), in one of three groups. The emulator is shared by the binary's tests and never
/// reset, so each test has its own prefix and counts only its own users.
async fn create_users(prefix: &str, count: usize) {
    let iam = aws_sdk_iam::Client::new(&common::sdk_config());
    let groups: Vec<String> = ["red", "green", "blue"].iter().map(|g| format!("{prefix}-{g}")).collect();
    for group in &groups {
        iam.create_group().group_name(group).send().await.unwrap();
    }
    for i in 0..count {
        let name = format!("{prefix}-{i:04}");
        let team = aws_sdk_iam::types::Tag::builder().key("team").value(format!("team-{}", i % 7)).build().unwrap();
        let mut create = iam.create_user().user_name(&name).path(format!("/{prefix}/")).tags(team);
        if i % 3 == 0 {
            create =
                create.tags(aws_sdk_iam::types::Tag::builder().key("lockstep-exempt").value("true").build().unwrap());
        }
        create.send().await.unwrap();
        iam.add_user_to_group().group_name(&groups[i % 3]).user_name(&name).send().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_directory_of_hundreds_of_users_is_read_in_a_handful_of_pages_and_the_calls_are_counted() {
    // Exclusive: the other test's users must not appear between the two reads below.
    let _guard = common::exclusive().await;
    create_users("bulk", 350).await;
    // Straight from moto (which never pages): every user of the account in one call.
    let direct = AwsIam::new(&common::lockstep_sdk(&common::endpoint()).await, common::ACCOUNT);
    let whole = direct.list_users().await.unwrap();
    assert_eq!(whole.iam_calls, 1);
    let pages = whole.users.len().div_ceil(100) as u64;
    assert!((4..=5).contains(&pages), "350 users and at most the other test's 30: {pages} pages");

    let (url, pager) = Pager::start(100, false).await;
    let metrics = Metrics::new();
    let iam = MeteredIam::new(AwsIam::new(&common::lockstep_sdk(&url).await, common::ACCOUNT), metrics.clone());
    let directory = iam.list_users().await.unwrap();

    assert_eq!(directory.iam_calls, pages, "{} users in pages of 100", whole.users.len());
    assert_eq!(directory.users, whole.users, "the pages hold the same users, tags and paths");
    assert_eq!(pager.requests(), vec!["1000"; pages as usize], "every page asks for IAM's maximum of 1,000 users");
    let text = metrics.render();
    for line in [
        format!("lockstep_directory_iam_calls {pages}"),
        format!("lockstep_iam_calls_total{{operation=\"GetAccountAuthorizationDetails\"}} {pages}"),
    ] {
        assert!(text.contains(&line), "{line} missing from\n{text}");
    }
    let ours: BTreeMap<&str, _> =
        directory.users.iter().filter(|u| u.path == "/bulk/").map(|u| (u.name.as_str(), u)).collect();
    assert_eq!(ours.len(), 350);
    let user = ours["bulk-0123"];
    assert_eq!(user.arn, "arn:aws:iam::123456789012:user/bulk/bulk-0123");
    assert_eq!(user.tags.get("team").map(String::as_str), Some("team-4"));
    assert_eq!(user.tags.get("lockstep-exempt").map(String::as_str), Some("true"));
    assert!(!ours["bulk-0124"].tags.contains_key("lockstep-exempt"));
    assert_eq!(ours.values().filter(|u| u.tags.contains_key("lockstep-exempt")).count(), 117);

    // A second read is counted afresh: the gauge is per read, the counter adds up.
    iam.list_users().await.unwrap();
    let text = metrics.render();
    assert!(text.contains(&format!("lockstep_directory_iam_calls {pages}")), "{text}");
    let total = format!("lockstep_iam_calls_total{{operation=\"GetAccountAuthorizationDetails\"}} {}", 2 * pages);
    assert!(text.contains(&total), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_page_is_a_clear_error_naming_the_page_and_the_user() {
    let _guard = common::exclusive().await;
    create_users("odd", 30).await;
    let (url, _pager) = Pager::start(10, true).await;
    let metrics = Metrics::new();
    let iam = MeteredIam::new(AwsIam::new(&common::lockstep_sdk(&url).await, common::ACCOUNT), metrics.clone());

    let error = iam.list_users().await.unwrap_err();

    assert_eq!(error.operation, "GetAccountAuthorizationDetails");
    assert_eq!(error.code, "InvalidAnswer");
    assert_eq!(error.message, "page 2: user #1: no UserName");
    let text = metrics.render();
    assert!(
        text.contains(
            "lockstep_iam_errors_total{code=\"InvalidAnswer\",operation=\"GetAccountAuthorizationDetails\"} 1"
        ),
        "{text}"
    );
}
