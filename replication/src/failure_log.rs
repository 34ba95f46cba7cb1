//! Bounded logging of a failure that repeats.
//!
//! A full disk fails every write: every replicated request a Secondary applies, every
//! resync block, and again after each reconnect. One log line per failure would flood the
//! journal and bury the first line, the one that says what went wrong. A [`FailureLog`]
//! lets the first failure through, counts the ones that follow within its interval, and
//! lets the next failure after the interval through with the count of those it held back:
//!
//! ```text
//! ERROR this replica could not apply a request; disconnecting volume=vm-100-disk-0 peer=hv1
//!       error=local write failed: write at offset 4096 length 4096 failed: No space left on device (os error 28)
//! ... (30 s later, at the next failure)
//! ERROR resync write failed on this replica volume=vm-100-disk-0 suppressed=411 error=...
//! ```
//!
//! Time is an argument ([`FailureLog::admit`]), so the policy is tested without sleeping.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How often a repeating failure is logged by default.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(30);

/// A rate limit for the log lines of one kind of failure (see the module doc). Shared by
/// reference; all methods take `&self`.
#[derive(Debug)]
pub struct FailureLog {
    interval: Duration,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    /// When the last line was let through.
    last_line: Option<Instant>,
    /// Failures counted since then, not logged.
    suppressed: u64,
}

impl Default for FailureLog {
    fn default() -> Self {
        FailureLog::new(DEFAULT_INTERVAL)
    }
}

impl FailureLog {
    /// At most one line per `interval`.
    pub fn new(interval: Duration) -> Self {
        FailureLog {
            interval,
            state: Mutex::new(State::default()),
        }
    }

    /// Count one failure at `now`. `Some(suppressed)`: log this failure, and say that
    /// `suppressed` failures since the previous line were not logged. `None`: only counted.
    pub fn admit(&self, now: Instant) -> Option<u64> {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let due = st
            .last_line
            .is_none_or(|last| now.saturating_duration_since(last) >= self.interval);
        if due {
            st.last_line = Some(now);
            Some(std::mem::take(&mut st.suppressed))
        } else {
            st.suppressed += 1;
            None
        }
    }
}

/// `error: cause: root cause` on one line: the OS error of an I/O failure sits at the end
/// of the chain (`No space left on device (os error 28)`), which `Display` alone omits.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut line = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !line.ends_with(&text) {
            line.push_str(": ");
            line.push_str(&text);
        }
        source = cause.source();
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::DeviceError;

    #[test]
    fn the_first_failure_is_logged_then_one_line_per_interval_with_the_count() {
        let log = FailureLog::new(Duration::from_secs(30));
        let t0 = Instant::now();
        assert_eq!(log.admit(t0), Some(0));
        for i in 1..=411 {
            assert_eq!(log.admit(t0 + Duration::from_millis(i * 50)), None);
        }
        assert_eq!(log.admit(t0 + Duration::from_secs(30)), Some(411));
        assert_eq!(log.admit(t0 + Duration::from_secs(31)), None);
        // After a quiet spell the next failure is logged at once.
        assert_eq!(log.admit(t0 + Duration::from_secs(600)), Some(1));
    }

    #[test]
    fn the_chain_names_the_os_error() {
        let e = DeviceError::Io {
            op: "write",
            offset: 4096,
            len: 512,
            source: std::io::Error::from_raw_os_error(libc::ENOSPC),
        };
        assert_eq!(
            error_chain(&e),
            "write at offset 4096 length 512 failed: No space left on device (os error 28)"
        );
    }
}
