//! The `estafeta` command: `serve`, `check-config`.

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
    let cli = Cli::parse();
    match cli.command {
        Command::CheckConfig { file } => check_config(&file),
        Command::User { command, config } => {
            let cfg = match &config {
                Some(path) => match Config::from_file(path) {
                    Ok(c) => c,
                    Err(errors) => {
                        eprintln!("{errors}");
                        return ExitCode::from(EX_CONFIG);
                    }
                },
                None => Config::embedded_default(),
            };
            estafeta::user_cmd::run(command, &cfg)
        }
        Command::Serve {
            config,
            data_dir,
            log_level,
        } => serve(config, data_dir, log_level),
    }
}

fn check_config(file: &Path) -> ExitCode {
    match Config::from_file(file) {
        Ok(cfg) if !estafeta::unsupported(&cfg).is_empty() => {
            for problem in estafeta::unsupported(&cfg) {
                eprintln!("{}: error: {problem}", file.display());
            }
            ExitCode::FAILURE
        }
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
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
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
    let unsupported = estafeta::unsupported(&cfg);
    if !unsupported.is_empty() {
        for problem in &unsupported {
            eprintln!(
                "{}: error: {problem}",
                cfg.source
                    .as_deref()
                    .unwrap_or(Path::new("(embedded)"))
                    .display()
            );
        }
        eprintln!("estafeta: not started: fix the configuration");
        return ExitCode::from(EX_CONFIG);
    }
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
        wait_for_signal().await;
        tracing::info!("stopping");
        server.shutdown();
        if !server.wait(Duration::from_secs(30)).await {
            tracing::warn!("some tasks did not stop within 30 s");
        }
        tracing::info!("stopped");
        ExitCode::SUCCESS
    })
}

/// Waits for SIGTERM or SIGINT. SIGHUP (which would otherwise end the process) is caught and
/// logged: configuration reload comes with a later issue.
async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    let mut hup = signal(SignalKind::hangup()).expect("SIGHUP handler");
    loop {
        tokio::select! {
            _ = term.recv() => return,
            _ = int.recv() => return,
            _ = hup.recv() => {
                tracing::warn!("SIGHUP received: reloading is not supported yet; restart to apply a new configuration");
            }
        }
    }
}
