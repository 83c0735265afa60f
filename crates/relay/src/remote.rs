//! Remote delivery of one message to the recipients of one domain: where to connect (a route,
//! the smarthost, an address literal, or the domain's MX hosts), then the hosts in order until
//! one gives per-recipient answers.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use estafeta_proto::reply as replies;
use estafeta_queue::{Failure, Outcome};

use crate::client::{self, ClientConfig, OutboundMessage};
use crate::resolve::{IpVersion, LocalIdentity, ResolveError, Resolver};

/// A fixed next hop: `[relay.routes]` entries and the smarthost, as the configuration parsed
/// them.
pub use estafeta_config::NextHop;

/// How a recipient domain is reached, as the policy's router decided it (`Policy::route`):
/// the remote agent does not decide it again.
#[derive(Debug, Clone, Copy)]
pub enum Hop<'a> {
    /// The domain's MX hosts (or address records, or its address literal).
    Mx,
    /// A `[relay.routes]` entry: the MX client settings.
    Route(&'a NextHop),
    /// The smarthost: its TLS policy and credentials.
    Smarthost(&'a NextHop),
}

/// Everything remote delivery needs, built once from the configuration.
pub struct Remote {
    /// MX and address lookups.
    pub resolver: Resolver,
    /// The client settings for MX delivery (opportunistic TLS by default).
    pub client: ClientConfig,
    /// The client settings for the smarthost (its TLS policy and credentials).
    pub smarthost_client: ClientConfig,
    /// The client settings for domains with a TLS policy of their own (`[relay.tls_policy]`),
    /// for MX and route delivery; keys lower-case.
    pub tls_policy: std::collections::HashMap<String, ClientConfig>,
    /// MTA-STS (RFC 8461) for MX delivery to domains without a `[relay.tls_policy]` entry;
    /// `None`: off.
    pub mta_sts: Option<StsSettings>,
    /// DANE (RFC 7672) for MX delivery, through validating nameservers; `None`: off.
    pub dane: Option<crate::dane::SecureDns>,
    /// Where the TLS result of each session to an MX host goes (TLS-RPT, RFC 8460); `None`:
    /// nowhere.
    pub tls_reports: Option<Arc<dyn crate::tlsrpt::TlsReporter>>,
    /// IPv4, IPv6 or both.
    pub ip_version: IpVersion,
    /// This server's names and addresses (mail loops back to myself).
    pub local: LocalIdentity,
    /// The SMTP port of MX hosts (25; tests may use another).
    pub mx_port: u16,
    /// Sessions kept open a moment after a message, for the next message to the same host.
    pub idle: ConnectionCache,
}

/// MTA-STS lookups and the client settings its `enforce` mode delivers with (certificate
/// verified against the MX host's name).
#[derive(Debug, Clone)]
pub struct StsSettings {
    /// The lookups and their cache.
    pub lookup: crate::mtasts::MtaSts,
    /// [`client::TlsPolicy::Verify`] settings.
    pub client: ClientConfig,
}

/// Open sessions waiting for the next message to the same host (Postfix's connection cache):
/// messages queued together for one destination travel in one session. A session is kept
/// [`ConnectionCache::IDLE_LIMIT`] after its last message, then closed with QUIT. The tasks
/// that close them are tracked: [`ConnectionCache::close`] (at shutdown) says QUIT to every
/// idle session at once and waits for them.
#[derive(Clone)]
pub struct ConnectionCache {
    inner: Arc<Mutex<Vec<Idle>>>,
    tasks: tokio_util::task::TaskTracker,
    closing: tokio_util::sync::CancellationToken,
}

impl std::fmt::Debug for ConnectionCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnectionCache")
            .field("idle", &self.idle_count())
            .finish_non_exhaustive()
    }
}

impl Default for ConnectionCache {
    fn default() -> Self {
        ConnectionCache {
            inner: Arc::default(),
            tasks: tokio_util::task::TaskTracker::new(),
            closing: tokio_util::sync::CancellationToken::new(),
        }
    }
}

struct Idle {
    key: Key,
    since: Instant,
    conn: client::Connection,
}

/// What an idle session may be reused for: the address, the host name, whether the
/// smarthost settings opened it, the TLS policy it was opened under (a session opened
/// in plaintext under `opportunistic` never carries mail for a domain that requires TLS), and
/// whether its certificate was audited (MTA-STS `testing`).
type Key = (SocketAddr, String, bool, client::TlsPolicy, bool);

impl ConnectionCache {
    /// How long an idle session is kept.
    pub const IDLE_LIMIT: Duration = Duration::from_secs(2);
    /// The most idle sessions kept at once.
    const MAX_IDLE: usize = 32;

    fn take(&self, key: &Key) -> Option<client::Connection> {
        let mut idle = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        let i = idle
            .iter()
            .position(|e| &e.key == key && now.duration_since(e.since) < Self::IDLE_LIMIT)?;
        Some(idle.swap_remove(i).conn)
    }

    fn put(&self, key: Key, conn: client::Connection) {
        if self.closing.is_cancelled() {
            // Shutting down: nothing is kept for a next message.
            self.tasks.spawn(conn.quit());
            return;
        }
        let extra = {
            let mut idle = self.inner.lock().unwrap_or_else(|e| e.into_inner());
            idle.push(Idle {
                key,
                since: Instant::now(),
                conn,
            });
            let over = idle.len().saturating_sub(Self::MAX_IDLE);
            idle.drain(..over).map(|e| e.conn).collect::<Vec<_>>()
        };
        let inner = self.inner.clone();
        let closing = self.closing.clone();
        self.tasks.spawn(async move {
            for conn in extra {
                conn.quit().await;
            }
            tokio::select! {
                _ = tokio::time::sleep(Self::IDLE_LIMIT) => {}
                // close() takes every idle session itself.
                _ = closing.cancelled() => return,
            }
            let expired: Vec<client::Connection> = {
                let mut idle = inner.lock().unwrap_or_else(|e| e.into_inner());
                let now = Instant::now();
                let (old, keep): (Vec<Idle>, Vec<Idle>) = idle
                    .drain(..)
                    .partition(|e| now.duration_since(e.since) >= Self::IDLE_LIMIT);
                *idle = keep;
                old.into_iter().map(|e| e.conn).collect()
            };
            for conn in expired {
                conn.quit().await;
            }
        });
    }
}

impl ConnectionCache {
    /// Closes every idle session with QUIT (all at once) and waits for them and for the
    /// cache's other tasks, at most `limit`; sessions handed back afterwards are closed at
    /// once. For the server's shutdown, after the last delivery.
    pub async fn close(&self, limit: Duration) {
        self.closing.cancel();
        let idle: Vec<client::Connection> = {
            let mut idle = self.inner.lock().unwrap_or_else(|e| e.into_inner());
            idle.drain(..).map(|e| e.conn).collect()
        };
        for conn in idle {
            self.tasks.spawn(conn.quit());
        }
        self.tasks.close();
        let _ = tokio::time::timeout(limit, self.tasks.wait()).await;
    }

    /// Idle sessions kept now.
    pub fn idle_count(&self) -> usize {
        self.inner.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}

impl std::fmt::Debug for Remote {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Remote")
            .field("mx_port", &self.mx_port)
            .finish_non_exhaustive()
    }
}

impl Remote {
    /// The client settings for `domain` and where their TLS policy comes from (for the log).
    fn settings(&self, domain: &str, hop: Hop<'_>) -> (&ClientConfig, &'static str) {
        if let Hop::Smarthost(_) = hop {
            return (&self.smarthost_client, "relay.smarthost_tls");
        }
        match self.tls_policy.get(&domain.to_ascii_lowercase()) {
            Some(cfg) => (cfg, "relay.tls_policy"),
            None => (&self.client, "default"),
        }
    }

    /// The (host name, addresses, port) to try, in order.
    async fn hops(
        &self,
        domain: &str,
        hop: Hop<'_>,
    ) -> Result<Vec<(String, Vec<IpAddr>, u16)>, Outcome> {
        let fixed = match hop {
            Hop::Route(h) | Hop::Smarthost(h) => Some(h),
            Hop::Mx => None,
        };
        if let Some(hop) = fixed {
            let addrs: Vec<IpAddr> = match hop.host.parse::<IpAddr>() {
                Ok(ip) => vec![ip],
                Err(_) => match tokio::net::lookup_host((hop.host.as_str(), hop.port)).await {
                    Ok(it) => it.map(|a| a.ip()).collect(),
                    Err(e) => {
                        return Err(Outcome::TempFail(Failure::local(
                            replies::next_hop_unresolved(&format!(
                                "cannot resolve the next hop {}: {e}",
                                hop.host
                            )),
                        )));
                    }
                },
            };
            return Ok(vec![(hop.host.clone(), addrs, hop.port)]);
        }
        // An address literal: that address, no MX.
        if let Some(lit) = domain.strip_prefix('[').and_then(|d| d.strip_suffix(']')) {
            // The router lower-cases the domain: `[ipv6:…]` as well as `[IPv6:…]`.
            let v6 = lit
                .get(..5)
                .is_some_and(|p| p.eq_ignore_ascii_case("IPv6:"));
            let ip: Option<IpAddr> = if v6 { &lit[5..] } else { lit }.parse().ok();
            return match ip {
                Some(ip) => Ok(vec![(ip.to_string(), vec![ip], self.mx_port)]),
                None => Err(Outcome::PermFail(Failure::local(
                    replies::bad_address_literal(domain),
                ))),
            };
        }
        match self
            .resolver
            .destinations(domain, self.ip_version, &self.local)
            .await
        {
            Ok(dests) => Ok(dests
                .into_iter()
                .map(|d| (d.host, d.addrs, self.mx_port))
                .collect()),
            Err(ResolveError::Permanent { status, reason }) => Err(Outcome::PermFail(
                Failure::local(replies::undeliverable_domain(status, &reason)),
            )),
            Err(ResolveError::Temporary { reason }) => Err(Outcome::TempFail(Failure::local(
                replies::next_hop_unresolved(&reason),
            ))),
        }
    }

    /// Sends `msg` to one address: in an idle session to it when there is one, else in a new
    /// one; the session is kept for the next message when it is still good.
    async fn send(
        &self,
        addr: SocketAddr,
        host: &str,
        smarthost: bool,
        cfg: &ClientConfig,
        msg: &OutboundMessage<'_>,
    ) -> Result<(Vec<Outcome>, (Option<client::TlsInfo>, bool)), client::SessionError> {
        if msg.rcpts.is_empty() {
            return Ok((Vec::new(), (None, false)));
        }
        let key = (addr, host.to_string(), smarthost, cfg.tls, cfg.audit);
        if let Some(mut conn) = self.idle.take(&key) {
            if let Err(e) = refuses_requiretls(&conn, msg) {
                self.idle.put(key, conn);
                return Err(e);
            }
            let outcomes = conn.send(msg).await;
            let tls = (conn.tls().cloned(), conn.tls_fallback());
            if conn.is_usable() {
                tracing::debug!(host = %host, address = %addr, "reused an open session");
                self.idle.put(key, conn);
                return Ok((outcomes, tls));
            }
            // The peer closed the idle session (its own timeout): a temporary failure of
            // every recipient says nothing about the message, so it gets a fresh session.
            if !outcomes.iter().all(|o| matches!(o, Outcome::TempFail(_))) {
                return Ok((outcomes, tls));
            }
        }
        let mut conn = client::Connection::open(addr, host, cfg).await?;
        if let Err(e) = refuses_requiretls(&conn, msg) {
            self.idle.put(key, conn);
            return Err(e);
        }
        let outcomes = conn.send(msg).await;
        let tls = (conn.tls().cloned(), conn.tls_fallback());
        if conn.is_usable() {
            self.idle.put(key, conn);
        }
        Ok((outcomes, tls))
    }

    /// Delivers `msg` (whose recipients all belong to `domain`): one outcome per recipient, in
    /// order. Hosts are tried in order until one answers per recipient; if none does, the
    /// recipients fail temporarily (or permanently when every host refused for good).
    pub async fn deliver(
        &self,
        domain: &str,
        hop: Hop<'_>,
        msg: &OutboundMessage<'_>,
    ) -> Vec<Outcome> {
        let n = msg.rcpts.len();
        let (mut cfg, mut from) = self.settings(domain, hop);
        // RFC 8689: REQUIRETLS asks for verified TLS to authenticated hosts all the way (not
        // for a bounce, §4.2.1: its report goes out with REQUIRETLS when the server offers it,
        // never held back over it); `TLS-Required: No` (without REQUIRETLS) asks to ignore the
        // recipient's policies.
        let requiretls = msg.params.requiretls && !msg.from.is_empty();
        let relaxed = !msg.params.requiretls && tls_required_no(msg.content);
        let unmet = |why: String| {
            vec![Outcome::PermFail(Failure::local(replies::requiretls_unmet(&why))); n]
        };
        if requiretls && !matches!(hop, Hop::Mx) && cfg.tls != client::TlsPolicy::Verify {
            return unmet(format!(
                "the next hop for {domain} is not configured with TLS policy \"verify\""
            ));
        }
        // MTA-STS for MX delivery the operator did not give a policy of its own (and always for
        // REQUIRETLS, which needs it); looked up while the MX hosts are.
        let sts = match (&self.mta_sts, hop) {
            (Some(sts), Hop::Mx)
                if (from == "default" || requiretls)
                    && !relaxed
                    && crate::resolve::address_literal(domain).is_none() =>
            {
                Some(sts)
            }
            _ => None,
        };
        let (hops, lookup) = tokio::join!(self.hops(domain, hop), async {
            match sts {
                Some(sts) => sts.lookup.lookup(domain).await,
                None => crate::mtasts::Lookup::None,
            }
        });
        let mut hops = match hops {
            Ok(h) => h,
            Err(o) => return vec![o; n],
        };
        // DANE (RFC 7672): with a secure MX RRset, each host's TLSA records decide for that
        // host; DANE wins over MTA-STS there (RFC 8461 §2), the other hosts keep MTA-STS.
        // The operator's own `dane` policy holds even under `TLS-Required: No`.
        let mandatory_dane = cfg.tls == client::TlsPolicy::Dane;
        let plan = match (&self.dane, hop) {
            (Some(dns), Hop::Mx)
                if (mandatory_dane || (!relaxed && from == "default"))
                    && crate::resolve::address_literal(domain).is_none() =>
            {
                dane_plan(dns, Some(domain), &hops, cfg).await
            }
            // A route the operator holds to DANE: its host's TLSA records (the route is
            // configured, not looked up, so no MX to be secure).
            (Some(dns), Hop::Route(_)) if mandatory_dane => dane_plan(dns, None, &hops, cfg).await,
            _ => HashMap::new(),
        };
        let dane_host = |h: &str| matches!(plan.get(h), Some(HostDane::Records(_)));
        let enforced = matches!(&lookup, crate::mtasts::Lookup::Policy(p) if p.mode == crate::mtasts::Mode::Enforce);
        if requiretls
            && matches!(hop, Hop::Mx)
            && !enforced
            && !hops.iter().any(|(h, ..)| dane_host(h))
        {
            match &lookup {
                // Not known now: retried, not bounced over a passing failure.
                crate::mtasts::Lookup::Unknown(why) => {
                    let r = replies::requiretls_unknown(&format!("MTA-STS of {domain}: {why}"));
                    return vec![Outcome::TempFail(Failure::local(r)); n];
                }
                _ => {
                    return unmet(format!(
                        "neither DANE nor an MTA-STS policy in enforce mode authenticates the MX hosts of {domain}"
                    ));
                }
            }
        }
        // TLS-RPT: a policy its record announces but whose fetch failed (once per fetch: not
        // again while the failure is remembered).
        if let (Some(r), crate::mtasts::Lookup::Unknown(why)) = (&self.tls_reports, &lookup)
            && let Some(reason) = why.strip_prefix("the policy cannot be fetched: ")
        {
            r.record(crate::tlsrpt::TlsResult {
                domain: domain.to_ascii_lowercase(),
                policy: crate::tlsrpt::PolicyApplied::StsUnknown,
                mx: String::new(),
                ip: None,
                failure: Some(crate::tlsrpt::classify_fetch(reason)),
                detail: Some(reason.to_string()),
            });
        }
        let policy = lookup.policy();
        let audit_cfg: client::ClientConfig;
        let policy_applied = policy
            .clone()
            .filter(|p| p.mode != crate::mtasts::Mode::None);
        if relaxed && from == "default" {
            from = "default (TLS-Required: No)";
        }
        if let (Some(sts), Some(policy)) = (sts, policy) {
            let outside: Vec<&str> = hops
                .iter()
                .filter(|(h, ..)| !policy.allows(h) && !dane_host(h))
                .map(|(h, ..)| h.as_str())
                .collect();
            match policy.mode {
                crate::mtasts::Mode::Enforce => {
                    for host in &outside {
                        tracing::info!(target: "estafeta::maillog", id = %msg.id, domain = %domain, host = %host, "MTA-STS: MX host not in the policy; skipped");
                    }
                    // A host DANE authenticates stays: DANE wins over MTA-STS for it.
                    hops.retain(|(h, ..)| policy.allows(h) || dane_host(h));
                    if hops.is_empty() {
                        let r = replies::mta_sts_no_mx(domain, &policy.mx);
                        return vec![Outcome::TempFail(Failure::local(r)); n];
                    }
                    cfg = &sts.client;
                    from = "mta-sts";
                }
                crate::mtasts::Mode::Testing => {
                    // Delivered as usual; what enforce would have refused is reported, the
                    // certificate checked without acting on it (for TLS-RPT).
                    audit_cfg = client::ClientConfig {
                        audit: true,
                        roots: sts.client.roots.clone(),
                        ..cfg.clone()
                    };
                    cfg = &audit_cfg;
                    for host in &outside {
                        tracing::info!(target: "estafeta::maillog", id = %msg.id, domain = %domain, host = %host, "MTA-STS testing: MX host not in the policy; delivering anyway");
                    }
                    from = "default (mta-sts testing)";
                }
                crate::mtasts::Mode::None => {}
            }
        }
        // Under REQUIRETLS, a host that neither DANE nor an enforced MTA-STS policy
        // authenticates is never used (RFC 8689 §4.2.1).
        let mta_sts_verified = enforced && from == "mta-sts";
        let mut last: Option<client::SessionError> = None;
        let mut all_permanent = true;
        let smarthost = matches!(hop, Hop::Smarthost(_));
        // TLS-RPT: sessions to the recipient domain's MX hosts (not to a route or the
        // smarthost the operator chose), under the policy that applied.
        let report =
            |host: &str, ip: IpAddr, failure: Option<&'static str>, detail: Option<String>| {
                let ip = Some(ip);
                // Not the sessions that carry TLS reports themselves (RFC 8460 §3: null
                // sender, `TLS-Required: No`), which would report on reporting.
                if let (Some(r), Hop::Mx) = (&self.tls_reports, hop)
                    && crate::resolve::address_literal(domain).is_none()
                    && !(relaxed && msg.from.is_empty())
                {
                    let tlsa = match plan.get(host) {
                        Some(HostDane::Records(c)) => c
                            .dane
                            .as_deref()
                            .map(|r| r.iter().map(crate::dane::record_text).collect::<Vec<_>>()),
                        _ => None,
                    };
                    r.record(crate::tlsrpt::TlsResult {
                        domain: domain.to_ascii_lowercase(),
                        policy: match (&policy_applied, tlsa) {
                            (_, Some(records)) => crate::tlsrpt::PolicyApplied::Tlsa(records),
                            (Some(p), None) => crate::tlsrpt::PolicyApplied::Sts(p.clone()),
                            (None, None) => crate::tlsrpt::PolicyApplied::NoPolicyFound,
                        },
                        mx: host.to_string(),
                        ip,
                        failure,
                        detail,
                    });
                }
            };
        let required_cfg = client::ClientConfig {
            tls: client::TlsPolicy::Required,
            ..cfg.clone()
        };
        for (host, addrs, port) in hops {
            let (cfg, from) = match plan.get(&host) {
                Some(HostDane::Records(c)) => (&**c, "dane"),
                // TLSA records, none usable: TLS required (RFC 7672 §2.2), or the enforced
                // MTA-STS policy's verification, which is more.
                Some(HostDane::Unusable) if !mta_sts_verified => {
                    (&required_cfg, "dane (TLSA records, none usable)")
                }
                Some(HostDane::Unusable) => (cfg, from),
                Some(HostDane::Failed(why)) => {
                    // A bogus or unanswered TLSA lookup: this host is not used now.
                    tracing::info!(target: "estafeta::maillog", id = %msg.id, domain = %domain, host = %host, reason = %why, "DANE: TLSA lookup failed; host skipped");
                    for &ip in &addrs {
                        report(&host, ip, Some("dnssec-invalid"), Some(why.clone()));
                    }
                    all_permanent = false;
                    last = Some(client::SessionError::temporary(Failure::local(
                        replies::dane_lookup_failed(&host, why),
                    )));
                    continue;
                }
                None if mandatory_dane => {
                    let why = "no usable TLSA records, or an insecure MX".to_string();
                    for &ip in &addrs {
                        report(&host, ip, Some("dane-required"), Some(why.clone()));
                    }
                    all_permanent = false;
                    last = Some(client::SessionError::temporary(Failure::local(
                        replies::dane_lookup_failed(&host, &why),
                    )));
                    continue;
                }
                None => (cfg, from),
            };
            if requiretls && matches!(hop, Hop::Mx) && from != "dane" && !mta_sts_verified {
                tracing::info!(target: "estafeta::maillog", id = %msg.id, domain = %domain, host = %host, "REQUIRETLS: host not authenticated by DANE or MTA-STS; skipped");
                last = Some(client::SessionError {
                    permanent: true,
                    failure: Failure::local(replies::requiretls_unmet(&format!(
                        "{host} is authenticated neither by DANE nor by MTA-STS"
                    ))),
                });
                continue;
            }
            for ip in addrs {
                let addr = SocketAddr::new(ip, port);
                match self.send(addr, &host, smarthost, cfg, msg).await {
                    Ok((outcomes, (tls, fallback))) => {
                        // Postfix's "TLS feature status": the policy asked for, where it
                        // comes from, and what the session got.
                        tracing::info!(
                            target: "estafeta::maillog",
                            id = %msg.id,
                            domain = %domain,
                            host = %host,
                            address = %addr,
                            tls_policy = cfg.tls.name(),
                            tls_policy_from = from,
                            tls = tls.as_ref().map_or("none", |t| t.version),
                            tls_cipher = tls.as_ref().map_or("none", |t| t.cipher),
                            tls_verified = tls.as_ref().is_some_and(|t| t.verified),
                            tls_fallback = fallback,
                            requiretls,
                            "TLS status"
                        );
                        match &tls {
                            Some(t) if cfg.audit && !t.verified => {
                                let why = t.audit_error.clone().unwrap_or_default();
                                let kind =
                                    crate::tlsrpt::classify(&why).unwrap_or("validation-failure");
                                report(&host, ip, Some(kind), Some(why))
                            }
                            Some(_) => report(&host, ip, None, None),
                            None => report(
                                &host,
                                ip,
                                Some("starttls-not-supported"),
                                Some(if fallback {
                                    "the TLS handshake failed; delivered in plaintext".into()
                                } else {
                                    "STARTTLS was not offered".into()
                                }),
                            ),
                        }
                        return outcomes;
                    }
                    Err(e) => {
                        let text = e.failure.to_string();
                        if let Some(kind) = crate::tlsrpt::classify(&text) {
                            report(&host, ip, Some(kind), Some(text));
                        }
                        tracing::info!(target: "estafeta::maillog", host = %host, address = %addr, reason = %e, "trying the next host");
                        all_permanent &= e.permanent;
                        last = Some(e);
                    }
                }
            }
        }
        match last {
            Some(e) if all_permanent => vec![Outcome::PermFail(e.failure); n],
            Some(e) => vec![Outcome::TempFail(e.failure); n],
            None => vec![Outcome::TempFail(Failure::local(replies::no_route(domain))); n],
        }
    }
}

/// A REQUIRETLS message goes only to a server that offers REQUIRETLS over its TLS (RFC 8689
/// §4.2.1); the session stays good for other messages.
fn refuses_requiretls(
    conn: &client::Connection,
    msg: &OutboundMessage<'_>,
) -> Result<(), client::SessionError> {
    // A bounce (null sender) is never held back over REQUIRETLS (RFC 8689 §4.2.1).
    let required = msg.params.requiretls && !msg.from.is_empty();
    if required && !(conn.is_tls() && conn.extensions().requiretls) {
        return Err(client::SessionError {
            permanent: true,
            failure: Failure::local(replies::requiretls_unmet(&format!(
                "{} does not offer REQUIRETLS",
                conn.peer()
            ))),
        });
    }
    Ok(())
}

/// True when the header section has `TLS-Required: No` (RFC 8689 §5).
pub fn tls_required_no(content: &[u8]) -> bool {
    let end = estafeta_proto::trace::header_stats(content).size;
    let head = String::from_utf8_lossy(&content[..end]);
    let mut fields: Vec<String> = Vec::new();
    for line in head.split('\n') {
        let line = line.strip_suffix('\r').unwrap_or(line);
        if line.starts_with([' ', '\t']) {
            if let Some(last) = fields.last_mut() {
                last.push_str(line);
            }
        } else {
            fields.push(line.to_string());
        }
    }
    fields.iter().any(|f| {
        f.split_once(':').is_some_and(|(name, value)| {
            name.trim().eq_ignore_ascii_case("TLS-Required")
                && value.trim().eq_ignore_ascii_case("no")
        })
    })
}

/// What DANE says of one MX host.
#[derive(Debug)]
enum HostDane {
    /// Usable TLSA records: these settings (policy `dane`, the records).
    Records(Box<client::ClientConfig>),
    /// TLSA records, none usable: TLS without authentication (RFC 7672 §2.2).
    Unusable,
    /// The TLSA lookup failed (bogus, no answer): the host is not used now.
    Failed(String),
}

/// DANE for each host of `hops` (its TLSA records at `_PORT._tcp.HOST`, the port it is
/// reached on), when `mx_of`'s MX RRset is secure (or, for a route, `None`: always); hosts
/// without a secure TLSA RRset are left out: they get the usual policy.
async fn dane_plan(
    dns: &crate::dane::SecureDns,
    mx_of: Option<&str>,
    hops: &[(String, Vec<IpAddr>, u16)],
    cfg: &client::ClientConfig,
) -> HashMap<String, HostDane> {
    use crate::dane::Answer;
    let mut plan = HashMap::new();
    if let Some(domain) = mx_of {
        match dns.mx_secure(domain).await {
            Answer::Secure(_) | Answer::SecureNone => {}
            // Whether DANE applies cannot be known: no host is used now (RFC 7672 §2.1.1).
            Answer::Failed(why) => {
                for (host, ..) in hops {
                    plan.insert(
                        host.clone(),
                        HostDane::Failed(format!("MX of {domain}: {why}")),
                    );
                }
                return plan;
            }
            Answer::Insecure => return plan,
        }
    }
    let mut lookups = tokio::task::JoinSet::new();
    for (host, _, port) in hops {
        let (dns, host, port) = (dns.clone(), host.clone(), *port);
        lookups.spawn(async move {
            let answer = dns.tlsa(&host, port).await;
            (host, answer)
        });
    }
    while let Some(Ok((host, answer))) = lookups.join_next().await {
        match answer {
            Answer::Secure(records) => {
                let usable = crate::dane::usable(&records);
                let entry = if usable.is_empty() {
                    HostDane::Unusable
                } else {
                    HostDane::Records(Box::new(client::ClientConfig {
                        tls: client::TlsPolicy::Dane,
                        dane: Some(Arc::new(usable)),
                        ..cfg.clone()
                    }))
                };
                plan.insert(host, entry);
            }
            Answer::Failed(why) => {
                plan.insert(host, HostDane::Failed(why));
            }
            Answer::SecureNone | Answer::Insecure => {}
        }
    }
    plan
}
