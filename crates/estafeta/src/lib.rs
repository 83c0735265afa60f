//! estafeta: the wiring of the server. [`Server::start`] builds the spool, the scheduler, the
//! delivery agents and the listeners from a validated [`Config`]; the binary's `main` and the
//! end-to-end tests both use it.

pub mod authn_cmd;
pub mod check;
pub mod control;
pub mod explain;
pub mod journald;
pub mod metrics;
pub mod privileges;
pub mod queue_cmd;
pub mod router;
pub mod sendmail;
pub mod tlsrpt;
pub mod user_cmd;

use estafeta_mailauth::MailAuth;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use estafeta_config::{Config, Listener, ListenerKind, VrfyMode};
use estafeta_listener::tls::{Tls, TlsSettings};
use estafeta_listener::{AuthContext, ListenerContext, ListenerSpec, Live, LocalSpec};
use estafeta_maildir::Maildir;
use estafeta_policy::Policy;
use estafeta_proto::SessionConfig;
use estafeta_queue::{QueueHandle, SchedulerConfig, Spool, Syncer};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::metrics::Metrics;
use crate::router::{LiveRouter, Router};

/// The installed server's configuration file.
pub const SYSTEM_CONFIG: &str = "/etc/estafeta/estafeta.toml";

/// The configuration file a command uses: `explicit` (`--config`), else `$ESTAFETA_CONFIG`,
/// else `/etc/estafeta/estafeta.toml` when it exists, else none (the embedded default). So
/// `estafeta queue list` (and `mailq`) on a production host looks at the production queue.
pub fn find_config(explicit: Option<PathBuf>) -> Option<PathBuf> {
    explicit
        .or_else(|| {
            std::env::var_os("ESTAFETA_CONFIG")
                .filter(|p| !p.is_empty())
                .map(PathBuf::from)
        })
        .or_else(|| {
            let system = PathBuf::from(SYSTEM_CONFIG);
            system.exists().then_some(system)
        })
}

/// A running server.
#[derive(Debug)]
pub struct Server {
    /// Every bound address with its listener kind (useful when the config asked for port 0).
    pub local_addrs: Vec<(ListenerKind, SocketAddr)>,
    /// The bound address of the metrics endpoint, when `[metrics] address` is set.
    pub metrics_addr: Option<SocketAddr>,
    metrics: Arc<Metrics>,
    tls: Option<Arc<Tls>>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
    live: Arc<Live>,
    router: Arc<LiveRouter>,
    queue: QueueHandle,
    /// What outbound delivery keeps across reloads.
    kept: Kept,
    running: Mutex<Running>,
    reloads: Option<tokio::sync::mpsc::Receiver<control::ReloadRequest>>,
}

/// What a reload compares against and may keep.
#[derive(Debug)]
struct Running {
    cfg: Config,
    users: Arc<estafeta_auth::Users>,
    auth: Arc<AuthContext>,
}

/// What is opened before privileges are dropped: the listening sockets (bound here, or
/// handed over by systemd), the data directory, the operator's certificate (often readable
/// by root only).
#[derive(Debug)]
pub struct Prepared {
    cfg: Config,
    listeners: Vec<(ListenerKind, std::net::TcpListener)>,
    tls: Option<Tls>,
    /// The local submission socket, and the guard that removes it if the start fails.
    submit: (std::os::unix::net::UnixListener, RemoveOnDrop),
    /// The metrics endpoint's socket.
    metrics: Option<std::net::TcpListener>,
    /// Directories created here (to hand over to the service user with the data directory).
    pub created_dirs: Vec<PathBuf>,
}

impl Prepared {
    /// The configuration being started.
    pub fn config(&self) -> &Config {
        &self.cfg
    }
}

/// The session settings for one listener of the configuration.
pub fn session_config(cfg: &Config, listener: &Listener, tls: bool) -> SessionConfig {
    let submission = listener.kind != ListenerKind::Smtp;
    SessionConfig {
        hostname: cfg.hostname.clone(),
        banner: cfg.smtp.banner.clone(),
        max_message_size: cfg.limits.max_message_size,
        max_recipients: cfg.limits.max_recipients,
        max_errors: cfg.limits.max_errors,
        max_received_headers: cfg.smtp.max_received_headers as usize,
        vrfy: match cfg.smtp.vrfy {
            VrfyMode::Ambiguous => estafeta_proto::VrfyMode::Ambiguous,
            VrfyMode::Trusted => estafeta_proto::VrfyMode::Trusted,
            VrfyMode::Off => estafeta_proto::VrfyMode::Off,
        },
        expn_trusted: cfg.smtp.expn == estafeta_config::ExpnMode::Trusted,
        max_unknown_recipients: cfg.smtp.max_unknown_recipients,
        // STARTTLS wherever there is a certificate (there always is one: a self-signed one is
        // generated when none is configured); AUTH only once encrypted (RFC 8314).
        starttls: tls,
        auth: if tls {
            estafeta_proto::AuthMode::AfterTls
        } else {
            estafeta_proto::AuthMode::Never
        },
        require_auth: submission,
        max_auth_failures: cfg.auth.max_failures,
        check_sender: listener.sender_check,
        authenticated_header: cfg.auth.authenticated_header,
    }
}

/// The session settings of the local submission socket (`sendmail`): the limits of the
/// configuration, without STARTTLS (the socket never leaves the machine), AUTH or the sender
/// check (the user is known from the kernel, and trusted like mynetworks, as Postfix trusts
/// its sendmail).
pub fn local_session_config(cfg: &Config) -> SessionConfig {
    let mut s = session_config(
        cfg,
        &Listener {
            kind: ListenerKind::Smtp,
            addresses: Vec::new(),
            sender_check: false,
        },
        false,
    );
    s.require_auth = false;
    s.check_sender = false;
    s
}

/// The port of MX hosts (RFC 5321 §4.5.4.2's well-known port; routes may name another).
const MX_PORT: u16 = 25;

/// What outbound delivery keeps for the server's life, across reloads: the idle sessions
/// (closed with QUIT at shutdown) and the MTA-STS policies fetched (a reload must not open a
/// window where a domain's policy is unknown).
#[derive(Clone, Debug, Default)]
struct Kept {
    idle: estafeta_relay::remote::ConnectionCache,
    sts: estafeta_relay::mtasts::PolicyCache,
}

/// Remote delivery from the configuration: `[dns]`, `[relay.routes]`, the smarthost.
fn remote_delivery(cfg: &Config, kept: &Kept) -> anyhow::Result<estafeta_relay::remote::Remote> {
    let idle = kept.idle.clone();
    use estafeta_relay::client::ClientConfig;
    use estafeta_relay::client::TlsPolicy;
    use estafeta_relay::remote::Remote;
    use estafeta_relay::resolve::{LocalIdentity, Resolver};
    let resolver = if cfg.dns.nameservers.is_empty() {
        Resolver::system().map_err(|e| anyhow::anyhow!("DNS: {e}"))?
    } else {
        Resolver::with_nameservers(&cfg.dns.nameservers)
    };
    let helo = cfg
        .relay
        .helo_name
        .clone()
        .unwrap_or_else(|| cfg.hostname.clone());
    let mut client = ClientConfig::new(helo.clone());
    client.source = cfg.relay.source_address;
    // The roots of verified TLS: `ca_file`, else the system's bundle (read when first
    // needed; MTA-STS is off without one).
    let roots = match &cfg.relay.ca_file {
        Some(path) => {
            let roots = estafeta_relay::client::load_roots(path)
                .map_err(|e| anyhow::anyhow!("relay.ca_file: {e}"))?;
            client.roots = Some(roots.clone());
            Some(roots)
        }
        None => match estafeta_relay::client::system_roots() {
            Ok(roots) => Some(roots),
            Err(e) => {
                if cfg.relay.mta_sts {
                    tracing::warn!(error = %e, "MTA-STS is off: no trusted roots (set [relay] ca_file)");
                }
                None
            }
        },
    };
    let mta_sts = match roots {
        Some(roots) if cfg.relay.mta_sts => {
            let mut verify = client.clone();
            verify.tls = TlsPolicy::Verify;
            verify.roots = Some(roots.clone());
            Some(estafeta_relay::remote::StsSettings {
                lookup: estafeta_relay::mtasts::MtaSts::new(
                    resolver.clone(),
                    roots,
                    443,
                    std::time::Duration::from_secs(30),
                    cfg.relay.ip_version,
                    kept.sts.clone(),
                ),
                client: verify,
            })
        }
        _ => None,
    };
    let policy = |level: estafeta_config::SmarthostTls| match level {
        estafeta_config::SmarthostTls::None => TlsPolicy::None,
        estafeta_config::SmarthostTls::Opportunistic => TlsPolicy::Opportunistic,
        estafeta_config::SmarthostTls::Required => TlsPolicy::Required,
        estafeta_config::SmarthostTls::Verify => TlsPolicy::Verify,
        estafeta_config::SmarthostTls::Dane => TlsPolicy::Dane,
    };
    let tls_policy = cfg
        .relay
        .tls_policy
        .iter()
        .map(|(domain, &level)| {
            let mut c = client.clone();
            c.tls = policy(level);
            (domain.clone(), c)
        })
        .collect();
    let mut smarthost_client = client.clone();
    smarthost_client.tls = policy(cfg.relay.smarthost_tls);
    if let Some(path) = &cfg.relay.smarthost_credentials {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("relay.smarthost_credentials {}", path.display()))?;
        let line = text.lines().next().unwrap_or("").trim();
        let (user, password) = line
            .split_once(':')
            .with_context(|| format!("{}: expected one line \"user:password\"", path.display()))?;
        smarthost_client.credentials = Some((user.to_string(), password.to_string()));
    }
    // Mail loops back to myself when an MX is an address we receive on at the MX port.
    let mut addrs: Vec<std::net::IpAddr> = cfg
        .listeners
        .iter()
        .flat_map(|l| l.addresses.iter())
        .filter(|a| a.port() == MX_PORT && !a.ip().is_unspecified())
        .map(|a| a.ip())
        .collect();
    addrs.sort();
    addrs.dedup();
    Ok(Remote {
        resolver,
        client,
        smarthost_client,
        tls_policy,
        mta_sts,
        // DANE through the validating nameservers `[dns] dnssec` names.
        dane: cfg.dns.dnssec.then(|| {
            estafeta_relay::dane::SecureDns::new(
                cfg.dns.nameservers.clone(),
                std::time::Duration::from_secs(10),
            )
        }),
        tls_reports: cfg.relay.tls_reports.then(|| {
            Arc::new(crate::tlsrpt::Store::new(&cfg.data_dir.join("tls-reports")))
                as Arc<dyn estafeta_relay::tlsrpt::TlsReporter>
        }),
        ip_version: cfg.relay.ip_version,
        local: LocalIdentity {
            hostnames: vec![cfg.hostname.to_lowercase(), helo.to_lowercase()],
            addrs,
        },
        mx_port: MX_PORT,
        idle,
    })
}

/// The scheduler's settings from the configuration (the server's and the offline
/// `estafeta queue bounce`'s).
pub fn scheduler_config(cfg: &Config) -> SchedulerConfig {
    SchedulerConfig {
        max_deliveries: cfg.queue.max_deliveries,
        max_per_destination: cfg.queue.max_per_destination,
        retry: cfg.queue.retry.clone(),
        hostname: cfg.hostname.clone(),
        max_lifetime: cfg.queue.max_lifetime,
        delay_warning: cfg.queue.delay_warning,
        // Postfix's bounce_size_limit is 50,000 bytes; a little more room here.
        max_returned: 100 * 1024,
        double_bounce_to: cfg.queue.double_bounce_to.as_deref().and_then(|a| {
            estafeta_proto::address::parse_forward_path(&format!("<{a}>"))
                .ok()
                .map(|(p, _)| p.mailbox)
        }),
        clock: estafeta_queue::Clock::System,
    }
}

/// Removes a socket file when a start fails after binding it (a failed start leaves nothing
/// behind), unless disarmed.
#[derive(Debug)]
struct RemoveOnDrop(Option<PathBuf>);

impl RemoveOnDrop {
    fn disarm(&mut self) {
        self.0 = None;
    }
}

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// Creates `dir` and its missing parents with mode 0700; records the directories it created.
fn create_private_dirs(dir: &Path, created: &mut Vec<PathBuf>) -> anyhow::Result<()> {
    create_dirs(dir, 0o700, created)
}

/// Creates `dir` and its missing parents with `mode`; records the directories it created.
fn create_dirs(dir: &Path, mode: u32, created: &mut Vec<PathBuf>) -> anyhow::Result<()> {
    let mut missing = Vec::new();
    let mut d = Some(dir);
    while let Some(p) = d {
        if p.as_os_str().is_empty() || p.exists() {
            break;
        }
        missing.push(p.to_path_buf());
        d = p.parent();
    }
    {
        use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(mode)
            .create(dir)
            .with_context(|| format!("cannot create directory {}", dir.display()))?;
        // The umask (the unit's is 0077) must not take away what others need here.
        for m in &missing {
            let _ = std::fs::set_permissions(m, std::fs::Permissions::from_mode(mode));
        }
    }
    created.extend(missing.into_iter().rev());
    Ok(())
}

/// The policy of a configuration, with the users file as the mailbox list of domains that
/// name none.
/// The owner of the users file's watch: every second, off the async threads, the file is
/// looked at and a changed one published. Stops once the users are out of service (a reload
/// opened another file, or the server stopped).
fn watch_users(users: &Arc<estafeta_auth::Users>) {
    let weak = Arc::downgrade(users);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let Some(users) = weak.upgrade() else {
                return;
            };
            let _ = tokio::task::spawn_blocking(move || users.check()).await;
        }
    });
}

fn build_policy(cfg: &Config, users: &Arc<estafeta_auth::Users>) -> Arc<Policy> {
    let directory = users.clone();
    Arc::new(
        Policy::new(cfg).with_users(Arc::new(move |address: &str| directory.contains(address))),
    )
}

/// The router of a configuration: local Maildirs, and remote delivery unless it is the
/// embedded development default, which never sends mail to other servers (CONFIG.md): what
/// trusted clients send elsewhere waits in the queue, visible in `queue list`.
fn build_router(
    cfg: &Config,
    policy: Arc<Policy>,
    syncer: Syncer,
    lmtp: router::LmtpClients,
    kept: &Kept,
) -> anyhow::Result<Router> {
    let router = Router::new(policy, Maildir::new(syncer, &cfg.hostname), cfg, lmtp)
        .map_err(anyhow::Error::msg)?;
    Ok(if cfg.source.is_some() {
        router.with_remote(Arc::new(remote_delivery(cfg, kept)?))
    } else {
        router
    })
}

/// The context new sessions start with.
fn listener_context(
    cfg: &Config,
    router: &Router,
    queue: QueueHandle,
    tls: &Arc<Tls>,
    auth: Arc<AuthContext>,
    kinds: &[ListenerKind],
    mail_auth: Arc<MailAuth>,
) -> Result<ListenerContext, String> {
    let open_ranges = cfg.relay.open_relay_ranges();
    let open_relay = (!open_ranges.is_empty()).then(|| {
        open_ranges
            .iter()
            .map(|n| n.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    });
    let mut sessions = HashMap::new();
    for &kind in kinds {
        // A kind systemd passed a socket for without a [[listener]] of it: that kind's
        // defaults.
        let fallback = Listener {
            kind,
            addresses: Vec::new(),
            sender_check: kind != ListenerKind::Smtp,
        };
        let l = cfg
            .listeners
            .iter()
            .find(|l| l.kind == kind)
            .unwrap_or(&fallback);
        sessions.insert(kind, Arc::new(session_config(cfg, l, true)));
    }
    Ok(ListenerContext {
        policy: router.policy().clone(),
        queue,
        tls: Some(tls.clone()),
        auth: Some(auth),
        command_timeout: cfg.limits.command_timeout,
        data_timeout: cfg.limits.data_timeout,
        max_connections: cfg.limits.max_connections,
        max_connections_per_ip: cfg.limits.max_connections_per_ip,
        open_relay,
        sessions,
        local_session: Arc::new(local_session_config(cfg)),
        mail_auth,
        greet_delay: cfg.limits.greet_delay,
        rates: Arc::new(estafeta_listener::rates::Rates::new(&cfg.limits)),
        lmtp: router::lmtp_verifiers(cfg)?,
        milters: estafeta_listener::milters::specs(&cfg.milters)?,
    })
}

fn tls_settings(cfg: &Config) -> TlsSettings {
    TlsSettings {
        certificate: cfg.tls.certificate.clone(),
        private_key: cfg.tls.private_key.clone(),
        data_dir: cfg.data_dir.clone(),
        hostname: cfg.hostname.clone(),
    }
}

/// The settings a reload cannot change in a running server, each named with what differs.
fn needs_restart(old: &Config, new: &Config) -> Vec<String> {
    let mut w = Vec::new();
    let mut check = |changed: bool, what: &str| {
        if changed {
            w.push(format!("{what} changed: restart estafeta to apply it"));
        }
    };
    check(
        old.listeners != new.listeners,
        "[[listener]] (kinds or addresses)",
    );
    check(old.data_dir != new.data_dir, "data_dir");
    check(
        old.hostname != new.hostname,
        "hostname (the greeting uses the new one; the spool's Received headers keep the old one)",
    );
    check(
        (&old.user, &old.group, old.run_as_root) != (&new.user, &new.group, new.run_as_root),
        "user/group/run_as_root",
    );
    check(old.log != new.log, "[log]");
    check(
        old.tls != new.tls,
        "[tls] certificate/private_key (the files in service are re-read)",
    );
    check(old.metrics != new.metrics, "[metrics] address");
    check(old.control != new.control, "[control] sockets");
    check(
        old.limits.max_connections != new.limits.max_connections,
        "limits.max_connections",
    );
    w
}

impl Server {
    /// Starts everything from a configuration (binding its listeners). Must run inside a tokio
    /// runtime. Its metrics count nothing but the queue: see [`Server::start_prepared`].
    pub async fn start(cfg: Config) -> anyhow::Result<Server> {
        let prepared = Server::prepare(cfg, Vec::new())?;
        Server::start_prepared(prepared, Arc::new(Metrics::new())).await
    }

    /// Opens what may need root, before privileges are dropped and before the runtime starts:
    /// the data directory, the listening sockets (each kind that systemd passed sockets for
    /// in `inherited` uses those instead of binding its configured addresses), and the
    /// operator's certificate. A port conflict stops the start here, cleanly.
    pub fn prepare(
        cfg: Config,
        inherited: Vec<(ListenerKind, std::net::TcpListener)>,
    ) -> anyhow::Result<Prepared> {
        let mut created_dirs = Vec::new();
        create_private_dirs(&cfg.data_dir, &mut created_dirs)?;
        // Local submission (`sendmail`), open to every local user (its directory must let
        // them in): bound before the TCP listeners, so that it answers once they do.
        let submit_path = cfg.control.submit_socket.clone();
        if let Some(parent) = submit_path.parent().filter(|p| !p.as_os_str().is_empty()) {
            create_dirs(parent, 0o755, &mut created_dirs)?;
        }
        let submit = control::bind_unix(&submit_path, 0o666, "submit socket")?;
        let submit = (submit, RemoveOnDrop(Some(submit_path)));
        let mut listeners = Vec::new();
        for l in &cfg.listeners {
            if inherited.iter().any(|(k, _)| *k == l.kind) {
                continue;
            }
            for addr in &l.addresses {
                let socket = estafeta_listener::bind(*addr)
                    .with_context(|| format!("cannot listen on {addr} ({})", l.kind.as_str()))?;
                listeners.push((l.kind, socket));
            }
        }
        for (kind, socket) in inherited {
            socket
                .set_nonblocking(true)
                .context("a socket passed by systemd")?;
            let addr = socket
                .local_addr()
                .map(|a| a.to_string())
                .unwrap_or_default();
            tracing::info!(kind = kind.as_str(), address = %addr, "using the listening socket passed by systemd");
            if !cfg.listeners.iter().any(|l| l.kind == kind) {
                tracing::warn!(
                    kind = kind.as_str(),
                    "systemd passed a socket for a listener kind the configuration has no [[listener]] of: served with that kind's defaults"
                );
            }
            listeners.push((kind, socket));
        }
        // The operator's certificate and key are read now (they are often readable by root
        // only); a self-signed one is generated later, by the service user, into data_dir.
        let tls = if cfg.tls.certificate.is_some() || cfg.tls.private_key.is_some() {
            Some(Tls::load(&tls_settings(&cfg)).context("TLS")?)
        } else {
            None
        };
        // Like the listeners (it may be a privileged port too).
        let metrics = cfg
            .metrics
            .address
            .map(|a| {
                estafeta_listener::bind(a)
                    .with_context(|| format!("cannot listen on {a} (metrics)"))
            })
            .transpose()?;
        Ok(Prepared {
            cfg,
            listeners,
            tls,
            submit,
            metrics,
            created_dirs,
        })
    }

    /// Starts a prepared server: spool recovery, scheduler, control socket, listeners, and
    /// `metrics` on `[metrics] address` (the binary's, whose counters its logging layer keeps:
    /// [`Metrics::layer`]). Must run inside a tokio runtime, as the user the server runs as.
    pub async fn start_prepared(
        prepared: Prepared,
        metrics: Arc<Metrics>,
    ) -> anyhow::Result<Server> {
        let Prepared {
            cfg,
            listeners,
            tls,
            submit: (submit, mut submit_guard),
            metrics: metrics_socket,
            created_dirs: _,
        } = prepared;
        // DKIM keys (readable by the server's user only), the SRS secret, the resolver of the
        // inbound checks: a key that cannot be used stops the start, naming the file.
        let mail_auth = Arc::new(MailAuth::build(&cfg).map_err(anyhow::Error::msg)?);
        let syncer = Syncer::start().context("cannot start the sync thread")?;
        let spool = Arc::new(
            Spool::open(&cfg.data_dir.join("queue"), &cfg.hostname, syncer.clone())
                .with_context(|| format!("cannot open the spool in {}", cfg.data_dir.display()))?,
        );
        // `estafeta queue …` reaches the scheduler through it; bound before the spool is
        // recovered. Not starting without it: the queue commands would take the server for
        // stopped and edit the spool under it. Removed again if the start fails below.
        let control = control::bind(&cfg.control.socket)?;
        // Users: a watcher re-reads the file when it changes and publishes the new users;
        // AUTH and the policy (the file also lists the mailboxes of domains that do not list
        // theirs) only read what was published.
        let users = Arc::new(
            estafeta_auth::Users::open(&cfg.auth.users_file)
                .with_context(|| format!("users file {}", cfg.auth.users_file.display()))?,
        );
        watch_users(&users);
        for w in users.warnings() {
            tracing::warn!("{w}");
        }
        let policy = build_policy(&cfg, &users);
        let lmtp = router::lmtp_clients(&cfg).map_err(anyhow::Error::msg)?;
        // One cache of idle outbound sessions and one of MTA-STS policies for the server's
        // life, across reloads; the sessions are closed with QUIT at shutdown.
        let kept = Kept {
            idle: Default::default(),
            sts: estafeta_relay::mtasts::PolicyCache::open(&cfg.data_dir.join("mta-sts"))
                .unwrap_or_else(|e| {
                    tracing::warn!(error = %e, dir = %cfg.data_dir.join("mta-sts").display(), "MTA-STS policies are kept in memory only");
                    Default::default()
                }),
        };
        let first_router = build_router(&cfg, policy, syncer, lmtp, &kept)?;
        let router = Arc::new(LiveRouter::new(first_router));
        let shutdown = CancellationToken::new();
        let tracker = TaskTracker::new();
        // TLS: the operator's certificate (read before privileges were dropped), or a
        // self-signed one generated into data_dir.
        let tls = Arc::new(match tls {
            Some(t) => t,
            None => Tls::load(&tls_settings(&cfg)).context("TLS")?,
        });
        tracing::info!(certificate = %tls.describe_source(), "TLS ready");
        tls.spawn_watcher(Duration::from_secs(60), shutdown.clone(), &tracker);
        let auth = Arc::new(AuthContext {
            verifier: estafeta_auth::Verifier::new(users.clone()),
            throttle: estafeta_auth::Throttle::new(),
            failure_delay: Duration::from_secs(1),
        });
        let mut specs = Vec::new();
        let mut local_addrs = Vec::new();
        let mut kinds = Vec::new();
        for (kind, socket) in listeners {
            let listener = tokio::net::TcpListener::from_std(socket)?;
            local_addrs.push((kind, listener.local_addr()?));
            if !kinds.contains(&kind) {
                kinds.push(kind);
            }
            specs.push(ListenerSpec { listener, kind });
        }
        // Like the listeners: bound before anything is delivered.
        let metrics_listener = metrics_socket
            .map(tokio::net::TcpListener::from_std)
            .transpose()
            .context("metrics socket")?;
        let metrics_addr = match &metrics_listener {
            Some(l) => Some(l.local_addr()?),
            None => None,
        };
        let queue = estafeta_queue::start(
            spool,
            router.clone(),
            scheduler_config(&cfg),
            shutdown.clone(),
            &tracker,
        )
        .context("cannot recover the spool")?;
        // TLS-RPT: yesterday's (and any earlier day's) reports, checked a few seconds after
        // the start and then every 10 minutes.
        if cfg.relay.tls_reports && cfg.source.is_some() {
            let dir = cfg.data_dir.join("tls-reports");
            let hostname = cfg.hostname.clone();
            let resolver = if cfg.dns.nameservers.is_empty() {
                estafeta_relay::resolve::Resolver::system().ok()
            } else {
                Some(estafeta_relay::resolve::Resolver::with_nameservers(
                    &cfg.dns.nameservers,
                ))
            };
            let (queue, stop) = (queue.clone(), shutdown.clone());
            let keys: Vec<_> = cfg
                .dkim
                .iter()
                .filter_map(|k| {
                    estafeta_mailauth::keys::load(k)
                        .map_err(
                            |e| tracing::warn!(error = %e, "TLS-RPT: reports unsigned by this key"),
                        )
                        .ok()
                })
                .collect();
            let signer = estafeta_mailauth::sign::Signer::new(keys);
            if let Some(resolver) = resolver {
                tracker.spawn(async move {
                    let mut wait = Duration::from_secs(3);
                    loop {
                        tokio::select! {
                            _ = stop.cancelled() => return,
                            _ = tokio::time::sleep(wait) => {}
                        }
                        tlsrpt::send_due(&dir, &hostname, &signer, &resolver, &queue).await;
                        wait = Duration::from_secs(600);
                    }
                });
            }
        }
        let (reload_tx, reload_rx) = tokio::sync::mpsc::channel(4);
        if let Err(e) = control::serve(
            control,
            queue.clone(),
            reload_tx,
            shutdown.clone(),
            &tracker,
        ) {
            shutdown.cancel();
            return Err(e);
        }
        if let Some(l) = metrics_listener {
            metrics::serve(
                l,
                metrics.clone(),
                queue.clone(),
                shutdown.clone(),
                &tracker,
            );
        }
        let ctx = listener_context(
            &cfg,
            &router.current(),
            queue.clone(),
            &tls,
            auth.clone(),
            &kinds,
            mail_auth,
        )
        .map_err(anyhow::Error::msg)?;
        let local = LocalSpec {
            listener: tokio::net::UnixListener::from_std(submit).context("submit socket")?,
            path: cfg.control.submit_socket.clone(),
        };
        // From here on the accept loop removes it.
        submit_guard.disarm();
        tracing::info!(socket = %local.path.display(), "submit socket ready");
        if let Some(ranges) = &ctx.open_relay {
            tracing::warn!(
                "open relay: mynetworks {ranges} is an open relay: any host on the internet may relay mail through this server (allow_open_relay = true)"
            );
        }
        let live = Arc::new(Live::new(ctx));
        estafeta_listener::spawn_accept_loops(
            specs,
            Some(local),
            live.clone(),
            shutdown.clone(),
            &tracker,
        );
        for (kind, addr) in &local_addrs {
            tracing::info!(kind = kind.as_str(), address = %addr, "listening");
        }
        Ok(Server {
            local_addrs,
            metrics_addr,
            metrics,
            tls: Some(tls),
            shutdown,
            tracker,
            live,
            router,
            queue,
            kept,
            running: Mutex::new(Running { cfg, users, auth }),
            reloads: Some(reload_rx),
        })
    }

    /// The first address of the first listener of `kind`.
    pub fn addr(&self, kind: ListenerKind) -> Option<SocketAddr> {
        self.local_addrs
            .iter()
            .find(|(k, _)| *k == kind)
            .map(|(_, a)| *a)
    }

    /// The server's metrics; a configuration reload counts itself with [`Metrics::reload`].
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// The queue.
    pub fn queue(&self) -> &QueueHandle {
        &self.queue
    }

    /// Connections being served right now.
    pub fn connections(&self) -> usize {
        self.live.active_connections()
    }

    /// The sessions' live context (its connection count is read by the status reporter).
    pub fn sessions(&self) -> Arc<Live> {
        self.live.clone()
    }

    /// The requests for a reload that arrive on the control socket (`estafeta reload`); the
    /// caller (the binary's signal loop) answers them. `None` after the first call.
    pub fn take_reload_requests(
        &mut self,
    ) -> Option<tokio::sync::mpsc::Receiver<control::ReloadRequest>> {
        self.reloads.take()
    }

    /// The configuration in service.
    pub fn config(&self) -> Config {
        self.running
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .cfg
            .clone()
    }

    /// Puts a new, already validated configuration in service: domains, mailboxes, aliases,
    /// mynetworks, limits, session settings, relay routes, smarthost, DNS, queue settings,
    /// the users file; the TLS certificate files are re-read. Everything is built first and
    /// then swapped: if anything cannot be built (a users file that cannot be read, a
    /// smarthost credentials file…), nothing changes and the error is returned. Sessions and
    /// delivery attempts already running finish with what they started with. Returns
    /// warnings for what cannot change without a restart (listener addresses, data_dir…).
    pub async fn reload(&self, new: Config) -> anyhow::Result<Vec<String>> {
        // Reading the users file, resolv.conf and the smarthost credentials blocks: this
        // worker is handed over meanwhile (the multi-threaded runtime's block_in_place).
        let (warnings, users, auth, router, ctx) =
            tokio::task::block_in_place(|| self.build(&new))?;
        // Everything is built: swap (the queue first: it fails only when it has stopped).
        self.queue
            .reconfigure(scheduler_config(&new))
            .map_err(|e| anyhow::anyhow!("the queue: {e}"))?;
        self.router.replace(router);
        self.live.store(ctx);
        {
            let mut running = self.running.lock().unwrap_or_else(|e| e.into_inner());
            *running = Running {
                cfg: new,
                users,
                auth,
            };
        }
        self.reload_tls().await;
        Ok(warnings)
    }

    /// Builds everything a reload to `new` puts in service, without changing anything.
    #[allow(clippy::type_complexity)]
    fn build(
        &self,
        new: &Config,
    ) -> anyhow::Result<(
        Vec<String>,
        Arc<estafeta_auth::Users>,
        Arc<AuthContext>,
        Router,
        ListenerContext,
    )> {
        let (warnings, users, auth) = {
            let running = self.running.lock().unwrap_or_else(|e| e.into_inner());
            let warnings = needs_restart(&running.cfg, new);
            if running.cfg.auth.users_file == new.auth.users_file {
                (warnings, running.users.clone(), running.auth.clone())
            } else {
                let users = Arc::new(
                    estafeta_auth::Users::open(&new.auth.users_file)
                        .with_context(|| format!("users file {}", new.auth.users_file.display()))?,
                );
                watch_users(&users);
                let auth = Arc::new(AuthContext {
                    verifier: estafeta_auth::Verifier::new(users.clone()),
                    throttle: estafeta_auth::Throttle::new(),
                    failure_delay: Duration::from_secs(1),
                });
                (warnings, users, auth)
            }
        };
        let policy = build_policy(new, &users);
        let syncer = self.queue.spool().syncer().clone();
        let lmtp = router::lmtp_clients(new).map_err(anyhow::Error::msg)?;
        let router = build_router(new, policy, syncer, lmtp, &self.kept)?;
        let tls = self.tls.clone().context("no TLS")?;
        let kinds: Vec<ListenerKind> = self.live.load().sessions.keys().copied().collect();
        let mail_auth = Arc::new(MailAuth::build(new).map_err(anyhow::Error::msg)?);
        let ctx = listener_context(
            new,
            &router,
            self.queue.clone(),
            &tls,
            auth.clone(),
            &kinds,
            mail_auth,
        )
        .map_err(anyhow::Error::msg)?;
        Ok((warnings, users, auth, router, ctx))
    }

    /// Re-reads the TLS certificate and key if they changed (SIGHUP; a watcher also checks
    /// every minute). A broken new pair is reported and the old one stays in service.
    pub async fn reload_tls(&self) {
        if let Some(tls) = self.tls.clone() {
            let tls2 = tls.clone();
            // File reads: off the async workers.
            match tokio::task::spawn_blocking(move || tls2.reload()).await {
                Ok(Ok(true)) => {
                    tracing::info!(certificate = %tls.describe_source(), "TLS certificate reloaded")
                }
                Ok(Ok(false)) => tracing::info!("TLS certificate unchanged"),
                Ok(Err(e)) => tracing::warn!(
                    "TLS certificate not reloaded, the old one stays in service: {e}"
                ),
                Err(e) => tracing::error!("TLS certificate reload failed: {e}"),
            }
        }
    }

    /// Asks everything to stop: listeners close, sessions get `421`, deliveries in flight
    /// finish.
    pub fn shutdown(&self) {
        self.shutdown.cancel();
    }

    /// Waits until every task has stopped, at most `grace`.
    pub async fn wait(self, grace: Duration) -> bool {
        self.tracker.close();
        let done = tokio::time::timeout(grace, self.tracker.wait())
            .await
            .is_ok();
        // The deliveries are over: the idle outbound sessions get their QUIT.
        self.kept.idle.close(Duration::from_secs(2)).await;
        done
    }
}
