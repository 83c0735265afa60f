//! From the file as written ([`RawConfig`]) to the validated [`Config`], collecting every error.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use toml::Spanned;

use crate::duration::{duration_from_integer, parse_duration};
use crate::error::Reporter;
use crate::raw::{DurationValue, OneOrMany, RawConfig, RawDomain, RawListener, StrOrInt};
use crate::size::{parse_size, size_from_integer};
use crate::types::*;
use crate::value::{ValueError, check_domain, parse_enum, parse_ip_net, parse_socket_addr};
use crate::{default, system_hostname};

const LOG_LEVELS: &[(&str, LogLevel)] = &[
    ("error", LogLevel::Error),
    ("warn", LogLevel::Warn),
    ("info", LogLevel::Info),
    ("debug", LogLevel::Debug),
    ("trace", LogLevel::Trace),
];
const LOG_FORMATS: &[(&str, LogFormat)] = &[
    ("text", LogFormat::Text),
    ("json", LogFormat::Json),
    ("journald", LogFormat::Journald),
];
const LISTENER_KINDS: &[(&str, ListenerKind)] = &[
    ("smtp", ListenerKind::Smtp),
    ("submission", ListenerKind::Submission),
    ("submissions", ListenerKind::Submissions),
];
const IP_VERSION: &[(&str, IpVersion)] = &[
    ("any", IpVersion::Any),
    ("ipv4", IpVersion::Ipv4),
    ("ipv6", IpVersion::Ipv6),
];

const SMARTHOST_TLS: &[(&str, SmarthostTls)] = &[
    ("none", SmarthostTls::None),
    ("opportunistic", SmarthostTls::Opportunistic),
    ("required", SmarthostTls::Required),
    ("verify", SmarthostTls::Verify),
];
const VRFY_MODES: &[(&str, VrfyMode)] = &[
    ("ambiguous", VrfyMode::Ambiguous),
    ("trusted", VrfyMode::Trusted),
    ("off", VrfyMode::Off),
];
const DKIM_ALGORITHMS: &[(&str, DkimAlgorithm)] = &[
    ("ed25519", DkimAlgorithm::Ed25519),
    ("rsa", DkimAlgorithm::Rsa),
];
const MARK_MODES: &[(&str, CheckMode)] = &[("off", CheckMode::Off), ("mark", CheckMode::Mark)];
const SPF_MODES: &[(&str, CheckMode)] = &[
    ("off", CheckMode::Off),
    ("mark", CheckMode::Mark),
    ("reject", CheckMode::Enforce),
];
const DMARC_MODES: &[(&str, CheckMode)] = &[
    ("off", CheckMode::Off),
    ("mark", CheckMode::Mark),
    ("enforce", CheckMode::Enforce),
];
const EXPN_MODES: &[(&str, ExpnMode)] = &[("off", ExpnMode::Off), ("trusted", ExpnMode::Trusted)];

/// The smallest `limits.max_message_size` accepted.
const MIN_MESSAGE_SIZE: u64 = 1024;

/// Checks `raw` and fills in defaults. Errors go to `r`; the returned value is only meaningful
/// when `r` has none.
pub(crate) fn validate(raw: RawConfig, source: &Path, r: &mut Reporter<'_>) -> Config {
    let mut v = Validator { r };
    let hostname = match &raw.hostname {
        Some(h) => v.hostname(h),
        None => system_hostname(),
    };
    let data_dir = v
        .path(raw.data_dir.as_ref(), "data_dir", "\"/var/lib/estafeta\"")
        .unwrap_or_else(default::data_dir);

    let log = LogConfig {
        level: v.enumerated(raw.log.level.as_ref(), LOG_LEVELS, LogLevel::Info),
        format: raw
            .log
            .format
            .as_ref()
            .map(|f| v.enumerated(Some(f), LOG_FORMATS, LogFormat::Text)),
    };

    let listeners = match &raw.listener {
        None => default::production_listeners(),
        Some(list) => v.listeners(list),
    };

    let tls = v.tls(&raw);

    let auth = AuthConfig {
        users_file: v
            .path(
                raw.auth.users_file.as_ref(),
                "users_file",
                "\"/etc/estafeta/users\"",
            )
            .unwrap_or_else(|| data_dir.join("users")),
        max_failures: raw.auth.max_failures.unwrap_or(3),
        authenticated_header: raw.auth.authenticated_header.unwrap_or(false),
    };

    let relay = v.relay(&raw);

    let dns = DnsConfig {
        nameservers: raw
            .dns
            .nameservers
            .iter()
            .flatten()
            // A bare address means port 53, as in resolv.conf.
            .filter_map(|ns| match ns.get_ref().trim().parse::<std::net::IpAddr>() {
                Ok(ip) => Some(SocketAddr::new(ip, 53)),
                Err(_) => v.socket_addr(ns, 53),
            })
            .collect(),
        dnssec: false,
    };
    let dns = match &raw.dns.dnssec {
        Some(d) if *d.get_ref() && dns.nameservers.is_empty() => {
            v.r.at(
                d.span(),
                "dnssec = true trusts the AD bit of the nameservers named here, and none is".to_owned(),
                Some("add nameservers = [\"127.0.0.1\"] for a validating resolver on this host (unbound), or remove dnssec".to_owned()),
            );
            dns
        }
        Some(d) => DnsConfig {
            dnssec: *d.get_ref(),
            ..dns
        },
        None => dns,
    };

    let pipes = v.pipes(&raw);
    let domains = v.domains(&raw.domain, &pipes);
    let milters = v.milters(&raw);

    let delivery = DeliveryConfig {
        maildir: match &raw.delivery.maildir {
            Some(template) => v.maildir_template(template),
            None => default::maildir_template(&data_dir),
        },
        subaddress_separator: match &raw.delivery.subaddress_separator {
            None => Some("+".to_owned()),
            Some(sep) if sep.get_ref().is_empty() => None,
            Some(sep) => {
                if sep.get_ref().contains(['@', ' ', '\t']) {
                    v.r.at(
                        sep.span(),
                        format!("invalid separator {:?}", sep.get_ref()),
                        Some("use a character that is valid in a local part, e.g. \"+\" or \"-\", or \"\" for none".to_owned()),
                    );
                }
                Some(sep.get_ref().clone())
            }
        },
    };

    let queue = v.queue(&raw);
    let limits = v.limits(&raw);
    let smtp = v.smtp(&raw);

    let metrics = MetricsConfig {
        address: raw
            .metrics
            .address
            .as_ref()
            .and_then(|a| v.socket_addr(a, 9425)),
    };
    let control = ControlConfig {
        socket: v
            .path(
                raw.control.socket.as_ref(),
                "socket",
                "\"/run/estafeta/control.sock\"",
            )
            .unwrap_or_else(|| data_dir.join("control.sock")),
        submit_socket: v
            .path(
                raw.control.submit_socket.as_ref(),
                "submit_socket",
                "\"/run/estafeta/submit.sock\"",
            )
            .unwrap_or_else(|| data_dir.join("submit.sock")),
    };
    let dkim = v.dkim(&raw);
    let defaults = VerifyConfig::default();
    let verify = VerifyConfig {
        spf: v.enumerated(raw.verify.spf.as_ref(), SPF_MODES, defaults.spf),
        dkim: v.enumerated(raw.verify.dkim.as_ref(), MARK_MODES, defaults.dkim),
        dmarc: v.enumerated(raw.verify.dmarc.as_ref(), DMARC_MODES, defaults.dmarc),
        arc: v.enumerated(raw.verify.arc.as_ref(), MARK_MODES, defaults.arc),
    };
    let srs = raw.srs.as_ref().map(|srs| {
        let inner = srs.get_ref();
        SrsConfig {
            domain: v.domain_name(&inner.domain, "SRS domain"),
            secret_file: v
                .path(
                    inner.secret_file.as_ref(),
                    "secret_file",
                    "\"/etc/estafeta/srs.secret\"",
                )
                .unwrap_or_else(|| data_dir.join("srs.secret")),
        }
    });
    let antispam = AntispamConfig {
        dnsbl: raw
            .antispam
            .dnsbl
            .iter()
            .flatten()
            .map(|z| v.dnsbl_zone(z))
            .collect(),
        dnsbl_threshold: match &raw.antispam.dnsbl_threshold {
            None => 1,
            Some(t) => match i32::try_from(*t.get_ref()) {
                Ok(n) if n >= 1 => n,
                _ => {
                    v.r.at(
                        t.span(),
                        format!("dnsbl_threshold = {} is out of range", t.get_ref()),
                        Some(
                            "write a score of 1 or more (the sum of the weights of the lists \
                             that must list a client to refuse it)"
                                .to_owned(),
                        ),
                    );
                    1
                }
            },
        },
    };
    let user = raw.user.as_ref().and_then(|u| v.account_name(u, "user"));
    let group = raw.group.as_ref().and_then(|g| v.account_name(g, "group"));
    if let (Some(g), None) = (&raw.group, &raw.user) {
        v.r.at(
            g.span(),
            "group is set without user".to_owned(),
            Some(
                "set `user` too (the group alone is never switched to), or remove `group`"
                    .to_owned(),
            ),
        );
    }
    if let (Some(u), Some(true)) = (&raw.user, raw.run_as_root) {
        v.r.at(
            u.span(),
            "user is set together with run_as_root = true".to_owned(),
            Some("keep one: `user` to drop privileges after binding, or `run_as_root = true` to stay root".to_owned()),
        );
    }

    Config {
        source: Some(source.to_path_buf()),
        hostname,
        data_dir,
        user,
        group,
        run_as_root: raw.run_as_root.unwrap_or(false),
        log,
        listeners,
        tls,
        auth,
        relay,
        dns,
        domains,
        delivery,
        queue,
        limits,
        smtp,
        metrics,
        control,
        dkim,
        verify,
        srs,
        antispam,
        milters,
        pipes,
    }
}

const MILTER_DEFAULTS: &[(&str, MilterDefault)] = &[
    ("accept", MilterDefault::Accept),
    ("tempfail", MilterDefault::Tempfail),
    ("reject", MilterDefault::Reject),
];

/// Checks a socket written as `inet:HOST:PORT` or `unix:/PATH` (milters, LMTP servers).
pub(crate) fn check_socket_spec(text: &str) -> Result<(), String> {
    if let Some(path) = text.strip_prefix("unix:") {
        if !path.starts_with('/') {
            return Err(format!("the socket path {path:?} is not absolute"));
        }
        return Ok(());
    }
    let Some(rest) = text.strip_prefix("inet:") else {
        return Err("it starts with neither \"inet:\" nor \"unix:\"".into());
    };
    let (host, port) = if let Some(v6) = rest.strip_prefix('[') {
        let (h, p) = v6
            .split_once("]:")
            .ok_or("an IPv6 address is written [ADDRESS]:PORT")?;
        if h.parse::<std::net::Ipv6Addr>().is_err() {
            return Err(format!(
                "{h:?} in brackets is not an IPv6 address (write an IPv4 address or a host name without brackets)"
            ));
        }
        (h, p)
    } else {
        let (h, p) = rest.rsplit_once(':').ok_or("the port is missing")?;
        if h.contains(':') {
            return Err("an IPv6 address is written in brackets: inet:[::1]:PORT".into());
        }
        (h, p)
    };
    if host.is_empty() {
        return Err("the host is missing".into());
    }
    if host.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!("the host {host:?} holds spaces"));
    }
    match port.parse::<u16>() {
        Ok(p) if p > 0 && port.bytes().all(|b| b.is_ascii_digit()) => Ok(()),
        _ => Err(format!("{port:?} is not a port number")),
    }
}

struct Validator<'r, 'a> {
    r: &'r mut Reporter<'a>,
}

impl Validator<'_, '_> {
    fn value_error(&mut self, span: std::ops::Range<usize>, e: ValueError) {
        self.r.at(span, e.message, Some(e.help));
    }

    fn hostname(&mut self, h: &Spanned<String>) -> String {
        let name = h.get_ref().strip_suffix('.').unwrap_or(h.get_ref());
        if let Err(why) = check_domain(name) {
            self.r.at(
                h.span(),
                format!("invalid hostname {:?}: it {why}", h.get_ref()),
                Some(
                    "use this host's fully qualified domain name, e.g. \"mail.example.org\""
                        .to_owned(),
                ),
            );
        }
        name.to_owned()
    }

    /// A user or group name: what `getpwnam`/`getgrnam` look up (whether it exists is
    /// checked by `serve` and `check-config`, on the host where it runs).
    fn account_name(&mut self, value: &Spanned<String>, what: &str) -> Option<String> {
        let name = value.get_ref();
        let valid = !name.is_empty()
            && name.len() <= 32
            && !name.starts_with('-')
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'));
        if !valid {
            self.r.at(
                value.span(),
                format!("invalid {what} name {name:?}"),
                Some(format!(
                    "write the name of a system {what}, e.g. \"estafeta\" (letters, digits, '_', '-', '.')"
                )),
            );
            return None;
        }
        Some(name.clone())
    }

    /// A domain name, lower-cased, without a trailing dot.
    fn domain_name(&mut self, value: &Spanned<String>, what: &str) -> String {
        let name = value
            .get_ref()
            .trim()
            .trim_end_matches('.')
            .to_ascii_lowercase();
        if let Err(why) = check_domain(&name) {
            self.r.at(
                value.span(),
                format!("invalid {what} {:?}: it {why}", value.get_ref()),
                Some("write a domain name, e.g. \"example.org\"".to_owned()),
            );
        }
        name
    }

    /// One `[antispam] dnsbl` entry: `zone[=filter][*weight]`, as postscreen writes them.
    fn dnsbl_zone(&mut self, value: &Spanned<String>) -> DnsblZone {
        const HELP: &str = "write `zone`, `zone*weight` or `zone=filter*weight` as postscreen does, \
                            e.g. \"zen.spamhaus.org=127.0.0.[2..11]*3\" (weight: a whole number, \
                            negative for an allowlist; filter: four octets, each a number or \
                            [a..b] or [a;b;c])";
        let text = value.get_ref().trim();
        let (rest, weight) = match text.rsplit_once('*') {
            None => (text, Some(1)),
            Some((rest, w)) => (rest, w.trim().parse::<i32>().ok()),
        };
        let (zone, filter) = match rest.split_once('=') {
            None => (rest, None),
            Some((zone, f)) => (zone, Some(parse_dnsbl_filter(f.trim()))),
        };
        let bad = |v: &mut Self, what: &str| {
            v.r.at(
                value.span(),
                format!("invalid DNSBL entry {text:?}: {what}"),
                Some(HELP.to_owned()),
            );
        };
        if weight.is_none() {
            bad(self, "the weight after `*` is not a whole number");
        }
        if matches!(filter, Some(None)) {
            bad(self, "the filter after `=` is not four octets");
        }
        let name = zone.trim().trim_end_matches('.').to_ascii_lowercase();
        if let Err(why) = check_domain(&name) {
            bad(self, &format!("the zone {why}"));
        }
        DnsblZone {
            zone: name,
            filter: filter.flatten(),
            weight: weight.unwrap_or(1),
        }
    }

    /// `[[dkim]]`: each key with its domain, selector, algorithm and file; one selector per
    /// domain at most once.
    fn dkim(&mut self, raw: &RawConfig) -> Vec<DkimKeyConfig> {
        let mut seen: HashSet<(String, String)> = HashSet::new();
        let mut keys = Vec::new();
        for k in &raw.dkim {
            let domain = self.domain_name(&k.domain, "DKIM domain");
            let selector = k.selector.get_ref().trim().to_ascii_lowercase();
            let valid_selector = !selector.is_empty()
                && selector.split('.').all(|label| {
                    !label.is_empty()
                        && label.len() <= 63
                        && !label.starts_with('-')
                        && !label.ends_with('-')
                        && label
                            .chars()
                            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
                });
            if !valid_selector {
                self.r.at(
                    k.selector.span(),
                    format!("invalid DKIM selector {:?}", k.selector.get_ref()),
                    Some("use letters, digits and '-', e.g. \"s2026\"".to_owned()),
                );
            } else if !seen.insert((domain.clone(), selector.clone())) {
                self.r.at(
                    k.selector.span(),
                    format!("selector {selector:?} of {domain} is configured twice"),
                    Some("give each [[dkim]] of a domain its own selector".to_owned()),
                );
            }
            let algorithm = self.enumerated(
                k.algorithm.as_ref(),
                DKIM_ALGORITHMS,
                DkimAlgorithm::Ed25519,
            );
            if k.private_key.get_ref().trim().is_empty() {
                self.r.at(
                    k.private_key.span(),
                    "private_key is empty".to_owned(),
                    Some("write the path of the key file, e.g. \"/etc/estafeta/dkim/example.org.s2026.key\" (`estafeta dkim generate` writes one)".to_owned()),
                );
            }
            let private_key = PathBuf::from(k.private_key.get_ref());
            keys.push(DkimKeyConfig {
                domain,
                selector,
                algorithm,
                private_key,
            });
        }
        keys
    }

    fn path(
        &mut self,
        value: Option<&Spanned<String>>,
        what: &str,
        example: &str,
    ) -> Option<PathBuf> {
        let value = value?;
        if value.get_ref().trim().is_empty() {
            self.r.at(
                value.span(),
                format!("{what} is empty"),
                Some(format!(
                    "write a path, e.g. {example}, or remove the key to use the default"
                )),
            );
            return None;
        }
        Some(PathBuf::from(value.get_ref()))
    }

    fn enumerated<T: Copy>(
        &mut self,
        value: Option<&Spanned<String>>,
        variants: &[(&str, T)],
        default: T,
    ) -> T {
        let Some(value) = value else {
            return default;
        };
        match parse_enum(value.get_ref(), variants) {
            Ok(v) => v,
            Err(e) => {
                self.value_error(value.span(), e);
                default
            }
        }
    }

    fn socket_addr(&mut self, value: &Spanned<String>, example_port: u16) -> Option<SocketAddr> {
        match parse_socket_addr(value.get_ref(), example_port) {
            Ok(addr) => Some(addr),
            Err(e) => {
                self.value_error(value.span(), e);
                None
            }
        }
    }

    fn duration(&mut self, value: &Spanned<DurationValue>) -> Option<Duration> {
        let result = match &value.get_ref().0 {
            StrOrInt::Str(s) => parse_duration(s),
            StrOrInt::Int(i) => Err(duration_from_integer(*i)),
        };
        match result {
            Ok(d) => Some(d),
            Err(e) => {
                self.value_error(value.span(), e);
                None
            }
        }
    }

    /// A duration of at least `min`.
    fn duration_min(
        &mut self,
        value: Option<&Spanned<DurationValue>>,
        min: Duration,
        why: &str,
        default: Duration,
    ) -> Duration {
        let Some(value) = value else {
            return default;
        };
        match self.duration(value) {
            Some(d) if d < min => {
                self.r.at(
                    value.span(),
                    format!("{} is too short", show(value)),
                    Some(why.to_owned()),
                );
                default
            }
            Some(d) => d,
            None => default,
        }
    }

    fn at_least_one(
        &mut self,
        value: Option<&Spanned<usize>>,
        default: usize,
        help: &str,
    ) -> usize {
        match value {
            None => default,
            Some(n) if *n.get_ref() == 0 => {
                self.r
                    .at(n.span(), "must be at least 1", Some(help.to_owned()));
                default
            }
            Some(n) => *n.get_ref(),
        }
    }

    fn listeners(&mut self, list: &[RawListener]) -> Vec<Listener> {
        let mut seen: HashSet<SocketAddr> = HashSet::new();
        let mut listeners = Vec::new();
        for raw in list {
            let kind = self.enumerated(Some(&raw.kind), LISTENER_KINDS, ListenerKind::Smtp);
            let port = match kind {
                ListenerKind::Smtp => 25,
                ListenerKind::Submission => 587,
                ListenerKind::Submissions => 465,
            };
            let entries: Vec<Spanned<String>> = match raw.address.get_ref() {
                OneOrMany::One(s) => vec![Spanned::new(raw.address.span(), s.clone())],
                OneOrMany::Many(list) => list.clone(),
            };
            if entries.is_empty() {
                self.r.at(
                    raw.address.span(),
                    "the address list is empty",
                    Some(format!(
                        "add at least one address, e.g. address = [\"[::]:{port}\", \"0.0.0.0:{port}\"]"
                    )),
                );
            }
            let mut addresses = Vec::new();
            for entry in &entries {
                let Some(addr) = self.socket_addr(entry, port) else {
                    continue;
                };
                if !seen.insert(addr) {
                    self.r.at(
                        entry.span(),
                        format!("address \"{addr}\" is used twice"),
                        Some("each address may appear in only one listener, once".to_owned()),
                    );
                    continue;
                }
                addresses.push(addr);
            }
            let sender_check = raw.sender_check.unwrap_or(kind != ListenerKind::Smtp);
            listeners.push(Listener {
                kind,
                addresses,
                sender_check,
            });
        }
        listeners
    }

    fn tls(&mut self, raw: &RawConfig) -> TlsConfig {
        let certificate = self.path(
            raw.tls.certificate.as_ref(),
            "certificate",
            "\"/etc/estafeta/tls/fullchain.pem\"",
        );
        let private_key = self.path(
            raw.tls.private_key.as_ref(),
            "private_key",
            "\"/etc/estafeta/tls/privkey.pem\"",
        );
        let help = "set both tls.certificate and tls.private_key, or neither (then a self-signed certificate is generated into data_dir)";
        match (&raw.tls.certificate, &raw.tls.private_key) {
            (Some(cert), None) => self.r.at(
                cert.span(),
                "certificate is set but private_key is not",
                Some(help.to_owned()),
            ),
            (None, Some(key)) => self.r.at(
                key.span(),
                "private_key is set but certificate is not",
                Some(help.to_owned()),
            ),
            _ => {}
        }
        TlsConfig {
            certificate,
            private_key,
        }
    }

    fn relay(&mut self, raw: &RawConfig) -> RelayConfig {
        let allow_open_relay = raw.relay.allow_open_relay.unwrap_or(false);
        let mynetworks = match &raw.relay.mynetworks {
            None => loopback_networks(),
            Some(list) => {
                let mut nets = Vec::new();
                for entry in list {
                    match parse_ip_net(entry.get_ref()) {
                        Ok(net) => {
                            if !allow_open_relay && is_open_relay_range(&net) {
                                self.r.at(
                                    entry.span(),
                                    format!("{:?} is an open relay: any host on the internet may relay mail through this server", entry.get_ref()),
                                    Some("list only your own networks, or set allow_open_relay = true if you really mean it".to_owned()),
                                );
                            }
                            nets.push(net);
                        }
                        Err(e) => self.value_error(entry.span(), e),
                    }
                }
                nets
            }
        };
        let smarthost = raw.relay.smarthost.as_ref().and_then(|s| {
            let text = s.get_ref();
            let hop = NextHop::parse(text);
            if hop.is_none() {
                self.r.at(
                    s.span(),
                    format!("invalid smarthost {text:?}"),
                    Some("use host:port, e.g. \"smtp.provider.example:587\", or remove the key to deliver directly".to_owned()),
                );
            }
            hop
        });
        let ip_version = self.enumerated(raw.relay.ip_version.as_ref(), IP_VERSION, IpVersion::Any);
        let source_address = raw.relay.source_address.as_ref().and_then(|s| {
            match s.get_ref().trim().parse::<std::net::IpAddr>() {
                Ok(ip) => Some(ip),
                Err(_) => {
                    self.r.at(
                        s.span(),
                        format!("invalid source_address {:?}: not an IP address", s.get_ref()),
                        Some("use one of this host's addresses, e.g. \"192.0.2.25\" or \"2001:db8::25\", or remove the key".to_owned()),
                    );
                    None
                }
            }
        });
        let helo_name = raw.relay.helo_name.as_ref().and_then(|s| {
            let name = s.get_ref().trim();
            if let Err(why) = check_domain(&normalize_domain(name)) {
                self.r.at(
                    s.span(),
                    format!("invalid helo_name {name:?}: it {why}"),
                    Some("use this host's public name, e.g. \"mx.example.org\"".to_owned()),
                );
                None
            } else {
                Some(name.to_owned())
            }
        });
        let smarthost_tls = self.enumerated(
            raw.relay.smarthost_tls.as_ref(),
            SMARTHOST_TLS,
            SmarthostTls::Required,
        );
        let smarthost_credentials = self.path(
            raw.relay.smarthost_credentials.as_ref(),
            "smarthost_credentials",
            "\"/etc/estafeta/smarthost.secret\"",
        );
        let mut routes = BTreeMap::new();
        let mut route_keys: HashMap<String, ()> = HashMap::new();
        for (domain, hop) in raw.relay.routes.iter().flatten() {
            let name = normalize_domain(domain.get_ref());
            if let Err(why) = check_domain(&name) {
                self.r.at(
                    domain.span(),
                    format!("invalid domain {:?}: it {why}", domain.get_ref()),
                    Some(
                        "route keys are domain names, e.g. \"example.net\" = \"[192.0.2.7]:25\""
                            .to_owned(),
                    ),
                );
                continue;
            }
            if route_keys.insert(name.clone(), ()).is_some() {
                self.r.at(
                    domain.span(),
                    format!("domain {name:?} has two routes"),
                    Some(
                        "keep one of them (domain names are compared case-insensitively)"
                            .to_owned(),
                    ),
                );
                continue;
            }
            let Some(next) = NextHop::parse(hop.get_ref()) else {
                self.r.at(
                    hop.span(),
                    format!("invalid next hop {:?}", hop.get_ref()),
                    Some("use host, host:port, [ip] or [ip]:port, e.g. \"[192.0.2.7]:25\" or \"mx.example.net:2525\"".to_owned()),
                );
                continue;
            };
            routes.insert(name, next);
        }
        let mut tls_policy = BTreeMap::new();
        for (domain, level) in raw.relay.tls_policy.iter().flatten() {
            let name = normalize_domain(domain.get_ref());
            if let Err(why) = check_domain(&name) {
                self.r.at(
                    domain.span(),
                    format!("invalid domain {:?}: it {why}", domain.get_ref()),
                    Some(
                        "tls_policy keys are domain names, e.g. \"example.net\" = \"verify\""
                            .to_owned(),
                    ),
                );
                continue;
            }
            let v = if level.get_ref().trim().eq_ignore_ascii_case("dane") {
                if !raw.dns.dnssec.as_ref().is_some_and(|d| *d.get_ref()) {
                    self.r.at(
                        level.span(),
                        format!("TLS policy \"dane\" for {name:?} needs DNSSEC-validated answers"),
                        Some("set [dns] dnssec = true with nameservers that validate (e.g. a local unbound), or use \"verify\"".to_owned()),
                    );
                    continue;
                }
                SmarthostTls::Dane
            } else {
                self.enumerated(Some(level), SMARTHOST_TLS, SmarthostTls::Opportunistic)
            };
            if tls_policy.insert(name.clone(), v).is_some() {
                self.r.at(
                    domain.span(),
                    format!("domain {name:?} has two TLS policies"),
                    Some(
                        "keep one of them (domain names are compared case-insensitively)"
                            .to_owned(),
                    ),
                );
            }
        }
        let ca_file = self.path(
            raw.relay.ca_file.as_ref(),
            "ca_file",
            "\"/etc/ssl/certs/ca-certificates.crt\"",
        );
        RelayConfig {
            mynetworks,
            allow_open_relay,
            smarthost,
            smarthost_tls,
            smarthost_credentials,
            routes,
            tls_policy,
            mta_sts: raw.relay.mta_sts.unwrap_or(true),
            ca_file,
            tls_reports: raw.relay.tls_reports.unwrap_or(false),
            ip_version,
            source_address,
            helo_name,
        }
    }

    /// `[[milter]]`, in order.
    fn milters(&mut self, raw: &RawConfig) -> Vec<MilterConfig> {
        let mut out = Vec::new();
        for m in &raw.milter {
            let inner = m.get_ref();
            let address = inner.address.get_ref().trim().to_owned();
            if let Err(why) = check_socket_spec(&address) {
                self.r.at(
                    inner.address.span(),
                    format!("invalid milter address {address:?}: {why}"),
                    Some(
                        "write \"inet:127.0.0.1:11332\" (host and port) or \"unix:/run/rspamd/milter.sock\""
                            .to_owned(),
                    ),
                );
            }
            let default_action = self.enumerated(
                inner.default_action.as_ref(),
                MILTER_DEFAULTS,
                MilterDefault::Tempfail,
            );
            let timeout = self.duration_min(
                inner.timeout.as_ref(),
                Duration::from_secs(1),
                "a milter needs at least 1s to answer",
                Duration::from_secs(30),
            );
            let listeners = inner.listeners.as_ref().map(|list| {
                list.iter()
                    .map(|k| self.enumerated(Some(k), LISTENER_KINDS, ListenerKind::Smtp))
                    .collect()
            });
            out.push(MilterConfig {
                address,
                default_action,
                timeout,
                listeners,
            });
        }
        out
    }

    /// `[pipe.NAME]`.
    fn pipes(&mut self, raw: &RawConfig) -> BTreeMap<String, PipeConfig> {
        let mut out = BTreeMap::new();
        for (name, p) in &raw.pipe {
            let inner = p.get_ref();
            let n = name.get_ref().trim();
            if n.is_empty()
                || !n
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
            {
                self.r.at(
                    name.span(),
                    format!("invalid pipe name {n:?}"),
                    Some(
                        "name it with letters, digits, '_', '-' or '.', e.g. [pipe.mailman]"
                            .to_owned(),
                    ),
                );
            }
            let command: Vec<String> = inner
                .command
                .get_ref()
                .iter()
                .map(|a| a.get_ref().clone())
                .collect();
            if command.first().is_none_or(|c| !c.starts_with('/')) {
                self.r.at(
                    inner.command.span(),
                    "the command must start with the program's absolute path".to_owned(),
                    Some("write command = [\"/usr/bin/program\", \"{recipient}\"] (no shell is involved: each element is one argument)".to_owned()),
                );
            }
            for a in inner.command.get_ref() {
                let mut rest = a.get_ref().as_str();
                while let Some(i) = rest.find('{') {
                    let Some(j) = rest[i..].find('}') else { break };
                    let var = &rest[i + 1..i + j];
                    if !matches!(
                        var,
                        "sender"
                            | "recipient"
                            | "user"
                            | "extension"
                            | "domain"
                            | "original_recipient"
                    ) {
                        self.r.at(
                            a.span(),
                            format!("unknown variable {{{var}}} in the pipe command"),
                            Some("use {sender}, {recipient}, {user}, {extension}, {domain} or {original_recipient}".to_owned()),
                        );
                    }
                    rest = &rest[i + j + 1..];
                }
            }
            let user = inner
                .user
                .as_ref()
                .and_then(|u| self.account_name(u, "user"));
            let timeout = self.duration_min(
                inner.timeout.as_ref(),
                Duration::from_secs(1),
                "a command needs at least 1s",
                Duration::from_secs(1000),
            );
            out.insert(
                n.to_owned(),
                PipeConfig {
                    command,
                    user,
                    timeout,
                },
            );
        }
        out
    }

    fn domains(&mut self, list: &[RawDomain], pipes: &BTreeMap<String, PipeConfig>) -> Vec<Domain> {
        let mut seen = HashSet::new();
        let mut domains = Vec::new();
        for raw in list {
            let name = normalize_domain(raw.name.get_ref());
            if let Err(why) = check_domain(&name) {
                self.r.at(
                    raw.name.span(),
                    format!("invalid domain name {:?}: it {why}", raw.name.get_ref()),
                    Some("use a domain name like \"example.org\"".to_owned()),
                );
            } else if !seen.insert(name.clone()) {
                self.r.at(
                    raw.name.span(),
                    format!("domain {name:?} is listed twice"),
                    Some("merge the two [[domain]] sections into one (names are compared case-insensitively)".to_owned()),
                );
            }
            let mailboxes = match &raw.mailboxes {
                None => Mailboxes::Users,
                Some(m) => self.mailboxes(m),
            };
            let catch_all = raw.catch_all.as_ref().and_then(|c| {
                let target = c.get_ref().trim();
                match check_target(target) {
                    Ok(()) => Some(target.to_owned()),
                    Err(why) => {
                        self.r.at(
                            c.span(),
                            format!("invalid catch_all {:?}: {why}", c.get_ref()),
                            Some(
                                "use a local part of this domain, e.g. \"alice\", or an address"
                                    .to_owned(),
                            ),
                        );
                        None
                    }
                }
            });
            let aliases = self.aliases(raw);
            let delivery = match &raw.delivery {
                None => DomainDelivery::Maildir,
                Some(d) => self.domain_delivery(d, pipes),
            };
            domains.push(Domain {
                name,
                mailboxes,
                catch_all,
                aliases,
                delivery,
            });
        }
        domains
    }

    /// `delivery` of a `[[domain]]`.
    fn domain_delivery(
        &mut self,
        d: &Spanned<String>,
        pipes: &BTreeMap<String, PipeConfig>,
    ) -> DomainDelivery {
        let text = d.get_ref().trim();
        let help = "write \"maildir\", \"lmtp:unix:/run/dovecot/lmtp\", \"lmtp:inet:127.0.0.1:24\" or \"pipe:NAME\" with a [pipe.NAME] section";
        if text == "maildir" {
            return DomainDelivery::Maildir;
        }
        if let Some(addr) = text.strip_prefix("lmtp:") {
            if let Err(why) = check_socket_spec(addr) {
                self.r.at(
                    d.span(),
                    format!("invalid LMTP server {addr:?}: {why}"),
                    Some(help.to_owned()),
                );
            }
            return DomainDelivery::Lmtp(addr.to_owned());
        }
        if let Some(name) = text.strip_prefix("pipe:") {
            if !pipes.contains_key(name) {
                self.r.at(
                    d.span(),
                    format!("delivery {text:?} names no [pipe.{name}] section"),
                    Some(format!(
                        "add [pipe.{name}] with command = [\"/path/to/program\", \"{{recipient}}\"], or fix the name"
                    )),
                );
            }
            return DomainDelivery::Pipe(name.to_owned());
        }
        self.r.at(
            d.span(),
            format!("invalid delivery {text:?}"),
            Some(help.to_owned()),
        );
        DomainDelivery::Maildir
    }

    fn mailboxes(&mut self, m: &Spanned<OneOrMany>) -> Mailboxes {
        let help_any = "use mailboxes = \"*\" for every local part, or a list of local parts like [\"alice\", \"bob\"]";
        match m.get_ref() {
            OneOrMany::One(s) if s == "*" => Mailboxes::Any,
            OneOrMany::One(s) => {
                self.r.at(
                    m.span(),
                    format!("invalid mailboxes {s:?}"),
                    Some(help_any.to_owned()),
                );
                Mailboxes::Users
            }
            OneOrMany::Many(list) => {
                let mut out: Vec<String> = Vec::new();
                for entry in list {
                    let local = entry.get_ref().trim();
                    if local == "*" {
                        self.r.at(
                            entry.span(),
                            "\"*\" inside a list",
                            Some(
                                "write mailboxes = \"*\" (not a list) to accept every local part"
                                    .to_owned(),
                            ),
                        );
                    } else if local.is_empty() {
                        self.r.at(
                            entry.span(),
                            "empty mailbox name",
                            Some("remove the empty string from the list".to_owned()),
                        );
                    } else if let Some((user, _)) = local.split_once('@') {
                        self.r.at(
                            entry.span(),
                            format!("mailbox {local:?} contains \"@\""),
                            Some(format!("write only the local part: {user:?}; the domain is this [[domain]]'s name")),
                        );
                    } else {
                        let local = local.to_lowercase();
                        if !out.contains(&local) {
                            out.push(local);
                        }
                    }
                }
                Mailboxes::List(out)
            }
        }
    }

    fn aliases(&mut self, raw: &RawDomain) -> BTreeMap<String, Vec<String>> {
        let mut aliases = BTreeMap::new();
        for (key, value) in raw.aliases.iter().flatten() {
            let local = key.get_ref().trim().to_lowercase();
            if local.is_empty() || local.contains('@') {
                self.r.at(
                    key.span(),
                    format!("invalid alias {:?}", key.get_ref()),
                    Some(
                        "alias names are local parts of this domain, e.g. postmaster = \"alice\""
                            .to_owned(),
                    ),
                );
                continue;
            }
            if aliases.contains_key(&local) {
                self.r.at(
                    key.span(),
                    format!("alias {local:?} is defined twice"),
                    Some(
                        "keep one of them (alias names are compared case-insensitively)".to_owned(),
                    ),
                );
                continue;
            }
            let entries: Vec<Spanned<String>> = match value.get_ref() {
                OneOrMany::One(s) => vec![Spanned::new(value.span(), s.clone())],
                OneOrMany::Many(list) => list.clone(),
            };
            if entries.is_empty() {
                self.r.at(
                    value.span(),
                    format!("alias {local:?} has no targets"),
                    Some("list at least one local part or address, or remove the alias".to_owned()),
                );
                continue;
            }
            let mut targets = Vec::new();
            for entry in &entries {
                let target = entry.get_ref().trim();
                match check_target(target) {
                    Ok(()) => targets.push(target.to_owned()),
                    Err(why) => self.r.at(
                        entry.span(),
                        format!("invalid alias target {:?}: {why}", entry.get_ref()),
                        Some("use a local part of this domain, e.g. \"alice\", or an address like \"carol@elsewhere.example\"".to_owned()),
                    ),
                }
            }
            aliases.insert(local, targets);
        }
        aliases
    }

    fn maildir_template(&mut self, template: &Spanned<String>) -> String {
        let text = template.get_ref();
        let example = "e.g. \"/var/mail/{domain}/{user}/Maildir\"";
        let mut rest = text.as_str();
        while let Some(open) = rest.find('{') {
            let after = &rest[open..];
            let close = after.find('}').map_or(after.len(), |c| c + 1);
            let placeholder = &after[..close];
            if placeholder != "{domain}" && placeholder != "{user}" {
                self.r.at(
                    template.span(),
                    format!("unknown placeholder {placeholder:?} in maildir template"),
                    Some(format!(
                        "the placeholders are {{domain}} and {{user}}, {example}"
                    )),
                );
                break;
            }
            rest = &after[close..];
        }
        if !text.contains("{user}") {
            self.r.at(
                template.span(),
                format!("maildir template {text:?} does not contain {{user}}"),
                Some(format!(
                    "every mailbox needs its own Maildir: add {{user}}, {example}"
                )),
            );
        }
        text.clone()
    }

    fn queue(&mut self, raw: &RawConfig) -> QueueConfig {
        let q = &raw.queue;
        let retry = match &q.retry {
            None => default::retry_intervals(),
            Some(list) => {
                if list.get_ref().is_empty() {
                    self.r.at(
                        list.span(),
                        "the retry list is empty",
                        Some("list at least one interval, e.g. retry = [\"5m\", \"30m\", \"1h\"] (the last one repeats)".to_owned()),
                    );
                }
                let mut out = Vec::new();
                for entry in list.get_ref() {
                    match self.duration(entry) {
                        Some(Duration::ZERO) => self.r.at(
                            entry.span(),
                            format!("retry interval {} is zero", show(entry)),
                            Some("use an interval above zero, e.g. \"5m\"".to_owned()),
                        ),
                        Some(d) => out.push(d),
                        None => {}
                    }
                }
                if out.is_empty() {
                    default::retry_intervals()
                } else {
                    out
                }
            }
        };
        let max_lifetime = self.duration_min(
            q.max_lifetime.as_ref(),
            Duration::from_secs(1),
            "use a lifetime of at least a few hours; \"5d\" is usual",
            Duration::from_secs(5 * 86_400),
        );
        let delay_warning = match &q.delay_warning {
            None => Some(Duration::from_secs(4 * 3600)),
            Some(v) => self.duration(v).filter(|d| !d.is_zero()),
        };
        QueueConfig {
            retry,
            max_lifetime,
            delay_warning,
            max_deliveries: self.at_least_one(
                q.max_deliveries.as_ref(),
                64,
                "use at least 1 concurrent delivery; the default is 64",
            ),
            max_per_destination: self.at_least_one(
                q.max_per_destination.as_ref(),
                4,
                "use at least 1 delivery per destination; the default is 4",
            ),
            double_bounce_to: q.double_bounce_to.as_ref().and_then(|v| {
                let text = v.get_ref().trim();
                // The server reads it with the RCPT TO parser: what it would drop is refused
                // here, with the line.
                let ok = match text.rsplit_once('@') {
                    Some((local, domain)) => {
                        !local.is_empty()
                            && check_domain(&normalize_domain(domain)).is_ok()
                            && estafeta_proto::address::parse_forward_path(&format!("<{text}>"))
                                .is_ok()
                    }
                    None => false,
                };
                if ok {
                    Some(text.to_owned())
                } else {
                    self.r.at(
                        v.span(),
                        format!("invalid double_bounce_to {text:?}: not an address"),
                        Some("use a mailbox such as \"postmaster@example.org\", or remove the key to only log undeliverable notifications".to_owned()),
                    );
                    None
                }
            }),
        }
    }

    fn limits(&mut self, raw: &RawConfig) -> Limits {
        let l = &raw.limits;
        let max_message_size = match &l.max_message_size {
            None => default::MAX_MESSAGE_SIZE,
            Some(v) => {
                let result = match &v.get_ref().0 {
                    StrOrInt::Str(s) => parse_size(s),
                    StrOrInt::Int(i) => size_from_integer(*i),
                };
                match result {
                    Ok(size) if size < MIN_MESSAGE_SIZE => {
                        self.r.at(
                            v.span(),
                            format!("max_message_size of {size} bytes is too small"),
                            Some("use at least \"1KiB\"; \"10MB\" to \"50MB\" is usual".to_owned()),
                        );
                        default::MAX_MESSAGE_SIZE
                    }
                    Ok(size) => size,
                    Err(e) => {
                        self.value_error(v.span(), e);
                        default::MAX_MESSAGE_SIZE
                    }
                }
            }
        };
        Limits {
            max_message_size,
            // RFC 5321 §4.5.3.1.8: servers should accept at least 100 recipients.
            max_recipients: self.at_least_one(
                l.max_recipients.as_ref(),
                100,
                "use at least 1; RFC 5321 §4.5.3.1.8 recommends accepting 100",
            ),
            max_connections: self.at_least_one(
                l.max_connections.as_ref(),
                1000,
                "use at least 1; the default is 1000",
            ),
            max_connections_per_ip: self.at_least_one(
                l.max_connections_per_ip.as_ref(),
                20,
                "use at least 1; the default is 20",
            ),
            max_errors: l.max_errors.unwrap_or(10),
            // RFC 5321 §4.5.3.2: servers should wait at least 5 minutes for a command.
            command_timeout: self.duration_min(
                l.command_timeout.as_ref(),
                Duration::from_secs(1),
                "use at least \"1s\"; RFC 5321 §4.5.3.2 recommends \"5m\"",
                Duration::from_secs(300),
            ),
            data_timeout: self.duration_min(
                l.data_timeout.as_ref(),
                Duration::from_secs(1),
                "use at least \"1s\"; RFC 5321 §4.5.3.2 recommends \"10m\"",
                Duration::from_secs(600),
            ),
            greet_delay: match l.greet_delay.as_ref() {
                None => Duration::ZERO,
                Some(v) => match self.duration(v) {
                    Some(d) if d > Duration::from_secs(60) => {
                        self.r.at(
                            v.span(),
                            format!("greet_delay of {} is too long", show(v)),
                            Some("use at most \"60s\": clients give up after a few minutes; postscreen uses \"6s\"".to_owned()),
                        );
                        Duration::ZERO
                    }
                    Some(d) => d,
                    None => Duration::ZERO,
                },
            },
            connection_rate_per_ip: l.connection_rate_per_ip.as_ref().and_then(|r| self.rate(r)),
            message_rate_per_ip: l.message_rate_per_ip.as_ref().and_then(|r| self.rate(r)),
            recipient_rate_per_ip: l.recipient_rate_per_ip.as_ref().and_then(|r| self.rate(r)),
            message_rate_per_user: l.message_rate_per_user.as_ref().and_then(|r| self.rate(r)),
            recipient_rate_per_user: l
                .recipient_rate_per_user
                .as_ref()
                .and_then(|r| self.rate(r)),
        }
    }

    /// `count/period`: a positive count, a period of at least one second.
    fn rate(&mut self, value: &Spanned<String>) -> Option<Rate> {
        let text = value.get_ref().trim();
        let parsed = text.split_once('/').and_then(|(count, period)| {
            let count: u32 = count.trim().parse().ok().filter(|&c| c > 0)?;
            let period = parse_duration(period.trim()).ok()?;
            (period >= Duration::from_secs(1)).then_some(Rate { count, period })
        });
        if parsed.is_none() {
            self.r.at(
                value.span(),
                format!("invalid rate {text:?}"),
                Some("write count/period, e.g. \"300/1h\" or \"60/1m\" (a count of at least 1, a period of at least 1s); remove the key for no limit".to_owned()),
            );
        }
        parsed
    }

    fn smtp(&mut self, raw: &RawConfig) -> SmtpConfig {
        let s = &raw.smtp;
        let banner = match &s.banner {
            None => "ESMTP estafeta".to_owned(),
            Some(b) => {
                if b.get_ref().contains(['\r', '\n']) {
                    self.r.at(
                        b.span(),
                        "the banner contains a line break",
                        Some("write the banner on one line".to_owned()),
                    );
                }
                b.get_ref().clone()
            }
        };
        SmtpConfig {
            banner,
            vrfy: self.enumerated(s.vrfy.as_ref(), VRFY_MODES, VrfyMode::Ambiguous),
            expn: self.enumerated(s.expn.as_ref(), EXPN_MODES, ExpnMode::Off),
            max_unknown_recipients: s.max_unknown_recipients.unwrap_or(5),
            max_received_headers: s.max_received_headers.unwrap_or(50),
        }
    }
}

/// Lower-cases a domain and strips one trailing dot.
fn normalize_domain(name: &str) -> String {
    let name = name.trim();
    name.strip_suffix('.').unwrap_or(name).to_ascii_lowercase()
}

/// Checks an alias or catch-all target: a local part, or `local@domain` with both parts.
fn check_target(target: &str) -> Result<(), &'static str> {
    if target.is_empty() {
        return Err("it is empty");
    }
    if let Some((local, domain)) = target.rsplit_once('@')
        && (local.is_empty() || domain.is_empty())
    {
        return Err("an address needs a local part and a domain");
    }
    if target.contains(char::is_whitespace) {
        return Err("it contains a space");
    }
    Ok(())
}

/// How a duration value was written, for messages.
fn show(value: &Spanned<DurationValue>) -> String {
    match &value.get_ref().0 {
        StrOrInt::Str(s) => format!("{s:?}"),
        StrOrInt::Int(i) => i.to_string(),
    }
}

/// A postscreen DNSBL filter: four octets separated by dots, each `N`, `[a..b]` or a
/// `;`-separated list of those inside brackets (`127.0.0.[2..11]`, `127.0.0.[2;4;10..11]`).
fn parse_dnsbl_filter(text: &str) -> Option<[Vec<(u8, u8)>; 4]> {
    let mut octets: Vec<Vec<(u8, u8)>> = Vec::new();
    let mut rest = text;
    for i in 0..4 {
        let (part, tail) = if let Some(inner) = rest.strip_prefix('[') {
            let (inside, tail) = inner.split_once(']')?;
            (inside, tail)
        } else {
            let end = rest.find('.').unwrap_or(rest.len());
            (&rest[..end], &rest[end..])
        };
        let mut ranges = Vec::new();
        for item in part.split(';') {
            let item = item.trim();
            let (lo, hi) = match item.split_once("..") {
                Some((a, b)) => (a.trim().parse::<u8>().ok()?, b.trim().parse::<u8>().ok()?),
                None => {
                    let n = item.parse::<u8>().ok()?;
                    (n, n)
                }
            };
            if lo > hi {
                return None;
            }
            ranges.push((lo, hi));
        }
        octets.push(ranges);
        rest = if i < 3 { tail.strip_prefix('.')? } else { tail };
    }
    if !rest.is_empty() {
        return None;
    }
    octets.try_into().ok()
}

#[cfg(test)]
mod dnsbl_filter_tests {
    use super::parse_dnsbl_filter;

    #[test]
    fn filters() {
        let f = parse_dnsbl_filter("127.0.0.[2..11]").unwrap();
        assert_eq!(f[3], vec![(2, 11)]);
        assert_eq!(f[0], vec![(127, 127)]);
        let f = parse_dnsbl_filter("127.0.[0..255].[2;4;10..11]").unwrap();
        assert_eq!(f[2], vec![(0, 255)]);
        assert_eq!(f[3], vec![(2, 2), (4, 4), (10, 11)]);
        for bad in [
            "127.0.0",
            "127.0.0.2.1",
            "127.0.0.[11..2]",
            "127.0.0.256",
            "127.0.0.[2",
            "",
        ] {
            assert!(parse_dnsbl_filter(bad).is_none(), "{bad}");
        }
    }
}
