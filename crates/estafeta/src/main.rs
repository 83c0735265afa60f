//! The `estafeta` command: `serve`, `check-config`, `reload`, `user`, `explain`, `queue`,
//! `sendmail` (also run as `sendmail`, `mailq`, `newaliases`).

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use estafeta::metrics::Metrics;
use estafeta::privileges::{self, Account};
use estafeta::{SYSTEM_CONFIG, Server, find_config};
use estafeta_config::{Config, ListenerKind, LogFormat};

/// estafeta: an SMTP server (MTA, MSA and MDA) configured with one TOML file.
#[derive(Parser, Debug)]
#[command(name = "estafeta", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the server. Without --config: $ESTAFETA_CONFIG, else the embedded development
    /// default (SMTP on 127.0.0.1:2525, local domains localhost and example.test, data in
    /// ./estafeta-data).
    Serve {
        /// The configuration file.
        #[arg(long, short = 'c', value_name = "FILE")]
        config: Option<PathBuf>,
        /// Keep data (spool, Maildir folders) here instead of ./estafeta-data. Only with the
        /// embedded default; a config file has its own data_dir.
        #[arg(long, value_name = "DIR", conflicts_with = "config")]
        data_dir: Option<PathBuf>,
        /// Log level (error, warn, info, debug, trace); RUST_LOG overrides it.
        #[arg(long, value_name = "LEVEL")]
        log_level: Option<String>,
    },
    /// Ask the running server to re-read its configuration file (like SIGHUP, but waits for
    /// the outcome): exit 0 when the new configuration is in service, 1 when the file has
    /// errors (printed; the running configuration stays in service), 69 when no server answers.
    Reload {
        /// The configuration file (it names the control socket).
        #[arg(long, short = 'c', value_name = "FILE")]
        config: Option<PathBuf>,
    },
    /// Manage the users who may authenticate (the users file of the configuration).
    User {
        #[command(subcommand)]
        command: estafeta::user_cmd::UserCommand,
        /// The configuration file.
        #[arg(long, short = 'c', value_name = "FILE", global = true)]
        config: Option<PathBuf>,
    },
    /// Look at the queue and act on it (like mailq, postqueue and postsuper). Actions go to the
    /// running server through its control socket; with no server running they edit the spool.
    Queue {
        #[command(subcommand)]
        command: estafeta::queue_cmd::QueueCommand,
        /// The configuration file.
        #[arg(long, short = 'c', value_name = "FILE", global = true)]
        config: Option<PathBuf>,
        /// Print JSON instead of text.
        #[arg(long, global = true)]
        json: bool,
    },
    /// Show how the server would decide on a transaction, step by step, without any network
    /// I/O: which mynetworks entry matched, authentication, alias expansion, the verdict and
    /// the exact SMTP reply. Exit 0 when every recipient would be accepted, 1 otherwise.
    Explain {
        /// The client's IP address.
        #[arg(long, value_name = "IP")]
        client: std::net::IpAddr,
        /// The user the client authenticated as.
        #[arg(long, value_name = "USER")]
        auth: Option<String>,
        /// The MAIL FROM address (`<>` for the null sender).
        #[arg(long, value_name = "ADDR")]
        from: String,
        /// A RCPT TO address (repeatable).
        #[arg(long, value_name = "ADDR", required_unless_present = "message")]
        rcpt: Vec<String>,
        /// A message file: also show the inbound checks (SPF, DKIM, DMARC, ARC) the smtp
        /// listener would make on it for mail from outside, and its decision. These look up
        /// DNS records (through [dns] nameservers); nothing is sent.
        #[arg(long, value_name = "FILE")]
        message: Option<PathBuf>,
        /// The HELO name for the SPF checks of --message (default: the client's address
        /// literal).
        #[arg(long, value_name = "NAME")]
        helo: Option<String>,
        /// The configuration file.
        #[arg(long, short = 'c', value_name = "FILE")]
        config: Option<PathBuf>,
    },
    /// DKIM keys: `estafeta dkim generate DOMAIN` writes a new key and prints the TXT record to
    /// publish.
    Dkim {
        #[command(subcommand)]
        command: DkimCommand,
        /// The configuration file.
        #[arg(long, short = 'c', value_name = "FILE", global = true)]
        config: Option<PathBuf>,
    },
    /// Print every DNS record the local domains (or DOMAIN) need: MX, the host's A/AAAA and
    /// PTR, SPF, DKIM (each selector), DMARC, ready for a zone file. With --check, look each up
    /// through the resolver and say what is missing or wrong (exit 1 then).
    DnsRecords {
        /// One domain (default: every [[domain]]).
        #[arg(value_name = "DOMAIN")]
        domain: Option<String>,
        /// Look the records up and compare.
        #[arg(long)]
        check: bool,
        /// This host's public address (repeatable; default: the listeners' specific addresses,
        /// else the interfaces' public ones).
        #[arg(long, value_name = "IP")]
        address: Vec<std::net::IpAddr>,
        /// The configuration file.
        #[arg(long, short = 'c', value_name = "FILE")]
        config: Option<PathBuf>,
    },
    /// Submit a message like sendmail(8), through the running server's submit socket (the
    /// binary run as `sendmail` does this; as `mailq` it lists the queue): sendmail [-t] [-i]
    /// [-f SENDER] [-F NAME] [-bs] [-bp] [RCPT…]. Exit codes are sysexits.h's.
    Sendmail {
        /// sendmail's flags and the recipients.
        #[arg(
            allow_hyphen_values = true,
            trailing_var_arg = true,
            value_name = "ARGS"
        )]
        args: Vec<String>,
    },
    /// Check a configuration file: every error with file:line:column, then whether the server
    /// will be able to run with it on this host (the user exists; the certificate, key and
    /// users file can be read and the data directory written by the user the server runs
    /// as); warnings for Maildir directories it cannot create mailboxes in.
    CheckConfig {
        /// The configuration file (default: $ESTAFETA_CONFIG, else
        /// /etc/estafeta/estafeta.toml).
        #[arg(value_name = "FILE")]
        file: Option<PathBuf>,
    },
}

#[derive(Subcommand, Debug)]
enum DkimCommand {
    /// Write a new private key (mode 0600) for DOMAIN and print the TXT record to publish and
    /// the [[dkim]] to add. The file: the private_key of the [[dkim]] with this domain and
    /// selector, else --output, else data_dir/dkim/DOMAIN.SELECTOR.key. Never overwrites.
    Generate {
        /// The signing domain.
        #[arg(value_name = "DOMAIN")]
        domain: String,
        /// The selector (default: s and the year and month, e.g. s202612).
        #[arg(long, value_name = "S")]
        selector: Option<String>,
        /// ed25519 (ed25519-sha256) or rsa (rsa-sha256, 2048 bits).
        #[arg(long, value_name = "ALG", default_value = "ed25519", value_parser = ["ed25519", "rsa"])]
        algorithm: String,
        /// Where to write the key.
        #[arg(long, value_name = "FILE")]
        output: Option<PathBuf>,
    },
}

// sysexits.h: EX_CONFIG (78; systemd units can refuse to restart on it), EX_UNAVAILABLE (69).
use estafeta::sendmail::{EX_CONFIG, EX_UNAVAILABLE};

fn main() -> ExitCode {
    // sendmail's flags (-oi, -bs, -faddr) are not clap's: `sendmail`, `mailq`, `newaliases`
    // and `estafeta sendmail …` are told apart before clap parses anything.
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if let Some(code) = estafeta::sendmail::dispatch(&args) {
        return code;
    }
    let cli = Cli::parse();
    match cli.command {
        Command::CheckConfig { file } => check_config(file),
        Command::Reload { config } => reload_command(config),
        Command::Explain {
            client,
            auth,
            from,
            rcpt,
            message,
            helo,
            config,
        } => match load(find_config(config).as_deref()) {
            Ok(cfg) => {
                let policy = if rcpt.is_empty() {
                    ExitCode::SUCCESS
                } else {
                    estafeta::explain::run(&cfg, client, auth, &from, &rcpt)
                };
                match message {
                    Some(m) => {
                        let accepted = estafeta::authn_cmd::explain_message(
                            &cfg,
                            client,
                            helo.as_deref(),
                            &from,
                            &m,
                        );
                        if accepted && policy == ExitCode::SUCCESS {
                            ExitCode::SUCCESS
                        } else {
                            ExitCode::FAILURE
                        }
                    }
                    None => policy,
                }
            }
            Err(code) => code,
        },
        Command::Dkim {
            command:
                DkimCommand::Generate {
                    domain,
                    selector,
                    algorithm,
                    output,
                },
            config,
        } => match load(find_config(config).as_deref()) {
            Ok(cfg) => {
                let algorithm = if algorithm == "rsa" {
                    estafeta_config::DkimAlgorithm::Rsa
                } else {
                    estafeta_config::DkimAlgorithm::Ed25519
                };
                estafeta::authn_cmd::dkim_generate(&cfg, &domain, selector, algorithm, output)
            }
            Err(code) => code,
        },
        Command::DnsRecords {
            domain,
            check,
            address,
            config,
        } => match load(find_config(config).as_deref()) {
            Ok(cfg) => estafeta::authn_cmd::dns_records(&cfg, domain, check, address),
            Err(code) => code,
        },
        Command::User { command, config } => match load(find_config(config).as_deref()) {
            Ok(cfg) => estafeta::user_cmd::run(command, &cfg),
            Err(code) => code,
        },
        Command::Queue {
            command,
            config,
            json,
        } => match load(find_config(config).as_deref()) {
            Ok(cfg) => estafeta::queue_cmd::run(command, &cfg, json),
            Err(code) => code,
        },
        Command::Serve {
            config,
            data_dir,
            log_level,
        } => {
            // Not /etc/estafeta/estafeta.toml by itself: `estafeta serve` with no
            // configuration is the development server (DESIGN 8), also on a host where
            // estafeta is installed.
            let config = config.or_else(|| std::env::var_os("ESTAFETA_CONFIG").map(PathBuf::from));
            serve(config, data_dir, log_level)
        }
        Command::Sendmail { args } => estafeta::sendmail::run(&args),
    }
}

/// The configuration of `config`, or the embedded default without it; a broken file is
/// reported (every error, file:line:column) and gives exit code 78.
fn load(config: Option<&Path>) -> Result<Config, ExitCode> {
    match config {
        Some(path) => Config::from_file(path).map_err(|errors| {
            eprintln!("{errors}");
            ExitCode::from(EX_CONFIG)
        }),
        None => Ok(Config::embedded_default()),
    }
}

fn check_config(file: Option<PathBuf>) -> ExitCode {
    let file = find_config(file).unwrap_or_else(|| PathBuf::from(SYSTEM_CONFIG));
    let cfg = match Config::from_file(&file) {
        Ok(cfg) => cfg,
        Err(errors) => {
            eprintln!("{errors}");
            eprintln!(
                "{}: {} error(s); nothing was changed",
                file.display(),
                errors.len()
            );
            return ExitCode::FAILURE;
        }
    };
    let problems = estafeta::check::host_problems(&cfg);
    if !problems.is_empty() {
        for p in &problems {
            eprintln!("{}: error: {p}", file.display());
        }
        eprintln!(
            "{}: the file is valid, but the server cannot run with it on this host ({} problem(s))",
            file.display(),
            problems.len()
        );
        return ExitCode::FAILURE;
    }
    for w in estafeta::check::host_warnings(&cfg) {
        eprintln!("{}: warning: {w}", file.display());
    }
    println!(
        "{}: ok ({} listener(s), {} local domain(s), hostname {})",
        file.display(),
        cfg.listeners.len(),
        cfg.domains.len(),
        cfg.hostname
    );
    ExitCode::SUCCESS
}

fn reload_command(config: Option<PathBuf>) -> ExitCode {
    // A broken file is not sent to the server: it would refuse it the same way (and the
    // file's errors are the answer either way).
    let cfg = match find_config(config) {
        None => Config::embedded_default(),
        Some(path) => match Config::from_file(&path) {
            Ok(c) => c,
            Err(errors) => {
                eprintln!("{errors}");
                eprintln!("estafeta: not reloaded: the running configuration stays in service");
                return ExitCode::FAILURE;
            }
        },
    };
    match estafeta::control::send_reload(&cfg.control.socket) {
        Ok(Ok(warnings)) => {
            for w in &warnings {
                eprintln!("estafeta: warning: {w}");
            }
            println!("estafeta: reloaded: the new configuration is in service");
            ExitCode::SUCCESS
        }
        Ok(Err(errors)) => {
            eprintln!("{errors}");
            eprintln!("estafeta: not reloaded: the running configuration stays in service");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("estafeta: {e}");
            ExitCode::from(EX_UNAVAILABLE)
        }
    }
}

/// Sets up logging: text or JSON lines on stderr, or the journal (by configuration, or by
/// default when systemd connected stderr to the journal), each filtered by level or RUST_LOG;
/// and beside it the metrics layer, which sees every mail log event whatever that filter
/// (each layer has its own filter).
fn init_logging(cfg: &Config, level: Option<&str>, metrics: &Arc<Metrics>) {
    use tracing_subscriber::prelude::*;
    use tracing_subscriber::{EnvFilter, Registry};
    let default = level.unwrap_or(cfg.log.level.as_str());
    let filter = || EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    let format = cfg
        .log
        .format
        .unwrap_or(if estafeta::journald::stderr_is_journal() {
            LogFormat::Journald
        } else {
            LogFormat::Text
        });
    let fmt = || {
        tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_ansi(std::io::stderr().is_terminal())
    };
    type Output = Box<dyn tracing_subscriber::Layer<Registry> + Send + Sync>;
    let mut no_journal = None;
    let output: Output = match format {
        LogFormat::Json => fmt().json().with_filter(filter()).boxed(),
        LogFormat::Journald => match estafeta::journald::JournaldLayer::new() {
            Ok(layer) => layer.with_filter(filter()).boxed(),
            Err(e) => {
                no_journal = Some(e);
                fmt().with_filter(filter()).boxed()
            }
        },
        LogFormat::Text => fmt().with_filter(filter()).boxed(),
    };
    tracing_subscriber::registry()
        .with(output)
        .with(metrics.layer())
        .init();
    if let Some(e) = no_journal {
        tracing::warn!("no journal to log to ({e}): logging to stderr");
    }
}

/// Tells systemd (when it started us with `Type=notify`); nothing happens without
/// `NOTIFY_SOCKET`. The socket may be a path or, as sd_notify(3) allows, an abstract name
/// (`@…`), which the sd-notify crate does not reach.
fn notify(states: &[sd_notify::NotifyState]) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let mut message = String::new();
    for s in states {
        message.push_str(&format!("{s}\n"));
    }
    let sent = (|| -> std::io::Result<()> {
        use std::os::linux::net::SocketAddrExt;
        use std::os::unix::ffi::OsStrExt;
        let socket = std::os::unix::net::UnixDatagram::unbound()?;
        let bytes = path.as_bytes();
        let addr = match bytes.strip_prefix(b"@") {
            Some(name) => std::os::unix::net::SocketAddr::from_abstract_name(name)?,
            None => std::os::unix::net::SocketAddr::from_pathname(Path::new(&path))?,
        };
        socket.send_to_addr(message.as_bytes(), &addr)?;
        Ok(())
    })();
    if let Err(e) = sent {
        tracing::warn!("cannot notify systemd: {e}");
    }
}

/// The listening sockets systemd passed (socket activation): each named `smtp`,
/// `submission` or `submissions` (`FileDescriptorName=`) serves that listener kind.
fn inherited_listeners() -> Result<Vec<(ListenerKind, std::net::TcpListener)>, String> {
    use std::os::fd::FromRawFd;
    let fds = sd_notify::listen_fds_with_names()
        .map_err(|e| format!("the sockets passed by systemd (LISTEN_FDS): {e}"))?;
    let mut out = Vec::new();
    for (fd, name) in fds {
        let kind = match name.as_str() {
            "smtp" => ListenerKind::Smtp,
            "submission" => ListenerKind::Submission,
            "submissions" => ListenerKind::Submissions,
            other => {
                return Err(format!(
                    "systemd passed a socket named {other:?}: name each socket of estafeta.socket \
                     (FileDescriptorName=) smtp, submission or submissions"
                ));
            }
        };
        // SAFETY: systemd hands these descriptors to this process; each is taken once.
        let socket = unsafe { std::net::TcpListener::from_raw_fd(fd) };
        out.push((kind, socket));
    }
    Ok(out)
}

/// Who to become after binding, and whether starting at all is right: root must either drop
/// to `user` or be allowed explicitly (`run_as_root = true`; the embedded development
/// default, bound to loopback, is allowed with a warning).
fn account_to_become(cfg: &Config) -> Result<Option<Account>, String> {
    let euid = privileges::euid();
    match (&cfg.user, euid) {
        (Some(user), 0) => privileges::lookup(user, cfg.group.as_deref()).map(Some),
        (Some(user), uid) => {
            let me = privileges::user_name(uid).unwrap_or_else(|| uid.to_string());
            if &me != user {
                tracing::warn!(
                    "user = {user:?} is set, but the server was started as {me} (not root): it keeps running as {me}"
                );
            }
            Ok(None)
        }
        (None, 0) if cfg.source.is_none() => {
            tracing::warn!(
                "running as root: the embedded development default allows it; a configuration file must set user = \"…\" (or run_as_root = true)"
            );
            Ok(None)
        }
        (None, 0) if cfg.run_as_root => {
            tracing::warn!("running as root (run_as_root = true)");
            Ok(None)
        }
        (None, 0) => Err(
            "refusing to run as root: set user = \"estafeta\" in the configuration (started as root, estafeta binds its ports, then drops to that user), or run_as_root = true to run as root on purpose"
                .to_string(),
        ),
        (None, _) => Ok(None),
    }
}

fn serve(
    config: Option<PathBuf>,
    data_dir: Option<PathBuf>,
    log_level: Option<String>,
) -> ExitCode {
    let cfg = match &config {
        Some(path) => match Config::from_file(path) {
            Ok(c) => c,
            Err(errors) => {
                eprintln!("{errors}");
                eprintln!(
                    "estafeta: not started: fix the configuration ({} error(s))",
                    errors.len()
                );
                return ExitCode::from(EX_CONFIG);
            }
        },
        None => match &data_dir {
            Some(d) => Config::embedded_default_in(d),
            None => Config::embedded_default(),
        },
    };
    let metrics = Arc::new(Metrics::new());
    init_logging(&cfg, log_level.as_deref(), &metrics);
    let embedded = cfg.source.is_none();
    let account = match account_to_become(&cfg) {
        Ok(a) => a,
        Err(e) => {
            tracing::error!("not started: {e}");
            return ExitCode::from(EX_CONFIG);
        }
    };
    // The ports answer as soon as they are bound (below), before the runtime that handles
    // signals exists: SIGHUP, SIGTERM and SIGINT are held back until then (a SIGHUP's default
    // action would end the process). Threads started from here inherit the mask; the main
    // thread takes them once its handlers are in place.
    hold_signals(libc::SIG_BLOCK);
    let inherited = match inherited_listeners() {
        Ok(l) => l,
        Err(e) => {
            tracing::error!("not started: {e}");
            return ExitCode::from(EX_CONFIG);
        }
    };
    // Still one thread, maybe root: bind, read the certificate, create directories…
    let prepared = match Server::prepare(cfg, inherited) {
        Ok(p) => p,
        Err(e) => {
            tracing::error!("not started: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    // … then become the service user for good, before any other thread exists.
    if let Some(account) = &account {
        let data_dir = prepared.config().data_dir.clone();
        if let Err(e) = privileges::hand_over(&prepared.created_dirs, account)
            .and_then(|()| privileges::hand_over_data_dir(&data_dir, account))
            .and_then(|()| privileges::drop_to(account))
        {
            tracing::error!("not started: {e}");
            return ExitCode::FAILURE;
        }
        tracing::info!(
            user = %account.user,
            group = %account.group,
            uid = account.uid,
            gid = account.gid,
            "dropped root privileges"
        );
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            tracing::error!("not started: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        if embedded {
            tracing::info!(
                data_dir = %prepared.config().data_dir.display(),
                "running the embedded development default (no --config)"
            );
            create_demo_user(prepared.config());
        }
        tracing::debug!(config = ?prepared.config(), "effective configuration");
        if !embedded {
            for w in estafeta::check::host_warnings(prepared.config()) {
                tracing::warn!("{w}");
            }
        }
        // Before anything listens: a SIGHUP that arrives once clients can connect must
        // find its handler (the default action would end the process).
        let signals = Signals::new();
        hold_signals(libc::SIG_UNBLOCK);
        let mut server = match Server::start_prepared(prepared, metrics).await {
            Ok(s) => s,
            Err(e) => {
                tracing::error!("not started: {e:#}");
                return ExitCode::FAILURE;
            }
        };
        // Every listener is bound and the spool recovered.
        let watched = watch_server(&server);
        notify(&[
            sd_notify::NotifyState::Ready,
            sd_notify::NotifyState::Status(&status_line(&watched).await),
        ]);
        let stop = tokio_util::sync::CancellationToken::new();
        let status = tokio::spawn(report_status(stop.clone(), watched.clone()));
        run_until_stopped(&mut server, signals, config.as_deref(), &watched).await;
        stop.cancel();
        let _ = status.await;
        notify(&[
            sd_notify::NotifyState::Stopping,
            sd_notify::NotifyState::Status("stopping: finishing sessions and deliveries"),
        ]);
        tracing::info!("stopping");
        server.shutdown();
        if !server.wait(Duration::from_secs(30)).await {
            tracing::warn!("some tasks did not stop within 30 s");
        }
        tracing::info!("stopped");
        ExitCode::SUCCESS
    })
}

/// What the status reporter needs to see of the server.
#[derive(Clone)]
struct Watched {
    queue: estafeta_queue::QueueHandle,
    live: Arc<estafeta_listener::Live>,
    /// "<time> ok|FAILED" of the last reload, for the status line.
    last_reload: LastReload,
}

/// The outcome of the last reload, shown in `systemctl status`.
type LastReload = Arc<std::sync::Mutex<Option<String>>>;

fn watch_server(server: &Server) -> Watched {
    Watched {
        queue: server.queue().clone(),
        live: server.sessions(),
        last_reload: LastReload::default(),
    }
}

/// The `STATUS=` line of `systemctl status`: connections, queue size, the last reload.
async fn status_line(w: &Watched) -> String {
    let connections = w.live.active_connections();
    let queued = match tokio::time::timeout(Duration::from_secs(2), w.queue.stats()).await {
        Ok(Ok(s)) => format!("{} message(s) queued", s.messages),
        Ok(Err(_)) => "queue stopped".to_string(),
        Err(_) => "queue not answering".to_string(),
    };
    let mut line = format!("serving: {connections} connection(s), {queued}");
    if let Some(r) = w
        .last_reload
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .as_deref()
    {
        line.push_str(&format!("; last reload {r}"));
    }
    line
}

/// Every few seconds: `STATUS=` for `systemctl status` (connections, queue size), and the
/// watchdog's `WATCHDOG=1` while the scheduler's loop keeps turning (a wedged queue stops the
/// pings and systemd restarts the service).
async fn report_status(stop: tokio_util::sync::CancellationToken, w: Watched) {
    let watchdog = sd_notify::watchdog_enabled();
    let period = watchdog
        .map(|d| (d / 2).min(Duration::from_secs(5)))
        .unwrap_or(Duration::from_secs(5));
    let mut tick = tokio::time::interval(period);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let line = status_line(&w).await;
        let mut states = vec![sd_notify::NotifyState::Status(&line)];
        if let Some(limit) = watchdog {
            // The loop turns at least once a second when healthy.
            if w.queue.last_turn() < limit / 2 {
                states.push(sd_notify::NotifyState::Watchdog);
            } else {
                tracing::error!(
                    since_s = w.queue.last_turn().as_secs(),
                    "the queue's scheduler has not turned: not telling the watchdog"
                );
            }
        }
        notify(&states);
    }
}

/// Re-reads the configuration file and puts it in service; `Err` with the errors (as
/// check-config prints them) when the file is broken, the running configuration staying in
/// service.
async fn reload(
    server: &Server,
    path: Option<&Path>,
    watched: &Watched,
) -> Result<Vec<String>, String> {
    let started = Instant::now();
    let monotonic = sd_notify::NotifyState::monotonic_usec_now();
    let mut states = vec![sd_notify::NotifyState::Reloading];
    if let Ok(m) = monotonic {
        states.push(m);
    }
    notify(&states);
    let result = match path {
        // The embedded default has no file: only the certificate can change.
        None => {
            server.reload_tls().await;
            Ok(Vec::new())
        }
        Some(path) => {
            let path = path.to_path_buf();
            // File reads and account lookups (NSS may be slow): off the async workers.
            let read = tokio::task::spawn_blocking(move || {
                Config::from_file(&path)
                    .map_err(|errors| errors.to_string())
                    .and_then(|cfg| match estafeta::check::host_problems(&cfg) {
                        problems if problems.is_empty() => Ok(cfg),
                        problems => Err(problems.join("\n")),
                    })
            })
            .await;
            match read {
                Ok(Ok(cfg)) => server.reload(cfg).await.map_err(|e| format!("{e:#}")),
                Ok(Err(errors)) => Err(errors),
                Err(e) => Err(format!("reading the configuration: {e}")),
            }
        }
    };
    match &result {
        Ok(warnings) => {
            for w in warnings {
                tracing::warn!("reload: {w}");
            }
            tracing::info!(
                took_ms = started.elapsed().as_millis() as u64,
                "configuration reloaded"
            );
        }
        Err(errors) => {
            for line in errors.lines() {
                tracing::error!(
                    "reload refused, the running configuration stays in service: {line}"
                );
            }
        }
    }
    server.metrics().reload(result.is_ok());
    let when = estafeta_proto::trace::utc_timestamp(estafeta_queue::unix_now());
    let outcome = format!("{when} {}", if result.is_ok() { "ok" } else { "FAILED" });
    *watched
        .last_reload
        .lock()
        .unwrap_or_else(|e| e.into_inner()) = Some(outcome);
    notify(&[
        sd_notify::NotifyState::Ready,
        sd_notify::NotifyState::Status(&status_line(watched).await),
    ]);
    result
}

/// Blocks (`SIG_BLOCK`) or unblocks (`SIG_UNBLOCK`) SIGHUP, SIGTERM and SIGINT for the
/// calling thread; a signal that arrives while blocked waits, pending.
fn hold_signals(how: libc::c_int) -> bool {
    // SAFETY: a sigset built with sigemptyset/sigaddset, passed to pthread_sigmask.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for s in [libc::SIGHUP, libc::SIGTERM, libc::SIGINT] {
            libc::sigaddset(&mut set, s);
        }
        libc::pthread_sigmask(how, &set, std::ptr::null_mut()) == 0
    }
}

/// The signals the server acts on.
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
}

impl Signals {
    fn new() -> Signals {
        use tokio::signal::unix::{SignalKind, signal};
        Signals {
            term: signal(SignalKind::terminate()).expect("SIGTERM handler"),
            int: signal(SignalKind::interrupt()).expect("SIGINT handler"),
            hup: signal(SignalKind::hangup()).expect("SIGHUP handler"),
        }
    }
}

/// Serves until SIGTERM or SIGINT. SIGHUP and `estafeta reload` re-read the whole
/// configuration.
async fn run_until_stopped(
    server: &mut Server,
    signals: Signals,
    path: Option<&Path>,
    watched: &Watched,
) {
    let Signals {
        mut term,
        mut int,
        mut hup,
    } = signals;
    let mut requests = server.take_reload_requests();
    loop {
        tokio::select! {
            _ = term.recv() => return,
            _ = int.recv() => return,
            _ = hup.recv() => {
                tracing::info!("SIGHUP: re-reading the configuration");
                let _ = reload(server, path, watched).await;
            }
            Some(answer) = async {
                match requests.as_mut() {
                    Some(r) => r.recv().await,
                    None => std::future::pending().await,
                }
            } => {
                tracing::info!("estafeta reload: re-reading the configuration");
                let _ = answer.send(reload(server, path, watched).await);
            }
        }
    }
}

/// The embedded default's first start: when its users file does not exist yet, create the
/// user `demo@example.test` with a random password and print the password this once (only its
/// argon2id hash is stored). Later starts find the file and say nothing.
fn create_demo_user(cfg: &Config) {
    const DEMO: &str = "demo@example.test";
    let path = &cfg.auth.users_file;
    if path.exists() {
        return;
    }
    let mut random = [0u8; 12];
    let read = std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut random));
    if let Err(e) = read {
        tracing::warn!("no demo user: cannot read /dev/urandom: {e}");
        return;
    }
    let password: String = random.iter().map(|b| format!("{b:02x}")).collect();
    let created = estafeta_auth::hash_password(&password)
        .map_err(|e| e.to_string())
        .and_then(|hash| estafeta_auth::add_user(path, DEMO, &hash).map_err(|e| e.to_string()));
    match created {
        Ok(()) => eprintln!(
            "estafeta: created the demo user {DEMO} with password {password}\n\
             estafeta: (shown this once; {} holds only its argon2id hash.\n\
             estafeta:  Submit on 127.0.0.1:2587 with STARTTLS or 127.0.0.1:2465 with TLS;\n\
             estafeta:  add users with `estafeta user add ADDRESS`.)",
            path.display()
        ),
        Err(e) => tracing::warn!("no demo user: {e}"),
    }
}
