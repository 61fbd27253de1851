//! Ingest benchmark: how fast the files source turns trail files into evidence, against `zcat`
//! of the same files (decompression alone, one core) as the yardstick.
//!
//! Generates at least 1,000,000 records with `synth` (in a temporary folder, or in
//! `LOCKSTEP_BENCH_DIR`, where they are kept and reused), then times, best of three:
//! - read: list + fetch + decompress + parse + classify + aggregate, as a refresh does it;
//! - zcat: `zcat <files> > /dev/null`;
//!
//! and once each: writing the read files' aggregates to SQLite, and a whole refresh into a
//! fresh store. Run with `cargo bench --bench ingest`.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, TimeDelta, Utc};
use lockstep::clock::ManualClock;
use lockstep::config::Config;
use lockstep::evidence::aggregate::Judge;
use lockstep::evidence::files::{self, Folder, TrailFile};
use lockstep::evidence::refresh::{self, Source, Window};
use lockstep::evidence::{SourceError, TrailObjects};
use lockstep::store::{EvidenceWriter, Store};
use lockstep_synth::{Faults, Org, write_trail};

const TARGET_RECORDS: u64 = 1_000_000;
const USERS: usize = 300;
const RUNS: usize = 3;

type Failure = Box<dyn std::error::Error>;

fn main() -> Result<(), Failure> {
    // `cargo test --all-targets` runs bench binaries too, without `--bench`: building a million
    // records in a debug build belongs in `cargo bench`, not in the test suite.
    if !std::env::args().any(|arg| arg == "--bench") {
        println!("ingest benchmark: skipped (run it with `cargo bench --bench ingest`)");
        return Ok(());
    }
    let config = Config::parse(include_str!("../rollout.yaml"), Path::new("rollout.yaml"))?;
    let temp = tempfile::tempdir()?;
    let root = std::env::var_os("LOCKSTEP_BENCH_DIR").map_or_else(|| temp.path().to_path_buf(), PathBuf::from);
    let (records, start, end) = ensure_data(&root, &config)?;

    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let folder = Arc::new(Folder::new(&root));
    let keys: Vec<String> =
        rt.block_on(folder.list_keys("", None))?.into_iter().filter(|k| files::is_trail_key(k)).collect();
    let paths: Vec<PathBuf> = keys.iter().map(|k| root.join(k)).collect();
    let compressed: u64 = paths.iter().map(|p| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0)).sum();
    println!(
        "data: {} records in {} files, {:.1} MB compressed, {} ({} threads)",
        records,
        keys.len(),
        compressed as f64 / 1e6,
        root.display(),
        rayon::current_num_threads()
    );

    let judge = Arc::new(Judge::new(&config));
    let mut read_best = Duration::MAX;
    let mut zcat_best = Duration::MAX;
    let mut read = Vec::new();
    for _ in 0..RUNS {
        let t = Instant::now();
        zcat(&paths)?;
        zcat_best = zcat_best.min(t.elapsed());

        let t = Instant::now();
        read = rt.block_on(read_all(folder.clone(), judge.clone()))?;
        read_best = read_best.min(t.elapsed());
    }
    let parsed: u64 = read.iter().map(|f| f.records).sum();
    assert_eq!(parsed, records, "every generated record is read");

    let dir = tempfile::tempdir()?;
    let store = Store::open(&dir.path().join("bench.db"))?;
    let now = end + TimeDelta::hours(1);
    let t = Instant::now();
    for batch in read.chunks(256) {
        store.add_trail_files(batch, now)?;
    }
    let write = t.elapsed();

    let fresh = Store::open(&dir.path().join("refresh.db"))?;
    let mut config = config;
    config.evidence.files_path = root.clone();
    let clock = ManualClock::new(now);
    let source = Source::Folder(folder);
    let t = Instant::now();
    let report = rt.block_on(refresh::refresh(
        &fresh,
        &source,
        &config,
        Window { since: start, until: end },
        &clock,
        None,
        &mut |_| {},
    ))?;
    let whole = t.elapsed();
    assert_eq!(report.counts.records_read, records);

    let rate = |d: Duration| records as f64 / d.as_secs_f64();
    println!("zcat                         {:>8.2}s  {:>10.0} records/s", zcat_best.as_secs_f64(), rate(zcat_best));
    println!(
        "files source (read..aggregate){:>7.2}s  {:>10.0} records/s  {:.2}x zcat's wall time",
        read_best.as_secs_f64(),
        rate(read_best),
        read_best.as_secs_f64() / zcat_best.as_secs_f64()
    );
    println!("SQLite write of the aggregates {:>6.2}s  ({} files)", write.as_secs_f64(), read.len());
    println!("whole refresh into a new store {:>6.2}s  {:>10.0} records/s", whole.as_secs_f64(), rate(whole));
    Ok(())
}

/// Everything under the folder, through the same reader a refresh uses.
async fn read_all(folder: Arc<Folder>, judge: Arc<Judge>) -> Result<Vec<TrailFile>, SourceError> {
    let keys = folder.list_keys("", None).await?.into_iter().filter(|k| files::is_trail_key(k)).collect();
    let mut read = Vec::new();
    let seen = files::SeenEvents::default();
    files::read_files(folder, keys, judge, lockstep::trail::DEFAULT_MAX_INFLATED, seen, |file| {
        read.push(file);
        Ok::<(), SourceError>(())
    })
    .await?;
    Ok(read)
}

fn zcat(paths: &[PathBuf]) -> std::io::Result<()> {
    for chunk in paths.chunks(2_000) {
        let status = Command::new("zcat").args(chunk).stdout(Stdio::null()).status()?;
        if !status.success() {
            return Err(std::io::Error::other(format!("zcat failed: {status}")));
        }
    }
    Ok(())
}

/// Generates data day by day until there are enough records; reuses a complete earlier set.
fn ensure_data(root: &Path, config: &Config) -> Result<(u64, DateTime<Utc>, DateTime<Utc>), Failure> {
    let start: DateTime<Utc> = "2024-03-04T00:00:00Z".parse()?;
    let marker = root.join("complete");
    if let Ok(text) = std::fs::read_to_string(&marker)
        && let Some((records, days)) = text.trim().split_once(' ')
    {
        let (records, days): (u64, i64) = (records.parse()?, days.parse()?);
        if records >= TARGET_RECORDS {
            return Ok((records, start, start + TimeDelta::days(days)));
        }
    }
    let org = Org::new(42, USERS, &config.perimeter);
    let t = Instant::now();
    let (mut records, mut days) = (0u64, 0i64);
    while records < TARGET_RECORDS {
        let day = start + TimeDelta::days(days);
        let generated = org.generate(day, day + TimeDelta::days(1));
        records += write_trail(root, &org.account_id, &generated.records, Faults::default())?.records;
        days += 1;
    }
    std::fs::write(&marker, format!("{records} {days}\n"))?;
    println!("generated {records} records over {days} days in {:.1}s", t.elapsed().as_secs_f64());
    Ok((records, start, start + TimeDelta::days(days)))
}
