//! "Where to connect" against a real DNS server: the small authoritative UDP server of the
//! end-to-end tests (tests/dns.rs, on hickory-proto's message types, one copy for both) serves
//! test zones on 127.0.0.1:<random port>, and the real hickory resolver inside
//! `estafeta_relay::resolve::Resolver` queries it over the network.

use std::collections::HashSet;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use estafeta_relay::resolve::{Destination, IpVersion, LocalIdentity, ResolveError, Resolver};
use hickory_resolver::proto::rr::RecordType;
use tokio::net::UdpSocket;

#[allow(dead_code)] // shared with tests/ (the e2e crate); not every helper is used here
#[path = "../../../tests/dns.rs"]
mod dns;
use dns::{DnsServer, Zones};

/// Per-query timeout of the resolver under test, and the bound on every wait in these tests.
const TIMEOUT: Duration = Duration::from_secs(2);

/// The zones of these tests.
fn standard() -> Zones {
    Zones::new()
        .mx("two-mx.test", 10, "mx1.two-mx.test")
        .mx("two-mx.test", 20, "mx2.two-mx.test")
        .a("mx1.two-mx.test", "127.0.0.2")
        .a("mx2.two-mx.test", "127.0.0.3")
        .a("a-only.test", "127.0.0.4")
        .mx("null-mx.test", 0, ".")
        .mx("dup.test", 20, "MX.dup.test")
        .mx("dup.test", 10, "mx.dup.test")
        .a("mx.dup.test", "127.0.0.14")
        .mx("dead-mx.test", 10, "mx.dead-mx.test")
        .a("mx.dead-mx.test", "127.0.0.9")
        .servfail("servfail.test")
        .mx("self.test", 10, "mx.self.test")
        .a("mx.self.test", "127.0.0.10")
        // We are the backup MX (20): the primary stays, the worse one goes.
        .mx("backup.test", 10, "primary.backup.test")
        .mx("backup.test", 20, "mx.self.test")
        .mx("backup.test", 30, "tertiary.backup.test")
        .a("primary.backup.test", "127.0.0.11")
        .a("tertiary.backup.test", "127.0.0.12")
        // Named by host name rather than address.
        .mx("byname.test", 5, "smtp.estafeta.test")
        .a("smtp.estafeta.test", "127.0.0.13")
        .mx("equal.test", 10, "a.equal.test")
        .mx("equal.test", 10, "b.equal.test")
        .mx("equal.test", 5, "first.equal.test")
        .a("a.equal.test", "127.0.0.20")
        .a("b.equal.test", "127.0.0.21")
        .a("first.equal.test", "127.0.0.22")
        .mx("dual.test", 10, "mx.dual.test")
        .a("mx.dual.test", "127.0.0.6")
        .aaaa("mx.dual.test", "2001:db8::6")
        .mx("v4only.test", 10, "mx.v4only.test")
        .a("mx.v4only.test", "127.0.0.7")
        // One MX host does not exist, the other resolves.
        .mx("partial.test", 10, "gone.partial.test")
        .mx("partial.test", 20, "mx.partial.test")
        .a("mx.partial.test", "127.0.0.5")
        // The only MX host does not exist / has no address record.
        .mx("nohost.test", 10, "gone.nohost.test")
        .mx("noaddr.test", 10, "mx.noaddr.test")
        .mx("mx.noaddr.test", 10, "elsewhere.test")
        // The only MX host's zone is broken.
        .mx("tempmx.test", 10, "mx.servfail.test")
        // The domain exists (it owns an SOA) but has neither MX nor address records.
        .soa("empty.test")
        // bücher.test, as the resolver must ask for it.
        .a("xn--bcher-kva.test", "127.0.0.8")
}

/// The resolver under test, asking `dns` only.
fn resolver_of(dns: &DnsServer) -> Resolver {
    Resolver::with_nameservers_and_timeout(&[dns.addr], TIMEOUT, 1)
}

fn nobody() -> LocalIdentity {
    LocalIdentity {
        hostnames: vec!["smtp.estafeta.test".into()],
        addrs: vec!["127.0.0.10".parse().unwrap()],
    }
}

fn ip(text: &str) -> IpAddr {
    text.parse().unwrap()
}

/// Every lookup is bounded: two resolver timeouts at most, plus slack.
async fn destinations(
    resolver: &Resolver,
    domain: &str,
    ip_version: IpVersion,
    local: &LocalIdentity,
) -> Result<Vec<Destination>, ResolveError> {
    tokio::time::timeout(
        TIMEOUT * 3,
        resolver.destinations(domain, ip_version, local),
    )
    .await
    .expect("destinations() must finish within its resolver timeouts")
}

fn hosts(dest: &[Destination]) -> Vec<&str> {
    dest.iter().map(|d| d.host.as_str()).collect()
}

/// The status as it is written (`5.1.10`) and the reason of a permanent error.
fn permanent_status(result: Result<Vec<Destination>, ResolveError>) -> (String, String) {
    match result {
        Err(ResolveError::Permanent { status, reason }) => (status.to_string(), reason),
        other => panic!("expected a permanent error, got {other:?}"),
    }
}

fn temporary_reason(result: Result<Vec<Destination>, ResolveError>) -> String {
    match result {
        Err(ResolveError::Temporary { reason }) => reason,
        other => panic!("expected a temporary error, got {other:?}"),
    }
}

#[tokio::test]
async fn two_mx_in_preference_order() {
    let dns = DnsServer::start(standard());
    let dest = destinations(
        &resolver_of(&dns),
        "two-mx.test",
        IpVersion::Any,
        &LocalIdentity::default(),
    )
    .await
    .unwrap();
    assert_eq!(
        dest,
        vec![
            Destination {
                host: "mx1.two-mx.test".into(),
                preference: 10,
                addrs: vec![ip("127.0.0.2")],
            },
            Destination {
                host: "mx2.two-mx.test".into(),
                preference: 20,
                addrs: vec![ip("127.0.0.3")],
            },
        ]
    );
    // Case and a trailing dot do not matter.
    let dest = destinations(
        &resolver_of(&dns),
        "Two-MX.Test.",
        IpVersion::Any,
        &nobody(),
    )
    .await
    .unwrap();
    assert_eq!(hosts(&dest), ["mx1.two-mx.test", "mx2.two-mx.test"]);
}

#[tokio::test]
async fn a_only_domain_gets_the_implicit_mx() {
    let dns = DnsServer::start(standard());
    let dest = destinations(&resolver_of(&dns), "a-only.test", IpVersion::Any, &nobody())
        .await
        .unwrap();
    assert_eq!(
        dest,
        vec![Destination {
            host: "a-only.test".into(),
            preference: 0,
            addrs: vec![ip("127.0.0.4")],
        }]
    );
    assert!(dns.was_asked("a-only.test", RecordType::MX));
}

#[tokio::test]
async fn null_mx_is_permanent_5_1_10() {
    let dns = DnsServer::start(standard());
    let (status, reason) = permanent_status(
        destinations(
            &resolver_of(&dns),
            "null-mx.test",
            IpVersion::Any,
            &nobody(),
        )
        .await,
    );
    assert_eq!(status, "5.1.10");
    assert!(reason.contains("null-mx.test"), "{reason}");
    assert!(reason.contains("null MX"), "{reason}");
    // No implicit MX for a null-MX domain.
    assert!(!dns.was_asked("null-mx.test", RecordType::A));
}

#[tokio::test]
async fn dead_mx_still_resolves() {
    let dns = DnsServer::start(standard());
    let dest = destinations(
        &resolver_of(&dns),
        "dead-mx.test",
        IpVersion::Any,
        &nobody(),
    )
    .await
    .unwrap();
    assert_eq!(hosts(&dest), ["mx.dead-mx.test"]);
    assert_eq!(dest[0].addrs, [ip("127.0.0.9")]);
}

#[tokio::test]
async fn nxdomain_is_permanent_5_1_2() {
    let dns = DnsServer::start(standard());
    let (status, reason) = permanent_status(
        destinations(
            &resolver_of(&dns),
            "nxdomain.test",
            IpVersion::Any,
            &nobody(),
        )
        .await,
    );
    assert_eq!(status, "5.1.2");
    assert!(reason.contains("nxdomain.test"), "{reason}");
    assert!(!dns.was_asked("nxdomain.test", RecordType::A));
}

#[tokio::test]
async fn servfail_is_temporary_and_never_falls_back_to_implicit_mx() {
    let dns = DnsServer::start(standard());
    let reason = temporary_reason(
        destinations(
            &resolver_of(&dns),
            "servfail.test",
            IpVersion::Any,
            &nobody(),
        )
        .await,
    );
    assert!(reason.contains("servfail.test"), "{reason}");
    assert!(
        reason.to_lowercase().contains("servfail") || reason.contains("Server Failure"),
        "{reason}"
    );
    assert!(dns.was_asked("servfail.test", RecordType::MX));
    assert!(!dns.was_asked("servfail.test", RecordType::A));
    assert!(!dns.was_asked("servfail.test", RecordType::AAAA));
}

#[tokio::test]
async fn timeout_is_temporary_and_bounded() {
    // A UDP socket that never answers.
    let silent = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let resolver = Resolver::with_nameservers_and_timeout(
        &[silent.local_addr().unwrap()],
        Duration::from_millis(500),
        1,
    );
    let started = Instant::now();
    let result = destinations(&resolver, "two-mx.test", IpVersion::Any, &nobody()).await;
    let reason = temporary_reason(result);
    assert!(reason.contains("two-mx.test"), "{reason}");
    // One try of 500 ms, not a retry nor a second transport.
    assert!(
        started.elapsed() < Duration::from_millis(1500),
        "took {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn mx_pointing_at_myself_is_permanent_5_4_6() {
    let dns = DnsServer::start(standard());
    let (status, reason) = permanent_status(
        destinations(&resolver_of(&dns), "self.test", IpVersion::Any, &nobody()).await,
    );
    assert_eq!(status, "5.4.6");
    assert_eq!(reason, "mail for self.test loops back to myself");

    // Recognised by host name as well as by address.
    let (status, _) = permanent_status(
        destinations(&resolver_of(&dns), "byname.test", IpVersion::Any, &nobody()).await,
    );
    assert_eq!(status, "5.4.6");

    // Someone else's server: the same zone is fine.
    let dest = destinations(
        &resolver_of(&dns),
        "self.test",
        IpVersion::Any,
        &LocalIdentity::default(),
    )
    .await
    .unwrap();
    assert_eq!(hosts(&dest), ["mx.self.test"]);
}

#[tokio::test]
async fn as_backup_mx_only_better_preferences_remain() {
    let dns = DnsServer::start(standard());
    let dest = destinations(&resolver_of(&dns), "backup.test", IpVersion::Any, &nobody())
        .await
        .unwrap();
    assert_eq!(hosts(&dest), ["primary.backup.test"]);
    let dest = destinations(
        &resolver_of(&dns),
        "backup.test",
        IpVersion::Any,
        &LocalIdentity::default(),
    )
    .await
    .unwrap();
    assert_eq!(
        hosts(&dest),
        [
            "primary.backup.test",
            "mx.self.test",
            "tertiary.backup.test"
        ]
    );
}

#[tokio::test]
async fn equal_preferences_are_shuffled() {
    let dns = DnsServer::start(standard());
    let resolver = resolver_of(&dns);
    let mut orders = HashSet::new();
    for _ in 0..50 {
        let dest = destinations(&resolver, "equal.test", IpVersion::Any, &nobody())
            .await
            .unwrap();
        let order: Vec<String> = dest.iter().map(|d| d.host.clone()).collect();
        // The better preference always comes first.
        assert_eq!(order[0], "first.equal.test");
        assert_eq!(
            dest.iter().map(|d| d.preference).collect::<Vec<_>>(),
            [5, 10, 10]
        );
        orders.insert(order);
    }
    assert_eq!(
        orders,
        HashSet::from([
            vec![
                "first.equal.test".to_string(),
                "a.equal.test".into(),
                "b.equal.test".into()
            ],
            vec![
                "first.equal.test".to_string(),
                "b.equal.test".into(),
                "a.equal.test".into()
            ],
        ])
    );
}

#[tokio::test]
async fn ip_version_filters_addresses() {
    let dns = DnsServer::start(standard());
    let resolver = resolver_of(&dns);
    let local = nobody();
    let any = destinations(&resolver, "dual.test", IpVersion::Any, &local)
        .await
        .unwrap();
    assert_eq!(any[0].addrs, [ip("2001:db8::6"), ip("127.0.0.6")]);
    let v4 = destinations(&resolver, "dual.test", IpVersion::Ipv4, &local)
        .await
        .unwrap();
    assert_eq!(v4[0].addrs, [ip("127.0.0.6")]);
    let v6 = destinations(&resolver, "dual.test", IpVersion::Ipv6, &local)
        .await
        .unwrap();
    assert_eq!(v6[0].addrs, [ip("2001:db8::6")]);

    // An IPv4-only MX when only IPv6 may be used: nowhere to go.
    let (status, reason) =
        permanent_status(destinations(&resolver, "v4only.test", IpVersion::Ipv6, &local).await);
    assert_eq!(status, "5.4.4");
    assert!(reason.contains("v4only.test"), "{reason}");
    assert!(!dns.was_asked("mx.v4only.test", RecordType::A));
}

#[tokio::test]
async fn unresolvable_mx_hosts_are_skipped() {
    let dns = DnsServer::start(standard());
    let resolver = resolver_of(&dns);
    let dest = destinations(&resolver, "partial.test", IpVersion::Any, &nobody())
        .await
        .unwrap();
    assert_eq!(hosts(&dest), ["mx.partial.test"]);

    for domain in ["nohost.test", "noaddr.test"] {
        let (status, reason) =
            permanent_status(destinations(&resolver, domain, IpVersion::Any, &nobody()).await);
        assert_eq!(status, "5.4.4", "{domain}");
        assert!(
            reason.starts_with(&format!("no usable address for any MX of {domain}")),
            "{reason}"
        );
    }

    // The MX host's lookup fails temporarily and nothing else resolves: temporary.
    let reason =
        temporary_reason(destinations(&resolver, "tempmx.test", IpVersion::Any, &nobody()).await);
    assert!(reason.contains("mx.servfail.test"), "{reason}");
}

#[tokio::test]
async fn existing_domain_without_mx_or_address_is_permanent_5_4_4() {
    let dns = DnsServer::start(standard());
    let (status, reason) = permanent_status(
        destinations(&resolver_of(&dns), "empty.test", IpVersion::Any, &nobody()).await,
    );
    assert_eq!(status, "5.4.4");
    assert!(reason.contains("empty.test"), "{reason}");
}

#[tokio::test]
async fn utf8_domain_is_looked_up_by_its_a_labels() {
    let dns = DnsServer::start(standard());
    let dest = destinations(&resolver_of(&dns), "Bücher.test", IpVersion::Any, &nobody())
        .await
        .unwrap();
    assert_eq!(hosts(&dest), ["xn--bcher-kva.test"]);
    assert_eq!(dest[0].addrs, [ip("127.0.0.8")]);
}

#[tokio::test]
async fn a_host_listed_twice_is_tried_once_at_its_best_preference() {
    let dns = DnsServer::start(standard());
    let dest = destinations(&resolver_of(&dns), "dup.test", IpVersion::Any, &nobody())
        .await
        .unwrap();
    assert_eq!(
        dest,
        vec![Destination {
            host: "mx.dup.test".into(),
            preference: 10,
            addrs: vec![ip("127.0.0.14")],
        }]
    );
}
