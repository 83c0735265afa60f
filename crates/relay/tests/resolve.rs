//! "Where to connect" against a real DNS server: a small authoritative UDP responder, written
//! here on hickory-proto's message types, serves test zones on 127.0.0.1:<random port>, and the
//! real hickory resolver inside `estafeta_relay::resolve::Resolver` queries it over the network.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use estafeta_relay::resolve::{Destination, IpVersion, LocalIdentity, ResolveError, Resolver};
use hickory_resolver::proto::op::{Message, MessageType, ResponseCode};
use hickory_resolver::proto::rr::rdata::{A, AAAA, MX, SOA};
use hickory_resolver::proto::rr::{Name, RData, Record, RecordType};
use tokio::net::UdpSocket;

/// Per-query timeout of the resolver under test, and the bound on every wait in these tests.
const TIMEOUT: Duration = Duration::from_secs(2);

/// The test zones. A name is "existing" when it owns a record or is listed in `exists`;
/// everything under a name in `servfail` gets SERVFAIL.
#[derive(Default)]
struct Zones {
    records: HashMap<(Name, RecordType), Vec<RData>>,
    servfail: Vec<Name>,
}

impl Zones {
    fn add(&mut self, name: &str, rdata: RData) -> &mut Self {
        let key = (name_of(name), rdata.record_type());
        self.records.entry(key).or_default().push(rdata);
        self
    }
    fn mx(&mut self, name: &str, preference: u16, exchange: &str) -> &mut Self {
        self.add(name, RData::MX(MX::new(preference, name_of(exchange))))
    }
    fn a(&mut self, name: &str, ip: &str) -> &mut Self {
        self.add(name, RData::A(A(ip.parse().unwrap())))
    }
    fn aaaa(&mut self, name: &str, ip: &str) -> &mut Self {
        self.add(name, RData::AAAA(AAAA(ip.parse().unwrap())))
    }

    fn standard() -> Zones {
        let mut z = Zones::default();
        z.mx("two-mx.test", 10, "mx1.two-mx.test")
            .mx("two-mx.test", 20, "mx2.two-mx.test")
            .a("mx1.two-mx.test", "127.0.0.2")
            .a("mx2.two-mx.test", "127.0.0.3");
        z.a("a-only.test", "127.0.0.4");
        z.mx("null-mx.test", 0, ".");
        z.mx("dup.test", 20, "MX.dup.test")
            .mx("dup.test", 10, "mx.dup.test")
            .a("mx.dup.test", "127.0.0.14");
        z.mx("dead-mx.test", 10, "mx.dead-mx.test")
            .a("mx.dead-mx.test", "127.0.0.9");
        z.servfail.push(name_of("servfail.test"));
        z.mx("self.test", 10, "mx.self.test")
            .a("mx.self.test", "127.0.0.10");
        // We are the backup MX (20): the primary stays, the worse one goes.
        z.mx("backup.test", 10, "primary.backup.test")
            .mx("backup.test", 20, "mx.self.test")
            .mx("backup.test", 30, "tertiary.backup.test")
            .a("primary.backup.test", "127.0.0.11")
            .a("tertiary.backup.test", "127.0.0.12");
        // Named by host name rather than address.
        z.mx("byname.test", 5, "smtp.estafeta.test")
            .a("smtp.estafeta.test", "127.0.0.13");
        z.mx("equal.test", 10, "a.equal.test")
            .mx("equal.test", 10, "b.equal.test")
            .mx("equal.test", 5, "first.equal.test")
            .a("a.equal.test", "127.0.0.20")
            .a("b.equal.test", "127.0.0.21")
            .a("first.equal.test", "127.0.0.22");
        z.mx("dual.test", 10, "mx.dual.test")
            .a("mx.dual.test", "127.0.0.6")
            .aaaa("mx.dual.test", "2001:db8::6");
        z.mx("v4only.test", 10, "mx.v4only.test")
            .a("mx.v4only.test", "127.0.0.7");
        // One MX host does not exist, the other resolves.
        z.mx("partial.test", 10, "gone.partial.test")
            .mx("partial.test", 20, "mx.partial.test")
            .a("mx.partial.test", "127.0.0.5");
        // The only MX host does not exist / has no address record.
        z.mx("nohost.test", 10, "gone.nohost.test");
        z.mx("noaddr.test", 10, "mx.noaddr.test")
            .mx("mx.noaddr.test", 10, "elsewhere.test");
        // The only MX host's zone is broken.
        z.mx("tempmx.test", 10, "mx.servfail.test");
        // The domain exists (it owns an SOA) but has neither MX nor address records.
        z.add("empty.test", RData::SOA(soa()));
        // bücher.test, as the resolver must ask for it.
        z.a("xn--bcher-kva.test", "127.0.0.8");
        z
    }

    fn answer(&self, request: &Message) -> Message {
        let mut response = Message::new(
            request.metadata.id,
            MessageType::Response,
            request.metadata.op_code,
        );
        response.metadata.recursion_desired = request.metadata.recursion_desired;
        response.metadata.recursion_available = true;
        response.metadata.authoritative = true;
        response.add_queries(request.queries.iter().cloned());
        let Some(query) = request.queries.first() else {
            response.metadata.response_code = ResponseCode::FormErr;
            return response;
        };
        let name = query.name.to_lowercase();
        if self.servfail.iter().any(|zone| zone.zone_of(&name)) {
            response.metadata.response_code = ResponseCode::ServFail;
            return response;
        }
        let exists = self.records.keys().any(|(owner, _)| *owner == name);
        match self.records.get(&(name.clone(), query.query_type)) {
            Some(rdatas) => {
                for rdata in rdatas {
                    response.add_answer(Record::from_rdata(query.name.clone(), 60, rdata.clone()));
                }
            }
            None => {
                if !exists {
                    response.metadata.response_code = ResponseCode::NXDomain;
                }
                response.add_authority(Record::from_rdata(name_of("test"), 60, RData::SOA(soa())));
            }
        }
        response
    }
}

fn name_of(text: &str) -> Name {
    if text == "." {
        return Name::root();
    }
    let mut name = Name::from_ascii(text).unwrap();
    name.set_fqdn(true);
    name.to_lowercase()
}

fn soa() -> SOA {
    SOA::new(
        name_of("ns.test"),
        name_of("hostmaster.test"),
        1,
        3600,
        600,
        86400,
        60,
    )
}

/// A running test DNS server and the queries it received.
struct DnsServer {
    addr: SocketAddr,
    queries: Arc<Mutex<Vec<(Name, RecordType)>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for DnsServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl DnsServer {
    async fn start(zones: Zones) -> DnsServer {
        let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = socket.local_addr().unwrap();
        let queries = Arc::new(Mutex::new(Vec::new()));
        let log = queries.clone();
        let task = tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            loop {
                let Ok((len, peer)) = socket.recv_from(&mut buf).await else {
                    continue;
                };
                let Ok(request) = Message::from_vec(&buf[..len]) else {
                    continue;
                };
                if let Some(q) = request.queries.first() {
                    log.lock()
                        .unwrap()
                        .push((q.name.to_lowercase(), q.query_type));
                }
                let response = zones.answer(&request);
                let bytes = response.to_vec().expect("encode response");
                let _ = socket.send_to(&bytes, peer).await;
            }
        });
        DnsServer {
            addr,
            queries,
            task,
        }
    }

    fn resolver(&self) -> Resolver {
        Resolver::with_nameservers_and_timeout(&[self.addr], TIMEOUT, 1)
    }

    fn was_asked(&self, name: &str, record_type: RecordType) -> bool {
        let name = name_of(name);
        self.queries
            .lock()
            .unwrap()
            .iter()
            .any(|(n, t)| *n == name && *t == record_type)
    }
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

fn permanent_status(result: Result<Vec<Destination>, ResolveError>) -> (&'static str, String) {
    match result {
        Err(ResolveError::Permanent { status, reason }) => (status, reason),
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
    let dns = DnsServer::start(Zones::standard()).await;
    let dest = destinations(
        &dns.resolver(),
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
    let dest = destinations(&dns.resolver(), "Two-MX.Test.", IpVersion::Any, &nobody())
        .await
        .unwrap();
    assert_eq!(hosts(&dest), ["mx1.two-mx.test", "mx2.two-mx.test"]);
}

#[tokio::test]
async fn a_only_domain_gets_the_implicit_mx() {
    let dns = DnsServer::start(Zones::standard()).await;
    let dest = destinations(&dns.resolver(), "a-only.test", IpVersion::Any, &nobody())
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
    let dns = DnsServer::start(Zones::standard()).await;
    let (status, reason) = permanent_status(
        destinations(&dns.resolver(), "null-mx.test", IpVersion::Any, &nobody()).await,
    );
    assert_eq!(status, "5.1.10");
    assert!(reason.contains("null-mx.test"), "{reason}");
    assert!(reason.contains("null MX"), "{reason}");
    // No implicit MX for a null-MX domain.
    assert!(!dns.was_asked("null-mx.test", RecordType::A));
}

#[tokio::test]
async fn dead_mx_still_resolves() {
    let dns = DnsServer::start(Zones::standard()).await;
    let dest = destinations(&dns.resolver(), "dead-mx.test", IpVersion::Any, &nobody())
        .await
        .unwrap();
    assert_eq!(hosts(&dest), ["mx.dead-mx.test"]);
    assert_eq!(dest[0].addrs, [ip("127.0.0.9")]);
}

#[tokio::test]
async fn nxdomain_is_permanent_5_1_2() {
    let dns = DnsServer::start(Zones::standard()).await;
    let (status, reason) = permanent_status(
        destinations(&dns.resolver(), "nxdomain.test", IpVersion::Any, &nobody()).await,
    );
    assert_eq!(status, "5.1.2");
    assert!(reason.contains("nxdomain.test"), "{reason}");
    assert!(!dns.was_asked("nxdomain.test", RecordType::A));
}

#[tokio::test]
async fn servfail_is_temporary_and_never_falls_back_to_implicit_mx() {
    let dns = DnsServer::start(Zones::standard()).await;
    let reason = temporary_reason(
        destinations(&dns.resolver(), "servfail.test", IpVersion::Any, &nobody()).await,
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
    let dns = DnsServer::start(Zones::standard()).await;
    let (status, reason) = permanent_status(
        destinations(&dns.resolver(), "self.test", IpVersion::Any, &nobody()).await,
    );
    assert_eq!(status, "5.4.6");
    assert_eq!(reason, "mail for self.test loops back to myself");

    // Recognised by host name as well as by address.
    let (status, _) = permanent_status(
        destinations(&dns.resolver(), "byname.test", IpVersion::Any, &nobody()).await,
    );
    assert_eq!(status, "5.4.6");

    // Someone else's server: the same zone is fine.
    let dest = destinations(
        &dns.resolver(),
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
    let dns = DnsServer::start(Zones::standard()).await;
    let dest = destinations(&dns.resolver(), "backup.test", IpVersion::Any, &nobody())
        .await
        .unwrap();
    assert_eq!(hosts(&dest), ["primary.backup.test"]);
    let dest = destinations(
        &dns.resolver(),
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
    let dns = DnsServer::start(Zones::standard()).await;
    let resolver = dns.resolver();
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
    let dns = DnsServer::start(Zones::standard()).await;
    let resolver = dns.resolver();
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
    let dns = DnsServer::start(Zones::standard()).await;
    let resolver = dns.resolver();
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
    let dns = DnsServer::start(Zones::standard()).await;
    let (status, reason) = permanent_status(
        destinations(&dns.resolver(), "empty.test", IpVersion::Any, &nobody()).await,
    );
    assert_eq!(status, "5.4.4");
    assert!(reason.contains("empty.test"), "{reason}");
}

#[tokio::test]
async fn utf8_domain_is_looked_up_by_its_a_labels() {
    let dns = DnsServer::start(Zones::standard()).await;
    let dest = destinations(&dns.resolver(), "Bücher.test", IpVersion::Any, &nobody())
        .await
        .unwrap();
    assert_eq!(hosts(&dest), ["xn--bcher-kva.test"]);
    assert_eq!(dest[0].addrs, [ip("127.0.0.8")]);
}

#[tokio::test]
async fn a_host_listed_twice_is_tried_once_at_its_best_preference() {
    let dns = DnsServer::start(Zones::standard()).await;
    let dest = destinations(&dns.resolver(), "dup.test", IpVersion::Any, &nobody())
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
