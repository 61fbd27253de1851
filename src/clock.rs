//! Time, injected. Every decision takes `now` from a [`Clock`], so a multi-week rollout runs in
//! virtual time in tests and the sandbox, and durations in rollout.yaml may be seconds long.

use std::sync::Mutex;

use chrono::{DateTime, Utc};

pub trait Clock: Send + Sync {
    fn now(&self) -> DateTime<Utc>;

    /// How long to really wait for `virtual_duration` of this clock's time to pass.
    fn real_duration(&self, virtual_duration: std::time::Duration) -> std::time::Duration {
        virtual_duration
    }
}

/// The wall clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> DateTime<Utc> {
        Utc::now()
    }
}

/// Virtual time that moves only when told to.
#[derive(Debug)]
pub struct ManualClock(Mutex<DateTime<Utc>>);

impl ManualClock {
    pub fn new(start: DateTime<Utc>) -> ManualClock {
        ManualClock(Mutex::new(start))
    }

    pub fn advance(&self, by: chrono::Duration) {
        let mut now = self.0.lock().unwrap_or_else(|e| e.into_inner());
        *now += by;
    }

    pub fn set(&self, to: DateTime<Utc>) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = to;
    }
}

impl Clock for ManualClock {
    fn now(&self) -> DateTime<Utc> {
        *self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Virtual time running `factor` times faster than the wall clock from `start`.
#[derive(Debug, Clone, Copy)]
pub struct AcceleratedClock {
    start: DateTime<Utc>,
    real_start: std::time::Instant,
    factor: f64,
}

impl AcceleratedClock {
    pub fn new(start: DateTime<Utc>, factor: f64) -> AcceleratedClock {
        AcceleratedClock {
            start,
            real_start: std::time::Instant::now(),
            factor: factor.max(f64::MIN_POSITIVE),
        }
    }
}

impl Clock for AcceleratedClock {
    fn now(&self) -> DateTime<Utc> {
        let elapsed = self.real_start.elapsed().mul_f64(self.factor);
        self.start + chrono::Duration::from_std(elapsed).unwrap_or(chrono::Duration::MAX)
    }

    fn real_duration(&self, virtual_duration: std::time::Duration) -> std::time::Duration {
        virtual_duration.div_f64(self.factor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    #[test]
    fn manual_clock_moves_only_when_told() {
        let start = Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap();
        let clock = ManualClock::new(start);
        assert_eq!(clock.now(), start);
        clock.advance(chrono::Duration::days(21));
        assert_eq!(clock.now(), start + chrono::Duration::days(21));
    }

    #[test]
    fn accelerated_clock_runs_faster() {
        let start = Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap();
        let clock = AcceleratedClock::new(start, 3600.0);
        assert_eq!(clock.real_duration(std::time::Duration::from_secs(7200)), std::time::Duration::from_secs(2));
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert!(clock.now() >= start + chrono::Duration::seconds(60));
    }
}
