//! The inbound checks for mail from outside: the client's forward-confirmed reverse DNS name,
//! SPF on HELO and MAIL FROM (RFC 7208), every DKIM signature (RFC 6376, RFC 8463), DMARC
//! (RFC 7489, with DMARCbis's tree walk), ARC (RFC 8617, verify only). The results become one
//! `Authentication-Results:` field (RFC 8601) and a verdict for the SMTP reply.
//!
//! Every lookup goes through the resolver of `[dns] nameservers` (else `/etc/resolv.conf`).

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use estafeta_config::{CheckMode, DnsConfig, DnsblZone, VerifyConfig};
use estafeta_proto::reply::{self, Reply};
use mail_auth::common::headers::HeaderWriter;
use mail_auth::dmarc::Policy;
use mail_auth::hickory_resolver::config::{
    ConnectionConfig, NameServerConfig, ResolveHosts, ResolverConfig, ResolverOpts,
};
use mail_auth::spf::verify::SpfParameters;
use mail_auth::{
    AuthenticatedMessage, AuthenticationResults, DkimResult, DmarcResult, MessageAuthenticator,
    SpfOutput, SpfResult,
};

use crate::headers::strip_our_results;

/// Per-query timeout, as the relay's resolver.
const QUERY_TIMEOUT: Duration = Duration::from_secs(5);
/// The checks of one message give up after this long: the message is then answered 451.
const CHECK_TIMEOUT: Duration = Duration::from_secs(60);

/// The checks, with their resolver and modes.
pub struct Checker {
    auth: MessageAuthenticator,
    hostname: String,
    mode: VerifyConfig,
}

/// The SPF results of one transaction: checked once, at the first RCPT.
#[derive(Debug, Clone)]
pub struct SpfResults {
    /// HELO identity.
    pub helo: SpfOutput,
    /// MAIL FROM identity (`postmaster@HELO` for the null sender).
    pub mail_from: SpfOutput,
    /// The MAIL FROM address as checked (empty for the null sender).
    pub sender: String,
    /// The domain the MAIL FROM identity is in.
    pub domain: String,
}

/// The outcome of the checks of one message.
#[derive(Debug, Clone)]
pub struct Inbound {
    /// The `Authentication-Results:` field to put on top of the message, CRLF-terminated.
    pub header: String,
    /// Accept, or the reply that refuses the message (550 5.7.1 DMARC reject, 451 on a DNS
    /// error the decision depends on).
    pub verdict: Result<(), Reply>,
    /// `spf=pass dkim=pass dmarc=pass arc=none`, for the mail log.
    pub summary: String,
    /// The DMARC policy that applied to a failure (`quarantine`), for the log; `None` when
    /// DMARC passed or did not apply.
    pub dmarc_policy: Option<&'static str>,
}

impl Checker {
    /// The checks named in `mode`, looking up through `dns`.
    pub fn new(hostname: &str, dns: &DnsConfig, mode: VerifyConfig) -> std::io::Result<Checker> {
        let auth = if dns.nameservers.is_empty() {
            MessageAuthenticator::new_system_conf().map_err(std::io::Error::other)?
        } else {
            let (config, options) = resolver_config(&dns.nameservers);
            MessageAuthenticator::new(config, options).map_err(std::io::Error::other)?
        };
        Ok(Checker {
            auth,
            hostname: hostname.to_string(),
            mode,
        })
    }

    /// The resolver (for `dns-records --check`).
    pub fn authenticator(&self) -> &MessageAuthenticator {
        &self.auth
    }

    /// The modes.
    pub fn mode(&self) -> VerifyConfig {
        self.mode
    }

    /// The client's forward-confirmed reverse DNS name (FCrDNS, RFC 8601 `iprev`): a PTR name
    /// of `ip` whose A/AAAA records include `ip`. `None` when there is none or a lookup fails.
    /// 127.0.0.1 and ::1 are `localhost` without a lookup (the local clients of every
    /// benchmark and test; other loopback addresses are looked up like any other).
    pub async fn client_name(&self, ip: IpAddr) -> Option<String> {
        if ip == IpAddr::from([127, 0, 0, 1]) || ip == IpAddr::from(std::net::Ipv6Addr::LOCALHOST) {
            return Some("localhost".to_string());
        }
        let lookup = async {
            let names = self.auth.ptr_lookup(ip, None::<&NoPtr>).await.ok()?;
            for name in names.rrset.iter().take(3) {
                let name = name.trim_end_matches('.');
                let confirmed = match ip {
                    IpAddr::V4(v4) => self
                        .auth
                        .ipv4_lookup(name, None::<&NoV4>)
                        .await
                        .is_ok_and(|r| r.rrset.contains(&v4)),
                    IpAddr::V6(v6) => self
                        .auth
                        .ipv6_lookup(name, None::<&NoV6>)
                        .await
                        .is_ok_and(|r| r.rrset.contains(&v6)),
                };
                if confirmed {
                    return Some(name.to_ascii_lowercase());
                }
            }
            None
        };
        tokio::time::timeout(QUERY_TIMEOUT, lookup)
            .await
            .ok()
            .flatten()
    }

    /// The DNS blocklists (RFC 5782) that list `ip`, asked all at once, and whether their
    /// weights reach `threshold` (postscreen's scoring). A list that fails or does not
    /// answer within 5 s counts as not listing the client.
    pub async fn dnsbl(&self, ip: IpAddr, zones: &[DnsblZone], threshold: i32) -> DnsblVerdict {
        let checks = zones.iter().map(|zone| async move {
            let name = dnsbl_name(ip, &zone.zone);
            let found = tokio::time::timeout(
                QUERY_TIMEOUT,
                self.auth.ipv4_lookup(name.as_str(), None::<&NoV4>),
            )
            .await;
            match found {
                Ok(Ok(r)) => r.rrset.iter().any(|a| zone.lists(*a)),
                _ => false,
            }
            .then_some(zone)
        });
        let listed: Vec<&DnsblZone> = join_all(checks).await.into_iter().flatten().collect();
        let score = listed.iter().map(|z| z.weight).sum();
        // The reply names the list that weighs most (the first of equals).
        let blocked_by = (score >= threshold)
            .then(|| {
                listed
                    .iter()
                    .filter(|z| z.weight > 0)
                    .fold(None::<&&DnsblZone>, |best, z| match best {
                        Some(b) if b.weight >= z.weight => Some(b),
                        _ => Some(z),
                    })
                    .map(|z| z.zone.clone())
            })
            .flatten();
        DnsblVerdict {
            listed: listed.iter().map(|z| z.zone.clone()).collect(),
            score,
            blocked_by,
        }
    }

    /// SPF on the HELO and MAIL FROM identities (`sender` empty for the null sender).
    pub async fn spf(&self, ip: IpAddr, helo: &str, sender: &str) -> SpfResults {
        let (identity, domain) = if sender.is_empty() {
            (format!("postmaster@{helo}"), helo.to_ascii_lowercase())
        } else {
            let domain = sender.rsplit_once('@').map_or("", |(_, d)| d);
            (sender.to_string(), domain.to_ascii_lowercase())
        };
        // Both identities at once: a slow DNS server costs one wait, not two.
        let helo_check = self
            .auth
            .verify_spf(SpfParameters::verify_ehlo(ip, helo, &self.hostname));
        let mail_from_check = async {
            if sender.is_empty() {
                None
            } else {
                Some(
                    self.auth
                        .verify_spf(SpfParameters::verify_mail_from(
                            ip,
                            helo,
                            &self.hostname,
                            &identity,
                        ))
                        .await,
                )
            }
        };
        let (helo_output, mail_from) = tokio::join!(helo_check, mail_from_check);
        let mail_from = mail_from.unwrap_or_else(|| helo_output.clone());
        SpfResults {
            helo: helo_output,
            mail_from,
            sender: sender.to_string(),
            domain,
        }
    }

    /// The RCPT verdict of SPF: with `spf = "reject"`, a `fail` is refused (550 5.7.23) and a
    /// `temperror` deferred (451 4.7.24); anything else passes on to the other checks.
    pub fn spf_verdict(&self, spf: &SpfResults, ip: IpAddr) -> Result<(), Reply> {
        if self.mode.spf != CheckMode::Enforce {
            return Ok(());
        }
        match spf.mail_from.result() {
            SpfResult::Fail => Err(reply::spf_fail(&spf.domain, &ip.to_string())),
            SpfResult::TempError => Err(reply::spf_temperror(&spf.domain)),
            _ => Ok(()),
        }
    }

    /// Every check on one received message: `message` loses any `Authentication-Results:`
    /// claiming our name; the returned field says what was found. `spf` is what
    /// [`Checker::spf`] found at RCPT time (looked up now when `None`).
    pub async fn check_message(
        &self,
        ip: IpAddr,
        helo: &str,
        sender: &str,
        client_name: Option<&str>,
        spf: Option<SpfResults>,
        message: &mut Vec<u8>,
    ) -> Inbound {
        strip_our_results(message, &self.hostname);
        self.check_timed(ip, helo, sender, client_name, spf, message)
            .await
    }

    /// [`Checker::check_message`] for a large message: `head` is its header section (the
    /// `Authentication-Results:` claiming our name are taken from it), `received` the whole
    /// message as it arrived (mapped from its file), which the checks read.
    #[allow(clippy::too_many_arguments)]
    pub async fn check_parts(
        &self,
        ip: IpAddr,
        helo: &str,
        sender: &str,
        client_name: Option<&str>,
        spf: Option<SpfResults>,
        head: &mut Vec<u8>,
        received: &[u8],
    ) -> Inbound {
        strip_our_results(head, &self.hostname);
        self.check_timed(ip, helo, sender, client_name, spf, received)
            .await
    }

    async fn check_timed(
        &self,
        ip: IpAddr,
        helo: &str,
        sender: &str,
        client_name: Option<&str>,
        spf: Option<SpfResults>,
        message: &[u8],
    ) -> Inbound {
        let checks = self.check(ip, helo, sender, client_name, spf, message);
        match tokio::time::timeout(CHECK_TIMEOUT, checks).await {
            Ok(inbound) => inbound,
            Err(_) => Inbound {
                header: format!(
                    "Authentication-Results: {}; none (checks timed out)\r\n",
                    self.hostname
                ),
                // Enforcing DMARC, an unknown outcome is deferred; marking, it is accepted.
                verdict: if self.mode.dmarc == CheckMode::Enforce {
                    Err(reply::checks_timed_out())
                } else {
                    Ok(())
                },
                summary: "timeout".to_string(),
                dmarc_policy: None,
            },
        }
    }

    async fn check(
        &self,
        ip: IpAddr,
        helo: &str,
        sender: &str,
        client_name: Option<&str>,
        spf: Option<SpfResults>,
        message: &[u8],
    ) -> Inbound {
        let mode = self.mode;
        let mut summary: Vec<String> = Vec::new();
        let need_spf = mode.spf != CheckMode::Off || mode.dmarc != CheckMode::Off;
        let parsed = AuthenticatedMessage::parse(message);
        // SPF, DKIM and ARC need different records: looked up at the same time.
        let spf_check = async {
            match (spf, need_spf) {
                (Some(s), _) => Some(s),
                (None, true) => Some(self.spf(ip, helo, sender).await),
                (None, false) => None,
            }
        };
        let dkim_check = async {
            match &parsed {
                Some(p) if mode.dkim != CheckMode::Off || mode.dmarc != CheckMode::Off => {
                    self.auth.verify_dkim(p).await
                }
                _ => Vec::new(),
            }
        };
        let arc_check = async {
            match &parsed {
                Some(p) if mode.arc != CheckMode::Off => Some(self.auth.verify_arc(p).await),
                _ => None,
            }
        };
        let (spf, dkim, arc) = tokio::join!(spf_check, dkim_check, arc_check);
        let mut results = AuthenticationResults::new(&self.hostname);
        let mut verdict = Ok(());
        let mut dmarc_policy = None;

        if let Some(name) = client_name {
            summary.push(format!("iprev={name}"));
        }
        if let (Some(spf), true) = (&spf, mode.spf != CheckMode::Off) {
            results = if spf.sender.is_empty() {
                results.with_spf_ehlo_result(&spf.helo, ip, helo)
            } else {
                results.with_spf_mailfrom_result(&spf.mail_from, ip, &spf.sender, helo)
            };
            summary.push(format!("spf={}", spf_name(spf.mail_from.result())));
        }
        let Some(parsed) = &parsed else {
            summary.push("dkim=none (unparsable header)".to_string());
            let header = results.to_header();
            return Inbound {
                header,
                verdict,
                summary: summary.join(" "),
                dmarc_policy,
            };
        };
        let header_from = parsed.from.first().cloned().unwrap_or_default();
        if mode.dkim != CheckMode::Off {
            if dkim.is_empty() {
                summary.push("dkim=none".to_string());
            }
            for d in &dkim {
                results.set_dkim_result(d, &header_from);
                summary.push(format!(
                    "dkim={}{}",
                    dkim_name(d.result()),
                    d.signature()
                        .map(|s| format!("({}/{})", s.d, s.s))
                        .unwrap_or_default()
                ));
            }
        }
        if let Some(arc) = &arc {
            summary.push(format!("arc={}", dkim_name(arc.result())));
            results = results.with_arc_result(arc, ip);
        }
        if let (Some(spf), true) = (&spf, mode.dmarc != CheckMode::Off) {
            let mail_from_domain = if spf.domain.is_empty() {
                helo.to_ascii_lowercase()
            } else {
                spf.domain.clone()
            };
            let dmarc = self
                .auth
                .verify_dmarc(mail_auth::dmarc::verify::DmarcParameters::new(
                    parsed,
                    &dkim,
                    &mail_from_domain,
                    &spf.mail_from,
                ))
                .await;
            let result = dmarc.result();
            // Several From fields, or one naming several domains, are exempt from DMARC
            // (RFC 7489 §6.6.1): the reader sees one of them. Enforcing, such a message is
            // refused, as OpenDMARC's RejectMultiValueFrom does.
            let authors = author_domains(message);
            if mode.dmarc == CheckMode::Enforce && authors.len() > 1 {
                summary.push(format!(
                    "dmarc=permerror(several authors: {})",
                    authors.join(", ")
                ));
                return Inbound {
                    header: results.to_header(),
                    verdict: Err(reply::several_authors()),
                    summary: summary.join(" "),
                    dmarc_policy: None,
                };
            }
            // A message without a From domain (or with several) is exempt: nothing to report.
            if !dmarc.domain().is_empty() {
                results = results.with_dmarc_result(&dmarc);
                summary.push(format!("dmarc={}({})", dmarc_name(&result), dmarc.domain()));
            }
            let failed = matches!(result, DmarcResult::Fail(_));
            if failed {
                dmarc_policy = match dmarc.policy() {
                    Policy::Reject => Some("reject"),
                    Policy::Quarantine => Some("quarantine"),
                    Policy::None | Policy::Unspecified => Some("none"),
                };
            }
            if mode.dmarc == CheckMode::Enforce {
                if failed && dmarc.policy() == Policy::Reject {
                    verdict = Err(reply::dmarc_reject(dmarc.domain()));
                } else if matches!(result, DmarcResult::TempError(_))
                    // Deferred only when the answer could be a rejection: the policy is
                    // unknown (its lookup failed) or it is reject. With p=none or quarantine
                    // the message is accepted whatever the missing result would have been.
                    && (dmarc.dmarc_record().is_none() || dmarc.policy() == Policy::Reject)
                {
                    verdict = Err(reply::dmarc_temperror(dmarc.domain()));
                }
            }
        }
        let mut header = results.to_header();
        // An unsigned message says so (RFC 8601 §2.7.1), as OpenDKIM's results do.
        if mode.dkim != CheckMode::Off && dkim.is_empty() {
            let end = header.len() - 2;
            header.insert_str(end, ";\r\n\tdkim=none");
        }
        Inbound {
            header,
            verdict,
            summary: summary.join(" "),
            dmarc_policy,
        }
    }
}

type NoPtr = mail_auth::common::cache::NoCache<IpAddr, mail_auth::RecordSet<Box<str>>>;
type NoV4 = mail_auth::common::cache::NoCache<Box<str>, mail_auth::RecordSet<std::net::Ipv4Addr>>;
type NoV6 = mail_auth::common::cache::NoCache<Box<str>, mail_auth::RecordSet<std::net::Ipv6Addr>>;

/// The answers of `checks`, in their order, all run at once.
async fn join_all<F: std::future::Future>(checks: impl Iterator<Item = F>) -> Vec<F::Output> {
    let mut set: Vec<_> = checks.map(Box::pin).collect();
    let mut results: Vec<Option<F::Output>> = set.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        for (i, f) in set.iter_mut().enumerate() {
            if results[i].is_none()
                && let std::task::Poll::Ready(r) = f.as_mut().poll(cx)
            {
                results[i] = Some(r);
            }
        }
        if results.iter().all(Option::is_some) {
            std::task::Poll::Ready(())
        } else {
            std::task::Poll::Pending
        }
    })
    .await;
    results.into_iter().flatten().collect()
}

/// What the DNS blocklists say of a client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsblVerdict {
    /// The lists that list it, in configuration order.
    pub listed: Vec<String>,
    /// The sum of their weights.
    pub score: i32,
    /// When the score reaches the threshold: the list named in the refusal.
    pub blocked_by: Option<String>,
}

/// The DNSBL query name of `ip` in `zone` (RFC 5782 §2.1, §2.4): the address's octets or
/// nibbles reversed.
pub fn dnsbl_name(ip: IpAddr, zone: &str) -> String {
    match ip.to_canonical() {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            format!("{}.{}.{}.{}.{zone}.", o[3], o[2], o[1], o[0])
        }
        IpAddr::V6(v6) => {
            let mut s = String::new();
            for b in v6.octets().iter().rev() {
                s.push_str(&format!("{:x}.{:x}.", b & 0xf, b >> 4));
            }
            format!("{s}{zone}.")
        }
    }
}

fn resolver_config(servers: &[SocketAddr]) -> (ResolverConfig, ResolverOpts) {
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
    options.timeout = QUERY_TIMEOUT;
    options.attempts = 1;
    options.use_hosts_file = ResolveHosts::Never;
    (config, options)
}

/// The distinct domains of every address in every `From:` field, plus one empty entry per
/// extra `From:` field: more than one entry means several authors.
fn author_domains(message: &[u8]) -> Vec<String> {
    let froms = crate::headers::header_values(message, "From");
    let mut domains: Vec<String> = Vec::new();
    for value in &froms {
        for d in crate::headers::address_domains(value) {
            if !domains.contains(&d) {
                domains.push(d);
            }
        }
    }
    if froms.len() > 1 && domains.len() < froms.len() {
        domains.resize(froms.len(), String::new());
    }
    domains
}

/// The RFC 8601 name of an SPF result.
pub fn spf_name(r: SpfResult) -> &'static str {
    match r {
        SpfResult::Pass => "pass",
        SpfResult::Fail => "fail",
        SpfResult::SoftFail => "softfail",
        SpfResult::Neutral => "neutral",
        SpfResult::TempError => "temperror",
        SpfResult::PermError => "permerror",
        SpfResult::None => "none",
    }
}

/// The RFC 8601 name of a DKIM or ARC result.
pub fn dkim_name(r: &DkimResult) -> &'static str {
    match r {
        DkimResult::Pass => "pass",
        DkimResult::Neutral(_) => "neutral",
        DkimResult::Fail(_) => "fail",
        DkimResult::PermError(_) => "permerror",
        DkimResult::TempError(_) => "temperror",
        DkimResult::None => "none",
    }
}

/// The RFC 8601 name of a DMARC result.
pub fn dmarc_name(r: &DmarcResult) -> &'static str {
    match r {
        DmarcResult::Pass => "pass",
        DmarcResult::Fail(_) => "fail",
        DmarcResult::TempError(_) => "temperror",
        DmarcResult::PermError(_) => "permerror",
        DmarcResult::None => "none",
    }
}
