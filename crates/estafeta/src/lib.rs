//! estafeta: the wiring of the server. [`Server::start`] builds the spool, the scheduler, the
//! delivery agents and the listeners from a validated [`Config`]; the binary's `main` and the
//! end-to-end tests both use it.

pub mod router;
pub mod user_cmd;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use estafeta_config::{Config, ListenerKind, VrfyMode};
use estafeta_listener::ListenerContext;
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
    shutdown: CancellationToken,
    tracker: TaskTracker,
}

/// The session settings of the configuration.
pub fn session_config(cfg: &Config) -> SessionConfig {
    SessionConfig {
        hostname: cfg.hostname.clone(),
        banner: cfg.smtp.banner.clone(),
        max_message_size: cfg.limits.max_message_size,
        max_recipients: cfg.limits.max_recipients,
        max_errors: cfg.limits.max_errors,
        max_received_headers: cfg.smtp.max_received_headers as usize,
        vrfy: match cfg.smtp.vrfy {
            // `trusted` answers truthfully to trusted clients once the relay policy lands;
            // until then everybody gets the ambiguous answer, which reveals nothing.
            VrfyMode::Ambiguous | VrfyMode::Trusted => estafeta_proto::VrfyMode::Ambiguous,
            VrfyMode::Off => estafeta_proto::VrfyMode::Off,
        },
        starttls: false,
        auth: estafeta_proto::AuthMode::Never,
        require_auth: false,
        max_auth_failures: cfg.auth.max_failures,
        check_sender: false,
    }
}

/// What this version cannot do of a valid configuration: `check-config` reports it and `serve`
/// refuses to start, so that the two always agree.
pub fn unsupported(cfg: &Config) -> Vec<String> {
    cfg.listeners
        .iter()
        .enumerate()
        .filter(|(_, l)| l.kind != ListenerKind::Smtp)
        .map(|(i, l)| {
            format!(
                "listener[{i}].kind: \"{}\" ({}) needs STARTTLS and AUTH, which this version does \
                 not provide yet; use kind = \"smtp\" for now",
                l.kind.as_str(),
                l.addresses
                    .iter()
                    .map(|a| a.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        })
        .collect()
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
        if let Some(problem) = unsupported(&cfg).into_iter().next() {
            bail!("{problem}");
        }
        private_dir(&cfg.data_dir)?;
        let syncer = Syncer::start().context("cannot start the sync thread")?;
        let spool = Arc::new(
            Spool::open(&cfg.data_dir.join("queue"), &cfg.hostname, syncer.clone())
                .with_context(|| format!("cannot open the spool in {}", cfg.data_dir.display()))?,
        );
        let policy = Arc::new(Policy::new(&cfg));
        let router = Arc::new(Router::new(
            policy.clone(),
            Maildir::new(syncer, &cfg.hostname),
            cfg.delivery.maildir.clone(),
        ));
        let shutdown = CancellationToken::new();
        let tracker = TaskTracker::new();
        // Bind before anything is delivered, so a port conflict stops the start cleanly.
        let mut listeners = Vec::new();
        let mut local_addrs = Vec::new();
        for l in &cfg.listeners {
            for addr in &l.addresses {
                let std_listener = estafeta_listener::bind(*addr)
                    .with_context(|| format!("cannot listen on {addr} ({})", l.kind.as_str()))?;
                let listener = tokio::net::TcpListener::from_std(std_listener)?;
                local_addrs.push((l.kind, listener.local_addr()?));
                listeners.push(listener);
            }
        }
        let queue = estafeta_queue::start(
            spool,
            router,
            SchedulerConfig {
                max_deliveries: cfg.queue.max_deliveries,
                retry: cfg.queue.retry.clone(),
            },
            shutdown.clone(),
            &tracker,
        )
        .context("cannot recover the spool")?;
        let ctx = Arc::new(ListenerContext {
            session: Arc::new(session_config(&cfg)),
            policy,
            queue,
            command_timeout: cfg.limits.command_timeout,
            data_timeout: cfg.limits.data_timeout,
            max_connections: cfg.limits.max_connections,
            max_connections_per_ip: cfg.limits.max_connections_per_ip,
        });
        estafeta_listener::spawn_accept_loops(listeners, ctx, shutdown.clone(), &tracker);
        for (kind, addr) in &local_addrs {
            tracing::info!(kind = kind.as_str(), address = %addr, "listening");
        }
        Ok(Server {
            local_addrs,
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
