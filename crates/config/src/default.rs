//! Defaults: the embedded development configuration and the values a file leaves out.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::types::*;
use crate::value::check_domain;

/// `limits.max_message_size` when not set: 25 MiB.
pub(crate) const MAX_MESSAGE_SIZE: u64 = 25 * 1024 * 1024;

/// `data_dir` when not set.
pub(crate) fn data_dir() -> PathBuf {
    PathBuf::from("./estafeta-data")
}

/// `delivery.maildir` when not set: `<data_dir>/mail/{domain}/{user}/Maildir`.
pub(crate) fn maildir_template(data_dir: &Path) -> String {
    data_dir
        .join("mail/{domain}/{user}/Maildir")
        .to_string_lossy()
        .into_owned()
}

/// `queue.retry` when not set.
pub(crate) fn retry_intervals() -> Vec<Duration> {
    [5, 10, 20, 40, 60, 120, 240]
        .into_iter()
        .map(|minutes| Duration::from_secs(minutes * 60))
        .collect()
}

/// The listeners of a file without `[[listener]]`: smtp on `0.0.0.0:25` and `[::]:25`.
pub(crate) fn production_listeners() -> Vec<Listener> {
    vec![Listener {
        kind: ListenerKind::Smtp,
        addresses: vec![
            SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), 25),
            SocketAddr::new(Ipv6Addr::UNSPECIFIED.into(), 25),
        ],
        sender_check: false,
    }]
}

impl Config {
    /// The embedded development default, used by `estafeta serve` without `--config`: smtp on
    /// `127.0.0.1:2525`, submission on 2587 and submissions on 2465, local domains `localhost` and `example.test` accepting every local part,
    /// data under `./estafeta-data`, relaying only for loopback clients.
    pub fn embedded_default() -> Config {
        Config::embedded_default_in(&data_dir())
    }

    /// The embedded development default with its data under `data_dir` (for tests and for
    /// running several instances side by side).
    pub fn embedded_default_in(data_dir: &Path) -> Config {
        let data_dir = data_dir.to_path_buf();
        let any = |name: &str| Domain {
            name: name.to_owned(),
            mailboxes: Mailboxes::Any,
            catch_all: None,
            aliases: Default::default(),
            delivery: DomainDelivery::Maildir,
        };
        Config {
            source: None,
            hostname: crate::system_hostname(),
            user: None,
            group: None,
            run_as_root: false,
            log: LogConfig {
                level: LogLevel::Info,
                format: None,
            },
            listeners: vec![
                Listener {
                    kind: ListenerKind::Smtp,
                    addresses: vec![SocketAddr::new(Ipv4Addr::LOCALHOST.into(), 2525)],
                    sender_check: false,
                },
                Listener {
                    kind: ListenerKind::Submission,
                    addresses: vec![SocketAddr::new(Ipv4Addr::LOCALHOST.into(), 2587)],
                    sender_check: true,
                },
                Listener {
                    kind: ListenerKind::Submissions,
                    addresses: vec![SocketAddr::new(Ipv4Addr::LOCALHOST.into(), 2465)],
                    sender_check: true,
                },
            ],
            // No [tls] files: a self-signed certificate is generated into data_dir.
            tls: TlsConfig::default(),
            auth: AuthConfig {
                users_file: data_dir.join("users"),
                max_failures: 3,
                authenticated_header: false,
            },
            relay: RelayConfig {
                mynetworks: loopback_networks(),
                allow_open_relay: false,
                smarthost: None,
                smarthost_tls: SmarthostTls::Required,
                smarthost_credentials: None,
                routes: Default::default(),
                tls_policy: Default::default(),
                mta_sts: true,
                ca_file: None,
                tls_reports: false,
                ip_version: IpVersion::Any,
                source_address: None,
                helo_name: None,
            },
            dns: DnsConfig::default(),
            domains: vec![any("localhost"), any("example.test")],
            delivery: DeliveryConfig {
                maildir: maildir_template(&data_dir),
                subaddress_separator: Some("+".to_owned()),
            },
            queue: QueueConfig {
                retry: retry_intervals(),
                max_lifetime: Duration::from_secs(5 * 86_400),
                delay_warning: Some(Duration::from_secs(4 * 3600)),
                max_deliveries: 64,
                max_per_destination: 4,
                double_bounce_to: None,
            },
            limits: Limits {
                max_message_size: MAX_MESSAGE_SIZE,
                max_recipients: 100,
                max_connections: 1000,
                max_connections_per_ip: 20,
                max_errors: 10,
                command_timeout: Duration::from_secs(300),
                data_timeout: Duration::from_secs(600),
                greet_delay: Duration::ZERO,
                connection_rate_per_ip: None,
                message_rate_per_ip: None,
                recipient_rate_per_ip: None,
                message_rate_per_user: None,
                recipient_rate_per_user: None,
            },
            smtp: SmtpConfig {
                banner: "ESMTP estafeta".to_owned(),
                vrfy: VrfyMode::Ambiguous,
                expn: ExpnMode::Off,
                max_unknown_recipients: 5,
                max_received_headers: 50,
            },
            metrics: MetricsConfig::default(),
            dkim: Vec::new(),
            verify: VerifyConfig::default(),
            srs: None,
            antispam: AntispamConfig::default(),
            milters: Vec::new(),
            pipes: Default::default(),
            control: ControlConfig {
                socket: data_dir.join("control.sock"),
                submit_socket: data_dir.join("submit.sock"),
            },
            data_dir,
        }
    }
}

/// The machine's name, for `hostname` when the configuration does not set it.
///
/// `gethostname(2)`; when that name has no dot, the first fully qualified name `/etc/hosts`
/// gives for it. Falls back to `"localhost"` when the name is empty or not a valid domain name,
/// so the result is never empty.
pub fn system_hostname() -> String {
    let name = gethostname().unwrap_or_default();
    let name = name.trim().trim_end_matches('.').to_owned();
    if name.is_empty() || check_domain(&name).is_err() {
        return "localhost".to_owned();
    }
    if !name.contains('.')
        && let Some(fqdn) = std::fs::read_to_string("/etc/hosts")
            .ok()
            .and_then(|hosts| fqdn_from_hosts(&hosts, &name))
    {
        return fqdn;
    }
    name
}

fn gethostname() -> Option<String> {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for writes of `buf.len()` bytes; gethostname writes at most
    // that many and we stop at the first NUL (or the end of the buffer).
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return None;
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8(buf[..end].to_vec()).ok()
}

/// In `/etc/hosts` text, the first dotted name on a line that also lists `short`.
fn fqdn_from_hosts(hosts: &str, short: &str) -> Option<String> {
    hosts.lines().find_map(|line| {
        let line = line.split('#').next().unwrap_or("");
        let names: Vec<&str> = line.split_whitespace().skip(1).collect();
        if !names.iter().any(|n| n.eq_ignore_ascii_case(short)) {
            return None;
        }
        names
            .iter()
            .find(|n| {
                n.len() > short.len()
                    && n[..short.len()].eq_ignore_ascii_case(short)
                    && n.as_bytes()[short.len()] == b'.'
                    && check_domain(n).is_ok()
            })
            .map(|n| n.to_ascii_lowercase())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostname_is_never_empty() {
        let name = system_hostname();
        assert!(!name.is_empty());
        assert_eq!(check_domain(&name), Ok(()));
    }

    #[test]
    fn fqdn_from_etc_hosts() {
        let hosts = "127.0.0.1 localhost\n# 10.0.0.1 box.wrong.example box\n127.0.1.1 box.example.org box\n";
        assert_eq!(
            fqdn_from_hosts(hosts, "box"),
            Some("box.example.org".to_owned())
        );
        assert_eq!(fqdn_from_hosts(hosts, "other"), None);
        assert_eq!(fqdn_from_hosts("127.0.1.1 box\n", "box"), None);
    }

    #[test]
    fn default_maildir_template() {
        assert_eq!(
            maildir_template(Path::new("./estafeta-data")),
            "./estafeta-data/mail/{domain}/{user}/Maildir"
        );
    }
}
