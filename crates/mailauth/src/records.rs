//! The DNS records a domain needs so that other servers accept its mail and send it here: MX,
//! the host's A/AAAA and PTR, SPF, DKIM (each selector), DMARC; and, optional, MTA-STS and
//! TLS-RPT. Printed ready to paste into a zone file (`estafeta dns-records`), and checked
//! against what the resolver answers (`--check`).

use std::net::IpAddr;

use estafeta_config::{Config, DkimAlgorithm};
use mail_auth::spf::verify::SpfParameters;
use mail_auth::{MessageAuthenticator, SpfResult};

use crate::keys::txt_record;

/// What a record is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// The domain's MX.
    Mx,
    /// The host's address.
    Address,
    /// Reverse DNS of the host's address (set by whoever owns the address block).
    Ptr,
    /// SPF.
    Spf,
    /// A DKIM key.
    Dkim,
    /// DMARC.
    Dmarc,
    /// MTA-STS (RFC 8461): the TXT record that announces the policy (optional: the policy file
    /// needs a web server).
    MtaSts,
    /// TLS-RPT (RFC 8460): where other servers send reports of their TLS with us (optional).
    TlsRpt,
}

/// One record to publish.
#[derive(Debug, Clone)]
pub struct Record {
    /// What it is for.
    pub kind: Kind,
    /// Owner name, fully qualified, with the final dot.
    pub name: String,
    /// `MX`, `A`, `AAAA`, `PTR`, `TXT`.
    pub rtype: &'static str,
    /// The data as it goes in a zone file (TXT data already quoted and split in strings of at
    /// most 255 octets).
    pub data: String,
    /// The unquoted text of a TXT record, the host of MX and PTR, the address of A/AAAA.
    pub value: String,
    /// A comment for the operator.
    pub note: String,
    /// Recommended, not needed: `--check` reports it missing without failing.
    pub optional: bool,
}

impl Record {
    /// The zone-file line, e.g. `example.org. 3600 IN MX 10 mail.example.org.`.
    pub fn zone_line(&self) -> String {
        format!("{} 3600 IN {} {}", self.name, self.rtype, self.data)
    }
}

/// The outcome of checking one record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Status {
    /// Published as it should be.
    Ok(String),
    /// Not published.
    Missing(String),
    /// Published, but different.
    Wrong(String),
    /// The lookup failed (DNS error): unknown.
    Unknown(String),
}

/// TXT data in zone-file syntax: quoted, split in strings of at most 255 octets.
pub fn quote_txt(text: &str) -> String {
    let parts: Vec<String> = text
        .as_bytes()
        .chunks(255)
        .map(|c| {
            let s = String::from_utf8_lossy(c);
            format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
        })
        .collect();
    if parts.len() == 1 {
        parts[0].clone()
    } else {
        format!("( {} )", parts.join(" "))
    }
}

fn fqdn(name: &str) -> String {
    format!("{}.", name.trim_end_matches('.'))
}

/// The PTR owner name of an address: `4.3.2.1.in-addr.arpa.`, or the nibbles of an IPv6
/// address under `ip6.arpa.`.
pub fn reverse_name(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            format!("{}.{}.{}.{}.in-addr.arpa.", o[3], o[2], o[1], o[0])
        }
        IpAddr::V6(v6) => {
            let mut s = String::new();
            for b in v6.octets().iter().rev() {
                s.push_str(&format!("{:x}.{:x}.", b & 0xf, b >> 4));
            }
            s + "ip6.arpa."
        }
    }
}

/// The DMARC record we recommend.
pub fn dmarc_value(domain: &str) -> String {
    format!("v=DMARC1; p=quarantine; adkim=r; aspf=r; rua=mailto:postmaster@{domain}")
}

/// The TLS-RPT record we recommend: reports to the postmaster (RFC 8460 §3).
pub fn tlsrpt_value(domain: &str) -> String {
    format!("v=TLSRPTv1; rua=mailto:postmaster@{domain}")
}

/// The MTA-STS policy file we recommend for the domains whose MX is this host (RFC 8461
/// §3.2): `testing` first, a week of `max_age`; switch to `enforce` once the TLS-RPT reports
/// show no failures.
pub fn mta_sts_policy(cfg: &Config) -> String {
    format!(
        "version: STSv1\nmode: testing\nmx: {}\nmax_age: 604800\n",
        cfg.hostname.trim_end_matches('.').to_ascii_lowercase()
    )
}

/// The `_mta-sts` record of `policy`: its `id` is derived from the policy's text, so that it
/// changes whenever the policy does (RFC 8461 §3.1).
pub fn mta_sts_value(policy: &str) -> String {
    // FNV-1a, 64 bits: 16 hexadecimal digits (the id allows 32 letters and digits).
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in policy.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("v=STSv1; id={h:016x}")
}

/// The SPF record we recommend: the domain's MX hosts may send its mail, nobody else.
pub const SPF_VALUE: &str = "v=spf1 mx -all";

/// The records `domain` needs, given the public keys of its DKIM selectors
/// (`(selector, algorithm, p=)`) and this host's public addresses.
pub fn needed(
    cfg: &Config,
    domain: &str,
    dkim: &[(String, DkimAlgorithm, String)],
    addresses: &[IpAddr],
) -> Vec<Record> {
    let host = fqdn(&cfg.hostname);
    let d = fqdn(domain);
    let mut out = vec![Record {
        kind: Kind::Mx,
        name: d.clone(),
        rtype: "MX",
        data: format!("10 {host}"),
        value: cfg.hostname.to_ascii_lowercase(),
        note: format!("mail for {domain} comes to this server"),
        optional: false,
    }];
    if addresses.is_empty() {
        out.push(Record {
            kind: Kind::Address,
            name: host.clone(),
            rtype: "A",
            data: "<this host's public IPv4 address>".into(),
            value: String::new(),
            note: "and AAAA for IPv6: no public address was found on this host's interfaces or listeners".into(),
            optional: false,
        });
    }
    for ip in addresses {
        out.push(Record {
            kind: Kind::Address,
            name: host.clone(),
            rtype: if ip.is_ipv4() { "A" } else { "AAAA" },
            data: ip.to_string(),
            value: ip.to_string(),
            note: "this host's address".into(),
            optional: false,
        });
    }
    for ip in addresses {
        out.push(Record {
            kind: Kind::Ptr,
            name: reverse_name(*ip),
            rtype: "PTR",
            data: host.clone(),
            value: cfg.hostname.to_ascii_lowercase(),
            note: "reverse DNS: ask whoever owns the address (your hosting provider) to set it"
                .into(),
            optional: false,
        });
    }
    out.push(Record {
        kind: Kind::Spf,
        name: d.clone(),
        rtype: "TXT",
        data: quote_txt(SPF_VALUE),
        value: SPF_VALUE.into(),
        note: "SPF: the MX hosts send this domain's mail, nobody else".into(),
        optional: false,
    });
    for (selector, algorithm, public) in dkim {
        let text = txt_record(*algorithm, public);
        out.push(Record {
            kind: Kind::Dkim,
            name: format!("{selector}._domainkey.{d}"),
            rtype: "TXT",
            data: quote_txt(&text),
            value: text,
            note: format!("DKIM key {selector} ({})", algorithm.name()),
            optional: false,
        });
    }
    let tlsrpt = tlsrpt_value(domain);
    out.push(Record {
        kind: Kind::TlsRpt,
        name: format!("_smtp._tls.{d}"),
        rtype: "TXT",
        data: quote_txt(&tlsrpt),
        value: tlsrpt,
        note: "TLS-RPT (optional): where other servers send daily reports of their TLS sessions with this domain's MX".into(),
        optional: true,
    });
    let sts = mta_sts_value(&mta_sts_policy(cfg));
    out.push(Record {
        kind: Kind::MtaSts,
        name: format!("_mta-sts.{d}"),
        rtype: "TXT",
        data: quote_txt(&sts),
        value: sts,
        note: format!(
            "MTA-STS (optional): publish it once https://mta-sts.{domain}/.well-known/mta-sts.txt serves the policy below; its id changes with the policy"
        ),
        optional: true,
    });
    let dmarc = dmarc_value(domain);
    out.push(Record {
        kind: Kind::Dmarc,
        name: format!("_dmarc.{d}"),
        rtype: "TXT",
        data: quote_txt(&dmarc),
        value: dmarc,
        note: "DMARC: start with p=none to watch the reports, then quarantine, then reject".into(),
        optional: false,
    });
    out
}

/// The TXT strings at `name`, joined per record. `Ok(empty)` when the name has none.
async fn txts(auth: &MessageAuthenticator, name: &str) -> Result<Vec<String>, String> {
    use mail_auth::hickory_resolver::proto::rr::RData;
    match auth.resolver().txt_lookup(name).await {
        Ok(lookup) => Ok(lookup
            .answers()
            .iter()
            .filter_map(|r| match &r.data {
                RData::TXT(t) => Some(
                    t.txt_data
                        .iter()
                        .map(|s| String::from_utf8_lossy(s).into_owned())
                        .collect::<String>(),
                ),
                _ => None,
            })
            .collect()),
        Err(e) if e.is_no_records_found() || e.is_nx_domain() => Ok(Vec::new()),
        Err(e) => Err(e.to_string()),
    }
}

/// The `p=` of a DKIM record.
fn dkim_p(text: &str) -> Option<String> {
    text.split(';').find_map(|tag| {
        let (k, v) = tag.split_once('=')?;
        (k.trim() == "p").then(|| v.chars().filter(|c| !c.is_whitespace()).collect())
    })
}

/// Looks `record` up and says whether it is published as it should be.
pub async fn check(
    auth: &MessageAuthenticator,
    cfg: &Config,
    domain: &str,
    record: &Record,
) -> Status {
    let name = record.name.trim_end_matches('.');
    match record.kind {
        Kind::Mx => match auth.resolver().mx_lookup(name).await {
            Ok(mx) => {
                let hosts: Vec<String> = mx
                    .answers()
                    .iter()
                    .filter_map(|r| match &r.data {
                        mail_auth::hickory_resolver::proto::rr::RData::MX(m) => Some(
                            m.exchange
                                .to_string()
                                .trim_end_matches('.')
                                .to_ascii_lowercase(),
                        ),
                        _ => None,
                    })
                    .collect();
                if hosts.contains(&record.value) {
                    Status::Ok(format!("MX {}", hosts.join(", ")))
                } else if hosts.is_empty() {
                    Status::Missing(format!("{domain} has no MX record"))
                } else {
                    Status::Wrong(format!(
                        "the MX of {domain} is {}, not {}",
                        hosts.join(", "),
                        record.value
                    ))
                }
            }
            Err(e) if e.is_no_records_found() || e.is_nx_domain() => {
                Status::Missing(format!("{domain} has no MX record"))
            }
            Err(e) => Status::Unknown(e.to_string()),
        },
        Kind::Address => {
            let Ok(ip) = record.value.parse::<IpAddr>() else {
                return match auth.resolver().lookup_ip(name).await {
                    Ok(ips) if ips.iter().next().is_some() => Status::Ok(format!(
                        "{name} has {}",
                        ips.iter()
                            .map(|i| i.to_string())
                            .collect::<Vec<_>>()
                            .join(", ")
                    )),
                    Ok(_) => Status::Missing(format!("{name} has no address")),
                    Err(e) if e.is_no_records_found() || e.is_nx_domain() => {
                        Status::Missing(format!("{name} has no address"))
                    }
                    Err(e) => Status::Unknown(e.to_string()),
                };
            };
            match auth.resolver().lookup_ip(name).await {
                Ok(ips) => {
                    let ips: Vec<IpAddr> = ips.iter().collect();
                    if ips.contains(&ip) {
                        Status::Ok(format!("{name} has {ip}"))
                    } else if ips.is_empty() {
                        Status::Missing(format!("{name} has no address"))
                    } else {
                        Status::Wrong(format!(
                            "{name} has {} but not {ip}",
                            ips.iter()
                                .map(|i| i.to_string())
                                .collect::<Vec<_>>()
                                .join(", ")
                        ))
                    }
                }
                Err(e) if e.is_no_records_found() || e.is_nx_domain() => {
                    Status::Missing(format!("{name} has no {} record", record.rtype))
                }
                Err(e) => Status::Unknown(e.to_string()),
            }
        }
        Kind::Ptr => {
            let ip = record.name.trim_end_matches('.').to_string();
            let addr = addresses_of_reverse(&ip);
            let Some(addr) = addr else {
                return Status::Unknown(format!("cannot read {ip}"));
            };
            match auth.resolver().reverse_lookup(addr).await {
                Ok(names) => {
                    let names: Vec<String> = names
                        .answers()
                        .iter()
                        .filter_map(|r| match &r.data {
                            mail_auth::hickory_resolver::proto::rr::RData::PTR(p) => {
                                Some(p.0.to_string().trim_end_matches('.').to_ascii_lowercase())
                            }
                            _ => None,
                        })
                        .collect();
                    if names.contains(&record.value) {
                        Status::Ok(format!("{addr} is {}", record.value))
                    } else if names.is_empty() {
                        Status::Missing(format!("{addr} has no PTR record"))
                    } else {
                        Status::Wrong(format!(
                            "{addr} points to {}, not {}",
                            names.join(", "),
                            record.value
                        ))
                    }
                }
                Err(e) if e.is_no_records_found() || e.is_nx_domain() => {
                    Status::Missing(format!("{addr} has no PTR record"))
                }
                Err(e) => Status::Unknown(e.to_string()),
            }
        }
        Kind::Spf => {
            let records = match txts(auth, name).await {
                Ok(t) => t,
                Err(e) => return Status::Unknown(e),
            };
            let spf: Vec<&String> = records
                .iter()
                .filter(|t| t.to_ascii_lowercase().starts_with("v=spf1"))
                .collect();
            match spf.as_slice() {
                [] => Status::Missing(format!("{domain} has no SPF record")),
                [_, _, ..] => Status::Wrong(format!(
                    "{domain} has {} SPF records: keep one (RFC 7208 §4.5: several are a permerror)",
                    spf.len()
                )),
                [one] => {
                    // Does it let this host send? Evaluated for each of its addresses.
                    let ips: Vec<IpAddr> =
                        match auth.resolver().lookup_ip(cfg.hostname.as_str()).await {
                            Ok(ips) => ips.iter().collect(),
                            Err(_) => Vec::new(),
                        };
                    if ips.is_empty() {
                        return Status::Ok(format!(
                            "{one} (not evaluated: {} has no address)",
                            cfg.hostname
                        ));
                    }
                    let sender = format!("postmaster@{domain}");
                    for ip in &ips {
                        let out = auth
                            .verify_spf(SpfParameters::verify_mail_from(
                                *ip,
                                &cfg.hostname,
                                &cfg.hostname,
                                &sender,
                            ))
                            .await;
                        if out.result() != SpfResult::Pass {
                            return Status::Wrong(format!(
                                "{one}: gives {} for this host's address {ip}; it must pass (add `mx` or `ip{}:{ip}`)",
                                crate::verify::spf_name(out.result()),
                                if ip.is_ipv4() { 4 } else { 6 }
                            ));
                        }
                    }
                    Status::Ok(one.to_string())
                }
            }
        }
        Kind::Dkim => {
            let records = match txts(auth, name).await {
                Ok(t) => t,
                Err(e) => return Status::Unknown(e),
            };
            let Some(text) = records.iter().find(|t| t.contains("p=")) else {
                return Status::Missing(format!("no DKIM key at {name}"));
            };
            let want = dkim_p(&record.value).unwrap_or_default();
            match dkim_p(text) {
                Some(p) if p == want => Status::Ok("the published key matches the key file".into()),
                Some(p) if p.is_empty() => Status::Wrong("the key is revoked (empty p=)".into()),
                _ => Status::Wrong(
                    "the published key does not match the key file: publish the record above"
                        .into(),
                ),
            }
        }
        Kind::MtaSts | Kind::TlsRpt => {
            let records = match txts(auth, name).await {
                Ok(t) => t,
                Err(e) => return Status::Unknown(e),
            };
            let version = if record.kind == Kind::MtaSts {
                "v=STSv1"
            } else {
                "v=TLSRPTv1"
            };
            let found: Vec<&String> = records
                .iter()
                .filter(|t| t.split(';').next().map(str::trim) == Some(version))
                .collect();
            match found.as_slice() {
                [] => Status::Missing(format!("no {version} record at {name}")),
                [one] => Status::Ok(one.to_string()),
                _ => Status::Wrong(format!(
                    "{} {version} records at {name}: keep one (several mean none)",
                    found.len()
                )),
            }
        }
        Kind::Dmarc => {
            let records = match txts(auth, name).await {
                Ok(t) => t,
                Err(e) => return Status::Unknown(e),
            };
            match records
                .iter()
                .find(|t| t.to_ascii_lowercase().starts_with("v=dmarc1"))
            {
                None => Status::Missing(format!("{domain} has no DMARC record")),
                Some(t) => {
                    let policy = t
                        .split(';')
                        .find_map(|tag| {
                            let (k, v) = tag.split_once('=')?;
                            (k.trim() == "p").then(|| v.trim().to_ascii_lowercase())
                        })
                        .unwrap_or_default();
                    match policy.as_str() {
                        "none" | "quarantine" | "reject" => {
                            Status::Ok(format!("{t} (policy {policy})"))
                        }
                        _ => {
                            Status::Wrong(format!("{t}: no valid p= (none, quarantine or reject)"))
                        }
                    }
                }
            }
        }
    }
}

/// The address of an `in-addr.arpa`/`ip6.arpa` name.
fn addresses_of_reverse(name: &str) -> Option<IpAddr> {
    if let Some(v4) = name.strip_suffix(".in-addr.arpa") {
        let mut o: Vec<u8> = v4
            .split('.')
            .map(|p| p.parse().ok())
            .collect::<Option<_>>()?;
        o.reverse();
        let o: [u8; 4] = o.try_into().ok()?;
        return Some(IpAddr::from(o));
    }
    let v6 = name.strip_suffix(".ip6.arpa")?;
    let nibbles: Vec<u8> = v6
        .split('.')
        .map(|n| u8::from_str_radix(n, 16).ok())
        .collect::<Option<_>>()?;
    if nibbles.len() != 32 {
        return None;
    }
    let mut bytes = [0u8; 16];
    for (i, pair) in nibbles.rchunks(2).enumerate() {
        // rchunks from the end: [hi, lo] order reversed in the name.
        bytes[i] = (pair[1] << 4) | pair[0];
    }
    Some(IpAddr::from(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reverse_names_round_trip() {
        for ip in ["192.0.2.1", "2001:db8::1"] {
            let ip: IpAddr = ip.parse().unwrap();
            let name = reverse_name(ip);
            assert_eq!(
                addresses_of_reverse(name.trim_end_matches('.')),
                Some(ip),
                "{name}"
            );
        }
        assert_eq!(
            reverse_name("192.0.2.1".parse().unwrap()),
            "1.2.0.192.in-addr.arpa."
        );
    }

    #[test]
    fn long_txt_is_split_in_255_octet_strings() {
        let long = "p=".to_string() + &"A".repeat(400);
        let q = quote_txt(&long);
        assert!(q.starts_with("( \"p=AAA"), "{q}");
        let strings: Vec<&str> = q
            .split('"')
            .filter(|s| s.starts_with('p') || s.starts_with('A'))
            .collect();
        assert_eq!(strings.len(), 2);
        assert_eq!(strings[0].len(), 255);
        assert_eq!(quote_txt("v=spf1 mx -all"), "\"v=spf1 mx -all\"");
    }
}
