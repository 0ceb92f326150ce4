//! Test hooks: pauses at the worst moment of a checkpoint or restore, set by
//! environment variables that tests use to interrupt or kill crd right there. Only in
//! builds with the `testing` feature: the product has no hook and reads no variable.

use std::time::{Duration, Instant};

/// Waits the number of milliseconds `$var` names, if it names one. Ctrl-C still ends
/// the wait: returns false if `interrupted` said so.
pub fn hold(var: &str, interrupted: &dyn Fn() -> bool) -> bool {
    let Some(ms) = std::env::var(var).ok().and_then(|v| v.parse::<u64>().ok()) else {
        return true;
    };
    let until = Instant::now() + Duration::from_millis(ms);
    while Instant::now() < until {
        if interrupted() {
            return false;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    true
}
