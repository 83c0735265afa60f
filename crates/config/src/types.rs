//! The validated configuration: what the rest of estafeta reads.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

/// The validated configuration of an estafeta server, from a file or the embedded default.
///
/// Every key has been checked and every default filled in; see `docs/` and `config/estafeta.toml`
/// for what each setting means.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// The file this configuration was read from; `None` for the embedded default.
    pub source: Option<PathBuf>,
    /// The name used in the banner, EHLO and Received headers; default: [`system_hostname`](crate::system_hostname).
    pub hostname: String,
    /// Where the spool, generated keys and state live; relative paths are relative to the current
    /// directory. Default `./estafeta-data`.
    pub data_dir: PathBuf,
    /// Started as root, the server binds its sockets, then drops to this user (by name);
    /// `None`: it keeps the identity it was started with.
    pub user: Option<String>,
    /// The group to drop to; `None`: the primary group of [`Config::user`].
    pub group: Option<String>,
    /// Allows `serve` to keep running as root when no `user` is set; default false.
    pub run_as_root: bool,
    /// Logging.
    pub log: LogConfig,
    /// The sockets to listen on. A file without `[[listener]]` gets smtp on `0.0.0.0:25` and
    /// `[::]:25` (the `[::]` socket must be bound IPv6-only).
    pub listeners: Vec<Listener>,
    /// The certificate used by STARTTLS and submissions listeners.
    pub tls: TlsConfig,
    /// Authentication of submission clients.
    pub auth: AuthConfig,
    /// Who may relay, and how remote mail leaves.
    pub relay: RelayConfig,
    /// DNS resolution.
    pub dns: DnsConfig,
    /// The domains this server receives mail for. Empty is valid: the server then only relays
    /// (for `mynetworks` and authenticated clients) and accepts no mail for local delivery.
    pub domains: Vec<Domain>,
    /// Local delivery into Maildirs.
    pub delivery: DeliveryConfig,
    /// The outgoing queue.
    pub queue: QueueConfig,
    /// Resource limits of SMTP sessions.
    pub limits: Limits,
    /// SMTP protocol behaviour.
    pub smtp: SmtpConfig,
    /// The Prometheus metrics endpoint.
    pub metrics: MetricsConfig,
    /// The local control socket used by the `estafeta queue …` commands.
    pub control: ControlConfig,
    /// DKIM signing keys (`[[dkim]]`), in file order.
    pub dkim: Vec<DkimKeyConfig>,
    /// Inbound checks (`[verify]`).
    pub verify: VerifyConfig,
    /// Sender Rewriting Scheme for forwarded mail (`[srs]`); `None`: off.
    pub srs: Option<SrsConfig>,
    /// Early refusals of abusive clients (`[antispam]`).
    pub antispam: AntispamConfig,
    /// Filters asked before the 250 (`[[milter]]`), in order.
    pub milters: Vec<MilterConfig>,
    /// Commands local mail can be delivered to (`[pipe.NAME]`), by name.
    pub pipes: BTreeMap<String, PipeConfig>,
}

/// One `[[milter]]`: a mail filter (rspamd, OpenDKIM, ClamAV…) spoken to with the milter
/// protocol before a message is acknowledged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MilterConfig {
    /// `inet:host:port` or `unix:/path`, as written (checked).
    pub address: String,
    /// What happens to the mail when the milter cannot be reached, breaks the protocol or
    /// does not answer in time.
    pub default_action: MilterDefault,
    /// How long each answer may take (the end-of-message answer too).
    pub timeout: Duration,
    /// The listener kinds whose mail it sees; `None`: all (and local submissions).
    pub listeners: Option<Vec<ListenerKind>>,
}

/// `[[milter]] default_action`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MilterDefault {
    /// Go on as if the milter had accepted (Postfix's `milter_default_action = accept`).
    Accept,
    /// `451 4.7.1`: the client tries again later (the default: nothing passes unfiltered).
    Tempfail,
    /// `550 5.7.1`.
    Reject,
}

/// One `[pipe.NAME]`: a command a domain delivers to, the message on its standard input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PipeConfig {
    /// argv; each argument may hold `{sender}`, `{recipient}`, `{user}`, `{extension}`,
    /// `{domain}`, `{original_recipient}`. Never run through a shell.
    pub command: Vec<String>,
    /// Run as this system user (needs the server to run as root); `None`: as the server.
    pub user: Option<String>,
    /// Killed after this long (a temporary failure); default 1000 s as Postfix's pipe.
    pub timeout: Duration,
}

/// How a local domain's mail is delivered (`delivery` of a `[[domain]]`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum DomainDelivery {
    /// Into Maildir folders written by estafeta (`[delivery] maildir`).
    #[default]
    Maildir,
    /// To an LMTP server: `unix:/path` or `inet:host:port`, as written (checked).
    Lmtp(String),
    /// To the command `[pipe.NAME]`.
    Pipe(String),
}

/// `[antispam]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AntispamConfig {
    /// DNS blocklists (e.g. `zen.spamhaus.org`), asked at connect for clients of an smtp
    /// listener outside `mynetworks`. Empty: off.
    pub dnsbl: Vec<DnsblZone>,
    /// The client is refused with `554 5.7.1` when the weights of the lists that list it add
    /// up to this or more (postscreen's `postscreen_dnsbl_threshold`; default 1, so that with
    /// the default weight of 1 a listing in any one list refuses).
    pub dnsbl_threshold: i32,
}

impl Default for AntispamConfig {
    fn default() -> Self {
        AntispamConfig {
            dnsbl: Vec::new(),
            dnsbl_threshold: 1,
        }
    }
}

/// One `[antispam] dnsbl` entry, written as postscreen writes its `postscreen_dnsbl_sites`:
/// `zone[=filter][*weight]`, e.g. `"zen.spamhaus.org=127.0.0.[2..11]*3"` or
/// `"list.dnswl.org=127.0.[0..255].[1..3]*-5"` (an allowlist: a negative weight).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsblZone {
    /// The zone, lower-cased, without a trailing dot.
    pub zone: String,
    /// The answers that count as a listing, octet by octet (each a list of inclusive ranges);
    /// `None`: any answer in 127.0.0.0/8 but 127.255.255.0/24 (the lists' error codes).
    pub filter: Option<[Vec<(u8, u8)>; 4]>,
    /// What a listing adds to the client's score (default 1; negative for allowlists).
    pub weight: i32,
}

impl DnsblZone {
    /// Whether an answer `a` of the list is a listing.
    pub fn lists(&self, a: std::net::Ipv4Addr) -> bool {
        let o = a.octets();
        match &self.filter {
            None => o[0] == 127 && !(o[1] == 255 && o[2] == 255),
            Some(f) => f
                .iter()
                .zip(o)
                .all(|(ranges, b)| ranges.iter().any(|&(lo, hi)| (lo..=hi).contains(&b))),
        }
    }
}

impl Config {
    /// The local domain named `name` (compared case-insensitively, trailing dot ignored).
    pub fn domain(&self, name: &str) -> Option<&Domain> {
        let name = name.strip_suffix('.').unwrap_or(name);
        self.domains
            .iter()
            .find(|d| d.name.eq_ignore_ascii_case(name))
    }
}

/// `[log]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogConfig {
    /// The most verbose level logged; `RUST_LOG` overrides it. Default `info`.
    pub level: LogLevel,
    /// How log lines are written; `None` (the default): `journald` when started by systemd
    /// with its output connected to the journal (`JOURNAL_STREAM` set), `text` otherwise.
    pub format: Option<LogFormat>,
}

/// A log level, `log.level`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum LogLevel {
    /// `"error"`.
    Error,
    /// `"warn"`.
    Warn,
    /// `"info"`.
    Info,
    /// `"debug"`.
    Debug,
    /// `"trace"`.
    Trace,
}

impl LogLevel {
    /// The name used in the configuration file (and understood by `tracing`'s filters).
    pub fn as_str(self) -> &'static str {
        match self {
            LogLevel::Error => "error",
            LogLevel::Warn => "warn",
            LogLevel::Info => "info",
            LogLevel::Debug => "debug",
            LogLevel::Trace => "trace",
        }
    }
}

/// A log format, `log.format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LogFormat {
    /// `"text"`: human-readable lines.
    Text,
    /// `"json"`: one JSON object per line.
    Json,
    /// `"journald"`: native journal entries with structured fields (`QUEUE_ID`, `CLIENT_IP`…).
    Journald,
}

/// One `[[listener]]`: a kind of service on one or more sockets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listener {
    /// What is served on these sockets.
    pub kind: ListenerKind,
    /// The sockets; never empty, and no socket appears in two listeners.
    pub addresses: Vec<SocketAddr>,
    /// Authenticated users may use as MAIL FROM only addresses they own (`553 5.7.1`
    /// otherwise); default on for submission and submissions, off for smtp.
    pub sender_check: bool,
}

/// The kind of a listener, `listener.kind`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ListenerKind {
    /// `"smtp"`: MTA-to-MTA on port 25; STARTTLS offered, no AUTH required.
    Smtp,
    /// `"submission"`: message submission on port 587 (RFC 6409); STARTTLS then AUTH.
    Submission,
    /// `"submissions"`: submission with implicit TLS on port 465 (RFC 8314).
    Submissions,
}

impl ListenerKind {
    /// The name used in the configuration file.
    pub fn as_str(self) -> &'static str {
        match self {
            ListenerKind::Smtp => "smtp",
            ListenerKind::Submission => "submission",
            ListenerKind::Submissions => "submissions",
        }
    }
}

/// `[tls]`: both paths or neither (then a self-signed certificate is generated into `data_dir`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TlsConfig {
    /// PEM file with the certificate chain, leaf first.
    pub certificate: Option<PathBuf>,
    /// PEM file with the private key.
    pub private_key: Option<PathBuf>,
}

/// `[auth]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthConfig {
    /// One `address:argon2id-hash` per line; default `data_dir/users`.
    pub users_file: PathBuf,
    /// Failed AUTH attempts per session before `421` and close; default 3.
    pub max_failures: u32,
    /// Write the authenticated user name into the Received header (Postfix's
    /// `smtpd_sasl_authenticated_header`); default false: it tells the world who sent what.
    pub authenticated_header: bool,
}

/// `[relay]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelayConfig {
    /// Clients that may relay without AUTH; default `127.0.0.0/8` and `::1/128`.
    pub mynetworks: Vec<IpNet>,
    /// Set to allow `mynetworks` entries that cover large public ranges (see
    /// [`RelayConfig::open_relay_ranges`]).
    pub allow_open_relay: bool,
    /// The host every remote message is sent through, instead of MX lookup.
    pub smarthost: Option<NextHop>,
    /// TLS towards the smarthost; default `required`.
    pub smarthost_tls: SmarthostTls,
    /// File with `user:password` for the smarthost.
    pub smarthost_credentials: Option<PathBuf>,
    /// Per-domain next hop that overrides MX (`[relay.routes]`), keys lower-cased.
    pub routes: BTreeMap<String, NextHop>,
    /// Per-domain TLS policy for MX and route delivery (`[relay.tls_policy]`), keys
    /// lower-cased; a domain not listed gets `opportunistic`.
    pub tls_policy: BTreeMap<String, SmarthostTls>,
    /// Honour the MTA-STS policies (RFC 8461) of recipient domains in MX delivery; default
    /// true.
    pub mta_sts: bool,
    /// The trusted roots (a PEM bundle) for `verify`, MTA-STS policy fetches and MTA-STS
    /// delivery; default: the system's bundle.
    pub ca_file: Option<PathBuf>,
    /// Keep the TLS result of every session to a recipient domain's MX and send each domain
    /// that publishes a TLS-RPT record a daily report (RFC 8460); default false.
    pub tls_reports: bool,
    /// Which address families outbound connections use; default `any`.
    pub ip_version: IpVersion,
    /// The local address outbound connections come from (for destinations of its family);
    /// default: the kernel chooses.
    pub source_address: Option<std::net::IpAddr>,
    /// The name sent with EHLO/HELO to other servers; default: `hostname`.
    pub helo_name: Option<String>,
}

/// `relay.ip_version`: the address families used to reach other servers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum IpVersion {
    /// IPv6 and IPv4 addresses (IPv6 first for a host with both).
    #[default]
    Any,
    /// IPv4 only.
    Ipv4,
    /// IPv6 only.
    Ipv6,
}

/// A fixed next hop: a `[relay.routes]` value or the smarthost.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NextHop {
    /// A host name, or an IP address (written `[192.0.2.7]` in the configuration).
    pub host: String,
    /// The port (25 when the configuration names none).
    pub port: u16,
}

impl NextHop {
    /// Parses `host`, `host:port`, `[ip]` or `[ip]:port` (`[IPv6:2001:db8::7]` too).
    pub fn parse(text: &str) -> Option<NextHop> {
        let text = text.trim();
        if let Some(rest) = text.strip_prefix('[') {
            let (ip, after) = rest.split_once(']')?;
            let ip: std::net::IpAddr = ip.strip_prefix("IPv6:").unwrap_or(ip).parse().ok()?;
            let port = match after.strip_prefix(':') {
                Some(p) => p.parse().ok()?,
                None if after.is_empty() => 25,
                None => return None,
            };
            return Some(NextHop {
                host: ip.to_string(),
                port,
            });
        }
        let (host, port) = match text.rsplit_once(':') {
            Some((h, p)) if !h.contains(':') => (h, p.parse().ok()?),
            None => (text, 25),
            _ => return None,
        };
        let valid = !host.is_empty()
            && host
                .split('.')
                .all(|l| !l.is_empty() && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'));
        valid.then(|| NextHop {
            host: host.to_string(),
            port,
        })
    }
}

impl std::fmt::Display for NextHop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.host.parse::<std::net::IpAddr>().is_ok() {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

impl RelayConfig {
    /// The `mynetworks` entries that let hosts on the public internet relay: an IPv4 prefix
    /// shorter than /8, or an IPv6 prefix shorter than /16, unless it lies entirely inside
    /// private, loopback or link-local space. A file may only contain them with
    /// `allow_open_relay = true`; the server should warn about them at start.
    pub fn open_relay_ranges(&self) -> Vec<IpNet> {
        self.mynetworks
            .iter()
            .copied()
            .filter(is_open_relay_range)
            .collect()
    }
}

/// Whether `net` covers enough of the public internet to make this server an open relay.
pub(crate) fn is_open_relay_range(net: &IpNet) -> bool {
    match net {
        IpNet::V4(net) => {
            let private = [
                Ipv4Net::new(Ipv4Addr::new(10, 0, 0, 0), 8),
                Ipv4Net::new(Ipv4Addr::new(127, 0, 0, 0), 8),
                Ipv4Net::new(Ipv4Addr::new(172, 16, 0, 0), 12),
                Ipv4Net::new(Ipv4Addr::new(192, 168, 0, 0), 16),
                Ipv4Net::new(Ipv4Addr::new(169, 254, 0, 0), 16),
                Ipv4Net::new(Ipv4Addr::new(100, 64, 0, 0), 10),
            ];
            net.prefix_len() < 8 && !private.into_iter().flatten().any(|p| p.contains(net))
        }
        IpNet::V6(net) => {
            let private = [
                Ipv6Net::new(Ipv6Addr::new(0xfc00, 0, 0, 0, 0, 0, 0, 0), 7),
                Ipv6Net::new(Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 0), 10),
                Ipv6Net::new(Ipv6Addr::LOCALHOST, 128),
            ];
            net.prefix_len() < 16 && !private.into_iter().flatten().any(|p| p.contains(net))
        }
    }
}

/// The default `mynetworks`: loopback only.
pub(crate) fn loopback_networks() -> Vec<IpNet> {
    vec![
        IpNet::new(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 0)), 8).expect("valid prefix"),
        IpNet::new(IpAddr::V6(Ipv6Addr::LOCALHOST), 128).expect("valid prefix"),
    ]
}

/// A TLS policy for outbound delivery: `relay.smarthost_tls` and the values of
/// `[relay.tls_policy]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SmarthostTls {
    /// `"none"`: plaintext, never STARTTLS.
    None,
    /// `"opportunistic"`: STARTTLS when offered, without certificate checks.
    Opportunistic,
    /// `"required"`: STARTTLS (or implicit TLS on 465) is mandatory; the certificate is not
    /// verified.
    Required,
    /// `"verify"`: TLS is mandatory and the certificate must be valid for the smarthost's name.
    Verify,
    /// `"dane"` (`[relay.tls_policy]` only, with `[dns] dnssec`): the MX hosts must be
    /// authenticated by DANE (RFC 7672).
    Dane,
}

/// `[dns]`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DnsConfig {
    /// Resolvers to query; empty = the ones in `/etc/resolv.conf`.
    pub nameservers: Vec<SocketAddr>,
    /// The nameservers validate DNSSEC: their AD bit is trusted, and DANE (RFC 7672) is used
    /// for MX delivery. Default false.
    pub dnssec: bool,
}

/// One `[[domain]]`: a domain this server receives mail for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Domain {
    /// The domain, lower-cased, without a trailing dot.
    pub name: String,
    /// Which local parts exist.
    pub mailboxes: Mailboxes,
    /// Where mail for unknown local parts goes (a local part or an address), if anywhere.
    pub catch_all: Option<String>,
    /// Local part (lower-cased) → targets (local parts of this domain or full addresses);
    /// never an empty list.
    pub aliases: BTreeMap<String, Vec<String>>,
    /// How its mailboxes' mail is delivered.
    pub delivery: DomainDelivery,
}

/// Which local parts of a domain exist, `domain.mailboxes`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mailboxes {
    /// `"*"`: every local part, each with its own Maildir.
    Any,
    /// A list of local parts, lower-cased, without `@`.
    List(Vec<String>),
    /// Key absent: the users of this domain in `auth.users_file`.
    Users,
}

/// `[delivery]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeliveryConfig {
    /// Maildir path template with `{domain}` and `{user}` (the lower-cased local part, after
    /// removing any subaddress); default `<data_dir>/mail/{domain}/{user}/Maildir`.
    pub maildir: String,
    /// Separator of subaddresses (`alice+tag`); default `Some("+")`, `None` when set to `""`.
    pub subaddress_separator: Option<String>,
}

/// `[queue]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueConfig {
    /// Intervals between delivery attempts; the last one repeats. Never empty, every entry > 0.
    pub retry: Vec<Duration>,
    /// Age after which a message is bounced; default 5 days.
    pub max_lifetime: Duration,
    /// Age after which a delay DSN is sent; `None` (`"0s"`) for no delay DSNs. Default 4 hours.
    pub delay_warning: Option<Duration>,
    /// Concurrent deliveries in total (≥ 1); default 64.
    pub max_deliveries: usize,
    /// Concurrent deliveries per destination (≥ 1); default 4.
    pub max_per_destination: usize,
    /// Where a notification that cannot be delivered is reported (a "double bounce"); `None`:
    /// it is only logged.
    pub double_bounce_to: Option<String>,
}

/// `[limits]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Largest message accepted, in bytes (advertised by SIZE); default 25 MiB.
    pub max_message_size: u64,
    /// Recipients per message; default 100.
    pub max_recipients: usize,
    /// Concurrent connections in total; default 1000.
    pub max_connections: usize,
    /// Concurrent connections per client IP; default 20.
    pub max_connections_per_ip: usize,
    /// Syntax and sequence errors per session before `421`; default 10.
    pub max_errors: u32,
    /// Time allowed for each command (RFC 5321 §4.5.3.2 suggests 5 minutes); ≥ 1 s.
    pub command_timeout: Duration,
    /// Time allowed for the whole DATA transfer; default 10 minutes, ≥ 1 s.
    pub data_timeout: Duration,
    /// smtp listeners, clients outside mynetworks: wait this long before the `220`; a client
    /// that talks first gets `554 5.5.1` and is disconnected. Default 0 (off).
    pub greet_delay: Duration,
    /// New connections per client address (IPv6: per /64); off when `None`.
    pub connection_rate_per_ip: Option<Rate>,
    /// Messages per client address from clients neither authenticated nor in mynetworks.
    pub message_rate_per_ip: Option<Rate>,
    /// Recipients per client address from the same clients.
    pub recipient_rate_per_ip: Option<Rate>,
    /// Messages per authenticated user.
    pub message_rate_per_user: Option<Rate>,
    /// Recipients per authenticated user.
    pub recipient_rate_per_user: Option<Rate>,
}

/// `count/period`, e.g. `"300/1h"`: at most `count` in any `period` (a burst of `count`,
/// refilled evenly over `period`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    /// How many.
    pub count: u32,
    /// In how long.
    pub period: Duration,
}

impl std::fmt::Display for Rate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = self.period.as_secs();
        let period = if s.is_multiple_of(86400) {
            format!("{}d", s / 86400)
        } else if s.is_multiple_of(3600) {
            format!("{}h", s / 3600)
        } else if s.is_multiple_of(60) {
            format!("{}m", s / 60)
        } else {
            format!("{s}s")
        };
        write!(f, "{}/{period}", self.count)
    }
}

/// `[smtp]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SmtpConfig {
    /// Text after the hostname in the `220` greeting; default `ESMTP`.
    pub banner: String,
    /// How VRFY is answered.
    pub vrfy: VrfyMode,
    /// How EXPN is answered.
    pub expn: ExpnMode,
    /// Unknown recipients per session before slowing down, then `421`; default 5.
    pub max_unknown_recipients: u32,
    /// Received headers above which a message is taken for a loop (`554 5.4.6`); default 50.
    pub max_received_headers: u32,
}

/// `smtp.vrfy`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum VrfyMode {
    /// `"ambiguous"`: `252` for everything (default).
    Ambiguous,
    /// `"trusted"`: real answers for `mynetworks` and authenticated clients, `252` for others.
    Trusted,
    /// `"off"`: `502` for everything.
    Off,
}

/// `smtp.expn`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ExpnMode {
    /// `"off"`: `502` (default).
    Off,
    /// `"trusted"`: expanded for `mynetworks` and authenticated clients, `502` for others.
    Trusted,
}

/// `[metrics]`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct MetricsConfig {
    /// Where Prometheus `/metrics` is served; off when `None`.
    pub address: Option<SocketAddr>,
}

/// A DKIM signing algorithm.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DkimAlgorithm {
    /// ed25519-sha256 (RFC 8463).
    Ed25519,
    /// rsa-sha256 (RFC 6376), 2048-bit keys.
    Rsa,
}

impl DkimAlgorithm {
    /// The name used in the configuration and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            DkimAlgorithm::Ed25519 => "ed25519",
            DkimAlgorithm::Rsa => "rsa",
        }
    }
}

/// One `[[dkim]]`: mail whose `From:` is in `domain` is signed with this key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DkimKeyConfig {
    /// The signing domain (`d=`), lower-cased, without a trailing dot.
    pub domain: String,
    /// The selector (`s=`): the key is published at `selector._domainkey.domain`.
    pub selector: String,
    /// The key's algorithm; default ed25519.
    pub algorithm: DkimAlgorithm,
    /// The PEM file of the private key (PKCS#8, or PKCS#1 for RSA).
    pub private_key: PathBuf,
}

/// What to do with one inbound check's result.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckMode {
    /// Not checked.
    Off,
    /// Checked; the result goes into `Authentication-Results:`.
    Mark,
    /// Checked and acted on: SPF `fail` refused at RCPT (`spf = "reject"`), DMARC `p=reject`
    /// failures refused at the end of DATA (`dmarc = "enforce"`).
    Enforce,
}

/// `[verify]`: the inbound checks on smtp listeners for mail from outside (neither
/// authenticated nor from `mynetworks`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VerifyConfig {
    /// SPF on MAIL FROM and HELO: default mark.
    pub spf: CheckMode,
    /// Every DKIM signature: default mark.
    pub dkim: CheckMode,
    /// DMARC alignment and policy: default enforce.
    pub dmarc: CheckMode,
    /// ARC chain verification: default mark.
    pub arc: CheckMode,
}

impl Default for VerifyConfig {
    fn default() -> Self {
        VerifyConfig {
            spf: CheckMode::Mark,
            dkim: CheckMode::Mark,
            dmarc: CheckMode::Enforce,
            arc: CheckMode::Mark,
        }
    }
}

impl VerifyConfig {
    /// Every check off.
    pub fn off() -> Self {
        VerifyConfig {
            spf: CheckMode::Off,
            dkim: CheckMode::Off,
            dmarc: CheckMode::Off,
            arc: CheckMode::Off,
        }
    }

    /// True when at least one check runs.
    pub fn any(&self) -> bool {
        *self != VerifyConfig::off()
    }
}

/// `[srs]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SrsConfig {
    /// SRS addresses are `SRS0=…@domain`; bounces to them are accepted and sent back.
    pub domain: String,
    /// One secret per line, the first signs; default `data_dir/srs.secret`, generated at the
    /// first start.
    pub secret_file: PathBuf,
}

/// `[control]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ControlConfig {
    /// The Unix socket of the control interface; default `data_dir/control.sock`.
    pub socket: PathBuf,
    /// The Unix socket of local submission (`estafeta sendmail`), open to every local user
    /// (mode 0666; the user is taken from the peer's credentials); default
    /// `data_dir/submit.sock`.
    pub submit_socket: PathBuf,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open(net: &str) -> bool {
        is_open_relay_range(&net.parse().unwrap())
    }

    #[test]
    fn open_relay_ranges() {
        for net in [
            "0.0.0.0/0",
            "0.0.0.0/1",
            "128.0.0.0/7",
            "::/0",
            "2000::/3",
            "::/8",
        ] {
            assert!(open(net), "{net}");
        }
        for net in [
            "127.0.0.0/8",
            "10.0.0.0/8",
            "192.168.0.0/16",
            "11.0.0.0/8",
            "203.0.113.0/24",
            "::1/128",
            "fc00::/7",
            "fd00::/8",
            "fe80::/10",
            "2001:db8::/32",
        ] {
            assert!(!open(net), "{net}");
        }
    }
}

#[cfg(test)]
mod next_hop_tests {
    use super::NextHop;

    #[test]
    fn next_hops() {
        let h = |s: &str| NextHop::parse(s).map(|h| (h.host, h.port));
        assert_eq!(h("[192.0.2.7]:25"), Some(("192.0.2.7".into(), 25)));
        assert_eq!(
            h("[IPv6:2001:db8::7]:2525"),
            Some(("2001:db8::7".into(), 2525))
        );
        assert_eq!(
            h("smtp.provider.example:587"),
            Some(("smtp.provider.example".into(), 587))
        );
        assert_eq!(h("mx.example"), Some(("mx.example".into(), 25)));
        assert_eq!(h("[192.0.2.7]"), Some(("192.0.2.7".into(), 25)));
        for bad in [
            "a:b:c",
            "[nope]:25",
            "",
            "host:",
            "host:99999",
            "two words:25",
            "[192.0.2.7]x",
        ] {
            assert_eq!(h(bad), None, "{bad}");
        }
        assert_eq!(
            NextHop::parse("[2001:db8::7]:26").unwrap().to_string(),
            "[2001:db8::7]:26"
        );
    }
}
