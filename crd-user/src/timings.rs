//! Where a command's time went.
//!
//! `cargo xtask bench` judges crd by wall time, but needs to see which phase dominates
//! (loading BPF, freezing, harvesting, copying pipes, writing): in builds with the
//! `testing` feature (which the bench uses), with `CRD_TIMINGS_FILE=PATH`, `crd
//! checkpoint`, `crd restore` and `crd ls` write their phases there as one JSON object of
//! milliseconds. The product reads no such variable.
use std::time::{Duration, Instant};

/// The environment variable naming the file the phases are written to.
#[cfg(feature = "testing")]
pub const TIMINGS_FILE_ENV: &str = "CRD_TIMINGS_FILE";

/// Consecutive phases of one command, each timed from the end of the previous one.
#[derive(Clone, Debug)]
pub struct Phases {
    started: Instant,
    last: Instant,
    spent: Vec<(&'static str, Duration)>,
}

impl Default for Phases {
    fn default() -> Self {
        Self::start()
    }
}

impl Phases {
    pub fn start() -> Self {
        let now = Instant::now();
        Self { started: now, last: now, spent: Vec::new() }
    }

    /// Ends the phase called `name` now (adding to it if it ran before).
    pub fn lap(&mut self, name: &'static str) {
        let now = Instant::now();
        let spent = now - self.last;
        self.last = now;
        match self.spent.iter_mut().find(|(n, _)| *n == name) {
            Some((_, total)) => *total += spent,
            None => self.spent.push((name, spent)),
        }
    }

    /// Time in the phase called `name`.
    pub fn get(&self, name: &str) -> Duration {
        self.spent.iter().filter(|(n, _)| *n == name).map(|(_, d)| *d).sum()
    }

    /// Time since [`start`](Self::start).
    pub fn total(&self) -> Duration {
        self.started.elapsed()
    }

    /// `{"load_ms": 12.3, ..., "total_ms": 45.6}`.
    pub fn to_json(&self) -> serde_json::Value {
        let ms = |d: Duration| serde_json::json!(d.as_secs_f64() * 1e3);
        let mut map = serde_json::Map::new();
        for (name, spent) in &self.spent {
            map.insert(format!("{name}_ms"), ms(*spent));
        }
        map.insert("total_ms".into(), ms(self.total()));
        serde_json::Value::Object(map)
    }

    /// Writes the phases to `$CRD_TIMINGS_FILE` if it is set. Best effort: timings are
    /// a diagnostic and never fail the command.
    #[cfg(feature = "testing")]
    pub fn write_if_requested(&self) {
        if let Some(path) = std::env::var_os(TIMINGS_FILE_ENV)
            && let Err(e) = std::fs::write(&path, self.to_json().to_string())
        {
            log::warn!("cannot write timings to {}: {e}", std::path::Path::new(&path).display());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn laps_accumulate_by_name_and_sum_to_at_most_the_total() {
        let mut phases = Phases::start();
        std::thread::sleep(Duration::from_millis(2));
        phases.lap("load");
        phases.lap("harvest");
        std::thread::sleep(Duration::from_millis(2));
        phases.lap("load");
        assert!(phases.get("load") >= Duration::from_millis(4));
        assert!(phases.get("load") + phases.get("harvest") <= phases.total());
        let json = phases.to_json();
        assert!(json["load_ms"].as_f64().is_some_and(|ms| ms >= 4.0));
        assert!(json["total_ms"].as_f64().is_some());
        assert_eq!(json.as_object().map(|m| m.len()), Some(3));
    }
}
