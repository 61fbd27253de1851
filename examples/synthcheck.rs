use std::io::Write;
fn main() {
    let config = lockstep::config::Config::parse(include_str!("/work/main/rollout.yaml"), std::path::Path::new("r")).unwrap();
    let org = lockstep::synth::Org::new(11, 40, &config.perimeter);
    let start: chrono::DateTime<chrono::Utc> = "2024-03-18T00:00:00Z".parse().unwrap();
    let g = org.generate(start, start + chrono::TimeDelta::days(1));
    let dir = tempfile::tempdir().unwrap();
    let w = lockstep::synth::write_trail(dir.path(), &org.account_id, &g.records, Default::default()).unwrap();
    let mut raw = Vec::new();
    for f in &w.files { let mut d = flate2::read::GzDecoder::new(std::fs::File::open(f).unwrap()); std::io::copy(&mut d, &mut raw).unwrap(); }
    for level in [1, 6] {
        let t = std::time::Instant::now();
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::new(level));
        e.write_all(&raw).unwrap(); let out = e.finish().unwrap();
        println!("level {level}: {} -> {} bytes in {:?}", raw.len(), out.len(), t.elapsed());
    }
}
