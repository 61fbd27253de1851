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

/// `count` users under /directory/, each tagged with its team (and every third one exempt), in
/// one of three groups.
async fn create_users(count: usize) -> aws_sdk_iam::Client {
    let iam = aws_sdk_iam::Client::new(&common::sdk_config());
    for group in ["dir-red", "dir-green", "dir-blue"] {
        iam.create_group().group_name(group).send().await.unwrap();
    }
    for i in 0..count {
        let name = format!("dir-user-{i:04}");
        let team = aws_sdk_iam::types::Tag::builder().key("team").value(format!("team-{}", i % 7)).build().unwrap();
        let mut create = iam.create_user().user_name(&name).path("/directory/").tags(team);
        if i % 3 == 0 {
            create =
                create.tags(aws_sdk_iam::types::Tag::builder().key("lockstep-exempt").value("true").build().unwrap());
        }
        create.send().await.unwrap();
        let group = ["dir-red", "dir-green", "dir-blue"][i % 3];
        iam.add_user_to_group().group_name(group).user_name(&name).send().await.unwrap();
    }
    iam
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_directory_of_hundreds_of_users_is_read_in_a_handful_of_pages_and_the_calls_are_counted() {
    let _guard = common::exclusive().await;
    common::reset();
    create_users(350).await;
    let (url, pager) = Pager::start(100, false).await;
    let metrics = Metrics::new();
    let iam = MeteredIam::new(AwsIam::new(&common::lockstep_sdk(&url).await, common::ACCOUNT), metrics.clone());

    let directory = iam.list_users().await.unwrap();

    assert_eq!(directory.users.len(), 350);
    assert_eq!(directory.iam_calls, 4, "350 users in pages of 100");
    assert_eq!(pager.requests(), ["1000"; 4], "every page asks for IAM's maximum of 1,000 users");
    let text = metrics.render();
    for line in
        ["lockstep_directory_iam_calls 4", "lockstep_iam_calls_total{operation=\"GetAccountAuthorizationDetails\"} 4"]
    {
        assert!(text.contains(line), "{line} missing from\n{text}");
    }
    let by_name: BTreeMap<&str, _> = directory.users.iter().map(|u| (u.name.as_str(), u)).collect();
    assert_eq!(by_name.len(), 350, "no user twice");
    let user = by_name["dir-user-0123"];
    assert_eq!(user.path, "/directory/");
    assert_eq!(user.arn, "arn:aws:iam::123456789012:user/directory/dir-user-0123");
    assert_eq!(user.tags.get("team").map(String::as_str), Some("team-4"));
    assert_eq!(user.tags.get("lockstep-exempt").map(String::as_str), Some("true"));
    assert!(!by_name["dir-user-0124"].tags.contains_key("lockstep-exempt"));
    assert_eq!(directory.users.iter().filter(|u| u.tags.contains_key("lockstep-exempt")).count(), 117);

    // A second read is counted afresh: the gauge is per read, the counter adds up.
    iam.list_users().await.unwrap();
    let text = metrics.render();
    assert!(text.contains("lockstep_directory_iam_calls 4"), "{text}");
    assert!(text.contains("lockstep_iam_calls_total{operation=\"GetAccountAuthorizationDetails\"} 8"), "{text}");

    // Straight from moto (one page): the same users in one call.
    let direct = AwsIam::new(&common::lockstep_sdk(&common::endpoint()).await, common::ACCOUNT);
    let whole = direct.list_users().await.unwrap();
    assert_eq!(whole.iam_calls, 1);
    assert_eq!(whole.users.len(), 350);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_page_is_a_clear_error_naming_the_page_and_the_user() {
    let _guard = common::exclusive().await;
    common::reset();
    create_users(30).await;
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
