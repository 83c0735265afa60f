//! Queue IDs: 12 upper-case hex digits, unique, and sortable by arrival.
//!
//! The value is the time in microseconds since the Unix epoch, modulo 2^48 (wrapping every
//! ~8.9 years); when two messages arrive in the same microsecond the second takes the next
//! value. A generator never hands out the same value twice in one process; across restarts the
//! clock has moved on, and the spool's exclusive create catches the rare collision (a clock set
//! back), after which the next value is tried.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// The ID of one queued message, e.g. `7D3A1F0C9B2E`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct QueueId(u64);

const MASK: u64 = (1 << 48) - 1;

impl QueueId {
    /// The numeric value (for seeds and hashing).
    pub fn as_u64(self) -> u64 {
        self.0
    }

    /// Parses the 12-digit upper- or lower-case hex form.
    pub fn parse(s: &str) -> Option<QueueId> {
        if s.len() != 12 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        u64::from_str_radix(s, 16).ok().map(QueueId)
    }
}

impl fmt::Display for QueueId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:012X}", self.0)
    }
}

/// Hands out queue IDs.
#[derive(Debug, Default)]
pub struct IdGenerator {
    last: AtomicU64,
}

impl IdGenerator {
    /// A generator starting from the current time.
    pub fn new() -> Self {
        Self::default()
    }

    /// Makes sure every later ID is above `id` (called for each message found at start).
    pub fn advance_past(&self, id: QueueId) {
        self.last.fetch_max(id.0, Ordering::Relaxed);
    }

    /// The next ID: never equal to one handed out before by this generator.
    pub fn next(&self) -> QueueId {
        let now_us = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_micros() as u64)
            .unwrap_or(0);
        let candidate = now_us & MASK;
        let mut last = self.last.load(Ordering::Relaxed);
        loop {
            let next = if candidate > last {
                candidate
            } else {
                (last + 1) & MASK
            };
            match self
                .last
                .compare_exchange_weak(last, next, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => return QueueId(next),
                Err(seen) => last = seen,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unique_sorted_and_parseable() {
        let g = IdGenerator::new();
        let ids: Vec<QueueId> = (0..10_000).map(|_| g.next()).collect();
        for w in ids.windows(2) {
            assert!(w[0] < w[1]);
        }
        let s = ids[0].to_string();
        assert_eq!(s.len(), 12);
        assert!(
            s.bytes()
                .all(|b| b.is_ascii_digit() || b.is_ascii_uppercase())
        );
        assert_eq!(QueueId::parse(&s), Some(ids[0]));
        assert_eq!(QueueId::parse("xyz"), None);
    }
}
