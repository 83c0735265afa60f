//! A small authoritative DNS server for end-to-end tests: real UDP on 127.0.0.1:<random port>,
//! answering from test zones built in code (MX, null MX, A, AAAA, SERVFAIL, NXDOMAIN), on
//! hickory-proto's message types. The server under test is pointed at it with
//! `[dns] nameservers`; its own resolver (hickory) queries it over the network.
//!
//! Runs on a plain thread, so that synchronous tests need no runtime; stopped on drop.

use std::collections::HashMap;
use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use hickory_resolver::proto::op::{Message, MessageType, ResponseCode};
use hickory_resolver::proto::rr::rdata::{A, AAAA, MX, PTR, SOA, TXT};
use hickory_resolver::proto::rr::{Name, RData, Record, RecordType};

/// Test zones. A name exists when it owns a record; a query for a name that does not exist is
/// NXDOMAIN, for an existing name without records of the asked type NODATA; everything at or
/// under a name marked [`Zones::servfail`] gets SERVFAIL.
#[derive(Default, Clone)]
pub struct Zones {
    records: HashMap<(Name, RecordType), Vec<RData>>,
    servfail: Vec<Name>,
    /// The TTL of every answer; None: 60 s.
    ttl: Option<u32>,
    /// Zones whose answers carry the AD bit, as a validating resolver's would (DANE tests).
    secure: Vec<Name>,
}

impl Zones {
    /// No zones: every name is NXDOMAIN.
    pub fn new() -> Zones {
        Zones::default()
    }

    fn add(mut self, name: &str, rdata: RData) -> Self {
        let key = (name_of(name), rdata.record_type());
        self.records.entry(key).or_default().push(rdata);
        self
    }

    /// `name MX preference exchange`; the exchange `"."` makes a null MX (RFC 7505).
    pub fn mx(self, name: &str, preference: u16, exchange: &str) -> Self {
        self.add(name, RData::MX(MX::new(preference, name_of(exchange))))
    }

    /// `name A ip`.
    pub fn a(self, name: &str, ip: &str) -> Self {
        self.add(name, RData::A(A(ip.parse().expect("an IPv4 address"))))
    }

    /// `name AAAA ip`.
    pub fn aaaa(self, name: &str, ip: &str) -> Self {
        self.add(
            name,
            RData::AAAA(AAAA(ip.parse().expect("an IPv6 address"))),
        )
    }

    /// `name TXT "text"`; a text longer than 255 octets is split into several strings, as a
    /// zone file would hold it.
    pub fn txt(self, name: &str, text: &str) -> Self {
        let strings: Vec<String> = text
            .as_bytes()
            .chunks(255)
            .map(|c| String::from_utf8_lossy(c).into_owned())
            .collect();
        self.add(name, RData::TXT(TXT::new(strings)))
    }

    /// `reverse-name PTR host` for `ip` (its in-addr.arpa / ip6.arpa name).
    pub fn ptr(self, ip: &str, host: &str) -> Self {
        let ip: std::net::IpAddr = ip.parse().expect("an IP address");
        let name = Name::from(ip).to_ascii();
        self.add(&name, RData::PTR(PTR(name_of(host))))
    }

    /// `name SOA …`: the name exists without other records (NODATA for MX and addresses).
    pub fn soa(self, name: &str) -> Self {
        self.add(name, RData::SOA(soa()))
    }

    /// Every query at or under `name` is answered SERVFAIL.
    pub fn servfail(mut self, name: &str) -> Self {
        self.servfail.push(name_of(name));
        self
    }

    /// Answers for names in `zone` carry the AD bit (DNSSEC-secure, as a validating resolver
    /// says it).
    pub fn secure(mut self, zone: &str) -> Self {
        self.secure.push(name_of(zone));
        self
    }

    /// `name TLSA usage selector matching data`.
    pub fn tlsa(self, name: &str, usage: u8, selector: u8, matching: u8, data: &[u8]) -> Self {
        use hickory_resolver::proto::rr::rdata::TLSA;
        self.add(
            name,
            RData::TLSA(TLSA::new(
                usage.into(),
                selector.into(),
                matching.into(),
                data.to_vec(),
            )),
        )
    }

    /// Every answer with this TTL (0: resolvers keep nothing, so a change is seen at once).
    pub fn ttl(mut self, secs: u32) -> Self {
        self.ttl = Some(secs);
        self
    }

    fn answer(&self, request: &Message) -> Message {
        let ttl = self.ttl.unwrap_or(60);
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
        response.metadata.authentic_data = self.secure.iter().any(|zone| zone.zone_of(&name));
        if self.servfail.iter().any(|zone| zone.zone_of(&name)) {
            response.metadata.response_code = ResponseCode::ServFail;
            return response;
        }
        match self.records.get(&(name.clone(), query.query_type)) {
            Some(rdatas) => {
                for rdata in rdatas {
                    response.add_answer(Record::from_rdata(query.name.clone(), ttl, rdata.clone()));
                }
            }
            None => {
                if !self.records.keys().any(|(owner, _)| *owner == name) {
                    response.metadata.response_code = ResponseCode::NXDomain;
                }
                // The SOA makes the negative answer cacheable (RFC 2308), as real servers do.
                response.add_authority(Record::from_rdata(name_of("test"), ttl, RData::SOA(soa())));
            }
        }
        response
    }
}

fn name_of(text: &str) -> Name {
    if text == "." {
        return Name::root();
    }
    let mut name = Name::from_ascii(text).expect("a domain name");
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

/// A running DNS server, and the questions it was asked; stops when dropped.
pub struct DnsServer {
    /// Where it listens (UDP).
    pub addr: SocketAddr,
    queries: Arc<Mutex<Vec<(Name, RecordType)>>>,
    zones: Arc<Mutex<Zones>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl DnsServer {
    /// Serves `zones` on 127.0.0.1 at a free UDP port.
    pub fn start(zones: Zones) -> DnsServer {
        Self::start_on("127.0.0.1:0".parse().expect("an address"), zones)
    }

    /// Serves `zones` on `addr` (UDP), e.g. port 53 for a resolver that knows no other.
    pub fn start_on(addr: SocketAddr, zones: Zones) -> DnsServer {
        let socket = UdpSocket::bind(addr).expect("bind the test DNS server");
        // Wakes up now and then to see whether it should stop.
        socket
            .set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let addr = socket.local_addr().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = stop.clone();
        let queries = Arc::new(Mutex::new(Vec::new()));
        let log = queries.clone();
        let zones = Arc::new(Mutex::new(zones));
        let served = zones.clone();
        let thread = std::thread::spawn(move || {
            let mut buf = vec![0u8; 4096];
            while !stopping.load(Ordering::Relaxed) {
                let Ok((len, peer)) = socket.recv_from(&mut buf) else {
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
                let answer = served.lock().unwrap().answer(&request);
                if let Ok(bytes) = answer.to_vec() {
                    let _ = socket.send_to(&bytes, peer);
                }
            }
        });
        DnsServer {
            addr,
            queries,
            zones,
            stop,
            thread: Some(thread),
        }
    }

    /// Serves `zones` from now on (a zone's operator publishing a change).
    pub fn replace(&self, zones: Zones) {
        *self.zones.lock().unwrap() = zones;
    }

    /// Whether it was asked for `record_type` records of `name`.
    pub fn was_asked(&self, name: &str, record_type: RecordType) -> bool {
        let name = name_of(name);
        self.queries
            .lock()
            .unwrap()
            .iter()
            .any(|(n, t)| *n == name && *t == record_type)
    }
}

impl Drop for DnsServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
