//! Rate limits (`[limits] *_rate_*`): connections, messages and recipients per client address
//! (IPv6 per /64) for clients outside mynetworks, messages and recipients per user for
//! authenticated and local (sendmail) senders. GCRA through the governor crate: a limit of
//! `count/period` allows a burst of `count`, refilled evenly over `period`. Over a limit the
//! command is refused (421 at connect, 450 at RCPT), not slowed.

use std::net::IpAddr;
use std::num::NonZeroU32;

use estafeta_config::{Limits, Rate};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};

/// One keyed limit with its name and value, for the reply and the log.
struct Limit<K: std::hash::Hash + Eq + Clone> {
    name: &'static str,
    rate: Rate,
    limiter: DefaultKeyedRateLimiter<K>,
}

impl<K: std::hash::Hash + Eq + Clone> Limit<K> {
    fn new(name: &'static str, rate: Option<Rate>) -> Option<Limit<K>> {
        let rate = rate?;
        let count = NonZeroU32::new(rate.count)?;
        let quota = Quota::with_period(rate.period / rate.count)?.allow_burst(count);
        Some(Limit {
            name,
            rate,
            limiter: RateLimiter::keyed(quota),
        })
    }

    fn check(&self, key: &K) -> Result<(), Exceeded> {
        self.limiter.check_key(key).map_err(|_| Exceeded {
            name: self.name,
            rate: self.rate,
        })
    }
}

/// A limit that was reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exceeded {
    /// The configuration key, e.g. `message_rate_per_ip`.
    pub name: &'static str,
    /// Its value.
    pub rate: Rate,
}

impl std::fmt::Display for Exceeded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.name, self.rate)
    }
}

/// Every configured rate limit, shared by the sessions.
pub struct Rates {
    /// Checks made, to forget old keys now and then.
    checks: std::sync::atomic::AtomicU64,
    connection_ip: Option<Limit<IpAddr>>,
    message_ip: Option<Limit<IpAddr>>,
    recipient_ip: Option<Limit<IpAddr>>,
    message_user: Option<Limit<String>>,
    recipient_user: Option<Limit<String>>,
}

impl std::fmt::Debug for Rates {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rates").finish_non_exhaustive()
    }
}

/// The key of a client address: IPv4 as is, IPv6 by its /64 (one customer's network).
pub fn ip_key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => {
            let s = v6.segments();
            IpAddr::from([s[0], s[1], s[2], s[3], 0, 0, 0, 0])
        }
        v4 => v4,
    }
}

/// Who is sending, for the per-IP or the per-user limits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sender {
    /// Neither authenticated nor in mynetworks: held to the per-IP rates.
    Outside(IpAddr),
    /// Authenticated (or a local user): held to the per-user rates only.
    User(String),
    /// mynetworks: exempt.
    Trusted,
}

impl Rates {
    /// The limits of `limits`; those not set are off.
    pub fn new(limits: &Limits) -> Rates {
        Rates {
            checks: std::sync::atomic::AtomicU64::new(0),
            connection_ip: Limit::new("connection_rate_per_ip", limits.connection_rate_per_ip),
            message_ip: Limit::new("message_rate_per_ip", limits.message_rate_per_ip),
            recipient_ip: Limit::new("recipient_rate_per_ip", limits.recipient_rate_per_ip),
            message_user: Limit::new("message_rate_per_user", limits.message_rate_per_user),
            recipient_user: Limit::new("recipient_rate_per_user", limits.recipient_rate_per_user),
        }
    }

    /// A new connection from `ip` (outside mynetworks).
    pub fn connection(&self, ip: IpAddr) -> Result<(), Exceeded> {
        // Every 4,096 connections, the keys whose budget is full again are forgotten: the
        // tables hold the recent clients only.
        if self
            .checks
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            .is_multiple_of(4096)
        {
            self.prune();
        }
        match &self.connection_ip {
            Some(l) => l.check(&ip_key(ip)),
            None => Ok(()),
        }
    }

    /// A new message (its first recipient) from `sender`.
    pub fn message(&self, sender: &Sender) -> Result<(), Exceeded> {
        match sender {
            Sender::Outside(ip) => self
                .message_ip
                .as_ref()
                .map_or(Ok(()), |l| l.check(&ip_key(*ip))),
            Sender::User(u) => self.message_user.as_ref().map_or(Ok(()), |l| l.check(u)),
            Sender::Trusted => Ok(()),
        }
    }

    /// One more recipient from `sender`.
    pub fn recipient(&self, sender: &Sender) -> Result<(), Exceeded> {
        match sender {
            Sender::Outside(ip) => self
                .recipient_ip
                .as_ref()
                .map_or(Ok(()), |l| l.check(&ip_key(*ip))),
            Sender::User(u) => self.recipient_user.as_ref().map_or(Ok(()), |l| l.check(u)),
            Sender::Trusted => Ok(()),
        }
    }

    /// True when a message or recipient limit is set (the session driver then counts).
    pub fn any_message_limit(&self) -> bool {
        self.message_ip.is_some()
            || self.recipient_ip.is_some()
            || self.message_user.is_some()
            || self.recipient_user.is_some()
    }

    /// Forgets the keys whose limits are fully refilled, so that the tables stay as small as
    /// the set of recent clients (called every minute).
    pub fn prune(&self) {
        if let Some(l) = &self.connection_ip {
            l.limiter.retain_recent();
        }
        if let Some(l) = &self.message_ip {
            l.limiter.retain_recent();
        }
        if let Some(l) = &self.recipient_ip {
            l.limiter.retain_recent();
        }
        if let Some(l) = &self.message_user {
            l.limiter.retain_recent();
        }
        if let Some(l) = &self.recipient_user {
            l.limiter.retain_recent();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn limits(rate: &str) -> Limits {
        let (c, p) = rate.split_once('/').unwrap();
        let r = Some(Rate {
            count: c.parse().unwrap(),
            period: Duration::from_secs(p.parse().unwrap()),
        });
        Limits {
            max_message_size: 1 << 20,
            max_recipients: 100,
            max_connections: 10,
            max_connections_per_ip: 10,
            max_errors: 10,
            command_timeout: Duration::from_secs(300),
            data_timeout: Duration::from_secs(600),
            greet_delay: Duration::ZERO,
            connection_rate_per_ip: r,
            message_rate_per_ip: r,
            recipient_rate_per_ip: r,
            message_rate_per_user: r,
            recipient_rate_per_user: r,
        }
    }

    #[test]
    fn a_burst_of_count_then_refused() {
        let rates = Rates::new(&limits("3/3600"));
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        for _ in 0..3 {
            rates.connection(ip).unwrap();
        }
        let e = rates.connection(ip).unwrap_err();
        assert_eq!(e.to_string(), "connection_rate_per_ip 3/1h");
        // Another address has its own budget.
        rates.connection("192.0.2.2".parse().unwrap()).unwrap();
    }

    #[test]
    fn ipv6_is_counted_per_64() {
        let rates = Rates::new(&limits("2/3600"));
        let a = Sender::Outside("2001:db8:1:2::1".parse().unwrap());
        let b = Sender::Outside("2001:db8:1:2:ffff::9".parse().unwrap());
        let c = Sender::Outside("2001:db8:1:3::1".parse().unwrap());
        rates.message(&a).unwrap();
        rates.message(&b).unwrap();
        assert!(rates.message(&a).is_err());
        rates.message(&c).unwrap();
    }

    #[test]
    fn users_and_trusted_clients() {
        let rates = Rates::new(&limits("1/3600"));
        let alice = Sender::User("alice@example.org".into());
        rates.recipient(&alice).unwrap();
        assert_eq!(
            rates.recipient(&alice).unwrap_err().name,
            "recipient_rate_per_user"
        );
        rates
            .recipient(&Sender::User("bob@example.org".into()))
            .unwrap();
        for _ in 0..10 {
            rates.message(&Sender::Trusted).unwrap();
        }
    }
}
