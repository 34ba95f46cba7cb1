//! Where the time of a multi-node command goes: one debug event per phase (`tandem
//! snapshot create`, `tandem volume clone`, ...) with the phase's duration and the time
//! since the command started. `RUST_LOG=info,volume_driver::phases=debug` shows them; the
//! dm-thin VM test prints them beside its pause and clone figures.

use std::time::Instant;

/// The clock of one command on this node.
#[derive(Debug)]
pub struct Phases {
    command: &'static str,
    volume: String,
    started: Instant,
    last: Instant,
}

impl Phases {
    /// Start timing `command` on `volume`.
    pub fn start(command: &'static str, volume: &str) -> Self {
        let now = Instant::now();
        Phases {
            command,
            volume: volume.to_string(),
            started: now,
            last: now,
        }
    }

    /// Log the phase that ends now; returns its duration in ms.
    pub fn done(&mut self, phase: &str) -> u64 {
        let now = Instant::now();
        let ms = millis(now - self.last);
        tracing::debug!(command = self.command, volume = %self.volume, phase, ms,
            total_ms = millis(now - self.started), "phase done");
        self.last = now;
        ms
    }
}

/// Whole milliseconds of `d`.
pub fn millis(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phases_measure_from_the_previous_mark() {
        let mut p = Phases::start("test", "v");
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert!(p.done("a") >= 20);
        assert!(p.done("b") < 20);
        assert!(millis(p.started.elapsed()) >= 20);
    }
}
