//! The `estafeta` command: `serve`, `check-config`, `user`, `explain`, `queue`, `sendmail`
//! (also run as `sendmail`, `mailq`, `newaliases`).

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use estafeta::Server;
use estafeta_config::{Config, LogFormat};

/// estafeta: an SMTP server (MTA, MSA and MDA) configured with one TOML file.
#[derive(Parser, Debug)]
#[command(name = "estafeta", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the server. Without --config: the embedded development default (SMTP on
    /// 127.0.0.1:2525, local domains localhost and example.test, data in ./estafeta-data).
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
    /// Manage the users who may authenticate (the users file of the configuration).
    User {
        #[command(subcommand)]
        command: estafeta::user_cmd::UserCommand,
        /// The configuration file (default: the embedded development default).
        #[arg(long, short = 'c', value_name = "FILE", global = true)]
        config: Option<PathBuf>,
    },
    /// Look at the queue and act on it (like mailq, postqueue and postsuper). Actions go to the
    /// running server through its control socket; with no server running they edit the spool.
    Queue {
        #[command(subcommand)]
        command: estafeta::queue_cmd::QueueCommand,
        /// The configuration file (default: the embedded development default).
        #[arg(long, short = 'c', value_name = "FILE", global = true)]
        config: Option<PathBuf>,
        /// Print JSON instead of text.
        #[arg(long, global = true)]
        json: bool,
    },
    /// Show how the server would decide on a transaction, step by step, without any network
    /// I/O: which mynetworks entry matched, authentication, alias expansion, the verdict and
    /// the exact SMTP reply.
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
        #[arg(long, value_name = "ADDR", required = true)]
        rcpt: Vec<String>,
        /// The configuration file (default: the embedded development default).
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
    /// Check a configuration file and print every error with file:line:column.
    CheckConfig {
        /// The configuration file.
        #[arg(value_name = "FILE", default_value = "/etc/estafeta/estafeta.toml")]
        file: PathBuf,
    },
}

/// sysexits.h EX_CONFIG: systemd units can refuse to restart on it.
const EX_CONFIG: u8 = 78;

fn main() -> ExitCode {
    // sendmail's flags (-oi, -bs, -faddr) are not clap's: `sendmail`, `mailq`, `newaliases`
    // and `estafeta sendmail …` are told apart before clap parses anything.
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if let Some(code) = estafeta::sendmail::dispatch(&args) {
        return code;
    }
    let cli = Cli::parse();
    match cli.command {
        Command::CheckConfig { file } => check_config(&file),
        Command::Explain {
            client,
            auth,
            from,
            rcpt,
            config,
        } => {
            let cfg = match load(config.as_deref()) {
                Ok(c) => c,
                Err(code) => return code,
            };
            estafeta::explain::run(&cfg, client, auth, &from, &rcpt)
        }
        Command::User { command, config } => {
            let cfg = match load(config.as_deref()) {
                Ok(c) => c,
                Err(code) => return code,
            };
            estafeta::user_cmd::run(command, &cfg)
        }
        Command::Queue {
            command,
            config,
            json,
        } => {
            let cfg = match load(config.as_deref()) {
                Ok(c) => c,
                Err(code) => return code,
            };
            estafeta::queue_cmd::run(command, &cfg, json)
        }
        Command::Serve {
            config,
            data_dir,
            log_level,
        } => serve(config, data_dir, log_level),
        Command::Sendmail { args } => estafeta::sendmail::run(&args),
    }
}

/// The configuration of `--config FILE`, or the embedded default without it; a broken file
/// is reported (every error, file:line:column) and gives exit code 78.
fn load(config: Option<&Path>) -> Result<Config, ExitCode> {
    match config {
        Some(path) => Config::from_file(path).map_err(|errors| {
            eprintln!("{errors}");
            ExitCode::from(EX_CONFIG)
        }),
        None => Ok(Config::embedded_default()),
    }
}

fn check_config(file: &Path) -> ExitCode {
    match Config::from_file(file) {
        Ok(cfg) => {
            println!(
                "{}: ok ({} listener(s), {} local domain(s), hostname {})",
                file.display(),
                cfg.listeners.len(),
                cfg.domains.len(),
                cfg.hostname
            );
            ExitCode::SUCCESS
        }
        Err(errors) => {
            eprintln!("{errors}");
            eprintln!(
                "{}: {} error(s); nothing was changed",
                file.display(),
                errors.len()
            );
            ExitCode::FAILURE
        }
    }
}

fn init_logging(cfg: &Config, level: Option<&str>) {
    use tracing_subscriber::EnvFilter;
    let default = level.unwrap_or(cfg.log.level.as_str());
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    match cfg.log.format {
        Some(LogFormat::Json) => builder.json().init(),
        _ => builder.init(),
    }
}

fn serve(
    config: Option<PathBuf>,
    data_dir: Option<PathBuf>,
    log_level: Option<String>,
) -> ExitCode {
    let embedded = config.is_none();
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
    init_logging(&cfg, log_level.as_deref());
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("estafeta: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        if embedded {
            tracing::info!(
                data_dir = %cfg.data_dir.display(),
                "running the embedded development default (no --config)"
            );
            create_demo_user(&cfg);
        }
        tracing::debug!(config = ?cfg, "effective configuration");
        let server = match Server::start(cfg).await {
            Ok(s) => s,
            Err(e) => {
                tracing::error!("not started: {e:#}");
                eprintln!("estafeta: not started: {e:#}");
                return ExitCode::FAILURE;
            }
        };
        wait_for_signal(&server).await;
        tracing::info!("stopping");
        server.shutdown();
        if !server.wait(Duration::from_secs(30)).await {
            tracing::warn!("some tasks did not stop within 30 s");
        }
        tracing::info!("stopped");
        ExitCode::SUCCESS
    })
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

/// Waits for SIGTERM or SIGINT. SIGHUP re-reads the TLS certificate (after an ACME renewal);
/// reloading the rest of the configuration comes with a later issue.
async fn wait_for_signal(server: &Server) {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    let mut hup = signal(SignalKind::hangup()).expect("SIGHUP handler");
    loop {
        tokio::select! {
            _ = term.recv() => return,
            _ = int.recv() => return,
            _ = hup.recv() => {
                tracing::info!("SIGHUP: reloading the TLS certificate (restart to apply other configuration changes)");
                server.reload_tls().await;
            }
        }
    }
}
