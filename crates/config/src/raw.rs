//! The configuration file as written: serde structs that mirror the TOML, with spans on the
//! values whose checks need a position. Values with their own syntax (sizes, durations,
//! addresses, enums) are kept as strings here and parsed during validation, so that every bad
//! value in a file is reported, not only the first.

use std::collections::BTreeMap;
use std::fmt;

use serde::Deserialize;
use serde::de::{self, Deserializer, SeqAccess, Visitor};
use toml::Spanned;

/// The whole file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawConfig {
    /// EHLO name, banner and Received; default: the system's name.
    pub hostname: Option<Spanned<String>>,
    /// Spool, generated keys and state; default `./estafeta-data`.
    pub data_dir: Option<Spanned<String>>,
    /// Started as root: drop to this user after binding.
    pub user: Option<Spanned<String>>,
    /// Started as root: drop to this group after binding; default the user's primary group.
    pub group: Option<Spanned<String>>,
    /// Keep running as root (no `user`): must be said explicitly.
    pub run_as_root: Option<bool>,
    /// `[log]`.
    #[serde(default)]
    pub log: RawLog,
    /// `[[listener]]`, repeatable.
    pub listener: Option<Vec<RawListener>>,
    /// `[tls]`.
    #[serde(default)]
    pub tls: RawTls,
    /// `[auth]`.
    #[serde(default)]
    pub auth: RawAuth,
    /// `[relay]`.
    #[serde(default)]
    pub relay: RawRelay,
    /// `[dns]`.
    #[serde(default)]
    pub dns: RawDns,
    /// `[[domain]]`, repeatable.
    #[serde(default)]
    pub domain: Vec<RawDomain>,
    /// `[delivery]`.
    #[serde(default)]
    pub delivery: RawDelivery,
    /// `[queue]`.
    #[serde(default)]
    pub queue: RawQueue,
    /// `[limits]`.
    #[serde(default)]
    pub limits: RawLimits,
    /// `[smtp]`.
    #[serde(default)]
    pub smtp: RawSmtp,
    /// `[metrics]`.
    #[serde(default)]
    pub metrics: RawMetrics,
    /// `[control]`.
    #[serde(default)]
    pub control: RawControl,
    /// `[[dkim]]`, repeatable.
    #[serde(default)]
    pub dkim: Vec<RawDkim>,
    /// `[verify]`.
    #[serde(default)]
    pub verify: RawVerify,
    /// `[srs]`; absent: no sender rewriting.
    pub srs: Option<Spanned<RawSrs>>,
    /// `[antispam]`.
    #[serde(default)]
    pub antispam: RawAntispam,
    /// `[[milter]]`, repeatable, called in order.
    #[serde(default)]
    pub milter: Vec<Spanned<RawMilter>>,
    /// `[pipe.NAME]`: commands a domain can deliver to.
    #[serde(default)]
    pub pipe: BTreeMap<Spanned<String>, Spanned<RawPipe>>,
}

/// One `[[milter]]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawMilter {
    /// `inet:host:port` or `unix:/path`.
    pub address: Spanned<String>,
    /// `accept` | `tempfail` | `reject` when the milter is down or times out.
    pub default_action: Option<Spanned<String>>,
    /// How long to wait for each answer.
    pub timeout: Option<Spanned<DurationValue>>,
    /// The listener kinds it applies to; absent: all.
    pub listeners: Option<Vec<Spanned<String>>>,
}

/// One `[pipe.NAME]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawPipe {
    /// argv, with `{sender}`, `{recipient}`, `{user}`, `{domain}`, `{extension}`.
    pub command: Spanned<Vec<Spanned<String>>>,
    /// Run as this user (the server must be root to switch).
    pub user: Option<Spanned<String>>,
    /// How long the command may run.
    pub timeout: Option<Spanned<DurationValue>>,
}

/// `[antispam]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawAntispam {
    /// DNS blocklist zones, `zone[=filter][*weight]`.
    pub dnsbl: Option<Vec<Spanned<String>>>,
    /// The score at which a client is refused.
    pub dnsbl_threshold: Option<Spanned<i64>>,
}

/// One `[[dkim]]`: a signing key.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawDkim {
    /// The signing domain (`d=`).
    pub domain: Spanned<String>,
    /// The selector (`s=`).
    pub selector: Spanned<String>,
    /// `ed25519` | `rsa`.
    pub algorithm: Option<Spanned<String>>,
    /// PEM file of the private key.
    pub private_key: Spanned<String>,
}

/// `[verify]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawVerify {
    /// `off` | `mark` | `reject`.
    pub spf: Option<Spanned<String>>,
    /// `off` | `mark`.
    pub dkim: Option<Spanned<String>>,
    /// `off` | `mark` | `enforce`.
    pub dmarc: Option<Spanned<String>>,
    /// `off` | `mark`.
    pub arc: Option<Spanned<String>>,
}

/// `[srs]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawSrs {
    /// The domain of SRS addresses.
    pub domain: Spanned<String>,
    /// The secrets file; default `data_dir/srs.secret`.
    pub secret_file: Option<Spanned<String>>,
}

/// `[log]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawLog {
    /// `error | warn | info | debug | trace`.
    pub level: Option<Spanned<String>>,
    /// `text | json | journald`.
    pub format: Option<Spanned<String>>,
}

/// One `[[listener]]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawListener {
    /// `smtp | submission | submissions`.
    pub kind: Spanned<String>,
    /// A socket address or a list of them.
    pub address: Spanned<OneOrMany>,
    /// Authenticated users may send only as addresses they own; default: on for submission
    /// and submissions, off for smtp.
    pub sender_check: Option<bool>,
}

/// `[tls]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawTls {
    /// PEM certificate chain.
    pub certificate: Option<Spanned<String>>,
    /// PEM private key.
    pub private_key: Option<Spanned<String>>,
}

/// `[auth]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawAuth {
    /// `address:argon2id-hash` lines; default `data_dir/users`.
    pub users_file: Option<Spanned<String>>,
    /// Failed AUTH attempts per session.
    pub max_failures: Option<u32>,
    /// Write the authenticated user name into the Received header; default false.
    pub authenticated_header: Option<bool>,
}

/// `[relay]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawRelay {
    /// Networks that may relay without AUTH.
    pub mynetworks: Option<Vec<Spanned<String>>>,
    /// Permits public ranges in `mynetworks`.
    pub allow_open_relay: Option<bool>,
    /// `host:port` for all remote mail.
    pub smarthost: Option<Spanned<String>>,
    /// `none | opportunistic | required | verify`.
    pub smarthost_tls: Option<Spanned<String>>,
    /// File with `user:password`.
    pub smarthost_credentials: Option<Spanned<String>>,
    /// `[relay.routes]`: domain → next hop.
    pub routes: Option<BTreeMap<Spanned<String>, Spanned<String>>>,
    /// `[relay.tls_policy]`: domain → `none | opportunistic | required | verify`.
    pub tls_policy: Option<BTreeMap<Spanned<String>, Spanned<String>>>,
    /// MTA-STS (RFC 8461) for MX delivery.
    pub mta_sts: Option<bool>,
    /// The PEM bundle of trusted roots for verified TLS.
    pub ca_file: Option<Spanned<String>>,
    /// Send TLS-RPT (RFC 8460) reports.
    pub tls_reports: Option<bool>,
    /// `any | ipv4 | ipv6`.
    pub ip_version: Option<Spanned<String>>,
    /// The local address of outbound connections.
    pub source_address: Option<Spanned<String>>,
    /// The EHLO name towards other servers.
    pub helo_name: Option<Spanned<String>>,
}

/// `[dns]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawDns {
    /// Resolver socket addresses.
    pub nameservers: Option<Vec<Spanned<String>>>,
    /// The nameservers validate DNSSEC; trust their AD bit (DANE).
    pub dnssec: Option<Spanned<bool>>,
}

/// One `[[domain]]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawDomain {
    /// The domain name.
    pub name: Spanned<String>,
    /// `"*"` or a list of local parts; absent: the users file decides.
    pub mailboxes: Option<Spanned<OneOrMany>>,
    /// Target for unknown local parts.
    pub catch_all: Option<Spanned<String>>,
    /// `[domain.aliases]`: local part → target or list of targets.
    pub aliases: Option<BTreeMap<Spanned<String>, Spanned<OneOrMany>>>,
    /// `maildir` | `lmtp:unix:PATH` | `lmtp:inet:HOST:PORT` | `pipe:NAME`.
    pub delivery: Option<Spanned<String>>,
}

/// `[delivery]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawDelivery {
    /// Maildir path template with `{domain}` and `{user}`.
    pub maildir: Option<Spanned<String>>,
    /// Subaddress separator; `""` for none.
    pub subaddress_separator: Option<Spanned<String>>,
}

/// `[queue]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawQueue {
    /// Retry intervals.
    pub retry: Option<Spanned<Vec<Spanned<DurationValue>>>>,
    /// Age at which a message bounces.
    pub max_lifetime: Option<Spanned<DurationValue>>,
    /// Age at which a delay DSN is sent; `"0s"` = never.
    pub delay_warning: Option<Spanned<DurationValue>>,
    /// Concurrent deliveries in total.
    pub max_deliveries: Option<Spanned<usize>>,
    /// Concurrent deliveries per destination.
    pub max_per_destination: Option<Spanned<usize>>,
    /// Where undeliverable notifications go.
    pub double_bounce_to: Option<Spanned<String>>,
}

/// `[limits]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawLimits {
    /// Largest message.
    pub max_message_size: Option<Spanned<SizeValue>>,
    /// Recipients per message.
    pub max_recipients: Option<Spanned<usize>>,
    /// Connections in total.
    pub max_connections: Option<Spanned<usize>>,
    /// Connections per client IP.
    pub max_connections_per_ip: Option<Spanned<usize>>,
    /// Errors per session.
    pub max_errors: Option<u32>,
    /// Time per command.
    pub command_timeout: Option<Spanned<DurationValue>>,
    /// Time for DATA.
    pub data_timeout: Option<Spanned<DurationValue>>,
    /// Wait before the greeting on smtp listeners.
    pub greet_delay: Option<Spanned<DurationValue>>,
    /// `count/period` rates.
    pub connection_rate_per_ip: Option<Spanned<String>>,
    /// Messages per client address.
    pub message_rate_per_ip: Option<Spanned<String>>,
    /// Recipients per client address.
    pub recipient_rate_per_ip: Option<Spanned<String>>,
    /// Messages per authenticated user.
    pub message_rate_per_user: Option<Spanned<String>>,
    /// Recipients per authenticated user.
    pub recipient_rate_per_user: Option<Spanned<String>>,
}

/// `[smtp]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawSmtp {
    /// Greeting text after the hostname.
    pub banner: Option<Spanned<String>>,
    /// `ambiguous | trusted | off`.
    pub vrfy: Option<Spanned<String>>,
    /// `off | trusted`.
    pub expn: Option<Spanned<String>>,
    /// Unknown recipients before slowing down.
    pub max_unknown_recipients: Option<u32>,
    /// Received headers before a loop is assumed.
    pub max_received_headers: Option<u32>,
}

/// `[metrics]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawMetrics {
    /// Prometheus endpoint socket address.
    pub address: Option<Spanned<String>>,
}

/// `[control]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawControl {
    /// Control socket path.
    pub socket: Option<Spanned<String>>,
    /// Local submission (sendmail) socket path.
    pub submit_socket: Option<Spanned<String>>,
}

/// A string, or a list of strings each with its own span.
#[derive(Debug, Clone)]
pub(crate) enum OneOrMany {
    /// A single string (its span is the span of the whole value).
    One(String),
    /// A list.
    Many(Vec<Spanned<String>>),
}

impl<'de> Deserialize<'de> for OneOrMany {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct OneOrManyVisitor;

        impl<'de> Visitor<'de> for OneOrManyVisitor {
            type Value = OneOrMany;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string or a list of strings")
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(OneOrMany::One(v.to_owned()))
            }

            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                let mut items = Vec::new();
                while let Some(item) = seq.next_element()? {
                    items.push(item);
                }
                Ok(OneOrMany::Many(items))
            }
        }

        deserializer.deserialize_any(OneOrManyVisitor)
    }
}

/// A value written as a string or as a bare integer; which one is allowed is decided later.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum StrOrInt {
    /// `"25MB"`, `"5m"`.
    Str(String),
    /// `4096`.
    Int(i64),
}

struct StrOrIntVisitor(&'static str);

impl<'de> Visitor<'de> for StrOrIntVisitor {
    type Value = StrOrInt;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0)
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
        Ok(StrOrInt::Str(v.to_owned()))
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
        Ok(StrOrInt::Int(v))
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
        // Larger than i64::MAX: keep the digits, the size parser reports it as too large.
        Ok(i64::try_from(v).map_or_else(|_| StrOrInt::Str(v.to_string()), StrOrInt::Int))
    }
}

/// A size: `"25MB"` or a bare number of bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SizeValue(pub StrOrInt);

impl<'de> Deserialize<'de> for SizeValue {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer
            .deserialize_any(StrOrIntVisitor("a size like \"25MB\""))
            .map(SizeValue)
    }
}

/// A duration: `"5m"` (a bare number is read so it can be reported as missing its unit).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct DurationValue(pub StrOrInt);

impl<'de> Deserialize<'de> for DurationValue {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer
            .deserialize_any(StrOrIntVisitor("a duration like \"5m\""))
            .map(DurationValue)
    }
}
