//! The cache of [`Verification`] answers: positive ones for longer, negative ones briefly,
//! temporary ones not at all; a bounded number of entries. Time is an input.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use crate::wire::Verification;

/// How long answers are kept, and how many.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheLimits {
    /// How long an [`Verification::Exists`] answer is kept (10 min).
    pub positive: Duration,
    /// How long an [`Verification::Unknown`] answer is kept (1 min): a new user is found
    /// soon after the account is made.
    pub negative: Duration,
    /// The most answers kept (10,000). When full, expired answers go first, then the ones
    /// that expire soonest.
    pub entries: usize,
}

impl Default for CacheLimits {
    fn default() -> Self {
        CacheLimits {
            positive: Duration::from_secs(600),
            negative: Duration::from_secs(60),
            entries: 10_000,
        }
    }
}

/// The answers, by recipient address (the domain lower-cased).
#[derive(Debug)]
pub(crate) struct VerifyCache {
    limits: CacheLimits,
    entries: HashMap<String, (Verification, Instant)>,
}

/// The cache key of `rcpt`: the local part as it is, the domain in lower case.
fn key(rcpt: &str) -> String {
    match rcpt.rsplit_once('@') {
        Some((local, domain)) => format!("{local}@{}", domain.to_ascii_lowercase()),
        None => rcpt.to_string(),
    }
}

impl VerifyCache {
    pub fn new(limits: CacheLimits) -> Self {
        VerifyCache {
            limits,
            entries: HashMap::new(),
        }
    }

    /// The answer for `rcpt` still fresh at `now`.
    pub fn get(&self, rcpt: &str, now: Instant) -> Option<Verification> {
        self.entries
            .get(&key(rcpt))
            .filter(|(_, expires)| now < *expires)
            .map(|(v, _)| v.clone())
    }

    /// Keeps `answer` for `rcpt` from `now` (an [`Verification::Unavailable`] is not kept).
    pub fn put(&mut self, rcpt: &str, answer: &Verification, now: Instant) {
        let ttl = match answer {
            Verification::Exists => self.limits.positive,
            Verification::Unknown(_) => self.limits.negative,
            Verification::Unavailable(_) => return,
        };
        if self.limits.entries == 0 {
            return;
        }
        let k = key(rcpt);
        if !self.entries.contains_key(&k) && self.entries.len() >= self.limits.entries {
            self.entries.retain(|_, (_, expires)| now < *expires);
            if self.entries.len() >= self.limits.entries
                && let Some(soonest) = self
                    .entries
                    .iter()
                    .min_by_key(|(_, (_, expires))| *expires)
                    .map(|(k, _)| k.clone())
            {
                self.entries.remove(&soonest);
            }
        }
        self.entries.insert(k, (answer.clone(), now + ttl));
    }

    /// The number of answers held (fresh or not).
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.entries.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use estafeta_proto::reply as replies;

    #[test]
    fn positive_ten_minutes_negative_one_temporary_never() {
        let mut c = VerifyCache::new(CacheLimits::default());
        let t0 = Instant::now();
        let unknown = Verification::Unknown(replies::user_unknown("x@d"));
        c.put("alice@Example.ORG", &Verification::Exists, t0);
        c.put("x@d", &unknown, t0);
        c.put(
            "later@d",
            &Verification::Unavailable(replies::local_error()),
            t0,
        );
        assert_eq!(c.get("alice@example.org", t0), Some(Verification::Exists));
        // The local part keeps its case.
        assert_eq!(c.get("Alice@example.org", t0), None);
        assert_eq!(c.get("later@d", t0), None);
        let s59 = t0 + Duration::from_secs(59);
        let s60 = t0 + Duration::from_secs(60);
        assert_eq!(c.get("x@d", s59), Some(unknown));
        assert_eq!(c.get("x@d", s60), None);
        let m10 = t0 + Duration::from_secs(600);
        assert!(
            c.get("alice@example.org", m10 - Duration::from_secs(1))
                .is_some()
        );
        assert_eq!(c.get("alice@example.org", m10), None);
    }

    #[test]
    fn bounded() {
        let limits = CacheLimits {
            entries: 3,
            ..CacheLimits::default()
        };
        let mut c = VerifyCache::new(limits);
        let t0 = Instant::now();
        let unknown = Verification::Unknown(replies::user_unknown("x@d"));
        c.put("a@d", &Verification::Exists, t0);
        c.put("b@d", &unknown, t0);
        c.put("c@d", &Verification::Exists, t0);
        // Full: the one that expires soonest (the negative b) goes.
        c.put("d@d", &Verification::Exists, t0 + Duration::from_secs(1));
        assert_eq!(c.len(), 3);
        assert_eq!(c.get("b@d", t0), None);
        assert!(c.get("a@d", t0).is_some() && c.get("d@d", t0).is_some());
        // Expired answers are cleared first, all at once.
        let later = t0 + Duration::from_secs(3600);
        c.put("e@d", &Verification::Exists, later);
        assert_eq!(c.len(), 1);
        // Replacing an answer does not evict another.
        let mut c = VerifyCache::new(limits);
        for k in ["a@d", "b@d", "c@d"] {
            c.put(k, &Verification::Exists, t0);
        }
        c.put("a@d", &unknown, t0);
        assert_eq!(c.len(), 3);
        assert_eq!(c.get("a@d", t0), Some(unknown));
    }
}
