//! `lockstep classify`: one JSON verdict line per record, problems on stderr, a closing summary.

use std::collections::{BTreeMap, HashSet};
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use lockstep::perimeter::Perimeter;
use lockstep::trail;
use serde::Serialize;

#[derive(Serialize)]
struct Line<'a> {
    #[serde(rename = "eventID")]
    event_id: Option<&'a str>,
    #[serde(rename = "eventTime")]
    event_time: Option<&'a str>,
    user: Option<&'a str>,
    #[serde(rename = "eventSource")]
    event_source: Option<&'a str>,
    #[serde(rename = "eventName")]
    event_name: Option<&'a str>,
    verdict: &'static str,
    reason: &'static str,
}

pub fn run(perimeter: &Perimeter, inputs: &[PathBuf], exempt: HashSet<String>) -> anyhow::Result<ExitCode> {
    let files = trail::expand_inputs(inputs);
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    let mut by_verdict: BTreeMap<&'static str, u64> = BTreeMap::new();
    let (mut read, mut unreadable, mut bad_records) = (0usize, 0usize, 0usize);
    for file in files {
        let parsed = match file.and_then(|path| trail::read_file(&path).map(|parsed| (path, parsed))) {
            Ok(parsed) => parsed,
            Err(error) => {
                eprintln!("skipped: {error}");
                unreadable += 1;
                continue;
            }
        };
        let (path, parsed) = parsed;
        read += 1;
        for bad in &parsed.bad {
            eprintln!("skipped: {}: {}: {}", path.display(), bad.position, bad.reason);
        }
        bad_records += parsed.bad.len();
        for record in &parsed.records {
            let verdict = perimeter.classify(record, &exempt);
            *by_verdict.entry(verdict.kind_name()).or_default() += 1;
            let line = Line {
                event_id: record.event_id.as_deref(),
                event_time: record.event_time.as_deref(),
                user: record.user_arn(),
                event_source: record.event_source.as_deref(),
                event_name: record.event_name.as_deref(),
                verdict: verdict.kind_name(),
                reason: verdict.reason_name(),
            };
            serde_json::to_writer(&mut out, &line)?;
            out.write_all(b"\n")?;
        }
    }
    out.flush()?;
    let total: u64 = by_verdict.values().sum();
    let counts = ["allowed", "would_deny", "not_applicable"]
        .map(|k| format!("{} {k}", by_verdict.get(k).copied().unwrap_or(0)))
        .join(", ");
    eprintln!(
        "classified {total} records from {read} file(s): {counts}; skipped {bad_records} malformed record(s) and {unreadable} unreadable file(s)"
    );
    Ok(if read == 0 { ExitCode::FAILURE } else { ExitCode::SUCCESS })
}
