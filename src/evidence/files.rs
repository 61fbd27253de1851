//! Trail files: a local folder as a [`TrailObjects`] source, and the reader shared by the folder
//! and the S3 bucket.
//!
//! In CloudTrail's layout (`AWSLogs/[<org-id>/]<account>/CloudTrail/<region>/YYYY/MM/DD/`) the
//! reader lists one day prefix at a time, resuming after the last file read there, so that a
//! refresh touches only new objects. Any other folder of trail files is listed whole. Files are
//! fetched several at a time and decompressed, parsed and aggregated in parallel on the rayon
//! pool; results come back in key order so the caller can record them in order. Corrupt files
//! and records are logged and counted, never fatal.

use std::collections::{HashMap, HashSet, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use chrono::{DateTime, Days, TimeDelta, Utc};
use tokio::task::JoinHandle;

use crate::evidence::aggregate::{Aggregates, Judge, hour_of};
use crate::evidence::{CallGroup, SourceError, TrailObjects};
use crate::trail::{self, Position};

/// Files fetched ahead of the one being recorded: enough to hide S3 latency and keep every core
/// parsing, few enough to bound memory.
const IN_FLIGHT: usize = 16;

/// Records are delivered some minutes after the call, possibly into the next day's prefix.
const DELIVERY_SLACK: TimeDelta = TimeDelta::hours(1);

/// What one trail file contributed.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TrailFile {
    /// The object key, relative to the source's root.
    pub key: String,
    /// Size as stored (compressed).
    pub bytes: u64,
    /// Records parsed, whoever made them.
    pub records: u64,
    /// Malformed records, and records without a usable `eventTime`.
    pub skipped: u64,
    /// Records whose `eventID` an earlier file already had, in this read or (within the
    /// store's dedup horizon) an earlier one (CloudTrail delivers at least once); not aggregated
    /// again.
    pub duplicates: u64,
    /// Why the file as a whole could not be read (unreadable entry, too large, bad gzip, not
    /// trail data).
    pub error: Option<String>,
    /// What the file's records add to the evidence.
    pub aggregates: Aggregates,
    /// The events this file contributed, for deduplication across reads (kept in the store).
    pub event_ids: Vec<EventKey>,
}

/// One aggregated event as the store remembers it to count a later copy once: the hour of its
/// `eventTime` (for pruning) and a stable 64-bit hash of its `eventID`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EventKey {
    /// The hour of the event's `eventTime`.
    pub hour: DateTime<Utc>,
    /// [`event_id_hash`] of its `eventID`.
    pub id: u64,
}

/// A stable hash of an `eventID` (FNV-1a, 64 bits): the same in every process and release, so
/// the store can hold 8 bytes per event instead of the ID. IDs are random UUIDs that no one
/// writing trail files can predict, so a forged ID can only hide a copy of an event it copies.
pub fn event_id_hash(id: &str) -> u64 {
    id.bytes().fold(0xcbf2_9ce4_8422_2325, |hash, byte| (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3))
}

/// One prefix to list. `ordered` prefixes (a CloudTrail day prefix) list in delivery order, so
/// listing can resume after the last file read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ScanPrefix {
    pub prefix: String,
    pub ordered: bool,
}

/// The prefixes that may hold files delivered for `[since, until)`: the account's day prefixes
/// in every region (plain or organisation trail), or the whole source when it is not in
/// CloudTrail's layout.
pub(crate) async fn scan_prefixes<T: TrailObjects>(
    objects: &T,
    account_id: &str,
    since: DateTime<Utc>,
    until: DateTime<Utc>,
) -> Result<Vec<ScanPrefix>, SourceError> {
    let top = objects.list_prefixes("").await?;
    if !top.iter().any(|p| p == "AWSLogs/") {
        return Ok(vec![ScanPrefix { prefix: String::new(), ordered: false }]);
    }
    let mut roots = vec![format!("AWSLogs/{account_id}/CloudTrail/")];
    for org in objects.list_prefixes("AWSLogs/").await? {
        if org.strip_prefix("AWSLogs/").is_some_and(|id| id.starts_with("o-")) {
            roots.push(format!("{org}{account_id}/CloudTrail/"));
        }
    }
    let days = days(since, until + DELIVERY_SLACK);
    let mut scans = Vec::new();
    for root in roots {
        for region in objects.list_prefixes(&root).await? {
            scans.extend(
                days.iter()
                    .map(|day| ScanPrefix { prefix: format!("{region}{}/", day.format("%Y/%m/%d")), ordered: true }),
            );
        }
    }
    Ok(scans)
}

/// Every UTC date from `since` to `until`, both included.
fn days(since: DateTime<Utc>, until: DateTime<Utc>) -> Vec<chrono::NaiveDate> {
    let (mut day, last) = (since.date_naive(), until.date_naive());
    let mut days = Vec::new();
    while day <= last {
        days.push(day);
        let Some(next) = day.checked_add_days(Days::new(1)) else { break };
        day = next;
    }
    days
}

/// Where to resume listing an ordered prefix whose last file read is `last_read`. CloudTrail
/// names files `<account>_CloudTrail_<region>_<YYYYMMDDTHHmmZ>_<random>.json.gz` by delivery
/// minute, so a file delivered in that same minute may sort before the last one read: listing
/// resumes before the minute, and the caller drops files it has already read.
pub(crate) fn resume_after(last_read: &str) -> &str {
    let name_start = last_read.rfind('/').map_or(0, |i| i + 1);
    match last_read[name_start..].rfind('_') {
        Some(at) => &last_read[..name_start + at],
        None => last_read,
    }
}

/// Whether a listed key is trail data (digests, manifests and other objects are not).
pub fn is_trail_key(key: &str) -> bool {
    trail::is_trail_file_name(key)
}

/// Fetches, parses and aggregates `keys`, handing each file to `on_file` in key order. A file
/// that cannot be fetched for now stops the read (it must be retried, not marked read); a file
/// that can never be read (see [`SourceError::Unreadable`]), is over `max_inflated` bytes
/// inflated, or is corrupt is handed over with its `error` set. An event present in several
/// files of one read, or among the `seen` events of earlier reads, is aggregated once.
pub async fn read_files<T, E>(
    objects: Arc<T>,
    keys: Vec<String>,
    judge: Arc<Judge>,
    max_inflated: u64,
    seen: SeenEvents,
    mut on_file: impl FnMut(TrailFile) -> Result<(), E>,
) -> Result<(), E>
where
    T: TrailObjects + 'static,
    E: From<SourceError>,
{
    let reader = Arc::new(Reader { judge, max_inflated, seen });
    let mut pending = InFlight(VecDeque::with_capacity(IN_FLIGHT));
    let mut keys = keys.into_iter();
    loop {
        while pending.0.len() < IN_FLIGHT {
            let Some(key) = keys.next() else { break };
            pending.0.push_back(tokio::spawn(fetch_and_read(objects.clone(), key, reader.clone())));
        }
        let Some(next) = pending.0.pop_front() else {
            return Ok(());
        };
        let file = next.await.map_err(|e| SourceError::Other(format!("reading a trail file stopped: {e}")))??;
        on_file(file)?;
    }
}

/// Tasks still running when the reader returns early (or is dropped on a timeout) are aborted.
struct InFlight(VecDeque<JoinHandle<Result<TrailFile, SourceError>>>);

impl Drop for InFlight {
    fn drop(&mut self) {
        for task in &self.0 {
            task.abort();
        }
    }
}

/// What every file of one read shares.
struct Reader {
    judge: Arc<Judge>,
    max_inflated: u64,
    seen: SeenEvents,
}

/// Events of this read that a read remembers before forgetting the least recently added hours:
/// about 16 bytes each, so memory stays bounded on a first read of a large organisation's 14 days
/// (hundreds of millions of events).
const SEEN_EVENTS_LIMIT: usize = 2_000_000;

/// The events (by [`event_id_hash`]) a read has aggregated, starting with those earlier reads
/// recorded in the store (within the store's own horizon, all kept).
///
/// This read's own events are kept by the hour of their `eventTime` (a copy CloudTrail delivers
/// again has the same `eventTime`). Past [`SEEN_EVENTS_LIMIT`], the hours added to least recently
/// are forgotten whole: files are read in time order per region, so those are the hours whose
/// copies were due long ago. A copy arriving after its hour was forgotten is counted twice.
pub struct SeenEvents {
    state: std::sync::Mutex<Seen>,
}

#[derive(Default)]
struct Seen {
    stored: HashSet<u64>,
    /// By `eventTime` up to the hour (`YYYY-MM-DDTHH`): the events, and the add that last touched it.
    hours: HashMap<[u8; 13], (HashSet<u64>, u64)>,
    len: usize,
    adds: u64,
    limit: usize,
}

impl SeenEvents {
    /// Events already counted (read back from the store).
    pub fn new(ids: HashSet<u64>) -> SeenEvents {
        SeenEvents::limited(ids, SEEN_EVENTS_LIMIT)
    }

    fn limited(stored: HashSet<u64>, limit: usize) -> SeenEvents {
        SeenEvents { state: std::sync::Mutex::new(Seen { stored, limit, ..Seen::default() }) }
    }

    /// Drops the records whose event was seen before; returns how many were dropped. Records
    /// without an `eventID` are all kept.
    fn keep_first(&self, records: &mut Vec<trail::Record>) -> u64 {
        let before = records.len();
        // A panic elsewhere while holding the lock leaves the sets valid: keep using them.
        let mut seen = self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        seen.adds += 1;
        records.retain(|r| match r.event_id.as_deref() {
            Some(id) => seen.first(r.event_time.as_deref().unwrap_or_default(), event_id_hash(id)),
            None => true,
        });
        seen.forget_beyond_limit();
        (before - records.len()) as u64
    }
}

impl Default for SeenEvents {
    /// Nothing seen yet.
    fn default() -> SeenEvents {
        SeenEvents::new(HashSet::new())
    }
}

impl Seen {
    /// Whether `id` (of an event at `event_time`) is new, remembering it.
    fn first(&mut self, event_time: &str, id: u64) -> bool {
        if self.stored.contains(&id) {
            return false;
        }
        let mut hour = [0u8; 13];
        let prefix = &event_time.as_bytes()[..event_time.len().min(13)];
        hour[..prefix.len()].copy_from_slice(prefix);
        let adds = self.adds;
        let (ids, touched) = self.hours.entry(hour).or_default();
        *touched = adds;
        let new = ids.insert(id);
        self.len += usize::from(new);
        new
    }

    fn forget_beyond_limit(&mut self) {
        while self.len > self.limit {
            let Some(oldest) = self.hours.iter().min_by_key(|(_, (_, touched))| *touched).map(|(hour, _)| *hour) else {
                return;
            };
            if let Some((ids, _)) = self.hours.remove(&oldest) {
                self.len -= ids.len();
            }
        }
    }
}

async fn fetch_and_read<T: TrailObjects>(
    objects: Arc<T>,
    key: String,
    reader: Arc<Reader>,
) -> Result<TrailFile, SourceError> {
    let raw = match objects.fetch(&key).await {
        Ok(raw) => raw,
        Err(SourceError::Unreadable { key, why }) => {
            tracing::warn!(file = %key, "skipped unreadable trail file: {why}");
            return Ok(TrailFile { key, error: Some(why), ..TrailFile::default() });
        }
        Err(other) => return Err(other),
    };
    let (done, result) = tokio::sync::oneshot::channel();
    let what = format!("parsing trail file {key} stopped");
    rayon::spawn(move || {
        // The receiver is gone only if the read was abandoned; nothing to report then.
        let _ = done.send(read_bytes(key, &raw, &reader));
    });
    result.await.map_err(|_| SourceError::Other(what))
}

/// Decompresses, parses and aggregates one file's bytes.
fn read_bytes(key: String, raw: &[u8], reader: &Reader) -> TrailFile {
    let mut file = TrailFile { key, bytes: raw.len() as u64, ..TrailFile::default() };
    let mut parsed = match trail::parse_bytes_within(raw, reader.max_inflated) {
        Ok(parsed) => parsed,
        Err(why) => {
            tracing::warn!(file = %file.key, "skipped unreadable trail file: {why}");
            file.error = Some(why);
            return file;
        }
    };
    if let Some(bad) = parsed.bad.iter().find(|b| b.position == Position::File) {
        tracing::warn!(file = %file.key, "skipped trail file: {}", bad.reason);
        file.error = Some(bad.reason.clone());
        return file;
    }
    if let Some(first) = parsed.bad.first() {
        tracing::warn!(
            file = %file.key,
            "skipped {} malformed record(s); first at {}: {}",
            parsed.bad.len(),
            first.position,
            first.reason
        );
    }
    file.records = parsed.records.len() as u64;
    file.skipped = parsed.bad.len() as u64;
    file.duplicates = reader.seen.keep_first(&mut parsed.records);
    if file.duplicates > 0 {
        tracing::info!(file = %file.key, "{} record(s) already read from another file, counted once", file.duplicates);
    }
    file.event_ids = parsed
        .records
        .iter()
        .filter_map(|r| Some(EventKey { hour: hour_of(r.event_time()?), id: event_id_hash(r.event_id.as_deref()?) }))
        .collect();
    let mut untimed = 0u64;
    for record in parsed.records {
        match CallGroup::single(record) {
            Some(group) => file.aggregates.add(&group, &reader.judge),
            None => untimed += 1,
        }
    }
    if untimed > 0 {
        tracing::warn!(file = %file.key, "skipped {untimed} record(s) without a usable eventTime");
        file.skipped += untimed;
    }
    file
}

/// Trail files in a local folder (a copy of the bucket, or any folder of trail files). Keys are
/// paths relative to the folder with `/` separators.
#[derive(Debug, Clone)]
pub struct Folder {
    root: PathBuf,
}

impl Folder {
    /// Trail files under `root`, laid out as CloudTrail delivers them.
    pub fn new(root: impl Into<PathBuf>) -> Folder {
        Folder { root: root.into() }
    }
}

impl TrailObjects for Folder {
    async fn list_prefixes(&self, prefix: &str) -> Result<Vec<String>, SourceError> {
        let (root, prefix) = (self.root.clone(), prefix.to_string());
        blocking(move || {
            let dir = root.join(&prefix);
            let what = || format!("listing folder {}", dir.display());
            let entries = match std::fs::read_dir(&dir) {
                Ok(entries) => entries,
                // Like S3: a prefix with nothing under it is empty, not an error. The root is.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound && !prefix.is_empty() => return Ok(Vec::new()),
                Err(source) => return Err(SourceError::Io { what: what(), source }),
            };
            let mut prefixes = Vec::new();
            for entry in entries {
                let entry = entry.map_err(|source| SourceError::Io { what: what(), source })?;
                let is_dir = std::fs::metadata(entry.path()).is_ok_and(|m| m.is_dir());
                match entry.file_name().to_str() {
                    Some(name) if is_dir => prefixes.push(format!("{prefix}{name}/")),
                    Some(_) => {}
                    None => tracing::warn!(path = %entry.path().display(), "skipped a folder whose name is not UTF-8"),
                }
            }
            prefixes.sort();
            Ok(prefixes)
        })
        .await
    }

    async fn list_keys(&self, prefix: &str, start_after: Option<&str>) -> Result<Vec<String>, SourceError> {
        let (root, prefix) = (self.root.clone(), prefix.to_string());
        let start_after = start_after.map(str::to_string);
        blocking(move || {
            let dir = root.join(&prefix);
            if !prefix.is_empty() && !dir.exists() {
                return Ok(Vec::new());
            }
            let mut keys = Vec::new();
            for entry in walkdir::WalkDir::new(&dir).follow_links(true) {
                // An entry that cannot be walked (a dangling link, a link loop, a folder without
                // permission) is listed, so that fetching it reports it; the walk goes on.
                let path = match entry {
                    Ok(entry) if entry.file_type().is_dir() => continue,
                    Ok(entry) => entry.into_path(),
                    Err(e) => match e.path() {
                        Some(path) if path != dir => {
                            tracing::warn!(path = %path.display(), "cannot walk trail folder entry: {e}");
                            path.to_path_buf()
                        }
                        _ => {
                            return Err(SourceError::Io {
                                what: format!("listing folder {}", dir.display()),
                                source: e.into(),
                            });
                        }
                    },
                };
                let Some(key) = relative_key(&root, &path) else {
                    tracing::warn!(path = %path.display(), "skipped a file whose path is not UTF-8");
                    continue;
                };
                if start_after.as_deref().is_none_or(|after| key.as_str() > after) {
                    keys.push(key);
                }
            }
            keys.sort();
            Ok(keys)
        })
        .await
    }

    /// Any failure to read a local file is [`SourceError::Unreadable`]: retrying will not help.
    async fn fetch(&self, key: &str) -> Result<Vec<u8>, SourceError> {
        let (path, key) = (self.root.join(key), key.to_string());
        blocking(move || {
            let unreadable = |why: String| SourceError::Unreadable { key: key.clone(), why };
            let metadata = std::fs::metadata(&path).map_err(|e| unreadable(e.to_string()))?;
            if !metadata.is_file() {
                return Err(unreadable("not a regular file".into()));
            }
            if metadata.len() > crate::config::MAX_INFLATED_SIZE {
                return Err(unreadable(format!("larger than {} bytes", crate::config::MAX_INFLATED_SIZE)));
            }
            std::fs::read(&path).map_err(|e| unreadable(e.to_string()))
        })
        .await
    }
}

fn relative_key(root: &Path, path: &Path) -> Option<String> {
    let relative = path.strip_prefix(root).ok()?;
    let parts: Option<Vec<&str>> = relative.components().map(|c| c.as_os_str().to_str()).collect();
    Some(parts?.join("/"))
}

/// Runs blocking file-system work off the async threads.
async fn blocking<R: Send + 'static>(
    work: impl FnOnce() -> Result<R, SourceError> + Send + 'static,
) -> Result<R, SourceError> {
    tokio::task::spawn_blocking(work).await.map_err(|e| SourceError::Other(format!("listing a folder stopped: {e}")))?
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(id: &str, time: &str) -> trail::Record {
        trail::Record { event_id: Some(id.to_string()), event_time: Some(time.to_string()), ..Default::default() }
    }

    #[test]
    fn seen_events_count_copies_once_and_forget_the_least_recent_hours_past_their_limit() {
        let stored: HashSet<u64> = [event_id_hash("stored")].into();
        let seen = SeenEvents::limited(stored, 4);
        let mut first = vec![
            event("stored", "2024-01-02T09:59:00Z"),
            event("a", "2024-01-02T10:01:00Z"),
            event("b", "2024-01-02T10:02:00Z"),
            event("a", "2024-01-02T10:01:00Z"),
        ];
        assert_eq!(seen.keep_first(&mut first), 2, "the stored event and the copy of a");
        assert_eq!(first.len(), 2);
        // Hour 11 fills the set past its limit (5 > 4): hour 10, added to least recently, goes.
        let mut later =
            vec![event("c", "2024-01-02T11:00:00Z"), event("d", "2024-01-02T11:30:00Z"), event("no-time", "")];
        assert_eq!(seen.keep_first(&mut later), 0);
        let mut copies =
            vec![event("a", "2024-01-02T10:01:00Z"), event("c", "2024-01-02T11:00:00Z"), event("stored", "")];
        assert_eq!(seen.keep_first(&mut copies), 2, "c and the stored event are still known; a was forgotten");
        assert_eq!(copies[0].event_id.as_deref(), Some("a"));
        let state = seen.state.lock().unwrap();
        assert!(state.len <= 4, "{} events remembered", state.len);
    }

    fn at(text: &str) -> DateTime<Utc> {
        text.parse().unwrap()
    }

    #[test]
    fn resume_point_is_the_start_of_the_delivery_minute() {
        let key = "AWSLogs/1/CloudTrail/us-east-1/2024/01/02/1_CloudTrail_us-east-1_20240102T1005Z_AbC123.json.gz";
        let from = resume_after(key);
        assert_eq!(from, "AWSLogs/1/CloudTrail/us-east-1/2024/01/02/1_CloudTrail_us-east-1_20240102T1005Z");
        let same_minute = "AWSLogs/1/CloudTrail/us-east-1/2024/01/02/1_CloudTrail_us-east-1_20240102T1005Z_0aa.json.gz";
        assert!(same_minute > from && same_minute < key, "a same-minute file sorting earlier is listed again");
        assert_eq!(resume_after("dir_x/plain.json"), "dir_x/plain.json");
    }

    #[test]
    fn days_cover_the_window_inclusively() {
        let d = days(at("2024-01-30T23:00:00Z"), at("2024-02-02T00:10:00Z"));
        let shown: Vec<String> = d.iter().map(|d| d.to_string()).collect();
        assert_eq!(shown, ["2024-01-30", "2024-01-31", "2024-02-01", "2024-02-02"]);
        assert!(days(at("2024-01-02T00:00:00Z"), at("2024-01-01T00:00:00Z")).is_empty());
    }

    fn touch(root: &Path, key: &str) {
        let path = root.join(key);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, b"{}").unwrap();
    }

    #[tokio::test]
    async fn folder_lists_like_a_bucket() {
        let dir = tempfile::tempdir().unwrap();
        for key in ["a/x.json", "a/b/y.json.gz", "a-c/z.json", "top.json"] {
            touch(dir.path(), key);
        }
        let folder = Folder::new(dir.path());
        assert_eq!(folder.list_prefixes("").await.unwrap(), ["a-c/", "a/"]);
        assert_eq!(folder.list_prefixes("a/").await.unwrap(), ["a/b/"]);
        assert!(folder.list_prefixes("nowhere/").await.unwrap().is_empty());
        assert_eq!(folder.list_keys("", None).await.unwrap(), ["a-c/z.json", "a/b/y.json.gz", "a/x.json", "top.json"]);
        assert_eq!(folder.list_keys("a/", Some("a/b/y.json.gz")).await.unwrap(), ["a/x.json"]);
        assert!(folder.list_keys("nowhere/", None).await.unwrap().is_empty());
        assert_eq!(folder.fetch("a/x.json").await.unwrap(), b"{}");
        assert!(matches!(folder.fetch("missing.json").await, Err(SourceError::Unreadable { .. })));
        let gone = Folder::new(dir.path().join("missing"));
        assert!(gone.list_prefixes("").await.is_err(), "a missing root is an error, not an empty source");
    }

    #[tokio::test]
    async fn layout_is_found_for_plain_and_organisation_trails() {
        let dir = tempfile::tempdir().unwrap();
        for key in [
            "AWSLogs/123456789012/CloudTrail/us-east-1/2024/01/02/f.json.gz",
            "AWSLogs/123456789012/CloudTrail/eu-west-1/2024/01/02/f.json.gz",
            "AWSLogs/123456789012/CloudTrail-Digest/us-east-1/2024/01/02/d.json.gz",
            "AWSLogs/o-abc123/123456789012/CloudTrail/us-east-1/2024/01/02/f.json.gz",
            "AWSLogs/o-abc123/999999999999/CloudTrail/us-east-1/2024/01/02/f.json.gz",
        ] {
            touch(dir.path(), key);
        }
        let scans = scan_prefixes(
            &Folder::new(dir.path()),
            "123456789012",
            at("2024-01-02T10:00:00Z"),
            at("2024-01-02T12:00:00Z"),
        )
        .await
        .unwrap();
        let prefixes: Vec<&str> = scans.iter().map(|s| s.prefix.as_str()).collect();
        assert_eq!(
            prefixes,
            [
                "AWSLogs/123456789012/CloudTrail/eu-west-1/2024/01/02/",
                "AWSLogs/123456789012/CloudTrail/us-east-1/2024/01/02/",
                "AWSLogs/o-abc123/123456789012/CloudTrail/us-east-1/2024/01/02/",
            ]
        );
        assert!(scans.iter().all(|s| s.ordered));

        let flat = tempfile::tempdir().unwrap();
        touch(flat.path(), "export/one.json");
        let scans = scan_prefixes(
            &Folder::new(flat.path()),
            "123456789012",
            at("2024-01-02T10:00:00Z"),
            at("2024-01-02T12:00:00Z"),
        )
        .await
        .unwrap();
        assert_eq!(scans, [ScanPrefix { prefix: String::new(), ordered: false }]);
    }
}
