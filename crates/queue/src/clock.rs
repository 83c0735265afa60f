//! Where the scheduler reads the time of day.
//!
//! The spool records times as Unix seconds (arrival, next attempt), and the scheduler sleeps on
//! tokio's clock until the next one is due. In production both come from the system. In tests
//! the scheduler is given a clock that follows tokio's, so that on paused time
//! (`#[tokio::test(start_paused = true)]`, `tokio::time::advance`) an hour of retries passes in
//! no time and a test asserts what happens at each instant instead of sleeping.

/// The time of day as the scheduler sees it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Clock {
    /// The system's wall clock.
    #[default]
    System,
    /// `base` Unix seconds at tokio's instant `origin`, moving with tokio's clock (which a test
    /// pauses and advances).
    Tokio {
        base: u64,
        origin: tokio::time::Instant,
    },
}

impl Clock {
    /// A clock that reads the wall clock's time now and from then on moves with tokio's clock.
    pub fn following_tokio() -> Clock {
        Clock::Tokio {
            base: crate::spool::unix_now(),
            origin: tokio::time::Instant::now(),
        }
    }

    /// Seconds since the Unix epoch.
    pub fn unix_now(&self) -> u64 {
        match self {
            Clock::System => crate::spool::unix_now(),
            Clock::Tokio { base, origin } => base + origin.elapsed().as_secs(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test(start_paused = true)]
    async fn a_tokio_clock_moves_with_paused_time_only() {
        let c = Clock::following_tokio();
        let t0 = c.unix_now();
        assert!(t0 > 1_700_000_000);
        std::thread::sleep(Duration::from_millis(1_100));
        assert_eq!(c.unix_now(), t0, "real time does not move it");
        tokio::time::advance(Duration::from_secs(3_600)).await;
        assert_eq!(c.unix_now(), t0 + 3_600);
    }
}
