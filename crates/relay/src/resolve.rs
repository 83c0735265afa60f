//! Where to connect: the MX hosts of a recipient domain and their addresses, in the order an SMTP
//! client tries them (RFC 5321 §5.1, RFC 7505).
//!
//! This step only answers "which addresses, in which order"; it opens no SMTP connection. The
//! rules, in the order they are applied by [`Resolver::destinations`]:
//!
//! 1. An address literal (`[192.0.2.7]`, `[IPv6:2001:db8::7]`) is not looked up: it is the only
//!    destination (the caller usually handles literals before calling).
//! 2. `MX` lookup of the domain. NXDOMAIN → permanent `5.1.2`; SERVFAIL, REFUSED, a timeout or any
//!    other failure → temporary (and never an implicit MX); a lone null MX (`MX 0 .`, RFC 7505) →
//!    permanent `556 5.1.10`; no MX record although the name exists (NODATA) → the implicit MX: the
//!    domain itself with preference 0.
//! 3. `A`/`AAAA` of every MX host, concurrently, per [`IpVersion`]. A host whose name does not
//!    resolve is skipped (debug log).
//! 4. Loop detection: if an MX host is this server (by name or by address, [`LocalIdentity`]),
//!    it and every MX host with the same or a worse preference are dropped, as Postfix does; if
//!    nothing is left, the best MX is this server → permanent `5.4.6` "mail for DOMAIN loops back
//!    to myself".
//! 5. Order: by preference, shuffled among equal preferences (RFC 5321 §5.1 "MUST randomize").
//! 6. No host left with an address → permanent `5.4.4`, unless some host lookup failed
//!    temporarily, which makes the whole answer temporary.
//!
//! The hosts file (`/etc/hosts`) is not consulted: like Postfix's default `smtp_host_lookup = dns`,
//! mail routing follows DNS only.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use estafeta_proto::reply::Status;
use hickory_resolver::TokioResolver;
use hickory_resolver::config::{
    ConnectionConfig, NameServerConfig, ResolveHosts, ResolverConfig, ResolverOpts,
};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::net::{DnsError, NetError};
use hickory_resolver::proto::op::ResponseCode;
use hickory_resolver::proto::rr::{Name, RData};
use tracing::debug;

/// Which address families to deliver over (`[relay] ip_version`). With `Any`, each MX host's
/// IPv6 addresses come first, then its IPv4 addresses (the RFC 6724 default preference for
/// global addresses; a host without IPv6 connectivity fails those connects at once with
/// "network unreachable" and moves on); `Ipv4`/`Ipv6` look up only `A`/`AAAA` records.
pub use estafeta_config::IpVersion;

/// One MX host to try and its addresses, in the order to try them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Destination {
    /// The MX host name, lower case, without the trailing dot (for an implicit MX, the domain
    /// itself; for an address literal, the literal with its brackets).
    pub host: String,
    /// The MX preference (0 for an implicit MX and an address literal).
    pub preference: u16,
    /// The host's addresses for the requested [`IpVersion`]; never empty.
    pub addrs: Vec<IpAddr>,
}

/// This server's own identity, to recognise an MX that points back at us (RFC 5321 §5.1).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LocalIdentity {
    /// The names this server answers to (its EHLO name and any other name of this host);
    /// compared case-insensitively, a trailing dot ignored.
    pub hostnames: Vec<String>,
    /// The addresses this server accepts mail on. List concrete addresses: a wildcard listener
    /// (`0.0.0.0`, `::`) should be expanded by the caller into the host's interface addresses.
    pub addrs: Vec<IpAddr>,
}

/// Why there is nowhere to connect to. Each variant carries a human reason for logs and
/// bounces.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResolveError {
    /// The domain cannot receive mail, now or later: bounce. `status` is the RFC 3463 enhanced
    /// status code: `5.1.10` null MX (RFC 7505, reply `556`), `5.1.2` the domain does not exist
    /// (or is not a valid domain name), `5.4.6` the mail would loop back to this server, `5.4.4`
    /// no MX host has an address.
    #[error("{reason} ({status})")]
    Permanent {
        /// Enhanced status code, e.g. [`Status::NULL_MX`].
        status: Status,
        /// Human reason, e.g. "domain example.test does not accept mail (null MX)".
        reason: String,
    },
    /// DNS could not give an answer now (SERVFAIL, REFUSED, timeout, network error): keep the
    /// message and try again later. Never treated as "no MX".
    #[error("{reason}")]
    Temporary {
        /// Human reason, e.g. "temporary DNS failure looking up MX of example.test: ...".
        reason: String,
    },
}

impl ResolveError {
    /// Whether a later attempt may succeed.
    pub fn is_temporary(&self) -> bool {
        matches!(self, ResolveError::Temporary { .. })
    }

    /// The RFC 3463 enhanced status code (`4.4.3` "directory server failure" for temporary
    /// errors).
    pub fn status(&self) -> Status {
        match self {
            ResolveError::Permanent { status, .. } => *status,
            ResolveError::Temporary { .. } => Status::DIRECTORY_FAILURE,
        }
    }

    /// The human reason.
    pub fn reason(&self) -> &str {
        match self {
            ResolveError::Permanent { reason, .. } | ResolveError::Temporary { reason } => reason,
        }
    }
}

/// The system DNS configuration could not be read.
#[derive(Debug, Clone, thiserror::Error)]
#[error("cannot read the system DNS configuration (/etc/resolv.conf): {0}")]
pub struct SystemConfigError(String);

/// Finds where to deliver mail for a domain. Cheap to clone (the cache is shared).
#[derive(Clone)]
pub struct Resolver {
    inner: TokioResolver,
}

impl std::fmt::Debug for Resolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Resolver").finish_non_exhaustive()
    }
}

/// Default per-query timeout for [`Resolver::with_nameservers`].
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);
/// Default number of tries per query (the first one included) for
/// [`Resolver::with_nameservers`].
pub const DEFAULT_TRIES: usize = 2;

impl Resolver {
    /// The resolver configured by the system (`/etc/resolv.conf`: nameservers, timeout,
    /// attempts). The hosts file is not used.
    pub fn system() -> Result<Resolver, SystemConfigError> {
        let mut builder =
            TokioResolver::builder_tokio().map_err(|e| SystemConfigError(e.to_string()))?;
        builder.options_mut().use_hosts_file = ResolveHosts::Never;
        let inner = builder
            .build()
            .map_err(|e| SystemConfigError(e.to_string()))?;
        Ok(Resolver { inner })
    }

    /// A resolver asking the given nameservers (config `[dns] nameservers = ["127.0.0.1:5353"]`)
    /// over UDP, and over TCP on the same port for truncated answers, with
    /// [`DEFAULT_TIMEOUT`] per query and [`DEFAULT_TRIES`] tries.
    /// An empty list makes every lookup fail temporarily.
    pub fn with_nameservers(servers: &[SocketAddr]) -> Resolver {
        Self::with_nameservers_and_timeout(servers, DEFAULT_TIMEOUT, DEFAULT_TRIES)
    }

    /// Like [`Resolver::with_nameservers`], with the per-query `timeout` and the number of
    /// `tries` per query, the first one included (at least 1; SERVFAIL and timeouts are tried
    /// again, NXDOMAIN and NODATA are not). A call of [`Resolver::destinations`] then takes at
    /// most about `2 × timeout × tries`: the MX query, then the address queries concurrently.
    pub fn with_nameservers_and_timeout(
        servers: &[SocketAddr],
        timeout: Duration,
        tries: usize,
    ) -> Resolver {
        let name_servers = servers
            .iter()
            .map(|server| {
                let mut udp = ConnectionConfig::udp();
                udp.port = server.port();
                let mut tcp = ConnectionConfig::tcp();
                tcp.port = server.port();
                NameServerConfig::new(server.ip(), true, vec![udp, tcp])
            })
            .collect();
        let config = ResolverConfig::from_name_servers(name_servers);
        let mut options = ResolverOpts::default();
        options.timeout = timeout;
        // hickory's `attempts` counts the retries after the first try.
        options.attempts = tries.max(1) - 1;
        options.use_hosts_file = ResolveHosts::Never;
        let inner = TokioResolver::builder_with_config(config, TokioRuntimeProvider::default())
            .with_options(options)
            .build()
            // Building fails only for TLS transports, which are not configured here.
            .expect("a UDP/TCP resolver configuration always builds");
        Resolver { inner }
    }

    /// The TXT records at `name`, each with its strings joined: `Ok(vec![])` when the name
    /// does not exist or has none (NXDOMAIN, NODATA); `Err` when the lookup failed.
    pub async fn txt(&self, name: &str) -> Result<Vec<String>, String> {
        let name = Name::from_ascii(name).map_err(|e| format!("invalid name {name:?}: {e}"))?;
        match self.inner.txt_lookup(name).await {
            Ok(lookup) => Ok(lookup
                .answers()
                .iter()
                .filter_map(|r| match &r.data {
                    RData::TXT(txt) => Some(
                        txt.txt_data
                            .iter()
                            .map(|s| String::from_utf8_lossy(s).into_owned())
                            .collect::<String>(),
                    ),
                    _ => None,
                })
                .collect()),
            Err(err) => match classify(&err) {
                Negative::NxDomain | Negative::NoData => Ok(Vec::new()),
                Negative::Failure => Err(describe(&err)),
            },
        }
    }

    /// The addresses of `host` (IPv6 first, then IPv4, per `ip_version`), or why there are
    /// none.
    pub async fn host_addresses(
        &self,
        host: &str,
        ip_version: IpVersion,
    ) -> Result<Vec<IpAddr>, String> {
        let name = Name::from_ascii(host).map_err(|e| format!("invalid name {host:?}: {e}"))?;
        match host_addrs(&self.inner, name, ip_version).await {
            HostAddrs::Found(addrs) => Ok(addrs),
            HostAddrs::None(why) | HostAddrs::Failed(why) => Err(why),
        }
    }

    /// The hosts to try for `domain`, in order: MX hosts sorted by preference, shuffled among
    /// equal preferences, each with its addresses per `ip_version` ([`IpVersion::Any`]: IPv6
    /// first, then IPv4).
    ///
    /// The implicit MX (the domain's own A/AAAA, preference 0) is used only when the domain
    /// exists and has no MX record (NODATA) — never after a temporary failure. `local` is this
    /// server: if the best-preference MX is this server → permanent `5.4.6` "mail for DOMAIN loops
    /// back to myself"; MX hosts with the same or a worse preference than ours are dropped
    /// (RFC 5321 §5.1). See the module documentation for the full rules and status codes.
    pub async fn destinations(
        &self,
        domain: &str,
        ip_version: IpVersion,
        local: &LocalIdentity,
    ) -> Result<Vec<Destination>, ResolveError> {
        let domain = domain.trim_end_matches('.').to_ascii_lowercase();

        if let Some(ip) = address_literal(&domain) {
            return literal_destination(&domain, ip, ip_version, local);
        }

        let name = fqdn(&domain).ok_or_else(|| ResolveError::Permanent {
            status: Status::BAD_SYSTEM,
            reason: format!("{domain:?} is not a valid domain name"),
        })?;

        // 1. MX records, or the implicit MX.
        let (mut candidates, implicit) = match self.inner.mx_lookup(name.clone()).await {
            Ok(lookup) => {
                let mut mxs: Vec<(u16, Name)> = lookup
                    .answers()
                    .iter()
                    .filter_map(|record| match &record.data {
                        RData::MX(mx) => Some((mx.preference, mx.exchange.clone())),
                        _ => None,
                    })
                    .collect();
                if mxs.len() == 1 && mxs[0].1.is_root() {
                    return Err(ResolveError::Permanent {
                        status: Status::NULL_MX,
                        reason: format!("domain {domain} does not accept mail (null MX)"),
                    });
                }
                // RFC 7505 forbids a null MX next to others; ignore it there.
                mxs.retain(|(_, exchange)| !exchange.is_root());
                // A host listed twice is tried once, at its best preference.
                mxs.sort_by_key(|(preference, _)| *preference);
                let mut seen = Vec::with_capacity(mxs.len());
                mxs.retain(|(_, exchange)| {
                    let key = exchange.to_lowercase();
                    let new = !seen.contains(&key);
                    seen.push(key);
                    new
                });
                if mxs.is_empty() {
                    // Only CNAMEs or other types in the answer: no MX record.
                    (vec![(0, name.clone())], true)
                } else {
                    (mxs, false)
                }
            }
            Err(err) => match classify(&err) {
                Negative::NxDomain => {
                    return Err(ResolveError::Permanent {
                        status: Status::BAD_SYSTEM,
                        reason: format!("domain {domain} does not exist (NXDOMAIN)"),
                    });
                }
                Negative::NoData => (vec![(0, name.clone())], true),
                Negative::Failure => {
                    return Err(ResolveError::Temporary {
                        reason: format!(
                            "temporary DNS failure looking up MX of {domain}: {}",
                            describe(&err)
                        ),
                    });
                }
            },
        };
        if implicit {
            debug!(%domain, "no MX records; using the implicit MX (the domain's own addresses)");
        }

        // Sort now, shuffle among equals: the shuffle survives the stable operations below.
        shuffle(&mut candidates);
        candidates.sort_by_key(|(preference, _)| *preference);

        // 2. Addresses of every host, concurrently.
        let mut tasks = tokio::task::JoinSet::new();
        for (index, (_, host)) in candidates.iter().enumerate() {
            let resolver = self.inner.clone();
            let host = host.clone();
            tasks.spawn(async move { (index, host_addrs(&resolver, host, ip_version).await) });
        }
        let mut results: Vec<Option<HostAddrs>> = vec![None; candidates.len()];
        while let Some(joined) = tasks.join_next().await {
            match joined {
                Ok((index, result)) => results[index] = Some(result),
                Err(err) => {
                    return Err(ResolveError::Temporary {
                        reason: format!("address lookup for an MX of {domain} failed: {err}"),
                    });
                }
            }
        }

        let mut hosts: Vec<(u16, String, HostAddrs)> = candidates
            .into_iter()
            .zip(results)
            .map(|((preference, host), result)| {
                let result = result.unwrap_or(HostAddrs::Failed("lookup did not finish".into()));
                (preference, display_name(&host), result)
            })
            .collect();

        // 3. Loops: drop ourselves and everything not better than us.
        let own_preference = hosts
            .iter()
            .filter(|(_, host, result)| is_local(host, result, local))
            .map(|(preference, _, _)| *preference)
            .min();
        if let Some(own) = own_preference {
            let best = hosts.iter().map(|(p, _, _)| *p).min().unwrap_or(own);
            if own <= best {
                return Err(ResolveError::Permanent {
                    status: Status::ROUTING_LOOP,
                    reason: format!("mail for {domain} loops back to myself"),
                });
            }
            debug!(%domain, own, "this server is an MX; dropping MX hosts with preference >= ours");
            hosts.retain(|(preference, _, _)| *preference < own);
        }

        // 4. Keep the hosts that have addresses.
        let mut destinations = Vec::new();
        let mut temporary = Vec::new();
        let mut missing = Vec::new();
        for (preference, host, result) in hosts {
            match result {
                HostAddrs::Found(addrs) => destinations.push(Destination {
                    host,
                    preference,
                    addrs,
                }),
                HostAddrs::None(why) => {
                    debug!(%domain, %host, "skipping MX host without address: {why}");
                    missing.push(format!("{host}: {why}"));
                }
                HostAddrs::Failed(why) => {
                    debug!(%domain, %host, "skipping MX host, address lookup failed: {why}");
                    temporary.push(format!("{host}: {why}"));
                }
            }
        }
        if !destinations.is_empty() {
            return Ok(destinations);
        }
        if !temporary.is_empty() {
            let of = if implicit { "" } else { "the MX hosts of " };
            return Err(ResolveError::Temporary {
                reason: format!(
                    "temporary DNS failure looking up the addresses of {of}{domain}: {}",
                    temporary.join("; ")
                ),
            });
        }
        let family = match ip_version {
            IpVersion::Any => "",
            IpVersion::Ipv4 => " IPv4",
            IpVersion::Ipv6 => " IPv6",
        };
        Err(ResolveError::Permanent {
            status: Status::UNABLE_TO_ROUTE,
            reason: if implicit {
                format!("no MX and no usable{family} address for {domain}")
            } else {
                format!(
                    "no usable{family} address for any MX of {domain} ({})",
                    missing.join("; ")
                )
            },
        })
    }
}

/// The address inside an address literal domain (`[192.0.2.7]`, `[IPv6:2001:db8::7]`, RFC 5321
/// §4.1.3), or `None` if `domain` is not one.
pub fn address_literal(domain: &str) -> Option<IpAddr> {
    let inner = domain.strip_prefix('[')?.strip_suffix(']')?;
    if let Some(v6) = inner
        .get(..5)
        .filter(|tag| tag.eq_ignore_ascii_case("ipv6:"))
        .map(|_| &inner[5..])
    {
        return v6.parse::<Ipv6Addr>().ok().map(IpAddr::V6);
    }
    inner.parse::<Ipv4Addr>().ok().map(IpAddr::V4)
}

fn literal_destination(
    domain: &str,
    ip: IpAddr,
    ip_version: IpVersion,
    local: &LocalIdentity,
) -> Result<Vec<Destination>, ResolveError> {
    let allowed = match ip_version {
        IpVersion::Any => true,
        IpVersion::Ipv4 => ip.is_ipv4(),
        IpVersion::Ipv6 => ip.is_ipv6(),
    };
    if !allowed {
        return Err(ResolveError::Permanent {
            status: Status::UNABLE_TO_ROUTE,
            reason: format!("address literal {domain} is excluded by ip_version"),
        });
    }
    if local.addrs.contains(&ip) {
        return Err(ResolveError::Permanent {
            status: Status::ROUTING_LOOP,
            reason: format!("mail for {domain} loops back to myself"),
        });
    }
    Ok(vec![Destination {
        host: domain.to_string(),
        preference: 0,
        addrs: vec![ip],
    }])
}

/// The outcome of the address lookups of one host.
#[derive(Debug, Clone)]
enum HostAddrs {
    /// Addresses in the order to try.
    Found(Vec<IpAddr>),
    /// The name has no address of the wanted families (NXDOMAIN or NODATA).
    None(String),
    /// A lookup failed temporarily and nothing was found.
    Failed(String),
}

/// What a failed lookup means.
enum Negative {
    NxDomain,
    NoData,
    Failure,
}

fn classify(err: &NetError) -> Negative {
    match err {
        NetError::Dns(DnsError::NoRecordsFound(no_records)) => match no_records.response_code {
            ResponseCode::NXDomain => Negative::NxDomain,
            ResponseCode::NoError => Negative::NoData,
            _ => Negative::Failure,
        },
        _ => Negative::Failure,
    }
}

fn describe(err: &NetError) -> String {
    match err {
        NetError::Dns(DnsError::ResponseCode(code)) => format!("the server answered {code}"),
        NetError::Timeout => "no answer (timeout)".to_string(),
        other => other.to_string(),
    }
}

async fn host_addrs(resolver: &TokioResolver, host: Name, ip_version: IpVersion) -> HostAddrs {
    let want_v6 = ip_version != IpVersion::Ipv4;
    let want_v4 = ip_version != IpVersion::Ipv6;
    let v6 = async {
        if want_v6 {
            Some(resolver.ipv6_lookup(host.clone()).await)
        } else {
            None
        }
    };
    let v4 = async {
        if want_v4 {
            Some(resolver.ipv4_lookup(host.clone()).await)
        } else {
            None
        }
    };
    let (v6, v4) = tokio::join!(v6, v4);

    let mut addrs = Vec::new();
    let mut failures = Vec::new();
    let mut negatives = Vec::new();
    for (family, result) in [("AAAA", v6), ("A", v4)] {
        match result {
            None => {}
            Some(Ok(lookup)) => {
                for record in lookup.answers() {
                    match &record.data {
                        RData::AAAA(aaaa) => addrs.push(IpAddr::V6(aaaa.0)),
                        RData::A(a) => addrs.push(IpAddr::V4(a.0)),
                        _ => {}
                    }
                }
            }
            Some(Err(err)) => match classify(&err) {
                Negative::NxDomain => negatives.push(format!("{family}: no such host")),
                Negative::NoData => negatives.push(format!("{family}: no record")),
                Negative::Failure => failures.push(format!("{family}: {}", describe(&err))),
            },
        }
    }
    let mut seen = Vec::with_capacity(addrs.len());
    addrs.retain(|ip| {
        let new = !seen.contains(ip);
        seen.push(*ip);
        new
    });
    if !addrs.is_empty() {
        if !failures.is_empty() {
            debug!(host = %display_name(&host), "partial address lookup failure: {}", failures.join("; "));
        }
        HostAddrs::Found(addrs)
    } else if !failures.is_empty() {
        HostAddrs::Failed(failures.join(", "))
    } else if negatives.is_empty() {
        HostAddrs::None("no address records".to_string())
    } else {
        HostAddrs::None(negatives.join(", "))
    }
}

fn is_local(host: &str, result: &HostAddrs, local: &LocalIdentity) -> bool {
    let by_name = local
        .hostnames
        .iter()
        .any(|name| name.trim_end_matches('.').eq_ignore_ascii_case(host));
    let by_addr = match result {
        HostAddrs::Found(addrs) => addrs.iter().any(|ip| local.addrs.contains(ip)),
        _ => false,
    };
    by_name || by_addr
}

/// `domain` as a fully qualified name (so that no search domain is ever appended); a UTF-8
/// domain (SMTPUTF8) is converted to its A-labels (IDNA).
fn fqdn(domain: &str) -> Option<Name> {
    if domain.is_empty() {
        return None;
    }
    let mut name = Name::from_utf8(domain).ok()?;
    name.set_fqdn(true);
    Some(name)
}

/// A name as shown in logs and [`Destination::host`]: lower case, no trailing dot.
fn display_name(name: &Name) -> String {
    let text = name.to_lowercase().to_ascii();
    text.trim_end_matches('.').to_string()
}

/// Fisher–Yates with randomness from std's per-process random hash keys (no RNG dependency;
/// this needs to be unpredictable enough to spread load, not cryptographically strong).
fn shuffle<T>(items: &mut [T]) {
    let state = RandomState::new();
    for i in (1..items.len()).rev() {
        let mut hasher = state.build_hasher();
        hasher.write_usize(i);
        let j = (hasher.finish() % (i as u64 + 1)) as usize;
        items.swap(i, j);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn address_literals() {
        assert_eq!(
            address_literal("[192.0.2.7]"),
            Some("192.0.2.7".parse().unwrap())
        );
        assert_eq!(
            address_literal("[IPv6:2001:db8::7]"),
            Some("2001:db8::7".parse().unwrap())
        );
        assert_eq!(address_literal("[ipv6:::1]"), Some("::1".parse().unwrap()));
        assert_eq!(address_literal("[2001:db8::7]"), None);
        assert_eq!(address_literal("example.com"), None);
        assert_eq!(address_literal("[example.com]"), None);
    }

    #[test]
    fn shuffle_keeps_elements_and_varies() {
        let mut seen_first = std::collections::HashSet::new();
        for _ in 0..200 {
            let mut items = [1, 2, 3];
            shuffle(&mut items);
            let mut sorted = items;
            sorted.sort();
            assert_eq!(sorted, [1, 2, 3]);
            seen_first.insert(items[0]);
        }
        assert_eq!(seen_first.len(), 3);
    }

    #[tokio::test]
    async fn literal_is_not_resolved() {
        // No nameserver at all: a DNS lookup would fail temporarily.
        let resolver = Resolver::with_nameservers(&[]);
        let local = LocalIdentity::default();
        let dest = resolver
            .destinations("[192.0.2.7]", IpVersion::Any, &local)
            .await
            .unwrap();
        assert_eq!(dest[0].addrs, vec!["192.0.2.7".parse::<IpAddr>().unwrap()]);
        let me = LocalIdentity {
            hostnames: vec![],
            addrs: vec!["192.0.2.7".parse().unwrap()],
        };
        let err = resolver
            .destinations("[192.0.2.7]", IpVersion::Any, &me)
            .await
            .unwrap_err();
        assert_eq!(err.status(), Status::ROUTING_LOOP);
    }

    #[tokio::test]
    async fn system_configuration_builds() {
        // Building sends no query; only where there is a resolv.conf to read.
        if std::path::Path::new("/etc/resolv.conf").exists() {
            Resolver::system().unwrap();
        }
    }

    #[tokio::test]
    async fn invalid_domain_is_permanent() {
        let resolver = Resolver::with_nameservers(&[]);
        let err = resolver
            .destinations("", IpVersion::Any, &LocalIdentity::default())
            .await
            .unwrap_err();
        assert_eq!(err.status(), Status::BAD_SYSTEM);
    }
}
