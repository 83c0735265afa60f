//! estafeta: the wiring of the server. [`Server::start`] builds the spool, the scheduler, the
//! delivery agents and the listeners from a validated [`Config`]; the binary's `main` and the
//! end-to-end tests both use it.

pub mod control;
pub mod explain;
pub mod queue_cmd;
pub mod router;
pub mod sendmail;
pub mod user_cmd;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use estafeta_config::{Config, Listener, ListenerKind, VrfyMode};
use estafeta_listener::tls::{Tls, TlsSettings};
use estafeta_listener::{AuthContext, ListenerContext, ListenerSpec, LocalSpec};
use estafeta_maildir::Maildir;
use estafeta_policy::Policy;
use estafeta_proto::SessionConfig;
use estafeta_queue::{SchedulerConfig, Spool, Syncer};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::router::Router;

/// A running server.
#[derive(Debug)]
pub struct Server {
    /// Every bound address with its listener kind (useful when the config asked for port 0).
    pub local_addrs: Vec<(ListenerKind, SocketAddr)>,
    tls: Option<Arc<Tls>>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
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

/// Remote delivery from the configuration: `[dns]`, `[relay.routes]`, the smarthost.
fn remote_delivery(cfg: &Config) -> anyhow::Result<estafeta_relay::remote::Remote> {
    use estafeta_relay::client::ClientConfig;
    use estafeta_relay::client::TlsPolicy;
    use estafeta_relay::remote::Remote;
    use estafeta_relay::resolve::{LocalIdentity, Resolver};
    let resolver = if cfg.dns.nameservers.is_empty() {
        Resolver::system().map_err(|e| anyhow::anyhow!("DNS: {e}"))?
    } else {
        Resolver::with_nameservers(&cfg.dns.nameservers)
    };
    let routes = cfg
        .relay
        .routes
        .iter()
        .map(|(domain, h)| (domain.to_lowercase(), h.clone()))
        .collect();
    let smarthost = cfg.relay.smarthost.clone();
    let helo = cfg
        .relay
        .helo_name
        .clone()
        .unwrap_or_else(|| cfg.hostname.clone());
    let mut client = ClientConfig::new(helo.clone());
    client.source = cfg.relay.source_address;
    let mut smarthost_client = client.clone();
    smarthost_client.tls = match cfg.relay.smarthost_tls {
        estafeta_config::SmarthostTls::None => TlsPolicy::None,
        estafeta_config::SmarthostTls::Opportunistic => TlsPolicy::Opportunistic,
        estafeta_config::SmarthostTls::Required => TlsPolicy::Required,
        estafeta_config::SmarthostTls::Verify => TlsPolicy::Verify,
    };
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
    addrs.dedup();
    Ok(Remote {
        resolver,
        client,
        smarthost_client,
        routes,
        smarthost,
        ip_version: cfg.relay.ip_version,
        local: LocalIdentity {
            hostnames: vec![cfg.hostname.to_lowercase(), helo.to_lowercase()],
            addrs,
        },
        mx_port: MX_PORT,
        idle: Default::default(),
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
    }
}

/// Creates a directory (and parents) readable only by the service user.
fn private_dir(path: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(path)
        .with_context(|| format!("cannot create directory {}", path.display()))
}

impl Server {
    /// Starts everything. Must run inside a tokio runtime.
    pub async fn start(cfg: Config) -> anyhow::Result<Server> {
        private_dir(&cfg.data_dir)?;
        let syncer = Syncer::start().context("cannot start the sync thread")?;
        let spool = Arc::new(
            Spool::open(&cfg.data_dir.join("queue"), &cfg.hostname, syncer.clone())
                .with_context(|| format!("cannot open the spool in {}", cfg.data_dir.display()))?,
        );
        // `estafeta queue …` reaches the scheduler through it; bound before the spool is
        // recovered. Not starting without it: the queue commands would take the server for
        // stopped and edit the spool under it.
        let control = control::bind(&cfg.control.socket)?;
        // Local submission (`sendmail`), open to every local user; bound before the TCP
        // listeners, so that it is there once the server answers on them.
        let submit_path = cfg.control.submit_socket.clone();
        let submit = control::bind_unix(&submit_path, 0o666, "submit socket")?;
        // Users: the file is re-read by itself when it changes. It also lists the mailboxes
        // of domains that do not list theirs.
        let users = Arc::new(
            estafeta_auth::Users::open(&cfg.auth.users_file)
                .with_context(|| format!("users file {}", cfg.auth.users_file.display()))?,
        );
        for w in users.warnings() {
            tracing::warn!("{w}");
        }
        let directory = users.clone();
        let policy = Arc::new(
            Policy::new(&cfg)
                .with_users(Arc::new(move |address: &str| directory.contains(address))),
        );
        let router = Router::new(
            policy.clone(),
            Maildir::new(syncer, &cfg.hostname),
            cfg.delivery.maildir.clone(),
        );
        // The embedded development default never sends mail to other servers (CONFIG.md):
        // what trusted clients send elsewhere waits in the queue, visible in `queue list`.
        let router = Arc::new(if cfg.source.is_some() {
            router.with_remote(Arc::new(remote_delivery(&cfg)?))
        } else {
            router
        });
        let shutdown = CancellationToken::new();
        let tracker = TaskTracker::new();
        // TLS: the operator's certificate, or a self-signed one generated into data_dir.
        let tls = Arc::new(
            Tls::load(&TlsSettings {
                certificate: cfg.tls.certificate.clone(),
                private_key: cfg.tls.private_key.clone(),
                data_dir: cfg.data_dir.clone(),
                hostname: cfg.hostname.clone(),
            })
            .context("TLS")?,
        );
        tracing::info!(certificate = %tls.describe_source(), "TLS ready");
        tls.spawn_watcher(Duration::from_secs(60), shutdown.clone(), &tracker);
        let auth = Arc::new(AuthContext {
            verifier: estafeta_auth::Verifier::new(users),
            throttle: estafeta_auth::Throttle::new(),
            failure_delay: Duration::from_secs(1),
        });
        // Bind before anything is delivered, so a port conflict stops the start cleanly.
        let mut specs = Vec::new();
        let mut local_addrs = Vec::new();
        for l in &cfg.listeners {
            let session = Arc::new(session_config(&cfg, l, true));
            for addr in &l.addresses {
                let std_listener = estafeta_listener::bind(*addr)
                    .with_context(|| format!("cannot listen on {addr} ({})", l.kind.as_str()))?;
                let listener = tokio::net::TcpListener::from_std(std_listener)?;
                local_addrs.push((l.kind, listener.local_addr()?));
                specs.push(ListenerSpec {
                    listener,
                    session: session.clone(),
                    implicit_tls: l.kind == ListenerKind::Submissions,
                    kind: l.kind.as_str(),
                });
            }
        }
        let queue = estafeta_queue::start(
            spool,
            router,
            scheduler_config(&cfg),
            shutdown.clone(),
            &tracker,
        )
        .context("cannot recover the spool")?;
        if let Err(e) = control::serve(control, queue.clone(), shutdown.clone(), &tracker) {
            shutdown.cancel();
            return Err(e);
        }
        let open_ranges = cfg.relay.open_relay_ranges();
        let open_relay_text = (!open_ranges.is_empty()).then(|| {
            open_ranges
                .iter()
                .map(|n| n.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        });
        let open_relay = open_relay_text.clone();
        let ctx = Arc::new(ListenerContext {
            policy,
            queue,
            tls: Some(tls.clone()),
            auth: Some(auth),
            command_timeout: cfg.limits.command_timeout,
            data_timeout: cfg.limits.data_timeout,
            max_connections: cfg.limits.max_connections,
            max_connections_per_ip: cfg.limits.max_connections_per_ip,
            open_relay,
        });
        let local = LocalSpec {
            listener: tokio::net::UnixListener::from_std(submit).context("submit socket")?,
            path: submit_path,
            session: Arc::new(local_session_config(&cfg)),
        };
        tracing::info!(socket = %local.path.display(), "submit socket ready");
        estafeta_listener::spawn_accept_loops(specs, Some(local), ctx, shutdown.clone(), &tracker);
        if let Some(ranges) = &open_relay_text {
            tracing::warn!(
                "open relay: mynetworks {ranges} is an open relay: any host on the internet may relay mail through this server (allow_open_relay = true)"
            );
        }
        for (kind, addr) in &local_addrs {
            tracing::info!(kind = kind.as_str(), address = %addr, "listening");
        }
        Ok(Server {
            local_addrs,
            tls: Some(tls),
            shutdown,
            tracker,
        })
    }

    /// The first address of the first listener of `kind`.
    pub fn addr(&self, kind: ListenerKind) -> Option<SocketAddr> {
        self.local_addrs
            .iter()
            .find(|(k, _)| *k == kind)
            .map(|(_, a)| *a)
    }

    /// Re-reads the TLS certificate and key if they changed (SIGHUP; a watcher also checks
    /// every minute). A broken new pair is reported and the old one stays in service.
    pub async fn reload_tls(&self) {
        if let Some(tls) = self.tls.clone() {
            let tls2 = tls.clone();
            // File reads: off the async workers.
            let result = tokio::task::spawn_blocking(move || tls2.reload())
                .await
                .unwrap_or(Ok(false));
            match result {
                Ok(true) => {
                    tracing::info!(certificate = %tls.describe_source(), "TLS certificate reloaded")
                }
                Ok(false) => tracing::info!("TLS certificate unchanged"),
                Err(e) => tracing::warn!(
                    "TLS certificate not reloaded, the old one stays in service: {e}"
                ),
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
        tokio::time::timeout(grace, self.tracker.wait())
            .await
            .is_ok()
    }
}
