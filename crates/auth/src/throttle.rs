//! Brute-force defence: failed AUTH attempts counted per client address, and a delay before the
//! next answer once there were too many.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

/// Failures within the window before attempts are slowed: the same number that closes a
/// session (`[auth] max_failures`, 3), so that the attempts after a closed session wait.
const FREE_FAILURES: u32 = 3;
/// The delay once the free failures are used up; it doubles with each further failure.
const FIRST_DELAY: Duration = Duration::from_secs(1);
/// The longest delay.
const MAX_DELAY: Duration = Duration::from_secs(30);
/// How long failures are remembered after the last one.
const WINDOW: Duration = Duration::from_secs(10 * 60);
/// Client addresses remembered at most.
const MAX_ENTRIES: usize = 100_000;

/// Failed authentications per client address, and the delay to impose before answering the next
/// attempt: none for the first 3 failures, then 1 s, 2 s, 4 s … up to 30 s. An address is
/// forgotten 10 minutes after its last failure, or at once after a success. IPv6 clients are
/// counted per /64 (one host usually holds a whole /64); IPv4-mapped IPv6 addresses count as
/// IPv4. At most 100,000 addresses are remembered: beyond, those whose last failure is oldest
/// are forgotten first. Thread-safe: share one behind an `Arc` between all sessions.
#[derive(Debug)]
pub struct Throttle {
    entries: Mutex<HashMap<IpAddr, Entry>>,
    window: Duration,
    max_entries: usize,
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    failures: u32,
    last: Instant,
}

impl Default for Throttle {
    fn default() -> Self {
        Throttle::new()
    }
}

impl Throttle {
    /// A throttle with the standard settings (10-minute window, 100,000 addresses).
    pub fn new() -> Throttle {
        Throttle::with_limits(WINDOW, MAX_ENTRIES)
    }

    /// A throttle that remembers failures for `window` after the last one, and at most
    /// `max_entries` client addresses.
    pub fn with_limits(window: Duration, max_entries: usize) -> Throttle {
        Throttle {
            entries: Mutex::new(HashMap::new()),
            window,
            max_entries: max_entries.max(1),
        }
    }

    /// Counts a failed authentication from `ip`; returns the number of failures now counted
    /// against it (within the window), for the log line fail2ban reads.
    pub fn record_failure(&self, ip: IpAddr) -> u32 {
        self.record_failure_at(ip, Instant::now())
    }

    /// A successful authentication from `ip`: its failures are forgotten.
    pub fn record_success(&self, ip: IpAddr) {
        self.lock().remove(&key(ip));
    }

    /// How long to wait before answering the next authentication attempt from `ip`.
    pub fn delay(&self, ip: IpAddr) -> Duration {
        self.delay_at(ip, Instant::now())
    }

    /// How many client addresses are remembered.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether no client address is remembered.
    pub fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<IpAddr, Entry>> {
        self.entries.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn expired(&self, entry: &Entry, now: Instant) -> bool {
        now.saturating_duration_since(entry.last) >= self.window
    }

    pub(crate) fn record_failure_at(&self, ip: IpAddr, now: Instant) -> u32 {
        let ip = key(ip);
        let mut entries = self.lock();
        if let Some(entry) = entries.get_mut(&ip) {
            if self.expired(entry, now) {
                entry.failures = 0;
            }
            entry.failures = entry.failures.saturating_add(1);
            entry.last = now;
            return entry.failures;
        }
        if entries.len() >= self.max_entries {
            self.make_room(&mut entries, now);
        }
        entries.insert(
            ip,
            Entry {
                failures: 1,
                last: now,
            },
        );
        1
    }

    pub(crate) fn delay_at(&self, ip: IpAddr, now: Instant) -> Duration {
        let ip = key(ip);
        let mut entries = self.lock();
        match entries.get(&ip) {
            Some(entry) if self.expired(entry, now) => {
                entries.remove(&ip);
                Duration::ZERO
            }
            Some(entry) => delay_for(entry.failures),
            None => Duration::ZERO,
        }
    }

    /// Drops expired entries; if that is not enough, the oldest 1% (at least one), so that a flood
    /// of new addresses costs one scan per 1,000 insertions rather than one per insertion.
    fn make_room(&self, entries: &mut HashMap<IpAddr, Entry>, now: Instant) {
        entries.retain(|_, entry| !self.expired(entry, now));
        if entries.len() < self.max_entries {
            return;
        }
        let evict = (self.max_entries / 100).max(1);
        let mut by_age: Vec<(Instant, IpAddr)> = entries
            .iter()
            .map(|(ip, entry)| (entry.last, *ip))
            .collect();
        by_age.select_nth_unstable(evict - 1);
        for (_, ip) in &by_age[..evict] {
            entries.remove(ip);
        }
    }
}

/// The delay after `failures` failures within the window.
fn delay_for(failures: u32) -> Duration {
    if failures < FREE_FAILURES {
        return Duration::ZERO;
    }
    let doublings = (failures - FREE_FAILURES).min(16);
    (FIRST_DELAY * (1u32 << doublings)).min(MAX_DELAY)
}

/// The address failures are counted against: IPv4 as is (IPv4-mapped IPv6 turned back into
/// IPv4), IPv6 by its /64 prefix.
fn key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let prefix = u128::from(v6) & !((1u128 << 64) - 1);
                IpAddr::V6(prefix.into())
            }
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(192, 0, 2, 1));
    const B: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(192, 0, 2, 2));

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    #[test]
    fn schedule() {
        let t = Throttle::new();
        let now = Instant::now();
        assert_eq!(t.delay_at(A, now), Duration::ZERO);
        let expected = [0, 0, 1, 2, 4, 8, 16, 30, 30, 30, 30];
        for (i, want) in expected.iter().enumerate() {
            let n = t.record_failure_at(A, now + secs(i as u64));
            assert_eq!(n as usize, i + 1);
            assert_eq!(
                t.delay_at(A, now + secs(i as u64)),
                secs(*want),
                "after {n} failures"
            );
        }
        // Other addresses are unaffected.
        assert_eq!(t.delay_at(B, now), Duration::ZERO);
        // Many failures do not overflow.
        for _ in 0..100 {
            t.record_failure_at(A, now + secs(20));
        }
        assert_eq!(t.delay_at(A, now + secs(20)), MAX_DELAY);
    }

    #[test]
    fn success_clears() {
        let t = Throttle::new();
        let now = Instant::now();
        for _ in 0..4 {
            t.record_failure_at(A, now);
        }
        assert_eq!(t.delay_at(A, now), secs(2));
        t.record_success(A);
        assert_eq!(t.delay_at(A, now), Duration::ZERO);
        assert_eq!(t.record_failure_at(A, now), 1);
    }

    #[test]
    fn failures_expire_a_window_after_the_last_one() {
        let t = Throttle::new();
        let now = Instant::now();
        for i in 1..4 {
            t.record_failure_at(A, now + secs(i * 60));
        }
        // The last failure was at +3 min: still remembered at +12 min, not at +13 min.
        assert_eq!(t.delay_at(A, now + secs(12 * 60)), secs(1));
        assert_eq!(t.delay_at(A, now + secs(13 * 60)), Duration::ZERO);
        assert!(t.is_empty());
        // A failure after the window starts a new count.
        t.record_failure_at(B, now);
        assert_eq!(t.record_failure_at(B, now + WINDOW), 1);
    }

    #[test]
    fn ipv6_counts_per_64_and_mapped_ipv4_as_ipv4() {
        let t = Throttle::new();
        let now = Instant::now();
        for host in 1..=3u16 {
            let ip: IpAddr = format!("2001:db8:1:2::{host:x}").parse().unwrap();
            t.record_failure_at(ip, now);
        }
        let other_host: IpAddr = "2001:db8:1:2:ffff::1".parse().unwrap();
        let other_net: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(t.delay_at(other_host, now), secs(1));
        assert_eq!(t.delay_at(other_net, now), Duration::ZERO);

        let mapped: IpAddr = "::ffff:192.0.2.1".parse().unwrap();
        for _ in 0..3 {
            t.record_failure_at(mapped, now);
        }
        assert_eq!(t.delay_at(A, now), secs(1));
    }

    #[test]
    fn memory_is_bounded_and_the_oldest_go_first() {
        let t = Throttle::with_limits(WINDOW, 200);
        let now = Instant::now();
        // A's failures are the oldest.
        for _ in 0..4 {
            t.record_failure_at(A, now);
        }
        for i in 0..1000u32 {
            let ip = IpAddr::V4(std::net::Ipv4Addr::from(0x0a00_0000 + i));
            t.record_failure_at(ip, now + Duration::from_millis(u64::from(i) + 1));
            assert!(t.len() <= 200);
        }
        assert_eq!(t.delay_at(A, now + secs(2)), Duration::ZERO);
        // The newest is still there.
        let newest = IpAddr::V4(std::net::Ipv4Addr::from(0x0a00_0000 + 999));
        assert_eq!(t.record_failure_at(newest, now + secs(2)), 2);

        // Expired entries are dropped first, whatever their number.
        let t = Throttle::with_limits(secs(10), 3);
        t.record_failure_at(A, now);
        t.record_failure_at(B, now + secs(5));
        let c = IpAddr::V4(std::net::Ipv4Addr::new(192, 0, 2, 3));
        let d = IpAddr::V4(std::net::Ipv4Addr::new(192, 0, 2, 4));
        t.record_failure_at(c, now + secs(6));
        t.record_failure_at(d, now + secs(12));
        assert_eq!(t.len(), 3);
        assert_eq!(t.record_failure_at(B, now + secs(12)), 2);
    }
}
