//! Durations as people read and write them, in rollout.yaml's notation: `14d`, `90s`, `1h30m`.
//! Parsing lives with the configuration ([`crate::config::parse_duration`]); everything that
//! prints a duration goes through [`format`].

use std::fmt::Write;
use std::time::Duration;

use chrono::TimeDelta;

/// `d` in rollout.yaml's notation, largest unit first and exact: `14d`, `1h30m`, `1m30s`,
/// `500ms`, `0s`. Weeks are written as days.
pub fn format(d: Duration) -> String {
    let mut out = String::new();
    let _ = write_duration(&mut out, d);
    out
}

fn write_duration(out: &mut impl Write, d: Duration) -> std::fmt::Result {
    let mut secs = d.as_secs();
    let mut empty = true;
    for (unit, name) in [(86_400, "d"), (3_600, "h"), (60, "m"), (1, "s")] {
        if secs >= unit {
            write!(out, "{}{name}", secs / unit)?;
            secs %= unit;
            empty = false;
        }
    }
    if d.subsec_millis() > 0 {
        write!(out, "{}ms", d.subsec_millis())?;
        empty = false;
    }
    if empty {
        out.write_str("0s")?;
    }
    Ok(())
}

/// A span of time between two instants (an age, a remaining soak), rounded for reading with
/// [`format`]: to the second under an hour, to the minute under a day, to the hour beyond.
/// A negative span reads as `0s`.
pub fn elapsed(d: TimeDelta) -> String {
    Elapsed(d).to_string()
}

/// [`elapsed`] as a [`Display`](std::fmt::Display), written straight into the text around it
/// (no string of its own: the planner writes one for each of 100,000 users a step).
#[derive(Debug, Clone, Copy)]
pub struct Elapsed(pub TimeDelta);

impl std::fmt::Display for Elapsed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let secs = self.0.num_seconds().max(0) as u64;
        let rounded = match secs {
            s if s >= 86_400 => s / 3_600 * 3_600,
            s if s >= 3_600 => s / 60 * 60,
            s => s,
        };
        write_duration(f, Duration::from_secs(rounded))
    }
}

/// A configured duration as a `chrono` one, saturating at the largest for absurd values.
pub fn chrono_of(d: Duration) -> TimeDelta {
    TimeDelta::from_std(d).unwrap_or(TimeDelta::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn format_writes_what_rollout_yaml_accepts() {
        let cases = [(14 * 86_400, "14d"), (5_400, "1h30m"), (90, "1m30s"), (3_600, "1h"), (0, "0s"), (86_401, "1d1s")];
        for (secs, text) in cases {
            assert_eq!(format(Duration::from_secs(secs)), text);
            assert_eq!(crate::config::parse_duration(text), Ok(Duration::from_secs(secs)), "{text} parses back");
        }
        assert_eq!(format(Duration::from_millis(1_500)), "1s500ms");
    }

    #[test]
    fn elapsed_rounds_to_a_readable_unit() {
        assert_eq!(elapsed(TimeDelta::seconds(59 * 60 + 59)), "59m59s");
        assert_eq!(elapsed(TimeDelta::seconds(3_600 + 90)), "1h1m");
        assert_eq!(elapsed(TimeDelta::hours(239) + TimeDelta::minutes(59)), "9d23h");
        assert_eq!(elapsed(TimeDelta::seconds(-5)), "0s");
        assert_eq!(format!("[{}]", Elapsed(TimeDelta::seconds(3_600 + 90))), "[1h1m]");
    }

    #[test]
    fn absurd_durations_saturate() {
        assert_eq!(chrono_of(Duration::MAX), TimeDelta::MAX);
        assert_eq!(chrono_of(Duration::from_secs(90)), TimeDelta::seconds(90));
    }
}
